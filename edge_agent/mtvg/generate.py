"""`fedfleet-agent generate`: MTVG sampling on a device with the exported denoiser through ONNX Runtime.

    fedfleet-agent generate --model denoiser.onnx --weights denoiser.npz --prompts "3 right; 3 down" --out DIR
                            [--seed S] [--steps 50] [--naive] [--cfg-scale W] [--no-inversion] [--no-dynamic-noise]
                            [--no-structure-guidance] [--threads N]

The ONNX model does the network passes; the npz weights give the structure-guidance gradient in numpy
(`fedfleet.edge_agent.mtvg.sample`). With `--naive` the same seed gives the same frames as `fedfleet generate` on
the coordinator, within float32 tolerance; full MTVG amplifies float rounding into different later segments
(docs/howto/diffusion.md). Writes frames.npy, segments.json and, with Pillow, strip.png and sequence.gif
(`fedfleet.edge_agent.mtvg.output`). A bad prompt, option or model file is one line on stderr and exit 2.
`options_args` / `options_from` are the sampler options both generate commands share.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

from fedfleet.edge_agent.cli_run import ArgParser
from fedfleet.edge_agent.errors import ConfigError, FedfleetError
from fedfleet.edge_agent.mtvg.prompts import parse_prompts
from fedfleet.edge_agent.mtvg.sample import MTVGOptions


def options_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--prompts", required=True, help="e.g. '3 right; 3 down; 5 down'")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--seed", type=int, default=0, help="seed of the sampling (default %(default)s)")
    p.add_argument("--steps", type=int, default=MTVGOptions.steps, help="DDIM steps")
    p.add_argument("--naive", action="store_true", help="every segment from fresh noise (no MTVG)")
    p.add_argument("--cfg-scale", type=float, default=MTVGOptions.cfg_scale,
                   help="classifier-free guidance weight on the digit, 1 = off (default %(default)s)")
    for name in ("inversion", "dynamic-noise", "structure-guidance"):
        p.add_argument(f"--no-{name}", action="store_true", help=f"switch MTVG's {name.replace('-', ' ')} off")


def options_from(args: argparse.Namespace) -> MTVGOptions:
    if not 0 <= args.seed < 1 << 32:
        raise ConfigError(f"--seed must be an integer from 0 to {(1 << 32) - 1}, got {args.seed}")
    opts = replace(MTVGOptions.naive(args.steps) if args.naive else MTVGOptions(steps=args.steps),
                   cfg_scale=args.cfg_scale)
    for name in ("inversion", "dynamic_noise", "structure_guidance"):
        if getattr(args, f"no_{name}"):
            opts = replace(opts, **{name: False})
    try:
        return opts.check()
    except ConfigError as exc:  # "<field> must ...": name the flag
        field, rest = str(exc).split(" ", 1)
        raise ConfigError(f"--{field.replace('_', '-')} {rest}") from None


def main(argv: list[str]) -> int:
    p = ArgParser(prog="fedfleet-agent generate", description=__doc__.splitlines()[0])
    options_args(p)
    p.add_argument("--model", required=True, help="the exported denoiser (.onnx)")
    p.add_argument("--weights", required=True, help="its weights (denoiser.npz), for the guidance gradient")
    p.add_argument("--threads", type=int, default=1, help="ONNX Runtime threads (default %(default)s)")
    args = p.parse_args(argv)
    try:
        conds = parse_prompts(args.prompts)
        opts = options_from(args)
        for what, path in (("--model", args.model), ("--weights", args.weights)):
            if not Path(path).is_file():
                raise ConfigError(f"{what}: {path} does not exist")
        from fedfleet.edge_agent.mtvg.output import write_outputs
        from fedfleet.edge_agent.mtvg.sample import OnnxDenoiser

        denoiser = OnnxDenoiser(args.model, args.weights, threads=max(1, args.threads))
        seq = denoiser.sample(conds, seed=args.seed, options=opts)[0]
        meta = {"prompts": args.prompts, "seed": args.seed, "sampler": "onnxruntime",
                "model": Path(args.model).name, "weights": Path(args.weights).name, "options": vars(opts)}
        doc = write_outputs(args.out, seq, conds, meta)
    except FedfleetError as exc:
        print(f"fedfleet-agent generate: error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps({"out": str(args.out), "files": doc["files"], "mean_boundary_mse": doc["mean_boundary_mse"]}))
    return 0
