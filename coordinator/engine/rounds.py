"""The round engine: select, dispatch, collect (deadline, quorum), validate, aggregate, evaluate, checkpoint.

The MQTT network thread runs the receive path (coordinator/engine/receive.py: MAC first, per-sender reassembly
caps, schema checks) and enqueues authenticated messages; the engine thread checks them against the open
round (run, round, the task's codec and layout), bounds what each may contribute (coordinator/engine/update_guard.py)
and records every outcome in the ledger (one transaction per phase). A bad message is refused with a reason (`rejected:<reason>`) and
the round goes on. Only an authenticated answer to the agent's own open task closes its slot in a phase;
unauthenticated messages are counted and summarised in one row per reason per phase.

Downlink (the model package and tasks) is signed with the coordinator's Ed25519 key (`signing_key`, a seed).

Persistence (ledger rows, checkpoints, resume) is `fedfleet.coordinator.records.store.RunStore`'s; the engine calls it.
"""

from __future__ import annotations

import json
import logging
import queue
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedfleet.coordinator.engine.downlink import DownlinkSync
from fedfleet.coordinator.engine.receive import ReceivePath
from fedfleet.coordinator.engine.update_guard import UpdateGuard
from fedfleet.coordinator.records.store import RunStore
from fedfleet.coordinator.strategies import ClientResult, Strategy, TaskSpec
from fedfleet.coordinator.strategies.base import to_numpy
from fedfleet.coordinator.tasks.base import RoundContext
from fedfleet.edge_agent.errors import ConfigError, ProtocolError
from fedfleet.edge_agent.wire import codecs, protocol, signing
from fedfleet.edge_agent.wire.link import open_link

log = logging.getLogger(__name__)


@dataclass
class EngineConfig:
    fleet: str = "demo"
    run: str = "run"
    rounds: int = 20
    per_round: int = 0  # agents per round; 0 = every online agent
    quorum: float = 0.5  # fraction of the selected agents needed to close a round at its deadline
    deadline_s: float = 30.0  # per phase, from dispatch
    grace_s: float = 30.0  # after the deadline, how long to wait for a quorum before closing anyway
    max_result_bytes: int = 64 << 20
    seed: int = 0
    downlink: dict[str, Any] = field(default_factory=lambda: {"name": "none"})
    norm_bound: float = 10.0  # refuse updates above this multiple of the running median norm (0: off)
    weight_cap: float = 4.0  # cap a result's sample weight at this multiple of the median announced count
    per_sender_pending: int = 4  # partial (chunked) results in flight per agent
    reject_rows: int = 16  # ledger rows of refusals per agent per phase; the rest are summed in one row


@dataclass
class PhaseOutcome:
    selected: list[str]
    results: list[ClientResult]
    rejected: int
    late: list[str]
    wall_s: float


@dataclass
class RoundSummary:
    round: int
    accuracy: float
    loss: float
    wall_s: float
    selected: int  # tasks dispatched in the round (agents x phases)
    ok: int
    rejected: int
    late: int
    bytes_up: int
    bytes_down: int
    slowest_learn_s: float
    timings: dict[str, float] = field(default_factory=dict)  # dispatch, collect, aggregate, evaluate, checkpoint
    note: str = ""  # the method's own word on its state (Strategy.round_note), shown in progress lines
    accuracy_min: float | None = None  # per-node methods (MoNNA): the worst node's; accuracy is their mean
    nodes: int = 0  # models scored for the round's accuracy (0: the one global model)


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
        self.package = package
        self.package_digest = protocol.digest(package)
        self.evaluate = evaluate
        self.on_round = on_round
        self.run_dir = Path(run_dir)
        self.store = RunStore(self.run_dir)
        self.ledger = self.store.ledger
        self.keys = {a: protocol.derive_key(secret, a) for a in roster}
        if not isinstance(signing_key, bytes) or len(signing_key) != signing.SEED_BYTES:
            raise ConfigError(f"signing_key must be the coordinator's {signing.SEED_BYTES}-byte Ed25519 seed")
        self.signing_key = signing_key
        self.public_key = signing.public_key(signing_key)
        self.online: dict[str, dict[str, Any]] = {}
        self._online_lock = threading.Lock()
        self._inbox: queue.Queue[tuple[str, str, dict[str, Any] | None, bytes, int]] = queue.Queue()
        self.receive = ReceivePath(
            fleet=config.fleet, keys=self.keys, inbox=self._inbox, on_status=self._on_status,
            max_result_bytes=config.max_result_bytes, per_sender_pending=config.per_sender_pending,
            reassembly_timeout_s=config.deadline_s + config.grace_s + 60.0)
        self.guard = UpdateGuard(norm_bound=config.norm_bound, weight_cap=config.weight_cap)
        self._announced: dict[str, int] = {}  # samples each tasked agent announced when it was selected
        self._weight_limit: int | None = None  # the phase's cap on a result's weight (UpdateGuard.weight_limit)
        self._phase_memo: dict[tuple[int, Any], tuple[Any, Any]] = {}
        self._pending_ok: dict[str, tuple[ClientResult, dict[str, Any]]] = {}  # validated, not yet booked
        self._reject_count: dict[str, int] = {}
        self._rng = np.random.default_rng(config.seed)
        self.round = 0
        self.phase = 0
        self._open: dict[str, TaskSpec] = {}  # agent -> task of the open phase
        self._closed: dict[tuple[int, int], set[str]] = {}  # (round, phase) -> agents that were late
        self._received: set[str] = set()
        self._refused: set[str] = set()
        self._down: dict[str, int] = {}
        self._late_bytes: dict[str, int] = {}
        self._timings: dict[str, float] = {}
        self.bytes_down_total = 0
        self._energy_due: set[tuple[str, int, int]] = set()  # (agent, round, phase) whose energy report is due
        self.first_dispatch_at = 0.0  # unix times of the first task and of the end of the last round
        self.last_round_at = 0.0
        # a FedZip downlink: tasks carry the change since each agent's replica (fedfleet.coordinator.engine.downlink)
        # strategies whose tasks all carry the global state get it as one broadcast per round (and, with a
        # FedZip downlink, as the coded change since each agent's replica): fedfleet.coordinator.engine.downlink
        self._sync = DownlinkSync(config.downlink) if strategy.tasks_carry_state else None
        self._broadcast_sync: dict[str, Any] = {}
        fleet = config.fleet
        self.link = open_link(
            broker_url,
            client_id=f"fedfleet-coordinator-{fleet}-{secrets.token_hex(8)}",  # unguessable: no take-over by id
            on_message=self.receive.on_message,
            subscriptions=[f"{protocol.ROOT}/{fleet}/agents/+/{k}" for k in ("status", "result", "telemetry")],
            clean_session=True,
            username=username,
            password=password,
            ca_certs=ca_certs,
            on_connect=self._on_connect,
        )
        self._connects = 0
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

    @property
    def bytes_up_total(self) -> int:
        """MQTT bytes of every message on a result topic (authenticated or not)."""
        return self.receive.bytes_up

    # -------------------------------------------------------------- lifecycle
    def start(self) -> None:
        self.link.start()

    def _on_connect(self) -> None:
        """(Re)publish the model package on every connection: a restarted broker has lost its retained copy."""
        self._connects += 1
        if self._connects > 1:
            log.warning("reconnected to the broker; publishing the model package again")
        self.publish_package()

    def stop(self) -> None:
        self.link.stop()
        self.store.close()

    def publish_package(self, package: bytes | None = None) -> int:
        """Publish the model package (a new one if given) as retained, chunked broadcast messages; returns
        the MQTT bytes. Agents load it and announce its digest in their status."""
        if package is not None:
            self.package, self.package_digest = package, protocol.digest(package)
        header = {"kind": "model", "fleet": self.cfg.fleet, "agent": "coordinator", "msg": self.package_digest[:16]}
        chunks = protocol.split_signed(header, self.package, self.signing_key)
        sent = 0
        for i, chunk in enumerate(chunks):
            sent += self.link.publish(protocol.broadcast_topic(self.cfg.fleet, f"model/{i}"), chunk, retain=True)
        for i in range(len(chunks), len(chunks) + 8):  # clear leftovers of a longer, older package
            self.link.publish(protocol.broadcast_topic(self.cfg.fleet, f"model/{i}"), b"", retain=True)
        self.bytes_down_total += sent
        return sent

    def ready_agents(self) -> list[str]:
        """Agents online that have loaded the current model package."""
        with self._online_lock:
            return sorted(a for a, s in self.online.items()
                          if s.get("state") == "online" and s.get("model") == self.package_digest)

    def wait_for_agents(self, n: int, timeout_s: float, *, republish_s: float = 15.0,
                        settle_s: float = 2.0) -> list[str]:
        """Wait until n agents are online with the current model package.

        An agent online without the package, that has reported no error about it (a chunk was refused as
        damaged), gets the package again, live, without relying on the retained copy: a clustered broker
        (RabbitMQ) keeps retained messages on the node that received them, so agents on other nodes never
        see it. The package goes out again once agents that came online since the last publication have
        stopped arriving for `settle_s` and still lack it (one publication per wave of joins, so round 1
        starts within seconds of the agents being online), and at most once per `republish_s` for agents
        that still lack it after that (a lost delivery). Agents that already hold it ignore the copy.
        """
        start = time.monotonic()
        deadline, last_publish = start + timeout_s, start
        covered: set[str] = set()  # agents online at the last publication that went out while waiting
        newcomers: set[str] = set()
        changed = start
        while time.monotonic() < deadline:
            ready = self.ready_agents()
            if len(ready) >= n:
                return ready
            with self._online_lock:
                missing = {a for a, s in self.online.items()  # an agent that refused it says why
                           if s.get("state") == "online" and s.get("model") != self.package_digest
                           and not s.get("error")}
            now = time.monotonic()
            if missing - covered != newcomers:
                newcomers, changed = missing - covered, now
            wave_over = bool(newcomers) and now - changed >= settle_s
            if missing and (wave_over or now - last_publish >= republish_s):
                log.warning("%d agents online without the model package (%s); publishing it again",
                            len(missing), ", ".join(sorted(missing)[:5]))
                self.publish_package()
                with self._online_lock:
                    covered = {a for a, s in self.online.items() if s.get("state") == "online"}
                newcomers, last_publish = set(), time.monotonic()
            time.sleep(0.05)
        ready = self.ready_agents()
        with self._online_lock:
            errors = {a: s.get("error") for a, s in self.online.items() if s.get("error")}
            seen = {a: f"{s.get('state')}, model {'current' if s.get('model') == self.package_digest else s.get('model')}"
                    for a, s in self.online.items() if a not in ready}
        unseen = sorted(set(self.keys) - set(ready) - set(seen))
        raise TimeoutError(
            f"only {len(ready)} of {n} agents are online with the model after {timeout_s:.0f} s"
            + (f"; agent errors: {errors}" if errors else "")
            + (f"; not ready: {dict(list(seen.items())[:10])}" if seen else "")
            + (f"; never seen: {unseen[:10]}" if unseen else "")
        )

    def settle(self, wait_s: float = 2.0) -> None:
        """After the last round: book the energy reports agents send right after uploading. Waits until every
        agent whose result announced one has reported, or `wait_s` at most."""
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline and self._energy_due:
            try:
                item = self._inbox.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                break
            self._handle(item, self.round, self.phase, {}, {}, closing=True)
        self._drain(self.round, self.phase, {}, {})
        self._summarise_refusals(self.round, self.phase)

    # -------------------------------------------------------------- network thread
    def _on_status(self, agent: str, status: dict[str, Any]) -> None:
        """A fresh, authenticated, schema-checked status (from the receive path)."""
        with self._online_lock:
            self.online[agent] = status

    # -------------------------------------------------------------- rounds
    def select(self) -> list[str]:
        ready = self.ready_agents()
        k = self.cfg.per_round
        if k and k < len(ready):
            return sorted(self._rng.choice(ready, size=k, replace=False).tolist())
        return ready

    def run(self, rounds: int | None = None) -> list[RoundSummary]:
        """Rounds `first_round` .. `rounds` (1 .. rounds for a fresh run; a resumed one continues)."""
        out = []
        for r in range(self.first_round, (rounds or self.cfg.rounds) + 1):
            out.append(self.run_round(r))
        return out

    def run_round(self, r: int) -> RoundSummary:
        t0 = time.perf_counter()
        self.round = r
        selected = self.select()
        up0, down0 = self.bytes_up_total, self.bytes_down_total
        ok = rejected = late = tasked = 0
        slowest = 0.0
        self._timings = timings = {"dispatch": 0.0, "collect": 0.0, "aggregate": 0.0}
        for phase in range(self.strategy.phases):
            with self.ledger.batch():  # the phase's rows (one per agent, and refusals) in one commit
                outcome = self._run_phase(r, phase, selected if phase == 0 else None)
            ok += len(outcome.results)
            tasked += len(outcome.selected)
            rejected += outcome.rejected
            late += len(outcome.late)
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
                               self.strategy.round_note(), accuracy_min, nodes)
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

    def _run_phase(self, r: int, phase: int, selected: list[str] | None) -> PhaseOutcome:
        t0 = time.perf_counter()
        self.phase = phase
        agents = selected if selected is not None else self.ready_agents()
        tasks = self.strategy.configure(r, phase, agents)
        state_bytes = 0
        if self._sync is not None and phase == 0:
            self._sync.advance(to_numpy(self.strategy.global_state()))
            state_bytes = self._publish_state(r)
        self._open = dict(tasks)
        self._phase_memo: dict[tuple[int, Any], tuple[Any, Any]] = {}  # `_per_phase`: holds the values it keys
        self._received = set()
        self._refused: set[str] = set()  # selected agents whose own result was refused (their row says why)
        self._pending_ok = {}
        self._reject_count = {}
        with self._online_lock:
            announced = {a: self.online.get(a, {}).get("samples") for a in tasks}
        self._announced = {a: v for a, v in announced.items() if type(v) is int and v > 0}
        self._weight_limit = self.guard.weight_limit(self._announced.values())  # once per phase
        deadline = time.time() + self.cfg.deadline_s
        down: dict[str, int] = {}
        self._down = down
        self.first_dispatch_at = self.first_dispatch_at or time.time()
        for agent, spec in tasks.items():
            down[agent] = self._dispatch(agent, r, phase, spec, state_bytes)
        t_sent = time.perf_counter()
        self._timings["dispatch"] += t_sent - t0
        up: dict[str, int] = {a: 0 for a in tasks}
        results: list[ClientResult] = []
        rejected = 0
        need = max(1, int(np.ceil(self.cfg.quorum * len(tasks)))) if tasks else 0
        hard_stop = deadline + self.cfg.grace_s
        while len(self._received | self._refused) < len(tasks):  # every agent answered, well or not
            now = time.time()
            if now >= hard_stop or (now >= deadline and len(results) >= need):
                break
            wait = (deadline if now < deadline else hard_stop) - now
            try:
                item = self._inbox.get(timeout=max(0.001, min(wait, 0.5)))
            except queue.Empty:
                continue
            outcome = self._handle(item, r, phase, up, down)
            if isinstance(outcome, ClientResult):
                results.append(outcome)
            elif outcome == "rejected":
                rejected += 1
        drained = self._drain(r, phase, up, down)
        results += [res for res in drained if isinstance(res, ClientResult)]
        rejected += sum(1 for res in drained if res == "rejected")
        results, bounded = self._bound(r, phase, results, tasks)
        rejected += bounded
        self._book_pending(r, phase, up, down)
        late = [a for a in tasks if a not in self._received and a not in self._refused]
        for agent in late:
            if self._sync is not None:
                self._sync.forget(agent)  # its replica is unknown now: a full state next time
            self.ledger.record(self.cfg.run, r, agent, "late", phase=phase, bytes_up=up.get(agent, 0),
                               bytes_down=down.get(agent, 0), detail="no valid result by the deadline")
        self._summarise_refusals(r, phase)
        self._closed[(r, phase)] = set(late)
        self._open = {}
        t_collected = time.perf_counter()
        results.sort(key=lambda res: res.agent)  # arrival order must not change the floating-point sums
        self.strategy.aggregate(r, phase, results)
        self._timings["collect"] += t_collected - t_sent
        self._timings["aggregate"] += time.perf_counter() - t_collected
        return PhaseOutcome(list(tasks), results, rejected, late, time.perf_counter() - t0)

    def _bound(self, r: int, phase: int, results: list[ClientResult],
               tasks: dict[str, TaskSpec]) -> tuple[list[ClientResult], int]:
        """The shared update-norm bound (coordinator/engine/update_guard.py); refused results get their row now."""
        kind = self.strategy.update_kind(phase)
        if kind == "none" or not results:
            return results, 0
        names = self.strategy.update_names(phase)
        # a "model" result's update is its difference from what the agent started from: the tensors its task
        # sent, else (a task that named tensors the agent already held) the global state it holds
        held = to_numpy(self.strategy.state) if kind == "model" else {}
        norms = [self.guard.update_norm({k: v for k, v in res.tensors.items() if names is None or k in names},
                                        {**held, **tasks[res.agent].tensors} if kind == "model" else None)
                 for res in results]
        screened = self.guard.screen(phase, results, norms)
        for res, norm, bound in screened.refused:
            _, row = self._pending_ok.pop(res.agent)
            self.ledger.record(self.cfg.run, r, res.agent, "rejected:norm_bound", phase=phase,
                               bytes_up=row["bytes_up"], bytes_down=row["bytes_down"],
                               detail=f"update norm {norm:.4g} exceeds the bound {bound:.4g} "
                                      f"({self.guard.norm_bound:g} x the running median)")
        return screened.kept, len(screened.refused)

    def _book_pending(self, r: int, phase: int, up: dict[str, int], down: dict[str, int]) -> None:
        for agent, (_, row) in sorted(self._pending_ok.items()):
            row["bytes_up"] = max(row["bytes_up"], up.get(agent, 0))
            self.ledger.record(self.cfg.run, r, agent, "ok", phase=phase, **row)
        self._pending_ok = {}

    def _summarise_refusals(self, r: int, phase: int) -> None:
        """One row per reason for unauthenticated messages, and one per agent for refusals past its row cap."""
        for reason, (count, nbytes, ids) in sorted(self.receive.take_dropped().items()):
            self.ledger.record(self.cfg.run, r, "(unauthenticated)", f"rejected:{reason}", phase=phase,
                               bytes_up=nbytes, detail=f"{count} unauthenticated messages dropped; "
                                                       f"claimed ids: {', '.join(ids)}"[:500])
        for (agent, reason), (count, kinds) in sorted(self.receive.take_refused().items()):
            self.ledger.record(self.cfg.run, r, agent, f"rejected:{reason}", phase=phase,
                               detail=f"{count} {' and '.join(kinds)} messages refused")
        for agent, count in sorted(self._reject_count.items()):
            if count > self.cfg.reject_rows:
                self.ledger.record(self.cfg.run, r, agent, "rejected:rate_limited", phase=phase,
                                   detail=f"{count - self.cfg.reject_rows} more refusals in this phase not itemised")
        self._reject_count = {}

    def _publish_state(self, r: int) -> int:
        """The round's sync, once on the broadcast topic, signed; returns its MQTT bytes (what each agent it
        serves receives; the coordinator sends it once)."""
        assert self._sync is not None
        meta, payload = self._sync.round_sync()
        self._broadcast_sync = meta
        header = {"kind": "state", "fleet": self.cfg.fleet, "agent": "coordinator", "run": self.cfg.run, "round": r,
                  "codec": self._sync.spec, "layout": [[n, list(s)] for n, s in self._sync.layout],
                  "meta": {"sync": meta}}
        sent = 0
        for chunk in protocol.split_signed(header, payload, self.signing_key):
            sent += self.link.publish(protocol.broadcast_topic(self.cfg.fleet, "state"), chunk)
        self.bytes_down_total += sent
        return sent

    def _dispatch(self, agent: str, r: int, phase: int, spec: TaskSpec, state_bytes: int = 0) -> int:
        """Publish one agent's task; returns the bytes it receives (its task, plus the round's state broadcast
        when the task refers to it)."""
        layout = [(n, tuple(np.shape(t))) for n, t in spec.tensors.items()]
        sync, codec, received = None, self.cfg.downlink, 0
        if self._sync is not None and phase == 0:
            codec = self._sync.spec
            if self._sync.serves(agent, self._broadcast_sync):
                sync = {"mode": "broadcast", "version": self._sync.version, "digest": self._sync.digest}
                payload, received = b"", state_bytes
            else:
                sync, payload = self._sync.sync_for(agent)
        else:
            if codec.get("name") not in ("none", "zstd"):
                codec = {"name": "zstd"}  # tasks that are not a state sync go losslessly
            payload = codecs.encode(spec.tensors, layout, codec)
        header = {
            "kind": "task", "fleet": self.cfg.fleet, "agent": agent, "run": self.cfg.run, "round": r,
            "phase": phase, "method": self.strategy.name, "codec": codec,
            "layout": [[n, list(s)] for n, s in layout], "sent": time.time(), "ttl": self.cfg.deadline_s,
            "model": self.package_digest,
            "meta": {"config": spec.config, "expect": [[n, list(s)] for n, s in spec.expect],
                     "uplink": spec.uplink_codec, **({"sync": sync} if sync is not None else {})},
        }
        topic = protocol.agent_topic(self.cfg.fleet, agent, "task")
        sent = 0
        for chunk in protocol.split_signed(header, payload, self.signing_key):
            sent += self.link.publish(topic, chunk)
        self.bytes_down_total += sent
        return sent + received

    def _drain(self, r: int, phase: int, up: dict[str, int], down: dict[str, int]) -> list[ClientResult | str | None]:
        """Handle what is queued when the phase closes; valid results among it still count (and are bounded)."""
        outcomes = []
        while True:
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                return outcomes
            outcomes.append(self._handle(item, r, phase, up, down, closing=True))

    def _handle(self, item: tuple[str, str, dict[str, Any] | None, bytes, int], r: int, phase: int,
                up: dict[str, int], down: dict[str, int], closing: bool = False) -> ClientResult | str | None:
        kind, agent, header, body, nbytes = item
        if kind == "energy":
            assert header is not None
            self._book_energy(agent, header)
            return None
        if kind == "chunk":
            if agent in up and agent not in self._received:
                up[agent] += nbytes
            else:
                self._late_bytes[agent] = self._late_bytes.get(agent, 0) + nbytes
            return None
        if kind == "reject":
            assert header is not None
            own = header.get("run") == self.cfg.run and header.get("round") == r and header.get("phase") == phase
            self._reject(r, phase, agent, header["reason"], header.get("detail", ""), nbytes, answers=own)
            return "rejected"
        assert header is not None
        try:
            result = self._validate(agent, header, body, r, phase, closing)
        except ProtocolError as exc:
            if exc.reason == "late":  # its "late" row exists: add the bytes it cost
                self.ledger.add_bytes(self.cfg.run, int(header["round"]), int(header.get("phase", 0)), agent,
                                      self._late_bytes.pop(agent, 0))
                return None
            own = exc.reason not in ("stale_round", "future_round", "wrong_run", "not_selected")
            self._reject(r, phase, agent, exc.reason, exc.detail, 0,
                         bytes_up=up.get(agent, 0) if agent in self._open else 0, answers=own)
            return "rejected"
        self._received.add(agent)
        if header["meta"].get("energy") is True:
            self._energy_due.add((agent, r, phase))
        if self._sync is not None and phase == 0:
            self._sync.confirm(agent, self._sync.version)  # it checked the state's digest before learning
        meta = header["meta"]
        metrics = result.metrics
        claimed = meta["samples"]
        self._pending_ok[agent] = (result, dict(
            bytes_up=up.get(agent, 0), bytes_down=0 if agent in self._refused else down.get(agent, 0),
            learn_s=float(meta.get("learn_s", 0.0)), samples=result.samples,
            queries=int(metrics["queries"]) if "queries" in metrics else None, profile=str(meta.get("profile")),
            codec=str(header["codec"].get("name")),
            detail=None if claimed == result.samples else f"weight {result.samples} (claimed {claimed} samples)",
        ))
        return result

    def _book_energy(self, agent: str, event: dict[str, Any]) -> None:
        """Energy reports come right after an upload; one for a result not booked yet rides on its row."""
        if event["run"] != self.cfg.run:
            return
        self._energy_due.discard((agent, event["round"], event.get("phase", 0)))
        energy = {f"energy_{k}": float(event[k]) for k in ("compute_j", "radio_j", "idle_j")}
        pending = self._pending_ok.get(agent)
        if pending is not None and (event["round"], event.get("phase", 0)) == (self.round, self.phase):
            pending[1].update(energy)
            return
        self.ledger.add_energy(self.cfg.run, event["round"], event.get("phase", 0), agent,
                               compute_j=energy["energy_compute_j"], radio_j=energy["energy_radio_j"],
                               idle_j=energy["energy_idle_j"])

    def _reject(self, r: int, phase: int, agent: str, reason: str, detail: str, nbytes: int, bytes_up: int = 0,
                *, answers: bool = True) -> None:
        """Record a refusal of an authenticated message. It closes the agent's slot in the phase only when it
        `answers` the agent's own open task (a replayed old message must not close it)."""
        bytes_down = 0
        if answers and agent in self._open and agent not in self._refused and agent not in self._received:
            self._refused.add(agent)
            bytes_down = self._down.get(agent, 0)  # its task's bytes go on its first refusal row (no late row)
        n = self._reject_count[agent] = self._reject_count.get(agent, 0) + 1
        if n > self.cfg.reject_rows and not bytes_down:
            return  # counted; `_summarise_refusals` writes one row for the rest
        self.ledger.record(self.cfg.run, r, agent[:64], f"rejected:{reason}", phase=phase,
                           bytes_up=max(nbytes, bytes_up), bytes_down=bytes_down, detail=detail[:500])

    def _per_phase(self, value: Any, derive: Callable[[Any], Any]) -> Any:
        """`derive(value)` once per phase for a value the tasks share (a strategy gives every agent the same
        codec and layout objects), not once per result."""
        key = (id(value), derive.__code__)
        hit = self._phase_memo.get(key)
        if hit is None or hit[0] is not value:
            hit = self._phase_memo[key] = (value, derive(value))
        return hit[1]

    def _validate(self, agent: str, header: dict[str, Any], body: bytes, r: int, phase: int, closing: bool) -> ClientResult:
        """Check a complete, schema-checked result against the open task (coordinator/engine/receive.py checked
        every field's type and range)."""
        if header["run"] != self.cfg.run:
            raise ProtocolError("wrong_run", f"result for run {header['run'][:64]!r}")
        hr, hp = header["round"], header.get("phase", 0)
        if hr > r or (hr == r and hp > phase):
            raise ProtocolError("future_round", f"result for round {hr}.{hp} while {r}.{phase} is open")
        if hr < r or hp < phase:
            if agent in self._closed.get((hr, hp), set()):
                raise ProtocolError("late", "")
            raise ProtocolError("stale_round", f"result for round {hr}.{hp} while {r}.{phase} is open")
        spec = self._open.get(agent)
        if spec is None:
            raise ProtocolError("not_selected", f"{agent} has no task in round {r}.{phase}")
        if agent in self._received:
            raise ProtocolError("duplicate", f"second result from {agent} in round {r}.{phase}")
        want = self._per_phase(spec.uplink_codec, _as_json)
        if header["codec"] != want:
            raise ProtocolError("codec", f"result codec {str(header['codec'])[:120]} is not the task's {want}")
        layout = codecs.normalize_layout(header["layout"])
        if layout != self._per_phase(spec.expect, lambda e: [(n, tuple(s)) for n, s in e]):
            raise ProtocolError("shape", "result layout differs from the task's expected layout")
        tensors = codecs.decode(body, layout, want, max_bytes=self.cfg.max_result_bytes)  # the task's spec
        if not codecs.all_finite(tensors):
            raise ProtocolError("nonfinite", "result holds NaN or Inf values")
        meta = header["meta"]
        samples = self.guard.weight(meta["samples"], self._announced.get(agent), limit=self._weight_limit)
        metrics = {k: float(v) for k, v in (meta.get("metrics") or {}).items() if v is not None}
        metrics["_learn_s"] = float(meta.get("learn_s", 0.0))
        result = ClientResult(agent, tensors, samples, metrics)
        self.strategy.check(r, phase, result)  # the method's own checks (ProtocolError -> rejected:<reason>)
        return result


def _as_json(value: Any) -> Any:
    """`value` as it looks after a JSON round trip (tuples become lists), to compare with a header."""
    return json.loads(json.dumps(value))
