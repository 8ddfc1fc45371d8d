"""`fedfleet bench fedzip`: accuracy against uplink compression in real federated training over MQTT.

Federated training of the MLP 784-128-10 (101,770 parameters) on the MNIST 5k data, 10 agents,
Dirichlet(0.5), the same rounds and seed for every point; each point is a full run against a real broker.
`uplink_ratio` is dense float32 uplink bytes divided by the codec's uplink bytes, both counted at the MQTT
layer. Writes {"accuracy_dense", "points", "best_ratio_within_1pt"}; points are
{"z", "encoding", "error_feedback", "uplink_ratio", "accuracy"}.
"""

from __future__ import annotations

import json
import sys
import tempfile

from fedfleet.coordinator.job.config import JobConfig
from fedfleet.edge_agent.cli_run import ArgParser
from fedfleet.tools.bench.output import emit

GRID = [(z, enc, ef) for z in (0.1, 0.05, 0.03, 0.02, 0.01, 0.003) for enc in ("e4",) for ef in (False, True)]
QUICK_GRID = [(0.01, "e4", True)]


def run_point(uplink: dict, *, rounds: int, agents: int, seed: int, broker: str) -> tuple[float, int]:
    from fedfleet.coordinator.job.run import run_demo

    cfg = JobConfig(mode="full", dataset="mnist", rounds=rounds, agents=agents, alpha=0.5, seed=seed,
                    uplink=uplink, deadline_s=120.0, quorum=1.0)
    with tempfile.TemporaryDirectory() as tmp:
        result = run_demo(cfg, broker=broker, run_dir=tmp, quiet=True)
    return result.final_accuracy, result.bytes_up


def run(*, rounds: int, agents: int, seed: int, broker: str, grid: list[tuple[float, str, bool]],
        extra_encodings: bool = False) -> dict:
    acc_dense, bytes_dense = run_point({"name": "none"}, rounds=rounds, agents=agents, seed=seed, broker=broker)
    print(f"dense: accuracy {acc_dense:.4f}, uplink {bytes_dense} B", file=sys.stderr)
    points = []
    for z, enc, ef in grid + ([(0.01, e, True) for e in ("e1", "e2", "e3")] if extra_encodings else []):
        spec = {"name": "fedzip", "z": z, "encoding": enc, "error_feedback": ef}
        acc, up = run_point(spec, rounds=rounds, agents=agents, seed=seed, broker=broker)
        point = {"z": z, "encoding": enc, "error_feedback": ef, "uplink_ratio": bytes_dense / up, "accuracy": acc}
        print(json.dumps(point), file=sys.stderr)
        points.append(point)
    within = [p["uplink_ratio"] for p in points if p["accuracy"] >= acc_dense - 0.01]
    return {"accuracy_dense": acc_dense, "points": points, "best_ratio_within_1pt": max(within, default=None),
            "rounds": rounds, "agents": agents, "dense_uplink_bytes": bytes_dense}


def plot(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for ef, marker in ((False, "o"), (True, "s")):
        pts = sorted((p for p in result["points"] if p["error_feedback"] is ef and p["encoding"] == "e4"),
                     key=lambda p: p["uplink_ratio"])
        if pts:
            ax.plot([p["uplink_ratio"] for p in pts], [p["accuracy"] for p in pts], marker=marker,
                    label=f"FedZip E4, error feedback {'on' if ef else 'off'}")
            for p in pts:
                ax.annotate(f"z={p['z']}", (p["uplink_ratio"], p["accuracy"]), fontsize=7,
                            xytext=(3, 3), textcoords="offset points")
    ax.axhline(result["accuracy_dense"], color="grey", ls="--", label="dense float32")
    ax.axhspan(result["accuracy_dense"] - 0.01, result["accuracy_dense"], color="grey", alpha=0.15,
               label="within 1 point")
    ax.set_xscale("log")
    ax.set_xlabel("uplink compression (dense bytes / codec bytes, MQTT layer)")
    ax.set_ylabel("test accuracy after training")
    ax.set_title(f"FedZip on MNIST MLP 784-128-10, {result['agents']} agents, {result['rounds']} rounds")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    p = ArgParser(prog="fedfleet bench fedzip", description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=40, help="rounds per run (default %(default)s)")
    p.add_argument("--agents", type=int, default=10, help="agents per run (default %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of the shards and the model (default %(default)s)")
    p.add_argument("--broker", default="mosquitto", help="broker for the runs: mosquitto (default), embedded, memory (in-process, no sockets) or mqtt://host:port")
    p.add_argument("--quick", action="store_true", help="one point, 2 rounds, 3 agents (a smoke run)")
    p.add_argument("--all-encodings", action="store_true", help="also E1, E2, E3 at z=0.01")
    p.add_argument("--plot", help="write the accuracy-vs-ratio curve here (PNG)")
    p.add_argument("--json", help="also write the result JSON to this file")
    args = p.parse_args(argv)
    from fedfleet.coordinator.job.run import small_model_threads

    small_model_threads()
    if args.quick:
        result = run(rounds=2, agents=3, seed=args.seed, broker=args.broker, grid=QUICK_GRID)
    else:
        result = run(rounds=args.rounds, agents=args.agents, seed=args.seed, broker=args.broker, grid=GRID,
                     extra_encodings=args.all_encodings)
    if args.plot:
        plot(result, args.plot)
    emit(result, ("accuracy_dense", "points", "best_ratio_within_1pt"), args.json)
    return 0
