"""Store-and-forward: an agent's finished results, kept until the coordinator can no longer need them.

A result's signed chunks are written to the state directory (`outbox/<run>-<round>-<phase>.bin`, to a temporary
name and renamed) *before* they are published. An entry is sent again on every connection other than the one it
was published on: after the link was dropped and replaced (paho's queue of the old link is gone), and after an
agent restart (entries read back from disk were published on no connection of this process). After a
reconnection of the same link (paho resends what it had not got acknowledged, but a restarted broker drops what
arrives before the coordinator has subscribed again) the agent sends every entry once more a few seconds later
(`Agent.RESEND_AFTER_S`).

An entry is dropped when the agent takes a later task of the same run (the coordinator has then moved past the
result's task: it was booked, refused, or too late) or a task of another run, and the oldest entries go past
`max_entries`. Without a state directory the outbox is kept in memory only (it still covers a replaced link).
The coordinator books each resent copy once: the synchronous engine books a result of a closed round as late (a
replay of the same round refused as a duplicate), the asynchronous one takes it within its staleness limit and
notes copies of a result it already took.
"""

from __future__ import annotations

import json
import logging
import os
import re
import struct
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

Key = tuple[str, int, int]  # (run, round, phase) of the task the result answers
MAX_ENTRIES = 16
_U32 = struct.Struct(">I")


@dataclass
class Entry:
    topic: str
    chunks: list[bytes]
    link: Any = None  # the connection it was last published on (None: none of this process)


def _name(key: Key) -> str:
    return f"{re.sub(r'[^A-Za-z0-9_.-]', '_', key[0])[:80]}-{key[1]}-{key[2]}.bin"


def _pack(key: Key, entry: Entry) -> bytes:
    head = json.dumps({"key": list(key), "topic": entry.topic}).encode()
    parts = [_U32.pack(len(head)), head, _U32.pack(len(entry.chunks))]
    for c in entry.chunks:
        parts += [_U32.pack(len(c)), c]
    return b"".join(parts)


def _unpack(blob: bytes) -> tuple[Key, Entry]:
    (n,) = _U32.unpack_from(blob, 0)
    head = json.loads(blob[4 : 4 + n])
    off = 4 + n
    (count,) = _U32.unpack_from(blob, off)
    off += 4
    chunks = []
    for _ in range(count):
        (size,) = _U32.unpack_from(blob, off)
        off += 4
        if off + size > len(blob):
            raise ValueError("truncated chunk")
        chunks.append(blob[off : off + size])
        off += size
    run, r, p = head["key"]
    return (str(run), int(r), int(p)), Entry(str(head["topic"]), chunks)


class Outbox:
    """The results one agent has not yet seen the coordinator move past."""

    def __init__(self, state_dir: str | Path | None, *, max_entries: int = MAX_ENTRIES) -> None:
        self.dir = Path(state_dir) / "outbox" if state_dir else None
        self.max_entries = max_entries
        self._entries: dict[Key, Entry] = {}
        self._lock = threading.Lock()
        self.resent = 0  # chunks published again
        if self.dir is not None:
            self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
            for path in sorted(self.dir.glob("*.bin")):
                try:
                    key, entry = _unpack(path.read_bytes())
                except (OSError, ValueError, KeyError, TypeError, struct.error) as exc:
                    log.warning("outbox entry %s is unreadable (%s); dropping it", path, exc)
                    path.unlink(missing_ok=True)
                    continue
                self._entries[key] = entry

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def keys(self) -> list[Key]:
        with self._lock:
            return sorted(self._entries)

    def put(self, key: Key, topic: str, chunks: list[bytes], link: Any) -> None:
        """Keep a result (its chunks, about to be published on `link`), on disk first."""
        entry = Entry(topic, list(chunks), link)
        if self.dir is not None:
            path = self.dir / _name(key)
            tmp = path.with_name(f".{path.name}.tmp")
            with open(tmp, "wb") as fh:
                fh.write(_pack(key, entry))
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        with self._lock:
            self._entries[key] = entry
            extra = sorted(self._entries, key=lambda k: (k[1], k[2]))[: max(0, len(self._entries) - self.max_entries)]
        for old in extra:
            self._drop(old)

    def settle(self, run: str, round: int, phase: int) -> None:
        """A task (run, round, phase) was taken: the entries of other runs and of earlier tasks are done."""
        with self._lock:
            done = [k for k in self._entries if k[0] != run or (k[1], k[2]) < (round, phase)]
        for key in done:
            self._drop(key)

    def _drop(self, key: Key) -> None:
        with self._lock:
            self._entries.pop(key, None)
        if self.dir is not None:
            (self.dir / _name(key)).unlink(missing_ok=True)

    def forward(self, link: Any, *, every: bool = False) -> int:
        """Publish again, on `link`, every entry last published on another connection (`every`: every entry);
        returns the chunks sent."""
        with self._lock:
            due = [(k, e) for k, e in sorted(self._entries.items()) if every or e.link is not link]
            for _, e in due:
                e.link = link
        sent = 0
        for key, entry in due:
            log.info("forwarding the kept result of %s round %d.%d (%d chunks)", key[0], key[1], key[2],
                     len(entry.chunks))
            for chunk in entry.chunks:
                link.publish(entry.topic, chunk)
                sent += 1
        self.resent += sent
        return sent
