"""The task interface: what a run learns, on which data, scored how. Every task, built in or your own, is one.

A `Task` gives the assembly of a run (`fedfleet.coordinator.job.assemble.build_run`) four things:
- `package()`: the model package the agents load (bytes) and the coordinator's torch mirror of its
  trainable part (`initial_state()`);
- `shards(agents)`: each agent's local data, for runs whose agents the job starts itself (demo, emulate,
  `fedfleet shards`); a fleet of devices brings its own;
- `evaluate(ctx, state)`: the round's score of the global state, as (score, loss); NaN for a round the task
  does not score. `ctx` is the round's `RoundContext`: its run, round and run directory, and the ledger's
  task-level records. A task never holds the engine;
- `summary(run_dir, state)`: keys for summary.json at the end of a run (None: accuracy is the summary).

A task may also wrap the strategy (`wrap_strategy`: a continual schedule does) and name its score
(`score_name`, shown in progress lines).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    from fedfleet.coordinator.records.ledger import Ledger
    from fedfleet.coordinator.strategies.base import Strategy
    from fedfleet.edge_agent.learners.base import LocalData

__all__ = ["RoundContext", "Task", "Score", "NOT_SCORED"]

Score = tuple[float, float]  # (score, loss): accuracy for classifiers, the task's own number otherwise
NOT_SCORED: Score = (math.nan, math.nan)


@dataclass(frozen=True)
class RoundContext:
    """What a task may know of the round it scores: no engine, no coordinator.

    `ledger` is the run's ledger; a task writes its own records through its methods (`record_task_accuracy`,
    `record_basis`), keyed by `run` and `round`."""

    run: str
    round: int
    rounds: int
    run_dir: Path
    ledger: Ledger | None = None


@runtime_checkable
class Task(Protocol):
    """See the module docstring. Implementations: `fedfleet.coordinator.tasks.classification`, `.lora`,
    `.diffusion`, `.continual` (a schedule around classification), `.packaged` (parts in hand) and `.custom`
    (a model and data of your own)."""

    name: str
    score_name: str

    def package(self) -> tuple[bytes, Any]: ...

    def shards(self, agents: int) -> list[LocalData]: ...

    def evaluate(self, ctx: RoundContext, state: dict[str, Any]) -> Score: ...

    def summary(self, run_dir: Path, state: dict[str, Any]) -> dict[str, Any] | None: ...

    def wrap_strategy(self, strategy: Strategy) -> Strategy: ...
