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
