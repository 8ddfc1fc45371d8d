"""Task "custom": a model and data of your own, from a job's [model], [data] and [eval] tables.

- [model]: the frozen backbone and the trainable head (`fedfleet.models.own_model` owns and checks its keys);
- [data]: the training data the coordinator holds for demo and emulated runs, and for int8 calibration:
  `path` (an `.npz` with x and y, a `.csv` with a `label` column, or an image folder with one subfolder per
  class) or `loader = "loader.py:load"` (returns (x, y)); `format` and `label` as in
  `fedfleet.edge_agent.data.load_source`. It is split across the job's agents by Dirichlet(`alpha`) label
  skew (the job's alpha unless the table sets one; 0: IID), or `shards` = a list of per-agent files or a glob
  pattern ("shards/agent-*.npz", sorted) gives agent i its own file;
- [eval]: held-out data by the same keys (`path` or `loader`), else `holdout` (0.2) of [data] kept back
  (seeded), and `metric`: "accuracy" (default) or "macro_f1".
Relative paths are resolved against the job file's folder. Every problem is a one-line ConfigError naming
the table and key, raised when the task is made (at job load, before any broker or agent starts), also for
a method that cannot train this model (`check_method`).
"""

from __future__ import annotations

import glob
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedfleet.coordinator.tasks.base import RoundContext, Score
from fedfleet.edge_agent.data import SOURCE_KEYS, check, load_path, load_source
from fedfleet.edge_agent.errors import ConfigError
from fedfleet.edge_agent.learners import LocalData
from fedfleet.edge_agent.nn import mlp
from fedfleet.models import data as datasets
from fedfleet.models import own_model

__all__ = ["CustomTask", "METRICS", "check_method", "macro_f1"]

METRICS = ("accuracy", "macro_f1")
DATA_KEYS = (*SOURCE_KEYS, "alpha", "shards")
EVAL_KEYS = (*SOURCE_KEYS, "metric", "holdout")
DEFAULT_HOLDOUT = 0.2
# methods whose maths needs something a custom package does not have
REFUSED = {
    "fedit": "a LoRA package (a frozen pre-trained MLP with adapters)",
    "flora": "a LoRA package (a frozen pre-trained MLP with adapters)",
    "lora_fair": "a LoRA package (a frozen pre-trained MLP with adapters)",
    "fot": "a [continual] task schedule, which a custom task does not run",
}
ZO_METHODS = ("fedzo", "fzoos")


def check_method(job: Any, head_sizes: list[int]) -> None:
    """ConfigError naming the field when the job's method cannot train a custom model with this head."""
    if job.method in REFUSED:
        raise ConfigError(f"field 'method': {job.method!r} needs {REFUSED[job.method]}; a custom model trains "
                          "with fedavg, fedzo, fzoos, ferret, fedamd, monna, robust_fedavg or ggeur")
    if getattr(job, "continual", None):
        raise ConfigError("field 'continual': a custom task has no continual schedule; remove the [continual] table")
    if job.method == "ggeur" and len(head_sizes) != 2:
        raise ConfigError("field 'method': 'ggeur' trains a linear head; set [model] head_hidden = 0")
    if job.method in ZO_METHODS:
        from fedfleet.coordinator.strategies import method_config

        names = method_config(job).get("zo_tensors") or []
        layout = [n for n, _ in mlp.layout(head_sizes)]
        missing = [n for n in names if n not in layout]
        if missing:
            last = len(head_sizes) - 2
            raise ConfigError(f"[method] field 'zo_tensors': {missing} are not in this head {layout}; set "
                              f"zo_tensors = [\"fc{last}.weight\", \"fc{last}.bias\"]")


def macro_f1(pred: np.ndarray, y: np.ndarray, classes: int) -> float:
    """Unweighted mean over the classes present in `y` or `pred` of the per-class F1."""
    scores = []
    for c in range(classes):
        tp = int(((pred == c) & (y == c)).sum())
        fp = int(((pred == c) & (y != c)).sum())
        fn = int(((pred != c) & (y == c)).sum())
        if tp + fp + fn:
            scores.append(2 * tp / (2 * tp + fp + fn))
    return float(np.mean(scores)) if scores else 0.0


def _table(raw: dict[str, Any] | None, keys: tuple[str, ...], where: str) -> dict[str, Any]:
    table = dict(raw or {})
    unknown = sorted(set(table) - set(keys))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; known: {', '.join(keys)}")
    return table


class CustomTask:
    """The `Task` of a job with [model], [data] and [eval] (see the module docstring)."""

    name = "custom"

    def __init__(self, job: Any) -> None:
        self.job = job
        self.base_dir = Path(job.base_dir or ".")
        self.spec = own_model.parse(job.model, self.base_dir)
        self.data_table = _table(job.data, DATA_KEYS, "[data]")
        self.eval_table = _table(job.eval, EVAL_KEYS, "[eval]")
        self.metric = self.eval_table.get("metric", "accuracy")
        if self.metric not in METRICS:
            raise ConfigError(f"[eval]: field 'metric' must be one of {', '.join(METRICS)}, got {self.metric!r}")
        self.score_name = "macro-F1" if self.metric == "macro_f1" else "acc"  # progress lines' label
        hidden = [self.spec.head_hidden] if self.spec.head_hidden else []
        check_method(job, [1, *hidden, self.spec.classes])  # the feature width is known once the package is built
        self.alpha = self._alpha()
        self.train, self.test = self._load()
        self._package: tuple[bytes, Any] | None = None

    # ---- data
    def _alpha(self) -> float:
        alpha = self.data_table.get("alpha", self.job.alpha)
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not alpha >= 0:
            raise ConfigError(f"[data]: field 'alpha' must be a number >= 0 (0: IID shards), got {alpha!r}")
        return float(alpha)

    def _fit(self, data: LocalData, where: str) -> LocalData:
        return check(data, where, self.spec.input_shape, self.spec.classes)

    def _shard_files(self) -> list[str]:
        raw = self.data_table["shards"]
        if isinstance(raw, str):
            files = sorted(glob.glob(str(self.base_dir / raw)))
            if not files:
                raise ConfigError(f"[data] shards: the pattern {raw!r} matches no file under {self.base_dir}")
            return files
        if isinstance(raw, list) and raw and all(isinstance(f, str) for f in raw):
            return [str(self.base_dir / f) for f in raw]
        raise ConfigError(f"[data]: field 'shards' must be a glob pattern or a list of files, got {raw!r}")

    def _load(self) -> tuple[LocalData, LocalData]:
        shape = self.spec.input_shape
        self.shard_data: list[LocalData] | None = None
        if "shards" in self.data_table:
            fmt, label = self.data_table.get("format"), self.data_table.get("label", "label")
            self.shard_data = [self._fit(load_path(f, fmt=fmt, label=label, shape=shape, where="[data] shards"),
                                         f"[data] shards {Path(f).name}") for f in self._shard_files()]
            train = LocalData(np.concatenate([d.x for d in self.shard_data]),
                              np.concatenate([d.y for d in self.shard_data]))
        elif not self.data_table:
            raise ConfigError("[data]: the table is missing; name the training data with path = ... or "
                              "loader = \"loader.py:load\"")
        else:
            source = {k: v for k, v in self.data_table.items() if k in SOURCE_KEYS}
            train = self._fit(load_source(source, self.base_dir, "[data]", shape), "[data]")
        if self.spec.input_shape is None:  # a ready backbone file: its own shape decides
            self.spec.input_shape = list(train.x.shape[1:])
        source = {k: v for k, v in self.eval_table.items() if k in SOURCE_KEYS}
        if source:
            if "holdout" in self.eval_table:
                raise ConfigError("[eval]: field 'holdout' applies only without 'path'/'loader'; remove one")
            return train, self._fit(load_source(source, self.base_dir, "[eval]", self.spec.input_shape), "[eval]")
        frac = self.eval_table.get("holdout", DEFAULT_HOLDOUT)
        if isinstance(frac, bool) or not isinstance(frac, (int, float)) or not 0 < frac < 1:
            raise ConfigError(f"[eval]: field 'holdout' must be a fraction in (0, 1), got {frac!r}")
        if self.shard_data is not None:
            raise ConfigError("[eval]: with [data] shards the held-out data must be named: path = ... or loader = ...")
        kept, held = datasets.split(datasets.Dataset(train.x, train.y), float(frac), seed=self.job.seed)
        return LocalData(kept.x, kept.y), LocalData(held.x, held.y)

    def shards(self, agents: int) -> list[LocalData]:
        if self.shard_data is not None:
            if len(self.shard_data) != agents:
                raise ConfigError(f"[data] shards: {len(self.shard_data)} files for {agents} agents; give one file "
                                  "per agent or set [job] agents to match")
            return list(self.shard_data)
        try:
            parts = datasets.partition(self.train.y, agents, self.alpha, self.job.seed)
        except ValueError as exc:
            raise ConfigError(f"[data]: {len(self.train)} training samples over {agents} agents: {exc}") from None
        return [LocalData(self.train.x[p], self.train.y[p]) for p in parts]

    # ---- model
    def package(self) -> tuple[bytes, Any]:
        from fedfleet.edge_agent.errors import ModelError
        from fedfleet.models.mirrors.head import CoordinatorModel

        if self._package is None:
            runtime = self.job.runtime
            blob = own_model.build(self.spec, self.train.x, runtime=runtime, seed=self.job.seed)
            mirror_runtime = "litert" if self.spec.tflite and not self.spec.onnx else "onnxruntime"
            try:
                cmodel = CoordinatorModel(blob, runtime=mirror_runtime)
            except ModelError:  # a damaged cached copy: build it again (a fresh build that fails raises)
                blob = own_model.build(self.spec, self.train.x, runtime=runtime, seed=self.job.seed, refresh=True)
                cmodel = CoordinatorModel(blob, runtime=mirror_runtime)
            cmodel.score_name = self.score_name  # progress lines name the score from the model (run.bind_model)
            self._package = (blob, cmodel)
        return self._package

    @torch.no_grad()
    def evaluate(self, ctx: RoundContext, state: dict[str, Any]) -> Score:
        _, cmodel = self.package()
        feats = torch.from_numpy(cmodel.edge.features(self.test.x, "custom-eval"))
        logits = cmodel.load_head(state)(feats)
        target = torch.as_tensor(self.test.y, dtype=torch.long)
        loss = float(torch.nn.functional.cross_entropy(logits, target))
        pred = logits.argmax(dim=1).numpy()
        if self.metric == "macro_f1":
            return macro_f1(pred, self.test.y, self.spec.classes), loss
        return float((pred == self.test.y).mean()), loss

    def summary(self, run_dir: Path, state: dict[str, Any]) -> dict[str, Any] | None:
        if self.metric == "accuracy":
            return None
        score, _ = self.evaluate(RoundContext("summary", 0, 0, run_dir), state)
        return {f"final_{self.metric}": score}

    def wrap_strategy(self, strategy: Any) -> Any:
        return strategy
