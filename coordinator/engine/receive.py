"""The coordinator's receive path, on the MQTT network thread: authenticate, reassemble, schema-check.

For every message on `fedfleet/v1/<fleet>/agents/<id>/<kind>`:
1. The sender is the id in the topic. An id off the roster has no key.
2. The HMAC under that id's key is verified before a single header byte is parsed. A message that fails
   1 or 2 is *unauthenticated*: it is dropped and only counted, never queued, and never counts towards
   closing a phase. For result topics the engine writes one summary row per reason per phase
   (`take_dropped`); status and telemetry junk (such as an earlier run's retained status under another
   secret) is counted in `dropped_other`.
3. The header is parsed strictly (`protocol.parse_header`) and every field is schema-checked (types,
   ranges, finiteness, integers that fit a float64 exactly and SQLite's int64). An authenticated message
   that fails is refused: the engine gets a `Refused` item and records `rejected:<reason>`.
4. Status and telemetry must be fresh, and freshness never rests on the agents' wall clocks. A fedfleet
   agent stamps each with `inc` (a random id of its process, in the header) and `seq` [epoch, n] (strictly
   increasing within the process), and its status echoes `boot`, the id of the coordinator process whose
   package it last took (`fedfleet.coordinator.engine.dispatch`). A new `inc` is taken only from a status
   that echoes this coordinator's `boot`: a status written before this coordinator started (an old
   retained "online" of a dead agent, or a replayed "offline" of a live one) is never the truth about an
   agent; the agent answers this coordinator's package with a fresh one. Once an `inc` is taken, the agent's
   earlier processes are superseded: their messages are refused (`replayed`), whatever their clocks said.
   Within one `inc`, a `seq` below the last one accepted for that kind is refused (`replayed`); the same seq
   again is a duplicate (QoS 1 redelivery, or a replay of the latest message), dropped without effect. A
   message of an `inc` not yet taken is dropped and counted (`unconfirmed`). A message without `inc` (no
   fedfleet agent sends one; a hand-made client holding a device key may) is judged by its seq alone.
5. Result chunks go through a `Reassembler` with per-sender caps on partial messages and bytes.

Items on the inbox are the typed dataclasses of `coordinator/engine/inbox.py`. Checks that need the open round
(run, round, the task's codec and layout) are the engine's, in `coordinator/engine/validate.py`.
"""

from __future__ import annotations

import logging
import math
import queue
import threading
from collections.abc import Callable
from typing import Any

from fedfleet.coordinator.engine.inbox import (
    ChunkBytes,
    EnergyReport,
    InboxItem,
    Refused,
    ResultMessage,
    TrafficReport,
)
from fedfleet.edge_agent.errors import ProtocolError, Refusal
from fedfleet.edge_agent.wire import protocol
from fedfleet.edge_agent.wire.traffic import CATEGORIES

log = logging.getLogger(__name__)

MAX_SAFE_INT = (1 << 53) - 1  # exact in a float64; well inside SQLite's int64
MAX_BODY_BYTES = 64 << 10  # status and telemetry bodies
MAX_METRICS = 64
MAX_CLAIMED_IDS = 5  # ids kept per summary row of unauthenticated messages


# ---------------------------------------------------------------- schema checks
def _fail(field: str, what: str) -> ProtocolError:
    return ProtocolError(Refusal.SCHEMA, f"{field}: {what}")


def check_int(value: Any, field: str, lo: int = 0, hi: int = MAX_SAFE_INT) -> int:
    if type(value) is not int or not lo <= value <= hi:
        raise _fail(field, f"must be an integer in {lo}..{hi}, got {str(value)[:40]}")
    return value


def check_number(value: Any, field: str, lo: float = 0.0, hi: float = 1e12) -> float:
    if type(value) not in (int, float) or not math.isfinite(value) or not lo <= value <= hi:
        raise _fail(field, f"must be a finite number in [{lo:g}, {hi:g}], got {str(value)[:40]}")
    return float(value)


def check_str(value: Any, field: str, max_len: int = 64, *, optional: bool = False) -> str | None:
    if value is None and optional:
        return None
    if not isinstance(value, str) or len(value) > max_len:
        raise _fail(field, f"must be a string of at most {max_len} characters")
    return value


def check_seq(value: Any) -> tuple[int, int]:
    if not isinstance(value, list) or len(value) != 2:
        raise _fail("seq", "must be [epoch, n]")
    return check_int(value[0], "seq[0]"), check_int(value[1], "seq[1]", hi=protocol.WILL_SEQ)


def check_metrics(value: Any) -> dict[str, float]:
    """A dict of at most MAX_METRICS names to finite numbers (None, a diverged learner's NaN, is dropped)."""
    if value is None:
        return {}
    if not isinstance(value, dict) or len(value) > MAX_METRICS:
        raise _fail("meta.metrics", f"must be a dict of at most {MAX_METRICS} names to finite numbers")
    out = {}
    for k, v in value.items():
        if len(k) > 64:
            raise _fail("meta.metrics", "names are at most 64 characters")
        if v is None:
            continue
        out[k] = check_number(v, f"meta.metrics.{k[:32]}", -1e15, 1e15)
    return out


def check_result_header(header: dict[str, Any]) -> None:
    """Every field of a result header, by type and range (the engine checks them against the task)."""
    check_str(header.get("run"), "run")
    check_int(header.get("round"), "round", 0, (1 << 31) - 1)
    check_int(header.get("phase", 0), "phase", 0, 63)
    check_str(header.get("method"), "method")
    codec = header.get("codec")
    if not isinstance(codec, dict) or len(codec) > 16:
        raise _fail("codec", "must be a dict of at most 16 fields")
    layout = header.get("layout")
    if not isinstance(layout, list) or len(layout) > 1024:
        raise _fail("layout", "must be a list of at most 1024 [name, shape] pairs")
    digest = header.get("digest")
    if not isinstance(digest, str) or len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
        raise _fail("digest", "must be 64 lower-case hex characters")
    if "sent" in header:
        check_number(header["sent"], "sent", 0.0, 1e11)
    meta = header.get("meta")
    if not isinstance(meta, dict):
        raise _fail("meta", "must be a dict")
    check_int(meta.get("samples"), "meta.samples", 1, (1 << 31) - 1)
    check_number(meta.get("learn_s", 0.0), "meta.learn_s", 0.0, 1e7)
    check_metrics(meta.get("metrics"))
    check_str(meta.get("profile"), "meta.profile", optional=True)


def check_status(body: dict[str, Any]) -> dict[str, Any]:
    state = body.get("state")
    if state not in ("online", "offline"):
        raise _fail("state", "must be online or offline")
    check_str(body.get("model"), "model", optional=True)
    check_int(body.get("samples", 0), "samples", 0, (1 << 31) - 1)
    for name in ("runtime", "profile", "boot"):
        check_str(body.get(name), name, optional=True)
    for name in ("error", "warning"):
        if body.get(name) is not None:
            check_str(body[name], name, 2000)
    return body


ENERGY_FIELDS = ("compute_j", "radio_j", "idle_j")


def check_energy(event: dict[str, Any]) -> dict[str, Any]:
    check_str(event.get("run"), "run")
    check_int(event.get("round"), "round", 0, (1 << 31) - 1)
    check_int(event.get("phase", 0), "phase", 0, 63)
    for name in ENERGY_FIELDS:
        check_number(event.get(name), name, 0.0, 1e9)
    return event


def _pair(value: Any, field: str) -> tuple[int, int]:
    if not isinstance(value, list) or len(value) != 2:
        raise _fail(field, "must be [up, down]")
    return check_int(value[0], f"{field}[0]"), check_int(value[1], f"{field}[1]")


def check_traffic(event: dict[str, Any]) -> tuple[dict[str, tuple[int, int]], tuple[int, int] | None] | None:
    """A report's bytes by category and socket bytes (None: the report has none, an older agent's)."""
    traffic = event.get("traffic")
    if traffic is None:
        return None
    if not isinstance(traffic, dict) or any(k not in CATEGORIES for k in traffic):
        raise _fail("traffic", f"must map categories ({', '.join(CATEGORIES)}) to [up, down]")
    counts = {k: _pair(v, f"traffic.{k}") for k, v in traffic.items()}
    wire = event.get("wire")
    return counts, (None if wire is None else _pair(wire, "wire"))


def _json_body(body: bytes) -> dict[str, Any]:
    if len(body) > MAX_BODY_BYTES:
        raise ProtocolError(Refusal.OVERSIZED, f"body of {len(body)} bytes exceeds {MAX_BODY_BYTES}")
    return protocol.parse_header(body)  # the same strict JSON reader as headers


def _named(header: dict[str, Any]) -> dict[str, Any]:
    """run, round and phase of a header, where they are well-typed (for the engine's refusal accounting)."""
    out: dict[str, Any] = {}
    if isinstance(header.get("run"), str):
        out["run"] = header["run"][:64]
    for name in ("round", "phase"):
        v = header.get(name, 0 if name == "phase" else None)
        if type(v) is int and 0 <= v < 1 << 31:
            out[name] = v
    return out


class _Unconfirmed(Exception):
    """A message of an agent process this coordinator has not confirmed yet (module docstring, 4)."""


# ---------------------------------------------------------------- the receive path
class ReceivePath:
    """Turns raw MQTT messages from agents into authenticated, schema-checked items on `inbox`.

    Items (`coordinator/engine/inbox.py`): `ChunkBytes` (a verified result chunk, for byte accounting),
    `ResultMessage` (a complete result), `Refused` (a refused result message, with the run/round/phase its
    header named where known) and `EnergyReport`. Status goes to `on_status(agent, status)`.
    """

    def __init__(self, *, fleet: str, keys: dict[str, bytes], inbox: queue.Queue[InboxItem],
                 on_status: Callable[[str, dict[str, Any]], None], max_result_bytes: int,
                 reassembly_timeout_s: float = 600.0, per_sender_pending: int = 4,
                 per_sender_bytes: int | None = None, boot: str | None = None,
                 on_unconfirmed: Callable[[str, dict[str, Any]], None] | None = None,
                 on_restart: Callable[[str], None] | None = None) -> None:
        """`boot`: this coordinator process's id (None: every agent process is taken at its word, as before
        there was one); `on_unconfirmed(agent, status)`: a status of an agent process not yet confirmed (shown,
        never trusted: `fedfleet.coordinator.engine.presence`); `on_restart(agent)`: the agent's process changed
        (it restarted, and holds none of its earlier process's replica)."""
        self.fleet = fleet
        self.on_restart = on_restart
        self.boot = boot
        self.on_unconfirmed = on_unconfirmed
        self.keys = keys
        self.inbox = inbox
        self.on_status = on_status
        self.reassembler = protocol.Reassembler(
            max_total=max_result_bytes, max_pending=per_sender_pending * len(keys) + 16, timeout_s=reassembly_timeout_s,
            per_sender_pending=per_sender_pending,
            per_sender_bytes=per_sender_bytes if per_sender_bytes is not None else 2 * max_result_bytes)
        self.bytes_up = 0  # MQTT bytes of every message on a result topic
        self.dropped_total = 0  # unauthenticated messages since start
        self.dropped_other: dict[Refusal, int] = {}  # unauthenticated status and telemetry messages, by reason
        self.duplicates = 0  # status and telemetry seen twice with the same seq
        self._dropped: dict[Refusal, list[Any]] = {}  # reason -> [count, bytes, claimed ids]
        self._refused: dict[tuple[str, Refusal], list[Any]] = {}  # (agent, reason) -> [count, kinds] (status, telemetry)
        self._lock = threading.Lock()
        self._last_seq: dict[tuple[str, str], tuple[int, int]] = {}  # (agent, kind) -> last accepted seq
        self._inc: dict[str, str] = {}  # agent -> the process (inc) whose messages count
        self._superseded: dict[str, list[str]] = {}  # agent -> its earlier processes (newest last, bounded)
        self.unconfirmed = 0  # messages of an agent process not yet confirmed by a status echoing `boot`

    # -------------------------------------------------------------- unauthenticated messages
    def _drop(self, reason: Refusal, agent: str, nbytes: int, kind: str) -> None:
        with self._lock:
            self.dropped_total += 1
            if kind != "result":  # e.g. a previous run's retained status under another secret: counted only
                self.dropped_other[reason] = self.dropped_other.get(reason, 0) + 1
                return
            entry = self._dropped.setdefault(reason, [0, 0, []])
            entry[0] += 1
            entry[1] += nbytes
            if len(entry[2]) < MAX_CLAIMED_IDS and agent not in entry[2]:
                entry[2].append(agent)

    def take_dropped(self) -> dict[Refusal, tuple[int, int, list[str]]]:
        """Unauthenticated messages on result topics since the last call: reason -> (count, MQTT bytes, a few
        claimed ids). Those on status and telemetry topics are only counted, in `dropped_other`."""
        with self._lock:
            out, self._dropped = {k: (v[0], v[1], v[2]) for k, v in self._dropped.items()}, {}
        return out

    def take_refused(self) -> dict[tuple[str, Refusal], tuple[int, list[str]]]:
        """Authenticated status and telemetry messages refused since the last call:
        (agent, reason) -> (count, the kinds refused)."""
        with self._lock:
            out, self._refused = {k: (v[0], v[1]) for k, v in self._refused.items()}, {}
        return out

    # -------------------------------------------------------------- entry point
    def on_message(self, topic: str, payload: bytes) -> None:
        parsed = protocol.parse_agent_topic(topic)
        if parsed is None or not payload:
            return
        fleet, agent, kind = parsed
        if fleet != self.fleet or kind not in protocol.UPLINK_KINDS:
            return
        nbytes = protocol.mqtt_publish_bytes(topic, len(payload))
        if kind == "result":
            with self._lock:
                self.bytes_up += nbytes
        key = self.keys.get(agent)
        if key is None:
            self._drop(Refusal.UNKNOWN_AGENT, agent[:64], nbytes, kind)
            return
        try:
            protocol.verify_hmac(payload, key)
        except ProtocolError as exc:
            self._drop(exc.reason, agent, nbytes, kind)
            return
        try:
            header, body = protocol.unpack_verified(payload)
        except ProtocolError as exc:  # authenticated, but its header does not parse
            self._refuse(kind, agent, exc, {}, nbytes)
            return
        try:
            self._accept(kind, agent, header, body, nbytes)
        except ProtocolError as exc:
            self._refuse(kind, agent, exc, header, nbytes)
        except Exception as exc:  # noqa: BLE001 - last line of defence: the network thread never dies
            log.exception("receive path bug on a %s message from %s", kind, agent)
            self._refuse(kind, agent, ProtocolError(Refusal.INTERNAL, f"{type(exc).__name__}: {exc}"), header, nbytes)

    def _refuse(self, kind: str, agent: str, exc: ProtocolError, header: dict[str, Any], nbytes: int) -> None:
        if kind == "result":
            self.inbox.put(Refused(agent, exc.reason, exc.detail, nbytes, **_named(header)))
            return
        with self._lock:
            entry = self._refused.setdefault((agent, exc.reason), [0, []])
            entry[0] += 1
            if kind not in entry[1]:
                entry[1].append(kind)
            first = entry[0] == 1
        if first:
            # an authenticated agent's stale status or telemetry is routine (paho re-sends what it queued during a
            # reconnection after the new connection's own status): refused and counted, but not a warning
            routine = exc.reason == Refusal.REPLAYED and kind in ("status", "telemetry")
            (log.info if routine else log.warning)("refused %s message from %s: %s", kind, agent, str(exc)[:300])

    def _accept(self, kind: str, agent: str, header: dict[str, Any], body: bytes, nbytes: int) -> None:
        if header.get("kind") != kind:
            raise ProtocolError(Refusal.MALFORMED, f"a {str(header.get('kind'))[:16]!r} message on a {kind} topic")
        if header.get("agent") != agent:
            raise ProtocolError(Refusal.SPOOFED, f"header names agent {str(header.get('agent'))[:64]!r} on {agent}'s topic")
        if header.get("fleet", self.fleet) != self.fleet:
            raise ProtocolError(Refusal.SPOOFED, "header names another fleet")
        if kind == "result":
            check_result_header(header)
            done = self.reassembler.add(header, body, sender=agent)
            self.inbox.put(ChunkBytes(agent, nbytes))
            if done is not None:
                self.inbox.put(ResultMessage(agent, done[0], done[1]))
            return
        seq = check_seq(header.get("seq"))
        inc = check_str(header.get("inc"), "inc", 32, optional=True)
        content = _json_body(body)
        if kind == "status":
            check_status(content)
            try:
                fresh = self._fresh(agent, kind, seq, inc, content.get("boot"))
            except _Unconfirmed:
                if self.on_unconfirmed is not None:
                    self.on_unconfirmed(agent, content)
                return
            if fresh:
                self.on_status(agent, content)
            return
        event = content.get("event")
        try:
            if event in ("energy", "bytes"):
                if event == "energy":
                    check_energy(content)
                traffic = check_traffic(content)
                if traffic is not None:
                    check_str(content.get("run"), "run")
                    check_int(content.get("round"), "round", 0, (1 << 31) - 1)
                    check_int(content.get("phase", 0), "phase", 0, 63)
                if not self._fresh(agent, kind, seq, inc):
                    return
                where = (content["run"], content["round"], content.get("phase", 0)) if traffic or event == "energy" else None
                if traffic is not None:  # before the energy report: `settle` stops waiting once that is booked
                    counts, wire = traffic
                    if content.get("final") is True:  # an agent's last report: its own bytes (MQTT size, as received
                        up, down = counts.get("telemetry", (0, 0))  # here) are added to its telemetry and its socket
                        counts = {**counts, "telemetry": (up + nbytes, down)}
                        wire = None if wire is None else (wire[0] + nbytes, wire[1])
                    self.inbox.put(TrafficReport(agent, *where, counts, wire))
                if event == "energy":
                    self.inbox.put(EnergyReport(agent, *where, *(float(content[k]) for k in ENERGY_FIELDS),
                                                meter=check_str(content.get("meter"), "meter", 16, optional=True)))
            elif self._fresh(agent, kind, seq, inc):
                log.info("telemetry from %s: %s", agent, str(content)[:300])
        except _Unconfirmed:
            pass

    def _fresh(self, agent: str, kind: str, seq: tuple[int, int], inc: str | None = None,
               boot: Any = None) -> bool:
        """Whether the message is new (see the module docstring, 4). A message of a superseded process of the
        agent, or an older seq of its current one, is refused as replayed; the same seq again (QoS 1 may
        deliver twice, and a replay of the latest message changes nothing) is only counted in `duplicates`;
        a message of a process not yet confirmed raises `_Unconfirmed` (counted in `unconfirmed`)."""
        with self._lock:
            if inc is not None:
                if inc in self._superseded.get(agent, ()):
                    raise ProtocolError(Refusal.REPLAYED, f"{kind} of an earlier process of the agent ({inc[:16]})")
                current = self._inc.get(agent)
                if inc != current:
                    if self.boot is not None and (kind != "status" or boot != self.boot):
                        self.unconfirmed += 1
                        raise _Unconfirmed
                    if current is not None:  # the agent restarted: its earlier process is done with
                        old = self._superseded.setdefault(agent, [])
                        old.append(current)
                        del old[:-64]
                    self._inc[agent] = inc
                    for k in ("status", "telemetry"):
                        self._last_seq.pop((agent, k), None)
                    if current is not None and self.on_restart is not None:
                        self.on_restart(agent)
            last = self._last_seq.get((agent, kind))
            if last is not None and seq == last:
                self.duplicates += 1
                return False
            if last is not None and seq < last:
                raise ProtocolError(Refusal.REPLAYED, f"{kind} seq {list(seq)} is older than the last seen {list(last)}")
            self._last_seq[(agent, kind)] = seq
            return True

