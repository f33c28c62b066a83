"""The pipeline's guarantees, tried as a careless or hostile user would: no acknowledged request
lost, one run per lineage, only the pipeline's own files committed, a step versioned all or
nothing, user text shown as text, and messages (with an exit code) instead of tracebacks."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from cul.cli import app
from cul.config import Params
from cul.io.locks import LineageLock, LockBusy
from cul.pipeline import PipelineError, process_request, recover_stranded, step_records
from cul.queue import RequestQueue, State
from cul.step import load_steps
from tests.support import ROOT
from tests.support.fakes import Runner, Tracker, Versioner

runner = CliRunner()


def _params_file(tmp_path: Path) -> Path:
    """The production params, with the queue in `tmp_path`."""
    p = yaml.safe_load((ROOT / "params.yaml").read_text())
    p["pipeline"]["requests_file"] = str(tmp_path / "queue.yaml")
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(p))
    return path


# -- the queue: one writer at a time -------------------------------------------------------------
ADDER = textwrap.dedent("""
    import sys
    from cul.queue import RequestQueue
    q = RequestQueue(sys.argv[1])
    for concept in sys.argv[2:]:
        q.add(concept, note="racing")
""")


def test_two_processes_adding_at_once_lose_no_request_and_share_no_id(tmp_path):
    path = tmp_path / "queue.yaml"
    batches = [["circle", "red", "striped", "star"], ["blue", "dotted", "diamond", "yellow"]]
    procs = [subprocess.Popen([sys.executable, "-c", ADDER, str(path), *b], cwd=ROOT) for b in batches]
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    items = RequestQueue(path).items()
    assert sorted(r.concept for r in items) == sorted(c for b in batches for c in b)
    assert len({r.id for r in items}) == 8


# -- one run per lineage ---------------------------------------------------------------------------
HOLDER = textwrap.dedent("""
    import sys, time
    from cul.io.locks import LineageLock
    with LineageLock(sys.argv[1]).hold():
        print("held", flush=True)
        time.sleep(600)
""")


def test_a_second_run_is_refused_while_one_holds_the_lineage_and_a_killed_holder_frees_it(tmp_path):
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, "cul-world"], cwd=tmp_path, stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        lock = LineageLock("cul-world", root=tmp_path)
        assert not lock.is_free() and lock.owner()["pid"] == holder.pid
        with pytest.raises(LockBusy, match=f"pid {holder.pid}"):
            with lock.hold():
                pass
        cwd = os.getcwd()
        os.chdir(tmp_path)
        try:
            params = _params_file(tmp_path)
            result = runner.invoke(app, ["run", "--quick", "--params", str(params)])
        finally:
            os.chdir(cwd)
        assert result.exit_code == 3 and "already processing requests of cul-world" in result.output
        assert f"pid {holder.pid} on" in result.output  # who holds it
        assert not (tmp_path / "queue.yaml").exists()  # the refused run did nothing
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
        holder.stdout.close()
    assert LineageLock("cul-world", root=tmp_path).is_free()  # the kernel released the dead holder's lock


def test_requests_a_dead_run_left_in_progress_are_pending_again_and_their_runs_closed(tmp_path):
    queue = RequestQueue(tmp_path / "queue.yaml")
    queue.add("red")
    queue.add("circle")
    queue.update("r001", state=State.in_progress)
    tracker = Tracker()
    tracker.open_request("r001", "red", {"request_id": "r001"})  # what the dead run left RUNNING
    assert recover_stranded(queue, tracker, log=lambda m: None) == ["r001"]
    item = queue.get("r001")
    assert item.state == State.pending and "interrupted" in item.reasons[0]
    assert tracker.runs["run0"]["status"] == "FAILED" and queue.get("r002").state == State.pending


# -- only the pipeline's own files, all or nothing ------------------------------------------------
def _git(repo: Path, *args: str) -> str:
    return subprocess.run(
        ["git", "-c", "user.name=t", "-c", "user.email=t@x", *args],
        cwd=repo,
        check=True,
        capture_output=True,
        text=True,
    ).stdout


@pytest.fixture()
def project(tmp_path, monkeypatch):
    """A git repository with the production params and one queued request."""
    monkeypatch.chdir(tmp_path)
    _git(tmp_path, "init", "-q", "-b", "main")
    (tmp_path / "requests").mkdir()
    (tmp_path / "dvc.lock").write_text("schema: '2.0'\nstages: {}\n")
    (tmp_path / "requests" / "steps.yaml").write_text("steps: {}\n")
    params = Params.load(ROOT / "params.yaml")
    RequestQueue(params.pipeline.requests_file).add("red", "colour")
    _git(tmp_path, "add", "-A")
    _git(tmp_path, "commit", "-q", "-m", "start")
    return params


def test_a_run_refuses_a_tree_with_the_users_staged_changes_and_touches_nothing(project, tmp_path):
    from cul.io.versioning import Versioner as Git

    (tmp_path / "mine.txt").write_text("my work in progress\n")
    _git(tmp_path, "add", "mine.txt")
    queue, before = RequestQueue(project.pipeline.requests_file), (tmp_path / "requests/queue.yaml").read_text()
    with pytest.raises(PipelineError, match="staged changes \\(mine.txt\\)"):
        process_request("r001", project, queue, Tracker(), Git(tmp_path), Runner([0.0]), log=lambda m: None)
    assert (tmp_path / "requests/queue.yaml").read_text() == before and queue.get("r001").state == State.pending


def test_the_step_commit_takes_only_the_files_the_step_wrote(project, tmp_path):
    from cul.io.versioning import Versioner as Git

    for private in ("requests/draft-ticket.yaml", "reports/notes.md", "reports/steps/s01/my-plot.png"):
        (tmp_path / private).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / private).write_text("private\n")
    for mine in step_records("s01", "r001")[3:]:  # what the step writes besides queue, steps and lock
        (tmp_path / mine).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / mine).write_text("step output\n")
    (tmp_path / "requests/queue.yaml").write_text((tmp_path / "requests/queue.yaml").read_text() + "# changed\n")
    Git(tmp_path).commit("cul: r001 forget red -> step s01", step_records("s01", "r001"))
    committed = set(_git(tmp_path, "show", "--name-only", "--format=", "HEAD").split())
    assert committed == {"requests/queue.yaml", *step_records("s01", "r001")[3:]}
    untracked = set(_git(tmp_path, "ls-files", "--others", "--exclude-standard").split())
    assert {"requests/draft-ticket.yaml", "reports/notes.md", "reports/steps/s01/my-plot.png"} <= untracked


class FailingPush(Versioner):
    def push(self, *targets):
        raise RuntimeError("dvc push: the remote refused the upload")


def test_a_failed_push_leaves_no_phantom_step_and_a_rerun_takes_the_same_key(project, tmp_path):
    before = {p: (tmp_path / p).read_bytes() for p in ("requests/steps.yaml", "dvc.lock")}
    queue, tracker = RequestQueue(project.pipeline.requests_file), Tracker()
    with pytest.raises(PipelineError, match="nothing registered"):
        process_request("r001", project, queue, tracker, FailingPush(), Runner([0.0]), log=lambda m: None)
    assert {p: (tmp_path / p).read_bytes() for p in before} == before and load_steps() == {}
    assert tracker.versions == [] and queue.get("r001").state == State.pending
    assert tracker.runs["run0"]["status"] == "FAILED"
    again = process_request("r001", project, queue, Tracker(), Versioner(), Runner([0.0]), log=lambda m: None)
    assert again.accepted and again.step == "s01" and list(load_steps()) == ["s01"]

    # an interrupt during the push (Ctrl-C, SIGTERM) puts the files back too and is not swallowed
    class InterruptedPush(Versioner):
        def push(self, *targets):
            raise KeyboardInterrupt

    queue.add("blue", "colour", note="", by="test")
    before = {p: (tmp_path / p).read_bytes() for p in ("requests/steps.yaml", "dvc.lock")}
    rid = queue.items()[-1].id
    with pytest.raises(KeyboardInterrupt):
        process_request(rid, project, queue, Tracker(), InterruptedPush(), Runner([0.0]), log=lambda m: None)
    assert {p: (tmp_path / p).read_bytes() for p in before} == before and list(load_steps()) == ["s01"]
    assert queue.get(rid).state == State.in_progress  # the next run's recover_stranded takes it up


# -- user text is text ------------------------------------------------------------------------------
TEXT = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=80)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(note=TEXT, by=TEXT)
def test_any_note_and_name_go_through_add_list_and_the_record_as_plain_text(tmp_path_factory, note, by):
    from cul.audit import write_deletion_record
    from cul.gate import Gate
    from cul.step import StepSpec
    from tests.support.fakes import metrics_for

    tmp = tmp_path_factory.mktemp("text")
    params = _params_file(tmp)
    added = runner.invoke(app, ["request", "add", "red", "--note", note, "--by", by, "--params", str(params)])
    assert added.exit_code == 0, added.output
    listed = runner.invoke(app, ["request", "list", "--params", str(params)])
    assert listed.exit_code == 0 and "red" in listed.output  # markup in a note cannot break the table
    item = RequestQueue(tmp / "queue.yaml").get("r001")
    assert item.note == note and item.by == (by or item.by)
    evaluation = metrics_for({"red": 0.0}, ["red"])
    spec = StepSpec(key="s01", request=item.request(), parent="models/base")
    md = write_deletion_record(
        item,
        spec,
        evaluation.model_dump() | {"forgotten": ["red"]},
        Gate().decide(evaluation, ["red"]),
        1,
        "cul-world",
        {},
        out=tmp / "audit",
    )
    plain = write_deletion_record(
        item.model_copy(update={"note": "x", "by": "y"}),
        spec,
        evaluation.model_dump() | {"forgotten": ["red"]},
        Gate().decide(evaluation, ["red"]),
        1,
        "cul-world",
        {},
        out=tmp / "plain",
    )
    lines, reference = md.read_text().splitlines(), plain.read_text().splitlines()
    assert len(lines) == len(reference)  # no line added or removed by the text
    requested = lines[2]
    assert requested.startswith("- Requested by ") and "\n" not in requested
    for other, ref in zip(lines, reference):
        if not other.startswith("- Requested by "):
            assert other == ref  # every other line of the record reads as it would with plain text
    assert json.loads((tmp / "audit" / "r001.json").read_text())["request"]["note"] == note


# -- messages, not tracebacks ------------------------------------------------------------------------
@pytest.mark.parametrize(
    "args, says",
    [
        (["request", "add", "  "], "empty"),
        (["request", "add", "red", "--kind", "flavour"], "unknown category 'flavour'"),
        (["request", "add", "pikachu"], "unknown concept"),
    ],
)
def test_bad_requests_get_a_message_and_exit_code_1(tmp_path, args, says):
    result = runner.invoke(app, [*args, "--params", str(_params_file(tmp_path))])
    assert result.exit_code == 1 and says in result.output and "Traceback" not in result.output
    assert not (tmp_path / "queue.yaml").exists()


def _bad_models(tmp_path: Path) -> dict[str, Path]:
    import shutil

    corrupt = tmp_path / "corrupt"
    shutil.copytree(ROOT / "models" / "base", corrupt, ignore=shutil.ignore_patterns("record.json"))
    (corrupt / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"\x00garbage" * 64)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "weights.bin").write_bytes(b"pickle!")
    broken_meta = tmp_path / "broken-meta"
    broken_meta.mkdir()
    (broken_meta / "cul_model.json").write_text("{not json")
    return {"corrupt": corrupt, "foreign": foreign, "broken-meta": broken_meta, "missing": tmp_path / "nowhere"}


@pytest.mark.parametrize("case", ["corrupt", "foreign", "broken-meta", "missing"])
def test_bad_weights_get_a_message_not_a_traceback(tmp_path, case):
    model = _bad_models(tmp_path)[case]
    result = runner.invoke(
        app,
        [
            "generate",
            "a red circle",
            "--model",
            str(model),
            "-o",
            str(tmp_path / "x.png"),
            "--params",
            str(ROOT / "params.yaml"),
        ],
    )
    assert result.exit_code == 1, result.output
    assert str(model.name) in result.output and "Traceback" not in result.output
    assert not (tmp_path / "x.png").exists()


def test_promoting_a_version_that_does_not_exist_says_so(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    result = runner.invoke(app, ["promote", "99", "--params", str(ROOT / "params.yaml")])
    assert result.exit_code == 1 and "has no version 99" in result.output


@pytest.mark.parametrize(
    "bad, says",
    [
        ({"gate": {"max_drop_in": 7}}, "max_drop_in"),
        ({"gate": {"max_fd_ratio": 0}}, "max_fd_ratio"),
        ({"method": "dfrr"}, "neither a method"),
        ({"escalation": {"max_attempts": 0}}, "max_attempts"),
    ],
)
def test_settings_that_cannot_be_meant_are_refused_when_read(tmp_path, bad, says):
    p = yaml.safe_load((ROOT / "params.yaml").read_text())
    for key, value in bad.items():
        p["pipeline"][key] = {**p["pipeline"][key], **value} if isinstance(value, dict) else value
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(p))
    result = runner.invoke(app, ["request", "list", "--params", str(path)])
    assert result.exit_code == 2 and says in " ".join(result.output.split())


def test_a_negative_loss_weight_is_refused(tmp_path):
    from cul.unlearning.recipes import RecipeError, load_recipe

    bad = tmp_path / "bad.yaml"
    bad.write_text("method: dfr\nl_unl: -1\n")
    with pytest.raises(RecipeError, match="l_unl"):
        load_recipe(bad)


def test_the_lock_waits_for_a_short_writer(tmp_path):
    from cul.io.locks import file_lock

    started = time.perf_counter()
    with file_lock(tmp_path / "x.lock"):
        pass
    assert time.perf_counter() - started < 5


# -- a killed run -----------------------------------------------------------------------------------
def _processes_of(project: Path) -> list[int]:
    """Live processes whose PREFECT_HOME is the project's: `cul run` and its embedded server."""
    found = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit() and int(proc.name) != os.getpid():
            try:
                environ = (proc / "environ").read_bytes().split(b"\0")
            except OSError:
                continue
            if f"PREFECT_HOME={project / '.prefect'}".encode() in environ:
                found.append(int(proc.name))
    return found


def _gone(project: Path) -> None:
    for _ in range(40):  # the embedded server gets SIGTERM from the kernel as its parent dies
        if not _processes_of(project):
            break
        time.sleep(0.5)
    assert _processes_of(project) == [], "a process of the stopped run is still alive"
    assert LineageLock("cul-world", root=project).is_free()


@pytest.mark.slow(seconds=120)
def test_a_run_killed_or_interrupted_mid_step_leaves_no_process_and_the_next_run_completes_it_once(tmp_path):
    """SIGKILL (a lost node) and SIGTERM to the run's process group (Ctrl-C, `timeout`, a
    scheduler): nothing keeps running, an interrupt ends with a message and no traceback, and the
    request is done exactly once by the run after."""
    import mlflow

    from tests.support.project import PERMISSIVE_GATE, copy_project, tiny_params

    project = copy_project(tmp_path / "project")
    tiny_params(
        project,
        gate=PERMISSIVE_GATE,
    )
    env = {**os.environ, "PREFECT_HOME": str(project / ".prefect"), "OMP_NUM_THREADS": "1"}
    env.pop("PREFECT_API_URL", None)
    env.pop("MLFLOW_TRACKING_URI", None)
    cli = [sys.executable, "-m", "cul.cli"]
    subprocess.run([*cli, "request", "add", "yellow"], cwd=project, env=env, check=True, capture_output=True)
    run = subprocess.Popen(
        [*cli, "run", "--quiet"], cwd=project, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    queue = project / "requests" / "queue.yaml"
    deadline = time.monotonic() + 600
    while "in_progress" not in queue.read_text():
        assert run.poll() is None and time.monotonic() < deadline, "the run ended before its step started"
        time.sleep(0.5)
    time.sleep(3)  # inside the step now
    run.send_signal(signal.SIGKILL)
    run.wait()
    _gone(project)

    out = tmp_path / "interrupted.out"
    with out.open("w") as sink:
        run = subprocess.Popen(
            [*cli, "run", "--quiet"],
            cwd=project,
            env=env,
            stdout=sink,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        while "marked crashed" not in out.read_text():  # printed as the flow starts
            assert run.poll() is None and time.monotonic() < deadline, out.read_text()[-2000:]
            time.sleep(0.5)
        while not (  # recovered from the killed run, then taken up again: inside the request now
            (item := RequestQueue(queue).get("r001")).state == State.in_progress
            and any(r.startswith("interrupted") for r in item.reasons)
        ):
            assert run.poll() is None and time.monotonic() < deadline, out.read_text()[-2000:]
            time.sleep(0.5)
        time.sleep(2)
        os.killpg(run.pid, signal.SIGTERM)  # the whole group, as `timeout` and Ctrl-C do
        assert run.wait(timeout=120) == 130, out.read_text()[-2000:]
    said = out.read_text()
    assert "Requests not finished stay in the queue" in said and "Traceback" not in said, said[-2000:]
    # Prefect sent its queued logs before its server stopped, instead of retrying at exit for a minute
    assert "Error logging to API" not in said, said[-2000:]
    _gone(project)
    assert RequestQueue(queue).get("r001").state == State.in_progress  # still to do

    again = subprocess.run([*cli, "run", "--quiet"], cwd=project, env=env, capture_output=True, text=True, timeout=900)
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-2000:]
    assert "marked crashed" not in again.stdout  # the interrupted run reported its own crash to its server
    item = RequestQueue(queue).get("r001")
    assert item.state == State.accepted and (item.version, item.step) == (1, "s01")
    assert list(load_steps(project / "requests" / "steps.yaml")) == ["s01"]
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{project / 'mlflow.db'}")
    assert len(client.search_model_versions("name='cul-world'")) == 1
    requests_runs = client.search_runs(
        [client.get_experiment_by_name("cul-continual-unlearning").experiment_id], "tags.request_id = 'r001'"
    )
    statuses = sorted(r.info.status for r in requests_runs)
    assert statuses.count("FINISHED") == 1 and set(statuses) == {"FAILED", "FINISHED"}, statuses
    assert _processes_of(project) == []
