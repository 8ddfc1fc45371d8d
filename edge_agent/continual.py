"""Continual jobs on the edge: which local data a task of a task schedule trains on, and its head.

A continual job's tasks carry `config["continual"]`, the coordinator's description of the current task:

    {"task": "perm-1", "index": 1, "transform": "permute", "seed": 1, "classes": [0, 1] | None,
     "head": "shared" | "task"}

- `transform = "identity"` uses the samples as they are; `"permute"` applies one fixed pixel permutation,
  drawn from `seed` with numpy's `Generator(PCG64(seed))`, the same on the coordinator and on every agent.
- `classes` keeps only the samples of those classes (split tasks).
- `head = "task"`: a per-task head, i.e. the softmax runs over the task's classes only (`head_classes`).

Where the data comes from: an agent whose data is a `TaskShards` (files named per task on a device, see
`load_task_dir`) trains on the shard of the task's name as it is; any other agent (emulation, the demo)
derives the task's data from its one local shard with the transform and class subset above.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fedfleet.edge_agent.errors import FedfleetError
from fedfleet.edge_agent.learners.base import LocalData

TRANSFORMS = ("identity", "permute")
HEADS = ("shared", "task")


class TaskDataError(FedfleetError):
    """The agent has no usable data for the task it was given. The message names the task."""


@dataclass
class TaskShards(LocalData):
    """Local data per task name (a device's files named per task). `x`, `y` are the first task's, so the
    agent's checks of the input shape and its sample count in the status still hold."""

    tasks: dict[str, LocalData] = field(default_factory=dict)


def permutation(seed: int, size: int) -> np.ndarray:
    """The fixed pixel permutation of a `permute` task: the same on every host for a given seed."""
    return np.random.Generator(np.random.PCG64(int(seed))).permutation(int(size))


def transform(x: np.ndarray, spec: dict[str, Any]) -> np.ndarray:
    """Apply a task's input transform to (N, ...) inputs."""
    kind = spec.get("transform", "identity")
    if kind == "identity":
        return x
    if kind == "permute":
        flat = x.reshape(len(x), -1)
        return np.ascontiguousarray(flat[:, permutation(int(spec["seed"]), flat.shape[1])].reshape(x.shape))
    raise TaskDataError(f"task {spec.get('task')!r}: unknown transform {kind!r}; known: {', '.join(TRANSFORMS)}")


def derive(data: LocalData, spec: dict[str, Any]) -> LocalData:
    """The task's data from one shard: its classes, transformed."""
    x, y = data.x, data.y
    classes = spec.get("classes")
    if classes is not None:
        keep = np.isin(y, np.asarray(classes, dtype=np.int64))
        x, y = x[keep], y[keep]
    return LocalData(transform(x, spec), y)


def task_data(data: LocalData, config: dict[str, Any]) -> LocalData:
    """The local data for a task with this config: `data` itself outside a continual job."""
    spec = config.get("continual")
    if not isinstance(spec, dict):
        return data
    name = str(spec.get("task"))
    if isinstance(data, TaskShards):
        if name not in data.tasks:
            raise TaskDataError(f"no local data for task {name!r}; this agent has files for {sorted(data.tasks)}")
        out = data.tasks[name]
    else:
        out = derive(data, spec)
    if len(out) == 0:
        raise TaskDataError(f"no local samples for task {name!r} (classes {spec.get('classes')})")
    return out


def head_classes(config: dict[str, Any]) -> list[int] | None:
    """The outputs a learner's softmax runs over: the task's classes with a per-task head, else all (None)."""
    spec = config.get("continual")
    if isinstance(spec, dict) and spec.get("head") == "task" and spec.get("classes") is not None:
        return [int(c) for c in spec["classes"]]
    return None


def load_task_dir(path: str | Path) -> TaskShards:
    """A device's data for a continual job: a directory with one `<task name>.npz` (arrays x, y) per task."""
    from fedfleet.edge_agent.data import load_npz

    root = Path(path)
    files = sorted(root.glob("*.npz"))
    if not files:
        raise FedfleetError(f"--data {root}: a task directory needs one <task>.npz per task, found none")
    tasks = {f.stem: load_npz(str(f)) for f in files}
    first = tasks[files[0].stem]
    return TaskShards(first.x, first.y, tasks)
