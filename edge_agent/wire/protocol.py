"""The wire contract, v2: topics, the authenticated envelope, chunking and reassembly. The coordinator
imports this.

Topics: `fedfleet/v1/<fleet>/agents/<id>/{status,task,result,telemetry}` and
`fedfleet/v1/<fleet>/broadcast/<name>[/<i>]`. An agent publishes only under its own id.

Envelope (one MQTT message, at most `MAX_MESSAGE_BYTES`):

    magic b"FFLT" | version u8 (2) | auth u8 | header_len u32 BE | header | payload_len u32 BE | payload | tag

`auth` says who vouches for the message, and the receiver demands the one its topic calls for:
- `AUTH_HMAC` (1), uplink (status, result, telemetry): tag = HMAC-SHA256(the agent's key, everything
  before it), 32 bytes. The agent's key is `derive_key(fleet_secret, agent_id)`; the receiver takes the id
  from the topic, never from the header.
- `AUTH_ED25519` (2), downlink (task, model package, broadcasts): tag = the coordinator's Ed25519 signature
  of `SIGN_CONTEXT` + everything before it, 64 bytes. Agents pin the coordinator's public key at
  provisioning (see `fedfleet.edge_agent.wire.signing`).

The tag is verified before a single header byte is parsed. Only then is the header read: a UTF-8 JSON
object, zlib-compressed when that makes it shorter (a zlib stream starts with 0x78, which no JSON text does),
inflated to at most `MAX_HEADER_BYTES`, parsed strictly (no NaN/Infinity, finite floats, integers of at most
`MAX_INT_DIGITS` digits, nesting at most `MAX_HEADER_DEPTH` deep). Every failure is a `ProtocolError`.

Header fields: `kind` (status|task|result|telemetry|model|state), `fleet`, `agent`, `run`, `round`, `phase`,
`method`, `codec` (a dict), `layout` ([[name, shape], ...]), `chunk` ([i, n]), `msg` (message id), `digest`
(SHA-256 hex of the whole, unchunked payload), `total` (its length), `sent` (the sender's unix time),
`meta` (a dict). Freshness: status and telemetry carry `seq` = [epoch, n], strictly increasing per agent
(epoch: the agent's connection, in ms; n counts within it; the last will of a connection uses n =
`WILL_SEQ`, above any n of that connection). Tasks carry `sent` (the coordinator's time) and `ttl`
(seconds): the agent's deadline is its own receive time + ttl, on its monotonic clock.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import struct
import time
import uuid
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from fedfleet.edge_agent.errors import ProtocolError, Refusal

MAGIC = b"FFLT"
VERSION = 2
AUTH_HMAC = 1
AUTH_ED25519 = 2
MAC_BYTES = 32
SIGNATURE_BYTES = 64
SIGN_CONTEXT = b"fedfleet-downlink-v2\x00"
MAX_MESSAGE_BYTES = 1 << 20  # one MQTT message, envelope included
MAX_HEADER_BYTES = 32 << 10
MAX_HEADER_DEPTH = 8
MAX_INT_DIGITS = 19  # fits a signed 64-bit integer (SQLite's INTEGER); schema checks narrow it further
MAX_PAYLOAD_TOTAL = 256 << 20  # default cap on a reassembled payload
WILL_SEQ = (1 << 31) - 1
_PREFIX = struct.Struct(">4sBBI")
_LEN = struct.Struct(">I")
CHUNK_PAYLOAD_BYTES = MAX_MESSAGE_BYTES - MAX_HEADER_BYTES - _PREFIX.size - _LEN.size - SIGNATURE_BYTES

KINDS = ("status", "task", "result", "telemetry", "model", "state")
UPLINK_KINDS = ("status", "result", "telemetry")
ROOT = "fedfleet/v1"


# ---------------------------------------------------------------- topics
def agent_topic(fleet: str, agent: str, kind: str) -> str:
    if kind not in ("status", "task", "result", "telemetry"):
        raise ValueError(f"unknown agent topic kind {kind!r}")
    return f"{ROOT}/{fleet}/agents/{agent}/{kind}"


def broadcast_topic(fleet: str, name: str) -> str:
    return f"{ROOT}/{fleet}/broadcast/{name}"


def parse_agent_topic(topic: str) -> tuple[str, str, str] | None:
    """(fleet, agent, kind) for an agent topic, else None."""
    parts = topic.split("/")
    if len(parts) == 6 and parts[0] == "fedfleet" and parts[1] == "v1" and parts[3] == "agents":
        return parts[2], parts[4], parts[5]
    return None


def valid_id(name: str) -> bool:
    """Fleet and agent ids: 1-64 chars of letters, digits, '-', '_' or '.' (no MQTT wildcards or '/')."""
    return isinstance(name, str) and 0 < len(name) <= 64 and all(c.isalnum() or c in "-_." for c in name)


# ---------------------------------------------------------------- keys
def derive_key(fleet_secret: bytes, agent_id: str) -> bytes:
    """The per-agent key: HMAC-SHA256(fleet secret, "fedfleet-agent-key:" + id)."""
    return hmac.new(fleet_secret, b"fedfleet-agent-key:" + agent_id.encode(), hashlib.sha256).digest()


def digest(payload: bytes) -> str:
    return hashlib.sha256(payload).hexdigest()


# ---------------------------------------------------------------- header
def _pack_header(header: dict[str, Any]) -> bytes:
    raw = json.dumps(header, separators=(",", ":"), allow_nan=False).encode()
    if len(raw) > MAX_HEADER_BYTES:
        raise ProtocolError(Refusal.OVERSIZED, f"header of {len(raw)} bytes exceeds {MAX_HEADER_BYTES}")
    packed = zlib.compress(raw, 9)
    return packed if len(packed) < len(raw) else raw


def _bad_constant(name: str) -> Any:
    raise ProtocolError(Refusal.MALFORMED, f"header holds {name}, which is not a number")


def _finite_float(text: str) -> float:
    if len(text) > 64:
        raise ProtocolError(Refusal.MALFORMED, "header holds a number of more than 64 characters")
    value = float(text)
    if not math.isfinite(value):
        raise ProtocolError(Refusal.MALFORMED, f"header number {text[:32]} overflows a float")
    return value


def _bounded_int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_INT_DIGITS:
        raise ProtocolError(Refusal.MALFORMED, f"header integer of {len(text)} digits does not fit 64 bits")
    value = int(text)
    if not -(1 << 63) <= value < 1 << 63:
        raise ProtocolError(Refusal.MALFORMED, "header integer does not fit 64 bits")
    return value


def _depth_ok(value: Any) -> bool:
    stack = [(value, 1)]
    while stack:
        v, d = stack.pop()
        if isinstance(v, (dict, list)):
            if d > MAX_HEADER_DEPTH:
                return False
            stack.extend((c, d + 1) for c in (v.values() if isinstance(v, dict) else v))
    return True


def parse_header(blob: bytes) -> dict[str, Any]:
    """The header object of an already-authenticated envelope. Raises ProtocolError, never anything else."""
    if blob[:1] == b"\x78":  # a zlib stream (deflate, 32 KiB window); JSON never starts with "x"
        d = zlib.decompressobj()
        try:
            blob = d.decompress(blob, MAX_HEADER_BYTES + 1)
        except zlib.error as exc:
            raise ProtocolError(Refusal.MALFORMED, f"header is neither JSON nor zlib: {exc}") from None
        if len(blob) > MAX_HEADER_BYTES or d.unconsumed_tail:
            raise ProtocolError(Refusal.OVERSIZED, f"header inflates past {MAX_HEADER_BYTES} bytes")
        if not d.eof or d.unused_data:
            raise ProtocolError(Refusal.MALFORMED, "compressed header is truncated or has trailing bytes")
    if blob.count(b"[") + blob.count(b"{") > MAX_HEADER_BYTES // 8:
        raise ProtocolError(Refusal.MALFORMED, "header has too many nested or listed values")
    try:
        header = json.loads(blob, parse_constant=_bad_constant, parse_float=_finite_float, parse_int=_bounded_int)
    except (UnicodeDecodeError, ValueError) as exc:
        raise ProtocolError(Refusal.MALFORMED, f"header is not JSON: {str(exc)[:200]}") from None
    except RecursionError:
        raise ProtocolError(Refusal.MALFORMED, f"header nests deeper than {MAX_HEADER_DEPTH}") from None
    if not isinstance(header, dict):
        raise ProtocolError(Refusal.MALFORMED, "header is not a JSON object")
    if not _depth_ok(header):
        raise ProtocolError(Refusal.MALFORMED, f"header nests deeper than {MAX_HEADER_DEPTH}")
    return header


# ---------------------------------------------------------------- envelope
def _body(header: dict[str, Any], payload: bytes, auth: int, tag_bytes: int) -> bytes:
    head = _pack_header(header)
    body = b"".join([_PREFIX.pack(MAGIC, VERSION, auth, len(head)), head, _LEN.pack(len(payload)), payload])
    if len(body) + tag_bytes > MAX_MESSAGE_BYTES:
        raise ProtocolError(Refusal.OVERSIZED, f"envelope of {len(body) + tag_bytes} bytes; chunk the payload")
    return body


def seal(header: dict[str, Any], payload: bytes, key: bytes) -> bytes:
    """One uplink envelope, authenticated with the agent's HMAC key."""
    body = _body(header, payload, AUTH_HMAC, MAC_BYTES)
    return body + hmac.new(key, body, hashlib.sha256).digest()


def seal_signed(header: dict[str, Any], payload: bytes, seed: bytes) -> bytes:
    """One downlink envelope, signed with the coordinator's Ed25519 key seed."""
    from fedfleet.edge_agent.wire import signing

    body = _body(header, payload, AUTH_ED25519, SIGNATURE_BYTES)
    return body + signing.sign(seed, SIGN_CONTEXT + body)


def _frame(data: bytes, auth: int, tag_bytes: int, max_bytes: int) -> None:
    """Checks on the fixed-size prefix only (no header byte is read): size, magic, version, auth."""
    if len(data) > max_bytes:
        raise ProtocolError(Refusal.OVERSIZED, f"message of {len(data)} bytes exceeds {max_bytes}")
    if len(data) < _PREFIX.size + _LEN.size + tag_bytes:
        raise ProtocolError(Refusal.MALFORMED, f"message of {len(data)} bytes is too short for an envelope")
    magic, version, got, _ = _PREFIX.unpack_from(data)
    if magic != MAGIC:
        raise ProtocolError(Refusal.MALFORMED, "bad magic: not a fedfleet envelope")
    if version != VERSION:
        raise ProtocolError(Refusal.VERSION, f"envelope version {version}, this build speaks {VERSION}")
    if got != auth:
        raise ProtocolError(Refusal.BAD_AUTH, f"envelope authenticated by scheme {got}, this topic needs {auth}")


def unpack_verified(data: bytes, tag_bytes: int = MAC_BYTES) -> tuple[dict[str, Any], bytes]:
    """Header and payload of an envelope whose frame and tag were already verified."""
    head_len = _PREFIX.unpack_from(data)[3]
    if head_len > MAX_HEADER_BYTES or _PREFIX.size + head_len + _LEN.size + tag_bytes > len(data):
        raise ProtocolError(Refusal.MALFORMED, f"header length {head_len} does not fit the message")
    (pay_len,) = _LEN.unpack_from(data, _PREFIX.size + head_len)
    if _PREFIX.size + head_len + _LEN.size + pay_len + tag_bytes != len(data):
        raise ProtocolError(Refusal.MALFORMED, f"payload length {pay_len} does not match the message size")
    header = parse_header(bytes(data[_PREFIX.size : _PREFIX.size + head_len]))
    start = _PREFIX.size + head_len + _LEN.size
    return header, bytes(data[start:-tag_bytes])


def verify_hmac(data: bytes, key: bytes, *, max_bytes: int = MAX_MESSAGE_BYTES) -> None:
    """Check an uplink envelope's frame and HMAC under `key` without reading its header."""
    _frame(data, AUTH_HMAC, MAC_BYTES, max_bytes)
    body, mac = data[:-MAC_BYTES], data[-MAC_BYTES:]
    if not hmac.compare_digest(mac, hmac.new(key, body, hashlib.sha256).digest()):
        raise ProtocolError(Refusal.BAD_HMAC, "HMAC does not verify under the sender's key")


def open_envelope(data: bytes, key: bytes, *, max_bytes: int = MAX_MESSAGE_BYTES) -> tuple[dict[str, Any], bytes]:
    """Verify an uplink envelope's HMAC under `key` (the key of the id in the topic), then parse it."""
    verify_hmac(data, key, max_bytes=max_bytes)
    return unpack_verified(data, MAC_BYTES)


def open_signed(data: bytes, public: bytes, *, max_bytes: int = MAX_MESSAGE_BYTES,
                verified: Any = None) -> tuple[dict[str, Any], bytes]:
    """Verify a downlink envelope's Ed25519 signature under the pinned coordinator key, then parse it.
    `verified`: a `signing.VerifiedSignatures` shared by the agents of one Host (None: verify every time)."""
    from fedfleet.edge_agent.wire import signing

    _frame(data, AUTH_ED25519, SIGNATURE_BYTES, max_bytes)
    signing.verify(public, SIGN_CONTEXT + bytes(data[:-SIGNATURE_BYTES]), data[-SIGNATURE_BYTES:], cache=verified)
    return unpack_verified(data, SIGNATURE_BYTES)


# ---------------------------------------------------------------- chunking
def _chunks(header: dict[str, Any], payload: bytes, chunk_bytes: int,
            sealer: Callable[[dict[str, Any], bytes], bytes]) -> list[bytes]:
    n = max(1, -(-len(payload) // chunk_bytes))
    base = dict(header)
    base.setdefault("msg", uuid.uuid4().hex)
    base.setdefault("sent", time.time())
    base["digest"] = digest(payload)
    base["total"] = len(payload)
    out = []
    for i in range(n):
        base["chunk"] = [i, n]
        out.append(sealer(base, payload[i * chunk_bytes : (i + 1) * chunk_bytes]))
    return out


def split(header: dict[str, Any], payload: bytes, key: bytes, *, chunk_bytes: int = CHUNK_PAYLOAD_BYTES) -> list[bytes]:
    """Seal `payload` (uplink, HMAC) as n envelopes of at most one MQTT message each, sharing `msg`,
    `digest`, `total`."""
    return _chunks(header, payload, chunk_bytes, lambda h, p: seal(h, p, key))


def split_signed(header: dict[str, Any], payload: bytes, seed: bytes, *,
                 chunk_bytes: int = CHUNK_PAYLOAD_BYTES) -> list[bytes]:
    """Like `split`, for downlink: each chunk signed with the coordinator's Ed25519 seed."""
    return _chunks(header, payload, chunk_bytes, lambda h, p: seal_signed(h, p, seed))


@dataclass
class _Partial:
    header: dict[str, Any]
    parts: dict[int, bytes] = field(default_factory=dict)
    size: int = 0
    first: float = field(default_factory=time.monotonic)


class Reassembler:
    """Collects the chunks of authenticated messages. Caps the size of one message, the number of partial
    messages in flight overall, and per sender both the partial messages and the bytes they hold: a
    sender past its cap loses its own oldest partial messages first (`evicted` counts them), never anyone
    else's."""

    def __init__(self, *, max_total: int = MAX_PAYLOAD_TOTAL, max_pending: int = 4096, timeout_s: float = 600.0,
                 per_sender_pending: int = 4, per_sender_bytes: int | None = None):
        self.max_total = max_total
        self.max_pending = max_pending
        self.timeout_s = timeout_s
        self.per_sender_pending = per_sender_pending
        self.per_sender_bytes = max_total if per_sender_bytes is None else per_sender_bytes
        self.evicted = 0
        self._pending: dict[tuple[str, str], _Partial] = {}
        self._held: dict[str, int] = {}  # sender -> bytes held in its partial messages

    def pending_of(self, sender: str) -> tuple[int, int]:
        """(partial messages, bytes held) for one sender."""
        return sum(1 for s, _ in self._pending if s == sender), self._held.get(sender, 0)

    def add(self, header: dict[str, Any], payload: bytes, sender: str | None = None) -> tuple[dict[str, Any], bytes] | None:
        """Add one verified chunk from `sender` (default: the header's agent); returns (header, whole payload)
        once complete, else None."""
        chunk, total, msg, want = header.get("chunk"), header.get("total"), header.get("msg"), header.get("digest")
        if (
            not isinstance(chunk, list) or len(chunk) != 2 or not all(type(c) is int for c in chunk)
            or type(total) is not int or not isinstance(msg, str) or not isinstance(want, str) or len(msg) > 64
        ):
            raise ProtocolError(Refusal.MALFORMED, "chunk header needs chunk [i, n], total, msg and digest")
        i, n = chunk
        if total < 0 or total > self.max_total:
            raise ProtocolError(Refusal.OVERSIZED, f"message declares {total} bytes, cap is {self.max_total}")
        if not (0 <= i < n) or n > min(65536, total + 1):
            raise ProtocolError(Refusal.MALFORMED, f"chunk {i}/{n} is out of range")
        if n == 1:
            return self._finish(header, payload, total, want)
        self._expire()
        who = str(header.get("agent") if sender is None else sender)
        key = (who, msg)
        part = self._pending.get(key)
        if part is None:
            if len(self._pending) >= self.max_pending:
                raise ProtocolError(Refusal.OVERSIZED, "too many partial messages in flight")
            mine = [k for k in self._pending if k[0] == who]
            while mine and len(mine) >= self.per_sender_pending:
                self._drop(mine.pop(0))
            part = self._pending[key] = _Partial(header)
        if part.header.get("total") != total or part.header.get("chunk", [0, 0])[1] != n:
            self._drop(key)
            raise ProtocolError(Refusal.MALFORMED, "chunks of one message disagree on their size")
        if i in part.parts:
            raise ProtocolError(Refusal.DUPLICATE, f"chunk {i}/{n} received twice")
        if part.size + len(payload) > total:
            self._drop(key)
            raise ProtocolError(Refusal.OVERSIZED, "chunks exceed the declared total")
        while self._held.get(who, 0) + len(payload) > self.per_sender_bytes:
            older = next((k for k in self._pending if k[0] == who and k != key), None)
            if older is None:
                self._drop(key)
                raise ProtocolError(Refusal.OVERSIZED, f"{who} holds more than {self.per_sender_bytes} pending bytes")
            self._drop(older)
        part.size += len(payload)
        self._held[who] = self._held.get(who, 0) + len(payload)
        part.parts[i] = payload
        if len(part.parts) < n:
            return None
        self._drop(key, evicted=False)
        return self._finish(header, b"".join(part.parts[j] for j in range(n)), total, want)

    def _drop(self, key: tuple[str, str], *, evicted: bool = True) -> None:
        part = self._pending.pop(key, None)
        if part is None:
            return
        self.evicted += int(evicted)
        held = self._held.get(key[0], 0) - part.size
        if held > 0:
            self._held[key[0]] = held
        else:
            self._held.pop(key[0], None)

    @staticmethod
    def _finish(header: dict[str, Any], payload: bytes, total: int, want: str) -> tuple[dict[str, Any], bytes]:
        if len(payload) != total:
            raise ProtocolError(Refusal.MALFORMED, f"payload is {len(payload)} bytes, header says {total}")
        if digest(payload) != want:
            raise ProtocolError(Refusal.DIGEST, "payload digest does not match the header")
        return header, payload

    def _expire(self) -> None:
        now = time.monotonic()
        for key in [k for k, p in self._pending.items() if now - p.first > self.timeout_s]:
            self._drop(key)


# ---------------------------------------------------------------- MQTT byte accounting
def _varint_len(n: int) -> int:
    size = 1
    while n >= 128:
        n //= 128
        size += 1
    return size


def mqtt_publish_bytes(topic: str, payload_len: int, qos: int = 1) -> int:
    """Bytes of one MQTT 3.1.1 PUBLISH packet on the wire, plus its PUBACK (4 bytes) at QoS 1."""
    remaining = 2 + len(topic.encode()) + (2 if qos > 0 else 0) + payload_len
    return 1 + _varint_len(remaining) + remaining + (4 if qos == 1 else 0)
