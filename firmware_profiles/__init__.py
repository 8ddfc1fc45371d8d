"""Device firmware profiles: one TOML per board. `directory()` locates the shipped files."""

from __future__ import annotations

from pathlib import Path


def directory() -> Path:
    """The folder holding the shipped `*.toml` profiles."""
    return Path(__file__).resolve().parent
