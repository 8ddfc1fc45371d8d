"""The agent's uplink: signed status, telemetry and results, each stamped for freshness.

`Uplink` builds every header the agent sends: status (retained; the will is a status "offline" with a new
epoch), telemetry (energy, bytes, dropped tasks, errors) and results (the tensors the task expects, encoded
with the task's uplink codec, FedZip with error feedback when asked, split into signed chunks and booked on
the meter's radio by MQTT bytes). Every message carries `seq` = [epoch, n]: a will opens a new epoch (one per
connection, in ms, always above the last) and takes n = WILL_SEQ, above every n its connection will use.
The link and the clock are the agent's (callables), so a reconnect or a skewed test clock is seen here.
"""

from __future__ import annotations

import json
import math
import threading
from collections.abc import Callable
from contextlib import nullcontext
from typing import Any

import numpy as np

from fedfleet.edge_agent.agent_config import AgentConfig
from fedfleet.edge_agent.learners import LearnResult, Task
from fedfleet.edge_agent.run_state import RunState
from fedfleet.edge_agent.state import AgentState
from fedfleet.edge_agent.wire import codecs, protocol


class Uplink:
    """What one agent publishes, and how it is framed."""

    def __init__(self, cfg: AgentConfig, *, link: Callable[[], Any], now: Callable[[], float],
                 meter: Any = None) -> None:
        self.cfg = cfg
        self.fleet, self.agent_id, self.key = cfg.fleet, cfg.agent_id, cfg.key
        self.link = link
        self.now = now
        self.meter = meter
        self.status_topic = protocol.agent_topic(cfg.fleet, cfg.agent_id, "status")
        self.result_topic = protocol.agent_topic(cfg.fleet, cfg.agent_id, "result")
        self.telemetry_topic = protocol.agent_topic(cfg.fleet, cfg.agent_id, "telemetry")
        self._epoch, self._n = 0, 0  # freshness of status and telemetry: seq = [epoch, n]
        self._seq_lock = threading.Lock()

    # -------------------------------------------------------------- freshness, status, telemetry
    def seq(self, *, will: bool = False) -> list[int]:
        """The next freshness stamp [epoch, n]."""
        with self._seq_lock:
            if will:
                self._epoch, self._n = max(self._epoch + 1, int(self.now() * 1000)), 0
                return [self._epoch, protocol.WILL_SEQ]
            self._n = min(self._n + 1, protocol.WILL_SEQ - 1)
            return [self._epoch, self._n]

    def status(self, body: dict[str, Any], *, will: bool = False) -> bytes:
        """A sealed status message with `body` (state, runtime, model, ...)."""
        header = {"kind": "status", "fleet": self.fleet, "agent": self.agent_id, "sent": self.now(),
                  "seq": self.seq(will=will)}
        return protocol.seal(header, json.dumps(body).encode(), self.key)

    def telemetry(self, event: str, **fields: Any) -> None:
        header = {"kind": "telemetry", "fleet": self.fleet, "agent": self.agent_id, "sent": self.now(),
                  "seq": self.seq()}
        body = json.dumps({"event": event, **fields}, default=str).encode()
        self.link().publish(self.telemetry_topic, protocol.seal(header, body, self.key))

    def byte_counts(self) -> dict[str, int | None]:
        """The agent's bytes so far: `mqtt_*` by the MQTT framing formula (what the ledger books) and
        `wire_*` as its socket really moved them (TLS, keep-alives, CONNECT included; None if unknown)."""
        link = self.link()
        wire = link.wire_bytes()
        return {"mqtt_up": link.bytes_sent, "mqtt_down": link.bytes_received,
                "wire_up": wire[0] if wire else None, "wire_down": wire[1] if wire else None}

    # -------------------------------------------------------------- results
    def result(self, header: dict[str, Any], task: Task, result: LearnResult, learn_s: float, *,
               feedback: Callable[[str, dict[str, np.ndarray], dict[str, Any]], bytes]) -> int:
        """Encode, frame and publish the result of `task` (whose dispatch header is `header`); `feedback`
        makes the FedZip payload with error feedback when the task asks for it. Returns the bytes sent (MQTT
        publish packets)."""
        meta = header.get("meta", {})
        expect = codecs.normalize_layout(meta.get("expect", []))
        spec = meta.get("uplink", {"name": "none"})
        tensors = {n: np.asarray(result.tensors[n], np.float32) for n, _ in expect}
        if spec.get("name") == "fedzip" and spec.get("error_feedback"):
            payload = feedback(task.method, tensors, spec)
        else:
            payload = codecs.encode(tensors, expect, spec)
        out = {
            "kind": "result", "fleet": self.fleet, "agent": self.agent_id, "run": task.run,
            "round": task.round, "phase": task.phase, "method": task.method, "codec": spec,
            "layout": [[n, list(s)] for n, s in expect],
            "meta": {"samples": int(result.samples), "learn_s": learn_s, "metrics": finite(result.metrics),
                     "profile": self.cfg.profile, "energy": self.meter is not None},  # an energy report follows
        }
        chunks = protocol.split(out, payload, self.key)
        sent = sum(protocol.mqtt_publish_bytes(self.result_topic, len(c)) for c in chunks)
        radio = self.meter.measure("radio", bytes_up=sent) if self.meter is not None else nullcontext()
        with radio:
            for chunk in chunks:
                self.link().publish(self.result_topic, chunk)
        return sent


def with_feedback(state: RunState, kept: AgentState | None, method: str, tensors: dict[str, np.ndarray],
                  spec: dict[str, Any]) -> bytes:
    """The FedZip payload of update + residual, sparsified and quantised once; the residual keeps the rest
    (in `state.feedback`, and in `kept` across a restart, never carried into another run)."""
    from fedfleet.edge_agent import fedzip

    params = fedzip.FedZipParams.from_dict({k: v for k, v in spec.items() if k not in ("name", "error_feedback")})
    fb = state.feedback.get(method)
    if fb is None:  # this run's residual: kept across a restart, never carried into another run
        fb = state.feedback[method] = fedzip.ErrorFeedback()
        if kept is not None:
            fb.residual = kept.feedback(f"{state.run}-{method}")
    compensated = fb.compensate(tensors)
    payload, sent = fedzip.encode_and_quantize(compensated, params)
    fb.update(compensated, sent)
    if kept is not None:
        kept.save_feedback(f"{state.run}-{method}", fb.residual)
    return payload


def finite(metrics: dict[str, Any]) -> dict[str, Any]:
    """Metrics as JSON can carry them: a diverged learner's NaN or Inf loss becomes None (its tensors are
    still uploaded, so the coordinator refuses them as non-finite and records why)."""
    out: dict[str, Any] = {}
    for k, v in metrics.items():
        if isinstance(v, float) and not math.isfinite(v):
            out[k] = None
        else:
            out[k] = v
    return out
