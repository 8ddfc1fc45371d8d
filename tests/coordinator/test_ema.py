"""The server-side moving average of the global model (`fedfleet.coordinator.tasks.ema`): it follows the
aggregated state round by round while the agents keep receiving the state itself, it goes through a real
checkpoint and resume, a damaged average in a checkpoint is a one-line refusal, and the diffusion task sets
its decay from the centre's per-step decay and the local steps of a round."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fedfleet.coordinator.job import config
from fedfleet.coordinator.records.store import RunStore
from fedfleet.coordinator.strategies import build as build_strategy
from fedfleet.coordinator.strategies import create as create_strategy
from fedfleet.coordinator.strategies.base import ClientResult
from fedfleet.coordinator.tasks import diffusion
from fedfleet.coordinator.tasks.ema import EMAStrategy, decay_per_round
from fedfleet.edge_agent.errors import ConfigError
from fedfleet.models import pretrain_video_denoiser
from tests.support.checkpoints import damage_checkpoint

AGENTS = ["a-0", "a-1"]
META = {"strategy": "fedavg", "roster": AGENTS}


def _initial() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"w": torch.randn(3, 4, generator=g), "b": torch.randn(3, generator=g)}


def _wrapped(decay: float = 0.5) -> EMAStrategy:
    return EMAStrategy(create_strategy("fedavg", _initial(), lr=0.1), decay)


def _results(round: int) -> list[ClientResult]:
    rng = np.random.default_rng(round)
    return [ClientResult(a, {"w": rng.standard_normal((3, 4)).astype(np.float32),
                             "b": rng.standard_normal(3).astype(np.float32)}, samples=10 + i)
            for i, a in enumerate(AGENTS)]


def test_the_average_follows_the_global_state_and_the_agents_get_the_state_itself():
    s = _wrapped(0.5)
    expect = {k: v.clone() for k, v in _initial().items()}
    for r in (1, 2, 3):
        s.aggregate(r, 0, _results(r))
        expect = {k: 0.5 * expect[k] + 0.5 * s.global_state()[k] for k in expect}
        for k in expect:
            torch.testing.assert_close(s.ema_state()[k], expect[k])
    # the average lags the state; what is sent to the agents (and checkpointed as the state) is the state
    assert not torch.allclose(s.ema_state()["w"], s.global_state()["w"])
    spec = s.configure(4, 0, AGENTS)[AGENTS[0]]
    np.testing.assert_array_equal(spec.tensors["w"], s.global_state()["w"].numpy())
    assert s.tasks_carry_state and s.name == "fedavg" and s.phases == 1


def test_a_round_without_results_keeps_the_state_and_still_moves_the_average_towards_it():
    s = _wrapped(0.5)
    s.aggregate(1, 0, _results(1))
    before = {k: v.clone() for k, v in s.global_state().items()}
    ema = {k: v.clone() for k, v in s.ema_state().items()}
    s.aggregate(2, 0, [])
    torch.testing.assert_close(s.global_state()["w"], before["w"])
    torch.testing.assert_close(s.ema_state()["w"], 0.5 * ema["w"] + 0.5 * before["w"])


def _committed_run(tmp_path, rounds: int = 2) -> EMAStrategy:
    store = RunStore(tmp_path)
    store.start_run("r", META)
    s = _wrapped(0.5)
    for r in range(1, rounds + 1):
        for a in AGENTS:
            store.ledger.record("r", r, a, "ok", bytes_up=10)
        s.aggregate(r, 0, _results(r))
        store.save_checkpoint("r", r, s, rng=np.random.default_rng(5).bit_generator.state, bytes_up=100 * r,
                              bytes_down=50 * r, summary={"accuracy": 0.1 * r, "loss": 1.0}, downlink=None)
        store.ledger.record_round("r", r, accuracy=0.1 * r, loss=1.0)
    store.close()
    return s


def test_a_resumed_run_continues_the_average_from_its_checkpoint(tmp_path):
    saved = _committed_run(tmp_path)
    fresh = _wrapped(0.5)
    store = RunStore(tmp_path)
    try:
        at = store.resume_run("r", META, fresh)
    finally:
        store.close()
    assert at.round == 2
    for k in saved.ema_state():
        torch.testing.assert_close(fresh.ema_state()[k], saved.ema_state()[k])
        torch.testing.assert_close(fresh.global_state()[k], saved.global_state()[k])
    assert not torch.allclose(fresh.ema_state()["w"], _initial()["w"])


@pytest.mark.parametrize(("change", "needle"), [
    (lambda e: e.pop("ema"), "extra.ema"),
    (lambda e: e["ema"].pop("b"), "extra.ema"),
    (lambda e: e["ema"].__setitem__("w", torch.zeros(4, 3)), "extra.ema"),
    (lambda e: e["ema"].__setitem__("w", torch.full((3, 4), math.nan)), "NaN or infinite"),
])
def test_a_damaged_average_in_a_checkpoint_is_a_one_line_refusal(tmp_path, change, needle):
    _committed_run(tmp_path)
    damage_checkpoint(tmp_path, change)  # booked, as a file damaged before its commit would be
    store = RunStore(tmp_path)
    try:
        with pytest.raises(ConfigError) as err:
            store.resume_run("r", META, _wrapped(0.5))
    finally:
        store.close()
    assert needle in str(err.value) and str(tmp_path) in str(err.value) and "\n" not in str(err.value)


def test_decay_per_round_keeps_the_window_in_steps_and_refuses_nonsense():
    assert decay_per_round(0.995, 25) == pytest.approx(0.995 ** 25)
    assert decay_per_round(0.0, 3) == 0.0
    for bad in ((1.0, 5), (-0.1, 5), (0.9, 0)):
        with pytest.raises(ValueError):
            decay_per_round(*bad)
    with pytest.raises(ValueError):
        EMAStrategy(create_strategy("fedavg", _initial(), lr=0.1), 1.0)


@pytest.mark.parametrize("method_config", [{"local_steps": 25}, {"epochs": 2, "batch": 64}])
def test_the_diffusion_task_averages_over_the_centres_window_of_steps(method_config):
    job = config.JobConfig(task=config.DIFFUSION_TASK, rounds=3, agents=4, method_config=method_config)
    t = diffusion.DiffusionTask(job)
    wrapped = t.wrap_strategy(build_strategy(job, _initial()))
    clips = len(diffusion._clips(0)[0])
    steps = 25 if "local_steps" in method_config else 2 * math.ceil(clips / 4 / 64)
    assert wrapped.decay == pytest.approx(pretrain_video_denoiser.EMA ** steps)
