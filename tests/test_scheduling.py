"""The suite's xdist scheduler (`tests/support/scheduling.py`), run on a small project of its own:
a module whose tests build on each other goes whole to one worker, and a crash inside it does not
send its later tests to the other worker."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHAIN = """
import os

state = {}

def test_a():
    state["worker"] = os.getpid()

def test_b():
    assert state["worker"] == os.getpid()
    if os.environ.get("CRASH"):
        os._exit(3)

def test_c():
    assert state["worker"] == os.getpid()

def test_d():
    assert state["worker"] == os.getpid()
"""


def _run(tmp_path: Path, crash: bool) -> subprocess.CompletedProcess:
    (tmp_path / "pytest.ini").write_text("[pytest]\n")
    (tmp_path / "conftest.py").write_text(
        textwrap.dedent("""
        import pytest
        from tests.support.scheduling import WholeModulesElseTests

        @pytest.hookimpl(optionalhook=True)
        def pytest_xdist_make_scheduler(config, log):
            return WholeModulesElseTests(config, log, ("test_chain.py",))
    """)
    )
    (tmp_path / "test_chain.py").write_text(CHAIN)
    (tmp_path / "test_single.py").write_text("def test_x():\n    pass\n\ndef test_y():\n    pass\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "CRASH": "1" if crash else ""}
    env.pop("PYTEST_XDIST_WORKER", None)
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-n", "2", "-p", "no:cacheprovider", "-rA"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )


def test_a_whole_module_runs_on_one_worker_in_order(tmp_path):
    run = _run(tmp_path, crash=False)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "6 passed" in run.stdout


def test_a_crash_inside_a_whole_module_does_not_run_its_later_tests_elsewhere(tmp_path):
    run = _run(tmp_path, crash=True)
    assert run.returncode == 1, run.stdout + run.stderr
    assert "crashed while running 'test_chain.py::test_b'" in run.stdout
    assert "test_chain.py: the worker crashed in test_b; 2 later test(s) of the module not run" in run.stdout
    assert "FAILED test_chain.py::test_c" not in run.stdout and "FAILED test_chain.py::test_d" not in run.stdout
    assert "1 failed, 3 passed" in run.stdout  # test_a and the two single tests
