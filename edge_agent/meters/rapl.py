"""The `rapl` meter: Intel (and AMD) RAPL energy counters from the Linux powercap sysfs.

Reads `<root>/sys/class/powercap/intel-rapl:<n>/energy_uj` for every top-level zone (sub-zones such as
`intel-rapl:0:0` are parts of their package and are not added again). When a `psys` zone exists it
covers the whole platform including the packages, so it is used alone. Counters wrap at
`max_energy_range_uj`; a delta that goes backwards is unwrapped with that range. Poll at least once per
wrap period (minutes to hours, depending on power) - the background thread does that when
`interval_s` is set.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from pathlib import Path

from fedfleet.edge_agent.meters._base import Clock, Meter, MeterError

_TOP_ZONE = re.compile(r"intel-rapl:\d+$")


@dataclass
class _Zone:
    path: Path
    name: str
    max_uj: int
    last_uj: int


def _read_int(path: Path) -> int:
    try:
        return int(path.read_text().strip())
    except PermissionError as exc:
        raise MeterError(
            f"cannot read {path}: since Linux 5.10 energy_uj is readable by root only; run the agent as root, "
            f"or `sudo chmod o+r {path.parent}/energy_uj`, or use --meter model"
        ) from exc
    except (OSError, ValueError) as exc:
        raise MeterError(f"cannot read an integer from {path}: {exc}") from exc


def find_zones(root: str | Path = "/") -> list[Path]:
    base = Path(root) / "sys/class/powercap"
    if not base.is_dir():
        return []
    return sorted(p for p in base.iterdir() if _TOP_ZONE.fullmatch(p.name) and (p / "energy_uj").exists())


class RaplMeter(Meter):
    kind = "rapl"

    def __init__(self, root: str | Path = "/", *, clock: Clock = time.monotonic,
                 interval_s: float | None = 1.0) -> None:
        paths = find_zones(root)
        if not paths:
            raise MeterError(
                f"no RAPL zones under {Path(root) / 'sys/class/powercap'}: not an x86 host with powercap, or the "
                "intel_rapl_common module is not loaded; use --meter model"
            )
        zones = []
        for p in paths:
            name = (p / "name").read_text().strip() if (p / "name").exists() else p.name
            max_uj = _read_int(p / "max_energy_range_uj") if (p / "max_energy_range_uj").exists() else 0
            zones.append(_Zone(p, name, max_uj, _read_int(p / "energy_uj")))
        psys = [z for z in zones if z.name == "psys"]
        self.zones = psys or zones
        super().__init__(clock=clock, interval_s=interval_s)

    @property
    def domains(self) -> list[str]:
        return [z.name for z in self.zones]

    def _poll(self) -> None:
        total_uj = 0
        for z in self.zones:
            now = _read_int(z.path / "energy_uj")
            delta = now - z.last_uj
            if delta < 0:
                if z.max_uj <= 0:
                    raise MeterError(f"{z.path}/energy_uj went backwards and max_energy_range_uj is unknown")
                delta += z.max_uj
            z.last_uj = now
            total_uj += delta
        self._acc += total_uj / 1e6
