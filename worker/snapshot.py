"""Profile snapshots: WhatsApp Web's login, taken out of one Chromium profile and put into another.

A hibernating session closes its browser and stores a snapshot in Postgres. Any worker can later
unpack it into an *empty* profile directory, and WhatsApp Web comes back logged in, without a new
QR scan. A copy of ``storage_state`` cannot do this. The login depends on a non-extractable
WebCrypto key that only Chromium's own IndexedDB files hold.

What a snapshot holds (``SNAPSHOT_PATHS``, relative to the profile, checked with Chromium 156):

* ``Default/IndexedDB/https_web.whatsapp.com_0.indexeddb.leveldb``: the origin's IndexedDB,
  including the CryptoKey. Required.
* ``Default/Local Storage/leveldb``: ``localStorage``, which holds the credentials encrypted with
  that key and ``last-wid-md``. Required. (Either one alone restores to the QR screen.)
* ``Default/IndexedDB/https_web.whatsapp.com_0.indexeddb.blob``: kept when it exists. Chromium
  stores Blobs and large IndexedDB values there (also plain ArrayBuffers of 512 KiB, as tested;
  Blink wraps values above ~64 KiB). Without this directory, those values come back as
  ``undefined``, and Blobs fail with ``NotFoundError``. Real WhatsApp Web can create it; the
  simulator always does (a 128 KiB value in ``model-storage``, checked at boot).

From the leveldb directories, only the database files are kept: ``CURRENT``, ``MANIFEST-*``, and
``*.log``/``*.ldb``/``*.sst``. ``LOCK``, ``LOG``, ``LOG.old`` and temporary files are skipped.
Nothing else in the profile is needed: ``WebStorage/QuotaManager``, ``Session Storage``,
cookies, caches and ``Preferences`` are rebuilt by Chromium.

Format (v2): ``b"WLS2" + key id(8) + nonce(12) + AES-256-GCM(zstd(tar))``. The key id names the key
that sealed it (:func:`key_id`: the first 8 bytes of SHA-256 over a label and the key), so a worker
holding several keys (``WALINK_SNAPSHOT_KEYS``: the first seals, all open) knows which one to use,
and a worker without it can say which key it lacks (:class:`~shared.errors.SnapshotKeyUnknown`)
instead of calling the snapshot broken. The additional data is ``b"walink-snapshot-v2:" + key id +
session_id``, so a snapshot only opens with its key and for its own session. The v1 format
(``b"WLS1" + nonce + AES-GCM``, additional data ``b"walink-snapshot-v1:" + session_id``, no key
id) still opens: every key is tried. ``walink rekey`` (:mod:`worker.rekey`) seals stored
snapshots again with the first key.

The tar is deterministic: sorted USTAR entries, mtime 0, uid/gid 0, modes 0700/0600.
Only regular files and directories go in. The compression is zstd (level 3), streamed: a
snapshot is packed into a file and restored from one (``pack_profile_file`` /
``unpack_profile_file``) a 64 KiB piece at a time, so its size never shows in memory. WhatsApp's
storage is mostly encrypted (incompressible) and its LevelDB tables are already compressed: on
20 MiB of random bytes zstd runs at ~1 GB/s where xz -0 (the compression before) ran at 7 MB/s
and zlib -1 at 50 MB/s, all three at ratio 1.0; on base64 text zstd gives 75 % against xz's
81 %. ``make bench`` prints the figures at 0, 50 and 200 MB of WhatsApp storage
(docs/durability.md). Snapshots packed with xz are still restored (the payload's magic says
which).

Unpacking is defensive, even though the bytes are authenticated. It refuses absolute paths,
``..``, links, devices, and anything outside the allow-list above. It decompresses as a stream,
with a cap (512 MiB by default, against bombs). It extracts into a temporary directory next to
the target, then renames that directory into place, so the target is either untouched or
complete.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import errno
import hashlib
import hmac
import io
import logging
import lzma
import os
import re
import secrets
import shutil
import stat
import tarfile
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, Literal, cast

import orjson
import zstandard
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from shared.errors import SettingsError, SnapshotInvalid, SnapshotKeyUnknown
from shared.private_files import make_private_dirs
from worker import chromium

if TYPE_CHECKING:
    from _typeshed import ReadableBuffer, WriteableBuffer

log = logging.getLogger("walink.snapshot")

MAGIC = b"WLS2"
MAGIC_V1 = b"WLS1"  # no key id: opened by trying every key
NONCE_BYTES = 12
TAG_BYTES = 16
KEY_BYTES = 32
KEY_ID_BYTES = 8
AAD_PREFIX = b"walink-snapshot-v2:"
AAD_PREFIX_V1 = b"walink-snapshot-v1:"
_KEY_ID_LABEL = b"walink-snapshot-key-id:"
MAX_UNPACKED_BYTES = 512 * 1024 * 1024  # the tar inside a snapshot may not expand beyond this
MAX_MEMBERS = 100_000
ZSTD_LEVEL = 3  # zstd's default: ~1 GB/s on incompressible input on this machine
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
_ZSTD_MAX_WINDOW = 16 * 1024 * 1024  # level 3 uses a 2 MiB window; refuse frames asking far more
_XZ_MAGIC = b"\xfd7zXZ\x00"  # snapshots packed before zstd (still restored)
_LZMA_MEMLIMIT = 64 * 1024 * 1024  # xz -0 needs ~1 MiB to decompress; refuse streams asking far more
_CHUNK = 64 * 1024
_WRITE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG})

IDB_LEVELDB = "Default/IndexedDB/https_web.whatsapp.com_0.indexeddb.leveldb"
IDB_BLOBS = "Default/IndexedDB/https_web.whatsapp.com_0.indexeddb.blob"
LOCAL_STORAGE = "Default/Local Storage/leveldb"

SIDECAR_DIR = "walink"
PAGE_LOCAL_STORAGE = SIDECAR_DIR + "/page-local-storage.json"
"""A live snapshot's localStorage as the page held it (see :func:`take_page_local_storage`)."""
PAGE_LOCAL_STORAGE_MAX_BYTES = 16 * 1024 * 1024  # Chromium allows ~10 MiB of localStorage an origin

SNAPSHOT_PATHS: tuple[str, ...] = (IDB_LEVELDB, IDB_BLOBS, LOCAL_STORAGE)
"""Profile-relative directories that carry WhatsApp Web's login (see the module docstring)."""
REQUIRED_PATHS: tuple[str, ...] = (IDB_LEVELDB, LOCAL_STORAGE)
"""Of ``SNAPSHOT_PATHS``, those without which the profile restores to the QR screen."""
_LEVELDBS = (IDB_LEVELDB, LOCAL_STORAGE)

_LEVELDB_FILE = re.compile(r"CURRENT|MANIFEST-[0-9]{1,20}|[0-9]{1,20}\.(?:log|ldb|sst)")
# Chromium's IndexedDB blob store: <database id hex>/<(blob number >> 8) & 0xff as %02x>/<blob number hex>
_BLOB_PART = re.compile(r"[0-9a-f]{1,16}")
_BLOB_DEPTH = 3
_KEY_CHARS = re.compile(r"[A-Za-z0-9+/_-]+={0,2}")

KEY_HELP = (
    "make one with: python -c "
    '"import secrets,base64;print(base64.urlsafe_b64encode(secrets.token_bytes(32)).decode())"'
)

Kind = Literal["dir", "file"]


# ---------------------------------------------------------------------------------------- key


def load_key(value: str, *, name: str = "WALINK_SNAPSHOT_KEY") -> bytes:
    """An AES-256 key as the settings hold it: urlsafe or standard base64 of exactly 32 bytes.

    Padding is optional. Anything else raises :class:`~shared.errors.SettingsError`, whose message
    names the setting (``name``) and says how to make a key. The message never includes the value.
    """
    text = value.strip()
    if not text:
        raise SettingsError(f"{name} is empty; it must be base64 of 32 random bytes ({KEY_HELP})")
    if not _KEY_CHARS.fullmatch(text):
        raise SettingsError(f"{name} is not base64 (urlsafe or standard) of 32 random bytes ({KEY_HELP})")
    std = text.rstrip("=").replace("-", "+").replace("_", "/")
    try:
        if "=" in text and len(text) % 4:
            raise binascii.Error("bad padding")
        key = base64.b64decode(std + "=" * (-len(std) % 4), validate=True)
        if base64.b64encode(key).rstrip(b"=") != std.encode():  # stray bits: a mangled value
            raise binascii.Error("not canonical")
    except binascii.Error:
        raise SettingsError(f"{name} is not valid base64 of 32 random bytes ({KEY_HELP})") from None
    if len(key) != KEY_BYTES:
        raise SettingsError(
            f"{name} decodes to {len(key)} bytes; it must be exactly {KEY_BYTES} (AES-256) ({KEY_HELP})"
        )
    return key


def key_id(key: bytes) -> bytes:
    """The id of a key in a snapshot's header: 8 bytes of SHA-256 over a label and the key (it
    names the key without revealing it)."""
    return hashlib.sha256(_KEY_ID_LABEL + key).digest()[:KEY_ID_BYTES]


@dataclass(frozen=True, slots=True)
class SnapshotKeys:
    """The keys of this process: the first seals new snapshots, every one opens them."""

    keys: tuple[bytes, ...]

    def __post_init__(self) -> None:
        if not self.keys:
            raise SettingsError("at least one snapshot key is needed")
        for key in self.keys:
            _aead(key)  # each one 32 bytes

    @property
    def primary(self) -> bytes:
        return self.keys[0]

    @property
    def ids(self) -> list[str]:
        """The keys' ids in hex, the sealing key's first (for logs and ``walink rekey``)."""
        return [key_id(k).hex() for k in self.keys]

    def by_id(self, kid: bytes) -> bytes | None:
        for key in self.keys:
            if hmac.compare_digest(key_id(key), kid):
                return key
        return None

    @classmethod
    def of(cls, key: bytes | SnapshotKeys) -> SnapshotKeys:
        return key if isinstance(key, SnapshotKeys) else cls((key,))

    @classmethod
    def from_settings(cls, snapshot_key: str, snapshot_keys: str) -> SnapshotKeys | None:
        """``WALINK_SNAPSHOT_KEYS`` (comma separated, the first seals) or the one
        ``WALINK_SNAPSHOT_KEY``; None when neither is set (snapshots disabled)."""
        if snapshot_key.strip() and snapshot_keys.strip():
            raise SettingsError(
                "set WALINK_SNAPSHOT_KEYS or WALINK_SNAPSHOT_KEY, not both "
                "(put the old key after the new one in WALINK_SNAPSHOT_KEYS)"
            )
        if snapshot_keys.strip():
            parts = [p for p in snapshot_keys.split(",") if p.strip()]
            keys = tuple(
                load_key(p, name=f"WALINK_SNAPSHOT_KEYS (key {n})") for n, p in enumerate(parts, start=1)
            )
            if len({key_id(k) for k in keys}) != len(keys):
                raise SettingsError("WALINK_SNAPSHOT_KEYS holds the same key twice")
            return cls(keys)
        if snapshot_key.strip():
            return cls((load_key(snapshot_key),))
        return None


def blob_key_id(blob: bytes) -> str | None:
    """The hex id of the key that sealed ``blob`` (None: a v1 snapshot, or not a snapshot)."""
    if blob[: len(MAGIC)] == MAGIC and len(blob) >= len(MAGIC) + KEY_ID_BYTES:
        return blob[len(MAGIC) : len(MAGIC) + KEY_ID_BYTES].hex()
    return None


def _aead(key: bytes) -> AESGCM:
    if not isinstance(key, bytes) or len(key) != KEY_BYTES:
        raise SettingsError(f"the snapshot key must be {KEY_BYTES} bytes (AES-256); use load_key()")
    return AESGCM(key)


def _aad(session_id: str, kid: bytes | None) -> bytes:
    """The additional data: v2 binds the key id and the session, v1 (``kid`` None) the session."""
    if not session_id:
        raise SnapshotInvalid("a snapshot needs the id of its session")
    if kid is None:
        return AAD_PREFIX_V1 + session_id.encode()
    return AAD_PREFIX + kid + session_id.encode()


# ---------------------------------------------------------------------------------------- paths


def classify(name: str) -> Kind | None:
    """What the profile-relative POSIX path ``name`` may be in a snapshot: "dir", "file", or None.

    This is an allow-list of fixed roots and strict per-component patterns. So an accepted name
    can never be absolute, contain ``.``/``..``/empty components, or point outside the roots.
    """
    if name in SNAPSHOT_PATHS or name == SIDECAR_DIR:
        return "dir"
    if name == PAGE_LOCAL_STORAGE:
        return "file"
    for root in _LEVELDBS:
        if name.startswith(root + "/"):
            return "file" if _LEVELDB_FILE.fullmatch(name[len(root) + 1 :]) else None
    if name.startswith(IDB_BLOBS + "/"):
        parts = name[len(IDB_BLOBS) + 1 :].split("/")
        if len(parts) > _BLOB_DEPTH or not all(_BLOB_PART.fullmatch(p) for p in parts):
            return None
        return "file" if len(parts) == _BLOB_DEPTH else "dir"
    return None


@dataclass(frozen=True, slots=True)
class _Entry:
    name: str  # profile-relative, POSIX
    kind: Kind
    path: Path


def _scan(profile_dir: Path) -> list[_Entry]:
    """The allowed entries of the profile, sorted. Required roots are checked; others are optional."""
    entries: list[_Entry] = []
    missing: list[str] = []
    for root in SNAPSHOT_PATHS:
        path = profile_dir / root
        try:
            st = path.lstat()
        except FileNotFoundError:
            if root in REQUIRED_PATHS:
                missing.append(root)
            continue
        if not stat.S_ISDIR(st.st_mode) or _has_symlink(profile_dir, root):
            raise SnapshotInvalid(f"cannot snapshot {path}: not a plain directory (a symlink or a file)")
        entries.append(_Entry(root, "dir", path))
        entries.extend(_walk(path, root))
    if missing:
        raise SnapshotInvalid(
            f"nothing to snapshot in {profile_dir}: missing {', '.join(missing)} "
            "(the profile never opened WhatsApp Web, so it holds no login)"
        )
    sidecar = profile_dir / PAGE_LOCAL_STORAGE
    if sidecar.is_file() and not sidecar.is_symlink() and not (profile_dir / SIDECAR_DIR).is_symlink():
        entries.append(_Entry(SIDECAR_DIR, "dir", profile_dir / SIDECAR_DIR))
        entries.append(_Entry(PAGE_LOCAL_STORAGE, "file", sidecar))
    names = {e.name for e in entries}
    for root in REQUIRED_PATHS:
        if f"{root}/CURRENT" not in names:
            raise SnapshotInvalid(
                f"nothing to snapshot in {profile_dir}: {root} is not a leveldb (no CURRENT)"
            )
    entries.sort(key=lambda e: e.name)
    return entries


def _has_symlink(profile_dir: Path, rel: str) -> bool:
    """Whether a component of ``rel`` below ``profile_dir`` (``Default``, ``IndexedDB``…) is a symlink."""
    path = profile_dir
    for part in rel.split("/"):
        path = path / part
        if path.is_symlink():
            return True
    return False


def _walk(directory: Path, rel: str) -> Iterator[_Entry]:
    with os.scandir(directory) as it:
        children = sorted(it, key=lambda d: d.name)
    for child in children:
        name = f"{rel}/{child.name}"
        kind = classify(name)
        if kind is None:
            log.debug("snapshot skips %s", name)  # LOCK, LOG, LOG.old, *.dbtmp…
            continue
        if child.is_symlink():
            raise SnapshotInvalid(f"cannot snapshot {child.path}: it is a symlink")
        if kind == "dir" and child.is_dir(follow_symlinks=False):
            yield _Entry(name, "dir", Path(child.path))
            yield from _walk(Path(child.path), name)
        elif kind == "file" and child.is_file(follow_symlinks=False):
            yield _Entry(name, "file", Path(child.path))
        else:
            raise SnapshotInvalid(f"cannot snapshot {child.path}: expected a {kind}")


# ---------------------------------------------------------------------------------------- pack


def _tar_info(name: str, kind: Kind, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.mtime = 0
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    if kind == "dir":
        info.type = tarfile.DIRTYPE
        info.mode = 0o700
    else:
        info.type = tarfile.REGTYPE
        info.mode = 0o600
        info.size = size
    return info


def _tar_bytes(sizes: list[int]) -> int:
    """Size of the USTAR stream of entries with these file sizes (header + padded data, end, record)."""
    body = sum(512 + -(-s // 512) * 512 for s in sizes) + 1024
    return -(-body // tarfile.RECORDSIZE) * tarfile.RECORDSIZE


class _SealingWriter(io.RawIOBase):
    """A v2 snapshot written as a stream: the header, AES-256-GCM ciphertext as it comes, and the
    tag on :meth:`finish`. The bytes are those :func:`seal` makes of the whole payload at once
    (GCM is a stream cipher with the tag at the end), so nothing stored or read changes; only a
    whole payload never has to be in memory."""

    def __init__(self, out: BinaryIO, key: bytes, session_id: str) -> None:
        super().__init__()
        _aead(key)  # 32 bytes
        kid = key_id(key)
        nonce = secrets.token_bytes(NONCE_BYTES)
        self._encryptor = Cipher(algorithms.AES(key), modes.GCM(nonce)).encryptor()
        self._encryptor.authenticate_additional_data(_aad(session_id, kid))
        self._out = out
        self._out.write(MAGIC + kid + nonce)
        self.written = len(MAGIC) + KEY_ID_BYTES + NONCE_BYTES

    def writable(self) -> bool:
        return True

    def write(self, data: ReadableBuffer, /) -> int:
        view = memoryview(data)
        chunk = self._encryptor.update(view)
        self._out.write(chunk)
        self.written += len(chunk)
        return len(view)

    def finish(self) -> int:
        """Write the tag; the answer is the snapshot's size in bytes."""
        tail = self._encryptor.finalize() + self._encryptor.tag
        self._out.write(tail)
        self.written += len(tail)
        return self.written


def pack_profile_into(profile_dir: Path, out: BinaryIO, *, key: bytes | SnapshotKeys, session_id: str) -> int:
    """Snapshot the WhatsApp login of a *closed* profile into ``out`` as it is read, sealed with
    ``key`` (of several keys: the first): ``b"WLS2" + key id + nonce + AES-GCM(zstd(tar))``. The
    answer is the snapshot's size. Memory stays flat whatever the profile's size (a file is read
    in 64 KiB pieces, compressed and encrypted on the way out).

    Raises :class:`SnapshotInvalid` in these cases: a Chromium still runs on the profile (the
    copy could be torn), the profile lacks the required paths (nothing to snapshot), or the files
    are not what Chromium writes. This checks that the files exist, not that the account is
    linked. Only snapshot a session that reached ``ready``.
    """
    _aad(session_id, None)  # refuse a missing session id before any work
    sealing = SnapshotKeys.of(key).primary
    pid = chromium.browser_pid_for_profile(profile_dir)
    if pid is not None:
        raise SnapshotInvalid(f"Chromium (pid {pid}) still runs on {profile_dir}; close it before a snapshot")
    entries = _scan(profile_dir)
    sealer = _SealingWriter(out, sealing, session_id)
    total = 0
    try:
        sizes: list[int] = []
        with (
            zstandard.ZstdCompressor(level=ZSTD_LEVEL).stream_writer(
                cast(BinaryIO, sealer), closefd=False
            ) as compressed,
            tarfile.open(
                fileobj=cast(BinaryIO, compressed), mode="w|", format=tarfile.USTAR_FORMAT, bufsize=_CHUNK
            ) as tar,
        ):
            for entry in entries:
                if entry.kind == "dir":
                    tar.addfile(_tar_info(entry.name, "dir", 0))
                    sizes.append(0)
                    continue
                fd = os.open(entry.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
                with os.fdopen(fd, "rb") as fh:
                    st = os.fstat(fh.fileno())
                    if not stat.S_ISREG(st.st_mode):
                        raise SnapshotInvalid(f"cannot snapshot {entry.path}: not a regular file")
                    sizes.append(st.st_size)
                    total += st.st_size
                    if _tar_bytes(sizes) > MAX_UNPACKED_BYTES:
                        raise SnapshotInvalid(
                            f"the WhatsApp storage of {profile_dir} exceeds {MAX_UNPACKED_BYTES >> 20} MiB; "
                            "such a snapshot could not be restored"
                        )
                    tar.addfile(_tar_info(entry.name, "file", st.st_size), fh)
    except OSError as exc:
        if exc.errno in _WRITE_ERRNOS:
            raise  # the snapshot's own file cannot be written (a full disk): not the profile's fault
        # a file vanished or shrank under us: the profile is in use
        raise SnapshotInvalid(f"{profile_dir} changed while it was packed ({exc}); is it in use?") from exc
    size = sealer.finish()
    log.debug("packed %s: %d files, %d bytes -> %d bytes", profile_dir, len(entries), total, size)
    return size


def pack_profile(profile_dir: Path, *, key: bytes | SnapshotKeys, session_id: str) -> bytes:
    """:func:`pack_profile_into` a bytes object (small profiles, tests, ``walink rekey``)."""
    out = io.BytesIO()
    pack_profile_into(profile_dir, out, key=key, session_id=session_id)
    return out.getvalue()


def pack_profile_file(profile_dir: Path, target: Path, *, key: bytes | SnapshotKeys, session_id: str) -> int:
    """:func:`pack_profile_into` a new private file ``target`` (0600); removed again on failure."""
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        with os.fdopen(fd, "wb", buffering=_CHUNK) as out:
            return pack_profile_into(profile_dir, out, key=key, session_id=session_id)
    except BaseException:
        target.unlink(missing_ok=True)
        raise


# ---------------------------------------------------------------------------------------- unpack


class _Inflater(io.RawIOBase):
    """The tar stream of a snapshot, decompressed on demand from ``source`` (a seekable stream
    read in pieces: zstd, or xz from snapshots packed before zstd); refused beyond ``cap``
    bytes. Every read gives at most what was asked for, so no input can make one call expand
    without bound."""

    def __init__(self, source: BinaryIO, cap: int) -> None:
        super().__init__()
        head = source.read(len(_XZ_MAGIC))
        source.seek(-len(head), io.SEEK_CUR)
        self._source = source
        self._cap = cap
        self.total = 0
        self._zstd: zstandard.ZstdDecompressionReader | None = None
        self._xz: lzma.LZMADecompressor | None = None
        if head.startswith(_ZSTD_MAGIC):
            self._zstd = zstandard.ZstdDecompressor(max_window_size=_ZSTD_MAX_WINDOW).stream_reader(
                source, read_size=_CHUNK, read_across_frames=True, closefd=False
            )
        elif head == _XZ_MAGIC:
            self._xz = lzma.LZMADecompressor(format=lzma.FORMAT_XZ, memlimit=_LZMA_MEMLIMIT)
        else:
            raise SnapshotInvalid("snapshot payload is neither zstd nor xz")

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: WriteableBuffer, /) -> int:
        view = memoryview(buffer).cast("B")
        want = len(view)
        if want == 0:
            return 0
        chunk = self._read_zstd(want) if self._zstd is not None else self._read_xz(want)
        if chunk:
            self.total += len(chunk)
            if self.total > self._cap:
                raise SnapshotInvalid(
                    f"snapshot expands beyond {self._cap} bytes; refused (a decompression bomb?)"
                )
            view[: len(chunk)] = chunk
        return len(chunk)

    def _read_zstd(self, want: int) -> bytes:
        assert self._zstd is not None
        try:
            return self._zstd.read(want)
        except zstandard.ZstdError as exc:
            raise SnapshotInvalid(f"snapshot is not a valid zstd stream: {exc}") from None

    def _read_xz(self, want: int) -> bytes:
        xz = self._xz
        assert xz is not None
        idle = 0  # calls that neither took input nor gave output: a stream that makes no progress
        while idle < 3:
            if xz.eof:
                if xz.unused_data or self._source.read(1):
                    raise SnapshotInvalid("snapshot holds data after its compressed stream")
                return b""
            data = b""
            if xz.needs_input:
                data = self._source.read(_CHUNK)
                if not data:
                    raise SnapshotInvalid("snapshot's compressed stream is truncated")
            try:
                chunk = xz.decompress(data, max_length=want)
            except lzma.LZMAError as exc:
                raise SnapshotInvalid(f"snapshot is not a valid xz stream: {exc}") from None
            if chunk:
                return chunk
            idle = 0 if data else idle + 1
        raise SnapshotInvalid("snapshot's compressed stream makes no progress")


def seal(payload: bytes, *, key: bytes, session_id: str) -> bytes:
    """``payload`` (a compressed tar) sealed as a v2 snapshot of ``session_id`` with ``key``."""
    kid = key_id(key)
    nonce = secrets.token_bytes(NONCE_BYTES)
    return MAGIC + kid + nonce + _aead(key).encrypt(nonce, payload, _aad(session_id, kid))


def open_sealed(blob: bytes, *, key: bytes | SnapshotKeys, session_id: str) -> bytes:
    """The payload of a snapshot (v2 by its key id, v1 by trying every key).

    A v2 snapshot sealed with a key this process lacks, or a v1 snapshot that no key opens, raises
    :class:`~shared.errors.SnapshotKeyUnknown` (the snapshot may be fine: this process lacks its
    key). Bytes that are not a snapshot, or that fail authentication under the key they name
    (altered, or another session's), raise :class:`SnapshotInvalid`.
    """
    keys = SnapshotKeys.of(key)
    _aad(session_id, None)
    magic = blob[: len(MAGIC)]
    if magic == MAGIC:
        header = len(MAGIC) + KEY_ID_BYTES + NONCE_BYTES
        if len(blob) < header + TAG_BYTES:
            raise SnapshotInvalid(f"snapshot is too short ({len(blob)} bytes) to be a walink snapshot")
        kid = blob[len(MAGIC) : len(MAGIC) + KEY_ID_BYTES]
        sealing = keys.by_id(kid)
        if sealing is None:
            raise SnapshotKeyUnknown(
                f"the snapshot was sealed with key {kid.hex()}, which this worker does not have "
                f"(its keys: {', '.join(keys.ids)}); add it to WALINK_SNAPSHOT_KEYS",
                key_id=kid.hex(),
            )
        nonce = blob[len(MAGIC) + KEY_ID_BYTES : header]
        try:
            return _aead(sealing).decrypt(nonce, blob[header:], _aad(session_id, kid))
        except InvalidTag:
            raise SnapshotInvalid(
                f"snapshot failed authentication under its key {kid.hex()}: "
                "a snapshot of another session, or altered bytes"
            ) from None
    if magic == MAGIC_V1:
        header = len(MAGIC_V1) + NONCE_BYTES
        if len(blob) < header + TAG_BYTES:
            raise SnapshotInvalid(f"snapshot is too short ({len(blob)} bytes) to be a walink snapshot")
        nonce = blob[len(MAGIC_V1) : header]
        for candidate in keys.keys:
            try:
                return _aead(candidate).decrypt(nonce, blob[header:], _aad(session_id, None))
            except InvalidTag:
                continue
        raise SnapshotKeyUnknown(
            f"no key of this worker ({', '.join(keys.ids)}) opens this v1 snapshot (it names no key): "
            "it was sealed with another key, or it is another session's or altered",
            key_id="v1",
        )
    if len(blob) < len(MAGIC) + NONCE_BYTES + TAG_BYTES:
        raise SnapshotInvalid(f"snapshot is too short ({len(blob)} bytes) to be a walink snapshot")
    raise SnapshotInvalid("not a walink snapshot (bad magic)")


def _check_target(profile_dir: Path) -> None:
    if profile_dir.is_symlink():
        raise SnapshotInvalid(f"cannot restore into {profile_dir}: it is a symlink")
    if profile_dir.exists():
        if not profile_dir.is_dir():
            raise SnapshotInvalid(f"cannot restore into {profile_dir}: not a directory")
        if any(profile_dir.iterdir()):
            raise SnapshotInvalid(f"cannot restore into {profile_dir}: the directory is not empty")


def _member_kind(member: tarfile.TarInfo, seen: set[str]) -> tuple[str, Kind]:
    name = member.name.rstrip("/") if member.isdir() else member.name
    if name.startswith("/") or "\\" in name or "\0" in name:
        raise SnapshotInvalid(f"snapshot member {name!r} has an absolute or non-POSIX path")
    if ".." in name.split("/"):
        raise SnapshotInvalid(f"snapshot member {name!r} climbs out with '..'")
    if member.issym() or member.islnk():
        raise SnapshotInvalid(f"snapshot member {name!r} is a link")
    if member.ischr() or member.isblk() or member.isfifo() or member.issparse():
        raise SnapshotInvalid(f"snapshot member {name!r} is a device, fifo or sparse file")
    if not (member.isdir() or member.isreg()):
        raise SnapshotInvalid(f"snapshot member {name!r} has unsupported type {member.type!r}")
    kind = classify(name)
    if kind is None:
        raise SnapshotInvalid(f"snapshot member {name!r} is outside the WhatsApp storage paths")
    actual: Kind = "dir" if member.isdir() else "file"
    if actual != kind:
        raise SnapshotInvalid(f"snapshot member {name!r} must be a {kind}, not a {actual}")
    if name in seen:
        raise SnapshotInvalid(f"snapshot member {name!r} appears twice")
    seen.add(name)
    return name, kind


def _mkdirs(root: Path, directory: Path) -> None:
    """``mkdir -p`` below ``root`` with mode 0700 at every level (as Chromium makes them)."""
    path = root
    for part in directory.relative_to(root).parts:
        path = path / part
        if not path.is_dir():
            path.mkdir(mode=0o700)


def _extract(tar: tarfile.TarFile, root: Path) -> int:
    """Write every member under ``root`` (a fresh directory of ours); bytes written."""
    written = 0
    seen: set[str] = set()
    for count, member in enumerate(tar, start=1):
        if count > MAX_MEMBERS:
            raise SnapshotInvalid(f"snapshot has more than {MAX_MEMBERS} members")
        name, kind = _member_kind(member, seen)
        target = root.joinpath(*name.split("/"))
        if kind == "dir":
            _mkdirs(root, target)
            continue
        _mkdirs(root, target.parent)
        source = tar.extractfile(member)
        if source is None:  # pragma: no cover - isreg() members always have data
            raise SnapshotInvalid(f"snapshot member {name!r} has no data")
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        with os.fdopen(fd, "wb") as out:
            while chunk := source.read(_CHUNK):
                out.write(chunk)
                written += len(chunk)
    for required in REQUIRED_PATHS:
        if f"{required}/CURRENT" not in seen:
            raise SnapshotInvalid(f"snapshot lacks {required}/CURRENT; it cannot restore a login")
    return written


def _open_sealed_file(sealed: BinaryIO, out: BinaryIO, *, keys: SnapshotKeys, session_id: str) -> None:
    """Decrypt the v2 snapshot in ``sealed`` into ``out`` piece by piece; authenticated (the tag
    checked) before this returns, so nothing in ``out`` may be used when it raises."""
    header = len(MAGIC) + KEY_ID_BYTES + NONCE_BYTES
    size = os.fstat(sealed.fileno()).st_size
    head = sealed.read(header)
    if size < header + TAG_BYTES:
        raise SnapshotInvalid(f"snapshot is too short ({size} bytes) to be a walink snapshot")
    kid = head[len(MAGIC) : len(MAGIC) + KEY_ID_BYTES]
    sealing = keys.by_id(kid)
    if sealing is None:
        raise SnapshotKeyUnknown(
            f"the snapshot was sealed with key {kid.hex()}, which this worker does not have "
            f"(its keys: {', '.join(keys.ids)}); add it to WALINK_SNAPSHOT_KEYS",
            key_id=kid.hex(),
        )
    sealed.seek(size - TAG_BYTES)
    tag = sealed.read(TAG_BYTES)
    sealed.seek(header)
    decryptor = Cipher(algorithms.AES(sealing), modes.GCM(head[len(MAGIC) + KEY_ID_BYTES :], tag)).decryptor()
    decryptor.authenticate_additional_data(_aad(session_id, kid))
    left = size - header - TAG_BYTES
    while left > 0:
        data = sealed.read(min(_CHUNK, left))
        if not data:
            raise SnapshotInvalid("the snapshot file shrank while it was read")
        left -= len(data)
        out.write(decryptor.update(data))
    try:
        out.write(decryptor.finalize())
    except InvalidTag:
        raise SnapshotInvalid(
            f"snapshot failed authentication under its key {kid.hex()}: "
            "a snapshot of another session, or altered bytes"
        ) from None


def _restore_payload(payload: BinaryIO, profile_dir: Path, staging: Path, max_bytes: int) -> int:
    """Extract the compressed tar ``payload`` into ``staging``, then rename it to ``profile_dir``."""
    stream = io.BufferedReader(_Inflater(payload, max_bytes), buffer_size=_CHUNK)
    try:
        with tarfile.open(fileobj=stream, mode="r|") as tar:
            written = _extract(tar, staging)
        while stream.read(_CHUNK):  # the rest (tar padding) must be a complete, capped stream
            pass
    except tarfile.TarError as exc:
        raise SnapshotInvalid(f"snapshot is not a valid tar archive: {exc}") from None
    try:
        os.rename(staging, profile_dir)  # atomic; replaces an empty directory, refuses a full one
    except OSError as exc:
        raise SnapshotInvalid(f"cannot restore into {profile_dir}: {exc.strerror}") from None
    return written


def unpack_profile(
    blob: bytes,
    profile_dir: Path,
    *,
    key: bytes | SnapshotKeys,
    session_id: str,
    max_bytes: int = MAX_UNPACKED_BYTES,
) -> int:
    """Restore a snapshot into ``profile_dir``, which must be empty or absent. Returns bytes written.

    A key this process lacks raises :class:`~shared.errors.SnapshotKeyUnknown`; another session's
    id, altered bytes, or a malformed or unsafe archive raise :class:`SnapshotInvalid`. The target
    is then left as it was, and no temporary directory stays behind.
    """
    _check_target(profile_dir)
    payload = open_sealed(blob, key=key, session_id=session_id)
    parent = profile_dir.parent
    make_private_dirs(parent)
    staging = Path(tempfile.mkdtemp(prefix=f".{profile_dir.name}.restore-", dir=parent))
    try:
        written = _restore_payload(io.BytesIO(payload), profile_dir, staging, max_bytes)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    log.debug("unpacked %d bytes into %s", written, profile_dir)
    return written


def unpack_profile_file(
    sealed_path: Path,
    profile_dir: Path,
    *,
    key: bytes | SnapshotKeys,
    session_id: str,
    max_bytes: int = MAX_UNPACKED_BYTES,
) -> int:
    """:func:`unpack_profile` of a snapshot in a file, in flat memory whatever its size: it is
    decrypted (and authenticated) into a private file next to the target first, then extracted
    from there. A v1 snapshot (small, from before key ids) is read whole."""
    _check_target(profile_dir)
    keys = SnapshotKeys.of(key)
    _aad(session_id, None)
    with open(sealed_path, "rb", buffering=_CHUNK) as sealed:
        if sealed.read(len(MAGIC)) != MAGIC:
            sealed.seek(0)
            return unpack_profile(
                sealed.read(), profile_dir, key=keys, session_id=session_id, max_bytes=max_bytes
            )
        sealed.seek(0)
        parent = profile_dir.parent
        make_private_dirs(parent)
        fd, name = tempfile.mkstemp(prefix=f".{profile_dir.name}.payload-", dir=parent)  # 0600
        staging: Path | None = None
        try:
            with os.fdopen(fd, "w+b", buffering=_CHUNK) as payload:
                _open_sealed_file(sealed, payload, keys=keys, session_id=session_id)
                payload.flush()
                payload.seek(0)
                staging = Path(tempfile.mkdtemp(prefix=f".{profile_dir.name}.restore-", dir=parent))
                written = _restore_payload(payload, profile_dir, staging, max_bytes)
        except BaseException:
            if staging is not None:
                shutil.rmtree(staging, ignore_errors=True)
            raise
        finally:
            os.unlink(name)
    log.debug("unpacked %d bytes from %s into %s", written, sealed_path, profile_dir)
    return written


# ---------------------------------------------------------------------------------------- async


_LEFTOVER = re.compile(r"\.[^/]+\.(?:restore|payload)-[^/]+|walink-live-[^/]+")


def remove_leftovers(profiles_dir: Path) -> int:
    """Remove what a killed worker left half-done next to its profiles: restore staging
    directories, decrypted payload files and live copies (never a profile); how many went."""
    removed = 0
    try:
        entries = list(os.scandir(profiles_dir))
    except FileNotFoundError:
        return 0
    for entry in entries:
        if not _LEFTOVER.fullmatch(entry.name) or entry.is_symlink():
            continue
        if entry.is_dir(follow_symlinks=False):
            shutil.rmtree(entry.path, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(entry.path)
        removed += 1
    return removed


@contextlib.contextmanager
def _live_copy(profile_dir: Path, page_local_storage: dict[str, str] | None = None) -> Iterator[Path]:
    """A copy of the login's files of a profile whose Chromium is still running (for crash
    failover). LevelDB only appends to its log and replaces whole table files, so a copy is a
    valid database missing at most the last unflushed write.

    localStorage is another matter: Chromium writes it to disk in batches, at least 5 s late and,
    under its rate limit (60 commits an hour an origin), up to minutes late, so the copy of
    ``Local Storage`` can lack keys the page set long before (seen: ``last-wid-md``, and the
    restored page then boots as never linked). ``page_local_storage`` (the page's own view,
    read just before) goes into the snapshot beside it; a browser started on the restored
    profile puts it back before the page's scripts run (:func:`take_page_local_storage`)."""
    with tempfile.TemporaryDirectory(prefix="walink-live-", dir=profile_dir.parent) as tmp:
        copy = Path(tmp) / "profile"
        if page_local_storage is not None:
            data = orjson.dumps(page_local_storage)
            if len(data) > PAGE_LOCAL_STORAGE_MAX_BYTES:
                raise SnapshotInvalid(f"the page's localStorage is {len(data)} bytes; too large to keep")
            (copy / SIDECAR_DIR).mkdir(parents=True, mode=0o700)
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
            with os.fdopen(os.open(copy / PAGE_LOCAL_STORAGE, flags, 0o600), "wb") as out:
                out.write(data)
        for rel in SNAPSHOT_PATHS:
            src = profile_dir / rel
            if src.is_dir():
                shutil.copytree(
                    src,
                    copy / rel,
                    ignore=shutil.ignore_patterns("LOCK", "LOG", "LOG.old"),
                    symlinks=True,
                    ignore_dangling_symlinks=True,
                )
        yield copy


def _pack_file(
    profile_dir: Path,
    target: Path,
    key: bytes | SnapshotKeys,
    session_id: str,
    live: bool,
    page_local_storage: dict[str, str] | None,
) -> int:
    if not live:
        return pack_profile_file(profile_dir, target, key=key, session_id=session_id)
    with _live_copy(profile_dir, page_local_storage) as copy:
        return pack_profile_file(copy, target, key=key, session_id=session_id)


async def pack_profile_file_async(
    profile_dir: Path,
    target: Path,
    *,
    key: bytes | SnapshotKeys,
    session_id: str,
    live: bool = False,
    page_local_storage: dict[str, str] | None = None,
) -> int:
    """The session's snapshot into the new file ``target``, in a thread (``live``: the profile's
    Chromium still runs, and ``page_local_storage`` is what its page holds); its size."""
    return await asyncio.to_thread(_pack_file, profile_dir, target, key, session_id, live, page_local_storage)


def take_page_local_storage(profile_dir: Path) -> dict[str, str] | None:
    """The localStorage a restored live snapshot carried beside Chromium's files (see
    :func:`_live_copy`), removed from the profile as it is read: it is put back once, by the
    first page of the browser started on it. None when there is none (or it is unreadable)."""
    path = profile_dir / PAGE_LOCAL_STORAGE
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        with os.fdopen(fd, "rb") as fh:
            data = fh.read(PAGE_LOCAL_STORAGE_MAX_BYTES + 1)
    finally:
        path.unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            (profile_dir / SIDECAR_DIR).rmdir()
    try:
        entries = orjson.loads(data)
    except orjson.JSONDecodeError:
        log.warning("%s: unreadable page localStorage; ignored", path)
        return None
    if not isinstance(entries, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in entries.items()
    ):
        log.warning("%s: page localStorage is not a map of strings; ignored", path)
        return None
    return entries


async def unpack_profile_file_async(
    sealed_path: Path,
    profile_dir: Path,
    *,
    key: bytes | SnapshotKeys,
    session_id: str,
    max_bytes: int = MAX_UNPACKED_BYTES,
) -> int:
    """:func:`unpack_profile_file` in a thread."""
    return await asyncio.to_thread(
        unpack_profile_file, sealed_path, profile_dir, key=key, session_id=session_id, max_bytes=max_bytes
    )
