"""`fedfleet demo`, the main job, as a user runs it: defaults on the embedded broker, and LiteRT agents."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from fedfleet.coordinator.job.config import JobConfig
from fedfleet.coordinator.job.run import run_demo

DEMO_KEYS = {"final_accuracy", "rounds", "agents", "wall_s", "bytes_up", "bytes_down", "broker", "bytes_counts", "books"}


def test_default_demo_reaches_the_accuracy_target(tmp_path):
    out = tmp_path / "demo.json"
    r = subprocess.run([sys.executable, "-m", "fedfleet.coordinator.cli", "demo", "--json", str(out), "--run-dir",
                        str(tmp_path / "run")], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    result = json.loads(out.read_text())
    assert set(result) == DEMO_KEYS
    assert result["rounds"] == 20 and result["agents"] == 10 and result["broker"] == "embedded"
    assert result["final_accuracy"] >= 0.90, result
    # FedZip is the default uplink: every agent uploaded every round, far below a float32 head delta each time
    assert 20 * 10 * 200 < result["bytes_up"] < 20 * 10 * 2410 * 4
    # one definition, labelled: bytes_up / bytes_down are the model updates, a part of all device traffic
    books = result["books"]
    assert result["bytes_up"] == books["model_updates"]["up"] and result["bytes_counts"] == books["model_updates"]["counts"]
    assert books["all_device_traffic"]["total"] > books["model_updates"]["total"]
    assert books["energy_j"]["compute_j"] > 0
    # no agent's connection is dropped at start-up, so no stale status is refused
    assert books["refusals"]["rows"] == 0, books
    assert "round  20/20" in r.stdout and "device traffic" in r.stdout
    run = tmp_path / "run"
    assert (run / "ledger.sqlite").exists() and (run / "checkpoints" / "latest.pt").exists()
    # the report renders in its own process after the summary: it is there moments later
    assert "rendering in the background" in r.stdout
    deadline = time.time() + 120
    while not (run / "report" / "report.html").exists() and time.time() < deadline:
        time.sleep(0.2)
    assert (run / "report" / "report.html").exists(), (run / "report.log").read_text()
    assert (run / "report" / "accuracy.png").stat().st_size > 10_000


def test_demo_with_litert_agents(tmp_path):
    result = run_demo(JobConfig(rounds=3, agents=4, runtime="litert"), run_dir=tmp_path, quiet=True, metrics_port=0)
    assert result.rounds == 3 and result.summaries[-1].ok == 4
    assert result.final_accuracy > 0.5


@pytest.mark.parametrize(("method", "method_config"), [
    ("fedamd", {}),  # round 1 is the initialisation pass: every agent an anchor, the model does not move
    ("monna", {}),
    ("robust_fedavg", {"aggregator": "trimmed_mean", "f": 1}),
])
def test_demo_runs_the_robust_and_anchor_sampling_methods(tmp_path, method, method_config):
    result = run_demo(JobConfig(method=method, rounds=5, agents=4, method_config=method_config), run_dir=tmp_path,
                      quiet=True, metrics_port=0)
    assert [s.ok for s in result.summaries] == [4] * 5
    assert result.final_accuracy > result.summaries[0].accuracy + 0.2, [s.accuracy for s in result.summaries]


def test_monna_rounds_record_the_mean_and_the_worst_honest_node(tmp_path):
    """MoNNA has no global model: the engine scores every honest node's own model, and the ledger holds
    their mean (accuracy) and minimum (accuracy_min), recomputed here from the last checkpoint."""
    import sqlite3

    import torch

    from fedfleet.coordinator.job.run import build, shards
    from fedfleet.coordinator.strategies import _robust as robust

    cfg = JobConfig(method="monna", rounds=3, agents=4)
    result = run_demo(cfg, run_dir=tmp_path, quiet=True, metrics_port=0)
    rows = sqlite3.connect(str(tmp_path / "ledger.sqlite")).execute(
        "SELECT round, accuracy, accuracy_min, nodes FROM rounds ORDER BY round").fetchall()
    assert [r[3] for r in rows] == [4, 4, 4] and all(r[2] <= r[1] for r in rows)
    last = result.summaries[-1]
    assert (last.accuracy, last.accuracy_min, last.nodes) == (rows[-1][1], rows[-1][2], 4)
    ckpt = torch.load(tmp_path / "checkpoints" / "latest.pt", weights_only=False)
    _, cmodel = build(cfg)
    _, test = shards(cfg)
    layout = [(k, tuple(v.shape)) for k, v in cmodel.initial_state().items()]
    accs = [cmodel.evaluate(robust.unflatten(v, layout), test.x, test.y)[0] for v in ckpt["extra"]["models"].values()]
    assert len(accs) == 4
    assert abs(sum(accs) / 4 - last.accuracy) < 1e-9 and abs(min(accs) - last.accuracy_min) < 1e-9
