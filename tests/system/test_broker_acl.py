"""Mosquitto with passwords and the generated ACL: an agent may publish only under its own id."""

from __future__ import annotations

import threading
import time

from fedfleet.coordinator.broker import MosquittoBroker, acl_text, mosquitto_config
from fedfleet.edge_agent.wire import protocol
from fedfleet.edge_agent.wire.mqtt import MqttLink


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
    from fedfleet.coordinator.tls import make_local_ca

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


# ---------------------------------------------------------------- client ids, take-over, broadcast writes
def _coordinator(url: str, tmp_path, fleet: str, **auth: str):
    from fedfleet.coordinator.job.assemble import build_run
    from fedfleet.coordinator.job.config import JobConfig
    from tests.support.fleet import SECRET, SIGNING_KEY

    cfg = JobConfig(mode="full", fleet=fleet, agents=2, roster=["pi-01", "pi-02"], downlink="none")
    return build_run(cfg, broker_url=url, secret=SECRET, signing_key=SIGNING_KEY, run_dir=tmp_path, run_id="acl",
                     **auth).coordinator


def _still_connected_once(coord, seconds: float = 2.0) -> None:
    """The coordinator was never kicked: one connection, still up after `seconds`."""
    time.sleep(seconds)
    assert coord.link.connected.is_set() and coord._connects == 1, f"coordinator reconnected {coord._connects - 1} times"


def test_guessable_coordinator_id_does_not_kick_the_coordinator_on_an_anonymous_broker(mosquitto, tmp_path):
    coord = _coordinator(mosquitto.url, tmp_path, "lab-anon")
    intruder = MqttLink(mosquitto.url, client_id="fedfleet-coordinator-lab-anon", on_message=lambda t, p: None,
                        subscriptions=[], max_backoff_s=0.5)
    try:
        coord.start()
        intruder.start(wait_s=5)
        _still_connected_once(coord)
    finally:
        intruder.stop()
        coord.stop()


def test_acl_broker_refuses_takeover_and_device_writes_to_broadcast(tmp_path):
    users = {"coordinator": "c-pass", "pi-01": "p1", "pi-02": "p2", "observer": "o"}
    broker = MosquittoBroker(users=users)
    coord = _coordinator(broker.url, tmp_path, "lab", username="coordinator", password="c-pass")
    heard: list[tuple[str, bytes]] = []
    listener = MqttLink(broker.url, client_id="listener", on_message=lambda t, p: heard.append((t, p)),
                        subscriptions=["fedfleet/v1/lab/broadcast/#"], clean_session=True, username="observer",
                        password="o")  # its own user: a second client under the coordinator's would replace it
    pi = MqttLink(broker.url, client_id="pi-01", on_message=lambda t, p: None, subscriptions=[],
                  username="pi-01", password="p1")
    links = [listener, pi]
    try:
        coord.start()
        listener.start()
        pi.start()
        coord_id = coord.link._client._client_id.decode()
        # a device writing a model chunk or any broadcast: dropped by the ACL
        pi.publish(protocol.broadcast_topic("lab", "model/0"), b"forged package", retain=True)
        pi.publish(protocol.broadcast_topic("lab", "anything"), b"forged broadcast")
        time.sleep(0.5)
        assert all(p != b"forged package" and p != b"forged broadcast" for _, p in heard), heard
        assert any(t == protocol.broadcast_topic("lab", "model/0") for t, _ in heard)  # the coordinator's own copy
        # take-over: anonymously with the coordinator's id (refused), with one device's credentials under the
        # coordinator's id and under the coordinator's user name (the broker makes it the device's own id)
        anon = MqttLink(broker.url, client_id=coord_id, on_message=lambda t, p: None, subscriptions=[],
                        max_backoff_s=0.5)
        links.append(anon)
        try:
            anon.start(wait_s=2)
            raise AssertionError("an anonymous client connected to the ACL broker")
        except ConnectionError:
            pass
        for client_id in (coord_id, "coordinator"):
            thief = MqttLink(broker.url, client_id=client_id, on_message=lambda t, p: None, subscriptions=[],
                             username="pi-02", password="p2", max_backoff_s=0.5)
            links.append(thief)
            thief.start(wait_s=5)
        _still_connected_once(coord)
    finally:
        for link in links:
            link.stop()
        coord.stop()
        broker.stop()


def test_generated_broker_does_not_run_as_root(tmp_path):
    from fedfleet.coordinator.broker import broker_user
    from fedfleet.coordinator.tls import make_local_ca

    user = broker_user()
    assert "user root" not in mosquitto_config(1234) and f"user {user}" in mosquitto_config(1234)
    assert "use_username_as_clientid true" in mosquitto_config(1234, password_file=tmp_path / "pw")
    tls = make_local_ca(tmp_path / "tls")  # the key is 0600 and owned by whoever runs the test
    broker = MosquittoBroker(users={"coordinator": "c", "pi-01": "p"}, tls=tls)
    try:
        status = open(f"/proc/{broker.pid}/status").read()
        uid = int(next(line for line in status.splitlines() if line.startswith("Uid:")).split()[1])
        import pwd

        assert uid == pwd.getpwnam(user).pw_uid and (uid != 0 or user == "root")
        assert user != "root"
        link = MqttLink(broker.url, client_id="x", on_message=lambda t, p: None, subscriptions=[],
                        username="pi-01", password="p", ca_certs=str(tls.cafile))
        link.start(wait_s=5)  # it could read its password file and TLS key as that user
        link.stop()
    finally:
        broker.stop()
