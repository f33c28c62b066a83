"""Erasure that holds after fine-tuning (meta-unlearning, `cul/unlearning/objectives/relearning.py`)."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError

from cul.unlearning.batches import Batches, replay_sources
from cul.unlearning.objectives.dfr import DFR
from cul.unlearning.objectives.relearning import RelearningAdversary, Shifted
from cul.unlearning.recipes import DFRRecipe, Relearning, recipe_hash
from cul.unlearning.trainer import unlearn

SMALL = Relearning(every=2, steps=2, batch=4)
RECIPE = DFRRecipe(steps=3, forget_batch=4, retain_batch=4, replay_steps=2, replay_guidance=1.0, relearning=SMALL)


def test_the_shifted_model_is_the_model_at_the_moved_weights_and_its_gradient_reaches_the_own(tiny_world_model):
    """L(theta + sg[Delta]): the value and the gradient in theta are those of a model whose weights
    are theta + Delta (MAML's first-order step)."""
    student = tiny_world_model.copy()
    student.unet.requires_grad_(True)
    gen = torch.Generator().manual_seed(0)
    delta = {n: 0.01 * torch.randn(p.shape, generator=gen) for n, p in student.unet.named_parameters()}
    moved = tiny_world_model.copy()
    with torch.no_grad():
        for n, p in moved.unet.named_parameters():
            p.add_(delta[n])
    moved.unet.requires_grad_(True)
    x_t, t = torch.randn(2, 3, 16, 16, generator=gen), torch.tensor([10, 500])
    context = student.encode_prompts(["a red circle", "a blue square"])
    target = torch.randn(2, 3, 16, 16, generator=gen)

    F.mse_loss(Shifted(student, delta).predict_noise(x_t, t, context), target).backward()
    F.mse_loss(moved.predict_noise(x_t, t, context), target).backward()
    pairs = list(zip(student.unet.parameters(), moved.unet.parameters(), strict=True))
    assert all(torch.allclose(a.grad, b.grad, atol=1e-6) for a, b in pairs if b.grad is not None)
    assert any(b.grad.abs().sum() > 0 for _, b in pairs if b.grad is not None)
    with torch.no_grad():
        assert not torch.allclose(student.predict_noise(x_t, t, context), moved.predict_noise(x_t, t, context))


def test_the_simulated_fine_tuning_moves_a_copy_on_the_neighbours_images_only(tiny_world_model, after_red):
    sources = replay_sources(tiny_world_model, after_red, RECIPE, keep_teacher=tiny_world_model)
    batches = Batches(after_red, sources, RECIPE)
    neighbours = set(after_red.retain["neighbour"])
    gen = torch.Generator().manual_seed(0)
    assert set(batches.relearn(gen, "neighbour", 32).prompts) <= neighbours
    assert set(batches.relearn(gen, "retain", 64).prompts) - neighbours  # every kept caption

    student = tiny_world_model.copy()
    before = [p.detach().clone() for p in student.unet.parameters()]
    adversary = RelearningAdversary(SMALL)
    adversary.simulate(student, batches, gen)
    assert adversary.delta is not None and any(d.abs().sum() > 0 for d in adversary.delta.values())
    assert all(torch.equal(a, b) for a, b in zip(before, student.unet.parameters(), strict=True))


def test_dfr_with_relearning_trains_its_term_and_production_is_unchanged(tiny_world_model, after_red):
    result = unlearn(tiny_world_model, after_red, RECIPE, base=tiny_world_model)
    assert all("relearn" in row and row["relearn"] > 0 for row in result.history)
    assert "relearning" not in DFRRecipe().model_dump()  # unset: out of the dump and the hash
    assert recipe_hash(RECIPE) != recipe_hash(RECIPE.model_copy(update={"relearning": None}))


def test_both_data_draws_half_from_the_neighbours_and_the_earlier_concepts_come_with_their_targets(
    tiny_world_model, after_red
):
    sources = replay_sources(tiny_world_model, after_red, RECIPE, keep_teacher=tiny_world_model)
    batches = Batches(after_red, sources, RECIPE)
    neighbours = set(after_red.retain["neighbour"])
    gen = torch.Generator().manual_seed(0)
    both = batches.relearn(gen, "both", 64).prompts
    assert set(both[:32]) <= neighbours and set(both[32:]) - neighbours and len(both) == 64

    gone = batches.forgotten(gen)  # forgotten_share 0.25 of retain_batch 4: one of red's captions
    mapped = dict(zip(after_red.retain["forgotten"], after_red.forgotten_mapped, strict=True))
    assert gone is not None and len(gone.prompts) == 1 and gone.x0.shape[0] == 1
    assert gone.targets == [mapped[p] for p in gone.prompts]
    first = replace(after_red, retain={g: ps for g, ps in after_red.retain.items() if g != "forgotten"})
    first = replace(first, forgotten_mapped=[])
    alone = Batches(first, replay_sources(tiny_world_model, first, RECIPE, keep_teacher=tiny_world_model), RECIPE)
    assert alone.forgotten(gen) is None  # a first request has no earlier concept to hold


def test_the_earlier_concepts_images_keep_their_captions_with_several_copies(tiny_world_model, after_red):
    two = RECIPE.model_copy(update={"replay_copies": 2, "retain_batch": 16})
    sources = replay_sources(tiny_world_model, after_red, two, keep_teacher=tiny_world_model)
    gone = Batches(after_red, sources, two).forgotten(torch.Generator().manual_seed(0))
    src = sources["retain"]
    assert len(src.prompts) == 2 * len(after_red.retain["forgotten"])  # the buffer lists each copy
    rows = {j: src.take([j])[0] for j in range(len(src.prompts))}
    assert gone is not None and len(gone.prompts) == 4
    for prompt, x in zip(gone.prompts, gone.x0, strict=True):
        assert any(torch.equal(x, img) and src.prompts[j] == prompt for j, img in rows.items())

    both = two.model_copy(update={"forgotten_images": "both", "forget_batch": 16})
    sources = replay_sources(tiny_world_model, after_red, both, keep_teacher=tiny_world_model)
    again = Batches(after_red, sources, both).rehold(torch.Generator().manual_seed(0))
    src = sources["forgotten_base"]
    for prompt, x in zip(again.forget, again.x0_forget, strict=True):
        assert any(torch.equal(x, src.take([j])[0]) and src.prompts[j] == prompt for j in range(len(src.prompts)))


def test_holding_every_concept_asks_the_earlier_ones_terms_at_the_moved_weights(tiny_world_model, after_red):
    every = RECIPE.model_copy(update={"relearning": SMALL.model_copy(update={"hold": "all", "data": "both"})})
    objective = DFR(every, tiny_world_model, tiny_world_model, None)
    assert objective.weights["relearn_gone"] == every.l_pres and objective.weights["relearn"] == every.l_unl
    batches = Batches(
        after_red, replay_sources(tiny_world_model, after_red, every, keep_teacher=tiny_world_model), every
    )
    student = tiny_world_model.copy()
    delta = {n: 0.05 * torch.randn_like(p) for n, p in student.unet.named_parameters()}
    moved = tiny_world_model.copy()
    with torch.no_grad():
        for n, p in moved.unet.named_parameters():
            p.add_(delta[n])

    def at(model):
        return objective.held(model, batches, torch.Generator().manual_seed(3))

    shifted, expected, own = at(Shifted(student, delta)), at(moved), at(student)
    assert set(shifted) == {"relearn", "relearn_gone"}  # no forgotten_base source: no L_rehold
    for name in shifted:
        assert torch.allclose(shifted[name], expected[name], atol=1e-6)
        assert not torch.allclose(shifted[name], own[name])

    result = unlearn(tiny_world_model, after_red, every, base=tiny_world_model)
    assert all(row["relearn"] > 0 and row["relearn_gone"] > 0 for row in result.history)
    assert result.relearning_attacks == ["circle", "circle"]  # 3 steps, a simulation every 2: the request's
    assert "hold" not in SMALL.model_dump()  # unset: dfr_relearn keeps its hash
    assert recipe_hash(every) != recipe_hash(RECIPE)


def test_relearning_needs_theta_0s_samples_of_the_kept_captions():
    with pytest.raises(ValidationError, match="relearning needs retain_teacher: base"):
        DFRRecipe(retain_teacher="previous", forgotten_share=None, forgotten_target="previous", relearning=SMALL)
    with pytest.raises(ValidationError, match="l_pres > 0"):
        DFRRecipe(l_pres=0, relearning=SMALL)


def test_earlier_concepts_attacks_fine_tune_on_their_own_neighbours(tiny_world_model, after_red, tmp_path):
    """`neighbours_of: all`: a step's first simulation is the request's attack, later ones draw a
    forgotten concept and fine-tune on the kept captions naming its kept neighbours."""
    from cul.unlearning.batches import check_prompts
    from cul.unlearning.preparation import earlier_neighbour_captions
    from cul.unlearning.prompts import PromptSet
    from cul.world import CATALOGUE

    each = SMALL.model_copy(update={"hold": "all", "neighbours_of": "all"})
    recipe = RECIPE.model_copy(update={"relearning": each, "replay_copies": 2})
    with pytest.raises(ValueError, match="earlier forgotten concepts' neighbours"):
        check_prompts(after_red, recipe)  # a prompt set prepared without them

    ps = replace(after_red, neighbour_captions=earlier_neighbour_captions(CATALOGUE, after_red, ["red"]))
    reds = ps.neighbour_captions["red"]  # red's neighbours are orange and pink
    assert reds and all({"orange", "pink"} & set(CATALOGUE.named_in(p)) for p in reds)
    assert set(reds) - set(ps.retain["neighbour"]) and not set(reds) & set(ps.retain["forgotten"])
    check_prompts(ps, recipe)
    assert PromptSet.load(ps.save(tmp_path / "p.json")) == ps
    assert "neighbour_captions" not in after_red.save(tmp_path / "q.json").read_text()  # unset: same bytes

    sources = replay_sources(tiny_world_model, ps, recipe, keep_teacher=tiny_world_model)
    batches = Batches(ps, sources, recipe)
    kept = [p for g in ("neighbour", "retained", "unrelated") for p in ps.retain[g]]
    drawn = batches.relearn(torch.Generator().manual_seed(0), "neighbour", 32, about="red")
    assert set(drawn.prompts) <= set(reds)
    for prompt, x in zip(drawn.prompts, drawn.x0, strict=True):  # two copies a caption: the row is its own
        i = kept.index(prompt)
        assert any(torch.equal(x, sources["retain_base"].take([2 * i + j])[0]) for j in range(2))
    old = torch.Generator().manual_seed(5)  # the request's neighbours: the draws made before the option
    mine = batches.relearn(torch.Generator().manual_seed(5), "neighbour", 8).prompts
    n = len(ps.retain["neighbour"])
    assert mine == [kept[i // 2] for i in torch.randint(0, 2 * n, (8,), generator=old).tolist()]

    asked = []
    relearn = batches.relearn
    batches.relearn = lambda gen, data, n, about=None: asked.append(about) or relearn(gen, data, n, about)
    adversary = RelearningAdversary(each)
    for _ in range(8):
        adversary.simulate(tiny_world_model, batches, torch.Generator().manual_seed(len(asked)))
    calls = [asked[i * each.steps] for i in range(8)]  # each simulation's first batch
    assert asked == [a for a in calls for _ in range(each.steps)]
    assert calls[0] is None and "red" in calls and None in calls[1:]
    assert adversary.simulated == [a or "circle" for a in calls]
    request_only = RelearningAdversary(SMALL.model_copy(update={"hold": "all"}))
    for _ in range(3):
        request_only.simulate(tiny_world_model, batches, torch.Generator().manual_seed(0))
    assert request_only.simulated == ["circle"] * 3

    with pytest.raises(ValidationError, match="needs hold 'all'"):
        Relearning(neighbours_of="all")
    with pytest.raises(ValidationError, match="data 'retain' takes none"):
        Relearning(neighbours_of="all", hold="all", data="retain")
    assert "neighbours_of" not in SMALL.model_dump()  # unset: earlier relearning recipes keep their hashes


def test_preparation_records_each_earlier_concepts_relearning_captions_on_any_catalogue():
    """Both preparations fill `neighbour_captions` for a recipe that simulates earlier attacks, a
    wording inside a longer one names only the longer, and a concept whose neighbours are all
    forgotten takes the first kept concept of its category, as the attack does."""
    from cul.catalogue import Catalogue
    from cul.unlearning.preparation import prepare_catalogue_step
    from cul.unlearning.request import Request

    sd = Catalogue.load("sd-dfr10")
    assert sd.named_in("Cartoon mouse in a cartoon style") == ["cartoon mouse", "cartoon style"]
    assert sd.named_in("a photo of spider-man") == ["Spider-Man"]
    each = RECIPE.model_copy(update={"relearning": SMALL.model_copy(update={"hold": "all", "neighbours_of": "all"})})
    request = Request(concept="Pikachu", surrogates=["Mickey Mouse"])
    ps = prepare_catalogue_step(None, sd, request, ["anime style", "cartoon style"], each, seed=0)
    # anime style's one neighbour (cartoon style) is forgotten: the first kept style instead
    first_style = next(c.name for c in sd.of("style") if c.name not in {"anime style", "cartoon style"})
    for f, near in (("cartoon style", {"comic book style"}), ("anime style", {first_style})):
        assert ps.neighbour_captions[f] and all(near & set(sd.named_in(p)) for p in ps.neighbour_captions[f])
    assert not prepare_catalogue_step(None, sd, request, ["anime style"], RECIPE, seed=0).neighbour_captions
