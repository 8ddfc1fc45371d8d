"""A tiny run of `fedfleet bench scale`: two fleet sizes, two rounds, Mosquitto only."""

from __future__ import annotations

import json
import subprocess
import sys

from fedfleet.tools.bench.output import details
from fedfleet.tools.bench.scale import KEYS, shard_mode_for


def test_bench_scale_smoke(tmp_path):
    out = tmp_path / "scale.json"
    r = subprocess.run([sys.executable, "-m", "fedfleet.coordinator.cli", "bench", "scale", "--agents", "2,3", "--rounds", "3",
                        "--brokers", "mosquitto", "--json", str(out),
                        "--bytecode-cache", str(tmp_path / "pyc")], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.loads(out.read_text())
    assert tuple(result) == KEYS
    assert result["agents"] == [2, 3]
    assert set(result["round_s"]) == {"mosquitto"} and set(result["round_s"]["mosquitto"]) == {"2", "3"}
    assert 0 < result["startup_s"]["mosquitto"] < 120 and 0 < result["tail_s"]["mosquitto"] < 60
    assert all(v > 50 for v in result["pss_mib"].values())  # a torch process: tens of MiB at the very least
    assert result["bytes_up_per_agent_round"] > 0 and result["bytes_down_per_agent_round"] > 0
    assert 0.0 <= result["final_accuracy"] <= 1.0
    assert result["shards"] == "partition"  # 3 agents: digits partitions them
    more = details(r.stderr)
    assert set(more["uss_mib"]) == {"2", "3"} and all(v > 50 for v in more["uss_mib"].values())
    assert all(more["rss_hwm_mib"][n] >= more["uss_mib"][n] for n in ("2", "3"))
    assert more["bytecode_cached"] is True and any((tmp_path / "pyc").rglob("coordinator/job/run*.pyc"))


def test_fleets_too_large_to_partition_run_on_sampled_shards():
    assert shard_mode_for([10, 100]) == "partition"
    assert shard_mode_for([10, 100, 1000]) == "sampled"  # digits partitions at most 143 agents at alpha 0.5
    assert shard_mode_for([10, 100, 1000], "partition") == "partition"  # asked for: the run says it cannot
    assert shard_mode_for([10], "sampled") == "sampled"
