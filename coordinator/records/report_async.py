"""The asynchronous-mode section of a run report (`[aggregation] mode = "async"`, coordinator/engine/buffered.py):
versions per minute, the staleness of the results each version took, and accuracy against wall time, from the
ledger's `rounds` table (one row per version) and the `version` / `staleness` columns of `agent_rounds`.

`section(db_path, run, out_dir)` returns the HTML fragment (and writes `async.png`), or "" for a run with no
asynchronous rows. `fedfleet.coordinator.records.report.render` appends it to the page.
"""

from __future__ import annotations

import base64
import html
import sqlite3
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def read(db_path: Path, run: str) -> dict[str, Any] | None:
    """Per version: wall seconds, accuracy, and the staleness of its results; None for a synchronous run."""
    db = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)
    try:
        cols = {row[1] for row in db.execute("PRAGMA table_info(agent_rounds)")}
        if "staleness" not in cols:
            return None
        stale = db.execute("SELECT round, staleness FROM agent_rounds WHERE run = ? AND status = 'ok' AND staleness "
                           "IS NOT NULL", (run,)).fetchall()
        if not stale:
            return None
        rounds = db.execute("SELECT round, wall_s, accuracy FROM rounds WHERE run = ? ORDER BY round", (run,)).fetchall()
        refused = db.execute("SELECT count(*) FROM agent_rounds WHERE run = ? AND status = 'rejected:staleness'",
                             (run,)).fetchone()[0]
    finally:
        db.close()
    by_version: dict[int, list[int]] = {}
    for r, s in stale:
        by_version.setdefault(int(r), []).append(int(s))
    versions = [int(r) for r, _, _ in rounds]
    wall = np.cumsum([float(w or 0.0) for _, w, _ in rounds]).tolist()
    return {"versions": versions, "wall_s": wall, "accuracy": [a for _, _, a in rounds],
            "staleness": [by_version.get(v, []) for v in versions], "all": [int(s) for _, s in stale],
            "refused": int(refused)}


def plot(info: dict[str, Any], path: Path) -> Path:
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    a.plot(info["wall_s"], [100 * (x or 0.0) for x in info["accuracy"]], marker=".")
    a.set_xlabel("wall time (s)")
    a.set_ylabel("accuracy (%)")
    a.set_title("accuracy against wall time")
    means = [np.mean(s) if s else np.nan for s in info["staleness"]]
    b.plot(info["versions"], means, marker=".", label="mean")
    b.plot(info["versions"], [max(s) if s else np.nan for s in info["staleness"]], marker=".", label="max")
    b.set_xlabel("version")
    b.set_ylabel("staleness of its results (versions)")
    b.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def section(db_path: Path, run: str, out_dir: Path) -> str:
    info = read(db_path, run)
    if info is None:
        return ""
    png = plot(info, out_dir / "async.png")
    total = info["wall_s"][-1] if info["wall_s"] else 0.0
    rate = 60.0 * len(info["versions"]) / total if total > 0 else float("nan")
    s = info["all"]
    rows = [("versions", f"{len(info['versions'])}"), ("versions per minute", f"{rate:.1f}"),
            ("staleness of results taken: mean / max", f"{np.mean(s):.2f} / {max(s)}"),
            ("results refused past max_staleness or after the last version", f"{info['refused']}")]
    table = "".join(f"<tr><td class=l>{html.escape(k)}</td><td>{html.escape(v)}</td></tr>" for k, v in rows)
    img = base64.b64encode(png.read_bytes()).decode()
    return (f"<h2>Asynchronous aggregation</h2><table>{table}</table>"
            f'<img alt="accuracy against wall time; staleness per version" src="data:image/png;base64,{img}">')
