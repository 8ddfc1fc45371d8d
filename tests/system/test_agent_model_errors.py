"""An agent handed a broken or mismatched model package says so in its retained status and stays up; when a
good package arrives it loads it and takes tasks."""

from __future__ import annotations

import io
import json
import time
import zipfile

import pytest

from fedfleet.coordinator.job.config import JobConfig
from tests.support.fleet import package, start_fleet


def _corrupt(blob: bytes, member: str, data: bytes) -> bytes:
    src = zipfile.ZipFile(io.BytesIO(blob))
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as dst:
        for info in src.infolist():
            dst.writestr(info, data if info.filename == member else src.read(info.filename))
    return out.getvalue()


def _truncated_backbone(blob: bytes) -> bytes:
    return _corrupt(blob, "backbone.onnx", zipfile.ZipFile(io.BytesIO(blob)).read("backbone.onnx")[:500])


def _wrong_input_shape(blob: bytes) -> bytes:
    manifest = json.loads(zipfile.ZipFile(io.BytesIO(blob)).read("manifest.json"))
    manifest["input_shape"] = [784]
    return _corrupt(blob, "manifest.json", json.dumps(manifest).encode())


@pytest.mark.parametrize("breaker", [_truncated_backbone, _wrong_input_shape, lambda b: b[: len(b) // 2]])
def test_agent_reports_a_bad_package_and_recovers_with_a_good_one(mosquitto, tmp_path, breaker):
    good, _ = package(JobConfig(mode="transfer"))
    fleet = start_fleet(mosquitto.url, tmp_path, mode="transfer", rounds=1)
    try:
        fleet.coord.wait_for_agents(3, 30)
        fleet.coord.publish_package(breaker(good))
        with pytest.raises(TimeoutError, match="model_error"):
            fleet.coord.wait_for_agents(3, 3)
        assert all(a.link.connected.is_set() for a in fleet.agents.values())  # still up
        time.sleep(0.2)
        fleet.coord.publish_package(good)
        fleet.coord.wait_for_agents(3, 30)
        summary = fleet.coord.run_round(1)
    finally:
        fleet.close()
    assert summary.ok == 3
