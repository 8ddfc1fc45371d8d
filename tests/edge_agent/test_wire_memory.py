"""The in-process broker and MemoryLink: topic filters, retained messages, wills, sessions, ordering, bytes."""

from __future__ import annotations

import threading
import time

import pytest

from fedfleet.edge_agent.errors import ConfigError
from fedfleet.edge_agent.wire import protocol
from fedfleet.edge_agent.wire.link import Link, open_link
from fedfleet.edge_agent.wire.memory import MemoryBroker, MemoryLink, check_filter, topic_matches


class Inbox:
    """What a link received, in order, with the thread each message arrived on."""

    def __init__(self) -> None:
        self.items: list[tuple[str, bytes]] = []
        self.threads: set[int] = set()
        self._cv = threading.Condition()

    def __call__(self, topic: str, payload: bytes) -> None:
        with self._cv:
            self.items.append((topic, payload))
            self.threads.add(threading.get_ident())
            self._cv.notify_all()

    def wait(self, n: int, timeout: float = 5.0) -> list[tuple[str, bytes]]:
        with self._cv:
            assert self._cv.wait_for(lambda: len(self.items) >= n, timeout), f"got {len(self.items)} of {n}: {self.items}"
            return list(self.items)

    def quiet(self, s: float = 0.2) -> list[tuple[str, bytes]]:
        time.sleep(s)
        with self._cv:
            return list(self.items)


@pytest.fixture
def broker():
    b = MemoryBroker()
    yield b
    b.close()


def link(broker: MemoryBroker, cid: str, subs: list[str], inbox: Inbox | None = None, **kw) -> MemoryLink:
    out = open_link(broker.url, client_id=cid, on_message=inbox or (lambda t, p: None), subscriptions=subs, **kw)
    assert isinstance(out, MemoryLink) and isinstance(out, Link)
    out.start()
    return out


@pytest.mark.parametrize(("flt", "topic", "hit"), [
    ("a/b", "a/b", True), ("a/b", "a/c", False), ("a/+", "a/b", True), ("a/+", "a/b/c", False),
    ("a/+/c", "a/x/c", True), ("+/+", "a/b", True), ("+", "a/b", False), ("a/#", "a", True),
    ("a/#", "a/b/c", True), ("#", "a/b", True), ("a/#", "b/a", False), ("+/b", "/b", True),
    ("#", "$SYS/x", False), ("+/x", "$SYS/x", False), ("$SYS/#", "$SYS/x", True), ("a/b/#", "a/b", True),
    ("a/b", "a/b/", False),
])
def test_topic_filters_match_as_mqtt_does(flt: str, topic: str, hit: bool) -> None:
    assert topic_matches(flt, topic) is hit


@pytest.mark.parametrize("bad", ["", "a/#/b", "a#", "a/b+", "#/x"])
def test_invalid_filters_are_refused(bad: str) -> None:
    with pytest.raises(ConfigError, match="not a valid MQTT filter"):
        check_filter(bad)


def test_wildcard_subscribers_get_what_matches_once(broker: MemoryBroker) -> None:
    plus, hash_, exact = Inbox(), Inbox(), Inbox()
    a = link(broker, "plus", ["f/agents/+/status"], plus)
    b = link(broker, "hash", ["f/#", "f/agents/#"], hash_)  # overlapping filters: delivered once
    c = link(broker, "exact", ["f/agents/x/status"], exact)
    pub = link(broker, "pub", [])
    for topic in ("f/agents/x/status", "f/agents/y/status", "f/agents/x/result", "g/agents/x/status"):
        pub.publish(topic, topic.encode())
    assert [t for t, _ in plus.wait(2)] == ["f/agents/x/status", "f/agents/y/status"]
    assert [t for t, _ in hash_.wait(3)] == ["f/agents/x/status", "f/agents/y/status", "f/agents/x/result"]
    assert exact.wait(1) == [("f/agents/x/status", b"f/agents/x/status")]
    assert len(hash_.quiet()) == 3 and len(plus.items) == 2 and len(exact.items) == 1
    for x in (a, b, c, pub):
        x.stop()


def test_retained_messages_reach_late_subscribers_and_empty_payload_clears(broker: MemoryBroker) -> None:
    pub = link(broker, "pub", [])
    pub.publish("f/model/0", b"old", retain=True)
    pub.publish("f/model/0", b"new", retain=True)  # the newest replaces
    pub.publish("f/model/1", b"one", retain=True)
    pub.publish("f/model/2", b"two", retain=True)
    pub.publish("f/model/2", b"", retain=True)  # cleared
    pub.publish("f/model/3", b"not kept")  # not retained
    late = Inbox()
    sub = link(broker, "late", ["f/model/#"], late)
    assert sorted(late.wait(2)) == [("f/model/0", b"new"), ("f/model/1", b"one")]
    assert len(late.quiet()) == 2
    sub.stop()
    pub.stop()


def test_will_on_ungraceful_stop_only(broker: MemoryBroker) -> None:
    heard = Inbox()
    watcher = link(broker, "watch", ["f/+/status"], heard)
    calls = []

    def will() -> tuple[str, bytes, bool]:
        calls.append(1)
        return "f/a/status", f"offline-{len(calls)}".encode(), True

    a = link(broker, "a", [], will=will)
    a.stop()  # graceful: no will
    assert heard.quiet() == []
    a.start()  # a fresh will per connection
    a.stop(graceful=False)
    assert heard.wait(1) == [("f/a/status", b"offline-2")]
    assert broker.retained["f/a/status"] == (b"offline-2", 1)  # a retained will stays for newcomers
    b = link(broker, "b", [], will=("f/b/status", b"gone", False))
    b2 = link(broker, "b", [])  # a second connection with b's id takes over: b's will goes out
    assert heard.wait(2)[1] == ("f/b/status", b"gone")
    assert not b.connected.is_set() and b2.connected.is_set()
    for x in (b, b2, watcher):
        x.stop()


def test_persistent_session_keeps_qos1_messages_while_away(broker: MemoryBroker) -> None:
    inbox = Inbox()
    agent = link(broker, "agent", ["f/agent/task"], inbox, clean_session=False)
    pub = link(broker, "pub", [])
    agent.stop()
    pub.publish("f/agent/task", b"q1")
    pub.publish("f/agent/task", b"q0", qos=0)  # QoS 0 is not kept
    agent.start()
    assert inbox.wait(1) == [("f/agent/task", b"q1")]
    clean = Inbox()
    other = link(broker, "other", ["f/agent/task"], clean, clean_session=True)
    other.stop()
    pub.publish("f/agent/task", b"missed")
    other.start()
    assert clean.quiet() == []
    for x in (agent, other, pub):
        x.stop()


def test_in_order_delivery_on_the_subscribers_thread(broker: MemoryBroker) -> None:
    inboxes = [Inbox() for _ in range(40)]
    subs = [link(broker, f"s{i}", ["f/#"], box) for i, box in enumerate(inboxes)]
    pubs = [link(broker, f"p{i}", []) for i in range(3)]

    def send(i: int) -> None:
        for n in range(200):
            pubs[i].publish(f"f/p{i}", n.to_bytes(4, "big"))

    threads = [threading.Thread(target=send, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    first = inboxes[0].wait(600)
    for box in inboxes:
        got = box.wait(600)
        assert got == first  # every subscriber sees one order of publication
        for i in range(3):  # and each publisher's messages in the order it sent them
            assert [int.from_bytes(p, "big") for t, p in got if t == f"f/p{i}"] == list(range(200))
    main = threading.get_ident()
    publishers = {t.ident for t in threads}
    for box in inboxes:
        assert len(box.threads) == 1 and not box.threads & (publishers | {main})
    assert len(set().union(*(box.threads for box in inboxes))) == 40  # one delivery thread per subscriber
    for x in subs + pubs:
        x.stop()


def test_a_handler_publishing_from_its_callback_does_not_deadlock(broker: MemoryBroker) -> None:
    echo: list[MemoryLink] = []
    got = Inbox()
    echo.append(link(broker, "echo", ["ping"], lambda t, p: echo[0].publish("pong", p)))
    sink = link(broker, "sink", ["pong"], got)
    pub = link(broker, "pub", [])
    pub.publish("ping", b"x")
    assert got.wait(1) == [("pong", b"x")]
    for x in (echo[0], sink, pub):
        x.stop()


@pytest.mark.parametrize("size", [0, 1, 100, 16_000, 2_000_000])
@pytest.mark.parametrize("qos", [0, 1])
def test_byte_counts_equal_the_mqtt_formula(broker: MemoryBroker, size: int, qos: int) -> None:
    box = Inbox()
    sub = link(broker, "sub", ["fedfleet/v1/f/agents/+/result"], box)
    pub = link(broker, "pub", [])
    topic = "fedfleet/v1/f/agents/a-01/result"
    n = pub.publish(topic, bytes(size), qos=qos)
    # fixed header (1 + remaining-length varint) + topic (2 + len) + packet id at QoS 1 + payload, PUBACK at QoS 1
    remaining = 2 + len(topic) + (2 if qos else 0) + size
    varint = 1 if remaining < 128 else 2 if remaining < 16384 else 3 if remaining < 2_097_152 else 4
    expect = 1 + varint + remaining + (4 if qos else 0)
    assert n == expect == protocol.mqtt_publish_bytes(topic, size, qos)
    box.wait(1)
    assert pub.bytes_sent == sub.bytes_received == expect
    assert pub.bytes_by_topic[topic] == sub.bytes_by_topic[topic] == expect
    assert pub.wire_bytes() is None  # no socket
    sub.stop()
    pub.stop()


def test_urls_registry_and_errors(broker: MemoryBroker) -> None:
    with pytest.raises(ConfigError, match="already runs"):
        MemoryBroker(broker.name)
    with pytest.raises(ConfigError, match="memory://"):
        open_link("memory://", client_id="x", on_message=lambda t, p: None, subscriptions=[])
    with pytest.raises(ConfigError, match="must look like"):
        open_link("ftp://host", client_id="x", on_message=lambda t, p: None, subscriptions=[])
    ghost = open_link("memory://nobody-here", client_id="x", on_message=lambda t, p: None, subscriptions=[])
    with pytest.raises(ConnectionError, match="no in-memory broker named 'nobody-here'"):
        ghost.start()
    a = link(broker, "a", [])
    with pytest.raises(ConfigError, match="wildcard"):
        a.publish("f/+/x", b"")
    assert str(a.url) == broker.url
    broker.close()
    assert not a.connected.is_set()
    with pytest.raises(ConnectionError, match="not connected"):
        a.publish("f/x", b"")
    a.stop()


def test_open_link_picks_the_implementation_by_scheme() -> None:
    from fedfleet.edge_agent.wire.mqtt import MqttLink

    for url in ("mqtt://127.0.0.1:1", "mqtts://example.org"):
        real = open_link(url, client_id="x", on_message=lambda t, p: None, subscriptions=["a/#"])
        assert isinstance(real, MqttLink) and isinstance(real, Link)  # not started: no connection attempted
