"""The committed base model really draws its concepts (a sample of the full evaluation)."""

import json

import pytest

from cul.evaluation import generate_scenes, judge_images
from cul.world import all_scenes


@pytest.mark.slow(seconds=50)
def test_committed_base_model_draws_what_it_is_told(base_model, judge):
    scenes = all_scenes()[::11]  # 47 scenes spread over every object, colour and texture
    images = generate_scenes(base_model, scenes, seed=99)
    acc = judge_images(judge, images, scenes).accuracy_per_kind()
    assert min(acc.values()) >= 0.8, acc


def test_committed_base_model_has_a_provenance_record(root):
    record = json.loads((root / "models" / "base" / "record.json").read_text())
    assert record["steps"] == record["config"]["steps"]
    assert record["train_seconds"] > 0 and record["history"]


def test_base_report_meets_the_targets(root):
    m = json.loads((root / "reports" / "base" / "metrics.json").read_text())
    assert m["n_images"] == 512
    assert min(m["accuracy"].values()) >= 0.9, m["accuracy"]
    assert m["worst_concept_accuracy"] >= 0.8, m["per_concept"]
    assert min(m["judge_held_out_accuracy"].values()) >= 0.98
