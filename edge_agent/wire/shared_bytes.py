"""One copy of identical payloads that many agents of one process keep.

Every agent of an in-process fleet receives the round's state broadcast as its own bytes object and keeps
the newest few until a task names one (`Agent._keep_state`): a hundred agents keep a hundred equal copies.
`shared(body)` returns the copy already kept for equal bytes (bytes are immutable, so sharing is safe),
else keeps `body` as that copy. It remembers the newest `MAX_KEPT` distinct payloads by SHA-256; an agent
alone in its process (a device) just gets its own bytes back.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict

MAX_KEPT = 16

_kept: OrderedDict[bytes, bytes] = OrderedDict()
_lock = threading.Lock()


def shared(body: bytes) -> bytes:
    """`body`, or the equal bytes object another caller in this process already passed."""
    body = bytes(body)
    key = hashlib.sha256(body).digest()
    with _lock:
        kept = _kept.get(key)
        if kept is not None and kept == body:
            _kept.move_to_end(key)
            return kept
        _kept[key] = body
        while len(_kept) > MAX_KEPT:
            _kept.popitem(last=False)
        return body
