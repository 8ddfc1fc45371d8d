"""After a reconnection, what a link's `on_connect` publishes (an agent's new status) reaches the broker after the
messages paho queued on the previous connection, so a receiver never gets an older status after a newer one
(the cause of the "refused status ... replayed" rows at start-up on a loaded machine)."""

from __future__ import annotations

import threading
import time

from fedfleet.coordinator.broker import MosquittoBroker
from fedfleet.edge_agent.wire.mqtt import MqttLink
from tests.support.byte_proxy import ByteProxy

TOPIC = "fedfleet/v1/order/agents/a/status"


def test_on_connect_publishes_after_the_previous_connections_queue():
    broker = MosquittoBroker()
    proxy = ByteProxy(broker.port)
    seen: list[bytes] = []
    got = threading.Event()

    def on_message(topic: str, payload: bytes) -> None:
        seen.append(payload)
        if payload == b"new":
            got.set()

    watcher = MqttLink(broker.url, client_id="watcher", on_message=on_message, subscriptions=[TOPIC],
                       clean_session=True)
    link: MqttLink | None = None
    try:
        watcher.start()
        connects: list[int] = []

        def announce() -> None:  # as an agent does: a new status on every connection but the first
            connects.append(1)
            if len(connects) > 1:
                link.publish(TOPIC, b"new")

        link = MqttLink(proxy.url, client_id="agent-a", on_message=lambda t, p: None, subscriptions=[],
                        on_connect=announce, min_backoff_s=0.5, max_backoff_s=0.5)
        link.start()
        proxy.drop_all()
        deadline = time.monotonic() + 5
        while link.connected.is_set() and time.monotonic() < deadline:
            time.sleep(0.005)
        assert not link.connected.is_set(), "the link did not notice the cut"
        link.publish(TOPIC, b"old")  # queued by paho while disconnected; sent again after the reconnection
        assert got.wait(15), seen
        time.sleep(0.3)
    finally:
        if link is not None:
            link.stop()
        watcher.stop()
        proxy.stop()
        broker.stop()
    assert seen == [b"old", b"new"], seen
