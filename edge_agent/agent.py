"""The agent's MQTT loop: join, fetch the model package, take a task, learn, upload, reconnect.

Network callbacks only verify, reassemble and enqueue; a worker thread loads models and runs learners,
so the MQTT keep-alive never stalls behind a long learning step.

Trust: tasks and model packages must carry the coordinator's Ed25519 signature under the public key pinned
in `AgentConfig.coordinator_key`; anything else is refused (a typed `ProtocolError`, logged and counted in
`refused`), and the current model stays until a correctly signed package arrives. An agent without a pinned
key refuses every task and package and says so in its status. A task's deadline is the agent's own receive
time plus the task's `ttl` (monotonic clock); wall clocks are compared only to refuse tasks older than
`ttl + max_skew_s`, so an agent whose clock is off by less than `max_skew_s` loses nothing.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fedfleet.edge_agent import continual
from fedfleet.edge_agent.downlink import Replica
from fedfleet.edge_agent.errors import ModelError, ProtocolError
from fedfleet.edge_agent.learners import LearnResult, LocalData, Task, create
from fedfleet.edge_agent.run_state import RunState
from fedfleet.edge_agent.state import AgentState
from fedfleet.edge_agent.wire import codecs, protocol, shared_bytes
from fedfleet.edge_agent.wire.link import open_link

log = logging.getLogger(__name__)

MAX_MODEL_BYTES = 64 << 20
# Agents of one process load packages one at a time: numpy's .npy header parser (ast.literal_eval) is not
# safe to run in several threads at once on CPython 3.11 ("AST constructor recursion depth mismatch").
_LOAD_LOCK = threading.Lock()
MAX_TASK_BYTES = 256 << 20


@dataclass
class AgentConfig:
    broker: str
    fleet: str
    agent_id: str
    key: bytes
    runtime: str = "onnxruntime"
    threads: int = 1
    profile: str | None = None
    username: str | None = None
    password: str | None = None
    ca_certs: str | None = None
    coordinator_key: bytes | None = None  # the coordinator's pinned Ed25519 public key (signed downlink)
    state_dir: str | None = None  # kept across restarts: answered tasks, the package, error feedback
    extra_status: dict[str, Any] = field(default_factory=dict)
    coordinator_key: bytes | None = None  # the pinned raw Ed25519 public key of the coordinator
    max_skew_s: float = 300.0  # tolerated difference between this device's clock and the coordinator's


class Agent:
    """One edge agent. `start()` connects and returns; `stop()` leaves (gracefully, or like a crash)."""

    def __init__(self, config: AgentConfig, data: LocalData, *, meter: Any = None,
                 model_cache: dict[str, Any] | None = None, learn_lock: Any = None) -> None:
        """`model_cache`: a dict shared by the agents of one process, so a package digest is loaded once
        there (ONNX Runtime sessions are thread-safe); each agent still keeps its own feature cache.
        `learn_lock`: a lock shared by the agents of one process, held while a learner runs, so hundreds of
        agent threads take turns instead of trading the interpreter lock every few milliseconds."""
        if not protocol.valid_id(config.agent_id) or not protocol.valid_id(config.fleet):
            raise ValueError(f"agent id {config.agent_id!r} and fleet {config.fleet!r} must be 1-64 of [A-Za-z0-9-_.]")
        self.cfg = config
        self.data = data
        self.meter = meter
        self.model: Any = None
        self.model_digest: str | None = None
        self.model_error: str | None = None
        self.model_cache = model_cache
        self.learn_lock = learn_lock
        self.state = RunState()  # learners and error feedback of the current run only
        self.replica = Replica()  # the global state as the compressed downlink rebuilt it
        self.rounds_done = 0
        self.tasks_dropped = 0
        self.refused: dict[str, int] = {}  # refused downlink messages by reason
        self._epoch, self._n = 0, 0  # freshness of status and telemetry: seq = [epoch, n]
        self._seq_lock = threading.Lock()
        self.trust_error = (None if config.coordinator_key else
                            "no coordinator key pinned (--coordinator-key-file): refusing every task and package")
        self._done: set[tuple[str, int, int]] = set()
        self._taken: dict[tuple[str, int, int], str] = {}  # task -> the dispatch (msg id) the agent took
        # what survives a restart (tasks answered, counters, the last package): fedfleet.edge_agent.state
        self.kept = AgentState(config.state_dir) if config.state_dir else None
        if self.kept is not None:
            self._done = set(self.kept.done)
            self.rounds_done, self.tasks_dropped = self.kept.rounds_done, self.kept.tasks_dropped
        self._work: queue.Queue[tuple[str, Any, Any]] = queue.Queue()
        self._waiting: list[tuple[dict[str, Any], bytes]] = []
        self._tasks = protocol.Reassembler(max_total=MAX_TASK_BYTES, max_pending=8)
        self._models = protocol.Reassembler(max_total=MAX_MODEL_BYTES, max_pending=4)
        t = protocol.agent_topic
        self._status_topic = t(config.fleet, config.agent_id, "status")
        self._result_topic = t(config.fleet, config.agent_id, "result")
        self._telemetry_topic = t(config.fleet, config.agent_id, "telemetry")
        self._task_topic = t(config.fleet, config.agent_id, "task")
        self._model_prefix = protocol.broadcast_topic(config.fleet, "model/")
        self._state_topic = protocol.broadcast_topic(config.fleet, "state")
        self._states = protocol.Reassembler(max_total=MAX_TASK_BYTES, max_pending=4)
        self._state_msgs: dict[tuple[str, int], list[tuple[dict[str, Any], bytes]]] = {}  # (run, version) -> candidates
        self.link = open_link(
            config.broker,
            client_id=config.username or f"fedfleet-{config.fleet}-{config.agent_id}",  # the ACL's user name
            on_message=self._on_message,
            subscriptions=[self._task_topic, protocol.broadcast_topic(config.fleet, "model/#"), self._state_topic],
            clean_session=False,
            will=self._will,
            on_connect=self._announce,
            username=config.username,
            password=config.password,
            ca_certs=config.ca_certs,
        )
        self._stop = threading.Event()
        self._worker = threading.Thread(target=self._work_loop, name=f"agent-{config.agent_id}", daemon=True)

    # -------------------------------------------------------------- lifecycle
    def start(self, wait_s: float = 10.0) -> None:
        kept = self.kept.package() if self.kept is not None else None
        if kept is not None:  # the package this agent last used: ready before the coordinator resends it
            self._work.put(("model", {"digest": kept[0]}, kept[1]))
        self._worker.start()
        self.link.start(wait_s=wait_s)

    def stop(self, *, graceful: bool = True) -> None:
        self._stop.set()
        self._work.put(("stop", None, None))
        if graceful and self.link.connected.is_set():
            self.link.publish(self._status_topic, self._status_payload("offline"), retain=True)
        self.link.stop(graceful=graceful)
        self._worker.join(timeout=10)

    def run_forever(self) -> None:
        self.start(wait_s=0)
        try:
            while not self._stop.wait(1.0):
                pass
        except KeyboardInterrupt:
            pass
        finally:
            self.stop()

    # -------------------------------------------------------------- status
    def _now(self) -> float:
        """This device's wall clock (unix time). Only stamps and the skew check use it; deadlines do not."""
        return time.time()

    def _seq(self, *, will: bool = False) -> list[int]:
        """The next freshness stamp [epoch, n]. A will opens a new epoch (one per connection, in ms, always
        above the last) and takes n = WILL_SEQ, above every n its connection will use."""
        with self._seq_lock:
            if will:
                self._epoch, self._n = max(self._epoch + 1, int(self._now() * 1000)), 0
                return [self._epoch, protocol.WILL_SEQ]
            self._n = min(self._n + 1, protocol.WILL_SEQ - 1)
            return [self._epoch, self._n]

    def _will(self) -> tuple[str, bytes, bool]:
        return self._status_topic, self._status_payload("offline", will=True), True

    def _status_payload(self, state: str, *, will: bool = False, **extra: Any) -> bytes:
        body = {"state": state, "runtime": self.cfg.runtime, "profile": self.cfg.profile,
                "samples": len(self.data), "model": getattr(self, "model_digest", None), **self.cfg.extra_status,
                **extra}
        header = {"kind": "status", "fleet": self.cfg.fleet, "agent": self.cfg.agent_id, "sent": self._now(),
                  "seq": self._seq(will=will)}
        return protocol.seal(header, json.dumps(body).encode(), self.cfg.key)

    def _announce(self) -> None:
        error = self.trust_error or self.model_error
        extra = {"error": error} if error else {}
        self.link.publish(self._status_topic, self._status_payload("online", **extra), retain=True)

    def _telemetry(self, event: str, **fields: Any) -> None:
        header = {"kind": "telemetry", "fleet": self.cfg.fleet, "agent": self.cfg.agent_id, "sent": self._now(),
                  "seq": self._seq()}
        body = json.dumps({"event": event, **fields}, default=str).encode()
        self.link.publish(self._telemetry_topic, protocol.seal(header, body, self.cfg.key))

    # -------------------------------------------------------------- network thread
    def _on_message(self, topic: str, payload: bytes) -> None:
        if not payload:
            return  # a cleared retained message
        if topic not in (self._task_topic, self._state_topic) and not topic.startswith(self._model_prefix):
            log.debug("agent %s ignores a message on %s (not subscribed)", self.cfg.agent_id, topic)
            return
        try:
            if self.cfg.coordinator_key is None:
                raise ProtocolError("no_coordinator_key", "no coordinator key is pinned")
            header, body = protocol.open_signed(payload, self.cfg.coordinator_key)
            if header.get("fleet") != self.cfg.fleet:
                raise ProtocolError("spoofed", "signed for another fleet")
            if topic == self._state_topic:
                if header.get("kind") != "state":
                    raise ProtocolError("spoofed", f"a {str(header.get('kind'))[:16]!r} message on the state topic")
                done = self._states.add(header, body, sender="coordinator")
                if done is not None:
                    self._work.put(("state", done[0], done[1]))
            elif topic.startswith(self._model_prefix):
                if header.get("kind") != "model":
                    raise ProtocolError("spoofed", f"a {str(header.get('kind'))[:16]!r} message on a model topic")
                done = self._models.add(header, body, sender="coordinator")
                if done is not None and done[0].get("digest") != self.model_digest:
                    self._work.put(("model", done[0], done[1]))
            else:
                if header.get("agent") != self.cfg.agent_id or header.get("kind") != "task":
                    raise ProtocolError("spoofed", "task addressed to another agent")
                done = self._tasks.add(header, body, sender="coordinator")
                if done is not None:
                    self._work.put(("task", {**done[0], "_received": time.monotonic()}, done[1]))
        except ProtocolError as exc:
            n = self.refused[exc.reason] = self.refused.get(exc.reason, 0) + 1
            if n <= 5 or n % 100 == 0:
                log.warning("agent %s refused a message on %s (%d so far for this reason): %s",
                            self.cfg.agent_id, topic, n, exc)

    # -------------------------------------------------------------- worker thread
    def _work_loop(self) -> None:
        while not self._stop.is_set():
            try:
                kind, header, body = self._work.get(timeout=0.5)
            except queue.Empty:
                self._retry_waiting()
                continue
            try:
                if kind == "model":
                    self._load_model(header, body)
                elif kind == "state":
                    self._keep_state(header, body)
                elif kind == "task":
                    self._handle_task(header, body)
            except Exception as exc:  # the agent stays up whatever a task does
                log.exception("agent %s failed on a %s message", self.cfg.agent_id, kind)
                self._safe_telemetry("error", detail=f"{type(exc).__name__}: {exc}")

    def _safe_telemetry(self, event: str, **fields: Any) -> None:
        try:
            self._telemetry(event, **fields)
        except Exception:  # noqa: BLE001
            log.exception("telemetry failed")

    def _load_model(self, header: dict[str, Any], blob: bytes) -> None:
        from fedfleet.edge_agent.model import EdgeModel

        try:
            with _LOAD_LOCK:
                model = self._shared_model(blob) if self.model_cache is not None else None
                if model is None:
                    model = EdgeModel.from_bytes(blob, runtime=self.cfg.runtime, threads=self.cfg.threads)
                    if self.model_cache is not None and self.cfg.runtime == "onnxruntime":
                        self.model_cache[model.digest] = model
                        model = dataclasses.replace(model, _cache={})
            if tuple(model.input_shape) != tuple(self.data.x.shape[1:]):
                raise ModelError(
                    f"model input shape {model.input_shape} does not fit local data {self.data.x.shape[1:]}"
                )
        except ModelError as exc:
            self.model_error = f"model_error: {exc}"
            log.error("agent %s cannot use model package %s: %s", self.cfg.agent_id, header.get("digest"), exc)
            self._announce()
            return
        self.model, self.model_digest, self.model_error = model, header["digest"], None
        if self.kept is not None and self.kept.model_digest != self.model_digest:
            self.kept.save_package(self.model_digest, blob)
        self._announce()
        self._retry_waiting()

    def _shared_model(self, blob: bytes) -> Any:
        """This process's loaded copy of `blob` with a fresh feature cache, or None if not loaded yet."""
        shared = (self.model_cache or {}).get(protocol.digest(blob))
        return None if shared is None else dataclasses.replace(shared, _cache={})

    def _keep_state(self, header: dict[str, Any], body: bytes) -> None:
        """Keep a round's state broadcast until a task names it (a few candidates per version, the newest
        versions only: a task accepts only the one that leads to the state its signed header names)."""
        from fedfleet.edge_agent.downlink import check_sync_meta

        meta = header.get("meta")
        sync = check_sync_meta(meta.get("sync") if isinstance(meta, dict) else None)
        key = (str(header.get("run")), int(sync["version"]))
        candidates = self._state_msgs.setdefault(key, [])
        if len(candidates) < 4:
            candidates.append((header, shared_bytes.shared(body)))  # one copy for the agents of this process
        for old in sorted(self._state_msgs)[:-3]:
            del self._state_msgs[old]
        self._retry_waiting()

    def _sync_tensors(self, run: str, sync: Any, body: bytes, layout: codecs.Layout, codec: Any) -> Any:
        """The task's tensors from this agent's replica; None while the round's state broadcast is still
        arriving. ProtocolError when no sync leads to the state the task names."""
        if not isinstance(sync, dict) or sync.get("mode") != "broadcast":
            return self.replica.apply(run, sync, body, layout, codec, max_bytes=MAX_TASK_BYTES)
        from fedfleet.edge_agent.downlink import check_sync_meta

        check_sync_meta(sync, ("broadcast",))
        if self.replica.run == run and self.replica.version == sync["version"]:
            if self.replica.digest(layout) == sync["digest"]:
                return {k: v.copy() for k, v in self.replica.tensors.items()}
        candidates = self._state_msgs.get((run, int(sync["version"])))
        if not candidates:
            return None
        for header, payload in candidates:
            state = (header.get("meta") or {}).get("sync")
            if not isinstance(state, dict) or state.get("digest") != sync["digest"]:
                continue  # not the state this signed task names
            return self.replica.apply(run, state, payload, layout, header.get("codec", codec),
                                      max_bytes=MAX_TASK_BYTES)
        raise ProtocolError("replica", f"no state broadcast leads to version {sync['version']} named by the task")

    def _retry_waiting(self) -> None:
        waiting, self._waiting = self._waiting, []
        for header, body in waiting:
            self._handle_task(header, body)

    def _handle_task(self, header: dict[str, Any], body: bytes) -> None:
        key = (str(header.get("run")), int(header.get("round", -1)), int(header.get("phase", 0)))
        msg = str(header.get("msg"))
        if key in self._done and self._taken.get(key, msg) == msg:
            return  # QoS 1 may deliver twice; a resumed coordinator's new dispatch of the round has a new msg id
        late = self._expired(header)
        if late:
            self._done.add(key)
            self._taken[key] = msg
            self.tasks_dropped += 1
            self._persist()
            self._safe_telemetry("dropped_task", run=key[0], round=key[1], phase=key[2], reason=late)
            return
        deadline = self._now() + self._remaining(header)
        if header.get("model") != self.model_digest:
            self._waiting.append((header, body))  # the package is still arriving
            return
        self._done.add(key)
        self._taken[key] = msg
        layout = codecs.normalize_layout(header.get("layout", []))
        meta = header.get("meta", {})
        codec = header.get("codec", {"name": "none"})
        if "sync" in meta:  # the round's state broadcast, or the change since this agent's replica
            tensors = self._sync_tensors(key[0], meta["sync"], body, layout, codec)
            if tensors is None:
                self._done.discard(key)
                self._waiting.append((header, body))  # the state broadcast is still arriving
                return
        else:
            tensors = codecs.decode(body, layout, codec, max_bytes=MAX_TASK_BYTES)
        task = Task(run=key[0], round=key[1], method=str(header.get("method")), config=meta.get("config", {}),
                    tensors=tensors, phase=key[2], deadline=deadline)
        name = str(task.config.get("learner") or task.method)  # e.g. robust FedAvg's byzantine tasks
        if self.state.begin(task.run, task.round, task.phase):
            log.info("agent %s: round %d.%d of run %s again (a resumed coordinator); from the state before it",
                     self.cfg.agent_id, task.round, task.phase, task.run)
        learner = self.state.learner(name, create)
        data = continual.task_data(self.data, task.config)  # a continual job's task names its data
        t0 = time.perf_counter()
        lock = self.learn_lock if self.learn_lock is not None else _null()
        if self.meter is not None:
            with self.meter.measure("compute"), lock:
                result = learner.learn(task, data, self.model)
        else:
            with lock:
                result = learner.learn(task, data, self.model)
        learn_s = time.perf_counter() - t0
        self._upload(header, task, result, learn_s)
        self.rounds_done += 1
        self._persist()
        if self.meter is not None:
            with self.meter.measure("radio", bytes_down=int(header.get("total", len(body)))):
                pass  # the task's download, booked by bytes
            energy = self.meter.take().as_dict()
            self._safe_telemetry("energy", run=task.run, round=task.round, phase=task.phase, **energy,
                                 **self.byte_counts())
        else:
            self._safe_telemetry("bytes", run=task.run, round=task.round, phase=task.phase, **self.byte_counts())

    def byte_counts(self) -> dict[str, int | None]:
        """This agent's bytes so far: `mqtt_*` by the MQTT framing formula (what the ledger books) and
        `wire_*` as its socket really moved them (TLS, keep-alives, CONNECT included; None if unknown)."""
        wire = self.link.wire_bytes()
        return {"mqtt_up": self.link.bytes_sent, "mqtt_down": self.link.bytes_received,
                "wire_up": wire[0] if wire else None, "wire_down": wire[1] if wire else None}

    def _persist(self) -> None:
        if self.kept is not None:
            self.kept.save(self._done, self.rounds_done, self.tasks_dropped)

    def _remaining(self, header: dict[str, Any]) -> float:
        """Seconds left on the task: its ttl from this agent's own receive time (monotonic)."""
        ttl = header.get("ttl")
        if not isinstance(ttl, (int, float)) or not 0 < ttl <= 86400:
            return 0.0
        return float(header.get("_received", time.monotonic())) + float(ttl) - time.monotonic()

    def _expired(self, header: dict[str, Any]) -> str:
        """Why the task is too late to run ("" when it is not): its ttl ran out since it was received, or the
        coordinator stamped it more than ttl + max_skew_s ago by this device's clock (a replay or a delivery
        held back far longer than any clock skew explains)."""
        ttl, sent = header.get("ttl"), header.get("sent")
        if not isinstance(ttl, (int, float)) or not isinstance(sent, (int, float)):
            return "task has no ttl or send time"
        if self._remaining(header) <= 0:
            return "deadline passed"
        age = self._now() - float(sent)
        if age > float(ttl) + self.cfg.max_skew_s:
            return f"task sent {age:.0f} s ago by this clock; ttl {ttl} s + skew {self.cfg.max_skew_s} s"
        return ""

    def _upload(self, header: dict[str, Any], task: Task, result: LearnResult, learn_s: float) -> None:
        meta = header.get("meta", {})
        expect = codecs.normalize_layout(meta.get("expect", []))
        spec = meta.get("uplink", {"name": "none"})
        tensors = {n: np.asarray(result.tensors[n], np.float32) for n, _ in expect}
        if spec.get("name") == "fedzip" and spec.get("error_feedback"):
            payload = self._with_feedback(task.method, tensors, spec)
        else:
            payload = codecs.encode(tensors, expect, spec)
        out = {
            "kind": "result", "fleet": self.cfg.fleet, "agent": self.cfg.agent_id, "run": task.run,
            "round": task.round, "phase": task.phase, "method": task.method, "codec": spec,
            "layout": [[n, list(s)] for n, s in expect],
            "meta": {"samples": int(result.samples), "learn_s": learn_s, "metrics": _finite(result.metrics),
                     "profile": self.cfg.profile, "energy": self.meter is not None},  # an energy report follows
        }
        chunks = protocol.split(out, payload, self.cfg.key)
        sent = sum(protocol.mqtt_publish_bytes(self._result_topic, len(c)) for c in chunks)
        radio = self.meter.measure("radio", bytes_up=sent) if self.meter is not None else _null()
        with radio:
            for chunk in chunks:
                self.link.publish(self._result_topic, chunk)

    def _with_feedback(self, method: str, tensors: dict[str, np.ndarray], spec: dict[str, Any]) -> bytes:
        """The FedZip payload of update + residual, sparsified and quantised once; the residual keeps the rest."""
        from fedfleet.edge_agent import fedzip

        params = fedzip.FedZipParams.from_dict({k: v for k, v in spec.items() if k not in ("name", "error_feedback")})
        fb = self.state.feedback.get(method)
        if fb is None:  # this run's residual: kept across a restart, never carried into another run
            fb = self.state.feedback[method] = fedzip.ErrorFeedback()
            if self.kept is not None:
                fb.residual = self.kept.feedback(f"{self.state.run}-{method}")
        compensated = fb.compensate(tensors)
        payload, sent = fedzip.encode_and_quantize(compensated, params)
        fb.update(compensated, sent)
        if self.kept is not None:
            self.kept.save_feedback(f"{self.state.run}-{method}", fb.residual)
        return payload


def _finite(metrics: dict[str, Any]) -> dict[str, Any]:
    """Metrics as JSON can carry them: a diverged learner's NaN or Inf loss becomes None (its tensors are
    still uploaded, so the coordinator refuses them as non-finite and records why)."""
    out: dict[str, Any] = {}
    for k, v in metrics.items():
        if isinstance(v, float) and not math.isfinite(v):
            out[k] = None
        else:
            out[k] = v
    return out


class _null:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None

