"""The round engine over the in-process broker: a FedAvg run through the same phases and validation as MQTT,
with ledger bytes by the MQTT formula; `start_broker("memory")`; the bench runner numbers rounds from 1."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from fedfleet.coordinator.broker import start_broker
from fedfleet.coordinator.records.ledger import Ledger
from fedfleet.coordinator.strategies import create as create_strategy
from fedfleet.edge_agent.errors import ConfigError
from fedfleet.edge_agent.learners import LocalData
from fedfleet.edge_agent.nn import mlp
from fedfleet.edge_agent.wire import protocol
from fedfleet.edge_agent.wire.memory import MemoryLink
from fedfleet.tools.bench.runner import run_strategy
from tests.support.fleet import start_fleet


def rows(run_dir) -> list[dict]:
    ledger = Ledger(run_dir / "ledger.sqlite")
    try:
        return [dict(r) for r in ledger.query("SELECT * FROM agent_rounds ORDER BY id")]
    finally:
        ledger.close()


def fedavg_run(url: str, run_dir, fleet: str) -> tuple[list, dict]:
    f = start_fleet(url, run_dir, rounds=4, uplink={"name": "none"}, fleet=fleet)
    try:
        f.coord.wait_for_agents(3, 30)
        summaries = f.coord.run(4)
        agent_up = {a: ag.link.bytes_by_topic[protocol.agent_topic(f.cfg.fleet, a, "result")]
                    for a, ag in f.agents.items()}
    finally:
        f.close()
    return summaries, agent_up


def test_fedavg_over_memory_learns_and_books_mqtt_formula_bytes(tmp_path) -> None:
    with start_broker("memory") as b:
        assert b.kind == "memory" and b.url.startswith("memory://")
        summaries, agent_up = fedavg_run(b.url, tmp_path, "mem")
    assert [s.round for s in summaries] == [1, 2, 3, 4]
    assert summaries[-1].accuracy > 0.8, [s.accuracy for s in summaries]
    ok = [r for r in rows(tmp_path) if r["status"] == "ok"]
    assert len(ok) == 12 and {r["round"] for r in ok} == {1, 2, 3, 4}
    # every result byte the agents sent (by the MQTT formula) is booked on their rows, and nothing else
    for agent, sent in agent_up.items():
        assert sum(r["bytes_up"] for r in ok if r["agent"] == agent) == sent > 2410 * 4
    assert sum(s.bytes_up for s in summaries) == sum(agent_up.values())


def test_memory_and_mosquitto_runs_book_the_same_rows(mosquitto, tmp_path) -> None:
    """The same job over both transports: the same rows, and bytes within the few bytes a header's
    timestamps may differ by (JSON floats of varying length)."""
    with start_broker("memory") as b:
        mem, _ = fedavg_run(b.url, tmp_path / "mem", "same")
    mqtt, _ = fedavg_run(mosquitto.url, tmp_path / "mqtt", "same")
    a, m = rows(tmp_path / "mem"), rows(tmp_path / "mqtt")
    key = lambda r: (r["round"], r["phase"], r["agent"], r["status"], r["samples"])  # noqa: E731
    assert sorted(map(key, a)) == sorted(map(key, m))
    for ra, rm in zip(sorted(a, key=key), sorted(m, key=key), strict=True):
        for col in ("bytes_up", "bytes_down"):
            assert abs(ra[col] - rm[col]) <= 16, (col, ra, rm)
    assert [round(s.accuracy, 4) for s in mem] == [round(s.accuracy, 4) for s in mqtt]


def _shards(n: int) -> dict[str, LocalData]:
    rng = np.random.default_rng(0)
    w = rng.normal(size=(6, 3))
    out = {}
    for i in range(n):
        x = rng.random((30, 6), dtype=np.float32)
        out[f"agent-{i:02d}"] = LocalData(x, (x @ w).argmax(1).astype(np.int64))
    return out


def test_run_strategy_numbers_rounds_from_one_and_refuses_bad_input() -> None:
    state = {k: torch.from_numpy(v) for k, v in mlp.init([6, 3], 0).items()}
    s = create_strategy("robust_fedavg", state, aggregator="mean", lr=0.2, batch=30, local_steps=1)
    seen: list[int] = []
    out = run_strategy(s, _shards(3), 2, on_round=lambda r, strategy: seen.append(r))
    assert seen == [1, 2] == [x.round for x in out]
    assert all(x.ok == 3 and x.rejected == 0 and x.bytes_up > 0 for x in out)
    with pytest.raises(ConfigError, match="at least one agent"):
        run_strategy(s, {}, 1)
    odd = _shards(2)
    odd["agent-01"] = LocalData(odd["agent-01"].x[:, :5], odd["agent-01"].y)  # 5 features: the package has 6
    t0 = time.monotonic()
    with pytest.raises(TimeoutError, match=r"cannot use the package: \{'agent-01': 'model_error: model input shape"):
        run_strategy(s, odd, 1)
    assert time.monotonic() - t0 < 30  # said at once, not after the 120 s wait


def test_demo_agents_get_a_memory_link(tmp_path) -> None:
    with start_broker("memory") as b:
        f = start_fleet(b.url, tmp_path, rounds=1)
        try:
            assert all(isinstance(a.link, MemoryLink) for a in f.agents.values())
            assert isinstance(f.coord.link, MemoryLink)
        finally:
            f.close()
