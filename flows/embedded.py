"""The embedded Prefect server of `cul run`: a temporary API server that ends with its parent.

With no PREFECT_API_URL, Prefect starts a temporary server of its own, which outlives a parent
that is killed (reparented to PID 1, still running). This one is the same server (uvicorn on
Prefect's app, SQLite in PREFECT_HOME) started with PR_SET_PDEATHSIG, so the kernel stops it when
`cul run` ends, however it ends. Flow runs that a killed `cul run` left "Running" in that database
are marked crashed by the next one (`crash_dead_runs`), which holds the lineage by then.

Import this module before Prefect: it sets PREFECT_API_URL, which Prefect reads once.
"""

from __future__ import annotations

import ctypes
import importlib.util
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

PR_SET_PDEATHSIG = 1


def _die_with(parent: int) -> Callable[[], None]:
    """The child's preexec_fn (between fork and exec): SIGTERM when `parent` ends, and exit at
    once if it already has (between the fork and the prctl call)."""

    def preexec() -> None:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != parent:
            os._exit(1)

    return preexec


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def embedded_server(timeout: float = 180.0, log: Path | None = None) -> Iterator[str | None]:
    """A temporary Prefect API server for the block (its URL), unless PREFECT_API_URL names one
    already (then None: that server is used as it is)."""
    if os.environ.get("PREFECT_API_URL") or not sys.platform.startswith("linux"):
        yield None
        return
    spec = importlib.util.find_spec("prefect")
    assert spec is not None and spec.origin is not None
    port = _free_port()
    url = f"http://127.0.0.1:{port}/api"
    out = open(log, "ab") if log else None  # closed below
    env = {**os.environ, "PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1"}
    cmd = [
        sys.executable,
        "-m",
        "uvicorn",
        "--app-dir",
        str(Path(spec.origin).parent.parent),
        "--factory",
        "prefect.server.api.server:create_app",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--log-level",
        "error",
        "--lifespan",
        "on",
    ]
    server = subprocess.Popen(
        cmd,
        env=env,
        stdout=out or subprocess.DEVNULL,
        stderr=out or subprocess.DEVNULL,
        preexec_fn=_die_with(os.getpid()),
        start_new_session=True,  # Ctrl-C (SIGINT to the terminal's group) reaches `cul run`, not its server
    )
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2):
                    break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(
                        f"the embedded Prefect server did not start (exit {server.poll()}); "
                        "set PREFECT_API_URL to use a running one"
                    ) from None
                time.sleep(0.5)
        os.environ["PREFECT_API_URL"] = url
        yield url
    finally:
        try:
            _drain_prefect(timeout=10.0)
        finally:  # a second Ctrl-C during the drain still stops the server (its own session: no signal reaches it)
            os.environ.pop("PREFECT_API_URL", None)
            server.terminate()
            try:
                server.wait(timeout=10)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()
            if out is not None:
                out.close()


def _drain_prefect(timeout: float) -> None:
    """Send the logs and events Prefect still queues to the server before it stops. Left queued,
    Prefect sends them as the interpreter exits, to a server that is gone, and retries for over a
    minute before printing "Error logging to API": an interrupted `cul run` then took 80 s to end."""
    if "prefect" not in sys.modules:  # nothing was queued
        return
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    for service in (APILogWorker, EventsWorker):
        try:
            service.drain_all(timeout=timeout)
        except Exception as e:  # the error already on its way out (a failed step, an exit code) matters more
            print(f"Prefect's queued {service.__name__} records were not all sent: {e}", file=sys.stderr)


def crash_dead_runs() -> int:
    """Mark Crashed every flow run of this project's embedded database still Running or Pending:
    with the lineage held and no other `cul run` alive, they belong to runs that were killed."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterState, FlowRunFilterStateType
    from prefect.client.schemas.objects import StateType
    from prefect.states import Crashed

    alive = FlowRunFilter(
        state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.RUNNING, StateType.PENDING]))
    )
    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(flow_run_filter=alive)
        for run in runs:
            client.set_flow_run_state(run.id, Crashed(message="its `cul run` ended without finishing"), force=True)
    return len(runs)
