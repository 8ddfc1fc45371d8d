"""The transport seam: the `Link` protocol the engine and the agent talk through, and `open_link(url, ...)`.

A link is one client connection to a publish/subscribe broker with MQTT 3.1.1 semantics: topic filters
with `+` and `#`, retained messages, a last will, QoS 0/1, persistent or clean sessions. Two implement it:

- `mqtt://host:port` / `mqtts://host:port`: `fedfleet.edge_agent.wire.mqtt.MqttLink` (paho-mqtt, a real broker);
- `memory://<name>`: `fedfleet.edge_agent.wire.memory.MemoryLink`, a client of the in-process
  `MemoryBroker` registered under that name (no sockets; for benchmarks, tests and broker-free demos).

Both count bytes by the MQTT framing formula (`protocol.mqtt_publish_bytes`), so a ledger written over one
agrees with a ledger written over the other. Message handlers run on the link's own thread, never on the
publisher's.
"""

from __future__ import annotations

import threading
from collections import Counter
from typing import Any, Protocol, runtime_checkable

from fedfleet.edge_agent.errors import ConfigError
from fedfleet.edge_agent.wire.link_types import ConnectHandler, MessageHandler, Will, WillMessage

__all__ = ["ConnectHandler", "Link", "MessageHandler", "Will", "WillMessage", "open_link"]


@runtime_checkable
class Link(Protocol):
    """One broker connection. Handlers (`on_message`, `on_connect`) run on the link's thread: keep them short."""

    client_id: str
    connected: threading.Event  # set while connected
    subscribed: threading.Event  # set once the broker acknowledged the subscriptions of this connection
    bytes_sent: int  # PUBLISH bytes by the MQTT 3.1.1 formula (PUBACK included at QoS 1)
    bytes_received: int
    bytes_by_topic: Counter[str]  # formula bytes per topic, both directions
    connects: int  # accepted connections (the first and every reconnect)
    will_set: WillMessage | None  # the will of the current connection

    def start(self, wait_s: float = 10.0) -> None:
        """Connect and subscribe; wait up to `wait_s` until messages published after return are delivered."""
        ...

    def stop(self, *, graceful: bool = True) -> None:
        """Disconnect; `graceful=False` drops the connection so the broker publishes the will."""
        ...

    def publish(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False) -> int:
        """Send one message; returns its MQTT bytes (the formula, as counted in `bytes_sent`)."""
        ...

    def wire_bytes(self) -> tuple[int, int] | None:
        """(sent, received) bytes the connection really moved, control packets and TLS included; None if
        there is no socket to measure."""
        ...


def check_url(url: str) -> None:
    """ConfigError unless `url` is a broker URL `open_link` takes (scheme, host and a port in 1..65535):
    checked before a command creates anything."""
    scheme = url.split("://", 1)[0] if isinstance(url, str) and "://" in url else ""
    if scheme == "memory":
        return
    if scheme in ("mqtt", "mqtts", "tcp"):
        from fedfleet.edge_agent.wire.mqtt import BrokerURL

        if BrokerURL.parse(url).port == 0:
            raise ConfigError(f"broker URL {url!r} has a bad port")
        return
    raise ConfigError(f"broker URL {url!r} must look like mqtt://host:port, mqtts://host:port or memory://name")


def open_link(
    url: str,
    *,
    client_id: str,
    on_message: MessageHandler,
    subscriptions: list[str],
    clean_session: bool = False,
    will: Will | None = None,
    on_connect: ConnectHandler | None = None,
    username: str | None = None,
    password: str | None = None,
    ca_certs: str | None = None,
    loop: Any = None,
) -> Link:
    """The link for a broker URL: `mqtt://`, `mqtts://` (paho) or `memory://<name>` (in-process).

    The in-memory broker has no accounts: `username`, `password` and `ca_certs` are ignored for it (every
    message is still authenticated by its envelope's MAC or signature). `loop`: a
    `fedfleet.edge_agent.wire.link_loop.LinkLoop` that drives an MQTT link with many others (ignored for memory)."""
    scheme = url.split("://", 1)[0] if "://" in url else ""
    if scheme == "memory":
        from fedfleet.edge_agent.wire.memory import MemoryLink

        return MemoryLink(url, client_id=client_id, on_message=on_message, subscriptions=subscriptions,
                          clean_session=clean_session, will=will, on_connect=on_connect)
    if scheme in ("mqtt", "mqtts", "tcp"):
        from fedfleet.edge_agent.wire.mqtt import MqttLink  # paho is imported only for a real broker

        return MqttLink(url, client_id=client_id, on_message=on_message, subscriptions=subscriptions,
                        clean_session=clean_session, will=will, on_connect=on_connect, username=username,
                        password=password, ca_certs=ca_certs, loop=loop)
    raise ConfigError(f"broker URL {url!r} must look like mqtt://host:port, mqtts://host:port or memory://name")
