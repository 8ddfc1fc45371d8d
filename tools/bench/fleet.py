"""`fedfleet bench fleet`: ten thousand agents on one machine, each with its own MQTT connection to Mosquitto.

Starts Mosquitto, the coordinator (in this process) and `--agents` agents spread over `--processes` worker
processes (one loaded model per process, `AgentPool(share_model=True)`), waits until every agent is online
with the model, then times one FedAvg round of the digits model (full mode: the whole 64-32-10 MLP).

Writes {"agents", "connected", "connect_s", "per_round", "round_s", "rss_mb_total", "bytes_up", ...}:
`connected` counts agents online with the model, `connect_s` the seconds from starting the agent processes
until they all were (or the wait ended), `per_round` the agents the round tasked; `shards` says how the
agents' data was drawn (past 89 agents the digits split has fewer than 16 samples per agent, and each agent
draws 16 at random); `rss_mb_total` sums VmRSS (from /proc/<pid>/status) of every process involved (this one with
the coordinator, the broker, the agent workers and any other descendant) right after the round;
`round_cpu_s_by_role` the CPU seconds each role spent in the round (where its time went);
`idle_cpu_pct` is the CPU the idle fleet costs (all those processes, percent of one core) over a quiet window
before the round. Targets at 10,000 agents on 2 cores (Mosquitto): connected = 10,000 with connect_s <= 60,
round_s <= 60 with every agent training, rss_mb_total <= 4096.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from fedfleet.edge_agent.cli_run import ArgParser
from fedfleet.tools.bench.output import emit, progress


def _children(pid: int) -> list[int]:
    out = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            out += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            continue
    return out


def process_tree(root: int) -> list[int]:
    """`root` and all its descendants (Linux /proc)."""
    seen, todo = [], [root]
    while todo:
        pid = todo.pop()
        if pid not in seen:
            seen.append(pid)
            todo += _children(pid)
    return seen


def status_kb(pid: int, field: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0


def cpu_seconds(pids: list[int]) -> float:
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / tick  # utime, stime
        except (OSError, ValueError, IndexError):
            continue
    return total


SHARD = 16  # samples per agent when the training split cannot give every agent a disjoint share that large


def fleet_config(agents: int, fleet: str, deadline_s: float) -> Any:
    """The benchmarks' one-round FedAvg job on the digits MLP: disjoint IID shards while the training split has
    `SHARD` samples per agent, else `shard_mode = "sampled"` (each agent draws `SHARD` of its own; agents'
    shards overlap)."""
    from fedfleet.coordinator.job.config import JobConfig
    from fedfleet.coordinator.tasks.classification import split

    cfg = JobConfig(agents=agents, rounds=1, alpha=0.0, mode="full", deadline_s=deadline_s, quorum=1.0,
                    grace_s=0.0, fleet=fleet, roster=[f"a{i:05d}" for i in range(agents)])
    if len(split(cfg)[0]) < SHARD * agents:
        cfg = dataclasses.replace(cfg, shard_mode="sampled", shard_size=SHARD)
    return cfg


def shards_said(cfg: Any) -> str:
    from fedfleet.coordinator.tasks.classification import shard_summary, split

    summary = shard_summary(cfg, len(split(cfg)[0]), cfg.agents)
    if summary["mode"] == "partition":
        return f"disjoint IID shards of the {summary['train_samples']} training samples"
    return (f"{summary['per_agent']} samples per agent drawn at random from the {summary['train_samples']} training "
            f"samples (agents' shards overlap)")


def run(agents: int, processes: int = 4, idle_window_s: float = 5.0, connect_timeout_s: float = 300.0,
        deadline_s: float = 120.0) -> dict[str, Any]:
    from fedfleet.coordinator.broker import MosquittoBroker
    from fedfleet.coordinator.job.assemble import build_run
    from fedfleet.coordinator.job.run import small_model_threads
    from fedfleet.tools.emulate.agent_pool import AgentPool
    from fedfleet.tools.emulate.run import raise_nofile

    nofile = raise_nofile()
    from fedfleet.edge_agent.wire.signing import new_signing_seed, public_key

    small_model_threads()
    cfg = fleet_config(agents, "bench-fleet", deadline_s)
    secret = os.urandom(32)
    seed = new_signing_seed()
    out: dict[str, Any] = {"agents": agents, "processes": processes, "nofile_limit": nofile[0]}
    t_start = time.perf_counter()
    with MosquittoBroker() as b, tempfile.TemporaryDirectory() as tmp:
        run = build_run(cfg, broker_url=b.url, secret=secret, signing_key=seed, run_dir=Path(tmp))
        coord, ids, local = run.coordinator, run.roster, run.shards()
        out["shards"] = shards_said(cfg)
        coord.start()
        pool = AgentPool(b.url, cfg.fleet, secret, dict(zip(ids, local)), processes=processes, share_model=True,
                         blas_threads=1, serialize_learning=True, coordinator_key=public_key(seed))
        try:
            progress("fleet", f"{agents} agents connecting from {processes} processes")
            t_connect = time.perf_counter()
            pool.start(timeout_s=connect_timeout_s)
            out["start_s"] = time.perf_counter() - t_start
            try:
                coord.wait_for_agents(agents, connect_timeout_s)
            except TimeoutError as exc:
                out["connect_error"] = str(exc)
            out["connected"] = len(coord.ready_agents())
            out["ready_s"] = time.perf_counter() - t_start
            out["connect_s"] = time.perf_counter() - t_connect
            pids = process_tree(os.getpid())
            c0, t0 = cpu_seconds(pids), time.perf_counter()
            progress("fleet", f"{out['connected']} agents connected; {idle_window_s:g} s idle window")
            time.sleep(idle_window_s)
            out["idle_cpu_pct"] = 100.0 * (cpu_seconds(pids) - c0) / (time.perf_counter() - t0)
            progress("fleet", "one round with every agent")
            roles = {"coordinator": [os.getpid()], "broker": [b.pid], "agent_workers": pool.pids}
            before = {role: cpu_seconds(p) for role, p in roles.items()}
            summary = coord.run_round(1)
            out["round_cpu_s_by_role"] = {role: cpu_seconds(p) - before[role] for role, p in roles.items()}
            out["rows_by_status"] = {r["status"]: r["n"] for r in coord.ledger.query(
                "SELECT status, COUNT(*) AS n FROM agent_rounds GROUP BY status")}
            pids = process_tree(os.getpid())
            out["rss_mb_total"] = sum(status_kb(p, "VmRSS") for p in pids) / 1024
            out["hwm_mb_total"] = sum(status_kb(p, "VmHWM") for p in pids) / 1024
            out["rss_mb_by_role"] = {
                "coordinator": status_kb(os.getpid(), "VmRSS") / 1024,
                "broker": status_kb(b.pid, "VmRSS") / 1024,
                "agent_workers": sum(status_kb(p, "VmRSS") for p in pool.pids) / 1024,
            }
            out["processes_counted"] = len(pids)
            out.update(round_s=summary.wall_s, per_round=summary.selected, ok=summary.ok, late=summary.late, rejected=summary.rejected,
                       bytes_up=summary.bytes_up, bytes_down=summary.bytes_down, accuracy=summary.accuracy,
                       slowest_learn_s=summary.slowest_learn_s, timings_s=summary.timings)
        finally:
            pool.stop()
            coord.stop()
    out["total_s"] = time.perf_counter() - t_start
    return out


def main(argv: list[str] | None = None) -> int:
    p = ArgParser(prog="fedfleet bench fleet", description=__doc__.splitlines()[0])
    p.add_argument("--agents", type=int, default=10000, help="agents, each with its own MQTT connection (default %(default)s)")
    p.add_argument("--processes", type=int, default=4, help="agent worker processes")
    p.add_argument("--idle-window", type=float, default=5.0, help="seconds to measure the idle fleet's CPU")
    p.add_argument("--json", help="also write the result JSON to this file")
    args = p.parse_args(argv)
    out = run(args.agents, args.processes, idle_window_s=args.idle_window)
    emit(out, ("agents", "connected", "connect_s", "per_round", "round_s", "rss_mb_total", "bytes_up"), args.json)
    return 0
