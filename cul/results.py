"""A benchmark run's records on disk, read without the training stack: `cul report` and the
runners share them."""

from __future__ import annotations

import json
from pathlib import Path


class BenchmarkError(ValueError):
    """A benchmark that cannot run as asked; the message says why."""


def read_json(path: Path) -> object:
    """A JSON record of a run; a message, not a traceback, if it is not readable JSON."""
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise BenchmarkError(f"{path} is not readable JSON ({e}): move it away to start this run again") from e


def read_results(results_file: Path) -> list[dict]:
    """A run's results.json entries (none if it does not exist)."""
    return read_json(results_file) if results_file.exists() else []  # type: ignore[return-value]


def inherited(entry: dict) -> bool:
    """Whether a results.json entry was copied from the run a branch starts from
    (`cul.benchmark.branch_results`) rather than made by the run that holds it."""
    return "inherited_from" in entry
