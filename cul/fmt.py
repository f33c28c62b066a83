"""The one formatter of figures for tables, logs and records."""

from __future__ import annotations


def pct(x: float | None, digits: int = 1, unit: str = "") -> str:
    """A fraction as percent points (0.9375 -> "93.8"); "n/a" when there is no figure."""
    return "n/a" if x is None else f"{100 * x:.{digits}f}{unit}"


def times(x: float | None, digits: int = 2) -> str:
    """A ratio (FD / base FD): 1.0902 -> "1.09"; "n/a" when there is none."""
    return "n/a" if x is None else f"{x:.{digits}f}"
