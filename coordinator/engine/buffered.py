"""Buffered asynchronous aggregation (FedBuff, Nguyen et al., AISTATS 2022): the engine mode of `[aggregation]
mode = "async"` (docs/async.md). The fleet never waits for its slowest device.

`BufferedCoordinator` is the round engine (`rounds.Coordinator`) with another loop; every part is the same one:
the receive path, presence, the dispatcher and its compressed downlink (`downlink.DownlinkSync`), the checks of
`validate.Validator`, the update guard (weight cap and norm bound), the ledger and the checkpoints.

- At most `concurrency` tasks are in flight. Each task carries the model version it was trained from
  (`meta.version`; the task's header `round` is the task's own number, so every task has its own key), and the
  agent's result names it again. An idle agent that is online with the package gets the next task at once.
- Valid results go into a buffer. Every `buffer` results the strategy aggregates them (its own `aggregate`, as in a
  round), each update scaled down by its staleness s (versions published since its task's version): by
  1/sqrt(1+s) ("sqrt"), 1/(1+s) ("inverse") or 1 ("constant"). A result with s > `max_staleness` is refused
  (`rejected:staleness`). Each aggregation publishes a new version (the ledger's `round`): it is evaluated and
  checkpointed like a round, and the downlink codes each agent's change from the version it holds (the chain of
  codes or the full state, whichever is smaller).
- A result that names a version its task did not carry is refused with one log line and a ledger row: a future
  version (`rejected:future_version`), another past one (`rejected:wrong_version`), or a negative, non-integer or
  huge one (`rejected:schema`). The coordinator computes staleness from its own record of the task, never from the
  agent's word.
- A task not answered within `deadline_s + grace_s` frees its slot; its result is still taken when it comes
  (within the staleness limit), e.g. from an agent's store-and-forward outbox after a reconnection
  (fedfleet.edge_agent.outbox). A second copy of a result already accepted is noted, not booked again.
- Ledger rows: `ok` rows are written when their version is published (round = that version), with `version`
  (trained from) and `staleness`; refusals are written at once (round = the version being built), those for
  staleness with `version` and `staleness` too.
- Resume: `checkpoints/async.pt` holds the version, the task counter, the tasks issued and the buffer (written after
  every accepted result and every version), so a resumed run continues at the next version with the results it had
  buffered, and still takes the results of tasks issued before the interruption.
"""

from __future__ import annotations

import logging
import math
import os
import queue
import time
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch

from fedfleet.coordinator.engine.books import PhaseBooks
from fedfleet.coordinator.engine.config import RoundSummary
from fedfleet.coordinator.engine.inbox import (
    ChunkBytes,
    EnergyReport,
    InboxItem,
    Refused,
    ResultMessage,
    TrafficReport,
)
from fedfleet.coordinator.engine.rounds import Coordinator
from fedfleet.coordinator.engine.validate import Validator
from fedfleet.coordinator.strategies import ClientResult, Strategy, TaskSpec
from fedfleet.coordinator.strategies.base import to_numpy
from fedfleet.edge_agent.errors import ConfigError, ProtocolError, Refusal

log = logging.getLogger(__name__)

MAX_VERSION = (1 << 31) - 1
STATE_FILE = "async.pt"


def staleness_weight(kind: str, s: int) -> float:
    """The factor a result of staleness `s` is scaled by."""
    if kind == "sqrt":
        return 1.0 / math.sqrt(1.0 + s)
    if kind == "inverse":
        return 1.0 / (1.0 + s)
    if kind == "constant":
        return 1.0
    raise ValueError(f"unknown staleness weighting {kind!r}")


def check_async_strategy(strategy: Strategy) -> None:
    """Asynchronous mode takes methods whose one phase uploads an update (FedAvg, FedZip uplinks, the robust
    aggregators, FedZO); a one-line ConfigError otherwise."""
    if strategy.phases != 1 or strategy.update_kind(0) not in ("delta", "model"):
        raise ConfigError(f"[aggregation] mode 'async' needs a method whose one phase uploads an update; "
                          f"{strategy.name!r} has {strategy.phases} phases of kind {strategy.update_kind(0)!r}")


@dataclass
class Issued:
    """One task handed out: to whom, its number, the version it carries."""

    agent: str
    task: int
    version: int
    sent: float  # unix time
    sync_version: int | None = None
    announced: int | None = None
    spec: TaskSpec | None = None
    bytes_down: int = 0
    bytes_up: int = 0
    answered: bool = False


@dataclass
class Held:
    """A valid result waiting in the buffer, with its ledger row (written when its version is published)."""

    result: ClientResult
    task: int
    version: int
    staleness: int
    row: dict[str, Any] = field(default_factory=dict)


class BufferedCoordinator(Coordinator):
    """The round engine in asynchronous mode; `run(n)` publishes versions until version n."""

    def __init__(self, *, aggregation: dict[str, Any], resume: bool = False, **kwargs: Any) -> None:
        self.concurrency = int(aggregation["concurrency"])
        self.buffer_size = int(aggregation["buffer"])
        self.max_staleness = int(aggregation["max_staleness"])
        self.weighting = str(aggregation["staleness"])
        staleness_weight(self.weighting, 0)
        super().__init__(resume=resume, **kwargs)
        self.version = self.first_round - 1  # versions published (0: the initial model)
        self.round = self.version
        self.next_task = 1
        self.issued: dict[tuple[str, int], Issued] = {}
        self.retired: dict[tuple[str, int], int] = {}  # (agent, task) -> version, for tasks pruned from `issued`
        self.buffer: list[Held] = []
        self.accepted: set[tuple[str, str]] = set()  # (agent, payload digest) of results taken
        self.staleness_seen: list[int] = []  # of the results in the last version
        self.ended = False
        self.last = False  # building the run's last version
        self._books = self._open_books()
        self._version_started = time.perf_counter()
        self._run_started: float | None = None
        self._state_path = self.store.checkpoints / STATE_FILE
        if resume:
            self._restore()

    # -------------------------------------------------------------- the loop
    def run(self, rounds: int | None = None) -> list[RoundSummary]:
        """Publish versions until version `rounds` (default: the job's rounds); then take the results still in
        flight for a while (they are booked, refused as past the last version)."""
        target = rounds or self.cfg.rounds
        self.begin()
        out = []
        while self.version < target:
            self.last = self.version + 1 == target
            out.append(self.next_version())
        self.last = False
        self.finish(self.cfg.deadline_s)
        return out

    def begin(self) -> None:
        """Before the first `next_version` of this process: the downlink's first version, the clocks."""
        if self._sync is not None and self._sync.version == 0:
            self._sync.advance(to_numpy(self.strategy.global_state()))  # version 0 of the downlink
        self._run_started = self._run_started or time.perf_counter()
        self._version_started = time.perf_counter()

    def next_version(self) -> RoundSummary:
        """Dispatch and collect until the buffer holds `buffer` results, then aggregate them into a version."""
        t0 = self._version_started
        up0, down0 = self.bytes_up_total, self.bytes_down_total
        patience = self.cfg.deadline_s + self.cfg.grace_s
        timings = {"dispatch": 0.0, "collect": 0.0, "aggregate": 0.0}
        while len(self.buffer) < self.buffer_size:
            td = time.perf_counter()
            self.fill()
            timings["dispatch"] += time.perf_counter() - td
            if self.buffer and time.perf_counter() - t0 > patience:
                log.warning("version %d: only %d of %d results after %.0f s; publishing with them",
                            self.version + 1, len(self.buffer), self.buffer_size, patience)
                break
            tc = time.perf_counter()
            try:
                item = self.inbox.get(timeout=0.2)
            except queue.Empty:
                timings["collect"] += time.perf_counter() - tc
                continue
            self.offer(item)
            timings["collect"] += time.perf_counter() - tc
        return self._publish(t0, up0, down0, timings)

    def fill(self) -> int:
        """Hand tasks to idle agents that are online with the package, up to `concurrency` in flight; returns how
        many went out."""
        now = time.time()
        timeout = self.cfg.deadline_s + self.cfg.grace_s
        busy = set()
        for task in self.issued.values():
            if task.answered:
                continue
            if now - task.sent < timeout:
                busy.add(task.agent)
            elif task.spec is not None:  # timed out: its slot is free; its result is still taken if it comes
                task.spec = None
                if self._sync is not None:
                    self._sync.forget(task.agent)  # its replica is unknown now: a full state next time
        room = self.concurrency - len(busy)
        if self.last:  # the run's last version: no more tasks than it still needs results
            room = min(room, self.buffer_size - len(self.buffer) - len(busy))
        if room <= 0:
            return 0
        idle = [a for a in self.ready_agents() if a not in busy]
        if not idle:
            return 0
        chosen = idle if len(idle) <= room else sorted(self._rng.choice(idle, size=room, replace=False).tolist())
        announced = self.presence.announced(chosen)
        for agent in chosen:
            self._dispatch(agent, announced.get(agent))
        return len(chosen)

    def _dispatch(self, agent: str, announced: int | None) -> None:
        n = self.next_task
        self.next_task += 1
        spec = self.strategy.configure(n, 0, [agent])[agent]
        task = Issued(agent, n, self.version, time.time(), self._sync.version if self._sync is not None else None,
                      announced, spec)
        self.issued[(agent, n)] = task
        self.first_dispatch_at = self.first_dispatch_at or time.time()
        task.bytes_down = self.dispatcher.dispatch(agent, n, 0, spec, extra_meta={"version": self.version})

    # -------------------------------------------------------------- items
    def offer(self, item: InboxItem) -> None:
        if isinstance(item, ChunkBytes):
            task = self._open_task(item.agent)
            if task is not None:
                task.bytes_up += item.nbytes
            return
        if isinstance(item, EnergyReport):
            self._energy(item)
            return
        if isinstance(item, TrafficReport):
            self.book_traffic(item)
            return
        if isinstance(item, Refused):
            task = self.issued.get((item.agent, item.round)) if item.run == self.cfg.run else None
            if task is not None and not task.answered and item.reason.answers_task:
                self._close(task)
            self._books.refuse(item.agent, item.reason, item.detail, bytes_up=item.nbytes,
                               bytes_down=task.bytes_down if task is not None else 0)
            return
        if isinstance(item, ResultMessage):
            self._result(item)
            return
        raise TypeError(f"not an inbox item: {type(item).__name__}")

    def _write_traffic(self) -> None:
        self._books.write_traffic()

    def book_traffic(self, report: TrafficReport) -> None:
        """A report names the agent's task number, not a version: it goes on the version being built."""
        if report.run == self.cfg.run:
            self._books.traffic(replace(report, round=self.version + 1))

    def _open_task(self, agent: str) -> Issued | None:
        """The agent's newest unanswered task, if any (its result chunks are counted on it)."""
        open_ = [t for t in self.issued.values() if t.agent == agent and not t.answered]
        return max(open_, key=lambda t: t.task) if open_ else None

    def _close(self, task: Issued) -> None:
        task.answered = True
        task.spec = None
        if self._sync is not None:
            self._sync.forget(task.agent)

    def _result(self, item: ResultMessage) -> None:
        agent, header = item.agent, item.header
        if (agent, header["digest"]) in self.accepted:
            return  # a copy of a result already taken (an outbox resent it after a reconnection)
        task = None
        try:
            task = self._task_of(agent, header)
            held = self._check(agent, header, item.body, task)
        except ProtocolError as exc:
            if task is not None and not task.answered and exc.reason.answers_task:
                self._close(task)
            if exc.reason in (Refusal.FUTURE_VERSION, Refusal.WRONG_VERSION) or (
                    exc.reason is Refusal.SCHEMA and "version" in exc.detail):
                log.warning("refused a result from %s: %s: %s", agent, exc.reason, exc.detail[:200])
            if exc.reason is Refusal.STALENESS and task is not None:  # its row says which version, how stale
                self.ledger.record(self.cfg.run, self.version + 1, agent, exc.reason.status, phase=0,
                                   bytes_up=task.bytes_up, bytes_down=task.bytes_down, detail=exc.detail[:500],
                                   version=task.version, staleness=self.version - task.version)
                return
            self._books.refuse(agent, exc.reason, exc.detail,
                               bytes_up=task.bytes_up if task is not None else 0,
                               bytes_down=task.bytes_down if task is not None else 0)
            return
        task.answered = True
        task.spec = None
        self.accepted.add((agent, header["digest"]))
        if self._sync is not None and task.sync_version is not None:
            self._sync.confirm(agent, task.sync_version)  # it checked the state's digest before learning
        self.buffer.append(held)
        self._save_state()

    def _task_of(self, agent: str, header: dict[str, Any]) -> Issued:
        """The task a result answers; ProtocolError for another run, an unknown task, or a second answer."""
        if header["run"] != self.cfg.run:
            raise ProtocolError(Refusal.WRONG_RUN, f"result for run {header['run'][:64]!r}")
        n, phase = header["round"], header.get("phase", 0)
        task = self.issued.get((agent, n))
        if phase != 0 or task is None:
            if (agent, n) in self.retired:
                raise ProtocolError(Refusal.STALENESS, f"task {n} carried version {self.retired[(agent, n)]}; "
                                                       f"version {self.version} is current")
            if n >= self.next_task:
                raise ProtocolError(Refusal.FUTURE_ROUND, f"result for task {n}.{phase}, not issued yet")
            raise ProtocolError(Refusal.NOT_SELECTED, f"{agent} has no task {n}.{phase}")
        if task.answered:
            raise ProtocolError(Refusal.DUPLICATE, f"second result from {agent} for task {n}")
        return task

    def _check(self, agent: str, header: dict[str, Any], body: bytes, task: Issued) -> Held:
        """A result for `task`: its version claim, the engine's checks (validate.Validator), the staleness limit and
        the norm bound; the held result with its scaled update."""
        meta = header["meta"]
        claimed = meta.get("version")
        if type(claimed) is not int or not 0 <= claimed <= MAX_VERSION:
            raise ProtocolError(Refusal.SCHEMA, f"meta.version: must be an integer in 0..{MAX_VERSION}, "
                                                f"got {str(claimed)[:40]}")
        if claimed > self.version:
            raise ProtocolError(Refusal.FUTURE_VERSION, f"result claims version {claimed}; {self.version} is the "
                                                        f"newest published")
        if claimed != task.version:
            raise ProtocolError(Refusal.WRONG_VERSION, f"result claims version {claimed}; its task {task.task} "
                                                       f"carried version {task.version}")
        spec = task.spec or self.strategy.configure(task.task, 0, [agent])[agent]
        announced = self.presence.announced(self.presence.roster)
        if task.announced is not None:
            announced[agent] = task.announced
        validator = Validator(run=self.cfg.run, r=task.task, phase=0, tasks={agent: spec}, strategy=self.strategy,
                              guard=self.guard, max_result_bytes=self.cfg.max_result_bytes, announced=announced,
                              late={})
        result = validator.check(agent, header, body, spec, duplicate=False)
        staleness = self.version - task.version
        if self.ended:
            raise ProtocolError(Refusal.STALENESS, f"trained from version {task.version}; the run ended at version "
                                                   f"{self.version}")
        if staleness > self.max_staleness:
            raise ProtocolError(Refusal.STALENESS, f"trained from version {task.version}, {staleness} versions old "
                                                   f"(max_staleness {self.max_staleness})")
        kind = self.strategy.update_kind(0)
        names = self.strategy.update_names(0)
        reference = {**to_numpy(self.strategy.state), **spec.tensors} if kind == "model" else None
        norm = self.guard.update_norm({k: v for k, v in result.tensors.items() if names is None or k in names},
                                      reference)
        screened = self.guard.screen(0, [result], [norm])
        if screened.refused:
            raise ProtocolError(Refusal.NORM_BOUND, f"update norm {norm:.4g} exceeds the bound {screened.bound:.4g} "
                                                    f"({self.guard.norm_bound:g} x the running median)")
        scaled = self._scaled(result, spec, staleness)
        claimed_n = meta["samples"]
        row = dict(bytes_up=task.bytes_up, bytes_down=task.bytes_down, learn_s=float(meta.get("learn_s", 0.0)),
                   samples=result.samples, profile=str(meta.get("profile")), codec=str(header["codec"].get("name")),
                   version=task.version, staleness=staleness,
                   queries=int(result.metrics["queries"]) if "queries" in result.metrics else None,
                   detail=f"task {task.task}" + ("" if claimed_n == result.samples
                                                  else f"; weight {result.samples} (claimed {claimed_n} samples)"))
        return Held(scaled, task.task, task.version, staleness, row)

    def _scaled(self, result: ClientResult, spec: TaskSpec, staleness: int) -> ClientResult:
        """The result with its update scaled by the staleness weight: a delta directly; a model as
        current + w (result - what its task sent)."""
        w = staleness_weight(self.weighting, staleness)
        if w == 1.0:
            return result
        names = self.strategy.update_names(0)
        if self.strategy.update_kind(0) == "delta":
            tensors = {k: (v * np.float32(w) if names is None or k in names else v) for k, v in result.tensors.items()}
        else:
            now = to_numpy(self.strategy.state)
            tensors = {k: (now[k] + np.float32(w) * (v - spec.tensors[k])).astype(np.float32)
                       if k in spec.tensors and k in now and (names is None or k in names) else v
                       for k, v in result.tensors.items()}
        return ClientResult(result.agent, tensors, result.samples, result.metrics)

    def _energy(self, report: EnergyReport) -> None:
        """An energy report names the task (its `round`): on the held row, else on the row already written."""
        if report.run != self.cfg.run:
            return
        energy = {"energy_compute_j": report.compute_j, "energy_radio_j": report.radio_j,
                  "energy_idle_j": report.idle_j, "energy_meter": report.meter}
        for held in self.buffer:
            if held.result.agent == report.agent and held.task == report.round:
                held.row.update(energy)
                return
        rows = self.ledger.query("SELECT round FROM agent_rounds WHERE run = ? AND agent = ? AND (detail = ? OR detail "
                                 "LIKE ?) ORDER BY id DESC LIMIT 1",
                                 (self.cfg.run, report.agent, f"task {report.round}", f"task {report.round};%"))
        if rows:
            self.ledger.add_energy(self.cfg.run, int(rows[0]["round"]), 0, report.agent, compute_j=report.compute_j,
                                   radio_j=report.radio_j, idle_j=report.idle_j, meter=report.meter)

    # -------------------------------------------------------------- a new version
    def _open_books(self) -> PhaseBooks:
        return PhaseBooks(self.ledger, run=self.cfg.run, r=self.version + 1, phase=0, reject_rows=self.cfg.reject_rows)

    def _publish(self, t0: float, up0: int, down0: int, timings: dict[str, float]) -> RoundSummary:
        ta = time.perf_counter()
        held = sorted(self.buffer, key=lambda h: (h.result.agent, h.task))  # arrival order must not change the sums
        self.buffer = []
        r = self.version + 1
        self.strategy.aggregate(r, 0, [h.result for h in held])
        self.version = self.round = r
        if self._sync is not None:
            self._sync.advance(to_numpy(self.strategy.global_state()))
        with self.ledger.batch():
            for h in held:
                self.ledger.record(self.cfg.run, r, h.result.agent, "ok", phase=0, **h.row)
            self._books.summarise(self.receive.take_dropped(), self.receive.take_refused())
        self._books = self._open_books()
        self.staleness_seen = [h.staleness for h in held]
        self._prune()
        t1 = time.perf_counter()
        timings["aggregate"] += t1 - ta
        accuracy, loss, accuracy_min, nodes = self._score()
        t2 = time.perf_counter()
        slowest = max([0.0] + [float(h.result.metrics.get("_learn_s", 0.0)) for h in held])
        rejected = len(self.ledger.query("SELECT 1 FROM agent_rounds WHERE run = ? AND round = ? AND status LIKE "
                                         "'rejected:%'", (self.cfg.run, r)))
        row = {"accuracy": accuracy, "loss": loss, "wall_s": t2 - t0, "selected": len(held), "ok": len(held),
               "rejected": rejected, "bytes_up": self.bytes_up_total - up0,
               "bytes_down": self.bytes_down_total - down0, "accuracy_min": accuracy_min, "nodes": nodes}
        self.store.save_checkpoint(self.cfg.run, r, self.strategy, rng=self._rng.bit_generator.state,
                                   bytes_up=self.bytes_up_total, bytes_down=self.bytes_down_total, summary=row,
                                   downlink=None if self._sync is None else self._sync.saved())
        self._save_state()
        wall = time.perf_counter() - t0
        self.last_round_at = time.time()
        timings.update(evaluate=t2 - t1, checkpoint=t0 + wall - t2)
        self.ledger.record_round(self.cfg.run, r, **{**row, "wall_s": wall})
        summary = RoundSummary(r, accuracy, loss, wall, len(held), len(held), rejected, 0,
                               self.bytes_up_total - up0, self.bytes_down_total - down0, slowest, timings,
                               self.note(), accuracy_min, nodes)
        self._version_started = time.perf_counter()
        if self.on_round is not None:
            self.on_round(summary)
        return summary

    def note(self) -> str:
        """Versions per minute and the staleness of the last version's results, for the progress line."""
        elapsed = time.perf_counter() - (self._run_started or time.perf_counter())
        s = self.staleness_seen
        rate = f"{60.0 * self.version / elapsed:.1f} versions/min" if elapsed > 0 else ""
        stale = f"staleness mean {np.mean(s):.1f} max {max(s)}" if s else ""
        method = self.strategy.round_note()
        return "; ".join(p for p in (f"v{self.version}", rate, stale, method) if p)

    def _prune(self) -> None:
        """Forget the tasks answered, and keep only a number for those past the staleness limit and timed out (a
        task still running keeps its agent busy: a second one would start from a replica the first one moved)."""
        for key, task in list(self.issued.items()):
            if task.answered:
                del self.issued[key]
            elif self.version - task.version > self.max_staleness and task.spec is None:
                self.retired[key] = task.version
                del self.issued[key]
        if len(self.retired) > 100_000:
            for key in sorted(self.retired, key=lambda k: k[1])[: len(self.retired) - 100_000]:
                del self.retired[key]

    def finish(self, wait_s: float) -> None:
        """After the last version: take the results of tasks still out (an agent offline for a while forwards its
        result when it is back) for up to `wait_s`; each is booked (refused: the run ended), so no finished result
        that reaches the coordinator goes without a row."""
        self.ended = True
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            if all(t.answered for t in self.issued.values()):
                break
            try:
                item = self.inbox.get(timeout=0.2)
            except queue.Empty:
                continue
            self.offer(item)
        with self.ledger.batch():
            self._books.summarise(self.receive.take_dropped(), self.receive.take_refused())

    def settle(self, wait_s: float = 2.0) -> None:
        """Book the energy reports that follow the last results (up to `wait_s`)."""
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            try:
                item = self.inbox.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                break
            self.offer(item)

    # -------------------------------------------------------------- resume
    def _save_state(self) -> None:
        """checkpoints/async.pt, atomically: version, task counter, tasks issued, the buffer."""
        state = {
            "version": self.version, "next_task": self.next_task,
            "issued": [[t.agent, t.task, t.version, t.sent, -1 if t.sync_version is None else t.sync_version,
                        -1 if t.announced is None else t.announced, int(t.answered)] for t in self.issued.values()],
            "retired": [[a, n, v] for (a, n), v in self.retired.items()],
            "accepted": [list(k) for k in self.accepted],
            "buffer": [{"agent": h.result.agent, "task": h.task, "version": h.version, "staleness": h.staleness,
                        "samples": h.result.samples, "metrics": dict(h.result.metrics), "row": dict(h.row),
                        "tensors": {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in h.result.tensors.items()}}
                       for h in self.buffer],
        }
        tmp = self._state_path.with_name(STATE_FILE + ".tmp")
        with open(tmp, "wb") as fh:
            torch.save(state, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self._state_path)

    def _restore(self) -> None:
        if not self._state_path.exists():
            return
        try:
            state = torch.load(self._state_path, weights_only=True, map_location="cpu")
        except Exception as exc:  # noqa: BLE001 - an unreadable file is reported as such
            raise ConfigError(f"--resume {self.run_dir}: cannot read {STATE_FILE} ({type(exc).__name__}: {exc})") \
                from None
        self.next_task = int(state["next_task"])
        for agent, n, v, sent, sv, ann, answered in state["issued"]:
            self.issued[(agent, n)] = Issued(agent, int(n), int(v), float(sent), None if sv < 0 else int(sv),
                                             None if ann < 0 else int(ann), answered=bool(answered))
        self.retired = {(a, int(n)): int(v) for a, n, v in state["retired"]}
        self.accepted = {(a, d) for a, d in state["accepted"]}
        if int(state["version"]) != self.version:
            log.warning("%s is of version %d, the checkpoint of version %d: its %d buffered results are not used",
                        STATE_FILE, int(state["version"]), self.version, len(state["buffer"]))
            return
        for b in state["buffer"]:
            result = ClientResult(b["agent"], {k: v.numpy() for k, v in b["tensors"].items()}, int(b["samples"]),
                                  dict(b["metrics"]))
            self.buffer.append(Held(result, int(b["task"]), int(b["version"]), int(b["staleness"]), dict(b["row"])))
        log.warning("resuming asynchronous run %s at version %d with %d buffered results and %d tasks in flight",
                    self.cfg.run, self.version, len(self.buffer), sum(not t.answered for t in self.issued.values()))
