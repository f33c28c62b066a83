"""Helpers of the test suite: throwaway project copies, real servers, the browser."""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]  # the repository
