"""The docs site builds with `mkdocs build --strict` (broken links, missing pages and pages left out of the
navigation fail it), and its generated reference pages cover what the code defines."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_site_builds_strict(tmp_path: Path) -> None:
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    proc = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-q", "-d", str(tmp_path / "site")],
                          cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    job = (tmp_path / "site" / "reference" / "job" / "index.html").read_text()
    cli = (tmp_path / "site" / "reference" / "cli" / "index.html").read_text()
    assert "fedfleet serve" in cli and "fedfleet-agent" in cli
    assert "deadline_s" in job and "lora_fair" in job


def test_job_reference_lists_every_field_and_method() -> None:
    from fedfleet.coordinator import strategies
    from fedfleet.coordinator.job.config import JobConfig
    from fedfleet.tools.docs.reference import job

    text = job()
    for f in dataclasses.fields(JobConfig):
        assert f"| `{f.name}` |" in text, f.name
    for name in strategies.available():
        assert f"### `{name}`" in text, name


def test_ledger_reference_lists_every_table() -> None:
    import sqlite3

    from fedfleet.coordinator.records.ledger import SCHEMA
    from fedfleet.tools.docs.reference import ledger

    db = sqlite3.connect(":memory:")
    db.executescript(SCHEMA)
    text = ledger()
    for (table,) in db.execute("SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'"):
        assert f"## `{table}`" in text, table
