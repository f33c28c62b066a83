"""Recipes: the production ones are the code defaults, every experiment resolves, and every kept
benchmark run says which recipe and commit made it, matching the name it is filed under."""

from __future__ import annotations

import json

import pytest
import yaml

from cul.config import Params, ParamsError
from cul.unlearning.recipes import METHODS, PRODUCTION, RecipeError, load_recipe, parse_recipe, recipe_hash
from tests.support import ROOT

EXPERIMENTS = sorted((ROOT / "experiments").glob("*.yaml"))
RUNS = sorted(ROOT.glob("reports/benchmark/**/results.json"))


def test_code_defaults_are_the_production_params():
    assert Params.load(ROOT / "params.yaml") == Params()


def test_the_quick_profile_thins_the_evaluation_and_never_allows_more_attempts_than_production():
    p = Params()
    quick = p.quick_profile()
    assert (quick.pipeline.eval_stride, quick.pipeline.escalation.max_attempts) == (4, 2)
    assert quick.pipeline.gate == p.pipeline.gate and p.pipeline.escalation.max_attempts == 3
    one = Params.model_validate({"pipeline": {"escalation": {"max_attempts": 1}}})
    assert one.quick_profile().pipeline.escalation.max_attempts == 1


def test_params_yaml_is_production_only_and_short():
    text = (ROOT / "params.yaml").read_text()
    assert len(text.splitlines()) <= 100
    assert set(yaml.safe_load(text)) == {
        "world",
        "model",
        "sampling",
        "pretrain",
        "judge",
        "eval",
        "paths",
        "pipeline",
        "compute",
        "device",
    }


@pytest.mark.parametrize("path", EXPERIMENTS, ids=lambda p: p.stem)
def test_every_experiment_file_resolves_to_a_valid_recipe_and_says_what_it_is(path):
    name, recipe = load_recipe(path)
    assert name == path.stem and recipe.method in METHODS
    lines = path.read_text().splitlines()
    assert lines[0].startswith(f"# {name}: ") and lines[1].startswith("# "), "two lines: what changes, what it showed"
    # fully resolved: every field of the recipe is written, nothing is left to a code default
    data = yaml.safe_load(path.read_text())
    assert set(data) == set(recipe.model_dump()) and set(data["addons"]) == set(recipe.addons.model_dump())


@pytest.mark.parametrize("path", sorted((ROOT / "experiments" / "pipeline").glob("*.yaml")), ids=lambda p: p.stem)
def test_every_pipeline_experiment_is_valid_settings_that_differ_from_production(path):
    lines = path.read_text().splitlines()
    assert lines[0].startswith(f"# {path.stem}: ") and lines[1].startswith("# ")
    assert Params.load(path) != Params()


def test_experiments_do_not_reuse_a_production_name_and_the_collection_is_all_there():
    assert len(EXPERIMENTS) >= 40
    assert not {p.stem for p in EXPERIMENTS} & set(METHODS)


def test_a_bad_recipe_is_refused_with_a_message(tmp_path):
    with pytest.raises(RecipeError, match="neither a method"):
        load_recipe("dfr_does_not_exist")
    bad = tmp_path / "bad.yaml"
    bad.write_text("method: dfr\nl_unll: 3\n")
    with pytest.raises(RecipeError, match="l_unll"):
        load_recipe(bad)
    bad.write_text("method: ca\nl_pres: 3\n")  # CA has no replay distillation term
    with pytest.raises(RecipeError, match="l_pres"):
        load_recipe(bad)
    with pytest.raises(ParamsError, match="neither a method"):
        Params.load(_params(tmp_path, "dfrr"))


def _params(tmp_path, method: str):
    p = yaml.safe_load((ROOT / "params.yaml").read_text())
    p["pipeline"]["method"] = method
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(p))
    return path


def test_the_hash_follows_the_recipe_not_its_spelling():
    dfr = PRODUCTION["dfr"]()
    assert recipe_hash(dfr) == recipe_hash(parse_recipe(json.loads(json.dumps(dfr.model_dump(mode="json")))))
    assert recipe_hash(dfr) != recipe_hash(dfr.with_steps(151))


@pytest.mark.parametrize("path", RUNS, ids=lambda p: str(p.parent.relative_to(ROOT / "reports/benchmark")))
def test_every_kept_run_records_its_recipe_and_commit_and_its_name_means_that_recipe(path):
    everything = json.loads(path.read_text())
    assert everything
    for entry in everything:
        assert entry["git_commit"] and entry["recipe_hash"] == recipe_hash(parse_recipe(entry["recipe"]))
    # a branch (`cul bench --branch`) begins with another run's entries, which must be that run's
    inherited = [e for e in everything if "inherited_from" in e]
    if inherited:
        source = json.loads((path.parent / inherited[0]["inherited_from"] / "results.json").read_text())
        strip = ("inherited_from", "champion")
        assert [{k: v for k, v in e.items() if k not in strip} for e in inherited] == [
            {k: v for k, v in e.items() if k not in strip} for e in source[: len(inherited)]
        ]
    results = everything[len(inherited) :]
    if not results:
        pytest.skip(f"{path.parent.name} has inherited its requests and run none of its own yet")
    name = results[-1]["recipe_name"]
    assert name == path.parent.name
    _, recipe = load_recipe(name if name in METHODS else ROOT / "experiments" / f"{name}.yaml")
    assert {e["recipe_hash"] for e in results} == {recipe_hash(recipe)}, f"{name} now names another recipe"
