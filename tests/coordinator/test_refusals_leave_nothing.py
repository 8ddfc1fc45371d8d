"""Config accepted that should not be, and refused commands that left debris (issue items 15 and 16): every
codec parameter has a range and unknown codec fields are errors naming them; `--roster ','` is refused; a
refused `serve` or `demo` leaves no run directory behind."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from fedfleet.coordinator.job import config
from fedfleet.edge_agent.errors import ConfigError
from fedfleet.edge_agent.wire import signing


@pytest.mark.parametrize("spec, needle", [
    ({"name": "zstd", "level": 999}, "field 'level' of codec 'zstd' must be an integer from 1 to 22, got 999"),
    ({"name": "zstd", "level": 0}, "field 'level'"),
    ({"name": "zstd", "level": True}, "field 'level'"),
    ({"name": "zstd", "speed": 1}, "unknown field 'speed' for codec 'zstd'"),
    ({"name": "none", "z": 0.1}, "unknown field 'z' for codec 'none'"),
    ({"name": "ferret", "k": 1}, "unknown field 'k' for codec 'ferret'"),
    ({"name": "fedzip", "error_feedback": 2}, "field 'error_feedback'"),
    ({"name": "fedzip", "zstd_level": 99}, "zstd_level"),
    ({"name": "fedzip", "zz": 1}, "unknown field(s) zz"),
])
def test_every_codec_parameter_has_a_range_and_unknown_fields_are_errors(spec, needle):
    with pytest.raises(ConfigError) as err:
        config.check_codec(spec, "[uplink]")
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_good_codec_specs_pass():
    for spec in ({"name": "zstd"}, {"name": "zstd", "level": 22}, {"name": "none"}, {"name": "ferret"},
                 {"name": "fedzip", "z": 0.03, "k": 3, "encoding": "e4", "error_feedback": True}):
        assert config.check_codec(spec, "[uplink]") == spec


def test_an_uplink_table_with_an_unknown_key_is_refused_naming_it(tmp_path):
    path = tmp_path / "job.toml"
    path.write_text('[uplink]\nname = "zstd"\nlevel = 3\nfast = true\n')
    with pytest.raises(ConfigError, match="unknown field 'fast' for codec 'zstd'"):
        config.load(path)


def test_an_empty_roster_is_refused():
    with pytest.raises(ConfigError, match="field 'roster' must be a non-empty list"):
        config.apply(config.JobConfig(), {"roster": []}, "--roster")


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fedfleet.coordinator.cli", *args], capture_output=True, text=True,
                          timeout=180, cwd=cwd)


@pytest.fixture
def keys(tmp_path):
    secret = tmp_path / "fleet.secret"
    secret.write_text("ab" * 32 + "\n")
    secret.chmod(0o600)
    key = tmp_path / "coordinator.key"
    signing.write_private_key_file(key, signing.new_signing_seed())
    return secret, key


@pytest.mark.parametrize("broker, extra, needle", [
    ("http://x", [], "broker URL 'http://x'"),
    ("mqtt://127.0.0.1:99999", [], "bad port"),
    ("mqtt://127.0.0.1:1", ["--roster", ","], "'roster'"),
    ("mqtt://127.0.0.1:1", ["--config", "mnist.toml"], "mnist"),
])
def test_a_refused_serve_leaves_no_run_directory(tmp_path, keys, broker, extra, needle):
    secret, key = keys
    (tmp_path / "mnist.toml").write_text('[job]\ndataset = "mnist"\nmode = "transfer"\n')
    r = _cli("serve", "--broker", broker, "--secret-file", str(secret), "--signing-key-file", str(key),
             "--run-dir", str(tmp_path / "run"), "--wait", "1", *extra, cwd=tmp_path)
    err = r.stderr.strip()
    assert r.returncode == 2 and "Traceback" not in err and "\n" not in err and needle in err, err
    assert not (tmp_path / "run").exists(), sorted(p.name for p in (tmp_path / "run").iterdir())


def test_serve_that_cannot_reach_its_broker_leaves_no_run_directory_and_warns_about_a_shared_secret(tmp_path, keys):
    secret, key = keys
    secret.chmod(0o644)  # as `head -c 32 /dev/urandom | xxd -p > fleet.secret` leaves it under umask 022
    r = _cli("serve", "--broker", "mqtt://127.0.0.1:1", "--secret-file", str(secret), "--signing-key-file", str(key),
             "--run-dir", str(tmp_path / "run"), "--wait", "1", cwd=tmp_path)
    assert r.returncode != 0
    assert f"--secret-file {secret} is readable by others (mode 0644)" in r.stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("broker, extra", [("bogus", []), ("memory", ["--config", "mnist.toml"])])
def test_a_refused_demo_leaves_no_run_directory(tmp_path, broker, extra):
    (tmp_path / "mnist.toml").write_text('[job]\ndataset = "mnist"\nmode = "transfer"\n')
    r = _cli("demo", "--broker", broker, "--rounds", "1", "--agents", "2", "--run-dir", str(tmp_path / "run"), *extra,
             cwd=tmp_path)
    err = r.stderr.strip()
    assert r.returncode == 2 and "Traceback" not in err and "\n" not in err, err
    assert not (tmp_path / "run").exists()
