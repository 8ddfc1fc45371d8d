"""The `jetson` meter: NVIDIA Jetson INA3221 power monitors in sysfs.

Two layouts exist:
- older L4T (JetPack 4, e.g. Jetson Nano): `<root>/sys/bus/i2c/drivers/ina3221x/<bus>-<addr>/iio:device<N>/`
  with `rail_name_<k>` and `in_power<k>_input` in mW (and `in_current<k>_input` mA, `in_voltage<k>_input` mV);
- newer L4T (JetPack 5/6, e.g. Orin): `<root>/sys/bus/i2c/drivers/ina3221/<bus>-<addr>/hwmon/hwmon<N>/`
  with `in<k>_label`, `in<k>_input` (bus mV) and `curr<k>_input` (mA); power is V x I.

Board power is the input rail (`POM_5V_IN`, `VDD_IN`, ...) when one exists, since the other rails are
parts of it; otherwise the sum of all rails (a lower bound: regulators and peripherals are not seen).
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from pathlib import Path

from fedfleet.edge_agent.meters._base import Clock, MeterError, PowerMeter

OLD_GLOB = "sys/bus/i2c/drivers/ina3221x/*/iio:device*"
NEW_GLOB = "sys/bus/i2c/drivers/ina3221/*/hwmon/hwmon*"
_INPUT_RAIL = re.compile(r"(^|_)(5V_)?IN$|^VDD_IN$|^POM_5V_IN$")


@dataclass(frozen=True)
class Rail:
    name: str
    files: tuple[Path, ...]  # (power_mW,) for the old layout; (bus_mV, current_mA) for the new one

    def watts(self) -> float:
        vals = []
        for f in self.files:
            try:
                vals.append(float(f.read_text().strip()))
            except (OSError, ValueError) as exc:
                raise MeterError(f"cannot read rail {self.name} from {f}: {exc}") from exc
        if len(vals) == 1:
            return vals[0] / 1e3
        return vals[0] * vals[1] / 1e6


def _old_rails(dev: Path) -> list[Rail]:
    rails = []
    for name_file in sorted(dev.glob("rail_name_*")):
        k = name_file.name.rsplit("_", 1)[1]
        power = dev / f"in_power{k}_input"
        if power.exists():
            rails.append(Rail(name_file.read_text().strip(), (power,)))
    return rails


def _new_rails(dev: Path) -> list[Rail]:
    rails = []
    for label in sorted(dev.glob("in*_label")):
        k = label.name[2:-len("_label")]
        volts, amps = dev / f"in{k}_input", dev / f"curr{k}_input"
        name = label.read_text().strip()
        if volts.exists() and amps.exists() and "sum" not in name.lower():
            rails.append(Rail(name, (volts, amps)))
    return rails


def find_rails(root: str | Path = "/") -> list[Rail]:
    """Every INA3221 rail under `root`, from either layout."""
    base = Path(root)
    rails: list[Rail] = []
    for dev in sorted(base.glob(OLD_GLOB)):
        rails += _old_rails(dev)
    for dev in sorted(base.glob(NEW_GLOB)):
        rails += _new_rails(dev)
    return rails


def board_rails(rails: list[Rail]) -> list[Rail]:
    """The rails whose sum is the board power: the input rail alone if present, else all."""
    inputs = [r for r in rails if _INPUT_RAIL.search(r.name.upper())]
    return inputs[:1] or rails


class JetsonMeter(PowerMeter):
    kind = "jetson"

    def __init__(self, root: str | Path = "/", *, clock: Clock = time.monotonic,
                 interval_s: float | None = 0.1) -> None:
        self.rails = find_rails(root)
        if not self.rails:
            raise MeterError(
                f"no INA3221 rails under {Path(root) / 'sys/bus/i2c/drivers'} (looked for ina3221x/*/iio:device* "
                "and ina3221/*/hwmon/hwmon*): not a Jetson, or the driver is not bound; use --meter model"
            )
        self.used = board_rails(self.rails)
        super().__init__(clock=clock, interval_s=interval_s)

    def read_rails(self) -> dict[str, float]:
        """Watts per rail, every rail found."""
        return {r.name: r.watts() for r in self.rails}

    def read_watts(self) -> float:
        return sum(r.watts() for r in self.used)
