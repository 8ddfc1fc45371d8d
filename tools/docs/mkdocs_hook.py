"""mkdocs hook: a line `<!-- generated: NAME -->` in a page is replaced by the Markdown of
`fedfleet.tools.docs.reference.GENERATORS[NAME]`, so the reference pages are made from the code at build time."""

from __future__ import annotations

import re

MARKER = re.compile(r"^<!-- generated: ([\w-]+) -->$", re.M)


def on_page_markdown(markdown: str, **_: object) -> str:
    from fedfleet.tools.docs.reference import GENERATORS

    def fill(m: re.Match[str]) -> str:
        name = m.group(1)
        if name not in GENERATORS:
            raise ValueError(f"unknown generated section {name!r}; known: {', '.join(GENERATORS)}")
        return GENERATORS[name]()

    return MARKER.sub(fill, markdown)
