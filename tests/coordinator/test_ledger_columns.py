"""Every column of every ledger table has one description in `records/columns.py`, and nothing else does."""

from __future__ import annotations

from fedfleet.coordinator.records.columns import COLUMNS, TABLES
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
        assert sorted(columns) == sorted(k for k in COLUMNS[table] if k), table  # key "": the table's description
        assert all(len(COLUMNS[table][c]) > 10 for c in columns) and COLUMNS[table][""] == TABLES[table], table


def test_the_docs_ledger_reference_describes_every_column():
    from fedfleet.tools.docs.reference import ledger

    text = ledger()
    for table, columns in COLUMNS.items():
        assert COLUMNS[table][""] in text
        for name, about in columns.items():
            if name:
                assert f"| `{name}` |" in text and about.split("`")[0][:30] in text, (table, name)
