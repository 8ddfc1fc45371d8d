"""Benchmark: robust mixing under Byzantine agents (MoNNA vs NNA and the classic aggregators).

Setup (the issue's): n = 13 agents, f = 3 Byzantine, sklearn digits, Dirichlet alpha = 1 over the 10
honest agents, a 64-32-10 MLP, batch 16, gamma_t = 0.5 / (1 + t / 50). Every robust rule runs in the
decentralised MoNNA relay (`fedfleet.coordinator.strategies.monna` with `mixing = <rule>`): MoNNA is NNA with
beta = 0.9, "nna_beta0" is NNA without momentum, the others mix with their rule at beta = 0.9, and
"mean" is D-SGD. Attacks: none, ALIE, FOE, sign flip, label flip (omniscient hook on; the spec's
attack: mu - gamma_t * mean over the honest nodes of their flipped-label gradients). Each matrix cell
has `accuracy`, the mean test accuracy over the honest nodes' own models after the last step, and
`worst_node`, the minimum over them.

Every run goes through the round engine and real agents (`fedfleet.tools.bench.runner.run_strategy`) over
`--broker`: Mosquitto by default, or `memory` (the in-process broker: the same engine, no sockets). Steps are
the engine's rounds, numbered from 1, so the first step size is gamma_1.
`nna_seconds` times one full NNA mixing (every row a pivot) of 100 vectors of 1M floats.

    fedfleet bench robust [--quick] [--steps N] [--broker mosquitto|embedded|memory|URL] [--json PATH]
"""

from __future__ import annotations

import functools
import sys
import time
from typing import Any

import numpy as np
import torch

from fedfleet.coordinator.strategies import _robust as robust
from fedfleet.coordinator.strategies import create as create_strategy
from fedfleet.edge_agent.cli_run import ArgParser
from fedfleet.edge_agent.learners import LocalData
from fedfleet.edge_agent.nn import mlp
from fedfleet.models import data as datasets
from fedfleet.tools.bench.output import emit
from fedfleet.tools.bench.runner import Runner, run_strategy

AGGREGATORS: dict[str, dict[str, Any]] = {
    "monna": {"mixing": "nna", "beta": 0.9},
    "nna_beta0": {"mixing": "nna", "beta": 0.0},
    "trimmed_mean": {"mixing": "trimmed_mean", "beta": 0.9},
    "median": {"mixing": "median", "beta": 0.9},
    "krum": {"mixing": "krum", "beta": 0.9},
    "geometric_median": {"mixing": "geometric_median", "beta": 0.9},
    "centered_clipping": {"mixing": "centered_clipping", "beta": 0.9, "mixing_kw": {"tau": 2.0}},
    "mean": {"mixing": "mean", "beta": 0.9},
}
ATTACKS = ["none", "alie", "foe", "sign_flip", "label_flip"]


def _setup(seed: int, n_honest: int, n_byz: int, alpha: float) -> tuple[dict[str, LocalData], list[str], datasets.Dataset]:
    train, test = datasets.split(datasets.digits(), 0.2, seed=seed)
    parts = datasets.partition_dirichlet(train.y, n_honest, alpha, seed=seed)
    agents = {f"agent-{i:02d}": LocalData(train.x[p], train.y[p]) for i, p in enumerate(parts)}
    rng = np.random.Generator(np.random.PCG64(seed + 1))
    byz = []
    for j in range(n_byz):  # Byzantine agents hold an i.i.d. sample (used only by the non-omniscient label flip)
        idx = rng.choice(len(train), size=100, replace=False)
        name = f"agent-{n_honest + j:02d}"
        agents[name] = LocalData(train.x[idx], train.y[idx])
        byz.append(name)
    return agents, byz, test


def run_one(
    aggregator: str,
    attack: str,
    *,
    steps: int,
    seed: int = 0,
    n: int = 13,
    f: int = 3,
    runner: Runner = run_strategy,
) -> dict[str, float]:
    """One cell of the matrix: mean and worst honest-node test accuracy after `steps` steps."""
    agents, byz, test = _setup(seed, n - f, f, alpha=1.0)
    if attack == "none":
        agents = {a: d for a, d in agents.items() if a not in byz}
    init = mlp.init([64, 32, 10], seed=seed)
    state = {k: torch.from_numpy(v) for k, v in init.items()}
    cfg = dict(AGGREGATORS[aggregator])
    strategy = create_strategy(
        "monna",
        state,
        f=f,
        n=n,
        lr=0.5,
        lr_decay=50,
        norm_penalty=1e-4,
        batch=16,
        seed=seed,
        omniscient=True,
        byzantine={} if attack == "none" else dict.fromkeys(byz, attack),
        **cfg,
    )
    runner(strategy, agents, steps)
    accs = [mlp.accuracy({k: v.numpy() for k, v in s.items()}, test.x, test.y) for s in strategy.node_states().values()]
    return {"accuracy": float(np.mean(accs)), "worst_node": float(np.min(accs))}


def run_matrix(
    *,
    runner: Runner = run_strategy,
    steps: int = 300,
    seed: int = 0,
    aggregators: list[str] | None = None,
    attacks: list[str] | None = None,
) -> dict[str, Any]:
    aggregators = aggregators or list(AGGREGATORS)
    attacks = attacks or ATTACKS
    matrix = []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the stacks here are tiny: thread start-up costs more than it saves
    try:
        for agg in aggregators:
            for att in attacks:
                res = run_one(agg, att, steps=steps, seed=seed, runner=runner)
                matrix.append({"aggregator": agg, "attack": att, "accuracy": round(res["accuracy"], 4),
                               "worst_node": round(res["worst_node"], 4)})
                print(f"{agg:18s} {att:11s} acc={res['accuracy']:.4f} worst={res['worst_node']:.4f}", file=sys.stderr)
    finally:
        torch.set_num_threads(threads)
    cell = {(m["aggregator"], m["attack"]): m["accuracy"] for m in matrix}  # mean over the honest nodes
    clean = cell.get(("mean", "none"), cell.get(("monna", "none"), float("nan")))
    monna = [v for (a, att), v in cell.items() if a == "monna" and att != "none"]
    gap = 100.0 * (clean - min(monna)) if monna else float("nan")
    return {"clean_accuracy": clean, "matrix": matrix, "monna_worst_gap": round(gap, 2)}


def nna_seconds(n: int = 100, d: int = 1_000_000, f: int = 10, repeats: int = 3, seed: int = 0) -> float:
    """Median wall time of one full NNA mixing (every row a pivot) of an n x d float32 stack."""
    g = torch.Generator().manual_seed(seed)  # timing data only; no shared randomness involved
    stack = torch.randn(n, d, generator=g)
    robust.nna_subsets(stack[:, :1000].contiguous(), f)  # warm-up of the code path
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = robust.nna_subsets(stack, f)
        times.append(time.perf_counter() - t0)
        del out
    return float(np.median(times))


def main(argv: list[str] | None = None) -> int:
    ap = ArgParser(prog="fedfleet bench robust", description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a few steps and cells, a small NNA timing (smoke test)")
    ap.add_argument("--steps", type=int, default=None, help="steps per run (default 300, quick 5)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the shards, the attacks and the model (default %(default)s)")
    ap.add_argument("--json", type=str, default=None, help="also write the JSON result to this path")
    ap.add_argument("--broker", default="mosquitto",
                    help="broker for the runs: mosquitto (default), embedded, memory (in-process, no sockets), URL")
    ap.add_argument("--in-process", action="store_true", help="the same as --broker memory")
    args = ap.parse_args(argv)
    broker = "memory" if args.in_process else args.broker
    runner = functools.partial(run_strategy, broker=broker)
    if args.quick:
        steps = args.steps or 5
        res = run_matrix(steps=steps, seed=args.seed, aggregators=["monna", "mean"], attacks=["none", "alie"],
                         runner=runner)
        nna_s = nna_seconds(n=20, d=10_000, f=2)
    else:
        steps = args.steps or 300
        res = run_matrix(steps=steps, seed=args.seed, runner=runner)
        nna_s = nna_seconds()
    out = {"n": 13, "f": 3, **res, "nna_s_n100_d1m": round(nna_s, 4),
           "transport": broker if broker == "memory" else f"mqtt ({broker})"}
    emit(out, ("n", "f", "clean_accuracy", "matrix", "monna_worst_gap", "nna_s_n100_d1m"), args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
