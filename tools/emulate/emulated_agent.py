"""An emulated edge agent: the real `Agent` (a real MQTT client) with a device's behaviour laid over it.

- compute and link shaping through `fedfleet.tools.emulate.shaping.ShapedMeter` (profile speed, bandwidth, RTT, loss);
- dropouts: with probability `dropout` per task the agent takes the task and never answers (no result, no
  telemetry), like a board that hangs or loses power mid-round;
- availability: offline windows `[[off_s, on_s], ...]` (seconds from start) during which the agent's
  connection is dropped without DISCONNECT, so the broker publishes its last will (status offline);
  at `on_s` it reconnects with its persistent session and announces itself again;
- misbehaviour: `behaviour = "nan"` uploads NaNs (the coordinator must refuse: rejected:nonfinite);
  `"noise"` uploads the honest update plus Gaussian noise of norm about `noise_scale` times its own.
  Attacks from `fedfleet.edge_agent.learners.byzantine` need no help here: the coordinator's strategy tasks them.

`make_agent` is the `fedfleet.tools.emulate.agent_pool` factory. No torch on this side.
"""

from __future__ import annotations

import functools
import threading
import time
from typing import Any

import numpy as np

from fedfleet.edge_agent.agent import Agent, AgentConfig
from fedfleet.edge_agent.learners import LearnResult, LocalData, Task
from fedfleet.edge_agent.profiles import load_profile
from fedfleet.edge_agent.wire.mqtt import MqttLink
from fedfleet.tools.emulate.shaping import ShapedMeter, Shaper

BEHAVIOURS = ("nan", "noise")
_profile = functools.lru_cache(maxsize=None)(load_profile)


class EmulatedAgent(Agent):
    def __init__(self, config: AgentConfig, data: LocalData, *, shaper: Shaper, dropout: float = 0.0,
                 behaviour: str | None = None, noise_scale: float = 100.0,
                 offline: list[tuple[float, float]] | None = None, seed: int = 0,
                 model_cache: dict[str, Any] | None = None, learn_lock: Any = None) -> None:
        self.shaped = ShapedMeter(shaper)
        super().__init__(config, data, meter=self.shaped, model_cache=model_cache, learn_lock=learn_lock)
        if behaviour is not None and behaviour not in BEHAVIOURS:
            raise ValueError(f"behaviour must be one of {BEHAVIOURS} or None, got {behaviour!r}")
        self.dropout = float(dropout)
        self.behaviour = behaviour
        self.noise_scale = float(noise_scale)
        self.offline = sorted(offline or [])
        self.seed = int(seed)
        self.dropouts = 0
        self.offline_events = 0
        self.corrupted = 0
        self._booked: set[tuple[str, int, int]] = set()
        self._link_lock = threading.Lock()
        self._old_bytes = 0
        self._avail: threading.Thread | None = None

    def _rng(self, key: tuple[str, int, int], salt: int) -> np.random.Generator:
        return np.random.Generator(np.random.PCG64([self.seed, int(key[1]), int(key[2]), salt]))

    # -------------------------------------------------------------- lifecycle
    def start(self, wait_s: float = 10.0) -> None:
        super().start(wait_s=wait_s)
        self._t0 = time.monotonic()
        if self.offline:
            self._avail = threading.Thread(target=self._availability, name=f"avail-{self.cfg.agent_id}", daemon=True)
            self._avail.start()

    def stop(self, *, graceful: bool = True) -> None:
        with self._link_lock:
            super().stop(graceful=graceful)

    def _availability(self) -> None:
        for off_s, on_s in self.offline:
            if self._stop.wait(max(0.0, self._t0 + off_s - time.monotonic())):
                return
            with self._link_lock:
                if self._stop.is_set():
                    return
                self.link.stop(graceful=False)  # the broker publishes the will: offline
                self.offline_events += 1
            if self._stop.wait(max(0.0, self._t0 + on_s - time.monotonic())):
                return
            with self._link_lock:
                if self._stop.is_set():
                    return
                self._reconnect()

    def _reconnect(self) -> None:
        old = self.link
        self._old_bytes += old.bytes_sent
        c = self.cfg
        self.link = MqttLink(
            str(old.url), client_id=c.username or f"fedfleet-{c.fleet}-{c.agent_id}", on_message=self._on_message,
            subscriptions=list(old._subscriptions), clean_session=False,
            will=self._will, on_connect=self._announce,
            username=c.username, password=c.password, ca_certs=c.ca_certs, loop=self.host.links,
        )
        self.link.start(wait_s=0)

    # -------------------------------------------------------------- tasks
    def _handle_task(self, header: dict[str, Any], body: bytes) -> None:
        key = (str(header.get("run")), int(header.get("round", -1)), int(header.get("phase", 0)))
        if key not in self._done and key not in self._booked:
            self._booked.add(key)
            self.shaped.download(int(header.get("total", len(body))))
            if self.dropout > 0 and self._rng(key, 1).random() < self.dropout:
                self._done.add(key)  # taken, never answered
                self.dropouts += 1
                return
        super()._handle_task(header, body)

    def _upload(self, header: dict[str, Any], task: Task, result: LearnResult, learn_s: float) -> int:
        if self.behaviour is not None:
            result = LearnResult(self._corrupt(task, result.tensors), result.samples, result.metrics)
            self.corrupted += 1
        return super()._upload(header, task, result, learn_s)

    def _corrupt(self, task: Task, tensors: dict[str, Any]) -> dict[str, np.ndarray]:
        if self.behaviour == "nan":
            return {k: np.full(np.shape(v), np.nan, np.float32) for k, v in tensors.items()}
        rng = self._rng((task.run, task.round, task.phase), 2)
        arrays = {k: np.asarray(v, np.float32) for k, v in tensors.items()}
        norm = float(np.sqrt(sum(float(np.sum(v.astype(np.float64) ** 2)) for v in arrays.values()))) or 1.0
        size = sum(v.size for v in arrays.values())
        sd = self.noise_scale * norm / np.sqrt(size)
        return {k: (v + sd * rng.standard_normal(v.shape)).astype(np.float32) for k, v in arrays.items()}

    # -------------------------------------------------------------- report
    def stats(self) -> dict[str, Any]:
        energy = self.shaped.totals()
        return {
            "profile": self.cfg.profile, "tasks_done": self.rounds_done, "tasks_dropped_late": self.tasks_dropped,
            "dropouts": self.dropouts, "offline_events": self.offline_events, "corrupted": self.corrupted,
            "mqtt_bytes_sent": self._old_bytes + self.link.bytes_sent, **self.shaped.stats,
            "compute_j": energy.compute_j, "radio_j": energy.radio_j, "idle_j": energy.idle_j,
        }


def make_agent(config: AgentConfig, data: LocalData, opts: dict[str, Any],
               model_cache: dict[str, Any] | None, learn_lock: Any = None) -> EmulatedAgent:
    """`fedfleet.tools.emulate.agent_pool` factory: `opts` holds profile, host_speed, int8, seed, dropout, behaviour,
    noise_scale and offline windows for this agent."""
    profile = _profile(opts["profile"])
    config.profile = profile.name
    shaper = Shaper(profile, float(opts["host_speed"]), int8=bool(opts.get("int8", False)), seed=int(opts["seed"]))
    return EmulatedAgent(
        config, data, shaper=shaper, dropout=float(opts.get("dropout", 0.0)), behaviour=opts.get("behaviour"),
        noise_scale=float(opts.get("noise_scale", 100.0)),
        offline=[(float(a), float(b)) for a, b in opts.get("offline", [])], seed=int(opts["seed"]),
        model_cache=model_cache, learn_lock=learn_lock,
    )
