"""Directories and files that only walink's own user may read.

Chromium profiles hold a linked WhatsApp account (its keys, its messages), and the dev stack's
``var/dev.env`` holds secrets, so both are private from their first byte: directories are made
``0700`` by the ``mkdir`` that creates them and files ``0600`` by the ``open`` that creates them
(never widened by the umask, never narrowed afterwards with a ``chmod`` while readable).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import stat
from pathlib import Path

PRIVATE_DIR_MODE = 0o700
PRIVATE_FILE_MODE = 0o600


def make_private_dirs(path: Path) -> None:
    """``mkdir -p path``: every directory this creates is ``0700`` from the start.

    ``path`` itself, when it exists already (made by an older walink), is narrowed to ``0700``;
    existing parents are left alone (they may be the operator's, e.g. a volume's mount point)."""
    missing: list[Path] = []
    walk = path
    while not walk.exists():
        missing.append(walk)
        if walk.parent == walk:
            break
        walk = walk.parent
    for directory in reversed(missing):
        # the umask can only take bits away; another process may make it meanwhile (then, if it
        # is `path`, it is narrowed below)
        with contextlib.suppress(FileExistsError):
            os.mkdir(directory, PRIVATE_DIR_MODE)
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        path.chmod(mode & PRIVATE_DIR_MODE)


def write_private_file(path: Path, data: bytes) -> None:
    """Replace ``path`` atomically by a ``0600`` file holding ``data``.

    The new file is created with its mode (``O_CREAT | O_EXCL``, mode ``0600``) under a temporary
    name, written, synced, then renamed over ``path``: no reader ever sees it readable by others,
    nor half written."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, PRIVATE_FILE_MODE)
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
