"""Validation of one phase's results, on the engine thread: what a complete, authenticated, schema-checked result
(the receive path checked every field's type and range) must satisfy against the open phase, and what it may
contribute.

`Validator.check` refuses (a `ProtocolError` with its `Refusal`), in this order: another run; a round or phase not
open yet; a closed one (`late` when the agent was booked late there, else `stale_round`); an agent with no open task;
a second result; a codec or layout other than the task's; a payload that does not decode under the task's codec
within `max_result_bytes`; NaN or Inf values; and whatever the strategy's own `check` refuses. The result's weight
is the update guard's (coordinator/engine/update_guard.py), under the phase's cap.

`Validator.bound` applies, when the phase closes, the method's own bounds over the whole phase
(`Strategy.screen`: robust per-kind references for statistics, sketches and counts) and then the update-norm
bound, whose cold-start reference is the scale of the model the updates start from (its norm, or
COLD_PER_ENTRY per entry when that is larger: a zero-initialised model).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from fedfleet.coordinator.engine.update_guard import COLD_PER_ENTRY, Screened, UpdateGuard
from fedfleet.coordinator.strategies import ClientResult, Strategy, TaskSpec
from fedfleet.coordinator.strategies.base import to_numpy
from fedfleet.edge_agent.errors import ProtocolError, Refusal
from fedfleet.edge_agent.wire import codecs


class Validator:
    """The checks of one phase (round `r`, phase `phase`) of run `run`, whose tasks are `tasks`.

    `late`: (round, phase) -> agents booked late there, for phases already closed (read when a result for one
    arrives). `announced`: the sample counts the tasked agents announced when they were selected.
    """

    def __init__(self, *, run: str, r: int, phase: int, tasks: Mapping[str, TaskSpec], strategy: Strategy,
                 guard: UpdateGuard, max_result_bytes: int, announced: Mapping[str, int],
                 late: Mapping[tuple[int, int], set[str]]) -> None:
        self.run, self.round, self.phase = run, r, phase
        self.tasks = tasks
        self.strategy = strategy
        self.guard = guard
        self.max_result_bytes = max_result_bytes
        self.announced = dict(announced)
        self.weight_limit = guard.weight_limit(self.announced.values())  # once per phase
        self._late = late
        self._memo: dict[tuple[int, Any], tuple[Any, Any]] = {}  # `_per_phase`: holds the values it keys

    def _per_phase(self, value: Any, derive: Callable[[Any], Any]) -> Any:
        """`derive(value)` once per phase for a value the tasks share (a strategy gives every agent the same codec and
        layout objects), not once per result."""
        key = (id(value), derive.__code__)
        hit = self._memo.get(key)
        if hit is None or hit[0] is not value:
            hit = self._memo[key] = (value, derive(value))
        return hit[1]

    def check(self, agent: str, header: dict[str, Any], body: bytes, task: TaskSpec | None, *,
              duplicate: bool) -> ClientResult:
        """The result `agent` sent (`task`: its open task in this phase, None when it has none; `duplicate`: its slot
        already holds a valid result). Raises ProtocolError with the refusal's reason."""
        r, phase = self.round, self.phase
        if header["run"] != self.run:
            raise ProtocolError(Refusal.WRONG_RUN, f"result for run {header['run'][:64]!r}")
        hr, hp = header["round"], header.get("phase", 0)
        if hr > r or (hr == r and hp > phase):
            raise ProtocolError(Refusal.FUTURE_ROUND, f"result for round {hr}.{hp} while {r}.{phase} is open")
        if hr < r or hp < phase:
            if agent in self._late.get((hr, hp), set()):
                raise ProtocolError(Refusal.LATE, "")
            raise ProtocolError(Refusal.STALE_ROUND, f"result for round {hr}.{hp} while {r}.{phase} is open")
        if task is None:
            raise ProtocolError(Refusal.NOT_SELECTED, f"{agent} has no task in round {r}.{phase}")
        if duplicate:
            raise ProtocolError(Refusal.DUPLICATE, f"second result from {agent} in round {r}.{phase}")
        want = self._per_phase(task.uplink_codec, _as_json)
        if header["codec"] != want:
            raise ProtocolError(Refusal.CODEC, f"result codec {str(header['codec'])[:120]} is not the task's {want}")
        layout = codecs.normalize_layout(header["layout"])
        if layout != self._per_phase(task.expect, lambda e: [(n, tuple(s)) for n, s in e]):
            raise ProtocolError(Refusal.SHAPE, "result layout differs from the task's expected layout")
        tensors = codecs.decode(body, layout, want, max_bytes=self.max_result_bytes)  # the task's spec
        if not codecs.all_finite(tensors):
            raise ProtocolError(Refusal.NONFINITE, "result holds NaN or Inf values")
        meta = header["meta"]
        samples = self.guard.weight(meta["samples"], self.announced.get(agent), limit=self.weight_limit)
        metrics = {k: float(v) for k, v in (meta.get("metrics") or {}).items() if v is not None}
        metrics["_learn_s"] = float(meta.get("learn_s", 0.0))
        metrics["_samples_claimed"] = float(meta["samples"])  # before the cap: methods compare their own counts
        # the claim under what the agent announced when selected, before the cap: what an honest agent can hold
        metrics["_samples_uncapped"] = float(self.guard.weight(meta["samples"], self.announced.get(agent)))
        result = ClientResult(agent, tensors, samples, metrics)
        self.strategy.check(r, phase, result)  # the method's own checks (ProtocolError -> rejected:<reason>)
        return result

    def bound(self, results: list[ClientResult]) -> Screened:
        """The method's bounds over the phase (`Strategy.screen`), then the shared update-norm bound
        (coordinator/engine/update_guard.py) over the results left."""
        refused_by_method = self.strategy.screen(self.round, self.phase, list(results)) if results else []
        out = {id(res) for res, _, _ in refused_by_method}
        results = [res for res in results if id(res) not in out]
        kind = self.strategy.update_kind(self.phase)
        if kind == "none" or not results:
            return Screened(list(results), [], float("inf"), refused_by_method)
        names = self.strategy.update_names(self.phase)
        # a "model" result's update is its difference from what the agent started from: the tensors its task
        # sent, else (a task that named tensors the agent already held) the global state it holds
        held = to_numpy(self.strategy.state)
        norms = [self.guard.update_norm({k: v for k, v in res.tensors.items() if names is None or k in names},
                                        {**held, **self.tasks[res.agent].tensors} if kind == "model" else None)
                 for res in results]
        # the cold-start reference: the scale of the model the updates apply to (its named tensors, else all)
        scale = {k: v for k, v in held.items() if names is None or k in names} or held
        entries = sum(int(np.size(v)) for v in scale.values())
        cold = max(self.guard.update_norm(scale, None), COLD_PER_ENTRY * float(np.sqrt(entries)))
        screened = self.guard.screen(self.phase, results, norms, cold=cold, r=self.round)
        screened.by_method = refused_by_method
        return screened


def _as_json(value: Any) -> Any:
    """`value` as it looks after a JSON round trip (tuples become lists), to compare with a header."""
    return json.loads(json.dumps(value))
