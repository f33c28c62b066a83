"""The request logic of `cul.pipeline` with small in-memory stand-ins for the queue, MLflow, DVC/git
and the compute: what is registered, committed, cleaned up and recorded, in milliseconds. The same
logic runs against real servers in test_pipeline_servers.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from cul.config import Params
from cul.io.tracking import ChampionInfo
from cul.pipeline import process_request, step_records, stops_the_run
from cul.queue import RequestQueue, State
from cul.step import load_steps
from cul.unlearning.preparation import PreparationError
from tests.support.fakes import Runner, Tracker, Versioner


@pytest.fixture()
def project(tmp_path, monkeypatch, root):
    """An empty working folder with the production params, one queued request, no steps yet."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "requests").mkdir()
    params = Params.load(root / "params.yaml")
    RequestQueue(params.pipeline.requests_file).add("red", "colour", note="ticket 7", by="dpo")
    return params


def test_an_escalated_attempt_is_accepted_registered_versioned_recorded_and_committed(project):
    queue, tracker, versioner = RequestQueue(project.pipeline.requests_file), Tracker(), Versioner()
    runner = Runner(left=[0.5, 0.0])  # attempt 0 leaves red in half its images; attempt 1 forgets it
    out = process_request("r001", project, queue, tracker, versioner, runner, log=lambda m: None)

    assert out.accepted and (out.version, out.step) == (1, "s01") and len(out.attempts) == 2
    first, second = (s.recipe for s in runner.specs)
    assert first.l_unl == 10.0 and second.l_unl == 20.0 and second.addons == first.addons  # forgets harder
    item = queue.get("r001")
    assert (item.state, item.version, item.step, item.reasons) == (State.accepted, 1, "s01", [])
    [version] = tracker.versions
    assert version["model_dir"] == Path("models/steps/s01")
    assert set(version["tags"]) == {
        "request_id",
        "concept",
        "step",
        "gate",
        "forgotten",
        "parent_version",
        "git_commit",
        "attempt",
        "recipe_name",
        "recipe_hash",
        "dvc_md5",
        "dvc_stage",
    }
    assert version["tags"]["attempt"] == "1" and version["tags"]["dvc_md5"] == "md5-s01.dir"
    assert versioner.recorded == ["s01"] and versioner.pushed == ["step@s01"]
    assert versioner.commits == [("cul: r001 forget red -> step s01", step_records("s01", "r001"))]
    assert tracker.version_tags[(1, "dvc_rev")] == "rev1"
    request_run = tracker.runs["run0"]
    assert request_run["status"] == "FINISHED" and request_run["tags"]["outcome"] == "version 1"
    assert all(r["status"] == "FINISHED" for r in tracker.runs.values())
    assert load_steps()["s01"].attempt == 1 and load_steps()["s01"].recipe == second
    assert Path("reports/audit/r001.md").exists() and "ticket 7" in Path("reports/audit/r001.md").read_text()
    assert out.summary()["dvc_rev"] == "rev1"


def test_a_step_rejected_every_time_goes_to_review_and_leaves_nothing_behind(project):
    queue, tracker, versioner = RequestQueue(project.pipeline.requests_file), Tracker(), Versioner()
    out = process_request("r001", project, queue, tracker, versioner, Runner(left=[0.5, 0.5, 0.5]), log=lambda m: None)
    assert not out.accepted and len(out.attempts) == project.pipeline.escalation.max_attempts
    item = queue.get("r001")
    assert item.state == State.review and item.reasons == ["UA on red 50.0% < 90%"]
    assert tracker.versions == [] and versioner.commits == [] and versioner.pushed == []
    assert not any(Path(d).exists() for d in ("models/steps/s01", "reports/steps/s01", "data/steps/s01"))
    assert load_steps() == {} and not Path("reports/audit").exists()
    assert tracker.runs["run0"]["tags"]["outcome"] == "review"


NOTHING_LEFT = "nothing is left to map 'red' to: every other colour is forgotten (...)"


class _Unpreparable(Runner):
    def prepare(self, spec):
        spec.data_dir.mkdir(parents=True, exist_ok=True)  # a half-written folder
        raise PreparationError(NOTHING_LEFT)


def test_a_request_that_cannot_be_prepared_goes_to_review_with_the_reason_and_nothing_is_tried(project):
    queue, tracker, versioner = RequestQueue(project.pipeline.requests_file), Tracker(), Versioner()
    runner = _Unpreparable(left=[0.0])
    out = process_request("r001", project, queue, tracker, versioner, runner, log=lambda m: None)
    assert not out.accepted and out.attempts == [] and runner.specs == []
    item = queue.get("r001")
    assert item.state == State.review and item.reasons == [f"cannot be prepared: {NOTHING_LEFT}"]
    assert tracker.versions == [] and versioner.commits == [] and not Path("data/steps/s01").exists()
    assert tracker.runs["run0"]["tags"]["outcome"] == "review" and tracker.runs["run0"]["status"] == "FINISHED"


def test_a_concept_the_champion_already_forgot_is_a_no_op(project):
    queue, tracker = (
        RequestQueue(project.pipeline.requests_file),
        Tracker(ChampionInfo(version=3, step="s03", forgotten=["red"])),
    )
    runner = Runner(left=[])
    out = process_request("r001", project, queue, tracker, Versioner(), runner, log=lambda m: None)
    assert out.noop and out.accepted and out.version == 3 and runner.specs == [] and tracker.runs == {}
    assert queue.get("r001").state == State.accepted and queue.get("r001").version == 3


def test_the_next_step_starts_from_the_champion_and_a_person_promotes_when_auto_promote_is_off(project):
    queue = RequestQueue(project.pipeline.requests_file)
    queue.add("circle", "object")
    tracker = Tracker(ChampionInfo(version=1, step="s01", forgotten=["red"]))
    runner = Runner(left=[0.0])
    out = process_request("r002", project, queue, tracker, Versioner(), runner, log=lambda m: None)
    spec = runner.specs[0]
    assert (spec.parent, spec.parent_version, spec.forgotten) == ("models/steps/s01", 1, ["red"])
    manual = project.model_copy(update={"pipeline": project.pipeline.model_copy(update={"auto_promote": False})})
    assert stops_the_run(out.summary(), manual) and not stops_the_run(out.summary(), project)


def test_the_summary_counts_what_this_run_spent_not_what_reused_data_once_cost(project):
    """A rerun after a kill finds the step's data prepared by the dead run: its summary must not
    carry that run's replay time, and every attempt's training and evaluation count."""
    queue, tracker, versioner = RequestQueue(project.pipeline.requests_file), Tracker(), Versioner()
    runner = Runner(left=[0.5, 0.0])  # the data folder is "found", as a cached prepare task returns it
    out = process_request("r001", project, queue, tracker, versioner, runner, log=lambda m: None)

    summary = out.summary()
    assert out.metrics["seconds_step"] == 53.0  # the step's record: replay (made once) + training
    assert out.seconds_prepare < 1.0
    assert summary["seconds_step"] == pytest.approx(round(out.seconds_prepare + 2 * 3.0, 1))  # two attempts
    assert summary["seconds_eval"] == 2.0
    assert summary["attempts"] == 2 and summary["accepted"]  # cul run's table and bench_pipeline show it


class PromotedDuringTheStep(Runner):
    """A person moves `champion` (to version 2) while the first attempt trains."""

    def __init__(self, tracker: Tracker) -> None:
        super().__init__(left=[0.0, 0.0])
        self.tracker = tracker

    def attempt(self, spec, data_dir, run_id):
        if len(self.specs) == 0:
            self.tracker.champ = ChampionInfo(version=2, step="s02", forgotten=["circle"])
        return super().attempt(spec, data_dir, run_id)


def test_a_step_whose_parent_stopped_being_champion_is_redone_from_the_new_champion(project):
    queue, versioner = RequestQueue(project.pipeline.requests_file), Versioner()
    tracker = Tracker(ChampionInfo(version=1, step="s01", forgotten=[]))
    runner = PromotedDuringTheStep(tracker)
    out = process_request("r001", project, queue, tracker, versioner, runner, log=lambda m: None)

    first, second = runner.specs
    assert (first.parent_version, second.parent_version) == (1, 2)
    assert second.forgotten == ["circle"] and second.parent == "models/steps/s02"
    assert out.accepted and out.version == 1 and len(tracker.versions) == 1  # registered once, on version 2
    assert tracker.versions[0]["tags"]["parent_version"] == "2"
    assert versioner.recorded == ["s01"] and len(versioner.commits) == 1
    stale = tracker.runs["run0"]
    assert stale["tags"]["outcome"] == "stale parent: redone" and stale["status"] == "FINISHED"
    assert [h for h in queue.items() if h.id == "r001"][0].state == State.accepted


def test_without_auto_promotion_a_candidate_newer_than_the_champion_holds_the_queue(project):
    from cul.pipeline import waiting_for_promotion

    manual = project.model_copy(update={"pipeline": project.pipeline.model_copy(update={"auto_promote": False})})
    tracker = Tracker(ChampionInfo(version=1, step="s01", forgotten=["red"]))
    assert waiting_for_promotion(tracker, manual) is None  # no candidate yet
    tracker.versions = [{}, {}]  # version 2 registered: the candidate
    assert waiting_for_promotion(tracker, manual) == 2
    assert waiting_for_promotion(tracker, project) is None  # auto-promotion: nothing waits
    tracker.champ = ChampionInfo(version=2, step="s02", forgotten=["red", "circle"])
    assert waiting_for_promotion(tracker, manual) is None  # promoted
