"""Duplicates across workers: when a phone links again, the newer link's ready transaction
soft-deletes every older live session of that phone in the workspace (:meth:`Store.mark_ready`),
wherever it runs. The worker that committed it ends the ones it drives at once
(:meth:`Commits.end_replaced`); every other worker learns it from Postgres — the record, so
nothing is missed while Redis is down or a message is lost — by checking, every
``interval_s``, which of the sessions it drives have been deleted under it, and ends those the
same way (:meth:`worker.sessions.SessionManager.keep_house`): ``failed``/``replaced``, their
device unlinked from the phone (the page logs out), their browser and profile gone.
"""

from __future__ import annotations

import logging

from shared.models import SessionStatus
from worker.commits import Commits
from worker.context import Context

log = logging.getLogger("walink.sessions")

S = SessionStatus


class Duplicates:
    def __init__(self, ctx: Context, commits: Commits) -> None:
        self._ctx = ctx
        self._commits = commits

    async def end_replaced_elsewhere(self) -> list[str]:
        """End the sessions driven here that another worker's link replaced; their ids."""
        ctx = self._ctx
        live = [sid for sid, s in ctx.sessions.items() if not s.ended]
        replaced = await ctx.store.replaced_among(ctx.name, live)
        for sid in replaced:
            self._commits.end_replaced(sid, by=None)
        return replaced
