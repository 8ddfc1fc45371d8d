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

from fedfleet.coordinator.engine.rounds import Coordinator, EngineConfig, RoundSummary
from fedfleet.coordinator.job.config import DOWNLINK_PRESETS, JobConfig
from fedfleet.coordinator.job.progress import Progress
from fedfleet.coordinator.records.store import new_run_id, open_job
from fedfleet.coordinator.strategies import create as create_strategy
from fedfleet.coordinator.strategies import head_hidden, method_config, package_mode
from fedfleet.coordinator.tasks import continual
from fedfleet.edge_agent.errors import ConfigError
from fedfleet.edge_agent.learners import LocalData
from fedfleet.edge_agent.wire import protocol, signing
from fedfleet.models import data as datasets

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


def shards(cfg: JobConfig) -> tuple[list[LocalData], datasets.Dataset]:
    """The demo's agent shards (Dirichlet(alpha) label skew, or IID when alpha = 0) and the test split.

    LoRA jobs fine-tune a pre-trained base on feature-shifted data: agent i holds domain i mod 6
    (`fedfleet.models.shifts`), the test split is scored under every domain."""
    if package_mode(cfg) == "custom":  # a model and data of your own (fedfleet.coordinator.tasks.custom)
        from fedfleet.coordinator.tasks import task_for

        return task_for(cfg).shards(cfg.agents), None  # type: ignore[return-value]
    if package_mode(cfg) == "diffusion":  # moving-digit clips (fedfleet.coordinator.tasks.diffusion)
        from fedfleet.coordinator.tasks import diffusion

        return diffusion.shards(cfg)  # type: ignore[return-value]
    if package_mode(cfg) == "lora":
        from fedfleet.models import shifts

        parts, test_set, _ = shifts.shifted_shards(cfg.dataset, cfg.agents, cfg.alpha, cfg.seed)
        return [LocalData(p.x, p.y) for p in parts], test_set
    full = datasets.digits() if cfg.dataset == "digits" else datasets.mnist5k()
    train, test = datasets.split(full, 0.2, seed=cfg.seed)
    try:
        parts = datasets.partition(train.y, cfg.agents, cfg.alpha, cfg.seed)
    except ValueError as exc:
        raise ConfigError(f"field 'agents' = {cfg.agents} on {cfg.dataset} ({len(train)} training samples): {exc}") from None
    return [LocalData(train.x[p], train.y[p]) for p in parts], test


def agent_ids(cfg: JobConfig) -> list[str]:
    return list(cfg.roster) if cfg.roster else [f"agent-{i:02d}" for i in range(cfg.agents)]


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


def ledger_joules(coord: Coordinator) -> float:
    rows = coord.ledger.query(
        "SELECT SUM(COALESCE(energy_compute_j, 0) + COALESCE(energy_radio_j, 0) + COALESCE(energy_idle_j, 0))"
        " AS j FROM agent_rounds WHERE run = ?", (coord.cfg.run,))
    return float(rows[0]["j"] or 0.0)


def build(cfg: JobConfig) -> tuple[bytes, Any]:
    """The model package (built once per machine: `fedfleet.models.package_cache`) and the coordinator's torch mirror
    of it."""
    from fedfleet.edge_agent.errors import ModelError
    from fedfleet.models import package_cache
    from fedfleet.models.mirrors.head import CoordinatorModel

    if package_mode(cfg) == "custom":
        from fedfleet.coordinator.tasks import task_for

        return task_for(cfg).package()
    if package_mode(cfg) == "diffusion":
        from fedfleet.coordinator.tasks import diffusion

        return diffusion.build(cfg)
    if package_mode(cfg) == "lora":  # the base's widths are fixed by its pre-training (fedfleet.models.lora_base)
        from fedfleet.models.lora_base import build_lora_package
        from fedfleet.models.mirrors.lora_model import LoraCoordinatorModel

        blob = build_lora_package(cfg.dataset, seed=cfg.seed)
        return blob, LoraCoordinatorModel(blob)
    hidden = head_hidden(cfg)
    spec = {"seed": cfg.seed, "head_hidden": hidden, "dataset": cfg.dataset, "head_layers": cfg.hidden_layers}
    blob = package_cache.package(cfg.mode, **spec)
    try:
        return blob, CoordinatorModel(blob)
    except ModelError:  # a damaged cached copy: build it again (a fresh build that fails raises)
        blob = package_cache.package(cfg.mode, **spec, refresh=True)
        return blob, CoordinatorModel(blob)


def small_model_threads() -> None:
    """One thread for torch and for numpy's BLAS in this process. The tensors here are small and many agents
    share the process: on a busy 2-core machine, thread pools spin against each other and cost far more
    than they save (evaluating the digits head: 60 ms with 2 torch threads, 1.7 ms with 1; a 16x784 by
    784x128 numpy product: 43 ms with 2 OpenBLAS threads, 0.3 ms with 1)."""
    import threadpoolctl
    import torch

    torch.set_num_threads(1)
    threadpoolctl.threadpool_limits(1)


def engine_config(cfg: JobConfig, run: str) -> EngineConfig:
    return EngineConfig(fleet=cfg.fleet, run=run, rounds=cfg.rounds, per_round=cfg.per_round, quorum=cfg.quorum,
                        deadline_s=cfg.deadline_s, grace_s=cfg.grace_s, seed=cfg.seed, downlink=dict(DOWNLINK_PRESETS[cfg.downlink]))


def job_identity(cfg: JobConfig, roster: list[str]) -> dict[str, Any]:
    """What a resumed run must share with the run it continues (`fedfleet.coordinator.records.store.open_job` compares it).
    The task fields are left out at their defaults, so runs started before they existed still resume."""
    identity = {**cfg.to_dict(), "roster": list(roster)}
    for key, default in (("task", "classification"), ("eval_every", 0), ("model", None), ("data", None),
                         ("eval", None), ("base_dir", "")):
        if identity.get(key) == default:
            del identity[key]
    return identity


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
    ids = agent_ids(cfg)[: cfg.agents]
    run = new_run_id()
    run_dir = Path(run_dir or Path("runs") / run)
    run = open_job(run_dir, job_identity(cfg, ids), resume=resume, run=run)
    small_model_threads()
    cap_malloc_arenas(2)  # before the agents' threads start: fedfleet.coordinator.job.malloc_arenas
    local, test = shards(cfg)
    blob, cmodel = build(cfg)
    secret = os.urandom(32)
    signing_key = _run_signing_key(run_dir)
    strategy = create_strategy(cfg.method, cmodel.initial_state(), **method_config(cfg),
                               seed=cfg.seed)
    strategy, evaluate = continual.wrap(cfg, strategy, cmodel, test)  # a task schedule, if the job has one
    agents: list[Agent] = []
    with start_broker(broker) as b:
        coord = Coordinator(
            broker_url=b.url, secret=secret, roster=ids, strategy=strategy, package=blob,
            evaluate=evaluate, run_dir=run_dir,
            config=engine_config(cfg, run), signing_key=signing_key, resume=resume,
        )
        progress = Progress(cfg.rounds, title="fedfleet demo", quiet=quiet,
                            online=lambda: (len(coord.ready_agents()), len(ids)), joules=lambda: ledger_joules(coord))
        bind_model(cmodel, coord, progress)
        coord.on_round = progress
        try:
            coord.start()
            start_demo_agents(cfg, b.url, ids, secret, local, coord.public_key, agents)
            if not quiet:
                progress.console.print(f"broker {b.kind} at {b.url}; {len(ids)} agents; method {cfg.method}; "
                                      f"model {package_mode(cfg)} on {cfg.runtime}; energy modelled from the "
                                      f"{DEMO_PROFILE} profile; run dir {run_dir}", soft_wrap=True)
            coord.wait_for_agents(len(ids), timeout_s=60)
            summaries = run_rounds(coord, cfg.rounds, progress, run_dir, metrics_port)
        finally:
            for a in agents:
                a.stop()
            coord.stop()
    final_accuracy, rounds = finished(coord, summaries)
    result = JobResult(
        final_accuracy=final_accuracy, rounds=rounds, agents=len(ids),
        wall_s=time.perf_counter() - t0, bytes_up=coord.bytes_up_total, bytes_down=coord.bytes_down_total,
        broker=b.kind, run_dir=str(run_dir), summaries=summaries,
        timeline={"first_dispatch_at": coord.first_dispatch_at, "last_round_at": coord.last_round_at},
        quality=model_summary(cmodel, coord, run_dir, test),
    )
    return finish(result, run_dir, progress, quiet, report)


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
    signing.write_private_key_file(path, seed)
    return seed


def serve(cfg: JobConfig, *, broker: str, secret: bytes, signing_key: bytes, run_dir: str | Path | None = None,
          wait_s: float = 600.0,
          username: str | None = None, password: str | None = None, ca_certs: str | None = None,
          metrics_port: int | None = None, resume: bool = False, report: str = "now") -> JobResult:
    """Only the coordinator: waits for the roster's agents on `broker`, then runs the rounds (resume: the rest)."""
    t0 = time.perf_counter()
    ids = agent_ids(cfg)
    run = new_run_id()
    run_dir = Path(run_dir or Path("runs") / run)
    run = open_job(run_dir, job_identity(cfg, ids), resume=resume, run=run)
    small_model_threads()
    _, test = shards(cfg)
    blob, cmodel = build(cfg)
    strategy = create_strategy(cfg.method, cmodel.initial_state(), **method_config(cfg),
                               seed=cfg.seed)
    strategy, evaluate = continual.wrap(cfg, strategy, cmodel, test)
    coord = Coordinator(broker_url=broker, secret=secret, roster=ids, strategy=strategy, package=blob,
                        evaluate=evaluate, run_dir=run_dir,
                        config=engine_config(cfg, run), signing_key=signing_key, username=username,
                        password=password, ca_certs=ca_certs, resume=resume)
    progress = Progress(cfg.rounds, title="fedfleet serve", online=lambda: (len(coord.ready_agents()), len(ids)),
                        joules=lambda: ledger_joules(coord))
    bind_model(cmodel, coord, progress)
    coord.on_round = progress
    try:
        coord.start()
        progress.console.print(f"waiting for {len(ids)} agents on {broker} (fleet {cfg.fleet}) ...")
        coord.wait_for_agents(max(1, int(np.ceil(cfg.quorum * len(ids)))), timeout_s=wait_s)
        summaries = run_rounds(coord, cfg.rounds, progress, run_dir, metrics_port)
    finally:
        coord.stop()
    final_accuracy, rounds = finished(coord, summaries)
    result = JobResult(final_accuracy, rounds, len(ids), time.perf_counter() - t0,
                       coord.bytes_up_total, coord.bytes_down_total, broker, str(run_dir), summaries,
                       {"first_dispatch_at": coord.first_dispatch_at, "last_round_at": coord.last_round_at},
                       model_summary(cmodel, coord, run_dir, test))
    return finish(result, run_dir, progress, quiet=False, report=report)


def bind_model(cmodel: Any, coord: Coordinator, progress: Progress) -> None:
    """Let the progress lines name the model's score."""
    progress.score_name = getattr(cmodel, "score_name", progress.score_name)


def model_summary(cmodel: Any, coord: Coordinator, run_dir: Path, test: Any) -> dict[str, Any] | None:
    """The summary keys of a task scored by something other than accuracy, and its model files (None: none)."""
    if not hasattr(cmodel, "summary"):
        return None
    return cmodel.summary(run_dir, coord.strategy.global_state(), test.x, test.y)
