"""A wheel built from the checkout installs only the `fedfleet` import name (plus its console scripts and the
`fedfleet.commands` entry points the coordinator's CLI finds the tools through)."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_installs_only_the_fedfleet_namespace(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                    str(tmp_path), str(ROOT)], check=True, timeout=300, capture_output=True)
    (wheel,) = tmp_path.glob("fedfleet-*.whl")
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
