"""Host many agents in a few worker processes (one MQTT connection per agent), for benchmarks and emulation.

In each worker process the agents share the process's `Host`: one link loop drives every agent's connection
(connects windowed, no thread per agent) and a few shared worker threads run their tasks
(`fedfleet.edge_agent.host`), so a process holds thousands of agents.

`AgentPool(url, fleet, secret, shards, processes=2).start()` spreads the agents over processes so they learn
in parallel instead of sharing one interpreter lock; `stop()` ends them.

Options for emulation and large fleets:
- `blas_threads=1`: each worker gets a one-thread BLAS (hundreds of agent threads calling a multi-threaded
  BLAS at once spend their time contending);
- `share_model=True`: each model package is loaded once per process and the agents share it;
- `serialize_learning=True`: the agents of a process share one learn lock (they take turns learning instead
  of convoying on the interpreter lock);
- `factory="module:function"` builds each agent instead of `Agent(...)`, called as
  `factory(config, data, per_agent[agent_id], model_cache[, learn_lock=...])`; agents that have a
  `stats()` method report it back through `stop()`, which returns `{agent_id: stats}`.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import time
from typing import Any

import numpy as np

from fedfleet.edge_agent.learners import LocalData

_BLAS_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


def _resolve(factory: str) -> Any:
    import importlib

    module, _, name = factory.partition(":")
    return getattr(importlib.import_module(module), name)


def _serve(url: str, fleet: str, secret: bytes, members: list[tuple[str, np.ndarray, np.ndarray]],
           options: dict[str, Any], ready: Any, stop: Any, extra: dict[str, Any] | None = None,
           results: Any = None) -> None:
    import logging
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from fedfleet.edge_agent.agent import Agent, AgentConfig
    from fedfleet.edge_agent.host import Host
    from fedfleet.edge_agent.wire import protocol

    logging.basicConfig(level=logging.ERROR)
    extra = extra or {}
    factory = _resolve(extra["factory"]) if extra.get("factory") else None
    # emulated devices sleep out their slower compute and links inside their work: each may need a worker
    # thread at once then (a real device has its own CPU); plain agents share the process's few
    Host.configure_process(max_workers=len(members) if factory is not None else None)
    cache: dict[str, Any] | None = {} if extra.get("share_model") else None
    lock = {"learn_lock": threading.Lock()} if extra.get("serialize_learning") else {}
    per_agent = extra.get("per_agent") or {}
    agents = []
    for agent_id, x, y in members:
        config = AgentConfig(url, fleet, agent_id, protocol.derive_key(secret, agent_id), **options)
        if factory is not None:
            a = factory(config, LocalData(x, y), per_agent.get(agent_id, {}), cache, **lock)
        elif cache is not None or lock:
            a = Agent(config, LocalData(x, y), model_cache=cache, **lock)
        else:
            a = Agent(config, LocalData(x, y))
        a.start(wait_s=0)  # the process's link loop connects them, a window at a time
        agents.append(a)
    deadline = time.monotonic() + float(extra.get("connect_s", 300.0))
    for a in agents:  # every agent connected, its subscriptions acknowledged, before the pool says ready
        if not a.link.subscribed.wait(max(0.0, deadline - time.monotonic())):
            break
    ready.set()
    stop.wait()
    if len(agents) > 8:  # many agents: leave in parallel, each waits for its own threads
        with ThreadPoolExecutor(16) as ex:
            list(ex.map(lambda a: a.stop(), agents))
    else:
        for a in agents:
            a.stop()
    if results is not None:
        results.put({a.cfg.agent_id: a.stats() for a in agents if hasattr(a, "stats")})


class AgentPool:
    def __init__(self, url: str, fleet: str, secret: bytes, members: dict[str, LocalData], *, processes: int = 2,
                 share_model: bool = False, factory: str | None = None,
                 per_agent: dict[str, dict[str, Any]] | None = None, blas_threads: int | None = None,
                 serialize_learning: bool = False, coordinator_key: bytes | None = None, **options: Any) -> None:
        """`coordinator_key`: the coordinator's public key, pinned by every agent (tasks and the model
        package must be signed with it)."""
        self.url, self.fleet, self.secret = url, fleet, secret
        self.members = members
        self.processes = max(1, min(processes, len(members)))
        self.options = {**options, "coordinator_key": coordinator_key}
        self.extra = {"share_model": share_model, "factory": factory, "per_agent": per_agent or {},
                      "serialize_learning": serialize_learning}
        self.blas_threads = blas_threads
        ctx = mp.get_context("spawn")
        self._stop = ctx.Event()
        self._results = ctx.Queue()
        self._ctx = ctx
        self._procs: list[Any] = []
        self._ready: list[Any] = []

    def start(self, timeout_s: float = 120.0) -> None:
        self.extra["connect_s"] = timeout_s
        items = [(a, d.x, d.y) for a, d in self.members.items()]
        saved = {k: os.environ.get(k) for k in _BLAS_VARS}
        if self.blas_threads is not None:  # the workers' BLAS pools: set before they import numpy
            os.environ.update({k: str(self.blas_threads) for k in _BLAS_VARS})
        try:
            self._spawn(items)
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
        deadline = time.monotonic() + timeout_s
        for ready in self._ready:
            if not ready.wait(max(0.1, deadline - time.monotonic())):
                self.stop()
                raise TimeoutError("agent processes did not connect in time")

    def _spawn(self, items: list[tuple[str, np.ndarray, np.ndarray]]) -> None:
        for i in range(self.processes):
            ready = self._ctx.Event()
            mine = items[i :: self.processes]
            extra = {**self.extra, "per_agent": {a: self.extra["per_agent"][a] for a, _, _ in mine
                                                 if a in self.extra["per_agent"]}}
            p = self._ctx.Process(target=_serve, args=(self.url, self.fleet, self.secret, mine, self.options, ready,
                                                       self._stop, extra, self._results), daemon=True)
            p.start()
            self._procs.append(p)
            self._ready.append(ready)

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self._procs]

    def stop(self, timeout_s: float = 30.0) -> dict[str, Any]:
        """End the agents; returns what agents with a `stats()` method reported, by agent id."""
        import queue

        self._stop.set()
        stats: dict[str, Any] = {}
        deadline = time.monotonic() + timeout_s
        got = 0
        while got < len(self._procs) and time.monotonic() < deadline:
            try:
                stats.update(self._results.get(timeout=0.2))
                got += 1
            except queue.Empty:
                if not any(p.is_alive() for p in self._procs):
                    break
        for p in self._procs:
            p.join(max(0.1, deadline - time.monotonic()))
            if p.is_alive():
                p.kill()
        return stats
