"""One copy of identical payloads that many agents of one process keep.

Every agent of an in-process fleet receives the round's state broadcast as its own bytes object and keeps
the newest few until a task names one (`fedfleet.edge_agent.replica`): a hundred agents keep a hundred equal
copies. `SharedBytes.shared(body)` returns the copy already kept for equal bytes (bytes are immutable, so
sharing is safe), else keeps `body` as that copy. It remembers the newest `max_kept` distinct payloads by
SHA-256. One `SharedBytes` belongs to a `fedfleet.edge_agent.host.Host`; an agent alone on its device has
its own and just gets its own bytes back.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict

MAX_KEPT = 16


class SharedBytes:
    """The newest `max_kept` distinct payloads that the agents of one Host keep, one copy each."""

    def __init__(self, max_kept: int = MAX_KEPT) -> None:
        self.max_kept = int(max_kept)
        self._kept: OrderedDict[bytes, bytes] = OrderedDict()
        self._lock = threading.Lock()

    def shared(self, body: bytes) -> bytes:
        """`body`, or the equal bytes object another agent of this Host already passed."""
        body = bytes(body)
        key = hashlib.sha256(body).digest()
        with self._lock:
            kept = self._kept.get(key)
            if kept is not None and kept == body:
                self._kept.move_to_end(key)
                return kept
            self._kept[key] = body
            while len(self._kept) > self.max_kept:
                self._kept.popitem(last=False)
            return body

    def __len__(self) -> int:
        return len(self._kept)
