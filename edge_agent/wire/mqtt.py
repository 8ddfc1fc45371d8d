"""One MQTT connection: paho-mqtt 2 with TCP_NODELAY, jittered exponential reconnect and byte counters.

Broker URLs: `mqtt://host:port` (default port 1883) or `mqtts://host:port` (TLS, default 8883; the CA file
comes from `ca_certs`). MQTT 3.1.1 semantics so any broker works; `open_link` (wire/link.py) picks this class for
those URLs. Publishes are QoS 1 by default.
Byte counters hold PUBLISH packet bytes plus PUBACKs (`protocol.mqtt_publish_bytes`), per direction and
per topic; `wire_bytes()` is what the socket really moved (fedfleet.edge_agent.wire.socket_bytes: TCP counters, TLS included).
"""

from __future__ import annotations

import logging
import socket
import threading
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlparse

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from fedfleet.edge_agent.errors import ConfigError
from fedfleet.edge_agent.wire.link_types import MessageHandler, Will
from fedfleet.edge_agent.wire.protocol import mqtt_publish_bytes
from fedfleet.edge_agent.wire.socket_bytes import WireCounter
from fedfleet.edge_agent.wire.traffic import connect_bytes, subscribe_bytes

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BrokerURL:
    host: str
    port: int
    tls: bool

    @classmethod
    def parse(cls, url: str) -> BrokerURL:
        u = urlparse(url)
        if u.scheme not in ("mqtt", "mqtts", "tcp") or not u.hostname:
            raise ConfigError(f"broker URL {url!r} must look like mqtt://host:port or mqtts://host:port")
        try:
            port = u.port
        except ValueError:
            raise ConfigError(f"broker URL {url!r} has a bad port") from None
        return cls(u.hostname, port or (8883 if u.scheme == "mqtts" else 1883), u.scheme == "mqtts")

    def __str__(self) -> str:
        return f"{'mqtts' if self.tls else 'mqtt'}://{self.host}:{self.port}"


def _nodelay(client: paho.Client, userdata: object, sock: object) -> None:
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # type: ignore[attr-defined]
    except (AttributeError, OSError):  # websockets or unusual sockets: leave as is
        pass


class MqttLink:
    """One client (the `Link` protocol of fedfleet.edge_agent.wire.link), driven by a
    `fedfleet.edge_agent.wire.link_loop.LinkLoop`: the `loop` given, one thread for many clients, or else a loop
    of its own. Either way every read and write of the socket happens on that loop's thread (an OpenSSL
    connection must never be read and written from two threads at once: a publish from another thread once
    wrote the TLS socket while the network thread read it, and a process aborted with a corrupted heap).
    Handlers run on that thread: keep them short.

    Each subscription goes in a SUBSCRIBE of its own (one topic per packet): the aedes broker with Redis
    persistence never acknowledges a persistent session's SUBSCRIBE of two or more topics."""

    def __init__(
        self,
        url: str,
        *,
        client_id: str,
        on_message: MessageHandler,
        subscriptions: list[str],
        clean_session: bool = False,
        will: Will | None = None,
        on_connect: Callable[[], None] | None = None,
        username: str | None = None,
        password: str | None = None,
        ca_certs: str | None = None,
        keepalive: int = 30,
        min_backoff_s: float = 0.5,
        max_backoff_s: float = 30.0,
        loop: Any = None,
    ) -> None:
        self.url = BrokerURL.parse(url)
        self._own_loop = loop is None
        if loop is None:
            from fedfleet.edge_agent.wire.link_loop import LinkLoop

            loop = LinkLoop(window=1, connectors=1, name=f"mqtt-{client_id}")
        self._loop = loop
        self._suback_due = 0  # SUBACKs still to come on this connection
        self._on_message_cb = on_message
        self._subscriptions = list(subscriptions)
        self._on_connect_cb = on_connect
        self.min_backoff_s, self.max_backoff_s = min_backoff_s, max_backoff_s
        self.keepalive = keepalive
        self.bytes_sent = 0
        self.bytes_received = 0
        self.bytes_by_topic: Counter[str] = Counter()  # formula bytes per topic, both directions
        self.received_by_topic: Counter[str] = Counter()  # the received part of it
        self.connects = 0  # CONNACKs accepted (first connection and reconnects)
        self._control = [0, 0]  # CONNECT + SUBSCRIBE sent, CONNACK + SUBACK received (wire/traffic.py formulas)
        self._connected_cb_due = False  # a CONNACK was handled: run `on_connect` once paho has re-sent its queue
        self.wire = WireCounter()
        self.client_id, self.will, self.username, self.password = client_id, will, username, password
        self.connected = threading.Event()
        self.subscribed = threading.Event()  # the broker acknowledged our subscriptions (SUBACK)
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self.write_lock = threading.RLock()  # held by a link loop while it writes this link's socket
        c = paho.Client(
            CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=clean_session,
            protocol=paho.MQTTv311,
        )
        c.on_socket_open = self._socket_open
        c.on_socket_close = lambda client, userdata, sock: self.wire.closed(sock)
        c.on_connect = self._handle_connect
        c.on_disconnect = self._handle_disconnect
        c.on_message = self._handle_message
        c.on_subscribe = self._handle_subscribe
        # the loop does all socket I/O: a publish only queues and wakes it
        c.on_socket_register_write = lambda client, userdata, sock: loop.want_write(self)
        c.on_socket_unregister_write = lambda client, userdata, sock: loop._set_write(self, False)
        c.max_inflight_messages_set(64)
        c.max_queued_messages_set(0)
        if username is not None:
            c.username_pw_set(username, password)
        if self.url.tls:
            c.tls_set(ca_certs=ca_certs)
        self._will = will
        self._client = c
        self._set_will()
        self._first = True

    def _set_will(self) -> None:
        """A callable will is asked for a fresh will before every (re)connection, so each connection's will
        can carry its own sequence number."""
        will = self._will() if callable(self._will) else self._will
        self.will_set = will  # the will of the current connection (its bytes count in the CONNECT)
        if will is not None:
            self._client.will_set(will[0], will[1], qos=1, retain=will[2])

    # -------------------------------------------------------------- lifecycle
    def start(self, wait_s: float = 10.0) -> None:
        """Join the loop and wait up to `wait_s` for the first connection and for the broker to acknowledge the
        subscriptions, so messages published after this returns are delivered (0: no wait)."""
        self._loop.add(self)
        if wait_s and not self.connected.wait(wait_s):
            raise ConnectionError(f"could not connect to the MQTT broker at {self.url} within {wait_s:.0f} s")
        if wait_s and self._subscriptions and not self.subscribed.wait(wait_s):
            raise ConnectionError(f"the MQTT broker at {self.url} did not acknowledge our subscriptions")

    def stop(self, *, graceful: bool = True) -> None:
        """Disconnect. `graceful=False` drops the socket without DISCONNECT, so the broker sends the will."""
        self._stop.set()
        self._loop.remove(self, graceful=graceful)
        if self._own_loop:
            self._loop.close()

    def alive(self) -> bool:
        """The thread that drives this link is running, and the link has not been stopped."""
        return self._loop.alive() and not self._stop.is_set()

    # -------------------------------------------------------------- driven by a LinkLoop
    @property
    def client(self) -> paho.Client:
        return self._client

    def open_connection(self) -> None:
        """TCP connect (and TLS handshake) and queue the CONNECT: the first time, or again (a connector thread)."""
        if callable(self._will):
            self._set_will()
        if self._first:
            self._first = False
            self._client.connect(self.url.host, self.url.port, keepalive=self.keepalive)
        else:
            self._client.reconnect()

    def after_read(self) -> None:
        """After the loop read from the socket: the connect handler, once paho has re-sent its queue."""
        if self._connected_cb_due:
            self._connected_cb_due = False
            self._run_on_connect()

    def ready(self) -> bool:
        """Connected and every subscription acknowledged."""
        return self.connected.is_set() and (self.subscribed.is_set() or not self._subscriptions)

    def connection_lost(self) -> None:
        self.connected.clear()
        self.subscribed.clear()

    def drop_socket(self) -> None:
        """Close the socket without DISCONNECT (the broker sends the will)."""
        try:
            self._client._sock_close()  # paho's own close: its on_socket_close books the socket's bytes
        except Exception:  # noqa: BLE001 - best effort
            pass
        self.connection_lost()

    def wire_bytes(self) -> tuple[int, int] | None:
        """(sent, received) bytes on the socket(s) so far, TLS and MQTT control included; None if unknown.
        Sent includes the packets queued for the socket and not yet written (the loop writes a message a moment
        after it is published): MQTT bytes, without the TLS record overhead they will take."""
        totals = self.wire.totals()
        if totals is None or not self.connected.is_set():
            return totals
        # paho takes a packet off the queue before it writes it: read the queue and the kernel's count with no
        # write in between, or a packet in flight is in neither (the loop holds `write_lock` while it writes)
        with self.write_lock:
            totals = self.wire.totals() or totals
            queued = 0
            for packet in list(self._client._out_packet):  # list() of a deque is one C call: a consistent copy
                queued += max(0, int(packet["to_process"]))
        return totals[0] + queued, totals[1]

    def control_bytes(self) -> tuple[int, int]:
        """(sent, received) MQTT control bytes so far: CONNECT and SUBSCRIBE, CONNACK and SUBACK per connection."""
        with self._lock:
            return self._control[0], self._control[1]

    def _run_on_connect(self) -> None:
        if self._on_connect_cb is None or not self.connected.is_set():
            return
        try:
            self._on_connect_cb()
        except Exception:  # a handler bug must never kill the network thread
            log.exception("connect handler of %s failed", self.client_id)

    # -------------------------------------------------------------- callbacks
    def _socket_open(self, client: paho.Client, userdata: object, sock: object) -> None:
        _nodelay(client, userdata, sock)
        self.wire.opened(sock)

    def _handle_connect(self, client, userdata, flags, reason_code, properties) -> None:  # noqa: ANN001
        if reason_code.is_failure:
            log.warning("broker %s refused the connection: %s", self.url, reason_code)
            return
        self._suback_due = len(self._subscriptions)
        for topic in self._subscriptions:
            client.subscribe(topic, 1)
        up, down = connect_bytes(self.client_id, will=self.will_set, username=self.username, password=self.password)
        per_topic = [subscribe_bytes([t]) for t in self._subscriptions]  # one SUBSCRIBE (and SUBACK) each
        sub_up, sub_down = sum(u for u, _ in per_topic), sum(d for _, d in per_topic)
        with self._lock:
            self._control[0] += up + sub_up
            self._control[1] += down + sub_down
        self.connects += 1
        self.connected.set()
        # `on_connect` runs after paho has handled this CONNACK, which re-sends the messages queued or unacked
        # on the previous connection: what the handler publishes now (the new connection's status) goes out
        # after them, so a receiver never sees an older status arrive after a newer one
        self._connected_cb_due = True

    def _handle_subscribe(self, client, userdata, mid, reason_codes, properties) -> None:  # noqa: ANN001
        if any(rc.is_failure for rc in reason_codes):
            log.warning("broker %s refused a subscription: %s", self.url, reason_codes)
        self._suback_due -= 1
        if self._suback_due <= 0:
            self.subscribed.set()

    def _handle_disconnect(self, client, userdata, flags, reason_code, properties) -> None:  # noqa: ANN001
        if self.connected.is_set() and not self._stop.is_set():
            log.info("lost the connection to broker %s (%s); reconnecting", self.url, reason_code)
        self.connected.clear()
        self.subscribed.clear()

    def _handle_message(self, client, userdata, msg: paho.MQTTMessage) -> None:  # noqa: ANN001
        n = mqtt_publish_bytes(msg.topic, len(msg.payload), msg.qos)
        with self._lock:
            self.bytes_received += n
            self.bytes_by_topic[msg.topic] += n
            self.received_by_topic[msg.topic] += n
        try:
            self._on_message_cb(msg.topic, msg.payload)
        except Exception:  # a handler bug must never kill the network thread
            log.exception("message handler failed on %s", msg.topic)

    # -------------------------------------------------------------- publishing
    def publish(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False) -> int:
        """Queue one message; returns its MQTT bytes. QoS 1 messages survive a reconnect."""
        info = self._client.publish(topic, payload, qos=qos, retain=retain)
        queued = (paho.MQTT_ERR_SUCCESS, paho.MQTT_ERR_NO_CONN, paho.MQTT_ERR_CONN_LOST) if qos else (paho.MQTT_ERR_SUCCESS,)
        if info.rc not in queued:  # QoS 1 messages stay in paho's queue and go out after a reconnect
            raise ConnectionError(f"publish to {topic} failed: {paho.error_string(info.rc)}")
        n = mqtt_publish_bytes(topic, len(payload), qos)
        with self._lock:
            self.bytes_sent += n
            self.bytes_by_topic[topic] += n
        return n
