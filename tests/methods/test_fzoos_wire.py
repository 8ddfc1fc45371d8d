"""FZooS's downlink is the spec's d + M + 1 floats per agent and round (x_r goes down once), and an agent's
query history stays bounded over a long run."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from fedfleet.coordinator.strategies import create as create_strategy
from fedfleet.coordinator.strategies.base import ClientResult
from fedfleet.edge_agent.errors import ConfigError
from fedfleet.edge_agent.learners import create as create_learner
from fedfleet.edge_agent.learners.base import LocalData, Task
from fedfleet.edge_agent.zo.objectives import quadratic_configs

EMPTY = LocalData(np.zeros((0, 1), np.float32), np.zeros(0, np.int64))
CHEAP = {"rff_features": 200, "local_steps": 3, "gp_restarts": 1, "gp_points": 40, "explore_candidates": 20,
         "refresh_candidates": 30, "refresh_pick": 10, "rff_points": 100}


def _round(st, learners, r, names, drop=()):
    """One FZooS round in process; returns {phase: {agent: floats sent down}}; `drop` agents never answer."""
    sent = {}
    for phase in (0, 1):
        tasks = st.configure(r, phase, names)
        sent[phase] = {a: sum(int(np.size(v)) for v in t.tensors.values()) for a, t in tasks.items()}
        results = []
        for a, t in tasks.items():
            if a in drop:
                continue
            cfg = json.loads(json.dumps(t.config))
            res = learners[a].learn(Task("run", r, "fzoos", cfg, dict(t.tensors), phase=phase), EMPTY, None)
            results.append(ClientResult(a, res.tensors, 1, res.metrics))
        st.aggregate(r, phase, results)
    return sent


def _setup(d: int, names: list[str], **over):
    cfgs = quadratic_configs(d, len(names), 0.5, seed=0)
    st = create_strategy("fzoos", {"x": torch.full((d,), 0.5)}, objective="quadratic", seed=0,
                         agent_config=dict(zip(names, cfgs)), **{**CHEAP, **over})
    return st, {a: create_learner("fzoos") for a in names}


def test_downlink_is_d_plus_m_floats_and_rho_per_round() -> None:
    d, m = 7, CHEAP["rff_features"]
    names = ["a", "b"]
    st, learners = _setup(d, names)
    first = _round(st, learners, 1, names)
    assert first[0] == {"a": d, "b": d} and first[1] == {"a": d, "b": d}  # no nu_bar yet
    for r in range(2, 5):
        sent = _round(st, learners, r, names)
        assert sent[0] == {"a": m, "b": m}  # only nu_bar: each agent holds x_{r-1} from phase 1
        assert sent[1] == {"a": d, "b": d}  # x_r, once; rho rides in the config (1 float)
        assert all(isinstance(st.rho[a], float) for a in names)
    # an agent that missed its phase-1 task gets x again in the next phase 0
    _round(st, learners, 5, names, drop={"b"})
    sent = _round(st, learners, 6, names)
    assert sent[0] == {"a": m, "b": m + d}


def test_a_task_that_leaves_out_x_the_agent_does_not_hold_is_refused() -> None:
    names = ["a"]
    st, learners = _setup(5, names)
    _round(st, learners, 1, names)
    tasks = st.configure(2, 0, names)
    assert "x" not in tasks["a"].tensors
    with pytest.raises(ConfigError, match="does not hold"):
        create_learner("fzoos").learn(Task("run", 2, "fzoos", tasks["a"].config, dict(tasks["a"].tensors)), EMPTY, None)


def test_history_stays_bounded_over_a_long_run() -> None:
    d, keep, rounds = 20, 150, 25
    names = ["a"]
    per_round = 1 + 3 + 5 * 2 + 1 + 10  # phase 0 (T = 3) + phase 1
    st, learners = _setup(d, names, history_points=keep)
    sizes = []
    for r in range(1, rounds + 1):
        _round(st, learners, r, names)
        sizes.append(len(learners["a"].xs))
    assert sizes[-1] == keep and max(sizes) <= keep  # pruned to the window after every refresh
    assert 10 + rounds * per_round > 2 * keep  # unbounded, it would hold this many
    with pytest.raises(ConfigError, match="history_points"):
        create_learner("fzoos").learn(Task("run", 1, "fzoos", {**CHEAP, "history_points": 50,
                                                               **quadratic_configs(d, 1, 0.5, 0)[0]},
                                           {"x": np.full(d, 0.5, np.float32)}), EMPTY, None)
