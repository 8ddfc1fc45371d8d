"""One (round, phase) of the engine: the inbox items handled while it is open, and its close.

`Phase.offer(item)` handles one inbox item (coordinator/engine/inbox.py) and returns a typed outcome: `Accepted`
(a valid result, held for the phase's books), `Rejected` (a refusal, booked now), or `Noted` (bytes or energy
booked, no verdict: chunks, energy reports, and late results for a phase already closed). Only an authenticated
answer to the agent's own open task closes its slot: a valid result, or a refusal whose reason
`answers_task` (a refused message that named this run, round and phase, for refusals of the receive path).

Over-selection (`cohort`, Bonawitz et al. 2019): a phase tasked for a cohort of `cohort` results is `full` once that
many valid results are held; a valid result that arrives after that is booked `surplus` (not aggregated), and at
the close the tasked agents still without an answer are booked `surplus` rather than `late` (their results, when they
come, are noted on that row like a late agent's). Every result is checked the same way whether it is counted or not.

`Phase.close()` handles what is still queued, applies the norm bound, writes the `ok` and `late` rows and the
refusal summaries, and returns a `PhaseOutcome`. After its close a phase still takes items (the engine's `settle`
books the energy reports that follow the last round); `flush()` handles the queue and writes the summaries.

State that outlives a phase (a late agent's result bytes, who was late where, the energy reports due) is the
engine's `Carry`, shared by its phases.
"""

from __future__ import annotations

import queue
import time
from dataclasses import dataclass, field

from fedfleet.coordinator.engine.books import PhaseBooks
from fedfleet.coordinator.engine.downlink import DownlinkSync
from fedfleet.coordinator.engine.inbox import (
    ChunkBytes,
    EnergyReport,
    InboxItem,
    Refused,
    ResultMessage,
    TrafficReport,
)
from fedfleet.coordinator.engine.receive import ReceivePath
from fedfleet.coordinator.engine.validate import Validator
from fedfleet.coordinator.strategies import ClientResult, TaskSpec
from fedfleet.edge_agent.errors import ProtocolError, Refusal, refusal


@dataclass
class PhaseOutcome:
    selected: list[str]
    results: list[ClientResult]
    rejected: int
    late: list[str]
    wall_s: float
    surplus: list[str] = field(default_factory=list)  # tasked by over-selection, not needed for the cohort


@dataclass(frozen=True)
class Accepted:
    result: ClientResult


@dataclass(frozen=True)
class Rejected:
    agent: str
    reason: Refusal
    closes_slot: bool  # it answered the agent's own open task (the agent has no late row in the phase)


@dataclass(frozen=True)
class Noted:
    agent: str


Outcome = Accepted | Rejected | Noted


@dataclass
class Carry:
    """What the engine's phases share across rounds."""

    late: dict[tuple[int, int], set[str]] = field(default_factory=dict)  # (round, phase) -> agents booked late
    late_bytes: dict[str, int] = field(default_factory=dict)  # result bytes of agents outside an open slot
    energy_due: set[tuple[str, int, int]] = field(default_factory=set)  # (agent, round, phase) to report energy


class Phase:
    """Round `r`, phase `phase` of run `run`, with `tasks` (agent -> task) open until `close()`.

    `inbox` is drained on close; `receive` gives the unauthenticated and status/telemetry refusal counts for the
    summaries; `sync` is the state sync, when the strategy's tasks carry the global state.
    """

    def __init__(self, *, run: str, r: int, phase: int, tasks: dict[str, TaskSpec], validator: Validator,
                 books: PhaseBooks, carry: Carry, inbox: queue.Queue[InboxItem], receive: ReceivePath,
                 sync: DownlinkSync | None = None, cohort: int | None = None) -> None:
        """`cohort`: the valid results the phase aggregates at most (over-selection; None: every tasked agent's)."""
        self.run, self.round, self.phase = run, r, phase
        self.tasks = dict(tasks)
        self.validator = validator
        self.books = books
        self.carry = carry
        self.inbox = inbox
        self.receive = receive
        self.sync = sync
        self.results: list[ClientResult] = []
        self.rejected = 0
        self.closed = False
        self._open = dict(tasks)  # agent -> task, until the phase closes
        self._received: set[str] = set()  # agents whose result was valid
        self._refused: set[str] = set()  # tasked agents whose own answer was refused (their row says why)
        self.cohort = cohort
        self._surplus: set[str] = set()  # tasked agents whose valid result came after the cohort was full
        self._up: dict[str, int] = {a: 0 for a in tasks}  # result bytes per tasked agent
        self._down: dict[str, int] = {}  # task bytes per tasked agent
        self._t0 = time.perf_counter()

    def dispatched(self, agent: str, nbytes: int) -> None:
        """`agent`'s task went out: the bytes it received."""
        self._down[agent] = nbytes

    @property
    def waiting(self) -> list[str]:
        """Tasked agents whose slot is still open (no valid result, no refused answer)."""
        return [a for a in self.tasks if a not in self._received and a not in self._refused and a not in self._surplus]

    @property
    def answered(self) -> bool:
        """Every tasked agent answered, well or not."""
        return len(self._received | self._refused | self._surplus) >= len(self.tasks)

    @property
    def full(self) -> bool:
        """Over-selection: the phase holds its cohort of valid results (never True without a cohort)."""
        return self.cohort is not None and len(self.results) >= self.cohort

    # -------------------------------------------------------------- items
    def offer(self, item: InboxItem) -> Outcome:
        """Handle one inbox item; see the module docstring for the outcomes."""
        if isinstance(item, EnergyReport):
            if item.run == self.run:
                self.carry.energy_due.discard((item.agent, item.round, item.phase))
                self.books.energy(item)
            return Noted(item.agent)
        if isinstance(item, TrafficReport):
            if item.run == self.run:
                self.books.traffic(item)
            return Noted(item.agent)
        if isinstance(item, ChunkBytes):
            if item.agent in self._up and item.agent not in self._received and item.agent not in self._surplus:
                self._up[item.agent] += item.nbytes
            else:
                self.carry.late_bytes[item.agent] = self.carry.late_bytes.get(item.agent, 0) + item.nbytes
            return Noted(item.agent)
        if isinstance(item, Refused):
            own = item.names(self.run, self.round, self.phase)
            return self._reject(item.agent, item.reason, item.detail, item.nbytes, answers=own)
        if isinstance(item, ResultMessage):
            return self._result(item)
        raise TypeError(f"not an inbox item: {type(item).__name__}; the receive path queues inbox.InboxItem only")

    def _result(self, item: ResultMessage) -> Outcome:
        agent, header = item.agent, item.header
        try:
            result = self.validator.check(agent, header, item.body, self._open.get(agent),
                                          duplicate=agent in self._received or agent in self._surplus)
        except ProtocolError as exc:
            if exc.reason is Refusal.LATE:  # its "late" row exists: add the bytes it cost
                self.books.late_bytes(agent, int(header["round"]), int(header.get("phase", 0)),
                                      self.carry.late_bytes.pop(agent, 0))
                return Noted(agent)
            return self._reject(agent, exc.reason, exc.detail, 0,
                                bytes_up=self._up.get(agent, 0) if agent in self._open else 0,
                                answers=exc.reason.answers_task)
        meta = header["meta"]
        if self.full:  # checked like any result, but the cohort is complete: booked, not aggregated
            self._surplus.add(agent)
            if self.sync is not None and self.phase == 0:
                self.sync.confirm(agent, self.sync.version)  # it checked the state's digest before learning
            self.books.surplus(agent, bytes_up=self._up.get(agent, 0), bytes_down=self._down.get(agent, 0),
                               detail=f"valid result after the cohort of {self.cohort} was full (over-selection)")
            return Noted(agent)
        self._received.add(agent)
        if meta.get("energy") is True:
            self.carry.energy_due.add((agent, self.round, self.phase))
        if self.sync is not None and self.phase == 0:
            self.sync.confirm(agent, self.sync.version)  # it checked the state's digest before learning
        metrics, claimed = result.metrics, meta["samples"]
        self.books.hold(result, dict(
            bytes_up=self._up.get(agent, 0), bytes_down=0 if agent in self._refused else self._down.get(agent, 0),
            learn_s=float(meta.get("learn_s", 0.0)), samples=result.samples,
            queries=int(metrics["queries"]) if "queries" in metrics else None, profile=str(meta.get("profile")),
            codec=str(header["codec"].get("name")),
            detail=None if claimed == result.samples else f"weight {result.samples} (claimed {claimed} samples)",
        ))
        self.results.append(result)
        return Accepted(result)

    def _reject(self, agent: str, reason: Refusal, detail: str, nbytes: int, bytes_up: int = 0, *,
                answers: bool) -> Rejected:
        """Book a refusal of an authenticated message. It closes the agent's slot only when it `answers` the agent's
        own open task (a replayed old message must not close it); the task's bytes go on that first refusal's row
        (the agent gets no late row)."""
        bytes_down = 0
        closes = (answers and agent in self._open and agent not in self._refused and agent not in self._received
                  and agent not in self._surplus)
        if closes:
            self._refused.add(agent)
            bytes_down = self._down.get(agent, 0)
        self.books.refuse(agent, reason, detail, bytes_up=max(nbytes, bytes_up), bytes_down=bytes_down)
        self.rejected += 1
        return Rejected(agent, reason, closes)

    # -------------------------------------------------------------- close
    def _drain(self) -> None:
        """Handle what is queued; valid results among it still count (and are bounded)."""
        while True:
            try:
                item = self.inbox.get_nowait()
            except queue.Empty:
                return
            self.offer(item)

    def flush(self) -> None:
        """Handle what is queued and write the refusal summaries (after the close: late energy reports)."""
        self._drain()
        self.books.summarise(self.receive.take_dropped(), self.receive.take_refused())

    def close(self) -> PhaseOutcome:
        """Drain, bound, book; the slots close. `wall_s` is the time since the phase was opened."""
        if self.closed:
            raise RuntimeError(f"phase {self.round}.{self.phase} is closed already; open the next one")
        self._drain()
        screened = self.validator.bound(self.results)
        for res, reason, detail in screened.by_method:
            self.books.refuse_held(res.agent, refusal(reason), detail)
        for res, norm, bound in screened.refused:
            self.books.refuse_norm(res.agent, norm, bound, self.validator.guard.norm_bound)
        self.results = screened.kept
        self.rejected += len(screened.refused) + len(screened.by_method)
        self.books.book_held(self._up)
        waiting = self.waiting
        full = self.full
        late, surplus = ([], waiting) if full else (waiting, [])
        for agent in waiting:
            if self.sync is not None:
                self.sync.forget(agent)  # its replica is unknown now: a full state next time
            if full:
                self.books.surplus(agent, bytes_up=self._up.get(agent, 0), bytes_down=self._down.get(agent, 0),
                                   detail=f"no result before the cohort of {self.cohort} was full (over-selection)")
            else:
                self.books.late(agent, bytes_up=self._up.get(agent, 0), bytes_down=self._down.get(agent, 0))
        self.books.summarise(self.receive.take_dropped(), self.receive.take_refused())
        self.carry.late[(self.round, self.phase)] = set(waiting)  # a result of theirs that still comes is noted
        # closed: results that still arrive for it are not its own (late, or not selected); bytes go to `late_bytes`
        self._open, self._up, self._down = {}, {}, {}
        self.closed = True
        return PhaseOutcome(list(self.tasks), list(self.results), self.rejected, late, time.perf_counter() - self._t0,
                            sorted(self._surplus) + surplus)
