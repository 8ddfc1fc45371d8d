"""`fedfleet bench ferret`: Ferret against FedAvg and FedZO in accuracy and on the wire, through the round engine.

Headline (the spec's small check made the experiment; decision rules fixed before the runs): the digits MLP
64-32-10 (d = 2,410) in full mode, 20 agents, Dirichlet(0.5) label skew, 40 rounds, every agent every round,
seeds 0, 1, 2. FedAvg is the project's (lr 0.1, 2 epochs of batch 16, dense float32 up). Ferret gets the same
local work: T = round(2 x mean shard / 16) SGD steps of batch 16 at lr 0.1 (9 steps here), K bases per block
fresh each round, K in {16, 64, 256}, server lr 1 (the method's default); Ferret at K = 64 with server lr 2 is
run too and reported under its own label (declared before the runs; not the headline). FedZO is the project's
default configuration. Bytes are the MQTT-layer counts of the rounds (the model package, sent once to every
agent by every method, is left out).

Keys (K = 64, digits, means over the seeds): acc_gap_r20 / acc_gap_r40 = FedAvg's accuracy − Ferret's at
round 20 / 40, in points (positive: Ferret behind); fedzo_gap_at_bytes = Ferret's accuracy − FedZO's at the
same uplink bytes, in points: B = the smaller of the two runs' total uplink, each method's accuracy at its
last round whose cumulative uplink is <= B; uplink_ratio = FedAvg's uplink bytes / Ferret's over the same 40
rounds. Targets: acc_gap_r20 <= 3, acc_gap_r40 <= 1, fedzo_gap_at_bytes >= 5, uplink_ratio >= 200.

The d/K arm (details, "mnist"): the MLP 784-128-10 (d = 101,770) on MNIST 5k, 10 agents, Dirichlet(0.5),
FedAvg and Ferret K = 64 with matched local work, 40 rounds, seed 0: the first layer's d_l/K_l is ~1,600
at K = 64 against 32 on digits. (K = 256 was dropped from this arm before it ran: drawing 256 bases of
100,352 uniforms per agent-round did not fit the shared machine's time.)

Runs go through `fedfleet demo` jobs over `--broker` ("memory": the same engine and wire bytes without sockets,
the default here because of the run count; "mosquitto" for MQTT); the JSON says which ("broker").

    fedfleet bench ferret [--quick] [--seeds S] [--rounds R] [--no-mnist] [--broker B] [--json PATH] [--plot PNG]
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

KEYS = ("k", "rounds", "acc_gap_r20", "acc_gap_r40", "fedzo_gap_at_bytes", "uplink_ratio", "seeds", "broker",
        "fedavg_acc_r40", "ferret_acc_r40")
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


def _arm(dataset: str, *, rounds: int, agents: int, seed: int, broker: str, ks: tuple[int, ...],
         fedzo: bool, lr2: int | None) -> dict[str, dict[str, Any]]:
    """One seed of one arm: FedAvg, FedZO (if asked), Ferret at each K (server lr 1) and at K = lr2 with server lr 2."""
    steps = matched_steps(dataset, agents, seed)
    runs = {"fedavg": job("fedavg", dataset=dataset, rounds=rounds, agents=agents, seed=seed, broker=broker,
                          uplink={"name": "none"})}
    if fedzo:
        runs["fedzo"] = job("fedzo", dataset=dataset, rounds=rounds, agents=agents, seed=seed, broker=broker,
                            uplink={"name": "none"})
    for k in ks:
        runs[f"ferret_k{k}"] = job("ferret", dataset=dataset, rounds=rounds, agents=agents, seed=seed, broker=broker,
                                   method_config={"k": k, "local_steps": steps, "batch": FEDAVG_BATCH})
    if lr2:
        runs[f"ferret_k{lr2}_server_lr2"] = job("ferret", dataset=dataset, rounds=rounds, agents=agents, seed=seed,
                                                broker=broker, method_config={"k": lr2, "local_steps": steps,
                                                                              "batch": FEDAVG_BATCH, "server_lr": 2.0})
    for r in runs.values():
        r["steps"] = steps
    return runs


def at_bytes(a: dict[str, Any], b: dict[str, Any]) -> tuple[float, float, int]:
    """Each run's accuracy at its last round whose cumulative uplink is <= the smaller of the two totals."""
    ca, cb = np.cumsum(a["bytes_up"]), np.cumsum(b["bytes_up"])
    budget = int(min(ca[-1], cb[-1]))

    def acc(run: dict[str, Any], cum: np.ndarray) -> float:
        n = int(np.searchsorted(cum, budget, side="right"))
        return run["accuracy"][n - 1] if n else float("nan")

    return acc(a, ca), acc(b, cb), budget


def summarise(per_seed: list[dict[str, dict[str, Any]]], checkpoints: tuple[int, int]) -> dict[str, Any]:
    """Mean curves, accuracies at the checkpoints and total uplink per method over the seeds."""
    out: dict[str, Any] = {}
    for name in per_seed[0]:
        runs = [s[name] for s in per_seed]
        curve = np.mean([r["accuracy"] for r in runs], axis=0)
        out[name] = {"accuracy_curve": [round(float(x), 4) for x in curve],
                     **{f"acc_r{c}": round(float(curve[c - 1]), 4) for c in checkpoints},
                     "acc_r_per_seed": {str(c): [r["accuracy"][c - 1] for r in runs] for c in checkpoints},
                     "bytes_up_per_round": float(np.mean([np.mean(r["bytes_up"]) for r in runs])),
                     "bytes_up_total": float(np.mean([sum(r["bytes_up"]) for r in runs])),
                     "bytes_down_total": float(np.mean([sum(r["bytes_down"]) for r in runs])),
                     "local_steps": runs[0]["steps"], "wall_s": round(float(np.mean([r["wall_s"] for r in runs])), 1)}
    return out


def plot(digits: dict[str, Any], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.2))
    for name, r in digits.items():
        curve = np.array(r["accuracy_curve"])
        rounds = np.arange(1, len(curve) + 1)
        ax1.plot(rounds, curve, label=name)
        ax2.semilogx(rounds * r["bytes_up_per_round"], curve, label=name)
    ax1.set_xlabel("round")
    ax2.set_xlabel("cumulative uplink bytes (all agents, MQTT layer)")
    for ax in (ax1, ax2):
        ax.set_ylabel("test accuracy (mean over seeds)")
        ax.grid(True, alpha=0.3)
    ax1.set_title("digits 64-32-10, 20 agents, Dirichlet 0.5")
    ax2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _arm_job(job: tuple[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    from fedfleet.coordinator.job.run import small_model_threads

    small_model_threads()
    return _arm(job[0], **job[1])


def run(*, rounds: int, agents: int, seeds: int, broker: str, ks: tuple[int, ...], head_k: int,
        mnist: dict[str, Any] | None, jobs: int = 1) -> dict[str, Any]:
    checkpoints = (max(1, rounds // 2), rounds)
    work: list[tuple[str, dict[str, Any]]] = [
        ("digits", {"rounds": rounds, "agents": agents, "seed": seed, "broker": broker, "ks": ks, "fedzo": True,
                    "lr2": head_k}) for seed in range(seeds)]
    if mnist is not None:
        work.append(("mnist", {**mnist, "fedzo": False, "lr2": None, "broker": broker}))
    if jobs > 1:  # independent runs in parallel processes; the results do not depend on it
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(max_workers=jobs) as pool:
            done = list(pool.map(_arm_job, work))
    else:
        done = [_arm(name, **kw) for name, kw in work]
    per_seed = done[:seeds]
    digits = summarise(per_seed, checkpoints)
    fer, avg = f"ferret_k{head_k}", "fedavg"
    gaps = [at_bytes(s[fer], s["fedzo"]) for s in per_seed]
    up_ratio = float(np.mean([sum(s[avg]["bytes_up"]) / sum(s[fer]["bytes_up"]) for s in per_seed]))
    c20, c40 = checkpoints
    result: dict[str, Any] = {
        "k": head_k, "rounds": rounds,
        "acc_gap_r20": round(100 * (digits[avg][f"acc_r{c20}"] - digits[fer][f"acc_r{c20}"]), 2),
        "acc_gap_r40": round(100 * (digits[avg][f"acc_r{c40}"] - digits[fer][f"acc_r{c40}"]), 2),
        "fedzo_gap_at_bytes": round(float(np.mean([100 * (f - z) for f, z, _ in gaps])), 2),
        "uplink_ratio": round(up_ratio, 1), "seeds": seeds, "broker": broker,
        "fedavg_acc_r40": digits[avg][f"acc_r{c40}"], "ferret_acc_r40": digits[fer][f"acc_r{c40}"],
        "checkpoints": list(checkpoints), "agents": agents, "dataset": "digits 64-32-10 (d = 2,410), Dirichlet 0.5",
        "fedzo_gap_at_bytes_detail": [{"ferret": f, "fedzo": z, "uplink_bytes": b} for f, z, b in gaps],
        "digits": digits,
    }
    if mnist is not None:
        from fedfleet.coordinator.job.run import build

        d = sum(v.numel() for v in build(JobConfig(mode="full", dataset="mnist"))[1].initial_state().values())
        m = [done[seeds]]
        result["mnist"] = {"d": int(d), "agents": mnist["agents"], "rounds": mnist["rounds"], "seed": mnist["seed"],
                           **summarise(m, (max(1, mnist["rounds"] // 2), mnist["rounds"]))}
    return result


def main(argv: list[str] | None = None) -> int:
    p = ArgParser(prog="fedfleet bench ferret", description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=40, help="rounds per run (default %(default)s)")
    p.add_argument("--seeds", type=int, default=3, help="seeds (default %(default)s)")
    p.add_argument("--agents", type=int, default=20, help="agents per run (default %(default)s)")
    p.add_argument("--broker", default="memory", help="broker for the runs: memory (in-process, no sockets), mosquitto, embedded or mqtt://host:port (default %(default)s)")
    p.add_argument("--no-mnist", action="store_true", help="skip the MNIST 784-128-10 d/K arm")
    p.add_argument("--jobs", type=int, default=1, help="run the seeds and the MNIST arm in this many processes")
    p.add_argument("--memory", action="store_true", help="add a Ferret agent's peak memory on mnist-mlp (K = 64)")
    p.add_argument("--quick", action="store_true", help="2 rounds, 4 agents, 1 seed, K in {16, 64}, a 2-round MNIST arm")
    p.add_argument("--json", help="also write the result JSON to this file")
    p.add_argument("--plot", help="also draw the result as a PNG to this file")
    args = p.parse_args(argv)
    from fedfleet.coordinator.job.run import small_model_threads

    small_model_threads()
    if args.quick:
        mnist = {"rounds": 2, "agents": 3, "seed": 0, "ks": (64,)}
        result = run(rounds=2, agents=4, seeds=1, broker=args.broker, ks=(16, 64), head_k=64, mnist=mnist)
    else:
        mnist = None if args.no_mnist else {"rounds": args.rounds, "agents": 10, "seed": 0, "ks": (64,)}
        result = run(rounds=args.rounds, agents=args.agents, seeds=args.seeds, broker=args.broker, ks=(16, 64, 256),
                     head_k=64, mnist=mnist, jobs=args.jobs)
    if args.memory:
        result["agent_memory"] = agent_peak_memory(64, matched_steps("mnist", 10, 0), 0)
    if args.plot:
        plot(result["digits"], args.plot)
    emit(result, KEYS, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
