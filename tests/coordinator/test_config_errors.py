"""Bad config through the real command lines: one line naming the field, exit code 2, no traceback, and
nothing started (the broker URL points at a closed port, so a job that got past the checks would fail
differently)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from fedfleet.coordinator.job import config
from fedfleet.edge_agent.errors import ConfigError

NO_BROKER = "mqtt://127.0.0.1:1"  # nothing listens: a run that starts fails with a connection error (exit 1)


def _run(module: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, timeout=120,
                          cwd=Path.cwd())


def _assert_one_line_error(r: subprocess.CompletedProcess, *needles: str) -> None:
    err = r.stderr.strip()
    assert r.returncode == 2, (r.returncode, r.stdout[-500:], err[-2000:])
    assert "Traceback" not in err and "\n" not in err, err
    for needle in needles:
        assert needle in err, err


def _toml(tmp_path: Path, text: str) -> str:
    path = tmp_path / "job.toml"
    path.write_text(text)
    return str(path)


DEMO_CASES = {
    "alpha_inf": ("[job]\nalpha = inf\n", [], "'alpha'"),
    "deadline_inf": ("[job]\ndeadline_s = inf\n", [], "'deadline_s'"),
    "lr_text": ('[method]\nlr = "fast"\n', [], "'lr'"),
    "epochs_negative": ("[method]\nepochs = -1\n", [], "'epochs'"),
    "batch_zero": ("[method]\nbatch = 0\n", [], "'batch'"),
    "local_steps_float": ("[method]\nlocal_steps = 2.5\n", [], "'local_steps'"),
    "unknown_method_toml": ('[job]\nmethod = "fedsgdx"\n', [], "'method'"),
    "unknown_method_cli": (None, ["--method", "nosuchmethod"], "'method'"),
    "roster_slash": ('[job]\nroster = ["pi/01", "pi-02"]\n', [], "'roster'"),
    "roster_plus": ('[job]\nroster = ["pi+", "pi-02"]\n', [], "'roster'"),
    "roster_hash": ('[job]\nroster = ["pi-01", "#"]\n', [], "'roster'"),
    "roster_duplicate": ('[job]\nroster = ["pi-01", "pi-01"]\n', [], "'roster'"),
    "metrics_port_negative": (None, ["--metrics-port", "-1"], "--metrics-port"),
}


@pytest.mark.parametrize("case", sorted(DEMO_CASES))
def test_demo_refuses_bad_config_with_one_line(tmp_path, case):
    text, extra, needle = DEMO_CASES[case]
    args = ["demo", "--broker", NO_BROKER, "--rounds", "1", "--agents", "2", "--run-dir", str(tmp_path / "run"),
            *extra]
    if text is not None:
        args += ["--config", _toml(tmp_path, text)]
    _assert_one_line_error(_run("fedfleet.coordinator.cli", *args, cwd=tmp_path), needle)
    assert not (tmp_path / "run").exists(), "the job started before its config was checked"


def test_config_pointing_at_a_folder_is_one_line(tmp_path):
    r = _run("fedfleet.coordinator.cli", "demo", "--broker", NO_BROKER, "--config", str(tmp_path), cwd=tmp_path)
    _assert_one_line_error(r, str(tmp_path), "folder")


@pytest.mark.parametrize("roster", ["pi-01,pi/02", "pi-01,pi+", "pi-01,#", "pi-01,pi-01"])
def test_serve_refuses_bad_roster_ids(tmp_path, roster):
    r = _run("fedfleet.coordinator.cli", "serve", "--broker", NO_BROKER, "--secret-file", str(tmp_path / "absent"),
             "--signing-key-file", str(tmp_path / "absent.key"), "--roster", roster, "--metrics-port", "9", cwd=tmp_path)
    _assert_one_line_error(r, "'roster'")


def test_serve_refuses_a_negative_metrics_port(tmp_path):
    r = _run("fedfleet.coordinator.cli", "serve", "--broker", NO_BROKER, "--secret-file", str(tmp_path / "absent"),
             "--signing-key-file", str(tmp_path / "absent.key"), "--metrics-port", "-5", cwd=tmp_path)
    _assert_one_line_error(r, "--metrics-port")


@pytest.mark.parametrize("threads", ["-1", "0"])
def test_agent_refuses_non_positive_threads(tmp_path, threads):
    (tmp_path / "pi-01.key").write_text("00" * 32 + "\n")
    r = _run("fedfleet.edge_agent.cli", "--broker", NO_BROKER, "--id", "pi-01", "--key-file", str(tmp_path / "pi-01.key"), "--data",
             str(tmp_path / "absent.npz"), "--coordinator-key-file", str(tmp_path / "absent.pub"), "--threads", threads, cwd=tmp_path)
    _assert_one_line_error(r, "--threads")


def test_good_method_tables_and_registered_methods_pass():
    cfg = config.JobConfig()
    for method in ("fedavg", "fedzo", "fzoos", "fedamd", "monna", "robust_fedavg"):
        config.apply(cfg, {"method": method}, "test")
    config.check_method_table({"lr": 0.1, "epochs": 2, "batch": 16, "byzantine": {"a": "sign_flip"}}, "test")
    config.apply(cfg, {"roster": ["pi-01", "jetson_2.lab"], "alpha": 0, "deadline_s": 5}, "test")
    with pytest.raises(ConfigError, match="'lr'"):
        config.check_method_table({"lr": float("nan")}, "test")
    with pytest.raises(ConfigError, match="'seed'"):
        config.check_method_table({"seed": True}, "test")
