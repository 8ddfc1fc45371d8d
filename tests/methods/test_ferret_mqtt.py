"""Ferret over a real Mosquitto: agents that join late or sit out rounds end with the coordinator's weights
bit for bit, hostile (index, gamma) uploads are refused with their reason while the round goes on, and the
demo learns on the embedded broker."""

from __future__ import annotations

import time

import numpy as np
import torch

from fedfleet.coordinator.job.config import JobConfig
from fedfleet.coordinator.job.run import run_demo, shards
from fedfleet.coordinator.records.ledger import Ledger
from fedfleet.edge_agent import random_bases
from fedfleet.edge_agent.agent import Agent, AgentConfig
from fedfleet.edge_agent.wire import protocol
from tests.support.fleet import COORDINATOR_KEY, SECRET, Rogue, start_fleet

FERRET = {"k": 48, "local_steps": 5}


def _rows(fleet) -> list[tuple[str, str]]:
    ledger = Ledger(fleet.coord.run_dir / "ledger.sqlite")
    try:
        return [(r["agent"], r["status"]) for r in ledger.query("SELECT * FROM agent_rounds ORDER BY id")]
    finally:
        ledger.close()


def _replica(agent: Agent) -> tuple[int, dict[str, np.ndarray]]:
    return agent.state.learners["ferret"].replicas["test-run"]


def test_late_and_absent_agents_catch_up_to_the_coordinators_weights(mosquitto, tmp_path):
    fleet = start_fleet(mosquitto.url, tmp_path, roster_extra=("late-full", "late-hist"), method="ferret",
                        method_config=dict(FERRET), deadline_s=20.0)
    coord, strategy = fleet.coord, fleet.coord.strategy
    local, _ = shards(fleet.cfg)
    try:
        coord.wait_for_agents(3, 30)
        chosen: dict[int, list[str]] = {}
        coord.select = lambda: chosen[coord.round]  # type: ignore[method-assign]
        for r in (1, 2, 3):
            chosen[r] = ["agent-00", "agent-01"] if r == 2 else ["agent-00", "agent-01", "agent-02"]
            assert coord.run_round(r).ok == len(chosen[r])
        late = {}
        for name, i in (("late-hist", 0), ("late-full", 1)):
            late[name] = Agent(AgentConfig(mosquitto.url, fleet.cfg.fleet, name, protocol.derive_key(SECRET, name), coordinator_key=COORDINATOR_KEY),
                               local[i])
            late[name].start()
            fleet.agents[name] = late[name]
        coord.wait_for_agents(5, 30)
        strategy.catch_up = "auto"
        chosen[4] = ["agent-00", "agent-02", "late-hist"]
        assert coord.run_round(4).ok == 3
        strategy.catch_up = "full"  # force the other path for the second late joiner
        chosen[5] = ["agent-00", "agent-02", "late-full", "agent-01"]
        assert coord.run_round(5).ok == 4
        strategy.catch_up = "auto"
        chosen[6] = ["agent-00", "agent-01", "late-hist", "late-full"]
        assert coord.run_round(6).ok == 4
    finally:
        fleet.close()
    log = {(r, a): (kind, n) for r, a, kind, n in strategy.sync_log}
    assert log[(3, "agent-02")] == ("history", 2)  # sat out round 2: coefficients of rounds 1 and 2
    assert log[(4, "late-hist")] == ("history", 3)  # joined at round 4: package + rounds 1-3
    assert log[(5, "late-full")][0] == "full"
    assert log[(6, "late-hist")] == ("history", 2)  # sat out round 5: rounds 4 and 5
    assert log[(6, "late-full")] == ("history", 1)
    checkpoint = torch.load(coord.run_dir / "checkpoints" / "round-0005.pt", weights_only=False)["state"]
    for name in ("late-hist", "late-full", "agent-00", "agent-01"):
        held_round, held = _replica(late.get(name) or fleet.agents[name])
        assert held_round == 5, name
        for tensor, value in checkpoint.items():  # bit for bit
            assert np.array_equal(held[tensor], value.numpy()), (name, tensor)
    # the downlink of a history sync is L x K floats per missed round, far below the dense model
    status = _rows(fleet)
    assert status.count(("late-hist", "ok")) == 2 and ("late-full", "ok") in status


class _Rogue(Rogue):
    """A roster member on a raw MQTT client that answers its Ferret task with crafted (index, gamma) pairs."""

    def send(self, task: dict, blocks: list[tuple[list[int], list[float]]]) -> None:  # type: ignore[override]
        payload = b"".join(np.uint16(len(i)).tobytes() + np.array(i, "<u2").tobytes() + np.array(v, "<f4").tobytes()
                           for i, v in blocks)
        header = {"kind": "result", "fleet": self.fleet, "agent": self.agent, "run": task["run"],
                  "round": task["round"], "phase": task["phase"], "method": task["method"],
                  "codec": task["meta"]["uplink"], "layout": task["meta"]["expect"],
                  "meta": {"samples": 10, "learn_s": 0.01, "metrics": {}}}
        for m in protocol.split(header, payload, self.key):
            self.link.publish(protocol.agent_topic(self.fleet, self.agent, "result"), m)


def test_hostile_pair_uploads_are_refused_and_the_round_goes_on(mosquitto, tmp_path):
    fleet = start_fleet(mosquitto.url, tmp_path, roster_extra=("rogue", "silent"), method="ferret",
                        method_config=dict(FERRET), deadline_s=5.0, quorum=0.5)
    rogue = _Rogue(mosquitto.url, fleet.cfg.fleet, "rogue", fleet.coord.package_digest)
    silent = Rogue(mosquitto.url, fleet.cfg.fleet, "silent", fleet.coord.package_digest)  # keeps the phase open
    try:
        fleet.coord.wait_for_agents(5, 30)
        fleet.run_async(1)
        deadline = time.time() + 15
        while not rogue.tasks and time.time() < deadline:
            time.sleep(0.02)
        assert rogue.tasks, "the rogue got no task"
        task, _ = rogue.tasks[0]
        k = FERRET["k"]
        empty = ([], [])
        rogue.send(task, [([1, k], [0.5, 0.5]), empty, empty, empty])  # index out of range
        rogue.send(task, [([4, 4], [0.5, 0.5]), empty, empty, empty])  # duplicate index
        rogue.send(task, [(list(range(k)) + [0], [0.1] * (k + 1)), empty, empty, empty])  # more pairs than K
        rogue.send(task, [([2], [float("nan")]), empty, empty, empty])  # non-finite gamma
        rogue.send(task, [([2], [0.01]), empty, empty, empty])  # a valid one, after all that
        summaries = fleet.join(90)
    finally:
        rogue.link.stop()
        silent.link.stop()
        fleet.close()
    status = _rows(fleet)
    for reason in ("index_range", "duplicate_index", "too_many_pairs", "nonfinite"):
        assert ("rogue", f"rejected:{reason}") in status, (reason, status)
    assert ("rogue", "ok") in status
    assert summaries[0].ok == 4 and summaries[0].rejected == 4 and np.isfinite(summaries[0].accuracy)


def test_ferret_demo_learns_on_the_embedded_broker(tmp_path):
    result = run_demo(JobConfig(method="ferret", rounds=6, agents=4), run_dir=tmp_path, quiet=True)
    accs = [s.accuracy for s in result.summaries]
    assert [s.ok for s in result.summaries] == [4] * 6 and result.broker == "embedded"
    assert accs[-1] > accs[0] + 0.2 and accs[-1] > 0.6, accs
    # uploads are (index, gamma) pairs: a few hundred bytes per agent and round, not the head's floats
    head_floats = sum(b.size for b in result_blocks(tmp_path))
    assert result.bytes_up < 6 * 4 * head_floats * 4 / 5, (result.bytes_up, head_floats)


def result_blocks(run_dir) -> list[random_bases.Block]:
    state = torch.load(run_dir / "checkpoints" / "latest.pt", weights_only=False)["state"]
    return random_bases.split_blocks([(n, tuple(v.shape)) for n, v in state.items()])
