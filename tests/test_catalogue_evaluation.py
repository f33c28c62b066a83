"""Unlearning metrics over any catalogue (`CatalogueEvaluator`): on the world with its committed
model and judge they measure what the model draws; on a tiny random Stable Diffusion with a tiny
CLIP judge the same code runs end to end."""

from __future__ import annotations

import pytest

from cul.catalogue import Catalogue
from cul.catalogue_evaluation import CatalogueEvaluator


@pytest.mark.slow(seconds=55)
def test_on_the_world_the_base_model_draws_each_concept_and_a_forgotten_one_scores_as_kept(base_model, judge):
    world = Catalogue.load("world")
    evaluator = CatalogueEvaluator(world, judge, images_per_concept=2, steps=10)
    evaluator.set_base(base_model)
    m = evaluator(base_model, ["red"])
    assert set(m.per_concept) == {c.name for c in world.concepts}
    assert m.ra_all >= 0.9 and m.ra_in >= 0.9 and m.ra_cross >= 0.9  # the base model draws what it is told
    assert m.ua <= 0.25  # nothing was unlearned: red is still drawn
    assert m.fd_ratio == 1.0 and m.base.ua == m.ua  # the base model against itself: the same draws


def test_on_a_tiny_stable_diffusion_with_a_clip_judge_every_concept_is_scored(tmp_path):
    from cul.clip_judge import ClipJudge
    from cul.models import load_model
    from cul.models.tiny_clip import build_tiny_clip
    from cul.models.tiny_sd import build_tiny_sd

    sd = Catalogue.load("sd-dfr10")
    model = load_model(build_tiny_sd(tmp_path / "sd"))
    judge = ClipJudge.from_pretrained(build_tiny_clip(tmp_path / "clip"), sd)
    evaluator = CatalogueEvaluator(sd, judge, images_per_concept=2, steps=2)
    with pytest.raises(ValueError, match="set_base"):
        evaluator(model, [])
    evaluator.set_base(model)
    m = evaluator(model, ["Pikachu", "Van Gogh style"])
    assert set(m.per_concept) == {c.name for c in sd.concepts}
    assert m.ua == pytest.approx(1 - (m.per_concept["Pikachu"] + m.per_concept["Van Gogh style"]) / 2)
    assert m.ra_neighbour is not None and m.fd is not None and m.fd_ratio == 1.0
    assert [c for c, _ in evaluator.prompts([])].count("Pikachu") == 2
