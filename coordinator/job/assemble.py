"""The one assembly of a run: from a job to a coordinator ready to start.

`build_run(job, broker_url=..., secret=..., signing_key=..., run_dir=...)` is how every run is put together
(`fedfleet demo`, `fedfleet serve`, `fedfleet emulate`, the benchmarks and the tests' fleets):
1. the run directory is opened (`fedfleet.coordinator.records.store.open_job`): `job.json` records what a
   resumed run must share with the run it continues, and `resume=True` continues the newest checkpoint;
2. the job's task (`fedfleet.coordinator.tasks.task_for`) builds the model package and its torch mirror;
3. the job's method becomes a strategy (`fedfleet.coordinator.strategies.build`), started from the mirror's
   initial state, or the caller's own strategy (a benchmark's variant);
4. the task may wrap it (a continual schedule does) and scores rounds through `task.evaluate(ctx, state)`;
5. the round engine (`fedfleet.coordinator.engine.rounds.Coordinator`) gets all of it; a job with
   `[aggregation] mode = "async"` gets the buffered asynchronous engine instead
   (`fedfleet.coordinator.engine.buffered.BufferedCoordinator`, the same parts).

Agents are not part of it: demo, emulate and benchmarks start theirs in the ways they need (in-process,
process pools, devices), each with `run.shards()` when the job holds its agents' data.
"""

from __future__ import annotations

import functools
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedfleet.coordinator.engine.rounds import Coordinator, EngineConfig
from fedfleet.coordinator.job.config import DOWNLINK_PRESETS, JobConfig
from fedfleet.coordinator.records.store import new_run_id, open_job
from fedfleet.coordinator.strategies import Strategy
from fedfleet.coordinator.strategies import build as build_strategy
from fedfleet.coordinator.tasks import Task, task_for
from fedfleet.edge_agent.learners import LocalData
from fedfleet.edge_agent.wire.link import check_url

__all__ = ["Run", "build_run", "agent_ids", "engine_config", "job_identity", "removed_if_refused"]


@dataclass
class Run:
    """A run, assembled: the job, its task, the package the agents load, the strategy and the engine."""

    job: JobConfig
    task: Task
    package: bytes
    model: Any  # the task's torch mirror of the package's trainable part
    strategy: Strategy
    coordinator: Coordinator
    roster: list[str]
    run_dir: Path
    run: str
    _shards: list[LocalData] | None = field(default=None, repr=False)

    def shards(self) -> list[LocalData]:
        """The job's agents' local data (`job.agents` shards, in roster order), built once."""
        if self._shards is None:
            self._shards = self.task.shards(self.job.agents)
        return self._shards

    def summary(self) -> dict[str, Any] | None:
        """The task's summary keys for the final global state (None: accuracy is the summary)."""
        return self.task.summary(self.run_dir, self.strategy.global_state())


def agent_ids(job: JobConfig) -> list[str]:
    """The job's roster: its `roster` field, else agent-00, agent-01, ... (`job.agents` of them)."""
    return list(job.roster) if job.roster else [f"agent-{i:02d}" for i in range(job.agents)]


def engine_config(job: JobConfig, run: str) -> EngineConfig:
    return EngineConfig(fleet=job.fleet, run=run, rounds=job.rounds, per_round=job.per_round, over_select=job.over_select,
                        quorum=job.quorum,
                        deadline_s=job.deadline_s, grace_s=job.grace_s, seed=job.seed,
                        downlink=dict(DOWNLINK_PRESETS[job.downlink]))


def job_identity(job: JobConfig, roster: list[str]) -> dict[str, Any]:
    """What a resumed run must share with the run it continues (`open_job` compares it). The task fields are
    left out at their defaults, so runs started before they existed still resume."""
    identity = {**job.to_dict(), "roster": list(roster)}
    for key, default in (("over_select", 0.0), ("shard_mode", "partition"), ("shard_size", 0),
                         ("task", "classification"), ("eval_every", 0), ("model", None), ("data", None),
                         ("eval", None), ("base_dir", ""), ("aggregation", None)):
        if identity.get(key) == default:
            del identity[key]
    return identity


class _Started:
    def __init__(self) -> None:
        self.started = False

    def keep(self) -> None:
        """The run has started (its first round is about to run): from now on its directory stays."""
        self.started = True


@contextmanager
def removed_if_refused(run_dir: str | Path, *, resume: bool) -> Iterator[_Started]:
    """A fresh run's directory that did not exist before is removed if the block fails before `keep()` is
    called on what it yields: a refused command (a bad broker URL, a job its task refuses, a broker that
    cannot be reached) leaves nothing on disk. A resumed run's directory is never touched."""
    run_dir = Path(run_dir)
    existed = run_dir.exists()
    state = _Started()
    try:
        yield state
    except BaseException:
        if not resume and not existed and not state.started:
            shutil.rmtree(run_dir, ignore_errors=True)
        raise


def build_run(job: JobConfig, *, broker_url: str, secret: bytes, signing_key: bytes, run_dir: str | Path,
              roster: list[str] | None = None, resume: bool = False, strategy: Strategy | None = None,
              on_round: Any = None, username: str | None = None, password: str | None = None,
              ca_certs: str | None = None, run_id: str | None = None, task: Task | None = None) -> Run:
    """The run of `job` (see the module docstring). `roster` defaults to `agent_ids(job)`; `strategy`, if
    given, replaces the one the job's method would build (it must start from the task's initial state);
    `run_id` names a fresh run (default: a new id); `task`, if given, replaces the job's own (a Python
    caller's `fedfleet.coordinator.tasks.packaged.PackagedTask`, say)."""
    ids = list(roster) if roster is not None else agent_ids(job)
    run_dir = Path(run_dir)
    check_url(broker_url)  # everything a command can be refused for is checked before the run directory exists
    task = task if task is not None else task_for(job)
    blob, model = task.package()
    with removed_if_refused(run_dir, resume=resume):
        run = open_job(run_dir, job_identity(job, ids), resume=resume, run=run_id or new_run_id())
        strategy = task.wrap_strategy(strategy if strategy is not None else build_strategy(job, model.initial_state()))
        engine = Coordinator
        if job.aggregation is not None and job.aggregation.get("mode") == "async":
            from fedfleet.coordinator.engine.buffered import BufferedCoordinator, check_async_strategy

            check_async_strategy(strategy)
            engine = functools.partial(BufferedCoordinator, aggregation=job.aggregation)
        coord = engine(broker_url=broker_url, secret=secret, roster=ids, strategy=strategy, package=blob,
                       evaluate=task.evaluate, run_dir=run_dir, config=engine_config(job, run),
                       signing_key=signing_key, username=username, password=password, ca_certs=ca_certs,
                       resume=resume, on_round=on_round)
    return Run(job, task, blob, model, strategy, coord, ids, run_dir, run)

