"""What one untrusted result may contribute to an average: its weight and its size, and what an aggregate may
do to the global model. Shared by every update-averaging strategy (the round engine applies it to each phase's
results before `aggregate`, and checks the aggregate after it).

Weight (the sample count a strategy weights a result by): the coordinator never takes the agent's word
in the result. It uses the count the agent announced in its signed status *when it was selected* (frozen
at dispatch, so it cannot be raised mid-round), or the result's own count if that is smaller, and caps it
at `weight_cap` times the *low* median count announced by the agents tasked in that phase (the lower of the
two middle values: with two agents, the smaller one, so one liar cannot raise the cap). One agent claiming
2**31 samples therefore weighs at most `weight_cap` typical agents. Methods that weight by more than the
sample count (GGEUR's synthetic points, its census) cap those against the same limit.

Size (the update-norm bound): each result's update is the result itself for strategies whose results are
deltas, or the result minus the tensors its task sent for strategies whose results are models (see
`Strategy.update_kind`). An update whose L2 norm exceeds `norm_bound` times the reference is refused with
`rejected:norm_bound`. The reference is the median of the pool: this phase's updates together with the last
`window` accepted norms of the same phase index. With fewer than 3 norms in the pool (the first round, a
fleet of 1 to 3) the pool is filled up to 3 with the cold-start reference `cold` (the scale of the model the
agents started from: its norm, or 0.1 x sqrt(entries) when that is larger, and at least `COLD_FLOOR`), so one
or two results never set their own bound.

Staleness: an agent that comes back after missing rounds is judged against what the same staleness gives an
honest agent: the largest reference of the rounds since its last accepted update (running medians shrink
while a model converges; its first update, from an older start, is larger). A streak of refusals of one agent
is kept (`streaks`) and shown in the progress line.

Aggregates (`AggregateCheck`): after a phase's aggregate the global state must be finite and must not have
moved by more than `EXPLODE` times max(its previous norm, 1); otherwise the strategy's state is put back as it
was before the aggregate and the engine books why.

`norm_bound = 0` turns the norm bound off (the aggregate check stays).
"""

from __future__ import annotations

import copy
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from fedfleet.coordinator.strategies._robust import low_median
from fedfleet.coordinator.strategies.base import ClientResult

COLD_FLOOR = 1.0  # the least cold-start reference (a zero-initialised model has scale 0)
COLD_PER_ENTRY = 0.1  # ... and at least this much per updated entry (the validator applies it)
EXPLODE = 100.0  # an aggregate may move the model by at most this many times max(its norm, 1)
MEDIANS_KEPT = 8192  # per-round references remembered per phase index (for returning agents)


@dataclass
class Screened:
    kept: list[ClientResult]
    refused: list[tuple[ClientResult, float, float]]  # (result, its update norm, the bound it exceeded)
    bound: float  # the bound this phase for an up-to-date agent (inf when it did not act)
    by_method: list[tuple[ClientResult, str, str]] = field(default_factory=list)  # (result, reason, detail)


class UpdateGuard:
    def __init__(self, *, norm_bound: float = 10.0, weight_cap: float = 4.0, window: int = 64) -> None:
        self.norm_bound = float(norm_bound)
        self.weight_cap = float(weight_cap)
        self._history: dict[int, deque[float]] = {}
        self._window = window
        self._refs: dict[int, deque[tuple[int, float]]] = {}  # phase -> (round, reference) of past rounds
        self._last_ok: dict[tuple[int, str], int] = {}  # (phase, agent) -> round of its last accepted update
        self.streaks: dict[str, int] = {}  # agent -> refusals by the norm bound in a row (0 entries dropped)

    def weight_limit(self, announced_all: Iterable[int]) -> int | None:
        """The cap on any result's weight in a phase (None: no cap), from the counts announced by the agents
        tasked in it; computed once per phase, not per result."""
        counts = [c for c in announced_all if c > 0]
        if not counts or self.weight_cap <= 0:
            return None
        return int(self.weight_cap * low_median(counts)) or 1

    def weight(self, claimed: int, announced: int | None, announced_all: Iterable[int] | None = None, *,
               limit: int | None = None) -> int:
        """The sample weight to use for one result (at least 1): under `limit`, or under the limit of
        `announced_all` when that is given."""
        if announced_all is not None:
            limit = self.weight_limit(announced_all)
        w = claimed if announced is None or announced <= 0 else min(claimed, announced)
        if limit is not None:
            w = min(w, limit)
        return max(1, int(w))

    @staticmethod
    def update_norm(tensors: dict[str, np.ndarray], reference: dict[str, np.ndarray] | None) -> float:
        total = 0.0
        for name, t in tensors.items():
            v = np.asarray(t, np.float64)
            if reference is not None and name in reference and np.shape(reference[name]) == v.shape:
                v = v - np.asarray(reference[name], np.float64)
            total += float(np.dot(v.ravel(), v.ravel()))
        return float(np.sqrt(total)) if np.isfinite(total) else float("inf")

    def _stale_reference(self, phase: int, agent: str, r: int, now: float) -> float:
        """The reference an agent is judged against: `now`, or for an agent whose last accepted update is older
        than the last round, the largest reference since then (never seen: the largest remembered)."""
        last = self._last_ok.get((phase, agent))
        if last is not None and last >= r - 1:
            return now
        refs = [ref for rr, ref in self._refs.get(phase, ()) if last is None or rr > last]
        return max([now, *refs])

    def screen(self, phase: int, results: list[ClientResult], norms: list[float], *, cold: float = COLD_FLOOR,
               r: int = 0) -> Screened:
        """Split `results` (with their update norms) into kept and refused; remember the kept norms. `cold`: the
        cold-start reference (the scale of the model the updates start from); `r`: the round."""
        history = self._history.setdefault(phase, deque(maxlen=self._window))
        pool = list(history) + [n for n in norms if np.isfinite(n)]
        cold = max(float(cold) if np.isfinite(cold) else COLD_FLOOR, COLD_FLOOR)
        pool += [cold] * max(0, 3 - len(pool))
        reference = max(float(np.median(pool)), 1e-12)
        on = self.norm_bound > 0
        bound = self.norm_bound * reference if on else float("inf")
        kept, refused = [], []
        for res, n in zip(results, norms):
            limit = self.norm_bound * self._stale_reference(phase, res.agent, r, reference) if on else float("inf")
            if np.isfinite(n) and n <= limit:
                kept.append(res)
                history.append(n)
                self._last_ok[(phase, res.agent)] = r
                self.streaks.pop(res.agent, None)
            else:
                refused.append((res, n, limit))
                self.streaks[res.agent] = self.streaks.get(res.agent, 0) + 1
        self._refs.setdefault(phase, deque(maxlen=MEDIANS_KEPT)).append((r, reference))
        return Screened(kept, refused, bound)

    def streak_note(self, least: int = 2) -> str:
        """'norm-bound refusals in a row: a 5, b 3' for agents refused at least `least` times in a row ('' if none)."""
        worst = sorted(((n, a) for a, n in self.streaks.items() if n >= least), reverse=True)[:5]
        return "norm-bound refusals in a row: " + ", ".join(f"{a} {n}" for n, a in worst) if worst else ""


# ---------------------------------------------------------------- the aggregate
def state_norm(state: dict[str, Any]) -> float:
    total = 0.0
    for v in state.values():
        a = v.detach().double() if isinstance(v, torch.Tensor) else torch.as_tensor(np.asarray(v, np.float64))
        total += float((a * a).sum())
    return float(np.sqrt(total))


class _Nested:
    """The snapshot of a strategy held inside another (a continual job's inner method)."""

    def __init__(self, obj: Any) -> None:
        self.obj = obj
        self.saved = {k: _snapshot_value(v) for k, v in vars(obj).items()}

    def restore(self) -> Any:
        vars(self.obj).update({k: v.restore() if isinstance(v, _Nested) else v for k, v in self.saved.items()})
        return self.obj


def _snapshot_value(v: Any) -> Any:
    if hasattr(v, "global_state") and hasattr(v, "aggregate") and hasattr(v, "__dict__"):
        return _Nested(v)
    if isinstance(v, torch.Tensor):
        return v.detach().clone()
    if isinstance(v, np.ndarray):
        return v.copy()
    if isinstance(v, (dict, list, set, tuple, deque)):
        return copy.deepcopy(v)
    return v  # scalars (immutable) and helper objects (caches, settings): kept as they are


class AggregateCheck:
    """Snapshot a strategy before an aggregate (`before`) and judge the state after it (`verdict`); `restore`
    puts the snapshot back. The snapshot holds the strategy's tensors, arrays and containers (its method state);
    helper objects (basis caches, settings) are shared, not copied."""

    def __init__(self, strategy: Any) -> None:
        self.strategy = strategy
        self._saved = _Nested(strategy)
        self._old = {k: v.detach().clone() for k, v in strategy.global_state().items()}

    def verdict(self) -> str | None:
        """None when the new global state is fine, else why it is refused."""
        new = self.strategy.global_state()
        for name, v in new.items():
            if not bool(torch.isfinite(v).all()):
                return f"the aggregate left {name} non-finite"
        old_norm = state_norm(self._old)
        change = state_norm({k: new[k].double() - self._old[k].double() for k in new
                             if k in self._old and new[k].shape == self._old[k].shape})
        limit = EXPLODE * max(old_norm, 1.0)
        if not np.isfinite(change) or change > limit:
            return f"the aggregate moved the model by {change:.4g}, beyond {limit:.4g} ({EXPLODE:g} x max(|model|, 1))"
        return None

    def restore(self) -> None:
        self._saved.restore()
