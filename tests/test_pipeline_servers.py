"""The pipeline against real servers: Prefect server, MLflow server, S3 (moto server mode).

Two quick requests through the continual flow, with the DVC remote and MLflow artifacts in S3;
an impossible gate that must leave the champion alone; a person moving `champion` back to
version 1 in the MLflow UI (a real browser); and `dvc repro` of a step in a fresh clone that gives
the recorded metrics back.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.support.browser import require_chromium, set_alias_in_ui
from tests.support.project import PERMISSIVE_GATE, copy_project, tiny_params
from tests.support.servers import cul, s3_keys, use_s3_remote

pytestmark = pytest.mark.slow(seconds=350)  # one worker runs the module whole (conftest.WHOLE_MODULES)
MODEL = "cul-world"


@pytest.fixture(scope="module")
def project(tmp_path_factory, servers):
    root = copy_project(tmp_path_factory.mktemp("project"))
    tiny_params(root, gate=PERMISSIVE_GATE)
    use_s3_remote(root, servers["CUL_S3_ENDPOINT"])
    return root


def _client(env):
    import mlflow

    return mlflow.MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"])


def _set_gate(project: Path, auto_promote: bool = True, **gate) -> None:
    p = yaml.safe_load((project / "params.yaml").read_text())
    p["pipeline"]["gate"] = {**PERMISSIVE_GATE, **gate}
    p["pipeline"]["auto_promote"] = auto_promote
    (project / "params.yaml").write_text(yaml.safe_dump(p, sort_keys=False))


def _queue(project: Path) -> dict:
    return {r["id"]: r for r in yaml.safe_load((project / "requests/queue.yaml").read_text())["requests"]}


def test_continual_flow_registers_versions_and_versions_data_in_s3(project, servers):
    cul(project, servers, "request", "add", "red", "--kind", "colour", "--note", "ticket 1")
    cul(project, servers, "request", "add", "circle", "--note", "ticket 2")
    refused = cul(project, servers, "request", "add", "red", check=False)
    assert refused.returncode == 1 and "already requested" in refused.stdout
    out = cul(project, servers, "run", "--quiet")
    assert "r001" in out.stdout and "r002" in out.stdout

    client = _client(servers)
    versions = sorted(client.search_model_versions(f"name='{MODEL}'"), key=lambda v: int(v.version))
    assert [v.version for v in versions] == ["1", "2"]
    aliases = client.get_registered_model(MODEL).aliases
    assert aliases["champion"] == "2" and aliases["candidate"] == "2"  # auto_promote is on here
    v1, v2 = versions
    assert v1.tags["request_id"] == "r001" and v1.tags["concept"] == "red" and v1.tags["step"] == "s01"
    assert v2.tags["request_id"] == "r002" and json.loads(v2.tags["forgotten"]) == ["red", "circle"]
    assert v2.tags["parent_version"] == "1" and v2.tags["gate"] == "accepted"
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=project, capture_output=True, text=True).stdout.strip()
    assert v2.tags["dvc_rev"] == head  # the commit holding step s02's spec, lock and records
    assert len(v1.tags["git_commit"]) == 40
    queue = _queue(project)
    assert queue["r001"]["state"] == "accepted" and queue["r001"]["version"] == 1
    assert (project / "reports/audit/r002.md").exists()

    dvc_keys = s3_keys(servers["CUL_S3_ENDPOINT"], "dvc/")
    lock = yaml.safe_load((project / "dvc.lock").read_text())
    model_md5 = next(o["md5"] for o in lock["stages"]["step@s02"]["outs"] if o["path"] == "models/steps/s02")
    assert f"dvc/files/md5/{model_md5[:2]}/{model_md5[2:]}" in dvc_keys, dvc_keys[:5]
    assert v2.tags["dvc_md5"] == model_md5
    assert any("/artifacts/" in k for k in s3_keys(servers["CUL_S3_ENDPOINT"], "mlflow/"))


def test_impossible_gate_rejects_and_keeps_champion(project, servers):
    _set_gate(project, max_fd_ratio=1e-9)
    cul(project, servers, "request", "add", "striped")
    cul(project, servers, "run", "--quiet")
    client = _client(servers)
    assert len(client.search_model_versions(f"name='{MODEL}'")) == 2
    assert client.get_registered_model(MODEL).aliases["champion"] == "2"
    item = _queue(project)["r003"]
    assert item["state"] == "review" and any("FD" in r for r in item["reasons"])
    assert not (project / "models/steps/s03").exists()
    runs = client.search_runs(
        [client.get_experiment_by_name("cul-continual-unlearning").experiment_id],
        filter_string="tags.gate = 'rejected'",
    )
    assert runs, "the rejected attempt must be an MLflow run too"


def test_next_run_starts_from_the_champion_a_person_chose_in_the_mlflow_ui(project, servers, tmp_path):
    require_chromium()
    _set_gate(project, auto_promote=False)  # from here on, only a person moves `champion`
    set_alias_in_ui(servers["MLFLOW_TRACKING_URI"], MODEL, 1, "champion", screenshot=tmp_path / "ui.png")
    assert _client(servers).get_registered_model(MODEL).aliases["champion"] == "1"
    cul(project, servers, "request", "add", "dotted")
    cul(project, servers, "request", "add", "yellow")
    cul(project, servers, "run", "--quiet")
    v3 = _client(servers).get_model_version(MODEL, "3")
    assert v3.tags["parent_version"] == "1"
    assert json.loads(v3.tags["forgotten"]) == ["red", "dotted"]  # circle was only in version 2
    steps = yaml.safe_load((project / "requests/steps.yaml").read_text())["steps"]
    assert steps[v3.tags["step"]]["parent"] == "models/steps/s01"
    # version 3 is only the candidate, so yellow waits for a person instead of building on it
    aliases = _client(servers).get_registered_model(MODEL).aliases
    assert aliases["champion"] == "1" and aliases["candidate"] == "3"
    assert _queue(project)["r005"]["state"] == "pending"
    assert len(_client(servers).search_model_versions(f"name='{MODEL}'")) == 3


def test_dvc_repro_of_a_step_in_a_fresh_clone_gives_the_recorded_metrics(project, servers, tmp_path):
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(project), str(clone)], check=True)
    use_s3_remote(clone, servers["CUL_S3_ENDPOINT"])
    recorded = json.loads((clone / "reports/steps/s02/metrics.json").read_text())
    dvc = [sys.executable, "-m", "dvc"]
    subprocess.run(dvc + ["pull", "step@s01"], cwd=clone, env=servers, check=True, capture_output=True)
    assert (clone / "models/steps/s01/cul_model.json").exists()
    p = subprocess.run(
        dvc + ["repro", "--force", "--single-item", "step@s02"], cwd=clone, env=servers, capture_output=True, text=True
    )
    assert p.returncode == 0, p.stderr[-3000:]
    again = json.loads((clone / "reports/steps/s02/metrics.json").read_text())
    for key in ("ua", "ra_in", "ra_cross", "ra_neighbour", "fd", "per_concept", "paraphrase_ua"):
        assert again[key] == pytest.approx(recorded[key], abs=1e-6), key
