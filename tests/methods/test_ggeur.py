"""GGEUR's maths and its learner/strategy pair: exact pooling, the packed triangle, the guide rule, the
checks on covariances, the augmentation rules, and the exchange's geometry against a direct computation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedfleet.coordinator.strategies import create as create_strategy
from fedfleet.coordinator.strategies.base import ClientResult
from fedfleet.edge_agent import class_stats
from fedfleet.edge_agent.errors import ConfigError, ProtocolError
from fedfleet.edge_agent.learners import LocalData, Task
from fedfleet.edge_agent.learners import create as create_learner
from fedfleet.edge_agent.learners.ggeur import multi_domain, single_domain
from fedfleet.edge_agent.nn import mlp


def test_pooled_covariance_equals_the_covariance_of_the_concatenated_data():
    rng = np.random.default_rng(0)
    groups = [rng.normal(loc=rng.normal(size=6) * 3, scale=rng.uniform(0.2, 2.0), size=(n, 6)) for n in (3, 17, 40, 1)]
    stats = [class_stats.class_stats(g, np.zeros(len(g), int), [0]) for g in groups]
    total, mu, cov = class_stats.pool([s[0][0] for s in stats], [s[1][0] for s in stats], [s[2][0] for s in stats])
    concat = np.concatenate(groups)
    assert total == len(concat)
    np.testing.assert_allclose(mu, concat.mean(axis=0), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(cov, np.cov(concat, rowvar=False, bias=True), rtol=1e-10, atol=1e-12)


def test_pooled_statistics_survive_the_float32_packed_upper_triangle():
    rng = np.random.default_rng(1)
    groups = [rng.normal(size=(n, 64)) @ rng.normal(size=(64, 64)) for n in (30, 80)]
    ups = []
    for g in groups:
        n, mu, cov = class_stats.class_stats(g, np.zeros(len(g), int), [0])
        ups.append((n[0], mu[0].astype(np.float32), class_stats.pack_upper(cov[0]).astype(np.float32)))
    assert ups[0][2].shape == (64 * 65 // 2,)
    _, _, cov = class_stats.pool([u[0] for u in ups], [u[1] for u in ups],
                                 [class_stats.unpack_upper(u[2], 64) for u in ups])
    want = np.cov(np.concatenate(groups), rowvar=False, bias=True)
    np.testing.assert_allclose(cov, want, rtol=1e-5, atol=1e-4 * np.abs(want).max())


def test_packing_round_trips_and_refuses_what_is_not_a_covariance():
    a = np.arange(16.0).reshape(4, 4)
    sym = a + a.T
    np.testing.assert_array_equal(class_stats.unpack_upper(class_stats.pack_upper(sym)), sym)
    with pytest.raises(class_stats.StatsError) as exc:
        class_stats.pack_upper(a)
    assert exc.value.reason == "not_symmetric"
    with pytest.raises(class_stats.StatsError, match="not_symmetric"):
        class_stats.check_covariance(a)
    with pytest.raises(class_stats.StatsError, match="shape"):
        class_stats.unpack_upper(np.zeros(7))
    with pytest.raises(class_stats.StatsError, match="nonfinite"):
        class_stats.check_covariance(np.full((2, 2), np.nan))
    with pytest.raises(class_stats.StatsError, match="not_psd"):
        class_stats.check_covariance(np.diag([1.0, -0.5]))
    noisy = np.diag([1.0, 0.5, -1e-9])  # round-off below zero is accepted and clipped later
    assert class_stats.check_covariance(noisy) is not None
    lam = class_stats.shrink_spectrum(np.array([-1e-9, 1.0, 3.0]), 0.0)
    np.testing.assert_array_equal(lam, [0.0, 1.0, 3.0])
    np.testing.assert_allclose(class_stats.shrink_spectrum(np.array([0.0, 1.0, 5.0]), 0.5), [1.0, 1.5, 3.5])


def test_guide_clients_take_the_largest_holders_up_to_the_threshold():
    counts = {"a": 5, "b": 50, "c": 30, "d": 15, "e": 0}
    assert class_stats.guide_clients(counts, 0.8) == ["b", "c"]  # 80 of 100
    assert class_stats.guide_clients(counts, 0.81) == ["b", "c", "d"]
    assert class_stats.guide_clients(counts, 1.0) == ["b", "c", "d", "a"]
    assert class_stats.guide_clients({"a": 0}, 0.8) == []


def test_perturbations_follow_the_global_covariance():
    rng = np.random.default_rng(2)
    m = rng.normal(size=(5, 5))
    cov = m @ m.T
    lam, xi = np.linalg.eigh(cov)
    draws = class_stats.perturb(np.zeros((40_000, 5)), xi, lam, rng)
    np.testing.assert_allclose(np.cov(draws, rowvar=False), cov, atol=0.05 * np.abs(cov).max())


def _geo(d: int, classes: list[int], target: int) -> dict[int, tuple[np.ndarray, np.ndarray, int]]:
    return {c: (np.eye(d), np.full(d, 0.01), target) for c in classes}


def test_single_domain_fills_present_classes_to_their_target_only():
    rng = np.random.default_rng(3)
    feats = rng.normal(size=(13, 4)).astype(np.float32)
    y = np.array([0] * 3 + [1] * 10)
    x_syn, y_syn = single_domain(feats, y, _geo(4, [0, 1, 2], 15), 10, rng)
    assert np.bincount(y_syn, minlength=3).tolist() == [12, 5, 0]  # class 2 is absent locally: stays absent
    # n_cur >= need: one point around each of `need` distinct originals (here within 0.1 * 4 sigma of one)
    near = np.abs(x_syn[y_syn == 1][:, None, :] - feats[y == 1][None]).max(axis=2).min(axis=1)
    assert (near < 0.6).all()
    assert single_domain(feats, y, _geo(4, [1], 10), 10, rng)[0].shape == (0, 4)  # target reached


def test_multi_domain_uses_prototypes_and_subsamples_excess_originals():
    rng = np.random.default_rng(4)
    feats = rng.normal(size=(30, 3)).astype(np.float32)
    y = np.array([0] * 25 + [1] * 5)
    protos = {1: [np.full(3, 10.0)], 2: [np.full(3, -10.0), np.full(3, 20.0)]}
    cfg = {"per_sample": 12, "local_pool": 20, "proto_pool": 20}
    x_syn, y_syn, keep = multi_domain(feats, y, _geo(3, [0, 1, 2], 20), protos, cfg, rng)
    assert len(keep) == 20 + 5 and set(y[keep]) == {0, 1}  # 25 originals of class 0 cut to the target
    assert np.bincount(y_syn, minlength=3).tolist() == [0, 15, 20]
    assert np.isclose(np.abs(x_syn[y_syn == 2]).mean(), 15.0, atol=1.0)  # around the other domains' prototypes


class _Features:
    """The learner's view of a model: embeddings are the inputs themselves."""

    def features(self, x: np.ndarray, cache_key: str | None = None) -> np.ndarray:
        return np.asarray(x, np.float32)


def _exchange(shards: dict[str, LocalData], d: int, n_classes: int, **config):
    state = {k: torch.from_numpy(v) for k, v in mlp.init([d, n_classes], seed=0).items()}
    strategy = create_strategy("ggeur", state, lr=0.1, epochs=1, batch=8, seed=1, **config)
    learners = {a: create_learner("ggeur") for a in shards}
    seen = []
    assert strategy.phases == 4
    for phase in range(strategy.phases):
        results = []
        for a, spec in strategy.configure(1, phase, sorted(shards)).items():
            out = learners[a].learn(Task("r", 1, "ggeur", spec.config, spec.tensors, phase), shards[a], _Features())
            res = ClientResult(a, {n: np.asarray(out.tensors[n], np.float32) for n, _ in spec.expect}, out.samples,
                               out.metrics)
            assert [(n, tuple(res.tensors[n].shape)) for n, _ in spec.expect] == spec.expect
            strategy.check(1, phase, res)
            results.append(res)
        seen.append((strategy.stage(phase), sorted(r.agent for r in results)))
        strategy.aggregate(1, phase, results)
    assert strategy.phases == 1
    return strategy, learners, seen


def test_exchange_geometry_is_the_eigendecomposition_of_the_guides_pooled_statistics():
    rng = np.random.default_rng(5)
    d, n_classes = 5, 3
    sizes = {"a": [40, 0, 2], "b": [9, 30, 0], "c": [1, 12, 20]}
    shards = {}
    for a, ns in sizes.items():
        y = np.concatenate([np.full(n, c) for c, n in enumerate(ns)]).astype(np.int64)
        x = (rng.normal(size=(len(y), d)) * (1 + y[:, None]) + 3 * y[:, None]).astype(np.float32)
        shards[a] = LocalData(x, y)
    strategy, learners, seen = _exchange(shards, d, n_classes, shrinkage=0.0)
    assert [s for s, _ in seen] == ["census", "stats", "geometry", "train"]
    assert strategy.requests == {"a": [0], "b": [1], "c": [1, 2]}  # 0.8 of 50, 42 and 22
    for c, guides in {0: ["a"], 1: ["b", "c"], 2: ["c"]}.items():
        x = np.concatenate([shards[g].x[shards[g].y == c] for g in guides]).astype(np.float64)
        want = np.cov(x, rowvar=False, bias=True)
        xi, lam, total = strategy.geometry[c]
        assert total == len(x)
        np.testing.assert_allclose(xi @ np.diag(lam) @ xi.T, want, atol=1e-4 * np.abs(want).max())
    # every agent filled its present classes to the class's global count
    for a, ns in sizes.items():
        x_syn, y_syn = learners[a].synthetic
        totals = np.sum(list(sizes.values()), axis=0)
        assert np.bincount(y_syn, minlength=3).tolist() == [t - n if n else 0 for t, n in zip(totals, ns)]


def test_stats_checks_refuse_with_a_reason():
    rng = np.random.default_rng(6)
    y = np.repeat(np.arange(2), 10)
    shards = {"a": LocalData(rng.normal(size=(20, 3)).astype(np.float32), y)}
    strategy, _, _ = _exchange(shards, 3, 2)
    strategy._stages = ("census", "stats", "geometry", "train")
    good = {"classes": np.array([0, 1], np.float32), "n": np.array([10, 10], np.float32),
            "mean": np.zeros((2, 3), np.float32), "cov": np.tile(class_stats.pack_upper(np.eye(3)), (2, 1))}

    def reason(**change) -> str:
        with pytest.raises(ProtocolError) as exc:
            strategy.check(1, 1, ClientResult("a", {**good, **change}, 20))
        return exc.value.reason

    strategy.check(1, 1, ClientResult("a", good, 20))
    assert reason(classes=np.array([0, 7], np.float32)) == "unknown_class"
    assert reason(classes=np.array([1, 0], np.float32)) == "class_mismatch"
    assert reason(n=np.array([-1, 10], np.float32)) == "negative_n"
    assert reason(n=np.array([9, 10], np.float32)) == "n_mismatch"
    assert reason(cov=np.tile(class_stats.pack_upper(np.diag([1.0, 1.0, -2.0])), (2, 1))) == "not_psd"
    with pytest.raises(ProtocolError, match="negative_n"):
        strategy.check(1, 0, ClientResult("a", {"counts": np.array([-3, 2], np.float32)}, 1))


def test_bad_config_is_a_config_error_naming_the_field():
    state = {k: torch.from_numpy(v) for k, v in mlp.init([4, 3], seed=0).items()}
    for field, value in (("guide", 1.5), ("variant", "both"), ("shrinkage", -1), ("target", "half")):
        with pytest.raises(ConfigError, match=field):
            create_strategy("ggeur", state, **{field: value})


def test_an_agent_that_lost_its_synthetic_set_gets_the_geometry_again():
    rng = np.random.default_rng(7)
    y = np.repeat(np.arange(2), [12, 3])
    shards = {"a": LocalData(rng.normal(size=(15, 3)).astype(np.float32), y),
              "b": LocalData(rng.normal(size=(15, 3)).astype(np.float32), y[::-1].copy())}
    strategy, learners, _ = _exchange(shards, 3, 2)
    assert strategy.delivered == {"a": 15 - 3 + 15 - 12, "b": 15 - 3 + 15 - 12}

    def train_round(r: int) -> dict:
        tasks = strategy.configure(r, 0, ["a", "b"])
        results = []
        for a, spec in tasks.items():
            out = learners[a].learn(Task("r", r, "ggeur", spec.config, spec.tensors, 0), shards[a], _Features())
            results.append(ClientResult(a, {n: out.tensors[n] for n, _ in spec.expect}, out.samples, out.metrics))
        strategy.aggregate(r, 0, results)
        return tasks

    assert not any(k.startswith("g.") for k in train_round(2)["a"].tensors)
    learners["a"] = create_learner("ggeur")  # a restart: the synthetic set is gone
    train_round(3)
    assert "a" not in strategy.delivered and strategy.delivered["b"] == 15
    tasks = train_round(4)
    assert "g.xi" in tasks["a"].tensors and "g.xi" not in tasks["b"].tensors
    assert strategy.delivered["a"] == 15 and len(learners["a"].synthetic[1]) == 15
