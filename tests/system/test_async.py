"""Buffered asynchronous aggregation ([aggregation] mode = "async", coordinator/engine/buffered.py) and the agents'
store-and-forward outbox (edge_agent/outbox.py), over a real Mosquitto with real agents."""

from __future__ import annotations

import logging
import math
import sqlite3
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from fedfleet.coordinator.broker import MosquittoBroker
from fedfleet.coordinator.engine.buffered import staleness_weight
from fedfleet.coordinator.job.config import check_aggregation, load
from fedfleet.edge_agent.agent import Agent, AgentConfig
from fedfleet.edge_agent.errors import ConfigError
from fedfleet.edge_agent.outbox import Outbox
from fedfleet.edge_agent.wire import codecs, protocol
from fedfleet.edge_agent.wire.mqtt import MqttLink
from tests.support.fleet import COORDINATOR_KEY, SECRET, Rogue, start_fleet

ASYNC = {"mode": "async", "concurrency": 3, "buffer": 1, "max_staleness": 50, "staleness": "sqrt"}


def _rows(coord, where: str = "1", params: tuple = ()) -> list[dict]:
    """Committed ledger rows (read from the file: the coordinator may have closed its ledger)."""
    db = sqlite3.connect(str(coord.run_dir / "ledger.sqlite"))
    db.row_factory = sqlite3.Row
    try:
        return [dict(r) for r in db.execute(f"SELECT * FROM agent_rounds WHERE {where} ORDER BY id", params)]
    finally:
        db.close()


def _until(condition, timeout_s: float, step=None, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return
        if step is not None:
            step()
        else:
            time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


# ---------------------------------------------------------------- configuration and weighting
def test_staleness_weights():
    assert staleness_weight("sqrt", 0) == 1.0 and staleness_weight("sqrt", 3) == pytest.approx(0.5)
    assert staleness_weight("inverse", 4) == pytest.approx(0.2)
    assert staleness_weight("constant", 9) == 1.0
    assert [staleness_weight("sqrt", s) for s in range(5)] == sorted((1 / math.sqrt(1 + s) for s in range(5)),
                                                                      reverse=True)


@pytest.mark.parametrize("table, message", [
    ({"mode": "fast"}, "'aggregation.mode' must be 'sync' or 'async'"),
    ({"mode": "async", "buffer": 0}, "'aggregation.buffer'"),
    ({"mode": "async", "concurrency": 2, "buffer": 5}, "cannot exceed"),
    ({"mode": "async", "max_staleness": -1}, "'aggregation.max_staleness'"),
    ({"mode": "async", "staleness": "log"}, "'sqrt', 'inverse' or 'constant'"),
    ({"mode": "async", "buffers": 4}, "unknown field 'aggregation.buffers'"),
    ({"mode": "async", "concurrency": True}, "'aggregation.concurrency'"),
])
def test_aggregation_table_errors_name_the_field(table, message):
    with pytest.raises(ConfigError, match=message):
        check_aggregation(table, "job.toml")


def test_job_file_async_section(tmp_path):
    p = tmp_path / "job.toml"
    p.write_text('[job]\nrounds = 3\n[aggregation]\nmode = "async"\nbuffer = 4\nstaleness = "inverse"\n')
    job = load(p)
    assert job.aggregation == {"mode": "async", "concurrency": 20, "buffer": 4, "max_staleness": 10,
                               "staleness": "inverse"}
    p.write_text('[job]\nrounds = 3\n[aggregation]\nmode = "sync"\n')
    assert load(p).aggregation is None  # synchronous rounds: the job is the same as without the table
    p.write_text('[aggregation]\nmode = "async"\nwindow = 3\n')
    with pytest.raises(ConfigError, match="unknown field 'aggregation.window'"):
        load(p)
    with pytest.raises(ConfigError, match="uploads an update"):  # a method whose phases are not one update
        start_fleet("mqtt://127.0.0.1:1", tmp_path / "run", start_agents=False, method="ggeur",
                    aggregation=dict(ASYNC))


# ---------------------------------------------------------------- the engine
@pytest.fixture()
def broker():
    b = MosquittoBroker()
    yield b
    b.stop()


def test_async_versions_staleness_and_downlink(broker, tmp_path):
    fleet = start_fleet(broker.url, tmp_path, agents=4, aggregation={**ASYNC, "concurrency": 4, "buffer": 2})
    try:
        fleet.coord.wait_for_agents(4, 30)
        summaries = fleet.coord.run(6)
    finally:
        fleet.close()
    assert [s.round for s in summaries] == [1, 2, 3, 4, 5, 6] and all(s.ok == 2 for s in summaries)
    assert summaries[-1].accuracy > summaries[0].accuracy
    assert "versions/min" in summaries[-1].note and "staleness mean" in summaries[-1].note
    ok = _rows(fleet.coord, "status = 'ok'")
    assert len(ok) == 12
    for row in ok:  # version trained from + staleness = the version it went into - 1
        assert row["version"] + row["staleness"] == row["round"] - 1 and row["staleness"] >= 0
    assert any(r["staleness"] > 0 for r in ok)  # four tasks in flight for two results per version
    # the downlink codes each agent's change from the version it holds: a chain is far smaller than the full state
    first = min(r["bytes_down"] for r in ok if r["version"] == 0)
    later = [r["bytes_down"] for r in ok if r["version"] > 0]
    assert later and max(later) < first / 2
    db = sqlite3.connect(str(fleet.coord.run_dir / "ledger.sqlite"))
    assert [r for (r,) in db.execute("SELECT round FROM rounds ORDER BY round")] == [1, 2, 3, 4, 5, 6]
    db.close()


def test_results_past_max_staleness_are_refused_with_a_row(broker, tmp_path):
    fleet = start_fleet(broker.url, tmp_path, agents=3,
                        aggregation={**ASYNC, "concurrency": 3, "buffer": 1, "max_staleness": 0})
    try:
        fleet.coord.wait_for_agents(3, 30)
        fleet.coord.run(4)
    finally:
        fleet.close()
    stale = _rows(fleet.coord, "status = 'rejected:staleness'")
    assert stale, "three tasks in flight, one result per version: the others are one version old"
    assert all("(max_staleness 0)" in r["detail"] or "run ended" in r["detail"] for r in stale), stale
    assert all(r["staleness"] > 0 for r in stale if "max_staleness" in r["detail"])  # the row says how stale
    assert all(r["version"] + r["staleness"] == r["round"] - 1 for r in stale)
    assert all(r["staleness"] == 0 for r in _rows(fleet.coord, "status = 'ok'"))


def test_hostile_version_numbers_are_refused_with_one_line_and_a_row(broker, tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="fedfleet.coordinator.engine.buffered")
    fleet = start_fleet(broker.url, tmp_path, agents=2, roster_extra=("rogue",),
                        aggregation={**ASYNC, "concurrency": 3, "buffer": 1})
    fleet.coord.wait_for_agents(2, 30)
    rogue = Rogue(broker.url, fleet.cfg.fleet, "rogue", fleet.coord.package_digest)
    coord = fleet.coord
    coord.wait_for_agents(3, 30)
    coord.begin()
    claims = [10**6, -1, 2**40, "1", None]  # future, negative, huge, not an integer, missing
    try:
        for used, claim in enumerate(claims):
            _until(lambda used=used: len(rogue.tasks) > used, 30, coord.next_version, "a task for the rogue")
            header, _ = rogue.tasks[used]  # (its next task may already be there: each refusal frees its slot)
            zero = {name: np.zeros(shape, np.float32) for name, shape in codecs.normalize_layout(header["meta"]["expect"])}
            meta = {"samples": 10, "learn_s": 0.01, "metrics": {}}
            if claim is not None:
                meta["version"] = claim
            rogue.send(rogue.result(header, zero, meta=meta))
            _until(lambda used=used: len(_rows(coord, "agent = 'rogue'")) > used, 30, coord.next_version,
                   "the refusal row")
        # another version than its task carried (once versions moved on)
        _until(lambda: len(rogue.tasks) > len(claims) and rogue.tasks[-1][0]["meta"]["version"] > 0, 30,
               coord.next_version, "a task of a later version")
        used = len(rogue.tasks) - 1
        header, _ = rogue.tasks[used]
        zero = {name: np.zeros(shape, np.float32) for name, shape in codecs.normalize_layout(header["meta"]["expect"])}
        rogue.send(rogue.result(header, zero, meta={"samples": 10, "learn_s": 0.01, "metrics": {},
                                                    "version": header["meta"]["version"] - 1}))
        _until(lambda: len(_rows(coord, "agent = 'rogue'")) > len(claims), 30, coord.next_version, "that row")
        n_rows = len(claims) + 1
        # the right version, an outsized update: the update guard's norm bound applies as in rounds
        used += 1
        _until(lambda: len(rogue.tasks) > used, 30, coord.next_version, "one more task")
        header, _ = rogue.tasks[used]
        huge = {name: np.full(shape, 50.0, np.float32) for name, shape in codecs.normalize_layout(header["meta"]["expect"])}
        rogue.send(rogue.result(header, huge, meta={"samples": 10, "learn_s": 0.01, "metrics": {},
                                                    "version": header["meta"]["version"]}))
        _until(lambda: len(_rows(coord, "agent = 'rogue'")) > n_rows, 30, coord.next_version, "the last row")
    finally:
        rogue.link.stop()
        fleet.close()
    statuses = [r["status"] for r in _rows(coord, "agent = 'rogue'")]
    assert statuses == ["rejected:future_version", "rejected:schema", "rejected:schema", "rejected:schema",
                        "rejected:schema", "rejected:wrong_version", "rejected:norm_bound"]
    lines = [r.getMessage() for r in caplog.records if "refused a result from rogue" in r.getMessage()]
    assert len(lines) == 6 and all("\n" not in line for line in lines)
    assert "version" in lines[1] and "2147483647" in lines[2]
    assert not _rows(coord, "agent = 'rogue' AND status = 'ok'")  # nothing of the rogue went into a version


# ---------------------------------------------------------------- store-and-forward
class GatedAgent(Agent):
    """An agent whose learner waits for `gate` (so the test can cut its connection mid-task)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.gate = threading.Event()
        self.learning = threading.Event()
        self.task_round: int | None = None

    def _learn(self, task):
        self.task_round = task.round
        self.learning.set()
        self.gate.wait(60)
        return super()._learn(task)

    def replace_link(self) -> None:
        """A new connection (the old one's queue is gone), like a board back on the network."""
        old = self.link
        c = self.cfg
        self.link = MqttLink(str(old.url), client_id=f"fedfleet-{c.fleet}-{c.agent_id}", on_message=self._on_message,
                             subscriptions=list(old._subscriptions), clean_session=False, will=self._will,
                             on_connect=self._announce)
        self.link.start()


def _gated_fleet(url: str, run_dir: Path, state_dir: Path | None = None):
    fleet = start_fleet(url, run_dir, agents=2, start_agents=False, aggregation=dict(ASYNC))
    from fedfleet.coordinator.job.run import shards

    local, _ = shards(fleet.cfg)
    gated = GatedAgent(AgentConfig(url, fleet.cfg.fleet, "agent-00", protocol.derive_key(SECRET, "agent-00"),
                                   coordinator_key=COORDINATOR_KEY, state_dir=str(state_dir) if state_dir else None),
                       local[0])
    other = Agent(AgentConfig(url, fleet.cfg.fleet, "agent-01", protocol.derive_key(SECRET, "agent-01"),
                              coordinator_key=COORDINATOR_KEY), local[1])
    gated.start()
    other.start()
    fleet.agents.update({"agent-00": gated, "agent-01": other})
    fleet.coord.wait_for_agents(2, 30)
    fleet.coord.begin()
    _until(gated.learning.is_set, 30, fleet.coord.next_version, "the gated agent's task")
    return fleet, gated


def _delivered(fleet, agent: str, task: int) -> list[dict]:
    return _rows(fleet.coord, "agent = ? AND status = 'ok' AND detail = ?", (agent, f"task {task}"))


def test_a_result_finished_while_disconnected_is_delivered_after_reconnecting(broker, tmp_path):
    fleet, gated = _gated_fleet(broker.url, tmp_path)
    try:
        task = gated.task_round
        gated.link.stop(graceful=False)  # the board drops off the network mid-task
        gated.gate.set()
        _until(lambda: gated.rounds_done == 1, 30, what="the upload onto the lost connection")
        assert len(gated.outbox) == 1
        for _ in range(2):
            fleet.coord.next_version()
        assert not _delivered(fleet, "agent-00", task)  # it went nowhere
        gated.replace_link()
        _until(lambda: _delivered(fleet, "agent-00", task), 30, fleet.coord.next_version, "the forwarded result")
    finally:
        fleet.close()
    (row,) = _delivered(fleet, "agent-00", task)
    assert row["version"] == 0 and row["staleness"] >= 2  # taken within the staleness limit, weighted down


def test_a_result_survives_a_broker_restart_mid_task(tmp_path):
    broker = MosquittoBroker()
    port = broker.port
    fleet, gated = _gated_fleet(broker.url, tmp_path)
    try:
        task = gated.task_round
        broker.stop()
        gated.gate.set()  # it finishes while the broker is down
        _until(lambda: gated.rounds_done == 1, 30, what="the upload while the broker is down")
        broker = MosquittoBroker(port)  # same address, empty state
        _until(lambda: gated.link.connected.is_set() and fleet.coord.link.connected.is_set(), 30,
               what="both reconnected")
        fleet.coord.wait_for_agents(2, 30)

        def paced() -> None:  # the agent resends `Agent.RESEND_AFTER_S` after reconnecting (paho's own resend can
            time.sleep(0.1)  # beat the coordinator's subscription to the new broker); unpaced, the other agent
            fleet.coord.next_version()  # makes versions faster than max_staleness allows in that time

        _until(lambda: _delivered(fleet, "agent-00", task), 40, paced, "the result")
    finally:
        fleet.close()
        broker.stop()
    assert len(_delivered(fleet, "agent-00", task)) == 1  # paho's resend and the outbox's: booked once


def test_a_result_survives_an_agent_restart(broker, tmp_path):
    state = tmp_path / "state"
    fleet, gated = _gated_fleet(broker.url, tmp_path / "run", state_dir=state)
    try:
        task = gated.task_round
        gated.link.stop(graceful=False)
        gated.gate.set()
        _until(lambda: gated.rounds_done == 1, 30, what="the upload onto the lost connection")
        gated.stop(graceful=False)  # the agent process dies with its result unsent
        assert Outbox(state).keys() == [(fleet.coord.cfg.run, task, 0)]  # kept on disk
        fleet.coord.next_version()
        assert not _delivered(fleet, "agent-00", task)
        from fedfleet.coordinator.job.run import shards

        again = Agent(AgentConfig(broker.url, fleet.cfg.fleet, "agent-00", protocol.derive_key(SECRET, "agent-00"),
                                  coordinator_key=COORDINATOR_KEY, state_dir=str(state)), shards(fleet.cfg)[0][0])
        again.start()
        fleet.agents["agent-00"] = again
        _until(lambda: _delivered(fleet, "agent-00", task), 30, fleet.coord.next_version, "the kept result")
        _until(lambda: len(again.outbox) == 0 or again.outbox.keys()[0][1] > task, 30, fleet.coord.next_version,
               "the outbox to settle on a later task")
    finally:
        fleet.close()
    assert len(_delivered(fleet, "agent-00", task)) == 1


def test_synchronous_rounds_book_a_forwarded_result_late(broker, tmp_path):
    fleet = start_fleet(broker.url, tmp_path, agents=2, start_agents=False, deadline_s=3.0)
    from fedfleet.coordinator.job.run import shards

    local, _ = shards(fleet.cfg)
    gated = GatedAgent(AgentConfig(broker.url, fleet.cfg.fleet, "agent-00", protocol.derive_key(SECRET, "agent-00"),
                                   coordinator_key=COORDINATOR_KEY), local[0])
    other = Agent(AgentConfig(broker.url, fleet.cfg.fleet, "agent-01", protocol.derive_key(SECRET, "agent-01"),
                              coordinator_key=COORDINATOR_KEY), local[1])
    for a in (gated, other):
        a.start()
    fleet.agents.update({"agent-00": gated, "agent-01": other})
    try:
        fleet.coord.wait_for_agents(2, 30)
        done = threading.Thread(target=fleet.coord.run_round, args=(1,))
        done.start()
        _until(gated.learning.is_set, 30, what="the gated agent's task")
        gated.link.stop(graceful=False)
        gated.gate.set()
        _until(lambda: gated.rounds_done == 1, 30, what="the upload onto the lost connection")
        done.join(30)
        (late,) = _rows(fleet.coord, "round = 1 AND agent = 'agent-00'")
        assert late["status"] == "late" and late["bytes_up"] == 0
        gated.replace_link()
        fleet.coord.wait_for_agents(2, 30)
        fleet.coord.run_round(2)  # the forwarded round-1 result arrives meanwhile
    finally:
        fleet.close()
    assert gated.outbox.resent >= 1
    rows = _rows(fleet.coord, "round = 1 AND agent = 'agent-00'")
    assert [r["status"] for r in rows] == ["late"]  # it arrived after its round closed: its work is not used
    assert not _rows(fleet.coord, "agent = 'agent-00' AND status LIKE 'rejected:%'")
    assert [r["status"] for r in _rows(fleet.coord, "round = 2")] == ["ok", "ok"]
    # its bytes reached the coordinator: two results' worth on agent-00's rows, as agent-01's (its first upload went
    # out on the dead connection; without the outbox only its round-2 result would have arrived)
    up = {a: sum(r["bytes_up"] for r in _rows(fleet.coord, "agent = ?", (a,))) for a in ("agent-00", "agent-01")}
    assert up["agent-00"] > 0.8 * up["agent-01"]


# ---------------------------------------------------------------- resume
def test_resume_in_async_mode_restores_versions_tasks_and_buffer(broker, tmp_path):
    agg = {**ASYNC, "concurrency": 3, "buffer": 3}
    fleet = start_fleet(broker.url, tmp_path, agents=3, aggregation=agg, deadline_s=4.0)
    try:
        fleet.coord.wait_for_agents(3, 30)
        fleet.coord.run(2)  # versions 1 and 2 (and the last results, booked as past the end)
        coord = fleet.coord
        coord.ended = False
        coord.fill()
        _until(lambda: len(coord.buffer) >= 1, 30, lambda: coord.offer(coord.inbox.get(timeout=1.0)),
               "a buffered result")
        buffered = [(h.result.agent, h.task) for h in coord.buffer]
        next_task = coord.next_task
    finally:
        fleet.close()  # the coordinator stops with results in its buffer
    cfg = fleet.cfg
    from fedfleet.coordinator.job.assemble import build_run
    from tests.support.fleet import SIGNING_KEY

    run = build_run(cfg, broker_url=broker.url, secret=SECRET, signing_key=SIGNING_KEY, run_dir=tmp_path,
                    roster=["agent-00", "agent-01", "agent-02"], resume=True)
    coord = run.coordinator
    assert coord.version == 2 and coord.first_round == 3 and coord.next_task == next_task
    assert [(h.result.agent, h.task) for h in coord.buffer] == buffered
    coord.start()
    local = run.shards()
    agents = [Agent(AgentConfig(broker.url, cfg.fleet, a, protocol.derive_key(SECRET, a),
                                coordinator_key=COORDINATOR_KEY), local[i]) for i, a in enumerate(run.roster)]
    try:
        for a in agents:
            a.start()
        coord.wait_for_agents(3, 30)
        summaries = coord.run(3)
    finally:
        for a in agents:
            a.stop()
        coord.stop()
    assert [s.round for s in summaries] == [3]
    ok3 = [(r["agent"], int(r["detail"].split()[1])) for r in _rows(coord, "round = 3 AND status = 'ok'")]
    assert set(buffered) <= set(ok3)  # the buffered results went into version 3 after the restart
    assert all(n >= next_task for a, n in ok3 if (a, n) not in buffered)
