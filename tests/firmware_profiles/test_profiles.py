"""Firmware profiles: every shipped TOML validates, carries a source per number, and bad files name file and field."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import tomllib

from fedfleet.firmware_profiles import directory
from fedfleet.firmware_profiles.schema import FIELDS, REFERENCE, Profile, available, load_profile, validate
from fedfleet.firmware_profiles.schema import ProfileError as ConfigError

REQUIRED = {"rpizero2w", "rpi3bplus", "rpi4b", "rpi5", "jetson-nano", "jetson-orin-nano"}


def _raw(name: str) -> dict:
    return tomllib.loads((directory() / f"{name}.toml").read_text())


def test_six_boards_are_shipped() -> None:
    assert REQUIRED <= set(available())


@pytest.mark.parametrize("name", sorted(REQUIRED))
def test_every_number_has_a_source(name: str) -> None:
    p = load_profile(name)
    assert isinstance(p, Profile) and p.name == name
    raw = _raw(name)
    for section, keys in FIELDS.items():
        for key in keys:
            entry = raw.get(section, {}).get(key)  # [published] is optional
            if entry is None or isinstance(entry, str):
                continue
            assert f"{section}.{key}" in p.sources, f"{name}: {section}.{key} has no source"
            assert len(p.sources[f"{section}.{key}"]) > 15


def test_reference_and_physics_are_sane() -> None:
    profiles = {n: load_profile(n) for n in REQUIRED}
    assert profiles[REFERENCE].speed == 1.0
    for p in profiles.values():
        assert p.cpu_active_w > p.idle_w > 0
        assert 0 <= p.loss < 1 and p.threads <= p.cpu_cores
        if p.gpu_active_w is not None:
            assert p.gpu_active_w >= p.cpu_active_w
    # a slower board needs longer for the same work; int8 helps
    assert profiles["rpizero2w"].compute_seconds(1.0) > profiles["rpi4b"].compute_seconds(1.0)
    assert profiles["rpi5"].compute_seconds(1.0, int8=True) < profiles["rpi5"].compute_seconds(1.0)
    jn = profiles["jetson-nano"]
    assert jn.gpu_active_w is not None and profiles["rpi4b"].gpu_active_w is None


def test_helpers_compute_with_the_profile_numbers() -> None:
    p = load_profile("rpi4b")
    assert p.transfer_seconds(1_000_000, up=True) == pytest.approx(8 / p.uplink_mbps + p.rtt_ms / 1000)
    assert p.radio_joules(2_000_000, 1_000_000) == pytest.approx(2 * p.radio_tx_j_per_mb + p.radio_rx_j_per_mb)


def test_load_by_path(tmp_path: Path) -> None:
    src = (directory() / "rpi5.toml").read_text()
    f = tmp_path / "rpi5.toml"
    f.write_text(src)
    assert load_profile(f).cpu_cores == 4
    assert load_profile(str(f)).path == f


def _broken(mutate) -> dict:
    d = copy.deepcopy(_raw("rpi4b"))
    mutate(d)
    return d


@pytest.mark.parametrize(
    ("mutate", "field", "words"),
    [
        (lambda d: d["power"].__setitem__("idle_w", 2.7), "power.idle_w", "missing source"),
        (lambda d: d["power"]["idle_w"].__setitem__("source", ""), "power.idle_w", "source"),
        (lambda d: d["cpu"].pop("cores"), "cpu.cores", "missing"),
        (lambda d: d["cpu"]["cores"].__setitem__("value", 2.5), "cpu.cores", "whole number"),
        (lambda d: d["link"]["loss"].__setitem__("value", 1.5), "link.loss", "<= 1"),
        (lambda d: d["link"]["rtt_ms"].__setitem__("value", -1), "link.rtt_ms", ">= 0"),
        (lambda d: d["runtime"].__setitem__("preferred", "tensorrt"), "runtime.preferred", "onnxruntime"),
        (lambda d: d["runtime"]["threads"].__setitem__("value", 9), "runtime.threads", "exceed"),
        (lambda d: d["power"].__setitem__("idle_watts", {"value": 1, "source": "typo'd key here"}),
         "power.idle_watts", "unknown key"),
        (lambda d: d["platform"]["python"].__setitem__("value", "python3"), "platform.python", "3.11"),
        (lambda d: d["compute"]["speed"].__setitem__("value", "fast"), "compute.speed", "number"),
        (lambda d: d.pop("radio"), "radio", "missing section"),
    ],
)
def test_errors_name_file_and_field(mutate, field: str, words: str) -> None:
    with pytest.raises(ConfigError) as info:
        validate(_broken(mutate), "boards/rpi4b.toml")
    msg = str(info.value)
    assert "boards/rpi4b.toml" in msg and f"'{field}'" in msg and words in msg


def test_name_must_match_file_and_bad_toml_is_clear(tmp_path: Path) -> None:
    f = tmp_path / "myboard.toml"
    f.write_text((directory() / "rpi4b.toml").read_text())
    with pytest.raises(ConfigError, match=r"myboard\.toml: field 'name'"):
        load_profile(f)
    g = tmp_path / "bad.toml"
    g.write_text("schema = 1\nname = [unclosed\n")
    with pytest.raises(ConfigError, match=r"bad\.toml: not valid TOML"):
        load_profile(g)
    with pytest.raises(ConfigError, match="unknown profile 'rpi9'.*rpi4b"):
        load_profile("rpi9")
    with pytest.raises(ConfigError, match="not found"):
        load_profile(tmp_path / "absent.toml")


def test_schema_module_is_edge_safe() -> None:
    import subprocess
    import sys

    code = "import sys, fedfleet.firmware_profiles.schema as s; s.load_profile('rpi4b'); assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
