"""The moving-digits diffusion task on the coordinator: shards, the package and its torch mirror, evaluation
every few rounds, and the run directory's model files.

The task (`[job] task = "moving-digits-diffusion"`, FedAvg only) trains the conditional video denoiser
(`fedfleet.edge_agent.nn.video_denoiser`) over whole moving-digit clips (`fedfleet.models.moving_digits`):
- `shards(cfg)`: `REPEATS` clips per training digit image; Dirichlet(alpha) skew over the *digit class*
  (each agent sees few digits, every direction), IID when alpha = 0; the held-out clips come from digit
  images no agent holds. LocalData.y is the condition id digit * 4 + direction.
- `hidden_of(cfg)`: the denoiser's level widths (channels): `video_denoiser.DEFAULT_HIDDEN` when the job leaves
  `hidden` at 0, else `hidden_layers` U-Net levels (1 to `video_denoiser.MAX_LEVELS`) of `hidden` channels.
- The package (`build`): with `hidden` at 0 it starts from the centre's pre-trained generator
  (`fedfleet.models.pretrain_video_denoiser`: trained centrally on the digits 0-6 only), so the fleet's FedAvg
  teaches it the digits 7-9 that only the devices hold; with `hidden` set, from a fresh initialisation.
- The generator the run ships is the server-side moving average of the global denoiser
  (`fedfleet.coordinator.tasks.ema`, installed by `wrap_strategy`), as the centre's generator is the average of
  its iterates: the decay per round is the centre's per-step decay (`pretrain_video_denoiser.EMA`, 0.995) to the
  power of the local steps per round (`local_steps`, else epochs x the batches in a shard of the task's clips), so
  both average over the same window of steps. The agents train and receive the global denoiser itself.
- `DiffusionModel(blob, rounds, eval_every)`: the coordinator's model for the engine. `evaluate(state, x, y)`
  scores the moving average with the torch mirror (`fedfleet.models.mirrors.video_denoiser.VideoDenoiser`) on the
  held-out clips every `eval_every` rounds and on the last round, and returns (x0_mse, denoise_loss):
  - x0_mse (the generation-quality number, lower is better): the mean squared error of the clean-clip
    estimate x0_hat(x_t, t, c) against the true clip, at the fixed steps `QUALITY_T`, with noise drawn
    once from a fixed seed (the same draws every evaluation);
  - denoise_loss: the training objective on the held-out clips, t uniform and noise from a fixed seed.
  Rounds in between return NaN, which the ledger stores as NULL (not evaluated). Every evaluation is also
  appended to `RUN_DIR/diffusion_eval.jsonl` with x0_mse per step.
- `write_files(run_dir, state)`: the final moving average as `denoiser.npz` (`video_denoiser.layout` names) and
  `denoiser.onnx` (`fedfleet.models.export_video_denoiser`), checked against numpy on onnxruntime; the summary
  also writes the last global iterate (what the agents hold) as `denoiser-last.npz`.
"""

from __future__ import annotations

import functools
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedfleet.coordinator.tasks.base import RoundContext
from fedfleet.coordinator.tasks.ema import EMAStrategy, decay_per_round
from fedfleet.edge_agent.errors import ConfigError
from fedfleet.edge_agent.learners import LocalData
from fedfleet.edge_agent.model import EdgeModel
from fedfleet.edge_agent.nn import video_denoiser as vd
from fedfleet.models import data as datasets
from fedfleet.models import moving_digits
from fedfleet.models.mirrors.video_denoiser import VideoDenoiser

TASK = "moving-digits-diffusion"
DEFAULT_HIDDEN = vd.DEFAULT_HIDDEN
REPEATS = 4  # clips per training image: 1,437 digit images -> 5,748 training clips
QUALITY_T = (100, 300, 500, 700, 900)
EVAL_SEED = 0xD1FF
EVAL_FILE = "diffusion_eval.jsonl"
NPZ_FILE = "denoiser.npz"
LAST_NPZ_FILE = "denoiser-last.npz"
ONNX_FILE = "denoiser.onnx"
QUALITY_KEY = "x0_mse"  # what the ledger's per-round score column holds for this task


def hidden_of(cfg: Any) -> tuple[int, ...]:
    return DEFAULT_HIDDEN if not cfg.hidden else (int(cfg.hidden),) * int(cfg.hidden_layers)


@functools.lru_cache(maxsize=2)
def _clips(seed: int) -> tuple[moving_digits.ClipSet, moving_digits.ClipSet]:
    return moving_digits.moving_digits(seed, repeats=REPEATS)  # a few seconds of rendering: once per seed


def shards(cfg: Any) -> tuple[list[LocalData], moving_digits.ClipSet]:
    train, test = _clips(int(cfg.seed))
    try:
        parts = datasets.partition(train.digit, cfg.agents, cfg.alpha, cfg.seed)
    except ValueError as exc:
        raise ConfigError(f"field 'agents' = {cfg.agents} on {TASK} ({len(train)} training clips): {exc}") from None
    return [LocalData(train.x[p], train.y[p]) for p in parts], test


def build(cfg: Any) -> tuple[bytes, DiffusionModel]:
    from fedfleet.coordinator.job.config import DIFFUSION_EVAL_EVERY
    from fedfleet.models.diffusion_package import build_diffusion_package

    init = None
    if not cfg.hidden:
        from fedfleet.models import pretrain_video_denoiser

        init = pretrain_video_denoiser.load()
    blob = build_diffusion_package(hidden_of(cfg), seed=cfg.seed, init=init)
    return blob, DiffusionModel(blob, rounds=cfg.rounds, eval_every=cfg.eval_every or DIFFUSION_EVAL_EVERY)


def _eval_draws(n: int, steps: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Fixed draws for scoring n held-out clips: noise per quality step, uniform t and noise for the loss."""
    rng = np.random.Generator(np.random.PCG64(EVAL_SEED))
    shape = (n, vd.FRAMES, vd.SIZE, vd.SIZE)
    eps_q = rng.standard_normal((len(QUALITY_T), *shape)).astype(np.float32)
    t_loss = rng.integers(0, steps, n)
    eps_loss = rng.standard_normal(shape).astype(np.float32)
    return eps_q, t_loss, eps_loss


@torch.no_grad()
def score(state: dict[str, Any], x0: np.ndarray, y: np.ndarray, steps: int = vd.STEPS) -> dict[str, Any]:
    """x0_mse (mean over QUALITY_T), x0_mse per step, and the denoising loss of `state` on clips (x0, y)."""
    model = VideoDenoiser.from_state({k: np.asarray(v) for k, v in state.items()}, steps)
    ab = vd.alpha_bar(steps)
    eps_q, t_loss, eps_loss = _eval_draws(len(y), steps)
    x0 = np.asarray(x0, np.float32)
    cond = torch.from_numpy(np.asarray(y, np.int64))
    by_t = {}
    for i, t in enumerate(QUALITY_T):
        tt = np.full(len(y), t)
        x_t = vd.noised(x0, tt, eps_q[i], ab)
        est = model.predict_x0(torch.from_numpy(x_t), torch.from_numpy(tt), cond).numpy()
        by_t[str(t)] = float(np.mean((est - x0) ** 2))
    x_t = vd.noised(x0, t_loss, eps_loss, ab)
    est = model.predict_x0(torch.from_numpy(x_t), torch.from_numpy(t_loss), cond).numpy()
    return {"x0_mse": float(np.mean(list(by_t.values()))), "x0_mse_by_t": by_t,
            "denoise_loss": float(np.mean((est - x0) ** 2))}


class DiffusionModel:
    """The engine's model for the diffusion task: the package's initial state and the periodic evaluation."""

    score_name = "x0 MSE"  # what the round score (the ledger's score column) is, for progress lines
    scores_rounds = True  # it scores every eval_every rounds: its evaluate takes the round's context

    def __init__(self, blob: bytes, *, rounds: int, eval_every: int = 1) -> None:
        self.edge = EdgeModel.from_bytes(blob)
        self.digest = self.edge.digest
        self.manifest = self.edge.manifest
        self.head_layout = self.edge.head_layout
        self.steps = int(self.manifest["diffusion"]["steps"])
        self.rounds, self.eval_every = rounds, max(1, int(eval_every))
        self.last: dict[str, Any] | None = None

    def initial_state(self) -> dict[str, torch.Tensor]:
        return {k: torch.from_numpy(v.copy()) for k, v in self.edge.head_init.items()}

    def due(self, round: int) -> bool:
        return round % self.eval_every == 0 or round >= self.rounds

    def evaluate(self, state: dict[str, Any], x: np.ndarray, y: np.ndarray,
                 ctx: RoundContext | None = None) -> tuple[float, float]:
        """(x0_mse, denoise_loss) on the held-out clips, or (NaN, NaN) on a round that is not evaluated (the
        round is the context's; without one, the last). Each evaluation is appended to the run dir's log."""
        round = ctx.round if ctx is not None else self.rounds
        if not self.due(round):
            return math.nan, math.nan
        self.last = {"round": round, **score(state, x, y, self.steps)}
        if ctx is not None:
            with open(Path(ctx.run_dir) / EVAL_FILE, "a", encoding="utf-8") as fh:
                fh.write(json.dumps(self.last) + "\n")
        return self.last["x0_mse"], self.last["denoise_loss"]

    def summary(self, run_dir: Path, state: dict[str, Any], x: np.ndarray, y: np.ndarray,
                last: dict[str, Any] | None = None) -> dict[str, Any]:
        """The run's honest summary keys (no accuracy: this model has none) and its model files, written now:
        `state` is the generator shipped (the moving average), `last` the last global iterate if it differs."""
        final = score(state, x, y, self.steps)
        initial = score(self.initial_state(), x, y, self.steps)
        files = write_files(run_dir, state)
        out = {"final_accuracy": None, "task": TASK, "quality_metric": QUALITY_KEY,
               "final_x0_mse": final["x0_mse"], "final_denoise_loss": final["denoise_loss"],
               "initial_x0_mse": initial["x0_mse"], "initial_denoise_loss": initial["denoise_loss"]}
        if last is not None:
            from fedfleet.models.export_video_denoiser import save_npz

            save_npz(_numpy(last), Path(run_dir) / LAST_NPZ_FILE)
            files["last_npz"] = LAST_NPZ_FILE
            final_last = score(last, x, y, self.steps)
            out.update(last_x0_mse=final_last["x0_mse"], last_denoise_loss=final_last["denoise_loss"])
        return {**out, "files": files}


class DiffusionTask:
    """The task object of the assembly (`fedfleet.coordinator.tasks.base.Task`) over the functions above."""

    name = TASK
    score_name = DiffusionModel.score_name

    def __init__(self, job: Any) -> None:
        self.job = job
        self._model: DiffusionModel | None = None
        self._test: moving_digits.ClipSet | None = None
        self._ema: EMAStrategy | None = None

    @property
    def test(self) -> moving_digits.ClipSet:
        if self._test is None:
            self._test = _clips(int(self.job.seed))[1]
        return self._test

    def shards(self, agents: int) -> list[LocalData]:
        import dataclasses

        local, self._test = shards(dataclasses.replace(self.job, agents=agents))
        return local

    def package(self) -> tuple[bytes, DiffusionModel]:
        blob, self._model = build(self.job)
        return blob, self._model

    def steps_per_round(self, settings: Any) -> int:
        """The local steps of a round: `local_steps`, else epochs x the batches of a shard of the task's clips."""
        if getattr(settings, "local_steps", None):
            return int(settings.local_steps)
        clips = len(_clips(int(self.job.seed))[0]) / max(1, int(self.job.agents))
        return max(1, int(settings.epochs) * math.ceil(clips / int(settings.batch)))

    def wrap_strategy(self, strategy: Any) -> Any:
        from fedfleet.models.pretrain_video_denoiser import EMA

        self._ema = EMAStrategy(strategy, decay_per_round(EMA, self.steps_per_round(strategy.settings)))
        return self._ema

    def _shipped(self, state: dict[str, Any]) -> dict[str, Any]:
        return self._ema.ema_state() if self._ema is not None else state

    def evaluate(self, ctx: RoundContext, state: dict[str, Any]) -> tuple[float, float]:
        if self._model is None:
            self.package()
        assert self._model is not None
        return self._model.evaluate(self._shipped(state), self.test.x, self.test.y, ctx=ctx)

    def summary(self, run_dir: Path, state: dict[str, Any]) -> dict[str, Any] | None:
        if self._model is None:
            self.package()
        assert self._model is not None
        return self._model.summary(run_dir, self._shipped(state), self.test.x, self.test.y,
                                   last=state if self._ema is not None else None)


def write_files(run_dir: str | Path, state: dict[str, Any]) -> dict[str, str]:
    """`denoiser.npz` (layout names) and `denoiser.onnx` in `run_dir`; returns {"npz": name, "onnx": name}."""
    from fedfleet.models.export_video_denoiser import check_onnx, export_onnx, save_npz

    run_dir = Path(run_dir)
    params = _numpy(state)
    save_npz(params, run_dir / NPZ_FILE)
    onnx_path = export_onnx(params, run_dir / ONNX_FILE)
    check_onnx(params, onnx_path)
    return {"npz": NPZ_FILE, "onnx": ONNX_FILE}


def _numpy(state: dict[str, Any]) -> dict[str, np.ndarray]:
    return {k: np.asarray(v.detach().cpu().numpy() if isinstance(v, torch.Tensor) else v, np.float32)
            for k, v in state.items()}
