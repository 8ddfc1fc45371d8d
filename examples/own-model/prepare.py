"""Each smart plug's own data, as a device would log it: one CSV per plug with a `label` column (the
appliance class, 0-10) and the current signature resampled to 256 columns `i0` .. `i255`.

The plugs' data are PLAID's training series split across the plugs the way the demo splits them
(Dirichlet label skew with the job's alpha and seed), so a run on devices sees the same shards as
`fedfleet demo`. A plug then joins with `fedfleet-agent ... --data plugs/plug-01.csv --input-shape 1,256`.

    python examples/own-model/prepare.py --out plugs --ids plug-01,plug-02 [--config examples/own-model/job.toml]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from fedfleet.coordinator.job.config import load
from fedfleet.coordinator.tasks import task_for


def write_csv(path: Path, x: np.ndarray, y: np.ndarray) -> None:
    flat = x.reshape(len(x), -1)
    header = ",".join(["label", *(f"i{j}" for j in range(flat.shape[1]))])
    rows = np.column_stack([y.astype(np.float64), flat.astype(np.float64)])
    np.savetxt(path, rows, delimiter=",", header=header, comments="", fmt=["%d", *["%.6g"] * flat.shape[1]])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="folder for the CSV files")
    p.add_argument("--ids", required=True, help="comma-separated plug (agent) ids, one CSV each")
    p.add_argument("--config", default=str(Path(__file__).with_name("job.toml")))
    args = p.parse_args(argv)
    ids = [a for a in args.ids.split(",") if a]
    job = load(args.config)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for agent, d in zip(ids, task_for(job).shards(len(ids)), strict=True):
        write_csv(out / f"{agent}.csv", d.x, d.y)
        print(out / f"{agent}.csv", len(d), "series")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
