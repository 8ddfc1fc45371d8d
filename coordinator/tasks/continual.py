"""Continual jobs on the coordinator: run any strategy through a task schedule, evaluate every task seen so
far after every round, and score the run (ACC, FGT).

- `ContinualStrategy(inner, schedule)` wraps a strategy: each round it works out the current task
  (`Position`), tells the inner strategy (`set_task(position)`, if it has one: FOT does), and adds the
  task's description to every agent's task config (`config["continual"]`, read by `fedfleet.edge_agent.continual`).
- `ContinualEvaluator` is the engine's `evaluate(ctx, state)`: after every round it scores the global model on the
  held-out test split of every task seen so far (transformed like the task; with a per-task head the
  prediction is the argmax over the task's classes), writes a `task_accuracy` row per task to the ledger,
  FOT's basis sizes after each task to `layer_basis`, and returns the mean over the tasks seen.
- `acc_fgt(a)`: ACC = mean final per-task accuracy; FGT = mean over the old tasks of (accuracy just after
  learning the task - final accuracy).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import torch
from torch import nn

from fedfleet.coordinator.strategies.base import Strategy, TaskSpec, WrappedStrategy
from fedfleet.coordinator.tasks.base import RoundContext
from fedfleet.coordinator.tasks.schedule import Position, Schedule
from fedfleet.coordinator.tasks.schedule import parse as parse_schedule
from fedfleet.edge_agent import continual as edge_continual
from fedfleet.edge_agent.errors import ConfigError
from fedfleet.models import data as datasets


class ContinualStrategy(WrappedStrategy):
    """A strategy run through a task schedule. Rounds are counted in the order they run (numbering-free)."""

    def __init__(self, inner: Strategy, schedule: Schedule) -> None:
        super().__init__(inner)
        self.schedule = schedule
        self.rounds_started = 0
        self.position: Position | None = None

    def configure(self, round: int, phase: int, agents: list[str]) -> dict[str, TaskSpec]:
        if phase == 0:
            self.position = self.schedule.position(min(self.rounds_started, self.schedule.total_rounds - 1))
            self.rounds_started += 1
            if hasattr(self.inner, "set_task"):
                self.inner.set_task(self.position)
        assert self.position is not None
        spec = self.position.task.spec(self.position.index, self.schedule.head)
        specs = self.inner.configure(round, phase, agents)
        return {a: dataclasses.replace(s, config={**s.config, "continual": spec}) for a, s in specs.items()}

    def extra_state(self) -> dict[str, Any]:
        return {**self.inner.extra_state(), "continual_rounds": self.rounds_started,
                "schedule": self.schedule.to_dict()}

    def load_extra_state(self, extra: dict[str, Any]) -> None:
        """Continue the schedule where the checkpoint left it (the next round configures its position); the
        inner strategy restores its own state. A checkpoint of another schedule is refused."""
        extra = dict(extra)
        rounds, schedule = extra.pop("continual_rounds", None), extra.pop("schedule", None)
        if schedule != self.schedule.to_dict():
            raise ValueError("the checkpoint's task schedule is not this job's [continual] table")
        if isinstance(rounds, bool) or not isinstance(rounds, int) or not 0 <= rounds <= self.schedule.total_rounds:
            raise ValueError(f"field 'extra.continual_rounds' = {rounds!r} is not a round count of this schedule "
                             f"(0 to {self.schedule.total_rounds})")
        self.inner.load_extra_state(extra)
        self.rounds_started = rounds

    def round_note(self) -> str:
        p = self.position
        where = f"task {p.index + 1}/{p.tasks} {p.task.name} r{p.round_in_task}/{p.task.rounds}" if p else ""
        inner = self.inner.round_note()
        return f"{where}; {inner}" if inner and where else where or inner


def task_tests(schedule: Schedule, test: datasets.Dataset) -> list[datasets.Dataset]:
    """Each task's held-out set: the test split, with the task's classes and transform."""
    out = []
    for i, t in enumerate(schedule.tasks):
        d = edge_continual.derive(edge_continual.LocalData(test.x, test.y), t.spec(i, schedule.head))
        out.append(datasets.Dataset(d.x, d.y))
    return out


class ContinualEvaluator:
    """The engine's `evaluate(ctx, state)` for a continual job (see the module docstring)."""

    def __init__(self, strategy: ContinualStrategy, cmodel: Any, test: datasets.Dataset) -> None:
        self.strategy = strategy
        self.cmodel = cmodel
        self.tests = task_tests(strategy.schedule, test)

    @torch.no_grad()
    def score(self, state: dict[str, torch.Tensor], tau: int) -> tuple[float, float]:
        """(accuracy, loss) of the global model on task tau's test set."""
        test = self.tests[tau]
        feats = torch.from_numpy(self.cmodel.edge.features(test.x, f"continual-{tau}"))
        head = self.cmodel.load_head(state)
        logits = head(feats)
        target = torch.as_tensor(test.y, dtype=torch.long)
        classes = self.strategy.schedule.tasks[tau].classes
        if self.strategy.schedule.head == "task" and classes is not None:
            mask = torch.full((logits.shape[1],), float("-inf"))
            mask[list(classes)] = 0.0
            logits = logits + mask
        loss = float(nn.functional.cross_entropy(logits, target))
        return int((logits.argmax(dim=1) == target).sum()) / max(1, len(target)), loss

    def __call__(self, ctx: RoundContext, state: dict[str, torch.Tensor]) -> tuple[float, float]:
        pos = self.strategy.position
        if pos is None:
            raise RuntimeError("the continual evaluator runs after a round was configured")
        scores = [self.score(state, tau) for tau in range(pos.index + 1)]
        if ctx.ledger is not None:
            names = [t.name for t in self.strategy.schedule.tasks]
            ctx.ledger.record_task_accuracy(ctx.run, ctx.round, pos.index, pos.task.name, pos.last,
                                            [(tau, names[tau], a, lo) for tau, (a, lo) in enumerate(scores)])
            fill = getattr(self.strategy.inner, "basis_sizes", None)
            if pos.last and fill is not None:
                ctx.ledger.record_basis(ctx.run, pos.index, pos.task.name, fill())
        return float(np.mean([a for a, _ in scores])), float(np.mean([lo for _, lo in scores]))


def acc_fgt(matrix: list[list[float | None]]) -> tuple[float, float]:
    """(ACC, FGT) from a[t][tau]: ACC = mean_tau a[T-1][tau]; FGT = mean_{tau < T-1} (a[tau][tau] - a[T-1][tau])
    (0 with one task)."""
    last = len(matrix) - 1
    final = [float(v) for v in matrix[last][: last + 1] if v is not None]
    acc = float(np.mean(final)) if final else float("nan")
    drops = [float(matrix[t][t]) - float(matrix[last][t]) for t in range(last)
             if matrix[t][t] is not None and matrix[last][t] is not None]
    return acc, float(np.mean(drops)) if drops else 0.0


def schedule_of(cfg: Any) -> Schedule | None:
    """The job's schedule (None for an ordinary job); ConfigError for a method that cannot run one."""
    # a strategy's `continual` says whether its learner trains on the task's data and honours per-task heads
    # (fedfleet.edge_agent.continual)
    from fedfleet.coordinator import strategies

    if not getattr(cfg, "continual", None):
        if strategies.spec(cfg.method).continual == "required":
            raise ConfigError(f"method {cfg.method!r} needs a task schedule: add a [continual] table to the job "
                              "file (see examples/permuted-digits.toml)")
        return None
    if not strategies.spec(cfg.method).continual:
        able = [m for m in strategies.available() if strategies.spec(m).continual]
        raise ConfigError(f"field 'job.method': a continual job runs {', '.join(able)}, not {cfg.method!r}")
    return parse_schedule(cfg.continual, "job")
