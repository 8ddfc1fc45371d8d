"""Benchmark: FOT against FedAvg on continual tasks, ACC and FGT over Mosquitto.

Setup (the spec's permuted digits, methods-b section 3d): sklearn digits, 5 tasks (the identity and 4 fixed
pixel permutations), a shared 10-way head, the whole 64-128-128-10 MLP trained on the agents (full mode),
20 agents with IID shards (~72 samples each, under every task's permutation), 10 agents per round, 40
rounds per task, 1 local epoch of batch 16 at lr 0.05 (weight decay 1e-5), FOT with eps = 0.95 (no
increment) and Uniform[-1, 1] sketches of width m = d_l, all weight matrices protected. FedAvg runs the same
schedule with the same local settings and uniform weights (`fedavg` with FedAvg's sample weights, which
are equal here). Each run is a full `fedfleet demo` job (coordinator, 20 MQTT agents, ledger) against its
own Mosquitto broker; ACC and FGT come from the accuracy matrix a[t][tau] in the run's ledger, in points,
means over `--seeds` seeds (partition, initialisation, client sampling and local batches change with it).

Printed JSON: tasks, rounds_per_task, fedavg_acc, fedavg_fgt, fot_acc, fot_fgt, basis_fill (per protected
layer: k_l/d_l after each task, mean over seeds). The details line holds the split-digits variant (5 tasks
x 2 classes, per-task heads, the output layer unprotected), per-seed values, the mean matrices, the
per-agent upload of ordinary and task-end rounds, wall times, and `diagnostics`: FOT on permuted digits
with one thing changed each (biases frozen after task 1; eps = 0.99; every agent in every round), to show
where the remaining forgetting comes from. They are not the method's settings.

    fedfleet bench fot [--quick] [--seeds S] [--rounds-per-task R] [--no-split] [--no-diagnostics]
                       [--json PATH] [--plot PNG]
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from fedfleet.coordinator.job.config import JobConfig
from fedfleet.coordinator.tasks.continual import acc_fgt
from fedfleet.coordinator.tasks.schedule import Schedule, permuted_digits, split_digits
from fedfleet.edge_agent.cli_run import ArgParser
from fedfleet.tools.bench.output import emit

KEYS = ("tasks", "rounds_per_task", "fedavg_acc", "fedavg_fgt", "fot_acc", "fot_fgt", "basis_fill")
LOCAL = {"lr": 0.05, "epochs": 1, "batch": 16, "weight_decay": 1e-5}


# diagnostics, not the method's settings: each changes one thing to show where FOT's remaining forgetting
# comes from (run on permuted digits, same seeds, over the broker too)
DIAGNOSTICS: dict[str, dict[str, Any]] = {
    "fot_biases_frozen": {"method": {"biases": "frozen"}},  # no bias drift after task 1
    "fot_eps_0.99": {"method": {"eps": 0.99}},  # a basis holding 99% of the input energy
    "fot_all_clients": {"per_round": "all"},  # every agent in every round, so in every task-end sketch
}


def job(method: str, schedule: Schedule, *, seed: int, agents: int, per_round: int,
        extra: dict[str, Any] | None = None) -> JobConfig:
    extra = {"eps": 0.95, "eps_inc": 0.0, **(extra or {})} if method == "fot" else {}
    return JobConfig(method=method, agents=agents, per_round=per_round, alpha=0.0, mode="full", hidden=128,
                     hidden_layers=2, seed=seed, deadline_s=60.0, quorum=1.0, fleet=f"bench-fot-{method}-{seed}",
                     method_config={**LOCAL, **extra}, uplink={"name": "none"}, continual=schedule.to_dict())


def run_one(method: str, schedule: Schedule, *, seed: int, agents: int, per_round: int, broker: str,
            work: Path, extra: dict[str, Any] | None = None, tag: str = "") -> dict[str, Any]:
    """One continual job over the broker; ACC/FGT (points), the matrix, FOT's basis and bytes per agent."""
    from fedfleet.coordinator.job.run import run_demo
    from fedfleet.coordinator.records.ledger import LedgerView

    run_dir = work / f"{method}{tag}-{seed}-{schedule.head}"
    t0 = time.perf_counter()
    result = run_demo(job(method, schedule, seed=seed, agents=agents, per_round=per_round, extra=extra),
                      broker=broker, run_dir=run_dir, quiet=True)
    wall = time.perf_counter() - t0
    with LedgerView(run_dir / "ledger.sqlite") as view:
        run = view.runs()[-1]
        _, matrix = view.accuracy_matrix(run)
        basis = view.basis(run)
        ends = view.task_end_rounds(run)
        ups = [r for r in view.agent_rows(run) if r["status"] == "ok"]
    acc, fgt = acc_fgt(matrix)
    fill: dict[str, list[float]] = {}
    for _, _, layer, k, d in basis:
        fill.setdefault(layer, []).append(k / d)
    up_end = [r["bytes_up"] for r in ups if r["round"] in ends]
    up_mid = [r["bytes_up"] for r in ups if r["round"] not in ends]
    return {"acc": 100 * acc, "fgt": 100 * fgt, "matrix": matrix, "basis_fill": fill, "wall_s": wall,
            "rejected": sum(s.rejected for s in result.summaries), "late": sum(s.late for s in result.summaries),
            "bytes_up_per_agent_round": float(np.mean(up_mid)) if up_mid else None,
            "bytes_up_per_agent_task_end": float(np.mean(up_end)) if up_end else None}


def _mean_matrix(runs: list[dict[str, Any]]) -> list[list[float | None]]:
    n = len(runs[0]["matrix"])
    return [[float(np.mean([r["matrix"][t][tau] for r in runs])) if tau <= t else None for tau in range(n)]
            for t in range(n)]


def compare(schedule: Schedule, *, seeds: int, agents: int, per_round: int, broker: str, work: Path,
            label: str) -> dict[str, Any]:
    runs: dict[str, list[dict[str, Any]]] = {"fedavg": [], "fot": []}
    for seed in range(seeds):
        for method in ("fedavg", "fot"):
            r = run_one(method, schedule, seed=seed, agents=agents, per_round=per_round, broker=broker, work=work)
            runs[method].append(r)
            print(f"{label} seed {seed} {method:6s} ACC {r['acc']:.2f} FGT {r['fgt']:.2f} ({r['wall_s']:.0f} s)",
                  file=sys.stderr, flush=True)
    fot_fill = runs["fot"][0]["basis_fill"]
    out: dict[str, Any] = {
        "tasks": len(schedule.tasks),
        "rounds_per_task": schedule.tasks[0].rounds,
        "head": schedule.head,
        "basis_fill": {layer: [round(float(np.mean([r["basis_fill"][layer][t] for r in runs["fot"]])), 4)
                               for t in range(len(v))] for layer, v in fot_fill.items()},
    }
    for method, rs in runs.items():
        out[f"{method}_acc"] = round(float(np.mean([r["acc"] for r in rs])), 2)
        out[f"{method}_fgt"] = round(float(np.mean([r["fgt"] for r in rs])), 2)
        out[f"{method}_per_seed"] = [{k: round(r[k], 2) for k in ("acc", "fgt", "wall_s")} for r in rs]
        out[f"{method}_matrix_mean"] = [[None if v is None else round(v, 4) for v in row] for row in _mean_matrix(rs)]
        out[f"{method}_rejected"] = sum(r["rejected"] for r in rs)
        out[f"{method}_late"] = sum(r["late"] for r in rs)
        out[f"{method}_bytes_up_per_agent_round"] = float(np.mean([r["bytes_up_per_agent_round"] for r in rs]))
    out["fot_bytes_up_per_agent_task_end"] = float(np.mean([r["bytes_up_per_agent_task_end"] for r in runs["fot"]]))
    return out


def diagnostics(schedule: Schedule, *, seeds: int, agents: int, per_round: int, broker: str,
                work: Path) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, change in DIAGNOSTICS.items():
        n = agents if change.get("per_round") == "all" else per_round
        runs = [run_one("fot", schedule, seed=seed, agents=agents, per_round=n, broker=broker, work=work,
                        extra=change.get("method"), tag=name) for seed in range(seeds)]
        out[name] = {"acc": round(float(np.mean([r["acc"] for r in runs])), 2),
                     "fgt": round(float(np.mean([r["fgt"] for r in runs])), 2),
                     "final_fill": {layer: round(float(np.mean([r["basis_fill"][layer][-1] for r in runs])), 4)
                                    for layer in runs[0]["basis_fill"]}}
        print(f"diagnostic {name}: ACC {out[name]['acc']:.2f} FGT {out[name]['fgt']:.2f}", file=sys.stderr, flush=True)
    return out


def plot(perm: dict[str, Any], split: dict[str, Any] | None, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(perm, "permuted digits")] + ([(split, "split digits, per-task heads")] if split else [])
    fig, axes = plt.subplots(len(panels), 3, figsize=(13, 4.0 * len(panels)), squeeze=False)
    for row, (res, title) in enumerate(panels):
        for col, method in enumerate(("fedavg", "fot")):
            ax = axes[row][col]
            m = np.array([[np.nan if v is None else 100 * v for v in r] for r in res[f"{method}_matrix_mean"]])
            im = ax.imshow(m, vmin=0, vmax=100, cmap="viridis")
            for (t, tau), v in np.ndenumerate(m):
                if np.isfinite(v):
                    ax.text(tau, t, f"{v:.0f}", ha="center", va="center", color="w" if v < 60 else "k", fontsize=8)
            ax.set_title(f"{title}: {'FedAvg' if method == 'fedavg' else 'FOT'}\n"
                         f"ACC {res[f'{method}_acc']:.1f}, FGT {res[f'{method}_fgt']:.1f}", fontsize=9)
            ax.set_xlabel("evaluated on task")
            ax.set_ylabel("after task")
            fig.colorbar(im, ax=ax, fraction=0.046)
        ax = axes[row][2]
        for layer, fill in res["basis_fill"].items():
            ax.plot(range(1, len(fill) + 1), fill, marker="o", label=layer)
        ax.set_ylim(0, 1.05)
        ax.set_xlabel("after task")
        ax.set_ylabel("k_l / d_l")
        ax.set_title(f"{title}: FOT basis fill", fontsize=9)
        ax.legend(fontsize=8)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = ArgParser(prog="fedfleet bench fot", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny: 2 tasks x 3 rounds, 4 agents, 1 seed")
    p.add_argument("--seeds", type=int, default=3, help="seeds per method (default %(default)s)")
    p.add_argument("--tasks", type=int, default=5, help="continual tasks (default %(default)s)")
    p.add_argument("--rounds-per-task", type=int, default=40, help="rounds of each task (default %(default)s)")
    p.add_argument("--agents", type=int, default=20, help="agents in the fleet (default %(default)s)")
    p.add_argument("--per-round", type=int, default=10, help="agents asked per round (default %(default)s)")
    p.add_argument("--no-split", action="store_true", help="skip the split-digits variant")
    p.add_argument("--no-diagnostics", action="store_true", help="skip the diagnostic FOT variants")
    p.add_argument("--broker", default="mosquitto", help="broker for the runs: mosquitto (default), embedded, memory (in-process, no sockets) or mqtt://host:port")
    p.add_argument("--json", help="also write the result JSON to this file")
    p.add_argument("--plot", help="also draw the result as a PNG to this file")
    args = p.parse_args(argv)
    if args.quick:
        args.seeds, args.tasks, args.rounds_per_task, args.agents, args.per_round = 1, 2, 3, 4, 2
        args.no_diagnostics = True
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        common = {"seeds": args.seeds, "agents": args.agents, "per_round": args.per_round, "broker": args.broker,
                  "work": work}
        perm = compare(permuted_digits(args.tasks, args.rounds_per_task), label="permuted", **common)
        split = None if args.no_split else compare(split_digits(args.rounds_per_task, tasks=args.tasks),
                                                   label="split", **common)
        diag = None if args.no_diagnostics else diagnostics(permuted_digits(args.tasks, args.rounds_per_task),
                                                            **common)
    result = {**{k: perm[k] for k in KEYS}, "seeds": args.seeds, "agents": args.agents, "per_round": args.per_round,
              "broker": args.broker, "permuted": {k: v for k, v in perm.items() if k not in KEYS},
              "split_digits": split, "diagnostics": diag, "wall_s": round(time.perf_counter() - t0, 1)}
    if args.plot:
        plot(perm, split, args.plot)
    emit(result, KEYS, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
