"""Task admission: which tasks an agent takes, drops as too late, or holds until it can run them.

`Admission` remembers the tasks answered (`done`, by (run, round, phase), with the dispatch `msg` id taken
for each, so a QoS 1 redelivery is ignored while a resumed coordinator's new dispatch of a round is taken),
decides whether a task is too late (`expired`: its ttl ran out since it was received, by the monotonic clock,
or it was stamped longer ago than ttl + max_skew_s by this device's wall clock) and keeps the tasks that
wait for their model package or the round's state broadcast (`wait`, `take_waiting`). The wall clock is the
agent's (`now`), so a test can skew it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import Any

TaskKey = tuple[str, int, int]


def task_key(header: dict[str, Any]) -> TaskKey:
    """(run, round, phase) of a task header."""
    return str(header.get("run")), int(header.get("round", -1)), int(header.get("phase", 0))


class Admission:
    """The tasks one agent answered, dropped or holds."""

    def __init__(self, *, max_skew_s: float, now: Callable[[], float], done: Iterable[TaskKey] = ()) -> None:
        self.max_skew_s = float(max_skew_s)
        self.now = now
        self.done: set[TaskKey] = set(done)
        self.taken: dict[TaskKey, str] = {}  # task -> the dispatch (msg id) the agent took
        self.waiting: list[tuple[dict[str, Any], bytes]] = []

    def seen(self, key: TaskKey, msg: str) -> bool:
        """True if this dispatch of the task was taken already (QoS 1 may deliver twice; a resumed
        coordinator's new dispatch of the round has a new msg id)."""
        return key in self.done and self.taken.get(key, msg) == msg

    def take(self, key: TaskKey, msg: str) -> None:
        self.done.add(key)
        self.taken[key] = msg

    def release(self, key: TaskKey) -> None:
        """The task was taken but cannot run yet (it waits again)."""
        self.done.discard(key)

    def wait(self, header: dict[str, Any], body: bytes) -> None:
        self.waiting.append((header, body))

    def take_waiting(self) -> list[tuple[dict[str, Any], bytes]]:
        """The waiting tasks, to be tried again (they wait again through `wait` if still not ready)."""
        waiting, self.waiting = self.waiting, []
        return waiting

    def remaining(self, header: dict[str, Any]) -> float:
        """Seconds left on the task: its ttl from this agent's own receive time (monotonic; a header that
        does not say when it was received, see `inbox.Received`, counts from now)."""
        ttl = header.get("ttl")
        if not isinstance(ttl, (int, float)) or not 0 < ttl <= 86400:
            return 0.0
        now = time.monotonic()
        return float(getattr(header, "at", now)) + float(ttl) - now

    def expired(self, header: dict[str, Any]) -> str:
        """Why the task is too late to run ("" when it is not): its ttl ran out since it was received, or the
        coordinator stamped it more than ttl + max_skew_s ago by this device's clock (a replay or a delivery
        held back far longer than any clock skew explains)."""
        ttl, sent = header.get("ttl"), header.get("sent")
        if not isinstance(ttl, (int, float)) or not isinstance(sent, (int, float)):
            return "task has no ttl or send time"
        if self.remaining(header) <= 0:
            return "deadline passed"
        age = self.now() - float(sent)
        if age > float(ttl) + self.max_skew_s:
            return f"task sent {age:.0f} s ago by this clock; ttl {ttl} s + skew {self.max_skew_s} s"
        return ""
