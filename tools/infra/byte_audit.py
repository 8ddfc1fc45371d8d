"""Reconcile the ledger's bytes with Mosquitto's own count (`$SYS/broker/bytes/received` and `/sent`).

The ledger books each result and task once, by the MQTT framing formula (`protocol.mqtt_publish_bytes`:
the PUBLISH packet plus its PUBACK). The broker counts every byte it reads and writes, so each of those
messages twice (received from its sender, sent to its one subscriber). The round's state broadcast
(`broadcast/state`) is booked in the ledger once per agent that receives it (what each agent receives);
the broker reads it once from the coordinator and writes it once to each subscribed agent, which is what
the clients' per-topic counters see (the coordinator's link counts its one send). What the ledger leaves
out, by design, and how it is counted here:
- status (retained, with a last will), telemetry and the model package (retained, fanned out to every
  agent, and sent again to each agent that subscribes later): the same formula, from the per-topic counters
  every `MqttLink` keeps at both ends (`bytes_by_topic`);
- CONNECT/CONNACK, SUBSCRIBE/SUBACK and DISCONNECT: the MQTT 3.1.1 packet formulas below, per connection;
- keep-alives (PINGREQ/PINGRESP, 4 bytes a round trip): not counted (at most one per client per keep-alive
  interval of idle time; a few tens of bytes in a demo);
- the observer's own traffic (its $SYS messages): taken out by its socket's byte counters.

`SysObserver(url)` subscribes to the broker's byte counters (start Mosquitto with `sys_interval 1`);
`reconcile(...)` returns the breakdown as a dict.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Any

from fedfleet.edge_agent.wire.mqtt import MqttLink
from fedfleet.edge_agent.wire.traffic import topic_category

SYS_TOPICS = ("$SYS/broker/bytes/received", "$SYS/broker/bytes/sent")


def control_bytes(link: MqttLink, *, graceful_stop: bool = True) -> int:
    """The control packets of one link over its connections (keep-alives not included): CONNECT/CONNACK and
    SUBSCRIBE/SUBACK as the link counted them (`fedfleet.edge_agent.wire.traffic`), plus DISCONNECT."""
    return sum(link.control_bytes()) + (2 if graceful_stop else 0)


def topic_kind(topic: str) -> str:
    """'result', 'task', 'status', 'telemetry' for agent topics, 'model' for the package, else 'other'."""
    return topic_category(topic)


@dataclass
class SysSample:
    at: float
    received: int
    sent: int
    observer_wire: int  # the observer's own socket bytes (both directions) when this sample arrived


class SysObserver:
    """Follows `$SYS/broker/bytes/{received,sent}`; each complete pair becomes a SysSample."""

    def __init__(self, url: str, *, username: str | None = None, password: str | None = None) -> None:
        self.samples: list[SysSample] = []
        self._partial: dict[str, int] = {}
        self._cond = threading.Condition()
        self.link = MqttLink(url, client_id=f"fedfleet-byte-audit-{time.monotonic_ns()}", on_message=self._on,
                             subscriptions=list(SYS_TOPICS), clean_session=True, username=username,
                             password=password)
        self.link.start()

    def _on(self, topic: str, payload: bytes) -> None:
        try:
            value = int(payload.decode().strip())
        except (UnicodeDecodeError, ValueError):
            return
        self._partial[topic] = value
        if len(self._partial) == 2:
            wire = self.link.wire_bytes() or (0, 0)
            sample = SysSample(time.time(), self._partial[SYS_TOPICS[0]], self._partial[SYS_TOPICS[1]], sum(wire))
            self._partial = {}
            with self._cond:
                self.samples.append(sample)
                self._cond.notify_all()

    def sample_after(self, t: float, timeout_s: float = 30.0) -> SysSample:
        """The first sample that arrived after wall time `t` (waits for it)."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while True:
                later = [s for s in self.samples if s.at > t]
                if later:
                    return later[0]
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"no $SYS byte counters after {t}: is sys_interval set on the broker?")
                self._cond.wait(left)

    def stop(self) -> None:
        self.link.stop()


def reconcile(ledger_bytes: int, links: list[MqttLink], before: SysSample, after: SysSample) -> dict[str, Any]:
    """The broker's count over [before, after] against 2 x the ledger plus the documented exclusions."""
    by_kind: dict[str, int] = {}
    state_received = 0  # the state broadcast at the agents' ends: the part of the ledger that is broadcast
    for link in links:
        for topic, n in link.bytes_by_topic.items():
            kind = topic_kind(topic)
            by_kind[kind] = by_kind.get(kind, 0) + n
            if kind == "state" and not link.client_id.startswith("fedfleet-coordinator"):
                state_received += n
    control = sum(control_bytes(link) for link in links)
    excluded = {k: v for k, v in by_kind.items() if k not in ("result", "task", "state")}
    state_published = by_kind.get("state", 0) - state_received
    expected = 2 * (ledger_bytes - state_received) + state_received + state_published + sum(excluded.values()) + control
    broker_total = (after.received - before.received) + (after.sent - before.sent)
    observer = after.observer_wire - before.observer_wire
    counted = broker_total - observer
    wires = [link.wire_bytes() for link in links]
    sockets = sum(sum(w) for w in wires) if all(w is not None for w in wires) else None
    return {
        "broker_bytes": counted, "broker_raw": broker_total, "observer_bytes": observer,
        "ledger_bytes": ledger_bytes, "ledger_kinds_at_clients": by_kind.get("result", 0) + by_kind.get("task", 0),
        "state_received": state_received, "state_published": state_published,
        "excluded": {**excluded, "control": control}, "expected": expected,
        "rel_error": (expected - counted) / counted if counted else None,
        "client_socket_bytes": sockets,
        "socket_rel_error": (sockets - counted) / counted if counted and sockets is not None else None,
    }
