"""Benchmarks: `fedfleet bench NAME` runs `fedfleet.tools.bench.NAME.main`; each prints JSON."""

from __future__ import annotations

import importlib

from fedfleet.edge_agent.errors import FedfleetError

# modules of fedfleet.tools.bench that are not benchmarks themselves
NOT_BENCHMARKS = ("output", "runner")


def main(argv: list[str]) -> int:
    """`fedfleet bench NAME [options]` (an entry point of `fedfleet.commands`)."""
    if not argv or argv[0].startswith("-"):
        import pkgutil

        import fedfleet.tools.bench as bench  # noqa: PLW0406 - this package

        names = sorted(m.name for m in pkgutil.iter_modules(bench.__path__) if not m.name.startswith("_")
                       and m.name not in NOT_BENCHMARKS)
        print(f"usage: fedfleet bench NAME [options]; NAME is one of: {', '.join(names)}")
        return 2
    name = argv[0]
    if not name.isidentifier():
        raise FedfleetError(f"unknown benchmark {name!r}")
    try:
        if name in NOT_BENCHMARKS or name.startswith("_"):
            raise ModuleNotFoundError(name=f"fedfleet.tools.bench.{name}")
        module = importlib.import_module(f"fedfleet.tools.bench.{name}")
    except ModuleNotFoundError as exc:
        if exc.name == f"fedfleet.tools.bench.{name}":
            raise FedfleetError(f"unknown benchmark {name!r}; run `fedfleet bench` for the list") from None
        raise
    return int(module.main(argv[1:]) or 0)


