"""`fedfleet bench energy`: the model meter's watts against the profiles' independent published measurements."""

from __future__ import annotations

import json

from fedfleet.edge_agent.profiles import load_profile
from fedfleet.tools.bench import energy


def test_bench_energy_smoke(tmp_path, capsys):
    path = tmp_path / "energy.json"
    assert energy.main(["--seconds", "5", "--json", str(path)]) == 0
    out = json.loads(path.read_text())
    assert set(out) == {"profiles", "max_error"}
    assert out["profiles"], "at least one shipped profile carries a published measurement"
    errors = []
    for name, p in out["profiles"].items():
        assert {"idle_w_model", "idle_w_published", "load_w_model", "load_w_published", "source"} <= set(p)
        prof = load_profile(name)
        # the meter books the profile's figures (whole board, watts) in idle and in a compute phase
        assert abs(p["idle_w_model"] - prof.idle_w) < 1e-9 and abs(p["load_w_model"] - prof.cpu_active_w) < 1e-9
        assert p["source"] and "power.idle_w" not in p["source"]
        # the published figure comes from another source than the model's own figures
        assert p["source"] != p["model_source"]
        errors += [abs(p["idle_w_model"] - p["idle_w_published"]) / p["idle_w_published"],
                   abs(p["load_w_model"] - p["load_w_published"]) / p["load_w_published"]]
    assert abs(out["max_error"] - max(errors)) < 1e-3
    assert "left_out" in capsys.readouterr().err
