"""Fast unit tests: settings, ids, the QR queue, the adapter's pure parts, QR images, states."""

from __future__ import annotations

import asyncio
import io
import sys
from pathlib import Path
from typing import Any

import pytest
import zxingcpp
from aiohttp import web
from PIL import Image

from shared.aio import stop_loops
from shared.errors import InvalidPhoneNumber, InvalidSessionId, InvalidState, SettingsError
from shared.ids import check_session_id, new_session_id, normalize_phone
from shared.models import SessionStatus
from shared.settings import Settings
from shared.web import error_middleware, read_json_object
from worker import qr_image
from worker import whatsapp_web as wa
from worker.membership import RecentCreates
from worker.qr_queue import BACKGROUND, USER, QrQueue
from worker.session import Session


def test_settings_read_from_env_with_types() -> None:
    s = Settings.from_env(
        {
            "WALINK_WORKER_PORT": "3002",
            "WALINK_HEADLESS": "false",
            "WALINK_START_TIMEOUT_S": "2.5",
            "CHROMIUM_PATH": "/opt/chrome",
            "PATH": "/bin",
        }
    )
    assert (s.worker_port, s.headless, s.start_timeout_s) == (3002, False, 2.5)
    assert s.chromium_path == Path("/opt/chrome")
    assert s.worker_data_dir == Path("var/worker-3002")


def test_settings_reject_unknown_and_bad_values() -> None:
    with pytest.raises(SettingsError, match="WALINK_QR_CONCURENCY"):
        Settings.from_env({"WALINK_QR_CONCURENCY": "3"})
    with pytest.raises(SettingsError, match="WALINK_WORKER_PORT"):
        Settings.from_env({"WALINK_WORKER_PORT": "many"})
    with pytest.raises(SettingsError, match="WALINK_TARGET"):
        Settings.from_env({"WALINK_TARGET": "telegram"})
    with pytest.raises(SettingsError):
        Settings.from_env({"WALINK_QR_CONCURRENCY": "0"})


def test_settings_repr_hides_the_internal_token() -> None:
    assert "s3cret" not in repr(Settings(internal_token="s3cret"))


@pytest.mark.parametrize("bad", ["", "ab", "../etc", "a/b", "A" * 3, "x" * 65, "-abc", "a b c", None, 42])
def test_session_id_rejects_paths_and_junk(bad: Any) -> None:
    with pytest.raises(InvalidSessionId):
        check_session_id(bad)


def test_session_ids_are_valid_and_unique() -> None:
    ids = {new_session_id() for _ in range(1000)}
    assert len(ids) == 1000
    assert all(check_session_id(i) == i for i in ids)


@pytest.mark.parametrize(
    ("raw", "digits"), [("+1 (202) 555-0108", "12025550108"), ("447911123456", "447911123456")]
)
def test_phone_normalized(raw: str, digits: str) -> None:
    assert normalize_phone(raw) == digits


@pytest.mark.parametrize("bad", ["", "12345", "0123456789", "+1-800-FLOWERS", "1" * 16, 12025550108, None])
def test_phone_rejected(bad: Any) -> None:
    with pytest.raises(InvalidPhoneNumber):
        normalize_phone(bad)


async def test_qr_queue_limits_and_serves_users_first() -> None:
    queue = QrQueue(2)
    order: list[str] = []
    gate = asyncio.Event()

    async def job(name: str, priority: int) -> None:
        async with queue.slot(priority):
            order.append(name)
            await gate.wait()

    holders = [asyncio.create_task(job(f"h{i}", USER)) for i in range(2)]
    await asyncio.sleep(0)
    background = asyncio.create_task(job("pool", BACKGROUND))
    await asyncio.sleep(0)
    user = asyncio.create_task(job("user", USER))
    await asyncio.sleep(0)
    assert queue.stats()["waiting"] == 2 and queue.active == 2
    gate.set()
    await asyncio.gather(*holders, background, user)
    assert order[:2] == ["h0", "h1"]
    assert order.index("user") < order.index("pool")
    assert queue.max_active_seen == 2 and queue.active == 0


async def test_qr_queue_cancelled_waiter_gives_its_place_back() -> None:
    queue = QrQueue(1)
    first, second = queue.slot(), queue.slot()
    await first.__aenter__()
    waiter = asyncio.create_task(second.__aenter__())
    await asyncio.sleep(0)
    assert queue.waiting == 1
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    await first.__aexit__(None, None, None)
    assert queue.active == 0 and queue.waiting == 0
    again = queue.slot()
    await asyncio.wait_for(again.__aenter__(), 1)
    assert queue.active == 1
    await again.__aexit__(None, None, None)


async def test_stop_loops_ends_a_loop_that_lost_its_cancel() -> None:
    """A cancel that meets the reply of an ``asyncio.wait_for`` is lost on Python 3.11 (the reply
    is returned): a loop cancelled once and then awaited would be waited for forever."""
    loop = asyncio.get_running_loop()
    replies: list[asyncio.Future[None]] = []

    async def beat_forever() -> None:  # the shape of Heartbeat.run
        while True:
            reply: asyncio.Future[None] = loop.create_future()
            replies.append(reply)
            await asyncio.wait_for(reply, 10)
            await asyncio.sleep(0.05)

    task = asyncio.create_task(beat_forever())
    await asyncio.sleep(0)  # it waits for its first reply
    task.cancel()
    replies[0].set_result(None)  # which arrives with the cancel
    await asyncio.sleep(0.01)
    if sys.version_info < (3, 12):
        assert not task.done() and len(replies) == 1  # the cancel was lost: it runs on
    await asyncio.wait_for(stop_loops(task), 2)
    assert task.cancelled()


@pytest.mark.parametrize(
    ("url", "reason", "failure"),
    [
        ("https://web.whatsapp.com/?post_logout=1&logout_reason=user_initiated", "phone_logout", False),
        ("https://web.whatsapp.com/?post_logout=1&logout_reason=0", "client_fatal", False),
        ("https://web.whatsapp.com/?post_logout=1&logout_reason=1", "sync_failed", True),
        ("https://web.whatsapp.com/?post_logout=1", "phone_logout", False),
    ],
)
def test_logout_urls(url: str, reason: str, failure: bool) -> None:
    notice = wa.parse_logout_url(url)
    assert notice is not None
    assert (notice.reason, notice.is_failure) == (reason, failure)


@pytest.mark.parametrize(
    "url", ["https://web.whatsapp.com/", "https://evil.example/?post_logout=1", "about:blank"]
)
def test_not_logout_urls(url: str) -> None:
    assert wa.parse_logout_url(url) is None


def test_user_agent_is_not_headless() -> None:
    ua = wa.user_agent_for("156.0.7000.1")
    assert "HeadlessChrome" not in ua and "Chrome/156." in ua


def test_qr_png_decodes_to_the_raw_string() -> None:
    raw = "2@" + "A" * 80 + ",bm9pc2U=,aWRlbnRpdHk=,YWR2,1"
    results = zxingcpp.read_barcodes(Image.open(io.BytesIO(qr_image.png(raw))))
    assert [r.text for r in results] == [raw]
    assert qr_image.svg(raw).startswith(b"<svg")


def test_state_machine_keeps_history_and_refuses_bad_moves() -> None:
    s = Session(id="s_test", workspace_id="w", profile_id="p")
    s.transition(SessionStatus.QR, "qr_shown")
    s.transition(SessionStatus.AUTHENTICATED, "scanned")
    s.transition(SessionStatus.READY, "synced")
    assert [t.status for t in s.history] == ["starting", "qr", "authenticated", "ready"]
    # events wait for the commit: nothing is delivered before the manager has written them
    assert [e.data["status"] for e in s.pending] == ["starting", "qr", "authenticated", "ready"]
    assert not s.events
    with pytest.raises(InvalidState):
        s.transition(SessionStatus.QR, "nope")
    restored = Session.from_record(s.record())
    assert restored.history == s.history and restored.status == SessionStatus.READY


async def test_error_middleware_turns_errors_into_json(aiohttp_client: Any) -> None:
    async def handler(request: web.Request) -> web.Response:
        await read_json_object(request, max_bytes=100)
        raise RuntimeError("a bug")

    app = web.Application(middlewares=[error_middleware], client_max_size=100)
    app.router.add_post("/x", handler)
    client = await aiohttp_client(app)
    cases = [
        (b"not json", 400, "invalid_json"),
        (b"[1]", 400, "invalid_json"),
        (b"{" + b" " * 200 + b"}", 413, "payload_too_large"),
        (b"{}", 500, "internal_error"),
    ]
    for body, status, code in cases:
        resp = await client.post("/x", data=body)
        assert resp.status == status
        assert (await resp.json())["error"]["code"] == code
    resp = await client.get("/nowhere")
    assert resp.status == 404 and (await resp.json())["error"]["code"] == "not_found"


@pytest.mark.parametrize(
    ("phone", "lid", "expected"),
    [
        ("14155550123", None, ("14155550123", None)),
        ("200000000000001@lid", "200000000000001@lid", (None, "200000000000001@lid")),
        ("12345", "12345@c.us", (None, None)),  # too short for a phone; a c.us id is not a LID
        (14155550123, "lid", (None, None)),
    ],
)
def test_a_lid_is_never_a_phone_number(phone: object, lid: object, expected: tuple[object, object]) -> None:
    assert (wa.phone_of(phone), wa.lid_of(lid)) == expected


class _FakeSlot:
    """Just what the warm pool touches of a browser (a unit test of its sizing, no Chromium)."""

    def __init__(self, profile_dir: Path) -> None:
        self.profile_dir = profile_dir
        self.pid: int | None = None
        self.first_qr = asyncio.Event()
        self.first_qr.set()
        self.dead = asyncio.Event()
        self.closing = False
        self.last_qr = "ref,key,id,adv"
        self.closed = False

    def set_pool_callbacks(self, *_: Any) -> None:
        pass

    async def close(self) -> None:
        self.closed = True


class _FakeLauncher:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.launched: list[_FakeSlot] = []

    async def launch(self, profile_id: str) -> _FakeSlot:
        slot = _FakeSlot(self.root / profile_id)
        self.launched.append(slot)
        return slot


async def test_warm_pool_grows_after_a_burst_and_shrinks_when_asks_stop(tmp_path: Path) -> None:
    from worker.warm_pool import WarmPool

    now = [0.0]
    launcher = _FakeLauncher(tmp_path)
    pool = WarmPool(
        2,
        launcher,  # type: ignore[arg-type]
        QrQueue(4),
        5.0,
        max_size=5,
        demand_window_s=60.0,
        clock=lambda: now[0],
    )
    pool.start()
    try:
        await asyncio.wait_for(pool.wait_full(), 5)
        assert pool.stats()["ready"] == 2 and pool.target == 2
        taken: list[Any] = [pool.take() for _ in range(8)]  # a burst of 8 "add account": 2 warm, 6 cold
        assert sum(t is not None for t in taken) == 2
        assert pool.target == 5  # 8 asks in the window, capped at the max
        await asyncio.wait_for(pool.wait_full(), 5)
        assert pool.stats()["ready"] == 5
        now[0] += 61.0  # a quiet minute: the asks age out
        pool._wake.set()
        for _ in range(100):
            await asyncio.sleep(0)
            if pool.stats()["ready"] == 2:
                break
        assert pool.target == 2 and pool.stats()["ready"] == 2
        await asyncio.wait_for(asyncio.gather(*list(pool._fills)), 5)  # the closing of the extras
        closed = [s for s in launcher.launched if s.closed]
        assert len(closed) == 3 and all(s not in taken for s in closed)  # the extra warm ones
        pool.browser_pss_bytes = 100 * 1024 * 1024
        pool.memory_budget_bytes = 300 * 1024 * 1024
        for _ in range(8):
            pool.take()
        assert pool.target == 3  # the memory budget holds three at the measured PSS
    finally:
        await pool.close()


async def test_a_pool_of_size_zero_never_grows(tmp_path: Path) -> None:
    from worker.warm_pool import WarmPool

    pool = WarmPool(0, _FakeLauncher(tmp_path), QrQueue(1), 5.0, max_size=6)  # type: ignore[arg-type]
    for _ in range(10):
        assert pool.take() is None
    assert pool.target == 0


async def test_make_run_says_up_only_when_every_pool_is_warm(
    aiohttp_server: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    from shared import devrun

    ready = {"a": 0, "b": 2}
    asked: list[str] = []

    def worker(name: str) -> web.Application:
        async def health(_: web.Request) -> web.Response:
            asked.append(name)
            if name == "a" and len(asked) > 6:
                ready["a"] = 2  # its warm browsers came up
            return web.json_response({"pool": {"ready": ready[name], "target": 2}})

        app = web.Application()
        app.router.add_get("/health", health)
        return app

    a, b = await aiohttp_server(worker("a")), await aiohttp_server(worker("b"))
    gateway = await aiohttp_server(web.Application())
    workers = [f"127.0.0.1:{a.port}", f"127.0.0.1:{b.port}"]
    await asyncio.to_thread(devrun.announce_when_up, workers, gateway.port, timeout_s=20)
    err = capsys.readouterr().err
    assert "walink: up in" in err and "2 workers, 4 warm browser(s)" in err
    assert asked.count("a") > 3  # it kept asking while a's pool was cold
    await asyncio.to_thread(devrun.announce_when_up, workers, 1, timeout_s=0.5)  # no gateway there
    assert "walink: not up after" in capsys.readouterr().err


def test_the_cli_answers_bad_input_with_one_line_and_exit_2(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from shared import cli

    monkeypatch.setenv("WALINK_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/test")
    assert cli.main(["api-key", "--workspace", "Bad.Id"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("walink api-key: workspace id must be") and "Traceback" not in err


def test_recent_creates_name_the_newest_within_the_window() -> None:
    """What a heartbeat's ``load.recent`` names: creates within the window, the newest at most."""
    recent = RecentCreates(limit=3)
    for sid in ["s_1", "s_2", "s_3", "s_4"]:
        recent.add(sid)
    assert recent.ids() == ["s_2", "s_3", "s_4"]
    gone = RecentCreates(window_s=-1.0)  # every create is older than a window that ended already
    gone.add("s_1")
    assert gone.ids() == []


def test_the_login_storage_a_snapshot_needs_is_named_from_the_page_answer() -> None:
    complete = {
        "databases": [*wa.LOGIN_DATABASES, "fts-storage"],
        "local_storage": list(wa.LOGIN_LOCAL_STORAGE),
    }
    assert wa.missing_login_storage(complete) == []
    partial = {"databases": ["wawc_db_enc", "wawc", "model-storage"], "local_storage": ["WANoiseInfo"]}
    assert wa.missing_login_storage(partial) == [
        "IndexedDB signal-storage",
        "localStorage WebEncKeySalt",
        "localStorage last-wid-md",
    ]
    assert len(wa.missing_login_storage(None)) == len(wa.LOGIN_DATABASES) + len(wa.LOGIN_LOCAL_STORAGE)


@pytest.mark.parametrize("value", ["-1", "601", "nan"])
def test_creds_settle_s_is_bounded(value: str) -> None:
    with pytest.raises(SettingsError, match="WALINK_CREDS_SETTLE_S"):
        Settings.from_env({"WALINK_CREDS_SETTLE_S": value})
    assert Settings.from_env({"WALINK_CREDS_SETTLE_S": "0"}).creds_settle_s == 0.0
