"""How benchmarks report: the JSON keys an issue names, exactly, on stdout and in `--json PATH`; every
other measurement goes to stderr as one `details:` JSON line, so nothing measured is lost. While a benchmark
runs, `progress()` says what it is doing on stderr (stdout stays the JSON alone)."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

_STARTED = time.monotonic()


def progress(bench: str, message: str) -> None:
    """One line on stderr, `[bench NAME +12.3 s] message`, so that a run of minutes shows it is alive."""
    print(f"[bench {bench} +{time.monotonic() - _STARTED:.1f} s] {message}", file=sys.stderr, flush=True)


def emit(result: dict[str, Any], keys: tuple[str, ...], json_path: str | None) -> dict[str, Any]:
    missing = [k for k in keys if k not in result]
    if missing:
        raise KeyError(f"benchmark result lacks {missing}")
    main = {k: result[k] for k in keys}
    details = {k: v for k, v in result.items() if k not in keys}
    text = json.dumps(main, indent=2)
    if json_path:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(json_path).write_text(text + "\n")
    if details:
        print("details: " + json.dumps(details, default=str), file=sys.stderr)
    print(text)
    return main


def details(stderr: str) -> dict[str, Any]:
    """The `details:` line a benchmark wrote to stderr (for tests and scripts)."""
    for line in stderr.splitlines():
        if line.startswith("details: "):
            return json.loads(line[len("details: "):])
    return {}
