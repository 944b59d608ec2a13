"""Every Redis key walink uses, in one place, under one configurable prefix."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Keys:
    prefix: str = "walink:"

    def session(self, session_id: str) -> str:
        """Hash-less JSON cache of a session's public state (status, owner, phone, QR, timings)."""
        return f"{self.prefix}session:{session_id}"

    def lease(self, session_id: str) -> str:
        """Who drives the session now: ``SET NX PX`` with the owner's name as the value."""
        return f"{self.prefix}lease:{session_id}"

    def fence(self, session_id: str) -> str:
        """The session's fencing-token counter (``INCR``)."""
        return f"{self.prefix}fence:{session_id}"

    def events(self, session_id: str) -> str:
        """Pub/sub channel of the session's committed events (a hint: the outbox is the record)."""
        return f"{self.prefix}events:{session_id}"

    def worker(self, name: str) -> str:
        """A worker's heartbeat (TTL): membership for the gateway."""
        return f"{self.prefix}worker:{name}"

    def workers_pattern(self) -> str:
        return f"{self.prefix}worker:*"

    # --- per-workspace quotas (gateway/quotas.py); one hash tag per workspace, so that a script
    # touching a workspace's keys stays on one Redis Cluster slot
    def quota_reserved(self, workspace_id: str) -> str:
        """Sorted set: session ids admitted and not yet (surely) in Postgres, scored by expiry (ms)."""
        return f"{self.prefix}quota:{{{workspace_id}}}:reserved"

    def quota_generation(self, workspace_id: str) -> str:
        """Counter bumped whenever a reservation goes: an admission that read before retries."""
        return f"{self.prefix}quota:{{{workspace_id}}}:generation"

    def quota_bucket(self, workspace_id: str) -> str:
        """Hash ``{tokens, at_ms}``: the workspace's create token bucket."""
        return f"{self.prefix}quota:{{{workspace_id}}}:bucket"
