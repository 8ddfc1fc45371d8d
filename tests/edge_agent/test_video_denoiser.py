"""The moving-digits clips and the conditional video denoiser: edge numpy against the torch mirror."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedfleet.edge_agent.nn import video_denoiser as vd
from fedfleet.models import moving_digits as md
from fedfleet.models.mirrors.video_denoiser import VideoDenoiser


def test_clips_move_with_wrap_and_carry_their_condition() -> None:
    train, test = md.moving_digits(seed=0, repeats=1)
    assert train.x.shape[1:] == (vd.FRAMES, vd.SIZE, vd.SIZE) and train.x.dtype == np.float32
    assert train.x.min() >= -1.0 and train.x.max() <= 1.0
    assert set(np.unique(train.direction)) == {0, 1, 2, 3} and set(np.unique(train.digit)) == set(range(10))
    for i in range(20):
        dr, dc = md.STEPS[vd.DIRECTIONS[train.direction[i]]]
        s = int(train.speed[i])
        for f in range(1, vd.FRAMES):  # every frame is the previous one shifted by speed in the direction
            np.testing.assert_array_equal(train.x[i, f], np.roll(train.x[i, f - 1], (dr * s, dc * s), axis=(0, 1)))
    # deterministic for a seed
    again, _ = md.moving_digits(seed=0, repeats=1)
    np.testing.assert_array_equal(again.x, train.x)
    assert len(test) < len(train)


@pytest.mark.parametrize("hidden", [(8,), (8, 8), (4, 6, 5), (4, 4, 4, 4)])
def test_edge_and_torch_denoisers_agree_and_gradients_match_autograd(hidden: tuple[int, ...]) -> None:
    """Every U-Net depth, 16x16 down to 2x2, with unequal widths (so a concatenation mixes widths)."""
    rng = np.random.default_rng(0)
    params = {k: v + 0.05 * rng.standard_normal(v.shape).astype(np.float32) for k, v in vd.init(hidden, seed=1).items()}
    x = rng.standard_normal((5, vd.FRAMES, vd.SIZE, vd.SIZE)).astype(np.float32)
    t = np.array([0, 10, 500, 999, 3])
    cond = np.array([0, 7, 39, 12, int(vd.without_digit(21))])  # the last without its digit (all-zero one-hot)
    model = VideoDenoiser.from_state(params)
    with torch.no_grad():
        ref = model(torch.from_numpy(x), torch.from_numpy(t), torch.from_numpy(cond)).numpy()
        ref_x0 = model.predict_x0(torch.from_numpy(x), torch.from_numpy(t), torch.from_numpy(cond)).numpy()
    np.testing.assert_allclose(vd.predict_x0(params, x, t, cond), ref_x0, rtol=1e-4, atol=1e-5)
    # eps divides by sqrt(1 - ab_t) (0.01 at t = 0), which scales float32 rounding up accordingly
    np.testing.assert_allclose(vd.predict(params, x, t, cond), ref, rtol=1e-3, atol=1e-3)

    # parameter gradients of the denoising loss against torch autograd, same draws
    x0 = np.clip(x, -1, 1)
    value, grads = vd.loss_and_grad(params, x0, cond, np.random.default_rng(3), digit_dropout=0.0)
    draw = np.random.default_rng(3)
    tt = draw.integers(0, vd.STEPS, 5)
    eps = draw.standard_normal(x0.shape).astype(np.float32)
    x_t = vd.noised(x0, tt, eps, vd.alpha_bar())
    model.zero_grad()
    loss = torch.mean(((model.predict_x0(torch.from_numpy(x_t), torch.from_numpy(tt), torch.from_numpy(cond))
                        - torch.from_numpy(x0)) / model.c_out(torch.from_numpy(tt))) ** 2)
    loss.backward()
    assert float(loss) == pytest.approx(value, rel=1e-5)
    for name, _ in vd.layout(hidden):
        g = model.p(name).grad.numpy()
        np.testing.assert_allclose(grads[name], g, rtol=1e-3, atol=1e-4 * np.abs(g).max(), err_msg=name)

    # the input vector-Jacobian product structure guidance uses on a device
    v = rng.standard_normal(x.shape).astype(np.float32)
    xt = torch.from_numpy(x).requires_grad_(True)
    x0_t = model.predict_x0(xt, torch.from_numpy(t), torch.from_numpy(cond))
    (x0_t * torch.from_numpy(v)).sum().backward()
    x0_np, vjp = vd.vjp_input(params, x, t, cond, v)
    np.testing.assert_allclose(x0_np, x0_t.detach().numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(vjp, xt.grad.numpy(), rtol=1e-3, atol=1e-5)


def test_digit_dropout_trains_some_clips_without_their_digit() -> None:
    rng = np.random.default_rng(0)  # a non-zero output convolution, so the condition changes the loss
    params = {k: v + 0.05 * rng.standard_normal(v.shape).astype(np.float32) for k, v in vd.init((8,), seed=1).items()}
    x0 = np.clip(rng.standard_normal((6, vd.FRAMES, vd.SIZE, vd.SIZE)), -1, 1).astype(np.float32)
    cond = np.array([0, 5, 13, 22, 39, 8])
    assert vd.without_digit(cond).tolist() == [40, 41, 41, 42, 43, 40]
    e_in = vd.embedding_input(np.zeros(6), vd.without_digit(cond))
    assert np.all(e_in[:, vd.T_EMB:vd.T_EMB + vd.CLASSES] == 0)  # no digit, the direction kept
    np.testing.assert_array_equal(e_in[:, vd.T_EMB + vd.CLASSES:], np.eye(4)[cond % 4])
    for p in (0.0, 0.5, 1.0):  # the drop is drawn after t and eps, so the same t and eps in every case
        value, grads = vd.loss_and_grad(params, x0, cond, np.random.default_rng(3), digit_dropout=p)
        draw = np.random.default_rng(3)
        t = draw.integers(0, vd.STEPS, 6)
        eps = draw.standard_normal(x0.shape).astype(np.float32)
        dropped = draw.random(6) < p if p > 0 else np.zeros(6, bool)
        want = vd.loss_at(params, x0, np.where(dropped, vd.without_digit(cond), cond), t, eps, vd.alpha_bar())
        assert value == pytest.approx(want[0], rel=1e-6)
        np.testing.assert_allclose(grads["emb.weight"], want[1]["emb.weight"], rtol=1e-5, atol=1e-7)
        if p == 0.5:
            assert 0 < dropped.sum() < 6  # this seed drops some, not all: the cases differ
    assert vd.loss_and_grad(params, x0, cond, np.random.default_rng(3), digit_dropout=1.0)[0] != pytest.approx(
        vd.loss_and_grad(params, x0, cond, np.random.default_rng(3), digit_dropout=0.0)[0], rel=1e-9)


def test_denoiser_learns_on_clips() -> None:
    """Numpy SGD on clips lowers the held-out denoising loss below the untrained denoiser's (the linear
    estimate, since the output layer starts at zero), on the same noise draws."""
    train, test = md.moving_digits(seed=0, repeats=1)
    params = vd.init((8,), seed=0)
    ab = vd.alpha_bar()

    def held_out(p: dict[str, np.ndarray]) -> float:
        return float(np.mean([vd.loss_and_grad(p, test.x[i : i + 64], test.y[i : i + 64], np.random.default_rng(i), ab)[0]
                              for i in range(0, 320, 64)]))

    before = held_out(params)
    rng = np.random.default_rng(0)
    for _ in range(60):
        idx = rng.choice(len(train), 32, replace=False)
        _, grads = vd.loss_and_grad(params, train.x[idx], train.y[idx], rng, ab)
        for k in params:
            params[k] -= 0.05 * grads[k]
    after = held_out(params)
    assert after < before - 0.002, (before, after)


def test_the_unet_plan_goes_down_to_the_coarsest_level_and_back() -> None:
    layers = vd.plan((32, 64, 64))
    assert len(layers) == 12 and vd.hidden_of(vd.init((32, 64, 64))) == (32, 64, 64)
    assert [layer.size for layer in layers] == [16, 16, 8, 8, 4, 4, 4, 8, 8, 16, 16, 16]
    assert layers[-1].out and layers[-1].c_out == vd.FRAMES and not any(layer.out for layer in layers[:-1])
    assert layers[9].sources == ((8, "up"), (1, "same")) and layers[9].c_in == 64 + 32  # the skip from level 0
    assert vd.sizes((32, 64, 64))[0] == vd.FRAMES and vd.sizes((32, 64, 64))[-1] == vd.FRAMES
    for bad in [(), (8,) * 5, (8, 0)]:
        with pytest.raises(ValueError, match="levels"):
            vd.plan(bad)
    with pytest.raises(ValueError, match="4 convolutions per level"):
        vd.hidden_of({k: v for k, v in vd.init((8,)).items() if not k.startswith("conv3")})
