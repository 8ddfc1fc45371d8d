"""The agent's parts, each on its own and without a broker: Host, Inbox, Admission, LocalReplica, Uplink,
and the signature cache a Host shares."""

from __future__ import annotations

import os
import time

import numpy as np
import pytest

from fedfleet.edge_agent.admission import Admission, task_key
from fedfleet.edge_agent.agent import Agent, AgentConfig, learner_name
from fedfleet.edge_agent.errors import ProtocolError
from fedfleet.edge_agent.host import Host
from fedfleet.edge_agent.inbox import Inbox, Received
from fedfleet.edge_agent.learners import LearnResult, LocalData, Task
from fedfleet.edge_agent.model import LOAD_LOCK
from fedfleet.edge_agent.replica import LocalReplica
from fedfleet.edge_agent.uplink import Uplink
from fedfleet.edge_agent.wire import codecs, protocol, signing
from fedfleet.edge_agent.wire.shared_bytes import SharedBytes

SEED = os.urandom(32)
PUB = signing.public_key(SEED)
KEY = b"k" * 32


def _config(**kw) -> AgentConfig:
    return AgentConfig("mqtt://127.0.0.1:1", "fleet", "pi-01", KEY, coordinator_key=PUB, **kw)


def _data() -> LocalData:
    return LocalData(np.zeros((2, 3), np.float32), np.zeros(2, np.int64))


# ------------------------------------------------------------------ Host
def test_agents_share_the_process_host_unless_given_one_and_a_device_host_shares_nothing() -> None:
    a, b = Agent(_config(), _data()), Agent(_config(), _data())
    assert a.host is b.host is Host.process()
    assert a.model_cache is None and a.local.shared_models is None  # as before: a default agent loads its own
    host = Host()
    c, d = Agent(_config(), _data(), host=host), Agent(_config(), _data(), host=host)
    assert c.local.shared_models is d.local.shared_models is host.models
    assert c.local.payloads is d.local.payloads is host.payloads
    assert c.inbox.signatures is host.signatures and c.host is not Host.process()
    assert c.replica.transitions is d.replica.transitions is host.transitions
    assert a.replica.transitions is Host.process().transitions
    own: dict = {}
    assert Agent(_config(), _data(), model_cache=own).local.shared_models is own
    solo = Host.solo()
    assert solo.models is None and solo.payloads is not Host.process().payloads
    body = bytes(bytearray(b"state" * 10))
    assert solo.payloads.shared(body) is body and len(solo.payloads) == 0  # keeps nothing for others
    assert solo.load_lock is host.load_lock is LOAD_LOCK  # the CPython bug is the interpreter's: one lock


# ------------------------------------------------------------------ signatures
def test_a_signature_cache_remembers_only_the_bytes_that_verified_under_its_key(monkeypatch) -> None:
    data = os.urandom(3000)
    sig = signing.sign(SEED, data)
    cache = signing.VerifiedSignatures(keep=2)
    signing.verify(PUB, data, sig, cache=cache)
    calls = []
    real = type(cache.key(PUB)).verify
    monkeypatch.setattr(type(cache.key(PUB)), "verify", lambda self, *a: calls.append(1) or real(self, *a))
    signing.verify(PUB, data, sig, cache=cache)
    assert calls == []  # remembered
    signing.verify(PUB, data, sig, cache=signing.VerifiedSignatures())
    assert calls == [1]  # another Host's cache does not vouch
    with pytest.raises(ProtocolError):
        signing.verify(PUB, data + b"\0", sig, cache=cache)
    for i in range(2):  # the newest `keep` only
        extra = b"%d" % i
        signing.verify(PUB, extra, signing.sign(SEED, extra), cache=cache)
    calls.clear()
    signing.verify(PUB, data, sig, cache=cache)
    assert calls == [1]


# ------------------------------------------------------------------ inbox
def _signed(header: dict, body: bytes = b"payload", seed: bytes = SEED) -> bytes:
    chunks = protocol.split_signed({"fleet": "fleet", **header}, body, seed)
    assert len(chunks) == 1
    return chunks[0]


def test_the_inbox_routes_signed_messages_by_topic_and_counts_what_it_refuses() -> None:
    got: list = []
    current = {"digest": "abc"}
    inbox = Inbox(fleet="fleet", agent_id="pi-01", coordinator_key=PUB,
                  deliver=lambda k, h, b: got.append((k, h, b)), current_model=lambda: current["digest"])
    task_topic, state_topic = inbox.task_topic, inbox.state_topic
    model_topic = protocol.broadcast_topic("fleet", "model/x")
    before = time.monotonic()
    inbox.on_message(task_topic, _signed({"kind": "task", "agent": "pi-01", "run": "r"}))
    assert got[-1][0] == "task" and got[-1][2] == b"payload" and got[-1][1].at >= before
    assert "at" not in got[-1][1] and "_received" not in got[-1][1]  # the header stays as it was signed
    inbox.on_message(model_topic, _signed({"kind": "model"}, b"pkg"))
    assert got[-1][0] == "model"
    current["digest"] = protocol.digest(b"pkg")
    inbox.on_message(model_topic, _signed({"kind": "model"}, b"pkg"))  # the package in use: its header only
    assert len(got) == 3 and got[-1][0] == "boot" and got[-1][2] == b""
    inbox.on_message(task_topic, _signed({"kind": "task", "agent": "pi-02"}))  # another agent's
    inbox.on_message(state_topic, _signed({"kind": "task", "agent": "pi-01"}))  # wrong kind for the topic
    inbox.on_message(task_topic, _signed({"kind": "task", "agent": "pi-01"}, seed=os.urandom(32)))
    inbox.on_message(task_topic, protocol.seal({"kind": "task", "fleet": "fleet", "agent": "pi-01"}, b"x", KEY))
    inbox.on_message(task_topic, b"")  # a cleared retained message: nothing
    inbox.on_message("elsewhere", _signed({"kind": "task", "agent": "pi-01"}))  # not subscribed: ignored
    assert len(got) == 3
    assert inbox.refused == {"spoofed": 2, "bad_signature": 1, "bad_auth": 1}
    unpinned = Inbox(fleet="fleet", agent_id="pi-01", coordinator_key=None, deliver=lambda *a: got.append(a),
                     current_model=lambda: None)
    unpinned.on_message(task_topic, _signed({"kind": "task", "agent": "pi-01"}))
    assert unpinned.refused == {"no_coordinator_key": 1} and len(got) == 3


# ------------------------------------------------------------------ admission
def test_admission_dedupes_by_dispatch_and_says_why_a_task_is_late() -> None:
    clock = {"now": 1000.0}
    adm = Admission(max_skew_s=60.0, now=lambda: clock["now"], done=[("r", 0, 0)])
    signed = {"run": "r", "round": 1, "phase": 0, "msg": "m1", "ttl": 30, "sent": 1000.0}
    header = Received(signed, time.monotonic())
    key = task_key(header)
    assert key == ("r", 1, 0) and not adm.seen(key, "m1") and adm.seen(("r", 0, 0), "any")
    adm.take(key, "m1")
    assert adm.seen(key, "m1") and not adm.seen(key, "m2")  # a resumed coordinator's new dispatch
    adm.release(key)
    assert not adm.seen(key, "m1")
    assert adm.expired(header) == "" and 0 < adm.remaining(header) <= 30
    clock["now"] = 1000.0 + 30 + 61
    assert adm.expired(header).startswith("task sent 91 s ago")
    assert adm.expired(Received(signed, time.monotonic() - 31)) == "deadline passed"
    assert adm.expired({"ttl": 30}) == "task has no ttl or send time"
    adm.wait(header, b"x")
    assert adm.take_waiting() == [(header, b"x")] and adm.take_waiting() == []


# ------------------------------------------------------------------ replica
def test_the_replica_keeps_a_few_state_broadcasts_of_the_newest_versions_one_copy_per_host() -> None:
    payloads = SharedBytes()
    a = LocalReplica(runtime="onnxruntime", threads=1, load_lock=LOAD_LOCK, payloads=payloads)
    b = LocalReplica(runtime="onnxruntime", threads=1, load_lock=LOAD_LOCK, payloads=payloads)

    def header(v: int) -> dict:
        return {"run": "r", "meta": {"sync": {"mode": "full", "version": v, "base": None, "digest": "d" * 64, "lens": []}}}

    for r in (a, b):
        r.keep_state(header(1), bytes(bytearray(b"one" * 50)))
    assert a.states[("r", 1)][0][1] is b.states[("r", 1)][0][1]
    for v in (2, 3, 4):
        for i in range(6):
            a.keep_state(header(v), b"%d" % i)
    assert sorted(a.states) == [("r", 2), ("r", 3), ("r", 4)] and all(len(c) == 4 for c in a.states.values())
    sync = {"mode": "broadcast", "version": 9, "digest": "d" * 64}
    assert a.tensors("r", sync, b"", [("w", (1,))], {"name": "none"}, max_bytes=1 << 20) is None  # still arriving
    with pytest.raises(ProtocolError):
        a.tensors("r", {**sync, "version": 4, "digest": "e" * 64}, b"", [("w", (1,))], {"name": "none"},
                  max_bytes=1 << 20)


# ------------------------------------------------------------------ uplink
class _RecordingLink:
    def __init__(self) -> None:
        self.sent: list[tuple[str, bytes]] = []

    def publish(self, topic: str, payload: bytes, retain: bool = False) -> None:
        self.sent.append((topic, payload))


def test_the_uplink_stamps_fresh_seqs_and_sends_the_expected_tensors_as_signed_chunks() -> None:
    link, clock = _RecordingLink(), {"now": 5.0}
    up = Uplink(_config(profile="rpi4"), link=lambda: link, now=lambda: clock["now"])
    assert up.seq() == [0, 1] and up.seq() == [0, 2]
    will = up.seq(will=True)
    assert will == [5000, protocol.WILL_SEQ] and up.seq() == [5000, 1]
    assert up.seq(will=True)[0] == 5001  # always above the last epoch, even when the clock did not move
    layout = [("w", (4, 3))]
    header = {"meta": {"expect": [["w", [4, 3]]], "uplink": {"name": "none"}}}
    task = Task(run="r", round=2, method="fedavg", config={}, tensors={}, phase=0, deadline=0.0)
    w = np.arange(12, dtype=np.float32).reshape(4, 3)
    up.result(header, task, LearnResult({"w": w, "extra": w}, 7, {"loss": float("nan")}), 0.5,
              feedback=lambda *a: pytest.fail("no error feedback asked"))
    (topic, chunk), = link.sent
    out, payload = protocol.open_envelope(chunk, KEY)
    assert topic == up.result_topic and out["agent"] == "pi-01" and out["round"] == 2
    assert out["meta"]["metrics"] == {"loss": None} and out["meta"]["profile"] == "rpi4"
    assert np.array_equal(codecs.decode(payload, layout, {"name": "none"}, max_bytes=1 << 20)["w"], w)


def test_the_learner_is_the_task_configs_learner_else_its_method() -> None:
    task = Task(run="r", round=0, method="fedavg", config={}, tensors={}, phase=0, deadline=0.0)
    assert learner_name(task) == "fedavg"
    task.config["learner"] = "byzantine"
    assert learner_name(task) == "byzantine"
