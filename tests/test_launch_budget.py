"""The machine's launch budget in real Redis: shared by several workers' queues, in priority
order, with queue positions for waiters, and places that outlive no worker."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis

from shared.redis_keys import Keys
from worker.launch_budget import LaunchBudget
from worker.qr_queue import BACKGROUND, RESTORE, USER, QrQueue


@contextlib.asynccontextmanager
async def budgets(
    redis_client: aioredis.Redis, prefix: str, n: int, *, limit: int, **kw: int
) -> AsyncIterator[list[QrQueue]]:
    queues = []
    made = []
    for i in range(n):
        budget = LaunchBudget(
            redis_client, Keys(prefix), worker_name=f"w{i}", scope="test", limit=limit, timeout_s=2.0, **kw
        )
        await budget.start()
        queue = QrQueue(5)
        queue.budget = budget
        queues.append(queue)
        made.append(budget)
    try:
        yield queues
    finally:
        for budget in made:
            await budget.close()


@pytest.mark.parametrize("limit", [1, 2])
async def test_three_workers_never_exceed_the_budget_and_users_go_first(
    redis_client: aioredis.Redis, redis_prefix: str, limit: int
) -> None:
    running = 0
    most = 0
    order: list[str] = []
    gate = asyncio.Event()
    first_in = asyncio.Event()

    async def start(queue: QrQueue, name: str, priority: int) -> None:
        nonlocal running, most
        async with queue.slot(priority):
            running += 1
            most = max(most, running)
            order.append(name)
            if len(order) == limit:
                first_in.set()
            await gate.wait()
            await asyncio.sleep(0.01)
            running -= 1

    async with budgets(redis_client, redis_prefix, 3, limit=limit) as queues:
        first = [asyncio.create_task(start(queues[i], f"first{i}", USER)) for i in range(limit)]
        await asyncio.wait_for(first_in.wait(), 10)
        late = [
            asyncio.create_task(start(queues[0], "restore", RESTORE)),
            asyncio.create_task(start(queues[1], "pool", BACKGROUND)),
        ]
        await asyncio.sleep(0.1)  # both queued in Redis before the users arrive
        late += [asyncio.create_task(start(queues[i % 3], f"user{i}", USER)) for i in range(6)]
        await asyncio.sleep(0.1)
        assert sum(q.waiting for q in queues) == 8
        gate.set()
        await asyncio.wait_for(asyncio.gather(*first, *late), 30)
    assert most == limit  # never more than the budget across the three workers
    assert set(order[-2:]) == {"pool", "restore"}  # every user before them
    if limit == 1:
        assert order[-2:] == ["pool", "restore"]  # the pool's refill before a restore
    assert all(q.active == 0 and q.waiting == 0 and q.fallbacks_total == 0 for q in queues)


async def test_a_waiter_hears_its_position_as_it_moves_up(
    redis_client: aioredis.Redis, redis_prefix: str
) -> None:
    heard: asyncio.Queue[int] = asyncio.Queue()
    gates = [asyncio.Event() for _ in range(4)]
    inside = [asyncio.Event() for _ in range(4)]

    async def hold(queue: QrQueue, i: int) -> None:
        on_wait = (
            (lambda position, eta_ms: heard.put_nowait(position if eta_ms > 0 else -1)) if i == 3 else None
        )
        async with queue.slot(USER, on_wait if i == 3 else None):
            inside[i].set()
            await gates[i].wait()

    async with budgets(redis_client, redis_prefix, 1, limit=1) as (queue,):
        tasks = [asyncio.create_task(hold(queue, 0))]
        await asyncio.wait_for(inside[0].wait(), 10)
        tasks += [asyncio.create_task(hold(queue, i)) for i in (1, 2)]
        await asyncio.sleep(0.1)  # both queued ahead of the next one
        tasks.append(asyncio.create_task(hold(queue, 3)))
        assert await asyncio.wait_for(heard.get(), 10) == 3
        for i in range(2):  # each start ahead of it that ends moves it up one
            gates[i].set()
            assert await asyncio.wait_for(heard.get(), 10) == 2 - i
        gates[2].set()
        await asyncio.wait_for(inside[3].wait(), 10)
        gates[3].set()
        await asyncio.wait_for(asyncio.gather(*tasks), 10)
    assert heard.empty()


async def test_a_place_held_by_a_worker_that_died_comes_back(
    redis_client: aioredis.Redis, redis_prefix: str
) -> None:
    async with budgets(redis_client, redis_prefix, 2, limit=1, hold_ttl_ms=1500) as (dead, alive):
        gone = dead.slot(USER)
        await gone.__aenter__()
        assert dead.budget is not None
        dead.budget._held.clear()  # the worker stops refreshing its hold, as a killed one would
        took = alive.slot(USER)  # (referenced: a collected context manager would release it)
        await asyncio.wait_for(took.__aenter__(), 15)
        assert alive.active == 1
        await took.__aexit__(None, None, None)
        await gone.__aexit__(None, None, None)


async def test_without_redis_a_worker_falls_back_to_its_own_limit() -> None:
    broken = aioredis.Redis(host="127.0.0.1", port=1, socket_connect_timeout=0.2)
    budget = LaunchBudget(broken, Keys("x:"), worker_name="w", scope="test", limit=4, timeout_s=0.5)
    queue = QrQueue(1)
    queue.budget = budget
    second = queue.slot(USER)
    async with queue.slot(USER):
        assert queue.active == 1 and queue.fallbacks_total == 1
        blocked = asyncio.create_task(second.__aenter__())
        await asyncio.sleep(0.8)
        assert not blocked.done()  # the local limit of 1 holds
    await asyncio.wait_for(blocked, 5)
    assert queue.active == 1 and queue.fallbacks_total == 2
    await second.__aexit__(None, None, None)
    await broken.aclose()


@pytest.mark.parametrize("limit", [0, -1])
def test_a_budget_needs_a_place(limit: int) -> None:
    with pytest.raises(ValueError, match="at least 1"):
        LaunchBudget(aioredis.Redis(), Keys(), worker_name="w", scope="s", limit=limit, timeout_s=1)
