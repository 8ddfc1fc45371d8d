"""The broker restarts mid-run: agents and coordinator reconnect (jittered backoff), the coordinator
republishes the model package the broker forgot, and the next round completes."""

from __future__ import annotations

import time

from fedfleet.coordinator.broker import MosquittoBroker
from tests.support.fleet import start_fleet


def test_rounds_continue_after_a_broker_restart(tmp_path):
    broker = MosquittoBroker()
    port = broker.port
    fleet = start_fleet(broker.url, tmp_path, rounds=2)
    try:
        fleet.coord.wait_for_agents(3, 30)
        assert fleet.coord.run_round(1).ok == 3
        broker.stop()
        time.sleep(1.0)
        assert not any(a.link.connected.is_set() for a in fleet.agents.values())
        broker = MosquittoBroker(port)  # same address, empty state: no sessions, no retained messages
        deadline = time.time() + 30
        while time.time() < deadline and not all(a.link.connected.is_set() for a in fleet.agents.values()):
            time.sleep(0.1)
        fleet.coord.wait_for_agents(3, 30)
        assert fleet.coord.run_round(2).ok == 3
        assert fleet.coord._connects >= 2  # it reconnected and republished the package
    finally:
        fleet.close()
        broker.stop()
