"""A tiny run of the MTVG benchmark: the fleet (or the in-process FedAvg) trains the centre's pre-trained conv
denoiser, it samples naive, MTVG and the ablations on same-digit prompts and random-digit prompts, times the
device path, and prints exactly the keys issues 16 and 25 name (the rest on the details line)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from fedfleet.tools.bench import mtvg as bench_mtvg
from fedfleet.tools.bench.output import details


def test_main_prompts_keep_the_digit_and_change_the_direction():
    conds = bench_mtvg.same_digit_prompts(50, 0)
    digit, direction = conds // 4, conds % 4
    assert conds.shape == (50, 3) and (digit == digit[:, :1]).all() and (direction[:, 1:] != direction[:, :-1]).all()
    assert len(np.unique(digit)) > 5
    new = bench_mtvg.digit_prompts(bench_mtvg.NEW_DIGITS, 9, 0)
    assert set((new // 4).ravel()) == {7, 8, 9}


@pytest.mark.parametrize("trainer", ["fleet", "inprocess"])
def test_bench_mtvg_smoke(tmp_path, capsys, mosquitto, trainer):
    out = tmp_path / "mtvg.json"
    assert bench_mtvg.main(["--quick", "--trainer", trainer, "--broker", mosquitto.url, "--json", str(out),
                            "--plot", str(tmp_path / "seq.png")]) == 0
    result = json.loads(out.read_text())
    assert set(result) == set(bench_mtvg.KEYS)
    captured = capsys.readouterr()
    assert json.loads(captured.out) == result
    assert result["segments"] == 12 and result["fl_rounds"] == 1
    for key in bench_mtvg.KEYS[1:7]:
        assert 0.0 <= result[key] <= 4.0
    for key in bench_mtvg.KEYS[8:11]:
        assert 0.0 <= result[key] <= 1.0
    assert result["seconds_per_clip_edge"] > 0
    more = details(captured.err)
    assert set(more["variants"]) == {"naive", "mtvg", "no_inversion", "no_dynamic_noise", "no_structure_guidance",
                                     "mtvg_guide_previous_frame"}
    assert more["options"]["mtvg"]["guide_refs"] == "all"
    assert set(more["random_digit_prompts"]) == {"naive", "mtvg"}
    assert more["fleet_gain"]["new_digits"]["digits"] == [7, 8, 9]
    # by segment: every segment index has as many clips, so the per-segment accuracies average to the total
    for name, scored in more["variants"].items():
        by_segment = scored["condition_accuracy_by_segment"]
        assert len(by_segment) == 3 == len(scored["background_share_by_segment"]), name
        assert np.mean(by_segment) == pytest.approx(scored["condition_accuracy"]), name
        assert all(0.0 <= b <= 1.0 for b in scored["background_share_by_segment"]), name
    assert 0.8 < more["real_clip_background_share"] < 0.95  # real clips: background exactly -1
    # the same run's last global weights are scored beside the shipped moving average
    assert set(more["last_iterate"]) == {"naive", "new_digits", "centre_digits"}
    assert 0.0 <= more["last_iterate"]["naive"]["condition_accuracy"] <= 1.0
    if trainer == "fleet":  # the fleet's MQTT job trained it: one round, both agents answered
        assert "over MQTT" in more["training"]["trainer"] and more["training"]["ok_per_round"] == [2]
        assert more["training"]["bytes_up"] > 0
    else:
        assert "no broker" in more["training"]["trainer"] and len(more["training"]["history"]) == 2
        assert more["training"]["ema_decay_per_round"] == 0.995  # one local step in --quick
    assert 0.0 <= more["classifier_held_out"]["both"] <= 1.0
    # the device path gives the same frames up to float rounding, which full MTVG under classifier-free guidance
    # amplifies at a few pixels (on this run's weights a 1e-6 relative change of the weights moves torch's own
    # frames by 0.10): so the mean here; tests/methods/test_mtvg.py checks the device path tightly
    assert more["onnxruntime_vs_torch_mtvg"]["mean_abs"] < 0.01
    assert more["seconds_per_clip_coordinator"] > 0
    assert (tmp_path / "seq.png").stat().st_size > 5_000


def test_central_check_scores_naive_clips_of_the_centre_digits():
    from fedfleet.coordinator.mtvg import clip_classifier
    from fedfleet.edge_agent.nn import video_denoiser as vd
    from fedfleet.models import pretrain_video_denoiser as centre

    clf = clip_classifier.train(seed=0, epochs=1, repeats=1)
    r = bench_mtvg.central_check(vd.init((8,), seed=0), clips=14, steps=2, classifier=clf)
    assert r["clips"] == 14 and r["samples"].shape == (14, 1, vd.FRAMES, vd.SIZE, vd.SIZE)
    assert sorted(set((r["conds"] // 4).ravel())) == list(centre.CENTRE_DIGITS)
    for key in ("condition_accuracy", "digit_accuracy", "direction_accuracy"):
        assert 0.0 <= r[key] <= 1.0


def test_pretrain_takes_the_block_widths():
    from fedfleet.edge_agent.nn import video_denoiser as vd
    from fedfleet.models import pretrain_video_denoiser as centre

    state, info = centre.pretrain(2, hidden=(8, 8), log_every=1)
    assert vd.hidden_of(state) == (8, 8) and info["hidden"] == [8, 8] and info["steps"] == 2
    assert [(k, v.shape) for k, v in state.items()] == [(k, s) for k, s in vd.layout((8, 8))]
