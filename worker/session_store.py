"""The worker's local session sidecars: one JSON file per session next to its profile.

They let a restarted worker find its sessions (and their profiles) without a database.
Writes are atomic (temp file + rename) so a crash never leaves half a file.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import orjson

from shared.ids import check_session_id

log = logging.getLogger("walink.store")


class SessionStore:
    def __init__(self, directory: Path) -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)

    def _path(self, session_id: str) -> Path:
        return self.directory / f"{check_session_id(session_id)}.json"

    def save(self, record: dict[str, Any]) -> None:
        path = self._path(str(record["id"]))
        tmp = path.with_suffix(".json.tmp")
        tmp.write_bytes(orjson.dumps(record))
        os.replace(tmp, path)

    def delete(self, session_id: str) -> None:
        self._path(session_id).unlink(missing_ok=True)

    def load_all(self) -> list[dict[str, Any]]:
        records = []
        for path in sorted(self.directory.glob("*.json")):
            try:
                data = orjson.loads(path.read_bytes())
                check_session_id(data.get("id"))
            except (OSError, orjson.JSONDecodeError, ValueError) as exc:
                log.warning("skipping unreadable session file %s: %s", path.name, exc)
                continue
            records.append(data)
        return records
