"""Faults injected one after another into one running cluster with ready sessions and linkings
in flight; after each, the checks of :meth:`ChaosCluster.verify` (see ``docs/chaos.md``).

Each test fails when its fault's outcome is bad; the table of every outcome is printed at the end
(``pytest_terminal_summary`` in ``conftest.py``).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from pathlib import Path

import pytest

from tests.chaos.cluster import LEASE_TTL_MS, ChaosCluster, Outcome
from worker import chromium

pytestmark = [pytest.mark.asyncio(loop_scope="session"), pytest.mark.chromium, pytest.mark.timeout(900)]

REDIS_DOWN_S = LEASE_TTL_MS / 1000 + 2  # past every lease: no holder could renew meanwhile
POSTGRES_DOWN_S = 8.0
RECEIVER_DOWN_S = 30.0
PAIRING_MS = 5000  # scan accepted -> pairing success, in the fault "SIGKILL during the scan"


def passed(outcome: Outcome) -> None:
    assert outcome.passed, "\n".join(outcome.problems)


async def busiest(chaos: ChaosCluster) -> str:
    """The worker that owns the most followed ready sessions."""
    owners = await chaos.owners()
    names = [n for n in chaos.workers if n not in chaos.paused]
    return max(names, key=lambda n: len(chaos.sessions_on(n, owners)))


async def sigkill(chaos: ChaosCluster, outcome: Outcome, name: str) -> None:
    outcome.injected()
    outcome.dead.add(name)
    outcome.restart.append(name)  # as supervisord would, once the survivors took over
    assert await chaos.workers[name].stop(signal.SIGKILL) == -signal.SIGKILL


async def test_worker_sigkill_during_qr(chaos: ChaosCluster) -> None:
    async with chaos.fault("worker SIGKILL during QR") as f:
        linking = await chaos.start_linking()
        f.linkings.append(linking)
        await sigkill(chaos, f, await chaos.owner(linking.sid))
    passed(f)


async def test_worker_sigkill_during_the_scan(chaos: ChaosCluster) -> None:
    async with chaos.fault("worker SIGKILL during the scan") as f:
        await chaos.sim_profile(pairing_ms=PAIRING_MS)
        try:
            linking = await chaos.start_linking()
            f.linkings.append(linking)
            victim = await chaos.owner(linking.sid)
            await chaos.scan(linking)  # the phone accepted the QR; pairing completes PAIRING_MS later
            await sigkill(chaos, f, victim)
        finally:
            await chaos.sim_profile(pairing_ms=0)
    passed(f)


async def test_worker_sigkill_while_ready(chaos: ChaosCluster) -> None:
    async with chaos.fault("worker SIGKILL while ready") as f:
        f.linkings.append(await chaos.start_linking())
        await sigkill(chaos, f, await busiest(chaos))
    passed(f)


async def test_one_chromium_sigkill(chaos: ChaosCluster) -> None:
    async with chaos.fault("SIGKILL of one Chromium") as f:
        f.linkings.append(await chaos.start_linking())
        sid = next(iter(chaos.ready))
        profile = await chaos.profile_dir(sid)
        pid = chromium.browser_pid_for_profile(profile)
        assert pid is not None, f"no browser on {profile}"
        f.injected()
        os.kill(pid, signal.SIGKILL)
        f.notes.append(f"killed browser {pid} of {sid}")
    passed(f)


async def test_redis_restarted(chaos: ChaosCluster) -> None:
    async with chaos.fault("Redis restarted") as f:
        f.linkings.append(await chaos.start_linking())
        f.injected()
        await chaos.redis.stop()
        # an "add account" while Redis is away: a clear answer either way
        await chaos.client_call(f, "POST", "/v1/sessions", json={})
        await asyncio.sleep(REDIS_DOWN_S)  # the outage itself: a duration, not a wait for a state
        await chaos.redis.start()
    passed(f)


async def test_postgres_restarted(chaos: ChaosCluster) -> None:
    async with chaos.fault("Postgres restarted") as f:
        linking = await chaos.start_linking()
        f.linkings.append(linking)
        f.injected()
        await chaos.pg.stop()
        # the phone scans while Postgres is down: session_ready must be committed once it is back
        await chaos.scan(linking)
        await chaos.client_call(f, "POST", "/v1/sessions", json={})
        await asyncio.sleep(POSTGRES_DOWN_S)  # the outage itself
        await chaos.pg.start()
    passed(f)


async def test_webhook_receiver_down_30s(chaos: ChaosCluster) -> None:
    async with chaos.fault("webhook receiver down 30 s") as f:
        f.injected()
        await chaos.receiver.stop()
        loop = asyncio.get_running_loop()
        back_at = loop.time() + RECEIVER_DOWN_S
        linking = await chaos.start_linking()  # its events are written while nobody receives them
        f.linkings.append(linking)
        await chaos.scan(linking)
        await asyncio.sleep(max(0.0, back_at - loop.time()))  # the outage itself
        await chaos.receiver.start()
    passed(f)


async def test_gateway_restarted(chaos: ChaosCluster) -> None:
    async with chaos.fault("gateway restarted") as f:
        f.allow_refused = True  # while no gateway listens, a refused connection is the answer
        f.linkings.append(await chaos.start_linking())
        f.injected()
        assert await chaos.gateway.stop(signal.SIGTERM) == 0
        await chaos.gateway.start()
    passed(f)


async def test_worker_sigstop_past_its_lease(chaos: ChaosCluster) -> None:
    async with chaos.fault("worker SIGSTOP past its lease") as f:
        victim = await busiest(chaos)
        child = chaos.workers[victim]
        moved = chaos.sessions_on(victim, await chaos.owners())
        old_profiles = [await chaos.profile_dir(sid) for sid in moved]
        mark = child.log_size()
        f.injected()
        f.dead.add(victim)
        chaos.paused.add(victim)
        child.send(signal.SIGSTOP)

        async def resume() -> None:
            """Once the others took its sessions over: it wakes up and must let them go."""
            before = {
                r["id"]: (r["owner"], r["fencing_token"])
                for r in await chaos.pg_fetch(
                    "SELECT id, owner, fencing_token FROM whatsapp_accounts WHERE id = ANY($1)", moved
                )
            }
            child.send(signal.SIGCONT)
            chaos.paused.discard(victim)
            for sid in moved:
                await child.wait_log(f"{sid}: no longer ours", after=mark, timeout_s=60)
            after = {
                r["id"]: (r["owner"], r["fencing_token"])
                for r in await chaos.pg_fetch(
                    "SELECT id, owner, fencing_token FROM whatsapp_accounts WHERE id = ANY($1)", moved
                )
            }
            if after != before:
                f.problem(f"the resumed worker changed owners/tokens: {before} -> {after}")

            async def old_browsers_gone() -> bool:
                wanted = {str(p.resolve()) for p in old_profiles}
                return not [p for p in chromium._processes() if chromium._user_data_dir(p) in wanted]

            await chaos.until("the resumed worker ended its browsers", old_browsers_gone, 60)

        f.after_recovery.append(resume)
        # between SIGCONT and its "no longer ours" it still lists them; resume() checks that it
        # changed nothing meanwhile and let go
        f.letting_go = {(sid, victim) for sid in moved}
        f.notes.append(f"{len(moved)} session(s) moved off the paused worker")
    passed(f)


def _fill(path: Path) -> Path:
    """Fill the filesystem of ``path`` up: every write there fails with ENOSPC afterwards."""
    filler = path / "chaos-filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        for block in (1 << 20, 4096, 1):  # big blocks, then the last partial ones
            with contextlib.suppress(OSError):
                while os.write(fd, b"\0" * block):
                    pass
    finally:
        with contextlib.suppress(OSError):
            os.close(fd)
    return filler


async def test_profile_writes_failing(chaos: ChaosCluster) -> None:
    if chaos.mounted is None:
        pytest.skip("needs root to mount the worker's tmpfs (make chaos runs as root in CI)")
    victim = chaos.name(chaos.full_disk_port)
    # the worker holds a ready session (with its snapshot) and a linking when its disk fills up
    if not chaos.sessions_on(victim, await chaos.owners()):
        ready = await chaos.start_linking_on(victim)
        await chaos.scan(ready)
        await chaos.until("the session placed on the worker is ready", lambda: chaos.is_ready(ready.sid), 120)
        if ready.stream is not None:
            ready.stream.close()
        await chaos.track(ready)
    filler: Path | None = None
    async with chaos.fault("worker profile writes failing") as f:
        linking = await chaos.start_linking_on(victim)
        f.linkings.append(linking)
        filler = await asyncio.to_thread(_fill, chaos.mounted)
        f.injected()

        async def free_disk() -> None:  # after the checks of recovery, made while it was full
            if filler is not None:
                filler.unlink(missing_ok=True)

        f.after_recovery.append(free_disk)
        try:
            free = os.statvfs(chaos.mounted).f_bavail
            f.notes.append(f"{victim}'s filesystem full ({free} blocks free)")
            mine = chaos.sessions_on(victim, await chaos.owners())
            for sid in mine:  # its browsers relaunch on a full disk
                await chaos.client_call(f, "POST", f"/v1/sessions/{sid}/restart")
            # and the worker itself restarts on it (shutdown snapshots, start-up restores)
            child = chaos.workers[victim]
            await child.stop(signal.SIGTERM)
            await child.start("ready on")
        except BaseException:
            filler.unlink(missing_ok=True)
            raise
    if filler is not None:  # None: the fault failed before the disk was filled (the table says why)
        filler.unlink(missing_ok=True)
    passed(f)
