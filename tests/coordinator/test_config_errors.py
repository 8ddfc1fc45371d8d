"""Bad config through the real command lines: one line naming the field, exit code 2, no traceback, and
nothing started (the broker URL points at a closed port, so a job that got past the checks would fail
differently)."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest

from fedfleet.coordinator import strategies
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
    "private_method_toml": ('[job]\nmethod = "_robust"\n', [], "'method'"),
    "private_method_cli": (None, ["--method", "_byzantine"], "'method'"),
    "unknown_method_key": ("[method]\nmomentum = 0.9\n", [], "'momentum'"),
    "roster_slash": ('[job]\nroster = ["pi/01", "pi-02"]\n', [], "'roster'"),
    "roster_plus": ('[job]\nroster = ["pi+", "pi-02"]\n', [], "'roster'"),
    "roster_hash": ('[job]\nroster = ["pi-01", "#"]\n', [], "'roster'"),
    "roster_duplicate": ('[job]\nroster = ["pi-01", "pi-01"]\n', [], "'roster'"),
    "metrics_port_negative": (None, ["--metrics-port", "-1"], "--metrics-port"),
    "over_select_negative": ("[job]\nper_round = 4\nover_select = -0.1\n", [], "'over_select'"),
    "over_select_above_one": (None, ["--per-round", "4", "--over-select", "1.5"], "'over_select'"),
    "over_select_nan": ("[job]\nper_round = 4\nover_select = nan\n", [], "'over_select'"),
    "over_select_without_per_round": ("[job]\nover_select = 0.3\n", [], "'over_select'", "'per_round'"),
    "over_select_async": ('[job]\nper_round = 4\nover_select = 0.3\n[aggregation]\nmode = "async"\n', [],
                          "'over_select'", "async"),
}


@pytest.mark.parametrize("case", sorted(DEMO_CASES))
def test_demo_refuses_bad_config_with_one_line(tmp_path, case):
    text, extra, *needles = DEMO_CASES[case]
    args = ["demo", "--broker", NO_BROKER, "--rounds", "1", "--agents", "2", "--run-dir", str(tmp_path / "run"),
            *extra]
    if text is not None:
        args += ["--config", _toml(tmp_path, text)]
    _assert_one_line_error(_run("fedfleet.coordinator.cli", *args, cwd=tmp_path), *needles)
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
    strategies.check_method("robust_fedavg", {"lr": 0.1, "batch": 16, "byzantine": {"a": "sign_flip"}}, "test")
    strategies.check_method("ggeur", {"guide": "all", "target": 40}, "test")
    config.apply(cfg, {"roster": ["pi-01", "jetson_2.lab"], "alpha": 0, "deadline_s": 5}, "test")
    with pytest.raises(ConfigError, match="'lr'"):
        strategies.check_method("fedavg", {"lr": float("nan")}, "test")
    with pytest.raises(ConfigError, match="'refine_early_stop'"):
        strategies.check_method("lora_fair", {"refine_early_stop": 1}, "test")
    with pytest.raises(ConfigError, match="'guide'"):
        strategies.check_method("ggeur", {"guide": 1.5}, "test")
    with pytest.raises(ConfigError, match="'optimizer'"):
        strategies.check_method("fzoos", {"optimizer": "lion"}, "test")


@pytest.mark.parametrize("private", ["_byzantine", "_robust", "_lora", "_config", "base"])
def test_private_modules_are_not_methods(tmp_path, private):
    job = _toml(tmp_path, f'[job]\nmethod = "{private}"\n')
    with pytest.raises(ConfigError, match="field 'method'") as err:
        config.load(job)
    assert "\n" not in str(err.value) and "fedavg" in str(err.value) and "_robust" not in str(err.value).split("got")[0]
    with pytest.raises(ConfigError, match="field 'method'"):
        strategies.spec(private)
    assert private not in strategies.available()


def test_a_private_method_is_refused_at_load_by_the_command_line(tmp_path):
    args = ["demo", "--broker", NO_BROKER, "--rounds", "1", "--agents", "2", "--run-dir", str(tmp_path / "run"),
            "--config", _toml(tmp_path, '[job]\nmethod = "_byzantine"\n')]
    _assert_one_line_error(_run("fedfleet.coordinator.cli", *args, cwd=tmp_path), "'method'", "fedavg")
    assert not (tmp_path / "run").exists()


def test_an_unknown_method_key_is_refused_naming_the_methods_fields(tmp_path):
    with pytest.raises(ConfigError, match="unknown field 'momentum' for method 'fedavg'") as err:
        config.load(_toml(tmp_path, "[method]\nmomentum = 0.9\n"))
    assert "batch, epochs, local_steps, lr, optimizer, server_lr, weight_decay" in str(err.value)
    with pytest.raises(ConfigError, match="unknown field 'epochs' for method 'ferret'"):
        config.load(_toml(tmp_path, '[job]\nmethod = "ferret"\n[method]\nepochs = 2\n'))
    r = _run("fedfleet.coordinator.cli", "demo", "--broker", NO_BROKER, "--rounds", "1", "--agents", "2", "--run-dir",
             str(tmp_path / "run"), "--config", _toml(tmp_path, "[method]\nlearning_rate = 0.1\n"), cwd=tmp_path)
    _assert_one_line_error(r, "'learning_rate'", "lr")


def test_a_job_whose_method_changes_after_load_is_checked_when_its_strategy_is_configured():
    job = config.JobConfig(method="fedzo", method_config={"epochs": 3})  # fedavg's field, not FedZO's
    with pytest.raises(ConfigError, match="unknown field 'epochs' for method 'fedzo'"):
        strategies.method_config(job)


# today's per-method defaults for the demo's digits head, written out (what agents have always been sent)
_ZO_HEAD = {"objective": "macro_f1", "zo_tensors": ["fc1.weight", "fc1.bias"], "zo_path": "runtime"}
EXPECTED_DEFAULTS = {
    "fedavg": {"lr": 0.1, "epochs": 2, "batch": 16},
    "fedzo": {**_ZO_HEAD, "lr": 0.3, "mu": 3.0, "directions": 20, "local_steps": 10, "optimizer": "sgd",
              "basis": "sphere", "scale": "d"},
    "fot": {"lr": 0.05, "epochs": 1, "batch": 16, "weight_decay": 1e-5, "eps": 0.95, "eps_inc": 0.0},
    "fzoos": {**_ZO_HEAD, "lr": 1.0, "optimizer": "sgd", "local_steps": 10, "gp_restarts": 2,
              "explore_radius": 0.05, "init_radius": 0.05, "rff_features": 2000},
    "ggeur": {"lr": 0.1, "epochs": 5, "batch": 16, "guide": 0.8, "shrinkage": 0.1, "target": "global"},
    "ferret": {"k": 100, "pool": "round", "local_steps": 10, "lr": 0.1, "batch": 32, "server_lr": 1.0},
    "fedit": {"lr": 0.05, "epochs": 2, "batch": 32},
    "flora": {"lr": 0.05, "epochs": 2, "batch": 32},
    "lora_fair": {"lr": 0.05, "epochs": 2, "batch": 32, "lam": 0.01, "refine_lr": 0.01,
                  "refine_iterations": 1000, "refine_early_stop": False},
    "fedamd": {}, "monna": {}, "robust_fedavg": {},
}
FEDZIP = {"name": "fedzip", "z": 0.03, "k": 3, "encoding": "e4", "error_feedback": True}


@pytest.mark.parametrize("method", sorted(EXPECTED_DEFAULTS))
def test_each_strategys_config_defaults_are_todays(method):
    cls = strategies.spec(method)
    defaults = {f.name: getattr(cls.Config(), f.name) for f in dataclasses.fields(cls.Config)}
    for key, value in EXPECTED_DEFAULTS[method].items():
        assert defaults[key] == value and type(defaults[key]) is type(value), (key, defaults[key])
    mc = strategies.method_config(config.JobConfig(method=method))
    uplink = FEDZIP if method == "fedavg" else {"name": "none"}
    assert mc == {**EXPECTED_DEFAULTS[method], "uplink": uplink}
    assert list(mc) == [*EXPECTED_DEFAULTS[method], "uplink"]  # the same keys in the same order: the same bytes
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(cls.Config(), next(iter(defaults)), None)


def test_method_config_layers_task_defaults_and_the_job_table():
    job = config.JobConfig(method="fedavg", method_config={"epochs": 4}, uplink={"name": "zstd"})
    assert strategies.method_config(job) == {"lr": 0.1, "epochs": 4, "batch": 16, "uplink": {"name": "zstd"}}
    job = config.JobConfig(task=config.DIFFUSION_TASK, method_config={"lr": 0.002})
    assert strategies.method_config(job) == {"lr": 0.002, "epochs": 2, "batch": 64, "optimizer": "adam",
                                             "uplink": FEDZIP}
    assert strategies.method_config(config.JobConfig(), task_defaults={"epochs": 9})["epochs"] == 9


def test_what_each_method_trains_comes_from_its_strategy():
    from fedfleet.edge_agent import learners

    assert strategies.available() == sorted(EXPECTED_DEFAULTS)
    for method in strategies.available():
        cls = strategies.spec(method)
        assert cls.learner in learners.available(), (method, cls.learner)
        assert learners.create(cls.learner).name == cls.learner
    assert strategies.spec("robust_fedavg").learner == "fedavg"
    lora = [m for m in strategies.available() if strategies.spec(m).package_mode == "lora"]
    assert lora == ["fedit", "flora", "lora_fair"]
    assert [m for m in strategies.available() if strategies.spec(m).linear_head] == ["ggeur"]
    assert {m: strategies.spec(m).continual for m in strategies.available() if strategies.spec(m).continual} == {
        "fedavg": True, "fot": "required"}
    assert strategies.head_hidden(config.JobConfig(method="ggeur")) == 0
    assert strategies.head_hidden(config.JobConfig(method="fedavg", dataset="mnist")) == 128
    assert strategies.head_hidden(config.JobConfig(method="ggeur", hidden=16)) == 16
    assert strategies.package_mode(config.JobConfig(method="flora")) == "lora"
    with pytest.raises(ConfigError, match="'mode': 'lora' packages train with fedit, flora, lora_fair"):
        strategies.package_mode(config.JobConfig(method="fedzo", mode="lora"))


def test_loading_a_job_imports_no_torch(tmp_path):
    job = _toml(tmp_path, '[job]\nmethod = "fedzo"\nrounds = 3\n')
    code = ("import sys; from fedfleet.coordinator.job import config; config.load(sys.argv[1]); "
            "from fedfleet.coordinator import strategies; print(strategies.available()[0], 'torch' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code, job], capture_output=True, text=True, timeout=120)
    assert r.stdout.split() == ["fedamd", "False"], r.stderr[-2000:]
