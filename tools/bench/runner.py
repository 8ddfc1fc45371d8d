"""Run any strategy with its learners through the real round engine: the one runner of benchmarks and tests.

`run_strategy(strategy, agents, rounds, *, broker="memory", on_round=None, deadline_s=20)` starts a broker
(`fedfleet.coordinator.broker.start_broker`: "memory" by default, in this process and without sockets;
"mosquitto", "embedded" or a URL for MQTT), the engine (`fedfleet.coordinator.engine.rounds.Coordinator`) and
one real `fedfleet.edge_agent.agent.Agent` per entry of `agents`; the run is assembled like every other
(`fedfleet.coordinator.job.assemble.build_run`, with the caller's strategy and a `PackagedTask`). Every task and result crosses the broker as
a signed envelope and goes through the engine's receive path, phases and validation, whatever the transport.
Rounds are numbered from 1, as the engine numbers them; `on_round(round, strategy)` runs after each.

The agents load a full-mode model package (no backbone: the learners see the raw features) whose MLP has the
widths of the strategy's state (`fc0.weight`, `fc1.weight`, ...); the engine scores nothing (accuracy NaN): callers measure what they need in `on_round`.
"""

from __future__ import annotations

import os
import tempfile
import threading
import time
from collections.abc import Callable
from typing import Any

from fedfleet.coordinator.broker import start_broker
from fedfleet.coordinator.engine.rounds import Coordinator, RoundSummary
from fedfleet.coordinator.job.assemble import build_run
from fedfleet.coordinator.job.config import JobConfig
from fedfleet.coordinator.strategies import Strategy
from fedfleet.coordinator.tasks.packaged import PackagedTask
from fedfleet.edge_agent.agent import Agent, AgentConfig
from fedfleet.edge_agent.errors import ConfigError
from fedfleet.edge_agent.learners import LocalData
from fedfleet.edge_agent.wire import protocol, signing

__all__ = ["OnRound", "Runner", "run_strategy"]

OnRound = Callable[[int, Strategy], None]
Runner = Callable[..., list[RoundSummary]]

_PACKAGES: dict[tuple[int, ...], bytes] = {}


def head_sizes(strategy: Strategy, input_dim: int, classes: int) -> list[int]:
    """The MLP widths of the strategy's state (fc0.weight, fc1.weight, ...), else a linear input -> classes."""
    state = strategy.global_state()
    sizes, i = [input_dim], 0
    while f"fc{i}.weight" in state:
        out_dim, in_dim = (int(n) for n in state[f"fc{i}.weight"].shape)
        if in_dim != sizes[-1]:
            return [input_dim, classes]
        sizes.append(out_dim)
        i += 1
    return sizes if len(sizes) > 1 else [input_dim, classes]


def full_package(sizes: list[int]) -> bytes:
    """A full-mode package for an MLP of `sizes` (no backbone: the learners see the raw features), built once
    per process: the digits package's format with the input width, head and classes of `sizes`."""
    key = tuple(sizes)
    if key not in _PACKAGES:
        import hashlib
        import json

        from fedfleet.edge_agent.model import HEAD_INIT, MANIFEST
        from fedfleet.edge_agent.nn import mlp
        from fedfleet.models import head_graph
        from fedfleet.models._zip import npz, write_zip
        from fedfleet.models.package import manifest_for

        manifest = manifest_for("full", 0, None)
        manifest.update(name=f"bench-mlp-{'-'.join(map(str, sizes))}", input_shape=[sizes[0]], feature_dim=sizes[0],
                        head_sizes=list(sizes), head_layout=[[n, list(s)] for n, s in mlp.layout(list(sizes))],
                        classes=list(range(sizes[-1])))
        graphs = {"onnx": head_graph.onnx_head(list(sizes)), "tflite": head_graph.tflite_head(list(sizes))}
        manifest["head_graphs"] = [{"file": f"head.{fmt}", "format": fmt, "sha256": hashlib.sha256(data).hexdigest(),
                                    "input": "features", "output": "logits"} for fmt, data in graphs.items()]
        members = {MANIFEST: json.dumps(manifest, indent=2, sort_keys=True).encode(),
                   HEAD_INIT: npz(mlp.init(list(sizes), 0)),
                   **{f"head.{fmt}": data for fmt, data in graphs.items()}}
        _PACKAGES[key] = write_zip(members)
    return _PACKAGES[key]


def _wait_ready(coord: Coordinator, clients: list[Agent], timeout_s: float) -> None:
    """Wait until every agent holds the package; fail at once, with its reason, if an agent cannot use it."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            coord.wait_for_agents(len(clients), min(1.0, max(0.1, deadline - time.monotonic())))
            return
        except TimeoutError:
            broken = {a.cfg.agent_id: a.model_error for a in clients if a.model_error}
            if broken or time.monotonic() >= deadline:
                detail = f"; agents that cannot use the package: {dict(list(broken.items())[:3])}" if broken else ""
                raise TimeoutError(f"the agents did not all load the bench model package within {timeout_s:.0f} s"
                                   f"{detail}") from None


def run_strategy(
    strategy: Strategy,
    agents: dict[str, LocalData],
    rounds: int,
    *,
    broker: str = "memory",
    on_round: OnRound | None = None,
    deadline_s: float = 20.0,
) -> list[RoundSummary]:
    """Rounds 1..`rounds` of `strategy` with one agent per entry of `agents` over `broker`; returns the
    engine's round summaries. Every selected agent must answer each phase (quorum 1, no grace): a phase
    closes early once all have answered, at `deadline_s` otherwise."""
    if not agents:
        raise ConfigError("run_strategy needs at least one agent: pass a dict of agent id -> LocalData")
    if rounds < 0:
        raise ConfigError(f"rounds must be >= 0, got {rounds}")
    secret = os.urandom(32)
    seed = signing.new_signing_seed()
    first = next(iter(agents.values()))
    classes = max([int(d.y.max()) + 1 for d in agents.values() if len(d.y)] + [2])
    package = full_package(head_sizes(strategy, int(first.x.shape[1]), classes))
    fleet = f"bench{os.getpid()}-{os.urandom(3).hex()}"  # unique per run: no session of an earlier run can meet it
    shared_models: dict[str, Any] = {}
    learn_lock = threading.Lock()  # agents take turns learning, as the emulator's do
    with start_broker(broker) as b, tempfile.TemporaryDirectory(prefix="fedfleet-bench-") as tmp:
        job = JobConfig(fleet=fleet, rounds=rounds, agents=len(agents), roster=list(agents), deadline_s=deadline_s,
                        quorum=1.0, grace_s=0.0, downlink="none")
        coord = build_run(job, broker_url=b.url, secret=secret, signing_key=seed, run_dir=tmp, run_id="bench",
                          strategy=strategy, task=PackagedTask(package, None, list(agents.values()), None,
                                                               name="bench")).coordinator
        clients: list[Agent] = []
        summaries: list[RoundSummary] = []
        try:
            coord.start()
            for agent_id, data in agents.items():
                a = Agent(AgentConfig(b.url, fleet, agent_id, protocol.derive_key(secret, agent_id),
                                      coordinator_key=signing.public_key(seed)), data,
                          model_cache=shared_models, learn_lock=learn_lock)
                a.start()
                clients.append(a)
            _wait_ready(coord, clients, 120.0)
            for r in range(1, rounds + 1):
                summaries.append(coord.run_round(r))
                if on_round is not None:
                    on_round(r, strategy)
        finally:
            for a in clients:
                a.stop()
            coord.stop()
    return summaries
