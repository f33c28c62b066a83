"""Thread settings chosen by measurement (`cul/threads.py`): the free cores, re-measured; a fixed
count when the user sets one. The slowdown they prevent is measured by scripts/bench_under_load.py,
not here: a unit test times nothing."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest
import torch

from cul.threads import ComputeSettings, ThreadGovernor, usable_cores


@pytest.fixture(autouse=True)
def _keep_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_the_free_cores_are_rounded_and_never_below_one():
    g = ThreadGovernor(ComputeSettings(), environ={})
    g.cores = 2
    assert [g.choose(x) for x in (0.0, 0.4, 0.6, 1.0, 1.4, 2.0, 3.0)] == [2, 2, 1, 1, 1, 1, 1]


def test_a_count_the_user_sets_is_kept_whatever_the_load():
    env_fixed = ThreadGovernor(ComputeSettings(interval=0.01), environ={"OMP_NUM_THREADS": "1"})
    params_fixed = ThreadGovernor(ComputeSettings(threads=1, interval=0.01), environ={})
    for g in (env_fixed, params_fixed):
        time.sleep(0.02)
        assert g.fixed == 1 and g.tick() == 1 and torch.get_num_threads() == 1


@pytest.mark.parametrize("bad", [0, -2, "many"])
def test_a_thread_count_that_cannot_be_meant_is_refused(bad):
    with pytest.raises(ValueError, match="threads"):
        ComputeSettings(threads=bad)


@pytest.mark.skipif(usable_cores() < 2, reason="needs two cores")
def test_a_busy_neighbour_takes_a_thread_and_gives_it_back_when_it_ends():
    g = ThreadGovernor(ComputeSettings(interval=1.0), environ={})
    assert torch.get_num_threads() == g.cores
    spin = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.5)  # started
        g.others()  # a fresh interval, with the neighbour running all of it
        time.sleep(1.2)
        assert g.tick() == g.cores - 1
    finally:
        spin.kill()
        spin.wait()
    time.sleep(1.2)
    assert g.tick() == g.cores
    assert g.used[-3:] == [g.cores, g.cores - 1, g.cores]
