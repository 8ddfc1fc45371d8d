"""What an agent carries from one task to the next: state of one run, and nothing across runs.

Learners keep state between rounds (MoNNA's momentum, FZooS's query history) and the uplink keeps FedZip's
error-feedback residuals. All of it belongs to one run: a task of a new run starts from fresh learners and
empty residuals, whatever the agent did before.

A resumed coordinator re-runs the round it was killed in, with the same run id. An agent that already took
that round's task starts the new attempt from the state it had before the first one, so the rerun computes
what the first attempt did and the run stays reproducible. Snapshots are kept for the latest round only.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

Key = tuple[int, int]  # (round, phase)


class RunState:
    """Per-run learners and error-feedback state of one agent."""

    def __init__(self) -> None:
        self.run: str | None = None
        self.learners: dict[str, Any] = {}
        self.feedback: dict[str, Any] = {}  # uplink error-feedback state per method
        self._before: dict[Key, tuple[dict[str, Any], dict[str, Any]]] = {}

    def begin(self, run: str, round: int, phase: int) -> bool:
        """Enter the task (run, round, phase) before its learner runs. Returns True when this is a new attempt
        at a task already taken in this run (its state was rolled back to before the first attempt)."""
        key = (round, phase)
        rerun = False
        if run != self.run:
            self.run, self.learners, self.feedback, self._before = run, {}, {}, {}
        elif key in self._before:
            self.learners, self.feedback = copy.deepcopy(self._before[key])
            self._before = {k: v for k, v in self._before.items() if k < key}
            rerun = True
        self._before = {k: v for k, v in self._before.items() if k[0] == round}
        self._before[key] = copy.deepcopy((self.learners, self.feedback))
        return rerun

    def learner(self, name: str, create: Callable[[str], Any]) -> Any:
        """This run's learner for method `name` (made on first use)."""
        if name not in self.learners:
            self.learners[name] = create(name)
        return self.learners[name]
