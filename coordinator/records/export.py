"""`fedfleet export RUN_DIR`: the run ledger as CSV and Parquet, one file per table.

Writes `RUN_DIR/export/<table>.csv` and `<table>.parquet` for every ledger table (`records.columns.COLUMNS`: the
same columns, described in the docs' ledger reference), plus `books.json`: the run's totals as every other view shows them
(`records.accounts`, labelled), so a spreadsheet can be checked against summary.json, the report and the metrics.
Parquet is written with pyarrow (the coordinator extra); a table's column types follow SQLite's declared types.
Reading is read-only SQLite, so a run may still be writing. Errors are one-line `ReportError`s (exit 2).
"""

from __future__ import annotations

import csv
import json
import sqlite3
import sys
from pathlib import Path
from typing import Any

from fedfleet.coordinator.records.accounts import accounts
from fedfleet.coordinator.records.columns import COLUMNS
from fedfleet.coordinator.records.ledger import LedgerView
from fedfleet.coordinator.records.run_data import ReportError
from fedfleet.edge_agent.cli_run import ArgParser

_ARROW = {"INTEGER": "int64", "REAL": "float64", "TEXT": "string"}


def _types(view: LedgerView, table: str) -> list[tuple[str, str]]:
    return [(r[1], str(r[2]).upper()) for r in view.query(f"PRAGMA table_info({table})")]


def export(run_dir: str | Path, out_dir: str | Path | None = None, *, parquet: bool = True) -> list[Path]:
    """Write every ledger table of `run_dir` to `out_dir` (default RUN_DIR/export); returns the files written."""
    run_dir = Path(run_dir)
    db = run_dir / "ledger.sqlite"
    if not db.is_file():
        raise ReportError(f"{db}: ledger not found; is {run_dir} a fedfleet run directory?")
    out = Path(out_dir) if out_dir is not None else run_dir / "export"
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    try:
        with LedgerView(db) as view:
            present = view.tables()
            for table in COLUMNS:  # every ledger table, in the order the reference lists them
                if table not in present:
                    continue
                types = _types(view, table)
                names = [n for n, _ in types]
                rows = [tuple(r) for r in view.query(f"SELECT {', '.join(names)} FROM {table}")]
                path = out / f"{table}.csv"
                with open(path, "w", newline="") as fh:
                    w = csv.writer(fh)
                    w.writerow(names)
                    w.writerows(rows)
                written.append(path)
                if parquet:
                    written.append(_parquet(out / f"{table}.parquet", types, rows))
            runs = view.runs()
            books = {run: accounts(view.query, run).to_json() for run in runs}
    except sqlite3.DatabaseError as exc:
        raise ReportError(f"{db}: not a readable ledger ({exc})") from exc
    path = out / "books.json"
    path.write_text(json.dumps(books, indent=2) + "\n")
    written.append(path)
    return written


def _parquet(path: Path, types: list[tuple[str, str]], rows: list[tuple[Any, ...]]) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    columns = list(zip(*rows)) if rows else [()] * len(types)
    arrays = [pa.array(list(col), type=getattr(pa, _ARROW.get(t, "string"))()) for (_, t), col in zip(types, columns)]
    pq.write_table(pa.Table.from_arrays(arrays, names=[n for n, _ in types]), path)
    return path


def main(argv: list[str] | None = None) -> int:
    ap = ArgParser(prog="fedfleet export", description="the run ledger as CSV and Parquet, one file per table")
    ap.add_argument("run_dir", help="run folder holding ledger.sqlite")
    ap.add_argument("--out", default=None, help="output folder (default: RUN_DIR/export)")
    ap.add_argument("--no-parquet", action="store_true", help="CSV only")
    args = ap.parse_args(argv)
    try:
        files = export(args.run_dir, args.out, parquet=not args.no_parquet)
    except ReportError as exc:
        print(f"fedfleet export: error: {exc}", file=sys.stderr)
        return 2
    for f in files:
        print(f)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
