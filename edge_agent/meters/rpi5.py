"""The `rpi5` meter: Raspberry Pi 5 PMIC rails from `vcgencmd pmic_read_adc`.

Output lines look like `  VDD_CORE_A current(7)=0.75012000A` and `  VDD_CORE_V volt(15)=0.89369880V`.
A rail with both a current (`_A`) and a voltage (`_V`) line contributes V x I; voltage-only lines
(`EXT5V_V`, `BATT_V`) are reported but not summed. The sum covers the PMIC's own outputs: it leaves out
what the 5 V input feeds directly (USB ports, fan, HATs) and conversion losses, so it reads below a
USB meter at the input; `scale` and `offset_w` let a board calibrated against one correct for that.
"""

from __future__ import annotations

import math
import re
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass

from fedfleet.edge_agent.meters._base import Clock, MeterError, PowerMeter

Runner = Callable[[list[str]], str]
COMMAND = ["vcgencmd", "pmic_read_adc"]
_LINE = re.compile(r"^\s*(?P<rail>\S+?)_(?P<kind>[AV])\s+(?P<what>current|volt)\(\d+\)=(?P<value>\S+?)(?P<unit>[AV])\s*$")


@dataclass(frozen=True)
class PmicReading:
    amps: dict[str, float]
    volts: dict[str, float]

    @property
    def rails(self) -> dict[str, float]:
        """Watts per rail that has both a current and a voltage."""
        return {r: self.amps[r] * self.volts[r] for r in sorted(self.amps) if r in self.volts}

    @property
    def watts(self) -> float:
        return sum(self.rails.values())

    @property
    def input_volts(self) -> float | None:
        return self.volts.get("EXT5V")


def parse_pmic(text: str) -> PmicReading:
    """Parse `vcgencmd pmic_read_adc` output. Raises MeterError when no rail has both A and V."""
    amps: dict[str, float] = {}
    volts: dict[str, float] = {}
    for line in text.splitlines():
        m = _LINE.match(line)
        if not m or (m["kind"] == "A") != (m["what"] == "current") or m["kind"] != m["unit"]:
            continue
        try:
            value = float(m["value"])
        except ValueError:
            continue
        if not math.isfinite(value):
            continue
        (amps if m["kind"] == "A" else volts)[m["rail"]] = value
    reading = PmicReading(amps, volts)
    if not reading.rails:
        head = text.strip().splitlines()[0] if text.strip() else "(empty output)"
        raise MeterError(
            f"`vcgencmd pmic_read_adc` gave no rail with both current and voltage (first line: {head!r}); "
            "this needs a Raspberry Pi 5 with current firmware (sudo rpi-eeprom-update / apt upgrade); "
            "otherwise use --meter model"
        )
    return reading


def run_vcgencmd(cmd: list[str]) -> str:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=5, check=False)
    except FileNotFoundError as exc:
        raise MeterError("vcgencmd not found: the rpi5 meter needs Raspberry Pi OS (package raspi-utils)") from exc
    except subprocess.TimeoutExpired as exc:
        raise MeterError("vcgencmd pmic_read_adc timed out after 5 s") from exc
    if out.returncode != 0:
        raise MeterError(f"vcgencmd pmic_read_adc failed ({out.returncode}): {out.stderr.strip() or out.stdout.strip()}")
    return out.stdout


class Rpi5Meter(PowerMeter):
    kind = "rpi5"

    def __init__(self, runner: Runner = run_vcgencmd, *, scale: float = 1.0, offset_w: float = 0.0,
                 clock: Clock = time.monotonic, interval_s: float | None = 0.25) -> None:
        if scale <= 0 or offset_w < 0:
            raise MeterError(f"scale must be > 0 and offset_w >= 0, got {scale} and {offset_w}")
        self.runner, self.scale, self.offset_w = runner, scale, offset_w
        self.last: PmicReading | None = None
        super().__init__(clock=clock, interval_s=interval_s)

    def read_watts(self) -> float:
        self.last = parse_pmic(self.runner(COMMAND))
        return self.last.watts * self.scale + self.offset_w
