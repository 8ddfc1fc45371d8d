"""Mosquitto with passwords and the generated ACL: an agent may publish only under its own id."""

from __future__ import annotations

import threading
import time

from edge_agent import protocol
from edge_agent.mqtt import MqttLink
from tools.broker import MosquittoBroker, acl_text, mosquitto_config


def test_generated_config_sets_nodelay_and_loopback():
    text = mosquitto_config(1234)
    assert "listener 1234 127.0.0.1" in text and "set_tcp_nodelay true" in text
    assert "pattern write fedfleet/v1/+/agents/%u/result" in acl_text("coordinator")


def test_acl_lets_an_agent_publish_only_under_its_own_id():
    users = {"coordinator": "c-pass", "pi-01": "p1", "pi-02": "p2"}
    broker = MosquittoBroker(users=users)
    got: list[str] = []
    seen = threading.Event()

    def on(topic: str, payload: bytes) -> None:
        got.append(topic)
        seen.set()

    coord = MqttLink(broker.url, client_id="coord", on_message=on, clean_session=True,
                     subscriptions=["fedfleet/v1/lab/agents/+/result"], username="coordinator", password="c-pass")
    pi = MqttLink(broker.url, client_id="pi-01", on_message=lambda t, p: None, subscriptions=[],
                  username="pi-01", password="p1")
    try:
        coord.start()
        pi.start()
        pi.publish(protocol.agent_topic("lab", "pi-02", "result"), b"spoofed")  # another agent's topic
        pi.publish(protocol.agent_topic("lab", "pi-01", "result"), b"own")
        assert seen.wait(5)
        time.sleep(0.3)
        assert got == [protocol.agent_topic("lab", "pi-01", "result")]
        bad = MqttLink(broker.url, client_id="intruder", on_message=lambda t, p: None, subscriptions=[],
                       username="pi-01", password="wrong", max_backoff_s=0.5)
        try:
            bad.start(wait_s=2)
            raise AssertionError("a wrong password was accepted")
        except ConnectionError:
            pass
        finally:
            bad.stop()
    finally:
        pi.stop()
        coord.stop()
        broker.stop()


def test_tls_listener_carries_mqtts_and_refuses_plain_mqtt(tmp_path):
    from tools.tls import make_local_ca

    tls = make_local_ca(tmp_path / "tls")
    broker = MosquittoBroker(tls=tls)
    assert broker.url.startswith("mqtts://")
    got = threading.Event()
    link = MqttLink(broker.url, client_id="tls-client", on_message=lambda t, p: got.set(), subscriptions=["t/#"],
                    ca_certs=str(tls.cafile))
    plain = MqttLink(broker.url.replace("mqtts://", "mqtt://"), client_id="plain", on_message=lambda t, p: None,
                     subscriptions=[], max_backoff_s=0.5)
    try:
        link.start()
        link.publish("t/x", b"over tls")
        assert got.wait(5)
        try:
            plain.start(wait_s=2)
            raise AssertionError("a plain MQTT client connected to the TLS listener")
        except ConnectionError:
            pass
    finally:
        plain.stop()
        link.stop()
        broker.stop()
