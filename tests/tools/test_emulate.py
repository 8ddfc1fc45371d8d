"""The fleet emulator: the small example fleet over a real Mosquitto, fleet-file validation, shards,
link and compute shaping, expectations and the progress view."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from rich.console import Console

from fedfleet.coordinator.engine.rounds import RoundSummary
from fedfleet.coordinator.job.progress import Progress
from fedfleet.coordinator.records.accounts import Accounts
from fedfleet.edge_agent.errors import ConfigError
from fedfleet.firmware_profiles.schema import load_profile
from fedfleet.tools.emulate import run as emulate
from fedfleet.tools.emulate.fleet_config import load, parse
from fedfleet.tools.emulate.shaping import MSS, ShapedMeter, Shaper

ROOT = Path(__file__).resolve().parents[2]
SMALL = ROOT / "examples" / "small-fleet.toml"


def test_small_fleet_end_to_end(mosquitto, tmp_path):
    fleet = load(SMALL)
    s = emulate.run(fleet, broker=mosquitto.url, run_dir=tmp_path, quiet=True)
    assert s["rounds"] == fleet.job.rounds
    assert s["final_accuracy"] > 0.6
    assert s["bytes_up"] > 0 and s["joules"] > 0
    for name in ("ledger.sqlite", "summary.json", "calibration.json"):
        assert (tmp_path / name).is_file()
    assert json.loads((tmp_path / "summary.json").read_text())["final_accuracy"] == s["final_accuracy"]
    assert Path(s["report"]).is_file()
    per_agent, stats, groups = s["per_agent"], s["agent_stats"], s["per_group"]
    assert set(stats) == set(fleet.roster())
    for agent in fleet.roster():
        assert per_agent[agent]["bytes_down"] > 0
    for agent in [a for g in fleet.groups if g.name in ("pi4", "bad") for a in g.ids()]:
        assert per_agent[agent]["bytes_up"] > 0 and per_agent[agent]["joules"] > 0
        assert stats[agent]["compute_s"] > 0 and stats[agent]["compute_j"] > 0
    # dropouts: taken, never answered, recorded as late by the coordinator
    zero = groups["zero"]
    assert zero["dropouts"] > 0
    assert zero["outcomes"].get("late", 0) == zero["dropouts"]
    # the NaN group is refused every round and the model survives it
    bad = groups["bad"]
    assert bad["outcomes"].get("rejected:nonfinite", 0) == bad["count"] * fleet.job.rounds
    assert s["outcomes"].get("ok", 0) > 0
    # the flaky group dropped its connection once and came back
    assert groups["flaky"]["offline_events"] == groups["flaky"]["count"]
    # a slower board needs more device time for the same work
    assert s["calibration"]["host_speed"] > 0


def test_emulated_run_resumes_where_it_stopped(mosquitto, tmp_path):
    """An emulated run has a job.json like any other (one assembly path), so it resumes: the second call runs
    only the rounds left, in the same ledger run, and refuses a fresh start in the same directory."""
    import dataclasses

    from fedfleet.coordinator.records.ledger import Ledger

    small = load(SMALL)
    two = {"job": {"rounds": 2, "mode": "full", "seed": 0, "deadline_s": 4.0, "quorum": 1.0, "fleet": "resume-em"},
           "uplink": {"name": "none"}, "group": [{"name": "g", "profile": "rpi4b", "count": 2, "partition": "iid"}]}
    fleet = parse(two, "two.toml")
    assert small.job.method == fleet.job.method
    first = dataclasses.replace(fleet, job=dataclasses.replace(fleet.job, rounds=1))
    s1 = emulate.run(first, broker=mosquitto.url, run_dir=tmp_path, quiet=True)
    run = json.loads((tmp_path / "job.json").read_text())["run"]
    assert s1["rounds"] == 1
    with pytest.raises(ConfigError, match="already holds run"):
        emulate.run(fleet, broker=mosquitto.url, run_dir=tmp_path, quiet=True)
    s2 = emulate.run(fleet, broker=mosquitto.url, run_dir=tmp_path, quiet=True, resume=True)
    assert s2["rounds"] == 1 and s2["final_accuracy"] > 0.3
    ledger = Ledger(tmp_path / "ledger.sqlite")
    try:
        runs = [r["run"] for r in ledger.query("SELECT run FROM runs")]
        rounds = [r["round"] for r in ledger.query(
            "SELECT DISTINCT round FROM agent_rounds WHERE status = 'ok' ORDER BY round")]
    finally:
        ledger.close()
    assert runs == [run] and rounds == [1, 2]


def _fleet(**group_overrides):
    group = {"name": "g", "profile": "rpi4b", "count": 2, **group_overrides}
    return {"job": {"rounds": 1}, "group": [group]}


@pytest.mark.parametrize("data, field", [
    (_fleet(count=0), "group[0].count"),
    (_fleet(profile="no-such-board"), "group[0].profile"),
    (_fleet(partition="dirichlet"), "group[0].alpha"),
    (_fleet(byzantine="sign_flip"), "group[0].byzantine"),
    (_fleet(byzantine="meteor"), "group[0].byzantine"),
    (_fleet(dropout=1.5), "group[0].dropout"),
    (_fleet(offline=[[5, 2]]), "group[0].offline[0]"),
    (_fleet(colour="red"), "group[0].colour"),
    ({"job": {"agents": 3}, "group": [{"name": "g", "profile": "rpi4b", "count": 1}]}, "job.agents"),
    ({"job": {"rounds": 0}, "group": [{"name": "g", "profile": "rpi4b", "count": 1}]}, "rounds"),
    ({"job": {}}, "group"),
])
def test_fleet_file_errors_name_the_field(data, field):
    with pytest.raises(ConfigError) as err:
        parse(data, "fleet.toml")
    assert "fleet.toml" in str(err.value) and f"'{field}'" in str(err.value)


def test_fleet_file_not_found_and_bad_toml(tmp_path):
    with pytest.raises(ConfigError, match="no such fleet file"):
        load(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[job\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load(bad)


def test_examples_parse_and_attacks_reach_the_strategy():
    fleet = load(ROOT / "examples" / "fleet.toml")
    assert {g.profile for g in fleet.groups} >= {"rpi4b", "rpizero2w", "jetson-orin-nano"}
    assert fleet.job.agents == len(fleet.roster()) == len(set(fleet.roster()))
    evil = next(g for g in fleet.groups if g.byzantine == "sign_flip")
    assert fleet.job.method_config["byzantine"] == {a: "sign_flip" for a in evil.ids()}
    assert any(g.dropout > 0 for g in fleet.groups)


def test_shards_partition_the_roster():
    roster = [f"a{i}" for i in range(10)]
    shards = [emulate.Shard.parse(f"{i}/3").take(roster) for i in range(3)]
    assert sorted(sum(shards, [])) == sorted(roster)
    assert all(not set(a) & set(b) for i, a in enumerate(shards) for b in shards[i + 1:])
    assert shards[1] == ["a1", "a4", "a7"]
    for bad in ("3/3", "1", "a/b", "0/0"):
        with pytest.raises(ConfigError, match="--shard"):
            emulate.Shard.parse(bad)


def test_partition_gives_every_agent_data():
    import numpy as np

    fleet = load(SMALL)
    y = np.random.default_rng(0).integers(0, 10, 1400)
    parts = emulate.partition(fleet, y)
    assert set(parts) == set(fleet.roster())
    allidx = np.concatenate(list(parts.values()))
    assert len(allidx) == len(set(allidx.tolist())) <= 1400
    assert min(len(p) for p in parts.values()) > 0


def test_link_shaping_time_and_retransmissions():
    prof = load_profile("rpizero2w")
    lossless = Shaper(prof.__class__(**{**prof.__dict__, "loss": 0.0}), host_speed=4.0)
    t = lossless.transfer(1_000_000, up=True)
    assert t.retransmitted_bytes == 0
    assert t.seconds == pytest.approx(8e6 / (prof.uplink_mbps * 1e6) + prof.rtt_ms / 1e3)
    lossy = Shaper(prof.__class__(**{**prof.__dict__, "loss": 0.1}), host_speed=4.0, seed=1)
    draws = [lossy.transfer(1_000_000, up=True) for _ in range(50)]
    segments = -(-1_000_000 // MSS)
    mean_lost = sum(d.retransmitted_bytes for d in draws) / len(draws) / MSS
    assert mean_lost == pytest.approx(segments * 0.1 / 0.9, rel=0.1)
    assert all(d.seconds > t.seconds for d in draws)
    # compute: host CPU seconds x host speed / device speed
    assert lossless.compute_seconds(0.01) == pytest.approx(0.01 * 4.0 / prof.speed)


def test_shaped_meter_books_device_time_and_retransmitted_bytes():
    prof = load_profile("rpi4b")
    slept: list[float] = []
    now = [0.0]

    def sleep(s: float) -> None:
        slept.append(s)
        now[0] += s

    meter = ShapedMeter(Shaper(prof, host_speed=2.0, seed=0), sleep=sleep, clock=lambda: now[0])
    with meter.measure("compute"):
        sum(i * i for i in range(200_000))  # some real CPU time on this thread
    device = meter.stats["compute_s"]
    assert device > 0 and slept and slept[0] == pytest.approx(device)
    split = meter.take()
    assert split.compute_j == pytest.approx(device * prof.cpu_active_w, rel=1e-6)
    with meter.measure("radio", bytes_up=100_000):
        pass
    radio = meter.take()
    up = meter.stats["bytes_up"] + meter.stats["retransmitted_bytes"]
    assert radio.radio_j == pytest.approx(meter.stats["upload_s"] * prof.idle_w + up / 1e6 * prof.radio_tx_j_per_mb)


def test_expectations():
    s = {"final_accuracy": 0.7, "bytes_up": 2_000_000, "joules": 50.0}
    assert emulate.check_expectations(s, accuracy=0.6, max_mb_up=3, max_joules=60) == []
    missed = emulate.check_expectations(s, accuracy=0.8, max_mb_up=1, max_joules=10)
    assert len(missed) == 3 and "accuracy" in missed[0]


def test_progress_plain_lines_when_not_a_terminal():
    out = io.StringIO()
    console = Console(file=out, force_terminal=False, width=200)
    books = Accounts(traffic={"task": (0, 3500), "result": (1500, 0)}, updates=(1000, 2000),
                     energy={"compute_j": 2.5, "radio_j": 1.0, "idle_j": 9.0}, refusals=2)
    p = Progress(2, online=lambda: (7, 9), books=lambda r=None: books, console=console)
    with p:
        for r in (1, 2):
            p(RoundSummary(r, 0.5 + r / 10, 1.0, 0.2, 9, 7, 1, 1, 1000, 2000, 0.1, note="table age 3.0" if r == 2 else ""))
    lines = out.getvalue().strip().splitlines()
    assert len(lines) == 2
    assert "round   2/2" in lines[1] and "online 7/9" in lines[1] and "energy 12.5 J (compute 2.5 J)" in lines[1]
    # the ledger's numbers, labelled: refusals and model updates of the round, the run's device traffic
    assert "rejected 2" in lines[1] and "updates up 0.001 MB down 0.002 MB" in lines[1]
    assert "device traffic 0.005 MB" in lines[1]
    no_meter = Progress(1, books=lambda r=None: Accounts(), console=console)
    assert "energy not recorded" in no_meter.line(RoundSummary(1, 0.5, 1.0, 0.2, 1, 1, 0, 0, 10, 20, 0.1))
    assert lines[1].endswith("table age 3.0") and "table age" not in lines[0]  # the method's note, when it has one
    assert p.bytes_up == 2000


def test_progress_live_panel_renders():
    out = io.StringIO()
    console = Console(file=out, force_terminal=True, width=120)
    p = Progress(3, online=lambda: (4, 5), books=lambda r=None: Accounts(), console=console)
    with p:
        p(RoundSummary(1, 0.9, 0.3, 0.2, 5, 4, 0, 1, 10, 20, 0.1, note="fedamd p 0.485"))
    text = out.getvalue()
    assert "agents online" in text and "4/5" in text and "fedamd p 0.485" in text


def test_sampled_shards_give_every_agent_of_a_large_fleet_data():
    import numpy as np

    fleet = load(SMALL)
    fleet.job.shard_mode = "sampled"
    y = np.random.default_rng(0).integers(0, 10, 30)  # fewer samples than agents can split
    parts = emulate.partition(fleet, y)
    assert set(parts) == set(fleet.roster())
    assert {len(p) for p in parts.values()} == {10}
    assert all(len(np.unique(p)) == len(p) and p.max() < 30 for p in parts.values())
