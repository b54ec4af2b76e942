"""Timing helpers shared by the benchmarks: medians of repeated runs, so noise hurts less."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any


def per_call_us(fn: Callable[[], Any], *, number: int, repeat: int = 5) -> float:
    """Median over ``repeat`` runs of the mean cost of one call, in microseconds."""
    fn()  # warm caches, imports, memoized headers
    runs = []
    for _ in range(repeat):
        start = time.perf_counter()
        for _ in range(number):
            fn()
        runs.append((time.perf_counter() - start) / number * 1e6)
    return statistics.median(runs)


def table(rows: list[list[Any]], header: list[str]) -> str:
    """A GitHub-markdown table, so output pastes straight into docs/benchmarks.md."""
    cells = [header, *[[str(c) for c in row] for row in rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = [
        "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |" for r in cells
    ]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)
