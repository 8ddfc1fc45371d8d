"""Continual jobs and FOT over real brokers: the demo on a shipped permuted-digits job (Mosquitto and the
embedded broker), bad task-end sketches refused while the phase completes on the others, the sketches'
bytes in the ledger, chunked task-end uploads, the emulator on the shipped continual fleet, and a tiny
run of `fedfleet bench fot`."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np

from fedfleet.coordinator.job.assemble import build_run
from fedfleet.coordinator.job.config import JobConfig, load
from fedfleet.coordinator.job.run import run_demo
from fedfleet.coordinator.records.ledger import Ledger
from fedfleet.coordinator.tasks.schedule import parse
from fedfleet.edge_agent.agent import Agent, AgentConfig
from fedfleet.edge_agent.learners import LearnResult
from fedfleet.edge_agent.learners.fot import COUNT, SKETCH
from fedfleet.edge_agent.wire import codecs, protocol
from fedfleet.tools.bench import fot as bench_fot
from tests.support.fleet import COORDINATOR_KEY, SIGNING_KEY

SECRET = b"fot-test-secret-0123456789abcdefgh"
ROOT = Path(__file__).resolve().parents[2]


def _small(path: str = "examples/permuted-digits-small.toml") -> JobConfig:
    return load(ROOT / path)


def _matrix(run_dir: Path) -> tuple[list[str], list[list[float | None]], list[dict]]:
    ledger = Ledger(run_dir / "ledger.sqlite")
    try:
        run = ledger.query("SELECT run FROM runs")[0]["run"]
        names, matrix = ledger.accuracy_matrix(run)
        basis = [dict(r) for r in ledger.query("SELECT * FROM layer_basis WHERE run = ? ORDER BY task, layer", (run,))]
    finally:
        ledger.close()
    return names, matrix, basis


def test_demo_fot_on_the_shipped_permuted_digits_job_over_mosquitto(tmp_path):
    cfg = _small()
    result = run_demo(cfg, broker="mosquitto", run_dir=tmp_path, quiet=True)
    assert result.rounds == 18 and all(s.ok == 6 and s.rejected == 0 for s in result.summaries)
    names, a, basis = _matrix(tmp_path)
    assert names == ["identity", "perm-1", "perm-2"]
    assert all(a[t][t] > 0.6 for t in range(3)), a  # it learns every task
    assert result.summaries[0].accuracy < a[0][0] - 0.2  # from near chance
    fills = {(b["task"], b["layer"]): b["k"] for b in basis}
    assert 0 < fills[(0, "fc0.weight")] < fills[(1, "fc0.weight")] < fills[(2, "fc0.weight")] <= 64
    assert "basis fc0" in result.summaries[-1].note and "task 3/3" in result.summaries[-1].note
    page = (tmp_path / "report" / "report.html").read_text()
    assert "Continual tasks" in page and "FGT" in page
    assert (tmp_path / "report" / "continual.png").stat().st_size > 10_000


def test_demo_fot_from_the_command_line_on_the_embedded_broker(tmp_path):
    out = tmp_path / "demo.json"
    r = subprocess.run([sys.executable, "-m", "fedfleet.coordinator.cli", "demo", "--method", "fot", "--config",
                        str(ROOT / "examples/permuted-digits-small.toml"), "--run-dir", str(tmp_path / "run"),
                        "--json", str(out)], capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    result = json.loads(out.read_text())
    assert result["broker"] == "embedded" and result["rounds"] == 18 and result["final_accuracy"] > 0.6
    _, a, basis = _matrix(tmp_path / "run")
    assert len(a) == 3 and a[0][0] > 0.6 and len(basis) == 9


class HostileAgent(Agent):
    """Uploads a broken sketch in a task-end round: `shape` (announces and sends a narrower sketch),
    `nonfinite` (a NaN in it) or `negative_n` (N_i = -5)."""

    def __init__(self, *args, mode: str, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.mode = mode

    def _upload(self, header, task, result, learn_s):
        if (task.config.get("fot") or {}).get("sketch"):
            t = {k: np.array(v, np.float32) for k, v in result.tensors.items()}
            name = SKETCH + "fc0.weight"
            if self.mode == "shape":
                t[name] = t[name][:, :-1]
                meta = header["meta"]
                expect = [[n, list(t[n].shape)] for n, _ in codecs.normalize_layout(meta["expect"])]
                header = {**header, "meta": {**meta, "expect": expect}}
            elif self.mode == "nonfinite":
                t[name][0, 0] = np.nan
            elif self.mode == "negative_n":
                t[COUNT] = np.array([-5.0], np.float32)
            result = LearnResult(t, result.samples, result.metrics)
        super()._upload(header, task, result, learn_s)


def test_bad_sketches_are_refused_and_the_task_end_completes_on_the_others(mosquitto, tmp_path):
    cfg = JobConfig(method="fot", agents=6, mode="full", alpha=0.0, deadline_s=20.0, quorum=0.5, fleet="fot-bad",
                    method_config={"lr": 0.05, "epochs": 1, "batch": 16}, uplink={"name": "none"},
                    continual=parse({"rounds_per_task": 2, "schedule": ["identity", "perm-1"],
                                     "tasks": {"identity": {}, "perm-1": {"transform": "permute", "seed": 1}}},
                                    "test").to_dict())
    cfg.grace_s = 0.0
    run = build_run(cfg, broker_url=mosquitto.url, secret=SECRET, signing_key=SIGNING_KEY, run_dir=tmp_path,
                    run_id="bad-run")
    coord, ids, local = run.coordinator, run.roster, run.shards()
    modes = {ids[3]: "shape", ids[4]: "nonfinite", ids[5]: "negative_n"}
    agents = []
    try:
        coord.start()
        for i, agent_id in enumerate(ids):
            conf = AgentConfig(mosquitto.url, cfg.fleet, agent_id, protocol.derive_key(SECRET, agent_id), coordinator_key=COORDINATOR_KEY)
            a = HostileAgent(conf, local[i], mode=modes[agent_id]) if agent_id in modes else Agent(conf, local[i])
            a.start()
            agents.append(a)
        coord.wait_for_agents(len(ids), 60)
        summaries = coord.run(cfg.rounds)
    finally:
        for a in agents:
            a.stop()
        coord.stop()
    assert [s.ok for s in summaries] == [6, 3, 6, 3] and [s.rejected for s in summaries] == [0, 3, 0, 3]
    ledger = Ledger(tmp_path / "ledger.sqlite")
    try:
        rows = {(r["round"], r["agent"]): dict(r) for r in ledger.query("SELECT * FROM agent_rounds")}
        basis = ledger.query("SELECT task, layer, k, d FROM layer_basis ORDER BY task, layer")
    finally:
        ledger.close()
    for r in (2, 4):
        assert {rows[(r, a)]["status"] for a in ids[:3]} == {"ok"}
        assert [rows[(r, a)]["status"] for a in ids[3:]] == ["rejected:shape", "rejected:nonfinite", "rejected:sketch_n"]
    # the subspace came from the three good sketches, and FOT kept going on the next task
    assert [(b["task"], b["layer"]) for b in basis] == [(0, "fc0.weight"), (0, "fc1.weight"),
                                                        (1, "fc0.weight"), (1, "fc1.weight")]
    assert all(b["k"] > 0 for b in basis) and basis[2]["k"] > basis[0]["k"]
    # task-end uploads carry the sketches (64 x 64 and 32 x 32 float32) and their bytes are in the ledger
    sketch_bytes = 4 * (64 * 64 + 32 * 32)
    for a in ids[:3]:
        assert rows[(2, a)]["bytes_up"] > rows[(1, a)]["bytes_up"] + sketch_bytes
    assert all(rows[(2, a)]["bytes_up"] > 0 for a in ids[3:])  # a refused upload's bytes are booked too


def test_task_end_uploads_over_a_mebibyte_travel_in_chunks(mosquitto, tmp_path):
    """MNIST's 784-dim first layer: each task-end upload holds a 784 x 784 sketch (2.5 MB), several chunks."""
    cfg = JobConfig(method="fot", agents=2, mode="full", dataset="mnist", hidden=16, alpha=0.0, deadline_s=60.0,
                    fleet="fot-mnist", method_config={"lr": 0.05, "epochs": 1, "batch": 32}, uplink={"name": "none"},
                    continual=parse({"rounds_per_task": 1, "tasks": {"identity": {}}}, "test").to_dict())
    result = run_demo(cfg, broker=mosquitto.url, run_dir=tmp_path, quiet=True)
    assert result.summaries[0].ok == 2
    ledger = Ledger(tmp_path / "ledger.sqlite")
    try:
        ups = [r["bytes_up"] for r in ledger.query("SELECT bytes_up FROM agent_rounds WHERE status = 'ok'")]
        (basis,) = [dict(r) for r in ledger.query("SELECT k, d FROM layer_basis WHERE layer = 'fc0.weight'")]
    finally:
        ledger.close()
    assert all(u > 4 * 784 * 784 > 2 * protocol.MAX_MESSAGE_BYTES for u in ups), ups
    assert basis["d"] == 784 and 0 < basis["k"] < 784


def test_emulate_runs_the_shipped_continual_fleet(tmp_path):
    from fedfleet.tools.emulate import run as emulate

    out = tmp_path / "summary.json"
    code = emulate.main([str(ROOT / "examples/continual-fleet.toml"), "--broker", "mosquitto", "--run-dir",
                         str(tmp_path / "run"), "--json", str(out), "--quiet", "--expect-accuracy", "0.4"])
    assert code == 0
    summary = json.loads(out.read_text())
    assert summary["rounds"] == 15 and summary["outcomes"].get("ok") == 15 * 6
    names, a, basis = _matrix(tmp_path / "run")
    assert names == ["identity", "perm-1", "perm-2"] and all(v is not None for v in a[2])
    assert len(basis) == 9


def test_bench_fot_smoke(tmp_path, capsys):
    out = tmp_path / "fot.json"
    assert bench_fot.main(["--quick", "--json", str(out), "--plot", str(tmp_path / "fot.png")]) == 0
    result = json.loads(out.read_text())
    assert set(result) == {"dataset", "seeds", "broker", "tasks", "rounds_per_task", "fedavg_acc", "fedavg_fgt",
                           "fot_acc", "fot_fgt", "basis_fill"}
    assert result["tasks"] == 2 and result["rounds_per_task"] == 3 and result["seeds"] == 1
    assert result["dataset"].startswith("permuted mnist (784 px)") and result["broker"] == "mosquitto"
    assert set(result["basis_fill"]) == {"fc0.weight", "fc1.weight", "fc2.weight"}
    assert all(len(v) == 2 and 0 < v[0] < v[1] <= 1 for v in result["basis_fill"].values())
    assert 0 < result["fot_acc"] <= 100 and 0 < result["fedavg_acc"] <= 100
    assert json.loads(capsys.readouterr().out) == result
    assert (tmp_path / "fot.png").stat().st_size > 10_000
