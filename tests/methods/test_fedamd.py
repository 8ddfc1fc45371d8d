"""FedAMD: the variance-reduced miner, the chunked anchor gradient, the coordinator's table and roles."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from fedfleet.coordinator.strategies import _robust as robust
from fedfleet.coordinator.strategies import create as create_strategy
from fedfleet.coordinator.strategies.base import ClientResult
from fedfleet.edge_agent.errors import ConfigError
from fedfleet.edge_agent.learners import LocalData, Task
from fedfleet.edge_agent.learners import create as create_learner
from fedfleet.edge_agent.learners.fedamd import chunked_gradient, miner_steps, shuffled_batches
from fedfleet.edge_agent.nn import mlp
from fedfleet.tools.bench.runner import run_strategy


def _data(n: int = 50, d: int = 6, c: int = 3, seed: int = 0) -> LocalData:
    x = np.random.default_rng(seed).random((n, d), dtype=np.float32) - 0.5
    w = np.random.default_rng(1234).normal(size=(d, c))  # one labelling rule shared by every shard
    return LocalData(x, (x @ w).argmax(1).astype(np.int64))


def test_full_batch_oracle_identity() -> None:
    """With a full-batch gradient oracle, v_k = v_0 + grad f(x_k) - grad f(x_0) for every k."""
    data = _data()
    x0 = mlp.init([6, 4, 3], seed=1)
    v0 = {k: np.random.default_rng(2).normal(size=v.shape).astype(np.float32) for k, v in x0.items()}
    full = np.arange(len(data))

    def grad(p: dict[str, np.ndarray], idx: np.ndarray) -> dict[str, np.ndarray]:
        return mlp.loss_and_grad(p, data.x[idx], data.y[idx])[1]

    lr, steps = 0.1, 6
    x_k, trace = miner_steps(x0, v0, grad, [full] * (steps - 1), lr)
    assert len(trace) == steps
    g0 = grad(x0, full)
    xs = [x0]
    for v in trace[:-1]:
        xs.append({k: xs[-1][k] - lr * v[k] for k in x0})
    for k_step, (xk, vk) in enumerate(zip(xs, trace)):
        gk = grad(xk, full)
        for name in x0:
            assert np.allclose(vk[name], v0[name] + gk[name] - g0[name], atol=1e-5), (k_step, name)
    assert all(np.allclose(x_k[n], xs[-1][n] - lr * trace[-1][n], atol=1e-6) for n in x0)


def test_miner_learner_matches_the_recursion_and_first_step_uses_bullseye_only() -> None:
    data = _data(n=20)
    x0 = mlp.init([6, 3], seed=3)
    v0 = {k: np.full_like(v, 0.01) for k, v in x0.items()}
    tensors = {**x0, **{f"v.{k}": v for k, v in v0.items()}}
    learner = create_learner("fedamd")
    one = learner.learn(Task("r", 0, "fedamd", {"role": "miner", "lr": 0.5, "local_steps": 1, "batch": 8}, tensors), data, None)
    for k in x0:  # K = 1: delta = lr * v0, no gradient evaluated
        assert np.allclose(one.tensors[k], 0.5 * v0[k], atol=1e-7)
    assert one.metrics["grad_evals"] == 0
    cfg = {"role": "miner", "lr": 0.2, "local_steps": 4, "batch": 100, "seed": 9}  # batch >= N: full oracle
    res = learner.learn(Task("r", 0, "fedamd", cfg, tensors), data, None)

    def grad(p, idx):
        return mlp.loss_and_grad(p, data.x[idx], data.y[idx])[1]

    x_k, _ = miner_steps(x0, v0, grad, [np.arange(20)] * 3, 0.2)
    for k in x0:
        assert np.allclose(res.tensors[k], x0[k] - x_k[k], atol=1e-5)
    assert res.metrics["grad_evals"] == 2 * 3 * 20
    divided = learner.learn(Task("r", 0, "fedamd", {**cfg, "divided": True}, tensors), data, None)
    assert np.allclose(divided.tensors["fc0.weight"], res.tensors["fc0.weight"] / 4, atol=1e-6)


def test_miner_batches_are_shuffled_and_cover_the_set() -> None:
    rng = np.random.Generator(np.random.PCG64(0))
    batches = shuffled_batches(rng, 20, 5, 4)
    assert sorted(np.concatenate(batches).tolist()) == list(range(20))
    assert not np.array_equal(np.concatenate(batches), np.arange(20))
    other = shuffled_batches(np.random.Generator(np.random.PCG64(1)), 20, 5, 4)
    assert not np.array_equal(batches[0], other[0])
    assert len(shuffled_batches(rng, 7, 5, 6)) == 6  # reshuffles when used up


@pytest.mark.parametrize("chunk", [1, 7, 50, 1000])
def test_chunked_anchor_gradient_equals_full_gradient(chunk: int) -> None:
    data = _data(n=50)
    params = mlp.init([6, 5, 3], seed=4)
    loss, g = chunked_gradient(params, data.x, data.y, chunk)
    ref_loss, ref = mlp.loss_and_grad(params, data.x, data.y)
    assert loss == pytest.approx(ref_loss, rel=1e-5)
    for k in params:
        assert np.allclose(g[k], ref[k], atol=1e-6)


def test_anchor_learner_uploads_large_batch_gradient() -> None:
    data = _data(n=30)
    params = mlp.init([6, 3], seed=5)
    learner = create_learner("fedamd")
    res = learner.learn(Task("r", 0, "fedamd", {"role": "anchor", "chunk": 4}, dict(params)), data, None)
    ref = mlp.loss_and_grad(params, data.x, data.y)[1]
    assert all(np.allclose(res.tensors[k], ref[k], atol=1e-6) for k in params)
    capped = learner.learn(Task("r", 0, "fedamd", {"role": "anchor", "large_batch": 10}, dict(params)), data, None)
    assert capped.samples == 10
    with pytest.raises(ConfigError, match="role"):
        learner.learn(Task("r", 0, "fedamd", {"role": "worker"}, dict(params)), data, None)


def _state() -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(v) for k, v in mlp.init([6, 3], seed=0).items()}


def _grad_result(agent: str, value: float, layout) -> ClientResult:
    return ClientResult(agent, {k: np.full(s, value, np.float32) for k, s in layout}, 1)


def test_strategy_init_pass_lag_and_no_miner_round() -> None:
    agents = [f"a{i}" for i in range(6)]
    s = create_strategy("fedamd", _state(), participants=3, p=1.0, lr=0.1, seed=1)
    layout = s.layout
    x0 = s.x.clone()
    tasks = s.configure(0, 0, agents)
    assert set(tasks) == set(agents) and all(t.config["role"] == "anchor" for t in tasks.values())
    s.aggregate(0, 0, [_grad_result(a, float(i), layout) for i, a in enumerate(agents)])
    assert s.init_done and s.t == 0 and torch.equal(s.x, x0)
    assert torch.allclose(s.bullseye(), torch.full_like(x0, 2.5))
    # p = 1.0: every sampled agent is an anchor, so no miner: the model must not move
    tasks = s.configure(1, 0, agents)
    assert len(tasks) == 3 and all(t.config["role"] == "anchor" for t in tasks.values())
    assert all("v.fc0.weight" not in t.tensors for t in tasks.values())
    s.aggregate(1, 0, [_grad_result(a, 100.0, layout) for a in tasks])
    assert torch.equal(s.x, x0) and s.t == 1
    assert s.history[-1]["miners"] == 0


def test_strategy_miner_update_and_one_round_lag() -> None:
    agents = [f"a{i}" for i in range(4)]
    s = create_strategy("fedamd", _state(), participants=4, p=0.5, lr=0.1, server_lr=0.5, seed=3)
    layout = s.layout
    s.configure(0, 0, agents)
    s.aggregate(0, 0, [_grad_result(a, 1.0, layout) for a in agents])
    x0 = s.x.clone()
    for rnd in range(1, 8):  # find a round with both roles
        tasks = s.configure(rnd, 0, agents)
        roles = {a: t.config["role"] for a, t in tasks.items()}
        if "anchor" in roles.values() and "miner" in roles.values():
            break
        s.aggregate(rnd, 0, [])
    else:
        pytest.fail("no round with both roles")
    sent_v = {a: robust.flatten({k[2:]: v for k, v in t.tensors.items() if k.startswith("v.")}, layout) for a, t in tasks.items() if roles[a] == "miner"}
    assert all(torch.allclose(v, torch.ones_like(v)) for v in sent_v.values())
    results = [_grad_result(a, 7.0 if roles[a] == "anchor" else 2.0, layout) for a in tasks]
    s.aggregate(rnd, 0, results)
    assert torch.allclose(s.x, x0 - 0.5 * 2.0)  # uniform mean of miner deltas, times server_lr
    anchors = sum(r == "anchor" for r in roles.values())
    expected = (anchors * 7.0 + (4 - anchors) * 1.0) / 4
    assert torch.allclose(s.bullseye(), torch.full_like(x0, expected))  # anchors count from the next round


def test_auto_p_is_p_star_for_the_fleet_and_table_age_is_recorded() -> None:
    agents = [f"a{i}" for i in range(20)]
    s = create_strategy("fedamd", _state(), participants=5, lr=0.1, seed=2)  # p defaults to "auto"
    layout = s.layout
    assert s.p is None
    s.configure(0, 0, agents)
    s.aggregate(0, 0, [_grad_result(a, 1.0, layout) for a in agents])
    assert s.history[-1]["table_age_mean"] == 0.0  # the init pass reads no table
    assert s.round_note() == "fedamd init pass: 20 table rows"
    s.configure(1, 0, agents)
    assert s.p == pytest.approx(np.sqrt(4 * 16 + 2 * 4) - 8)  # p* with r = M / A = 4: 0.4853
    s.aggregate(1, 0, [])
    assert s.history[-1]["table_age_mean"] == 0.0  # the first real round (t = 0) reads rows taken at x_0
    for rnd in range(2, 5):  # nobody answers: every row ages by one round per round
        s.configure(rnd, 0, agents)
        s.aggregate(rnd, 0, [])
    assert s.history[-1]["table_age_max"] == 3.0 and s.history[-1]["table_age_mean"] == 3.0  # read at t = 3
    while True:  # a round with an anchor: its row is taken at x_t and is fresh the round after
        tasks = s.configure(s.t + 1, 0, agents)
        anchors = [a for a, t in tasks.items() if t.config["role"] == "anchor"]
        t_now = s.t
        s.aggregate(t_now + 1, 0, [_grad_result(a, 2.0, layout) for a in tasks])
        if anchors:
            break
    assert all(s.computed_at[a] == t_now for a in anchors)
    s.configure(s.t + 1, 0, agents)
    s.aggregate(s.t + 1, 0, [])
    expected = (len(anchors) * 1 + (20 - len(anchors)) * (t_now + 1)) / 20
    assert s.history[-1]["table_age_mean"] == pytest.approx(expected)
    assert s.history[-1]["table_age_max"] == t_now + 1
    note = s.round_note()
    assert note.startswith("fedamd p 0.485  anchors 0 miners 0") and f"(max {t_now + 1})" in note
    assert s.extra_state()["p"] == s.p


def test_periodic_mode_counts_the_init_pass_as_round_zero() -> None:
    """The first real round after the initialisation pass is a miner round; anchors every P rounds after."""
    agents = [f"a{i}" for i in range(6)]
    s = create_strategy("fedamd", _state(), participants=3, mode="periodic", period=3, lr=0.1, seed=1)
    s.configure(0, 0, agents)
    s.aggregate(0, 0, [_grad_result(a, 1.0, s.layout) for a in agents])  # the init pass: all anchors
    roles = []
    for rnd in range(1, 8):
        tasks = s.configure(rnd, 0, agents)
        roles.append({t.config["role"] for t in tasks.values()})
        s.aggregate(rnd, 0, [])
    assert roles == [{"miner"}, {"miner"}, {"anchor"}, {"miner"}, {"miner"}, {"anchor"}, {"miner"}]


@pytest.mark.parametrize("period", [1, 0, 2.5, True, None])
def test_periodic_mode_needs_a_period_of_at_least_two(period) -> None:
    with pytest.raises(ConfigError, match="field 'period' must be an integer >= 2") as err:
        create_strategy("fedamd", _state(), mode="periodic", period=period)
    assert "\n" not in str(err.value)


def test_strategy_config_errors() -> None:
    with pytest.raises(ConfigError):
        create_strategy("fedamd", _state(), mode="periodic", period=0)
    with pytest.raises(ConfigError):
        create_strategy("fedamd", _state(), p=1.2)
    with pytest.raises(ConfigError):
        create_strategy("fedamd", _state(), mode="sometimes")
    with pytest.raises(ConfigError, match="'auto' or a number"):
        create_strategy("fedamd", _state(), p="often")
    with pytest.raises(ConfigError):
        create_strategy("fedamd", _state(), p=[0.2])


def test_fedamd_reduces_loss_end_to_end() -> None:
    shards = {f"a{i}": _data(n=30, seed=i) for i in range(8)}
    state = _state()
    s = create_strategy("fedamd", state, participants=4, p=0.25, lr=0.5, local_steps=5, batch=8, seed=0)
    run_strategy(s, shards, 15)
    params0 = {k: v.numpy() for k, v in state.items()}
    params = {k: v.numpy() for k, v in s.global_state().items()}
    before = np.mean([mlp.loss(params0, d.x, d.y) for d in shards.values()])
    after = np.mean([mlp.loss(params, d.x, d.y) for d in shards.values()])
    assert after < 0.8 * before


def test_bench_fedamd_quick_smoke(tmp_path, capsys) -> None:
    from fedfleet.tools.bench import fedamd as bench_fedamd
    from fedfleet.tools.bench.output import details

    path = tmp_path / "fedamd.json"
    png = tmp_path / "fedamd.png"
    assert bench_fedamd.main(["--quick", "--rounds", "4", "--json", str(path), "--plot", str(png)]) == 0
    out = json.loads(path.read_text())
    assert {"target_loss", "rounds_to_target_fedavg", "rounds_to_target_fedamd", "round_ratio"} == set(out)
    out.update(details(capsys.readouterr().err))
    assert out["grad_evals_per_round"]["fedavg"] == 5 * 10 * 16
    assert out["rounds_to_target_fedavg"] == 2
    assert out["fedamd_p"] == pytest.approx(0.4853, abs=1e-4)  # the default p = "auto" is p* for M = 20, A = 5
    assert out["bullseye_rel_error_median"]["fedamd_p0.2_fresh_bullseye"] == 0.0
    assert out["bullseye_rel_error_median"]["fedamd_p0.2"] > 0.0
    assert out["grad_evals_to_target"]["fedavg"] == 2 * 800
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
