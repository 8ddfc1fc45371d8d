"""Tasks: what a run learns, on which data, scored how. Every task implements `fedfleet.coordinator.tasks.base.Task`:
classification (digits, MNIST), LoRA fine-tuning, the moving-digits diffusion task, continual schedules, and a
model and data of your own (`custom`)."""

from __future__ import annotations

from typing import Any

from fedfleet.coordinator.tasks.base import NOT_SCORED, RoundContext, Score, Task

__all__ = ["NOT_SCORED", "RoundContext", "Score", "Task", "task_for"]


def task_for(job: Any) -> Task:
    """The task a job runs: its `task` field (with the [model]/[data]/[eval] tables of a custom one), and for
    classification jobs the package its method trains (the LoRA methods fine-tune the LoRA base)."""
    from fedfleet.coordinator.job.config import CUSTOM_TASK, DIFFUSION_TASK
    from fedfleet.coordinator.strategies import package_mode

    mode = package_mode(job)  # ConfigError naming the field when the method and the task do not fit
    if job.task == DIFFUSION_TASK:
        from fedfleet.coordinator.tasks.diffusion import DiffusionTask

        return DiffusionTask(job)
    if mode == "lora":
        from fedfleet.coordinator.tasks.lora import LoraTask

        return LoraTask(job)
    if job.task != CUSTOM_TASK:
        from fedfleet.coordinator.tasks.classification import ClassificationTask

        return ClassificationTask(job)
    from fedfleet.coordinator.tasks.custom import CustomTask

    return CustomTask(job)
