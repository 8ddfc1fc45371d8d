"""Tiny runs of the foundation's benchmarks: they run end to end over a real broker and print exactly the
keys their issues name."""

from __future__ import annotations

import json

from fedfleet.tools.bench import fedzip as bench_fedzip
from fedfleet.tools.bench import rounds as bench_rounds


def test_bench_rounds_smoke(tmp_path, capsys):
    out = tmp_path / "rounds.json"
    assert bench_rounds.main(["--agents", "4", "--rounds", "2", "--broker", "mosquitto", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert set(result) == {"agents", "round_s_median", "slowest_agent_s_median", "overhead_s_median"}
    assert result["agents"] == 4 and result["round_s_median"] >= result["slowest_agent_s_median"] > 0
    captured = capsys.readouterr()
    assert json.loads(captured.out) == result
    said = [line for line in captured.err.splitlines() if line.startswith("[bench rounds +")]  # progress on stderr
    assert any("agents connecting" in line for line in said) and any("round 2/2" in line for line in said), said


def test_bench_fedzip_smoke(tmp_path):
    out = tmp_path / "fedzip.json"
    assert bench_fedzip.main(["--quick", "--json", str(out), "--plot", str(tmp_path / "curve.png")]) == 0
    result = json.loads(out.read_text())
    assert set(result) == {"accuracy_dense", "points", "best_ratio_within_1pt"}
    (point,) = result["points"]
    assert set(point) == {"z", "encoding", "error_feedback", "uplink_ratio", "accuracy"}
    assert point["uplink_ratio"] > 20  # z=0.01 FedZip against dense float32, at the MQTT layer
    assert (tmp_path / "curve.png").stat().st_size > 10_000
