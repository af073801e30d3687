"""Markdown tables for the reports people read (RESULTS.md, compare.md, the benchmarks' results)."""

from __future__ import annotations

from collections.abc import Iterable


def markdown_table(header: list[str], rows: Iterable[list[str]]) -> str:
    """Cells as given (already formatted); the first column left-aligned (names), the others right-aligned (figures)."""
    lines = ["| " + " | ".join(header) + " |", "| --- |" + " ---: |" * (len(header) - 1)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])
