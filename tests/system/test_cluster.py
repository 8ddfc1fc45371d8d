"""A fleet split over the nodes of a real RabbitMQ MQTT cluster (tools/infra/rabbitmq.py): `fedfleet emulate`
shards on two nodes, the coordinator on a third, and a tiny `fedfleet bench cluster`. RabbitMQ keeps retained
messages per node, so these pass only if model delivery does not depend on the retained copy."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fedfleet.edge_agent.wire import protocol, signing
from fedfleet.edge_agent.wire.mqtt import MqttLink
from fedfleet.tools.bench import cluster as bench_cluster
from tests.support.fleet import Rogue, start_fleet

FLEET_TOML = """
[job]
method = "fedavg"
rounds = 2
mode = "full"
seed = 0
deadline_s = 30.0
quorum = 1.0
fleet = "cluster-ci"

[method]
lr = 0.1
epochs = 2
batch = 16

[emulator]
processes = 1

[[group]]
name = "pi4"
profile = "rpi4b"
count = 6
partition = "iid"
"""


@pytest.fixture(scope="module")
def cluster():
    if not Path("/usr/lib/rabbitmq/bin/rabbitmq-server").exists():
        pytest.fail("rabbitmq-server is not installed: apt-get install -y rabbitmq-server (.ci/run does)")
    from fedfleet.tools.infra.rabbitmq import RabbitCluster

    c = RabbitCluster(nodes=3)
    yield c
    c.stop()


def test_cluster_has_three_running_nodes(cluster):
    assert len(cluster.running_nodes()) == 3 and len(set(cluster.urls)) == 3


def test_emulator_shards_on_other_nodes_than_the_coordinator(cluster, tmp_path):
    fleet = tmp_path / "fleet.toml"
    fleet.write_text(FLEET_TOML)
    secret = tmp_path / "fleet.secret"
    secret.write_text(os.urandom(32).hex())
    key, pub = tmp_path / "coordinator.key", tmp_path / "coordinator.pub"  # the coordinator's; shards pin it
    seed = signing.new_signing_seed()
    signing.write_private_key_file(key, seed)
    pub.write_text(signing.public_key(seed).hex() + "\n")
    emulate = [sys.executable, "-m", "fedfleet.coordinator.cli", "emulate", str(fleet), "--secret-file", str(secret), "--quiet"]
    shards = [subprocess.Popen([*emulate, "--broker", cluster.urls[1 + i], "--shard", f"{i}/2", "--no-coordinator",
                                "--coordinator-key-file", str(pub),
                                "--duration", "300", "--run-dir", str(tmp_path / f"shard{i}")],
                               stdout=open(tmp_path / f"shard{i}.out", "wb"), stderr=subprocess.STDOUT)  # noqa: SIM115
              for i in range(2)]
    try:
        coord = subprocess.run([*emulate, "--broker", cluster.urls[0], "--coordinator-only",
                                "--signing-key-file", str(key), "--run-dir",
                                str(tmp_path / "coord"), "--json", str(tmp_path / "summary.json")],
                               capture_output=True, text=True, timeout=400)
    finally:
        for p in shards:
            p.terminate()
            p.wait(30)
    assert coord.returncode == 0, coord.stdout[-2000:] + coord.stderr[-2000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["rounds"] == 2 and summary["outcomes"].get("ok") == 12  # 6 agents on nodes 1 and 2, 2 rounds
    assert summary["final_accuracy"] > 0.3  # two rounds of the 64-32-10 MLP, 6 agents: well above chance (0.1)


def test_bench_cluster_smoke(cluster, tmp_path, capsys, mosquitto):
    sides = [bench_cluster.run_side(kind, 6, 3, 2, 120.0, 60.0, 2.0, broker=b)
             for kind, b in (("rabbitmq", cluster), ("mosquitto", mosquitto))]
    for side in sides:
        assert {"agents", "nodes", "connected", "round_s", "rss_mb_total", "broker"} <= set(side)
        assert side["connected"] == 6 and side["ok"] == 6
    assert sides[0]["nodes"] == 3 and sides[1]["nodes"] == 1


def test_package_goes_out_again_once_a_wave_of_joins_settles(mosquitto, tmp_path):
    """An agent online without the package (as on a cluster node that never saw the retained copy) gets it
    again about `settle_s` after it appeared, long before the periodic `republish_s`, and only once."""
    fleet = start_fleet(mosquitto.url, tmp_path, roster_extra=("far",))
    copies: list[float] = []
    watcher = MqttLink(mosquitto.url, client_id="watch-wave", clean_session=True,
                       on_message=lambda topic, payload: copies.append(time.monotonic()) if payload else None,
                       subscriptions=[protocol.broadcast_topic(fleet.cfg.fleet, "model/0")])
    watcher.start()
    far = None
    try:
        fleet.coord.wait_for_agents(3, 30)
        time.sleep(0.3)
        before = len(copies)
        t0 = time.monotonic()
        far = Rogue(mosquitto.url, fleet.cfg.fleet, "far", None)  # online (a signed, fresh status), no model
        with pytest.raises(TimeoutError):
            fleet.coord.wait_for_agents(4, 3.0, republish_s=60.0, settle_s=0.5)
        time.sleep(0.3)
        again = copies[before:]
        assert len(again) == 1, again  # one copy for the wave, none from the 60 s period
        assert again[0] - t0 < 2.0
    finally:
        if far is not None:
            far.link.stop()
        watcher.stop()
        fleet.close()
