"""Erasure against textual inversion (STEREO's search stage, `cul/unlearning/objectives/inversion.py`)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError

from cul.unlearning.objectives.common import noised
from cul.unlearning.objectives.inversion import InversionAdversary, concepts, mention
from cul.unlearning.prompts import build_prompt_set
from cul.unlearning.recipes import DFRRecipe, Inversion, recipe_hash
from cul.unlearning.trainer import unlearn

SMALL = Inversion(every=2, steps=3, images=4, batch=2)


def test_a_mention_is_the_run_of_words_the_mapped_caption_replaces():
    assert mention("a red circle over dots", "a red square over dots") == ("circle", "square", ("a red ", " over dots"))
    assert mention("Van Gogh style, a field", "Monet style, a field") == ("Van Gogh", "Monet", ("", " style, a field"))
    assert mention("green circle, dots", "green square, dots") == ("circle", "square", ("green ", ", dots"))
    assert mention("Van Gogh style, a field", " style, a field") == ("Van Gogh", "", ("", " style, a field"))
    assert mention("a red circle over dots", "a blue circle over stripes") is None  # two runs differ
    assert mention("a red circle", "a red circle") is None


def test_the_search_covers_the_request_and_every_earlier_forgotten_concept(tiny_world_model, after_red):
    adversary = InversionAdversary(SMALL, tiny_world_model, seed=0, replay_steps=2, replay_guidance=1.0)
    adversary.prepare(after_red)
    assert adversary.found[0].concept == "circle" and {m.concept for m in adversary.found[1:]} <= {"red", "crimson"}
    for m in adversary.found:
        assert len(m.x0) == SMALL.images
        soft = adversary.soft(m, list(range(len(m.captions))))
        assert all(s.count(tiny_world_model.text.placeholder) == 1 for s in soft)
        assert all(c.startswith(h) and c.endswith(t) for c, (h, t) in zip(m.captions, m.templates, strict=True))


def test_the_requests_concept_is_one_word_and_each_earlier_mention_one_more(after_red):
    found = concepts(after_red)
    assert len(found["circle"]) == len(after_red.forget)  # one word for the request's concept, synonyms and all
    assert {row[0] for row in found["circle"]} == {"circle", "disc"}
    earlier = {name: rows for name, rows in found.items() if name != "circle"}
    assert set(earlier) <= {"red", "crimson"} and sum(map(len, earlier.values())) == len(after_red.retain["forgotten"])


def test_two_earlier_concepts_with_one_surrogate_are_both_searched(text_encoder):
    ps = build_prompt_set(
        "circle",
        surrogates=["square"],
        forgotten_before=["red", "pink"],
        forgotten_surrogates={"red": "blue", "pink": "blue"},
        n_forget=4,
        n_per_retained=1,
        n_per_neighbour=1,
        n_per_forgotten=4,
        text_encoder=text_encoder,
    )
    found = {row[0] for name, rows in concepts(ps).items() if name != "circle" for row in rows}
    assert found & {"red", "crimson"} and found & {"pink"}


def test_a_prompt_set_without_the_forgotten_captions_mapped_twins_is_refused(after_red):
    from dataclasses import replace

    with pytest.raises(ValueError, match="forgotten_target: mapped"):
        concepts(replace(after_red, forgotten_mapped=[]))


def test_the_search_finds_a_word_under_which_the_student_denoises_the_concept_better(tiny_world_model, after_red):
    """Textual inversion against the student lowers its denoising loss on theta_0's images of the
    concept, measured on draws the search never saw."""
    adversary = InversionAdversary(
        Inversion(steps=30, images=8, batch=4), tiny_world_model, seed=0, replay_steps=2, replay_guidance=1.0
    )
    adversary.prepare(after_red)
    m = next(m for m in adversary.found if m.concept == "circle")
    student = tiny_world_model.copy()

    def held_out_loss(v: torch.Tensor) -> float:
        gen = torch.Generator().manual_seed(1234)
        with torch.no_grad():
            losses = []
            for _ in range(8):
                rows = torch.randint(0, len(m.x0), (4,), generator=gen).tolist()
                x_t, t, noise = noised(student, m.x0[rows], gen)
                ctx = student.text.encode_soft(adversary.soft(m, rows), v)
                losses.append(F.mse_loss(student.predict_noise(x_t, t, ctx), noise).item())
        return sum(losses) / len(losses)

    start, weights = m.v.clone(), [p.detach().clone() for p in student.unet.parameters()]
    adversary.search(student, torch.Generator().manual_seed(0))
    assert not torch.equal(m.v, start)
    assert held_out_loss(m.v) < held_out_loss(start)
    assert all(torch.equal(w, p) for w, p in zip(weights, student.unet.parameters(), strict=True))  # only v moves


def test_dfr_with_inversion_trains_its_term_and_production_is_unchanged(tiny_world_model, after_red):
    recipe = DFRRecipe(steps=3, forget_batch=4, retain_batch=4, replay_steps=2, replay_guidance=1.0, inversion=SMALL)
    result = unlearn(tiny_world_model, after_red, recipe, base=tiny_world_model)
    assert all("inv" in row and row["inv"] > 0 for row in result.history)
    assert "inversion" not in DFRRecipe().model_dump()  # unset: out of the dump and the hash
    assert recipe_hash(recipe) != recipe_hash(recipe.model_copy(update={"inversion": None}))


def test_inversion_needs_the_base_model_as_teacher():
    with pytest.raises(ValidationError, match="inversion needs retain_teacher: base"):
        DFRRecipe(retain_teacher="previous", forgotten_share=None, forgotten_target="previous", inversion=SMALL)
    with pytest.raises(ValidationError, match="forgotten_target: mapped"):
        DFRRecipe(forgotten_target="previous", inversion=SMALL)


def test_random_words_take_their_share_of_the_batch_and_a_batch_of_only_random_words_searches_nothing(
    tiny_world_model, after_red
):
    """random_share: part of each L_inv batch puts a fresh random word where v* goes; at 1 the search
    never runs (v* is never used), at 0.5 it does, and either way the term trains the student."""
    for share, searches in ((1.0, False), (0.5, True)):
        spec = SMALL.model_copy(update={"every": 1, "random_share": share})
        adversary = InversionAdversary(spec, tiny_world_model, seed=0, replay_steps=2, replay_guidance=1.0)
        adversary.prepare(after_red)
        start = [m.v.clone() for m in adversary.found]
        student = tiny_world_model.copy()
        student.unet.requires_grad_(True)
        losses = [adversary.loss(student, torch.Generator().manual_seed(k), 1000, 1.0) for k in range(2)]
        assert all(torch.isfinite(x) and x.requires_grad for x in losses)
        moved = [not torch.equal(m.v, s) for m, s in zip(adversary.found, start, strict=True)]
        assert any(moved) == searches


def test_recipes_made_before_random_words_keep_their_hashes():
    recipe = DFRRecipe(inversion=SMALL)
    assert "random_share" not in recipe.model_dump()["inversion"]
    assert "random_share" not in recipe.model_dump(mode="json")["inversion"]  # what recipe_hash reads
    with_share = recipe.model_copy(update={"inversion": SMALL.model_copy(update={"random_share": 0.5})})
    assert with_share.model_dump()["inversion"]["random_share"] == 0.5
    assert recipe_hash(with_share) != recipe_hash(recipe)


def test_random_words_follow_the_embedding_tables_statistics_and_their_seed(text_encoder):
    from cul.text import random_words

    stats = text_encoder.word_statistics()
    table = text_encoder.word_embeddings().detach()
    words = random_words(stats, 4000, torch.Generator().manual_seed(0))
    assert words.shape == (4000, table.shape[1])
    assert torch.allclose(words.mean(0), table.mean(0), atol=0.1 * float(table.std(0).max()))
    assert torch.allclose(words.std(0), table.std(0), rtol=0.1)
    again = random_words(stats, 4000, torch.Generator().manual_seed(0))
    assert torch.equal(words, again) and not torch.equal(words, random_words(stats, 4000, torch.Generator()))


def test_the_search_starts_from_the_mention_or_from_the_embedding_tables_mean(tiny_world_model, after_red):
    """start: mention puts each concept's first v at its caption's words, start: mean at a word that
    names nothing (the table's mean) for every concept, start: both gives each concept one word from
    each; only a set start enters the recipe's hash."""
    text = tiny_world_model.text
    table = text.word_embeddings().detach()
    starts = {}
    for start in ("mention", "mean", "both"):
        adversary = InversionAdversary(
            SMALL.model_copy(update={"start": start}), tiny_world_model, seed=0, replay_steps=2, replay_guidance=1.0
        )
        adversary.prepare(after_red)
        starts[start] = {m.concept: m.v for m in adversary.found}
    first = concepts(after_red)["circle"][0][0]  # the first forget caption's word for circle (a synonym maybe)
    circle = table[torch.tensor(text.tokenizer(first, add_special_tokens=False).input_ids)].mean(0, keepdim=True)
    assert torch.allclose(starts["mention"]["circle"], circle)
    assert all(torch.allclose(v, table.mean(0, keepdim=True)) for v in starts["mean"].values())
    assert not torch.allclose(starts["mention"]["circle"], starts["mean"]["circle"])
    # both: each concept twice, the mention's word and a word from the mean, erased apart
    assert starts["both"].keys() == starts["mention"].keys() | {f"{c} (from the mean)" for c in starts["mean"]}
    assert torch.allclose(starts["both"]["circle"], circle)
    assert torch.allclose(starts["both"]["circle (from the mean)"], table.mean(0, keepdim=True))
    recipe = DFRRecipe(inversion=SMALL)
    assert "start" not in recipe.model_dump(mode="json")["inversion"]
    assert recipe_hash(recipe.model_copy(update={"inversion": SMALL.model_copy(update={"start": "mention"})})) == (
        recipe_hash(recipe)
    )
    assert recipe_hash(recipe.model_copy(update={"inversion": SMALL.model_copy(update={"start": "mean"})})) != (
        recipe_hash(recipe)
    )
