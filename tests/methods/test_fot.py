"""FOT's maths and continual jobs' pieces, without a broker: the projection, the subspace from summed sketches,
the choice of k, the edge learner's sketch, task data and per-task heads, schedules and their config errors,
ACC/FGT."""

from __future__ import annotations

import re
import subprocess
import sys

import numpy as np
import pytest
import torch

from fedfleet.coordinator.job import config
from fedfleet.coordinator.strategies import ClientResult, create
from fedfleet.coordinator.strategies.fot import choose_k, project_out, subspace_update, threshold
from fedfleet.coordinator.tasks.continual import ContinualStrategy, acc_fgt
from fedfleet.coordinator.tasks.schedule import parse, permuted_digits, split_digits
from fedfleet.edge_agent import continual
from fedfleet.edge_agent.errors import ConfigError, ProtocolError
from fedfleet.edge_agent.learners import LocalData, Task
from fedfleet.edge_agent.learners import create as create_learner
from fedfleet.edge_agent.learners.fot import BASIS, COUNT, RHO, SKETCH, random_matrix, residual
from fedfleet.edge_agent.nn import mlp


def _orthonormal(d: int, k: int, seed: int) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.from_numpy(np.random.default_rng(seed).normal(size=(d, k))))
    return q.float()


def _projector(u: torch.Tensor) -> torch.Tensor:
    return u.double() @ u.double().T


def test_projected_update_is_orthogonal_to_the_basis():
    u = _orthonormal(20, 6, 0)
    update = torch.from_numpy(np.random.default_rng(1).normal(size=(7, 20)).astype(np.float32))
    projected = project_out(update, u)
    assert float((projected @ u).abs().max()) < 1e-5  # float32 tolerance
    assert float((update @ u).abs().max()) > 0.1  # the check can fail: the raw update is not orthogonal
    # what is left of the update is unchanged outside span(U)
    assert torch.allclose(projected - projected @ u @ u.T, update - update @ u @ u.T, atol=1e-5)


def test_strategy_aggregate_moves_protected_layers_only_orthogonally_to_their_bases():
    sizes = [12, 9, 4]
    state = {k: torch.from_numpy(v) for k, v in mlp.init(sizes, 0).items()}
    fot = create("fot", state)
    wrapped = ContinualStrategy(fot, permuted_digits(2, 3))
    wrapped.configure(1, 0, ["a"])  # sets the task: all weight matrices protected (shared head)
    fot.bases = {"fc0.weight": _orthonormal(12, 5, 2), "fc1.weight": _orthonormal(9, 3, 3)}
    before = {k: v.clone() for k, v in fot.state.items()}
    rng = np.random.default_rng(4)
    results = [ClientResult(a, {k: rng.normal(size=v.shape).astype(np.float32) for k, v in state.items()}, 10)
               for a in ("a", "b", "c")]
    wrapped.aggregate(1, 0, results)
    for name, basis in fot.bases.items():
        moved = fot.state[name] - before[name]
        assert float(moved.abs().max()) > 0.01
        assert float((moved @ basis).abs().max()) < 1e-5
    mean_bias = np.mean([r.tensors["fc0.bias"] for r in results], axis=0)  # biases: plain uniform mean
    assert np.allclose((fot.state["fc0.bias"] - before["fc0.bias"]).numpy(), mean_bias, atol=1e-6)


def _low_rank_clients(d: int, rank: int, n: list[int], seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    mix = rng.normal(size=(d, rank))
    return [mix @ rng.normal(size=(rank, k)) for k in n]


def test_subspace_from_summed_sketches_matches_the_svd_of_the_stacked_residuals():
    d, m = 16, 16
    u0 = _orthonormal(d, 3, 5).double().numpy()  # an existing basis the data partly lies in
    clients = [r + u0 @ np.random.default_rng(i).normal(size=(3, r.shape[1]))
               for i, r in enumerate(_low_rank_clients(d, 4, [30, 50, 40], seed=6))]
    residuals, rhos = zip(*(residual(r, u0) for r in clients))
    assert all(0 < rho < 1 for rho in rhos)
    rng = np.random.default_rng(7)
    summed = sum(r_hat @ random_matrix(rng, r_hat.shape[1], m, "uniform") for r_hat in residuals)
    stacked = np.concatenate(residuals, axis=1)
    p_ref = np.linalg.svd(stacked, full_matrices=False)[0][:, :4]
    n = np.array([r.shape[1] for r in clients], float)
    rho_bar = float((n / n.sum()) @ np.array(rhos))
    # eps = 1: eps' = 1, so every direction with energy is taken; the stacked residual has rank 4
    new, added = subspace_update(torch.from_numpy(u0).float(), torch.from_numpy(summed), rho_bar, eps=0.999999)
    assert added >= 4
    u_new = new.double().numpy()
    assert np.allclose(u_new.T @ u_new, np.eye(u_new.shape[1]), atol=1e-5)  # orthonormal
    assert np.allclose(u_new[:, :3] @ u_new[:, :3].T, u0 @ u0.T, atol=1e-5)  # the old basis is kept
    # the residuals' principal subspace (from the stacked matrix) lies in the new basis
    assert np.allclose(u_new @ (u_new.T @ p_ref), p_ref, atol=1e-5)
    # and the leading directions from the sketch sum span exactly that subspace
    p_sketch = np.linalg.svd(summed, full_matrices=False)[0][:, :4]
    assert np.allclose(p_sketch @ p_sketch.T, p_ref @ p_ref.T, atol=1e-6)


def test_k_follows_the_threshold_rules():
    sigma = torch.tensor([4.0, 2.0, 1.0, 1.0])  # energy shares: 16/22, 20/22, 21/22, 1
    assert choose_k(sigma, 0.5, room=4) == 1
    assert choose_k(sigma, 16 / 22, room=4) == 2  # strictly greater than eps'
    assert choose_k(sigma, 0.93, room=4) == 3
    assert choose_k(sigma, -0.3, room=4) == 1  # at least one vector, even when eps' <= 0
    assert choose_k(sigma, 1.0, room=3) == 3  # eps' >= 1: the whole remaining space
    assert choose_k(sigma, 0.5, room=0) == 0
    assert threshold(1.0, 0.95) == pytest.approx(0.95)
    assert threshold(0.5, 0.95) == pytest.approx(0.9)  # the norm ratio, as specified
    assert threshold(0.5, 0.95, "energy") == pytest.approx(0.8)  # GPM's energy ratio


def test_edge_learner_sketches_the_trained_models_layer_inputs():
    sizes = [8, 6, 3]
    params = mlp.init(sizes, 1)
    rng = np.random.default_rng(2)
    data = LocalData(rng.random((25, 8)).astype(np.float32), rng.integers(0, 3, 25))

    class Full:
        def features(self, x, cache_key=None):
            return x

    basis = _orthonormal(8, 2, 3).numpy()
    cfg = {"lr": 0.1, "epochs": 1, "batch": 8, "seed": 5,
           "fot": {"sketch": True, "layers": [["fc0.weight", 8], ["fc1.weight", 12]], "distribution": "uniform"}}
    task = Task("r", 3, "fot", cfg, {**params, BASIS + "fc0.weight": basis})
    out = create_learner("fot").learn(task, data, Full())
    assert out.tensors[SKETCH + "fc0.weight"].shape == (8, 8) and out.tensors[SKETCH + "fc1.weight"].shape == (6, 12)
    rho = out.tensors[RHO]
    assert 0 < rho[0] < 1 and rho[1] == 1.0  # a basis for fc0 only
    assert out.tensors[COUNT].tolist() == [25.0]
    # the fc0 sketch's columns are residual inputs: orthogonal to the basis
    assert np.abs(basis.T @ out.tensors[SKETCH + "fc0.weight"]).max() < 1e-4
    plain = create_learner("fot").learn(Task("r", 3, "fot", {k: v for k, v in cfg.items() if k != "fot"}, params),
                                        data, Full())
    assert set(plain.tensors) == set(params)  # ordinary rounds upload the delta only
    assert np.allclose(plain.tensors["fc0.weight"], out.tensors["fc0.weight"])  # the same unconstrained SGD


def test_task_data_permutes_filters_and_reads_files_per_task():
    rng = np.random.default_rng(0)
    data = LocalData(rng.random((30, 64)).astype(np.float32), np.arange(30) % 10)
    spec = permuted_digits(3, 2).tasks[1].spec(1, "shared")
    perm = continual.task_data(data, {"continual": spec})
    assert np.array_equal(perm.x, data.x[:, continual.permutation(1, 64)]) and np.array_equal(perm.y, data.y)
    assert not np.array_equal(perm.x, data.x)
    split = continual.task_data(data, {"continual": split_digits(2).tasks[1].spec(1, "task")})
    assert set(split.y.tolist()) == {2, 3} and len(split) == 6
    assert continual.head_classes({"continual": split_digits(2).tasks[1].spec(1, "task")}) == [2, 3]
    assert continual.task_data(data, {}) is data
    shards = continual.TaskShards(data.x, data.y, {"perm-1": LocalData(data.x[:5], data.y[:5])})
    assert len(continual.task_data(shards, {"continual": spec})) == 5  # a device's own file, as it is
    with pytest.raises(continual.TaskDataError, match="perm-2"):
        continual.task_data(shards, {"continual": permuted_digits(3, 2).tasks[2].spec(2, "shared")})


def test_per_task_head_trains_only_the_tasks_outputs():
    params = mlp.init([5, 4, 10], 0)
    rng = np.random.default_rng(1)
    x, y = rng.random((12, 5)).astype(np.float32), rng.choice([2, 3], 12)
    _, grads = mlp.loss_and_grad(params, x, y, classes=[2, 3])
    others = [c for c in range(10) if c not in (2, 3)]
    assert np.all(grads["fc1.weight"][others] == 0) and np.abs(grads["fc1.weight"][[2, 3]]).max() > 0
    _, full = mlp.loss_and_grad(params, x, y)
    assert np.abs(full["fc1.weight"][others]).max() > 0


def test_acc_and_fgt_from_the_matrix():
    a = [[0.9, None, None], [0.8, 0.85, None], [0.6, 0.7, 0.95]]
    acc, fgt = acc_fgt(a)
    assert acc == pytest.approx((0.6 + 0.7 + 0.95) / 3)
    assert fgt == pytest.approx(((0.9 - 0.6) + (0.85 - 0.7)) / 2)
    assert acc_fgt([[0.7]]) == (pytest.approx(0.7), 0.0)


def test_schedule_position_and_round_counting():
    s = parse({"rounds_per_task": 2, "schedule": ["b", "a"], "tasks": {"a": {}, "b": {"rounds": 3}}}, "x")
    assert [t.name for t in s.tasks] == ["b", "a"] and s.total_rounds == 5
    pos = [s.position(i) for i in range(5)]
    assert [(p.index, p.round_in_task, p.last) for p in pos] == [(0, 1, False), (0, 2, False), (0, 3, True),
                                                                 (1, 1, False), (1, 2, True)]


@pytest.mark.parametrize(("table", "field"), [
    ({"schedule": ["a", "nope"], "tasks": {"a": {"rounds": 2}}}, "continual.schedule[1]"),
    ({"tasks": {"a": {"rounds": 2, "transform": "rotate"}}}, "continual.tasks.a.transform"),
    ({"tasks": {"a": {"rounds": 2, "transform": "permute"}}}, "continual.tasks.a.seed"),
    ({"tasks": {"a": {"rounds": 0}}}, "continual.tasks.a.rounds"),
    ({"tasks": {"a": {"rounds": 2, "classes": [3, 11]}}}, "continual.tasks.a.classes"),
    ({"head": "task", "tasks": {"a": {"rounds": 2}}}, "continual.tasks.a.classes"),
    ({"head": "many", "tasks": {"a": {"rounds": 2}}}, "continual.head"),
    ({"tasks": {"a": {"rounds": 2, "colour": 1}}}, "continual.tasks.a.colour"),
])
def test_bad_schedules_are_config_errors_naming_the_field(table, field):
    with pytest.raises(ConfigError, match=re.escape(f"field '{field}'")):
        parse(table, "job.toml")


def test_a_bad_schedule_in_a_job_file_is_one_line_on_the_command_line(tmp_path):
    bad = tmp_path / "job.toml"
    bad.write_text('[job]\nmethod = "fot"\n[continual]\nschedule = ["identity", "perm-9"]\n'
                   '[continual.tasks.identity]\nrounds = 2\n')
    with pytest.raises(ConfigError, match=r"field 'continual\.schedule\[1\]' names unknown task 'perm-9'"):
        config.load(bad)
    r = subprocess.run([sys.executable, "-m", "fedfleet.coordinator.cli", "demo", "--config", str(bad)], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().count("\n") == 0 and "continual.schedule[1]" in r.stderr
    rounds = tmp_path / "rounds.toml"
    rounds.write_text('[job]\nrounds = 5\n[continual]\n[continual.tasks.a]\nrounds = 2\n')
    with pytest.raises(ConfigError, match="field 'job.rounds'"):
        config.load(rounds)


def test_shipped_continual_jobs_load():
    perm = config.load("examples/permuted-digits.toml")
    assert perm.method == "fot" and perm.rounds == 200 and perm.hidden_layers == 2
    assert parse(perm.continual, "x") == permuted_digits(5, 40)
    split = config.load("examples/split-digits.toml")
    assert parse(split.continual, "x") == split_digits(40)


def test_fot_checks_the_sketch_statistics():
    fot = create("fot", {k: torch.from_numpy(v) for k, v in mlp.init([4, 3], 0).items()})
    ok = {RHO: np.array([0.5], np.float32), COUNT: np.array([7.0], np.float32)}
    fot.check(1, 0, ClientResult("a", ok, 7))
    with pytest.raises(ProtocolError) as exc:
        fot.check(1, 0, ClientResult("a", {**ok, COUNT: np.array([-3.0], np.float32)}, 7))
    assert exc.value.reason == "sketch_n"
    with pytest.raises(ProtocolError) as exc:
        fot.check(1, 0, ClientResult("a", {**ok, RHO: np.array([1.7], np.float32)}, 7))
    assert exc.value.reason == "sketch_rho"
    # N_i above the samples the result itself claims (before the engine's cap) is a lie, not a capped weight
    fot.check(1, 0, ClientResult("a", ok, 3, {"_samples_claimed": 7.0}))  # capped to 3: still honest
    with pytest.raises(ProtocolError, match="exceeds the 7 samples") as exc:
        fot.check(1, 0, ClientResult("a", {**ok, COUNT: np.array([7e6], np.float32)}, 7, {"_samples_claimed": 7.0}))
    assert exc.value.reason == "sketch_n"


def test_shards_of_a_continual_job_are_files_named_per_task(tmp_path):
    r = subprocess.run([sys.executable, "-m", "fedfleet.coordinator.cli", "shards", "--config", "examples/split-digits.toml",
                        "--agents", "3", "--out", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    shards = continual.load_task_dir(tmp_path / "agent-01")
    assert sorted(shards.tasks) == ["digits-01", "digits-23", "digits-45", "digits-67", "digits-89"]
    assert set(shards.tasks["digits-45"].y.tolist()) == {4, 5}
    spec = split_digits(40).tasks[2].spec(2, "task")
    assert continual.task_data(shards, {"continual": spec}) is shards.tasks["digits-45"]


def test_fot_needs_a_schedule_and_a_schedule_needs_a_continual_method():
    from fedfleet.coordinator.job.config import JobConfig
    from fedfleet.coordinator.tasks.continual import schedule_of

    with pytest.raises(ConfigError, match=r"method 'fot' needs a task schedule"):
        schedule_of(JobConfig(method="fot"))
    with pytest.raises(ConfigError, match=r"field 'job.method'"):
        schedule_of(JobConfig(method="fedzo", continual=permuted_digits(2, 2).to_dict()))
    assert schedule_of(JobConfig(method="fedavg")) is None
