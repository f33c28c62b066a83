"""Earlier forgotten concepts replayed on theta_0's images of them too (`forgotten_images: both`)."""

from __future__ import annotations

import pytest
import torch

from cul.unlearning.batches import Batches, replay_sources, split_retain
from cul.unlearning.objectives.common import noised, pushed_target
from cul.unlearning.objectives.dfr import rehold_loss
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
    assert set(both) == set(dfr) | {"retain_gone_base"}
    for name in dfr:  # the same seeds: what the recipe without it draws is untouched
        assert torch.equal(dfr[name].x0, both[name].x0)
    gone = split_retain(after_red)[1]
    assert both["retain_gone_base"].prompts == gone
    assert drawn_by[tuple(gone)] is base  # red as theta_0 draws it, not as the teacher now does


def test_the_retain_batch_gives_them_their_share_with_their_mapped_captions(tiny_world_model, after_red):
    recipe = DFRRecipe(**SMALL, forgotten_images="both")
    batches = Batches(after_red, replay_sources(tiny_world_model, after_red, recipe), recipe)
    gone = split_retain(after_red)[1]
    mapped = dict(zip(gone, after_red.forgotten_mapped))
    seen = set()
    for seed in range(6):
        parts = {name: (rb, share) for name, rb, share in batches.retain(torch.Generator().manual_seed(seed))}
        n_gone = sum(len(parts[n][0].prompts) for n in ("retain", "retain_gone_base") if n in parts)
        assert n_gone == round(recipe.forgotten_share * recipe.retain_batch)  # the share, split between the two
        for name in ("retain", "retain_gone_base"):
            if name in parts:
                seen.add(name)
                rb = parts[name][0]
                assert rb.targets == [mapped[p] for p in rb.prompts]
    assert seen == {"retain", "retain_gone_base"}


def test_on_theta_0s_images_the_target_is_the_pushed_one_and_a_step_trains_on_it(tiny_world_model, after_red):
    recipe = DFRRecipe(**SMALL, forgotten_images="both")
    sources = replay_sources(tiny_world_model, after_red, recipe)
    rb = next(
        rb
        for seed in range(20)
        for name, rb, _ in Batches(after_red, sources, recipe).retain(torch.Generator().manual_seed(seed))
        if name == "retain_gone_base"
    )
    loss = rehold_loss(tiny_world_model, tiny_world_model, rb, torch.Generator().manual_seed(1), push=1.0)
    x_t, t, _ = noised(tiny_world_model, rb.x0, torch.Generator().manual_seed(1))
    with torch.no_grad():
        own = tiny_world_model.predict_noise(x_t, t, tiny_world_model.encode_prompts(rb.prompts))
    pushed = pushed_target(tiny_world_model, x_t, t, rb.prompts, rb.targets, 1.0)
    assert torch.allclose(loss, torch.nn.functional.mse_loss(own, pushed))
    assert loss > 0  # the model before the step still draws red where the pushed target does not

    result = unlearn(tiny_world_model, after_red, recipe, base=tiny_world_model)
    assert all(row["pres"] > 0 for row in result.history)


def test_off_by_default_out_of_the_hash_and_refused_without_mapped_targets():
    assert "forgotten_images" not in DFRRecipe().model_dump()  # recipes made before it keep their hashes
    assert recipe_hash(DFRRecipe(forgotten_images="both")) != recipe_hash(DFRRecipe())
    with pytest.raises(ValueError, match="forgotten_images: both needs"):
        DFRRecipe(forgotten_images="both", forgotten_target="previous")
