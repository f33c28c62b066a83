"""The scheduled deployment (prefect.yaml) run once through a real Prefect server and a process
worker, as a cron-fired run would be: the worker picks the flow run up and processes the queue."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
import yaml

from tests.support.project import PERMISSIVE_GATE, copy_project, tiny_params
from tests.support.servers import cul

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent


def _prefect(project: Path, env: dict, *args: str, timeout: float = 600) -> str:
    p = subprocess.run(
        [str(BIN / "prefect"), *args], cwd=project, env=env, capture_output=True, text=True, timeout=timeout
    )
    assert p.returncode == 0, f"prefect {' '.join(args)}:\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
    return p.stdout


def _flow_run_state(env: dict, name: str) -> str:
    req = urllib.request.Request(
        f"{env['PREFECT_API_URL']}/flow_runs/filter",
        method="POST",
        data=json.dumps({"flow_runs": {"name": {"any_": [name]}}}).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=10) as r:
        runs = json.loads(r.read())
    return runs[0]["state_type"] if runs else "MISSING"


def test_scheduled_deployment_runs_once_through_a_worker(servers, tmp_path):
    project = copy_project(tmp_path / "project")
    tiny_params(
        project,
        gate=PERMISSIVE_GATE,
        tracking={"experiment": "cul-scheduled", "registered_model": "cul-world-scheduled"},
    )
    cul(project, servers, "request", "add", "yellow")
    _prefect(project, servers, "work-pool", "create", "cul-local", "--type", "process", "--overwrite")
    _prefect(project, servers, "--no-prompt", "deploy", "--name", "scheduled")
    listing = _prefect(project, servers, "deployment", "ls")
    assert "scheduled" in listing
    out = _prefect(project, servers, "deployment", "run", "cul-continual/scheduled")
    found = re.search(r"flow run '([^']+)'", out, re.IGNORECASE)
    assert found, out
    name = found.group(1)
    _prefect(project, servers, "worker", "start", "--pool", "cul-local", "--run-once", timeout=900)
    assert _flow_run_state(servers, name) == "COMPLETED"
    queue = yaml.safe_load((project / "requests/queue.yaml").read_text())["requests"]
    assert queue[0]["state"] == "accepted" and queue[0]["version"] == 1
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=servers["MLFLOW_TRACKING_URI"])
    assert client.get_model_version("cul-world-scheduled", "1").tags["concept"] == "yellow"
