"""Write docs/ledger.md, the ledger reference, from `fedfleet.coordinator.records.columns`.

    python -m fedfleet.tools.docs_ledger [PATH]   (default docs/ledger.md)
"""

from __future__ import annotations

import sys
from pathlib import Path

from fedfleet.coordinator.records.columns import markdown


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    path = Path(args[0] if args else "docs/ledger.md")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(markdown() + "\n")
    print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
