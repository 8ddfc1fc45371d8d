"""FedZO and FZooS over a real Mosquitto: the demo's zeroth-order path, with queries in the ledger."""

from __future__ import annotations

import sqlite3

import pytest

from fedfleet.coordinator.job.config import JobConfig
from fedfleet.coordinator.job.run import run_demo


@pytest.mark.parametrize("method,rounds", [("fedzo", 4), ("fzoos", 2)])
def test_zeroth_order_demo_over_mosquitto(mosquitto, tmp_path, method, rounds):
    cfg = JobConfig(method=method, rounds=rounds, agents=3, alpha=0.5)
    result = run_demo(cfg, broker=mosquitto.url, run_dir=tmp_path, quiet=True)
    phases = 2 if method == "fzoos" else 1
    assert [s.ok for s in result.summaries] == [3 * phases] * rounds
    db = sqlite3.connect(tmp_path / "ledger.sqlite")
    rows = db.execute("SELECT round, phase, agent, status, queries FROM agent_rounds").fetchall()
    assert len(rows) == 3 * phases * rounds and all(r[3] == "ok" for r in rows)
    assert all(isinstance(r[4], int) and r[4] > 0 for r in rows)  # every objective evaluation is counted
    if method == "fedzo":  # H local steps x (1 + 20 directions) queries per task
        assert {r[4] for r in rows} == {10 * 21}
        assert result.summaries[-1].accuracy > result.summaries[0].accuracy
    else:  # phase 1 is the surrogate refresh: 1 + 50 queries
        assert {r[4] for r in rows if r[1] == 1} == {51}
