"""What the agents of one process share: the one `Host` object that owns every piece of in-process state.

An in-process fleet (the demo, an emulation, the tests) runs many agents in one interpreter. They share:
- `models`: loaded model packages by digest, so a package is loaded once per Host (ONNX Runtime sessions
  are thread-safe; each agent still gets its own feature cache, see `fedfleet.edge_agent.replica`); used by
  the agents given this Host explicitly (an agent given no Host loads its own copy, as it always did), and
  None on a solo Host (one agent keeps no dict of every package it ever loaded);
- `payloads`: one copy of equal broadcast bytes the agents keep (`wire.shared_bytes.SharedBytes`);
- `signatures`: downlink messages that verified once under a key (`wire.signing.VerifiedSignatures`);
- `transitions`: the newest decodes of a sync onto a replica state (`downlink.Transitions`), so the agents
  holding the same state decode the round's sync once;
- `load_lock`: the lock package loads take turns under, for a CPython bug in the interpreter-wide AST
  constructor (`fedfleet.edge_agent.model.LOAD_LOCK`); being the interpreter's, it is the same for every Host;
- `links`: one `wire.link_loop.LinkLoop`, the one thread that drives every agent's MQTT connection (one
  socket each, windowed connects, no descriptor ceiling), and `worker`: one `worker.SharedWorker`, the few
  threads every agent's work (package loads, tasks, learning) runs on, each agent's in order. So an agent
  costs no thread of its own, and one process hosts thousands. Both are None on a solo Host: an agent alone
  on its device has its own worker thread, and its link a loop of its own.

`Host.process()` is the process-wide Host every `Agent` uses unless it is given another; a device run
(`fedfleet-agent`, one agent alone) uses `Host.solo()`, a Host of its own. Nothing else in the edge agent
keeps state at module level for sharing between agents.
"""

from __future__ import annotations

import os
import threading
from typing import Any, ClassVar

from fedfleet.edge_agent.downlink import Transitions
from fedfleet.edge_agent.model import LOAD_LOCK
from fedfleet.edge_agent.wire.link_loop import LinkLoop
from fedfleet.edge_agent.wire.shared_bytes import SharedBytes
from fedfleet.edge_agent.wire.signing import VerifiedSignatures
from fedfleet.edge_agent.worker import SharedWorker


class Host:
    """The state the agents of one process (or of one fleet inside it) share."""

    _process: ClassVar[Host | None] = None
    _process_lock: ClassVar[threading.Lock] = threading.Lock()

    def __init__(self, *, share_models: bool = True, payloads: SharedBytes | None = None,
                 signatures: VerifiedSignatures | None = None, transitions: Transitions | None = None,
                 multiplex: bool = True, workers: int | None = None, max_workers: int | None = None,
                 connect_window: int = 32) -> None:
        """`multiplex`: the agents share `links` and `worker` (`workers` threads, default the cores up to 4,
        growing up to `max_workers` while work waits and every thread is busy; `connect_window` connects in
        flight at most)."""
        self.models: dict[str, Any] | None = {} if share_models else None
        self.links: LinkLoop | None = LinkLoop(window=connect_window) if multiplex else None
        self.worker: SharedWorker | None = None
        if multiplex:
            threads = workers if workers is not None else max(1, min(4, os.cpu_count() or 1))
            self.worker = SharedWorker(threads, max_threads=max_workers)
        self.payloads = SharedBytes() if payloads is None else payloads
        self.signatures = VerifiedSignatures() if signatures is None else signatures
        self.transitions = Transitions() if transitions is None else transitions
        self.load_lock: Any = LOAD_LOCK

    @classmethod
    def process(cls) -> Host:
        """The one Host of this process (made on first use)."""
        with cls._process_lock:
            if cls._process is None:
                cls._process = cls()
            return cls._process

    @classmethod
    def configure_process(cls, **options: Any) -> Host:
        """Make this process's Host with these options (a process that hosts agents, before its first agent)."""
        with cls._process_lock:
            if cls._process is not None:
                raise RuntimeError("this process's Host is in use already")
            cls._process = cls(**options)
            return cls._process

    @classmethod
    def solo(cls) -> Host:
        """A Host for one agent alone (a device): its own caches, nothing kept for other agents' sake."""
        return cls(share_models=False, payloads=SharedBytes(max_kept=0), transitions=Transitions(keep=0),
                   multiplex=False)

    def __repr__(self) -> str:
        return (f"Host(models={len(self.models or {})}, payloads={len(self.payloads)}, "
                f"signatures={self.signatures.keep})")
