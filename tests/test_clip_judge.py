"""The zero-shot CLIP judge on a tiny random CLIP built from a config (no download): it loads from
a local directory, answers per catalogue category as the world's judge does, and its answer is
CLIP's zero-shot rule computed independently here."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cul.catalogue import Catalogue
from cul.clip_judge import ClipJudge
from cul.models.tiny_clip import build_tiny_clip

SD = Catalogue.load("sd-dfr10")


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    return build_tiny_clip(tmp_path_factory.mktemp("clip"))


def test_the_judge_loads_from_a_local_directory_and_answers_per_category(clip_dir):
    judge = ClipJudge.from_pretrained(clip_dir, SD)
    images = torch.rand(5, 3, 40, 24)  # any size: resized to CLIP's side
    labels = judge.predict(images)
    assert list(labels) == ["character", "person", "object", "style"]
    for category, idx in labels.items():
        assert idx.shape == (5,) and idx.min() >= 0 and idx.max() < len(SD.of(category))
    assert judge.embed(images).shape == (5, 16)
    with pytest.raises(FileNotFoundError, match="not a CLIP directory"):
        ClipJudge.from_pretrained(clip_dir / "missing", SD)


def test_each_label_is_the_concept_whose_mean_prompt_embedding_is_nearest(clip_dir):
    from transformers import CLIPModel, CLIPTokenizer

    judge = ClipJudge.from_pretrained(clip_dir, SD)
    model, tok = CLIPModel.from_pretrained(clip_dir), CLIPTokenizer.from_pretrained(clip_dir)
    images = torch.rand(6, 3, 32, 32)
    mean, std = torch.tensor([0.48145466, 0.4578275, 0.40821073]), torch.tensor([0.26862954, 0.26130258, 0.27577711])
    with torch.no_grad():
        img = model.get_image_features(pixel_values=(images - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1))
        img = torch.nn.functional.normalize(getattr(img, "pooler_output", img), dim=-1)
        for category, got in judge.predict(images).items():
            rows = []
            for entry in SD.of(category):
                templates = [t for t in SD.templates["train"] + SD.templates["held_out"] if "{" + category + "}" in t]
                prompts = [t.format(**{category: entry.name}) for t in templates]  # one slot each in this catalogue
                txt = model.get_text_features(**tok(prompts, padding=True, return_tensors="pt"))
                txt = torch.nn.functional.normalize(getattr(txt, "pooler_output", txt), dim=-1).mean(0)
                rows.append(torch.nn.functional.normalize(txt, dim=-1))
            expected = (img @ torch.stack(rows).T).argmax(1).numpy()
            np.testing.assert_array_equal(got, expected)


@pytest.mark.slow
def test_a_clip_that_learned_world_captions_recognises_their_colours_zero_shot(tmp_path):
    """The judge is only as good as its CLIP: a tiny one trained contrastively on world images and
    their captions for 150 steps (about 20 s) names the colour of new images far above chance."""
    from transformers import CLIPModel, CLIPTokenizer

    from cul.clip_judge import CLIP_MEAN, CLIP_STD
    from cul.world import World

    path = build_tiny_clip(tmp_path / "clip")
    model, tok = CLIPModel.from_pretrained(path), CLIPTokenizer.from_pretrained(path)
    mean, std = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    world = World(32, seed=3)
    torch.manual_seed(0)
    for step in range(150):
        images, _, scenes = world.batch(64, step)
        captions = [f"a {s.colour} {s.object} on a {s.texture} background" for s in scenes]
        pixels = (torch.from_numpy(images).permute(0, 3, 1, 2) - mean) / std
        ids = tok(captions, padding=True, return_tensors="pt").input_ids
        loss = model(input_ids=ids, pixel_values=pixels, return_loss=True).loss
        opt.zero_grad()
        loss.backward()
        opt.step()

    catalogue = Catalogue.load("world")
    judge = ClipJudge(model, tok, catalogue)
    images, _, scenes = World(32, seed=99).batch(256, 0)
    colours = [
        catalogue.of("colour")[i].name for i in judge.predict(torch.from_numpy(images).permute(0, 3, 1, 2))["colour"]
    ]
    accuracy = np.mean([c == s.colour for c, s in zip(colours, scenes)])
    assert accuracy > 0.4, accuracy  # chance: 1 in 8
