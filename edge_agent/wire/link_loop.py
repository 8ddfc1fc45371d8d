"""One thread that drives many MQTT connections: the network side of a process that hosts many agents.

`LinkLoop` runs paho clients with paho's external-loop API (`loop_read`, `loop_write`, `loop_misc`) from one
`selectors` loop (epoll on Linux), instead of one network thread per connection:

- **no descriptor ceiling**: paho's own loop waits in `select()`, which cannot watch descriptors numbered
  1024 or above (a process then held at most about 338 agents); epoll has no such limit, and a client driven
  from outside needs no wake-up socket pair, so a connection costs one descriptor;
- **no thread per connection**: idle connections cost a selector entry and a keep-alive check a second;
- **windowed connects**: at most `window` connections are between their TCP connect and their SUBACK at any
  time; the others wait their turn, so thousands of agents starting at once do not flood the broker.
  A connection that fails or is lost waits a capped, jittered exponential backoff before it queues again;
- **all socket I/O on the loop's thread**: a publish from another thread only queues the packet and wakes
  the loop (paho's `on_socket_register_write`), so a TLS socket is never read and written at once.
  TCP connects and TLS handshakes (blocking calls in paho) run on a few connector threads.

Message and connect handlers run on the loop's thread, as they ran on a link's own thread before: keep them
short (an agent hands its work to its worker). `MqttLink(..., loop=LinkLoop())` uses it (a link given no loop
makes one of its own, which it closes when it stops); see `fedfleet.edge_agent.host` for the process-wide one.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import random
import selectors
import socket
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

log = logging.getLogger(__name__)

_WAITING, _CONNECTING, _UP, _BACKOFF, _CLOSING, _STOPPED = "waiting", "connecting", "up", "backoff", "closing", "stopped"


class _Entry:
    __slots__ = ("closed", "delay", "registered", "since", "sock", "state")

    def __init__(self, delay: float) -> None:
        self.state = _WAITING
        self.sock: Any = None  # the socket registered with the selector
        self.registered = 0  # its selector events
        self.since = 0.0  # when the current connect began, or when closing began
        self.delay = delay  # the next backoff's upper bound
        self.closed = threading.Event()  # set once the link is stopped and its socket closed


class LinkLoop:
    """See the module docstring. `window`: connects in flight at most; `connect_timeout_s`: from the TCP connect
    to the SUBACK, after which the attempt counts as failed; `connectors`: threads for TCP connects and TLS
    handshakes."""

    def __init__(self, *, window: int = 32, connect_timeout_s: float = 30.0, connectors: int = 4,
                 name: str = "links") -> None:
        if window < 1 or connectors < 1:
            raise ValueError("window and connectors must be at least 1")
        self.window = int(window)
        self.connect_timeout_s = float(connect_timeout_s)
        self._sel = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._sel.register(self._wake_r, selectors.EVENT_READ, None)
        self._lock = threading.Lock()
        self._calls: deque[Callable[[], None]] = deque()
        self._woken = False
        self._timers: list[tuple[float, int, Callable[[], None]]] = []
        self._seq = itertools.count()
        self._links: dict[Any, _Entry] = {}
        self._queue: deque[Any] = deque()
        self.in_flight = 0
        self.connects = 0  # successful connects (CONNACK and SUBACK), first or again
        self.failures = 0  # connect attempts that failed or timed out, and connections lost
        self._pool = ThreadPoolExecutor(connectors, thread_name_prefix=f"{name}-connect")
        self._name = name
        self._thread: threading.Thread | None = None
        self._ident: int | None = None
        self._next_misc = 0.0
        self._writing = False
        self._closed = False

    # -------------------------------------------------------------- from any thread
    def add(self, link: Any) -> None:
        """Start `link` (an `MqttLink` made with this loop): it queues for a connect slot."""
        self._ensure_thread()
        self.call(lambda: self._add(link))

    def remove(self, link: Any, *, graceful: bool = True, wait_s: float = 5.0) -> None:
        """Stop `link`: DISCONNECT and close (`graceful`), or drop the socket so the broker sends the will."""
        entry = self._links.get(link)
        if entry is None:
            return
        if threading.get_ident() == self._ident:
            self._remove(link, graceful)
            return
        self.call(lambda: self._remove(link, graceful))
        entry.closed.wait(wait_s)

    def close(self, wait_s: float = 5.0) -> None:
        """End the loop's thread, which then frees its selector, wake-up pair and connector threads (call it after
        `remove` of its links: a link still on it is dropped without DISCONNECT). From any thread."""
        def end() -> None:
            for link, entry in list(self._links.items()):
                self._close(link, entry)
            self._closed = True

        with self._lock:
            thread, started = self._thread, self._thread is not None
            if not started:
                self._closed = True
        if not started:
            self._release()
        elif threading.get_ident() == self._ident:
            end()  # the thread ends after this turn
        else:
            self.call(end)
            thread.join(wait_s)

    def _release(self) -> None:
        self._pool.shutdown(wait=False)
        for closable in (self._sel, self._wake_r, self._wake_w):
            try:
                closable.close()
            except OSError:
                pass

    def alive(self) -> bool:
        """The loop's thread is running."""
        return self._thread is not None and self._thread.is_alive() and not self._closed

    def on_loop_thread(self) -> bool:
        return threading.get_ident() == self._ident

    def want_write(self, link: Any) -> None:
        """paho's `on_socket_register_write`: the link has packets queued."""
        if threading.get_ident() == self._ident:
            self._set_write(link, True)
        else:
            self.call(lambda: self._set_write(link, True))

    def call_later(self, delay_s: float, fn: Callable[[], None]) -> None:
        """Run `fn` on the loop's thread in `delay_s` seconds (no thread of its own, as a `threading.Timer` has)."""
        self._ensure_thread()
        self.call(lambda: self._later(delay_s, fn))

    def call(self, fn: Callable[[], None]) -> None:
        """Run `fn` on the loop's thread, soon."""
        with self._lock:
            self._calls.append(fn)
            wake = not self._woken
            self._woken = True
        if wake:
            try:
                self._wake_w.send(b"x")
            except (BlockingIOError, OSError):
                pass

    def stats(self) -> dict[str, int]:
        states: dict[str, int] = {}
        for entry in list(self._links.values()):
            states[entry.state] = states.get(entry.state, 0) + 1
        return {"links": len(self._links), "in_flight": self.in_flight, "connects": self.connects,
                "failures": self.failures, **states}

    def _ensure_thread(self) -> None:
        with self._lock:
            if self._closed:
                raise RuntimeError("this link loop is closed")
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
                self._thread.start()

    # -------------------------------------------------------------- on the loop's thread
    def _add(self, link: Any) -> None:
        if link in self._links:
            return
        self._links[link] = _Entry(link.min_backoff_s)
        self._queue.append(link)
        self._admit()

    def _admit(self) -> None:
        while self._queue and self.in_flight < self.window:
            link = self._queue.popleft()
            entry = self._links.get(link)
            if entry is None or entry.state != _WAITING:
                continue
            entry.state, entry.since = _CONNECTING, time.monotonic()
            self.in_flight += 1
            self._pool.submit(self._connect, link)

    def _connect(self, link: Any) -> None:  # a connector thread
        try:
            link.open_connection()
        except Exception as exc:  # noqa: BLE001 - any failure to connect means: back off and try again
            self.call(lambda e=exc: self._failed(link, e))
            return
        self.call(lambda: self._opened(link))

    def _opened(self, link: Any) -> None:
        entry = self._links.get(link)
        sock = link.client.socket()
        if entry is None or entry.state in (_CLOSING, _STOPPED):  # stopped while it was connecting
            link.drop_socket()
            return
        if entry.state != _CONNECTING or sock is None:
            return
        entry.sock = sock
        entry.registered = selectors.EVENT_READ | (selectors.EVENT_WRITE if link.client.want_write() else 0)
        self._sel.register(sock, entry.registered, link)

    def _failed(self, link: Any, exc: BaseException) -> None:
        entry = self._links.get(link)
        if entry is None:
            return
        self._lost(link, entry, why=f"broker {getattr(link, 'url', '?')} unreachable ({exc})")

    def _set_write(self, link: Any, on: bool) -> None:
        entry = self._links.get(link)
        if entry is None or entry.sock is None:
            return
        if on and not self._writing:  # write now; wait for the socket only if it does not take it all
            self._writing = True
            try:
                self._write(link, entry)
            finally:
                self._writing = False
            if entry.sock is None or not link.client.want_write():
                return
        events = selectors.EVENT_READ | (selectors.EVENT_WRITE if on else 0)
        if events != entry.registered:
            try:
                self._sel.modify(entry.sock, events, link)
                entry.registered = events
            except (KeyError, ValueError, OSError):
                pass

    def _unregister(self, entry: _Entry) -> None:
        if entry.sock is not None:
            try:
                self._sel.unregister(entry.sock)
            except (KeyError, ValueError, OSError):
                pass
            entry.sock, entry.registered = None, 0

    def _lost(self, link: Any, entry: _Entry, why: str | None = None) -> None:
        """A connect failed or timed out, or the connection dropped: back off, then queue again (`why`, if
        given, is logged with the wait)."""
        self._unregister(entry)
        link.connection_lost()
        if entry.state == _CONNECTING:
            self.in_flight -= 1
        if entry.state in (_CLOSING, _STOPPED):
            self._finish(link, entry)
        else:
            self.failures += 1
            entry.state = _BACKOFF
            wait = random.uniform(entry.delay / 2, entry.delay)
            entry.delay = min(entry.delay * 2, link.max_backoff_s)
            if why:
                log.info("%s; retrying in %.1f s", why, wait)
            self._later(wait, lambda: self._requeue(link))
        self._admit()

    def _requeue(self, link: Any) -> None:
        entry = self._links.get(link)
        if entry is not None and entry.state == _BACKOFF:
            entry.state = _WAITING
            self._queue.append(link)
            self._admit()

    def _remove(self, link: Any, graceful: bool) -> None:
        entry = self._links.get(link)
        if entry is None:
            return
        if entry.state == _CONNECTING:
            self.in_flight -= 1
            self._admit()
        if entry.state in (_CLOSING, _STOPPED):
            return
        up = entry.state == _UP and entry.sock is not None
        entry.state, entry.since = _CLOSING, time.monotonic()
        if graceful and up:
            link.client.disconnect()  # queued after what is still to send; paho closes the socket once it is out
            self._write(link, entry)
            if link.client.socket() is not None:
                return  # the rest goes out as the socket takes it (or the closing deadline passes)
        self._close(link, entry)

    def _close(self, link: Any, entry: _Entry) -> None:
        self._unregister(entry)
        link.drop_socket()
        self._finish(link, entry)

    def _finish(self, link: Any, entry: _Entry) -> None:
        entry.state = _STOPPED
        self._links.pop(link, None)
        entry.closed.set()

    def _write(self, link: Any, entry: _Entry) -> None:
        with link.write_lock:  # a reader of the link's byte counts sees a packet queued or written, never neither
            rc = link.client.loop_write()
        if link.client.socket() is None:  # DISCONNECT written (paho closed the socket), or the write failed
            if entry.state == _CLOSING:
                self._close(link, entry)
            else:
                self._lost(link, entry)
        elif rc:
            self._lost(link, entry)

    def _read(self, link: Any, entry: _Entry) -> None:
        rc = link.client.loop_read()
        link.after_read()
        if entry.state == _CONNECTING and link.ready():
            entry.state = _UP
            entry.delay = link.min_backoff_s
            self.in_flight -= 1
            self.connects += 1
            self._admit()
        if rc or link.client.socket() is None:
            if entry.state == _CLOSING:
                self._close(link, entry)
            else:
                self._lost(link, entry)

    def _misc(self, now: float) -> None:
        """Once a second: keep-alives (PINGREQ, and a lost connection when no PINGRESP came), connect
        timeouts and closings that take too long."""
        for link, entry in list(self._links.items()):
            if entry.state == _UP and entry.sock is not None:
                if link.client.loop_misc():
                    self._lost(link, entry)
            elif entry.state == _CONNECTING and entry.sock is not None and now - entry.since > self.connect_timeout_s:
                log.info("no CONNACK and SUBACK from %s within %.0f s", getattr(link, "url", "?"),
                         self.connect_timeout_s)
                self._unregister(entry)
                link.drop_socket()
                self._lost(link, entry)
            elif entry.state == _CLOSING and now - entry.since > 5.0:
                self._close(link, entry)

    def _later(self, delay_s: float, fn: Callable[[], None]) -> None:
        heapq.heappush(self._timers, (time.monotonic() + delay_s, next(self._seq), fn))

    def _run(self) -> None:
        self._ident = threading.get_ident()
        while not self._closed:
            now = time.monotonic()
            timeout = 1.0
            if self._timers:
                timeout = max(0.0, min(timeout, self._timers[0][0] - now))
            timeout = max(0.0, min(timeout, self._next_misc - now)) if self._next_misc else timeout
            for key, events in self._sel.select(timeout):
                link = key.data
                if link is None:
                    self._drain_wake()
                    continue
                entry = self._links.get(link)
                if entry is None or entry.sock is not key.fileobj:
                    continue
                try:
                    if events & selectors.EVENT_READ:
                        self._read(link, entry)
                    if events & selectors.EVENT_WRITE and entry.sock is key.fileobj:
                        self._write(link, entry)
                except Exception:  # a client's failure must never stop the loop of every other client
                    log.exception("link %s failed", getattr(link, "client_id", "?"))
                    if link in self._links:
                        self._lost(link, entry)
            self._run_calls()
            now = time.monotonic()
            while self._timers and self._timers[0][0] <= now:
                _, _, fn = heapq.heappop(self._timers)
                self._guard(fn)
            if now >= self._next_misc:
                self._next_misc = now + 1.0
                self._guard(lambda t=now: self._misc(t))
        self._release()

    def _drain_wake(self) -> None:
        try:
            while self._wake_r.recv(4096):
                pass
        except (BlockingIOError, OSError):
            pass

    def _run_calls(self) -> None:
        with self._lock:
            calls, self._calls = self._calls, deque()
            self._woken = False
        for fn in calls:
            self._guard(fn)

    @staticmethod
    def _guard(fn: Callable[[], None]) -> None:
        try:
            fn()
        except Exception:  # noqa: BLE001
            log.exception("link loop call failed")
