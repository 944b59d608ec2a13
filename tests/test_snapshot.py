"""Profile snapshots (worker/snapshot.py) against real Chromium and the real simulator.

A profile is linked by a real QR scan. It is packed, then unpacked into a new, empty directory,
and opened again: it must come back logged in, without a QR. Everything that should be refused
(tampering, another key or session, crafted archives, bad keys, empty profiles) raises
``SnapshotInvalid`` / ``SettingsError``, and leaves nothing behind.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import io
import lzma
import secrets
import shutil
import tarfile
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import zstandard
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from playwright.async_api import Page, Playwright, Route

from shared.errors import SettingsError, SnapshotInvalid, SnapshotKeyUnknown, WalinkError
from tests.browser import CREDS_SETTLED, ORIGIN, forward_to, launch
from tests.conftest import WAIT_S, Sim, scan_until_linked
from worker.snapshot import (
    IDB_BLOBS,
    IDB_LEVELDB,
    LOCAL_STORAGE,
    SNAPSHOT_PATHS,
    load_key,
    pack_profile,
    unpack_profile,
)

pytestmark = pytest.mark.chromium

PHONE = "15550001111"
SESSION = "sess_snapshot_test"
KEY = secrets.token_bytes(32)
QR = 'div[data-ref]:not([data-ref=""])'
ME_USER = (
    "(() => { const u = window.require('WAWebUserPrefsMeUser').getMaybeMePnUser(); return u && u.user; })()"
)
# Set before WhatsApp's scripts run: did a QR box ever exist on this page?
QR_WATCH = """
window.__walinkSawQr = false;
new MutationObserver(() => {
  if (document.querySelector("div[data-ref]")) window.__walinkSawQr = true;
}).observe(document, { childList: true, subtree: true, attributes: true });
"""

# ---------------------------------------------------------------------------------------- helpers


@pytest.fixture(autouse=True)
def _no_restore_leftovers(tmp_path: Path) -> Iterator[None]:
    """After each test: no restore temp dir (conftest checks for Chromium and profile locks)."""
    yield
    assert not list(tmp_path.rglob("*.restore-*")), "restore temp dirs left behind"


@contextlib.asynccontextmanager
async def whatsapp(pw: Playwright, profile: Path, sim: Sim) -> AsyncIterator[Page]:
    """Chromium on ``profile`` with WhatsApp's origin routed to the simulator, page opened."""
    context = await launch(pw, profile, service_workers="block")
    try:
        await context.add_init_script(QR_WATCH)
        await context.route(f"{ORIGIN}/**", forward_to(sim.url, timeout_ms=60_000))
        page = context.pages[0] if context.pages else await context.new_page()
        await page.goto(f"{ORIGIN}/")
        yield page
    finally:
        await context.unroute_all(behavior="ignoreErrors")  # the page's long-poll is in flight
        await context.close()


async def link(pw: Playwright, profile: Path, sim: Sim, *, settled: bool = True) -> None:
    """A real QR link: read the QR, scan it with the simulated phone, wait for the chat list (and,
    unless ``settled`` is false, for the credentials to settle), then close the browser."""
    async with whatsapp(pw, profile, sim) as page:
        seen: list[str] = []

        async def next_qr() -> str:
            handle = await page.wait_for_function(
                "seen => { const v = document.querySelector('div[data-ref]')?.getAttribute('data-ref');"
                " return v && !seen.includes(v) ? v : null; }",
                arg=seen,
            )
            raw = str(await handle.json_value())
            seen.append(raw)
            return raw

        await scan_until_linked(sim.url, next_qr, PHONE)
        await page.wait_for_selector("#pane-side")
        await page.wait_for_function(
            f"() => {{ try {{ return {ME_USER} === '{PHONE}'; }} catch (e) {{ return false; }} }}"
        )
        # closed before its credentials settled, the profile would restore logged out
        if settled:
            await page.wait_for_function(CREDS_SETTLED, polling=100, timeout=WAIT_S * 1000)
        with pytest.raises(SnapshotInvalid, match="still runs"):
            pack_profile(profile, key=KEY, session_id=SESSION)  # a live profile is never packed


def files_of(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_size for p in sorted(root.rglob("*")) if p.is_file()}


def open_blob(blob: bytes, key: bytes = KEY, session_id: str = SESSION) -> bytes:
    """The tar inside a snapshot, opened with the documented format (not with the module):
    ``b"WLS2" + key id (8) + nonce (12) + AES-GCM``, the additional data binding key id and session."""
    assert blob[:4] == b"WLS2"
    kid = hashlib.sha256(b"walink-snapshot-key-id:" + key).digest()[:8]
    assert blob[4:12] == kid
    aad = b"walink-snapshot-v2:" + kid + session_id.encode()
    compressed = AESGCM(key).decrypt(blob[12:24], blob[24:], aad)
    assert compressed[:4] == b"\x28\xb5\x2f\xfd"  # a zstd frame
    return zstandard.ZstdDecompressor().decompressobj().decompress(compressed)


def seal(
    payload: bytes, key: bytes = KEY, session_id: str = SESSION, *, compress: bool = True, zstd: bool = False
) -> bytes:
    """Encrypt ``payload`` (a tar, or anything) exactly as a genuine snapshot, with the right key;
    compressed with xz as snapshots were before zstd (still restored), or with zstd."""
    if not compress:
        data = payload
    elif zstd:
        data = zstandard.ZstdCompressor(level=3).compress(payload)
    else:
        data = lzma.compress(payload, format=lzma.FORMAT_XZ, preset=0)
    nonce = secrets.token_bytes(12)
    return b"WLS1" + nonce + AESGCM(key).encrypt(nonce, data, b"walink-snapshot-v1:" + session_id.encode())


Member = tuple[str, bytes, bytes]  # name, tar type, data (or link target)


def make_tar(members: list[Member]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for name, kind, data in members:
            info = tarfile.TarInfo(name)
            info.type = kind
            if kind in (tarfile.SYMTYPE, tarfile.LNKTYPE):
                info.linkname = data.decode()
                tar.addfile(info)
            elif kind == tarfile.REGTYPE:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
            else:
                tar.addfile(info)
    return buf.getvalue()


GOOD: list[Member] = [
    (f"{IDB_LEVELDB}/CURRENT", tarfile.REGTYPE, b"MANIFEST-000001\n"),
    (f"{LOCAL_STORAGE}/CURRENT", tarfile.REGTYPE, b"MANIFEST-000001\n"),
]


def assert_untouched(target: Path, *, existed: bool) -> None:
    if existed:
        assert target.is_dir() and not any(target.iterdir()), f"{target} was written to"
    else:
        assert not target.exists(), f"{target} was created"
    assert not list(target.parent.glob(".*restore-*")), "a restore temp dir was left behind"


# ---------------------------------------------------------------------------------------- 1. round trip


async def test_snapshot_restores_the_login_into_an_empty_profile(
    pw: Playwright, sim: Sim, tmp_path: Path
) -> None:
    source = tmp_path / "worker-a" / "profile"
    await link(pw, source, sim)

    started = time.perf_counter()
    blob = await asyncio.to_thread(pack_profile, source, key=KEY, session_id=SESSION)
    pack_ms = (time.perf_counter() - started) * 1000
    tar = open_blob(blob)
    print(
        f"\nsnapshot of a linked simulator session: {len(blob)} bytes (tar {len(tar)}), pack {pack_ms:.1f} ms"
    )
    assert blob[:4] == b"WLS2"
    assert len(blob) < 1024 * 1024, "a hibernated session (idb_mb 0) must stay below 1 MiB"
    # the archive is deterministic (only the nonce differs) and holds only the allowed paths
    again = pack_profile(source, key=KEY, session_id=SESSION)
    assert again[12:24] != blob[12:24]
    assert open_blob(again) == tar
    with tarfile.open(fileobj=io.BytesIO(tar)) as archive:
        names = archive.getnames()
        assert all(m.mtime == 0 and m.uid == 0 and (m.isdir() or m.isreg()) for m in archive.getmembers())
    assert names == sorted(names)
    assert all(n in SNAPSHOT_PATHS or n.startswith(tuple(p + "/" for p in SNAPSHOT_PATHS)) for n in names)
    assert f"{IDB_LEVELDB}/CURRENT" in names and f"{LOCAL_STORAGE}/CURRENT" in names
    assert not any(n.endswith(("/LOCK", "/LOG")) for n in names)

    target = tmp_path / "worker-b" / "profiles" / "restored"  # neither it nor its parent exists
    started = time.perf_counter()
    written = await asyncio.to_thread(unpack_profile, blob, target, key=KEY, session_id=SESSION)
    unpack_ms = (time.perf_counter() - started) * 1000
    restored = files_of(target)
    print(f"unpacked {written} bytes in {len(restored)} files in {unpack_ms:.1f} ms")
    assert written == sum(restored.values())
    assert set(restored) == {n for n in names if n in files_of(source)}
    assert all(restored[n] == files_of(source)[n] for n in restored)
    assert any((target / IDB_BLOBS).rglob("*")), "the page's value over 64 KiB lives in the blob directory"

    started = time.perf_counter()
    async with whatsapp(pw, target, sim) as page:
        await page.wait_for_selector("#pane-side")
        # logged in: the page knows the phone (its modules may be registered late: retry until then)
        await page.wait_for_function(
            f"() => {{ try {{ return {ME_USER} === '{PHONE}'; }} catch (e) {{ return false; }} }}"
        )
        print(f"restored profile: chat list {(time.perf_counter() - started) * 1000:.0f} ms after launch")
        assert await page.evaluate(ME_USER) == PHONE
        assert await page.evaluate("window.__walinkSawQr") is False, "the restored profile showed a QR"
        assert await page.locator("div[data-ref]").count() == 0
        assert "post_logout" not in page.url
        assert await page.evaluate("localStorage.getItem('WANoiseInfo')") is not None
    assert len(await sim.devices(PHONE)) == 1, "the restore must reuse the linked device, not link another"


# ---------------------------------------------------------------------------------------- 2. tampering


async def test_tampered_or_foreign_snapshots_are_refused(pw: Playwright, sim: Sim, tmp_path: Path) -> None:
    source = tmp_path / "profile"
    await link(pw, source, sim)
    blob = pack_profile(source, key=KEY, session_id=SESSION)

    bad: dict[str, tuple[bytes, bytes, str]] = {}
    # magic, key id, nonce, ciphertext, middle, tag
    for where in (0, 5, 20, 30, len(blob) // 2, len(blob) - 1):
        flipped = bytearray(blob)
        flipped[where] ^= 0x01
        bad[f"flipped byte {where}"] = (bytes(flipped), KEY, SESSION)
    bad["another key"] = (blob, secrets.token_bytes(32), SESSION)
    bad["another session"] = (blob, KEY, SESSION + "_other")
    bad["truncated"] = (blob[:-1], KEY, SESSION)
    bad["extended"] = (blob + b"\0", KEY, SESSION)
    bad["empty"] = (b"", KEY, SESSION)

    absent = tmp_path / "restore-absent" / "profile"
    empty = tmp_path / "restore-empty"
    empty.mkdir()
    # a snapshot naming a key this process lacks (another key, or its key id altered) may be
    # fine: that is a missing key (503, the session left as it was), not a broken snapshot
    missing_key = {"another key", "flipped byte 5"}
    for case, (data, key, session_id) in bad.items():
        for target, existed in ((absent, False), (empty, True)):
            error: type[WalinkError] = SnapshotKeyUnknown if case in missing_key else SnapshotInvalid
            with pytest.raises(error) as refused:
                unpack_profile(data, target, key=key, session_id=session_id)
            expected = (503, "snapshot_key_unknown") if case in missing_key else (422, "snapshot_invalid")
            assert (refused.value.status, refused.value.code) == expected
            print(f"{case}: {refused.value.message}")
            assert_untouched(target, existed=existed)

    # a directory that is not empty is refused, and left as it was
    full = tmp_path / "restore-full"
    full.mkdir()
    (full / "keep.txt").write_text("mine")
    with pytest.raises(SnapshotInvalid, match="not empty"):
        unpack_profile(blob, full, key=KEY, session_id=SESSION)
    assert [p.name for p in full.iterdir()] == ["keep.txt"]

    # after all that, the genuine snapshot still unpacks into the (still empty) directory
    assert unpack_profile(blob, empty, key=KEY, session_id=SESSION) > 0
    assert (empty / LOCAL_STORAGE / "CURRENT").is_file()


# ---------------------------------------------------------------------------------------- 3. crafted archives


def crafted_cases(tmp_path: Path) -> dict[str, bytes]:
    outside = tmp_path / "outside-evil"
    cases: dict[str, list[Member]] = {
        "dot-dot": [*GOOD, ("../evil", tarfile.REGTYPE, b"x")],
        "dot-dot inside an allowed root": [
            *GOOD,
            (f"{LOCAL_STORAGE}/../../../../evil", tarfile.REGTYPE, b"x"),
        ],
        "absolute path": [*GOOD, (str(outside), tarfile.REGTYPE, b"x")],
        "symlink": [*GOOD, (f"{LOCAL_STORAGE}/000005.log", tarfile.SYMTYPE, str(outside).encode())],
        "hard link": [*GOOD, (f"{LOCAL_STORAGE}/000005.log", tarfile.LNKTYPE, b"/etc/passwd")],
        "char device": [*GOOD, (f"{LOCAL_STORAGE}/000005.log", tarfile.CHRTYPE, b"")],
        "fifo": [*GOOD, (f"{LOCAL_STORAGE}/000005.log", tarfile.FIFOTYPE, b"")],
        "path outside the allow-list": [*GOOD, ("Default/Cookies", tarfile.REGTYPE, b"x")],
        "unknown file in an allowed root": [*GOOD, (f"{LOCAL_STORAGE}/evil.sh", tarfile.REGTYPE, b"x")],
        "directory where a file belongs": [*GOOD, (f"{IDB_LEVELDB}/000009.ldb", tarfile.DIRTYPE, b"")],
        "blob path too deep": [*GOOD, (f"{IDB_BLOBS}/1/00/2/3", tarfile.REGTYPE, b"x")],
        "duplicate member": [*GOOD, (f"{LOCAL_STORAGE}/CURRENT", tarfile.REGTYPE, b"MANIFEST-000002\n")],
        "missing required leveldb": [GOOD[1]],
    }
    sealed = {case: seal(make_tar(members)) for case, members in cases.items()}
    sealed["not a tar"] = seal(secrets.token_bytes(2000))
    sealed["not compressed"] = seal(make_tar(GOOD), compress=False)
    sealed["not a tar in zstd"] = seal(secrets.token_bytes(2000), zstd=True)
    sealed["truncated zstd"] = seal(zstandard.ZstdCompressor().compress(make_tar(GOOD))[:-40], compress=False)
    sealed["zstd with a path outside the allow-list"] = seal(
        make_tar([*GOOD, ("Default/Cookies", tarfile.REGTYPE, b"x")]), zstd=True
    )
    sealed["garbage after the xz stream"] = _with_trailing_garbage()
    return sealed


def _with_trailing_garbage() -> bytes:
    data = lzma.compress(make_tar(GOOD), format=lzma.FORMAT_XZ) + b"garbage!"
    return seal(data, compress=False)


def test_crafted_archives_are_refused_and_write_nothing(tmp_path: Path) -> None:
    target = tmp_path / "workers" / "profile"
    for case, blob in crafted_cases(tmp_path).items():
        with pytest.raises(SnapshotInvalid) as refused:
            unpack_profile(blob, target, key=KEY, session_id=SESSION)
        print(f"{case}: {refused.value.message}")
        assert_untouched(target, existed=False)
        assert not (tmp_path / "evil").exists() and not (tmp_path / "outside-evil").exists()
        assert {p.name for p in tmp_path.iterdir()} == {"workers"}
        assert list((tmp_path / "workers").iterdir()) == []
    # the same archive without the evil member is accepted: the refusals were for the member
    assert unpack_profile(seal(make_tar(GOOD)), target, key=KEY, session_id=SESSION) == 32


@pytest.mark.parametrize("zstd", [False, True], ids=["xz", "zstd"])
def test_decompression_bombs_are_refused(tmp_path: Path, zstd: bool) -> None:
    huge = [*GOOD, (f"{IDB_LEVELDB}/000003.log", tarfile.REGTYPE, bytes(8 * 1024 * 1024))]
    blob = seal(make_tar(huge), zstd=zstd)
    assert len(blob) < 8 * 1024 * 1024 // 100  # 8 MiB of zeros squeeze to a few KiB
    target = tmp_path / "profile"
    with pytest.raises(SnapshotInvalid, match="expands beyond"):
        unpack_profile(blob, target, key=KEY, session_id=SESSION, max_bytes=1024 * 1024)
    assert_untouched(target, existed=False)
    # under a cap it fits, it is accepted
    assert (
        unpack_profile(blob, target, key=KEY, session_id=SESSION, max_bytes=16 * 1024 * 1024)
        == 8 * 1024 * 1024 + 32
    )


# ---------------------------------------------------------------------------------------- 4. key


def test_load_key_accepts_32_bytes_of_base64() -> None:
    raw = secrets.token_bytes(32)
    assert load_key(base64.urlsafe_b64encode(raw).decode()) == raw
    assert load_key(base64.b64encode(raw).decode()) == raw
    assert load_key(base64.urlsafe_b64encode(raw).decode().rstrip("=") + "\n") == raw
    assert load_key(base64.urlsafe_b64encode(raw).decode()) == raw


@pytest.mark.parametrize(
    "value",
    [
        "",
        "   ",
        base64.urlsafe_b64encode(secrets.token_bytes(16)).decode(),  # AES-128: too short
        base64.urlsafe_b64encode(secrets.token_bytes(31)).decode(),
        base64.urlsafe_b64encode(secrets.token_bytes(33)).decode(),
        "not base64 at all!",
        "A" * 43 + "==",  # 32 bytes, wrong padding
        "A" * 42 + "B",  # 32 bytes, stray bits in the last character
        "A",  # not a whole base64 quantum
        secrets.token_hex(32),  # hex is not base64 of 32 bytes (decodes to 48)
    ],
)
def test_load_key_rejects_bad_keys(value: str) -> None:
    with pytest.raises(SettingsError, match=r"secrets\.token_bytes\(32\)") as refused:
        load_key(value)
    assert len(value) < 8 or value not in refused.value.message  # the secret is never echoed


def test_pack_and_unpack_need_a_32_byte_key(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match="32 bytes"):
        pack_profile(tmp_path, key=b"short", session_id=SESSION)
    with pytest.raises(SettingsError, match="32 bytes"):
        unpack_profile(seal(make_tar(GOOD)), tmp_path / "p", key=KEY[:16], session_id=SESSION)


# ---------------------------------------------------------------------------------------- 5. no login


async def test_profiles_without_a_login_are_not_packed(pw: Playwright, tmp_path: Path) -> None:
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    with pytest.raises(SnapshotInvalid, match="nothing to snapshot"):
        pack_profile(fresh, key=KEY, session_id=SESSION)
    with pytest.raises(SnapshotInvalid, match="nothing to snapshot"):
        pack_profile(tmp_path / "absent", key=KEY, session_id=SESSION)

    # a real Chromium profile that never opened WhatsApp Web
    blank = tmp_path / "blank"
    context = await launch(pw, blank)
    try:
        page = context.pages[0] if context.pages else await context.new_page()
        await page.goto("about:blank")
    finally:
        await context.close()
    assert (blank / "Default").is_dir()
    with pytest.raises(SnapshotInvalid, match="nothing to snapshot") as refused:
        pack_profile(blank, key=KEY, session_id=SESSION)
    print(f"blank profile: {refused.value.message}")


# ---------------------------------------------------------------------------------------- large values


BIG_PAGE = "<!doctype html><title>WhatsApp Web</title><p>storage test</p>"
WRITE_BIG = """async () => {
  const db = await new Promise((ok, ko) => {
    const r = indexedDB.open("model-storage", 1);
    r.onupgradeneeded = () => r.result.createObjectStore("media");
    r.onsuccess = () => ok(r.result);
    r.onerror = () => ko(r.error);
  });
  const big = new Uint8Array(512 * 1024);
  for (let i = 0; i < big.length; i++) big[i] = (i * 2654435761) >>> 24;
  const tx = db.transaction("media", "readwrite");
  tx.objectStore("media").put(big, "buf");
  tx.objectStore("media").put(new Blob([big]), "blob");
  tx.objectStore("media").put({ small: "value" }, "small");
  await new Promise((ok, ko) => { tx.oncomplete = ok; tx.onerror = () => ko(tx.error); });
  localStorage.setItem("probe", "kept");
}"""
READ_BIG = """async () => {
  const db = await new Promise((ok, ko) => {
    const r = indexedDB.open("model-storage", 1);
    r.onsuccess = () => ok(r.result);
    r.onerror = () => ko(String(r.error));
  });
  const get = (k) => new Promise((ok) => {
    const r = db.transaction("media").objectStore("media").get(k);
    r.onsuccess = () => ok(r.result);
    r.onerror = () => ok("error " + r.error);
  });
  const buf = await get("buf");
  const blob = await get("blob");
  let blobBytes;
  try { blobBytes = (await blob.arrayBuffer()).byteLength; } catch (e) { blobBytes = String(e); }
  let sum = 0;
  if (buf) for (let i = 0; i < buf.length; i += 997) sum = (sum + buf[i]) % 65521;
  return { buf: buf ? buf.byteLength : null, sum, blob: blobBytes, small: (await get("small")).small,
           probe: localStorage.getItem("probe") };
}"""


@contextlib.asynccontextmanager
async def static_origin(pw: Playwright, profile: Path) -> AsyncIterator[Page]:
    """Chromium on ``profile`` with WhatsApp's origin answered by a tiny page (storage only)."""
    context = await launch(pw, profile, service_workers="block")
    try:

        async def serve(route: Route) -> None:
            await route.fulfill(status=200, content_type="text/html", body=BIG_PAGE)

        await context.route(f"{ORIGIN}/**", serve)
        page = context.pages[0] if context.pages else await context.new_page()
        await page.goto(f"{ORIGIN}/")
        yield page
    finally:
        await context.unroute_all(behavior="ignoreErrors")
        await context.close()


async def test_large_indexeddb_values_survive_the_round_trip(pw: Playwright, tmp_path: Path) -> None:
    """Chromium keeps IndexedDB values over ~64 KiB in the ``.blob`` directory: it must travel too."""
    source = tmp_path / "source"
    async with static_origin(pw, source) as page:
        await page.evaluate(WRITE_BIG)
        expected = await page.evaluate(READ_BIG)
    assert expected["buf"] == 512 * 1024 and expected["blob"] == 512 * 1024
    assert any(p.is_file() for p in (source / IDB_BLOBS).rglob("*")), "Chromium wrote no blob files"

    started = time.perf_counter()
    blob = pack_profile(source, key=KEY, session_id=SESSION)
    pack_ms = (time.perf_counter() - started) * 1000
    target = tmp_path / "restored"
    started = time.perf_counter()
    written = unpack_profile(blob, target, key=KEY, session_id=SESSION)
    unpack_ms = (time.perf_counter() - started) * 1000
    print(
        f"\nprofile with 2 x 512 KiB IndexedDB values: {written} bytes of files -> {len(blob)} bytes "
        f"(pack {pack_ms:.1f} ms, unpack {unpack_ms:.1f} ms)"
    )
    assert files_of(target / IDB_BLOBS) == files_of(source / IDB_BLOBS)
    async with static_origin(pw, target) as page:
        assert await page.evaluate(READ_BIG) == expected

    # the same profile without its .blob directory loses those values (why the directory is kept)
    partial = tmp_path / "partial"
    unpack_profile(blob, partial, key=KEY, session_id=SESSION)
    shutil.rmtree(partial / IDB_BLOBS)
    async with static_origin(pw, partial) as page:
        lost = await page.evaluate(READ_BIG)
    assert lost["small"] == "value" and lost["probe"] == "kept"
    assert lost["buf"] is None and lost["blob"] != 512 * 1024, lost


def test_symlinks_in_a_profile_are_refused(tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    (elsewhere / "leveldb").mkdir(parents=True)
    (elsewhere / "leveldb" / "CURRENT").write_text("MANIFEST-000001\n")
    profile = tmp_path / "profile"
    (profile / IDB_LEVELDB).mkdir(parents=True)
    (profile / IDB_LEVELDB / "CURRENT").write_text("MANIFEST-000001\n")
    (profile / "Default" / "Local Storage").symlink_to(elsewhere)
    with pytest.raises(SnapshotInvalid, match="symlink"):
        pack_profile(profile, key=KEY, session_id=SESSION)
    (profile / "Default" / "Local Storage").unlink()
    (profile / LOCAL_STORAGE).mkdir(parents=True)
    (profile / LOCAL_STORAGE / "CURRENT").symlink_to(elsewhere / "leveldb" / "CURRENT")
    with pytest.raises(SnapshotInvalid, match="symlink"):
        pack_profile(profile, key=KEY, session_id=SESSION)
    (profile / LOCAL_STORAGE / "CURRENT").unlink()
    (profile / LOCAL_STORAGE / "CURRENT").write_text("MANIFEST-000001\n")
    (profile / LOCAL_STORAGE / "LOCK").write_text("")
    (profile / LOCAL_STORAGE / "LOG").write_text("log")
    target = tmp_path / "restored"
    assert (
        unpack_profile(
            pack_profile(profile, key=KEY, session_id=SESSION), target, key=KEY, session_id=SESSION
        )
        == 32
    )
    assert sorted(files_of(target)) == [f"{IDB_LEVELDB}/CURRENT", f"{LOCAL_STORAGE}/CURRENT"]
