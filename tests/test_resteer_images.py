"""DFR's re-steering on the surrogate's images (`resteer_images`, `cul/unlearning/objectives/dfr.py`)."""

from __future__ import annotations

import torch

from cul.unlearning.batches import Batches, replay_sources
from cul.unlearning.objectives.common import noised, pushed_target
from cul.unlearning.objectives.dfr import resteer_images
from cul.unlearning.recipes import DFRRecipe, recipe_hash
from cul.unlearning.trainer import unlearn

SMALL = {"steps": 3, "forget_batch": 4, "retain_batch": 4, "replay_steps": 2, "replay_guidance": 1.0}


def test_both_draws_the_surrogates_images_beside_the_concepts_and_keeps_the_other_samples(tiny_world_model, after_red):
    dfr = replay_sources(tiny_world_model, after_red, DFRRecipe(**SMALL), keep_teacher=tiny_world_model)
    both_recipe = DFRRecipe(**SMALL, resteer_images="both")
    both = replay_sources(tiny_world_model, after_red, both_recipe, keep_teacher=tiny_world_model)
    assert set(dfr) == {"forget", "retain", "retain_base"} and set(both) == set(dfr) | {"mapped"}
    assert both["mapped"].prompts == after_red.mapped
    for name in dfr:  # the same seeds: the production recipe's samples are untouched
        assert torch.equal(dfr[name].x0, both[name].x0)

    batch = Batches(after_red, both, both_recipe).forget(torch.Generator().manual_seed(0))
    x0, forget, mapped, _ = resteer_images(batch)
    assert len(x0) == 2 * len(batch.forget) and forget == batch.forget * 2 and mapped == batch.mapped * 2
    assert torch.equal(x0[len(batch.forget) :], batch.x0_mapped)  # the surrogate's images, prompted as the concept


def test_mapped_alone_noises_only_the_surrogates_images(tiny_world_model, after_red):
    recipe = DFRRecipe(**SMALL, resteer_images="mapped")
    sources = replay_sources(tiny_world_model, after_red, recipe, keep_teacher=tiny_world_model)
    assert "forget" not in sources and "mapped" in sources
    batch = Batches(after_red, sources, recipe).forget(torch.Generator().manual_seed(0))
    x0, forget, _, _ = resteer_images(batch)
    assert batch.x0_forget is None and torch.equal(x0, batch.x0_mapped) and forget == batch.forget


def test_a_step_trains_with_it_and_the_production_recipe_keeps_its_hash(tiny_world_model, after_red):
    recipe = DFRRecipe(**SMALL, resteer_images="both")
    result = unlearn(tiny_world_model, after_red, recipe, base=tiny_world_model)
    assert all(row["unl"] > 0 for row in result.history)
    assert "resteer_images" not in DFRRecipe().model_dump()  # unset: out of the dump and the hash
    assert recipe_hash(recipe) != recipe_hash(recipe.model_copy(update={"resteer_images": None}))


def test_surrogate_push_0_targets_what_theta_0_predicts_for_the_mapped_prompt_on_its_images(
    tiny_world_model, after_red
):
    recipe = DFRRecipe(**SMALL, resteer_images="both", surrogate_push=0.0)
    sources = replay_sources(tiny_world_model, after_red, recipe, keep_teacher=tiny_world_model)
    batch = Batches(after_red, sources, recipe).forget(torch.Generator().manual_seed(0))
    x0, forget, mapped, pushes = resteer_images(batch, push=1.0, surrogate_push=0.0)
    n = len(batch.forget)
    assert isinstance(pushes, torch.Tensor) and pushes.flatten().tolist() == [1.0] * n + [0.0] * n
    x_t, t, _ = noised(tiny_world_model, x0, torch.Generator().manual_seed(1))
    target = pushed_target(tiny_world_model, x_t, t, forget, mapped, pushes)
    pushed = pushed_target(tiny_world_model, x_t, t, forget, mapped, 1.0)
    plain = pushed_target(tiny_world_model, x_t, t, forget, mapped, 0.0)
    assert torch.allclose(target[:n], pushed[:n]) and torch.allclose(target[n:], plain[n:])
    assert not torch.allclose(pushed[n:], plain[n:])  # the push does move the surrogate's half


def test_a_retry_on_the_surrogates_images_adds_only_their_samples(tiny_world_model, after_red):
    """The gate's escalation may switch a retry to `resteer_images: both` (`EscalationPolicy`); the
    request's samples were prepared for attempt 0, so only the surrogate's are drawn, as a
    preparation from scratch would draw them."""
    first = replay_sources(tiny_world_model, after_red, DFRRecipe(**SMALL), keep_teacher=tiny_world_model)
    both_recipe = DFRRecipe(**SMALL, resteer_images="both")
    retry = replay_sources(tiny_world_model, after_red, both_recipe, keep_teacher=tiny_world_model, have=first)
    fresh = replay_sources(tiny_world_model, after_red, both_recipe, keep_teacher=tiny_world_model)
    assert set(retry) == set(fresh) and all(retry[n] is first[n] for n in first)
    assert torch.equal(retry["mapped"].x0, fresh["mapped"].x0)
