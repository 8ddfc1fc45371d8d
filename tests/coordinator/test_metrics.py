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
    up = values['fedfleet_bytes_total{run="run-a",direction="up"}']
    down = values['fedfleet_bytes_total{run="run-a",direction="down"}']
    assert up + down == totals["bytes"]
    joules = sum(v for k, v in values.items() if k.startswith("fedfleet_energy_joules_total"))
    assert joules == pytest.approx(totals["joules"])
    assert values['fedfleet_round{run="run-a"}'] == 4 and values['fedfleet_agents{run="run-a"}'] == 6
    assert values['fedfleet_accuracy{run="run-a"}'] == pytest.approx(0.7)
    assert sum(v for k, v in values.items() if k.startswith("fedfleet_agent_rounds_total")) == 24
    assert values['fedfleet_agent_rounds_total{run="run-a",outcome="late"}'] == 1
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
