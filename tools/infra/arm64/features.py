"""Write the int8 backbone's features for the test bed's bit-for-bit check (runs on either architecture).

    python features.py PACKAGE.zip INPUT.npz RUNTIME OUT.npz

Loads the model package with the installed `edge_agent` (the wheel's, inside the arm64 venv) on RUNTIME
("onnxruntime" or "litert") and saves `features` for the `x` array of INPUT.npz, plus the machine name.
Imports nothing but the edge side.
"""

from __future__ import annotations

import platform
import sys

import numpy as np

from fedfleet.edge_agent.model import EdgeModel


def main(argv: list[str]) -> int:
    package, inputs, runtime, out = argv
    with open(package, "rb") as fh:
        model = EdgeModel.from_bytes(fh.read(), runtime=runtime, threads=1)
    with np.load(inputs) as f:
        x = f["x"].astype(np.float32)
    feats = model.features(x)
    np.savez(out, features=feats, machine=np.array(platform.machine()))
    print(f"{platform.machine()} {runtime}: features {feats.shape} {feats.dtype}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
