"""A measured figure beside its target, and the table and JSON file they end up in."""
from __future__ import annotations

import json
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class Figure:
    """One row of the table: what was measured, its value as printed, the target, and whether it is met
    (None: reported, no target of its own)."""

    scenario: str
    measure: str
    value: str
    target: str = ""
    met: bool | None = None
    data: dict[str, Any] = field(default_factory=dict)


def median(values: list[float]) -> float:
    """The median of several runs."""
    return statistics.median(values)


def format_table(figures: list[Figure]) -> str:
    """The figures as a fixed-width table, each value next to its target."""
    header = ("scenario", "measure", "result", "target", "met")
    rows = [header] + [(f.scenario, f.measure, f.value, f.target,
                        "" if f.met is None else ("yes" if f.met else "MISSED")) for f in figures]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = []
    for n, row in enumerate(rows):
        lines.append(" | ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())
        if n == 0:
            lines.append("-+-".join("-" * width for width in widths))
    return "\n".join(lines)


def write_json(path: Path, figures: list[Figure], details: dict[str, Any], meta: dict[str, Any]) -> None:
    """Write every figure and each scenario's raw measurements to a JSON file."""
    path.write_text(json.dumps({**meta, "figures": [asdict(f) for f in figures], "scenarios": details},
                               indent=2, default=str) + "\n")


def report(figures: list[Figure], data: dict[str, Any]) -> int:
    """A scenario run alone: its figures, one a line, and its data as JSON on stdout; the exit code (1 when a
    target is missed)."""
    for figure in figures:
        print(f"{figure.measure}: {figure.value} (target {figure.target})")
    print(json.dumps(data, indent=1, default=str))
    return 0 if all(f.met is not False for f in figures) else 1
