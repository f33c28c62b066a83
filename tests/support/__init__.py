"""Helpers of the test suite: throwaway project copies, real servers, the browser, and how
pytest-xdist hands the tests to its workers (`scheduling.py`)."""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]  # the repository
