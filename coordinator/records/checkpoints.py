"""What a checkpoint read back on resume must be, field by field, before any of it is used.

A checkpoint file is trusted only as far as the ledger vouches for it: `RunStore.save_checkpoint` books the
SHA-256 of each checkpoint's bytes in the ledger (`checkpoints` table) when it commits the round, and resume
refuses a file whose bytes differ (weights scaled or edited, a round number changed) or that the run never
committed (a file planted with a higher round number). Then `check_checkpoint` validates every field against
what the run's strategy and engine hold, so a damaged or hand-made checkpoint is a one-line `ConfigError`
naming the field, never a traceback or a silent start from a wrong state:

- `round`: an int, the round in the file's own name (`round-NNNN.pt`), at least 1;
- `strategy_state` and `state`: the strategy's tensors, each name present, of the same shape (and kind:
  floating or not) as the run's initial model, and finite; `extra` (the method's own state): its tensors finite;
- `rng`: a state the engine's selection generator accepts;
- `bytes_up`, `bytes_down`: non-negative ints;
- `summary`: the round's evaluation row, only the ledger's `rounds` columns, numbers or None;
- `downlink`: None, or a version between 0 and the round and the reconstruction's tensors, one per name of
  the global state, with its shapes, finite.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedfleet.edge_agent.errors import ConfigError

# the evaluation row a checkpoint carries (the engine's `row`): the ledger `rounds` columns it may set
SUMMARY_FIELDS = ("accuracy", "loss", "wall_s", "selected", "ok", "rejected", "bytes_up", "bytes_down",
                  "accuracy_min", "nodes")


def _fail(where: str, field: str, what: str) -> ConfigError:
    return ConfigError(f"{where}: field {field!r} {what}; the checkpoint is damaged (restore it, or start a new run)")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _tensors(where: str, field: str, got: Any, like: Mapping[str, torch.Tensor]) -> None:
    """`got` holds a finite tensor of the same shape and kind as `like`'s for each of its names, and no other."""
    if not isinstance(got, dict):
        raise _fail(where, field, f"is a {type(got).__name__}, not a dict of tensors")
    missing, extra = sorted(set(like) - set(got)), sorted(set(got) - set(like))
    if missing:
        raise _fail(where, field, f"lacks tensor {missing[0]!r}")
    if extra:
        raise _fail(where, field, f"has tensor {extra[0]!r} the model does not have")
    for name, want in like.items():
        t = got[name]
        if not isinstance(t, torch.Tensor):
            raise _fail(where, f"{field}.{name}", f"is a {type(t).__name__}, not a tensor")
        if tuple(t.shape) != tuple(want.shape) or t.is_floating_point() != want.is_floating_point():
            raise _fail(where, f"{field}.{name}", f"is {t.dtype} {tuple(t.shape)}, the model's is "
                                                 f"{want.dtype} {tuple(want.shape)}")
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise _fail(where, f"{field}.{name}", "has NaN or infinite entries")


def _finite_tensors(where: str, field: str, value: Any, depth: int = 0) -> None:
    """Every floating tensor anywhere in `value` (a method's extra state) is finite."""
    if depth > 16:
        raise _fail(where, field, "is nested too deeply")
    if isinstance(value, torch.Tensor):
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise _fail(where, field, "has NaN or infinite entries")
    elif isinstance(value, dict):
        for k, v in value.items():
            _finite_tensors(where, f"{field}.{k}", v, depth + 1)
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _finite_tensors(where, f"{field}[{i}]", v, depth + 1)


def _rng(where: str, rng: Any) -> None:
    if rng is None:
        return
    probe = np.random.default_rng(0)
    try:
        if not isinstance(rng, dict) or rng.get("bit_generator") != type(probe.bit_generator).__name__:
            raise ValueError("another generator")
        probe.bit_generator.state = rng
    except (TypeError, ValueError, KeyError, OverflowError):
        raise _fail(where, "rng", f"is not a {type(probe.bit_generator).__name__} generator state") from None


def _summary(where: str, summary: Any) -> None:
    if summary is None:
        return
    if not isinstance(summary, dict):
        raise _fail(where, "summary", f"is a {type(summary).__name__}, not the round's evaluation")
    for key, value in summary.items():
        if key not in SUMMARY_FIELDS:
            raise _fail(where, f"summary.{key}", "is not a field of a round's evaluation")
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise _fail(where, f"summary.{key}", f"is a {type(value).__name__}, not a number")
        if key not in ("accuracy", "loss", "accuracy_min") and isinstance(value, float) and not math.isfinite(value):
            raise _fail(where, f"summary.{key}", "is not finite")
        if _is_int(value) and not 0 <= value < 1 << 62:
            raise _fail(where, f"summary.{key}", f"= {value} is out of range")


def _downlink(where: str, downlink: Any, round: int, global_state: Mapping[str, torch.Tensor]) -> None:
    if downlink is None:
        return
    if not isinstance(downlink, dict):
        raise _fail(where, "downlink", f"is a {type(downlink).__name__}, not the downlink's reconstruction")
    version = downlink.get("version")
    # the asynchronous engine advances the downlink once before its first version, so it may be one ahead
    if not _is_int(version) or not 0 <= version <= round + 1:
        raise _fail(where, "downlink.version", f"= {version!r} is not a version between 0 and the round + 1 "
                                               f"({round + 1})")
    like = {k: v.detach().float() for k, v in global_state.items()}
    _tensors(where, "downlink.state", downlink.get("state"), like)


def check_checkpoint(ckpt: dict[str, Any], path: Path, *, file_round: int, run: str, strategy: Any) -> None:
    """Raise a one-line `ConfigError` naming the first field of `ckpt` (read from `path`, whose name says
    round `file_round`) that the run `run` with `strategy` (still at its initial state) cannot resume from."""
    where = f"--resume {path.parent.parent}: {path.name}"
    if ckpt.get("run") != run or ckpt.get("strategy") != strategy.name:
        raise ConfigError(f"{where} is of run {ckpt.get('run')!r} ({ckpt.get('strategy')}), not {run!r} "
                          f"({strategy.name})")
    r = ckpt.get("round")
    if not _is_int(r) or r != file_round or r < 1:
        raise _fail(where, "round", f"= {r!r} is not the round in its name ({file_round})")
    _tensors(where, "strategy_state", ckpt.get("strategy_state"), strategy.state)
    _tensors(where, "state", ckpt.get("state"), strategy.global_state())
    extra = ckpt.get("extra")
    if not isinstance(extra, dict):
        raise _fail(where, "extra", f"is a {type(extra).__name__}, not the method's state")
    _finite_tensors(where, "extra", extra)
    _rng(where, ckpt.get("rng"))
    for key in ("bytes_up", "bytes_down"):
        v = ckpt.get(key, 0)
        if not _is_int(v) or not 0 <= v < 1 << 62:
            raise _fail(where, key, f"= {v!r} is not a byte count")
    _summary(where, ckpt.get("summary"))
    _downlink(where, ckpt.get("downlink"), r, strategy.global_state())
