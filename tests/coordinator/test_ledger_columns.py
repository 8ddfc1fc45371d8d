"""Every column of every ledger table has one description in `records/columns.py`, and nothing else does."""

from __future__ import annotations

from fedfleet.coordinator.records.columns import COLUMNS, TABLES, markdown
from fedfleet.coordinator.records.ledger import Ledger


def test_every_ledger_column_is_described(tmp_path):
    ledger = Ledger(tmp_path / "ledger.sqlite")
    try:
        tables = [r[0] for r in ledger.query("SELECT name FROM sqlite_master WHERE type='table' AND name NOT LIKE 'sqlite_%'")]
        schema = {t: [r[1] for r in ledger.query(f"PRAGMA table_info({t})")] for t in tables}
    finally:
        ledger.close()
    assert set(schema) == set(COLUMNS) == set(TABLES)
    for table, columns in schema.items():
        assert sorted(columns) == sorted(COLUMNS[table]), table
        assert all(len(COLUMNS[table][c]) > 10 for c in columns), table
    page = markdown()
    assert all(f"`{c}`" in page for cols in schema.values() for c in cols)
