"""Energy meters: phase accounting, the profile model, and real parsers on fake sysfs trees and recorded output."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fedfleet.edge_agent.meters import (
    EnergySplit,
    JetsonMeter,
    MeterError,
    ModelMeter,
    RaplMeter,
    Rpi5Meter,
    open_meter,
    parse_pmic,
)
from fedfleet.firmware_profiles.schema import load_profile

DATA = Path(__file__).parents[1] / "data"


class FakeClock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t

    def tick(self, seconds: float) -> None:
        self.t += seconds


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


# --- model meter and the phase bookkeeping --------------------------------------------------------------------


def test_model_meter_splits_compute_radio_idle(clock: FakeClock) -> None:
    p = load_profile("rpi4b")
    m = ModelMeter(p, clock=clock)
    clock.tick(2.0)  # idle
    with m.measure("compute") as r:
        clock.tick(3.0)
    assert r.joules == pytest.approx(3.0 * p.cpu_active_w) and r.seconds == pytest.approx(3.0)
    with m.measure("radio") as r:
        r.add_bytes(up=2_000_000, down=1_000_000)
        clock.tick(1.0)
    radio = 1.0 * p.idle_w + 2 * p.radio_tx_j_per_mb + 1 * p.radio_rx_j_per_mb
    assert r.joules == pytest.approx(radio)
    clock.tick(0.5)
    split = m.take()
    assert split.compute_j == pytest.approx(3.0 * p.cpu_active_w)
    assert split.radio_j == pytest.approx(radio)
    assert split.idle_j == pytest.approx(2.5 * p.idle_w)
    assert split.total_j == pytest.approx(split.compute_j + split.radio_j + split.idle_j)
    # take() resets, snapshot() stays cumulative
    clock.tick(1.0)
    assert m.take() == EnergySplit(0.0, 0.0, pytest.approx(p.idle_w))
    snap = m.snapshot()
    assert snap["kind"] == "model" and snap["idle_j"] == pytest.approx(3.5 * p.idle_w)
    assert split.ledger_fields()["energy_compute_j"] == split.compute_j


def test_model_meter_time_scale_gpu_and_booking(clock: FakeClock) -> None:
    p = load_profile("jetson-nano")
    slow = ModelMeter(p, clock=clock, time_scale=4.0)
    slow.start_phase("compute")
    clock.tick(1.0)
    assert slow.stop_phase() == pytest.approx(4.0 * p.cpu_active_w)
    gpu = ModelMeter(p, accelerator="gpu", clock=lambda: 0.0)  # a frozen clock: only booked phases count
    assert gpu.add("compute", 2.0) == pytest.approx(2.0 * p.gpu_active_w)
    assert gpu.add("radio", 0.0, bytes_up=1_000_000) == pytest.approx(p.radio_tx_j_per_mb)
    gpu.add("idle", 10.0)
    assert gpu.totals() == EnergySplit(pytest.approx(2.0 * p.gpu_active_w), pytest.approx(p.radio_tx_j_per_mb),
                                       pytest.approx(10.0 * p.idle_w))
    with pytest.raises(MeterError, match="no power.gpu_active_w"):
        ModelMeter(load_profile("rpi4b"), accelerator="gpu")


def test_phase_misuse_is_refused(clock: FakeClock) -> None:
    m = ModelMeter(load_profile("rpi5"), clock=clock)
    with pytest.raises(MeterError, match="unknown phase 'upload'"):
        m.start_phase("upload")
    with pytest.raises(MeterError, match="without an open phase"):
        m.stop_phase()
    m.start_phase("compute")
    with pytest.raises(MeterError, match="still open"):
        m.start_phase("radio")
    m.stop_phase()
    with pytest.raises(RuntimeError), m.measure("compute"):  # the phase closes even when the body fails
        raise RuntimeError("learner failed")
    assert m.phase is None


# --- Raspberry Pi 5 PMIC --------------------------------------------------------------------------------------


def test_pmic_parse_recorded_output() -> None:
    text = (DATA / "rpi5/pmic_read_adc_load.txt").read_text()
    reading = parse_pmic(text)
    assert len(reading.rails) == 12 and "EXT5V" not in reading.rails and "BATT" not in reading.rails
    assert reading.rails["VDD_CORE"] == pytest.approx(5.03652 * 0.8936988)
    expected = 0.0
    for line in text.splitlines():  # independent recomputation: pair X_A with X_V by name
        name, value = line.split()[0], float(line.split("=")[1][:-1])
        if name.endswith("_A"):
            volts = next(float(v.split("=")[1][:-1]) for v in text.splitlines() if v.split()[0] == name[:-2] + "_V")
            expected += value * volts
    assert reading.watts == pytest.approx(expected)
    assert 5.0 < reading.watts < 6.0 and reading.input_volts == pytest.approx(4.9245)


def test_pmic_parse_edge_cases() -> None:
    odd = parse_pmic((DATA / "rpi5/pmic_read_adc_odd.txt").read_text())
    assert set(odd.rails) == {"VDD_CORE", "DDR_VDDQ"}  # nan current and the mislabelled line are skipped
    assert odd.watts == pytest.approx(0.75012 * 0.88)
    with pytest.raises(MeterError, match="Command not registered.*Raspberry Pi 5"):
        parse_pmic((DATA / "rpi5/pmic_read_adc_not_pi5.txt").read_text())
    with pytest.raises(MeterError, match="empty output"):
        parse_pmic("")


def test_rpi5_meter_integrates_power_over_time(clock: FakeClock) -> None:
    load = (DATA / "rpi5/pmic_read_adc_load.txt").read_text()
    odd = (DATA / "rpi5/pmic_read_adc_odd.txt").read_text()
    outputs = iter([odd, odd, load, load, odd])
    calls: list[list[str]] = []

    def runner(cmd: list[str]) -> str:
        calls.append(cmd)
        return next(outputs)

    m = Rpi5Meter(runner, clock=clock, interval_s=None)
    w_idle, w_load = parse_pmic(odd).watts, parse_pmic(load).watts
    clock.tick(2.0)
    m.start_phase("compute")  # sample: idle power for 2 s
    clock.tick(1.0)
    j = m.stop_phase()  # sample: load; trapezoid between idle and load
    assert calls[0] == ["vcgencmd", "pmic_read_adc"]
    assert m.totals().idle_j == pytest.approx(2.0 * w_idle)
    assert j == pytest.approx(0.5 * (w_idle + w_load))
    clock.tick(1.0)
    assert m.take().idle_j == pytest.approx(2.0 * w_idle + 0.5 * (w_load + w_idle))


# --- Jetson INA3221 -------------------------------------------------------------------------------------------


def test_jetson_old_iio_layout(clock: FakeClock, tmp_path: Path) -> None:
    root = tmp_path / "nano"
    shutil.copytree(DATA / "sysfs/jetson-nano", root)
    m = JetsonMeter(root, clock=clock, interval_s=None)
    assert m.read_rails() == {"POM_5V_IN": 2.135, "POM_5V_GPU": 0.041, "POM_5V_CPU": 0.454}
    assert [r.name for r in m.used] == ["POM_5V_IN"]  # the input rail already contains the others
    with m.measure("compute"):
        clock.tick(1.0)
        dev = root / "sys/bus/i2c/drivers/ina3221x/6-0040/iio:device0"
        (dev / "in_power0_input").write_text("4135\n")
    assert m.totals().compute_j == pytest.approx(0.5 * (2.135 + 4.135))


def test_jetson_new_hwmon_layout(clock: FakeClock) -> None:
    m = JetsonMeter(DATA / "sysfs/jetson-orin-nano", clock=clock, interval_s=None)
    rails = m.read_rails()
    assert set(rails) == {"VDD_IN", "VDD_CPU_GPU_CV", "VDD_SOC"}  # the shunt-sum channel is not a rail
    assert m.read_watts() == pytest.approx(5.016 * 1.032)
    clock.tick(10.0)
    assert m.take().idle_j == pytest.approx(10 * 5.016 * 1.032)
    norail = JetsonMeter(DATA / "sysfs/jetson-norail", clock=clock, interval_s=None)
    assert norail.read_watts() == pytest.approx(1.5)


def test_jetson_background_sampling_and_missing_tree(tmp_path: Path) -> None:
    with JetsonMeter(DATA / "sysfs/jetson-orin-nano", interval_s=0.01) as m:
        time.sleep(0.1)
        assert m.totals().idle_j == pytest.approx(5.016 * 1.032 * 0.1, rel=0.6)
    with pytest.raises(MeterError, match="no INA3221 rails.*ina3221x"):
        JetsonMeter(tmp_path, interval_s=None)


# --- RAPL -----------------------------------------------------------------------------------------------------


def _zone(root: Path, n: int) -> Path:
    return root / f"sys/class/powercap/intel-rapl:{n}"


def test_rapl_counts_packages_and_unwraps(clock: FakeClock, tmp_path: Path) -> None:
    root = tmp_path / "rapl"
    shutil.copytree(DATA / "sysfs/rapl", root)
    m = RaplMeter(root, clock=clock, interval_s=None)
    assert m.domains == ["package-0", "package-1"]  # sub-zones and the mmio duplicate are not added
    (_zone(root, 0) / "energy_uj").write_text("4000000\n")  # +3 J
    (_zone(root, 1) / "energy_uj").write_text("2000000\n")  # +1 J
    (_zone(root, 0) / "intel-rapl:0:0/energy_uj").write_text("99000000\n")  # a sub-zone: ignored
    with m.measure("compute") as r:
        max_uj = 262143328850
        (_zone(root, 0) / "energy_uj").write_text(f"{max_uj - 500000}\n")
        m.totals()  # a poll between, as the background thread would do
        (_zone(root, 0) / "energy_uj").write_text("1500000\n")  # wrapped: +0.5 J then +1.5 J
    assert m.totals().idle_j == pytest.approx(4.0)
    assert r.joules == pytest.approx((max_uj - 500000 - 4000000) / 1e6 + 2.0)


def test_rapl_psys_alone_and_errors(clock: FakeClock, tmp_path: Path) -> None:
    root = tmp_path / "psys"
    shutil.copytree(DATA / "sysfs/rapl-psys", root)
    m = RaplMeter(root, clock=clock, interval_s=None)
    assert m.domains == ["psys"]
    (_zone(root, 0) / "energy_uj").write_text("9000005\n")
    (_zone(root, 1) / "energy_uj").write_text("2000010\n")
    assert m.take().idle_j == pytest.approx(2.0)
    with pytest.raises(MeterError, match="no RAPL zones.*--meter model"):
        RaplMeter(tmp_path / "empty", interval_s=None)
    if os.geteuid() != 0:  # root reads mode-000 files anyway
        (_zone(root, 1) / "energy_uj").chmod(0)
        with pytest.raises(MeterError, match="root only"):
            RaplMeter(root, interval_s=None)


# --- the factory ----------------------------------------------------------------------------------------------


def test_open_meter_auto_picks_what_exists(tmp_path: Path) -> None:
    assert isinstance(open_meter("auto", "rpi4b", root=DATA / "sysfs/jetson-nano", interval_s=1.0), JetsonMeter)
    assert isinstance(open_meter("auto", None, root=DATA / "sysfs/rapl", interval_s=1.0), RaplMeter)
    recorded = (DATA / "rpi5/pmic_read_adc_load.txt").read_text()
    m = open_meter("auto", "rpi5", root=tmp_path, runner=lambda cmd: recorded, interval_s=1.0)
    assert isinstance(m, Rpi5Meter)
    m.close()
    fallback = open_meter("auto", "rpizero2w", root=tmp_path)
    assert isinstance(fallback, ModelMeter) and fallback.profile.name == "rpizero2w"
    not_pi5 = (DATA / "rpi5/pmic_read_adc_not_pi5.txt").read_text()
    assert isinstance(open_meter("auto", "rpi4b", root=tmp_path, runner=lambda cmd: not_pi5), ModelMeter)
    with pytest.raises(MeterError, match="no hardware meter found.*--profile"):
        open_meter("auto", None, root=tmp_path)
    with pytest.raises(MeterError, match="needs a firmware profile"):
        open_meter("model")
    with pytest.raises(MeterError, match="unknown meter kind 'ina'"):
        open_meter("ina", "rpi4b")


def test_meters_are_edge_safe() -> None:
    code = "import sys, fedfleet.edge_agent.meters; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)
