"""Generated sections of a results page, rewritten in place between markers."""

from __future__ import annotations

from pathlib import Path


def update_results_md(path: Path, section: str, name: str = "bench") -> None:
    """Replaces the generated section `name` between its markers, keeping hand-written text around it."""
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    text = path.read_text() if path.exists() else "# Benchmark results\n\n"
    block = f"{begin}\n{section.strip()}\n{end}"
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        text = head + block + rest.split(end, 1)[1]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    path.write_text(text)
