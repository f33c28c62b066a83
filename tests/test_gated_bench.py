"""`cul bench --gated`: a sequence run through the production step, the gate and escalation."""

from __future__ import annotations

import json

import pytest
import yaml

from cul.unlearning.request import Request
from tests.support.project import PERMISSIVE_GATE, copy_project, tiny_params


@pytest.mark.slow(seconds=90)
def test_a_gated_run_keeps_the_champion_when_every_attempt_is_rejected_and_resumes_under_its_own_gate_only(
    tmp_path, monkeypatch, base_model, judge
):
    from cul.benchmark import BenchmarkError
    from cul.config import Params
    from cul.evaluation import EvalSpec, Evaluator
    from cul.gated import run_gated_sequence
    from cul.reports import benchmark_table, evaluated, load_runs, steps_table
    from cul.unlearning.recipes import load_recipe

    project = copy_project(tmp_path / "project")
    monkeypatch.chdir(project)  # the settings' paths are relative to the project
    tiny_params(project, gate=PERMISSIVE_GATE)
    permissive = Params.load("params.yaml")
    p = yaml.safe_load((project / "params.yaml").read_text())
    p["pipeline"]["gate"] = {**PERMISSIVE_GATE, "max_fd_ratio": 0.01}  # nothing passes: FD may not grow at all
    p["pipeline"]["escalation"] = {"max_attempts": 2}
    (project / "strict.yaml").write_text(yaml.safe_dump(p))
    strict = Params.load("strict.yaml")
    evaluator = Evaluator(judge, EvalSpec(stride=32, steps=2))
    evaluator.set_base(base_model)
    requests = [Request(concept="circle", kind="object"), Request(concept="red", kind="colour")]
    name, recipe = load_recipe("experiments/tiny.yaml")

    # every attempt rejected: the request goes to review and the champion stays the base model
    rejected = run_gated_sequence(strict, base_model, evaluator, requests, recipe, tmp_path / "strict", name, 1)
    [entry] = rejected
    assert not entry["accepted"] and [a["accepted"] for a in entry["attempts"]] == [False, False]
    assert any("FD" in reason for reason in entry["attempts"][0]["reasons"]), entry["attempts"][0]["reasons"]
    # the retry is the escalated recipe (more steps), not the same one again
    assert entry["attempts"][0]["recipe_hash"] != entry["attempts"][1]["recipe_hash"]
    assert entry["champion"] == "base" and entry["forgotten"] == [] and entry["ua"] is None
    assert evaluated(rejected) == 0 and not (tmp_path / "strict" / "steps" / "01" / "attempt-0" / "model").exists()
    assert f"| {name} (gated), 0 of 1 accepted | 1 |" in benchmark_table(load_runs(tmp_path))
    assert "| 1 | circle (rejected: champion unchanged) | n/a |" in steps_table(name, rejected)

    # accepted: the next request starts from it; a rerun resumes after it, under the same gate only
    out = tmp_path / "permissive"
    first = run_gated_sequence(permissive, base_model, evaluator, requests, recipe, out, name, max_steps=1)
    assert first[0]["accepted"] and first[0]["forgotten"] == ["circle"] and first[0]["ua"] is not None
    assert first[0]["champion"] == "steps/01/attempt-0/model"
    with pytest.raises(BenchmarkError, match="other settings"):
        run_gated_sequence(strict, base_model, evaluator, requests, recipe, out, name)
    with pytest.raises(BenchmarkError, match="another sequence .request 1 was circle, this run's is red"):
        run_gated_sequence(permissive, base_model, evaluator, requests[::-1], recipe, out, name)
    coarser = Evaluator(judge, EvalSpec(stride=64, steps=2))  # another --stride
    with pytest.raises(BenchmarkError, match="other evaluation settings"):
        run_gated_sequence(permissive, base_model, coarser, requests, recipe, out, name)
    logs: list[str] = []
    results = run_gated_sequence(permissive, base_model, evaluator, requests, recipe, out, name, log=logs.append)
    assert "resuming after request 1" in logs[0]
    assert results[1]["accepted"] and results[1]["forgotten"] == ["circle", "red"]
    assert results[1]["champion"] == "steps/02/attempt-0/model"
    assert json.loads((out / "results.json").read_text()) == results


@pytest.mark.slow(seconds=60)
def test_a_retry_on_the_surrogates_images_draws_only_their_samples_and_trains_on_them(tmp_path, monkeypatch):
    """`escalation.forgetting_resteer`: the request's samples were prepared for attempt 0; the
    retry that re-steers on the surrogate's images adds theirs to the same folder and trains on
    them, the recorded recipe saying so."""
    from cul.config import Params
    from cul.gate import EscalationPolicy
    from cul.step import StepSpec, prepare_data, train_and_evaluate
    from cul.unlearning.recipes import DFRRecipe

    project = copy_project(tmp_path / "project")
    monkeypatch.chdir(project)
    tiny_params(project, gate=PERMISSIVE_GATE)
    params = Params.load("params.yaml")
    recipe = DFRRecipe(steps=3, replay_steps=2, forget_batch=4, retain_batch=8)  # buffer replay
    request = Request(concept="plain", kind="texture")
    spec = StepSpec.for_request(params, "s01", request, str(params.paths.base_model), [], "tiny_buffers", recipe)
    data = prepare_data(spec, params, tmp_path / "data")
    prepared = {d.name for d in (data / "replay").iterdir() if d.is_dir()}
    assert "forget" in prepared and "mapped" not in prepared

    retry_recipe = EscalationPolicy(forgetting_resteer="both").config_for(recipe, 1, failed=["ua"])
    retry = spec.model_copy(update={"attempt": 1, "recipe": retry_recipe})
    m = train_and_evaluate(retry, params, data, tmp_path / "model", tmp_path / "report", log=lambda _: None)
    assert {d.name for d in (data / "replay").iterdir() if d.is_dir()} == prepared | {"mapped"}
    assert m["recipe"]["resteer_images"] == "both" and m["recipe"]["surrogate_push"] == 0.5
    assert m["attempt"] == 1


def test_a_run_gated_before_an_escalation_option_existed_keeps_its_gate_hash_until_the_option_is_set():
    from cul.config import Params
    from cul.gated import gate_settings
    from cul.unlearning.recipes import Inversion

    run = "reports/benchmark/heldout-order1-resteer_on_retry/dfr/results.json"
    recorded = {r["gate_hash"] for r in json.loads(open(run).read())}
    params = Params.load("experiments/pipeline/resteer_on_retry.yaml")
    assert {gate_settings(params)[1]} == recorded  # `--max-steps 10` resumes it
    pl = params.pipeline
    robust = pl.escalation.model_copy(update={"recovery_inversion": Inversion(weight=0.3)})
    robust_params = params.model_copy(update={"pipeline": pl.model_copy(update={"escalation": robust})})
    settings, other = gate_settings(robust_params)
    assert other not in recorded and settings["escalation"]["recovery_inversion"]["weight"] == 0.3
