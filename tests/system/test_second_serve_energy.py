"""A second job against agents that stayed up books no idle from before its first task (issue 22): the time
between two jobs is never booked into a round."""

from __future__ import annotations

import time

from fedfleet.coordinator.job.assemble import build_run
from fedfleet.coordinator.job.config import JobConfig
from fedfleet.edge_agent.agent import Agent, AgentConfig
from fedfleet.edge_agent.meters import open_meter
from fedfleet.edge_agent.profiles import load_profile
from fedfleet.edge_agent.wire import protocol
from tests.support.fleet import COORDINATOR_KEY, SECRET, SIGNING_KEY

GAP_S = 3.0


def _job(url, cfg, run_dir, run_id):
    run = build_run(cfg, broker_url=url, secret=SECRET, signing_key=SIGNING_KEY, run_dir=run_dir, run_id=run_id)
    run.coordinator.start()
    run.coordinator.wait_for_agents(cfg.agents, timeout_s=30)
    run.coordinator.run(cfg.rounds)
    run.coordinator.settle()
    rows = run.coordinator.ledger.query(
        "SELECT agent, energy_compute_j, energy_radio_j, energy_idle_j FROM agent_rounds WHERE round = 1 AND status = 'ok'")
    run.coordinator.stop()
    return run, rows


def test_second_job_books_no_idle_from_between_the_jobs(mosquitto, tmp_path):
    cfg = JobConfig(agents=2, rounds=1, alpha=0.0, deadline_s=20.0, fleet="gap", grace_s=0.0)
    profile = load_profile("rpi4b")
    run1 = build_run(cfg, broker_url=mosquitto.url, secret=SECRET, signing_key=SIGNING_KEY, run_dir=tmp_path / "a",
                     run_id="job-1")
    local = run1.shards()
    agents = [Agent(AgentConfig(mosquitto.url, cfg.fleet, a, protocol.derive_key(SECRET, a), profile="rpi4b",
                                coordinator_key=COORDINATOR_KEY), local[i], meter=open_meter("model", profile))
              for i, a in enumerate(run1.roster)]
    try:
        for a in agents:
            a.start()
        time.sleep(GAP_S)  # agents up before the first job: not booked either
        run1.coordinator.start()
        run1.coordinator.wait_for_agents(cfg.agents, timeout_s=30)
        t0 = time.monotonic()
        run1.coordinator.run(1)
        run1.coordinator.settle()
        span1 = time.monotonic() - t0
        rows1 = run1.coordinator.ledger.query("SELECT energy_idle_j FROM agent_rounds WHERE status = 'ok'")
        run1.coordinator.stop()
        time.sleep(GAP_S)  # between the jobs, the agents stay up
        t0 = time.monotonic()
        _, rows2 = _job(mosquitto.url, cfg, tmp_path / "b", "job-2")
        span2 = time.monotonic() - t0
    finally:
        for a in agents:
            a.stop()
    assert len(rows1) == 2 and len(rows2) == 2
    for idle in [r["energy_idle_j"] for r in rows1] + [r["energy_idle_j"] for r in rows2]:
        assert idle is not None
        # at most the job's own span at idle power; the gap before it (GAP_S at 2.7 W = 8.1 J) is not in it
        assert idle < profile.idle_w * max(span1, span2), idle
    assert all(r["energy_idle_j"] < profile.idle_w * GAP_S for r in rows2)
    assert all(r["energy_compute_j"] > 0 for r in rows2)
