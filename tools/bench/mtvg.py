"""Benchmark: MTVG's sampling against naive per-segment sampling, on a video denoiser trained by FedAvg.

MTVG's procedure on a toy video model (moving digits, `fedfleet.models.moving_digits`), not text-to-video.

1. **Training.** By default (`--trainer fleet`) the fleet trains the denoiser: `fedfleet demo --method fedavg
   --task moving-digits-diffusion` (`fedfleet.coordinator.job.run.run_demo`, the task's defaults: local Adam, FedZip
   uplink and downlink) with `--agents` in-process agents over a real MQTT broker (`--broker`: the embedded
   one, `mosquitto`, or mqtt://host:port) for `--rounds` rounds; the run's `denoiser.npz` is what is sampled.
   `--trainer inprocess` is the same FedAvg without a broker, in this process: every round each agent
   starts from the global weights, runs `--local-steps` numpy Adam steps (fresh Adam state each round) on
   batches of its own clips with `video_denoiser.loss_and_grad`, and the coordinator adds the sample-weighted
   mean of the local deltas. The details line says which trainer ran.
2. **Scoring.** A condition classifier (`fedfleet.coordinator.mtvg.clip_classifier`) is trained centrally on real clips;
   its held-out accuracy is in the details.
3. **Sampling.** `--sequences` prompt sequences of 3 segments, each segment's digit and direction drawn
   uniformly (seeded), are sampled by `fedfleet.coordinator.mtvg.sample` (DDIM, `--steps` steps) with the same seed in every
   variant: naive (every segment from fresh noise, plain DDIM), MTVG (all three techniques) and three
   ablations, each with one technique off. Metrics (`fedfleet.coordinator.mtvg.metrics`): boundary MSE (last frame of
   a segment against the first of the next, per transition), condition accuracy (classifier digit AND
   direction right, per segment), repetition (over transitions whose condition changes direction: the
   fraction whose estimated motion equals the previous segment's estimated motion).

Prints exactly {"segments", "boundary_mse_naive", "boundary_mse_mtvg", "condition_accuracy_naive",
"condition_accuracy_mtvg", "repetition_naive", "repetition_mtvg", "fl_rounds"} ("segments" counts the scored
segments, sequences x 3); ablations, the classifier's accuracy, the training history and timings go to the
stderr `details:` line. `--plot PNG` draws generated sequences, naive next to MTVG.

    fedfleet bench mtvg [--quick] [--rounds R] [--agents A] [--sequences N] [--json PATH] [--plot PNG]
"""

from __future__ import annotations

import sys
import time
from dataclasses import replace
from typing import Any

import numpy as np
import torch

from fedfleet.coordinator.mtvg import clip_classifier
from fedfleet.coordinator.mtvg import metrics as mtvg_metrics
from fedfleet.coordinator.mtvg import sample as mtvg
from fedfleet.edge_agent.cli_run import ArgParser
from fedfleet.edge_agent.mtvg.prompts import describe
from fedfleet.edge_agent.mtvg.sample import MTVGOptions
from fedfleet.edge_agent.nn import video_denoiser as vd
from fedfleet.models import data as datasets
from fedfleet.models import moving_digits as md
from fedfleet.tools.bench.output import emit

KEYS = ("segments", "boundary_mse_naive", "boundary_mse_mtvg", "condition_accuracy_naive",
        "condition_accuracy_mtvg", "repetition_naive", "repetition_mtvg", "fl_rounds")
SEGMENTS_PER_SEQUENCE = 3
TRAINER = "in-process FedAvg (numpy local Adam, sample-weighted mean of deltas; no broker)"


def train_by_fleet(*, agents: int, rounds: int, hidden: int, alpha: float, seed: int, broker: str,
                   eval_every: int = 5, epochs: int | None = None) -> tuple[vd.Params, dict[str, Any]]:
    """The fleet's own job: `--task moving-digits-diffusion` over MQTT; (the final global weights, details)."""
    import json
    import tempfile
    from pathlib import Path

    from fedfleet.coordinator.job.config import DIFFUSION_TASK, JobConfig
    from fedfleet.coordinator.job.run import run_demo
    from fedfleet.models.export_video_denoiser import load_npz

    cfg = JobConfig(task=DIFFUSION_TASK, rounds=rounds, agents=agents, hidden=hidden, alpha=alpha, seed=seed,
                    eval_every=eval_every, deadline_s=600.0,
                    method_config={} if epochs is None else {"epochs": int(epochs)})
    url = broker
    mosq = None
    if broker == "mosquitto":
        from fedfleet.coordinator.broker import start_broker

        mosq = start_broker("mosquitto")
        url = mosq.url
    try:
        with tempfile.TemporaryDirectory() as d:
            result = run_demo(cfg, broker=url, run_dir=d, quiet=True, report="none")
            params = load_npz(Path(d) / "denoiser.npz")
            summary = json.loads((Path(d) / "summary.json").read_text())
    finally:
        if mosq is not None:
            mosq.stop()
    return params, {"trainer": f"fedfleet demo --method fedavg --task {DIFFUSION_TASK} over MQTT ({broker})",
                    "agents": agents, "hidden": [int(v.shape[0]) for k, v in params.items()
                                                 if k.endswith(".bias")][:-1],
                    "alpha": alpha, "local_epochs": epochs or "the task's default", "bytes_up": result.bytes_up, "bytes_down": result.bytes_down,
                    "wall_s": round(result.wall_s, 1), "ok_per_round": [s.ok for s in result.summaries],
                    **{k: summary.get(k) for k in ("initial_x0_mse", "final_x0_mse", "initial_denoise_loss",
                                                   "final_denoise_loss")}}


def _adam(params: vd.Params, lr: float) -> Any:
    m = {k: np.zeros_like(v) for k, v in params.items()}
    v2 = {k: np.zeros_like(v) for k, v in params.items()}
    step = [0]

    def update(grads: vd.Params) -> None:
        step[0] += 1
        b1, b2 = 0.9, 0.999
        for k, g in grads.items():
            m[k] = b1 * m[k] + (1 - b1) * g
            v2[k] = b2 * v2[k] + (1 - b2) * g * g
            mh, vh = m[k] / (1 - b1 ** step[0]), v2[k] / (1 - b2 ** step[0])
            params[k] -= (lr * mh / (np.sqrt(vh) + 1e-8)).astype(np.float32)

    return update


def held_out_loss(params: vd.Params, test: md.ClipSet, n: int = 256) -> float:
    """The denoising loss on the first `n` test clips, on fixed draws (comparable across rounds)."""
    ab = vd.alpha_bar()
    return float(np.mean([vd.loss_and_grad(params, test.x[i:i + 64], test.y[i:i + 64], np.random.default_rng(i), ab)[0]
                          for i in range(0, min(n, len(test)), 64)]))


def train_denoiser(train: md.ClipSet, test: md.ClipSet, *, agents: int, rounds: int, local_steps: int, batch: int,
                   lr: float, hidden: tuple[int, ...], alpha: float, seed: int,
                   eval_every: int = 5) -> tuple[vd.Params, dict[str, Any]]:
    """FedAvg over `agents` in-process agents; returns the global weights and {trainer, history, ...}."""
    parts = datasets.partition(train.y, agents, alpha, seed)
    global_params = vd.init(hidden, seed=seed)
    history: list[dict[str, float]] = [{"round": 0, "held_out_loss": held_out_loss(global_params, test)}]
    ab = vd.alpha_bar()
    for r in range(rounds):
        deltas, weights, losses = [], [], []
        for a, idx in enumerate(parts):
            local = {k: v.copy() for k, v in global_params.items()}
            update = _adam(local, lr)
            rng = np.random.default_rng([seed, r, a])
            for _ in range(local_steps):
                pick = idx[rng.choice(len(idx), min(batch, len(idx)), replace=False)]
                loss, grads = vd.loss_and_grad(local, train.x[pick], train.y[pick], rng, ab)
                update(grads)
                losses.append(loss)
            deltas.append({k: local[k] - global_params[k] for k in local})
            weights.append(len(idx))
        w = np.asarray(weights, np.float64) / sum(weights)
        for k in global_params:
            global_params[k] = (global_params[k] + sum(wi * d[k] for wi, d in zip(w, deltas))).astype(np.float32)
        entry = {"round": r + 1, "train_loss": float(np.mean(losses))}
        if (r + 1) % eval_every == 0 or r + 1 == rounds:
            entry["held_out_loss"] = held_out_loss(global_params, test)
        history.append(entry)
        print(f"round {r + 1}/{rounds}: train loss {entry['train_loss']:.4f}"
              + (f", held-out {entry['held_out_loss']:.4f}" if "held_out_loss" in entry else ""), file=sys.stderr,
              flush=True)
    return global_params, {"trainer": TRAINER, "agents": agents, "local_steps": local_steps, "batch": batch,
                           "lr": lr, "hidden": list(hidden), "alpha": alpha, "partition_sizes": weights,
                           "history": history}


def prompt_sequences(n: int, seed: int) -> np.ndarray:
    """(n, 3) condition ids, digit and direction uniform per segment."""
    rng = np.random.default_rng([seed, 0x9E0])
    return vd.condition_id(rng.integers(0, vd.CLASSES, (n, SEGMENTS_PER_SEQUENCE)),
                           rng.integers(0, len(vd.DIRECTIONS), (n, SEGMENTS_PER_SEQUENCE))).astype(np.int64)


def score(seqs: np.ndarray, conds: np.ndarray, classifier: clip_classifier.ClipClassifier) -> dict[str, float]:
    flat, cflat = seqs.reshape(-1, *seqs.shape[2:]), conds.reshape(-1)
    both, digit, direction = clip_classifier.accuracy(classifier, flat, cflat)
    rep, transitions = mtvg_metrics.repetition(seqs, conds)
    return {"boundary_mse": float(mtvg_metrics.boundary_mse(seqs).mean()), "condition_accuracy": both,
            "digit_accuracy": digit, "direction_accuracy": direction, "repetition": rep,
            "repetition_transitions": transitions,
            "estimated_motion_accuracy": mtvg_metrics.motion_accuracy(seqs, conds)}



def variants(steps: int, **overrides: Any) -> dict[str, MTVGOptions]:
    full = replace(MTVGOptions(steps=steps), **overrides)
    return {"naive": MTVGOptions.naive(steps), "mtvg": full,
            "no_inversion": full.without("inversion"), "no_dynamic_noise": full.without("dynamic_noise"),
            "no_structure_guidance": full.without("structure_guidance")}


def onnxruntime_agreement(params: vd.Params, conds: np.ndarray, seed: int, options: MTVGOptions,
                          torch_frames: np.ndarray) -> dict[str, float]:
    """The first MTVG sequences sampled on the device path (ONNX Runtime + numpy guidance) against torch's
    (a sequence's noise depends only on the seed, the segment and its index, not on the batch).

    The model goes through the project's exporter, `fedfleet.models.export_video_denoiser.export_onnx`."""
    import tempfile

    from fedfleet.edge_agent.mtvg.sample import OnnxDenoiser
    from fedfleet.models.export_video_denoiser import export_onnx

    with tempfile.TemporaryDirectory() as d:
        np.savez(f"{d}/denoiser.npz", **params)
        export_onnx(params, f"{d}/denoiser.onnx")
        frames = OnnxDenoiser(f"{d}/denoiser.onnx", f"{d}/denoiser.npz").sample(conds, seed, options)
    diff = np.abs(frames - torch_frames)
    return {"sequences": len(conds), "max_abs": float(diff.max()), "mean_abs": float(diff.mean())}


def main(argv: list[str] | None = None) -> int:
    p = ArgParser(prog="fedfleet bench mtvg", description=__doc__.split("\n")[0])
    p.add_argument("--trainer", choices=("fleet", "inprocess"), default="fleet",
                   help="fleet: the --task moving-digits-diffusion job over MQTT (default); inprocess: no broker")
    p.add_argument("--broker", default="embedded", help="fleet trainer: embedded, mosquitto or mqtt://host:port")
    p.add_argument("--local-epochs", type=int, default=None,
                   help="fleet trainer: local epochs per round (default: the task's, 2)")
    p.add_argument("--agents", type=int, default=4, help="agents training the denoiser (default %(default)s)")
    p.add_argument("--rounds", type=int, default=20, help="FedAvg rounds (default %(default)s)")
    p.add_argument("--local-steps", type=int, default=40, help="local steps per round (default %(default)s)")
    p.add_argument("--batch", type=int, default=32, help="local batch size (default %(default)s)")
    p.add_argument("--lr", type=float, default=1e-3, help="local learning rate (default %(default)s)")
    p.add_argument("--hidden", type=int, default=0, help="width of both hidden layers (0: the task's default, 256; "
                   "the in-process trainer's is 512)")
    p.add_argument("--alpha", type=float, default=0.0, help="Dirichlet skew over conditions (0 = IID)")
    p.add_argument("--sequences", type=int, default=64, help="prompt sequences sampled per method (default %(default)s)")
    p.add_argument("--steps", type=int, default=50, help="DDIM steps")
    p.add_argument("--classifier-epochs", type=int, default=12, help="epochs of the motion classifier that scores the clips (default %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of the data, the training and the sampling (default %(default)s)")
    p.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run of seconds")
    p.add_argument("--json", dest="json_path", help="also write the result JSON to this file")
    p.add_argument("--plot", help="PNG of generated sequences, naive next to MTVG")
    p.add_argument("--weights-in", help="skip training: sample with this denoiser.npz (give --rounds it was "
                   "trained for, which is reported as fl_rounds)")
    p.add_argument("--guide-step", choices=("linesearch", "normalised"), default=MTVGOptions.guide_step,
                   help="structure-guidance update rule (normalised: the first runs' rule; give --guide-scale 0.3)")
    p.add_argument("--guide-scale", type=float, default=None, help=f"default {MTVGOptions.guide_scale}")
    p.add_argument("--weights-out", help="also save the trained denoiser here (.npz, for `fedfleet generate`)")
    args = p.parse_args(argv)
    repeats = 4
    if args.quick:
        args.agents, args.rounds, args.local_steps, args.batch, args.hidden = 2, 1, 2, 16, 32
        args.sequences, args.steps, args.classifier_epochs, repeats = 4, 6, 1, 1
    t0 = time.perf_counter()
    train, test = md.moving_digits(seed=args.seed, repeats=repeats)
    if args.weights_in:
        from fedfleet.edge_agent.mtvg.sample import load_weights

        params = load_weights(args.weights_in)
        training: dict[str, Any] = {"trainer": f"not trained here: loaded {args.weights_in}",
                                    "held_out_loss": held_out_loss(params, test)}
    elif args.trainer == "fleet":
        params, training = train_by_fleet(agents=args.agents, rounds=args.rounds, hidden=args.hidden,
                                          alpha=args.alpha, seed=args.seed, broker=args.broker,
                                          eval_every=max(1, min(5, args.rounds)), epochs=args.local_epochs)
        training["held_out_loss"] = held_out_loss(params, test)
    else:
        width = args.hidden or vd.DEFAULT_HIDDEN[0]
        params, training = train_denoiser(train, test, agents=args.agents, rounds=args.rounds,
                                          local_steps=args.local_steps, batch=args.batch, lr=args.lr,
                                          hidden=(width, width), alpha=args.alpha, seed=args.seed)
    guide = {"guide_step": args.guide_step}
    if args.guide_scale is not None:
        guide["guide_scale"] = args.guide_scale
    t_train = time.perf_counter() - t0
    clf = clip_classifier.train(seed=args.seed, epochs=args.classifier_epochs, repeats=repeats)
    model = mtvg.from_state(params)
    conds = prompt_sequences(args.sequences, args.seed)
    scores: dict[str, dict[str, float]] = {}
    samples: dict[str, np.ndarray] = {}
    timings: dict[str, float] = {}
    torch.manual_seed(args.seed)
    for name, opts in variants(args.steps, **guide).items():
        t1 = time.perf_counter()
        samples[name] = mtvg.sample_sequences(model, conds, seed=args.seed, options=opts)
        timings[name] = round(time.perf_counter() - t1, 2)
        scores[name] = score(samples[name], conds, clf.model)
        print(f"{name}: {scores[name]}", file=sys.stderr, flush=True)
    if args.plot:
        from fedfleet.coordinator.mtvg.render import comparison_png

        rows = []
        for i in range(min(3, len(conds))):
            label = " ; ".join(describe(c) for c in conds[i])
            rows += [(f"naive: {label}", samples["naive"][i]), (f"MTVG: {label}", samples["mtvg"][i])]
        comparison_png(args.plot, rows)
    n_seg = int(conds.size)
    if args.weights_out:
        np.savez(args.weights_out, **params)
    device_check = onnxruntime_agreement(params, conds[:4], args.seed, variants(args.steps, **guide)["mtvg"],
                                         samples["mtvg"][:4])
    result: dict[str, Any] = {
        "segments": n_seg,
        "boundary_mse_naive": scores["naive"]["boundary_mse"], "boundary_mse_mtvg": scores["mtvg"]["boundary_mse"],
        "condition_accuracy_naive": scores["naive"]["condition_accuracy"],
        "condition_accuracy_mtvg": scores["mtvg"]["condition_accuracy"],
        "repetition_naive": scores["naive"]["repetition"], "repetition_mtvg": scores["mtvg"]["repetition"],
        "fl_rounds": args.rounds,
        "sequences": len(conds), "segments_per_sequence": SEGMENTS_PER_SEQUENCE,
        "variants": scores, "options": {k: vars(v) for k, v in variants(args.steps, **guide).items()},
        "classifier_held_out": {"both": clf.test_accuracy, "digit": clf.test_digit_accuracy,
                                "direction": clf.test_direction_accuracy, "clips": len(test)},
        "real_clip_boundary_mse_within_clip": float(np.mean((test.x[:, 1:] - test.x[:, :-1]) ** 2)),
        "onnxruntime_vs_torch_mtvg": device_check, "training": training, "train_s": round(t_train, 1), "sample_s": timings,
        "targets": {"boundary_mse_mtvg_le_half_naive": scores["mtvg"]["boundary_mse"]
                    <= 0.5 * scores["naive"]["boundary_mse"],
                    "condition_accuracy_within_5_points": abs(scores["mtvg"]["condition_accuracy"]
                                                              - scores["naive"]["condition_accuracy"]) <= 0.05},
        "seed": args.seed, "quick": args.quick,
    }
    emit(result, KEYS, args.json_path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
