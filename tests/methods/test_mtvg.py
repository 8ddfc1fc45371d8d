"""MTVG sampling: the prompt parser, the sampler's pieces, torch against ONNX Runtime, and both generate commands."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from fedfleet.coordinator.cli import main as fedfleet
from fedfleet.coordinator.mtvg import sample as mtvg
from fedfleet.edge_agent.cli import main as fedfleet_agent
from fedfleet.edge_agent.errors import ConfigError, ModelError
from fedfleet.edge_agent.mtvg import sample as em
from fedfleet.edge_agent.mtvg.output import MOTION, estimate_motion
from fedfleet.edge_agent.mtvg.prompts import MAX_SEGMENTS, parse_prompts
from fedfleet.edge_agent.nn import video_denoiser as vd
from fedfleet.models import moving_digits as md
from fedfleet.models.export_video_denoiser import export_onnx


def _cid(digit: int, direction: str) -> int:
    return digit * 4 + vd.DIRECTIONS.index(direction)


def test_parser_reads_free_form_sequences() -> None:
    want = [_cid(3, "right"), _cid(3, "down"), _cid(5, "down")]
    assert parse_prompts("3 right; 3 down; 5 down").tolist() == want
    assert parse_prompts("3 moving right, then 3 down and then five going downwards").tolist() == want
    assert parse_prompts("3 right, then down\n5 down.").tolist() == want  # a missing digit keeps the previous one
    assert parse_prompts("Seven UP").tolist() == [_cid(7, "up")]


@pytest.mark.parametrize("text, token", [
    ("3 right; 3 sideways", "'sideways'"), ("12 up", "'12'"), ("", "empty"), ("  ;  ", "names no segment"),
    ("3 4 up", "two digits"), ("3 up down", "two directions"), ("3", "no direction"), ("left", "no digit"),
    ("; ".join(["1 up"] * (MAX_SEGMENTS + 1)), "more than the cap"),
])
def test_parser_refuses_bad_prompts_naming_the_token(text: str, token: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_prompts(text)
    assert token in str(err.value) and "\n" not in str(err.value)


def test_motion_steps_match_the_dataset_and_the_estimator_reads_real_clips() -> None:
    assert MOTION == md.STEPS
    _, test = md.moving_digits(seed=0, repeats=1)
    direction, speed = estimate_motion(test.x[:50])
    np.testing.assert_array_equal(direction, test.direction[:50])
    np.testing.assert_array_equal(speed, test.speed[:50])


def _params(seed: int = 1) -> vd.Params:
    """A small denoiser whose output layer is not zero, so the network (not only the skip) shapes samples."""
    params = vd.init((8, 8), seed=seed)
    rng = np.random.default_rng(seed)
    return {k: (v + 0.05 * rng.standard_normal(v.shape)).astype(np.float32) for k, v in params.items()}


CONDS = np.array([[_cid(3, "right"), _cid(3, "down"), _cid(5, "down")], [0, 5, 39]])


def test_sampler_is_deterministic_and_naive_segments_are_plain_ddim() -> None:
    model = mtvg.from_state(_params())
    a = mtvg.sample_sequences(model, CONDS, seed=4, options=em.MTVGOptions(steps=10))
    b = mtvg.sample_sequences(model, CONDS, seed=4, options=em.MTVGOptions(steps=10))
    np.testing.assert_array_equal(a, b)
    first = mtvg.sample_sequences(model, CONDS[:1], seed=4, options=em.MTVGOptions(steps=10))
    np.testing.assert_allclose(first[0], a[0], atol=1e-3)  # a sequence's frames do not depend on the batch
    assert a.shape == (2, 3, *em.CLIP) and np.abs(a).max() <= 1.0
    assert np.abs(a - mtvg.sample_sequences(model, CONDS, seed=5, options=em.MTVGOptions(steps=10))).max() > 0.1
    naive = mtvg.sample_sequences(model, CONDS, seed=4, options=em.MTVGOptions.naive(10, cfg_scale=1.0))
    for k in range(3):  # naive: segment k is DDIM from the seed's own noise for k, whatever came before
        alone = mtvg.sample_sequences(model, CONDS[:, k:k + 1], seed=4, options=em.MTVGOptions.naive(10, cfg_scale=1.0))
        if k == 0:
            np.testing.assert_allclose(naive[:, 0], alone[:, 0], atol=1e-4)
        init, _ = em.segment_noise(4, k, 2)
        x = torch.from_numpy(init)
        with torch.no_grad():
            for t, a_t, a_next in em.step_schedule(10):
                x = em.ddim_update(x, model.predict_x0(x, torch.full((2,), t), torch.from_numpy(CONDS[:, k])), a_t, a_next)
        np.testing.assert_allclose(naive[:, k], np.clip(x.numpy(), -1, 1), atol=1e-4)
    # (the sampler's default classifier-free guidance is tested below; w = 1 is one plain pass)
    # without guidance, the first segment of MTVG is the naive one (same noise); later segments start elsewhere
    no_guide = mtvg.sample_sequences(model, CONDS, seed=4, options=em.MTVGOptions(steps=10, cfg_scale=1.0).without("structure_guidance"))
    np.testing.assert_allclose(no_guide[:, 0], naive[:, 0], atol=1e-6)
    assert np.abs(no_guide[:, 1:] - naive[:, 1:]).max() > 0.1


def test_inversion_reverses_sampling_and_dynamic_noise_ramps_over_frames() -> None:
    params = vd.init((32,), seed=0)  # the linear estimate: a smooth ODE, so the round trip is tight
    train, _ = md.moving_digits(seed=0, repeats=1)
    static = np.repeat(train.x[:4, 0][:, None], vd.FRAMES, axis=1)
    cond = train.y[:4]
    x = static
    for t, a_t, a_up in em.inversion_schedule(50):
        x = em.ddim_update(x, vd.predict_x0(params, x, np.full(4, t), cond), a_t, a_up)
    assert 0.7 < float(x.std()) < 1.3  # a noise-level latent
    for t, a_t, a_next in em.step_schedule(50):
        x = em.ddim_update(x, vd.predict_x0(params, x, np.full(4, t), cond), a_t, a_next)
    assert float(np.mean((x - static) ** 2)) < 0.05 * float(static.var())
    # in the sampler: with inversion the next segment starts at the previous last frame, with or without guidance
    model = mtvg.from_state(params)
    conds = vd.condition_id(np.arange(8).reshape(4, 2) % 10, np.arange(8).reshape(4, 2) % 4)
    naive = mtvg.sample_sequences(model, conds, seed=0, options=em.MTVGOptions.naive())
    for opts in (em.MTVGOptions().without("dynamic_noise"), em.MTVGOptions()):
        seq = mtvg.sample_sequences(model, conds, seed=0, options=opts)
        gap = np.mean((seq[:, 1, 0] - seq[:, 0, -1]) ** 2)
        assert gap < 0.1 * np.mean((naive[:, 1, 0] - naive[:, 0, -1]) ** 2), opts
    lam = em.dynamic_weights(0.5)
    assert lam[0] == 0.0 and lam[-1] == pytest.approx(0.5) and np.all(np.diff(lam) > 0)


def test_guidance_references_are_all_preceding_frames_by_default() -> None:
    x0 = np.random.default_rng(0).standard_normal((2, *em.CLIP)).astype(np.float32)
    ref, mask = em.guidance_refs_np(x0)  # MEVG: frame f against the mean of frames 0 .. f-1
    assert em.MTVGOptions().guide_refs == "all" and mask[0, 0, 0, 0] == 0 and mask[0, 1:].min() == 1
    for f in range(1, vd.FRAMES):
        np.testing.assert_allclose(ref[:, f], x0[:, :f].mean(axis=1), atol=1e-5)
    prev, _ = em.guidance_refs_np(x0, "previous")
    np.testing.assert_array_equal(prev[:, 1:], x0[:, :-1])
    with pytest.raises(ConfigError, match="guide_refs"):
        em.MTVGOptions(guide_refs="next").check()


@pytest.mark.parametrize("refs", ["all", "previous"])
@pytest.mark.parametrize("t", [999, 600, 100])
def test_structure_guidance_update_lowers_its_loss_and_is_capped(t: int, refs: str) -> None:
    model = mtvg.from_state(_params())  # a network with a large input Jacobian: a plain gradient step overshoots
    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.standard_normal((3, *em.CLIP)).astype(np.float32))
    tt, c = torch.full((3,), t), torch.tensor([1, 2, 3])
    with torch.no_grad():
        x0 = model.predict_x0(x, tt, c)
    ref = torch.from_numpy(em.guidance_refs_np(x0.numpy(), refs)[0][:, 1:])  # held fixed by the update

    def loss(z: torch.Tensor) -> np.ndarray:
        with torch.no_grad():
            return torch.sum(((model.predict_x0(z, tt, c)[:, 1:] - ref) ** 2).reshape(3, -1), dim=1).numpy()

    opts = em.MTVGOptions(guide_refs=refs)
    moved = torch.from_numpy(em.guide_update(*mtvg.denoiser_fns(model), x.numpy(), tt.numpy(), c.numpy(), opts))
    assert np.all(loss(moved) < loss(x))
    rms = torch.sqrt(torch.mean(((moved - x) ** 2).reshape(3, -1), dim=1))
    assert torch.all(rms <= opts.guide_max + 1e-6) and torch.all(rms > 0)


def test_digit_guidance_is_two_batched_passes_and_its_gradient_is_autograd() -> None:
    model = mtvg.from_state(_params())
    x0_fn, vjp_fn = mtvg.denoiser_fns(model)
    assert em.digit_guided(x0_fn, vjp_fn, 1.0) == (x0_fn, vjp_fn)  # w = 1: one plain pass
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, *em.CLIP)).astype(np.float32)
    t, c = np.array([900, 400, 50]), np.array([_cid(3, "right"), _cid(7, "up"), 0])
    x0_w, vjp_w = em.digit_guided(x0_fn, vjp_fn, 3.0)
    free, cond = x0_fn(x, t, vd.without_digit(c)), x0_fn(x, t, c)
    assert np.abs(cond - free).max() > 1e-3  # the digit matters to this network
    np.testing.assert_allclose(x0_w(x, t, c), free + 3.0 * (cond - free), rtol=1e-4, atol=1e-5)
    v = rng.standard_normal(x.shape).astype(np.float32)
    xt = torch.from_numpy(x).requires_grad_(True)
    tt = torch.from_numpy(t)
    guided = (1 - 3.0) * model.predict_x0(xt, tt, torch.from_numpy(vd.without_digit(c))) + 3.0 * model.predict_x0(
        xt, tt, torch.from_numpy(c))
    (guided * torch.from_numpy(v)).sum().backward()
    np.testing.assert_allclose(vjp_w(x, t, c, v), xt.grad.numpy(), rtol=1e-3, atol=1e-5)
    # in the sampler: w = 1 is plain sampling, the default w moves the samples; inversion is unguided
    assert em.MTVGOptions().cfg_scale == em.MTVGOptions.naive().cfg_scale == em.DEFAULT_CFG_SCALE == 3.0
    plain = mtvg.sample_sequences(model, CONDS, seed=4, options=em.MTVGOptions.naive(10, cfg_scale=1.0))
    assert np.abs(plain - mtvg.sample_sequences(model, CONDS, seed=4, options=em.MTVGOptions.naive(10))).max() > 0.05
    calls: list[np.ndarray] = []

    def spy(xx: np.ndarray, ts: np.ndarray, cs: np.ndarray) -> np.ndarray:
        calls.append(cs.copy())
        return x0_fn(xx, ts, cs)

    em.sample_sequences(spy, vjp_fn, CONDS[:1, :2], seed=4, options=em.MTVGOptions(steps=4, cfg_scale=3.0)
                        .without("structure_guidance"))
    n_inv = len(em.inversion_schedule(4))
    sizes = [len(cs) for cs in calls]
    assert sizes == [2] * 4 + [1] * n_inv + [2] * 4  # segment 0 guided, the inversion unguided, segment 1 guided
    assert calls[0].tolist() == [CONDS[0, 0], int(vd.without_digit(CONDS[0, 0]))]
    for bad in (-1.0, float("nan"), 21.0):
        with pytest.raises(ConfigError, match="cfg_scale"):
            em.MTVGOptions(cfg_scale=bad).check()


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> tuple[vd.Params, str, str]:
    d = tmp_path_factory.mktemp("mtvg")
    params = _params()
    np.savez(d / "denoiser.npz", **params)
    export_onnx(params, d / "denoiser.onnx")
    return params, str(d / "denoiser.onnx"), str(d / "denoiser.npz")


def test_torch_and_onnxruntime_samplers_agree(exported: tuple[vd.Params, str, str]) -> None:
    params, onnx_path, npz_path = exported
    model = mtvg.from_state(params)
    device = em.OnnxDenoiser(onnx_path, npz_path)
    for opts in (em.MTVGOptions.naive(20), em.MTVGOptions(steps=20), em.MTVGOptions.naive(20, cfg_scale=1.0),
                 em.MTVGOptions(steps=20, cfg_scale=1.0)):
        a = mtvg.sample_sequences(model, CONDS, seed=7, options=opts)
        b = device.sample(CONDS, seed=7, options=opts)
        assert np.abs(a - b).max() < 0.02 and np.abs(a - b).mean() < 1e-3, (opts, np.abs(a - b).max())


def test_mismatched_model_files_are_typed_errors(exported: tuple[vd.Params, str, str], tmp_path) -> None:
    _, onnx_path, npz_path = exported

    class Small(torch.nn.Module):
        def forward(self, x, t, c):  # noqa: ANN001, ANN202
            return x * 2.0 + (t + c).to(x.dtype).reshape(-1, 1, 1, 1)

    torch.onnx.export(Small(), (torch.zeros(1, 4, 8, 8), torch.zeros(1, dtype=torch.long),
                                torch.zeros(1, dtype=torch.long)), str(tmp_path / "small.onnx"),
                      input_names=["x_t", "t", "cond"], output_names=["x0"], dynamo=False)
    with pytest.raises(ModelError, match="shape"):
        em.OnnxDenoiser(tmp_path / "small.onnx", npz_path)
    with pytest.raises(ModelError, match="not a readable ONNX"):
        em.OnnxDenoiser(npz_path, npz_path)
    wrong = vd.init((16,), seed=0)
    wrong["cemb0.weight"] = wrong["cemb0.weight"][:, :10]
    np.savez(tmp_path / "wrong.npz", **wrong)
    with pytest.raises(ModelError, match="cemb0.weight"):
        em.OnnxDenoiser(onnx_path, tmp_path / "wrong.npz")
    with pytest.raises(ModelError, match="npz"):
        mtvg.load_denoiser(onnx_path)


def test_an_export_without_the_dropped_digit_refuses_digit_guidance(exported: tuple[vd.Params, str, str], tmp_path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    from fedfleet.models import export_video_denoiser as xv

    params, _, npz_path = exported
    build = xv._module

    def older(state: vd.Params) -> torch.nn.Module:  # the exports before the dropped digit: a 10-row one-hot table
        module = build(state)
        module.inner.eye_digit = torch.eye(vd.CLASSES)
        return module

    monkeypatch.setattr(xv, "_module", older)
    export_onnx(params, tmp_path / "older.onnx")
    device = em.OnnxDenoiser(tmp_path / "older.onnx", npz_path)
    assert device.sample(CONDS[:1, :1], seed=0, options=em.MTVGOptions.naive(4, cfg_scale=1.0)).shape == (1, 1, *em.CLIP)
    with pytest.raises(ModelError, match="without its digit.*--cfg-scale 1"):
        device.sample(CONDS[:1, :1], seed=0, options=em.MTVGOptions.naive(4))


def test_generate_commands_write_strip_and_metrics_and_agree(exported: tuple[vd.Params, str, str], tmp_path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    _, onnx_path, npz_path = exported
    run = tmp_path / "run"
    run.mkdir()
    (run / "denoiser.npz").write_bytes(open(npz_path, "rb").read())
    prompts = "3 right; 3 down; 5 down"
    assert fedfleet(["generate", "--prompts", prompts, "--out", str(tmp_path / "c"), "--run", str(run),
                     "--steps", "12", "--seed", "3"]) == 0
    assert fedfleet_agent(["generate", "--prompts", prompts, "--out", str(tmp_path / "e"), "--model", onnx_path,
                           "--weights", npz_path, "--steps", "12", "--seed", "3"]) == 0
    for side in ("c", "e"):
        doc = json.loads((tmp_path / side / "segments.json").read_text())
        assert [s["condition"] for s in doc["segments"]] == ["3 right", "3 down", "5 down"]
        assert doc["segments"][0]["boundary_mse_to_previous"] is None
        assert all(s["boundary_mse_to_previous"] >= 0 for s in doc["segments"][1:])
        assert (tmp_path / side / "strip.png").stat().st_size > 200 and (tmp_path / side / "sequence.gif").exists()
    frames_c, frames_e = np.load(tmp_path / "c" / "frames.npy"), np.load(tmp_path / "e" / "frames.npy")
    assert frames_c.shape == (3, *em.CLIP) and np.abs(frames_c - frames_e).max() < 0.02
    capsys.readouterr()
    assert fedfleet(["generate", "--prompts", "3 right; 3 sideways", "--out", str(tmp_path / "x"),
                     "--run", str(run)]) == 2
    err = capsys.readouterr().err
    assert "sideways" in err and len(err.strip().splitlines()) == 1
    assert fedfleet_agent(["generate", "--prompts", "3 up", "--out", str(tmp_path / "x"), "--model", npz_path,
                           "--weights", npz_path]) == 2
    err = capsys.readouterr().err
    assert "ONNX" in err and len(err.strip().splitlines()) == 1
    assert fedfleet(["generate", "--prompts", "3 up", "--out", str(tmp_path / "x"), "--run", str(tmp_path)]) == 2
    assert "does not exist" in capsys.readouterr().err
    for side, cmd, where in (("c", fedfleet, ["--run", str(run)]),
                             ("e", fedfleet_agent, ["--model", onnx_path, "--weights", npz_path])):
        assert cmd(["generate", "--prompts", "3 up", "--out", str(tmp_path / "x"), "--cfg-scale", "nan", *where]) == 2
        err = capsys.readouterr().err
        assert "--cfg-scale must be in [0, 20]" in err and len(err.strip().splitlines()) == 1
        assert cmd(["generate", "--prompts", "3 up; 3 left", "--out", str(tmp_path / f"g{side}"), "--steps", "8",
                    "--cfg-scale", "2.5", *where]) == 0
        doc = json.loads((tmp_path / f"g{side}" / "segments.json").read_text())
        assert doc["options"]["cfg_scale"] == 2.5
