"""A task from parts already in hand: a model package, its torch mirror, the agents' data and a held-out set.

For Python callers that build their own package (a benchmark's linear head, a notebook's experiment):
`build_run(job, ..., task=PackagedTask(blob, mirror, shards, test))`. The mirror scores the global state
with `mirror.evaluate(state, x, y) -> (score, loss)`, as `fedfleet.models.mirrors.head.CoordinatorModel` does;
without a mirror or a held-out set (`None`), rounds are not scored (NaN).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fedfleet.coordinator.strategies import Strategy
from fedfleet.coordinator.tasks.base import NOT_SCORED, RoundContext, Score
from fedfleet.edge_agent.learners import LocalData


class PackagedTask:
    score_name = "accuracy"

    def __init__(self, package: bytes, model: Any, shards: list[LocalData], test: Any, *,
                 name: str = "packaged") -> None:
        self.name = name
        self._package, self.model, self._shards, self.test = package, model, list(shards), test

    def package(self) -> tuple[bytes, Any]:
        return self._package, self.model

    def shards(self, agents: int) -> list[LocalData]:
        if agents != len(self._shards):
            raise ValueError(f"this task holds {len(self._shards)} agents' data, not {agents}")
        return self._shards

    def evaluate(self, ctx: RoundContext, state: dict[str, Any]) -> Score:
        if self.model is None or self.test is None:
            return NOT_SCORED
        return self.model.evaluate(state, self.test.x, self.test.y)

    def summary(self, run_dir: Path, state: dict[str, Any]) -> dict[str, Any] | None:
        return None

    def wrap_strategy(self, strategy: Strategy) -> Strategy:
        return strategy
