"""A hostile corpus against a real coordinator and real agents over a real Mosquitto.

Attacks from outside (no key: anyone on the broker) and from inside (one device's real key). Each class
asserts its refusal, the ledger reason, and that the round completes with the honest agents' results.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import threading
import time

import numpy as np
import pytest

from fedfleet.coordinator.records.ledger import Ledger
from fedfleet.edge_agent.agent import Agent, AgentConfig
from fedfleet.edge_agent.wire import codecs, protocol, signing
from fedfleet.edge_agent.wire.mqtt import MqttLink
from tests.support.fleet import COORDINATOR_KEY, SECRET, start_fleet

HONEST = ("agent-00", "agent-01", "agent-02")


def rows(fleet, sql: str = "SELECT * FROM agent_rounds ORDER BY id", args: tuple = ()) -> list[dict]:
    ledger = Ledger(fleet.coord.run_dir / "ledger.sqlite")
    try:
        return [dict(r) for r in ledger.query(sql, args)]
    finally:
        ledger.close()


def raw_seal(head: bytes, payload: bytes, key: bytes) -> bytes:
    """An uplink envelope around arbitrary header bytes (e.g. JSON with NaN), with a valid HMAC."""
    body = protocol._PREFIX.pack(protocol.MAGIC, protocol.VERSION, protocol.AUTH_HMAC, len(head)) + head
    body += protocol._LEN.pack(len(payload)) + payload
    return body + hmac.new(key, body, hashlib.sha256).digest()


class Insider:
    """A device on the roster, holding its own real key, that answers tasks with whatever the test says."""

    def __init__(self, url: str, fleet: str, agent: str, digest: str, samples: int = 300):
        self.fleet, self.agent = fleet, agent
        self.key = protocol.derive_key(SECRET, agent)
        self.tasks: list[tuple[dict, bytes]] = []
        self.got = threading.Event()
        self.seq = 0
        self.link = MqttLink(url, client_id=f"insider-{agent}", on_message=self._on, clean_session=True,
                             subscriptions=[protocol.agent_topic(fleet, agent, "task")])
        self.link.start()
        self.publish("status", self.status({"state": "online", "model": digest, "samples": samples}), retain=True)

    def status(self, body: dict, seq: int | None = None) -> bytes:
        self.seq += 1
        return protocol.seal({"kind": "status", "agent": self.agent, "seq": [1, seq or self.seq]},
                             json.dumps(body).encode(), self.key)

    def _on(self, topic: str, payload: bytes) -> None:
        self.tasks.append(protocol.open_signed(payload, COORDINATOR_KEY))
        self.got.set()

    def publish(self, kind: str, msg: bytes, retain: bool = False) -> None:
        self.link.publish(protocol.agent_topic(self.fleet, self.agent, kind), msg, retain=retain)

    def header(self, task: dict, **changes) -> dict:
        meta = task["meta"]
        h = {"kind": "result", "fleet": self.fleet, "agent": self.agent, "run": task["run"], "round": task["round"],
             "phase": task["phase"], "method": task["method"], "codec": meta["uplink"], "layout": meta["expect"],
             "meta": {"samples": 10, "learn_s": 0.01, "metrics": {"loss": 0.5}}}
        for k, v in changes.items():
            if k.startswith("meta_"):
                h["meta"] = {**h["meta"], k[5:]: v}
            else:
                h[k] = v
        return h

    def tensors(self, task: dict, value: float = 0.0) -> dict[str, np.ndarray]:
        return {n: np.full(s, value, np.float32) for n, s in codecs.normalize_layout(task["meta"]["expect"])}

    def result(self, task: dict, value: float = 0.0, **changes) -> list[bytes]:
        layout = codecs.normalize_layout(task["meta"]["expect"])
        payload = codecs.encode(self.tensors(task, value), layout, task["meta"]["uplink"])
        return protocol.split(self.header(task, **changes), payload, self.key)

    def raw_result(self, task: dict, head_text: bytes) -> bytes:
        layout = codecs.normalize_layout(task["meta"]["expect"])
        return raw_seal(head_text, codecs.encode(self.tensors(task), layout, task["meta"]["uplink"]), self.key)

    def send(self, msgs: list[bytes]) -> None:
        for m in msgs:
            self.publish("result", m)


class Outsider:
    """Anyone on the (anonymous) broker: no key. Answers every task it sees on the wire with one garbage byte
    on that agent's result topic (issue item 1), and tries everything else below."""

    def __init__(self, url: str, fleet: str):
        self.fleet = fleet
        self.seen: list[str] = []
        self.retained: dict[str, bytes] = {}
        self.link = MqttLink(url, client_id="outsider", on_message=self._on, clean_session=True,
                             subscriptions=[f"{protocol.ROOT}/{fleet}/agents/+/task",
                                            f"{protocol.ROOT}/{fleet}/agents/+/status"])
        self.garbage_on_tasks = False
        self.link.start()

    def _on(self, topic: str, payload: bytes) -> None:
        _, agent, kind = protocol.parse_agent_topic(topic)
        if kind == "status":
            self.retained.setdefault(agent, payload)  # the first status seen: replayed later
            return
        self.seen.append(agent)
        if self.garbage_on_tasks:
            self.link.publish(protocol.agent_topic(self.fleet, agent, "result"), b"\x00")


class SkewedAgent(Agent):
    """An honest agent whose wall clock runs 90 s fast (issue item 12)."""

    def _now(self) -> float:
        return time.time() + 90.0


@pytest.fixture
def corpus_fleet(mosquitto, tmp_path):
    fleet = start_fleet(mosquitto.url, tmp_path, roster_extra=("rogue", "skewed", "silent"), deadline_s=5.0,
                        quorum=0.5,
                        uplink={"name": "none"}, rounds=2)
    from fedfleet.coordinator.job.run import shards

    local, _ = shards(fleet.cfg)
    skewed = SkewedAgent(AgentConfig(mosquitto.url, fleet.cfg.fleet, "skewed", protocol.derive_key(SECRET, "skewed"),
                                     coordinator_key=COORDINATOR_KEY), local[0])
    skewed.start()
    outsider = Outsider(mosquitto.url, fleet.cfg.fleet)
    rogue = Insider(mosquitto.url, fleet.cfg.fleet, "rogue", fleet.coord.package_digest)
    # online, never answers: every phase runs to its deadline, so all of the insider's messages are in
    silent = Insider(mosquitto.url, fleet.cfg.fleet, "silent", fleet.coord.package_digest)
    try:
        fleet.coord.wait_for_agents(6, 30)
        yield fleet, rogue, outsider, skewed
    finally:
        silent.link.stop()
        rogue.link.stop()
        outsider.link.stop()
        skewed.stop()
        fleet.close()


def _wait_task(rogue: Insider, n: int) -> tuple[dict, bytes]:
    deadline = time.time() + 15
    while len(rogue.tasks) < n and time.time() < deadline:
        time.sleep(0.01)
    assert len(rogue.tasks) >= n, "the insider got no task"
    return rogue.tasks[n - 1]


def test_hostile_corpus_from_outside_and_inside(corpus_fleet, mosquitto):
    fleet, rogue, outsider, skewed = corpus_fleet
    coord, fleet_name = fleet.coord, fleet.cfg.fleet
    model_before = {a.cfg.agent_id: a.model_digest for a in fleet.agents.values()}

    # ---------------------------------------------------------------- round 1: the insider's key
    fleet.run_async(1)
    task, _ = _wait_task(rogue, 1)
    insider_classes = {
        "unknown FedZip field": (rogue.result(task, codec={"name": "fedzip", "z": 0.05, "bogus": 1}), "codec"),
        "out-of-range z": (rogue.result(task, codec={"name": "fedzip", "z": 7.0}), "codec"),
        "codec differs from the task's": (rogue.result(task, codec={"name": "zstd"}), "codec"),
        "metrics as a list": (rogue.result(task, meta_metrics=[1, 2, 3]), "schema"),
        "text learn_s": (rogue.result(task, meta_learn_s="fast"), "schema"),
        "2**70 integer": (rogue.result(task, meta_samples=2**70), "malformed"),
        "samples 2**31": (rogue.result(task, meta_samples=2**31), "schema"),
        "NaN in metrics": ([rogue.raw_result(task, json.dumps(dict(rogue.header(task), meta={
            "samples": 10, "learn_s": 0.1, "metrics": {"loss": float("nan")}}), allow_nan=True).encode())],
            "malformed"),
        "Infinity in metrics": ([rogue.raw_result(task, json.dumps(dict(rogue.header(task), meta={
            "samples": 10, "learn_s": 0.1, "metrics": {"loss": float("inf")}}), allow_nan=True).encode())],
            "malformed"),
        "deeply nested header": ([rogue.raw_result(task, b'{"a":' * 600 + b"1" + b"}" * 600)], "malformed"),
        "oversized-number header": ([rogue.raw_result(task, b'{"round": 1' + b"0" * 5000 + b"}")], "malformed"),
        "huge float header": ([rogue.raw_result(task, b'{"learn_s": 1e999}')], "malformed"),
        "NaN tensor": (rogue.result(task, value=float("nan")), "nonfinite"),
        "future round": (rogue.result(task, round=task["round"] + 5), "future_round"),
        "another agent's id": (rogue.result(task, agent="agent-00"), "spoofed"),
    }
    for msgs, _ in insider_classes.values():
        rogue.send(msgs)
    rogue.send(rogue.result(task, value=1e38))  # finite, valid in every field, and enormous
    bad_energy = json.dumps({"event": "energy", "run": task["run"], "round": 1, "phase": 0,
                             "compute_j": float("inf"), "radio_j": 0.0, "idle_j": 0.0}, allow_nan=True).encode()
    rogue.publish("telemetry", protocol.seal({"kind": "telemetry", "agent": "rogue", "seq": [1, 10_000]},
                                             bad_energy, rogue.key))
    first = fleet.join(60)[0]
    honest = [a for a in (*HONEST, "skewed")]
    r1 = rows(fleet, "SELECT agent, status, detail, samples FROM agent_rounds WHERE round = 1 ORDER BY id")
    status1 = [(r["agent"], r["status"]) for r in r1]
    for name, (_, reason) in insider_classes.items():
        assert ("rogue", f"rejected:{reason}") in status1, (name, status1)
    assert ("rogue", "rejected:norm_bound") in status1, status1  # the 1e38 update
    assert ("rogue", "rejected:nonfinite") in status1
    assert first.ok == len(honest) and first.late == 1 and all((a, "ok") in status1 for a in honest), status1
    assert first.accuracy > 0.5, first.accuracy  # the 1e38 update did not reach the model
    assert not any(s[1] == "ok" for s in status1 if s[0] == "rogue")
    # the infinite energy report is refused too (one summary row for the agent's refused telemetry)
    assert any(r["agent"] == "rogue" and r["status"] == "rejected:malformed" and "telemetry" in (r["detail"] or "")
               for r in r1), r1

    # ---------------------------------------------------------------- round 2: outsiders, replays, floods
    outsider.garbage_on_tasks = True
    # a model package sealed under the old public broadcast key, and one signed with a wrong Ed25519 key
    evil = b"not a model package"
    old_key = hashlib.sha256(b"fedfleet-broadcast:" + fleet_name.encode()).digest()
    resealed = protocol.split({"kind": "model", "fleet": fleet_name, "agent": "coordinator", "msg": "evil"}, evil,
                              old_key)
    wrong_signed = protocol.split_signed({"kind": "model", "fleet": fleet_name, "agent": "coordinator",
                                          "msg": "evil2"}, evil, signing.new_signing_seed())
    for m in resealed + wrong_signed:
        outsider.link.publish(protocol.broadcast_topic(fleet_name, "model/5"), m, retain=True)
    # a forged task for agent-00 (HMAC'd under a guessed key)
    outsider.link.publish(protocol.agent_topic(fleet_name, "agent-00", "task"),
                          protocol.seal({"kind": "task", "fleet": fleet_name, "agent": "agent-00"}, b"x" * 200,
                                        b"g" * 32))
    # the insider's own status, replayed (retained) after a newer one
    old_status = rogue.status({"state": "offline", "model": None, "samples": 300}, seq=1)
    # a keyless flood on unknown ids
    rows_before = len(rows(fleet))
    for i in range(1500):
        outsider.link.publish(protocol.agent_topic(fleet_name, f"ghost-{i}", "result"), b"FFLT" + bytes(64))
    done: dict = {}
    runner = threading.Thread(target=lambda: done.setdefault("s", coord.run_round(2)))
    runner.start()
    task2, _ = _wait_task(rogue, 2)
    rogue.publish("status", rogue.status({"state": "online", "model": coord.package_digest, "samples": 300}),
                  retain=True)
    rogue.publish("status", old_status, retain=True)  # replayed: seq 1 is older than the last seen
    captured = outsider.retained["agent-01"]  # a genuine status, captured off the wire, replayed without a key
    fleet.agents["agent-01"]._announce()  # the agent says something newer first
    time.sleep(0.3)
    outsider.link.publish(protocol.agent_topic(fleet_name, "agent-01", "status"), captured, retain=True)
    stale = rogue.result(task, value=0.0)  # a result for round 1, replayed in round 2
    rogue.send(stale)
    for i in range(200):  # chunk flood: many partial messages from one key
        header = rogue.header(task2, msg=f"flood{i}", chunk=[0, 3], total=3 * 1000, digest="0" * 64)
        rogue.publish("result", protocol.seal(header, bytes(1000), rogue.key))
    rogue.send(rogue.result(task2, value=0.0, meta_samples=2**31 - 1))  # valid; weight capped
    runner.join(60)
    second = done["s"]
    r2 = rows(fleet, "SELECT agent, status, detail, samples FROM agent_rounds WHERE round = 2 ORDER BY id")
    status2 = [(r["agent"], r["status"]) for r in r2]
    # keyless garbage did not close any honest agent's slot: their real results count
    assert all((a, "ok") in status2 for a in honest), status2
    assert second.ok == len(honest) + 1 and second.late == 1, (second, status2)
    assert ("(unauthenticated)", "rejected:malformed") in status2
    unauth = [r for r in r2 if r["agent"] == "(unauthenticated)"]
    assert len(unauth) <= 6, unauth  # one row per reason, not one per message
    assert ("(unauthenticated)", "rejected:unknown_agent") in status2
    assert any("1500 unauthenticated" in (r["detail"] or "") for r in unauth), unauth
    assert len(rows(fleet)) - rows_before < 40
    # the replayed status was refused, and the insider is still online
    assert ("rogue", "rejected:replayed") in status2, status2
    assert ("agent-01", "rejected:replayed") in status2, status2
    assert coord.online["rogue"]["state"] == "online" and coord.online["agent-01"]["state"] == "online"
    # the replayed round-1 result is refused as stale and did not close the slot (its valid one counts)
    assert ("rogue", "rejected:stale_round") in status2
    ok_rogue = [r for r in r2 if r["agent"] == "rogue" and r["status"] == "ok"]
    assert ok_rogue and ok_rogue[0]["samples"] <= 4 * 300 and "claimed" in ok_rogue[0]["detail"]
    # the chunk flood is bounded per sender
    count, held = coord.receive.reassembler.pending_of("rogue")
    assert count <= coord.cfg.per_sender_pending and coord.receive.reassembler.evicted >= 190
    # the agents kept their model and refused the resealed and wrongly signed packages and the forged task
    for a in fleet.agents.values():
        assert a.model_digest == model_before[a.cfg.agent_id] == coord.package_digest
        assert a.refused.get("bad_auth", 0) >= 1 and a.refused.get("bad_signature", 0) >= 1, a.refused
    assert fleet.agents["agent-00"].refused.get("bad_auth", 0) >= 2  # the package and the forged task
    # the agent whose clock is 90 s fast took every task
    assert skewed.tasks_dropped == 0 and skewed.rounds_done == 2
    assert second.accuracy > 0.5
    for m in range(5, 8):  # clear the retained junk
        outsider.link.publish(protocol.broadcast_topic(fleet_name, f"model/{m}"), b"", retain=True)


class _SlowClock:
    """The `time` module as seen by a coordinator whose wall clock is 90 s behind its agents."""

    def __getattr__(self, name: str):
        return getattr(time, name)

    @staticmethod
    def time() -> float:
        return time.time() - 90.0


def test_agents_whose_clock_is_90_s_ahead_of_the_coordinator_take_every_task(mosquitto, tmp_path, monkeypatch):
    import fedfleet.coordinator.engine.rounds as server

    monkeypatch.setattr(server, "time", _SlowClock())
    fleet = start_fleet(mosquitto.url, tmp_path, rounds=2, deadline_s=10.0)
    try:
        fleet.coord.wait_for_agents(3, 30)
        summaries = fleet.coord.run(2)
    finally:
        fleet.close()
    assert [s.ok for s in summaries] == [3, 3]
    assert all(a.tasks_dropped == 0 and a.rounds_done == 2 for a in fleet.agents.values())


def test_an_agent_without_a_pinned_key_refuses_everything_and_says_so(mosquitto, tmp_path):
    fleet = start_fleet(mosquitto.url, tmp_path, roster_extra=("unpinned",), rounds=1)
    from fedfleet.coordinator.job.run import shards

    local, _ = shards(fleet.cfg)
    unpinned = Agent(AgentConfig(mosquitto.url, fleet.cfg.fleet, "unpinned", protocol.derive_key(SECRET, "unpinned")),
                     local[0])
    unpinned.start()
    try:
        fleet.coord.wait_for_agents(3, 30)
        deadline = time.time() + 10
        while ("error" not in fleet.coord.online.get("unpinned", {}) or not unpinned.refused) and time.time() < deadline:
            time.sleep(0.05)
        assert "no coordinator key pinned" in fleet.coord.online["unpinned"]["error"]
        assert unpinned.model_digest is None and unpinned.refused.get("no_coordinator_key", 0) >= 1
        assert "unpinned" not in fleet.coord.ready_agents()
    finally:
        unpinned.stop()
        fleet.close()


def test_a_fleet_of_two_refuses_a_float32_max_update_from_round_one_and_keeps_serving(mosquitto, tmp_path):
    """Issue 28 item 5: with 2 agents the norm bound had no reference and the quorum of 0.5 started rounds with one
    result; an update near float32's maximum was accepted and the next downlink encoding ended `serve` (rc 2)."""
    fleet = start_fleet(mosquitto.url, tmp_path, roster_extra=("rogue",), agents=1, deadline_s=5.0, quorum=0.5,
                        uplink={"name": "none"}, rounds=2)
    rogue = Insider(mosquitto.url, fleet.cfg.fleet, "rogue", fleet.coord.package_digest)
    try:
        fleet.coord.wait_for_agents(2, 30)
        fleet.run_async(2)
        for n in (1, 2):
            task, _ = _wait_task(rogue, n)
            rogue.send(rogue.result(task, value=3.0e38, meta_samples=300))
        summaries = fleet.join(60)
        assert [s.ok for s in summaries] == [1, 1]
        assert all(np.isfinite(s.accuracy) and s.accuracy > 0.3 for s in summaries), summaries
        statuses = [(r["agent"], r["status"]) for r in rows(fleet)]
        assert statuses.count(("rogue", "rejected:norm_bound")) == 2, statuses
        assert all(torch_finite(v) for v in fleet.coord.strategy.global_state().values())
    finally:
        rogue.link.stop()
        fleet.close()


def torch_finite(v) -> bool:
    return bool(np.isfinite(v.numpy()).all())
