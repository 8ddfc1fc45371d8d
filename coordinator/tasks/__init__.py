"""Tasks: what a run learns, on which data, scored how. Every task implements `fedfleet.coordinator.tasks.base.Task`:
classification (digits, MNIST), LoRA fine-tuning, the moving-digits diffusion task, continual schedules, and a
model and data of your own (`custom`)."""

from __future__ import annotations

from typing import Any

from fedfleet.coordinator.tasks.base import NOT_SCORED, RoundContext, Score, Task

__all__ = ["NOT_SCORED", "RoundContext", "Score", "Task", "task_for"]


def task_for(job: Any) -> Task:
    """The task a job runs (`job.task`, with its [model]/[data]/[eval] tables for a custom one)."""
    from fedfleet.coordinator.tasks.names import CUSTOM

    if job.task == CUSTOM:
        from fedfleet.coordinator.tasks.custom import CustomTask

        task = getattr(job, "_custom_task", None)  # one per job object: its data are loaded once
        if task is None:
            task = CustomTask(job)
            job._custom_task = task
        return task
    raise NotImplementedError(f"task {job.task!r} is not a Task object yet")
