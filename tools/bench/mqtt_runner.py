"""Run any strategy with its learners over a real MQTT broker: the benchmarks' `runner` for MQTT.

`mqtt_runner(strategy, agents, rounds, *, model=None, on_round=None)` has the signature of
`fedfleet.tools.bench.inprocess_runner.inprocess_runner`, but every task and result crosses a broker as signed envelopes between
the round engine (`fedfleet.coordinator.engine.rounds.Coordinator`) and real `fedfleet.edge_agent.agent.Agent` clients, one MQTT
connection each. Rounds are numbered from 0, as in the in-process runner.
"""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Callable
from typing import Any

from fedfleet.coordinator.engine.rounds import Coordinator, EngineConfig
from fedfleet.coordinator.strategies import Strategy
from fedfleet.edge_agent.learners import LocalData
from fedfleet.edge_agent.wire import protocol, signing

_PACKAGES: dict[int, bytes] = {}


def _package(input_dim: int) -> bytes:
    """A full-mode package (no backbone: the learners see raw pixels)."""
    from fedfleet.models.package import build_package

    if input_dim not in _PACKAGES:
        _PACKAGES[input_dim] = build_package("full", dataset="digits" if input_dim == 64 else "mnist")
    return _PACKAGES[input_dim]


def make_mqtt_runner(broker: str = "mosquitto", *, deadline_s: float = 20.0) -> Callable[..., None]:
    def runner(strategy: Strategy, agents: dict[str, LocalData], rounds: int, *, model: Any = None,
               on_round: Callable[[int, Strategy], None] | None = None) -> None:
        mqtt_runner(strategy, agents, rounds, model=model, on_round=on_round, broker=broker, deadline_s=deadline_s)

    return runner


def mqtt_runner(strategy: Strategy, agents: dict[str, LocalData], rounds: int, *, model: Any = None,
                on_round: Callable[[int, Strategy], None] | None = None, broker: str = "mosquitto",
                deadline_s: float = 20.0) -> None:
    from fedfleet.coordinator.broker import start_broker
    from fedfleet.edge_agent.agent import Agent, AgentConfig

    del model  # the agents load the model package from the broker, as devices do
    secret = os.urandom(32)
    seed = signing.new_signing_seed()
    input_dim = int(next(iter(agents.values())).x.shape[1])
    fleet = f"bench{os.getpid()}-{os.urandom(3).hex()}"  # unique per run: no session of an earlier run can meet it
    with start_broker(broker) as b, tempfile.TemporaryDirectory() as tmp:
        coord = Coordinator(
            broker_url=b.url, secret=secret, roster=list(agents), strategy=strategy, package=_package(input_dim),
            evaluate=lambda ctx, state: (math.nan, math.nan), run_dir=tmp,
            config=EngineConfig(fleet=fleet, run="bench", deadline_s=deadline_s, quorum=1.0, grace_s=0.0),
            signing_key=seed,
        )
        clients: list[Agent] = []
        try:
            coord.start()
            for agent_id, data in agents.items():
                a = Agent(AgentConfig(b.url, fleet, agent_id, protocol.derive_key(secret, agent_id),
                                      coordinator_key=signing.public_key(seed)), data)
                a.start()
                clients.append(a)
            coord.wait_for_agents(len(agents), 120)
            for r in range(rounds):
                coord.run_round(r)
                if on_round is not None:
                    on_round(r, strategy)
        finally:
            for a in clients:
                a.stop()
            coord.stop()
