"""The centre's pre-trained video denoiser: the moving-digits generator trained centrally on digits 0-6 only.

MTVG uses a frozen pre-trained generator; fedfleet's centre pre-trains one the way the int8 backbone is
pre-trained (`fedfleet.models.backbone`), and the fleet then teaches it what only the devices hold: the
digits 7, 8 and 9 (`CENTRE_DIGITS` are the only classes the centre sees). The moving-digits diffusion task's
package starts from these weights (`fedfleet.coordinator.tasks.diffusion`).

The shipped file is made in two stages (each deterministic on one machine and torch build, not bit for bit
across builds):

    python -m fedfleet.models.pretrain_video_denoiser --out stage1.npz
    python -m fedfleet.models.pretrain_video_denoiser --init stage1.npz --steps 12000 --digit-dropout 0.2

Recipe of a stage: the training clips of `fedfleet.models.moving_digits.moving_digits(seed 0, repeats 4)` whose
digit is in CENTRE_DIGITS; the torch mirror (`fedfleet.models.mirrors.video_denoiser`) with
`video_denoiser.DEFAULT_HIDDEN` (the U-Net's level widths; `--hidden` / `pretrain(hidden=...)` for others),
initialised by `video_denoiser.init(seed 0)` or, with `--init`, from a file; the denoising loss of
`video_denoiser` (EDM-weighted, eps ~ N(0, I)) with t uniform for half of each batch and uniform in `T_MID` =
[250, 650) for the other half (`--t-mid none`: all uniform); with `--digit-dropout p` each clip's digit dropped
(`video_denoiser.NULL_DIGIT`) with probability p, which classifier-free guidance needs; Adam lr 1e-3 (fresh
moments), batch 32, `PRETRAIN_STEPS` (18,000) steps unless `--steps`, one torch thread, `torch.manual_seed(0)`;
the weights kept are the exponential moving average (decay 0.995) of the iterates, started at the initial weights.

How it was chosen (docs/results, the issue-25 sections, each rule written before its runs): the flat stacks of
16x16 convolutions that came first moved in the right direction but never drew the digit asked for (central
digit accuracy 0.05-0.14 on 42 naive clips of 0-6, chance 0.10). Two U-Net arms of 18,000 steps followed: t
uniform (0.405) and half the batch at mid noise (0.524), which became stage 1. Then two continuations of 12,000
steps: without dropout (0.452: more training alone does not help) and with digit dropout 0.2 (0.571 unguided,
0.762 with classifier-free guidance at w = 3, the sampler's default `MTVGOptions.cfg_scale`), which is the
shipped file. `load()` reads the shipped file and checks it against the denoiser's layout.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

from fedfleet.edge_agent.nn import video_denoiser as vd

ARTIFACT = Path(__file__).resolve().parent / "artifacts" / "moving-digits-denoiser-0to6.npz"
CENTRE_DIGITS = (0, 1, 2, 3, 4, 5, 6)
PRETRAIN_STEPS = 18000
T_MID = (250, 650)  # half of each batch draws t here, where the digit is decided
EMA = 0.995


def load(path: str | Path = ARTIFACT) -> vd.Params:
    """The shipped pre-trained weights (layout-checked)."""
    from fedfleet.models.export_video_denoiser import load_npz

    return load_npz(path)


def pretrain(steps: int = PRETRAIN_STEPS, *, seed: int = 0, batch: int = 32, lr: float = 1e-3,
             digits: tuple[int, ...] = CENTRE_DIGITS, log_every: int = 250,
             hidden: tuple[int, ...] = vd.DEFAULT_HIDDEN, t_mid: tuple[int, int] | None = T_MID,
             digit_dropout: float = 0.0, init: vd.Params | None = None) -> tuple[vd.Params, dict]:
    import torch

    from fedfleet.models import moving_digits as md
    from fedfleet.models.mirrors.video_denoiser import VideoDenoiser

    torch.set_num_threads(1)
    torch.manual_seed(seed)
    train, _ = md.moving_digits(seed=seed, repeats=4)
    keep = np.isin(train.digit, digits)
    x, y = torch.from_numpy(train.x[keep]), torch.from_numpy(train.y[keep])
    model = VideoDenoiser.from_state(init if init is not None else vd.init(tuple(hidden), seed))
    hidden = model.hidden
    ema = {k: v.detach().clone() for k, v in model.named_parameters()}
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    ab = model.alpha_bar
    t0, losses = time.perf_counter(), []
    for step in range(1, steps + 1):
        idx = torch.randint(0, len(y), (batch,))
        t = torch.randint(0, vd.STEPS, (batch,))
        if t_mid is not None:  # the second half of the batch at mid noise
            t[batch // 2:] = torch.randint(t_mid[0], t_mid[1], (batch - batch // 2,))
        eps = torch.randn(batch, vd.FRAMES, vd.SIZE, vd.SIZE)
        a = ab[t].reshape(-1, 1, 1, 1)
        x_t = torch.sqrt(a) * x[idx] + torch.sqrt(1 - a) * eps
        c = y[idx]
        if digit_dropout > 0:  # classifier-free guidance's training: some clips without their digit
            drop = torch.rand(batch) < digit_dropout
            c = torch.where(drop, torch.from_numpy(vd.without_digit(c.numpy())), c)
        loss = (((model.predict_x0(x_t, t, c) - x[idx]) / model.c_out(t)) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        with torch.no_grad():
            for k, v in model.named_parameters():
                ema[k].mul_(EMA).add_(v.detach(), alpha=1 - EMA)
        if step % log_every == 0:
            print(f"step {step}/{steps}: loss {np.mean(losses[-log_every:]):.4f} ({time.perf_counter() - t0:.0f} s)",
                  file=sys.stderr, flush=True)
    with torch.no_grad():
        for k, v in model.named_parameters():
            v.copy_(ema[k])
    state = {k: v.numpy() for k, v in model.layout_state().items()}
    return state, {"steps": steps, "hidden": list(hidden), "t_mid": list(t_mid) if t_mid else None,
                   "digit_dropout": digit_dropout, "continued": init is not None, "clips": int(keep.sum()), "digits": list(digits),
                   "seconds": time.perf_counter() - t0, "final_loss": float(np.mean(losses[-log_every:]))}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=PRETRAIN_STEPS)
    ap.add_argument("--out", default=str(ARTIFACT))
    ap.add_argument("--hidden", help="level widths, comma-separated (default: video_denoiser.DEFAULT_HIDDEN)")
    ap.add_argument("--t-mid", default=",".join(map(str, T_MID)),
                    help="LO,HI: draw t for half of each batch uniform in [LO, HI); 'none': all uniform "
                    "(default %(default)s)")
    ap.add_argument("--log-every", type=int, default=250)
    ap.add_argument("--digit-dropout", type=float, default=0.0,
                    help="share of clips trained without their digit (classifier-free guidance; default 0)")
    ap.add_argument("--init", help="continue from this denoiser .npz instead of a fresh init")
    args = ap.parse_args(argv)
    hidden = tuple(int(h) for h in args.hidden.split(",")) if args.hidden else vd.DEFAULT_HIDDEN
    from fedfleet.models.export_video_denoiser import save_npz

    t_mid = None if args.t_mid in ("", "none") else tuple(int(v) for v in args.t_mid.split(","))
    init = load(args.init) if args.init else None
    state, info = pretrain(args.steps, hidden=hidden, t_mid=t_mid, log_every=args.log_every,
                           digit_dropout=args.digit_dropout, init=init)
    save_npz(state, args.out)
    print(info)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
