"""A tiny run of the MTVG benchmark: it trains, samples naive, MTVG and the ablations, and prints exactly the
keys issue 16 names (the rest on the details line)."""

from __future__ import annotations

import json

import pytest

from fedfleet.tools.bench import mtvg as bench_mtvg
from fedfleet.tools.bench.output import details


@pytest.mark.parametrize("trainer", ["fleet", "inprocess"])
def test_bench_mtvg_smoke(tmp_path, capsys, mosquitto, trainer):
    out = tmp_path / "mtvg.json"
    assert bench_mtvg.main(["--quick", "--trainer", trainer, "--broker", mosquitto.url, "--json", str(out),
                            "--plot", str(tmp_path / "seq.png")]) == 0
    result = json.loads(out.read_text())
    assert set(result) == set(bench_mtvg.KEYS)
    captured = capsys.readouterr()
    assert json.loads(captured.out) == result
    assert result["segments"] == 12 and result["fl_rounds"] == 1
    for key in bench_mtvg.KEYS[1:7]:
        assert 0.0 <= result[key] <= 4.0
    more = details(captured.err)
    assert set(more["variants"]) == {"naive", "mtvg", "no_inversion", "no_dynamic_noise", "no_structure_guidance"}
    if trainer == "fleet":  # the fleet's MQTT job trained it: one round, both agents answered
        assert "over MQTT" in more["training"]["trainer"] and more["training"]["ok_per_round"] == [2]
        assert more["training"]["bytes_up"] > 0
    else:
        assert "no broker" in more["training"]["trainer"] and len(more["training"]["history"]) == 2
    assert 0.0 <= more["classifier_held_out"]["both"] <= 1.0
    assert more["onnxruntime_vs_torch_mtvg"]["max_abs"] < 0.05  # the device path gives the same frames
    assert (tmp_path / "seq.png").stat().st_size > 5_000
