"""`fedfleet bench fuzz --methods all`: a hostile corpus per method, signed with one device's real key, against the
coordinator's receive path, phase books and aggregate, in-process.

    fedfleet bench fuzz --methods all [--n 54000] [--seed 0] [--json PATH]

For every method (GGEUR census, statistics, geometry and training uploads; FOT updates and task-end sketches;
Ferret's (index, gamma) pairs; the LoRA methods' adapters (FedIT, FLoRA, LoRA-FAIR); FZooS's iterates (phase 0)
and surrogate vectors (phase 1); FedAvg on the diffusion task's denoiser; plain FedAvg) and for fleets of 2, 3 and
10 agents (one of them the insider), each case is one phase: the honest agents upload plausible results (GGEUR's
from its real learner), the insider uploads one hostile payload sealed with its real HMAC key, everything goes
through the engine's own parts (`ReceivePath.on_message` -> `Phase.offer` -> `Phase.close` -> the engine's
checked aggregate), and then the global state is encoded as the downlink would encode it.

Decision rules, fixed before the runs:
- cases are split evenly over the (method, fleet) pairs; `--n 54000` gives 2,000 per pair;
- small models (GGEUR: 6-d embeddings, 3 classes; LoRA: rank 4 on one 16->8 layer; FZooS: 5-d quadratic;
  the diffusion task's real denoiser package at hidden width 16); LoRA-FAIR's server solve runs 50 iterations;
- every hostile payload is bad by construction: non-finite or float32-extreme values, updates scaled 1e6 to 1e38
  over an honest one, statistics, sketches and counts that lie by 1e5 or more, and weights claimed up to 2**31;
- crashes: an exception out of the receive path, a phase, or the aggregate (in `serve` each would end the run);
- untyped_errors: refusals for `internal` (the receive path's last line of defence) plus crashes;
- accepted_bad: the insider's payload among the phase's kept results when the payload must be refused, or its
  weight above what the coordinator allows (its capped count; GGEUR's synthetic points above what its geometry
  allows; FOT's N_i above its count), or a global state left non-finite or moved by more than the aggregate bound;
- serve_exits: the global state after the phase does not encode for the downlink, or is not finite (a FedZip
  downlink refused it and `serve` exited with rc 2 before issue 28), or a crash;
- GGEUR cases replay only the attacked phase of the first round, from a snapshot taken before it in one honest
  exchange (training cases: the first training phase after it); the honest agents' uploads of that phase are
  their learners' real ones, computed once and replayed (the task seeds make them the same every time).
Prints {"cases", "crashes", "untyped_errors", "accepted_bad", "serve_exits", "methods"}; details on stderr.
"""

from __future__ import annotations

import copy
import json
import logging
import queue
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

KEYS = ("cases", "crashes", "untyped_errors", "accepted_bad", "serve_exits", "methods")
FLEETS = (2, 3, 10)
METHODS = ("ggeur", "fot", "ferret", "fedit", "flora", "lora_fair", "fzoos", "diffusion", "fedavg")
INSIDER = "insider"
F32_MAX = float(np.finfo(np.float32).max)


class _Errors(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.count = 0
        self.samples: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if "receive path bug" in record.getMessage():
            self.count += 1
            if len(self.samples) < 5:
                self.samples.append(record.getMessage()[:300])


# ---------------------------------------------------------------- the methods under test
class _Features:
    def features(self, x: np.ndarray, cache_key: str | None = None) -> np.ndarray:
        return np.asarray(x, np.float32)


def _mlp(sizes: list[int], seed: int) -> dict[str, torch.Tensor]:
    from fedfleet.edge_agent.nn import mlp

    return {k: torch.from_numpy(v) for k, v in mlp.init(sizes, seed).items()}


def _lora_state(rng: np.random.Generator) -> dict[str, torch.Tensor]:
    return {"fc0.lora_A": torch.from_numpy(rng.normal(0, 0.1, (4, 16)).astype(np.float32)),
            "fc0.lora_B": torch.zeros(8, 4), "fc1.weight": torch.from_numpy(rng.normal(0, 0.3, (10, 8)).astype(np.float32)),
            "fc1.bias": torch.zeros(10)}


def _diffusion_state() -> dict[str, torch.Tensor]:
    from fedfleet.coordinator.tasks.diffusion import DiffusionModel
    from fedfleet.models.diffusion_package import build_diffusion_package

    return DiffusionModel(build_diffusion_package((16,)), rounds=1).initial_state()


def make_strategy(method: str, rng: np.random.Generator) -> Any:
    """A fresh strategy of `method` (FOT inside a continual job whose every round ends a task)."""
    from fedfleet.coordinator.strategies import create
    from fedfleet.coordinator.tasks.continual import ContinualStrategy
    from fedfleet.coordinator.tasks.schedule import permuted_digits

    if method == "ggeur":
        return create("ggeur", _mlp([GG_D, GG_C], 0), lr=0.1, epochs=1, batch=8, seed=1)
    if method == "fot":
        return ContinualStrategy(create("fot", _mlp([12, 9, 4], 0)), permuted_digits(50, 1))
    if method == "ferret":
        return create("ferret", _mlp([12, 8, 4], 0), k=16, seed=3)
    if method == "lora_fair":  # the server solve shortened to 50 iterations: the payload checks do not depend on it
        return create(method, _lora_state(rng), seed=0, refine_iterations=50)
    if method in ("fedit", "flora"):
        return create(method, _lora_state(rng), seed=0)
    if method == "fzoos":
        return create("fzoos", {"x": torch.full((5,), 0.5)}, objective="quadratic", seed=0, rff_features=64)
    if method == "diffusion":
        return create("fedavg", _DIFFUSION_STATE.setdefault("s", _diffusion_state()), optimizer="adam", lr=0.01)
    return create("fedavg", _mlp([12, 8, 4], 0))


_DIFFUSION_STATE: dict[str, dict[str, torch.Tensor]] = {}
GG_D, GG_C = 6, 3


def _gg_data(agent: str) -> Any:
    from fedfleet.edge_agent.learners import LocalData

    rng = np.random.default_rng(abs(hash(agent)) % (1 << 32))
    y = np.repeat(np.arange(GG_C), 12)
    return LocalData((rng.normal(size=(len(y), GG_D)) + y[:, None]).astype(np.float32), y)


def honest_tensors(method: str, strategy: Any, spec: Any, agent: str, r: int, phase: int, learners: dict[str, Any],
                   rng: np.random.Generator) -> tuple[dict[str, np.ndarray], int, dict[str, float]]:
    """A plausible honest upload for `spec` (GGEUR: its real learner's)."""
    from fedfleet.edge_agent.learners import Task
    from fedfleet.edge_agent.learners import create as create_learner
    from fedfleet.edge_agent.learners.fot import COUNT, RHO, SKETCH

    if method == "ggeur":
        learner = learners.setdefault(agent, create_learner("ggeur"))
        out = learner.learn(Task("r", r, "ggeur", spec.config, spec.tensors, phase), _gg_data(agent), _Features())
        return {n: np.asarray(out.tensors[n], np.float32) for n, _ in spec.expect}, out.samples, dict(out.metrics)
    kind = strategy.update_kind(phase)
    out = {}
    for name, shape in spec.expect:
        noise = rng.normal(0, 0.01, shape).astype(np.float32)
        if name.startswith(SKETCH):
            d, m = shape
            out[name] = (rng.normal(size=(d, 2)) @ rng.normal(size=(2, m)) + 0.01 * rng.normal(size=(d, m))).astype(np.float32)
        elif name == RHO:
            out[name] = np.full(shape, 0.5, np.float32)
        elif name == COUNT:
            out[name] = np.array([36], np.float32)
        elif kind == "model" and name in spec.tensors:
            out[name] = (np.asarray(spec.tensors[name], np.float32) + noise).astype(np.float32)
        elif kind == "model" and name in strategy.state:
            out[name] = (strategy.state[name].numpy() + noise).astype(np.float32)
        else:
            out[name] = noise
    return out, 36, {"loss": 0.5}


# ---------------------------------------------------------------- hostile payloads
# each: (name, applies(method, stage), mutate(tensors, metrics, rng) -> claimed samples or None, must_refuse)
def _scale(f: float) -> Callable[..., None]:
    def go(t: dict[str, np.ndarray], m: dict[str, float], rng: np.random.Generator) -> None:
        name = sorted(t)[int(rng.integers(len(t)))]
        with np.errstate(over="ignore", invalid="ignore"):
            base = np.where(t[name] == 0, 1.0, t[name]).astype(np.float64)
            t[name] = np.clip(base * f * rng.choice([-1.0, 1.0]), -F32_MAX, F32_MAX).astype(np.float32)
    return go


def _fill(value: float, everywhere: bool) -> Callable[..., None]:
    def go(t: dict[str, np.ndarray], m: dict[str, float], rng: np.random.Generator) -> None:
        names = sorted(t) if everywhere else [sorted(t)[int(rng.integers(len(t)))]]
        for name in names:
            if t[name].size:
                if everywhere:
                    t[name] = np.full(t[name].shape, value, np.float32)
                else:
                    t[name].flat[int(rng.integers(t[name].size))] = value
    return go


def _set(name: str, fn: Callable[[np.ndarray, np.random.Generator], np.ndarray]) -> Callable[..., None]:
    def go(t: dict[str, np.ndarray], m: dict[str, float], rng: np.random.Generator) -> None:
        if name in t:
            t[name] = fn(t[name], rng).astype(np.float32)
    return go


def _sketches(fn: Callable[[np.ndarray], np.ndarray], n: float | None = None) -> Callable[..., None]:
    from fedfleet.edge_agent.learners.fot import COUNT, SKETCH

    def go(t: dict[str, np.ndarray], m: dict[str, float], rng: np.random.Generator) -> None:
        for k in t:
            if k.startswith(SKETCH):
                t[k] = fn(t[k]).astype(np.float32)
        if n is not None:
            t[COUNT] = np.array([n], np.float32)
    return go


def _cov(kind: str) -> Callable[..., None]:
    from fedfleet.edge_agent import class_stats

    def go(t: dict[str, np.ndarray], m: dict[str, float], rng: np.random.Generator) -> None:
        k, tri = t["cov"].shape
        d = class_stats.dim_of_tri(tri)
        if kind == "1e30 I":
            t["cov"] = np.stack([class_stats.pack_upper(np.eye(d) * 1e30)] * k).astype(np.float32)
        elif kind == "3e38":
            t["cov"] = np.full((k, tri), 3e38, np.float32)
        elif kind == "scaled":
            t["cov"] = (t["cov"].astype(np.float64) * 10.0 ** rng.uniform(6, 30)).astype(np.float32)
        else:  # a mean far out
            t["mean"] = np.full(t["mean"].shape, 10.0 ** rng.uniform(8, 30), np.float32)
    return go


def _claim(value: float) -> Callable[..., Any]:
    def go(t: dict[str, np.ndarray], m: dict[str, float], rng: np.random.Generator) -> Any:
        return (1 << 31) - 1
    return go


def _synthetic(value: float) -> Callable[..., None]:
    def go(t: dict[str, np.ndarray], m: dict[str, float], rng: np.random.Generator) -> None:
        if "synthetic" in t:
            t["synthetic"] = np.full(t["synthetic"].shape, value, np.float32)
        m["synthetic"] = value
    return go


GENERIC = [
    ("scale 1e6", _scale(1e6), True), ("scale 1e12", _scale(1e12), True), ("scale 1e30", _scale(1e30), True),
    ("scale 1e38", _scale(1e38), True), ("float32 max everywhere", _fill(F32_MAX, True), True),
    ("one entry 3e38", _fill(3e38, False), True), ("NaN entry", _fill(float("nan"), False), True),
    ("Inf everywhere", _fill(float("inf"), True), True), ("-1e30 everywhere", _fill(-1e30, True), True),
]


def corpus(method: str, stage: str) -> list[tuple[str, Callable[..., Any], bool]]:
    """The hostile payloads for one method's stage: (name, mutate, must be refused)."""
    if method == "ggeur" and stage == "census":
        return [("census 2**62", _set("counts", lambda a, r: np.full(a.shape, 2.0**62)), True),
                ("census 1e5", _set("counts", lambda a, r: np.full(a.shape, 1e5)), True),
                ("census 1e15 one class", _set("counts", lambda a, r: a + np.eye(len(a))[int(r.integers(len(a)))] * 1e15), True),
                ("census negative", _set("counts", lambda a, r: -a - 1), True),
                ("census fractional", _set("counts", lambda a, r: a + 0.5), True),
                ("census NaN", _fill(float("nan"), True), True)]
    if method == "ggeur" and stage == "stats":
        return [("cov 1e30 I", _cov("1e30 I"), True), ("cov 3e38", _cov("3e38"), True),
                ("cov scaled 1e6..1e30", _cov("scaled"), True), ("mean 1e8..1e30", _cov("mean"), True),
                ("n 1e9", _set("n", lambda a, r: np.full(a.shape, 1e9)), True),
                ("classes out of range", _set("classes", lambda a, r: a + 100), True),
                ("cov NaN", _fill(float("nan"), False), True)]
    if method == "ggeur" and stage == "geometry":
        return [("synthetic 1e15", _synthetic(1e15), False), ("synthetic -1", _synthetic(-1.0), True),
                ("synthetic 2**62", _synthetic(2.0**62), False)]
    if method == "ggeur" and stage == "train":
        return [*GENERIC, ("train synthetic 1e15", _synthetic(1e15), False), ("claimed 2**31", _claim(0), False)]
    if method == "fot" and stage == "sketch":
        return [*GENERIC, ("sketch 1e30 I, N 1e9", _sketches(lambda s: np.eye(*s.shape) * 1e30, 1e9), True),
                ("sketch x1e8", _sketches(lambda s: s * 1e8), True),
                ("sketch 3e38", _sketches(lambda s: np.full(s.shape, 3e38)), True),
                ("N 1e9 only", _sketches(lambda s: s, 1e9), False),
                ("rho 5", _set("fot:rho", lambda a, r: np.full(a.shape, 5.0)), True),
                ("N 0", _sketches(lambda s: s, 0.0), True)]
    return [*GENERIC, ("claimed 2**31", _claim(0), False)]


# ---------------------------------------------------------------- one case
class Case:
    """One (method, fleet) under fuzz: the strategy, the engine's guard, a ledger, the honest agents."""

    def __init__(self, method: str, fleet: int, run_dir: Path, seed: int) -> None:
        from fedfleet.coordinator.engine.update_guard import UpdateGuard
        from fedfleet.coordinator.records.ledger import Ledger
        from fedfleet.edge_agent.wire import protocol

        self.method, self.fleet = method, fleet
        self.rng = np.random.default_rng(seed)
        self.agents = [f"a{i}" for i in range(fleet - 1)] + [INSIDER]
        self.secret = bytes(self.rng.integers(0, 256, 32, dtype=np.uint8))
        self.keys = {a: protocol.derive_key(self.secret, a) for a in self.agents}
        self.ledger = Ledger(run_dir / f"{method}-{fleet}.sqlite")
        self.guard = UpdateGuard()
        self.learners: dict[str, Any] = {}
        self.honest: dict[tuple[int, str], tuple[dict[str, np.ndarray], int, dict[str, float]]] = {}
        self.fresh = make_strategy(method, self.rng)
        self.strategy = copy.deepcopy(self.fresh)
        self.round = 0

    def stages(self) -> list[str]:
        return ["census", "stats", "geometry", "train"] if self.method == "ggeur" else ["train"]

    def _prepare(self) -> None:
        """GGEUR: one honest exchange round, with a snapshot (strategy, learners, guard) before each of its phases,
        so a case replays only the phase it attacks."""
        self.snapshots: dict[str, tuple[Any, Any, Any]] = {}
        self.strategy, self.learners, self.round = copy.deepcopy(self.fresh), {}, 1
        for phase in range(self.strategy.phases):
            self.strategy._stages = ("census", "stats", "geometry", "train")  # what configure sets at phase 0
            stage = self._stage(phase)
            self.snapshots[stage] = copy.deepcopy((self.strategy, self.learners, self.guard))
            self.phase(1, phase, "", None, self.rng)

    def run(self, target_stage: str, mutate: Callable[..., Any], rng: np.random.Generator) -> dict[str, Any]:
        """Rounds until the phase of `target_stage` ran once with the insider's hostile payload (GGEUR: that phase
        of the first round, from its snapshot)."""
        if self.method == "ggeur":
            if not getattr(self, "snapshots", None):
                self._prepare()
            self.strategy, self.learners, self.guard = copy.deepcopy(self.snapshots[target_stage])
            phase = ("census", "stats", "geometry", "train").index(target_stage)
            return self.phase(1, phase, target_stage, mutate, rng)[1]
        if self.round > 50:
            self.strategy, self.round = copy.deepcopy(self.fresh), 0
            self.guard.__init__()  # type: ignore[misc]
        while True:
            self.round += 1
            r = self.round
            for phase in range(self.strategy.phases):
                hit, verdict = self.phase(r, phase, target_stage, mutate, rng)
                if hit:
                    return verdict

    def _stage(self, phase: int) -> str:
        if self.method == "ggeur":
            return str(self.strategy.stage(phase))
        return "sketch" if self.method == "fot" else "train"

    def phase(self, r: int, phase: int, target: str, mutate: Callable[..., Any] | None,
              rng: np.random.Generator) -> tuple[bool, dict[str, Any]]:
        """One phase; the insider's upload is hostile when the phase is the `target` stage: (hit, verdict)."""
        from fedfleet.coordinator.engine.books import PhaseBooks
        from fedfleet.coordinator.engine.phase import Carry, Phase
        from fedfleet.coordinator.engine.receive import ReceivePath
        from fedfleet.coordinator.engine.rounds import Coordinator
        from fedfleet.coordinator.engine.validate import Validator
        from fedfleet.edge_agent.wire import codecs, protocol

        strategy = self.strategy
        tasks = strategy.configure(r, phase, list(self.agents))
        hit = self._stage(phase) == target
        if not hit:
            mutate = None  # type: ignore[assignment]
        inbox: queue.Queue[Any] = queue.Queue()
        receive = ReceivePath(fleet="fz", keys=self.keys, inbox=inbox, on_status=lambda a, s: None,
                              max_result_bytes=8 << 20)
        carry = Carry()
        announced = {a: 36 for a in tasks}
        validator = Validator(run="fz", r=r, phase=phase, tasks=tasks, strategy=strategy, guard=self.guard,
                              max_result_bytes=8 << 20, announced=announced, late=carry.late)
        books = PhaseBooks(self.ledger, run="fz", r=r, phase=phase, reject_rows=16)
        current = Phase(run="fz", r=r, phase=phase, tasks=tasks, validator=validator, books=books, carry=carry,
                        inbox=inbox, receive=receive)
        bad_claim = False
        limit = validator.weight_limit
        with self.ledger.batch():
            for agent, spec in sorted(tasks.items()):
                if self.method == "ggeur" and r == 1:  # replayed from a snapshot: the same upload every time
                    key = (phase, agent)
                    if key not in self.honest:
                        self.honest[key] = honest_tensors(self.method, strategy, spec, agent, r, phase,
                                                          self.learners, self.rng)
                    t, samples, m = self.honest[key]
                    tensors, metrics = {k: v.copy() for k, v in t.items()}, dict(m)
                else:
                    tensors, samples, metrics = honest_tensors(self.method, strategy, spec, agent, r, phase,
                                                               self.learners, self.rng)
                if agent == INSIDER and mutate is not None:
                    claimed = mutate(tensors, metrics, rng)
                    if claimed is not None:
                        samples, bad_claim = int(claimed), True
                layout = [(n, tuple(s)) for n, s in spec.expect]
                body = codecs.encode(tensors, layout, spec.uplink_codec)
                header = {"kind": "result", "fleet": "fz", "agent": agent, "run": "fz", "round": r, "phase": phase,
                          "method": strategy.name, "codec": spec.uplink_codec,
                          "layout": [[n, list(s)] for n, s in layout],
                          "meta": {"samples": samples, "learn_s": 0.01,
                                   "metrics": {k: v for k, v in metrics.items() if np.isfinite(v)}}}
                for msg in protocol.split(header, body, self.keys[agent]):
                    receive.on_message(protocol.agent_topic("fz", agent, "result"), msg)
            while not inbox.empty():
                current.offer(inbox.get_nowait())
            outcome = current.close()
            results = sorted(outcome.results, key=lambda x: x.agent)
            fake = type("E", (), {})()
            fake.strategy, fake.ledger, fake.cfg = strategy, self.ledger, type("C", (), {"run": "fz"})()
            refused_aggregate = Coordinator._aggregate(fake, r, phase, results) is not None  # type: ignore[arg-type]
        kept = {x.agent: x for x in results}
        verdict = {"insider_kept": INSIDER in kept and not refused_aggregate, "aggregate_refused": refused_aggregate,
                   "weight_over": False, "state_bad": False, "encode_failed": False}
        if INSIDER in kept and (bad_claim or mutate is not None):
            x = kept[INSIDER]
            over = limit is not None and x.samples > limit
            if self.method == "ggeur":
                inner = strategy
                over = over or inner.delivered.get(INSIDER, 0) > inner.expected_synthetic(INSIDER)
            verdict["weight_over"] = over
        state = strategy.global_state()
        verdict["state_bad"] = not all(bool(torch.isfinite(v).all()) for v in state.values())
        try:
            layout = [(k, tuple(v.shape)) for k, v in state.items()]
            arrays = {k: v.numpy() for k, v in state.items()}
            codecs.encode(arrays, layout, {"name": "none"})
            if not codecs.all_finite(arrays):  # what a FedZip downlink refused, ending `serve` with rc 2
                raise ValueError("the global state is not finite")
        except Exception:  # noqa: BLE001 - counted as what would end `serve`
            verdict["encode_failed"] = True
        return hit, verdict


# ---------------------------------------------------------------- the run
def run(n: int, seed: int, methods: list[str]) -> dict[str, Any]:
    from fedfleet.coordinator.job.run import small_model_threads

    small_model_threads()
    errors = _Errors()
    logging.getLogger().addHandler(errors)
    logging.getLogger("fedfleet").setLevel(logging.ERROR)
    logging.getLogger("fedfleet.coordinator.engine.rounds").setLevel(logging.ERROR)
    out: dict[str, Any] = {"cases": 0, "crashes": 0, "untyped_errors": 0, "accepted_bad": 0, "serve_exits": 0}
    pairs = [(m, f) for m in methods for f in FLEETS]
    per = max(1, n // len(pairs))
    detail: dict[str, Any] = {}
    bad_samples: list[str] = []
    crash_samples: list[str] = []
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for i, (method, fleet) in enumerate(pairs):
            rng = np.random.default_rng([seed, i])
            case = Case(method, fleet, Path(tmp), seed + i)
            stages = case.stages() if method != "fot" else ["sketch"]
            counts: Counter[str] = Counter()
            t1 = time.perf_counter()
            for j in range(per):
                stage = stages[j % len(stages)]
                items = corpus(method, stage)
                name, mutate, must_refuse = items[int(rng.integers(len(items)))]
                out["cases"] += 1
                try:
                    v = case.run(stage, mutate, rng)
                except Exception as exc:  # noqa: BLE001 - a crash: in `serve` it would end the run
                    out["crashes"] += 1
                    out["untyped_errors"] += 1
                    out["serve_exits"] += 1
                    if len(crash_samples) < 5:
                        crash_samples.append(f"{method}/{fleet}/{name}: {type(exc).__name__}: {str(exc)[:200]}")
                    case.strategy, case.learners, case.round = copy.deepcopy(case.fresh), {}, 0
                    continue
                bad = (must_refuse and v["insider_kept"]) or v["weight_over"] or v["state_bad"]
                if bad:
                    out["accepted_bad"] += 1
                    if len(bad_samples) < 10:
                        bad_samples.append(f"{method}/{fleet}/{name}: {v}")
                if v["encode_failed"]:
                    out["serve_exits"] += 1
                counts["refused" if not v["insider_kept"] else "kept"] += 1
                counts["aggregate_refused"] += int(v["aggregate_refused"])
            reasons = Counter(r[0] for r in case.ledger.query(
                "SELECT status FROM agent_rounds WHERE agent = ?", (INSIDER,)))
            honest_ok = case.ledger.query("SELECT count(*) FROM agent_rounds WHERE agent != ? AND status = 'ok'",
                                          (INSIDER,))[0][0]
            honest_bad = case.ledger.query("SELECT count(*) FROM agent_rounds WHERE agent NOT IN (?, '(aggregate)') "
                                           "AND status != 'ok'", (INSIDER,))[0][0]
            detail[f"{method}/{fleet}"] = {"cases": per, "seconds": round(time.perf_counter() - t1, 1), **counts,
                                           "insider_rows": dict(reasons.most_common(8)), "honest_ok_rows": honest_ok,
                                           "honest_refused_rows": honest_bad}
            case.ledger.close()
            so_far = {k: out[k] for k in ("cases", "crashes", "untyped_errors", "accepted_bad", "serve_exits")}
            print(f"{method}/{fleet}: {json.dumps(detail[f'{method}/{fleet}'])} so far: {json.dumps(so_far)}",
                  file=sys.stderr, flush=True)
    out["untyped_errors"] += errors.count
    out["methods"] = sorted(set(methods))
    out.update({"seconds": round(time.perf_counter() - t0, 1), "per_pair": detail, "bad_samples": bad_samples,
                "crash_samples": crash_samples, "error_samples": errors.samples})
    return out
