"""Bytes by category (edge_agent/wire/traffic.py) and the receive path's checks of a traffic report."""

from __future__ import annotations

import queue

import pytest

from fedfleet.coordinator.broker import SnapshotDict
from fedfleet.coordinator.engine.inbox import TrafficReport
from fedfleet.coordinator.engine.receive import check_traffic
from fedfleet.edge_agent.errors import ProtocolError
from fedfleet.edge_agent.wire.memory import MemoryBroker, MemoryLink
from fedfleet.edge_agent.wire.traffic import (
    CATEGORIES,
    TrafficCounter,
    by_category,
    connect_bytes,
    subscribe_bytes,
)


def test_by_category_splits_directions_and_categories():
    topics = {"fedfleet/v1/f/broadcast/model/abc/0": 1000, "fedfleet/v1/f/broadcast/state": 300,
              "fedfleet/v1/f/agents/a/task": 200, "fedfleet/v1/f/agents/a/result": 150,
              "fedfleet/v1/f/agents/a/status": 90, "fedfleet/v1/f/agents/b/status": 80,
              "fedfleet/v1/f/agents/a/telemetry": 70}
    received = {k: v for k, v in topics.items() if "/broadcast/" in k or k.endswith("/task") or "/b/" in k}
    out = by_category(topics, (40, 8), received)
    assert set(out) == set(CATEGORIES)
    assert out["model"] == [0, 1000] and out["state"] == [0, 300] and out["task"] == [0, 200]
    assert out["result"] == [150, 0] and out["telemetry"] == [70, 0]
    assert out["status"] == [90, 80]  # another agent's retained status, delivered by a broker that sends it
    assert out["control"] == [40, 8]
    assert sum(u + d for u, d in out.values()) == sum(topics.values()) + 48


def test_control_packet_formulas():
    assert connect_bytes("c") == (1 + 1 + 10 + 3, 4)  # fixed header, remaining length, variable header, id
    assert subscribe_bytes(["a/b"]) == (1 + 1 + 2 + 5 + 1, 1 + 1 + 3)
    assert subscribe_bytes([]) == (0, 0)


def test_traffic_counter_hands_out_each_byte_once():
    broker = MemoryBroker("traffic-once")
    got = queue.Queue()
    a = MemoryLink("memory://traffic-once", client_id="a", on_message=lambda t, p: got.put(t),
                   subscriptions=["fedfleet/v1/f/agents/a/task"])
    b = MemoryLink("memory://traffic-once", client_id="b", on_message=lambda t, p: None, subscriptions=[])
    try:
        a.start()
        b.start()
        counter = TrafficCounter(lambda: a)
        b.publish("fedfleet/v1/f/agents/a/task", b"x" * 500)
        got.get(timeout=5)
        a.publish("fedfleet/v1/f/agents/a/result", b"y" * 100)
        first = counter.take()
        assert first["traffic"]["task"][1] > 500 and first["traffic"]["result"][0] > 100
        assert first["wire"] is None  # no socket on the in-memory broker
        assert counter.take() == {"traffic": {}, "wire": None}  # nothing new since
    finally:
        a.stop()
        b.stop()
        broker.close()


def test_check_traffic_refuses_bad_reports():
    counts, wire = check_traffic({"traffic": {"model": [0, 10], "control": [5, 1]}, "wire": [6, 11]})
    assert counts == {"model": (0, 10), "control": (5, 1)} and wire == (6, 11)
    assert check_traffic({"event": "bytes"}) is None
    for bad in ({"traffic": {"video": [1, 1]}}, {"traffic": {"model": [1]}}, {"traffic": {"model": [-1, 0]}},
                {"traffic": {"model": [0, 1.5]}}, {"traffic": {}, "wire": [1, "2"]}, {"traffic": []}):
        with pytest.raises(ProtocolError):
            check_traffic(bad)
    assert TrafficReport("a", "r", 1, 0, counts, wire).traffic["model"] == (0, 10)


def test_snapshot_dict_may_change_while_iterated():
    d = SnapshotDict({"a": 1, "b": 2})
    for k in d:
        d[k + "x"] = 0
    for k, _ in d.items():
        d.pop(k)
    assert d == {}
