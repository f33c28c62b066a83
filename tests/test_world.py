import numpy as np
import pytest

from cul import world as w


def test_vocabulary_has_eight_concepts_per_kind_with_confusables():
    vocab = w.vocabulary()
    assert {k: len(v) for k, v in vocab.items()} == {"object": 8, "colour": 8, "texture": 8}
    names = [n for v in vocab.values() for n in v]
    assert len(set(names)) == 24
    for name, neighbours in w.CONFUSABLES.items():
        assert name in names and all(n in names and n != name for n in neighbours)
        # neighbours are of the same kind
        assert {w.concept(n).kind for n in neighbours} == {w.concept(name).kind}
    assert "ellipse" in w.CONFUSABLES["circle"] and "orange" in w.CONFUSABLES["red"]


def test_synonyms_resolve_and_are_unambiguous():
    words = [word for g in w.CONCEPTS.values() for c in g for word in c.words]
    assert len(words) == len(set(words)), "a word may name only one concept"
    assert w.resolve("Crimson").name == "red"
    assert w.resolve("donut").name == "ring"  # held-out paraphrase
    assert w.resolve("banana") is None
    with pytest.raises(KeyError, match="known concepts"):
        w.concept("banana")


def test_render_is_deterministic_by_seed_and_in_range():
    scene = w.Scene("circle", "red", "striped")
    a = w.render(scene, 32, np.random.default_rng(5))
    b = w.render(scene, 32, np.random.default_rng(5))
    c = w.render(scene, 32, np.random.default_rng(6))
    assert a.shape == (32, 32, 3) and a.dtype == np.float32
    assert 0 <= a.min() and a.max() <= 1
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_each_attribute_changes_the_image_where_it_should():
    rng = lambda: np.random.default_rng(0)  # noqa: E731
    base = w.render(w.Scene("square", "blue", "plain"), 32, rng())
    colour = w.render(w.Scene("square", "red", "plain"), 32, rng())
    shape_mask = np.abs(base - base[0, 0]).sum(-1) > 0.1
    # colour changes only shape pixels
    diff = np.abs(colour - base).sum(-1) > 0.05
    assert diff.any() and not (diff & ~shape_mask).any()
    # every pair of objects draws a different mask with the same jitter
    masks = {}
    for o in w.OBJECTS:
        img = w.render(w.Scene(o.name, "red", "plain"), 32, rng())
        masks[o.name] = np.abs(img - img[0, 0]).sum(-1) > 0.1
    for a in masks:
        for b in masks:
            if a < b:
                assert (masks[a] != masks[b]).sum() >= 20, (a, b)
    # textures differ on the background
    backs = [w.render(w.Scene("circle", "red", t.name), 32, rng())[:6, :6] for t in w.TEXTURES]
    for i in range(len(backs)):
        for j in range(i + 1, len(backs)):
            assert not np.allclose(backs[i], backs[j])


def test_batches_are_a_pure_function_of_seed_and_index():
    world = w.World(seed=3)
    x1, c1, s1 = world.batch(16, 7)
    x2, c2, s2 = w.World(seed=3).batch(16, 7)
    x3, _, _ = world.batch(16, 8)
    assert np.array_equal(x1, x2) and c1 == c2 and s1 == s2
    assert not np.array_equal(x1, x3)
    assert x1.shape == (16, 32, 32, 3)


def test_training_captions_never_use_held_out_words_or_templates():
    held = {word for g in w.CONCEPTS.values() for c in g for word in c.held_out}
    _, captions, scenes = w.World(seed=1).batch(512, 0)
    for cap in captions:
        assert not any(f" {h} " in f" {cap} " for h in held), cap
        assert "backdrop" not in cap
    assert "" in captions  # empty captions for classifier-free guidance
    _, probes, pscenes = w.World(seed=1, held_out=True).batch(64, 0)
    for cap, s in zip(probes, pscenes):
        assert "backdrop" in cap
        assert any(h in cap for h in w.concept(s.object).held_out)


def test_caption_grammar():
    assert w.caption("ellipse", "orange", "plain") == "an orange ellipse on a plain background"
    assert w.caption("circle", "red", "striped") == "a red circle on a striped background"


def test_all_scenes_covers_every_combination():
    scenes = w.all_scenes()
    assert len(scenes) == 512 == len(set(scenes))


def test_a_world_without_some_concepts_never_draws_them_and_keeps_the_rest():
    gone = {"ring", "green", "plain", "speckled"}
    world = w.World(seed=3, exclude=gone)
    _, captions, scenes = world.batch(1024, 0)
    shown = {n for s in scenes for n in (s.object, s.colour, s.texture)}
    assert not shown & gone
    assert shown == {c.name for g in w.CONCEPTS.values() for c in g} - gone  # every other concept still drawn
    for cap in captions:  # nor is any of their words written
        assert not any(w.resolve(word) and w.resolve(word).name in gone for word in cap.split()), cap


def test_without_exclusions_the_stream_is_the_one_the_base_model_was_trained_on():
    import hashlib

    images, captions, _ = w.World(seed=0).batch(64, 0)
    digest = hashlib.sha256(images.tobytes() + "\n".join(captions).encode()).hexdigest()[:16]
    assert digest == "8ec68c15d6810f0d"  # the stream's first batch as the code before `exclude` drew it


def test_a_world_refuses_an_unknown_concept_or_a_kind_left_empty():
    with pytest.raises(KeyError, match="unknown concept 'unicorn'"):
        w.World(exclude=["unicorn"])
    with pytest.raises(ValueError, match="leaves no texture to draw"):
        w.World(exclude=[t.name for t in w.TEXTURES])
