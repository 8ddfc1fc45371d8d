"""Host many agents in a few worker processes (one MQTT connection per agent), for benchmarks and emulation.

`AgentPool(url, fleet, secret, shards, processes=2).start()` spreads the agents over processes so they learn
in parallel instead of sharing one interpreter lock; `stop()` ends them.
"""

from __future__ import annotations

import multiprocessing as mp
import time
from typing import Any

import numpy as np

from edge_agent.learners import LocalData


def _serve(url: str, fleet: str, secret: bytes, members: list[tuple[str, np.ndarray, np.ndarray]],
           options: dict[str, Any], ready: Any, stop: Any) -> None:
    import logging

    from edge_agent import protocol
    from edge_agent.agent import Agent, AgentConfig

    logging.basicConfig(level=logging.ERROR)
    agents = []
    for agent_id, x, y in members:
        a = Agent(AgentConfig(url, fleet, agent_id, protocol.derive_key(secret, agent_id), **options),
                  LocalData(x, y))
        a.start(wait_s=60)
        agents.append(a)
    ready.set()
    stop.wait()
    for a in agents:
        a.stop()


class AgentPool:
    def __init__(self, url: str, fleet: str, secret: bytes, members: dict[str, LocalData], *, processes: int = 2,
                 **options: Any) -> None:
        self.url, self.fleet, self.secret = url, fleet, secret
        self.members = members
        self.processes = max(1, min(processes, len(members)))
        self.options = options
        ctx = mp.get_context("spawn")
        self._stop = ctx.Event()
        self._ctx = ctx
        self._procs: list[Any] = []
        self._ready: list[Any] = []

    def start(self, timeout_s: float = 120.0) -> None:
        items = [(a, d.x, d.y) for a, d in self.members.items()]
        for i in range(self.processes):
            ready = self._ctx.Event()
            p = self._ctx.Process(target=_serve, args=(self.url, self.fleet, self.secret, items[i :: self.processes],
                                                       self.options, ready, self._stop), daemon=True)
            p.start()
            self._procs.append(p)
            self._ready.append(ready)
        deadline = time.monotonic() + timeout_s
        for ready in self._ready:
            if not ready.wait(max(0.1, deadline - time.monotonic())):
                self.stop()
                raise TimeoutError("agent processes did not connect in time")

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self._procs]

    def stop(self) -> None:
        self._stop.set()
        for p in self._procs:
            p.join(15)
            if p.is_alive():
                p.kill()
