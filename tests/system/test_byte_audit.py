"""The ledger's bytes against Mosquitto's own count over a whole demo run (tools/infra/byte_audit.py), and the
socket byte counters (TLS overhead included) that agents report in telemetry."""

from __future__ import annotations

import os
import threading
import time

from fedfleet.coordinator.broker import MosquittoBroker
from fedfleet.coordinator.engine.rounds import Coordinator
from fedfleet.coordinator.job.config import JobConfig
from fedfleet.coordinator.job.run import DEMO_PROFILE, build, engine_config, shards, small_model_threads
from fedfleet.coordinator.strategies import create as create_strategy
from fedfleet.coordinator.strategies import method_config
from fedfleet.coordinator.tls import make_local_ca
from fedfleet.edge_agent.agent import Agent, AgentConfig
from fedfleet.edge_agent.wire import protocol
from fedfleet.edge_agent.wire.mqtt import MqttLink
from fedfleet.tools.bench.cluster import signing_options
from fedfleet.tools.infra.byte_audit import SysObserver, reconcile


def test_ledger_bytes_match_the_brokers_count(tmp_path):
    small_model_threads()
    cfg = JobConfig(agents=4, rounds=3, seed=0, fleet="audit")
    broker = MosquittoBroker(extra_config="sys_interval 1\n")
    observer = SysObserver(broker.url)
    try:
        before = observer.sample_after(time.time())  # the counters before any demo traffic
        local, test = shards(cfg)
        blob, cmodel = build(cfg)
        secret = os.urandom(32)
        ids = [f"agent-{i:02d}" for i in range(cfg.agents)]
        strategy = create_strategy(cfg.method, cmodel.initial_state(), **method_config(cfg), seed=cfg.seed)
        coord_sign, agent_sign = signing_options()
        coord = Coordinator(broker_url=broker.url, secret=secret, roster=ids, strategy=strategy, package=blob,
                            evaluate=lambda ctx, s: cmodel.evaluate(s, test.x, test.y), run_dir=tmp_path / "run",
                            config=engine_config(cfg, "audit-run"), **coord_sign)
        coord.start()
        agents = [Agent(AgentConfig(broker.url, cfg.fleet, a, protocol.derive_key(secret, a), profile=DEMO_PROFILE,
                                    **agent_sign), local[i]) for i, a in enumerate(ids)]
        for a in agents:
            a.start()
        coord.wait_for_agents(len(ids), timeout_s=60)
        coord.run(cfg.rounds)
        coord.settle(1.0)
        for a in agents:
            a.stop()
        time.sleep(0.5)  # the agents' offline statuses reach the coordinator
        rows = coord.ledger.query("SELECT SUM(bytes_up) AS up, SUM(bytes_down) AS down FROM agent_rounds")
        ledger = int(rows[0]["up"]) + int(rows[0]["down"])
        coord.stop()
        after = observer.sample_after(time.time() + 0.5)  # a snapshot taken once every demo client is gone
    finally:
        observer.stop()
        broker.stop()
    audit = reconcile(ledger, [coord.link] + [a.link for a in agents], before, after)
    print("byte audit:", audit)
    # each ledgered task and result is booked once by the ledger and seen at both ends by the clients'
    # counters; the state broadcast is booked per receiving agent, and published once
    assert audit["ledger_kinds_at_clients"] == 2 * (ledger - audit["state_received"])
    assert 0 < audit["state_published"] < audit["state_received"]
    assert audit["excluded"]["model"] > 0 and audit["excluded"]["status"] > 0
    assert abs(audit["rel_error"]) < 0.01, audit
    # the sockets' own counters (TCP_INFO) agree with the broker as well
    assert audit["client_socket_bytes"] is not None and abs(audit["socket_rel_error"]) < 0.01, audit


def test_socket_counters_see_tls_overhead(tmp_path):
    tls = make_local_ca(tmp_path / "tls")
    broker = MosquittoBroker(tls=tls)
    got = threading.Event()
    try:
        link = MqttLink(broker.url, client_id="tls-count", on_message=lambda t, p: got.set(),
                        subscriptions=["fedfleet/v1/x/agents/a/task"], ca_certs=str(tls.cafile), clean_session=True)
        link.start()
        payload = os.urandom(50_000)
        link.publish("fedfleet/v1/x/agents/a/task", payload)
        assert got.wait(20)
        sent, received = link.wire_bytes()
        link.stop()
    finally:
        broker.stop()
    # the formula counts 50 kB each way; the socket also carried the TLS handshake and record overhead
    assert link.bytes_sent > 50_000 and link.bytes_received > 50_000
    assert sent > link.bytes_sent + 200 and received > link.bytes_received + 1000  # ClientHello / certificates
