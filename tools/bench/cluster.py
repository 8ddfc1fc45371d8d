"""`fedfleet bench cluster`: one fleet split across the nodes of a RabbitMQ MQTT cluster or of an aedes+Redis
cluster, and the same fleet on a single Mosquitto, side by side in one run.

    fedfleet bench cluster --agents 5000 [--nodes 3] [--processes 4] [--brokers rabbitmq,aedes,mosquitto] [--json PATH]

Cluster side (tools/infra/rabbitmq.py): the coordinator connects to node 0, the agents are split evenly over
nodes 1..n-1 (one `fedfleet.tools.emulate.agent_pool.AgentPool` per node, like `fedfleet emulate --shard i/n` shards pointed
at different nodes), so every task, result and package crosses the cluster. Mosquitto side: the same
agents and coordinator on one Mosquitto. Each side waits until every agent is online with the model,
measures how long round 1 took to start after the last agent came online, then times one FedAvg round of
the digits MLP (full mode). The aedes side (tools/infra/aedes.py): `--aedes-nodes` aedes nodes (default 2)
sharing one Redis, split the same way (coordinator on node 0, agents on the others); its broker processes
are the nodes and Redis.

Prints, per side, exactly {"agents", "nodes", "connected", "round_s", "rss_mb_total", "broker"}
(`rss_mb_total`: VmRSS of this process with the coordinator, the broker processes and the agent workers,
right after the round); everything else (ready_s, start_after_online_s, per-role RSS, CPU seconds per role
over the round) goes to the `details:` line. Targets: connected = agents and round_s <= 60 on the cluster.
A side whose agent processes do not all come online (`--connect-timeout`; on aedes, a link that sends all
its filters in one SUBSCRIBE never gets the SUBACK) gets connected = 0, round_s null and `connect_error`.
Model delivery does not rely on retained messages (RabbitMQ keeps them per node): the coordinator publishes
the package again while agents are online without it (`wait_for_agents(republish_s=...)`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from fedfleet.edge_agent.cli_run import ArgParser
from fedfleet.edge_agent.errors import ConfigError
from fedfleet.tools.bench.fleet import cpu_seconds, fleet_config, process_tree, shards_said, status_kb
from fedfleet.tools.bench.output import progress

KEYS = ("agents", "nodes", "connected", "round_s", "rss_mb_total", "broker")
SIDES = ("rabbitmq", "aedes", "mosquitto")
CLUSTERS = ("rabbitmq", "aedes")  # the sides whose broker has several nodes (`.urls`, `.pids`)


def signing_options() -> tuple[dict[str, Any], dict[str, Any]]:
    """Coordinator and agent keyword arguments for the signed downlink, where this checkout has it."""
    try:
        from fedfleet.edge_agent.wire import signing
    except ImportError:
        return {}, {}
    seed = signing.new_signing_seed()
    return {"signing_key": seed}, {"coordinator_key": signing.public_key(seed)}


def thread_cpu() -> dict[str, float]:
    """CPU seconds per thread of this process, by thread name (Linux: /proc/self/task/*/stat and comm)."""
    import threading

    tick = os.sysconf("SC_CLK_TCK")
    names = {t.native_id: t.name for t in threading.enumerate()}
    out: dict[str, float] = {}
    for task in Path("/proc/self/task").iterdir():
        try:
            name = names.get(int(task.name)) or (task / "comm").read_text().strip()
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
            out[name] = out.get(name, 0.0) + (int(fields[11]) + int(fields[12])) / tick
        except (OSError, ValueError, IndexError):
            continue
    return out


class _NotOnline(Exception):
    """The agent processes did not all come online (the side's row then has connected = 0)."""


def run_side(kind: str, agents: int, nodes: int, processes: int, connect_timeout_s: float,
             deadline_s: float, republish_s: float, broker: Any = None) -> dict[str, Any]:
    """One side of the comparison; `broker`: an already running broker or cluster to use (not stopped here)."""
    from fedfleet.coordinator.broker import MosquittoBroker
    from fedfleet.coordinator.job.assemble import agent_ids, build_run
    from fedfleet.coordinator.job.run import shards, small_model_threads
    from fedfleet.tools.emulate.agent_pool import AgentPool
    from fedfleet.tools.emulate.run import raise_nofile
    from fedfleet.tools.infra.aedes import AedesCluster
    from fedfleet.tools.infra.rabbitmq import RabbitCluster

    if kind not in SIDES:
        raise ConfigError(f"bench cluster: no side {kind!r}; choose from {', '.join(SIDES)}")
    raise_nofile()
    small_model_threads()
    cfg = dataclasses.replace(fleet_config(agents, f"bench-cluster-{kind}", deadline_s),
                              roster=[f"c{i:05d}" for i in range(agents)])
    local, _ = shards(cfg)
    how = shards_said(cfg)
    ids = agent_ids(cfg)
    secret = os.urandom(32)
    t0 = time.perf_counter()
    own = broker is None
    if own:
        broker = {"rabbitmq": lambda: RabbitCluster(nodes), "aedes": lambda: AedesCluster(nodes),
                  "mosquitto": MosquittoBroker}[kind]()
    out: dict[str, Any] = {"agents": agents, "broker": kind, "broker_start_s": round(time.perf_counter() - t0, 1)}
    try:
        urls = broker.urls if kind in CLUSTERS else [broker.url]
        out["nodes"] = len(urls)
        out["shards"] = how
        if kind == "rabbitmq":
            out["running_nodes"] = broker.running_nodes()
        coord_url, agent_urls = urls[0], (urls[1:] or urls)
        broker_pids = list(broker.pids) if kind in CLUSTERS else [broker.pid]
        with tempfile.TemporaryDirectory() as tmp:
            coord_sign, agent_sign = signing_options()
            coord = build_run(cfg, broker_url=coord_url, secret=secret, run_dir=Path(tmp),
                              run_id=f"bench-cluster-{kind}", **coord_sign).coordinator
            coord.start()
            pools = []
            per_node = max(1, processes // len(agent_urls))
            t_start = time.perf_counter()
            try:
                for j, url in enumerate(agent_urls):  # agents i, i+k, ... on node j: one shard per node
                    mine = ids[j::len(agent_urls)]
                    data = {a: local[ids.index(a)] for a in mine}
                    pool = AgentPool(url, cfg.fleet, secret, data, processes=per_node, share_model=True,
                                     blas_threads=1, serialize_learning=True, **agent_sign)
                    pools.append(pool)
                progress("cluster", f"{kind}: {agents} agents connecting over {len(agent_urls)} node(s)")
                try:
                    for pool in pools:
                        pool.start(timeout_s=connect_timeout_s)
                except TimeoutError as exc:  # e.g. no SUBACK from the broker: a row that says so, not a crash
                    out["connect_error"] = f"agent processes did not come online: {exc}"[:500]
                    raise _NotOnline from None
                online_at = time.perf_counter()
                out["agents_connected_s"] = round(online_at - t_start, 1)
                try:
                    coord.wait_for_agents(agents, connect_timeout_s, republish_s=republish_s)
                except TimeoutError as exc:
                    out["connect_error"] = str(exc)[:500]
                ready_at = time.perf_counter()
                out["connected"] = len(coord.ready_agents())
                out["ready_after_online_s"] = round(ready_at - online_at, 2)
                progress("cluster", f"{kind}: {out['connected']} agents ready; one round")
                pids = process_tree(os.getpid()) + [p for b in broker_pids for p in process_tree(b)]
                pids = sorted(set(pids))
                roles = {"coordinator": [os.getpid()], "broker": [p for b in broker_pids for p in process_tree(b)],
                         "agents": [p for pool in pools for p in pool.pids]}
                cpu0 = {r: cpu_seconds(p) for r, p in roles.items()}
                threads0 = thread_cpu()
                round_started = time.perf_counter()
                out["round1_start_after_online_s"] = round(round_started - online_at, 2)
                summary = coord.run_round(1)
                out["cpu_s_in_round"] = {r: round(cpu_seconds(p) - cpu0[r], 1) for r, p in roles.items()}
                threads1 = thread_cpu()
                out["coordinator_threads_cpu_s"] = {n: round(v - threads0.get(n, 0.0), 2) for n, v in threads1.items()
                                                    if v - threads0.get(n, 0.0) >= 0.05}
                pids = sorted(set(process_tree(os.getpid()) + roles["broker"]))
                out["rss_mb_total"] = round(sum(status_kb(p, "VmRSS") for p in pids) / 1024, 1)
                out["rss_mb_by_role"] = {r: round(sum(status_kb(x, "VmRSS") for x in p) / 1024, 1)
                                         for r, p in roles.items()}
                out.update(round_s=round(summary.wall_s, 2), ok=summary.ok, late=summary.late,
                           accuracy=summary.accuracy, timings_s=summary.timings,
                           bytes_up=summary.bytes_up, bytes_down=summary.bytes_down)
            finally:
                for pool in pools:
                    pool.stop()
                coord.stop()
    except _NotOnline:
        out["connected"] = 0
        progress("cluster", f"{kind}: {out['connect_error']}")
    finally:
        if own:
            broker.stop()
    out["total_s"] = round(time.perf_counter() - t0, 1)
    return out


def main(argv: list[str] | None = None) -> int:
    p = ArgParser(prog="fedfleet bench cluster", description=__doc__.splitlines()[0])
    p.add_argument("--agents", type=int, default=5000, help="agents in the fleet (default %(default)s)")
    p.add_argument("--nodes", type=int, default=3, help="RabbitMQ nodes (coordinator on node 0, agents on the rest)")
    p.add_argument("--aedes-nodes", type=int, default=2, help="aedes nodes sharing one Redis (coordinator on node 0, agents on the rest) (default %(default)s)")
    p.add_argument("--processes", type=int, default=4, help="agent worker processes per side")
    p.add_argument("--connect-timeout", type=float, default=900.0, help="seconds for all agents to connect (default %(default)s)")
    p.add_argument("--deadline", type=float, default=300.0, help="round deadline, seconds")
    p.add_argument("--republish", type=float, default=15.0,
                   help="republish the package at most this often while agents still lack it after a wave of joins")
    p.add_argument("--brokers", default="rabbitmq,mosquitto", help="comma-separated sides to run: rabbitmq (the RabbitMQ cluster), aedes (the aedes+Redis cluster) and/or mosquitto (one broker) (default %(default)s)")
    p.add_argument("--json", help="also write the result JSON to this file")
    args = p.parse_args(argv)
    kinds = [k.strip() for k in args.brokers.split(",")]
    bad = [k for k in kinds if k not in SIDES]
    if bad or not kinds:
        p.error(f"--brokers: unknown side(s) {', '.join(map(repr, bad))}; choose from {', '.join(SIDES)}")
    for name in ("agents", "nodes", "aedes_nodes", "processes"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    sides = [run_side(kind, args.agents, args.aedes_nodes if kind == "aedes" else args.nodes, args.processes,
                      args.connect_timeout, args.deadline, args.republish) for kind in kinds]
    for side in sides:
        side.setdefault("connected", 0)
        side.setdefault("round_s", None)
        side.setdefault("rss_mb_total", None)
    main_out = [{k: s[k] for k in KEYS} for s in sides]
    details = [{k: v for k, v in s.items() if k not in KEYS} for s in sides]
    text = json.dumps(main_out, indent=2)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(text + "\n")
    import sys

    print("details: " + json.dumps(details, default=str), file=sys.stderr)
    print(text)
    return 0
