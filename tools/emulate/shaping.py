"""Device shaping for emulated agents: compute time scaled by the profile, links with bandwidth, RTT and loss,
and a model meter that books energy with the emulated seconds and bytes.

- Compute: an agent's learner CPU time on this host (its own thread's `time.thread_time`, so contention
  between agents sharing the host does not count) becomes device time through the host calibration and the
  profile's `compute.speed` (and `int8_factor` for int8 backbones). The agent then waits out the rest, so
  a slow board is late like the real one.
- Link: `bytes * 8 / rate + RTT`, plus loss paid as TCP retransmissions: every segment of `MSS` bytes is
  resent until it gets through (loss p per try), so the retransmitted segments of a message are
  NegativeBinomial(segments, 1 - p); each one costs its bytes and one extra RTT (fast retransmit).
- Energy: `ShapedMeter` is the profile's `ModelMeter` whose compute and radio phases last the emulated
  time (it sleeps in the agent's upload path) and whose radio joules count the retransmitted bytes.
Randomness: numpy `Generator(PCG64(seed))` per agent.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np

from fedfleet.edge_agent.meters import ModelMeter, PhaseReading
from fedfleet.firmware_profiles.schema import Profile

MSS = 1448  # TCP payload bytes per segment on Ethernet/Wi-Fi with timestamps


@dataclass(frozen=True)
class Transfer:
    nbytes: int
    retransmitted_bytes: int
    seconds: float


class Shaper:
    """One agent's device: compute speed and link, from its profile and the host calibration."""

    def __init__(self, profile: Profile, host_speed: float, *, int8: bool = False, seed: int = 0) -> None:
        if not host_speed > 0:
            raise ValueError(f"host_speed must be > 0, got {host_speed}")
        self.profile = profile
        self.host_speed = float(host_speed)
        self.int8 = int8
        self.rng = np.random.Generator(np.random.PCG64(seed))

    def compute_seconds(self, host_cpu_seconds: float) -> float:
        """Device seconds for work that took `host_cpu_seconds` of CPU on this host."""
        return self.profile.compute_seconds(max(0.0, host_cpu_seconds) * self.host_speed, int8=self.int8)

    def transfer(self, nbytes: int, *, up: bool) -> Transfer:
        """Draw one message's transfer over this link: time and retransmitted bytes."""
        nbytes = max(0, int(nbytes))
        p = self.profile.loss
        segments = max(1, math.ceil(nbytes / MSS))
        lost = int(self.rng.negative_binomial(segments, 1.0 - p)) if p > 0 else 0
        retrans = lost * MSS
        seconds = self.profile.transfer_seconds(nbytes + retrans, up=up) + lost * self.profile.rtt_ms / 1000.0
        return Transfer(nbytes, retrans, seconds)


class ShapedMeter(ModelMeter):
    """The profile's model meter for an emulated agent: phases last the device's time and cost its energy.

    - `measure("compute")`: the block runs; then the meter waits until the device would be done and books
      that many seconds at `cpu_active_w`.
    - `measure("radio", bytes_up=n)`: waits the upload's shaped time before the block (the publish), books
      idle power for it plus J/MB for the bytes and their retransmissions.
    - `measure("radio", bytes_down=n)` with no upload: a download that already happened; booked by
      `download()` when the task arrived, so this books nothing more.
    `stats` holds device seconds and bytes so far.
    """

    def __init__(self, shaper: Shaper, *, sleep: Callable[[float], None] = time.sleep,
                 clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__(shaper.profile, clock=clock)
        self.shaper = shaper
        self._sleep = sleep
        self.stats = {"compute_s": 0.0, "upload_s": 0.0, "download_s": 0.0, "bytes_up": 0, "bytes_down": 0,
                      "retransmitted_bytes": 0}

    def _wait(self, seconds: float) -> None:
        if seconds > 0:
            self._sleep(seconds)

    def download(self, nbytes: int) -> Transfer:
        """The task's download: wait its shaped time in a radio phase and book it."""
        t = self.shaper.transfer(nbytes, up=False)
        self.start_phase("radio")
        self._wait(t.seconds)
        self.stop_phase(bytes_down=t.nbytes + t.retransmitted_bytes)
        self.stats["download_s"] += t.seconds
        self.stats["bytes_down"] += t.nbytes
        self.stats["retransmitted_bytes"] += t.retransmitted_bytes
        return t

    @contextmanager
    def measure(self, phase: str, *, bytes_up: int = 0, bytes_down: int = 0) -> Iterator[PhaseReading]:
        reading = PhaseReading(phase, bytes_up, bytes_down)
        if phase == "radio" and bytes_up == 0:
            yield reading  # a download, booked by download()
            return
        self.start_phase(phase)
        t0, cpu0 = self._clock(), time.thread_time()
        transfer = None
        if phase == "radio":
            transfer = self.shaper.transfer(bytes_up, up=True)
            self._wait(transfer.seconds)  # the link is busy this long before the message is through
        try:
            yield reading
        finally:
            if phase == "compute":
                device = self.shaper.compute_seconds(time.thread_time() - cpu0)
                self._wait(device - (self._clock() - t0))
                wall = self._clock() - t0
                self.time_scale = device / wall if wall > 0 else 1.0
                self.stats["compute_s"] += device
            elif transfer is not None:
                reading.add_bytes(up=transfer.retransmitted_bytes)
                self.stats["upload_s"] += transfer.seconds
                self.stats["bytes_up"] += transfer.nbytes
                self.stats["retransmitted_bytes"] += transfer.retransmitted_bytes
            try:
                reading.joules, reading.seconds = self._stop_phase(reading.bytes_up, reading.bytes_down)
            finally:
                self.time_scale = 1.0
