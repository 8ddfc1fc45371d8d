"""Prometheus exposition of ledger totals, over HTTP on a free port."""

from __future__ import annotations

import re
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from test_report import build_ledger

from fedfleet.coordinator.records.metrics import exposition, serve
from fedfleet.coordinator.records.report import ReportError

LINE = re.compile(r'^[a-z_]+\{[a-z]+="[^"]*"(,[a-z]+="[^"]*")*\} -?[0-9.e+-]+$')


def test_exposition_matches_ledger_totals(tmp_path: Path) -> None:
    totals = build_ledger(tmp_path, agents=6, rounds=4)
    text = exposition(tmp_path)
    samples = [ln for ln in text.splitlines() if not ln.startswith("#")]
    assert samples and all(LINE.match(ln) for ln in samples), text
    values = {ln.rsplit(" ", 1)[0]: float(ln.rsplit(" ", 1)[1]) for ln in samples}
    up = values['fedfleet_bytes_total{direction="up",run="run-a",what="updates"}']
    down = values['fedfleet_bytes_total{direction="down",run="run-a",what="updates"}']
    assert up + down == totals["bytes"]
    # per agent (a small fleet), the same definition: the agents' model-update bytes add up to the run's
    per_agent = [v for k, v in values.items() if k.startswith("fedfleet_agent_bytes_total") and 'what="updates"' in k]
    assert len(per_agent) == 6 and sum(per_agent) == totals["bytes"]
    assert "model updates only" in text and values['fedfleet_refusals_total{run="run-a"}'] == 0
    build_ledger(tmp_path / "eight", agents=8, rounds=4)  # agent-07's round 4 is refused
    assert 'fedfleet_refusals_total{run="run-a"} 1.0' in exposition(tmp_path / "eight")
    joules = sum(v for k, v in values.items() if k.startswith("fedfleet_energy_joules_total"))
    assert joules == pytest.approx(totals["joules"])
    assert values['fedfleet_round{run="run-a"}'] == 4 and values['fedfleet_agents{run="run-a"}'] == 6
    assert values['fedfleet_accuracy{run="run-a"}'] == pytest.approx(0.7)
    assert sum(v for k, v in values.items() if k.startswith("fedfleet_agent_rounds_total")) == 24
    assert values['fedfleet_agent_rounds_total{outcome="late",run="run-a"}'] == 1
    with pytest.raises(ReportError, match="ledger not found"):
        exposition(tmp_path / "nowhere")


def test_http_endpoint(tmp_path: Path) -> None:
    build_ledger(tmp_path, agents=3, rounds=2)
    server = serve(tmp_path, port=0)
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        with urllib.request.urlopen(f"{url}/metrics", timeout=5) as resp:
            assert resp.status == 200 and "version=0.0.4" in resp.headers["Content-Type"]
            assert "fedfleet_bytes_total" in resp.read().decode()
        with pytest.raises(urllib.error.HTTPError) as info:
            urllib.request.urlopen(f"{url}/other", timeout=5)
        assert info.value.code == 404
    finally:
        server.shutdown()
        server.server_close()


def test_large_fleets_get_per_profile_series(tmp_path: Path, monkeypatch) -> None:
    from fedfleet.coordinator.records import metrics

    totals = build_ledger(tmp_path, agents=6, rounds=2)
    monkeypatch.setattr(metrics, "PER_AGENT_MAX", 3)
    text = exposition(tmp_path)
    assert "fedfleet_agent_bytes_total" not in text and "fedfleet_profile_bytes_total" in text
    values = {ln.rsplit(" ", 1)[0]: float(ln.rsplit(" ", 1)[1]) for ln in text.splitlines() if not ln.startswith("#")}
    per_profile = {k: v for k, v in values.items() if k.startswith("fedfleet_profile_bytes_total") and 'what="updates"' in k}
    assert 1 < len(per_profile) <= 6 and sum(per_profile.values()) == totals["bytes"]
    joules = sum(v for k, v in values.items() if k.startswith("fedfleet_profile_energy_joules_total"))
    assert joules == pytest.approx(totals["joules"])


def test_every_served_metric_is_documented(tmp_path: Path) -> None:
    from fedfleet.coordinator.records.metrics import METRICS
    from fedfleet.tools.docs.reference import metrics as reference

    build_ledger(tmp_path, agents=3, rounds=2)
    served = {ln.split()[2] for ln in exposition(tmp_path).splitlines() if ln.startswith("# TYPE")}
    served = {n + "_total" if not n.endswith("_total") and f"{n}_total" in METRICS else n for n in served}
    assert served <= set(METRICS), served - set(METRICS)
    page = reference()
    assert all(f"`{name}`" in page for name in METRICS)
