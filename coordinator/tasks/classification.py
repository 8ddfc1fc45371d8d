"""The built-in classification tasks: sklearn's digits and the MNIST 5k file, on the shipped backbone
(`mode = "transfer"`) or on raw pixels (`mode = "full"`), optionally through a continual task schedule.

`ClassificationTask(job)`:
- `shards(agents)`: Dirichlet(alpha) label skew over the training split (IID when alpha = 0), disjoint; with
  `shard_mode = "sampled"` each agent draws its own shard instead (`fedfleet.models.data.sample_shards`: with
  replacement across agents), for fleets larger than the data set can split;
- `package()`: the model package (built once per machine: `fedfleet.models.package_cache`) and its torch
  mirror (`fedfleet.models.mirrors.head.CoordinatorModel`), with the head width the method trains;
- `evaluate(ctx, state)`: accuracy and loss of the global head on the held-out split; a job with a
  [continual] table scores every task seen so far instead (`wrap_strategy` installs the schedule).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fedfleet.coordinator.strategies import Strategy, head_hidden
from fedfleet.coordinator.tasks.base import RoundContext, Score
from fedfleet.edge_agent.errors import ConfigError
from fedfleet.edge_agent.learners import LocalData
from fedfleet.models import data as datasets


def split(job: Any) -> tuple[datasets.Dataset, datasets.Dataset]:
    """(train, test) of the job's data set: 80/20, shuffled by the job's seed."""
    full = datasets.digits() if job.dataset == "digits" else datasets.mnist5k()
    return datasets.split(full, 0.2, seed=job.seed)


def partition(job: Any, train: Any, agents: int, labels: Any, what: str) -> list[Any]:
    """Index arrays of each agent's share of `train` (Dirichlet over `labels`), or with `shard_mode = "sampled"`
    each agent's own draw from it; a one-line ConfigError when the fleet cannot be served."""
    sampled = getattr(job, "shard_mode", "partition") == "sampled"
    size = int(getattr(job, "shard_size", 0))
    if sampled and size > len(train):
        raise ConfigError(f"field 'shard_size' = {size} exceeds the {len(train)} training {what} of {job.dataset}")
    try:
        if sampled:
            return datasets.sample_shards(labels, agents, job.alpha, job.seed, size)
        return datasets.partition(labels, agents, job.alpha, job.seed)
    except ValueError as exc:
        hint = "" if sampled else "; or set shard_mode = 'sampled' (each agent draws its own, overlapping shard)"
        raise ConfigError(f"field 'agents' = {agents} on {job.dataset} ({len(train)} training {what}): "
                          f"{exc}{hint}") from None


def shard_summary(job: Any, n_train: int, agents: int) -> dict[str, Any]:
    """How the agents' shards were made, for the run's summary: mode, samples per agent, and the sampling rule."""
    if getattr(job, "shard_mode", "partition") != "sampled":
        return {"mode": "partition", "train_samples": n_train, "disjoint": True}
    return {"mode": "sampled", "train_samples": n_train,
            "per_agent": datasets.sampled_shard_size(n_train, agents, int(getattr(job, "shard_size", 0))),
            "disjoint": False, "rule": "each agent draws its own shard: with replacement across agents (shards "
            "overlap), without replacement within one"}


class ClassificationTask:
    """See the module docstring."""

    score_name = "accuracy"

    def __init__(self, job: Any) -> None:
        self.job = job
        self.name = f"{job.dataset}-classification"
        self._model: Any = None
        self._test: datasets.Dataset | None = None
        self._scorer: Any = None  # a continual schedule's evaluator, once the strategy is wrapped
        self._shards: dict[str, Any] | None = None  # how the shards were made (`shard_summary`), once they are

    @property
    def test(self) -> datasets.Dataset:
        if self._test is None:
            _, self._test = split(self.job)
        return self._test

    def shards(self, agents: int) -> list[LocalData]:
        train, self._test = split(self.job)
        parts = partition(self.job, train, agents, train.y, "samples")
        self._shards = shard_summary(self.job, len(train), agents)
        return [LocalData(train.x[p], train.y[p]) for p in parts]

    def package(self) -> tuple[bytes, Any]:
        from fedfleet.edge_agent.errors import ModelError
        from fedfleet.models import package_cache
        from fedfleet.models.mirrors.head import CoordinatorModel

        job = self.job
        spec = {"seed": job.seed, "head_hidden": head_hidden(job), "dataset": job.dataset,
                "head_layers": job.hidden_layers}
        blob = package_cache.package(job.mode, **spec)
        try:
            self._model = CoordinatorModel(blob)
        except ModelError:  # a damaged cached copy: build it again (a fresh build that fails raises)
            blob = package_cache.package(job.mode, **spec, refresh=True)
            self._model = CoordinatorModel(blob)
        return blob, self._model

    def wrap_strategy(self, strategy: Strategy) -> Strategy:
        from fedfleet.coordinator.tasks import continual

        schedule = continual.schedule_of(self.job)
        if schedule is None:
            return strategy
        self.job.rounds = schedule.total_rounds  # a continual job runs its schedule
        wrapped = continual.ContinualStrategy(strategy, schedule)
        self._scorer = continual.ContinualEvaluator(wrapped, self._mirror(), self.test)
        return wrapped

    def evaluate(self, ctx: RoundContext, state: dict[str, Any]) -> Score:
        if self._scorer is not None:
            return self._scorer(ctx, state)
        return self._mirror().evaluate(state, self.test.x, self.test.y)

    def summary(self, run_dir: Path, state: dict[str, Any]) -> dict[str, Any] | None:
        """Sampled shards are said in the summary (`shards`: how they were drawn); partitioned ones add nothing."""
        if self._shards is not None and self._shards["mode"] == "sampled":
            return {"shards": self._shards}
        return None

    def _mirror(self) -> Any:
        if self._model is None:
            self.package()
        return self._model
