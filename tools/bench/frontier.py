"""`fedfleet bench frontier`: accuracy against total bytes on the wire for every way fedfleet can train.

One task for all: the MLP 784-128-10 (`--dataset mnist --mode full`) on the MNIST 5k data, 10 agents,
Dirichlet(0.5), the same rounds and seed for every method, over a real broker. Methods, each with the
project's defaults: FedAvg dense (float32 up and down), FedAvg + FedZip (z = 0.03, E4, error feedback; the
downlink stays dense), FedZO (tunes the last layer, FedZip uplink, dense downlink) and Ferret at several
K (pairs up, coefficients down). `bytes_total` is up plus down for the rounds, counted at the MQTT layer;
the model package, published once for every method alike, is left out (it is in the details).

Prints a JSON list of {"method", "accuracy", "bytes_total"}; `--plot PNG` draws accuracy against bytes.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from fedfleet.coordinator.strategies import spec
from fedfleet.edge_agent.cli_run import ArgParser
from fedfleet.tools.bench.ferret import job
from fedfleet.tools.bench.output import progress

POINT_KEYS = ("method", "accuracy", "bytes_total")


def methods(ks: list[int]) -> list[tuple[str, str, dict[str, Any], dict[str, Any] | None]]:
    """(label, method, method config, uplink) for every point."""
    out: list[tuple[str, str, dict[str, Any], dict[str, Any] | None]] = [
        ("FedAvg dense", "fedavg", {}, {"name": "none"}),
        ("FedAvg + FedZip", "fedavg", {}, dict(spec("fedavg").default_uplink)),
        ("FedZO", "fedzo", {}, None),
    ]
    return out + [(f"Ferret K={k}", "ferret", {"k": k}, None) for k in ks]


def run(*, rounds: int, agents: int, seed: int, broker: str, ks: list[int]) -> tuple[list[dict[str, Any]], dict]:
    points, details = [], {}
    for label, method, mc, uplink in methods(ks):
        progress("frontier", f"{label}: {rounds} rounds, {agents} agents on MNIST")
        r = job(method, dataset="mnist", rounds=rounds, agents=agents, seed=seed, broker=broker, method_config=mc,
                uplink=uplink)
        up, down = sum(r["bytes_up"]), sum(r["bytes_down"])
        points.append({"method": label, "accuracy": r["accuracy"][-1], "bytes_total": up + down})
        details[label] = {"bytes_up": up, "bytes_down": down, "curve": r["accuracy"], "package_bytes": r["package_bytes"],
                          "wall_s": round(r["wall_s"], 1)}
    return points, {"rounds": rounds, "agents": agents, "seed": seed, "per_method": details}


def plot(points: list[dict[str, Any]], info: dict[str, Any], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    ferret = [p for p in points if p["method"].startswith("Ferret")]
    others = [p for p in points if not p["method"].startswith("Ferret")]
    for p, marker in zip(others, "osD^v"):
        ax.scatter(p["bytes_total"], p["accuracy"], marker=marker, s=60, label=p["method"], zorder=3)
    if ferret:
        ferret.sort(key=lambda p: p["bytes_total"])
        ax.plot([p["bytes_total"] for p in ferret], [p["accuracy"] for p in ferret], "-*", ms=11, color="crimson",
                label="Ferret (K bases per block)", zorder=3)
        for p in ferret:
            ax.annotate(p["method"].split()[-1], (p["bytes_total"], p["accuracy"]), fontsize=8, xytext=(4, -10),
                        textcoords="offset points")
    ax.set_xscale("log")
    ax.set_xlabel("total bytes on the wire, up + down, MQTT layer (log)")
    ax.set_ylabel("test accuracy")
    ax.set_title(f"MNIST MLP 784-128-10, {info['agents']} agents, Dirichlet 0.5, {info['rounds']} rounds each")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8, loc="center right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    p = ArgParser(prog="fedfleet bench frontier", description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=20, help="rounds per run (default %(default)s)")
    p.add_argument("--agents", type=int, default=10, help="agents per run (default %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of the shards and the model (default %(default)s)")
    p.add_argument("--k", type=int, nargs="+", default=[25, 100, 400], help="Ferret's K values")
    p.add_argument("--broker", default="mosquitto", help="broker for the runs: mosquitto (default), embedded, memory (in-process, no sockets) or mqtt://host:port")
    p.add_argument("--quick", action="store_true", help="2 rounds, 3 agents, Ferret at K = 16 (a smoke run)")
    p.add_argument("--plot", help="also draw the result as a PNG to this file")
    p.add_argument("--json", help="also write the result JSON to this file")
    args = p.parse_args(argv)
    from fedfleet.coordinator.job.run import small_model_threads

    small_model_threads()
    if args.quick:
        points, info = run(rounds=2, agents=3, seed=args.seed, broker=args.broker, ks=[16])
    else:
        points, info = run(rounds=args.rounds, agents=args.agents, seed=args.seed, broker=args.broker, ks=args.k)
    for pt in points:
        if set(pt) != set(POINT_KEYS):
            raise KeyError(f"frontier point has keys {sorted(pt)}")
    if args.plot:
        plot(points, info, args.plot)
    print("details: " + json.dumps(info), file=sys.stderr)
    text = json.dumps(points, indent=2)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
