"""Zeroth-order methods: GP maths, shared RFF draws, query accounting, FedZO and FZooS end to end in-process."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from fedfleet.coordinator.strategies import create as create_strategy
from fedfleet.coordinator.strategies._zo_rff import rff_tensors, surrogate_grad
from fedfleet.edge_agent.errors import ConfigError
from fedfleet.edge_agent.learners import create as create_learner
from fedfleet.edge_agent.learners.base import LocalData, Task
from fedfleet.edge_agent.zo import gp, rff
from fedfleet.edge_agent.zo.objectives import (
    Counted,
    Quadratic,
    VectorView,
    global_quadratic,
    macro_f1,
    quadratic_coeffs,
    quadratic_configs,
    quadratic_optimum,
)

EMPTY = LocalData(np.zeros((0, 1), np.float32), np.zeros(0, np.int64))
SMALL = {"gp_restarts": 2, "rff_features": 512, "local_steps": 3, "explore_candidates": 40,
         "refresh_candidates": 60, "refresh_pick": 20}


def _posterior(kind: str, seed: int = 0) -> gp.GPPosterior:
    rng = np.random.default_rng(seed)
    x = rng.uniform(0, 1, (30, 4))
    y = np.sin(3 * x.sum(1)) + x[:, 0] ** 2
    ls = gp.fit_lengthscale(x, y, kind=kind, restarts=2, rng=np.random.default_rng(seed))
    return gp.GPPosterior.condition(x, y, kind=kind, lengthscale=ls)


@pytest.mark.parametrize("kind", ["se", "matern52"])
def test_gp_mean_gradient_matches_finite_differences(kind: str) -> None:
    post = _posterior(kind)
    for xq in np.random.default_rng(1).uniform(0, 1, (5, 4)):
        h = 1e-5
        fd = np.array([(post.mean(xq + h * e) - post.mean(xq - h * e))[0] / (2 * h) for e in np.eye(4)])
        np.testing.assert_allclose(post.grad_mean(xq), fd, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", ["se", "matern52"])
def test_gradient_variance_trace_matches_posterior_covariance(kind: str) -> None:
    post = _posterior(kind, seed=2)

    def kpost(a: np.ndarray, b: np.ndarray) -> float:
        ka = gp.kernel(a[None], post.x, kind, post.lengthscale)[0]
        kb = gp.kernel(b[None], post.x, kind, post.lengthscale)[0]
        za, zb = gp.tri_solve(post.chol, ka), gp.tri_solve(post.chol, kb)
        return post.sigma2 * (gp.kernel(a[None], b[None], kind, post.lengthscale)[0, 0] - za @ zb)

    h = 1e-4
    for xq in np.random.default_rng(3).uniform(0, 1, (3, 4)):
        tr = 0.0
        for e in np.eye(4):
            tr += (kpost(xq + h * e, xq + h * e) - kpost(xq + h * e, xq - h * e)
                   - kpost(xq - h * e, xq + h * e) + kpost(xq - h * e, xq - h * e)) / (4 * h * h)
        np.testing.assert_allclose(post.grad_var_trace(xq[None])[0], tr, rtol=2e-3)
    # conditioning on data shrinks the gradient uncertainty below the prior
    prior = post.sigma2 * 4 * gp.prior_grad_var(kind, post.lengthscale)
    assert post.grad_var_trace(post.x[:3]).max() < prior


def test_flat_targets_are_guarded() -> None:
    x = np.random.default_rng(0).uniform(0, 1, (20, 3))
    y = np.full(20, 2.5)
    post = gp.fit_local(x, y, x[0], restarts=2, rng=np.random.default_rng(0))
    assert np.all(post.grad_mean(x[0]) == 0)
    feats = rff.RFF.from_seed(3, 256, 1.0, 0)
    nu, s = feats.fit(x, y)
    assert np.all(np.isfinite(nu)) and s == 1.0


def test_rff_draws_identical_on_edge_and_coordinator() -> None:
    omega, b = rff.draw(7, 300, 0.5, seed=42)
    t_omega, t_b = rff_tensors(7, 300, 0.5, seed=42)
    assert torch.equal(torch.from_numpy(omega), t_omega) and torch.equal(torch.from_numpy(b), t_b)
    assert np.array_equal(rff.RFF.from_seed(7, 300, 0.5, 42).omega, omega)
    assert not np.array_equal(rff.draw(7, 300, 0.5, seed=43)[0], omega)
    nu = np.random.default_rng(0).standard_normal(300)
    x = np.random.default_rng(1).uniform(0, 1, 7)
    edge = rff.RFF(omega, b).grad(x, nu)
    coord = surrogate_grad(torch.from_numpy(x), torch.from_numpy(nu), t_omega, t_b).numpy()
    np.testing.assert_allclose(edge, coord, rtol=1e-12, atol=1e-12)


def test_rff_gradient_and_fit() -> None:
    feats = rff.RFF.from_seed(3, 2000, 1.0, 0)
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 1, (200, 3))
    y = np.exp(-((x - 0.5) ** 2).sum(1))
    nu, s = feats.fit(x, y)  # M >> n: the jittered n×n solve must stay finite and interpolate
    pred = s * feats.predict(x, nu)
    assert np.corrcoef(pred, y)[0, 1] > 0.99
    xq = np.array([0.2, 0.7, 0.4])
    h = 1e-6
    fd = np.array([(feats.predict(xq + h * e, nu) - feats.predict(xq - h * e, nu))[0] / (2 * h) for e in np.eye(3)])
    np.testing.assert_allclose(feats.grad(xq, nu), fd, rtol=1e-5, atol=1e-8)
    true = -2 * (xq - 0.5) * np.exp(-((xq - 0.5) ** 2).sum())
    g = s * feats.grad(xq, nu)
    assert g @ true / np.linalg.norm(g) / np.linalg.norm(true) > 0.9


def test_quadratic_closed_form_and_counting() -> None:
    c1, c2 = quadratic_coeffs(6, 4, 0.5, seed=0)
    assert np.all(c1 > 0)
    big = global_quadratic(c1, c2, np.ones(4))
    xs, fs = quadratic_optimum(big)
    for x in np.random.default_rng(0).uniform(0, 1, (50, 6)):
        assert big(x) >= fs - 1e-12
    np.testing.assert_allclose(big.grad(xs), 0, atol=1e-9)
    f = Counted(Quadratic(c1[0], c2[0]))
    for _ in range(7):
        f(xs)
    assert f.queries == 7


def test_macro_f1_matches_sklearn() -> None:
    from sklearn.metrics import f1_score

    rng = np.random.default_rng(0)
    for _ in range(5):
        y = rng.integers(0, 6, 80)
        p = np.where(rng.uniform(size=80) < 0.6, y, rng.integers(0, 8, 80))
        assert macro_f1(y, p) == pytest.approx(f1_score(y, p, average="macro"))


def _quad_task(phase: int, x: np.ndarray, cfg: dict, r: int = 1, **extra: object) -> Task:
    return Task("t", r, "fzoos", {**cfg, **SMALL, **extra}, {"x": x.astype(np.float32)}, phase=phase)


def test_fzoos_query_counts_history_and_surrogate_cosine() -> None:
    cfg = quadratic_configs(12, 3, 0.5, seed=0)[0]
    learner = create_learner("fzoos")
    x0 = np.random.default_rng(0).uniform(0.2, 0.8, 12)
    t = SMALL["local_steps"]
    res = learner.learn(_quad_task(0, x0, cfg), EMPTY, None)
    assert res.metrics["queries"] == 10 + 1 + t + 5 * (t - 1)
    first = np.stack(learner.xs[:20]).copy()
    assert len(learner.xs) == res.metrics["queries"]
    res = learner.learn(_quad_task(1, res.tensors["x"], cfg, rho=0.02), EMPTY, None)
    assert res.metrics["queries"] == 1 + SMALL["refresh_pick"]
    assert res.tensors["nu"].shape == (SMALL["rff_features"],)
    assert res.metrics["rff_gp_cosine"] > 0
    round2 = Task("t", 2, "fzoos", {**cfg, **SMALL},
                  {"x": x0.astype(np.float32), "nu_bar": np.zeros(SMALL["rff_features"], np.float32)}, phase=0)
    res = learner.learn(round2, EMPTY, None)
    assert res.metrics["queries"] == 1 + t + 5 * (t - 1)
    # exploration appends: the stored points never move
    np.testing.assert_array_equal(np.stack(learner.xs[:20]), first)
    assert len(learner.xs) == 10 + 1 + t + 5 * (t - 1) + 1 + SMALL["refresh_pick"] + 1 + t + 5 * (t - 1)
    # the analytic GP mean gradient points along the true gradient near the iterate
    assert res.metrics["gp_cosine"] >= 0.9


def test_fedzo_query_count_and_estimator() -> None:
    cfg = {**quadratic_configs(8, 2, 0.5, seed=1)[0], "local_steps": 4, "directions": 5, "seed": 3}
    res = create_learner("fedzo").learn(Task("t", 1, "fedzo", cfg, {"x": np.full(8, 0.9, np.float32)}), EMPTY, None)
    assert res.metrics["queries"] == 4 * (1 + 5)
    assert res.metrics["objective_last"] < res.metrics["objective_first"]
    # the d/μ two-point estimator is unbiased for a linear function: its mean over many directions is the gradient
    from fedfleet.edge_agent.learners.fedzo import sphere

    d, mu = 6, 1e-3
    a = np.arange(1, d + 1, dtype=float)
    v = sphere(np.random.default_rng(0), 20000, d)
    g = (d / mu) * ((mu * v @ a)[:, None] * v).mean(0)
    np.testing.assert_allclose(g, a, rtol=0.08)


@pytest.mark.parametrize("method", ["fedzo", "fzoos"])
def test_inprocess_federated_run_improves(method: str) -> None:
    from fedfleet.tools.bench._zo_quadratic import QUAD_FZOOS_GD, quadratic_run

    # FZooS with plain GD at lr 0.1: the spec's Adam at lr 0.01 moves too little in 3 rounds for this check
    out = quadratic_run(method, d=10, agents=3, div=0.5, rounds=3, seed=0,
                        overrides={**QUAD_FZOOS_GD, **SMALL} if method == "fzoos" else {"lr": 0.1})
    assert out.score[-1] < 0.2 * out.score[0]
    per_round = np.diff(out.queries)
    if method == "fedzo":
        assert np.all(per_round == 3 * 10 * (1 + 20))


def test_fzoos_strategy_two_exchanges() -> None:
    cfgs = quadratic_configs(5, 2, 0.5, seed=0)
    st = create_strategy("fzoos", {"x": torch.full((5,), 0.5)}, objective="quadratic", rff_features=64,
                         agent_config={"a": cfgs[0], "b": cfgs[1]})
    from fedfleet.coordinator.strategies.base import ClientResult

    tasks = st.configure(1, 0, ["a", "b"])
    assert "nu_bar" not in tasks["a"].tensors and tasks["a"].expect == [("x", (5,))]
    json.dumps(tasks["a"].config)
    st.aggregate(1, 0, [ClientResult("a", {"x": np.full(5, 0.4, np.float32)}, 1),
                        ClientResult("b", {"x": np.full(5, 0.8, np.float32)}, 3)])
    np.testing.assert_allclose(st.state["x"].numpy(), 0.4 * 0.25 + 0.8 * 0.75, rtol=1e-6)
    tasks = st.configure(1, 1, ["a", "b", "c"])
    assert sorted(tasks) == ["a", "b"] and tasks["a"].expect == [("nu", (64,))]
    assert tasks["a"].config["rho"] == pytest.approx(abs(0.7 - 0.4) / 2)
    st.aggregate(1, 1, [ClientResult("a", {"nu": np.ones(64, np.float32)}, 1),
                        ClientResult("b", {"nu": np.zeros(64, np.float32)}, 3)])
    tasks = st.configure(2, 0, ["a"])
    np.testing.assert_allclose(tasks["a"].tensors["nu_bar"], 0.25)


def test_vector_view_roundtrip() -> None:
    tensors = {"w": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.ones(2, np.float32)}
    view = VectorView(tensors, ["w", "b"])
    x = view.pack(tensors)
    assert view.d == 8
    out = view.unpack(x + 1)
    np.testing.assert_array_equal(out["w"], tensors["w"] + 1)


def test_edge_zo_never_imports_torch() -> None:
    code = ("import sys; import fedfleet.edge_agent.zo.gp, fedfleet.edge_agent.zo.rff, fedfleet.edge_agent.zo.problem; "
            "import fedfleet.edge_agent.learners.fedzo, fedfleet.edge_agent.learners.fzoos; assert 'torch' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_bench_quick(tmp_path) -> None:
    from fedfleet.tools.bench.zo import main

    out = tmp_path / "zo.json"
    assert main(["--quick", "--json", str(out), "--plot", str(tmp_path / "zo.png")]) == 0
    data = json.loads(out.read_text())
    assert set(data) == {"broker", "quadratic", "digits_f1"}
    q = data["quadratic"]
    assert set(q) == {"d", "agents", "rounds", "target_gap", "query_ratio_adam", "query_ratio_adam_is_lower_bound",
                      "query_ratio_gd", "query_ratio_gd_is_lower_bound", "queries_to_target_adam",
                      "queries_to_target_gd", "surrogate_cosine"}
    assert q["d"] == 8 and q["rounds"] == 2 and set(q["queries_to_target_adam"]) == {"fedzo", "fzoos"}
    assert set(data["digits_f1"]) == {"fedzo_f1", "fzoos_f1", "queries"}
    assert (tmp_path / "zo.png").stat().st_size > 0


def test_macro_f1_objective_on_an_edge_model_package() -> None:
    from fedfleet.edge_agent.model import EdgeModel
    from fedfleet.edge_agent.zo import problem
    from fedfleet.models.data import digits
    from fedfleet.models.package import build_package

    model = EdgeModel.from_bytes(build_package("full", seed=0))
    ds = digits()
    data = LocalData(ds.x[:200], ds.y[:200])
    head = {k: np.asarray(v, np.float32) for k, v in model.head_init.items()}
    cfg = {"objective": "macro_f1", "zo_tensors": ["fc1.weight", "fc1.bias"], "zo_path": "numpy"}
    prob = problem.build(cfg, head, data, model)
    assert prob.view.d == 10 * 32 + 10
    expected = 1.0 - macro_f1(data.y, model.logits(head, data.x).argmax(1))
    assert prob.objective(prob.x0) == pytest.approx(expected)
    task = Task("t", 1, "fedzo", {**cfg, "local_steps": 2, "directions": 3, "mu": 1.0, "lr": 0.1, "seed": 0}, head)
    res = create_learner("fedzo").learn(task, data, model)
    assert res.metrics["queries"] == 2 * (1 + 3)
    assert sorted(res.tensors) == ["fc1.bias", "fc1.weight"] and res.tensors["fc1.weight"].shape == (10, 32)
    task = Task("t", 1, "fzoos", {**cfg, **SMALL, "explore_radius": 0.05, "init_radius": 0.05}, head)
    res = create_learner("fzoos").learn(task, data, model)
    assert res.metrics["queries"] == 10 + 1 + 3 + 5 * 2


def test_lengthscale_fit_finds_the_likelihood_maximum_with_two_restarts() -> None:
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 1, (60, 6))
    y = np.sin(2 * x).sum(1)
    ys, _, _ = gp.scale_targets(y)
    d2 = gp.sqdist(x, x)
    grid = np.exp(np.linspace(np.log(1e-3), np.log(1e3), 400))
    best = max(gp._profile_lml(d2, ys, "matern52", float(v), 1e-6) for v in grid)
    for seed in range(6):
        ls = gp.fit_lengthscale(x, y, restarts=2, rng=np.random.default_rng(seed))
        assert gp._profile_lml(d2, ys, "matern52", ls, 1e-6) >= best - 1e-3


def test_fedzo_reference_options() -> None:
    """The FZooS reference's FedZO: orthonormal directions, the 1/mu estimate and a fresh Adam each round."""
    from fedfleet.edge_agent.learners.fedzo import orthonormal

    v = orthonormal(np.random.default_rng(0), 5, 9)
    np.testing.assert_allclose(v @ v.T, np.eye(5), atol=1e-12)
    cfg = {**quadratic_configs(8, 2, 0.5, seed=1)[0], "local_steps": 4, "directions": 5, "seed": 3, "lr": 0.01,
           "mu": 0.01, "optimizer": "adam", "basis": "orthonormal", "scale": "one"}
    res = create_learner("fedzo").learn(Task("t", 1, "fedzo", cfg, {"x": np.full(8, 0.9, np.float32)}), EMPTY, None)
    assert res.metrics["queries"] == 4 * (1 + 5)
    assert res.metrics["objective_last"] < res.metrics["objective_first"]
    # Adam's first step moves every coordinate the estimate touches by lr (its sign-like first step)
    one = create_learner("fedzo").learn(Task("t", 1, "fedzo", {**cfg, "local_steps": 1},
                                             {"x": np.full(8, 0.9, np.float32)}), EMPTY, None)
    step = np.abs(one.tensors["x"])
    assert np.all(step <= 0.01 + 1e-6) and step.max() > 0.0099
    with pytest.raises(ConfigError):
        create_learner("fedzo").learn(Task("t", 1, "fedzo", {**cfg, "directions": 9}, {"x": np.zeros(8, np.float32)}),
                                      EMPTY, None)
