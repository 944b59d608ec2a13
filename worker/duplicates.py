"""Duplicates across workers: when a phone links again, the newer link's ready transaction
soft-deletes every older live session of that phone in the workspace (:meth:`Store.mark_ready`),
wherever it runs. The worker that committed it ends the ones it drives at once
(:meth:`Commits.end_replaced`); every other worker learns it from Postgres — the record, so
nothing is missed while Redis is down or a message is lost — by checking, every second,
which of the sessions it drives have been deleted under it, and ends those the same way
(:meth:`worker.sessions.SessionManager.check_rows`): ``failed``/``replaced``, their
device unlinked from the phone (the page logs out), their browser and profile gone.
"""

from __future__ import annotations

from worker.commits import Commits
from worker.context import Context


class Duplicates:
    def __init__(self, ctx: Context, commits: Commits) -> None:
        self._ctx = ctx
        self._commits = commits

    def end_replaced(self, session_ids: list[str]) -> None:
        """End the sessions driven here that another worker's link replaced (Postgres says so:
        :meth:`Store.changed_under`)."""
        for sid in session_ids:
            self._commits.end_replaced(sid, by=None)
