"""Run reports: a synthetic ledger renders to PNGs and one HTML page naming every agent; bad run dirs fail clearly."""

from __future__ import annotations

import base64
import re
import sqlite3
from pathlib import Path

import numpy as np
import pytest

from fedfleet.coordinator.records.ledger import Ledger
from fedfleet.coordinator.records.report import (
    ReportError,
    load,
    main,
    outcome,
    profile_table,
    render,
    round_series,
)

PROFILES = ["rpizero2w", "rpi4b", "rpi5", "jetson-nano"]


def build_ledger(run_dir: Path, *, agents: int = 12, rounds: int = 8, seed: int = 0, energy: bool = True,
                 run: str = "run-a") -> dict[str, float]:
    """A ledger shaped like the round engine's, with stragglers, dropouts and a rejected update."""
    rng = np.random.Generator(np.random.PCG64(seed))
    led = Ledger(run_dir / "ledger.sqlite")
    led.start_run(run, {"method": "fedavg", "model": "digits-mlp", "agents": agents})
    totals = {"bytes": 0.0, "joules": 0.0}
    for rnd in range(1, rounds + 1):
        ok = 0
        for i in range(agents):
            prof = PROFILES[i % len(PROFILES)]
            status = "ok"
            if i == 3 and rnd % 3 == 0:
                status = "late"
            elif i == 5 and rnd >= 6:
                status = "dropped"
            elif i == 7 and rnd == 4:
                status = "rejected:hmac"
            up = 0 if status == "dropped" else int(rng.integers(40_000, 60_000))
            down = 52_000
            fields = dict(bytes_up=up, bytes_down=down, learn_s=None if status == "dropped" else float(rng.uniform(0.2, 2)),
                          samples=100, profile=prof, codec="fedzip", detail="bad signature" if status != "ok" else None)
            if energy:
                fields.update(energy_compute_j=float(rng.uniform(1, 5)), energy_radio_j=float(rng.uniform(0.01, 0.1)),
                              energy_idle_j=float(rng.uniform(0.5, 1)))
                totals["joules"] += fields["energy_compute_j"] + fields["energy_radio_j"] + fields["energy_idle_j"]
            totals["bytes"] += up + down
            led.record(run, rnd, f"agent-{i:02d}", status, **fields)
            ok += status == "ok"
        led.record_round(run, rnd, accuracy=0.5 + 0.05 * rnd, loss=1.0 / rnd, wall_s=2.0, selected=agents, ok=ok,
                         rejected=int(rnd == 4), bytes_up=0, bytes_down=0)
    led.close()
    return totals


def test_render_writes_pngs_and_html_naming_every_agent(tmp_path: Path) -> None:
    totals = build_ledger(tmp_path)
    page = render(tmp_path)
    assert page == tmp_path / "report" / "report.html"
    text = page.read_text()
    for name in ("accuracy", "agents", "profiles", "stragglers"):
        png = tmp_path / "report" / f"{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    for i in range(12):
        assert f"agent-{i:02d}" in text
    for prof in PROFILES:
        assert prof in text
    embedded = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', text)
    assert len(embedded) == 4 and all(base64.b64decode(e)[:4] == b"\x89PNG" for e in embedded)
    assert "rejected:hmac" in text and "bad signature" in text
    assert "0.9000" in text  # final accuracy 0.5 + 0.05 * 8
    data = load(tmp_path)
    series = round_series(data)
    assert sum(s["bytes"] for s in series.values()) == pytest.approx(totals["bytes"])
    assert sum(s["joules"] for s in series.values()) == pytest.approx(totals["joules"])
    assert series[6]["dropped"] == 1 and series[3]["late"] == 1 and series[4]["rejected"] == 1


def test_aggregates_match_the_rows(tmp_path: Path) -> None:
    build_ledger(tmp_path, agents=8, rounds=3)
    data = load(tmp_path)
    a = data.agents["agent-01"]
    rows = sqlite3.connect(tmp_path / "ledger.sqlite").execute(
        "SELECT SUM(bytes_up), SUM(energy_compute_j) FROM agent_rounds WHERE agent='agent-01'").fetchone()
    assert a.bytes_up == rows[0] and a.compute_j == pytest.approx(rows[1]) and a.profile == "rpi4b"
    table = {p["profile"]: p for p in profile_table(data)}
    assert table["rpi5"]["agents"] == 2 and table["rpi5"]["agent_rounds"] == 6
    assert [outcome(s) for s in ("ok", "late", "dropped", "rejected:size", "weird")] == [
        "ok", "late", "dropped", "rejected", "rejected"]


def test_ledger_without_energy_and_run_selection(tmp_path: Path) -> None:
    build_ledger(tmp_path, agents=3, rounds=2, energy=False, run="old")
    build_ledger(tmp_path, agents=4, rounds=2, energy=False, run="new", seed=1)
    assert load(tmp_path).run == "new"
    page = render(tmp_path, run="old", out_dir=tmp_path / "old-report")
    text = page.read_text()
    assert "agent-02" in text and "agent-03" not in text and "not recorded" in text
    with pytest.raises(ReportError, match="run 'nope' not in the ledger.*'new'"):
        load(tmp_path, "nope")


def test_many_agents_are_capped_in_the_plot_but_listed(tmp_path: Path) -> None:
    build_ledger(tmp_path, agents=80, rounds=2)
    text = render(tmp_path).read_text()
    assert all(f"agent-{i:02d}" in text for i in range(80))


def test_bad_run_dirs_give_clear_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(ReportError, match="no such run directory"):
        render(tmp_path / "missing")
    with pytest.raises(ReportError, match="ledger not found"):
        render(tmp_path)
    (tmp_path / "ledger.sqlite").write_bytes(b"this is not sqlite at all, not even close" * 10)
    with pytest.raises(ReportError, match="not a readable SQLite ledger"):
        render(tmp_path)
    other = tmp_path / "other"
    other.mkdir()
    sqlite3.connect(other / "ledger.sqlite").execute("CREATE TABLE t (x)").connection.close()
    with pytest.raises(ReportError, match="lacks tables"):
        render(other)
    empty = tmp_path / "empty"
    Ledger(empty / "ledger.sqlite").close()
    with pytest.raises(ReportError, match="no rounds yet"):
        render(empty)
    assert main([str(empty)]) == 2
    assert "fedfleet report: error:" in capsys.readouterr().err


def test_main_prints_the_page(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    build_ledger(tmp_path, agents=4, rounds=2)
    assert main([str(tmp_path), "--out", str(tmp_path / "r")]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "r" / "report.html")
