"""An in-process broker with the MQTT 3.1.1 semantics fedfleet relies on, and its client, `MemoryLink`.

`MemoryBroker(name)` registers itself in a process-wide registry; `MemoryLink("memory://<name>", ...)`
(usually through `fedfleet.edge_agent.wire.link.open_link`) finds it there. What it keeps of MQTT:

- topic filters with `+` (one level) and `#` (the rest, the parent level included); topics that start
  with `$` match no filter that starts with a wildcard;
- retained messages (the newest per topic; an empty retained payload clears it), sent to each new
  subscription that matches;
- a last will, published when a link stops ungracefully (`stop(graceful=False)`) or is taken over by a
  new connection with its client id; a callable will is asked for a fresh one on every connection;
- persistent sessions (`clean_session=False`): QoS 1 messages that arrive while the client is away wait
  for its next connection;
- delivery exactly once per subscriber (overlapping filters included), in publication order, on the
  subscriber's own thread: a handler never runs on the publisher's thread, as with paho.

Bytes are counted by the MQTT 3.1.1 framing formula (`protocol.mqtt_publish_bytes`: fixed header, topic,
packet id, payload, and the PUBACK at QoS 1), exactly as `MqttLink` counts them, so ledgers of a memory run
and an MQTT run agree. There is no authentication: envelopes carry their own MACs and signatures.
"""

from __future__ import annotations

import logging
import queue
import secrets
import threading
from collections import Counter
from dataclasses import dataclass, field

from fedfleet.edge_agent.errors import ConfigError
from fedfleet.edge_agent.wire.link_types import ConnectHandler, MessageHandler, Will, WillMessage
from fedfleet.edge_agent.wire.protocol import mqtt_publish_bytes

log = logging.getLogger(__name__)

__all__ = ["MemoryBroker", "MemoryLink", "MemoryURL", "check_filter", "find_broker", "topic_matches"]

_REGISTRY: dict[str, MemoryBroker] = {}
_REGISTRY_LOCK = threading.Lock()


@dataclass(frozen=True)
class MemoryURL:
    name: str

    @classmethod
    def parse(cls, url: str) -> MemoryURL:
        name = url[len("memory://"):] if url.startswith("memory://") else ""
        if not name or "/" in name:
            raise ConfigError(f"broker URL {url!r} must look like memory://<name> (a name without '/')")
        return cls(name)

    def __str__(self) -> str:
        return f"memory://{self.name}"


def find_broker(name: str) -> MemoryBroker:
    """The in-process broker registered under `name`."""
    with _REGISTRY_LOCK:
        broker = _REGISTRY.get(name)
    if broker is None:
        raise ConnectionError(f"no in-memory broker named {name!r} runs in this process: start one first "
                              "(MemoryBroker(name) or start_broker('memory'))")
    return broker


def check_filter(topic_filter: str) -> None:
    """Refuse a filter MQTT would refuse: empty, `#` not alone in the last level, `+` not alone in its level."""
    levels = topic_filter.split("/")
    ok = bool(topic_filter) and all(
        (lv == "#" and i == len(levels) - 1) or lv == "+" or ("#" not in lv and "+" not in lv)
        for i, lv in enumerate(levels))
    if not ok:
        raise ConfigError(f"topic filter {topic_filter!r} is not a valid MQTT filter: '+' and '#' must fill a "
                          "whole level and '#' must be last")


def topic_matches(topic_filter: str, topic: str) -> bool:
    """MQTT 3.1.1 matching of a topic name against a filter (section 4.7)."""
    if topic.startswith("$") and topic_filter[:1] in ("+", "#"):
        return False
    f_levels, t_levels = topic_filter.split("/"), topic.split("/")
    for i, lv in enumerate(f_levels):
        if lv == "#":
            return True  # the rest, including the parent level itself ("a/#" matches "a")
        if i >= len(t_levels) or (lv != "+" and lv != t_levels[i]):
            return False
    return len(f_levels) == len(t_levels)


@dataclass
class _Session:
    filters: list[str]
    clean: bool
    link: MemoryLink | None = None
    backlog: list[tuple[str, bytes, int]] = field(default_factory=list)  # QoS 1 messages while away


class MemoryBroker:
    """An in-process broker, registered by name until `close()`."""

    kind = "memory"

    def __init__(self, name: str | None = None) -> None:
        self.name = name or f"broker-{secrets.token_hex(6)}"
        MemoryURL.parse(f"memory://{self.name}")  # a valid name
        self._lock = threading.Lock()
        self._sessions: dict[str, _Session] = {}
        self.retained: dict[str, tuple[bytes, int]] = {}
        self.messages = 0  # PUBLISH packets received (wills included)
        with _REGISTRY_LOCK:
            if self.name in _REGISTRY:
                raise ConfigError(f"an in-memory broker named {self.name!r} already runs in this process: "
                                  "pick another name")
            _REGISTRY[self.name] = self

    @property
    def url(self) -> str:
        return f"memory://{self.name}"

    def close(self) -> None:
        """Unregister and drop every connection (no wills: the broker went away, not the clients)."""
        with _REGISTRY_LOCK:
            if _REGISTRY.get(self.name) is self:
                del _REGISTRY[self.name]
        with self._lock:
            links = [s.link for s in self._sessions.values() if s.link is not None]
            self._sessions.clear()
            self.retained.clear()
        for link in links:
            link._dropped()

    def __enter__(self) -> MemoryBroker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -------------------------------------------------------------- connections
    def connect(self, link: MemoryLink) -> None:
        """Attach `link` (taking over its client id), queue its connect callback, then what its session
        kept and the retained messages its filters match."""
        taken: MemoryLink | None = None
        with self._lock:
            if link.client_id not in self._sessions and _REGISTRY.get(self.name) is not self:
                raise ConnectionError(f"the in-memory broker {self.name!r} was closed")
            session = self._sessions.get(link.client_id)
            if session is not None and session.link is not None and session.link is not link:
                taken = session.link  # MQTT: a second connection with the same id closes the first
                if taken.will_set is not None:
                    self._publish(*taken.will_set[:2], 1, taken.will_set[2])
            if session is None or session.clean or link.clean_session:
                session = self._sessions[link.client_id] = _Session(list(link.subscriptions), link.clean_session)
            else:
                session.filters = list(dict.fromkeys([*session.filters, *link.subscriptions]))
            session.link = link
            link._attached()
            for item in session.backlog:
                link._enqueue(item)
            session.backlog.clear()
            for topic, (payload, qos) in self.retained.items():
                if any(topic_matches(f, topic) for f in link.subscriptions):
                    link._enqueue((topic, payload, min(qos, 1)))
        if taken is not None:
            taken._dropped()

    def disconnect(self, link: MemoryLink, *, graceful: bool) -> None:
        """Detach `link`; an ungraceful end publishes its will. A persistent session stays for its return."""
        with self._lock:
            session = self._sessions.get(link.client_id)
            if session is None or session.link is not link:
                return  # taken over or the broker closed: nothing of ours to end
            session.link = None
            if session.clean:
                del self._sessions[link.client_id]
            if not graceful and link.will_set is not None:
                self._publish(*link.will_set[:2], 1, link.will_set[2])

    # -------------------------------------------------------------- messages
    def publish(self, topic: str, payload: bytes, qos: int, retain: bool) -> None:
        if not topic or "+" in topic or "#" in topic:
            raise ConfigError(f"cannot publish to {topic!r}: a topic name must be non-empty and hold no wildcard")
        with self._lock:
            self._publish(topic, bytes(payload), qos, retain)

    def _publish(self, topic: str, payload: bytes, qos: int, retain: bool) -> None:
        """Route one message under the lock, so every subscriber sees publications in one order."""
        self.messages += 1
        if retain:
            if payload:
                self.retained[topic] = (payload, qos)
            else:
                self.retained.pop(topic, None)
        for session in self._sessions.values():
            if not any(topic_matches(f, topic) for f in session.filters):
                continue
            item = (topic, payload, min(qos, 1))
            if session.link is not None:
                session.link._enqueue(item)
            elif not session.clean and qos > 0:
                session.backlog.append(item)


class MemoryLink:
    """A client of an in-process `MemoryBroker`, with its own delivery thread (the `Link` protocol)."""

    def __init__(
        self,
        url: str,
        *,
        client_id: str,
        on_message: MessageHandler,
        subscriptions: list[str],
        clean_session: bool = False,
        will: Will | None = None,
        on_connect: ConnectHandler | None = None,
    ) -> None:
        self.url = MemoryURL.parse(url)
        for f in subscriptions:
            check_filter(f)
        self.client_id = client_id
        self.subscriptions = list(subscriptions)
        self.clean_session = clean_session
        self._on_message_cb = on_message
        self._on_connect_cb = on_connect
        self._will = will
        self.will_set: WillMessage | None = None
        self.bytes_sent = 0
        self.bytes_received = 0
        self.bytes_by_topic: Counter[str] = Counter()
        self.received_by_topic: Counter[str] = Counter()
        self.connects = 0
        self.connected = threading.Event()
        self.subscribed = threading.Event()
        self._lock = threading.Lock()
        self._queue: queue.SimpleQueue[tuple[str, bytes, int] | str | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._broker: MemoryBroker | None = None

    # -------------------------------------------------------------- lifecycle
    def start(self, wait_s: float = 10.0) -> None:
        """Connect to the named broker. Subscriptions hold when this returns (`wait_s` is not needed: the
        connection is immediate; it is kept for the `Link` signature)."""
        del wait_s
        broker = find_broker(self.url.name)
        self.will_set = self._will() if callable(self._will) else self._will
        if self._thread is None or not self._thread.is_alive():
            self._queue = queue.SimpleQueue()
            self._thread = threading.Thread(target=self._run, name=f"memory-{self.client_id}", daemon=True)
            self._thread.start()
        self._broker = broker
        broker.connect(self)

    def stop(self, *, graceful: bool = True) -> None:
        """Disconnect; `graceful=False` makes the broker publish the will. Undelivered messages are dropped."""
        broker, self._broker = self._broker, None
        if broker is not None:
            broker.disconnect(self, graceful=graceful)
        self._dropped()
        self._queue.put(None)
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)

    def wire_bytes(self) -> tuple[int, int] | None:
        """None: there is no socket (the formula counters are `bytes_sent`/`bytes_received`)."""
        return None

    # -------------------------------------------------------------- broker side (under the broker's lock)
    def _attached(self) -> None:
        self.connects += 1
        self.connected.set()
        self.subscribed.set()
        self._queue.put("connect")  # the callback runs on our thread, before anything the session delivers

    def _enqueue(self, item: tuple[str, bytes, int]) -> None:
        self._queue.put(item)

    def _dropped(self) -> None:
        self.connected.clear()
        self.subscribed.clear()

    # -------------------------------------------------------------- delivery thread
    def _run(self) -> None:
        q = self._queue
        while True:
            item = q.get()
            if item is None:
                return
            if not self.connected.is_set():
                continue  # disconnected: what was queued for the old connection is lost, as on a socket
            if item == "connect":
                if self._on_connect_cb is not None:
                    try:
                        self._on_connect_cb()
                    except Exception:  # a handler bug must never kill the delivery thread
                        log.exception("connect handler of %s failed", self.client_id)
                continue
            topic, payload, qos = item  # type: ignore[misc]
            n = mqtt_publish_bytes(topic, len(payload), qos)
            with self._lock:
                self.bytes_received += n
                self.bytes_by_topic[topic] += n
                self.received_by_topic[topic] += n
            try:
                self._on_message_cb(topic, payload)
            except Exception:
                log.exception("message handler failed on %s", topic)

    # -------------------------------------------------------------- publishing
    def publish(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False) -> int:
        """Hand one message to the broker; returns its MQTT bytes. Delivery happens on the subscribers' threads."""
        broker = self._broker
        if broker is None or not self.connected.is_set():
            raise ConnectionError(f"publish to {topic} failed: {self.client_id} is not connected to {self.url}")
        broker.publish(topic, payload, qos, retain)
        n = mqtt_publish_bytes(topic, len(payload), qos)
        with self._lock:
            self.bytes_sent += n
            self.bytes_by_topic[topic] += n
        return n
