"""Benchmark: GGEUR against plain FedAvg of a head under extreme label skew, through the round engine.

Headline arm (decision rules fixed before the runs): an unsupervised encoder, PCA to 64 dimensions fitted on a
stratified 20% split of the MNIST 5k file that no agent holds (`fedfleet.tools.bench._ggeur_pca`); the rest
split 80/20 into the agents' training data and the test set; 10 agents, Dirichlet beta in {0.05, 0.1}; a
linear 64-10 head and a one-hidden-layer 64-32-10 head; 30 rounds x 5 local epochs, batch 16, lr 0.1 for
every arm; GGEUR with its defaults (guide 0.8, shrinkage 0.1, target = the class's global count). Four arms
per cell: the synchronised protocol (the global head broadcast every round: plain = `fedavg`, GGEUR =
`ggeur`) and the reference code's unsynchronised protocol (each agent's head never receives the global one;
the heads are averaged, sample-weighted, only to evaluate), plain and GGEUR; plus the central ceiling (the
same head trained on all the training data for the fleet's epoch budget). Every cell with the reference's
at-least-one-sample-per-class partition and without it; 5 seeds (0..4; the partition, the encoder split and
the initialisation change with the seed).

Printed keys (beta = 0.05, linear head, the per-class guarantee, means over the seeds, in points):
gain_points_unsync (GGEUR − plain, unsynchronised), gain_points_sync (GGEUR − plain, synchronised), the same
two without the guarantee (`*_no_guarantee`), seeds, beta, broker, and `cells`: every (beta, head, guarantee)
cell's mean accuracies and gains. Target: gain_points_unsync >= 3.

The digits backbone arm (the earlier experiment, kept; details "digits_backbone"): sklearn digits through
the shipped int8 backbone, linear head, the same arms without the hidden head, 3 seeds, plus the 4-domain toy
(class-wise pixel offsets per domain, plain FedAvg against GGEUR's multi-domain variant).

Runs use `--broker` ("memory" by default: the same engine and wire bytes without sockets, because of the run
count; "mosquitto" for MQTT); the JSON says which.

    fedfleet bench ggeur [--quick] [--seeds S] [--betas 0.05,0.1] [--heads linear,mlp] [--no-digits]
                         [--broker B] [--json PATH]
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from typing import Any

import numpy as np

from fedfleet.coordinator.records.ledger import LedgerView
from fedfleet.coordinator.strategies import create as create_strategy
from fedfleet.coordinator.strategies._config import carried_defaults
from fedfleet.coordinator.strategies.base import Strategy
from fedfleet.coordinator.strategies.ggeur import GGEURStrategy
from fedfleet.edge_agent.cli_run import ArgParser
from fedfleet.edge_agent.learners import LocalData
from fedfleet.edge_agent.wire import protocol, signing
from fedfleet.models import data as datasets
from fedfleet.models.mirrors.head import CoordinatorModel
from fedfleet.tools.bench._ggeur_pca import Unsynchronised
from fedfleet.tools.bench.output import emit

GGEUR_DEFAULTS = carried_defaults(GGEURStrategy.Config)  # a job's ggeur [method] defaults
BENCH_SIGNING_KEY = signing.new_signing_seed()  # the coordinator's key for this run; its agents pin it

KEYS = ("beta", "seeds", "broker", "gain_points_unsync", "gain_points_sync", "gain_points_unsync_no_guarantee",
        "gain_points_sync_no_guarantee", "cells")
ARMS = ("sync_plain", "sync_ggeur", "unsync_plain", "unsync_ggeur")
TOY = {"variant": "multi_domain", "target": 200, "local_pool": 50, "proto_pool": 50, "per_sample": 12}


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


def mnist_pca(*, seeds: int, betas: list[float], heads: list[str], agents: int, rounds: int, epochs: int,
              broker: str) -> dict[str, Any]:
    from fedfleet.tools.bench._ggeur_pca import cell

    cells: dict[str, Any] = {}
    for beta in betas:
        for head in heads:
            for guarantee in (True, False):
                per = []
                for seed in range(seeds):
                    per.append(cell(seed=seed, beta=beta, head=head, guarantee=guarantee, agents=agents,
                                    rounds=rounds, epochs=epochs, broker=broker, ggeur_defaults=GGEUR_DEFAULTS,
                                    arms=ARMS))
                    print(f"pca beta {beta} {head} guarantee={guarantee} seed {seed}: {per[-1]}", file=sys.stderr,
                          flush=True)
                mean = {k: round(float(np.mean([p[k] for p in per])), 4) for k in per[0]}
                gains = {f"gain_points_{proto}": round(float(np.mean(
                    [100 * (p[f"{proto}_ggeur"] - p[f"{proto}_plain"]) for p in per])), 2) for proto in ("sync", "unsync")}
                sd = {f"gain_points_{proto}_sd": round(float(np.std(
                    [100 * (p[f"{proto}_ggeur"] - p[f"{proto}_plain"]) for p in per], ddof=1)), 2) if seeds > 1 else None
                      for proto in ("sync", "unsync")}
                cells[f"beta{beta:g}/{head}/{'guarantee' if guarantee else 'no_guarantee'}"] = {
                    **mean, **gains, **sd, "per_seed": per}
    return cells


def digits_backbone(args: Any) -> dict[str, Any]:
    """The earlier experiment on the int8 digits backbone (see the module docstring)."""
    from fedfleet.coordinator.broker import start_broker

    blob, cmodel = package()
    seeds = list(range(args.digits_seeds))
    runs: dict[str, list[dict[str, Any]]] = {"guarantee": [], "no_guarantee": []}
    toy: list[dict[str, Any]] = []
    with start_broker(args.broker) as broker:
        for seed in seeds:
            for variant, guarantee in (("guarantee", True), ("no_guarantee", False)):
                runs[variant].append(label_skew(broker.url, blob, cmodel, seed=seed, agents=args.agents,
                                                beta=0.05, rounds=args.rounds, epochs=args.epochs,
                                                guarantee=guarantee, diagnostic=True))
                print(f"digits seed {seed} {variant}: plain {runs[variant][-1]['fedavg']['accuracy']:.4f} "
                      f"ggeur {runs[variant][-1]['ggeur']['accuracy']:.4f}", file=sys.stderr, flush=True)
            toy.append(domain_toy(broker.url, blob, cmodel, seed=seed, rounds=args.rounds, epochs=args.epochs))

    def summary(items: list[dict[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for name, key in (("sync_plain", "fedavg"), ("sync_ggeur", "ggeur"), ("unsync_plain", "unsynchronised_plain"),
                          ("unsync_ggeur", "unsynchronised_ggeur")):
            out[name] = round(float(np.mean([r[key]["accuracy"] for r in items])), 4)
        for proto in ("sync", "unsync"):
            out[f"gain_points_{proto}"] = round(100 * (out[f"{proto}_ggeur"] - out[f"{proto}_plain"]), 2)
        stats = [r["ggeur"]["bytes"].get("census", {}).get("up", 0) + r["ggeur"]["bytes"].get("stats", {}).get("up", 0)
                 for r in items]
        out["stats_bytes_up"] = int(np.mean(stats))
        return out

    central = [central_head(seed, cmodel, args.rounds * args.epochs) for seed in seeds]
    mixes = {v: [r["ggeur"]["mix"] for r in runs[v]] for v in runs}
    plain = np.mean([t["fedavg"] for t in toy], axis=0)
    gg = np.mean([t["ggeur"] for t in toy], axis=0)
    return {
        "beta": 0.05, "seeds": len(seeds), "guarantee": summary(runs["guarantee"]),
        "no_guarantee": summary(runs["no_guarantee"]), "central_linear_head": round(float(np.mean(central)), 4),
        "augmented_class_ratio": {v: [m["max_min_ratio"] for m in ms] for v, ms in mixes.items()},
        "synthetic_share_around_3_or_fewer": {v: [m["share_around_3_or_fewer"] for m in ms] for v, ms in mixes.items()},
        "not_ok": sum(r["ggeur"]["not_ok"] for v in runs.values() for r in v),
        "domain_toy": {"plain_per_domain": [round(float(v), 4) for v in plain],
                       "ggeur_per_domain": [round(float(v), 4) for v in gg],
                       "gain_points_mean": round(100 * float(gg.mean() - plain.mean()), 2), "config": TOY},
        "per_seed": runs,
    }


def main(argv: list[str] | None = None) -> int:
    parser = ArgParser(prog="fedfleet bench ggeur", description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=5, help="seeds (default %(default)s)")
    parser.add_argument("--digits-seeds", type=int, default=3, help="seeds of the digits backbone arm (default %(default)s)")
    parser.add_argument("--rounds", type=int, default=30, help="rounds per run (default %(default)s)")
    parser.add_argument("--epochs", type=int, default=5, help="local epochs per round (default %(default)s)")
    parser.add_argument("--agents", type=int, default=10, help="agents per run (default %(default)s)")
    parser.add_argument("--betas", default="0.05,0.1", help="comma-separated Dirichlet betas of the MNIST arm (default %(default)s)")
    parser.add_argument("--heads", default="linear,mlp", help="comma-separated heads of the MNIST arm: linear, mlp (default %(default)s)")
    parser.add_argument("--broker", default="memory", help="broker for the runs: memory (in-process, no sockets), mosquitto, embedded or mqtt://host:port (default %(default)s)")
    parser.add_argument("--no-digits", action="store_true", help="skip the digits backbone arm")
    parser.add_argument("--quick", action="store_true", help="1 seed, 2 rounds, 1 epoch, beta 0.05, linear (a smoke run)")
    parser.add_argument("--json", dest="json_path", help="also write the result JSON to this file")
    args = parser.parse_args(argv)
    betas = [float(b) for b in args.betas.split(",")]
    heads = [h.strip() for h in args.heads.split(",")]
    if 0.05 not in betas or "linear" not in heads or not set(heads) <= {"linear", "mlp"}:
        parser.error("--betas must include 0.05 and --heads 'linear' (the headline cell); heads: linear, mlp")
    if args.quick:
        args.seeds, args.digits_seeds, args.rounds, args.epochs, betas, heads = 1, 1, 2, 1, [0.05], ["linear"]
    t0 = time.perf_counter()
    cells = mnist_pca(seeds=args.seeds, betas=betas, heads=heads, agents=args.agents, rounds=args.rounds,
                      epochs=args.epochs, broker=args.broker)
    head, free = cells["beta0.05/linear/guarantee"], cells["beta0.05/linear/no_guarantee"]
    result: dict[str, Any] = {
        "beta": 0.05, "seeds": args.seeds, "broker": args.broker,
        "gain_points_unsync": head["gain_points_unsync"], "gain_points_sync": head["gain_points_sync"],
        "gain_points_unsync_no_guarantee": free["gain_points_unsync"],
        "gain_points_sync_no_guarantee": free["gain_points_sync"],
        "cells": {k: {m: v for m, v in c.items() if m != "per_seed"} for k, c in cells.items()},
        "setup": {"encoder": "PCA-64 of MNIST 5k, fitted on a 20% split no agent holds", "agents": args.agents,
                  "rounds": args.rounds, "epochs": args.epochs, "batch": 16, "lr": 0.1, "ggeur": GGEUR_DEFAULTS},
        "per_seed": {k: c["per_seed"] for k, c in cells.items()},
    }
    if not args.no_digits:
        result["digits_backbone"] = digits_backbone(args)
    result["wall_s"] = round(time.perf_counter() - t0, 1)
    emit(result, KEYS, args.json_path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
