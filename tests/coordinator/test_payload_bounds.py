"""Issue 28, the method payloads: one device key cannot set its own weight, slip an update past the norm bound with
a fleet of 1 to 3, leave the global model non-finite, poison GGEUR's exchange or fill FOT's bases, and an honest
agent back after missing rounds is not locked out. In-process: the engine's validator, guard and books with a real
SQLite ledger, and each method's real strategy and learner."""

from __future__ import annotations

import queue
import tracemalloc
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from fedfleet.coordinator.engine.books import PhaseBooks
from fedfleet.coordinator.engine.phase import Carry, Phase
from fedfleet.coordinator.engine.receive import ReceivePath
from fedfleet.coordinator.engine.rounds import AGGREGATE_ROW, Coordinator
from fedfleet.coordinator.engine.update_guard import AggregateCheck, UpdateGuard
from fedfleet.coordinator.engine.validate import Validator
from fedfleet.coordinator.records.ledger import Ledger
from fedfleet.coordinator.strategies import ClientResult, TaskSpec, create
from fedfleet.coordinator.tasks.continual import ContinualStrategy
from fedfleet.coordinator.tasks.schedule import permuted_digits
from fedfleet.edge_agent import class_stats
from fedfleet.edge_agent.errors import ProtocolError, Refusal
from fedfleet.edge_agent.learners import LocalData, Task
from fedfleet.edge_agent.learners import create as create_learner
from fedfleet.edge_agent.learners import ggeur as ggeur_learner
from fedfleet.edge_agent.learners.fot import COUNT, RHO, SKETCH
from fedfleet.edge_agent.nn import mlp
from fedfleet.edge_agent.wire import codecs

LAYOUT = [("w", (4, 3)), ("b", (3,))]
NONE = {"name": "none"}
TASK = TaskSpec({}, {}, LAYOUT, NONE)
HUGE = 3.0e38  # near float32's maximum


@pytest.fixture
def ledger(tmp_path):
    led = Ledger(tmp_path / "ledger.sqlite")
    yield led
    led.close()


def _header(agent: str, samples: int = 5) -> dict:
    return {"kind": "result", "fleet": "f", "agent": agent, "run": "run", "round": 1, "phase": 0, "method": "fedavg",
            "codec": NONE, "layout": [[n, list(s)] for n, s in LAYOUT],
            "meta": {"samples": samples, "learn_s": 0.1, "metrics": {}}}


def _body(value: float) -> bytes:
    return codecs.encode({n: np.full(s, value, np.float32) for n, s in LAYOUT}, LAYOUT, NONE)


def _phase(ledger, agents, strategy, guard, r=1) -> Phase:
    tasks = {a: TASK for a in agents}
    inbox: queue.Queue = queue.Queue()
    receive = ReceivePath(fleet="f", keys={a: bytes(32) for a in agents}, inbox=inbox, on_status=lambda a, s: None,
                          max_result_bytes=1 << 20)
    carry = Carry()
    validator = Validator(run="run", r=r, phase=0, tasks=tasks, strategy=strategy, guard=guard,
                          max_result_bytes=1 << 20, announced={a: 5 for a in agents}, late=carry.late)
    books = PhaseBooks(ledger, run="run", r=r, phase=0, reject_rows=16)
    return Phase(run="run", r=r, phase=0, tasks=tasks, validator=validator, books=books, carry=carry, inbox=inbox,
                 receive=receive)


# ---------------------------------------------------------------- item 5: cold start, one to three results
@pytest.mark.parametrize("honest", [0, 1, 2])
def test_an_update_near_float32_max_is_refused_from_the_first_round_with_one_to_three_results(ledger, honest):
    """Before: with fewer than 3 norms in the pool the bound did not act, and the update was accepted."""
    from fedfleet.coordinator.engine.inbox import ResultMessage

    agents = [f"h{i}" for i in range(honest)] + ["liar"]
    strategy = create("fedavg", {n: torch.full(s, 0.5) for n, s in LAYOUT})
    phase = _phase(ledger, agents, strategy, UpdateGuard())
    for a in agents:
        phase.offer(ResultMessage(a, {**_header(a), "round": 1}, _body(HUGE if a == "liar" else 0.01)))
    outcome = phase.close()
    assert [r.agent for r in outcome.results] == [a for a in agents if a != "liar"]
    status = {r[0]: r[1] for r in ledger.query("SELECT agent, status FROM agent_rounds")}
    assert status["liar"] == "rejected:norm_bound"


def test_the_cold_start_reference_admits_honest_first_updates():
    guard = UpdateGuard()
    res = [ClientResult("a", {}, 1)]
    # one honest update half the model's scale: kept; one 20 times the model's scale: refused
    assert len(guard.screen(0, res, [0.5], cold=1.0, r=1).kept) == 1
    assert len(UpdateGuard().screen(0, res, [20.0], cold=1.0, r=1).refused) == 1


def test_weight_cap_uses_the_low_median_so_one_of_two_agents_cannot_raise_it():
    guard = UpdateGuard(weight_cap=4.0)
    limit = guard.weight_limit([100, 2**31 - 1])
    assert limit == 400  # before: 4 x the mean of the two, about 4.3e9
    assert guard.weight(2**31 - 1, 2**31 - 1, limit=limit) == 400


# ---------------------------------------------------------------- item 5: the aggregate check
def _coordinator_with(strategy, ledger):
    return SimpleNamespace(strategy=strategy, ledger=ledger, cfg=SimpleNamespace(run="run"))


@pytest.mark.parametrize("value", [float("nan"), float("inf"), 1e30])
def test_a_non_finite_or_exploded_aggregate_is_refused_and_the_previous_state_kept(ledger, value):
    """Before: the aggregate was applied as it came (then the downlink codec refused the state and `serve` exited)."""
    strategy = create("fedavg", {n: torch.full(s, 0.5) for n, s in LAYOUT})
    before = {k: v.clone() for k, v in strategy.state.items()}
    results = [ClientResult("liar", {n: np.full(s, value, np.float32) for n, s in LAYOUT}, 5)]
    why = Coordinator._aggregate(_coordinator_with(strategy, ledger), 1, 0, results)
    assert why is not None
    for k, v in strategy.state.items():
        assert torch.equal(v, before[k])
    row = ledger.query("SELECT agent, status, detail FROM agent_rounds")[0]
    assert (row[0], row[1]) == (AGGREGATE_ROW, "rejected:aggregate") and "previous state was kept" in row[2]


def test_a_sound_aggregate_is_kept(ledger):
    strategy = create("fedavg", {n: torch.full(s, 0.5) for n, s in LAYOUT})
    results = [ClientResult("a", {n: np.full(s, 0.1, np.float32) for n, s in LAYOUT}, 5)]
    assert Coordinator._aggregate(_coordinator_with(strategy, ledger), 1, 0, results) is None
    assert torch.allclose(strategy.state["b"], torch.full((3,), 0.6))
    assert ledger.query("SELECT count(*) FROM agent_rounds")[0][0] == 0


def test_the_aggregate_check_restores_a_continual_jobs_inner_method_state():
    state = {k: torch.from_numpy(v) for k, v in mlp.init([12, 9, 4], 0).items()}
    fot = create("fot", state)
    wrapped = ContinualStrategy(fot, permuted_digits(2, 3))
    wrapped.configure(1, 0, ["a"])
    before = {k: v.clone() for k, v in fot.state.items()}
    check = AggregateCheck(wrapped)
    wrapped.aggregate(1, 0, [ClientResult("a", {k: np.full(v.shape, np.inf, np.float32) for k, v in state.items()}, 5)])
    assert check.verdict() is not None
    check.restore()
    assert all(torch.equal(fot.state[k], before[k]) for k in before)


# ---------------------------------------------------------------- item 14: the norm bound after missing rounds
def test_an_agent_back_after_many_rounds_is_judged_against_the_reference_of_its_staleness():
    """Before: the running median shrank while it was away and its first update was refused for good."""
    guard = UpdateGuard(window=16)
    agents = ["a", "b", "c", "away"]
    norm = 1.0
    for r in range(1, 6):  # all four take part while updates are large
        guard.screen(0, [ClientResult(a, {}, 1) for a in agents], [norm] * 4, r=r)
    for r in range(6, 400):  # "away" misses rounds; the others' updates shrink 100-fold
        norm = max(0.01, norm * 0.98)
        guard.screen(0, [ClientResult(a, {}, 1) for a in agents[:3]], [norm] * 3, r=r)
    back = guard.screen(0, [ClientResult(a, {}, 1) for a in agents], [norm, norm, norm, 0.9], r=400)
    assert [x.agent for x in back.kept] == agents and back.bound < 0.9  # an up-to-date agent's bound is lower
    # an up-to-date agent with the same update is refused, and its streak shows in the progress note
    for r in (401, 402):
        out = guard.screen(0, [ClientResult(a, {}, 1) for a in agents], [norm, norm, norm, 0.9], r=r)
        assert [x[0].agent for x in out.refused] == ["away"]
    assert guard.streak_note() == "norm-bound refusals in a row: away 2"


# ---------------------------------------------------------------- items 1-3: GGEUR against a liar
class _Features:
    def features(self, x: np.ndarray, cache_key: str | None = None) -> np.ndarray:
        return np.asarray(x, np.float32)


D, C = 6, 3


def _shards(n_agents: int, per_class=lambda i: 20) -> dict[str, LocalData]:
    rng = np.random.default_rng(0)
    out = {}
    for i in range(n_agents):
        y = np.repeat(np.arange(C), per_class(i))
        x = (rng.normal(size=(len(y), D)) + y[:, None]).astype(np.float32)
        out[f"a{i}"] = LocalData(x, y)
    return out


def _run_ggeur(n_agents: int, lie, shards: dict[str, LocalData] | None = None) -> tuple:
    """The exchange and one training round with `a0` lying: `lie(stage, tensors, samples, metrics)` changes its
    upload. Each phase runs the engine's order: check, the weight cap, screen, aggregate."""
    shards = shards or _shards(n_agents)
    state = {k: torch.from_numpy(v) for k, v in mlp.init([D, C], seed=0).items()}
    strategy = create("ggeur", state, lr=0.1, epochs=1, batch=8, seed=1)
    learners = {a: create_learner("ggeur") for a in shards}
    guard = UpdateGuard()
    refused: dict[str, str] = {}
    for r, phases in ((1, 4), (2, 1)):
        for phase in range(phases):
            specs = strategy.configure(r, phase, sorted(shards))
            stage = strategy.stage(phase)
            limit = guard.weight_limit([len(d) for d in shards.values()])
            results = []
            for a, spec in specs.items():
                out = learners[a].learn(Task("r", r, "ggeur", spec.config, spec.tensors, phase), shards[a], _Features())
                tensors = {n: np.asarray(out.tensors[n], np.float32) for n, _ in spec.expect}
                samples, metrics = out.samples, dict(out.metrics)
                if a == "a0":
                    samples = lie(stage, tensors, metrics) or samples
                metrics["_samples_uncapped"] = float(guard.weight(samples, len(shards[a])))  # as the validator does
                res = ClientResult(a, tensors, guard.weight(samples, len(shards[a]), limit=limit), metrics)
                try:
                    strategy.check(r, phase, res)
                except ProtocolError as exc:
                    refused[a] = f"{stage}:{exc.reason}"
                    continue
                results.append(res)
            out_ = {x.agent for x, _, _ in strategy.screen(r, phase, results)}
            for x, reason, _ in strategy.screen(r, phase, results):
                refused[x.agent] = f"{stage}:{reason}"
            strategy.aggregate(r, phase, [x for x in results if x.agent not in out_])
    return strategy, learners, refused


@pytest.mark.parametrize("n_agents", [2, 3, 10])
def test_ggeur_a_self_reported_synthetic_count_does_not_set_the_weight(n_agents):
    """Before: `synthetic = 1e15` in the training upload weighed the liar like 1e15 samples."""
    def lie(stage, tensors, metrics):
        if stage == "train":
            metrics["synthetic"] = 1e15

    strategy, _, refused = _run_ggeur(n_agents, lie)
    assert not refused
    expected = strategy.expected_synthetic("a0")
    assert strategy.delivered["a0"] <= expected == strategy.expected_synthetic("a1")


@pytest.mark.parametrize("n_agents", [2, 3, 10])
@pytest.mark.parametrize("count", [2.0**62, 1e5])
def test_ggeur_a_census_beyond_the_agents_weight_is_refused(n_agents, count):
    """Before: a census of 2**62 per class made the liar the only guide and set every class's target."""
    def lie(stage, tensors, metrics):
        if stage == "census":
            tensors["counts"] = np.full(C, count, np.float32)
            return 2**31 - 1

    strategy, _, refused = _run_ggeur(n_agents, lie)
    assert refused == {"a0": "census:census_bound"}
    assert int(strategy.global_counts().max()) <= 20 * n_agents  # the honest agents' counts only


@pytest.mark.parametrize("n_agents", [3, 10])
def test_ggeur_an_honest_agent_far_above_the_weight_cap_is_capped_not_refused(n_agents):
    """Label skew makes big agents: one honest agent with 30x the others' samples. Before, its census was
    refused (census_bound against its capped weight) and, with its statistics gone, the exchange could fail
    every round (bench ggeur, MNIST seed 1). Now it is counted, at most the cap (plus one per class)."""
    shards = _shards(n_agents, per_class=lambda i: 600 if i == 0 else 20)
    strategy, _, refused = _run_ggeur(n_agents, lambda *a: None, shards)
    assert not refused
    limit = UpdateGuard().weight_limit([len(d) for d in shards.values()])
    assert int(strategy.counts["a0"].sum()) <= limit + C < len(shards["a0"])
    assert (strategy.counts["a0"] > 0).all() and strategy.census["a0"].sum() == len(shards["a0"])
    assert strategy.exchange_done and len(strategy.geometry) == C


@pytest.mark.parametrize("n_agents", [3, 10])
def test_ggeur_single_sample_classes_do_not_set_the_statistics_bound(n_agents):
    """Most uploaded classes hold one sample (trace 0): before, the phase's low median trace was 0, the bound
    1e-4, and every honest guide's statistics were refused ('no class statistics arrived', every round). Classes
    of one sample no longer set the reference; a huge covariance is still refused."""
    def sizes(i: int) -> np.ndarray:
        out = np.ones(C, np.int64)  # every agent holds one sample of most classes (all of them guides) ...
        out[0] = 40  # ... and many of class 0
        return out

    rng = np.random.default_rng(1)
    shards = {}
    for i in range(n_agents):
        y = np.repeat(np.arange(C), sizes(i))
        shards[f"a{i}"] = LocalData((rng.normal(size=(len(y), D)) + y[:, None]).astype(np.float32), y)
    strategy, _, refused = _run_ggeur(n_agents, lambda *a: None, shards)
    assert not refused and strategy.exchange_done

    def lie(stage, tensors, metrics):
        if stage == "stats":
            k = len(tensors["classes"])
            tensors["cov"] = np.stack([class_stats.pack_upper(np.eye(D) * 1e6)] * k).astype(np.float32)

    strategy, _, refused = _run_ggeur(n_agents, lie, shards)
    assert refused.get("a0") == "stats:stats_bound", refused
    assert set(refused) == {"a0"}


@pytest.mark.parametrize("n_agents", [2, 3, 10])
@pytest.mark.parametrize("how", ["1e30 I", "3e38 entries", "huge mean"])
def test_ggeur_statistics_beyond_the_phases_robust_bound_are_refused(n_agents, how):
    """Before: a PSD covariance of 1e30 I (or entries of 3e38) was pooled into every agent's geometry."""
    tri = class_stats.tri_size(D)

    def lie(stage, tensors, metrics):
        if stage != "stats":
            return
        k = len(tensors["classes"])
        if how == "1e30 I":
            tensors["cov"] = np.stack([class_stats.pack_upper(np.eye(D) * 1e30)] * k).astype(np.float32)
        elif how == "3e38 entries":
            tensors["cov"] = np.full((k, tri), 3e38, np.float32)
        else:
            tensors["mean"] = np.full((k, D), 1e12, np.float32)

    strategy, learners, refused = _run_ggeur(n_agents, lie)
    if "a0" in refused:  # a0 was a guide: its statistics are refused, the geometry is the honest guides'
        assert refused["a0"] in ("stats:stats_bound", "stats:not_psd")
    for c, (_, lam, _) in strategy.geometry.items():
        assert float(lam.max()) < 100.0, c
    syn = learners["a1"].synthetic
    assert syn is not None and np.isfinite(syn[0]).all() and float(np.abs(syn[0]).max()) < 1e3


def test_ggeur_geometry_step_is_bounded_in_memory_whatever_the_targets_say():
    """Before: a target of 1e5 per class drove honest agents past 1 GB; 2**62 failed with 'array is too big'."""
    rng = np.random.default_rng(0)
    d = 64
    feats = rng.normal(size=(30, d)).astype(np.float32)
    y = np.repeat(np.arange(3), 10)
    xi, lam = np.eye(d), np.ones(d)
    for target in (10**5, 2**62):
        geo = {c: (xi, lam, target) for c in range(3)}
        tracemalloc.start()
        x_syn, y_syn = ggeur_learner.single_domain(feats, y, geo, 3, rng)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert x_syn.nbytes <= ggeur_learner.MAX_SYNTHETIC_BYTES and len(y_syn) == len(x_syn) > 0
        assert peak < 8 * ggeur_learner.MAX_SYNTHETIC_BYTES
    # an honest target is far under the budget: untouched
    x_syn, _ = ggeur_learner.single_domain(feats, y, {c: (xi, lam, 50) for c in range(3)}, 3, rng)
    assert len(x_syn) == 3 * 40


# ---------------------------------------------------------------- item 4: FOT against a liar
def _fot_round(n_agents: int, liar: bool):
    sizes = [12, 9, 4]
    state = {k: torch.from_numpy(v) for k, v in mlp.init(sizes, 0).items()}
    fot = create("fot", state)
    wrapped = ContinualStrategy(fot, permuted_digits(2, 1))  # one round per task: every round ends a task
    specs = wrapped.configure(1, 0, [f"a{i}" for i in range(n_agents)])
    rng = np.random.default_rng(3)
    basis_low = rng.normal(size=(12, 3))
    results = []
    for i, (a, spec) in enumerate(sorted(specs.items())):
        tensors = {n: np.zeros(s, np.float32) for n, s in spec.expect}
        for n, s in spec.expect:
            if n.startswith(SKETCH):
                d, m = s
                low = basis_low if d == 12 else rng.normal(size=(d, 3))
                tensors[n] = (low @ rng.normal(size=(3, m)) + 0.01 * rng.normal(size=(d, m))).astype(np.float32)
        tensors[RHO] = np.full(tensors[RHO].shape, 0.5, np.float32)
        tensors[COUNT] = np.array([40], np.float32)
        if liar and i == 0:
            for n, s in spec.expect:
                if n.startswith(SKETCH):
                    tensors[n] = (np.eye(*s) * 1e30).astype(np.float32)
            tensors[COUNT] = np.array([1e9], np.float32)
        results.append(ClientResult(a, tensors, 40))
    for r in results:
        wrapped.check(1, 0, r)
    refused = wrapped.screen(1, 0, results)
    out = {r.agent for r, _, _ in refused}
    wrapped.aggregate(1, 0, [r for r in results if r.agent not in out])
    return fot, refused


@pytest.mark.parametrize("n_agents", [2, 3, 10])
def test_fot_a_huge_sketch_is_refused_and_cannot_fill_the_basis(n_agents):
    """Before: a sketch of 1e30 I with N = 1e9 filled every layer's basis; every row ok."""
    honest, _ = _fot_round(n_agents, liar=False)
    fot, refused = _fot_round(n_agents, liar=True)
    assert [(r.agent, reason) for r, reason, _ in refused] == [("a0", Refusal.SKETCH_BOUND)]
    for name, (k, d) in fot.basis_sizes().items():
        assert k < d and k <= max(honest.basis_sizes()[name][0], 1) + 1, (name, k, d)


def test_fot_basis_growth_needs_more_than_one_senders_evidence():
    fot, _ = _fot_round(1, liar=False)
    assert all(k == 0 for k, _ in fot.basis_sizes().values())
    both, _ = _fot_round(3, liar=False)
    assert both.basis_sizes()["fc0.weight"][0] >= 1
    # a spread-out sketch within the bound (one sender's identity, honest scale) does not fill the basis
    sizes = [12, 9, 4]
    state = {k: torch.from_numpy(v) for k, v in mlp.init(sizes, 0).items()}
    fot2 = create("fot", state)
    wrapped = ContinualStrategy(fot2, permuted_digits(2, 1))
    specs = wrapped.configure(1, 0, ["a0", "a1"])
    rng = np.random.default_rng(5)
    results = []
    for a, spec in sorted(specs.items()):
        tensors = {n: np.zeros(s, np.float32) for n, s in spec.expect}
        for n, s in spec.expect:
            if n.startswith(SKETCH):
                low = rng.normal(size=(s[0], 2)) @ rng.normal(size=(2, s[1]))
                tensors[n] = (np.eye(*s) * np.linalg.norm(low) / np.sqrt(min(s)) if a == "a0" else low).astype(np.float32)
        tensors[RHO] = np.full(tensors[RHO].shape, 0.5, np.float32)
        tensors[COUNT] = np.array([40], np.float32)
        results.append(ClientResult(a, tensors, 40))
    assert wrapped.screen(1, 0, results) == []
    wrapped.aggregate(1, 0, results)
    for name, (k, d) in fot2.basis_sizes().items():
        assert k <= d // 2, (name, k, d)


def test_the_report_shows_a_norm_bound_refusal_streak():
    from fedfleet.coordinator.records import report

    statuses = {"steady": ["ok"] * 6, "locked": ["ok", "rejected:norm_bound", "rejected:norm_bound",
                                                 "rejected:norm_bound", "ok", "rejected:norm_bound"]}
    rows = [{"agent": a, "round": r + 1, "status": s} for a, ss in statuses.items() for r, s in enumerate(ss)]
    assert report.norm_streaks(rows) == {"locked": (3, 2, 4, 4)}
