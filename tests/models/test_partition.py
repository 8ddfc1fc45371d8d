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


# ---------------------------------------------------------------- sampled shards (fleets larger than the data set)
def test_iid_partition_with_more_agents_than_samples_is_an_error_not_empty_shards():
    with pytest.raises(ValueError, match="at most 30 agents"):
        datasets.partition_iid(30, 31, seed=0)
    with pytest.raises(ConfigError, match="'agents' = 2000.*shard_mode = 'sampled'"):
        shards(JobConfig(agents=2000, alpha=0.0))
    with pytest.raises(ConfigError, match="'agents' = 2000.*at most 143 agents.*shard_mode = 'sampled'"):
        shards(JobConfig(agents=2000))  # the default Dirichlet partition: its minimum of 10 per part


@pytest.mark.parametrize("alpha", [0.0, 0.5])
def test_sampled_shards_serve_ten_thousand_agents(train_y, alpha):
    parts = datasets.sample_shards(train_y, 10_000, alpha, seed=1)
    assert len(parts) == 10_000
    assert {len(p) for p in parts} == {10}  # 1,150 samples over 10,000 agents: the minimum of 10 each
    assert all(len(np.unique(p)) == len(p) for p in parts[:500])  # no repeat within an agent's shard
    every = np.concatenate(parts)
    assert every.min() >= 0 and every.max() < len(train_y)
    assert len(np.unique(every)) > 0.9 * len(train_y)  # shards overlap, and together cover the data set


def test_sampled_shards_are_per_agent_reproducible_and_skewed_by_alpha(train_y):
    a = datasets.sample_shards(train_y, 50, 0.5, seed=4, size=40)
    b = datasets.sample_shards(train_y, 80, 0.5, seed=4, size=40)  # a larger fleet: the first 50 shards are the same
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not np.array_equal(a[0], datasets.sample_shards(train_y, 50, 0.5, seed=5, size=40)[0])

    def top_share(ps: list[np.ndarray]) -> float:
        return float(np.median([np.bincount(train_y[p], minlength=10).max() / len(p) for p in ps]))

    iid = datasets.sample_shards(train_y, 50, 0.0, seed=4, size=40)
    assert top_share(a) > top_share(iid) + 0.1
    skewed = datasets.sample_shards(train_y, 20, 0.01, seed=4, size=500)  # one class rarely has 500 samples:
    assert all(len(p) == 500 and len(np.unique(p)) == 500 for p in skewed)  # the rest come from other classes
    with pytest.raises(ValueError, match="cannot be drawn"):
        datasets.sample_shards(train_y, 5, 0.0, seed=0, size=len(train_y) + 1)


def test_a_sampled_job_gives_every_agent_data_and_says_so(tmp_path):
    local, _ = shards(JobConfig(agents=2000, shard_mode="sampled"))
    assert len(local) == 2000 and min(len(d.y) for d in local) == 10
    from fedfleet.coordinator.tasks.classification import ClassificationTask

    task = ClassificationTask(JobConfig(agents=300, shard_mode="sampled", shard_size=25))
    assert {len(d.y) for d in task.shards(300)} == {25}
    said = task.summary(tmp_path, {})["shards"]
    assert said["mode"] == "sampled" and said["per_agent"] == 25 and not said["disjoint"]
    assert "with replacement across agents" in said["rule"]
    assert ClassificationTask(JobConfig(agents=10)).summary(tmp_path, {}) is None  # partitions add nothing


@pytest.mark.parametrize("args, needle", [
    (["--shard-mode", "sampled", "--shard-size", "5000"], "'shard_size' = 5000 exceeds"),
    (["--shard-size", "20"], "'shard_size' = 20 applies to shard_mode 'sampled'"),
    (["--shard-mode", "drawn"], "shard-mode"),
    (["--shard-mode", "sampled", "--task", "moving-digits-diffusion"], "'shard_mode'"),
])
def test_bad_sampled_shard_options_are_one_line(args, needle):
    proc = subprocess.run([sys.executable, "-m", "fedfleet.coordinator.cli", "demo", "--agents", "12", "--rounds", "1",
                           "--broker", "memory", "--report", "none", *args], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-1000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0] and "Traceback" not in proc.stderr, proc.stderr
