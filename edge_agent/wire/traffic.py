"""What a device's connection carried, by category: the books an agent reports and the ledger keeps.

Categories (`CATEGORIES`), each counted by the MQTT 3.1.1 framing formula (`protocol.mqtt_publish_bytes`: the
PUBLISH packet plus its PUBACK) from the link's per-topic counters, except `control`:
- `model`: the model package (retained, fanned out, sent again to agents that subscribe later);
- `state`: the round's state broadcast as this agent received it;
- `task`, `result`: the round's task and the agent's upload;
- `status`, `telemetry`: the agent's status (retained, and its will) and telemetry;
- `control`: CONNECT/CONNACK, SUBSCRIBE/SUBACK per connection (the packet formulas below). Keep-alives
  (PINGREQ/PINGRESP, 2 bytes each way, only after `keepalive` seconds without traffic) are not counted.

`TrafficCounter(link).take()` gives the bytes by category (and the socket's own TCP counts, TLS included,
where the platform can tell) since the previous `take()`: an agent sends them with each energy/bytes
telemetry report, so every byte is reported once, in the report that follows it.
"""

from __future__ import annotations

import threading
from typing import Any

from fedfleet.edge_agent.wire import protocol
from fedfleet.edge_agent.wire.protocol import _varint_len

CATEGORIES = ("model", "state", "task", "result", "status", "telemetry", "control")
UP = frozenset({"result", "status", "telemetry"})  # categories a device sends (the rest it receives)


def _packet(remaining: int) -> int:
    return 1 + _varint_len(remaining) + remaining


def _s(text: str | bytes | None) -> int:
    """A length-prefixed MQTT string or binary field."""
    if text is None:
        return 0
    return 2 + len(text.encode() if isinstance(text, str) else text)


def connect_bytes(client_id: str, *, will: tuple[str, bytes, bool] | None = None, username: str | None = None,
                  password: str | None = None) -> tuple[int, int]:
    """(CONNECT, CONNACK): MQTT 3.1.1, a 10-byte variable header, then client id, will, user name, password."""
    remaining = 10 + _s(client_id)
    if will is not None:
        remaining += _s(will[0]) + _s(will[1])
    if username is not None:
        remaining += _s(username) + (_s(password) if password is not None else 0)
    return _packet(remaining), 4


def subscribe_bytes(topics: list[str]) -> tuple[int, int]:
    """(SUBSCRIBE, SUBACK) for one SUBSCRIBE of all `topics` (packet id, then topic + QoS each)."""
    if not topics:
        return 0, 0
    return _packet(2 + sum(_s(t) + 1 for t in topics)), _packet(2 + len(topics))


def topic_category(topic: str) -> str:
    """The category of an MQTT topic: an agent topic's kind, 'model', 'state', or 'other'."""
    parsed = protocol.parse_agent_topic(topic)
    if parsed is not None:
        return parsed[2]
    if "/broadcast/model/" in topic:
        return "model"
    return "state" if topic.endswith("/broadcast/state") else "other"


def by_category(bytes_by_topic: dict[str, int], control: tuple[int, int] = (0, 0),
                received_by_topic: dict[str, int] | None = None) -> dict[str, list[int]]:
    """{category: [up, down]} of one device from its link's per-topic formula bytes (both directions, and the
    received part where the link keeps it) and control bytes. A topic of an unknown kind counts as `control`."""
    out = {c: [0, 0] for c in CATEGORIES}
    for topic, n in bytes_by_topic.items():
        cat = topic_category(topic)
        cat = cat if cat in out else "control"
        if received_by_topic is None:
            out[cat][0 if cat in UP else 1] += int(n)
        else:
            down = int(received_by_topic.get(topic, 0))
            out[cat][0] += int(n) - down
            out[cat][1] += down
    out["control"][0] += int(control[0])
    out["control"][1] += int(control[1])
    return out


class TrafficCounter:
    """Bytes by category and socket bytes of one agent's link, handed out once each (`take`)."""

    def __init__(self, link: Any) -> None:
        self.link = link  # a callable giving the current link, or the link
        self._lock = threading.Lock()
        self._sent: dict[str, list[int]] = {c: [0, 0] for c in CATEGORIES}
        self._wire: tuple[int, int] = (0, 0)

    def _link(self) -> Any:
        return self.link() if callable(self.link) else self.link

    def totals(self) -> tuple[dict[str, list[int]], tuple[int, int] | None]:
        """(bytes by category, socket (sent, received)) since the link was made."""
        link = self._link()
        control = link.control_bytes() if hasattr(link, "control_bytes") else (0, 0)
        received = getattr(link, "received_by_topic", None)
        return (by_category(dict(link.bytes_by_topic), control, None if received is None else dict(received)),
                link.wire_bytes())

    def take(self) -> dict[str, Any]:
        """{"traffic": {category: [up, down]}, "wire": [up, down] or None} since the previous take."""
        with self._lock:
            now, wire = self.totals()
            if any(now[c][i] < self._sent[c][i] for c in CATEGORIES for i in (0, 1)):
                self._sent = {c: [0, 0] for c in CATEGORIES}  # a new link (an agent restarted): counts from zero
            if wire is not None and (wire[0] < self._wire[0] or wire[1] < self._wire[1]):
                self._wire = (0, 0)
            delta = {c: [now[c][0] - self._sent[c][0], now[c][1] - self._sent[c][1]] for c in CATEGORIES}
            self._sent = now
            wire_delta = None
            if wire is not None:
                wire_delta = [wire[0] - self._wire[0], wire[1] - self._wire[1]]
                self._wire = wire
            return {"traffic": {c: v for c, v in delta.items() if v != [0, 0]}, "wire": wire_delta}
