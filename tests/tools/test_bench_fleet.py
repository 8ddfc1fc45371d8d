"""A tiny run of `fedfleet bench fleet`: every agent connects, the round completes, the numbers are there."""

from __future__ import annotations

import json

from fedfleet.tools.bench import fleet as bench_fleet
from fedfleet.tools.bench.output import details


def test_bench_fleet_smoke(tmp_path, capsys):
    path = tmp_path / "fleet.json"
    assert bench_fleet.main(["--agents", "20", "--processes", "2", "--idle-window", "0.5", "--json", str(path)]) == 0
    out = json.loads(path.read_text())
    captured = capsys.readouterr()
    assert out == json.loads(captured.out)
    assert set(out) == {"agents", "connected", "round_s", "rss_mb_total", "bytes_up"}
    out.update(details(captured.err))
    assert out["agents"] == 20 and out["connected"] == 20 and out["ok"] == 20
    assert out["round_s"] > 0 and out["bytes_up"] > 20 * 400  # one FedZip-coded result envelope per agent, at least
    roles = out["rss_mb_by_role"]
    assert roles["broker"] > 0 and roles["coordinator"] > 0 and roles["agent_workers"] > 0
    assert out["rss_mb_total"] >= sum(roles.values()) - 1e-6


def test_process_tree_and_status():
    import os

    assert os.getpid() in bench_fleet.process_tree(os.getpid())
    assert bench_fleet.status_kb(os.getpid(), "VmRSS") > 0
