"""`fedfleet bench async`: synchronous against buffered asynchronous FedAvg on an emulated fleet over Mosquitto.

The fleet (`fedfleet.tools.emulate`, real agents with the shipped device profiles, one MQTT connection each):
`--agents` agents (40), a third of them slow (group "zero", the Raspberry Pi Zero 2 W profile with its compute
scaling), a fifth of them offline for random windows (group "flaky", Pi 4B profile, exponential on/off periods
with means 40 s online and 20 s offline, seeded), the rest Pi 4B (group "pi4"); the digits task, full mode (the
64-32-10 MLP); FedAvg with its defaults (lr 0.1, 2 local epochs, batch 16, FedZip uplink) and the FedZip
downlink. Both runs use the same seed, so the same partition, the same device draws and the same offline windows
(measured from each agent's start).

Decision rules (fixed before any run):
- synchronous: `--rounds` rounds (10), every online agent selected, the default deadline (30 s), grace (30 s) and
  quorum (0.5);
- asynchronous: `[aggregation] mode = "async"`, concurrency 20, buffer 10, max_staleness 10, weighting 1/sqrt(1+s);
  it publishes rounds x agents / buffer versions, so both runs may use the same number of results;
- `target_accuracy` = the synchronous run's final accuracy minus 0.01; each wall time is the sum of the wall times
  of its rounds (versions) up to the first evaluation at or above the target (null when never reached);
  `wall_ratio` = async_wall_s / sync_wall_s;
- `sync_bytes`, `async_bytes`: MQTT bytes up and down of the whole run (the ledger's per-round totals);
- `results_lost_*`: results the agents finished (uploaded, `tasks_done`) that got no ledger row of their own at
  the coordinator (an `ok` row or a `rejected:<reason>` row for that result); a synchronous result that comes after
  its round closed joins its `late` row and counts as lost (its work is not used). Rows of status and telemetry
  refusals and of unauthenticated messages are not results, nor are `rejected:duplicate` and
  `rejected:stale_round` rows: in this honest fleet they are copies of a result already booked, resent by an
  agent's outbox after a reconnection (the synchronous engine books such a copy as a replay).
- Targets: wall_ratio <= 0.5, final_accuracy_async >= final_accuracy_sync - 0.01, results_lost_async = 0.

Writes exactly {"target_accuracy", "sync_wall_s", "async_wall_s", "wall_ratio", "sync_bytes", "async_bytes",
"results_lost_sync", "results_lost_async", "final_accuracy_sync", "final_accuracy_async"}; the per-round series go
to stderr (`details:`). `--agents 6 --rounds 2 --deadline-s 4` is the smoke run of the tests.
"""

from __future__ import annotations

import math
import sqlite3
import tempfile
import time
from pathlib import Path
from typing import Any

from fedfleet.edge_agent.cli_run import ArgParser
from fedfleet.tools.bench.output import emit, progress

KEYS = ("target_accuracy", "sync_wall_s", "async_wall_s", "wall_ratio", "sync_bytes", "async_bytes",
        "results_lost_sync", "results_lost_async", "final_accuracy_sync", "final_accuracy_async")
ASYNC = {"mode": "async", "concurrency": 20, "buffer": 10, "max_staleness": 10, "staleness": "sqrt"}


def fleet_table(agents: int, rounds: int, *, seed: int = 0, deadline_s: float | None = None,
                aggregation: dict[str, Any] | None = None) -> dict[str, Any]:
    """The fleet file (as a TOML table) of one run."""
    slow, flaky = round(agents / 3), round(agents / 5)
    job: dict[str, Any] = {"method": "fedavg", "rounds": rounds, "mode": "full", "dataset": "digits", "seed": seed,
                           "fleet": f"bench-async-{seed}"}
    if deadline_s is not None:
        job["deadline_s"] = deadline_s
        job["grace_s"] = deadline_s
    table: dict[str, Any] = {
        "job": job,
        "emulator": {"processes": 2, "connect_timeout_s": 20},
        "group": [
            {"name": "pi4", "profile": "rpi4b", "count": agents - slow - flaky},
            {"name": "zero", "profile": "rpizero2w", "count": slow},
            {"name": "flaky", "profile": "rpi4b", "count": flaky,
             "availability": {"mean_online_s": 40, "mean_offline_s": 20}},
        ],
    }
    if aggregation is not None:
        table["aggregation"] = aggregation
    return table


def results_booked(run_dir: Path) -> int:
    """Ledger rows that answer a result: ok, and refusals of result messages (not the summaries of status and
    telemetry refusals, nor of unauthenticated messages)."""
    db = sqlite3.connect(f"file:{run_dir / 'ledger.sqlite'}?mode=ro", uri=True)
    try:
        (n,) = db.execute(
            "SELECT count(*) FROM agent_rounds WHERE agent != '(unauthenticated)' AND (status = 'ok' OR "
            "(status LIKE 'rejected:%' AND status NOT IN ('rejected:rate_limited', 'rejected:duplicate', "
            "'rejected:stale_round') AND coalesce(detail, '') NOT LIKE '%messages refused'))").fetchone()
    finally:
        db.close()
    return int(n)


def wall_to(target: float, accuracy: list[float], walls: list[float]) -> float | None:
    """Seconds (summed round walls) to the first evaluation at or above `target`."""
    total = 0.0
    for acc, wall in zip(accuracy, walls):
        total += wall
        if acc >= target - 1e-12:
            return total
    return None


def one_run(table: dict[str, Any], run_dir: Path) -> dict[str, Any]:
    from fedfleet.tools.emulate.fleet_config import parse
    from fedfleet.tools.emulate.run import run

    mode = "async" if "aggregation" in table else "sync"
    fleet = parse(table, f"bench-async:{mode}")
    t0 = time.perf_counter()
    progress("async", f"{mode}: {fleet.job.agents} emulated agents, {fleet.job.rounds} "
                      f"{'versions' if mode == 'async' else 'rounds'} over Mosquitto")
    summary = run(fleet, broker="mosquitto", run_dir=run_dir, quiet=True)
    progress("async", f"{mode}: final accuracy {summary['final_accuracy']:.4f} in {time.perf_counter() - t0:.0f} s")
    finished = sum(int(s.get("tasks_done", 0)) for s in summary["agent_stats"].values())
    booked = results_booked(run_dir)
    return {"accuracy": summary["accuracy_per_round"], "walls": summary["round_wall_s"],
            "final": summary["final_accuracy"], "bytes": int(summary["bytes_up"]) + int(summary["bytes_down"]),
            "finished": finished, "booked": booked, "lost": max(0, finished - booked),
            "outcomes": summary.get("outcomes", {}), "total_s": time.perf_counter() - t0,
            "agents_seen": len(summary["agent_stats"])}


def main(argv: list[str] | None = None) -> int:
    ap = ArgParser(prog="fedfleet bench async", description=__doc__.splitlines()[0])
    ap.add_argument("--agents", type=int, default=40, help="fleet size: emulated agents in each run")
    ap.add_argument("--rounds", type=int, default=10, help="synchronous rounds (async: rounds x agents / buffer)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the data split and the emulated devices")
    ap.add_argument("--deadline-s", type=float, default=None, help="override the default deadline (and grace)")
    ap.add_argument("--run-dir", default=None, help="where the two runs go (default: a new temporary directory)")
    ap.add_argument("--json", default=None, help="also write the result JSON to this file")
    args = ap.parse_args(argv)
    base = Path(args.run_dir or tempfile.mkdtemp(prefix="bench-async-"))
    aggregation = dict(ASYNC)
    aggregation["concurrency"] = min(aggregation["concurrency"], max(1, args.agents // 2))
    aggregation["buffer"] = min(aggregation["buffer"], aggregation["concurrency"])
    versions = max(1, math.ceil(args.rounds * args.agents / aggregation["buffer"]))
    sync = one_run(fleet_table(args.agents, args.rounds, seed=args.seed, deadline_s=args.deadline_s), base / "sync")
    asyn = one_run(fleet_table(args.agents, versions, seed=args.seed, deadline_s=args.deadline_s,
                               aggregation=aggregation), base / "async")
    target = sync["final"] - 0.01
    sync_wall = wall_to(target, sync["accuracy"], sync["walls"])
    async_wall = wall_to(target, asyn["accuracy"], asyn["walls"])
    result = {
        "target_accuracy": round(target, 4), "sync_wall_s": sync_wall, "async_wall_s": async_wall,
        "wall_ratio": (async_wall / sync_wall) if sync_wall and async_wall is not None else None,
        "sync_bytes": sync["bytes"], "async_bytes": asyn["bytes"],
        "results_lost_sync": sync["lost"], "results_lost_async": asyn["lost"],
        "final_accuracy_sync": sync["final"], "final_accuracy_async": asyn["final"],
        "agents": args.agents, "sync_rounds": args.rounds, "async_versions": versions, "aggregation": aggregation,
        "sync": {k: v for k, v in sync.items()}, "async": {k: v for k, v in asyn.items()}, "run_dir": str(base),
    }
    emit(result, KEYS, args.json)
    return 0
