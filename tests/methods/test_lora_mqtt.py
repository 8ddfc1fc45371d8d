"""Federated LoRA end to end: FedIT, FLoRA and LoRA-FAIR learn over Mosquitto and in `fedfleet demo` on the
embedded broker; an upload with the wrong rank or shape is refused with a ledger row; an agent handed a
package whose base does not match its manifest says so and keeps running; `bench lora` at a tiny size."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import numpy as np
import pytest

from fedfleet.coordinator.job.config import JobConfig
from fedfleet.coordinator.job.run import build, run_demo, shards
from fedfleet.tools.bench import lora as bench_lora
from fedfleet.tools.bench.output import details
from tests.methods.test_lora import altered_base
from tests.support.fleet import package, start_fleet
from tests.system.test_round_mqtt import Rogue, rows

METHODS = ("fedit", "flora", "lora_fair")


def initial_accuracy(cfg: JobConfig) -> float:
    _, cmodel = build(cfg)
    _, test = shards(cfg)
    return cmodel.evaluate(cmodel.initial_state(), test.x, test.y)[0]


@pytest.mark.parametrize("method", METHODS)
def test_lora_methods_learn_over_mosquitto(mosquitto, tmp_path, method):
    fleet = start_fleet(mosquitto.url, tmp_path, method=method, mode="lora", agents=3, rounds=3)
    try:
        fleet.coord.wait_for_agents(3, 30)
        summaries = fleet.coord.run(3)
    finally:
        fleet.close()
    assert [s.ok for s in summaries] == [3, 3, 3]
    start = initial_accuracy(fleet.cfg)
    assert summaries[-1].accuracy > start + 0.03, (start, [s.accuracy for s in summaries])
    if method != "flora":
        assert "cos(ΔW,B̄" in summaries[-1].note


def test_lora_upload_with_wrong_rank_or_shape_is_refused(mosquitto, tmp_path):
    fleet = start_fleet(mosquitto.url, tmp_path, method="lora_fair", mode="lora", agents=3, roster_extra=("rogue",),
                        deadline_s=6.0, quorum=0.5)
    rogue = Rogue(mosquitto.url, fleet.cfg.fleet, "rogue", fleet.coord.package_digest)
    try:
        fleet.coord.wait_for_agents(4, 30)
        fleet.run_async(3)
        for i in range(3):  # one bad upload per round: a refused agent's round closes without it
            deadline = time.time() + 60
            while len(rogue.tasks) <= i and time.time() < deadline:
                time.sleep(0.05)
            assert len(rogue.tasks) > i, f"the rogue agent got no task in round {i + 1}"
            task, _ = rogue.tasks[i]
            good = {n: np.zeros(s, np.float32) for n, s in task["meta"]["expect"]}  # the layout it was asked for
            bad = [{**good, "fc0.lora_A": np.zeros((3, 64), np.float32), "fc0.lora_B": np.zeros((64, 3), np.float32)},
                   {**good, "fc0.lora_A": np.zeros((64, 4), np.float32), "fc0.lora_B": np.zeros((4, 64), np.float32)},
                   {**good, "fc0.lora_B": np.zeros((64, 5), np.float32)}][i]  # rank 3, swapped, rank 5 B
            rogue.send(rogue.result(task, bad))
        summaries = fleet.join(120)
    finally:
        rogue.link.stop()
        fleet.close()
    status = [(r["agent"], r["status"]) for r in rows(fleet)]
    assert status.count(("rogue", "rejected:shape")) == 3, status
    assert [(x.ok, x.rejected) for x in summaries] == [(3, 1)] * 3  # each round went on


def test_agent_reports_a_lora_base_that_fails_its_digest_and_keeps_running(mosquitto, tmp_path):
    good, _ = package(JobConfig(method="fedit", mode="lora"))
    fleet = start_fleet(mosquitto.url, tmp_path, method="fedit", mode="lora", rounds=1)
    try:
        fleet.coord.wait_for_agents(3, 30)
        fleet.coord.publish_package(altered_base(good))
        with pytest.raises(TimeoutError, match="model_error"):
            fleet.coord.wait_for_agents(3, 3)
        errors = [s.get("error", "") for s in fleet.coord.online.values()]
        assert any("does not match its sha256" in e for e in errors), errors
        assert all(a.link.connected.is_set() for a in fleet.agents.values())
        fleet.coord.publish_package(good)
        fleet.coord.wait_for_agents(3, 30)
        summary = fleet.coord.run_round(1)
    finally:
        fleet.close()
    assert summary.ok == 3


@pytest.mark.parametrize("method", METHODS)
def test_demo_runs_the_lora_methods_on_the_embedded_broker_and_learns(tmp_path, method):
    cfg = JobConfig(method=method, rounds=3, agents=3)
    start = initial_accuracy(cfg)
    if method == "lora_fair":  # the command a user types
        out = tmp_path / "demo.json"
        r = subprocess.run([sys.executable, "-m", "fedfleet.coordinator.cli", "demo", "--method", method, "--rounds", "3",
                            "--agents", "3", "--quiet", "--json", str(out), "--run-dir", str(tmp_path / "run")],
                           capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stderr[-2000:]
        result = json.loads(out.read_text())
        assert result["broker"] == "embedded" and result["rounds"] == 3
        final = result["final_accuracy"]
    else:
        res = run_demo(cfg, run_dir=tmp_path, quiet=True)
        assert [s.ok for s in res.summaries] == [3, 3, 3] and res.broker == "embedded"
        final = res.final_accuracy
    assert final > start + 0.03, (start, final)


def test_bench_lora_smoke(tmp_path, capsys):
    out = tmp_path / "lora.json"
    assert bench_lora.main(["--quick", "--broker", "mosquitto", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert set(result) == set(bench_lora.KEYS)
    assert result["seeds"] == 1 and 0 < result["fedit_accuracy"] <= 1 and result["broker"] == "mosquitto"
    assert result["gain_points"] == pytest.approx(100 * (result["lora_fair_accuracy"] - result["fedit_accuracy"]),
                                                  abs=1e-3)
    assert result["gain_ci95"] is None and 0 < result["cos_round1_fedit"] <= 1 and result["epochs"] == 2
    captured = capsys.readouterr()
    assert json.loads(captured.out) == result
    more = details(captured.err)
    assert more["synthetic_cos_fair"] >= 0.99 > more["synthetic_cos_fedit"]
    assert more["setup"]["rank"] == 16 and len(more["cos_fedit_trace"]) == 2
