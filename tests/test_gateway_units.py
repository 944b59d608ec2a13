"""Gateway units, fast and without processes: breaker, ring, routing, proxy retries, auth, SSE framing."""

from __future__ import annotations

import asyncio
import hashlib
import random
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import asyncpg
import orjson
import pytest
import redis.asyncio as aioredis
from aiohttp import web

from gateway.app import create_app
from gateway.auth import Authenticator, Caller, KeyCache
from gateway.breaker import Breaker, BreakerPolicy, BreakerState
from gateway.errors import NoWorkerAvailable, UpstreamError
from gateway.membership import Membership, Worker, read_heartbeats
from gateway.proxy import Answer, Call, Proxy
from gateway.ring import Ring, load_cap, place, sample_keys
from gateway.routing import Kind, Plan, Router
from gateway.sse import Frames, Streams, relay
from shared.errors import NotFound, Unauthorized, Unavailable
from shared.heartbeats import HeartbeatAuth
from shared.models import now_ms
from shared.redis_keys import Keys
from shared.settings import Settings
from shared.store import Store
from tests.conftest import REDIS_URL, AiohttpClient, AiohttpServer, EventStream


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


# ------------------------------------------------------------------------------------------ breaker
def state(b: Breaker) -> BreakerState:
    return b.state  # a call, so that mypy does not narrow the property between steps


def breaker(clock: Clock, **policy: Any) -> Breaker:
    return Breaker(BreakerPolicy(**{"failures": 3, "open_s": 2.0, **policy}), clock=clock)


def test_breaker_opens_after_consecutive_failures_and_a_success_resets_the_count() -> None:
    clock = Clock()
    b = breaker(clock, failure_rate=1.1)  # rate never trips: consecutive failures only
    b.failure()
    b.failure()
    b.success()
    b.failure()
    b.failure()
    assert state(b) is BreakerState.CLOSED and b.acquire()
    b.failure()
    assert state(b) is BreakerState.OPEN
    assert not b.acquire() and not b.available()
    assert b.trips == 1


def test_breaker_opens_on_failure_rate_over_the_window_with_a_minimum_of_calls() -> None:
    clock = Clock()
    b = breaker(clock, failures=100, failure_rate=0.5, window_s=10.0, min_calls=5)
    for ok in (True, False, True, False):
        b.success() if ok else b.failure()
    assert state(b) is BreakerState.CLOSED  # 2/4 failed, but fewer than 5 calls
    b.failure()  # 3/5
    assert state(b) is BreakerState.OPEN


def test_breaker_failure_rate_forgets_calls_older_than_the_window() -> None:
    clock = Clock()
    b = breaker(clock, failures=100, failure_rate=0.6, window_s=10.0, min_calls=5)
    for _ in range(4):
        b.success()
        b.failure()
    assert state(b) is BreakerState.CLOSED  # 4/8 failed, below 60 %
    clock.advance(11)  # those 8 calls leave the window
    for ok in (True, True, False, False, False):
        b.success() if ok else b.failure()
    # 3/5 in the window (counting the old calls too it would be 7/13, below the rate)
    assert state(b) is BreakerState.OPEN


def test_breaker_half_open_lets_one_probe_through_at_a_time() -> None:
    clock = Clock()
    b = breaker(clock)
    for _ in range(3):
        b.failure()
    clock.advance(1.9)
    assert state(b) is BreakerState.OPEN and not b.acquire()
    clock.advance(0.1)
    assert state(b) is BreakerState.HALF_OPEN
    assert b.available()
    assert b.acquire()  # the probe
    assert not b.acquire() and not b.available()  # a second caller waits
    b.release()  # the probe ended without a verdict
    assert b.acquire()


def test_breaker_half_open_success_closes_and_failure_reopens() -> None:
    clock = Clock()
    changes: list[BreakerState] = []
    b = Breaker(BreakerPolicy(failures=1, open_s=2.0), clock=clock, on_change=changes.append)
    b.failure()
    clock.advance(2)
    assert b.acquire()
    b.failure()  # the probe failed: open again, for another open_s
    assert state(b) is BreakerState.OPEN
    clock.advance(1)
    assert state(b) is BreakerState.OPEN
    clock.advance(1)
    assert b.acquire()
    b.success()
    assert state(b) is BreakerState.CLOSED and b.acquire()
    assert changes == [
        BreakerState.OPEN,
        BreakerState.HALF_OPEN,
        BreakerState.OPEN,
        BreakerState.HALF_OPEN,
        BreakerState.CLOSED,
    ]


def test_breaker_ignores_late_answers_while_open() -> None:
    clock = Clock()
    b = breaker(clock, failures=1)
    b.failure()
    b.success()  # a call made before the breaker opened
    assert state(b) is BreakerState.OPEN


# ------------------------------------------------------------------------------------------ ring
NODES = ["127.0.0.1:3001", "127.0.0.1:3002", "127.0.0.1:3003", "127.0.0.1:3004"]


def ring_of(nodes: list[str]) -> Ring:
    ring = Ring(sample=sample_keys(4000))
    ring.sync(nodes)
    return ring


def test_bounded_load_never_puts_a_worker_above_the_bound() -> None:
    ring = ring_of(NODES)
    rng = random.Random(7)
    loads = dict.fromkeys(NODES, 0)
    bound = 1.25
    for i in range(2000):
        key = f"s_{rng.getrandbits(64):x}"
        total = sum(loads.values())
        chosen = place(ring.walk(key), loads, bound)[0]
        loads[chosen] += 1
        assert loads[chosen] <= load_cap(total, len(NODES), bound)
        assert max(loads.values()) <= max(1, -(-bound * (total + 1) // len(NODES)))
        if i % 3 == 2:  # linkings finish too: loads go down as well as up
            done = rng.choice([n for n in NODES if loads[n]])
            loads[done] -= 1


def test_bounded_load_is_plain_consistent_hashing_when_nothing_is_loaded() -> None:
    ring = ring_of(NODES)
    for key in sample_keys(200):
        assert place(ring.walk(key), {}, 1.25)[0] == ring.owner(key)


def test_overflow_walks_the_ring() -> None:
    ring = ring_of(NODES)
    key = "s_overflow"
    walk = ring.walk(key)
    assert walk[0] == ring.owner(key) and sorted(walk) == sorted(NODES)
    # the home worker and its successor are full: the key goes two steps down the walk
    loads = {walk[0]: 10, walk[1]: 10, walk[2]: 0, walk[3]: 0}
    order = place(walk, loads, 1.25)
    assert order[0] == walk[2]
    assert sorted(order) == sorted(walk)  # the rest stay as failovers


def test_removing_a_worker_moves_only_its_keys() -> None:
    ring = ring_of(NODES)
    keys = sample_keys(5000, seed=11)
    before = {k: ring.owner(k) for k in keys}
    gone = NODES[1]
    assert ring.sync([n for n in NODES if n != gone])
    after = {k: ring.owner(k) for k in keys}
    moved = [k for k in keys if before[k] != after[k]]
    assert moved and all(before[k] == gone for k in moved)
    assert all(after[k] != gone for k in keys)
    assert {after[k] for k in moved} == set(NODES) - {gone}  # spread over the survivors
    ring.sync(NODES)
    assert {k: ring.owner(k) for k in keys} == before  # it comes back to the same keys


def test_ring_shares_cover_the_sample() -> None:
    ring = ring_of(NODES)
    shares = ring.shares()
    assert set(shares) == set(NODES)
    assert sum(shares.values()) == pytest.approx(1.0, abs=1e-3)
    assert all(0.18 < s < 0.32 for s in shares.values()), shares
    ring.sync(NODES[:3])
    assert set(ring.shares()) == set(NODES[:3])
    assert Ring().shares() == {}


# ------------------------------------------------------------------------------------------ routing
def cluster(clock: Clock, leases: dict[str, str]) -> tuple[Membership, Router, list[str]]:
    membership = Membership(NODES[:3], BreakerPolicy(failures=1, open_s=5.0), clock=clock)
    calls: list[str] = []

    async def read_lease(session_id: str) -> str | None:
        calls.append(session_id)
        return leases.get(session_id)

    router = Router(membership, Ring(sample=sample_keys(100)), read_lease, load_bound=1.25, clock=clock)
    return membership, router, calls


async def test_routing_picks_the_lease_owner_first() -> None:
    clock = Clock()
    sid = "s_routing1"
    ring = ring_of(NODES[:3])
    owner = ring.walk(sid)[-1]  # not the ring's choice, so the lease is what decides
    _, router, _ = cluster(clock, {sid: owner})
    plan = Plan(router, Kind.SESSION, sid)
    await plan.start()
    order = [w.name for w in plan.candidates(set())]
    assert order[0] == owner
    assert order[1:] == [n for n in ring.walk(sid) if n != owner]


async def test_routing_falls_back_to_the_ring_when_the_owner_is_tripped() -> None:
    clock = Clock()
    sid = "s_routing2"
    walk = ring_of(NODES[:3]).walk(sid)
    owner = walk[0]
    membership, router, _ = cluster(clock, {sid: owner})
    worker = membership.get(owner)
    assert worker is not None
    worker.breaker.failure()  # tripped
    plan = Plan(router, Kind.SESSION, sid)
    await plan.start()
    order = [w.name for w in plan.candidates(set())]
    assert order == walk[1:]  # the next worker on the ring takes over
    assert plan.owner == owner and plan.owner_down
    clock.advance(5)  # half-open: the owner may be probed again, first
    assert next(iter(plan.candidates(set()))).name == owner


async def test_routing_without_a_lease_uses_the_ring_and_looks_again_next_time() -> None:
    clock = Clock()
    sid = "s_routing3"
    leases: dict[str, str] = {}
    _, router, calls = cluster(clock, leases)
    plan = Plan(router, Kind.SESSION, sid)
    await plan.start()
    assert plan.owner is None
    assert [w.name for w in plan.candidates(set())] == ring_of(NODES[:3]).walk(sid)
    owner = ring_of(NODES[:3]).walk(sid)[-1]
    leases[sid] = owner  # the lease appears: a missing lease was not remembered
    plan = Plan(router, Kind.SESSION, sid)
    await plan.start()
    assert plan.owner == owner and calls == [sid, sid]


async def test_routing_caches_owners_for_their_ttl() -> None:
    clock = Clock()
    sid = "s_routing4"
    _, router, calls = cluster(clock, {sid: NODES[0]})
    await Plan(router, Kind.SESSION, sid).start()
    await Plan(router, Kind.SESSION, sid).start()
    assert calls == [sid]  # cached
    clock.advance(2.1)
    await Plan(router, Kind.SESSION, sid).start()
    assert calls == [sid, sid]


async def test_new_sessions_avoid_draining_and_unreachable_workers() -> None:
    clock = Clock()
    membership, router, _ = cluster(clock, {})
    a, b, c = (membership.get(n) for n in NODES[:3])
    assert a is not None and b is not None and c is not None
    a.draining = True
    b.reachable = False
    for key in sample_keys(50):
        plan = Plan(router, Kind.NEW, key)
        await plan.start()
        assert [w.name for w in plan.candidates(set())] == [c.name]
    # a draining owner still comes first for its own sessions (it answers reads until it stops)
    _, router2, _ = cluster(clock, {"s_drain": NODES[0]})
    draining = router2.membership.get(NODES[0])
    assert draining is not None
    draining.draining = True
    plan = Plan(router2, Kind.SESSION, "s_drain")
    await plan.start()
    assert next(iter(plan.candidates(set()))).name == NODES[0]


def test_placements_count_until_a_health_report_includes_them() -> None:
    clock = Clock()
    membership = Membership(NODES[:1], BreakerPolicy(), clock=clock)
    worker = membership.get(NODES[0])
    assert worker is not None
    worker.placed(clock(), "s_a")
    worker.placed(clock(), "s_b")
    assert worker.in_flight(clock()) == 2
    clock.advance(2)
    worker.report(
        {"sessions": {"qr_scanning": 2}, "queue": {"waiting": 1, "active": 0}}, probe_started=clock()
    )
    assert worker.in_flight(clock()) == 3  # reported, no longer counted twice


def test_heartbeat_load_places_sessions_within_the_bound_and_warm_browsers_first() -> None:
    """Every gateway places by the same heartbeat figures: sessions carried plus its own placements
    since the beat; among workers with room, one with a warm browser comes first."""
    clock = Clock()
    membership, router, _ = cluster(clock, {})
    beats = {
        name: {"url": f"http://{name}", "load": {"sessions": n, "warm": w, "in_flight": 0, "at_ms": now_ms()}}
        for name, n, w in [(NODES[0], 12, 0), (NODES[1], 2, 0), (NODES[2], 2, 1)]
    }
    membership.apply_heartbeats(beats)
    landed: dict[str, int] = dict.fromkeys(NODES[:3], 0)
    placed_on: dict[str, str] = {}
    for key in sample_keys(30):
        worker = router.for_new_session(key)[0]
        worker.placed(clock(), key)
        landed[worker.name] += 1
        placed_on[key] = worker.name
    totals = {name: landed[name] + beats[name]["load"]["sessions"] for name in landed}  # type: ignore[index]
    mean = sum(totals.values()) / len(totals)
    assert max(totals.values()) <= 1.25 * mean, totals
    # the first new session went to the one warm browser; the worker carrying most got the fewest
    assert landed[NODES[0]] < landed[NODES[1]] and landed[NODES[0]] < landed[NODES[2]], landed
    first = membership.get(NODES[2])
    assert first is not None and first.warm(clock()) == 0  # its warm browser is spoken for
    # a later beat names the creates it includes: they are not counted twice
    for name in landed:
        beats[name]["load"] = {
            "sessions": totals[name],
            "warm": 0,
            "in_flight": 0,
            "recent": [k for k, on in placed_on.items() if on == name],
            "at_ms": now_ms() + 5000,
        }
    membership.apply_heartbeats(beats)
    assert {name: w.load(clock()) for name, w in membership.workers.items()} == totals


def test_a_beat_mid_burst_counts_each_placement_once_whatever_the_order_of_answers() -> None:
    """A burst of creates with heartbeats arriving in the middle of it, some naming creates whose
    answer has not reached the gateway yet, others not naming creates still on their way: each
    placement is counted exactly once, so the bound holds on what the workers really carry.
    (A beat counting unanswered creates once made them count twice and raised everyone's cap.)"""
    clock = Clock()
    membership, router, _ = cluster(clock, {})
    workers = list(membership.workers.values())
    real: dict[str, list[str]] = {w.name: [] for w in workers}  # what each worker has received
    sent: dict[str, list[str]] = {w.name: [] for w in workers}  # placed, not yet received
    at_ms = now_ms()

    def beat_all() -> None:
        nonlocal at_ms
        at_ms += 1000
        membership.apply_heartbeats(
            {
                w.name: {
                    "url": w.url,
                    "load": {
                        "sessions": len(real[w.name]),
                        "warm": 0,
                        "in_flight": 0,
                        "recent": list(real[w.name]),
                        "at_ms": at_ms,
                    },
                }
                for w in workers
            }
        )

    beat_all()
    for i, key in enumerate(sample_keys(40)):
        worker = router.for_new_session(key)[0]
        worker.placed(clock(), key)
        sent[worker.name].append(key)
        if i % 3 == 0:  # the worker receives every placement sent so far but one (still on its way)
            for name, keys in sent.items():
                real[name].extend(keys[:-1])
                sent[name] = keys[-1:]
        if i % 7 == 6:
            beat_all()
        assert {w.name: w.load(clock()) for w in workers} == {
            n: len(real[n]) + len(sent[n]) for n in real
        }  # every session counted once: received and named, or on its way
    totals = {n: len(real[n]) + len(sent[n]) for n in real}
    assert sum(totals.values()) == 40 and max(totals.values()) <= 1.25 * 40 / len(workers), totals
    # a create refused there stops counting at once; one named later is not counted again
    worker = workers[0]
    worker.placed(clock(), "s_refused")
    worker.unplaced("s_refused")
    assert worker.load(clock()) == totals[worker.name]


def test_a_warm_worker_is_chosen_over_the_rings_first_choice_with_none() -> None:
    clock = Clock()
    membership, router, _ = cluster(clock, {})
    for tick, key in enumerate(sample_keys(20)):
        walk = router.for_any(key)
        cold, warm = walk[0], walk[-1]
        at_ms = now_ms() + tick
        beats = {
            w.name: {"load": {"sessions": 1, "warm": int(w is warm), "in_flight": 0, "at_ms": at_ms}}
            for w in walk
        }
        membership.apply_heartbeats(beats)
        assert router.for_new_session(key)[0] is warm, (key, cold.name, warm.name)


# ------------------------------------------------------------------------------------------ proxy
# (status, body) or (status, body, headers)
Script = list[tuple[int, dict[str, Any]] | tuple[int, dict[str, Any], dict[str, str]]]
LeaseReader = Callable[[str], Awaitable[str | None]]


class FakeWorkers:
    """In-process stand-ins for workers, each answering from a script of (status, body)."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, str, dict[str, str]]] = []

    def app(self, name: str, script: Script) -> web.Application:
        async def handle(request: web.Request) -> web.Response:
            self.seen.append((name, f"{request.method} {request.path_qs}", dict(request.headers)))
            status, body, *more = script.pop(0) if len(script) > 1 else script[0]
            return web.json_response(body, status=status, headers=more[0] if more else None)

        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", handle)
        return app

    @property
    def names(self) -> list[str]:
        return [s[0] for s in self.seen]


async def no_lease(_session_id: str) -> str | None:
    return None


async def fake_cluster(
    aiohttp_server: AiohttpServer, scripts: dict[str, Script], read_lease: LeaseReader = no_lease
) -> tuple[Membership, Router, FakeWorkers]:
    """Workers named as given; an empty script is a worker nobody listens for (refused)."""
    fakes = FakeWorkers()
    membership = Membership([], BreakerPolicy(failures=3))
    for name, script in scripts.items():
        url = "http://127.0.0.1:1"
        if script:
            server = await aiohttp_server(fakes.app(name, script))
            url = f"http://127.0.0.1:{server.port}"
        membership.workers[name] = Worker(name, url, True, Breaker(membership.policy))
    router = Router(membership, Ring(sample=sample_keys(100)), read_lease, load_bound=1.25, owner_ttl_s=0)
    return membership, router, fakes


async def forward(
    router: Router, call: Call, kind: Kind, key: str, sleeps: list[float] | None = None
) -> Answer:
    """Through a proxy whose backoff sleeps only advance a fake clock."""
    clock = Clock()
    slept = sleeps if sleeps is not None else []

    async def fake_sleep(seconds: float) -> None:
        slept.append(seconds)
        clock.advance(seconds)

    async with aiohttp.ClientSession() as http:
        proxy = Proxy(http, internal_token="tok", timeout_s=5, stream_idle_s=5, sleep=fake_sleep, clock=clock)
        return await proxy.forward(call, Plan(router, kind, key))


async def test_proxy_fails_over_on_connection_refused_for_any_method(aiohttp_server: AiohttpServer) -> None:
    sid = "s_refused"

    async def lease(_sid: str) -> str | None:
        return "dead"

    membership, router, fakes = await fake_cluster(
        aiohttp_server, {"dead": [], "w1": [(200, {"ok": 1})], "w2": [(200, {"ok": 2})]}, lease
    )
    sleeps: list[float] = []
    call = Call("POST", f"/v1/sessions/{sid}/restart", {"X-Walink-Workspace": "ws"}, b"{}")
    answer = await forward(router, call, Kind.SESSION, sid, sleeps)
    assert answer.status == 200 and answer.worker.name in {"w1", "w2"}
    assert answer.failover  # the owner was down: another worker served it
    assert sleeps == []  # a fresh worker after a refused connection: no backoff
    dead = membership.get("dead")
    assert dead is not None and dead.reachable is False
    headers = fakes.seen[0][2]
    assert headers["Authorization"] == "Bearer tok" and headers["X-Walink-Workspace"] == "ws"


async def test_proxy_retries_not_owner_on_the_lease_holder(aiohttp_server: AiohttpServer) -> None:
    sid = "s_notowner"
    first, second = ring_of(["w1", "w2"]).walk(sid)
    reads = 0

    async def lease(_sid: str) -> str | None:
        nonlocal reads
        reads += 1
        return None if reads == 1 else second  # the lease moved after the request arrived

    not_owner = (409, {"error": {"code": "not_owner", "message": "driven by another worker"}})
    _, router, fakes = await fake_cluster(
        aiohttp_server, {first: [not_owner], second: [(200, {"id": sid})]}, lease
    )
    sleeps: list[float] = []
    answer = await forward(
        router, Call("POST", f"/v1/sessions/{sid}/logout", {}, b""), Kind.SESSION, sid, sleeps
    )
    assert fakes.names == [first, second]
    assert answer.status == 200 and answer.worker.name == second
    assert not answer.failover and sleeps == [0.05]


async def test_proxy_asks_the_driver_when_a_worker_answers_for_a_session_driven_elsewhere(
    aiohttp_server: AiohttpServer,
) -> None:
    sid = "s_driver"
    first, second = ring_of(["w1", "w2"]).walk(sid)
    leases: dict[str, str] = {}

    async def lease(sid_: str) -> str | None:
        return leases.get(sid_)

    elsewhere = (200, {"id": sid, "worker": second}, {"X-Walink-Driver": second})
    membership, router, fakes = await fake_cluster(
        aiohttp_server, {first: [elsewhere], second: [(200, {"id": sid, "worker": second})]}, lease
    )
    sleeps: list[float] = []
    # no lease when the request arrives; by the time the first worker answers, the second holds it
    call = Call("GET", f"/v1/sessions/{sid}", {}, idempotent=True)
    router_read = router.read_lease

    async def lease_appears(sid_: str) -> str | None:
        owner = await router_read(sid_)
        leases[sid] = second
        return owner

    router.read_lease = lease_appears
    answer = await forward(router, call, Kind.SESSION, sid, sleeps)
    assert fakes.names == [first, second]
    assert answer.status == 200 and answer.worker.name == second
    assert sleeps == []  # at once: the first answer was a read, nothing to wait for

    # the driver is down: the first worker's view stands (no wait, no error)
    driver = membership.get(second)
    assert driver is not None
    for _ in range(3):
        driver.breaker.failure()
    fakes.seen.clear()
    answer = await forward(router, call, Kind.SESSION, sid, sleeps)
    assert fakes.names == [first] and answer.status == 200 and answer.worker.name == first


async def test_proxy_moves_on_from_a_draining_worker_with_backoff(aiohttp_server: AiohttpServer) -> None:
    sid = "s_draining"
    unavailable = (503, {"error": {"code": "unavailable", "message": "shutting down"}})
    membership, router, fakes = await fake_cluster(
        aiohttp_server, {"w1": [unavailable], "w2": [unavailable], "w3": [(201, {"id": sid})]}
    )
    order = [w.name for w in router.for_new_session(sid)]
    sleeps: list[float] = []
    call = Call("POST", "/v1/sessions", {}, b"{}", idempotent=True)
    answer = await forward(router, call, Kind.NEW, sid, sleeps)
    assert answer.status == 201 and answer.worker.name == "w3"
    assert fakes.names == order[: order.index("w3") + 1]
    assert sleeps == [0.05, 0.1][: len(fakes.names) - 1]
    for name in ("w1", "w2"):  # draining is not a failure
        worker = membership.get(name)
        assert worker is not None and worker.breaker.snapshot()["consecutive_failures"] == 0


async def test_proxy_retries_5xx_only_when_idempotent(aiohttp_server: AiohttpServer) -> None:
    sid = "s_5xx"
    boom = (500, {"error": {"code": "internal_error", "message": "boom"}})
    _, router, fakes = await fake_cluster(aiohttp_server, {"w1": [boom], "w2": [boom]})
    post = await forward(router, Call("POST", f"/v1/sessions/{sid}/restart", {}, b""), Kind.SESSION, sid)
    assert post.status == 500 and len(fakes.seen) == 1  # not retried: it may have been applied
    fakes.seen.clear()
    get = await forward(router, Call("GET", f"/v1/sessions/{sid}", {}, idempotent=True), Kind.SESSION, sid)
    assert get.status == 500  # every worker tried until the breakers opened, then the last answer
    assert set(fakes.names) == {"w1", "w2"} and len(fakes.seen) >= 2


async def test_proxy_with_no_worker_reachable_says_so(aiohttp_server: AiohttpServer) -> None:
    _, router, _ = await fake_cluster(aiohttp_server, {"a": [], "b": []})
    with pytest.raises(NoWorkerAvailable):
        await forward(router, Call("GET", "/v1/accounts", {}, idempotent=True), Kind.ANY, "default")


async def test_proxy_does_not_retry_a_non_idempotent_call_that_timed_out(
    aiohttp_server: AiohttpServer,
) -> None:
    calls: list[str] = []
    release = asyncio.Event()

    async def slow(request: web.Request) -> web.Response:
        calls.append(request.path)
        await release.wait()
        return web.json_response({})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", slow)
    server = await aiohttp_server(app)
    membership = Membership([f"http://127.0.0.1:{server.port}"], BreakerPolicy())
    router = Router(membership, Ring(sample=sample_keys(100)), no_lease, load_bound=1.25)
    async with aiohttp.ClientSession() as http:
        proxy = Proxy(http, internal_token="", timeout_s=0.2, stream_idle_s=1)
        with pytest.raises(UpstreamError) as raised:
            await proxy.forward(
                Call("POST", "/v1/sessions/s_x/logout", {}, b""), Plan(router, Kind.SESSION, "s_x")
            )
    release.set()
    assert raised.value.status == 504 and calls == ["/v1/sessions/s_x/logout"]


async def test_create_retried_after_a_failure_answers_with_the_session_that_landed(
    aiohttp_server: AiohttpServer,
    aiohttp_client: AiohttpClient,
    pg_pool: asyncpg.Pool,
    pg_dsn: str,
    redis_prefix: str,
) -> None:
    """The gateway app itself, in front of two fake workers: the first create answers 500 (it may
    have landed), the retry finds the id taken (409 session_exists): the answer is the session."""
    creates: list[tuple[str, dict[str, Any], dict[str, str]]] = []

    def fake_worker(name: str) -> web.Application:
        async def health(_request: web.Request) -> web.Response:
            return web.json_response(
                {"status": "healthy", "sessions": {"active": 0}, "queue": {"waiting": 0}}
            )

        async def create(request: web.Request) -> web.Response:
            creates.append((name, await request.json(), dict(request.headers)))
            if len(creates) == 1:
                return web.json_response({"error": {"code": "internal_error", "message": "x"}}, status=500)
            return web.json_response({"error": {"code": "session_exists", "message": "taken"}}, status=409)

        async def get(request: web.Request) -> web.Response:
            sid = request.match_info["sid"]
            return web.json_response({"id": sid, "status": "starting", "qr_url": f"/v1/sessions/{sid}/qr"})

        app = web.Application()
        app.router.add_get("/health", health)
        app.router.add_post("/v1/sessions", create)
        app.router.add_get("/v1/sessions/{sid}", get)
        return app

    servers = [await aiohttp_server(fake_worker(n)) for n in ("w1", "w2")]
    store = Store(pg_pool)
    await store.ensure_workspace("ws_a")
    key = await store.create_api_key("ws_a")
    settings = Settings(
        workers=",".join(f"127.0.0.1:{s.port}" for s in servers),
        database_url=pg_dsn,
        redis_url=REDIS_URL,
        redis_prefix=redis_prefix,
        internal_token="tok",
        health_interval_s=0.2,
    )
    gateway = await aiohttp_client(create_app(settings))
    headers = {"X-API-Key": key}
    resp = await gateway.post("/v1/sessions", json={"label": "x"}, headers=headers)
    body = await resp.json()
    assert resp.status == 201, body
    assert resp.headers["Location"] == f"/v1/sessions/{body['id']}"
    assert [c[0] for c in creates] in (["w1", "w2"], ["w2", "w1"])
    assert {c[1]["id"] for c in creates} == {body["id"]}  # the same gateway-made id both times
    assert all(c[1]["workspace_id"] == "ws_a" and c[1]["label"] == "x" for c in creates)
    assert all(c[2]["X-Walink-Workspace"] == "ws_a" for c in creates)
    assert all(c[2]["Authorization"] == "Bearer tok" and "X-API-Key" not in c[2] for c in creates)
    # the gateway itself keeps a key in its workspace, and checks ids before routing
    other = await gateway.post("/v1/sessions", json={"workspace_id": "ws_b"}, headers=headers)
    assert other.status == 404 and (await other.json())["error"]["code"] == "not_found"
    bad = await gateway.get("/v1/sessions/..%2Fetc", headers=headers)
    assert bad.status in {400, 404}
    bad_id = await gateway.post("/v1/sessions", json={"id": "Bad Id"}, headers=headers)
    assert bad_id.status == 400 and (await bad_id.json())["error"]["code"] == "invalid_session_id"
    assert len(creates) == 2


# ------------------------------------------------------------------------------------------ membership
def test_membership_follows_heartbeats() -> None:
    m = Membership(["127.0.0.1:3001"], BreakerPolicy())

    def beat(name: str, url: str, *, draining: bool = False) -> dict[str, Any]:
        return {"name": name, "url": url, "pid": 1, "started_at_ms": 0, "draining": draining}

    m.apply_heartbeats({"127.0.0.1:3002": beat("127.0.0.1:3002", "http://127.0.0.1:3002")})
    assert [(w.name, w.configured, w.heartbeat is not None) for w in m.all()] == [
        ("127.0.0.1:3001", True, False),
        ("127.0.0.1:3002", False, True),
    ]
    m.apply_heartbeats({"127.0.0.1:3002": beat("127.0.0.1:3002", "http://127.0.0.1:3002", draining=True)})
    assert [w.name for w in m.for_new_sessions()] == ["127.0.0.1:3001"]  # draining: no new sessions
    m.apply_heartbeats({})
    assert [w.name for w in m.all()] == ["127.0.0.1:3001"]  # a heartbeat-only worker left
    # a configured worker that heartbeats under its own name is one worker, not two
    m.apply_heartbeats({"worker-0": beat("worker-0", "http://127.0.0.1:3001")})
    assert [w.name for w in m.all()] == ["worker-0"]
    m.apply_heartbeats({})
    assert [w.name for w in m.all()] == ["127.0.0.1:3001"]


async def test_heartbeats_are_read_from_redis(redis_client: aioredis.Redis, redis_prefix: str) -> None:
    keys = Keys(redis_prefix)
    beat = {"name": "127.0.0.1:1", "url": "http://127.0.0.1:1"}  # no token: loopback URLs only
    await redis_client.set(keys.worker("127.0.0.1:1"), orjson.dumps(beat), px=5000)
    await redis_client.set(keys.worker("b:2"), b"not json", px=5000)
    await redis_client.set(keys.session("x"), orjson.dumps({"name": "not a worker"}), px=5000)
    beats = await read_heartbeats(redis_client, keys, auth=HeartbeatAuth(""), timeout_s=1.0)
    assert beats == {"127.0.0.1:1": beat}
    broken = aioredis.from_url("redis://127.0.0.1:1/0", socket_connect_timeout=0.2)
    try:
        assert (
            await read_heartbeats(broken, keys, auth=HeartbeatAuth(""), timeout_s=0.5) is None
        )  # keep what we know
    finally:
        await broken.aclose()


# ------------------------------------------------------------------------------------------ auth
def test_auth_cache_keys_are_digests() -> None:
    cache = KeyCache()
    key = "wlk_secret-key-value"
    cache.put(key, Caller("w1", is_admin=False))
    cache.put("wlk_unknown", None)
    assert all(isinstance(d, bytes) and len(d) == 32 for d in cache.entries)
    assert hashlib.sha256(key.encode()).digest() in cache.entries
    assert not any(key.encode() in d for d in cache.entries)
    assert cache.get(key) == (True, Caller("w1", is_admin=False))


async def test_authenticator_caches_answers_and_serves_stale_ones_while_the_store_is_down() -> None:
    clock = Clock()
    lookups: list[str] = []
    store_down = False

    async def lookup(key: str) -> tuple[str | None, bool] | None:
        lookups.append(key)
        if store_down:
            raise OSError("connection refused")
        return {"wlk_a": ("ws_a", False), "wla_admin": (None, True)}.get(key)

    auth = Authenticator(lookup, dev_api_key="dev-key", timeout_s=1, cache=KeyCache(clock=clock))
    assert await auth.caller("wlk_a") == Caller("ws_a", is_admin=False)
    assert await auth.caller("wlk_a") == Caller("ws_a", is_admin=False)
    assert lookups == ["wlk_a"]
    assert await auth.caller("wla_admin") == Caller(None, is_admin=True)
    assert await auth.caller("dev-key") == Caller("default", is_admin=False)
    with pytest.raises(Unauthorized):
        await auth.caller("wlk_nope")
    with pytest.raises(Unauthorized):
        await auth.caller("wlk_nope")
    assert lookups.count("wlk_nope") == 1  # unknown keys are cached too, briefly
    clock.advance(31)
    store_down = True
    assert await auth.caller("wlk_a") == Caller("ws_a", is_admin=False)  # stale, while the store is down
    with pytest.raises(Unavailable):
        await auth.caller("wlk_never_seen")


def test_caller_scope_keeps_a_workspace_key_in_its_workspace() -> None:
    key = Caller("ws_a", is_admin=False)
    assert key.scope(None) == "ws_a" and key.scope("ws_a") == "ws_a"
    with pytest.raises(NotFound):
        key.scope("ws_b")
    admin = Caller(None, is_admin=True)
    assert admin.scope("ws_b") == "ws_b" and admin.scope(None) is None
    assert Caller("ws_x", is_admin=True).scope(None, own_by_default=False) is None


async def test_event_stream_resumes_on_another_worker_after_last_event_id(
    aiohttp_server: AiohttpServer, aiohttp_client: AiohttpClient
) -> None:
    """The owner ends the stream (it stops): the client's stream goes on from the next worker."""
    asked: list[tuple[str, str | None]] = []
    hold = asyncio.Event()

    def sse_worker(name: str, frames: list[bytes], *, then_end: bool) -> web.Application:
        async def events(request: web.Request) -> web.StreamResponse:
            asked.append((name, request.headers.get("Last-Event-ID")))
            response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await response.prepare(request)
            for frame in frames:
                await response.write(frame)
            if not then_end:
                await hold.wait()
            return response

        app = web.Application()
        app.router.add_get("/v1/sessions/{sid}/events", events)
        return app

    def frame(seq: int) -> bytes:
        return b'id: %d\nevent: status\ndata: {"seq": %d}\n\n' % (seq, seq)

    owner = await aiohttp_server(sse_worker("w1", [b"retry: 1000\n\n", frame(1), frame(2)], then_end=True))
    other = await aiohttp_server(sse_worker("w2", [b"retry: 1000\n\n", frame(3)], then_end=False))
    membership = Membership([], BreakerPolicy())
    for name, server in (("w1", owner), ("w2", other)):
        membership.workers[name] = Worker(
            name, f"http://127.0.0.1:{server.port}", True, Breaker(membership.policy)
        )

    async def lease(_sid: str) -> str | None:
        return "w1"

    router = Router(membership, Ring(sample=sample_keys(100)), lease, load_bound=1.25)
    streams = Streams()
    async with aiohttp.ClientSession() as http:
        proxy = Proxy(http, internal_token="", timeout_s=5, stream_idle_s=5)

        async def handler(request: web.Request) -> web.StreamResponse:
            path = f"/v1/sessions/{request.match_info['sid']}/events"
            plan = Plan(router, Kind.SESSION, request.match_info["sid"])
            return await relay(request, proxy, plan, path, {}, streams)

        app = web.Application()
        app.router.add_get("/v1/sessions/{sid}/events", handler)
        client = await aiohttp_client(app)
        resp = await client.get("/v1/sessions/s_resume/events")
        assert resp.status == 200 and resp.headers["X-Walink-Worker"] == "w1"
        stream = EventStream(resp)
        seqs = [(await stream.next())[1]["seq"] for _ in range(3)]
        assert seqs == [1, 2, 3]  # one client stream, no gap, no repeat
        assert asked == [("w1", None), ("w2", "2")]
        assert len(streams) == 1
        stream.close()
        hold.set()


# ------------------------------------------------------------------------------------------ SSE framing
def test_frames_are_relayed_whole_and_the_last_id_is_kept() -> None:
    frames = Frames("3")
    assert frames.feed(b"retry: 1000\n\n") == b"retry: 1000\n\n"
    assert frames.feed(b"id: 4\nevent: qr\nda") == b""
    assert frames.last_id == "3"
    assert frames.feed(b'ta: {"qr": "x"}\n\nid: 5\n') == b'id: 4\nevent: qr\ndata: {"qr": "x"}\n\n'
    assert frames.last_id == "4"
    assert frames.feed(b"event: status\ndata: {}\n\n: keepalive\n\n").endswith(b": keepalive\n\n")
    assert frames.last_id == "5"


async def test_a_database_outage_is_answered_as_is_and_never_opens_a_workers_breaker(
    aiohttp_server: AiohttpServer,
) -> None:
    """A worker answering 503 ``database_unavailable`` is healthy (Postgres is down for every
    worker): the client gets that 503 at once, no other worker is tried, and however many such
    answers come, the worker's breaker stays closed."""
    sid = "s_pg_down"
    down = (503, {"error": {"code": "database_unavailable", "message": "Postgres cannot be reached"}})
    membership, router, fakes = await fake_cluster(aiohttp_server, {"w1": [down] * 5, "w2": [down] * 5})
    for _ in range(5):  # more than the breaker's 3 failures
        answer = await forward(router, Call("DELETE", f"/v1/sessions/{sid}", {}, b""), Kind.SESSION, sid)
        assert (answer.status, answer.code) == (503, "database_unavailable")
    assert len(fakes.seen) == 5  # one worker asked per request
    for name in ("w1", "w2"):
        worker = membership.get(name)
        assert worker is not None and worker.breaker.snapshot()["consecutive_failures"] == 0
