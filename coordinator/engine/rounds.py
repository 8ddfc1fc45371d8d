"""The round engine: select, dispatch, collect (deadline, quorum), validate, aggregate, evaluate, checkpoint.

`Coordinator` (also `Engine`) composes the parts, each with one job:
- `receive.ReceivePath` (the MQTT network thread): MAC first, per-sender reassembly caps, schema checks; it
  queues typed items (`inbox.py`) for authenticated messages only;
- `presence.Presence`: who is online, with which model package;
- `dispatch.Dispatcher`: the signed downlink (model package, the round's state, tasks) and its bytes;
- `phase.Phase`, one per (round, phase): handles the inbox items while the phase is open, checks results with a
  `validate.Validator` (run, round, the task's codec and layout, weight, the strategy's checks, the norm bound)
  and books every outcome with `books.PhaseBooks` (one ledger transaction per phase).

A bad message is refused with a reason (`rejected:<reason>`, a `Refusal`) and the round goes on. Only an
authenticated answer to the agent's own open task closes its slot in a phase; unauthenticated messages are counted
and summarised in one row per reason per phase.

Downlink is signed with the coordinator's Ed25519 key (`signing_key`, a seed). Persistence (ledger rows,
checkpoints, resume) is `fedfleet.coordinator.records.store.RunStore`'s; the engine calls it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import queue
import secrets
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedfleet.coordinator.engine.books import PhaseBooks
from fedfleet.coordinator.engine.config import EngineConfig, RoundSummary
from fedfleet.coordinator.engine.dispatch import Dispatcher
from fedfleet.coordinator.engine.downlink import DownlinkSync
from fedfleet.coordinator.engine.inbox import InboxItem, TrafficReport
from fedfleet.coordinator.engine.phase import Carry, Phase, PhaseOutcome
from fedfleet.coordinator.engine.presence import Presence
from fedfleet.coordinator.engine.receive import ReceivePath
from fedfleet.coordinator.engine.update_guard import AggregateCheck, UpdateGuard
from fedfleet.coordinator.engine.validate import Validator
from fedfleet.coordinator.records.store import RunStore
from fedfleet.coordinator.strategies import ClientResult, Strategy, TaskSpec
from fedfleet.coordinator.strategies.base import to_numpy
from fedfleet.coordinator.tasks.base import RoundContext
from fedfleet.edge_agent.errors import ConfigError, Refusal
from fedfleet.edge_agent.wire import protocol, signing
from fedfleet.edge_agent.wire.link import Link, open_link

__all__ = ["Coordinator", "Engine", "EngineConfig", "PhaseOutcome", "RoundSummary"]

log = logging.getLogger(__name__)
AGGREGATE_ROW = "(aggregate)"  # the ledger's agent column for a refused aggregate (no agent's row)


class Coordinator:
    """Drives rounds of one strategy over MQTT and writes the ledger and checkpoints into `run_dir`.

    `resume=True` continues the run `config.run` from its newest checkpoint in `run_dir` (`RunStore.resume_run`):
    `run()` then starts at the interrupted round.
    """

    def __init__(
        self,
        *,
        broker_url: str,
        secret: bytes,
        roster: list[str],
        strategy: Strategy,
        package: bytes,
        evaluate: Callable[[RoundContext, dict[str, torch.Tensor]], tuple[float, float]],
        run_dir: str | Path,
        config: EngineConfig,
        signing_key: bytes,
        on_round: Callable[[RoundSummary], None] | None = None,
        username: str | None = None,
        password: str | None = None,
        ca_certs: str | None = None,
        resume: bool = False,
    ) -> None:
        self.cfg = config
        self.strategy = strategy
        self.evaluate = evaluate
        self.on_round = on_round
        self.run_dir = Path(run_dir)
        self.store = RunStore(self.run_dir)
        self.ledger = self.store.ledger
        self.keys = {a: protocol.derive_key(secret, a) for a in roster}
        if not isinstance(signing_key, bytes) or len(signing_key) != signing.SEED_BYTES:
            raise ConfigError(f"signing_key must be the coordinator's {signing.SEED_BYTES}-byte Ed25519 seed")
        self.public_key = signing.public_key(signing_key)
        self.presence = Presence(roster)
        self.inbox: queue.Queue[InboxItem] = queue.Queue()
        self.boot = secrets.token_hex(8)  # this process: agents echo it in the statuses it trusts (receive.py)
        self.receive = ReceivePath(
            fleet=config.fleet, keys=self.keys, inbox=self.inbox, on_status=self.presence.on_status, boot=self.boot,
            on_unconfirmed=self.presence.on_unconfirmed, on_restart=self._agent_restarted,
            max_result_bytes=config.max_result_bytes, per_sender_pending=config.per_sender_pending,
            reassembly_timeout_s=config.deadline_s + config.grace_s + 60.0)
        self.guard = UpdateGuard(norm_bound=config.norm_bound, weight_cap=config.weight_cap)
        self._rng = np.random.default_rng(config.seed)
        self.round = 0
        self.phase = 0
        self.first_dispatch_at = 0.0  # unix times of the first task and of the end of the last round
        self.last_round_at = 0.0
        self._timings: dict[str, float] = {}
        self._carry = Carry()
        # strategies whose tasks all carry the global state get it as one broadcast per round (and, with a FedZip
        # downlink, as the coded change since each agent's replica): fedfleet.coordinator.engine.downlink
        self._sync = DownlinkSync(config.downlink) if strategy.tasks_carry_state else None
        self._connects = 0
        self._asked_at = time.monotonic()  # the last time unconfirmed agents were asked (_ask_unconfirmed)
        self._state_topic = protocol.broadcast_topic(self.cfg.fleet, "state")
        self._echo_lock = threading.Lock()
        self._echoed: set[bytes] = set()  # SHA-256 of the state broadcast chunks received back
        self._state_out = threading.Event()
        self.link = self._open_link(broker_url, username=username, password=password, ca_certs=ca_certs)
        self.dispatcher = Dispatcher(link=self.link, fleet=config.fleet, run=config.run, method=strategy.name,
                                     signing_key=signing_key, package=package, ttl_s=config.deadline_s,
                                     downlink=config.downlink, sync=self._sync, boot=self.boot)
        self._current = self.open_phase(0, 0, {})  # takes items (`settle`) before the first round
        meta = {"engine": config.__dict__, "strategy": strategy.name, "strategy_config": strategy.config,
                "roster": roster}
        self.first_round = 1
        if resume:
            resumed = self.store.resume_run(config.run, meta, strategy)
            self.first_round = resumed.round + 1
            if resumed.rng is not None:
                self._rng.bit_generator.state = resumed.rng
            if resumed.downlink is not None and self._sync is not None:
                self._sync.restore(resumed.downlink)
            self.receive.bytes_up, self.bytes_down_total = resumed.bytes_up, resumed.bytes_down
            log.warning("resuming run %s at round %d (%d ledger rows of the interrupted round marked)",
                        config.run, self.first_round, resumed.interrupted_rows)
        else:
            self.store.start_run(config.run, meta)

    def _agent_restarted(self, agent: str) -> None:
        """An agent came back as a new process: its replica of the global state is gone (it gets a full one)."""
        if self._sync is not None:
            self._sync.forget(agent)

    def _open_link(self, broker_url: str, *, username: str | None, password: str | None,
                   ca_certs: str | None) -> Link:
        """The coordinator's one connection to the broker (the only place it is made)."""
        fleet = self.cfg.fleet
        return open_link(
            broker_url,
            client_id=f"fedfleet-coordinator-{fleet}-{secrets.token_hex(8)}",  # unguessable: no take-over by id
            on_message=self._on_message,
            subscriptions=[f"{protocol.ROOT}/{fleet}/agents/+/{k}" for k in ("status", "result", "telemetry")]
            + [protocol.broadcast_topic(fleet, "state")],
            clean_session=True,
            username=username,
            password=password,
            ca_certs=ca_certs,
            on_connect=self._on_connect,
        )

    def _on_message(self, topic: str, payload: bytes) -> None:
        if topic == self._state_topic:  # our own state broadcast, back from the broker
            digest = hashlib.sha256(payload).digest()
            with self._echo_lock:
                if digest in self.dispatcher.state_chunks:  # anything else on the topic is not ours: ignored
                    self._echoed.add(digest)
                if self.dispatcher.state_chunks <= self._echoed:
                    self._state_out.set()
            return
        self.receive.on_message(topic, payload)

    def _await_state_broadcast(self, wait_s: float = 10.0) -> None:
        """Dispatch only once the round's state broadcast is out: every chunk of it has come back to the
        coordinator's own subscription. A broker may emit a large fan-out after the per-agent messages published
        after it (aedes with Redis persistence queues a QoS 1 message for every subscriber before it emits it, and
        each client then drops the broadcast as older than the task it already got); waiting for the echo keeps
        the order on any broker. After `wait_s` without it, the tasks go out anyway (and the log says so)."""
        if not self._state_out.wait(wait_s):
            log.warning("the state broadcast did not come back from the broker within %.0f s; dispatching anyway",
                        wait_s)

    # -------------------------------------------------------------- views of the parts
    @property
    def bytes_up_total(self) -> int:
        """MQTT bytes of every message on a result topic (authenticated or not)."""
        return self.receive.bytes_up

    @property
    def bytes_down_total(self) -> int:
        """MQTT bytes of everything the coordinator published (package, states, tasks)."""
        return self.dispatcher.bytes_down

    @bytes_down_total.setter
    def bytes_down_total(self, value: int) -> None:
        self.dispatcher.bytes_down = value

    @property
    def package(self) -> bytes:
        return self.dispatcher.package

    @property
    def package_digest(self) -> str:
        return self.dispatcher.package_digest

    @property
    def online(self) -> dict[str, dict[str, Any]]:
        """Each agent's latest status."""
        return self.presence.online

    # -------------------------------------------------------------- lifecycle
    def start(self) -> None:
        self.link.start()

    def _on_connect(self) -> None:
        """(Re)publish the model package on every connection: a restarted broker has lost its retained copy."""
        self._connects += 1
        if self._connects > 1:
            log.warning("reconnected to the broker; publishing the model package again")
        self.publish_package()

    def stop(self, *, quiet_s: float = 0.3, wait_s: float = 2.0) -> None:
        """Book the agents' last traffic reports (an agent that leaves sends one), then disconnect: waits until
        no report has arrived for `quiet_s`, or `wait_s` at most."""
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            try:
                item = self.inbox.get(timeout=min(quiet_s, max(0.01, deadline - time.monotonic())))
            except queue.Empty:
                break
            if isinstance(item, TrafficReport):
                self.book_traffic(item)
        self._write_traffic()
        self.link.stop()
        self.store.close()

    def book_traffic(self, report: TrafficReport) -> None:
        """An agent's traffic report, on the round it names (the asynchronous engine books it on its version)."""
        self._current.offer(report)

    def _write_traffic(self) -> None:
        """Write the traffic reports the books still hold (those booked after the last phase's summaries)."""
        self._current.books.write_traffic()

    def publish_package(self, package: bytes | None = None) -> int:
        """Publish the model package (a new one if given) as retained, chunked broadcast messages; returns the
        MQTT bytes. Agents load it and announce its digest in their status."""
        return self.dispatcher.publish_package(package)

    def _ask_unconfirmed(self, every_s: float = 15.0) -> None:
        """Between rounds: agents shown online by a status this coordinator has not confirmed (one that joined
        where the broker kept no package copy for it, or a replayed status) get the package again, at most
        once per `every_s`; an agent that is there answers it with a fresh status."""
        if self.presence.unconfirmed() and time.monotonic() - self._asked_at >= every_s:
            self._asked_at = time.monotonic()
            self.publish_package()

    def ready_agents(self) -> list[str]:
        """Agents online that have loaded the current model package."""
        return self.presence.ready_agents(self.package_digest)

    def wait_for_agents(self, n: int, timeout_s: float, *, republish_s: float = 15.0,
                        settle_s: float = 2.0, report: Callable[[str], Any] | None = None) -> list[str]:
        """Wait until n agents are online with the current model package, publishing it again to agents online
        without it (`Presence.wait_for_agents`)."""
        return self.presence.wait_for_agents(n, timeout_s, digest=lambda: self.package_digest,
                                             publish=self.publish_package, republish_s=republish_s,
                                             settle_s=settle_s, report=report)

    def settle(self, wait_s: float = 2.0) -> None:
        """After the last round: book the energy reports agents send right after uploading. Waits until every
        agent whose result announced one has reported, or `wait_s` at most."""
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline and self._carry.energy_due:
            try:
                item = self.inbox.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                break
            self._current.offer(item)
        while True:  # and whatever else is already queued (traffic reports of agents without a meter)
            try:
                item = self.inbox.get_nowait()
            except queue.Empty:
                break
            self._current.offer(item)
        self._current.flush()

    # -------------------------------------------------------------- rounds
    def select(self) -> list[str]:
        """The round's agents: `per_round` of those ready (all without it), drawn uniformly; with over-selection,
        ceil(per_round * (1 + over_select)) of them (at most all ready), of which the first `per_round` valid results
        are aggregated (`cohort`)."""
        self._ask_unconfirmed()
        ready = self.ready_agents()
        k = self.cfg.per_round
        if k and self.cfg.over_select:
            k = int(np.ceil(k * (1 + self.cfg.over_select) - 1e-9))  # 1e-9: 10 * 1.3 is 13, not 14
        if k and k < len(ready):
            return sorted(self._rng.choice(ready, size=k, replace=False).tolist())
        return ready

    @property
    def cohort(self) -> int | None:
        """The valid results a round aggregates at most (over-selection; None: every selected agent's)."""
        return self.cfg.per_round if self.cfg.per_round and self.cfg.over_select else None

    def run(self, rounds: int | None = None) -> list[RoundSummary]:
        """Rounds `first_round` .. `rounds` (1 .. rounds for a fresh run; a resumed one continues)."""
        return [self.run_round(r) for r in range(self.first_round, (rounds or self.cfg.rounds) + 1)]

    def run_round(self, r: int) -> RoundSummary:
        t0 = time.perf_counter()
        self.round = r
        selected = self.select()
        up0, down0 = self.bytes_up_total, self.bytes_down_total
        ok = rejected = late = tasked = surplus = 0
        slowest = 0.0
        self._timings = timings = {"dispatch": 0.0, "collect": 0.0, "aggregate": 0.0}
        for phase in range(self.strategy.phases):
            with self.ledger.batch():  # the phase's rows (one per agent, and refusals) in one commit
                outcome = self._run_phase(r, phase, selected if phase == 0 else None)
            ok += len(outcome.results)
            tasked += len(outcome.selected)
            rejected += outcome.rejected
            late += len(outcome.late)
            surplus += len(outcome.surplus)
            slowest = max([slowest] + [float(res.metrics.get("_learn_s", 0.0)) for res in outcome.results])
        t1 = time.perf_counter()
        accuracy, loss, accuracy_min, nodes = self._score()
        t2 = time.perf_counter()
        row = {"accuracy": accuracy, "loss": loss, "wall_s": t2 - t0, "selected": tasked, "ok": ok,
               "rejected": rejected, "bytes_up": self.bytes_up_total - up0, "bytes_down": self.bytes_down_total - down0,
               "accuracy_min": accuracy_min, "nodes": nodes}
        # the checkpoint is the round's commit point: a crash before it reruns the round on resume
        self.store.save_checkpoint(self.cfg.run, r, self.strategy, rng=self._rng.bit_generator.state,
                                   bytes_up=self.bytes_up_total, bytes_down=self.bytes_down_total, summary=row,
                                   downlink=None if self._sync is None else self._sync.saved())
        wall = time.perf_counter() - t0
        self.last_round_at = time.time()
        timings.update(evaluate=t2 - t1, checkpoint=t0 + wall - t2)
        summary = RoundSummary(r, accuracy, loss, wall, tasked, ok, rejected, late,
                               self.bytes_up_total - up0, self.bytes_down_total - down0, slowest, timings,
                               "  ".join(n for n in (self.strategy.round_note(), self.guard.streak_note()) if n),
                               accuracy_min, nodes, surplus)
        self.ledger.record_round(self.cfg.run, r, **{**row, "wall_s": wall})
        if self.on_round is not None:
            self.on_round(summary)
        return summary

    def _score(self) -> tuple[float, float, float | None, int]:
        """(accuracy, loss, worst node's accuracy, nodes): a per-node method's mean and minimum over its nodes."""
        nodes = self.strategy.node_states()
        ctx = RoundContext(run=self.cfg.run, round=self.round, rounds=self.cfg.rounds, run_dir=self.run_dir,
                           ledger=self.ledger)
        if not nodes:
            accuracy, loss = self.evaluate(ctx, self.strategy.global_state())
            return accuracy, loss, None, 0
        scores = [self.evaluate(ctx, state) for state in nodes.values()]
        accs = [a for a, _ in scores]
        return float(np.mean(accs)), float(np.mean([lo for _, lo in scores])), float(np.min(accs)), len(scores)

    def open_phase(self, r: int, phase: int, tasks: dict[str, TaskSpec], cohort: int | None = None) -> Phase:
        """A `Phase` for round `r`, phase `phase` with `tasks` open (aggregating at most `cohort` valid results); the
        weight cap is frozen from the sample counts the tasked agents announce now."""
        validator = Validator(run=self.cfg.run, r=r, phase=phase, tasks=tasks, strategy=self.strategy,
                              guard=self.guard, max_result_bytes=self.cfg.max_result_bytes,
                              announced=self.presence.announced(tasks), late=self._carry.late)
        books = PhaseBooks(self.ledger, run=self.cfg.run, r=r, phase=phase, reject_rows=self.cfg.reject_rows,
                           profiles={a: str(s["profile"]) for a, s in dict(self.presence.online).items() if s.get("profile")})
        return Phase(run=self.cfg.run, r=r, phase=phase, tasks=tasks, validator=validator, books=books,
                     carry=self._carry, inbox=self.inbox, receive=self.receive, sync=self._sync, cohort=cohort)

    def _run_phase(self, r: int, phase: int, selected: list[str] | None) -> PhaseOutcome:
        t0 = time.perf_counter()
        self.phase = phase
        agents = selected if selected is not None else self.ready_agents()
        tasks = self.strategy.configure(r, phase, agents)
        state_bytes = 0
        if self._sync is not None and phase == 0:
            self._sync.advance(to_numpy(self.strategy.global_state()))
            with self._echo_lock:
                self._echoed.clear()
                self._state_out.clear()
            state_bytes = self.dispatcher.publish_state(r)
            self._await_state_broadcast()
        self._current = current = self.open_phase(r, phase, tasks, self.cohort if selected is not None else None)
        deadline = time.time() + self.cfg.deadline_s
        self.first_dispatch_at = self.first_dispatch_at or time.time()
        for agent, spec in tasks.items():
            current.dispatched(agent, self.dispatcher.dispatch(agent, r, phase, spec, state_bytes))
        t_sent = time.perf_counter()
        self._timings["dispatch"] += t_sent - t0
        cohort = len(tasks) if current.cohort is None else min(current.cohort, len(tasks))
        need = max(1, int(np.ceil(self.cfg.quorum * cohort))) if tasks else 0
        self._collect(current, deadline, deadline + self.cfg.grace_s, need)
        outcome = current.close()
        t_collected = time.perf_counter()
        results = sorted(outcome.results, key=lambda res: res.agent)  # arrival order must not change the sums
        if self._aggregate(r, phase, results) is not None:
            results = []  # the aggregate was refused: no result of the phase counts
        self._timings["collect"] += t_collected - t_sent
        self._timings["aggregate"] += time.perf_counter() - t_collected
        return dataclasses.replace(outcome, results=results, wall_s=time.perf_counter() - t0)

    def _aggregate(self, r: int, phase: int, results: list[ClientResult]) -> str | None:
        """`strategy.aggregate`, kept only when the global model stays finite and within bounds
        (update_guard.AggregateCheck); otherwise the state before it is put back, a `rejected:aggregate` row and a
        warning say why, and the reason is returned."""
        check = AggregateCheck(self.strategy)
        self.strategy.aggregate(r, phase, results)
        why = check.verdict()
        if why is None:
            return None
        check.restore()
        log.warning("round %d.%d: aggregate refused, previous state kept: %s", r, phase, why)
        self.ledger.record(self.cfg.run, r, AGGREGATE_ROW, Refusal.AGGREGATE.status, phase=phase,
                           detail=f"{why}; the previous state was kept ({len(results)} results: "
                                  f"{', '.join(res.agent for res in results)[:300]})")
        return why

    def _collect(self, phase: Phase, deadline: float, hard_stop: float, need: int) -> None:
        """Offer inbox items to `phase` until every tasked agent answered, or its cohort is full (over-selection), or
        the deadline passed with `need` valid results, or the grace after it passed."""
        while not phase.answered and not phase.full:
            now = time.time()
            if now >= hard_stop or (now >= deadline and len(phase.results) >= need):
                return
            wait = (deadline if now < deadline else hard_stop) - now
            try:
                item = self.inbox.get(timeout=max(0.001, min(wait, 0.5)))
            except queue.Empty:
                continue
            phase.offer(item)


Engine = Coordinator
