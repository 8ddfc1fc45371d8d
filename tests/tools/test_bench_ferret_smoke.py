"""Tiny runs of `fedfleet bench ferret` and `fedfleet bench frontier` over a real broker: they run end to end
and print exactly the keys the issue names."""

from __future__ import annotations

import json

from fedfleet.tools.bench import ferret as bench_ferret
from fedfleet.tools.bench import frontier as bench_frontier
from fedfleet.tools.bench.output import details


def test_bench_ferret_smoke(tmp_path, capsys):
    out = tmp_path / "ferret.json"
    assert bench_ferret.main(["--quick", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert set(result) == set(bench_ferret.KEYS)
    assert result["d"] == 101_770 and result["rounds"] == 2 and result["k"] == 32
    # pairs up and coefficients down against dense float32 both ways, at the MQTT layer
    assert result["uplink_ratio"] > 100 and result["downlink_ratio"] > 50, result
    assert result["ferret_bytes_up"] < result["fedavg_bytes_up"] / 100
    captured = capsys.readouterr()
    assert json.loads(captured.out) == result
    small = details(captured.err)["small_check_digits"]
    assert {"fedavg", "fedzo", "ferret_k16"} <= set(small)
    assert small["ferret_k16"]["bytes_up"] < small["fedavg"]["bytes_up"]


def test_bench_frontier_smoke(tmp_path, capsys):
    out, png = tmp_path / "frontier.json", tmp_path / "frontier.png"
    assert bench_frontier.main(["--quick", "--json", str(out), "--plot", str(png)]) == 0
    points = json.loads(out.read_text())
    assert [p["method"] for p in points] == ["FedAvg dense", "FedAvg + FedZip", "FedZO", "Ferret K=16"]
    assert all(set(p) == {"method", "accuracy", "bytes_total"} for p in points)
    by = {p["method"]: p for p in points}
    assert by["Ferret K=16"]["bytes_total"] * 50 < by["FedAvg dense"]["bytes_total"]
    assert by["FedAvg + FedZip"]["bytes_total"] < by["FedAvg dense"]["bytes_total"]
    assert png.stat().st_size > 10_000
    assert json.loads(capsys.readouterr().out) == points
