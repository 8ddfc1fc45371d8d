"""The round engine: select, dispatch, collect (deadline, quorum), validate, aggregate, evaluate, checkpoint.

The MQTT network thread only verifies signatures, reassembles chunks and enqueues complete messages; the
engine thread validates them against the open round and records every outcome in the ledger. A bad message
is refused with a reason (`rejected:<reason>`) and the round goes on.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from coordinator.ledger import Ledger
from coordinator.strategies import ClientResult, Strategy, TaskSpec
from edge_agent import codecs, protocol
from edge_agent.errors import CodecError, ProtocolError
from edge_agent.mqtt import MqttLink

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


class Coordinator:
    """Drives rounds of one strategy over MQTT and writes the ledger and checkpoints into `run_dir`."""

    def __init__(
        self,
        *,
        broker_url: str,
        secret: bytes,
        roster: list[str],
        strategy: Strategy,
        package: bytes,
        evaluate: Callable[[dict[str, torch.Tensor]], tuple[float, float]],
        run_dir: str | Path,
        config: EngineConfig,
        on_round: Callable[[RoundSummary], None] | None = None,
        username: str | None = None,
        password: str | None = None,
        ca_certs: str | None = None,
    ) -> None:
        self.cfg = config
        self.strategy = strategy
        self.package = package
        self.package_digest = protocol.digest(package)
        self.evaluate = evaluate
        self.on_round = on_round
        self.run_dir = Path(run_dir)
        (self.run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
        self.ledger = Ledger(self.run_dir / "ledger.sqlite")
        self.keys = {a: protocol.derive_key(secret, a) for a in roster}
        self.online: dict[str, dict[str, Any]] = {}
        self._online_lock = threading.Lock()
        self._inbox: queue.Queue[tuple[str, str, dict[str, Any] | None, bytes, int]] = queue.Queue()
        self._reassembler = protocol.Reassembler(max_total=config.max_result_bytes, max_pending=4 * len(roster) + 16)
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
        self.bytes_up_total = 0
        self.bytes_down_total = 0
        fleet = config.fleet
        self.link = MqttLink(
            broker_url,
            client_id=f"fedfleet-coordinator-{fleet}",
            on_message=self._on_message,
            subscriptions=[f"{protocol.ROOT}/{fleet}/agents/+/{k}" for k in ("status", "result", "telemetry")],
            clean_session=True,
            username=username,
            password=password,
            ca_certs=ca_certs,
            on_connect=self._on_connect,
        )
        self._connects = 0
        self.ledger.start_run(config.run, {"engine": config.__dict__, "strategy": strategy.name,
                                           "strategy_config": strategy.config, "roster": roster})

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
        self.ledger.close()

    def publish_package(self, package: bytes | None = None) -> int:
        """Publish the model package (a new one if given) as retained, chunked broadcast messages; returns
        the MQTT bytes. Agents load it and announce its digest in their status."""
        if package is not None:
            self.package, self.package_digest = package, protocol.digest(package)
        header = {"kind": "model", "fleet": self.cfg.fleet, "agent": "coordinator", "msg": self.package_digest[:16]}
        chunks = protocol.split(header, self.package, protocol.broadcast_key(self.cfg.fleet))
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

    def settle(self, wait_s: float = 1.0) -> None:
        """After the last round: wait for late reports (agents send energy right after uploading) and book them."""
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            try:
                item = self._inbox.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                break
            self._handle(item, self.round, self.phase, {}, {}, closing=True)
        self._drain(self.round, self.phase, {}, {})

    # -------------------------------------------------------------- network thread
    def _on_message(self, topic: str, payload: bytes) -> None:
        parsed = protocol.parse_agent_topic(topic)
        if parsed is None or not payload:
            return
        _, agent, kind = parsed
        nbytes = protocol.mqtt_publish_bytes(topic, len(payload))
        if kind == "result":
            self.bytes_up_total += nbytes
        try:
            if agent not in self.keys:
                raise ProtocolError("unknown_agent", f"agent {agent[:64]!r} is not on the roster")

            def key_for(h: dict[str, Any]) -> bytes | None:
                if h.get("agent") != agent:
                    raise ProtocolError("spoofed", f"header names agent {str(h.get('agent'))[:64]!r} on {agent}'s topic")
                return self.keys.get(agent)

            header, body = protocol.open_envelope(payload, key_for)
            if header.get("kind") != kind:
                raise ProtocolError("malformed", f"a {header.get('kind')!r} message on a {kind} topic")
            if kind == "status":
                self._on_status(agent, body)
                return
            if kind == "telemetry":
                self._on_telemetry(agent, body)
                return
            done = self._reassembler.add(header, body)
            self._inbox.put(("chunk", agent, header, b"", nbytes))
            if done is not None:
                self._inbox.put(("result", agent, done[0], done[1], 0))
        except ProtocolError as exc:
            if kind == "result":
                self._inbox.put(("reject", agent, {"reason": exc.reason, "detail": exc.detail}, b"", nbytes))
            else:
                log.warning("refused %s message from %s: %s", kind, agent[:64], exc)

    def _on_telemetry(self, agent: str, body: bytes) -> None:
        try:
            event = json.loads(body)
        except (UnicodeDecodeError, json.JSONDecodeError):
            return
        if isinstance(event, dict) and event.get("event") == "energy":
            self._inbox.put(("energy", agent, event, b"", 0))
        elif isinstance(event, dict):
            log.info("telemetry from %s: %s", agent, str(event)[:300])

    def _on_status(self, agent: str, body: bytes) -> None:
        try:
            status = json.loads(body)
        except (UnicodeDecodeError, json.JSONDecodeError):
            return
        if isinstance(status, dict):
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
        out = []
        for r in range(1, (rounds or self.cfg.rounds) + 1):
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
            outcome = self._run_phase(r, phase, selected if phase == 0 else None)
            ok += len(outcome.results)
            tasked += len(outcome.selected)
            rejected += outcome.rejected
            late += len(outcome.late)
            slowest = max([slowest] + [float(res.metrics.get("_learn_s", 0.0)) for res in outcome.results])
        t1 = time.perf_counter()
        accuracy, loss = self.evaluate(self.strategy.global_state())
        t2 = time.perf_counter()
        self._checkpoint(r)
        wall = time.perf_counter() - t0
        timings.update(evaluate=t2 - t1, checkpoint=t0 + wall - t2)
        summary = RoundSummary(r, accuracy, loss, wall, tasked, ok, rejected, late,
                               self.bytes_up_total - up0, self.bytes_down_total - down0, slowest, timings,
                               self.strategy.round_note())
        self.ledger.record_round(self.cfg.run, r, accuracy=accuracy, loss=loss, wall_s=wall, selected=tasked,
                                 ok=ok, rejected=rejected, bytes_up=summary.bytes_up, bytes_down=summary.bytes_down)
        if self.on_round is not None:
            self.on_round(summary)
        return summary

    def _run_phase(self, r: int, phase: int, selected: list[str] | None) -> PhaseOutcome:
        t0 = time.perf_counter()
        self.phase = phase
        agents = selected if selected is not None else self.ready_agents()
        tasks = self.strategy.configure(r, phase, agents)
        self._open = dict(tasks)
        self._received = set()
        self._refused: set[str] = set()  # selected agents whose result was refused (their row says why)
        deadline = time.time() + self.cfg.deadline_s
        down: dict[str, int] = {}
        self._down = down
        for agent, spec in tasks.items():
            down[agent] = self._dispatch(agent, r, phase, spec, deadline)
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
        self._drain(r, phase, up, down)
        late = [a for a in tasks if a not in self._received and a not in self._refused]
        for agent in late:
            self.ledger.record(self.cfg.run, r, agent, "late", phase=phase, bytes_up=up.get(agent, 0),
                               bytes_down=down.get(agent, 0), detail="no valid result by the deadline")
        self._closed[(r, phase)] = set(late)
        self._open = {}
        t_collected = time.perf_counter()
        results.sort(key=lambda res: res.agent)  # arrival order must not change the floating-point sums
        self.strategy.aggregate(r, phase, results)
        self._timings["collect"] += t_collected - t_sent
        self._timings["aggregate"] += time.perf_counter() - t_collected
        return PhaseOutcome(list(tasks), results, rejected, late, time.perf_counter() - t0)

    def _dispatch(self, agent: str, r: int, phase: int, spec: TaskSpec, deadline: float) -> int:
        layout = [(n, tuple(np.shape(t))) for n, t in spec.tensors.items()]
        payload = codecs.encode(spec.tensors, layout, self.cfg.downlink)
        header = {
            "kind": "task", "fleet": self.cfg.fleet, "agent": agent, "run": self.cfg.run, "round": r,
            "phase": phase, "method": self.strategy.name, "codec": self.cfg.downlink,
            "layout": [[n, list(s)] for n, s in layout], "deadline": deadline, "model": self.package_digest,
            "meta": {"config": spec.config, "expect": [[n, list(s)] for n, s in spec.expect],
                     "uplink": spec.uplink_codec},
        }
        topic = protocol.agent_topic(self.cfg.fleet, agent, "task")
        sent = 0
        for chunk in protocol.split(header, payload, self.keys[agent]):
            sent += self.link.publish(topic, chunk)
        self.bytes_down_total += sent
        return sent

    def _drain(self, r: int, phase: int, up: dict[str, int], down: dict[str, int]) -> None:
        while True:
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                return
            self._handle(item, r, phase, up, down, closing=True)

    def _handle(self, item: tuple[str, str, dict[str, Any] | None, bytes, int], r: int, phase: int,
                up: dict[str, int], down: dict[str, int], closing: bool = False) -> ClientResult | str | None:
        kind, agent, header, body, nbytes = item
        if kind == "energy":
            assert header is not None
            values = [header.get(k) for k in ("round", "phase", "compute_j", "radio_j", "idle_j")]
            if header.get("run") == self.cfg.run and all(isinstance(v, (int, float)) for v in values):
                self.ledger.add_energy(self.cfg.run, int(values[0]), int(values[1]), agent, compute_j=float(values[2]),
                                       radio_j=float(values[3]), idle_j=float(values[4]))
            return None
        if kind == "chunk":
            if agent in up and agent not in self._received:
                up[agent] += nbytes
            else:
                self._late_bytes[agent] = self._late_bytes.get(agent, 0) + nbytes
            return None
        if kind == "reject":
            assert header is not None
            self._reject(r, phase, agent, header["reason"], header.get("detail", ""), nbytes)
            return "rejected"
        assert header is not None
        try:
            result = self._validate(agent, header, body, r, phase, closing)
        except ProtocolError as exc:
            if exc.reason == "late":  # its "late" row exists: add the bytes it cost
                self.ledger.add_bytes(self.cfg.run, int(header["round"]), int(header.get("phase", 0)), agent,
                                      self._late_bytes.pop(agent, 0))
                return None
            self._reject(r, phase, agent, exc.reason, exc.detail, 0, bytes_up=up.get(agent, 0) if agent in self._open else 0)
            return "rejected"
        self._received.add(agent)
        meta = header.get("meta", {})
        metrics = meta.get("metrics") or {}
        queries = metrics.get("queries")
        self.ledger.record(
            self.cfg.run, r, agent, "ok", phase=phase, bytes_up=up.get(agent, 0),
            bytes_down=0 if agent in self._refused else down.get(agent, 0),
            learn_s=float(meta.get("learn_s", 0.0)), samples=result.samples,
            queries=int(queries) if isinstance(queries, (int, float)) else None, profile=str(meta.get("profile")),
            codec=str(header.get("codec", {}).get("name")),
        )
        return result

    def _reject(self, r: int, phase: int, agent: str, reason: str, detail: str, nbytes: int, bytes_up: int = 0) -> None:
        bytes_down = 0
        if agent in self._open and agent not in self._refused and agent not in self._received:
            self._refused.add(agent)
            bytes_down = self._down.get(agent, 0)  # its task's bytes go on its first refusal row (no late row)
        self.ledger.record(self.cfg.run, r, agent[:64], f"rejected:{reason}", phase=phase,
                           bytes_up=max(nbytes, bytes_up), bytes_down=bytes_down, detail=detail[:500])

    def _validate(self, agent: str, header: dict[str, Any], body: bytes, r: int, phase: int, closing: bool) -> ClientResult:
        if header.get("run") != self.cfg.run:
            raise ProtocolError("wrong_run", f"result for run {str(header.get('run'))[:64]!r}")
        hr, hp = header.get("round"), header.get("phase", 0)
        if not isinstance(hr, int) or not isinstance(hp, int):
            raise ProtocolError("malformed", "round and phase must be integers")
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
        codec = header.get("codec")
        if not isinstance(codec, dict) or codec.get("name") != spec.uplink_codec.get("name"):
            raise ProtocolError("codec", f"result codec {str(codec)[:80]} differs from the task's {spec.uplink_codec}")
        layout = codecs.normalize_layout(header.get("layout"))
        if layout != [(n, tuple(s)) for n, s in spec.expect]:
            raise ProtocolError("shape", "result layout differs from the task's expected layout")
        try:
            tensors = codecs.decode(body, layout, codec, max_bytes=self.cfg.max_result_bytes)
        except CodecError:
            raise
        if not codecs.all_finite(tensors):
            raise ProtocolError("nonfinite", "result holds NaN or Inf values")
        meta = header.get("meta")
        samples = meta.get("samples") if isinstance(meta, dict) else None
        if not isinstance(samples, int) or not 0 < samples < 1 << 31:
            raise ProtocolError("malformed", "meta.samples must be a positive integer")
        metrics = {k: float(v) for k, v in (meta.get("metrics") or {}).items() if isinstance(v, (int, float))}
        metrics["_learn_s"] = float(meta.get("learn_s", 0.0)) if isinstance(meta.get("learn_s"), (int, float)) else 0.0
        return ClientResult(agent, tensors, samples, metrics)

    def _checkpoint(self, r: int) -> None:
        """Atomic: write a temp file, fsync, rename. A crash never leaves a torn checkpoint."""
        state = {"round": r, "run": self.cfg.run, "strategy": self.strategy.name,
                 "state": self.strategy.global_state(), "extra": self.strategy.extra_state()}
        for name in (f"round-{r:04d}.pt", "latest.pt"):
            path = self.run_dir / "checkpoints" / name
            tmp = path.with_suffix(".pt.tmp")
            with open(tmp, "wb") as fh:
                torch.save(state, fh)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)

