"""Energy meters for the edge agent, split into compute, radio and idle phases. Never imports torch.

Kinds: `model` (from the firmware profile), `rapl` (Intel/AMD powercap sysfs), `jetson` (INA3221 rails
in sysfs), `rpi5` (`vcgencmd pmic_read_adc`), and `auto`, which picks the first hardware meter that
works (jetson, rpi5, rapl) and falls back to `model`. The sysfs root and the command runner are
injectable so tests run on fake trees and recorded outputs.

    meter = open_meter("auto", "rpi4b")
    with meter.measure("compute"):
        learn()
    with meter.measure("radio") as r:
        r.add_bytes(up=len(payload))
        send(payload)
    ledger.record(..., **meter.take().ledger_fields())
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

from fedfleet.edge_agent.meters._base import EnergySplit, Meter, MeterError, PhaseReading, PowerMeter
from fedfleet.edge_agent.meters.jetson import JetsonMeter
from fedfleet.edge_agent.meters.model import ModelMeter
from fedfleet.edge_agent.meters.rapl import RaplMeter
from fedfleet.edge_agent.meters.rpi5 import Rpi5Meter, Runner, parse_pmic, run_vcgencmd
from fedfleet.edge_agent.profiles import Profile, load_profile

__all__ = [
    "KINDS", "EnergySplit", "JetsonMeter", "Meter", "MeterError", "ModelMeter", "PhaseReading", "PowerMeter",
    "RaplMeter", "Rpi5Meter", "open_meter", "parse_pmic",
]
KINDS = ("auto", "model", "rapl", "jetson", "rpi5")


def _profile(profile: Profile | str | Path | None) -> Profile | None:
    if profile is None or isinstance(profile, Profile):
        return profile
    return load_profile(profile)


def open_meter(kind: str = "auto", profile: Profile | str | Path | None = None, *, root: str | Path = "/",
               runner: Runner | None = None, interval_s: float | None = None,
               clock=time.monotonic) -> Meter:
    """Open a meter by kind. `interval_s=None` keeps each kind's default sampling interval."""
    if kind not in KINDS:
        raise MeterError(f"unknown meter kind {kind!r}; use one of {list(KINDS)}")
    prof = _profile(profile)
    extra = {} if interval_s is None else {"interval_s": interval_s}
    if kind == "model":
        if prof is None:
            raise MeterError("the model meter needs a firmware profile: pass --profile NAME (e.g. rpi4b)")
        return ModelMeter(prof, clock=clock)
    if kind == "rapl":
        return RaplMeter(root, clock=clock, **extra)
    if kind == "jetson":
        return JetsonMeter(root, clock=clock, **extra)
    if kind == "rpi5":
        return Rpi5Meter(runner or run_vcgencmd, clock=clock, **extra)
    # auto: try hardware in order, fall back to the profile model
    failures = []
    for name in ("jetson", "rpi5", "rapl"):
        if name == "rpi5" and runner is None and (Path(root) != Path("/") or shutil.which("vcgencmd") is None):
            continue
        if name == "rapl" and os.name != "posix":
            continue
        try:
            return open_meter(name, prof, root=root, runner=runner, interval_s=interval_s, clock=clock)
        except MeterError as exc:
            failures.append(f"{name}: {exc}")
    if prof is None:
        raise MeterError("no hardware meter found and no profile for the model meter; pass --profile NAME. "
                         + " | ".join(failures))
    return ModelMeter(prof, clock=clock)
