"""CPU threads chosen by measurement, so that a step beside another CPU-heavy job slows, not stalls.

torch runs each operator on a team of OpenMP threads that meet at a barrier when it ends. On a
machine with two cores and two such processes of two threads each, a thread whose partner has been
descheduled waits at every barrier until the scheduler hands the partner a core again: a training
step took 4.4x longer beside such a job (`scripts/bench_under_load.py`, "Under load" in the
benchmark report). So a process uses **as many threads as there are free cores**: the cores it may
use (its CPU affinity and cgroup quota) minus what other processes used over the last interval,
measured from the kernel's CPU counters (psutil). A `ThreadGovernor` re-measures while a step runs
(`tick()`, called by the training and sampling loops, acts at most every `interval` seconds), so a
job that starts or ends beside a step changes its thread count within seconds; the same step then
slowed 2.3x. OpenMP's passive wait (`OMP_WAIT_POLICY=PASSIVE`) was measured too and is not set: it
made a step 1.5x slower with the machine to itself.

An explicit `OMP_NUM_THREADS` in the environment, or a number in `compute.threads`, fixes the count
and turns the measurement off: results then do not depend on what else the machine is doing
(a different thread count changes the order of floating-point sums, so runs on a loaded machine
are not bit-identical to runs alone).
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Literal

import psutil
import torch
from pydantic import BaseModel, ConfigDict, Field


class ComputeSettings(BaseModel):
    """How a process uses the CPU (`compute` in params.yaml)."""

    model_config = ConfigDict(extra="forbid")

    #: torch's intra-op threads: "auto" (the free cores, re-measured while a step runs) or a number.
    threads: Literal["auto"] | Annotated[int, Field(ge=1)] = "auto"
    #: seconds between two measurements of the free cores under "auto".
    interval: float = Field(2.0, gt=0)


def usable_cores() -> int:
    """Cores this process may run on: its CPU affinity, capped by a cgroup v2 CPU quota."""
    cores = len(os.sched_getaffinity(0))
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()
        if quota != "max":
            cores = min(cores, max(1, int(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return cores


def _busy_seconds(cpus: list[int]) -> float:
    """CPU seconds spent not idle on `cpus` since boot."""
    busy = 0.0
    for i, t in enumerate(psutil.cpu_times(percpu=True)):
        if i in cpus:
            waiting = t.idle + getattr(t, "iowait", 0.0)
            busy += sum(t) - waiting - getattr(t, "guest", 0.0) - getattr(t, "guest_nice", 0.0)  # guest is in user
    return busy


class ThreadGovernor:
    """Keeps torch's thread count at the cores other processes leave free.

    Args:
        settings: `ComputeSettings`; "auto" measures, a number fixes the count.
        environ: the environment whose `OMP_NUM_THREADS`, if set, fixes the count (tests pass their own).
    """

    def __init__(self, settings: ComputeSettings | None = None, environ: Mapping[str, str] | None = None) -> None:
        settings = settings or ComputeSettings()
        env = os.environ if environ is None else environ
        self.interval = settings.interval
        self.cores = usable_cores()
        self._cpus = sorted(os.sched_getaffinity(0))
        self._proc = psutil.Process()
        fixed = env.get("OMP_NUM_THREADS") or (None if settings.threads == "auto" else str(settings.threads))
        self.fixed = int(fixed) if fixed and fixed.isdigit() and int(fixed) > 0 else None
        self.used: list[int] = []  # every thread count set, in order (recorded with a step's timings)
        self._mark: tuple[float, float, float] | None = None
        self.set(self.fixed or self.cores)
        self._start()

    def _start(self) -> None:
        own = self._proc.cpu_times()
        self._mark = (time.monotonic(), _busy_seconds(self._cpus), own.user + own.system)

    def others(self) -> float | None:
        """Cores used by other processes since the last measurement (None: too soon to tell)."""
        assert self._mark is not None
        t0, busy0, own0 = self._mark
        elapsed = time.monotonic() - t0
        if elapsed < self.interval:
            return None
        own = self._proc.cpu_times()
        used = (_busy_seconds(self._cpus) - busy0) - (own.user + own.system - own0)
        self._start()
        return max(0.0, used / elapsed)

    def choose(self, others: float) -> int:
        """Threads for `others` cores in use elsewhere: the free cores, rounded, at least one."""
        return max(1, min(self.cores, int(self.cores - others + 0.5)))

    def set(self, n: int) -> None:
        if n != torch.get_num_threads():
            torch.set_num_threads(n)
        if not self.used or self.used[-1] != n:
            self.used.append(n)

    def tick(self) -> int:
        """Re-measure if `interval` has passed and adapt; cheap otherwise. Returns the thread count."""
        if self.fixed is None and (others := self.others()) is not None:
            self.set(self.choose(others))
        return torch.get_num_threads()


_governor: ThreadGovernor | None = None


def configure(settings: ComputeSettings | None = None) -> ThreadGovernor:
    """Install the process's governor (the CLI and the flows call it once settings are read)."""
    global _governor
    _governor = ThreadGovernor(settings)
    return _governor


def tick() -> None:
    """Let the process's governor adapt the thread count (a no-op until `configure` is called)."""
    if _governor is not None:
        _governor.tick()


def threads_used() -> list[int]:
    """Thread counts used since the last `reset_used()` (for a step's record)."""
    return list(_governor.used) if _governor is not None else [torch.get_num_threads()]


def reset_used() -> None:
    if _governor is not None:
        _governor.used = [torch.get_num_threads()]
