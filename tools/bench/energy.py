"""Benchmark: the energy model against published board measurements.

For every shipped firmware profile that carries an independent published measurement (`[published]` in its TOML:
figures from another source than the ones its `[power]` model uses), the model's whole-board watts are measured by
running the model meter (`fedfleet.edge_agent.meters.model.ModelMeter`) on a simulated clock: `--seconds` of
idle, then `--seconds` of a compute phase, each divided by its seconds. The error of each figure is
|model - published| / published; `max_error` is the largest over the profiles and figures. Decision rule,
written before the runs: a profile is included only if a figure was found in a published measurement other than
the one its model cites; no figure is adjusted after seeing the error. Profiles left out are listed, with why,
on stderr (`details:`). Radio: no published per-byte radio measurement of these boards was found, so radio is
not checked.

    fedfleet bench energy [--seconds 10] [--json PATH]
"""

from __future__ import annotations

from typing import Any

from fedfleet.edge_agent.cli_run import ArgParser
from fedfleet.edge_agent.meters.model import ModelMeter
from fedfleet.firmware_profiles.schema import Profile
from fedfleet.tools.bench.output import emit

KEYS = ("profiles", "max_error")


class _Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def model_watts(profile: Profile, seconds: float) -> tuple[float, float]:
    """(idle W, load W) the model meter books for `profile`: joules over a simulated `seconds` of each."""
    clock = _Clock()
    meter = ModelMeter(profile, clock=clock)
    meter.take()
    clock.t += seconds
    idle = meter.take().total_j / seconds
    with meter.measure("compute"):
        clock.t += seconds
    load = meter.take().total_j / seconds
    return idle, load


def run(seconds: float = 10.0) -> dict[str, Any]:
    from fedfleet.edge_agent.profiles import load_profile
    from fedfleet.firmware_profiles.schema import available

    profiles: dict[str, Any] = {}
    left_out: dict[str, str] = {}
    errors: list[float] = []
    for name in available():
        p = load_profile(name)
        if p.published_idle_w is None and p.published_load_w is None:
            left_out[name] = "no independent published measurement found (the [power] figures are its model's inputs)"
            continue
        idle, load = model_watts(p, seconds)
        entry = {"idle_w_model": round(idle, 4), "idle_w_published": p.published_idle_w,
                 "load_w_model": round(load, 4), "load_w_published": p.published_load_w,
                 "source": "; ".join(p.sources.get(k, "") for k in ("published.idle_w", "published.load_w")
                                     if p.sources.get(k)),
                 "model_source": "; ".join(p.sources.get(k, "") for k in ("power.idle_w", "power.cpu_active_w"))}
        for key, model, published in (("idle", idle, p.published_idle_w), ("load", load, p.published_load_w)):
            if published:
                entry[f"{key}_error"] = round(abs(model - published) / published, 4)
                errors.append(entry[f"{key}_error"])
        profiles[name] = entry
    return {"profiles": profiles, "max_error": max(errors) if errors else None, "left_out": left_out,
            "seconds": seconds, "radio": "not checked: no published per-byte radio measurement of these boards found"}


def main(argv: list[str] | None = None) -> int:
    ap = ArgParser(prog="fedfleet bench energy", description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=10.0, help="simulated seconds of idle and of load (default 10)")
    ap.add_argument("--json", dest="json_path", help="also write the JSON result here")
    args = ap.parse_args(argv)
    if not args.seconds > 0:
        ap.error("--seconds must be > 0")
    emit(run(args.seconds), KEYS, args.json_path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
