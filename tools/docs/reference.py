"""The docs site's reference pages, generated from the code when the site is built.

Each generator returns Markdown. A page asks for one with a marker line `<!-- generated: NAME -->`
(`tools/docs/mkdocs_hook.py` replaces it), so the pages cannot drift from the code:

- `cli`: every command's `--help` of `fedfleet` and `fedfleet-agent`, and the list of benchmarks;
- `job`: the job file's fields (`JobConfig`) with their defaults and comments, and each method's [method] fields;
- `agent-toml`: the fields of `agent.toml`;
- `ledger`: the ledger's tables and columns (read from a fresh ledger's SQLite schema), with their descriptions;
- `metrics`: the metrics the endpoint serves.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import inspect
import io
import re
import sqlite3
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any


def _capture(main: Callable[[list[str]], Any], argv: list[str]) -> str:
    """What a command's entry point prints for `argv` (help exits through SystemExit)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
        try:
            main(argv)
        except SystemExit:
            pass
    return out.getvalue().rstrip()


def _commands(module: Any) -> list[str]:
    """The command names of a CLI module: a click group's, or an argparse CLI's COMMANDS tuple."""
    try:
        import click
    except ImportError:  # pragma: no cover - click is a core dependency
        click = None
    if click is not None:
        for value in vars(module).values():
            if isinstance(value, click.Group):
                return [n for n in value.list_commands(click.Context(value)) if not value.get_command(
                    click.Context(value), n).hidden]
    return list(getattr(module, "COMMANDS", ()))


def cli() -> str:
    from fedfleet.coordinator import cli as coordinator_cli
    from fedfleet.edge_agent import cli as agent_cli

    parts = ["## `fedfleet`", "", "```text", _capture(coordinator_cli.main, ["--help"]), "```", ""]
    for name in _commands(coordinator_cli):
        parts += [f"### `fedfleet {name}`", "", "```text", _capture(coordinator_cli.main, [name, "--help"]), "```", ""]
    parts += ["## `fedfleet-agent`", "", "```text", _capture(agent_cli.main, ["--help"]), "```", ""]
    for name in _commands(agent_cli):
        parts += [f"### `fedfleet-agent {name}`", "", "```text", _capture(agent_cli.main, [name, "--help"]), "```",
                  ""]
    return "\n".join(parts)


def _field_comments(source: str) -> dict[str, str]:
    """`name: type = default  # comment` lines of a class body -> {name: comment}."""
    out: dict[str, str] = {}
    for line in source.splitlines():
        m = re.match(r"\s+(\w+)\s*:[^#]*?#\s*(.+)$", line)
        if m:
            out[m.group(1)] = m.group(2).strip()
    return out


def _docstring_comments(doc: str) -> dict[str, str]:
    """`key = value   # comment` lines of a TOML example in a docstring -> {key: comment} (continuation
    comment lines are appended)."""
    out: dict[str, str] = {}
    last = None
    for line in doc.splitlines():
        m = re.match(r"\s*(\w+)\s*=\s*[^#]*#\s*(.+)$", line)
        if m:
            last = m.group(1)
            out.setdefault(last, m.group(2).strip())
            continue
        m = re.match(r"\s{8,}#\s*(.+)$", line)
        if m and last:
            out[last] += " " + m.group(1).strip()
            continue
        if line.strip():
            last = None
    return out


def _default(field: dataclasses.Field[Any]) -> str:
    if field.default is not dataclasses.MISSING:
        value = field.default
    elif field.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        value = field.default_factory()  # type: ignore[misc]
    else:
        return "(required)"
    return f"`{value!r}`"


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def _type_name(tp: Any) -> str:
    return tp if isinstance(tp, str) else getattr(tp, "__name__", str(tp))


def job() -> str:
    from fedfleet.coordinator import strategies
    from fedfleet.coordinator.job import config

    notes = _docstring_comments(config.__doc__ or "")
    rows = ["| field | type | default | meaning |", "|---|---|---|---|"]
    for f in dataclasses.fields(config.JobConfig):
        rows.append(f"| `{f.name}` | `{_cell(_type_name(f.type))}` | {_cell(_default(f))} | "
                    f"{_cell(notes.get(f.name, ''))} |")
    parts = ["## `[job]`", "", "Every key is optional.", "", *rows, "",
             "## The file, annotated", "", "```toml", inspect.cleandoc(
                 (config.__doc__ or "").split("A job file is TOML; every key is optional:", 1)[-1]), "```", "",
             "## `[method]`, per method", "",
             "The fields of each method's configuration, over their defaults. An unknown key is an error.", ""]
    for name in strategies.available():
        cls = strategies.spec(name)
        cfg = getattr(cls, "Config", None)
        if cfg is None or not dataclasses.is_dataclass(cfg):
            continue
        comments = _field_comments(inspect.getsource(cfg))
        parts += [f"### `{name}`", "", (inspect.getdoc(cfg) or "").split("\n\n")[0], "",
                  "| field | type | default | meaning |", "|---|---|---|---|"]
        for f in dataclasses.fields(cfg):
            parts.append(f"| `{f.name}` | `{_cell(_type_name(f.type))}` | {_cell(_default(f))} | "
                         f"{_cell(comments.get(f.name, ''))} |")
        parts.append("")
    return "\n".join(parts)


def agent_toml() -> str:
    from fedfleet.edge_agent import config_file

    doc = config_file.__doc__ or ""
    notes = _docstring_comments(doc)
    example = doc.split("\n\n")[2] if doc.count("\n\n") >= 2 else ""
    rows = ["| key | kind | meaning |", "|---|---|---|"]
    kinds = {**{k: "string" for k in config_file.STRINGS}, **{k: "path" for k in config_file.PATHS},
             **{k: f"integer ≥ {v}" for k, v in config_file.INTS.items()}}
    for key, kind in kinds.items():
        rows.append(f"| `{key}` | {kind} | {_cell(notes.get(key, ''))} |")
    return "\n".join([doc.split("\n\n")[0] + " " + doc.split("\n\n")[1].replace("\n", " "), "",
                      "```toml", inspect.cleandoc(example), "```", "", *rows, "",
                      "Keys that would hold a secret (" + ", ".join(f"`{k}`" for k in config_file.SECRET_KEYS)
                      + ") are refused: secrets live in the files named by the `*_file` keys."])


def _column_docs() -> dict[str, dict[str, str]]:
    """Descriptions of the ledger's columns, where the records layer documents them."""
    try:
        module = importlib.import_module("fedfleet.coordinator.records.columns")
    except ModuleNotFoundError:
        return {}
    return getattr(module, "COLUMNS", {})


def ledger() -> str:
    from fedfleet.coordinator.records.ledger import Ledger

    docs = _column_docs()
    parts = []
    with tempfile.TemporaryDirectory() as tmp:
        book = Ledger(Path(tmp) / "ledger.sqlite")
        book.close()
        db = sqlite3.connect(str(Path(tmp) / "ledger.sqlite"))
        tables = [r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE "
                                           "'sqlite_%' ORDER BY rowid")]
        for table in tables:
            about = docs.get(table, {})
            parts += [f"## `{table}`", "", about.get("", ""), "", "| column | SQLite type | meaning |", "|---|---|---|"]
            for _, name, decl, *_ in db.execute(f"PRAGMA table_info({table})"):
                parts.append(f"| `{name}` | {decl or ''} | {_cell(about.get(name, ''))} |")
            parts.append("")
        db.close()
    return "\n".join(parts)


def metrics() -> str:
    from fedfleet.coordinator.records import metrics as metrics_module

    source = inspect.getsource(metrics_module)
    found = re.findall(r"# HELP (fedfleet_\{?\w+\}?)\s+([^\"]+?)[\"\n]", source)
    lines = ["| metric | meaning |", "|---|---|"]
    for name, text in found:
        lines.append(f"| `{name}` | {_cell(text.strip().rstrip(','))} |")
    doc = (metrics_module.__doc__ or "").strip()
    return "\n".join([doc, "", *lines])


GENERATORS: dict[str, Callable[[], str]] = {
    "cli": cli, "job": job, "agent-toml": agent_toml, "ledger": ledger, "metrics": metrics,
}

