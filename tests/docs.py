"""Where the tests read the user documentation: the sections of README.md."""

from __future__ import annotations

import re
from pathlib import Path

from settings import REPO_ROOT

README = REPO_ROOT / "README.md"


def section(heading: str) -> tuple[Path, str]:
    """``(README.md, text)`` of the level-2 section ``heading``, up to the next level-2 heading."""
    text = _section(README.read_text(), heading)
    assert text is not None, f"no '## {heading}' section in README.md"
    return README, text


def _section(markdown: str, heading: str) -> str | None:
    lines, inside, fenced = [], False, False
    for line in markdown.splitlines():
        if line.startswith("```"):
            fenced = not fenced
        if not fenced and line.startswith("## "):
            if inside:
                break
            inside = line[3:].strip() == heading
        if inside:
            lines.append(line)
    return "\n".join(lines) if lines else None


def code_lines(markdown: str) -> list[str]:
    """The lines inside fenced code blocks, stripped, continuation lines joined, trailing ``# comments`` cut."""
    lines, inside, pending = [], False, ""
    for raw in markdown.splitlines():
        if raw.strip().startswith("```"):
            inside = not inside
            continue
        if inside:
            line = pending + raw.strip()
            if line.endswith("\\"):
                pending = line[:-1].rstrip() + " "
                continue
            lines.append(re.sub(r"\s+# .*$", "", line))
            pending = ""
    return lines
