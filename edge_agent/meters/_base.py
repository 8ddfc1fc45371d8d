"""The meter interface: phases (compute, radio; everything else is idle) and joules split between them.

A `Meter` turns a source of energy (a model, a cumulative counter, or sampled power) into joules per phase.
Subclasses implement `_poll()` (read the hardware and add to `self._acc`, called by a background thread
when `interval_s` is set) or override `_advance()` (joules since the previous call) directly.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from fedfleet.edge_agent.errors import FedfleetError

PHASES = ("compute", "radio")
Clock = Callable[[], float]


class MeterError(FedfleetError):
    """A meter cannot be opened or read, or phases were used out of order. The message says what to do."""


@dataclass(frozen=True)
class EnergySplit:
    """Joules spent in each phase over some interval."""

    compute_j: float = 0.0
    radio_j: float = 0.0
    idle_j: float = 0.0

    @property
    def total_j(self) -> float:
        return self.compute_j + self.radio_j + self.idle_j

    def __sub__(self, other: EnergySplit) -> EnergySplit:
        return EnergySplit(self.compute_j - other.compute_j, self.radio_j - other.radio_j, self.idle_j - other.idle_j)

    def as_dict(self) -> dict[str, float]:
        return {"compute_j": self.compute_j, "radio_j": self.radio_j, "idle_j": self.idle_j}

    def ledger_fields(self) -> dict[str, float]:
        """Keyword arguments for `Ledger.record(...)`."""
        return {"energy_compute_j": self.compute_j, "energy_radio_j": self.radio_j, "energy_idle_j": self.idle_j}

    @classmethod
    def from_dict(cls, d: dict[str, float]) -> EnergySplit:
        return cls(float(d.get("compute_j", 0.0)), float(d.get("radio_j", 0.0)), float(d.get("idle_j", 0.0)))


@dataclass
class PhaseReading:
    """Yielded by `Meter.measure`: set bytes inside the block; `joules` and `seconds` are filled on exit."""

    phase: str
    bytes_up: int = 0
    bytes_down: int = 0
    joules: float = 0.0
    seconds: float = 0.0

    def add_bytes(self, up: int = 0, down: int = 0) -> None:
        self.bytes_up += int(up)
        self.bytes_down += int(down)


class Meter:
    """Energy split into compute, radio and idle. Thread-safe; one meter per agent.

    Use `with meter.measure("compute"): ...` or `start_phase` / `stop_phase`. Time outside a phase is idle.
    `snapshot()` gives cumulative totals since the meter opened; `take()` gives the split since the last take.
    """

    kind: str = ""

    def __init__(self, *, clock: Clock = time.monotonic, interval_s: float | None = None) -> None:
        self._clock = clock
        self._lock = threading.RLock()
        self._acc = 0.0
        self._totals = {"compute": 0.0, "radio": 0.0, "idle": 0.0}
        self._phase: str | None = None
        self._phase_j = 0.0
        self._phase_t0 = 0.0
        self._taken = EnergySplit()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if interval_s is not None:
            if interval_s <= 0:
                raise MeterError(f"interval_s must be > 0 seconds, got {interval_s}")
            self._thread = threading.Thread(target=self._run, args=(interval_s,), name=f"meter-{self.kind}", daemon=True)
            self._thread.start()

    # --- subclass hooks -------------------------------------------------------------------------
    def _poll(self) -> None:
        """Read the hardware and add joules since the previous poll to `self._acc` (hold `self._lock`)."""
        raise NotImplementedError(f"{type(self).__name__} must implement _poll() or _advance()")

    def _advance(self) -> float:
        """Joules since the previous call. Default: poll once more and drain the accumulator."""
        self._poll()
        joules, self._acc = self._acc, 0.0
        return joules

    def _phase_extra(self, phase: str, seconds: float, bytes_up: int, bytes_down: int) -> float:
        """Joules to add when a phase stops (the model meter adds radio energy per byte here)."""
        return 0.0

    # --- public API -----------------------------------------------------------------------------
    def _run(self, interval_s: float) -> None:
        while not self._stop.wait(interval_s):
            try:
                with self._lock:
                    self._poll()
            except (OSError, ValueError, MeterError):
                continue  # a transient read error loses one sample; the next poll integrates across it

    def _settle(self) -> None:
        joules = self._advance()
        self._totals[self._phase or "idle"] += joules
        if self._phase is not None:
            self._phase_j += joules

    @property
    def phase(self) -> str | None:
        return self._phase

    def start_phase(self, name: str) -> None:
        if name not in PHASES:
            raise MeterError(f"unknown phase {name!r}; use one of {list(PHASES)} (time outside phases is idle)")
        with self._lock:
            if self._phase is not None:
                raise MeterError(f"phase {self._phase!r} is still open; stop it before starting {name!r}")
            self._settle()
            self._phase, self._phase_j, self._phase_t0 = name, 0.0, self._clock()

    def stop_phase(self, *, bytes_up: int = 0, bytes_down: int = 0) -> float:
        """Close the open phase and return its joules."""
        return self._stop_phase(bytes_up, bytes_down)[0]

    def _stop_phase(self, bytes_up: int, bytes_down: int) -> tuple[float, float]:
        with self._lock:
            if self._phase is None:
                raise MeterError("stop_phase() without an open phase; call start_phase(name) first")
            self._settle()
            seconds = max(0.0, self._clock() - self._phase_t0)
            extra = self._phase_extra(self._phase, seconds, int(bytes_up), int(bytes_down))
            self._totals[self._phase] += extra
            joules = self._phase_j + extra
            self._phase, self._phase_j = None, 0.0
            return joules, seconds

    @contextmanager
    def measure(self, phase: str, *, bytes_up: int = 0, bytes_down: int = 0) -> Iterator[PhaseReading]:
        reading = PhaseReading(phase, bytes_up, bytes_down)
        self.start_phase(phase)
        try:
            yield reading
        finally:
            reading.joules, reading.seconds = self._stop_phase(reading.bytes_up, reading.bytes_down)

    def totals(self) -> EnergySplit:
        """Cumulative split since the meter opened (an open phase is counted up to now)."""
        with self._lock:
            self._settle()
            t = self._totals
            return EnergySplit(t["compute"], t["radio"], t["idle"])

    def snapshot(self) -> dict[str, float]:
        """`totals()` as a JSON-ready dict with the meter kind; diff two snapshots for an interval."""
        return {"kind": self.kind, **self.totals().as_dict()}  # type: ignore[dict-item]

    def take(self) -> EnergySplit:
        """The split since the previous `take()` (or since the meter opened)."""
        with self._lock:
            now = self.totals()
            delta, self._taken = now - self._taken, now
            return delta

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> Meter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class PowerMeter(Meter):
    """A meter over an instantaneous power reading, integrated with the trapezoid rule between samples."""

    def __init__(self, *, clock: Clock = time.monotonic, interval_s: float | None = 0.1) -> None:
        self._last_t = clock()
        self._last_w = self.read_watts()
        super().__init__(clock=clock, interval_s=interval_s)

    def read_watts(self) -> float:  # pragma: no cover - abstract in practice
        raise NotImplementedError

    def _poll(self) -> None:
        t, w = self._clock(), self.read_watts()
        self._acc += 0.5 * (w + self._last_w) * max(0.0, t - self._last_t)
        self._last_t, self._last_w = t, w
