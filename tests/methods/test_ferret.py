"""Ferret's maths and its learner/strategy pair, without a broker: blocks, bases, the unbiased projection,
the pairs codec and its refusals, per-seed aggregation, and replicas that catch up bit for bit."""

from __future__ import annotations

import numpy as np
import pytest

from fedfleet.coordinator.job.config import JobConfig
from fedfleet.coordinator.job.run import build, shards
from fedfleet.coordinator.strategies import ClientResult, create
from fedfleet.edge_agent import random_bases
from fedfleet.edge_agent.errors import CodecError, ConfigError
from fedfleet.edge_agent.learners import Task
from fedfleet.edge_agent.learners import create as create_learner
from fedfleet.edge_agent.learners.ferret import ReplicaError
from fedfleet.edge_agent.model import EdgeModel
from fedfleet.edge_agent.nn import mlp
from fedfleet.edge_agent.wire import codecs, ferret_codec


def test_blocks_follow_the_median_rule():
    sizes = lambda layout: [b.size for b in random_bases.split_blocks(layout)]  # noqa: E731
    assert sizes(mlp.layout([64, 32, 10])) == [2048, 32, 320, 10]
    assert sizes(mlp.layout([784, 128, 10])) == [100352, 128, 1280, 10]
    # small neighbours merge while they stay within 0.9 x the median size (here 0.9 x 17 = 15.3)
    layout = [("a", (100,)), ("b", (4,)), ("c", (4,)), ("d", (4,)), ("e", (30,)), ("f", (40,))]
    assert [b.names for b in random_bases.split_blocks(layout)] == [("a",), ("b", "c", "d"), ("e",), ("f",)]


def test_block_k_rule():
    assert random_bases.block_sizes_k(np.array([10.0, 5.0, 0.1, 0.0]), 100).tolist() == [100, 50, 2, 2]
    assert random_bases.block_sizes_k(np.zeros(3), 64).tolist() == [2, 2, 2]


def test_bases_are_uniform_with_the_stated_variance_and_reproducible():
    pool = random_bases.Pool(seed=7, k=4)
    block = random_bases.Block(0, ("w",), ((5000,),), 5000)
    v = random_bases.basis(pool, 3, block, 1)
    a = 1 / np.sqrt(5000)
    assert v.dtype == np.float32 and np.abs(v).max() <= a
    assert abs(v.var() / block.rho - 1) < 0.05
    assert np.array_equal(v, random_bases.basis(pool, 3, block, 1))
    assert not np.array_equal(v, random_bases.basis(pool, 4, block, 1))  # fresh pool: another round, other bases
    fixed = random_bases.Pool(seed=7, k=4, fresh=False)
    assert np.array_equal(random_bases.basis(fixed, 3, block, 1), random_bases.basis(fixed, 9, block, 1))


def test_reconstruction_is_unbiased_and_a_single_draw_errs_by_sqrt_d_over_k():
    d, k, draws = 320, 32, 1500
    block = random_bases.Block(0, ("w",), ((d,),), d)
    delta = np.random.default_rng(0).normal(size=d).astype(np.float32)
    ks = np.arange(k)
    recon = []
    for s in range(draws):
        pool = random_bases.Pool(seed=s, k=k)
        cache = random_bases.BasisCache(0)
        gamma = random_bases.project(delta, pool, 1, block, ks, cache)
        recon.append(random_bases.reconstruct(gamma.astype(np.float32), pool, 1, block, cache))
    recon = np.array(recon, np.float64)
    single = np.linalg.norm(recon - delta, axis=1) / np.linalg.norm(delta)
    assert abs(np.sqrt(np.mean(single**2)) / np.sqrt(d / k) - 1) < 0.1, np.sqrt(np.mean(single**2))
    mean_err = np.linalg.norm(recon.mean(axis=0) - delta) / np.linalg.norm(delta)
    assert mean_err < 2.5 * np.sqrt(d / k / draws), mean_err  # shrinks as 1/sqrt(draws): unbiased
    assert mean_err < 0.2 * single.mean()


def test_cache_changes_nothing_and_respects_its_budget():
    layout = mlp.layout([64, 32, 10])
    blocks = random_bases.split_blocks(layout)
    pool = random_bases.Pool(seed=1, k=50)
    w = mlp.init([64, 32, 10], 0)
    coef = np.random.default_rng(2).normal(size=(len(blocks), 50)).astype(np.float32)
    coef[1, ::2] = 0
    small = random_bases.BasisCache(20_000)
    a = random_bases.apply_step(w, blocks, pool, 5, coef, random_bases.BasisCache(0))
    b = random_bases.apply_step(w, blocks, pool, 5, coef, small)
    c = random_bases.apply_step(w, blocks, pool, 5, coef, small)  # now partly from the cache
    assert small.peak <= 20_000 and small.hits > 0
    assert random_bases.digest(a, layout) == random_bases.digest(b, layout) == random_bases.digest(c, layout)


LAYOUT = [("gamma.0", (100,)), ("gamma.1", (100,)), ("gamma.2", (7,))]


def _pairs(*blocks: tuple[list[int], list[float]]) -> bytes:
    out = b""
    for idx, val in blocks:
        out += np.uint16(len(idx)).tobytes() + np.array(idx, "<u2").tobytes() + np.array(val, "<f4").tobytes()
    return out


def test_pairs_codec_sends_only_the_pairs():
    t = {n: np.zeros(s, np.float32) for n, s in LAYOUT}
    t["gamma.0"][[3, 50, 99]] = [1.5, -2.0, 0.25]
    t["gamma.2"][6] = 4.0
    data = codecs.encode(t, LAYOUT, {"name": "ferret"})
    assert len(data) == 2 * 3 + 6 * 4
    back = codecs.decode(data, LAYOUT, {"name": "ferret"}, max_bytes=1 << 20)
    assert all(np.array_equal(back[n], t[n]) for n, _ in LAYOUT)
    assert codecs.check_spec({"name": "ferret"}) == {"name": "ferret"}


@pytest.mark.parametrize(("payload", "reason"), [
    (_pairs(([3, 100], [1.0, 2.0]), ([], []), ([], [])), "index_range"),
    (_pairs(([3, 3], [1.0, 2.0]), ([], []), ([], [])), "duplicate_index"),
    (_pairs(([], []), ([], []), (list(range(7)) + [0], [1.0] * 8)), "too_many_pairs"),
    (_pairs(([1], [float("nan")]), ([], []), ([], [])), "nonfinite"),
    (_pairs(([1], [float("inf")]), ([], []), ([], [])), "nonfinite"),
    (_pairs(([1], [1.0]), ([], []))[:-1], "shape"),
    (_pairs(([1], [1.0]), ([], []), ([], [])) + b"\x00", "shape"),
])
def test_pairs_codec_refuses_bad_uploads_with_a_reason(payload, reason):
    with pytest.raises(CodecError) as info:
        codecs.decode(payload, LAYOUT, {"name": "ferret"}, max_bytes=1 << 20)
    assert info.value.reason == reason


@pytest.fixture(scope="module")
def digits():
    cfg = JobConfig(mode="full", dataset="digits", agents=6, alpha=0.5)
    blob, cmodel = build(cfg)
    local, test = shards(cfg)
    return cmodel, EdgeModel.from_bytes(blob), local, test


def _round(strategy, learners, local, model, r, agents, run="run"):
    tasks = strategy.configure(r, 0, agents)
    results = []
    for a, spec in tasks.items():
        out = learners[a].learn(Task(run, r, "ferret", spec.config, spec.tensors), local[int(a[1:])], model)
        results.append(ClientResult(a, out.tensors, out.samples, out.metrics))
    strategy.aggregate(r, 0, results)
    return tasks, results


def test_ferret_learns_digits_and_a_late_or_absent_agent_catches_up_bit_for_bit(digits):
    cmodel, model, local, test = digits
    strategy = create("ferret", cmodel.initial_state(), k=64, seed=3)
    learners = {f"a{i}": create_learner("ferret") for i in range(6)}
    acc0 = cmodel.evaluate(strategy.global_state(), test.x, test.y)[0]
    digests = {0: strategy.w_digest}
    for r in range(1, 9):
        agents = [f"a{i}" for i in range(5)] if r != 4 else ["a0", "a1"]  # a5 joins at round 6 only
        agents += ["a5"] if r >= 6 else []
        _round(strategy, learners, local, model, r, agents)
        digests[r] = strategy.w_digest
        held_round, held = learners["a0"].replicas["run"]
        assert held_round == r - 1 and random_bases.digest(held, strategy.layout) == digests[r - 1]
    acc = cmodel.evaluate(strategy.global_state(), test.x, test.y)[0]
    assert acc > acc0 + 0.3 and acc > 0.6, (acc0, acc)
    log = {(r, a): (kind, n) for r, a, kind, n in strategy.sync_log}
    assert log[(1, "a0")] == ("history", 0)  # round 1: the package's initial tensors
    assert log[(5, "a2")] == ("history", 2)  # a2 sat out round 4: rounds 3 and 4 of coefficients
    assert log[(6, "a5")] == ("history", 5)  # the late joiner: package + five rounds of coefficients
    assert learners["a5"].replicas["run"][0] == 7
    assert random_bases.digest(learners["a5"].replicas["run"][1], strategy.layout) == digests[7]
    state = strategy.global_state()  # the torch mirror holds the same bits as the numpy replica
    assert all(np.array_equal(state[n].numpy(), strategy.w[n]) for n in state)


def test_full_catch_up_and_replica_errors(digits):
    cmodel, model, local, _ = digits
    strategy = create("ferret", cmodel.initial_state(), k=32, seed=1, catch_up="full")
    learners = {f"a{i}": create_learner("ferret") for i in range(3)}
    for r in (1, 2):
        _round(strategy, learners, local, model, r, ["a0", "a1"])
    tasks, _ = _round(strategy, learners, local, model, 3, ["a0", "a1", "a2"])
    assert tasks["a2"].config["sync"]["kind"] == "full" and "fc0.weight" in tasks["a2"].tensors
    auto = create("ferret", cmodel.initial_state(), k=32, seed=1)
    for r in (1, 2):
        _round(auto, learners, local, model, r, ["a0"], run="other")
    spec = auto.configure(3, 0, ["a0"])["a0"]
    fresh = create_learner("ferret")  # a restarted agent: it lost its replica of round 1
    with pytest.raises(ReplicaError):
        fresh.learn(Task("other", 3, "ferret", spec.config, spec.tensors), local[0], model)
    auto.aggregate(3, 0, [])  # no valid result from a0: next time it rebuilds from the package (round 0)
    spec = auto.configure(4, 0, ["a0"])["a0"]
    assert spec.config["sync"]["kind"] == "history" and spec.config["sync"]["base"] == 0
    assert sorted(spec.tensors) == ["coef.1", "coef.2"]
    fresh.learn(Task("other", 4, "ferret", spec.config, spec.tensors), local[0], model)
    assert random_bases.digest(fresh.replicas["other"][1], auto.layout) == auto.w_digest
    # a task whose digest does not match what the agent rebuilds is refused, not trained on
    spec = auto.configure(4, 0, ["a0"])["a0"]
    fresh = create_learner("ferret")
    spec.config["sync"]["digest"] = "0" * 24
    with pytest.raises(ReplicaError):
        fresh.learn(Task("other", 4, "ferret", spec.config, spec.tensors), local[0], model)


def test_per_seed_aggregation_equals_the_mean_of_the_reconstructed_updates(digits):
    cmodel, model, local, _ = digits
    strategy = create("ferret", cmodel.initial_state(), k=40, seed=5, server_lr=0.5)
    w0 = {n: v.copy() for n, v in strategy.w.items()}
    learners = {f"a{i}": create_learner("ferret") for i in range(3)}
    _, results = _round(strategy, learners, local, model, 1, ["a0", "a1", "a2"])
    p = np.array([r.samples for r in results], np.float64)
    p /= p.sum()
    pool, cache = strategy.pool, random_bases.BasisCache(0)
    for b in strategy.blocks:
        recon = [random_bases.reconstruct(r.tensors[f"gamma.{b.index}"], pool, 1, b, cache) for r in results]
        want = random_bases.flat_block(w0, b) - 0.5 * np.tensordot(p, np.array(recon, np.float64), axes=1)
        np.testing.assert_allclose(random_bases.flat_block(strategy.w, b), want, rtol=1e-4, atol=1e-6)


def test_per_seed_clip_and_bad_config(digits):
    cmodel, model, local, _ = digits
    strategy = create("ferret", cmodel.initial_state(), k=16, seed=5, clip=1e-3)
    learners = {"a0": create_learner("ferret")}
    _round(strategy, learners, local, model, 1, ["a0"])
    coef = strategy.history[1]
    for b in strategy.blocks:
        for k in np.flatnonzero(coef[b.index]):
            u = coef[b.index, k] * random_bases.basis(strategy.pool, 1, b, int(k))
            assert np.linalg.norm(u) <= 1e-3 * (1 + 1e-5)
    assert strategy.notes[-1]["clipped"] > 0
    for bad in ({"k": 0}, {"pool": "forever"}, {"momentum": 0.9}, {"weighting": "odd"},
                {"uplink": {"name": "fedzip"}}, {"server_lr": 0}, {"server_lr": "fast"}, {"local_steps": 0},
                {"batch": 2.5}, {"lr": "x"}):
        with pytest.raises(ConfigError):
            create("ferret", cmodel.initial_state(), **bad)


def test_pairs_upload_is_far_smaller_than_the_dense_update(digits):
    cmodel, model, local, _ = digits
    strategy = create("ferret", cmodel.initial_state(), k=64, seed=2)
    learners = {"a0": create_learner("ferret")}
    tasks, results = _round(strategy, learners, local, model, 1, ["a0"])
    expect = tasks["a0"].expect
    data = codecs.encode(results[0].tensors, expect, {"name": "ferret"})
    pairs = sum(int(np.count_nonzero(results[0].tensors[n])) for n, _ in expect)
    assert len(data) == 2 * len(expect) + 6 * pairs and pairs == results[0].metrics["pairs"]
    assert pairs <= 64 * len(expect) and len(data) * 10 < 4 * strategy.d  # digits: 740 B against 9,640 B
    assert ferret_codec.decode(data, expect)["gamma.0"].shape == (64,)
