"""Benchmarks, each printing JSON with the keys its issue names (`fedfleet bench` lists them).

`fedfleet bench NAME [options]` runs `fedfleet.tools.bench.NAME.main`; `fedfleet bench NAME --help` shows its
options. Each benchmark's one-line description is the first sentence of its module's docstring.
"""

from __future__ import annotations

import importlib
import pkgutil
import textwrap

from fedfleet.edge_agent.errors import FedfleetError

# modules of fedfleet.tools.bench that are not benchmarks themselves
NOT_BENCHMARKS = ("output", "runner")


def names() -> list[str]:
    import fedfleet.tools.bench as bench  # noqa: PLW0406 - this package

    return sorted(m.name for m in pkgutil.iter_modules(bench.__path__) if not m.name.startswith("_")
                  and m.name not in NOT_BENCHMARKS)


def listing(width: int = 100) -> str:
    """`fedfleet bench`'s help: usage, then each benchmark with its one-line description (read from the
    module's source, not imported)."""
    from fedfleet.coordinator.cli import summary

    found = names()
    pad = max(len(n) for n in found) + 2
    lines = ["Usage: fedfleet bench NAME [OPTIONS]", "",
             "  Benchmarks: each prints JSON (and writes it with --json PATH). `fedfleet bench NAME --help` shows",
             "  a benchmark's options.", "", "Benchmarks:"]
    for n in found:
        text = summary(f"fedfleet.tools.bench.{n}")
        wrapped = textwrap.wrap(text, width - pad - 2) or [""]
        lines.append(f"  {n.ljust(pad)}{wrapped[0]}")
        lines += [" " * (pad + 2) + w for w in wrapped[1:]]
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    """`fedfleet bench NAME [options]` (an entry point of `fedfleet.commands`)."""
    if not argv or argv[0] in ("-h", "--help"):
        print(listing())
        return 0
    name = argv[0]
    if name.startswith("-"):
        raise FedfleetError(f"no such option {name!r}: give a benchmark's NAME first; run `fedfleet bench` for the list")
    if not name.isidentifier():
        raise FedfleetError(f"unknown benchmark {name!r}; run `fedfleet bench` for the list")
    try:
        if name in NOT_BENCHMARKS or name.startswith("_"):
            raise ModuleNotFoundError(name=f"fedfleet.tools.bench.{name}")
        module = importlib.import_module(f"fedfleet.tools.bench.{name}")
    except ModuleNotFoundError as exc:
        if exc.name == f"fedfleet.tools.bench.{name}":
            raise FedfleetError(f"unknown benchmark {name!r}; run `fedfleet bench` for the list") from None
        raise
    return int(module.main(argv[1:]) or 0)
