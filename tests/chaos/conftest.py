"""The chaos suite's cluster (one for the whole run) and its table of fault -> outcome.

``make chaos`` runs this directory; ``make test`` does not collect it (``norecursedirs``).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from tests.chaos.cluster import ChaosCluster, Outcome

OUTCOMES: list[Outcome] = []
LOGS: list[Path] = []


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def chaos(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[ChaosCluster]:
    logs = Path("var/chaos") / time.strftime("run-%Y%m%dT%H%M%SZ", time.gmtime())
    cluster = ChaosCluster(tmp_path_factory.mktemp("chaos"), logs.resolve())
    try:
        await asyncio.wait_for(cluster.start(), 300)
        for _ in range(4):  # ready sessions before the first fault
            await cluster.link()
        cluster.set_phase("between")
        yield cluster
    finally:
        OUTCOMES.extend(cluster.outcomes)
        LOGS.append(cluster.logs)
        await asyncio.wait_for(cluster.close(), 300)


def _errors(outcome: Outcome) -> str:
    return ", ".join(f"{k} x{n}" for k, n in sorted(outcome.errors.items())) or "none"


def table(outcomes: list[Outcome]) -> list[str]:
    head = (
        "fault",
        "outcome",
        "recovery",
        "errors during it",
        "re-scans",
        "lost events",
        "orphans",
        "2 drivers",
    )
    rows = [
        (
            o.fault,
            "pass" if o.passed else "FAIL",
            "-" if o.recovery_s is None else f"{o.recovery_s:.1f}s",
            _errors(o),
            str(o.rescans),
            str(o.lost_events),
            str(o.orphans),
            str(o.doubles),
        )
        for o in outcomes
    ]
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    line = "  ".join(f"{{:<{w}}}" for w in widths)
    out = [line.format(*head), line.format(*("-" * w for w in widths))]
    out += [line.format(*r) for r in rows]
    for o in outcomes:
        for text in o.problems:
            out.append(f"  {o.fault}: {text}")
        if o.notes:
            out.append(f"  {o.fault} notes: {'; '.join(o.notes)}")
    return out


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not OUTCOMES:
        return
    terminalreporter.section("chaos: fault -> outcome")
    for text in table(OUTCOMES):
        terminalreporter.write_line(text)
    for logs in LOGS:
        terminalreporter.write_line(f"logs of every process: {logs}")
