"""Earlier forgotten concepts replayed on theta_0's images of them too (`forgotten_images: both`)."""

from __future__ import annotations

import pytest
import torch

from cul.unlearning.batches import Batches, replay_sources, split_retain
from cul.unlearning.objectives.common import noised, pushed_target
from cul.unlearning.objectives.dfr import resteer_loss
from cul.unlearning.recipes import DFRRecipe, recipe_hash
from cul.unlearning.replay import ReplayBuffer
from cul.unlearning.trainer import unlearn

SMALL = {"steps": 3, "forget_batch": 4, "retain_batch": 8, "replay_steps": 2, "replay_guidance": 1.0}


class Named:
    """A model under another name: the same predictions, told apart by identity."""

    def __init__(self, model) -> None:
        self.model = model

    def __getattr__(self, name):
        return getattr(self.model, name)


def test_both_draws_theta_0s_samples_of_the_forgotten_prompts_and_leaves_the_other_samples(
    tiny_world_model, after_red, monkeypatch
):
    base = Named(tiny_world_model)
    drawn_by: dict[tuple[str, ...], object] = {}
    generate = ReplayBuffer.generate.__func__

    def spy(cls, model, prompts, *args):
        drawn_by[tuple(prompts)] = model
        return generate(cls, model, prompts, *args)

    monkeypatch.setattr(ReplayBuffer, "generate", classmethod(spy))
    dfr = replay_sources(tiny_world_model, after_red, DFRRecipe(**SMALL), keep_teacher=base)
    both = replay_sources(tiny_world_model, after_red, DFRRecipe(**SMALL, forgotten_images="both"), keep_teacher=base)
    assert set(both) == set(dfr) | {"forgotten_base"}
    for name in dfr:  # the same seeds: what the recipe without it draws is untouched
        assert torch.equal(dfr[name].x0, both[name].x0)
    gone = split_retain(after_red)[1]
    assert both["forgotten_base"].prompts == gone
    assert drawn_by[tuple(gone)] is base  # red as theta_0 draws it, not as the teacher now does


def test_a_retry_on_the_surrogates_images_draws_what_a_preparation_from_scratch_would(tiny_world_model, after_red):
    """The gate's escalation may add `resteer_images: both` to a retry; the samples of attempt 0 are
    kept and the surrogate's drawn, each with the seed it has when everything is drawn at once."""
    recipe = DFRRecipe(**SMALL, forgotten_images="both")
    first = replay_sources(tiny_world_model, after_red, recipe)
    escalated = recipe.model_copy(update={"resteer_images": "both"})
    retry = replay_sources(tiny_world_model, after_red, escalated, have=first)
    fresh = replay_sources(tiny_world_model, after_red, escalated)
    assert set(retry) == set(fresh) == set(first) | {"mapped"}
    for name in fresh:
        assert torch.equal(retry[name].x0, fresh[name].x0), name


def test_the_replay_is_as_without_it_and_l_rehold_has_a_forget_batch_with_mapped_captions(tiny_world_model, after_red):
    recipe = DFRRecipe(**SMALL, forgotten_images="both")
    sources = replay_sources(tiny_world_model, after_red, recipe)
    batches = Batches(after_red, sources, recipe)
    plain = Batches(after_red, {k: v for k, v in sources.items() if k != "forgotten_base"}, DFRRecipe(**SMALL))
    assert batches.pool == plain.pool and batches.fixed_gone == plain.fixed_gone and not plain.has_rehold
    rb = batches.rehold(torch.Generator().manual_seed(0))
    mapped = dict(zip(split_retain(after_red)[1], after_red.forgotten_mapped))
    assert len(rb.forget) == recipe.forget_batch and rb.mapped == [mapped[p] for p in rb.forget]
    assert rb.x0_mapped is None and len(rb.x0_forget) == recipe.forget_batch


def test_l_rehold_is_l_unls_pushed_target_on_theta_0s_images_and_a_step_trains_on_it(tiny_world_model, after_red):
    recipe = DFRRecipe(**SMALL, forgotten_images="both")
    rb = Batches(after_red, replay_sources(tiny_world_model, after_red, recipe), recipe).rehold(
        torch.Generator().manual_seed(0)
    )
    loss = resteer_loss(tiny_world_model, tiny_world_model, rb, torch.Generator().manual_seed(1), 1000, push=1.0)
    x_t, t, _ = noised(tiny_world_model, rb.x0_forget, torch.Generator().manual_seed(1), 1000)
    with torch.no_grad():
        own = tiny_world_model.predict_noise(x_t, t, tiny_world_model.encode_prompts(rb.forget))
    pushed = pushed_target(tiny_world_model, x_t, t, rb.forget, rb.mapped, 1.0)
    assert torch.allclose(loss, torch.nn.functional.mse_loss(own, pushed))
    assert loss > 0  # the model before the step still draws red where the pushed target does not

    result = unlearn(tiny_world_model, after_red, recipe, base=tiny_world_model)
    assert all(row["rehold"] > 0 for row in result.history)


def test_off_by_default_out_of_the_hash_and_refused_where_it_cannot_work():
    assert "forgotten_images" not in DFRRecipe().model_dump()  # recipes made before it keep their hashes
    assert recipe_hash(DFRRecipe(forgotten_images="both")) != recipe_hash(DFRRecipe())
    with pytest.raises(ValueError, match="forgotten_images: both needs"):
        DFRRecipe(forgotten_images="both", forgotten_target="previous")
    with pytest.raises(ValueError, match="with projection"):
        DFRRecipe(forgotten_images="both", addons={"projection": True})
