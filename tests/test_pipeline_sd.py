"""Any concept on any model: a free-text request on the Stable Diffusion catalogue goes through the
whole pipeline on a tiny random SD with a tiny random CLIP judge (both built here from configs),
against the same real servers as the world's pipeline tests (Prefect, MLflow, S3), with the SD
profile (profiles/stable-diffusion.yaml) shrunk to seconds and a gate set for a random model."""

from __future__ import annotations

import json
import subprocess

import pytest
import yaml

from cul.catalogue import Catalogue
from cul.models.tiny_clip import build_tiny_clip
from cul.models.tiny_sd import build_tiny_sd
from cul.unlearning.recipes import dump_recipe, load_recipe
from tests.support.project import PERMISSIVE_GATE, copy_project
from tests.support.servers import cul, s3_keys, use_s3_remote

pytestmark = pytest.mark.slow(seconds=60)  # one worker runs the module whole (conftest.WHOLE_MODULES)
MODEL = "cul-tiny-sd"
CONCEPTS = {c.name for c in Catalogue.load("sd-dfr10").concepts}


@pytest.fixture(scope="module")
def project(tmp_path_factory, servers):
    root = copy_project(tmp_path_factory.mktemp("sd-project"))
    build_tiny_sd(root / "models/tiny-sd")
    build_tiny_clip(root / "models/tiny-clip")
    _, recipe = load_recipe(root / "profiles/dfr_sd.yaml")
    tiny = recipe.model_copy(update=dict(steps=3, replay_steps=2, forget_batch=4, retain_batch=8))
    (root / "experiments/tiny_sd.yaml").write_text(dump_recipe(tiny, "tiny_sd: dfr_sd, a few steps"))
    p = yaml.safe_load((root / "profiles/stable-diffusion.yaml").read_text())
    p["paths"].update(base_model="models/tiny-sd", judge="models/tiny-clip")
    p["eval"].update(steps=2, images_per_concept=2, paraphrase_scenes=2, batch_size=128)
    p["pipeline"].update(
        method="experiments/tiny_sd.yaml",
        gate=PERMISSIVE_GATE,
        escalation={"max_attempts": 1},
        tracking={"experiment": "cul-tiny-sd", "registered_model": MODEL},
    )
    p["device"] = {"type": "cpu", "precision": "fp32", "gradient_checkpointing": True}
    (root / "params.yaml").write_text(yaml.safe_dump(p, sort_keys=False))
    git = ["git", "-c", "user.name=test", "-c", "user.email=test@localhost"]
    subprocess.run(git + ["add", "-A"], cwd=root, check=True)
    subprocess.run(git + ["commit", "-q", "-m", "the team's SD model and CLIP"], cwd=root, check=True)
    use_s3_remote(root, servers["CUL_S3_ENDPOINT"])
    return root


def test_a_free_text_request_on_tiny_sd_is_prepared_erased_judged_registered_versioned_and_recorded(project, servers):
    added = cul(project, servers, "request", "add", "  van GOGH ", "--note", "takedown 7")
    assert "forget Van Gogh style (style)" in added.stdout
    refused = cul(project, servers, "request", "add", "Picaso style", check=False)
    assert refused.returncode == 1 and "Nearest" in refused.stdout and "Picasso style" in refused.stdout
    cul(project, servers, "run", "--quiet")

    import mlflow

    client = mlflow.MlflowClient(tracking_uri=servers["MLFLOW_TRACKING_URI"])
    (v1,) = client.search_model_versions(f"name='{MODEL}'")
    assert v1.tags["concept"] == "Van Gogh style" and v1.tags["step"] == "s01" and v1.tags["gate"] == "accepted"
    assert client.get_registered_model(MODEL).aliases["champion"] == "1"

    spec = yaml.safe_load((project / "requests/steps.yaml").read_text())["steps"]["s01"]
    assert spec["catalogue"] == "sd-dfr10" and spec["parent"] == "models/tiny-sd"
    metrics = json.loads((project / "reports/steps/s01/metrics.json").read_text())
    assert set(metrics["per_concept"]) == CONCEPTS  # every concept of the catalogue, judged by the CLIP
    assert set(metrics["paraphrase_ua"]) == {
        "van_gogh_style",
        "van gogh",
        "vincent van gogh style",
        "swirling post-impressionist brushwork like starry night",
    }
    assert metrics["surrogates"] == ["oil painting style"] and metrics["fd_ratio"] > 0
    prompts = json.loads((project / "data/steps/s01/prompts.json").read_text())
    assert "Monet style" in prompts["neighbours"] and any("oil painting style" in m for m in prompts["mapped"])

    lock = yaml.safe_load((project / "dvc.lock").read_text())["stages"]["step@s01"]
    assert {d["path"] for d in lock["deps"]} >= {"models/tiny-sd", "models/tiny-clip", "catalogues"}
    model_md5 = next(o["md5"] for o in lock["outs"] if o["path"] == "models/steps/s01")
    assert f"dvc/files/md5/{model_md5[:2]}/{model_md5[2:]}" in s3_keys(servers["CUL_S3_ENDPOINT"], "dvc/")
    record = (project / "reports/audit/r001.md").read_text()
    assert "Van Gogh style" in record and "takedown 7" in record
    log = subprocess.run(["git", "log", "-1", "--format=%s"], cwd=project, capture_output=True, text=True).stdout
    assert "r001 forget Van Gogh style -> step s01" in log


def test_generate_eval_and_bench_take_the_sd_profile(project, servers):
    cul(project, servers, "generate", "Pikachu in Van Gogh style", "-o", "pikachu.png", "--steps", "2", "--n", "2")
    assert (project / "pikachu.png").stat().st_size > 0
    cul(project, servers, "eval", "--model", "models/steps/s01", "--forgotten", "van gogh", "--quiet")
    evaluated = json.loads((project / "models/steps/s01/eval/metrics.json").read_text())
    assert evaluated["forgotten"] == ["Van Gogh style"] and set(evaluated["per_concept"]) == CONCEPTS
    out = "reports/benchmark/tiny_sd"
    cul(
        project,
        servers,
        "bench",
        "--sequence",
        "benchmarks/sd-dfr10.yaml",
        "--method",
        "experiments/tiny_sd.yaml",
        "--max-steps",
        "1",
        "--out",
        out,
        "--quiet",
    )
    (step,) = json.loads((project / out / "results.json").read_text())
    assert step["concept"] == "Pikachu" and step["recipe_name"] == "tiny_sd" and 0 <= step["ua"] <= 1
