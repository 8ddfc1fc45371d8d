"""The federated run's yardstick: the same model trained centrally on the pooled training data.

Same package as the fleet's (the frozen int8 backbone built from job.toml's [model], through the same ONNX
Runtime session the agents use), same linear head, same initial head tensors, same SGD (lr, batch from the
job's [method]), trained for as many epochs as the federated run has rounds, on all of [data] at once.
Prints the held-out accuracy ([eval]) as JSON.

    python examples/own-model/central.py [--config examples/own-model/job.toml] [--epochs N]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from fedfleet.coordinator.job.config import load
from fedfleet.coordinator.strategies import method_config
from fedfleet.coordinator.tasks import task_for
from fedfleet.edge_agent.nn import mlp


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=str(Path(__file__).with_name("job.toml")))
    p.add_argument("--epochs", type=int, help="default: the job's rounds")
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    job = load(args.config)
    task = task_for(job)
    _, cmodel = task.package()
    cfg = method_config(job)
    lr, batch, epochs = float(cfg.get("lr", 0.1)), int(cfg.get("batch", 16)), args.epochs or job.rounds
    feats = cmodel.edge.features(task.train.x, "central-train")
    head = {k: v.copy() for k, v in cmodel.edge.head_init.items()}
    rng = np.random.Generator(np.random.PCG64(job.seed))
    for _ in range(epochs):
        for idx in np.array_split(rng.permutation(len(feats)), max(1, len(feats) // batch)):
            _, grads = mlp.loss_and_grad(head, feats[idx], task.train.y[idx])
            for k in head:
                head[k] -= lr * grads[k]
    score, loss = task.evaluate(None, head)  # type: ignore[arg-type]
    print(json.dumps({"central_" + task.metric: round(score, 4), "loss": round(loss, 4), "epochs": epochs,
                      "train_samples": len(task.train), "eval_samples": len(task.test),
                      "wall_s": round(time.perf_counter() - t0, 2)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
