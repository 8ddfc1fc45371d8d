"""Downlink and status bound to the run and to time that only moves forward (issue items 13 and 14).

- A correctly signed model package of another, earlier run, replayed onto the package topic, is refused by
  every agent (`replayed`); they keep the current package and every later round gets their results.
- A restarted coordinator does not take a replayed retained status as the truth: an old "offline" of a
  live agent does not keep it out, an old "online" of a dead agent does not make rounds wait for it.
- Freshness does not rest on the agents' wall clocks: an agent 90 s behind, and an agent restarted with a
  correct clock after running 90 s ahead, get their results accepted.
"""

from __future__ import annotations

import json
import threading
import time

import torch

from fedfleet.coordinator.engine.dispatch import Dispatcher
from fedfleet.coordinator.engine.presence import Presence
from fedfleet.coordinator.engine.receive import ReceivePath
from fedfleet.coordinator.job.config import JobConfig
from fedfleet.coordinator.job.run import shards
from fedfleet.edge_agent.agent import Agent, AgentConfig
from fedfleet.edge_agent.wire import protocol
from fedfleet.edge_agent.wire.mqtt import MqttLink
from tests.support.fleet import COORDINATOR_KEY, SECRET, SIGNING_KEY, package, start_fleet

KEY = protocol.derive_key(SECRET, "a1")


def _status(state: str, *, inc: str | None, epoch: int, n: int, boot: str | None, model: str = "m") -> bytes:
    header = {"kind": "status", "fleet": "f", "agent": "a1", "seq": [epoch, n]}
    if inc is not None:
        header["inc"] = inc
    body = {"state": state, "model": model, "samples": 10, "boot": boot}
    return protocol.seal(header, json.dumps(body).encode(), KEY)


def _path(presence: Presence, boot: str | None = "B2") -> ReceivePath:
    import queue

    return ReceivePath(fleet="f", keys={"a1": KEY}, inbox=queue.Queue(), on_status=presence.on_status,
                       on_unconfirmed=presence.on_unconfirmed, max_result_bytes=1 << 20, boot=boot)


TOPIC = "fedfleet/v1/f/agents/a1/status"


def test_a_status_from_before_this_coordinator_is_never_the_truth():
    presence = Presence(["a1"])
    path = _path(presence)
    # written under an earlier coordinator (boot B1): shown as unconfirmed, never ready
    path.on_message(TOPIC, _status("online", inc="p1", epoch=5000, n=1, boot="B1"))
    assert presence.online["a1"]["unconfirmed"] and presence.ready_agents("m") == []
    # the agent answers this coordinator's package: now it is the truth
    path.on_message(TOPIC, _status("online", inc="p1", epoch=5000, n=2, boot="B2"))
    assert presence.ready_agents("m") == ["a1"] and "unconfirmed" not in presence.online["a1"]
    # an old "offline" of the same process replayed: older seq, refused
    path.on_message(TOPIC, _status("offline", inc="p1", epoch=4000, n=9, boot="B1"))
    assert presence.ready_agents("m") == ["a1"]
    # the process's own will (a later seq, composed before it knew B2) is taken: the agent left
    path.on_message(TOPIC, _status("offline", inc="p1", epoch=5001, n=protocol.WILL_SEQ, boot=None))
    assert presence.ready_agents("m") == []


def test_freshness_does_not_rest_on_the_agents_clock():
    presence = Presence(["a1"])
    path = _path(presence)
    path.on_message(TOPIC, _status("online", inc="p1", epoch=9_000_000, n=1, boot="B2"))  # clock 90 s ahead
    # restarted with a correct clock (epochs 90 s lower): a new process, confirmed by its echo of B2
    path.on_message(TOPIC, _status("online", inc="p2", epoch=9_000_000 - 90_000, n=1, boot="B2", model="m2"))
    assert presence.ready_agents("m2") == ["a1"]
    # the earlier process is superseded: its messages are replays, whatever their seq says
    path.on_message(TOPIC, _status("offline", inc="p1", epoch=9_999_999, n=protocol.WILL_SEQ, boot="B2"))
    assert presence.ready_agents("m2") == ["a1"]
    assert path.take_refused()[("a1", "replayed")][0] == 1


def test_the_agent_refuses_an_older_package_publication(tmp_path):
    """Unit level: the agent's own check, with its stamp kept across a restart in the state directory."""
    import numpy as np

    from fedfleet.edge_agent.learners import LocalData

    data = LocalData(np.zeros((4, 64), np.float32), np.zeros(4, np.int64))
    cfg = AgentConfig("memory://x", "f", "a1", KEY, coordinator_key=COORDINATOR_KEY, state_dir=str(tmp_path / "s"))
    agent = Agent(cfg, data)
    try:
        assert agent._stamp({"run": "new", "sent": 2000.0, "boot": "B"}) is True
        assert agent._older({"run": "old", "sent": 1000.0}).endswith("a replay")
        assert agent._older({"run": "new", "sent": 2000.0}) == "" and agent._older({"run": "x", "sent": 3e3}) == ""
        assert agent._older({"run": "old"}) == "the package header has no publication time"
    finally:
        agent.link.stop(graceful=False)
    again = Agent(cfg, data)  # restarted: the stamp is kept
    try:
        assert again.package_sent == 2000.0 and again._older({"run": "old", "sent": 1000.0})
    finally:
        again.link.stop(graceful=False)


class _Recorder:
    def __init__(self) -> None:
        self.sent: list[tuple[str, bytes, bool]] = []

    def publish(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False) -> int:
        self.sent.append((topic, payload, retain))
        return len(payload)


def _wait(cond, timeout: float = 15.0) -> bool:
    deadline = time.time() + timeout
    while not cond() and time.time() < deadline:
        time.sleep(0.05)
    return cond()


def test_a_replayed_package_of_another_run_is_refused(mosquitto, tmp_path):
    fleet_name = f"replay{abs(hash(tmp_path)) % 10**6}"
    other, _ = package(JobConfig(mode="transfer"))
    recorder = _Recorder()  # an earlier run's genuine, signed package publication, captured off the wire
    Dispatcher(link=recorder, fleet=fleet_name, run="earlier-run", method="fedavg", signing_key=SIGNING_KEY,
               package=other, ttl_s=10, downlink={"name": "none"}, sync=None, boot="b0").publish_package()
    time.sleep(0.01)
    fleet = start_fleet(mosquitto.url, tmp_path, rounds=2, fleet=fleet_name)
    attacker = MqttLink(mosquitto.url, client_id="replayer", on_message=lambda *a: None, clean_session=True,
                        subscriptions=[])
    attacker.start()
    try:
        fleet.coord.wait_for_agents(3, 30)
        assert fleet.coord.run_round(1).ok == 3
        for topic, payload, retain in recorder.sent:
            attacker.publish(topic, payload, retain=retain)
        assert _wait(lambda: all(a.refused.get("replayed") for a in fleet.agents.values())), \
            {a: x.refused for a, x in fleet.agents.items()}
        assert all(a.model_digest == fleet.coord.package_digest for a in fleet.agents.values())
        assert fleet.coord.run_round(2).ok == 3
    finally:
        attacker.stop()
        fleet.close()


class _SkewedAgent(Agent):
    skew = 0.0

    def _now(self) -> float:
        return time.time() + self.skew


def test_a_restarted_coordinator_does_not_take_replayed_statuses_as_the_truth(mosquitto, tmp_path):
    """A coordinator, its agents, an eavesdropper recording every status; then the coordinator restarts
    (resume) after the eavesdropper re-retains an old "offline" of a live agent and an old "online" of a
    dead one. Also: one agent runs 90 s behind, one restarts with a correct clock after running 90 s ahead."""
    name = f"stat{abs(hash(tmp_path)) % 10**6}"
    cfg = JobConfig(mode="full", agents=4, rounds=3, alpha=0.0, deadline_s=20.0, fleet=name)
    local, _ = shards(cfg)
    ids = [f"agent-{i:02d}" for i in range(4)]
    statuses: dict[str, list[bytes]] = {a: [] for a in ids}
    lock = threading.Lock()

    def record(topic: str, payload: bytes) -> None:
        if payload:
            with lock:
                statuses[protocol.parse_agent_topic(topic)[1]].append(payload)

    spy = MqttLink(mosquitto.url, client_id="spy", on_message=record, clean_session=True,
                   subscriptions=[f"{protocol.ROOT}/{name}/agents/+/status"])
    spy.start()

    def agent(i: int, skew: float = 0.0) -> Agent:
        a = _SkewedAgent(AgentConfig(mosquitto.url, name, ids[i], protocol.derive_key(SECRET, ids[i]),
                                     coordinator_key=COORDINATOR_KEY), local[i])
        a.skew = skew
        a.start()
        return a

    from fedfleet.coordinator.job.assemble import build_run

    first = build_run(cfg, broker_url=mosquitto.url, secret=SECRET, signing_key=SIGNING_KEY, run_dir=tmp_path,
                      roster=ids, run_id="r")
    first.coordinator.start()
    agents = {0: agent(0), 1: agent(1, skew=-90.0), 2: agent(2, skew=+90.0), 3: agent(3)}
    second = None
    try:
        first.coordinator.wait_for_agents(4, 30)
        assert first.coordinator.run_round(1).ok == 4
        agents[0].stop()  # agent-00 leaves: its "offline" is recorded ...
        assert _wait(lambda: any(b'"offline"' in protocol.open_envelope(m, protocol.derive_key(SECRET, ids[0]))[1]
                                 for m in statuses[ids[0]]))
        agents[0] = agent(0)  # ... and comes back (a new process), live from now on
        agents[2].stop()
        agents[2] = agent(2)  # restarted with a correct clock after running 90 s ahead
        assert _wait(lambda: len(first.coordinator.ready_agents()) == 4)
        assert first.coordinator.run_round(2).ok == 4
        first.coordinator.stop()
        old_offline = next(m for m in statuses[ids[0]]
                           if b'"offline"' in protocol.open_envelope(m, protocol.derive_key(SECRET, ids[0]))[1])
        old_online = statuses[ids[3]][-1]
        agents[3].stop(graceful=False)  # agent-03 dies ...
        time.sleep(0.5)
        for i, msg in ((0, old_offline), (3, old_online)):  # ... and the eavesdropper re-retains old statuses
            spy.publish(protocol.agent_topic(name, ids[i], "status"), msg, retain=True)
        time.sleep(0.5)
        second = build_run(cfg, broker_url=mosquitto.url, secret=SECRET, signing_key=SIGNING_KEY, run_dir=tmp_path,
                           roster=ids, resume=True)
        second.coordinator.start()
        ready = second.coordinator.wait_for_agents(3, 30)
        assert ready == ids[:3]  # the live agent-00 is in; the dead agent-03 is not taken for online
        assert second.coordinator.online[ids[3]].get("unconfirmed")
        t0 = time.perf_counter()
        summary = second.coordinator.run_round(3)
        assert summary.ok == 3 and summary.selected == 3
        assert time.perf_counter() - t0 < 15.0  # it did not wait for agent-03's deadline
    finally:
        spy.stop()
        for a in agents.values():
            a.stop(graceful=False)
        (second or first).coordinator.stop()
        if second is not None:
            first.coordinator.store.close()
    assert torch.is_tensor(next(iter(second.strategy.state.values())))
