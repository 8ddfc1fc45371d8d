"""The books: the SQLite ledger (every query), checkpoints and resume, metrics, reports."""
