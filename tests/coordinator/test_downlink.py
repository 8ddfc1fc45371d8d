"""The compressed downlink: agents' replicas equal the coordinator's reconstruction bit for bit, nothing is
lost over rounds (server-side error feedback), and late joiners and agents that missed rounds catch up."""

from __future__ import annotations

import sqlite3

import numpy as np
import pytest

from fedfleet.coordinator.engine.downlink import DownlinkSync
from fedfleet.edge_agent.agent import Agent, AgentConfig
from fedfleet.edge_agent.downlink import Replica, Transitions, state_digest
from fedfleet.edge_agent.errors import ProtocolError
from fedfleet.edge_agent.wire import codecs, protocol
from tests.support.fleet import COORDINATOR_KEY, SECRET, shards, start_fleet

SPEC = {"name": "fedzip", "z": 0.1, "k": 3, "encoding": "e4"}


def _walk(rng: np.random.Generator, rounds: int) -> list[dict[str, np.ndarray]]:
    g = {"w": rng.normal(size=(30, 20)).astype(np.float32), "b": rng.normal(size=20).astype(np.float32)}
    out = []
    for _ in range(rounds):
        g = {k: (v + 0.05 * rng.normal(size=v.shape)).astype(np.float32) for k, v in g.items()}
        out.append(g)
    return out


def test_replicas_follow_the_reconstruction_and_the_error_does_not_accumulate():
    rng = np.random.default_rng(0)
    sync, replica, layout = DownlinkSync(SPEC), Replica(), [("w", (30, 20)), ("b", (20,))]
    errors = []
    for g in _walk(rng, 30):
        sync.advance(g)
        meta, payload = sync.sync_for("a")
        got = replica.apply("run", meta, payload, layout, SPEC, max_bytes=1 << 20)
        sync.confirm("a", sync.version)
        assert all(np.array_equal(got[k], sync.state[k]) for k in got)  # bit for bit
        assert meta["mode"] == ("full" if sync.version == 1 else "chain")
        errors.append(max(float(np.abs(g[k] - sync.state[k]).max()) for k in g))
    # error feedback: G - R stays bounded (it would grow like a random walk if dropped parts were lost)
    assert max(errors[-10:]) < 3 * max(errors[1:10]) + 1e-6


def test_an_agent_that_missed_rounds_gets_the_chain_or_the_full_state_whichever_is_smaller():
    rng = np.random.default_rng(1)
    sync, layout = DownlinkSync(SPEC), [("w", (30, 20)), ("b", (20,))]
    behind, fresh = Replica(), Replica()
    walk = _walk(rng, 12)
    sync.advance(walk[0])
    meta, payload = sync.sync_for("behind")
    behind.apply("run", meta, payload, layout, SPEC, max_bytes=1 << 20)
    sync.confirm("behind", 1)
    for g in walk[1:4]:
        sync.advance(g)
    meta, payload = sync.sync_for("behind")  # three versions behind: a chain of three codes
    assert meta["mode"] == "chain" and meta["base"] == 1 and len(meta["lens"]) == 3
    full_meta, full = sync.sync_for("fresh")  # never seen: the full state
    assert full_meta["mode"] == "full" and len(payload) < len(full)
    a = behind.apply("run", meta, payload, layout, SPEC, max_bytes=1 << 20)
    b = fresh.apply("run", full_meta, full, layout, SPEC, max_bytes=1 << 20)
    assert all(np.array_equal(a[k], b[k]) and np.array_equal(a[k], sync.state[k]) for k in a)
    modes = []
    for g in _walk(rng, 60):  # the further behind, the longer the chain, until a full state is smaller
        sync.advance(g)
        meta, payload = sync.sync_for("behind")
        modes.append(meta["mode"])
        if meta["mode"] == "chain":
            assert len(payload) < len(sync.sync_for("fresh")[1])
    assert modes[0] == "chain" and modes[-1] == "full" and modes == sorted(modes)  # chain ... chain, full ... full


def test_a_chain_that_does_not_fit_the_replica_is_refused():
    rng = np.random.default_rng(2)
    sync, layout = DownlinkSync(SPEC), [("w", (30, 20)), ("b", (20,))]
    walk = _walk(rng, 3)
    sync.advance(walk[0])
    sync.confirm("a", 1)
    sync.advance(walk[1])
    meta, payload = sync.sync_for("a")
    with pytest.raises(ProtocolError, match="replica"):
        Replica().apply("run", meta, payload, layout, SPEC, max_bytes=1 << 20)  # holds nothing
    bad = dict(meta, digest="0" * 64)
    with pytest.raises(ProtocolError, match="digest"):
        Replica().apply("run", dict(bad, mode="full", base=None, lens=[]), sync.sync_for("x")[1], layout, SPEC,
                        max_bytes=1 << 20)
    with pytest.raises(ProtocolError, match="malformed"):
        Replica().apply("run", {"mode": "chain", "version": True}, payload, layout, SPEC, max_bytes=1 << 20)


def test_over_mosquitto_replicas_equal_the_reconstruction_and_a_late_joiner_catches_up(mosquitto, tmp_path):
    fleet = start_fleet(mosquitto.url, tmp_path, agents=4, rounds=20, downlink="fedzip", deadline_s=20.0)
    late_id = "agent-03"
    late_agent = fleet.agents.pop(late_id)
    late_agent.stop(graceful=True)  # the fourth agent leaves before round 1 and joins at round 12
    try:
        fleet.coord.wait_for_agents(3, 30)
        first = fleet.coord.run(11)
        local, _ = shards(fleet.cfg)
        joiner = Agent(AgentConfig(mosquitto.url, fleet.cfg.fleet, late_id, protocol.derive_key(SECRET, late_id), coordinator_key=COORDINATOR_KEY),
                       local[3])
        joiner.start()
        fleet.agents[late_id] = joiner
        fleet.coord.wait_for_agents(4, 30)
        rest = [fleet.coord.run_round(r) for r in range(12, 21)]
    finally:
        fleet.close()
    sync = fleet.coord._sync
    assert sync is not None and sync.version == 20
    assert all(s.ok == 3 for s in first) and all(s.ok == 4 for s in rest)
    for agent_id, agent in fleet.agents.items():
        assert agent.replica.version == 20, agent_id
        assert all(np.array_equal(agent.replica.tensors[k], sync.state[k]) for k in sync.state), agent_id
    assert state_digest(fleet.agents[late_id].replica.tensors, sync.layout) == sync.digest
    # the model learns through the compressed downlink, and the downlink costs far less than dense tasks
    assert rest[-1].accuracy > 0.8
    dense = codecs.layout_size(sync.layout) * 4
    with sqlite3.connect(tmp_path / "ledger.sqlite") as db:
        db.row_factory = sqlite3.Row
        rows = db.execute("SELECT round, agent, bytes_down FROM agent_rounds WHERE status = 'ok'").fetchall()
    steady = [r["bytes_down"] for r in rows if r["round"] >= 3 and not (r["agent"] == late_id and r["round"] == 12)]
    assert max(steady) < dense / 4
    joined = [r["bytes_down"] for r in rows if r["agent"] == late_id and r["round"] == 12]
    assert joined and joined[0] > dense / 2  # its first task carried the full state


def test_a_restored_sync_codes_the_same_changes_and_sends_its_reconstruction_in_full_once():
    """What a checkpoint carries (`saved`/`restore`): a resumed coordinator holds the same R at the same
    version, codes the next change exactly as the uninterrupted one, and its agents get R in full once."""
    walk = _walk(np.random.default_rng(1), 8)
    straight, resumed = DownlinkSync(SPEC), DownlinkSync(SPEC)
    for g in walk[:5]:
        straight.advance(g)
        straight.confirm("a", straight.version)
    resumed.restore(straight.saved())
    assert resumed.version == straight.version and resumed.digest == straight.digest
    replica, layout = Replica(), [("w", (30, 20)), ("b", (20,))]
    for g in walk[5:]:
        straight.advance(g)
        resumed.advance(g)
        assert resumed.digest == straight.digest and resumed.round_sync()[1] == straight.round_sync()[1]
        meta, payload = resumed.sync_for("a")
        assert meta["mode"] == ("full" if g is walk[5] else "chain")
        got = replica.apply("run", meta, payload, layout, SPEC, max_bytes=1 << 20)
        resumed.confirm("a", resumed.version)
        assert all(np.array_equal(got[k], straight.state[k]) for k in got)


def test_replicas_of_one_process_share_a_transition_and_get_the_same_state():
    """Two agents' replicas applying the same sync bytes to the same state: the second reuses the first's
    result (one decode per process, the same tensors object kept), and both equal the coordinator's R."""
    sync, layout = DownlinkSync(SPEC), [("w", (30, 20)), ("b", (20,))]
    shared = Transitions()
    first, second = Replica(transitions=shared), Replica(transitions=shared)
    for i, g in enumerate(_walk(np.random.default_rng(2), 4)):
        sync.advance(g)
        meta, payload = sync.round_sync()
        a = first.apply("run", meta, payload, layout, SPEC, max_bytes=1 << 20)
        b = second.apply("run", meta, bytes(payload), layout, SPEC, max_bytes=1 << 20)
        assert second.tensors is first.tensors  # shared, not decoded again
        a["w"][:] = 0.0  # what a caller gets is its own copy
        assert all(np.array_equal(b[k], sync.state[k]) and np.array_equal(first.tensors[k], sync.state[k])
                   for k in b), i
    # replicas whose state is another object decode for themselves: equal content gives the same state,
    # a replica that drifted is still caught by the digest
    own = Replica("run", first.version, {k: v.copy() for k, v in first.tensors.items()}, shared)
    drifted = Replica("run", first.version, {k: v + 1e-3 for k, v in first.tensors.items()}, shared)
    sync.advance(_walk(np.random.default_rng(3), 1)[0])
    meta, payload = sync.round_sync()
    first.apply("run", meta, payload, layout, SPEC, max_bytes=1 << 20)
    got = own.apply("run", meta, payload, layout, SPEC, max_bytes=1 << 20)
    assert own.tensors is not first.tensors and all(np.array_equal(got[k], sync.state[k]) for k in got)
    with pytest.raises(ProtocolError, match="digest"):
        drifted.apply("run", meta, payload, layout, SPEC, max_bytes=1 << 20)
