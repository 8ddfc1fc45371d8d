"""Helpers to run a coordinator and agents against a broker inside a test."""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fedfleet.coordinator.engine.rounds import Coordinator, RoundSummary
from fedfleet.coordinator.job.config import JobConfig
from fedfleet.coordinator.job.run import agent_ids, build, engine_config, shards
from fedfleet.coordinator.strategies import create as create_strategy
from fedfleet.coordinator.strategies import method_config
from fedfleet.edge_agent.agent import Agent, AgentConfig
from fedfleet.edge_agent.wire import codecs, protocol, signing
from fedfleet.edge_agent.wire.mqtt import MqttLink

SECRET = b"fedfleet-test-secret-0123456789ab"
SIGNING_KEY = bytes(range(100, 132))  # the coordinator's Ed25519 seed in tests
COORDINATOR_KEY = signing.public_key(SIGNING_KEY)
_PACKAGES: dict[str, tuple[bytes, Any]] = {}


def package(cfg: JobConfig) -> tuple[bytes, Any]:
    """Build each model package once per test session."""
    if cfg.mode not in _PACKAGES:
        _PACKAGES[cfg.mode] = build(cfg)
    return _PACKAGES[cfg.mode]


@dataclass
class Fleet:
    coord: Coordinator
    agents: dict[str, Agent]
    cfg: JobConfig
    summaries: list[RoundSummary] = field(default_factory=list)
    thread: threading.Thread | None = None
    error: BaseException | None = None

    def run_async(self, rounds: int) -> None:
        def go() -> None:
            try:
                self.summaries.extend(self.coord.run(rounds))
            except BaseException as exc:  # noqa: BLE001 - reported by join()
                self.error = exc

        self.thread = threading.Thread(target=go, daemon=True)
        self.thread.start()

    def join(self, timeout: float = 120) -> list[RoundSummary]:
        assert self.thread is not None
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "rounds did not finish in time"
        if self.error:
            raise self.error
        return self.summaries

    def close(self) -> None:
        for a in self.agents.values():
            a.stop()
        self.coord.stop()


def start_fleet(broker_url: str, run_dir: Path, *, roster_extra: tuple[str, ...] = (), start_agents: bool = True,
                **overrides: Any) -> Fleet:
    cfg = JobConfig(mode="full", agents=3, rounds=3, alpha=0.0, deadline_s=20.0, fleet=f"t{abs(hash(run_dir)) % 10**8}")
    for k, v in overrides.items():
        setattr(cfg, k, v)
    blob, cmodel = package(cfg)
    local, test = shards(cfg)
    ids = agent_ids(cfg)
    strategy = create_strategy(cfg.method, cmodel.initial_state(), **method_config(cfg))
    ecfg = engine_config(cfg, "test-run")
    ecfg.grace_s = overrides.get("grace_s", 0.0)
    coord = Coordinator(broker_url=broker_url, secret=SECRET, roster=ids + list(roster_extra), strategy=strategy,
                        package=blob, evaluate=lambda ctx, s: cmodel.evaluate(s, test.x, test.y), run_dir=run_dir,
                        config=ecfg, signing_key=SIGNING_KEY)
    coord.start()
    agents = {}
    if start_agents:
        for i, agent_id in enumerate(ids):
            a = Agent(AgentConfig(broker_url, cfg.fleet, agent_id, protocol.derive_key(SECRET, agent_id),
                                  coordinator_key=COORDINATOR_KEY), local[i])
            a.start()
            agents[agent_id] = a
    return Fleet(coord, agents, cfg)


class Rogue:
    """A raw MQTT client on the roster that answers its task with hostile messages."""

    def __init__(self, url: str, fleet_name: str, agent: str, digest: str):
        self.fleet, self.agent = fleet_name, agent
        self.key = protocol.derive_key(SECRET, agent)
        self.tasks: list[tuple[dict, bytes]] = []
        self.link = MqttLink(url, client_id=f"rogue-{agent}", on_message=self._on, clean_session=True,
                             subscriptions=[protocol.agent_topic(fleet_name, agent, "task")])
        self.link.start()
        self.seq = 0
        self.link.publish(protocol.agent_topic(fleet_name, agent, "status"),
                          self.status({"state": "online", "model": digest}), retain=True)

    def status(self, body: dict) -> bytes:
        self.seq += 1
        return protocol.seal({"kind": "status", "agent": self.agent, "seq": [1, self.seq]}, json.dumps(body).encode(),
                             self.key)

    def _on(self, topic: str, payload: bytes) -> None:
        self.tasks.append(protocol.open_signed(payload, COORDINATOR_KEY))

    def result(self, task: dict, tensors: dict, *, key: bytes | None = None, agent: str | None = None,
               **header_changes) -> list[bytes]:
        meta = task["meta"]
        expect = codecs.normalize_layout(meta["expect"])
        layout = [(n, tuple(np.shape(tensors[n]))) for n, _ in expect]
        header = {"kind": "result", "fleet": self.fleet, "agent": agent or self.agent, "run": task["run"],
                  "round": task["round"], "phase": task["phase"], "method": task["method"],
                  "codec": meta["uplink"], "layout": [[n, list(s)] for n, s in layout],
                  "meta": {"samples": 10, "learn_s": 0.01, "metrics": {}}}
        header.update(header_changes)
        return protocol.split(header, codecs.encode(tensors, layout, meta["uplink"]), key or self.key)

    def send(self, msgs: list[bytes], agent: str | None = None) -> None:
        for m in msgs:
            self.link.publish(protocol.agent_topic(self.fleet, agent or self.agent, "result"), m)
