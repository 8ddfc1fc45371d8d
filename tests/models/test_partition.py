"""Dirichlet partitions for any fleet size: every part gets its minimum, the skew is kept, errors are one line."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from fedfleet.coordinator.job.config import JobConfig
from fedfleet.coordinator.job.run import shards
from fedfleet.edge_agent.errors import ConfigError
from fedfleet.models import data as datasets


@pytest.fixture(scope="module")
def train_y() -> np.ndarray:
    train, _ = datasets.split(datasets.digits(), 0.2, seed=0)
    return train.y


@pytest.mark.parametrize("agents, alpha", [(100, 0.5), (100, 1.0), (100, 2.0), (143, 0.5)])
def test_large_fleets_get_a_partition_with_the_minimum(train_y, agents, alpha):
    parts = datasets.partition_dirichlet(train_y, agents, alpha, seed=3)
    assert len(parts) == agents
    assert min(len(p) for p in parts) >= 10
    every = np.concatenate(parts)
    assert len(every) == len(train_y) and len(np.unique(every)) == len(train_y)  # a partition: no loss, no copy
    # label skew survives the top-up: a part's largest class holds a bigger share than in IID parts of the
    # same size (median 0.21 at 100 parts), the more so the smaller alpha
    def top_share(ps: list[np.ndarray]) -> float:
        return float(np.median([np.bincount(train_y[p], minlength=10).max() / len(p) for p in ps]))

    iid = top_share(datasets.partition_iid(len(train_y), agents, seed=3))
    assert top_share(parts) > iid + (0.05 if alpha <= 1 else 0.0)


def test_small_fleets_draw_as_before(train_y):
    """When a draw meets the minimum the result is the plain Dirichlet draw (no top-up), reproducibly."""
    a = datasets.partition_dirichlet(train_y, 10, 0.5, seed=0)
    b = datasets.partition_dirichlet(train_y, 10, 0.5, seed=0)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert min(len(p) for p in a) >= 10


def test_an_impossible_partition_is_a_config_error_naming_agents():
    with pytest.raises(ConfigError, match="agents"):
        shards(JobConfig(agents=500))


def test_demo_with_too_many_agents_is_one_line_not_a_traceback():
    proc = subprocess.run([sys.executable, "-m", "fedfleet.coordinator.cli", "demo", "--agents", "500", "--rounds", "1"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "agents" in lines[0] and "Traceback" not in proc.stderr


def test_uplink_fedzip_preset_is_the_default_fedzip_configuration():
    from fedfleet.coordinator.job.config import uplink_preset
    from fedfleet.coordinator.strategies import spec

    fedzip = spec("fedavg").default_uplink
    assert uplink_preset("fedzip") == fedzip
    assert fedzip == {"name": "fedzip", "z": 0.03, "k": 3, "encoding": "e4", "error_feedback": True}
    with pytest.raises(ConfigError, match="preset"):
        uplink_preset("fedzap")
