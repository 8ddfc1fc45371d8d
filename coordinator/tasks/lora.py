"""LoRA fine-tuning of the pre-trained base on feature-shifted data (the LoRA methods' task).

Agent i holds domain i mod 6 of the shifted data set (`fedfleet.models.shifts`); the test split is scored
under every domain. The package is the LoRA base (`fedfleet.models.lora_base`): its widths are fixed by its
pre-training, so the job's `hidden` does not apply.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fedfleet.coordinator.strategies import Strategy
from fedfleet.coordinator.tasks.base import RoundContext, Score
from fedfleet.edge_agent.errors import ConfigError
from fedfleet.edge_agent.learners import LocalData
from fedfleet.models import data as datasets


class LoraTask:
    score_name = "accuracy"

    def __init__(self, job: Any) -> None:
        self.job = job
        self.name = f"{job.dataset}-lora"
        self._model: Any = None
        self._test: datasets.Dataset | None = None

    def _split(self, agents: int) -> list[Any]:
        from fedfleet.models import shifts

        parts, self._test, _ = shifts.shifted_shards(self.job.dataset, agents, self.job.alpha, self.job.seed)
        return parts

    @property
    def test(self) -> datasets.Dataset:
        if self._test is None:
            self._split(self.job.agents)
        assert self._test is not None
        return self._test

    def shards(self, agents: int) -> list[LocalData]:
        if getattr(self.job, "shard_mode", "partition") != "partition":
            raise ConfigError("field 'shard_mode': the LoRA methods' shifted shards are partitioned; 'sampled' "
                              "shards are drawn for the classification task's own package modes (transfer, full)")
        return [LocalData(p.x, p.y) for p in self._split(agents)]

    def package(self) -> tuple[bytes, Any]:
        from fedfleet.models.lora_base import build_lora_package
        from fedfleet.models.mirrors.lora_model import LoraCoordinatorModel

        blob = build_lora_package(self.job.dataset, seed=self.job.seed)
        self._model = LoraCoordinatorModel(blob)
        return blob, self._model

    def wrap_strategy(self, strategy: Strategy) -> Strategy:
        from fedfleet.coordinator.tasks import continual

        continual.schedule_of(self.job)  # refuses a schedule for a method that cannot run one
        return strategy

    def evaluate(self, ctx: RoundContext, state: dict[str, Any]) -> Score:
        if self._model is None:
            self.package()
        return self._model.evaluate(state, self.test.x, self.test.y)

    def summary(self, run_dir: Path, state: dict[str, Any]) -> dict[str, Any] | None:
        return None
