"""Thread settings chosen by measurement (`cul/threads.py`): the free cores, re-measured; a fixed
count when the user sets one. The slowdown they prevent is measured by scripts/bench_under_load.py,
not here: a unit test times nothing."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import psutil
import pytest
import torch

from cul import threads
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
def test_a_busy_neighbour_takes_a_thread_and_gives_it_back_when_it_ends(monkeypatch):
    spin = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    neighbour, own = psutil.Process(spin.pid), psutil.Process()
    ended = 0.0  # the neighbour's CPU seconds once it has ended

    def busy_seconds(cpus) -> float:
        """The machine's busy time, as if this process and the neighbour were all that ran on it:
        other tests running beside this one (pytest's workers) must not count."""
        nonlocal ended
        if spin.poll() is None:
            t = neighbour.cpu_times()
            ended = t.user + t.system
        mine = own.cpu_times()
        return mine.user + mine.system + ended

    monkeypatch.setattr(threads, "_busy_seconds", busy_seconds)
    g = ThreadGovernor(ComputeSettings(interval=1.0), environ={})
    assert torch.get_num_threads() == g.cores
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


def test_the_machines_busy_time_counts_every_process_on_our_cores():
    cpus = sorted(os.sched_getaffinity(0))
    before = threads._busy_seconds(cpus)
    own = psutil.Process().cpu_times()
    end = time.process_time() + 0.3
    while time.process_time() < end:  # 0.3 s of this process's own work
        pass
    after = psutil.Process().cpu_times()
    assert threads._busy_seconds(cpus) - before >= 0.9 * (after.user + after.system - own.user - own.system)
