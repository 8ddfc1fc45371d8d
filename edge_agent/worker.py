"""The worker threads the agents of one process share, in place of a thread per agent.

`SharedWorker(threads, max_threads=...)` runs each member's work items in the order they came, never two of
one member at once, on a few threads shared by every member (an actor per agent on a small pool that grows
up to `max_threads` while work waits and every thread is busy). A member that has items
waiting for something else (a task that waits for its model package) is offered an idle call every
`idle_s`, as an agent's own worker thread tried its waiting tasks whenever its queue was quiet.

Members join with `join(member, handle, idle, waiting)`:
- `handle(item)`: one work item;
- `idle()`: the idle call; `waiting()`: whether the member wants it now (checked on every sweep, so keep it
  cheap).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)

_IDLE = object()


class _Member:
    __slots__ = ("done", "handle", "idle", "items", "left", "scheduled", "waiting")

    def __init__(self, handle: Callable[[Any], None], idle: Callable[[], None], waiting: Callable[[], bool]) -> None:
        self.handle, self.idle, self.waiting = handle, idle, waiting
        self.items: deque[Any] = deque()
        self.scheduled = False  # on the ready queue or running
        self.left = False
        self.done = threading.Event()  # set while not running


class SharedWorker:
    """See the module docstring."""

    def __init__(self, threads: int = 2, *, max_threads: int | None = None, idle_s: float = 0.5,
                 name: str = "agents") -> None:
        """`threads` to start with; up to `max_threads` (default `threads`) when work waits while every thread
        is busy: members that wait inside their work (emulated devices sleeping out their slower compute and
        links) each need a thread then, as a real device has its own CPU."""
        if threads < 1:
            raise ValueError("threads must be at least 1")
        self.threads, self.idle_s, self.name = int(threads), float(idle_s), name
        self.max_threads = max(self.threads, int(max_threads or threads))
        self._free = 0  # threads waiting for work
        self._lock = threading.Lock()
        self._members: dict[Any, _Member] = {}
        self._ready: queue.Queue[_Member] = queue.Queue()
        self._started: list[threading.Thread] = []
        self._next_sweep = 0.0

    def join(self, member: Any, handle: Callable[[Any], None], idle: Callable[[], None],
             waiting: Callable[[], bool]) -> None:
        with self._lock:
            m = _Member(handle, idle, waiting)
            m.done.set()
            self._members[member] = m
            if not self._started:
                for _ in range(self.threads):
                    self._start_thread()

    def put(self, member: Any, item: Any) -> None:
        with self._lock:
            m = self._members.get(member)
            if m is None:
                return
            m.items.append(item)
            self._schedule(m)

    def leave(self, member: Any, wait_s: float = 10.0) -> None:
        """No more work for `member`; waits (up to `wait_s`) for the item it is running to finish."""
        with self._lock:
            m = self._members.pop(member, None)
            if m is None:
                return
            m.items.clear()
            m.left = True
        if threading.current_thread() not in self._started:
            m.done.wait(wait_s)

    def __len__(self) -> int:
        return len(self._members)

    def _start_thread(self) -> None:  # under the lock
        t = threading.Thread(target=self._run, name=f"{self.name}-worker-{len(self._started)}", daemon=True)
        self._started.append(t)
        t.start()

    def _schedule(self, m: _Member) -> None:  # under the lock
        if not m.scheduled:
            m.scheduled = True
            self._ready.put(m)
            if self._ready.qsize() > self._free and len(self._started) < self.max_threads:
                self._start_thread()

    def _sweep(self) -> None:
        """Members with nothing queued that wait for something get an idle call."""
        with self._lock:
            for m in self._members.values():
                if not m.scheduled:
                    try:
                        wants = m.waiting()
                    except Exception:  # noqa: BLE001
                        wants = False
                    if wants:
                        m.items.append(_IDLE)
                        self._schedule(m)

    def _run(self) -> None:
        while True:
            now = time.monotonic()
            if now >= self._next_sweep:
                self._next_sweep = now + self.idle_s
                self._sweep()
            with self._lock:
                self._free += 1
            try:
                m = self._ready.get(timeout=self.idle_s)
            except queue.Empty:
                continue
            finally:
                with self._lock:
                    self._free -= 1
            with self._lock:
                if self._ready.qsize() > self._free and len(self._started) < self.max_threads:
                    self._start_thread()  # work still waits and this thread is now busy: one more
                item = m.items.popleft() if m.items else None
                m.done.clear()
            try:
                if item is _IDLE:
                    m.idle()
                elif item is not None:
                    m.handle(item)
            except Exception:  # noqa: BLE001 - a member's failure never stops the others' work
                log.exception("%s: a work item failed", self.name)
            finally:
                with self._lock:
                    m.done.set()
                    m.scheduled = False
                    if m.items and not m.left:
                        self._schedule(m)
