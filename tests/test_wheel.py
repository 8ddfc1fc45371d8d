"""A wheel built from the checkout installs only the `fedfleet` import name (plus its console scripts and the
`fedfleet.commands` entry points the coordinator's CLI finds the tools through), and its edge install (the core
dependencies, `[edge]`) runs the agent in a fresh virtual environment without torch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EDGE_BUDGET_MB = 300  # the edge install's site-packages; torch alone would be several times this


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                    str(out), str(ROOT)], check=True, timeout=300, capture_output=True)
    (built,) = out.glob("fedfleet-*.whl")
    return built


def test_wheel_installs_only_the_fedfleet_namespace(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names}
    assert tops == {"fedfleet", wheel.name.split("-")[0] + "-" + wheel.name.split("-")[1] + ".dist-info"}, tops
    packages = {n.split("/")[1] for n in names if n.startswith("fedfleet/") and n.count("/") >= 2}
    assert packages == {"coordinator", "edge_agent", "firmware_profiles", "models", "tools"}, packages
    assert not any(n == "fedfleet/__init__.py" for n in names)  # a namespace: other distributions may add to it
    entry = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    text = zipfile.ZipFile(wheel).read(entry).decode()
    for line in ("fedfleet = fedfleet.coordinator.cli:main", "fedfleet-agent = fedfleet.edge_agent.cli:main",
                 "bench = fedfleet.tools.bench:main", "emulate = fedfleet.tools.emulate.run:main"):
        assert line in text, text
    # the shipped data files travel with it: the backbone artifacts, the firmware profiles
    assert "fedfleet/models/artifacts/digits-backbone-int8.onnx" in names
    assert any(n.startswith("fedfleet/firmware_profiles/") and n.endswith((".toml", ".yaml", ".json")) for n in names)
    assert {"fedfleet/models/datasets/digits.csv.gz", "fedfleet/models/datasets/mnist_5k.csv.gz",
            "fedfleet/models/datasets/README.md"} <= set(names)
    meta = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    core = [ln.split(": ", 1)[1] for ln in meta.splitlines() if ln.startswith("Requires-Dist:") and "extra ==" not in ln]
    assert {c.split(">")[0].split(";")[0] for c in core} >= {"click", "numpy", "onnxruntime", "paho-mqtt", "zstandard",
                                                             "cryptography"}, core
    assert not any(c.startswith("torch") for c in core)
    assert "Provides-Extra: edge" in meta and 'torch>=' in meta and "torch==" not in meta  # a range, CI pins it
    dev = [ln for ln in meta.splitlines() if 'extra == "all"' in ln]
    assert dev and not any(tool in " ".join(dev) for tool in ("dev", "pytest", "ruff", "hypothesis")), dev


def _site_packages_mb(env: Path) -> float:
    (site,) = env.glob("lib/python*/site-packages")
    tooling = ("pip", "setuptools", "_distutils_hack", "pkg_resources")  # what any venv has, not the install
    total = 0
    for path in site.rglob("*"):
        if path.is_file() and path.relative_to(site).parts[0].split("-")[0] not in tooling:
            total += path.stat().st_size
    return total / 2**20


@pytest.mark.slow
def test_the_edge_install_runs_the_agent_without_torch(wheel, tmp_path):
    """`pip install 'fedfleet-VERSION-py3-none-any.whl[edge]'` into a fresh virtual environment (no system
    site-packages, so nothing of this machine's torch): the agent's command runs, torch is absent, and a
    coordinator command says which extra it needs instead of a traceback."""
    env_dir = tmp_path / "edge"
    venv.EnvBuilder(with_pip=True, system_site_packages=False).create(env_dir)
    bin_dir = env_dir / "bin"
    clean = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    pip = subprocess.run([str(bin_dir / "python"), "-m", "pip", "install", "-q", f"{wheel}[edge]"],
                         capture_output=True, text=True, timeout=1500, env=clean, cwd=tmp_path)
    assert pip.returncode == 0, pip.stderr[-3000:]

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([*args], capture_output=True, text=True, timeout=300, env=clean, cwd=tmp_path)

    probe = run(str(bin_dir / "python"), "-c", "import importlib.util as u, json, fedfleet.edge_agent.cli as c; "
                "print(json.dumps([u.find_spec(m) is None for m in ('torch', 'sklearn', 'mlxtend')] + [c.__file__]))")
    assert probe.returncode == 0, probe.stderr[-2000:]
    *absent, where = json.loads(probe.stdout)
    assert absent == [True, True, True] and str(env_dir) in where, probe.stdout  # the wheel's, not the checkout's
    agent = run(str(bin_dir / "fedfleet-agent"), "--help")
    assert agent.returncode == 0 and "--broker" in agent.stdout and "--coordinator-key-file" in agent.stdout, agent
    version = run(str(bin_dir / "fedfleet-agent"), "--version")
    assert version.returncode == 0 and version.stdout.startswith("fedfleet-agent "), version
    demo = run(str(bin_dir / "fedfleet"), "demo", "--broker", "memory", "--rounds", "1", "--agents", "2", "--quiet",
               "--run-dir", str(tmp_path / "run"))
    err = demo.stderr.strip()
    assert demo.returncode == 1 and "Traceback" not in err and "\n" not in err, err
    assert "pip install 'fedfleet[coordinator]'" in err, err
    size = _site_packages_mb(env_dir)
    print(f"edge install: {size:.0f} MB in site-packages")
    assert size < EDGE_BUDGET_MB, size
