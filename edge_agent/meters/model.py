"""The `model` meter: energy from the firmware profile's power figures, time, and bytes.

- compute: `power.cpu_active_w` (or `gpu_active_w` with accelerator="gpu") x seconds, whole board;
- radio: `power.idle_w` x seconds plus the profile's marginal J/MB for the bytes sent and received;
- idle: `power.idle_w` x seconds outside phases.

`time_scale` multiplies measured compute seconds (an emulator running a slow board on a fast host passes
host_speed / device_speed), and `add()` books a phase of a given length without waiting for it.
"""

from __future__ import annotations

import time

from fedfleet.edge_agent.meters._base import PHASES, Clock, Meter, MeterError
from fedfleet.firmware_profiles.schema import Profile


class ModelMeter(Meter):
    kind = "model"

    def __init__(self, profile: Profile, *, accelerator: str = "cpu", time_scale: float = 1.0,
                 clock: Clock = time.monotonic) -> None:
        if accelerator not in ("cpu", "gpu"):
            raise MeterError(f"accelerator must be 'cpu' or 'gpu', got {accelerator!r}")
        if accelerator == "gpu" and profile.gpu_active_w is None:
            raise MeterError(f"profile {profile.name!r} has no power.gpu_active_w; use accelerator='cpu'")
        if not time_scale > 0:
            raise MeterError(f"time_scale must be > 0, got {time_scale}")
        self.profile = profile
        self.time_scale = float(time_scale)
        self._compute_w = profile.gpu_active_w if accelerator == "gpu" else profile.cpu_active_w
        self._t = clock()
        super().__init__(clock=clock, interval_s=None)

    def _power(self, phase: str | None) -> float:
        return float(self._compute_w) if phase == "compute" else self.profile.idle_w  # type: ignore[arg-type]

    def _advance(self) -> float:
        now = self._clock()
        seconds, self._t = max(0.0, now - self._t), now
        if self._phase == "compute":
            seconds *= self.time_scale
        return self._power(self._phase) * seconds

    def _phase_extra(self, phase: str, seconds: float, bytes_up: int, bytes_down: int) -> float:
        return self.profile.radio_joules(bytes_up, bytes_down) if phase == "radio" else 0.0

    def add(self, phase: str, seconds: float, *, bytes_up: int = 0, bytes_down: int = 0) -> float:
        """Book `seconds` (device time) of a phase ("compute", "radio" or "idle") now; returns its joules."""
        if phase not in (*PHASES, "idle"):
            raise MeterError(f"unknown phase {phase!r}; use compute, radio or idle")
        if seconds < 0:
            raise MeterError(f"seconds must be >= 0, got {seconds}")
        joules = self._power(None if phase == "idle" else phase) * seconds
        joules += self._phase_extra(phase, seconds, bytes_up, bytes_down)
        with self._lock:
            self._totals[phase] += joules
        return joules
