"""Resume: a `fedfleet serve` SIGKILLed mid-round over Mosquitto with real agent processes continues the same
run in the same ledger and ends where an uninterrupted run ends; every stateful strategy survives a
checkpoint round trip (`torch.load(weights_only=True)`); a run directory refuses a different job."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import zlib

import numpy as np
import pytest
import torch

from fedfleet.coordinator.records.store import RunStore, open_job
from fedfleet.coordinator.strategies import ClientResult
from fedfleet.coordinator.strategies import create as create_strategy
from fedfleet.edge_agent.errors import ConfigError
from fedfleet.edge_agent.wire import signing
from fedfleet.tools.bench import resume as bench_resume
from fedfleet.tools.bench.output import details
from tests.support.checkpoints import commit_checkpoint, damage_checkpoint

AGENTS = ["a-0", "a-1", "a-2", "a-3"]
STATEFUL = {
    "fedavg": {"lr": 0.1},
    "fedamd": {"participants": 3, "local_steps": 2},
    "monna": {"f": 0, "lr": 0.5},
    "fzoos": {"rff_features": 8},
    "robust_fedavg": {"aggregator": "trimmed_mean", "f": 1},
}


def _initial() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"w": torch.randn(3, 4, generator=g), "b": torch.randn(3, generator=g)}


def _drive(strategy, rounds: range) -> list[dict]:
    """Rounds of configure/aggregate with results drawn per (round, phase, agent): the same in any process."""
    sent = []
    for r in rounds:
        for phase in range(strategy.phases):
            tasks = strategy.configure(r, phase, list(AGENTS))
            sent.append({a: {n: t.copy() for n, t in spec.tensors.items()} for a, spec in sorted(tasks.items())})
            results = []
            for a, spec in sorted(tasks.items()):
                rng = np.random.default_rng([r, phase, zlib.crc32(a.encode())])
                tensors = {n: (0.1 * rng.standard_normal(s)).astype(np.float32) for n, s in spec.expect}
                results.append(ClientResult(a, tensors, 10 + len(a), {"grad_evals": 1.0}))
            strategy.aggregate(r, phase, results)
    return sent


def _equal(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, np.ndarray):
        return np.array_equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b))
    return a == b


@pytest.mark.parametrize("method", sorted(STATEFUL))
def test_strategy_state_survives_a_checkpoint_round_trip(tmp_path, method):
    config = {**STATEFUL[method], "seed": 3}
    _round_trip(tmp_path, method, lambda: create_strategy(method, _initial(), **config))


def _lora_initial() -> dict[str, torch.Tensor]:
    """A rank-2 adapter on a 5 -> 6 layer and a 6 -> 3 head, as a 'lora' package's trainable state."""
    g = torch.Generator().manual_seed(0)
    return {"fc0.lora_A": 0.1 * torch.randn(2, 5, generator=g), "fc0.lora_B": torch.zeros(6, 2),
            "fc1.weight": torch.randn(3, 6, generator=g), "fc1.bias": torch.zeros(3)}


@pytest.mark.parametrize("method", ["fedit", "flora", "lora_fair"])
def test_lora_strategies_survive_a_checkpoint_round_trip(tmp_path, method):
    """The LoRA methods resume: the factors, the head (and FLoRA's merged residual) are the state; the
    per-round history loads back."""
    whole, resumed = _round_trip(tmp_path, method, lambda: create_strategy(method, _lora_initial(), seed=3))
    assert len(resumed.history) == len(whole.history) == 5


@pytest.mark.parametrize("history", ["x", [{"round": "1", "layers": {}}], [{"round": 1}], [3]])
def test_a_tampered_lora_history_is_refused(history):
    s = create_strategy("fedit", _lora_initial(), seed=3)
    with pytest.raises(ValueError, match="history") as err:
        s.load_extra_state({"history": history})
    assert "\n" not in str(err.value)


def _continual_fedavg():
    from fedfleet.coordinator.tasks.continual import ContinualStrategy
    from fedfleet.coordinator.tasks.schedule import parse

    schedule = parse({"head": "shared", "rounds_per_task": 2, "schedule": ["a", "b", "c"],
                      "tasks": {"a": {"transform": "identity"}, "b": {"transform": "permute", "seed": 1},
                                "c": {"transform": "permute", "seed": 2}}}, "job")
    return ContinualStrategy(create_strategy("fedavg", _initial(), lr=0.1, seed=3), schedule)


def _continual_fot():
    """FOT through a three-task schedule on a two-layer model: its protected bases grow at each task's end."""
    from fedfleet.coordinator.tasks.continual import ContinualStrategy
    from fedfleet.coordinator.tasks.schedule import parse

    g = torch.Generator().manual_seed(0)
    state = {"fc0.weight": torch.randn(6, 5, generator=g), "fc0.bias": torch.zeros(6),
             "fc1.weight": torch.randn(3, 6, generator=g), "fc1.bias": torch.zeros(3)}
    schedule = parse({"head": "shared", "rounds_per_task": 2, "schedule": ["a", "b", "c"],
                      "tasks": {"a": {"transform": "identity"}, "b": {"transform": "permute", "seed": 1},
                                "c": {"transform": "permute", "seed": 2}}}, "job")
    return ContinualStrategy(create_strategy("fot", state, lr=0.1, seed=3), schedule)


def _averaged_fedavg():
    from fedfleet.coordinator.tasks.ema import EMAStrategy

    return EMAStrategy(create_strategy("fedavg", _initial(), lr=0.1, seed=3), 0.8)


@pytest.mark.parametrize("make", [_continual_fedavg, _continual_fot, _averaged_fedavg],
                         ids=["continual", "continual-fot", "moving-average"])
def test_a_task_wrapped_strategy_survives_a_checkpoint_round_trip(tmp_path, make):
    """A continual schedule resumes at the task it was in (FOT with the bases it had grown), and a moving average
    of the global model resumes from its checkpointed value."""
    whole, resumed = _round_trip(tmp_path, "fot" if make is _continual_fot else "fedavg", make)
    if make is _continual_fot:  # the checkpoint came after task a's end: its bases were grown and restored
        assert resumed.inner.basis_sizes() == whole.inner.basis_sizes()
        assert len(whole.inner.history) == 2 and sum(k for k, _ in whole.inner.basis_sizes().values()) > 0
    if make in (_continual_fedavg, _continual_fot):  # both ran round 5: the 3rd task's first round
        assert resumed.position == whole.position and (whole.position.index, whole.position.round_in_task) == (2, 1)
    else:
        assert _equal(resumed.ema_state(), whole.ema_state())


def _round_trip(tmp_path, method, make) -> tuple:
    """Rounds 1-5 in one go against rounds 1-2, a checkpoint, a resume into a new strategy, rounds 3-5:
    the same tasks sent and the same state. Returns (uninterrupted, resumed)."""
    whole = make()
    sent_whole = _drive(whole, range(1, 6))

    first = make()
    _drive(first, range(1, 3))
    meta = {"strategy": method, "roster": AGENTS}
    commit_checkpoint(tmp_path, first, meta)
    rng = np.random.default_rng(1).bit_generator.state  # the engine's selection generator (checked on resume)
    resumed = make()  # a new process: the initial model only
    store = RunStore(tmp_path)
    at = store.resume_run("r", meta, resumed)
    store.close()
    assert (at.round, at.rng, at.bytes_up, at.bytes_down) == (2, rng, 5, 7)
    sent_resumed = _drive(resumed, range(3, 6))
    per_round = len(sent_whole) // 5
    # the resumed strategy sends what the uninterrupted one sent; it may send more (FZooS sends x_r to every
    # agent again after a restart, as it cannot know which agents still hold it), never other values
    for got, want in zip(sent_resumed, sent_whole[2 * per_round:], strict=True):
        assert got.keys() == want.keys()
        for agent in want:
            assert set(want[agent]) <= set(got[agent]), "the resumed strategy sent fewer tensors"
            assert _equal({k: got[agent][k] for k in want[agent]}, want[agent]), "the resumed strategy sent other tasks"
    assert _equal(resumed.global_state(), whole.global_state())
    assert _equal(resumed.extra_state(), whole.extra_state())
    return whole, resumed


class _Unresumable(type(create_strategy("fedavg", _initial(), lr=0.1))):
    """A strategy with method state it cannot load back (as the methods without resume support)."""

    def extra_state(self) -> dict:
        return {"table": torch.zeros(2)}


def test_a_method_that_cannot_resume_is_a_one_line_config_error(tmp_path):
    store = RunStore(tmp_path)
    meta = {"strategy": "fedavg", "roster": AGENTS}
    store.start_run("r", meta)
    store.save_checkpoint("r", 1, _Unresumable(_initial(), lr=0.1), rng=None, bytes_up=0, bytes_down=0, summary={})
    store.close()
    store = RunStore(tmp_path)
    try:
        with pytest.raises(ConfigError, match="method 'fedavg' cannot resume") as err:
            store.resume_run("r", meta, _Unresumable(_initial(), lr=0.1))
    finally:
        store.close()
    assert "\n" not in str(err.value)


def test_resume_marks_the_interrupted_round_and_keeps_earlier_ones(tmp_path):
    strategy = create_strategy("fedavg", _initial(), lr=0.1)
    store = RunStore(tmp_path)
    meta = {"strategy": "fedavg", "roster": AGENTS}
    store.start_run("r", meta)
    for r in (1, 2, 3):
        for a in AGENTS[:2]:
            store.ledger.record("r", r, a, "ok", bytes_up=10)
        if r < 3:  # round 3 was interrupted: rows in, no checkpoint
            store.save_checkpoint("r", r, strategy, rng=None, bytes_up=0, bytes_down=0,
                                  summary={"accuracy": 0.1 * r, "loss": 1.0})
            if r == 1:  # round 2's evaluation row was lost with the crash; its checkpoint holds it
                store.ledger.record_round("r", r, accuracy=0.1, loss=1.0)
    store.close()
    store = RunStore(tmp_path)
    at = store.resume_run("r", meta, create_strategy("fedavg", _initial(), lr=0.1))
    rows = store.ledger.query("SELECT round, status FROM agent_rounds ORDER BY id")
    evals = store.ledger.query("SELECT round, accuracy FROM rounds ORDER BY round")
    store.close()
    assert at.round == 2 and at.interrupted_rows == 2
    assert [(r["round"], r["status"]) for r in rows] == [(1, "ok")] * 2 + [(2, "ok")] * 2 + [(3, "interrupted:ok")] * 2
    assert [(r["round"], round(r["accuracy"], 3)) for r in evals] == [(1, 0.1), (2, 0.2)]


def test_run_directory_refuses_another_job_or_a_fresh_start(tmp_path):
    job = {"method": "fedavg", "roster": ["pi-01", "pi-02"], "seed": 0, "rounds": 5}
    run = open_job(tmp_path / "run", job, resume=False)
    assert open_job(tmp_path / "run", {**job, "rounds": 9}, resume=True) == run  # more rounds: the same run
    with pytest.raises(ConfigError, match="already holds run"):
        open_job(tmp_path / "run", job, resume=False)
    with pytest.raises(ConfigError, match="method = 'fedavg' in the run, 'fedzo' now"):
        open_job(tmp_path / "run", {**job, "method": "fedzo"}, resume=True)
    with pytest.raises(ConfigError, match="roster"):
        open_job(tmp_path / "run", {**job, "roster": ["pi-01", "pi-03"]}, resume=True)
    with pytest.raises(ConfigError, match="no such run directory"):
        open_job(tmp_path / "absent", job, resume=True)
    (tmp_path / "plain").mkdir()
    with pytest.raises(ConfigError, match="not a fedfleet run directory"):
        open_job(tmp_path / "plain", job, resume=True)


def test_serve_resume_with_another_method_is_a_one_line_error(tmp_path):
    secret = tmp_path / "fleet.secret"
    secret.write_text("x" * 32)
    secret.chmod(0o600)
    open_job(tmp_path / "run", {"method": "fedavg"}, resume=False)
    key = tmp_path / "coordinator.key"
    signing.write_private_key_file(key, signing.new_signing_seed())
    r = subprocess.run([sys.executable, "-m", "fedfleet.coordinator.cli", "serve", "--broker", "mqtt://127.0.0.1:1",
                        "--secret-file", str(secret), "--signing-key-file", str(key), "--method", "fedzo",
                        "--resume", str(tmp_path / "run")],
                       capture_output=True, text=True, timeout=120)
    err = r.stderr.strip()
    assert r.returncode == 2 and "\n" not in err and "Traceback" not in err, err
    assert "not the same job" in err and "method = 'fedavg' in the run, 'fedzo' now" in err


def test_serve_killed_mid_round_resumes_the_same_run(tmp_path, capsys):
    """`fedfleet bench resume`, small: real `fedfleet-agent` processes, `fedfleet serve` SIGKILLed once the
    interrupted round is under way, then `--resume`; compared with an uninterrupted same-seed run."""
    out = tmp_path / "resume.json"
    assert bench_resume.main(["--agents", "3", "--rounds", "4", "--kill-round", "3", "--json", str(out)]) == 0
    captured = capsys.readouterr()
    result = json.loads(out.read_text())
    assert set(result) == set(bench_resume.KEYS) and json.loads(captured.out) == result
    info = details(captured.err)
    assert result["rounds"] == 4 and result["killed_at"] == 3 and result["rounds_lost"] == 1
    assert info["earlier_rounds_unchanged"] and info["earlier_checkpoints"] == 2
    assert info["ok_rows_per_round"] == {"1": 3, "2": 3, "3": 3, "4": 3}  # nothing earlier redone
    assert sum(info["left_by_the_kill_in_round"].values()) == sum(info["marked_interrupted"].values())
    assert len(info["accuracy_curve"]) == 4
    assert abs(result["final_accuracy"] - result["uninterrupted_accuracy"]) <= 0.005, info


def test_demo_resume_continues_the_same_run_with_more_rounds(mosquitto, tmp_path):
    from fedfleet.coordinator.job.config import JobConfig
    from fedfleet.coordinator.job.run import run_demo
    from fedfleet.coordinator.records.ledger import Ledger

    cfg = JobConfig(rounds=1, agents=2, fleet="resume-demo")
    first = run_demo(cfg, broker=mosquitto.url, run_dir=tmp_path, quiet=True)
    run = json.loads((tmp_path / "job.json").read_text())["run"]
    ckpt1 = (tmp_path / "checkpoints" / "round-0001.pt").read_bytes()
    cfg.rounds = 2
    with pytest.raises(ConfigError, match="already holds run"):
        run_demo(cfg, broker=mosquitto.url, run_dir=tmp_path, quiet=True)
    again = run_demo(cfg, broker=mosquitto.url, run_dir=tmp_path, quiet=True, resume=True)
    assert first.rounds == 1 and again.rounds == 2 and [s.round for s in again.summaries] == [2]
    assert (tmp_path / "checkpoints" / "round-0001.pt").read_bytes() == ckpt1
    ledger = Ledger(tmp_path / "ledger.sqlite")
    try:
        runs = [r["run"] for r in ledger.query("SELECT run FROM runs")]
        per_round = [(r["round"], r["n"]) for r in ledger.query(
            "SELECT round, COUNT(*) AS n FROM agent_rounds WHERE status = 'ok' GROUP BY round ORDER BY round")]
    finally:
        ledger.close()
    assert runs == [run] and per_round == [(1, 2), (2, 2)]


CONTINUAL_JOB = """
[job]
method = "fot"
mode = "full"
hidden = 32
hidden_layers = 1
agents = 3
seed = 0
deadline_s = 20.0
fleet = "continual-resume"

[method]
lr = 0.1
epochs = 1
batch = 16
eps = 0.95

[uplink]
name = "none"

[continual]
head = "shared"
rounds_per_task = 4
schedule = ["identity", "perm-1", "perm-2"]

[continual.tasks.identity]
transform = "identity"

[continual.tasks.perm-1]
transform = "permute"
seed = 1

[continual.tasks.perm-2]
transform = "permute"
seed = 2
"""


def _ledger_rows(run_dir, sql: str) -> list[tuple]:
    """Rows of a read-only query on a run's ledger (none while it is not written yet)."""
    return bench_resume._query(run_dir / "ledger.sqlite", sql)


def _kill_demo(cmd: list[str], run_dir, killed_once: str) -> int:
    """Run `fedfleet demo` (cmd) and SIGKILL it as soon as the query `killed_once` returns a row; the last round
    evaluated before the kill."""
    import signal
    import time

    victim = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and victim.poll() is None and not _ledger_rows(run_dir, killed_once):
        time.sleep(0.005)
    assert victim.poll() is None, "the job ended before it could be killed"
    victim.send_signal(signal.SIGKILL)
    victim.wait(30)
    return max(r for (r,) in _ledger_rows(run_dir, "SELECT round FROM rounds"))


def _resume_demo(cmd: list[str], run_dir) -> dict:
    r = subprocess.run([*cmd, "--resume", str(run_dir)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def _demo(run_dir, url: str, *args: str) -> list[str]:
    return [sys.executable, "-m", "fedfleet.coordinator.cli", "demo", "--run-dir", str(run_dir), "--broker", url,
            "--quiet", "--report", "none", *args]


def test_continual_demo_killed_in_its_second_task_resumes_at_the_right_task(mosquitto, tmp_path):
    """`fedfleet demo` of a three-task FOT job over Mosquitto, SIGKILLed once a round of the second task is
    committed, then `--resume`d: the same run finishes all twelve rounds, every round is booked under the task its
    place in the schedule gives, the rows written before the kill are unchanged, and FOT's bases cover every task."""
    job = tmp_path / "job.toml"
    job.write_text(CONTINUAL_JOB)
    run_dir = tmp_path / "run"

    def rows(sql: str) -> list[tuple]:
        return _ledger_rows(run_dir, sql)

    cmd = _demo(run_dir, mosquitto.url, "--config", str(job))
    done = _kill_demo(cmd, run_dir, "SELECT 1 FROM task_accuracy WHERE round = 5")
    assert 4 <= done < 12
    before = rows(f"SELECT * FROM task_accuracy WHERE round <= {done} ORDER BY round, eval_task")
    assert len(before) >= 4
    assert _resume_demo(cmd, run_dir)["rounds"] == 12
    assert rows(f"SELECT * FROM task_accuracy WHERE round <= {done} ORDER BY round, eval_task") == before
    assert len(rows("SELECT DISTINCT run FROM task_accuracy")) == 1  # one run, continued
    booked = rows("SELECT round, task, task_name, task_end, COUNT(*) FROM task_accuracy GROUP BY round ORDER BY round")
    names = ["identity", "perm-1", "perm-2"]
    assert [b[0] for b in booked] == list(range(1, 13))
    for rnd, task, name, task_end, evaluated in booked:
        want = (rnd - 1) // 4
        assert (task, name, task_end, evaluated) == (want, names[want], int(rnd % 4 == 0), want + 1), rnd
    assert {t for (t,) in rows("SELECT DISTINCT task FROM layer_basis")} == {0, 1, 2}


@pytest.mark.parametrize("method", ["ferret", "lora_fair", "ggeur"])
def test_a_demo_killed_mid_run_resumes_for_methods_that_could_not(mosquitto, tmp_path, method):
    """Ferret, LoRA-FAIR and GGEUR (refused on resume before): `fedfleet demo` over Mosquitto SIGKILLed after round 3,
    resumed: one run, every round evaluated once, and a final accuracy that learnt something."""
    run_dir = tmp_path / "run"
    cmd = _demo(run_dir, mosquitto.url, "--method", method, "--rounds", "12", "--agents", "3")
    done = _kill_demo(cmd, run_dir, "SELECT 1 FROM rounds WHERE round = 3")
    assert 3 <= done < 12
    summary = _resume_demo(cmd, run_dir)
    assert summary["rounds"] == 12
    assert len(_ledger_rows(run_dir, "SELECT DISTINCT run FROM rounds")) == 1
    assert [r for (r,) in _ledger_rows(run_dir, "SELECT round FROM rounds ORDER BY round")] == list(range(1, 13))
    assert summary["final_accuracy"] > 0.5


@pytest.mark.parametrize(("change", "needle"), [
    (lambda e: e["bases"].__setitem__("fc0.weight", 2 * e["bases"]["fc0.weight"]), "orthonormal"),
    (lambda e: e["bases"].__setitem__("fc0.weight", torch.full_like(e["bases"]["fc0.weight"], math.nan)), "NaN"),
    (lambda e: e["bases"].__setitem__("fc0.weight", torch.zeros(4, 1)), "not a (5, k <= 5) matrix"),
    (lambda e: e["bases"].__setitem__("fc9.weight", torch.zeros(5, 0)), "not a weight matrix"),
    (lambda e: e.__setitem__("eps", 0.0), "eps"),
    (lambda e: e.__setitem__("eps", True), "eps"),
    (lambda e: e.__setitem__("history", "x"), "history"),
], ids=["not-orthonormal", "nan", "shape", "unknown-layer", "eps-0", "eps-bool", "history"])
def test_a_tampered_fot_checkpoint_is_a_one_line_refusal(tmp_path, change, needle):
    """FOT's protected bases, eps and history in a checkpoint (its digest rebooked, as a file damaged before its
    commit would be) are checked on resume: each damage is a one-line refusal naming the run directory."""
    first = _continual_fot()
    _drive(first, range(1, 3))  # task a's end: bases grown
    assert sum(k for k, _ in first.inner.basis_sizes().values()) > 0
    meta = {"strategy": "fot", "roster": AGENTS}
    commit_checkpoint(tmp_path, first, meta)
    damage_checkpoint(tmp_path, change)
    store = RunStore(tmp_path)
    try:
        with pytest.raises(ConfigError) as err:
            store.resume_run("r", meta, _continual_fot())
    finally:
        store.close()
    assert needle in str(err.value) and str(tmp_path) in str(err.value) and "\n" not in str(err.value)


def test_ferret_resumes_with_its_coefficients_and_full_syncs_first(tmp_path):
    """Ferret's applied coefficients and momentum load back and its weights are rebuilt from the checkpoint
    (checked against the digest); the first tasks after the resume are full syncs, since agents may have lost
    their replicas with the coordinator, and the run then ends where the uninterrupted one ends."""
    def make():
        return create_strategy("ferret", _initial(), k=4, seed=3, pool="run", momentum=0.5)

    whole = make()
    sent_whole = _drive(whole, range(1, 6))
    first = make()
    _drive(first, range(1, 3))
    meta = {"strategy": "ferret", "roster": AGENTS}
    commit_checkpoint(tmp_path, first, meta)
    resumed = make()
    store = RunStore(tmp_path)
    assert store.resume_run("r", meta, resumed).round == 2
    store.close()
    sent = _drive(resumed, range(3, 6))
    assert all(set(t) == {"w", "b"} for t in sent[0].values())  # round 3: every agent gets the full weights
    for agent, tensors in sent[0].items():
        assert _equal(tensors, {n: v.numpy() for n, v in first.global_state().items()}), agent
    assert _equal(sent[1:], sent_whole[3:])  # from round 4 on, the same history syncs as without the restart
    assert _equal(resumed.global_state(), whole.global_state())
    assert _equal({k: v for k, v in resumed.extra_state().items() if k != "synced"},
                  {k: v for k, v in whole.extra_state().items() if k != "synced"})


@pytest.mark.parametrize(("change", "needle"), [
    (lambda e: e["c"].__setitem__((0, 0), math.nan), "coefficients"),
    (lambda e: e.__setitem__("c", np.zeros((1, 2))), "coefficients"),
    (lambda e: e["history"].__setitem__(0, e["history"][1]), "history"),
    (lambda e: e.__setitem__("digest", "0" * 64), "digest"),
], ids=["nan", "shape", "round-0", "digest"])
def test_a_tampered_ferret_checkpoint_is_refused(change, needle):
    s = create_strategy("ferret", _initial(), k=4, seed=3, pool="run", momentum=0.5)
    _drive(s, range(1, 3))
    extra = s.extra_state()
    change(extra)
    fresh = create_strategy("ferret", {k: v.clone() for k, v in s.global_state().items()}, k=4, seed=3, pool="run",
                            momentum=0.5)
    with pytest.raises(ValueError, match=needle) as err:
        fresh.load_extra_state(extra)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(("change", "needle"), [
    (lambda e: e["geometry"][0][0].mul_(2.0), "orthonormal"),
    (lambda e: e["geometry"][0][1].fill_(math.nan), "spectrum of class 0"),
    (lambda e: e["geometry"].__setitem__(0, (e["geometry"][0][0], e["geometry"][0][1], 0.0)), "count of class 0"),
    (lambda e: e["geometry"].__setitem__(99, e["geometry"][0]), "not a class"),
    (lambda e: e["counts"].__setitem__("a-0", -e["counts"]["a-0"] - 1), "negative"),
    (lambda e: e.__setitem__("exchange_done", False), "exchange_done"),
], ids=["basis", "nan-spectrum", "count", "class", "census", "exchange-flag"])
def test_a_tampered_ggeur_checkpoint_is_refused(tmp_path, change, needle):
    """GGEUR's census and pooled geometry, as a resumed run reads them back from a real demo's checkpoint."""
    import io

    from fedfleet.coordinator.job.config import JobConfig
    from fedfleet.coordinator.job.run import run_demo

    run_demo(JobConfig(method="ggeur", rounds=1, agents=3, fleet="ggeur-tamper"), broker="memory", run_dir=tmp_path,
             quiet=True, report="none")
    ckpt = torch.load(tmp_path / "checkpoints" / "round-0001.pt", weights_only=True)
    extra = ckpt["extra"]
    assert extra["exchange_done"] and 0 in extra["geometry"] and "a-0" not in extra["counts"]
    extra["counts"]["a-0"] = next(iter(extra["counts"].values())).clone()
    buf = io.BytesIO()
    torch.save(extra, buf)  # a checkpoint's method state round-trips through torch.save / weights_only load
    extra = torch.load(io.BytesIO(buf.getvalue()), weights_only=True)
    change(extra)
    state = {k: v.clone() for k, v in ckpt["state"].items()}
    fresh = create_strategy("ggeur", state, seed=0)
    with pytest.raises(ValueError, match=needle) as err:
        fresh.load_extra_state(extra)
    assert "\n" not in str(err.value)
