"""The agent's MQTT loop: join, fetch the model package, take a task, learn, upload, reconnect.

`Agent` composes parts with one job each and runs the loop between them:
- `inbox.Inbox` (network thread): verify, reassemble and route the signed downlink;
- `admission.Admission`: dedupe, expiry, tasks waiting for their package or state broadcast;
- `replica.LocalReplica`: the model package in use and the synced global state;
- `uplink.Uplink`: status, telemetry and results (codec with error feedback, chunking);
- `outbox.Outbox`: store-and-forward of finished results (kept in the state directory before they are
  published, sent again on the next connection when the one they went out on was lost or the agent restarted);
- `host.Host`: what the agents of one process share (model cache, broadcast bytes, verified signatures, the
  package load lock); `Host.process()` unless the agent is given one, `Host.solo()` on a device.
Network callbacks only verify, reassemble and enqueue; a worker thread loads models and runs learners,
so the MQTT keep-alive never stalls behind a long learning step.

Trust: tasks and model packages must carry the coordinator's Ed25519 signature under the public key pinned
in `AgentConfig.coordinator_key`; anything else is refused (a typed `ProtocolError`, logged and counted in
`refused`), and the current model stays until a correctly signed package arrives. An agent without a pinned
key refuses every task and package and says so in its status. A package is taken only if its publication
is not older than the one in use (`sent` and `run` in its signed header; kept across restarts in the state
directory), so a correctly signed package of an earlier run, replayed, is refused (`replayed`). A package
publication from a coordinator process the agent has not answered yet (`boot`) gets a fresh status that
echoes it: that is the status the coordinator takes as the truth. A task's deadline is the agent's own receive
time plus the task's `ttl` (monotonic clock); wall clocks are compared only to refuse tasks older than
`ttl + max_skew_s`, so an agent whose clock is off by less than `max_skew_s` loses nothing.
"""

from __future__ import annotations

import logging
import math
import queue
import threading
import time
from contextlib import nullcontext
from typing import Any

import numpy as np

from fedfleet.edge_agent import continual
from fedfleet.edge_agent.admission import Admission, task_key
from fedfleet.edge_agent.agent_config import AgentConfig
from fedfleet.edge_agent.downlink import Replica
from fedfleet.edge_agent.errors import ModelError
from fedfleet.edge_agent.host import Host
from fedfleet.edge_agent.inbox import MAX_MODEL_BYTES, MAX_TASK_BYTES, Inbox
from fedfleet.edge_agent.learners import LearnResult, LocalData, Task, create
from fedfleet.edge_agent.outbox import Outbox
from fedfleet.edge_agent.replica import LocalReplica
from fedfleet.edge_agent.run_state import RunState
from fedfleet.edge_agent.state import AgentState
from fedfleet.edge_agent.uplink import Uplink, with_feedback
from fedfleet.edge_agent.wire import codecs, protocol
from fedfleet.edge_agent.wire.link import Link, open_link

__all__ = ["MAX_MODEL_BYTES", "MAX_TASK_BYTES", "Agent", "AgentConfig", "Host", "learner_name"]

log = logging.getLogger(__name__)


def learner_name(task: Task) -> str:
    """The learner that runs `task`: the task config's `learner` if it names one (e.g. robust FedAvg's
    byzantine tasks), else the task's method."""
    return str(task.config.get("learner") or task.method)


class Agent:
    """One edge agent. `start()` connects and returns; `stop()` leaves (gracefully, or like a crash)."""

    RESEND_AFTER_S = 3.0  # after a reconnection, the kept results go out once more this much later

    def __init__(self, config: AgentConfig, data: LocalData, *, meter: Any = None,
                 model_cache: dict[str, Any] | None = None, learn_lock: Any = None, host: Host | None = None) -> None:
        """`host`: what this agent shares with the other agents of its process (default `Host.process()`).
        An agent given a `host` loads each package once into `host.models` with the others; `model_cache`
        names such a dict directly (the agents given the same dict share it). An agent given neither loads
        its own copy. `learn_lock`: a lock shared by the agents of one process, held while a learner runs,
        so hundreds of agent threads take turns instead of trading the interpreter lock every few ms."""
        if not protocol.valid_id(config.agent_id) or not protocol.valid_id(config.fleet):
            raise ValueError(f"agent id {config.agent_id!r} and fleet {config.fleet!r} must be 1-64 of [A-Za-z0-9-_.]")
        self.cfg = config
        self.data = data
        self.meter = meter
        self.host = host if host is not None else Host.process()
        self.model_cache = model_cache if model_cache is not None else (host.models if host is not None else None)
        self.learn_lock = learn_lock
        self.state = RunState()  # learners and error feedback of the current run only
        self.rounds_done = 0
        self.tasks_dropped = 0
        self._energy_run: str | None = None  # the run whose energy the meter is counting (see `_join_run`)
        self.trust_error = (None if config.coordinator_key else
                            "no coordinator key pinned (--coordinator-key-file): refusing every task and package")
        # what survives a restart (tasks answered, counters, the last package): fedfleet.edge_agent.state
        self.kept = AgentState(config.state_dir) if config.state_dir else None
        if self.kept is not None:
            self.rounds_done, self.tasks_dropped = self.kept.rounds_done, self.kept.tasks_dropped
        # the package publication in use (run, coordinator time) and the coordinator process it came from
        self.package_run = self.kept.package_run if self.kept is not None else None
        self.package_sent = self.kept.package_sent if self.kept is not None else None
        self.boot: str | None = None
        self.admission = Admission(max_skew_s=config.max_skew_s, now=lambda: self._now(),
                                   done=self.kept.done if self.kept is not None else ())
        self.local = LocalReplica(runtime=config.runtime, threads=config.threads, load_lock=self.host.load_lock,
                                  payloads=self.host.payloads, shared_models=self.model_cache,
                                  transitions=self.host.transitions)
        self.uplink = Uplink(config, link=lambda: self.link, now=lambda: self._now(), meter=meter)
        self.outbox = Outbox(config.state_dir)
        self._connection: tuple[int, int] | None = None  # (link, its connects) last announced on
        self._work: queue.Queue[tuple[str, Any, Any]] = queue.Queue()
        self.inbox = Inbox(fleet=config.fleet, agent_id=config.agent_id, coordinator_key=config.coordinator_key,
                           deliver=lambda kind, header, body: self._post((kind, header, body)),
                           current_model=lambda: self.model_digest, signatures=self.host.signatures,
                           on_refused=self._on_refused)
        self.downlink_error: str | None = None  # a model package refused before any was loaded (its status says so)
        self._status_topic = self.uplink.status_topic
        self._result_topic = self.uplink.result_topic
        self._telemetry_topic = self.uplink.telemetry_topic
        self._task_topic = self.inbox.task_topic
        self.link = self._open_link()
        self._stop = threading.Event()
        # the work the network side hands over (packages, state, tasks) runs on the Host's shared worker, or on
        # this agent's own thread (an agent alone on its device)
        self._shared = self.host.worker
        self._worker = (None if self._shared is not None else
                        threading.Thread(target=self._work_loop, name=f"agent-{config.agent_id}", daemon=True))

    def _open_link(self) -> Link:
        """This agent's MQTT connection (not started)."""
        c = self.cfg
        return open_link(
            c.broker,
            client_id=c.username or f"fedfleet-{c.fleet}-{c.agent_id}",  # the ACL's user name
            loop=self.host.links,
            on_message=self._on_message,
            subscriptions=self.inbox.subscriptions(),
            clean_session=False,
            will=self._will,
            on_connect=self._on_connect,
            username=c.username,
            password=c.password,
            ca_certs=c.ca_certs,
        )

    # -------------------------------------------------------------- what the parts hold
    @property
    def model(self) -> Any:
        return self.local.model

    @property
    def model_digest(self) -> str | None:
        return self.local.digest

    @property
    def model_error(self) -> str | None:
        return self.local.error

    @property
    def replica(self) -> Replica:
        """The global state as the compressed downlink rebuilt it."""
        return self.local.sync

    @property
    def refused(self) -> dict[str, int]:
        """Refused downlink messages by reason."""
        return self.inbox.refused

    @property
    def _done(self) -> set[tuple[str, int, int]]:
        return self.admission.done

    @property
    def _state_msgs(self) -> dict[tuple[str, int], list[tuple[dict[str, Any], bytes]]]:
        return self.local.states

    # -------------------------------------------------------------- lifecycle
    def start(self, wait_s: float = 10.0) -> None:
        if self._shared is not None:
            self._shared.join(self, self._do, self._retry_waiting, lambda: bool(self.admission.waiting))
        else:
            self._worker.start()
        kept = self.kept.package() if self.kept is not None else None
        if kept is not None:  # the package this agent last used: ready before the coordinator resends it
            self._post(("model", {"digest": kept[0], "verified": False, "run": self.package_run,
                                  "sent": self.package_sent}, kept[1]))
        self.link.start(wait_s=wait_s)

    def stop(self, *, graceful: bool = True) -> None:
        self._stop.set()
        if self._shared is None:
            self._work.put(("stop", None, None))  # its own worker thread ends
        if graceful and self.link.connected.is_set():
            self.link.publish(self._status_topic, self._status_payload("offline"), retain=True)
            self._last_report()
        self.link.stop(graceful=graceful)
        if self._shared is not None:
            self._shared.leave(self)
        elif self._worker.is_alive():
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

    # -------------------------------------------------------------- status and telemetry (uplink)
    def _now(self) -> float:
        """This device's wall clock (unix time). Only stamps and the skew check use it; deadlines do not."""
        return time.time()

    def _seq(self, *, will: bool = False) -> list[int]:
        return self.uplink.seq(will=will)

    def _will(self) -> tuple[str, bytes, bool]:
        return self._status_topic, self._status_payload("offline", will=True), True

    def _status_payload(self, state: str, *, will: bool = False, **extra: Any) -> bytes:
        body = {"state": state, "runtime": self.cfg.runtime, "profile": self.cfg.profile,
                "samples": len(self.data), "model": self.model_digest, "boot": self.boot, **self.cfg.extra_status,
                **extra}
        if self.kept is not None and self.kept.set_aside:
            body["warning"] = self.kept.set_aside
        return self.uplink.status(body, will=will)

    def _on_refused(self, topic: str, exc: Exception) -> None:
        """A model package whose signature does not verify while no model is loaded (the wrong coordinator.pub,
        most often): say so in the retained status, once, so `serve` shows it while it waits."""
        reason = getattr(exc, "reason", "")
        if reason == "bad_signature" and topic.startswith(self.inbox.model_prefix) and self.model_digest is None:
            error = f"{exc} (the model package; is coordinator.pub this coordinator's public key?)"
            if error != self.downlink_error:
                self.downlink_error = error
                if self.link.connected.is_set():
                    self._announce()

    def _on_connect(self) -> None:
        log.info("agent %s connected to %s (fleet %s)", self.cfg.agent_id, self.cfg.broker, self.cfg.fleet)
        if self.trust_error:
            log.warning("agent %s: %s", self.cfg.agent_id, self.trust_error)
        self._announce()

    def _announce(self) -> None:
        error = self.trust_error or self.model_error or (None if self.model_digest else self.downlink_error)
        extra = {"error": error} if error else {}
        self.link.publish(self._status_topic, self._status_payload("online", **extra), retain=True)
        self.outbox.forward(self.link)  # results that went out on a lost connection, or before a restart
        connection = (id(self.link), getattr(self.link, "connects", 0))
        if connection != self._connection:
            if self._connection is not None and self._connection[0] == connection[0] and len(self.outbox):
                # a reconnection of the same link: once more, once the coordinator has subscribed again
                if self.host.links is not None:  # the link loop's clock: no thread per agent
                    self.host.links.call_later(self.RESEND_AFTER_S, self._resend)
                else:
                    timer = threading.Timer(self.RESEND_AFTER_S, self._resend)
                    timer.daemon = True
                    timer.start()
            self._connection = connection

    def _resend(self) -> None:
        if not self._stop.is_set() and self.link.connected.is_set():
            self.outbox.forward(self.link, every=True)

    def _telemetry(self, event: str, **fields: Any) -> None:
        self.uplink.telemetry(event, **fields)

    def _safe_telemetry(self, event: str, **fields: Any) -> None:
        try:
            self._telemetry(event, **fields)
        except Exception:  # noqa: BLE001
            log.exception("telemetry failed")

    def byte_counts(self) -> dict[str, int | None]:
        """This agent's bytes so far (see `Uplink.byte_counts`)."""
        return self.uplink.byte_counts()

    # -------------------------------------------------------------- network thread
    def _on_message(self, topic: str, payload: bytes) -> None:
        self.inbox.on_message(topic, payload)

    # -------------------------------------------------------------- worker thread
    def _post(self, item: tuple[str, Any, Any]) -> None:
        """Hand one message's work to this agent's worker (in order; never two at once)."""
        if self._shared is None:
            self._work.put(item)
        else:
            self._shared.put(self, item)

    def _work_loop(self) -> None:
        while not self._stop.is_set():
            try:
                item = self._work.get(timeout=0.5)
            except queue.Empty:
                self._retry_waiting()
                continue
            self._do(item)

    def _do(self, item: tuple[str, Any, Any]) -> None:
        kind, header, body = item
        try:
            if kind == "model":
                self._load_model(header, body)
            elif kind == "boot":
                self._package_again(header)
            elif kind == "state":
                self._keep_state(header, body)
            elif kind == "task":
                self._handle_task(header, body)
        except Exception as exc:  # the agent stays up whatever a task does
            log.exception("agent %s failed on a %s message", self.cfg.agent_id, kind)
            self._safe_telemetry("error", detail=f"{type(exc).__name__}: {exc}")

    def _older(self, header: dict[str, Any]) -> str:
        """Why a package publication is older than the one in use ("" when it is not)."""
        sent = header.get("sent")
        if self.package_sent is None:
            return ""
        if isinstance(sent, bool) or not isinstance(sent, (int, float)) or not math.isfinite(sent):
            return "the package header has no publication time"
        if sent < self.package_sent:
            return (f"package of run {str(header.get('run'))[:64]!r} published at {sent:.3f}, before the one in use "
                    f"(run {self.package_run!r}, {self.package_sent:.3f}): a replay")
        return ""

    def _refuse_older(self, header: dict[str, Any], why: str) -> None:
        self.inbox.refused["replayed"] = self.inbox.refused.get("replayed", 0) + 1
        log.warning("agent %s refused a model package: %s", self.cfg.agent_id, why)

    def _stamp(self, header: dict[str, Any]) -> bool:
        """Take the publication's run and time (never backwards), and answer a new coordinator process."""
        sent = header.get("sent")
        if isinstance(sent, (int, float)) and not isinstance(sent, bool) and math.isfinite(sent):
            self.package_run, self.package_sent = str(header.get("run")), float(sent)
            if self.kept is not None:
                self.kept.save_stamp(self.package_run, self.package_sent)
        boot = header.get("boot")
        if isinstance(boot, str) and boot != self.boot:
            self.boot = boot[:32]
            return True
        return False

    def _package_again(self, header: dict[str, Any]) -> None:
        """The package in use, published again: a new coordinator process gets a fresh status."""
        why = self._older(header)
        if why:
            self._refuse_older(header, why)
            return
        if self._stamp(header):
            self._announce()

    def _load_model(self, header: dict[str, Any], blob: bytes) -> None:
        why = self._older(header)
        if why:
            self._refuse_older(header, why)
            return
        try:
            model = self.local.load(blob, tuple(self.data.x.shape[1:]))
        except ModelError as exc:
            self.local.error = f"model_error: {exc}"
            log.error("agent %s cannot use model package %s: %s", self.cfg.agent_id, header.get("digest"), exc)
            self._announce()
            return
        self.local.use(model, header["digest"])
        log.info("agent %s: model package %s %s (%d bytes, %s)", self.cfg.agent_id, str(header["digest"])[:12],
                 "received and verified" if header.get("verified", True) else "loaded from the state directory",
                 len(blob), self.cfg.runtime)
        if self.kept is not None and self.kept.model_digest != self.model_digest:
            self.kept.save_package(header["digest"], blob)
        self._stamp(header)
        self._announce()
        self._retry_waiting()

    def _keep_state(self, header: dict[str, Any], body: bytes) -> None:
        self.local.keep_state(header, body)
        self._retry_waiting()

    def _sync_tensors(self, run: str, sync: Any, body: bytes, layout: codecs.Layout, codec: Any) -> Any:
        return self.local.tensors(run, sync, body, layout, codec, max_bytes=MAX_TASK_BYTES)

    def _retry_waiting(self) -> None:
        for header, body in self.admission.take_waiting():
            self._handle_task(header, body)

    def _handle_task(self, header: dict[str, Any], body: bytes) -> None:
        key, msg = task_key(header), str(header.get("msg"))
        if self.admission.seen(key, msg):
            return
        late = self._expired(header)
        if late:
            self.admission.take(key, msg)
            self.tasks_dropped += 1
            self._persist()
            self._safe_telemetry("dropped_task", run=key[0], round=key[1], phase=key[2], reason=late)
            log.warning("agent %s: task of run %s round %d.%d dropped: %s", self.cfg.agent_id, key[0], key[1],
                        key[2], late)
            return
        deadline = self._now() + self._remaining(header)
        if header.get("model") != self.model_digest:
            self.admission.wait(header, body)  # the package is still arriving
            return
        self.admission.take(key, msg)
        self.outbox.settle(*key)  # the coordinator has moved past this agent's earlier results
        layout = codecs.normalize_layout(header.get("layout", []))
        meta = header.get("meta", {})
        codec = header.get("codec", {"name": "none"})
        if "sync" in meta:  # the round's state broadcast, or the change since this agent's replica
            tensors = self._sync_tensors(key[0], meta["sync"], body, layout, codec)
            if tensors is None:
                self.admission.release(key)
                self.admission.wait(header, body)  # the state broadcast is still arriving
                return
        else:
            tensors = codecs.decode(body, layout, codec, max_bytes=MAX_TASK_BYTES)
        task = Task(run=key[0], round=key[1], method=str(header.get("method")), config=meta.get("config", {}),
                    tensors=tensors, phase=key[2], deadline=deadline)
        self._join_run(task.run)
        result, learn_s = self._learn(task)
        sent = self._upload(header, task, result, learn_s)
        log.info("agent %s: run %s round %d.%d: %s trained on %d samples in %.2f s, result sent%s",
                 self.cfg.agent_id, task.run, task.round, task.phase, learner_name(task), int(result.samples),
                 learn_s, f" ({sent} bytes)" if isinstance(sent, int) else "")
        self.rounds_done += 1
        self._persist()
        self._report(task, int(header.get("total", len(body))))

    def _report(self, task: Task, task_bytes: int) -> None:
        """After a task: the energy since the previous report (with a meter) and the bytes by category since the
        previous report, in one telemetry event the coordinator books on the task's round."""
        traffic = self.uplink.traffic.take()
        if self.meter is None:
            self._safe_telemetry("bytes", run=task.run, round=task.round, phase=task.phase, **self.byte_counts(),
                                 **traffic)
            return
        with self.meter.measure("radio", bytes_down=task_bytes):
            pass  # the task's download, booked by bytes
        other = other_bytes(traffic["traffic"], task_bytes)  # what else the radio carried: package, state, status ...
        if hasattr(self.meter, "add") and any(other):
            self.meter.add("radio", 0.0, bytes_up=other[0], bytes_down=other[1])
        energy = self.meter.take().as_dict()
        self._safe_telemetry("energy", run=task.run, round=task.round, phase=task.phase, **energy,
                             meter=getattr(self.meter, "kind", None) or None, **self.byte_counts(), **traffic)

    def _last_report(self) -> None:
        """On leaving: the bytes since the last task's report (that report itself, the offline status), for the
        run-level row (round 0) of the run this agent worked for last. The coordinator adds this message's own
        bytes; only DISCONNECT (2 bytes) is left uncounted."""
        if self._energy_run is None:
            return
        self._safe_telemetry("bytes", run=self._energy_run, round=0, phase=0, final=True, **self.uplink.traffic.take())

    def _join_run(self, run: str) -> None:
        """The first task of a run: the energy the meter counted since the previous report (the time between jobs,
        or before this agent's first job) is not this run's, so it is dropped, never booked into a round."""
        if run == self._energy_run:
            return
        self._energy_run = run
        if self.meter is not None:
            self.meter.take()

    def _learn(self, task: Task) -> tuple[LearnResult, float]:
        """Run the task's learner on this agent's data (metered as compute); the result and seconds taken."""
        if self.state.begin(task.run, task.round, task.phase):
            log.info("agent %s: round %d.%d of run %s again (a resumed coordinator); from the state before it",
                     self.cfg.agent_id, task.round, task.phase, task.run)
        learner = self.state.learner(learner_name(task), create)
        data = continual.task_data(self.data, task.config)  # a continual job's task names its data
        t0 = time.perf_counter()
        lock = self.learn_lock if self.learn_lock is not None else nullcontext()
        compute = self.meter.measure("compute") if self.meter is not None else nullcontext()
        with compute, lock:
            result = learner.learn(task, data, self.model)
        return result, time.perf_counter() - t0

    def _persist(self) -> None:
        if self.kept is not None:
            self.kept.save(self.admission.done, self.rounds_done, self.tasks_dropped)

    def _remaining(self, header: dict[str, Any]) -> float:
        return self.admission.remaining(header)

    def _expired(self, header: dict[str, Any]) -> str:
        return self.admission.expired(header)

    # -------------------------------------------------------------- uplink
    def _upload(self, header: dict[str, Any], task: Task, result: LearnResult, learn_s: float) -> int:
        """Send the result (kept in the outbox first); the bytes it took on the wire."""
        key = (task.run, task.round, task.phase)
        return self.uplink.result(header, task, result, learn_s, feedback=self._with_feedback,
                                  keep=lambda topic, chunks: self.outbox.put(key, topic, chunks, self.link))

    def _with_feedback(self, method: str, tensors: dict[str, np.ndarray], spec: dict[str, Any]) -> bytes:
        """The FedZip payload of update + residual (see `uplink.with_feedback`)."""
        return with_feedback(self.state, self.kept, method, tensors, spec)


def other_bytes(traffic: dict[str, list[int]], task_bytes: int) -> tuple[int, int]:
    """(up, down) bytes of a report's traffic that no radio phase booked: every category but the result (booked
    while uploading) and the task's own download (`task_bytes`, booked after learning)."""
    up = sum(v[0] for c, v in traffic.items() if c != "result")
    down = sum(v[1] for v in traffic.values())
    return up, max(0, down - task_bytes)
