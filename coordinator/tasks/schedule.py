"""Task schedules of continual jobs: parse and check the `[continual]` table, and say which task a round
belongs to. No torch here (the job config imports it).

    [continual]
    head = "shared"            # "shared" (one head for every task) or "task" (a per-task head: the softmax
                               # runs over the task's classes; every task then needs `classes`)
    rounds_per_task = 40       # for tasks that do not set their own `rounds`
    schedule = ["identity", "perm-1", "perm-2"]   # the order the tasks arrive in; names from [continual.tasks]

    [continual.tasks.identity]
    transform = "identity"     # "identity" or "permute" (a fixed pixel permutation drawn from `seed`)
    [continual.tasks.perm-1]
    transform = "permute"
    seed = 1
    rounds = 40                # optional
    classes = [0, 1]           # optional: only the samples of these classes (split tasks)

A schedule naming an unknown task or transform is a `ConfigError` naming the field.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from fedfleet.edge_agent.continual import HEADS, TRANSFORMS
from fedfleet.edge_agent.errors import ConfigError

N_CLASSES = 10  # digits and MNIST
_NAME = re.compile(r"[A-Za-z0-9_.][A-Za-z0-9_.-]{0,63}")
_TASK_KEYS = {"transform", "seed", "classes", "rounds"}
_KEYS = {"head", "rounds_per_task", "schedule", "tasks"}


@dataclass(frozen=True)
class ContinualTask:
    name: str
    transform: str
    rounds: int
    seed: int | None = None
    classes: tuple[int, ...] | None = None

    def spec(self, index: int, head: str) -> dict[str, Any]:
        """What an agent's task config carries about this task (see fedfleet.edge_agent.continual)."""
        return {"task": self.name, "index": index, "transform": self.transform, "seed": self.seed,
                "classes": list(self.classes) if self.classes is not None else None, "head": head}


@dataclass(frozen=True)
class Position:
    """Where round number `counter` (0-based, in the order rounds ran) falls in the schedule."""

    index: int  # task index t
    task: ContinualTask
    round_in_task: int  # 1-based
    last: bool  # the task's last round
    head: str
    tasks: int  # tasks in the schedule


@dataclass(frozen=True)
class Schedule:
    tasks: tuple[ContinualTask, ...]
    head: str = "shared"

    @property
    def total_rounds(self) -> int:
        return sum(t.rounds for t in self.tasks)

    def position(self, counter: int) -> Position:
        start = 0
        for i, t in enumerate(self.tasks):
            if counter < start + t.rounds:
                r = counter - start + 1
                return Position(i, t, r, r == t.rounds, self.head, len(self.tasks))
            start += t.rounds
        raise ValueError(f"round {counter + 1} is past the schedule's {self.total_rounds} rounds")

    def to_dict(self) -> dict[str, Any]:
        """The canonical [continual] table (every task with its own rounds)."""
        return {"head": self.head, "schedule": [t.name for t in self.tasks],
                "tasks": {t.name: {k: v for k, v in (("transform", t.transform), ("seed", t.seed), ("rounds", t.rounds),
                                                     ("classes", list(t.classes) if t.classes else None))
                                   if v is not None} for t in self.tasks}}


def _err(source: str, where: str, what: str) -> ConfigError:
    return ConfigError(f"{source}: field 'continual.{where}' {what}")


def _int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def parse(raw: Any, source: str) -> Schedule:
    """A checked Schedule from a [continual] table; ConfigError naming the field otherwise."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: 'continual' must be a table ([continual])")
    unknown = set(raw) - _KEYS
    if unknown:
        raise _err(source, sorted(unknown)[0], f"is unknown; known: {', '.join(sorted(_KEYS))}")
    head = raw.get("head", "shared")
    if head not in HEADS:
        raise _err(source, "head", f"must be one of {', '.join(HEADS)}, got {head!r}")
    default_rounds = raw.get("rounds_per_task")
    if default_rounds is not None and not (_int(default_rounds) and default_rounds >= 1):
        raise _err(source, "rounds_per_task", f"must be a positive integer, got {default_rounds!r}")
    defs = raw.get("tasks")
    if not isinstance(defs, dict) or not defs:
        raise _err(source, "tasks", "must define at least one task ([continual.tasks.<name>])")
    order = raw.get("schedule", list(defs))
    if not isinstance(order, list) or not order:
        raise _err(source, "schedule", "must be a non-empty list of task names")
    tasks = []
    for i, name in enumerate(order):
        if not isinstance(name, str) or name not in defs:
            raise _err(source, f"schedule[{i}]", f"names unknown task {name!r}; defined: {', '.join(sorted(defs))}")
        if name in order[:i]:
            raise _err(source, f"schedule[{i}]", f"repeats task {name!r}")
        tasks.append(_task(name, defs[name], default_rounds, head, source))
    return Schedule(tuple(tasks), head)


def _task(name: str, raw: Any, default_rounds: int | None, head: str, source: str) -> ContinualTask:
    w = f"tasks.{name}"
    if not _NAME.fullmatch(name):
        raise _err(source, w, "must be named with 1-64 letters, digits, '-', '_' or '.'")
    if not isinstance(raw, dict):
        raise _err(source, w, "must be a table")
    unknown = set(raw) - _TASK_KEYS
    if unknown:
        raise _err(source, f"{w}.{sorted(unknown)[0]}", f"is unknown; known: {', '.join(sorted(_TASK_KEYS))}")
    transform = raw.get("transform", "identity")
    if transform not in TRANSFORMS:
        raise _err(source, f"{w}.transform", f"names unknown transform {transform!r}; known: {', '.join(TRANSFORMS)}")
    seed = raw.get("seed")
    if transform == "permute" and not _int(seed):
        raise _err(source, f"{w}.seed", f"must be an integer for a 'permute' task, got {seed!r}")
    if transform != "permute" and seed is not None:
        raise _err(source, f"{w}.seed", "applies only to transform = 'permute'")
    rounds = raw.get("rounds", default_rounds)
    if rounds is None:
        raise _err(source, f"{w}.rounds", "is required (or set continual.rounds_per_task)")
    if not (_int(rounds) and rounds >= 1):
        raise _err(source, f"{w}.rounds", f"must be a positive integer, got {rounds!r}")
    classes = raw.get("classes")
    if classes is not None:
        if (not isinstance(classes, list) or not classes or not all(_int(c) and 0 <= c < N_CLASSES for c in classes)
                or len(set(classes)) != len(classes)):
            raise _err(source, f"{w}.classes", f"must be distinct class labels in 0..{N_CLASSES - 1}, got {classes!r}")
        classes = tuple(int(c) for c in classes)
    elif head == "task":
        raise _err(source, f"{w}.classes", "is required with head = 'task' (a per-task head needs its classes)")
    return ContinualTask(name, transform, int(rounds), int(seed) if seed is not None else None, classes)


def permuted_digits(tasks: int = 5, rounds_per_task: int = 40) -> Schedule:
    """The spec's permuted digits: the identity and `tasks - 1` fixed pixel permutations, shared 10-way head."""
    defs = {"identity": {"transform": "identity"}}
    defs.update({f"perm-{i}": {"transform": "permute", "seed": i} for i in range(1, tasks)})
    return parse({"head": "shared", "rounds_per_task": rounds_per_task, "tasks": defs}, "permuted_digits")


def split_digits(rounds_per_task: int = 40, head: str = "task", tasks: int = 5) -> Schedule:
    """Split digits: tasks of 2 classes each ({0,1}, {2,3}, ...; 5 at most), per-task heads by default."""
    defs = {f"digits-{2 * i}{2 * i + 1}": {"classes": [2 * i, 2 * i + 1]} for i in range(min(tasks, 5))}
    return parse({"head": head, "rounds_per_task": rounds_per_task, "tasks": defs}, "split_digits")
