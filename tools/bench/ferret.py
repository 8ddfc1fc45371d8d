"""`fedfleet bench ferret`: Ferret against dense FedAvg on the wire and in accuracy, over a real broker.

Main run: the MLP 784-128-10 (`--dataset mnist --mode full`, d = 101,770) on the MNIST 5k data, 10 agents,
Dirichlet(0.5), every agent every round. FedAvg is the project's (lr 0.1, 2 epochs of batch 16, dense
float32 up and down). Ferret gets the same local work: T = round(2 x mean shard / 16) SGD steps of batch 16
at lr 0.1 (50 steps here), K bases per block fresh each round, server lr 1. Bytes are the MQTT-layer counts
of the rounds (tasks down, results up; the model package, sent once to every agent by both, is left out
and shown in the details). Ferret also runs `--extra` x the rounds, to report the rounds and bytes each
method needs to reach the same accuracy when Ferret needs more rounds.

Prints {"d", "k", "rounds", "fedavg_accuracy", "ferret_accuracy", "fedavg_bytes_up", "ferret_bytes_up",
"fedavg_bytes_down", "ferret_bytes_down", "uplink_ratio", "downlink_ratio"} (accuracies at the same
`rounds`). The details line adds the accuracy curves, rounds and bytes to reach the same accuracy, the
agent's peak memory on mnist-mlp with and without the basis cache, and the spec's small check on digits
64-32-10 (20 agents): Ferret at K = 64 and 256, FedAvg and FedZO side by side, and Ferret at K = 64 with
the seed pool fixed for the run (the reference code's choice) instead of fresh each round.
"""

from __future__ import annotations

import sys
import tempfile
import time
import tracemalloc
from typing import Any

import numpy as np

from fedfleet.coordinator.job.config import JobConfig
from fedfleet.edge_agent.cli_run import ArgParser
from fedfleet.tools.bench.output import emit

KEYS = ("d", "k", "rounds", "fedavg_accuracy", "ferret_accuracy", "fedavg_bytes_up", "ferret_bytes_up",
        "fedavg_bytes_down", "ferret_bytes_down", "uplink_ratio", "downlink_ratio")
FEDAVG_EPOCHS, FEDAVG_BATCH = 2, 16  # the project's FedAvg defaults (fedfleet.coordinator.strategies.fedavg.Config)


def job(method: str, *, dataset: str, rounds: int, agents: int, seed: int, broker: str,
        method_config: dict[str, Any] | None = None, uplink: dict[str, Any] | None = None) -> dict[str, Any]:
    """One run over the broker; per-round accuracy and MQTT-layer bytes."""
    from fedfleet.coordinator.job.run import run_demo

    cfg = JobConfig(method=method, mode="full", dataset=dataset, rounds=rounds, agents=agents, alpha=0.5,
                    seed=seed, uplink=uplink, method_config=dict(method_config or {}), deadline_s=300.0,
                    quorum=1.0, fleet=f"bench-{method}-{int(time.time() * 1000) % 10**9}")
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        result = run_demo(cfg, broker=broker, run_dir=tmp, quiet=True)
    s = result.summaries
    out = {"accuracy": [round(x.accuracy, 4) for x in s], "bytes_up": [x.bytes_up for x in s],
           "bytes_down": [x.bytes_down for x in s], "ok": [x.ok for x in s],
           "package_bytes": result.bytes_down - sum(x.bytes_down for x in s), "wall_s": time.perf_counter() - t0}
    print(f"{method} {method_config or ''} on {dataset}: accuracy {out['accuracy'][-1]:.4f} after {rounds} rounds, "
          f"up {sum(out['bytes_up'])} B, down {sum(out['bytes_down'])} B, {out['wall_s']:.0f} s", file=sys.stderr)
    return out


def matched_steps(dataset: str, agents: int, seed: int) -> int:
    """Ferret's local steps for the same local work as FedAvg's 2 epochs of batch 16 on a mean-sized shard."""
    from fedfleet.coordinator.job.run import shards

    local, _ = shards(JobConfig(mode="full", dataset=dataset, agents=agents, alpha=0.5, seed=seed))
    return max(1, round(FEDAVG_EPOCHS * float(np.mean([len(x) for x in local])) / FEDAVG_BATCH))


def rounds_to(curve: list[float], target: float) -> int | None:
    return next((i + 1 for i, a in enumerate(curve) if a >= target), None)


def reach(run: dict[str, Any], target: float) -> dict[str, Any]:
    n = rounds_to(run["accuracy"], target)
    if n is None:
        return {"rounds": None, "bytes_up": None, "bytes_down": None}
    return {"rounds": n, "bytes_up": sum(run["bytes_up"][:n]), "bytes_down": sum(run["bytes_down"][:n])}


def agent_peak_memory(k: int, steps: int, seed: int) -> dict[str, float]:
    """Peak bytes a Ferret agent allocates in a mnist-mlp round (sync from coefficients, local steps,
    projection; the learner's basis cache included, since tracing runs while it fills), by tracemalloc, with
    the default 64 MB basis cache and with none. The model package, data and runtime are not included."""
    from fedfleet.coordinator.job.run import build, shards
    from fedfleet.coordinator.strategies import ClientResult, create
    from fedfleet.edge_agent.learners import Task
    from fedfleet.edge_agent.learners import create as create_learner
    from fedfleet.edge_agent.model import EdgeModel

    cfg = JobConfig(mode="full", dataset="mnist", agents=10, alpha=0.5, seed=seed)
    blob, cmodel = build(cfg)
    local, _ = shards(cfg)
    model = EdgeModel.from_bytes(blob)
    out: dict[str, float] = {}
    model.features(local[0].x, cache_key="local")
    for budget in (64, 0):
        mc = {"k": k, "local_steps": steps, "batch": FEDAVG_BATCH, "basis_cache_mb": budget, "seed": seed}
        strategy = create("ferret", cmodel.initial_state(), **mc, coordinator_cache_mb=0)  # server cache untraced
        learner = create_learner("ferret")
        peaks = []
        for r in (1, 2, 3):  # round 1 fills the cache; rounds 2, 3 also rebuild the replica from coefficients
            spec = strategy.configure(r, 0, ["a0"])["a0"]
            task = Task("mem", r, "ferret", spec.config, spec.tensors)
            if r == 1:
                tracemalloc.start()  # traced from before the agent's first allocation to the end
            tracemalloc.reset_peak()
            res = learner.learn(task, local[0], model)
            peaks.append(tracemalloc.get_traced_memory()[1])
            strategy.aggregate(r, 0, [ClientResult("a0", res.tensors, res.samples, res.metrics)])
        tracemalloc.stop()
        peak = max(peaks)  # what the learner holds (replica, cache) plus its working set, at the worst round
        out[f"peak_mb_cache_{budget}mb"] = round(peak / 2**20, 1)
        out[f"cache_held_mb_cache_{budget}mb"] = round(learner.cache.peak / 2**20, 1)
    return out


def small_check(*, rounds: int, agents: int, seed: int, broker: str, ks: tuple[int, ...]) -> dict[str, Any]:
    """The spec's small check: digits MLP 64-32-10 (d = 2410), 20 agents, Dirichlet(0.5)."""
    steps = matched_steps("digits", agents, seed)
    runs = {"fedavg": job("fedavg", dataset="digits", rounds=rounds, agents=agents, seed=seed, broker=broker,
                          uplink={"name": "none"}),
            "fedzo": job("fedzo", dataset="digits", rounds=rounds, agents=agents, seed=seed, broker=broker,
                         uplink={"name": "none"})}
    for k in ks:
        runs[f"ferret_k{k}"] = job("ferret", dataset="digits", rounds=rounds, agents=agents, seed=seed, broker=broker,
                                   method_config={"k": k, "local_steps": steps, "batch": FEDAVG_BATCH})
    # the reference code's seed pool, fixed for the run, against the fresh-per-round default, at the smallest K
    runs[f"ferret_k{ks[0]}_fixed_pool"] = job("ferret", dataset="digits", rounds=rounds, agents=agents, seed=seed,
                                              broker=broker, method_config={"k": ks[0], "local_steps": steps,
                                                                            "batch": FEDAVG_BATCH, "pool": "run"})
    return {"rounds": rounds, "agents": agents, "ferret_local_steps": steps,
            **{name: {"accuracy": r["accuracy"][-1], "bytes_up": sum(r["bytes_up"]),
                      "bytes_down": sum(r["bytes_down"]), "curve": r["accuracy"]} for name, r in runs.items()}}


def run(*, rounds: int, extra: int, k: int, agents: int, seed: int, broker: str, small: dict[str, Any] | None,
        memory: bool) -> dict[str, Any]:
    from fedfleet.coordinator.job.run import build

    d = sum(v.numel() for v in build(JobConfig(mode="full", dataset="mnist"))[1].initial_state().values())
    steps = matched_steps("mnist", agents, seed)
    fedavg = job("fedavg", dataset="mnist", rounds=rounds, agents=agents, seed=seed, broker=broker,
                 uplink={"name": "none"})
    ferret = job("ferret", dataset="mnist", rounds=rounds * extra, agents=agents, seed=seed, broker=broker,
                 method_config={"k": k, "local_steps": steps, "batch": FEDAVG_BATCH})
    up = {m: sum(r["bytes_up"][:rounds]) for m, r in (("fedavg", fedavg), ("ferret", ferret))}
    down = {m: sum(r["bytes_down"][:rounds]) for m, r in (("fedavg", fedavg), ("ferret", ferret))}
    acc_avg, acc_fer = fedavg["accuracy"][rounds - 1], ferret["accuracy"][rounds - 1]
    result: dict[str, Any] = {
        "d": int(d), "k": k, "rounds": rounds, "fedavg_accuracy": acc_avg, "ferret_accuracy": acc_fer,
        "fedavg_bytes_up": up["fedavg"], "ferret_bytes_up": up["ferret"], "fedavg_bytes_down": down["fedavg"],
        "ferret_bytes_down": down["ferret"], "uplink_ratio": up["fedavg"] / up["ferret"],
        "downlink_ratio": down["fedavg"] / down["ferret"],
        "agents": agents, "ferret_local_steps": steps, "fedavg_local": f"{FEDAVG_EPOCHS} epochs of batch {FEDAVG_BATCH}",
        "accuracy_gap_points": 100 * (acc_avg - acc_fer), "ferret_rounds_run": rounds * extra,
        "fedavg_curve": fedavg["accuracy"], "ferret_curve": ferret["accuracy"],
        "package_bytes": {"fedavg": fedavg["package_bytes"], "ferret": ferret["package_bytes"]},
        "wall_s": {"fedavg": round(fedavg["wall_s"], 1), "ferret": round(ferret["wall_s"], 1)},
    }
    for name, target in (("within_3_points", acc_avg - 0.03), ("fedavg_final", acc_avg)):
        a, f = reach(fedavg, target), reach(ferret, target)
        result[f"to_reach_{name}"] = {"target": round(target, 4), "fedavg": a, "ferret": f}
    if memory:
        result["agent_memory"] = agent_peak_memory(k, steps, seed)
    if small is not None:
        result["small_check_digits"] = small_check(**small)
    return result


def main(argv: list[str] | None = None) -> int:
    p = ArgParser(prog="fedfleet bench ferret", description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=20, help="rounds per run (default %(default)s)")
    p.add_argument("--extra", type=int, default=3, help="Ferret also runs this many times the rounds")
    p.add_argument("--k", type=int, default=100, help="Ferret's random bases per round (default %(default)s)")
    p.add_argument("--agents", type=int, default=10, help="agents per run (default %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of the shards and the model (default %(default)s)")
    p.add_argument("--broker", default="mosquitto", help="broker for the runs: mosquitto (default), embedded, memory (in-process, no sockets) or mqtt://host:port")
    p.add_argument("--small-rounds", type=int, default=20, help="rounds of the digits small check (0: skip it)")
    p.add_argument("--quick", action="store_true", help="2 rounds, 3 agents, K = 32, a 2-round small check")
    p.add_argument("--json", help="also write the result JSON to this file")
    args = p.parse_args(argv)
    from fedfleet.coordinator.job.run import small_model_threads

    small_model_threads()
    if args.quick:
        small = {"rounds": 2, "agents": 4, "seed": args.seed, "broker": args.broker, "ks": (16,)}
        result = run(rounds=2, extra=1, k=32, agents=3, seed=args.seed, broker=args.broker, small=small, memory=False)
    else:
        small = ({"rounds": args.small_rounds, "agents": 20, "seed": args.seed, "broker": args.broker, "ks": (64, 256)}
                 if args.small_rounds else None)
        result = run(rounds=args.rounds, extra=args.extra, k=args.k, agents=args.agents, seed=args.seed,
                     broker=args.broker, small=small, memory=True)
    emit(result, KEYS, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
