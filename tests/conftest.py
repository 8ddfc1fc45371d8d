"""Shared fixtures: a real Mosquitto broker on a free loopback port for the whole test session."""

from __future__ import annotations

import shutil

import pytest

from tools.broker import MosquittoBroker


@pytest.fixture(scope="session")
def mosquitto():
    if shutil.which("mosquitto") is None and shutil.which("/usr/sbin/mosquitto") is None:
        pytest.fail("mosquitto is not installed: apt-get install -y mosquitto (the tests need a real broker)")
    broker = MosquittoBroker()
    yield broker
    broker.stop()
