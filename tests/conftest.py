"""Shared fixtures: a real Mosquitto broker on a free loopback port for the whole test session."""

from __future__ import annotations

import shutil

import pytest
import threadpoolctl
import torch

from fedfleet.coordinator.broker import MosquittoBroker

# tests host many agents and small models in one process: single-threaded math avoids thread pools
# spinning against each other on a 2-core machine (see fedfleet.coordinator.job.run.small_model_threads)
threadpoolctl.threadpool_limits(1)
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def mosquitto():
    if shutil.which("mosquitto") is None and shutil.which("/usr/sbin/mosquitto") is None:
        pytest.fail("mosquitto is not installed: apt-get install -y mosquitto (the tests need a real broker)")
    broker = MosquittoBroker()
    yield broker
    broker.stop()


# tests that need more than a few seconds on a 2-core machine (`-m "not slow"` skips them)
SLOW = {
    "tests/system/test_cluster.py", "tests/system/test_provision.py", "tests/tools/test_emulate.py",
    "tests/tools/test_bench_fuzz.py", "tests/tools/test_bench_scale_smoke.py", "tests/system/test_demo.py",
    "tests/tools/test_bench_ferret_smoke.py", "tests/system/test_hostile_corpus.py", "tests/system/test_serve_devices.py",
    "tests/system/test_resume.py", "tests/models/test_parity.py", "tests/models/test_models_onnx.py",
    "tests/system/test_pi_tutorial.py", "tests/system/test_traffic_proxy.py", "tests/system/test_aedes_cluster.py",
}


def pytest_collection_modifyitems(config, items):  # noqa: ARG001 - pytest's hook signature
    """Mark what needs a broker (`mqtt`: the Mosquitto fixture, or a system test) and what is slow, so that
    `pytest -m "not mqtt"` runs the unit tests alone."""
    for item in items:
        path = item.nodeid.split("::")[0]
        if "mosquitto" in getattr(item, "fixturenames", ()) or path.startswith("tests/system/"):
            item.add_marker(pytest.mark.mqtt)
        if path in SLOW:
            item.add_marker(pytest.mark.slow)
