"""Benchmark: GGEUR against plain FedAvg under extreme label skew, on the int8 backbone's embeddings.

Setup (the spec's small-scale experiment, 4d): sklearn digits through the shipped int8 backbone (64-d
embeddings), a linear 64-10 head, 10 agents, Dirichlet beta = 0.05, 30 rounds x 5 local epochs, batch 16,
lr 0.1 for both methods (the same budget: the reference gave its two arms different ones). Plain is
`fedavg`; GGEUR is `ggeur` with its defaults (guide 0.8, shrinkage 0.1, target = the class's global count),
whose first round also runs the statistics exchange. Accuracy is the final global head's on the held-out
20% split, averaged over `--seeds` seeds (the partition changes with the seed). Every run goes over a real
broker (Mosquitto by default): a coordinator and one MQTT connection per agent.

The printed keys are for the partition with the reference's at-least-one-sample-of-every-class guarantee;
the details line has the same numbers without it (`no_guarantee`), the per-seed numbers, the exchange's
bytes (census and statistics up, geometry down), a centrally trained linear head with the same epoch
budget (`central_linear_head`, a ceiling, not federated), what the fleet trains on after augmentation
(samples per class, their max/min ratio, the share of synthetic points drawn for classes an agent holds
3 or fewer originals of) and the 4-domain toy: the digits training split cut into 4
disjoint parts, one agent per domain, each domain made by class-wise offsets of the pixels
(o_{j,c} ~ N(0, 0.25^2) per pixel, domain 0 without), so the backbone's embeddings move class by class;
plain FedAvg against GGEUR's multi-domain variant (prototypes relayed; target 200 per class, pools of 50,
12 draws per original: the spec's Digits sizes scaled by 1/10 to the toy's 36 originals per class); the
accuracy of the global head on each domain's test split.

    fedfleet bench ggeur [--quick] [--seeds S] [--rounds R] [--broker mosquitto] [--json PATH]
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from typing import Any

import numpy as np
import torch

from fedfleet.coordinator.records.ledger import LedgerView
from fedfleet.coordinator.strategies import create as create_strategy
from fedfleet.coordinator.strategies._config import carried_defaults
from fedfleet.coordinator.strategies.base import ClientResult, Strategy, TaskSpec, to_numpy
from fedfleet.coordinator.strategies.ggeur import GGEURStrategy
from fedfleet.edge_agent.cli_run import ArgParser
from fedfleet.edge_agent.learners import LocalData
from fedfleet.edge_agent.wire import protocol, signing
from fedfleet.models import data as datasets
from fedfleet.models.mirrors.head import CoordinatorModel
from fedfleet.tools.bench.output import emit

GGEUR_DEFAULTS = carried_defaults(GGEURStrategy.Config)  # a job's ggeur [method] defaults
BENCH_SIGNING_KEY = signing.new_signing_seed()  # the coordinator's key for this run; its agents pin it

KEYS = ("beta", "plain_accuracy", "ggeur_accuracy", "gain_points", "stats_bytes_up", "seeds")
TOY = {"variant": "multi_domain", "target": 200, "local_pool": 50, "proto_pool": 50, "per_sample": 12}


class Unsynchronised(GGEURStrategy):
    """Diagnostic only, not a method to run: the reference scripts' scheme, in which every client keeps
    training its own head and never receives the global one; the heads are averaged (sample-weighted)
    only to evaluate. `augment=False` skips the exchange (plain local training under the same scheme).
    It shows how much of the published gain comes from that scheme (spec 4e, first pitfall)."""

    name = "ggeur_unsynchronised"

    def __init__(self, state: dict[str, Any], *, augment: bool = True, **config: Any) -> None:
        super().__init__(state, **config)
        self.initial = {k: v.clone() for k, v in self.state.items()}
        self.local: dict[str, dict[str, Any]] = {}
        self.weights: dict[str, float] = {}
        self.exchange_done = not augment

    def configure(self, round: int, phase: int, agents: list[str]) -> dict[str, TaskSpec]:
        tasks = super().configure(round, phase, agents)
        for a, spec in tasks.items():
            spec.config["learner"] = "ggeur"
            if self.stage(phase) == "train":
                spec.tensors.update(to_numpy(self.local.get(a, self.initial)))
        return tasks

    def _fedavg(self, results: list[ClientResult]) -> None:
        for r in results:
            own = self.local.get(r.agent, self.initial)
            self.local[r.agent] = {k: own[k] + torch.from_numpy(r.tensors[k]) for k in own}
            self.weights[r.agent] = float(r.samples)
        if self.local:
            total = sum(self.weights.values())
            self.state = {k: sum(self.weights[a] / total * h[k] for a, h in self.local.items()) for k in self.initial}


def package() -> tuple[bytes, CoordinatorModel]:
    from fedfleet.models.package import build_package

    blob = build_package("transfer", head_hidden=0)
    return blob, CoordinatorModel(blob)


def run_fleet(broker_url: str, blob: bytes, cmodel: CoordinatorModel, method: str, config: dict[str, Any],
              shards: dict[str, LocalData], rounds: int, test: datasets.Dataset, seed: int) -> dict[str, Any]:
    """One run over the broker; the final head, its accuracy curve and the ledger's bytes per stage."""
    from fedfleet.coordinator.job.assemble import build_run
    from fedfleet.coordinator.job.config import JobConfig
    from fedfleet.coordinator.tasks.packaged import PackagedTask
    from fedfleet.edge_agent.agent import Agent, AgentConfig

    secret = os.urandom(32)
    fleet = f"ggeur{os.getpid()}-{os.urandom(3).hex()}"
    strategy: Strategy
    if method.startswith("unsynchronised"):
        strategy = Unsynchronised(cmodel.initial_state(), augment=method.endswith("ggeur"), seed=seed,
                                  uplink={"name": "none"}, **config)
    else:
        strategy = create_strategy(method, cmodel.initial_state(), seed=seed, uplink={"name": "none"}, **config)
    job = JobConfig(method="ggeur", agents=len(shards), roster=list(shards), fleet=fleet, deadline_s=60.0,
                    quorum=1.0, grace_s=0.0, seed=seed, uplink={"name": "none"}, downlink="none")
    with tempfile.TemporaryDirectory() as tmp:
        coord = build_run(job, broker_url=broker_url, secret=secret, signing_key=BENCH_SIGNING_KEY, run_dir=tmp,
                          strategy=strategy, task=PackagedTask(blob, cmodel, list(shards.values()), test),
                          run_id="bench").coordinator
        agents = []
        try:
            coord.start()
            for a, data in shards.items():
                agent = Agent(AgentConfig(broker_url, fleet, a, protocol.derive_key(secret, a), coordinator_key=signing.public_key(BENCH_SIGNING_KEY)), data)
                agent.start()
                agents.append(agent)
            coord.wait_for_agents(len(shards), 120)
            summaries = coord.run(rounds)
        finally:
            for agent in agents:
                agent.stop()
            coord.stop()
        mix = augmented_mix(agents)
        with LedgerView(f"{tmp}/ledger.sqlite") as view:
            rows = view.agent_rows("bench")
    stages = {(r, p): s for r, p, s in getattr(strategy, "exchange_log", [])}
    by_stage: dict[str, dict[str, int]] = {}
    for row in rows:
        stage = stages.get((row["round"], row["phase"]), "train")
        acc = by_stage.setdefault(stage, {"up": 0, "down": 0})
        acc["up"] += int(row["bytes_up"] or 0)
        acc["down"] += int(row["bytes_down"] or 0)
    bad = [row["status"] for row in rows if row["status"] != "ok"]
    return {"state": strategy.global_state(), "curve": [s.accuracy for s in summaries], "bytes": by_stage,
            "not_ok": bad, "note": strategy.round_note(), "mix": mix}


def augmented_mix(agents: list[Any]) -> dict[str, Any]:
    """What the fleet trains on after augmentation: samples per class over all agents (originals plus
    synthetic), their max/min ratio, and the share of synthetic points drawn for classes of which the
    agent holds at most 3 originals."""
    per_class = np.zeros(10, np.int64)
    synthetic = strays = 0
    for agent in agents:
        own = np.bincount(agent.data.y, minlength=10)
        per_class += own
        learner = agent.state.learners.get("ggeur")
        if learner is None or learner.synthetic is None:
            continue
        made = np.bincount(learner.synthetic[1], minlength=10)
        per_class += made
        synthetic += int(made.sum())
        strays += int(made[(own > 0) & (own <= 3)].sum())
    return {"per_class": per_class.tolist(), "max_min_ratio": round(float(per_class.max() / max(1, per_class.min())), 2),
            "synthetic": synthetic, "share_around_3_or_fewer": round(strays / synthetic, 3) if synthetic else 0.0}


def central_head(seed: int, cmodel: CoordinatorModel, epochs: int) -> float:
    """Reference, not federated: the linear head trained on the whole training split with the same
    local SGD (lr 0.1, batch 16) for the fleet's total epoch budget (rounds x local epochs)."""
    from fedfleet.edge_agent.learners.fedavg import local_sgd

    train, test = datasets.split(datasets.digits(), 0.2, seed=seed)
    head, _ = local_sgd(cmodel.edge.head_init, cmodel.edge.features(train.x), train.y,
                        {"lr": 0.1, "epochs": epochs, "batch": 16}, np.random.default_rng(seed))
    return cmodel.evaluate(head, test.x, test.y, cache_key=None)[0]


def label_skew(broker_url: str, blob: bytes, cmodel: CoordinatorModel, *, seed: int, agents: int, beta: float,
               rounds: int, epochs: int, guarantee: bool, diagnostic: bool = False) -> dict[str, Any]:
    train, test = datasets.split(datasets.digits(), 0.2, seed=seed)
    parts = datasets.partition_dirichlet(train.y, agents, beta, seed=seed, per_class=1 if guarantee else 0)
    shards = {f"agent-{i:02d}": LocalData(train.x[p], train.y[p]) for i, p in enumerate(parts)}
    common = {"lr": 0.1, "epochs": epochs, "batch": 16}
    out: dict[str, Any] = {"classes_per_agent": [int(len(np.unique(s.y))) for s in shards.values()]}
    ggeur = {**GGEUR_DEFAULTS, **common}
    arms = [("fedavg", common), ("ggeur", ggeur)]
    if diagnostic:
        arms += [("unsynchronised_plain", ggeur), ("unsynchronised_ggeur", ggeur)]
    for method, cfg in arms:
        run = run_fleet(broker_url, blob, cmodel, method, cfg, shards, rounds, test, seed)
        out[method] = {"accuracy": run["curve"][-1], "curve": [round(a, 4) for a in run["curve"]],
                       "bytes": run["bytes"], "not_ok": len(run["not_ok"]), "note": run["note"]}
        if method == "ggeur":
            out[method]["mix"] = run["mix"]
    return out


def domains(seed: int, n_domains: int = 4, scale: float = 0.25) -> tuple[dict[str, LocalData], list[datasets.Dataset]]:
    """One agent per domain (disjoint quarters of the training split) and each domain's test split."""
    train, test = datasets.split(datasets.digits(), 0.2, seed=seed)
    rng = np.random.default_rng([seed, 4])
    offsets = rng.normal(0.0, scale, size=(n_domains, 10, train.x.shape[1])).astype(np.float32)
    offsets[0] = 0.0
    order = rng.permutation(len(train))
    shards, tests = {}, []
    for j, idx in enumerate(np.array_split(order, n_domains)):
        part = train.take(np.sort(idx))
        shards[f"domain-{j}"] = LocalData(part.x + offsets[j][part.y], part.y)
        tests.append(datasets.Dataset(test.x + offsets[j][test.y], test.y))
    return shards, tests


def domain_toy(broker_url: str, blob: bytes, cmodel: CoordinatorModel, *, seed: int, rounds: int,
               epochs: int) -> dict[str, Any]:
    shards, tests = domains(seed)
    pooled = datasets.Dataset(np.concatenate([t.x for t in tests]), np.concatenate([t.y for t in tests]))
    common = {"lr": 0.1, "epochs": epochs, "batch": 16}
    out: dict[str, Any] = {}
    for method, cfg in (("fedavg", common), ("ggeur", {**GGEUR_DEFAULTS, **common, **TOY})):
        run = run_fleet(broker_url, blob, cmodel, method, cfg, shards, rounds, pooled, seed)
        out[method] = [cmodel.evaluate(run["state"], t.x, t.y, cache_key=None)[0] for t in tests]
    return out


def main(argv: list[str] | None = None) -> int:
    parser = ArgParser(prog="fedfleet bench ggeur", description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=3, help="seeds per method (default %(default)s)")
    parser.add_argument("--rounds", type=int, default=30, help="rounds per run (default %(default)s)")
    parser.add_argument("--epochs", type=int, default=5, help="local epochs per round (default %(default)s)")
    parser.add_argument("--agents", type=int, default=10, help="agents per run (default %(default)s)")
    parser.add_argument("--beta", type=float, default=0.05, help="Dirichlet label skew of the shards (smaller: more skewed) (default %(default)s)")
    parser.add_argument("--broker", default="mosquitto", help="broker for the runs: mosquitto (default), embedded, memory (in-process, no sockets) or mqtt://host:port")
    parser.add_argument("--no-toy", action="store_true", help="skip the 4-domain toy")
    parser.add_argument("--no-diagnostic", action="store_true",
                        help="skip the reference's unsynchronised scheme (heads never broadcast)")
    parser.add_argument("--quick", action="store_true", help="1 seed, 2 rounds, 1 epoch (a smoke run)")
    parser.add_argument("--json", dest="json_path", help="also write the result JSON to this file")
    args = parser.parse_args(argv)
    if args.quick:
        args.seeds, args.rounds, args.epochs = 1, 2, 1
    from fedfleet.coordinator.broker import start_broker

    t0 = time.perf_counter()
    blob, cmodel = package()
    seeds = list(range(args.seeds))
    runs: dict[str, list[dict[str, Any]]] = {"guarantee": [], "no_guarantee": []}
    toy: list[dict[str, Any]] = []
    with start_broker(args.broker) as broker:
        for seed in seeds:
            for variant, guarantee in (("guarantee", True), ("no_guarantee", False)):
                runs[variant].append(label_skew(broker.url, blob, cmodel, seed=seed, agents=args.agents,
                                                beta=args.beta, rounds=args.rounds, epochs=args.epochs,
                                                guarantee=guarantee,
                                                diagnostic=guarantee and not args.no_diagnostic))
                print(f"seed {seed} {variant}: plain {runs[variant][-1]['fedavg']['accuracy']:.4f} "
                      f"ggeur {runs[variant][-1]['ggeur']['accuracy']:.4f}", file=sys.stderr)
            if not args.no_toy:
                toy.append(domain_toy(broker.url, blob, cmodel, seed=seed, rounds=args.rounds, epochs=args.epochs))

    def summary(items: list[dict[str, Any]]) -> dict[str, Any]:
        plain = float(np.mean([r["fedavg"]["accuracy"] for r in items]))
        ggeur = float(np.mean([r["ggeur"]["accuracy"] for r in items]))
        stats = [r["ggeur"]["bytes"].get("census", {}).get("up", 0) + r["ggeur"]["bytes"].get("stats", {}).get("up", 0)
                 for r in items]
        return {"plain_accuracy": round(plain, 4), "ggeur_accuracy": round(ggeur, 4),
                "gain_points": round(100 * (ggeur - plain), 2), "stats_bytes_up": int(np.mean(stats))}

    result: dict[str, Any] = {"beta": args.beta, **summary(runs["guarantee"]), "seeds": len(seeds)}
    central = [central_head(seed, cmodel, args.rounds * args.epochs) for seed in seeds]
    mixes = {v: [r["ggeur"]["mix"] for r in runs[v]] for v in runs}
    details: dict[str, Any] = {
        "no_guarantee": summary(runs["no_guarantee"]),
        "central_linear_head": round(float(np.mean(central)), 4),
        "augmented_class_ratio": {v: [m["max_min_ratio"] for m in ms] for v, ms in mixes.items()},
        "synthetic_share_around_3_or_fewer": {v: [m["share_around_3_or_fewer"] for m in ms] for v, ms in mixes.items()},
        "setup": {"agents": args.agents, "rounds": args.rounds, "epochs": args.epochs, "batch": 16, "lr": 0.1,
                  "head": "linear 64-10", "ggeur": GGEUR_DEFAULTS, "broker": args.broker},
        "per_seed": runs,
    }
    if not args.no_diagnostic:
        diag = runs["guarantee"]
        plain_u = float(np.mean([r["unsynchronised_plain"]["accuracy"] for r in diag]))
        gg_u = float(np.mean([r["unsynchronised_ggeur"]["accuracy"] for r in diag]))
        details["diagnostic_unsynchronised"] = {"plain_accuracy": round(plain_u, 4), "ggeur_accuracy": round(gg_u, 4),
                                                "gain_points": round(100 * (gg_u - plain_u), 2)}
    if toy:
        plain = np.mean([t["fedavg"] for t in toy], axis=0)
        gg = np.mean([t["ggeur"] for t in toy], axis=0)
        details["domain_toy"] = {"plain_per_domain": [round(float(v), 4) for v in plain],
                                 "ggeur_per_domain": [round(float(v), 4) for v in gg],
                                 "plain_mean": round(float(plain.mean()), 4), "ggeur_mean": round(float(gg.mean()), 4),
                                 "gain_points_mean": round(100 * float(gg.mean() - plain.mean()), 2),
                                 "config": TOY, "per_seed": toy}
    details["wall_s"] = round(time.perf_counter() - t0, 1)
    emit({**result, **details}, KEYS, args.json_path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
