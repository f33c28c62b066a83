"""A team's pipeline: workers that share no disk, on the shared servers of infra/compose.yaml.

PostgreSQL (Prefect's, MLflow's and the queue's databases), the Prefect server and the MLflow
server on it, S3 (moto's server), a bare git repository as the project's remote, and three
process workers, each started in its own fresh clone and cloning again for every flow run: one on
the CPU pool (the dispatcher, `cul-continual/dispatch`), two on the "GPU" pool (the requests,
`cul-request/gpu`), deployed from prefect.yaml as a team deploys them.

1. Three requests queued at once, two dispatchers started at once: the requests run one at a
   time, each from the previous accepted version (v1 -> v2 -> v3); the worker running the second
   is killed during its attempt, the request is dispatched again and completes once; every step's
   commit reaches the git remote; nothing is registered twice.
2. With auto-promotion off, a `champion` move through MLflow's REST API (what the UI sends)
   reaches `cul hooks serve` as a signed webhook, and the next request starts within a minute,
   from the promoted version; the one after it waits for the next promotion.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from tests.support.project import PERMISSIVE_GATE, copy_project, tiny_params
from tests.support.servers import BUCKET, background, cul, free_port, s3_keys

pytestmark = pytest.mark.slow(seconds=500)  # one worker runs the module whole (conftest.WHOLE_MODULES)
BIN = Path(sys.executable).parent
MODEL = "cul-team"
SECRET = "team-test-secret"


def _run(cmd: list[str], cwd: Path, env: dict | None = None, timeout: float = 300) -> str:
    p = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, f"{' '.join(cmd[:4])}:\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
    return p.stdout.strip()


def _git(cwd: Path, *args: str) -> str:
    return _run(["git", "-c", "user.name=person", "-c", "user.email=person@team", *args], cwd)


def _wait(what: str, check: Callable[[], object], timeout: float, every: float = 1.0):
    deadline = time.monotonic() + timeout
    while True:
        if out := check():
            return out
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout:.0f} s: {what}")
        time.sleep(every)


@dataclass
class Team:
    env: dict
    seed: Path
    remote: Path
    tmp: Path
    workers: dict[str, subprocess.Popen] = field(default_factory=dict)

    def queue(self):
        from cul.io.database import SqlQueue

        return SqlQueue(self.env["CUL_DATABASE_URL"], MODEL)

    def mlflow(self):
        import mlflow

        return mlflow.MlflowClient(tracking_uri=self.env["MLFLOW_TRACKING_URI"])

    def prefect(self, *args: str) -> str:
        return _run([str(BIN / "prefect"), *args], self.seed, self.env)

    def api(self, path: str, body: dict) -> list[dict]:
        req = urllib.request.Request(
            f"{self.env['PREFECT_API_URL']}/{path}",
            method="POST",
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(req, timeout=10) as r:
            return json.loads(r.read())

    def flow_runs(self, deployment: str) -> list[dict]:
        """The runs of FLOW/DEPLOYMENT that someone or something started (not the cron's)."""
        dep = self.deployment(deployment)
        runs = self.api("flow_runs/filter", {"flow_runs": {"deployment_id": {"any_": [dep["id"]]}}})
        return [r for r in runs if not r["auto_scheduled"]]

    def deployment(self, name: str) -> dict:
        with urllib.request.urlopen(f"{self.env['PREFECT_API_URL']}/deployments/name/{name}", timeout=10) as r:
            return json.loads(r.read())

    def start_worker(self, name: str, pool: str) -> None:
        clone = self.tmp / f"worker-{name}"
        _git(self.tmp, "clone", "-q", str(self.remote), str(clone))
        env = {
            **self.env,
            "PREFECT_HOME": str(self.tmp / f"prefect-{name}"),
            "PREFECT_LOCAL_STORAGE_PATH": str(self.tmp / f"results-{name}"),
            "CUL_WORKSPACES": str(self.tmp / f"runs-{name}"),
        }
        log = self.tmp / f"worker-{name}.log"
        with open(log, "w") as out:
            self.workers[name] = subprocess.Popen(
                [str(BIN / "prefect"), "worker", "start", "--pool", pool, "--name", name],
                cwd=clone,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its flow runs are in its process group: killing it kills them
            )


@pytest.fixture(scope="module")
def team(servers, tmp_path_factory):
    from cul.unlearning.recipes import DFRRecipe, dump_recipe
    from tests.support.postgres import create_database

    tmp = tmp_path_factory.mktemp("team")
    seed = copy_project(tmp / "seed")
    tiny_params(
        seed,
        gate=PERMISSIVE_GATE,
        method="experiments/team.yaml",
        tracking={"experiment": "cul-team", "registered_model": MODEL},
        dispatch={"deployment": "cul-request/gpu", "job_variables": {}, "poll_seconds": 1.0, "max_tries": 3},
    )
    # the tiny recipe with one more training step: a window to kill a worker in
    team_recipe = DFRRecipe(steps=4, replay="online", replay_steps=2, forget_batch=4, retain_batch=8)
    (seed / "experiments" / "team.yaml").write_text(dump_recipe(team_recipe, "team: the tiny recipe, 4 steps"))
    _git(seed, "add", "-A")
    _git(seed, "commit", "-q", "-m", "the team's settings")
    remote = tmp / "remote.git"
    _git(tmp, "init", "-q", "--bare", "-b", "main", str(remote))
    _git(seed, "remote", "add", "origin", str(remote))
    _git(seed, "push", "-q", "-u", "origin", "main")
    env = {
        **servers,
        "CUL_DATABASE_URL": create_database(servers["CUL_TEST_PG"], "cul_team"),
        "CUL_REPO_URL": str(remote),
        "CUL_DVC_REMOTE_URL": f"s3://{BUCKET}/dvc-team",
        "CUL_CACHE_URL": f"s3://{BUCKET}/cache-team",  # the base model's figures, shared by the flow runs
        "CUL_WEBHOOK_SECRET": SECRET,
        "CUL_IMAGE": "cul:test",
        "PREFECT_WORKER_QUERY_SECONDS": "1",
        "PREFECT_LOGGING_LEVEL": "INFO",
    }
    t = Team(env, seed, remote, tmp)
    t.prefect("work-pool", "create", "cul-cpu", "--type", "process", "--overwrite")
    t.prefect("work-pool", "create", "cul-gpu", "--type", "process", "--overwrite")  # a GPU host's process pool
    t.prefect("--no-prompt", "deploy", "--name", "dispatch")
    t.prefect("--no-prompt", "deploy", "--name", "gpu")
    t.start_worker("cpu", "cul-cpu")
    t.start_worker("gpu-a", "cul-gpu")
    t.start_worker("gpu-b", "cul-gpu")
    try:
        yield t
    finally:
        for w in t.workers.values():
            _signal_group(w, signal.SIGTERM)
        deadline = time.monotonic() + 10  # all stop together ...
        for w in t.workers.values():
            try:
                w.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        for w in t.workers.values():  # ... and nothing of theirs outlives them (a flow run in its group)
            _signal_group(w, signal.SIGKILL)
            w.wait(10)


def _signal_group(worker: subprocess.Popen, sig: int) -> None:
    """`sig` to the worker's process group (it and its flow runs), if any of it is left."""
    try:
        os.killpg(worker.pid, sig)
    except ProcessLookupError:
        pass


def _attempt_started(team: Team, request_id: str) -> bool:
    """An attempt run of the request is open: its step is training."""
    client = team.mlflow()
    exp = client.get_experiment_by_name("cul-team")
    if exp is None:
        return False
    running = "attributes.status = 'RUNNING'"
    for run in client.search_runs([exp.experiment_id], f"tags.request_id = '{request_id}' and {running}"):
        if client.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{run.info.run_id}' and {running}"):
            return True
    return False


def _kill_the_node_of(team: Team, pid: int) -> str:
    """SIGKILL the flow run `pid` and the worker that started it, as a lost node would; its name."""
    import psutil

    ancestors = {p.pid for p in psutil.Process(pid).parents()}
    [name] = [n for n, w in team.workers.items() if w.pid in ancestors]
    os.kill(pid, signal.SIGKILL)
    os.killpg(team.workers[name].pid, signal.SIGKILL)
    team.workers[name].wait()
    return name


def test_three_requests_at_once_run_one_at_a_time_and_survive_a_killed_worker(team):
    from cul.io.database import PgLineageLock
    from cul.queue import State

    for concept in ("red", "circle", "striped"):
        cul(team.seed, team.env, "request", "add", concept)
    t0 = time.monotonic()
    team.prefect("deployment", "run", "cul-continual/dispatch")  # the nightly cron ...
    team.prefect("deployment", "run", "cul-continual/dispatch")  # ... and a person, at the same moment

    queue = team.queue()
    _wait("r002 in its attempt", lambda: _attempt_started(team, "r002"), timeout=420, every=0.5)
    holder = PgLineageLock(team.env["CUL_DATABASE_URL"], MODEL).owner()
    assert holder["holder"] == queue.get("r002").holder  # the flow run processing r002 holds the lineage
    killed = _kill_the_node_of(team, holder["pid"])

    _wait("r001, r002 and r003 accepted", lambda: all(r.state == State.accepted for r in queue.items()), timeout=600)
    seconds = time.monotonic() - t0
    # the queue says "accepted" before the step's commit is pushed and its version tagged with that
    # revision (the YAML queue is part of that commit): the flow runs' end is when all of it is done
    final = {"COMPLETED", "CRASHED", "FAILED", "CANCELLED"}
    runs = _wait(
        "the four request flow runs over",
        lambda: (rs := team.flow_runs("cul-request/gpu"))
        and len(rs) == 4
        and all(r["state_type"] in final for r in rs)
        and rs,
        timeout=120,
    )

    client = team.mlflow()
    versions = sorted(client.search_model_versions(f"name='{MODEL}'"), key=lambda v: int(v.version))
    assert [v.version for v in versions] == ["1", "2", "3"]  # nothing registered twice
    assert [v.tags["parent_version"] for v in versions] == ["base", "1", "2"]  # each from the one before
    assert [json.loads(v.tags["forgotten"]) for v in versions][-1] == [v.tags["concept"] for v in versions]
    assert sorted(v.tags["request_id"] for v in versions) == ["r001", "r002", "r003"]
    r002 = queue.get("r002")
    assert r002.tries == 1  # its first flow run died with its worker
    assert [h.state for h in queue.history("r002")].count(State.in_progress) >= 2
    assert sorted(r["state_type"] for r in runs).count("CRASHED") == 1
    exp = client.get_experiment_by_name("cul-team").experiment_id
    r002_runs = client.search_runs([exp], "tags.request_id = 'r002'")
    assert sorted(r.data.tags.get("outcome", "") for r in r002_runs) == ["interrupted", f"version {r002.version}"]

    log = _git(team.remote, "log", "--format=%s", "main").splitlines()
    assert [m.split(" forget")[0] for m in log if m.startswith("cul: ")] == [
        f"cul: {v.tags['request_id']}" for v in reversed(versions)
    ]
    steps = yaml.safe_load(_git(team.remote, "show", "main:requests/steps.yaml"))["steps"]
    assert sorted(steps) == ["s01", "s02", "s03"]
    assert steps["s03"]["parent"] == "models/steps/s02" and steps["s02"]["parent"] == "models/steps/s01"
    lock = yaml.safe_load(_git(team.remote, "show", "main:dvc.lock"))
    keys = s3_keys(team.env["CUL_S3_ENDPOINT"], "dvc-team/")
    for key in steps:
        md5 = next(o["md5"] for o in lock["stages"][f"step@{key}"]["outs"] if o["path"] == f"models/steps/{key}")
        assert f"dvc-team/files/md5/{md5[:2]}/{md5[2:]}" in keys
    assert versions[-1].tags["dvc_rev"] == _git(team.remote, "rev-parse", "main")
    # the base model is judged once for the team: later flow runs, each in a fresh clone, pull its figures
    cached = {k.split("/", 1)[1] for k in s3_keys(team.env["CUL_S3_ENDPOINT"], "cache-team/")}
    assert len({k.split("/")[0] for k in cached}) == 1  # one base model, one folder
    assert any(k.split("/")[1].startswith("eval-stride") for k in cached)
    worker_logs = "".join((team.tmp / f"worker-{n}.log").read_text() for n in team.workers)
    assert "shared cache: pulled eval-stride" in worker_logs

    figures = {"requests": 3, "seconds": round(seconds, 1), "killed_worker": killed, "per_request": []}
    for v in versions:
        m = client.get_run(v.run_id).data.metrics
        figures["per_request"].append(
            {"request": v.tags["request_id"], "seconds_step": m["seconds_step"], "seconds_eval": m["seconds_eval"]}
        )
    (team.tmp / "figures-multi-worker.json").write_text(json.dumps(figures, indent=1))
    print(json.dumps(figures))


def _set_champion(team: Team, version: int) -> None:
    """What MLflow's UI sends when a person adds the `champion` alias to a version."""
    body = json.dumps({"name": MODEL, "alias": "champion", "version": str(version)}).encode()
    req = urllib.request.Request(
        f"{team.env['MLFLOW_TRACKING_URI']}/api/2.0/mlflow/registered-models/alias",
        method="POST",
        data=body,
        headers={"Content-Type": "application/json"},
    )
    urllib.request.urlopen(req, timeout=10).close()


def test_a_promotion_through_mlflows_api_starts_the_next_request_within_a_minute(team):
    from cul.queue import State

    _wait(
        "the dispatchers are done",
        lambda: all(r["state_type"] == "COMPLETED" for r in team.flow_runs("cul-continual/dispatch")),
        120,
    )

    person = team.tmp / "person"
    _git(team.tmp, "clone", "-q", str(team.remote), str(person))
    params = yaml.safe_load((person / "params.yaml").read_text())
    params["pipeline"]["auto_promote"] = False  # from here on a person promotes
    (person / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    _git(person, "commit", "-q", "-am", "a person promotes versions")
    _git(person, "push", "-q", "origin", "main")
    cul(person, team.env, "request", "add", "square")
    cul(person, team.env, "request", "add", "green")
    _set_champion(team, 2)  # a person rolls back: version 3, the candidate, now waits for them
    queue, client = team.queue(), team.mlflow()

    port = free_port()
    hook = [sys.executable, "-m", "cul.cli", "hooks", "serve", "--model", MODEL, "--host", "127.0.0.1"]
    health = f"http://127.0.0.1:{port}/health"
    with background([*hook, "--port", str(port)], {**team.env}, team.tmp / "hook.log", health, timeout=120):
        cul(person, team.env, "hooks", "install", f"http://127.0.0.1:{port}/mlflow")
        forged = urllib.request.Request(
            f"http://127.0.0.1:{port}/mlflow", method="POST", data=b"{}", headers={"X-MLflow-Signature": "v1,AAAA"}
        )
        with pytest.raises(urllib.error.HTTPError, match="401"):
            urllib.request.urlopen(forged, timeout=10)
        before = len(team.flow_runs("cul-continual/dispatch"))

        t0 = time.monotonic()
        _set_champion(team, 3)  # the person promotes version 3
        _wait(
            "a dispatcher run started by the promotion",
            lambda: len(team.flow_runs("cul-continual/dispatch")) > before,
            60,
            0.2,
        )
        dispatched = time.monotonic() - t0
        _wait("r004 in progress", lambda: queue.get("r004").state != State.pending, timeout=60, every=0.5)
        started = time.monotonic() - t0
        _wait("r004 accepted", lambda: queue.get("r004").state == State.accepted, timeout=420)
        _wait(
            "the dispatcher stops at the new candidate",
            lambda: all(r["state_type"] == "COMPLETED" for r in team.flow_runs("cul-continual/dispatch")),
            timeout=120,
        )
    v4 = client.get_model_version(MODEL, str(queue.get("r004").version))
    assert v4.version == "4" and v4.tags["parent_version"] == "3" and v4.tags["request_id"] == "r004"
    aliases = client.get_registered_model(MODEL).aliases
    assert (aliases["champion"], aliases["candidate"]) == ("3", "4")  # a person promotes, not the flow
    assert queue.get("r005").state == State.pending  # waits for that person
    assert len(client.search_model_versions(f"name='{MODEL}'")) == 4
    assert len(team.flow_runs("cul-continual/dispatch")) == before + 1  # one delivery, one run
    figures = {"promotion_to_dispatcher_run_s": round(dispatched, 1), "promotion_to_request_start_s": round(started, 1)}
    (team.tmp / "figures-promotion.json").write_text(json.dumps(figures))
    print(json.dumps(figures))
