"""`fedfleet emulate FLEET.toml`: an emulated fleet of real MQTT agents with device profiles, dropouts,
availability and misbehaving members, driven by the real coordinator against a real broker.

    fedfleet emulate FLEET.toml [--broker embedded|mosquitto|mqtt://...] [--shard i/n] [--run-dir D]
                                [--json P] [--no-coordinator | --coordinator-only] [--secret-file F]
                                [--signing-key-file K | --coordinator-key-file P]
                                [--expect-accuracy X] [--expect-max-mb-up M] [--expect-max-joules J]

One run: calibrate the host once (`fedfleet.tools.emulate.calibrate`, written to RUN_DIR/calibration.json), split sklearn
digits over the groups (IID or Dirichlet per group), start the agents of this shard in worker processes
(`fedfleet.tools.emulate.agent_pool` with `fedfleet.tools.emulate.emulated_agent`), run the rounds, then write RUN_DIR/ledger.sqlite (bytes
and energy per agent per round), RUN_DIR/summary.json and the HTML report (`fedfleet.coordinator.records.report.render`).
`--shard i/n` runs the agents with index = i (mod n) of the roster; the coordinator runs in one place only
(`--no-coordinator` on the other shards), so several machines can emulate one fleet against one broker
(they need the same fleet file and `--secret-file`, the coordinator's shard `--signing-key-file`, and
agent-only shards that key or its public half, `--coordinator-key-file`). The `--expect-*` checks exit 1
when missed.
"""

from __future__ import annotations

import json
import math
import os
import resource
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fedfleet.edge_agent.cli_run import ArgParser
from fedfleet.edge_agent.errors import ConfigError, FedfleetError
from fedfleet.edge_agent.learners import LocalData
from fedfleet.tools.emulate.fleet_config import FleetConfig, load
from fedfleet.tools.emulate.summary import check_expectations, ledger_totals, per_group, round_numbers

FACTORY = "fedfleet.tools.emulate.emulated_agent:make_agent"


@dataclass(frozen=True)
class Shard:
    index: int
    count: int

    @classmethod
    def parse(cls, text: str) -> Shard:
        try:
            i, n = (int(v) for v in text.split("/"))
        except ValueError:
            raise ConfigError(f"--shard {text!r} must look like i/n, e.g. 0/4") from None
        if not (n >= 1 and 0 <= i < n):
            raise ConfigError(f"--shard {text!r}: need n >= 1 and 0 <= i < n")
        return cls(i, n)

    def take(self, roster: list[str]) -> list[str]:
        """This shard's agents: every n-th agent of the roster starting at i (mixes the groups)."""
        return roster[self.index :: self.count]


def raise_nofile() -> tuple[int, int]:
    """Raise the open-files soft limit to the hard limit (a broker and a thousand sockets need it)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError):
            pass
    return resource.getrlimit(resource.RLIMIT_NOFILE)


def partition(fleet: FleetConfig, train_y: np.ndarray) -> dict[str, np.ndarray]:
    """Sample indices per agent: the train split goes to the groups in proportion to their counts (seeded),
    then within a group IID or Dirichlet(alpha) over its agents."""
    from fedfleet.models import data as datasets

    seed = fleet.job.seed
    if getattr(fleet.job, "shard_mode", "partition") == "sampled":
        return _sampled(fleet, train_y)
    rng = np.random.Generator(np.random.PCG64(seed))
    order = rng.permutation(len(train_y))
    total = sum(g.count for g in fleet.groups)
    cuts = np.round(np.cumsum([g.count for g in fleet.groups]) / total * len(order)).astype(int)
    out: dict[str, np.ndarray] = {}
    start = 0
    for gi, (g, end) in enumerate(zip(fleet.groups, cuts)):
        idx = np.sort(order[start:end])
        start = end
        where = f"{fleet.source}: group[{gi}] ({g.name})"
        if len(idx) < g.count:
            raise ConfigError(f"{where}: {len(idx)} samples cannot give {g.count} agents one each; use fewer agents")
        try:
            if g.partition == "dirichlet":
                parts = datasets.partition_dirichlet(train_y[idx], g.count, g.alpha, seed=seed + gi,
                                                     min_size=min(10, len(idx) // g.count))
            else:
                parts = datasets.partition_iid(len(idx), g.count, seed=seed + gi)
        except ValueError as exc:
            raise ConfigError(f"{where}: cannot partition its {len(idx)} samples: {exc}") from None
        for agent, p in zip(g.ids(), parts):
            out[agent] = idx[p]
    return out


def _sampled(fleet: FleetConfig, train_y: np.ndarray) -> dict[str, np.ndarray]:
    """`shard_mode = "sampled"`: every agent draws its own shard from the whole train split (with replacement across
    agents, `fedfleet.models.data.sample_shards`), of one size for the fleet; a group's partition gives its skew
    (dirichlet: its alpha, iid: uniform)."""
    from fedfleet.models import data as datasets

    total = sum(g.count for g in fleet.groups)
    try:
        size = datasets.sampled_shard_size(len(train_y), total, fleet.job.shard_size)
        out: dict[str, np.ndarray] = {}
        for gi, g in enumerate(fleet.groups):
            alpha = g.alpha if g.partition == "dirichlet" else 0.0
            parts = datasets.sample_shards(train_y, g.count, alpha, seed=fleet.job.seed + gi, size=size)
            out.update(zip(g.ids(), parts))
    except ValueError as exc:
        raise ConfigError(f"{fleet.source}: sampled shards of {len(train_y)} training samples: {exc}") from None
    return out


def agent_options(fleet: FleetConfig, agents: list[str], host_speed: float) -> dict[str, dict[str, Any]]:
    """What each emulated agent needs from the fleet file (see `fedfleet.tools.emulate.emulated_agent.make_agent`)."""
    opts: dict[str, dict[str, Any]] = {}
    roster = fleet.roster()
    for g in fleet.groups:
        for i, agent in enumerate(g.ids()):
            if agent not in agents:
                continue
            opts[agent] = {
                "profile": g.profile, "host_speed": host_speed, "int8": fleet.job.mode == "transfer",
                "seed": fleet.job.seed * 1_000_003 + roster.index(agent), "dropout": g.dropout,
                "behaviour": g.byzantine if g.byzantine in ("nan", "noise") else None,
                "noise_scale": g.noise_scale, "offline": g.windows(i, fleet.job.seed),
            }
    return opts


def _settle(coord: Any, wait_s: float = 1.0) -> None:
    """After the last round: give agents' energy reports (sent right after their upload) time to arrive and
    book them, so the last round has its energy too."""
    coord.settle(wait_s)


def run(fleet: FleetConfig, *, broker: str = "mosquitto", run_dir: str | Path | None = None,
        shard: Shard = Shard(0, 1), coordinator: bool = True, agents: bool = True, secret: bytes | None = None,
        signing_key: bytes | None = None, coordinator_key: bytes | None = None, quiet: bool = False, live: bool | None = None, duration_s: float | None = None,
        resume: bool = False) -> dict[str, Any]:
    """Run (this shard of) the fleet; returns the summary also written to RUN_DIR/summary.json. `resume`: continue
    the run in `run_dir` from its newest checkpoint (its rounds left; the same fleet file)."""
    from fedfleet.coordinator.broker import start_broker
    from fedfleet.coordinator.records.report import render
    from fedfleet.tools.emulate.agent_pool import AgentPool
    from fedfleet.tools.emulate.calibrate import calibrate

    if not (coordinator or agents):
        raise ConfigError("nothing to run: --no-coordinator and --coordinator-only together")
    t0 = time.perf_counter()
    raise_nofile()
    job = fleet.job
    run_id = f"emulate-{time.strftime('%Y%m%d-%H%M%S')}"  # the ledger's run id is build_run's (job.json)
    if resume and not run_dir:
        raise ConfigError("--resume needs the run directory of the run to continue")
    run_dir = Path(run_dir or Path("runs") / run_id)
    run_dir.mkdir(parents=True, exist_ok=True)
    cal = calibrate(reference_s=fleet.reference_s, reference_source=fleet.reference_source)
    (run_dir / "calibration.json").write_text(json.dumps(cal.to_json(), indent=2))
    roster = fleet.roster()
    mine = shard.take(roster) if agents else []
    secret = secret or os.urandom(32)
    from fedfleet.edge_agent.wire import signing

    signing_key = signing_key or (None if coordinator_key else signing.new_signing_seed())
    if coordinator and signing_key is None:
        raise ConfigError("the coordinator needs the signing key (--signing-key-file), not only its public half")
    coordinator_key = coordinator_key or signing.public_key(signing_key)  # type: ignore[arg-type]

    from fedfleet.models import data as datasets

    train, _ = datasets.split(datasets.digits(), 0.2, seed=job.seed)
    parts = partition(fleet, train.y)
    members = {a: LocalData(train.x[parts[a]], train.y[parts[a]]) for a in mine}
    opts = agent_options(fleet, mine, cal.host_speed)

    from rich.console import Console

    console = Console(highlight=False, quiet=quiet)
    summary: dict[str, Any] = {"fleet": fleet.source, "run_dir": str(run_dir), "shard": f"{shard.index}/{shard.count}",
                               "agents": len(roster), "agents_here": len(mine), "calibration": cal.to_json()}
    if getattr(job, "shard_mode", "partition") == "sampled":
        from fedfleet.coordinator.tasks.classification import shard_summary

        summary["shards"] = shard_summary(job, len(train), sum(g.count for g in fleet.groups))
    with start_broker(broker) as b:
        coord = None
        progress = None
        if coordinator:
            assembled, progress = _coordinator(fleet, b.url, secret, signing_key, run_dir, resume, quiet, live,
                                               console)
            run_id = assembled.run
            coord = assembled.coordinator
            coord.start()
        pool = None
        try:
            if mine:
                pool = AgentPool(b.url, job.fleet, secret, members, processes=fleet.processes, share_model=True,
                                 factory=FACTORY, per_agent=opts, blas_threads=1,
                                 serialize_learning=True, runtime=job.runtime, coordinator_key=coordinator_key)
                pool.start(timeout_s=fleet.connect_timeout_s)
            console.print(f"broker {b.kind} at {b.url}; fleet {job.fleet}: {len(roster)} agents in "
                          f"{len(fleet.groups)} groups, {len(mine)} here (shard {shard.index}/{shard.count}); "
                          f"method {job.method}, model {job.mode}; host speed {cal.host_speed:.2f}x a Pi 4B; "
                          f"run dir {run_dir}", soft_wrap=True)
            if coord is not None:
                assert progress is not None
                _wait(coord, len(roster), job.quorum, fleet.connect_timeout_s, console)
                with progress:
                    summaries = coord.run(job.rounds)
                _settle(coord)
                summary.update(round_numbers(summaries))
                if not summaries:  # a resumed run with no rounds left: its result is the last one booked
                    summary["final_accuracy"] = coord.store.last_accuracy(run_id)
                    console.print(f"run {run_id} in {run_dir} had no rounds left to run")
            else:
                _hold(duration_s, console)
        finally:
            stats = pool.stop() if pool is not None else {}
            if coord is not None:
                coord.stop()
    summary["agent_stats"] = stats
    summary["wall_s"] = time.perf_counter() - t0
    if coord is not None:
        per_agent = ledger_totals(run_dir, run_id)
        summary["per_agent"] = per_agent
        summary["per_group"] = per_group(fleet, per_agent, stats)
        summary["joules"] = sum(a["joules"] for a in per_agent.values())
        outcomes: dict[str, int] = {}
        for a in per_agent.values():
            for k, v in a["outcomes"].items():
                outcomes[k] = outcomes.get(k, 0) + v
        summary["outcomes"] = outcomes
        from fedfleet.coordinator.job.run import read_books

        books = read_books(run_dir, run_id)  # the ledger's numbers, as the demo's summary and every view show them
        if books is not None:
            summary["books"] = books
            summary["bytes_up"], summary["bytes_down"] = books["model_updates"]["up"], books["model_updates"]["down"]
            summary["bytes_counts"] = books["model_updates"]["counts"]
        summary["report"] = str(render(run_dir, run=run_id))
        name = "summary.json"
    else:
        name = f"agents-shard-{shard.index}-of-{shard.count}.json"
    (run_dir / name).write_text(json.dumps(summary, indent=2, default=str))
    if coord is not None and not quiet:
        from fedfleet.coordinator.job.progress import summary_table

        console.print(summary_table({k: summary[k] for k in ("final_accuracy", "rounds", "agents", "bytes_up",
                                                           "bytes_down", "joules", "wall_s")},
                                    f"fedfleet emulate: {run_dir}"))
        console.print(f"report: {summary['report']}")
    return summary


def _coordinator(fleet: FleetConfig, url: str, secret: bytes, signing_key: bytes, run_dir: Path, resume: bool,
                 quiet: bool, live: bool | None, console: Any) -> tuple[Any, Any]:
    """The fleet's run (`fedfleet.coordinator.job.assemble.build_run`: job.json, so it can be resumed) and its
    progress view."""
    from fedfleet.coordinator.job.assemble import build_run
    from fedfleet.coordinator.job.progress import Progress
    from fedfleet.coordinator.job.run import small_model_threads
    from fedfleet.coordinator.records.accounts import accounts

    small_model_threads()
    job = fleet.job
    try:
        run = build_run(job, broker_url=url, secret=secret, signing_key=signing_key, run_dir=run_dir,
                        roster=fleet.roster(), resume=resume)
    except ConfigError as exc:
        raise ConfigError(f"{fleet.source}: {exc}") from None
    except KeyError as exc:
        raise ConfigError(f"{fleet.source}: field 'job.method': {exc}") from None
    coord = run.coordinator
    progress = Progress(job.rounds, title=f"fedfleet emulate {fleet.source}",
                        online=lambda: (len(coord.ready_agents()), len(run.roster)),
                        books=lambda r=None: accounts(coord.ledger.query, coord.cfg.run, r), quiet=quiet,
                        console=console, live=live)
    progress.score_name = run.task.score_name
    coord.on_round = progress
    return run, progress


def _wait(coord: Any, n: int, quorum: float, timeout_s: float, console: Any) -> None:
    try:
        coord.wait_for_agents(n, timeout_s=timeout_s)
    except TimeoutError as exc:
        need = max(1, math.ceil(quorum * n))
        if len(coord.ready_agents()) < need:
            raise
        console.print(f"starting with {len(coord.ready_agents())} of {n} agents ready: {exc}", soft_wrap=True)


def _hold(duration_s: float | None, console: Any) -> None:
    """Agents-only shard: keep the agents up for `duration_s` or until SIGINT/SIGTERM."""
    done = threading.Event()
    old = signal.signal(signal.SIGTERM, lambda *_: done.set())
    console.print("agents up; " + (f"stopping in {duration_s:.0f} s" if duration_s else "Ctrl-C to stop"))
    try:
        done.wait(duration_s)
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, old)


def main(argv: list[str] | None = None) -> int:
    p = ArgParser(prog="fedfleet emulate", description=__doc__.splitlines()[0])
    p.add_argument("fleet", help="fleet TOML file (see tools/emulate/fleet_config.py or examples/fleet.toml)")
    p.add_argument("--broker", default="mosquitto", help="embedded, mosquitto or mqtt://host:port")
    p.add_argument("--shard", default="0/1", help="run only agents i, i+n, ... of the roster (i/n)")
    role = p.add_mutually_exclusive_group()
    role.add_argument("--no-coordinator", action="store_true", help="agents only (other shards run it)")
    role.add_argument("--coordinator-only", action="store_true", help="no agents here")
    p.add_argument("--secret-file", help="fleet secret shared by all shards (required when sharded)")
    p.add_argument("--signing-key-file", help="the coordinator's signing key (coordinator.key; required when "
                   "sharded, on the coordinator's shard)")
    p.add_argument("--coordinator-key-file", help="the coordinator's public key (coordinator.pub), for shards "
                   "that run only agents")
    p.add_argument("--duration", type=float, help="with --no-coordinator: seconds to keep the agents up")
    p.add_argument("--run-dir", help="where the ledger and summary go (default runs/<run id>)")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its newest checkpoint")
    p.add_argument("--json", help="also write the summary here")
    p.add_argument("--quiet", action="store_true", help="no progress view, only the summary")
    p.add_argument("--expect-accuracy", type=float, help="exit 1 if the final accuracy is lower")
    p.add_argument("--expect-max-mb-up", type=float, help="exit 1 if more megabytes were uploaded")
    p.add_argument("--expect-max-joules", type=float, help="exit 1 if the fleet spent more energy")
    args = p.parse_args(argv)
    try:
        fleet = load(args.fleet)
        shard = Shard.parse(args.shard)
        sharded = shard.count > 1 or args.no_coordinator or args.coordinator_only
        secret = None
        if args.secret_file:
            from fedfleet.coordinator.cli import _read_secret

            secret = _read_secret(args.secret_file)
        elif sharded:
            raise ConfigError("a sharded run needs --secret-file F, the same file on every shard")
        from fedfleet.edge_agent.wire import signing

        signing_key = signing.read_key_file(args.signing_key_file, "--signing-key-file") if args.signing_key_file else None
        coordinator_key = (signing.read_key_file(args.coordinator_key_file, "--coordinator-key-file")
                           if args.coordinator_key_file else None)
        if sharded and signing_key is None and coordinator_key is None:
            raise ConfigError("a sharded run needs --signing-key-file (or, for agent-only shards, "
                              "--coordinator-key-file)")
        if args.resume and args.run_dir and Path(args.resume) != Path(args.run_dir):
            raise ConfigError("--resume RUN_DIR names the run directory: leave out --run-dir")
        summary = run(fleet, broker=args.broker, run_dir=args.resume or args.run_dir, shard=shard,
                      resume=bool(args.resume),
                      coordinator=not args.no_coordinator, agents=not args.coordinator_only, secret=secret,
                      signing_key=signing_key, coordinator_key=coordinator_key,
                      quiet=args.quiet, duration_s=args.duration)
    except FedfleetError as exc:
        print(f"fedfleet emulate: error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2, default=str))
    missed = check_expectations(summary, accuracy=args.expect_accuracy, max_mb_up=args.expect_max_mb_up,
                                max_joules=args.expect_max_joules)
    for m in missed:
        print(f"fedfleet emulate: expectation missed: {m}", file=sys.stderr)
    return 1 if missed else 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
