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
    assert set(out) == {"agents", "connected", "connect_s", "per_round", "round_s", "rss_mb_total", "bytes_up"}
    out.update(details(captured.err))
    assert out["agents"] == 20 and out["connected"] == 20 and out["ok"] == 20 and out["per_round"] == 20
    assert 0 < out["connect_s"] < 120
    assert out["shards"].startswith("disjoint")
    assert out["round_s"] > 0 and out["bytes_up"] > 20 * 400  # one FedZip-coded result envelope per agent, at least
    roles = out["rss_mb_by_role"]
    assert roles["broker"] > 0 and roles["coordinator"] > 0 and roles["agent_workers"] > 0
    assert out["rss_mb_total"] >= sum(roles.values()) - 1e-6


def test_more_agents_than_the_split_holds_draw_their_samples():
    """Past 89 agents the digits split has fewer than 16 samples per agent: each agent draws 16 (no empty shard)."""
    from fedfleet.coordinator.job.run import shards

    cfg = bench_fleet.fleet_config(2000, "f", 60.0)
    assert cfg.shard_mode == "sampled" and cfg.shard_size == bench_fleet.SHARD
    local, _ = shards(cfg)
    assert len(local) == 2000 and all(len(d) == bench_fleet.SHARD for d in local)
    assert "drawn at random" in bench_fleet.shards_said(cfg)
    assert len({d.x.tobytes() for d in local}) > 1900  # the agents' draws differ
    assert bench_fleet.fleet_config(20, "f", 60.0).shard_mode == "partition"


def test_process_tree_and_status():
    import os

    assert os.getpid() in bench_fleet.process_tree(os.getpid())
    assert bench_fleet.status_kb(os.getpid(), "VmRSS") > 0
