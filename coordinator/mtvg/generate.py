"""`fedfleet generate`: MTVG sampling of a prompt sequence with the fleet-trained video denoiser (torch).

    fedfleet generate --prompts "3 right; 3 down; 5 down" --out DIR [--run RUN_DIR | --weights denoiser.npz]
                      [--seed S] [--steps 50] [--naive] [--no-inversion] [--no-dynamic-noise]
                      [--no-structure-guidance] [--classify]

The weights are `RUN_DIR/denoiser.npz` (a moving-digits-diffusion run) or `--weights`. `--naive` samples every
segment from fresh noise (plain DDIM); the `--no-*` switches turn one MTVG technique off. Writes frames.npy,
strip.png, sequence.gif and segments.json into DIR (`fedfleet.edge_agent.mtvg.output`); `--classify` also trains the
condition classifier on real clips (about a minute) and adds its digit and direction per segment. A bad prompt,
option or weights file is one line on stderr and exit 2. MTVG's procedure on a toy video model, not
text-to-video generation.
"""

from __future__ import annotations

import json
from pathlib import Path

from fedfleet.edge_agent.cli_run import ArgParser
from fedfleet.edge_agent.errors import ConfigError
from fedfleet.edge_agent.mtvg.generate import options_args, options_from
from fedfleet.edge_agent.mtvg.prompts import parse_prompts


def main(argv: list[str] | None = None) -> int:
    p = ArgParser(prog="fedfleet generate", description=__doc__.splitlines()[0])
    options_args(p)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--run", help="a run directory holding denoiser.npz")
    src.add_argument("--weights", help="denoiser.npz")
    p.add_argument("--classify", action="store_true", help="score each segment with the condition classifier")
    args = p.parse_args(argv)
    conds = parse_prompts(args.prompts)
    opts = options_from(args)
    weights = Path(args.run) / "denoiser.npz" if args.run else Path(args.weights)
    if not weights.is_file():
        raise ConfigError(f"--{'run' if args.run else 'weights'}: {weights} does not exist")
    from fedfleet.coordinator.mtvg import sample as mtvg
    from fedfleet.edge_agent.mtvg.output import write_outputs

    model = mtvg.load_denoiser(weights)
    seq = mtvg.sample_sequences(model, conds, seed=args.seed, options=opts)[0]
    extra = None
    meta = {"prompts": args.prompts, "seed": args.seed, "sampler": "torch", "weights": weights.name,
            "options": vars(opts)}
    if args.classify:
        from fedfleet.coordinator.mtvg import clip_classifier
        from fedfleet.edge_agent.nn.video_denoiser import DIRECTIONS

        clf = clip_classifier.train(seed=0)
        digit, direction = clf.model.predict(seq)
        extra = [{"classifier_digit": int(d), "classifier_direction": DIRECTIONS[int(m)],
                  "classifier_agrees": bool(int(d) * len(DIRECTIONS) + int(m) == int(c))}
                 for d, m, c in zip(digit, direction, conds)]
        meta["classifier_held_out_accuracy"] = clf.test_accuracy
    doc = write_outputs(args.out, seq, conds, meta, extra)
    print(json.dumps({"out": str(args.out), "files": doc["files"], "mean_boundary_mse": doc["mean_boundary_mse"]}))
    return 0
