"""A tiny run of `fedfleet bench async`: both modes end to end over a real Mosquitto with emulated devices; it
prints exactly the keys issue 27 names."""

from __future__ import annotations

import importlib
import json

from fedfleet.tools.bench.output import details

bench_async = importlib.import_module("fedfleet.tools.bench.async")  # `async` is a keyword: no import statement


def test_bench_async_smoke(tmp_path, capsys):
    out = tmp_path / "async.json"
    assert bench_async.main(["--agents", "6", "--rounds", "2", "--deadline-s", "4", "--run-dir", str(tmp_path / "runs"),
                             "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert tuple(result) == bench_async.KEYS
    captured = capsys.readouterr()
    assert json.loads(captured.out) == result
    info = details(captured.err)
    assert len(info["sync"]["accuracy"]) == 2 and len(info["async"]["accuracy"]) == info["async_versions"] == 4
    assert round(result["final_accuracy_sync"], 4) == info["sync"]["accuracy"][-1]
    assert result["target_accuracy"] == round(result["final_accuracy_sync"] - 0.01, 4)
    assert result["sync_wall_s"] is not None and result["sync_wall_s"] <= sum(info["sync"]["walls"]) + 1e-9
    assert result["results_lost_async"] == 0  # every finished result has a row of its own
    assert info["async"]["finished"] >= 4 * info["aggregation"]["buffer"]
    assert result["sync_bytes"] > 0 and result["async_bytes"] > 0
    assert (tmp_path / "runs" / "async" / "report" / "async.png").is_file()
