"""What one untrusted result may contribute to an average: its weight and its size. Shared by every
update-averaging strategy (the round engine applies it to each phase's results before `aggregate`).

Weight (the sample count a strategy weights a result by): the coordinator never takes the agent's word
in the result. It uses the count the agent announced in its signed status *when it was selected* (frozen
at dispatch, so it cannot be raised mid-round), or the result's own count if that is smaller, and caps it
at `weight_cap` times the median count announced by the agents tasked in that phase. One agent claiming
2**31 samples therefore weighs at most `weight_cap` typical agents.

Size (the update-norm bound): each result's update is the result itself for strategies whose results are
deltas, or the result minus the tensors its task sent for strategies whose results are models (see
`Strategy.update_kind`). An update whose L2 norm exceeds `norm_bound` times the median norm of the pool
(this phase's updates together with the last `window` accepted norms of the same phase index) is refused
with `rejected:norm_bound`. The median needs at least 3 norms in the pool; with fewer the bound does not
act. `norm_bound = 0` turns it off.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from fedfleet.coordinator.strategies.base import ClientResult


@dataclass
class Screened:
    kept: list[ClientResult]
    refused: list[tuple[ClientResult, float, float]]  # (result, its update norm, the bound it exceeded)
    bound: float  # the bound this phase (inf when it did not act)


class UpdateGuard:
    def __init__(self, *, norm_bound: float = 10.0, weight_cap: float = 4.0, window: int = 64) -> None:
        self.norm_bound = float(norm_bound)
        self.weight_cap = float(weight_cap)
        self._history: dict[int, deque[float]] = {}
        self._window = window

    def weight_limit(self, announced_all: Iterable[int]) -> int | None:
        """The cap on any result's weight in a phase (None: no cap), from the counts announced by the agents
        tasked in it; computed once per phase, not per result."""
        counts = [c for c in announced_all if c > 0]
        if not counts or self.weight_cap <= 0:
            return None
        return int(self.weight_cap * float(np.median(counts))) or 1

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
        return float(np.sqrt(total))

    def screen(self, phase: int, results: list[ClientResult], norms: list[float]) -> Screened:
        """Split `results` (with their update norms) into kept and refused; remember the kept norms."""
        history = self._history.setdefault(phase, deque(maxlen=self._window))
        pool = list(history) + [n for n in norms if np.isfinite(n)]
        bound = float("inf")
        if self.norm_bound > 0 and len(pool) >= 3:
            bound = self.norm_bound * max(float(np.median(pool)), 1e-12)
        kept, refused = [], []
        for r, n in zip(results, norms):
            if np.isfinite(n) and n <= bound:
                kept.append(r)
                history.append(n)
            else:
                refused.append((r, n, bound))
        return Screened(kept, refused, bound)
