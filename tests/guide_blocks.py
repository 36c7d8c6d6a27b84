"""The fenced code blocks of a markdown guide, for tests/test_guides.py.

A block whose first line is ``# file: relative/path`` is a file of the guide's project; the other
``python`` blocks are code to run in order, ``bash`` blocks are shell steps. Other fences (a
directory listing, plain text) are ignored.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

_FENCE = re.compile(r"^```(?P<lang>[\w+-]*)[^\n]*\n(?P<body>.*?)^```[ \t]*$", re.M | re.S)
_FILE = re.compile(r"^#\s*file:\s*(?P<path>\S+)\s*$")


@dataclass(frozen=True)
class Block:
    source: str  # the guide's path, for messages and tracebacks
    line: int  # 1-based line of the block's first code line in the guide
    lang: str
    text: str
    file: str | None  # the relative path a "# file:" block names

    @property
    def where(self) -> str:
        return f"{self.source}:{self.line}"


def read_blocks(path: Path, label: str | None = None) -> list[Block]:
    """Every fenced block of ``path`` in document order (``label`` names the guide in messages)."""
    markdown = path.read_text()
    label = label or str(path)
    blocks = []
    for match in _FENCE.finditer(markdown):
        line = markdown.count("\n", 0, match.start("body")) + 1
        body = match.group("body")
        first = body.split("\n", 1)[0]
        named = _FILE.match(first)
        file = named.group("path") if named else None
        if file is not None and (file.startswith("/") or ".." in Path(file).parts):
            raise ValueError(f"{label}:{line}: '# file:' must name a path inside the project, got {file!r}")
        blocks.append(Block(label, line, match.group("lang").lower(), body, file))
    return blocks
