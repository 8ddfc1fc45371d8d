"""The wire contract, v1: topics, the signed envelope, chunking and reassembly. The coordinator imports this.

Topics: `fedfleet/v1/<fleet>/agents/<id>/{status,task,result,telemetry}` and
`fedfleet/v1/<fleet>/broadcast/<name>[/<i>]`. An agent publishes only under its own id.

Envelope (one MQTT message, at most `MAX_MESSAGE_BYTES`):

    magic b"FFLT" | version u8 | header_len u32 BE | header | payload_len u32 BE | payload |
    HMAC-SHA256(key, everything before it) (32 bytes)

The header is a UTF-8 JSON object; when zlib makes it shorter it is sent zlib-compressed (a zlib stream
starts with the byte 0x78, which no JSON text does). Decompression is capped at `MAX_HEADER_BYTES`.

Header fields: `kind` (status|task|result|telemetry|model|state), `fleet`, `agent`, `run`, `round`, `phase`,
`method`, `codec` (a dict), `layout` ([[name, shape], ...]), `chunk` ([i, n]), `msg` (message id), `digest`
(SHA-256 hex of the whole, unchunked payload), `total` (its length), `sent` (unix time), `meta` (free dict).

Keys: every agent has its own key, `derive_key(fleet_secret, agent_id)`, which signs everything that agent
sends and everything the coordinator sends to it. Broadcast envelopes (the model package) are signed with a
public fleet key, `broadcast_key(fleet)`, which gives integrity but not authenticity: the task, signed with
the agent's key, names the package digest, and agents only use a package whose digest the task names.

Decoding is strict and caps sizes before anything is allocated or decompressed.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import struct
import time
import uuid
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from edge_agent.errors import ProtocolError

MAGIC = b"FFLT"
VERSION = 1
MAC_BYTES = 32
MAX_MESSAGE_BYTES = 1 << 20  # one MQTT message, envelope included
MAX_HEADER_BYTES = 32 << 10
MAX_PAYLOAD_TOTAL = 256 << 20  # default cap on a reassembled payload
_PREFIX = struct.Struct(">4sBI")
_LEN = struct.Struct(">I")
CHUNK_PAYLOAD_BYTES = MAX_MESSAGE_BYTES - MAX_HEADER_BYTES - _PREFIX.size - _LEN.size - MAC_BYTES

KINDS = ("status", "task", "result", "telemetry", "model", "state")
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
    return 0 < len(name) <= 64 and all(c.isalnum() or c in "-_." for c in name)


# ---------------------------------------------------------------- keys
def derive_key(fleet_secret: bytes, agent_id: str) -> bytes:
    """The per-agent key: HMAC-SHA256(fleet secret, "fedfleet-agent-key:" + id)."""
    return hmac.new(fleet_secret, b"fedfleet-agent-key:" + agent_id.encode(), hashlib.sha256).digest()


def broadcast_key(fleet: str) -> bytes:
    return hashlib.sha256(b"fedfleet-broadcast:" + fleet.encode()).digest()


def digest(payload: bytes) -> str:
    return hashlib.sha256(payload).hexdigest()


# ---------------------------------------------------------------- envelope
def _pack_header(header: dict[str, Any]) -> bytes:
    raw = json.dumps(header, separators=(",", ":"), allow_nan=False).encode()
    if len(raw) > MAX_HEADER_BYTES:
        raise ProtocolError("oversized", f"header of {len(raw)} bytes exceeds {MAX_HEADER_BYTES}")
    packed = zlib.compress(raw, 9)
    return packed if len(packed) < len(raw) else raw


def _unpack_header(blob: bytes) -> Any:
    if blob[:1] == b"\x78":  # a zlib stream (deflate, 32 KiB window); JSON never starts with "x"
        d = zlib.decompressobj()
        try:
            blob = d.decompress(blob, MAX_HEADER_BYTES + 1)
        except zlib.error as exc:
            raise ProtocolError("malformed", f"header is neither JSON nor zlib: {exc}") from None
        if len(blob) > MAX_HEADER_BYTES or d.unconsumed_tail:
            raise ProtocolError("oversized", f"header inflates past {MAX_HEADER_BYTES} bytes")
        if not d.eof or d.unused_data:
            raise ProtocolError("malformed", "compressed header is truncated or has trailing bytes")
    try:
        return json.loads(blob)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ProtocolError("malformed", f"header is not JSON: {exc}") from None


def seal(header: dict[str, Any], payload: bytes, key: bytes) -> bytes:
    """One signed envelope. Raises ProtocolError if it would exceed one MQTT message."""
    head = _pack_header(header)
    body = b"".join([_PREFIX.pack(MAGIC, VERSION, len(head)), head, _LEN.pack(len(payload)), payload])
    if len(body) + MAC_BYTES > MAX_MESSAGE_BYTES:
        raise ProtocolError("oversized", f"envelope of {len(body) + MAC_BYTES} bytes; chunk the payload")
    return body + hmac.new(key, body, hashlib.sha256).digest()


def peek_header(data: bytes, *, max_bytes: int = MAX_MESSAGE_BYTES) -> dict[str, Any]:
    """Parse the header without checking the MAC (to find whose key to use). Strict about every length."""
    if len(data) > max_bytes:
        raise ProtocolError("oversized", f"message of {len(data)} bytes exceeds {max_bytes}")
    if len(data) < _PREFIX.size + _LEN.size + MAC_BYTES:
        raise ProtocolError("malformed", f"message of {len(data)} bytes is too short for an envelope")
    magic, version, head_len = _PREFIX.unpack_from(data)
    if magic != MAGIC:
        raise ProtocolError("malformed", "bad magic: not a fedfleet envelope")
    if version != VERSION:
        raise ProtocolError("version", f"envelope version {version}, this build speaks {VERSION}")
    if head_len > MAX_HEADER_BYTES or _PREFIX.size + head_len + _LEN.size + MAC_BYTES > len(data):
        raise ProtocolError("malformed", f"header length {head_len} does not fit the message")
    header = _unpack_header(bytes(data[_PREFIX.size : _PREFIX.size + head_len]))
    if not isinstance(header, dict):
        raise ProtocolError("malformed", "header is not a JSON object")
    (pay_len,) = _LEN.unpack_from(data, _PREFIX.size + head_len)
    if _PREFIX.size + head_len + _LEN.size + pay_len + MAC_BYTES != len(data):
        raise ProtocolError("malformed", f"payload length {pay_len} does not match the message size")
    return header


def open_envelope(
    data: bytes, key_for: Callable[[dict[str, Any]], bytes | None], *, max_bytes: int = MAX_MESSAGE_BYTES
) -> tuple[dict[str, Any], bytes]:
    """Verify and split one envelope. `key_for(header)` returns the key, or None for an unknown sender."""
    header = peek_header(data, max_bytes=max_bytes)
    key = key_for(header)
    if key is None:
        raise ProtocolError("unknown_agent", f"no key for agent {str(header.get('agent'))[:64]!r}")
    body, mac = data[:-MAC_BYTES], data[-MAC_BYTES:]
    if not hmac.compare_digest(mac, hmac.new(key, body, hashlib.sha256).digest()):
        raise ProtocolError("bad_hmac", "HMAC does not verify under the sender's key")
    head_len = _PREFIX.unpack_from(data)[2]
    start = _PREFIX.size + head_len + _LEN.size
    return header, bytes(data[start:-MAC_BYTES])


# ---------------------------------------------------------------- chunking
def split(header: dict[str, Any], payload: bytes, key: bytes, *, chunk_bytes: int = CHUNK_PAYLOAD_BYTES) -> list[bytes]:
    """Seal `payload` as n envelopes of at most one MQTT message each, sharing `msg`, `digest`, `total`."""
    n = max(1, -(-len(payload) // chunk_bytes))
    base = dict(header)
    base.setdefault("msg", uuid.uuid4().hex)
    base.setdefault("sent", time.time())
    base["digest"] = digest(payload)
    base["total"] = len(payload)
    out = []
    for i in range(n):
        base["chunk"] = [i, n]
        out.append(seal(base, payload[i * chunk_bytes : (i + 1) * chunk_bytes], key))
    return out


@dataclass
class _Partial:
    header: dict[str, Any]
    parts: dict[int, bytes] = field(default_factory=dict)
    size: int = 0
    first: float = field(default_factory=time.monotonic)


class Reassembler:
    """Collects the chunks of messages. Caps the total size and the number of partial messages in flight."""

    def __init__(self, *, max_total: int = MAX_PAYLOAD_TOTAL, max_pending: int = 4096, timeout_s: float = 600.0):
        self.max_total = max_total
        self.max_pending = max_pending
        self.timeout_s = timeout_s
        self._pending: dict[tuple[str, str], _Partial] = {}

    def add(self, header: dict[str, Any], payload: bytes) -> tuple[dict[str, Any], bytes] | None:
        """Add one verified chunk; returns (header, whole payload) once complete, else None."""
        chunk, total, msg, want = header.get("chunk"), header.get("total"), header.get("msg"), header.get("digest")
        if (
            not isinstance(chunk, list) or len(chunk) != 2 or not all(isinstance(c, int) for c in chunk)
            or not isinstance(total, int) or not isinstance(msg, str) or not isinstance(want, str)
        ):
            raise ProtocolError("malformed", "chunk header needs chunk [i, n], total, msg and digest")
        i, n = chunk
        if total < 0 or total > self.max_total:
            raise ProtocolError("oversized", f"message declares {total} bytes, cap is {self.max_total}")
        if not (0 <= i < n) or n > min(65536, total + 1):
            raise ProtocolError("malformed", f"chunk {i}/{n} is out of range")
        if n == 1:
            return self._finish(header, payload, total, want)
        self._expire()
        key = (str(header.get("agent")), msg)
        part = self._pending.get(key)
        if part is None:
            if len(self._pending) >= self.max_pending:
                raise ProtocolError("oversized", "too many partial messages in flight")
            part = self._pending[key] = _Partial(header)
        if part.header.get("total") != total or part.header.get("chunk", [0, 0])[1] != n:
            del self._pending[key]
            raise ProtocolError("malformed", "chunks of one message disagree on their size")
        if i in part.parts:
            raise ProtocolError("duplicate", f"chunk {i}/{n} received twice")
        part.size += len(payload)
        if part.size > total:
            del self._pending[key]
            raise ProtocolError("oversized", "chunks exceed the declared total")
        part.parts[i] = payload
        if len(part.parts) < n:
            return None
        del self._pending[key]
        return self._finish(header, b"".join(part.parts[j] for j in range(n)), total, want)

    @staticmethod
    def _finish(header: dict[str, Any], payload: bytes, total: int, want: str) -> tuple[dict[str, Any], bytes]:
        if len(payload) != total:
            raise ProtocolError("malformed", f"payload is {len(payload)} bytes, header says {total}")
        if digest(payload) != want:
            raise ProtocolError("digest", "payload digest does not match the header")
        return header, payload

    def _expire(self) -> None:
        now = time.monotonic()
        for key in [k for k, p in self._pending.items() if now - p.first > self.timeout_s]:
            del self._pending[key]


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
