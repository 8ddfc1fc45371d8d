"""A federated job end to end: data and shards, the model package, broker, coordinator and (for the demo)
in-process agents; progress lines per round, a summary table and the run directory.

`run_demo(cfg, broker=..., run_dir=...)` is what `fedfleet demo` runs; it makes a fresh coordinator signing
key per run and keeps it in the run directory (`coordinator.key`, mode 0600). `serve(cfg, ...)` runs only the
coordinator, for real agents on devices, with the signing key they pinned. Both take `resume=True` to
continue the run in `run_dir` from its newest checkpoint (`fedfleet.coordinator.records.store`).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fedfleet.coordinator.engine.rounds import Coordinator, RoundSummary
from fedfleet.coordinator.job.assemble import (
    Run,
    agent_ids,
    build_run,
    engine_config,
    job_identity,
    ledger_joules,
)
from fedfleet.coordinator.job.config import JobConfig
from fedfleet.coordinator.job.progress import Progress
from fedfleet.coordinator.records.store import new_run_id
from fedfleet.coordinator.tasks import task_for
from fedfleet.edge_agent.learners import LocalData
from fedfleet.edge_agent.wire import protocol, signing

__all__ = ["JobResult", "run_demo", "serve", "start_demo_agents", "shards", "build", "agent_ids", "engine_config",
           "job_identity", "small_model_threads", "DEMO_PROFILE"]

# demo agents book energy with the Raspberry Pi 4B profile's power model (at this host's speed)
DEMO_PROFILE = "rpi4b"


@dataclass
class JobResult:
    final_accuracy: float
    rounds: int
    agents: int
    wall_s: float
    bytes_up: int
    bytes_down: int
    broker: str
    run_dir: str
    summaries: list[RoundSummary]
    timeline: dict[str, float] | None = None  # unix times: first task dispatched, last round done
    quality: dict[str, Any] | None = None  # a task without an accuracy: its own summary keys (fedfleet.coordinator.tasks.diffusion)

    def to_json(self) -> dict[str, Any]:
        keys = ("final_accuracy", "rounds", "agents", "wall_s", "bytes_up", "bytes_down", "broker")
        return {**{k: getattr(self, k) for k in keys}, **(self.quality or {})}


def shards(cfg: JobConfig) -> tuple[list[LocalData], Any]:
    """The job's agent shards and its held-out split (None for a task that keeps it to itself): the task's own
    (`fedfleet.coordinator.tasks.task_for`), for tools that start agents without a coordinator."""
    task = task_for(cfg)
    local = task.shards(cfg.agents)
    return local, getattr(task, "test", None)


def build(cfg: JobConfig) -> tuple[bytes, Any]:
    """The job's model package and the coordinator's torch mirror of it (the task's `package()`)."""
    return task_for(cfg).package()


def summary_table(result: JobResult, console: Any) -> None:
    from rich.table import Table

    t = Table(title=f"fedfleet run: {result.run_dir}")
    for col in ("final accuracy", "rounds", "agents", "wall s", "MB up", "MB down", "broker"):
        t.add_column(col)
    q = result.quality or {}
    score = f"x0 MSE {q['final_x0_mse']:.4f}" if "final_x0_mse" in q else f"{result.final_accuracy:.4f}"
    t.add_row(score, str(result.rounds), str(result.agents), f"{result.wall_s:.1f}",
              f"{result.bytes_up / 1e6:.3f}", f"{result.bytes_down / 1e6:.3f}", result.broker)
    console.print(t)


def run_rounds(coord: Coordinator, rounds: int, progress: Progress, run_dir: Path,
               metrics_port: int | None) -> list[RoundSummary]:
    """The rounds under the progress view (and live metrics if asked), then book the last energy reports."""
    metrics = serve_metrics(run_dir, metrics_port, progress.console)
    try:
        with progress:
            summaries = coord.run(rounds)
        coord.settle()
    finally:
        if metrics is not None:
            metrics.shutdown()
    return summaries


def finish(result: JobResult, run_dir: Path, progress: Progress, quiet: bool, report: str = "now") -> JobResult:
    """Write summary.json, print the summary table unless quiet, and render the report: `now` (in this
    process), `background` (in its own short process, so the summary is not held up by plotting) or `none`."""
    (run_dir / "summary.json").write_text(json.dumps({**result.to_json(), "timeline": result.timeline}, indent=2))
    if not quiet:
        summary_table(result, progress.console)
    if report == "none":
        return result
    if report == "background":
        path = render_in_background(run_dir)
        note = " (rendering in the background)"
    else:
        path, note = write_report(run_dir), ""
    if not quiet:
        progress.console.print(f"report: {path}{note}", soft_wrap=True)
    return result


def render_in_background(run_dir: Path) -> Path:
    """Start `fedfleet report RUN_DIR` in its own process (it outlives this one); returns the page it writes."""
    import subprocess
    import sys

    log = open(run_dir / "report.log", "wb")  # noqa: SIM115 - handed to the child
    subprocess.Popen([sys.executable, "-m", "fedfleet.coordinator.records.report", str(run_dir)], stdout=log, stderr=subprocess.STDOUT,
                     stdin=subprocess.DEVNULL, start_new_session=True)
    log.close()
    return run_dir / "report" / "report.html"


def serve_metrics(run_dir: Path, port: int | None, console: Any) -> Any:
    """Prometheus text metrics of the live run at http://127.0.0.1:PORT/metrics (None: not served)."""
    if port is None:
        return None
    from fedfleet.coordinator.records.metrics import serve

    server = serve(run_dir, port)
    console.print(f"metrics: http://127.0.0.1:{server.server_address[1]}/metrics", soft_wrap=True)
    return server


def write_report(run_dir: Path) -> Path:
    """The HTML page and PNG plots of the run (`fedfleet report RUN_DIR` renders it again)."""
    from fedfleet.coordinator.records.report import render

    return render(run_dir)


def small_model_threads() -> None:
    """One thread for torch and for numpy's BLAS in this process. The tensors here are small and many agents
    share the process: on a busy 2-core machine, thread pools spin against each other and cost far more
    than they save (evaluating the digits head: 60 ms with 2 torch threads, 1.7 ms with 1; a 16x784 by
    784x128 numpy product: 43 ms with 2 OpenBLAS threads, 0.3 ms with 1)."""
    import threadpoolctl
    import torch

    torch.set_num_threads(1)
    threadpoolctl.threadpool_limits(1)


def finished(coord: Coordinator, summaries: list[RoundSummary]) -> tuple[float, int]:
    """(final accuracy, rounds) of the whole run, also when resuming ran few rounds or none."""
    if summaries:
        return summaries[-1].accuracy, summaries[-1].round
    return coord.store.last_accuracy(coord.cfg.run), coord.first_round - 1


def run_demo(cfg: JobConfig, *, broker: str = "embedded", run_dir: str | Path | None = None,
             quiet: bool = False, metrics_port: int | None = None, resume: bool = False,
             report: str = "now") -> JobResult:
    """Broker + coordinator + `cfg.agents` in-process agents, `cfg.rounds` rounds (resume: the rest of them)."""
    from fedfleet.coordinator.broker import start_broker
    from fedfleet.coordinator.job.malloc_arenas import cap_malloc_arenas
    from fedfleet.edge_agent.agent import Agent

    t0 = time.perf_counter()
    run_dir = Path(run_dir or Path("runs") / new_run_id())
    small_model_threads()
    cap_malloc_arenas(2)  # before the agents' threads start: fedfleet.coordinator.job.malloc_arenas
    secret = os.urandom(32)
    agents: list[Agent] = []
    with start_broker(broker) as b:
        run = build_run(cfg, broker_url=b.url, secret=secret, signing_key=_run_signing_key(run_dir),
                        run_dir=run_dir, roster=agent_ids(cfg)[: cfg.agents], resume=resume)
        coord = run.coordinator
        progress = _progress(run, "fedfleet demo", quiet)
        try:
            coord.start()
            start_demo_agents(cfg, b.url, run.roster, secret, run.shards(), coord.public_key, agents)
            if not quiet:
                progress.console.print(f"broker {b.kind} at {b.url}; {len(run.roster)} agents; method {cfg.method}; "
                                      f"model {run.task.name} on {cfg.runtime}; energy modelled from the "
                                      f"{DEMO_PROFILE} profile; run dir {run_dir}", soft_wrap=True)
            coord.wait_for_agents(len(run.roster), timeout_s=60)
            summaries = run_rounds(coord, cfg.rounds, progress, run_dir, metrics_port)
        finally:
            for a in agents:
                a.stop()
            coord.stop()
    return finish(_result(run, summaries, t0, b.kind), run_dir, progress, quiet, report)


def _progress(run: Run, title: str, quiet: bool = False) -> Progress:
    """The run's progress view (rounds, agents online, joules booked), set as the engine's round callback."""
    coord = run.coordinator
    progress = Progress(run.job.rounds, title=title, quiet=quiet,
                        online=lambda: (len(coord.ready_agents()), len(run.roster)),
                        joules=lambda: ledger_joules(coord))
    progress.score_name = run.task.score_name
    coord.on_round = progress
    return progress


def _result(run: Run, summaries: list[RoundSummary], t0: float, broker: str) -> JobResult:
    coord = run.coordinator
    final_accuracy, rounds = finished(coord, summaries)
    return JobResult(
        final_accuracy=final_accuracy, rounds=rounds, agents=len(run.roster),
        wall_s=time.perf_counter() - t0, bytes_up=coord.bytes_up_total, bytes_down=coord.bytes_down_total,
        broker=broker, run_dir=str(run.run_dir), summaries=summaries,
        timeline={"first_dispatch_at": coord.first_dispatch_at, "last_round_at": coord.last_round_at},
        quality=run.summary(),
    )


def start_demo_agents(cfg: JobConfig, url: str, ids: list[str], secret: bytes, local: list[LocalData],
                      coordinator_key: bytes, agents: list[Any] | None = None, wait_s: float | None = None) -> list[Any]:
    """The demo's in-process agents, started, appended to `agents` as each starts (so a caller can stop
    those already running if a later one fails) and returned. They share one model cache: a package is loaded once in this
    process and its ONNX Runtime sessions (backbone and head graph; `InferenceSession.run` is thread-safe)
    serve every agent, each with its own feature cache. LiteRT interpreters are not thread-safe (one set of
    input tensors per interpreter), so with `--runtime litert` each agent still loads its own.

    The agents connect at once, not one after another: each `start` returns at once and then every agent
    is waited for (connection and subscriptions acknowledged), as `Agent.start` would wait for one; `wait_s`
    in all (default 10 s, and 0.1 s more per agent above 100)."""
    from fedfleet.edge_agent.agent import Agent, AgentConfig
    from fedfleet.edge_agent.meters import open_meter
    from fedfleet.edge_agent.profiles import load_profile

    profile = load_profile(DEMO_PROFILE)  # parsed once (a frozen Profile); each agent has its own meter
    shared_models: dict[str, Any] = {}
    agents = [] if agents is None else agents
    for i, agent_id in enumerate(ids):
        a = Agent(AgentConfig(url, cfg.fleet, agent_id, protocol.derive_key(secret, agent_id), runtime=cfg.runtime,
                              profile=DEMO_PROFILE, coordinator_key=coordinator_key), local[i],
                  meter=open_meter("model", profile), model_cache=shared_models)
        a.start(wait_s=0)
        agents.append(a)
    wait_s = max(10.0, 0.1 * len(ids)) if wait_s is None else wait_s
    deadline = time.monotonic() + wait_s
    for a in agents:
        for event, what in ((a.link.connected, "connect"), (a.link.subscribed, "have its subscriptions acknowledged")):
            if not event.wait(max(0.0, deadline - time.monotonic())):
                raise ConnectionError(f"agent {a.cfg.agent_id} could not {what} at the MQTT broker {url} "
                                      f"within {wait_s:.0f} s")
    return agents


def _run_signing_key(run_dir: Path) -> bytes:
    """The demo's signing key: the one kept in the run directory, else a fresh one written there (0600)."""
    path = run_dir / "coordinator.key"
    if path.exists():
        return signing.read_key_file(path, "coordinator.key in the run directory")
    seed = signing.new_signing_seed()
    run_dir.mkdir(parents=True, exist_ok=True)
    signing.write_private_key_file(path, seed)
    return seed


def serve(cfg: JobConfig, *, broker: str, secret: bytes, signing_key: bytes, run_dir: str | Path | None = None,
          wait_s: float = 600.0,
          username: str | None = None, password: str | None = None, ca_certs: str | None = None,
          metrics_port: int | None = None, resume: bool = False, report: str = "now") -> JobResult:
    """Only the coordinator: waits for the roster's agents on `broker`, then runs the rounds (resume: the rest)."""
    t0 = time.perf_counter()
    run_dir = Path(run_dir or Path("runs") / new_run_id())
    small_model_threads()
    before = set(run_dir.iterdir()) if run_dir.is_dir() else None  # what was there before this serve
    run = build_run(cfg, broker_url=broker, secret=secret, signing_key=signing_key, run_dir=run_dir,
                    resume=resume, username=username, password=password, ca_certs=ca_certs)
    coord = run.coordinator
    progress = _progress(run, "fedfleet serve")
    try:
        try:
            coord.start()
        except (ConnectionError, TimeoutError, OSError):
            coord.stop()
            if not resume:  # never connected: nothing happened, so the directory is not claimed (a retry works)
                _unclaim(run_dir, before)
            raise
        progress.console.print(f"waiting for {len(run.roster)} agents on {broker} (fleet {cfg.fleet}) ...")
        coord.wait_for_agents(max(1, int(np.ceil(cfg.quorum * len(run.roster)))), timeout_s=wait_s,
                              report=lambda line: progress.console.print(f"waiting: {line}", soft_wrap=True))
        summaries = run_rounds(coord, cfg.rounds, progress, run_dir, metrics_port)
    finally:
        coord.stop()
    return finish(_result(run, summaries, t0, broker), run_dir, progress, quiet=False, report=report)


def _unclaim(run_dir: Path, before: set[Path] | None) -> None:
    """Remove what a serve that never reached its broker wrote into `run_dir` (the directory itself if it made it)."""
    import shutil

    if before is None:
        shutil.rmtree(run_dir, ignore_errors=True)
        return
    for p in set(run_dir.iterdir()) - before:
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
