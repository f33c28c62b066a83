"""The suite's xdist scheduler (`tests/support/scheduling.py`), run on a small project of its own:
a module whose tests build on each other goes whole to one worker, and a crash inside it does not
send its later tests to the other worker."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.support import ROOT

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
    # eight quick single tests collected before the module: the crashing worker has finished some
    (tmp_path / "test_a_singles.py").write_text("".join(f"def test_{i}():\n    pass\n\n" for i in range(8)))
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


@pytest.mark.slow(seconds=10)
def test_a_whole_module_runs_on_one_worker_in_order(tmp_path):
    run = _run(tmp_path, crash=False)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "12 passed" in run.stdout


@pytest.mark.slow(seconds=10)
def test_a_crash_inside_a_whole_module_does_not_run_its_later_tests_elsewhere(tmp_path):
    run = _run(tmp_path, crash=True)
    assert run.returncode == 1, run.stdout + run.stderr
    assert "crashed while running 'test_chain.py::test_b'" in run.stdout
    assert "FAILED test_chain.py::test_c" not in run.stdout and "FAILED test_chain.py::test_d" not in run.stdout
    assert (
        "SKIPPED [2] test_chain.py: not run: the worker crashed in test_chain.py::test_b, which it builds on"
        in run.stdout
    )
    assert "1 failed, 9 passed, 2 skipped" in run.stdout  # test_a and the eight single tests
