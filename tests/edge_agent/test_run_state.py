"""Run-scoped agent state: a second run on the same agents starts clean (FedZip error feedback, MoNNA
momentum), and a re-dispatched round of the same run starts from the state before its first attempt."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedfleet.coordinator.engine.rounds import Coordinator
from fedfleet.coordinator.job.run import engine_config, shards
from fedfleet.coordinator.strategies import create as create_strategy
from fedfleet.coordinator.strategies import method_config
from fedfleet.edge_agent.run_state import RunState
from tests.support.fleet import SECRET, SIGNING_KEY, package, start_fleet


def test_run_state_resets_on_a_new_run_and_rolls_back_a_rerun():
    s = RunState()
    assert not s.begin("r1", 1, 0)
    s.feedback["fedavg"] = {"w": np.ones(3)}
    s.learner("monna", lambda name: {"momentum": 1.0})["momentum"] = 2.0
    assert not s.begin("r1", 2, 0)  # the next round keeps the run's state
    assert s.learners["monna"]["momentum"] == 2.0
    s.learners["monna"]["momentum"] = 3.0
    s.feedback["fedavg"]["w"] += 1
    assert s.begin("r1", 2, 0)  # round 2 dispatched again (resumed coordinator): state from before round 2
    assert s.learners["monna"]["momentum"] == 2.0 and np.array_equal(s.feedback["fedavg"]["w"], np.ones(3))
    assert not s.begin("r2", 1, 0)  # a new run: nothing carried over
    assert s.learners == {} and s.feedback == {}


def _second_run(fleet, run_dir, run: str, rounds: int) -> list:
    cfg = fleet.cfg
    blob, cmodel = package(cfg)
    _, test = shards(cfg)
    strategy = create_strategy(cfg.method, cmodel.initial_state(), **method_config(cfg))
    ecfg = engine_config(cfg, run)
    ecfg.grace_s = 0.0
    coord = Coordinator(broker_url=fleet.coord.link.url.__str__(), secret=SECRET, roster=list(fleet.agents),
                        strategy=strategy, package=blob, evaluate=lambda ctx, s: cmodel.evaluate(s, test.x, test.y),
                        run_dir=run_dir, config=ecfg, signing_key=SIGNING_KEY)
    coord.start()
    try:
        coord.wait_for_agents(len(fleet.agents), 30)
        return coord.run(rounds), strategy
    finally:
        coord.stop()


@pytest.mark.parametrize(("method", "carried"), [("fedavg", "FedZip error feedback"), ("monna", "momentum")])
def test_second_run_on_the_same_agents_starts_clean(mosquitto, tmp_path, method, carried):
    """Same job, same seed, same agents, two runs one after the other: the second reproduces the first
    exactly. State carried over from the first run (the residual FedZip did not send, MoNNA's momentum)
    would change the second run's uploads."""
    fleet = start_fleet(mosquitto.url, tmp_path / "a", method=method, rounds=2)
    try:
        fleet.coord.wait_for_agents(3, 30)
        first = fleet.coord.run(2)
        first_state = {k: v.clone() for k, v in fleet.coord.strategy.global_state().items()}
        assert all(a.state.run == "test-run" and a.state.learners for a in fleet.agents.values())
        second, strategy = _second_run(fleet, tmp_path / "b", "test-run-2", 2)
        assert all(a.state.run == "test-run-2" for a in fleet.agents.values())
    finally:
        fleet.close()
    assert [s.ok for s in first] == [s.ok for s in second] == [3, 3]
    assert [s.accuracy for s in second] == [s.accuracy for s in first], f"{carried} leaked into the second run"
    for name, tensor in strategy.global_state().items():
        assert torch.equal(tensor, first_state[name]), f"{name}: {carried} leaked into the second run"
