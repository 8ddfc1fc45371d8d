"""Packaging: the checkout's top-level folders install as subpackages of the one `fedfleet` namespace.

`edge_agent/` becomes `fedfleet.edge_agent`, `coordinator/` becomes `fedfleet.coordinator`, and so on: nothing is
installed as a top-level `tools` or `models`. Everything else is in pyproject.toml.
"""

from setuptools import find_packages, setup

FOLDERS = ("firmware_profiles", "edge_agent", "models", "coordinator", "tools")

packages = [f"fedfleet.{p}" for p in find_packages(include=[f"{f}*" for f in FOLDERS])]
setup(packages=packages, package_dir={f"fedfleet.{f}": f for f in FOLDERS})
