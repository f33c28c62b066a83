"""Locks across processes: one writer of the request queue at a time, one run per model lineage.

File locks (`filelock`, flock(2) on Linux) in `.cul/locks/` are the embedded default. The kernel
drops a lock when its process ends, however it ends, so a killed run never leaves the lineage
locked; the holder's pid and start time are kept beside the lock for the message another process
gets. A team deployment can put the same interface (`LineageLock.hold`) on its database or on
Prefect's concurrency limits.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from filelock import FileLock, Timeout

LOCK_DIR = Path(".cul/locks")


class LockBusy(RuntimeError):
    """Another process holds the lock; the message says who and what to do."""


@contextmanager
def file_lock(path: str | Path, timeout: float = 60.0, what: str = "") -> Iterator[None]:
    """Hold the lock file `path` (waiting up to `timeout` seconds) for a read-modify-write."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(path))
    try:
        lock.acquire(timeout=timeout)
    except Timeout as e:
        raise LockBusy(f"{what or path} is locked by another process for more than {timeout:.0f} s") from e
    try:
        yield
    finally:
        lock.release()


def busy_message(model: str, owner: dict) -> str:
    """What a run refused the lineage of `model` is told: who holds it (`owner`: pid, host and
    since, as a lock records them; empty when unknown), and what to do."""
    who = f" (pid {owner.get('pid', '?')} on {owner.get('host', '?')} since {owner.get('since', '?')})" if owner else ""
    return (
        f"a run is already processing requests of {model}{who}; this one does nothing. "
        "Wait for it to finish, or stop it, and run again."
    )


class LineageLock:
    """The right to build on a registered model's lineage: held by one run at a time."""

    def __init__(self, model: str, root: str | Path = ".") -> None:
        self.model = model
        self.path = Path(root) / LOCK_DIR / f"lineage-{model}.lock"
        self.owner_file = self.path.with_suffix(".owner.json")
        self._lock = FileLock(str(self.path))

    def owner(self) -> dict:
        try:
            return json.loads(self.owner_file.read_text())
        except (OSError, ValueError):
            return {}

    def is_free(self) -> bool:
        """Whether no process holds the lineage (a dead holder's lock is free)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        probe = FileLock(str(self.path))
        try:
            probe.acquire(timeout=0)
        except Timeout:
            return False
        probe.release()
        return True

    @contextmanager
    def hold(self, wait: float = 0.0) -> Iterator[None]:
        """Hold the lineage for the block; if another run holds it after `wait` seconds, raise
        `LockBusy` naming that run."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._lock.acquire(timeout=wait)
        except Timeout as e:
            raise LockBusy(busy_message(self.model, self.owner())) from e
        try:
            self.owner_file.write_text(
                json.dumps(
                    {
                        "pid": os.getpid(),
                        "host": socket.gethostname(),
                        "command": " ".join(sys.argv)[:200],
                        "since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                    }
                )
                + "\n"
            )
            yield
        finally:
            self.owner_file.unlink(missing_ok=True)
            self._lock.release()
