"""Tiny runs of `fedfleet bench ferret` and `fedfleet bench frontier` over a real broker: they run end to end
and print exactly the keys the issue names."""

from __future__ import annotations

import json

from fedfleet.tools.bench import ferret as bench_ferret
from fedfleet.tools.bench import frontier as bench_frontier
from fedfleet.tools.bench.output import details


def test_bench_ferret_smoke(tmp_path, capsys):
    out = tmp_path / "ferret.json"
    assert bench_ferret.main(["--quick", "--broker", "mosquitto", "--json", str(out),
                              "--plot", str(tmp_path / "ferret.png")]) == 0
    result = json.loads(out.read_text())
    assert set(result) == set(bench_ferret.KEYS)
    assert result["k"] == 64 and result["rounds"] == 2 and result["seeds"] == 1 and result["broker"] == "mosquitto"
    # pairs up against dense float32 at the MQTT layer
    assert result["uplink_ratio"] > 5, result
    assert 0 < result["ferret_acc_r40"] <= 1 and 0 < result["fedavg_acc_r40"] <= 1
    captured = capsys.readouterr()
    assert json.loads(captured.out) == result
    info = details(captured.err)
    assert {"fedavg", "fedzo", "ferret_k16", "ferret_k64", "ferret_k64_server_lr2"} <= set(info["digits"])
    assert info["digits"]["ferret_k16"]["bytes_up_total"] < info["digits"]["fedavg"]["bytes_up_total"]
    assert info["mnist"]["d"] == 101_770 and {"fedavg", "ferret_k64"} <= set(info["mnist"])
    assert info["mnist"]["ferret_k64"]["bytes_up_total"] * 100 < info["mnist"]["fedavg"]["bytes_up_total"]
    assert (tmp_path / "ferret.png").stat().st_size > 10_000


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
