"""`cul bench --gated`: a sequence run through the production step, the gate and escalation."""

from __future__ import annotations

import json

import yaml

from cul.unlearning.request import Request
from tests.support.project import PERMISSIVE_GATE, copy_project, tiny_params


def test_a_gated_run_keeps_the_champion_when_every_attempt_is_rejected_and_resumes(
    tmp_path, monkeypatch, base_model, judge
):
    from cul.config import Params
    from cul.evaluation import EvalSpec, Evaluator
    from cul.gated import run_gated_sequence
    from cul.reports import benchmark_table, relapses
    from cul.unlearning.recipes import load_recipe

    project = copy_project(tmp_path / "project")
    monkeypatch.chdir(project)  # the settings' paths are relative to the project
    tiny_params(project, gate=PERMISSIVE_GATE)
    evaluator = Evaluator(judge, EvalSpec(stride=32, steps=2))
    evaluator.set_base(base_model)
    requests = [Request(concept="circle", kind="object"), Request(concept="red", kind="colour")]
    name, recipe = load_recipe("experiments/tiny.yaml")
    out = tmp_path / "gated"

    first = run_gated_sequence(
        Params.load("params.yaml"), base_model, evaluator, requests, recipe, out, name=name, max_steps=1
    )
    assert first[0]["accepted"] and first[0]["forgotten"] == ["circle"] and len(first[0]["attempts"]) == 1
    assert first[0]["champion"] == "steps/01/attempt-0/model" and first[0]["ua"] is not None

    # now a gate nothing passes (FD may not grow at all), with one retry: the request goes to review
    p = yaml.safe_load((project / "params.yaml").read_text())
    p["pipeline"]["gate"] = {**PERMISSIVE_GATE, "max_fd_ratio": 0.01}
    p["pipeline"]["escalation"] = {"max_attempts": 2}
    (project / "params.yaml").write_text(yaml.safe_dump(p))
    logs: list[str] = []
    results = run_gated_sequence(
        Params.load("params.yaml"), base_model, evaluator, requests, recipe, out, name=name, log=logs.append
    )
    assert "resuming after request 1" in logs[0]
    second = results[1]
    assert not second["accepted"] and [a["accepted"] for a in second["attempts"]] == [False, False]
    assert any("FD" in reason for reason in second["attempts"][0]["reasons"]), second["attempts"][0]["reasons"]
    # the retry is the escalated recipe (more steps), not the same one again
    assert second["attempts"][0]["recipe_hash"] != second["attempts"][1]["recipe_hash"]
    # the champion is still request 1's model, judged as before on what it has forgotten
    assert second["champion"] == first[0]["champion"] and second["forgotten"] == ["circle"]
    assert second["ua"] == first[0]["ua"] and second["fd_ratio"] == first[0]["fd_ratio"]
    assert json.loads((out / "results.json").read_text()) == results
    table = benchmark_table({name: results})
    assert f"| {name} (gated: 1 of 2 accepted) | 2 |" in table
    assert relapses(results) is not None
