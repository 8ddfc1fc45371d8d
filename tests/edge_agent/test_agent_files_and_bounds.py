"""Corrupt agent state is set aside and the agent starts fresh (no crash loop); every numeric agent option
has bounds; a `--state-dir` that names a file is one line (issue items 9, 10 and 15)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from fedfleet.edge_agent import config_file
from fedfleet.edge_agent.agent import Agent, AgentConfig
from fedfleet.edge_agent.agent_config import max_threads
from fedfleet.edge_agent.errors import ConfigError
from fedfleet.edge_agent.learners import LocalData
from fedfleet.edge_agent.state import AgentState
from fedfleet.edge_agent.wire import protocol

KEY = bytes(32)


@pytest.mark.parametrize("text", ["[]", '{"rounds_done": 1e400}', '{"rounds_done": -3}', '{"done": [[1, 2]]}',
                                  '{"done": "x"}', '{"model_digest": 5}', '{"package_sent": "soon"}', "{not json",
                                  '"just a string"', "[" * 100_000])
def test_a_corrupt_state_file_is_set_aside_and_the_agent_starts_fresh(tmp_path, text):
    (tmp_path / "state.json").write_text(text)
    state = AgentState(tmp_path)
    assert (state.rounds_done, state.tasks_dropped, state.done, state.model_digest) == (0, 0, [], None)
    assert state.set_aside and "set aside as state.json.corrupt-" in state.set_aside and "\n" not in state.set_aside
    kept = [p.name for p in tmp_path.iterdir() if p.name.startswith("state.json.corrupt-")]
    assert len(kept) == 1 and (tmp_path / kept[0]).read_text() == text  # kept for a look, not deleted
    assert not (tmp_path / "state.json").exists()
    # the agent starts (no crash loop), and its status says what happened
    (tmp_path / "state.json").write_text(text)
    data = LocalData(np.zeros((4, 64), np.float32), np.zeros(4, np.int64))
    agent = Agent(AgentConfig("memory://x", "f", "a1", KEY, state_dir=str(tmp_path)), data)
    try:
        body = json.loads(protocol.open_envelope(agent._status_payload("online"), KEY)[1])
        assert agent.rounds_done == 0 and "started fresh" in body["warning"]
    finally:
        agent.link.stop(graceful=False)


def test_a_good_state_file_round_trips(tmp_path):
    state = AgentState(tmp_path)
    state.save([("r", 1, 0), ("r", 2, 0)], 2, 1)
    state.save_stamp("r", 1234.5)
    again = AgentState(tmp_path)
    assert (again.done, again.rounds_done, again.tasks_dropped, again.package_run, again.package_sent) == \
        ([("r", 1, 0), ("r", 2, 0)], 2, 1, "r", 1234.5)
    assert again.set_aside is None


def test_a_state_dir_that_is_a_file_is_a_config_error(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(ConfigError, match="not a directory"):
        AgentState(tmp_path / "f")


def test_fedfleet_agent_with_a_state_dir_that_is_a_file_is_one_line(tmp_path):
    (tmp_path / "pi-01.key").write_text("00" * 32 + "\n")
    (tmp_path / "coordinator.pub").write_text("11" * 32 + "\n")
    np.savez(tmp_path / "data.npz", x=np.zeros((4, 64), np.float32), y=np.zeros(4, np.int64))
    (tmp_path / "state").write_text("a file")
    r = subprocess.run([sys.executable, "-m", "fedfleet.edge_agent.cli", "--broker", "mqtt://127.0.0.1:1", "--id",
                        "pi-01", "--key-file", str(tmp_path / "pi-01.key"), "--coordinator-key-file",
                        str(tmp_path / "coordinator.pub"), "--data", str(tmp_path / "data.npz"), "--state-dir",
                        str(tmp_path / "state"), "--meter", "none"], capture_output=True, text=True, timeout=120)
    err = r.stderr.strip()
    assert r.returncode == 2 and "Traceback" not in err and "\n" not in err, err
    assert "--state-dir" in err and "not a directory" in err


@pytest.mark.parametrize("threads", [0, -1, 100_000, 2**62, 1.5, True])
def test_agent_threads_are_bounded_by_the_cores(threads):
    with pytest.raises(ConfigError, match="threads must be an integer from 1 to"):
        AgentConfig("memory://x", "f", "a1", KEY, threads=threads)


def test_agent_threads_within_the_bound_are_taken():
    assert AgentConfig("memory://x", "f", "a1", KEY, threads=max_threads()).threads == max_threads()
    assert max_threads() >= 4 * (os.cpu_count() or 1)


@pytest.mark.parametrize("skew", [-1.0, float("nan"), float("inf"), 86400.0, "300"])
def test_agent_max_skew_is_bounded(skew):
    with pytest.raises(ConfigError, match="max_skew_s"):
        AgentConfig("memory://x", "f", "a1", KEY, max_skew_s=skew)


@pytest.mark.parametrize("line, field", [("threads = 100000", "'threads'"), ("threads = 4611686018427387904", "'threads'"),
                                         ("log_max_bytes = 99999999999999", "'log_max_bytes'"),
                                         ("log_backups = 100000", "'log_backups'")])
def test_agent_toml_numbers_are_bounded(tmp_path, line, field):
    path = tmp_path / "agent.toml"
    path.write_text(line + "\n")
    with pytest.raises(ConfigError, match=field) as err:
        config_file.load(path)
    assert "must be an integer from" in str(err.value)
