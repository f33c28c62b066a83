"""The yes/no VLM judge on a tiny random LLaVA built here (no download): it loads from a local
directory like Qwen2.5-VL would, its batched, padded answers equal one-at-a-time answers, and it
scores a catalogue evaluation of a tiny SD like the CLIP judge does."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cul.catalogue import Catalogue
from cul.models.tiny_vlm import build_tiny_vlm
from cul.vlm_judge import VlmJudge

SD = Catalogue.load("sd-dfr10")


@pytest.fixture(scope="module")
def judge(tmp_path_factory):
    return VlmJudge.from_pretrained(build_tiny_vlm(tmp_path_factory.mktemp("vlm")), SD)


def test_answers_per_category_and_features_for_fd(judge):
    images = torch.rand(3, 3, 16, 16)
    labels = judge.predict(images)
    assert set(labels) == set(SD.categories())
    for category, idx in labels.items():
        assert idx.shape == (3,) and 0 <= idx.min() and idx.max() < len(SD.of(category))
    features = judge.embed(images)
    assert features.shape[0] == 3 and np.isfinite(features).all() and features.std() > 0


def test_a_batch_of_padded_questions_gets_the_answers_each_gets_alone(judge):
    """Left padding: the last position is the answer's for every prompt, whatever its length."""
    images = torch.rand(2, 3, 16, 16)
    for concept in ("dog", "Van Gogh style"):  # prompts of different lengths pad differently
        together = judge.scores(images, concept, batch_size=2)
        alone = np.concatenate([judge.scores(images[i : i + 1], concept) for i in range(2)])
        assert together == pytest.approx(alone, abs=1e-4)
    assert not np.allclose(judge.scores(images, "dog"), judge.scores(images, "Van Gogh style"))
    labels = judge.predict(images)["object"]
    best = np.stack([judge.scores(images, e.name) for e in SD.of("object")], axis=1).argmax(1)
    assert (labels == best).all()


def test_a_catalogue_evaluation_of_a_tiny_sd_takes_the_vlm_judge(judge, tmp_path):
    from cul.catalogue_evaluation import CatalogueEvaluator
    from cul.models import load_model
    from cul.models.tiny_sd import build_tiny_sd

    model = load_model(build_tiny_sd(tmp_path / "sd"))
    evaluator = CatalogueEvaluator(SD, judge, images_per_concept=1, steps=2)
    evaluator.set_base(model)
    m = evaluator(model, ["Pikachu"])
    assert set(m.per_concept) == {c.name for c in SD.concepts} and m.fd is not None
