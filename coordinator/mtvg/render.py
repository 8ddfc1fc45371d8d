"""The MTVG benchmark's figure: generated sequences as long rows of frames, naive next to MTVG (matplotlib).

The strip, GIF and per-segment files of one generation are `fedfleet.edge_agent.mtvg.output`'s.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from fedfleet.edge_agent.mtvg.output import SCALE, strip


def comparison_png(path: str | Path, rows: Sequence[tuple[str, np.ndarray]]) -> Path:
    """One long row of frames per (title, sequence (K, F, S, S)), stacked, segment borders marked in red."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(rows), 1, figsize=(14, 1.1 * len(rows) + 0.4), squeeze=False)
    for ax, (title, seq) in zip(axes[:, 0], rows):
        k, f, s, _ = seq.shape
        ax.imshow(strip(seq.reshape(1, k * f, s, s)), cmap="gray", vmin=0, vmax=255)
        for b in range(1, k):
            ax.axvline(b * f * (s + 1) * SCALE - SCALE / 2, color="red", lw=1.5)
        ax.set_title(title, fontsize=9, loc="left")
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)
