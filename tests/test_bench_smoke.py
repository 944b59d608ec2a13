"""The benchmark runs end to end: ``python -m load_tests.bench --quick --only qr_warm_strict,phone``
(one sample each, to keep it short).

A smoke test, not a speed check: it asserts that both figures come out with numbers for walink
and for the baseline, and a ratio — no thresholds (speed belongs to ``make bench`` on a quiet
machine). It starts real processes (simulator, a worker, the seed's Chromium) and takes about a
minute; deselect it with ``-k "not bench_smoke"`` when iterating on something else. Its working
directory is under ``tmp_path``, so the suite's leak check also covers the benchmark's browsers.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.chromium, pytest.mark.timeout(300)]

ROOT = Path(__file__).resolve().parents[1]


def test_bench_quick_gives_walink_baseline_and_ratio(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith("WALINK_")}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "load_tests.bench",
            "--quick",
            "--only",
            "qr_warm_strict,phone",  # one profile: one worker, no realistic page loads
            "--samples",
            "1",
            "--json",
            str(out),
            "--workdir",
            str(tmp_path / "bench"),
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=280,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-5000:] + proc.stdout[-3000:]
    doc = json.loads(out.read_text())
    assert doc["errors"] == {} and doc["skipped"] == {}
    for name in ("qr_warm_strict", "phone"):
        figure = doc["figures"][name]
        assert figure["walink_s"]["n"] >= 1 and figure["walink_s"]["p50"] > 0, figure
        assert figure["baseline_s"]["n"] >= 1 and figure["baseline_s"]["p50"] > 0, figure
        assert figure["ratio_p50"] is not None and figure["ratio_p50"] > 0, figure
        assert any(row["figure"] == name and row["ratio"] not in ("", "—") for row in doc["table"])
    # the human-readable table and the JSON blob are both on stdout; progress went to stderr
    assert "qr_warm" in proc.stdout and '"figures"' in proc.stdout
    assert "== qr_warm" in proc.stderr and "== phone" in proc.stderr
    # nothing of the run is left: working directory removed (its Chromium is checked by conftest)
    assert not any((tmp_path / "bench").iterdir())
