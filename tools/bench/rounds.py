"""`fedfleet bench rounds`: the round engine's own cost.

Runs FedAvg rounds with N agents (each its own MQTT connection, spread over worker processes) and reports
the median round wall time, the median of the slowest agent's learn time, and their difference, the
overhead: dispatch, transfer, validation, aggregation, evaluation and checkpointing.

Writes {"agents", "round_s_median", "slowest_agent_s_median", "overhead_s_median"}.
"""

from __future__ import annotations

import os
import statistics
import tempfile
from pathlib import Path

from fedfleet.coordinator.job.config import JobConfig
from fedfleet.edge_agent.cli_run import ArgParser
from fedfleet.tools.bench.output import emit, progress


def run(agents: int, rounds: int, broker: str, processes: int = 2, mode: str = "transfer") -> dict:
    from fedfleet.coordinator.broker import start_broker
    from fedfleet.coordinator.job.assemble import build_run
    from fedfleet.coordinator.job.run import small_model_threads
    from fedfleet.edge_agent.wire.signing import new_signing_seed, public_key
    from fedfleet.tools.emulate.agent_pool import AgentPool

    small_model_threads()
    cfg = JobConfig(agents=agents, rounds=rounds, alpha=0.5, mode=mode, deadline_s=60.0)
    secret = os.urandom(32)
    seed = new_signing_seed()
    with start_broker(broker) as b, tempfile.TemporaryDirectory() as tmp:
        run = build_run(cfg, broker_url=b.url, secret=secret, signing_key=seed, run_dir=Path(tmp), run_id="bench")
        coord, ids, local = run.coordinator, run.roster, run.shards()
        coord.start()
        pool = AgentPool(b.url, cfg.fleet, secret, dict(zip(ids, local)), processes=processes,
                         coordinator_key=public_key(seed))
        try:
            progress("rounds", f"{agents} agents connecting to {broker} from {processes} processes")
            pool.start()
            coord.wait_for_agents(agents, 120)
            progress("rounds", "warm-up round (not counted)")
            coord.run_round(0)  # warm-up: caches, first features; not counted
            summaries = []
            for r in range(1, rounds + 1):
                summaries.append(coord.run_round(r))
                s = summaries[-1]
                progress("rounds", f"round {r}/{rounds}: {s.wall_s:.2f} s, {s.ok}/{agents} answered")
        finally:
            pool.stop()
            coord.stop()
    walls = [s.wall_s for s in summaries]
    slowest = [s.slowest_learn_s for s in summaries]
    return {
        "agents": agents,
        "round_s_median": statistics.median(walls),
        "slowest_agent_s_median": statistics.median(slowest),
        "overhead_s_median": statistics.median(w - s for w, s in zip(walls, slowest)),
        "ok_per_round": [s.ok for s in summaries],
        "timings_s_median": {k: statistics.median(s.timings[k] for s in summaries) for k in summaries[0].timings},
        "broker": broker,
    }


def main(argv: list[str] | None = None) -> int:
    p = ArgParser(prog="fedfleet bench rounds", description=__doc__.splitlines()[0])
    p.add_argument("--agents", type=int, default=50, help="agents (each its own MQTT connection) (default %(default)s)")
    p.add_argument("--rounds", type=int, default=10, help="rounds timed (default %(default)s)")
    p.add_argument("--broker", default="mosquitto", help="mosquitto or embedded (default %(default)s)")
    p.add_argument("--processes", type=int, default=2, help="worker processes the agents are spread over (default %(default)s)")
    p.add_argument("--json", help="also write the result JSON to this file")
    args = p.parse_args(argv)
    out = run(args.agents, args.rounds, args.broker, args.processes)
    emit(out, ("agents", "round_s_median", "slowest_agent_s_median", "overhead_s_median"), args.json)
    return 0
