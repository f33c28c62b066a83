"""The world-data stage: fixed real reference images, paraphrase probes and the vocabulary.

These files are DVC outputs: evaluation compares generated images against `reference.npz`,
and later stages read the caption probes to test paraphrases of a forgotten concept.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from cul.config import WorldConfig
from cul.world import CONCEPTS, CONFUSABLES, HELD_OUT_TEMPLATES, TRAIN_TEMPLATES, World, all_scenes, vocabulary


def build_world(cfg: WorldConfig, out: str | Path) -> dict:
    from cul.plots import scene_grid

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    scenes = all_scenes()
    images = World(size=cfg.size, seed=cfg.eval_seed).render_all(scenes)
    np.savez_compressed(
        out / "reference.npz",
        images=(images * 255).round().astype(np.uint8),
        labels=np.array([s.label() for s in scenes], dtype=np.int64),
    )
    rng = np.random.default_rng(cfg.eval_seed)
    probes = {
        "train": [
            World(seed=cfg.seed, partial_caption_prob=0, empty_caption_prob=0).describe(s, rng) for s in scenes[:64]
        ],
        "held_out": [World(seed=cfg.seed, held_out=True).describe(s, rng) for s in scenes[:64]],
    }
    (out / "captions.json").write_text(json.dumps(probes, indent=2) + "\n")
    vocab = {
        "concepts": {
            k.value: {c.name: {"synonyms": list(c.synonyms), "held_out": list(c.held_out)} for c in group}
            for k, group in CONCEPTS.items()
        },
        "confusables": {k: list(v) for k, v in CONFUSABLES.items()},
        "templates": {"train": list(TRAIN_TEMPLATES), "held_out": list(HELD_OUT_TEMPLATES)},
    }
    (out / "vocabulary.json").write_text(json.dumps(vocab, indent=2) + "\n")
    names = vocabulary()
    scene_grid(
        torch.from_numpy(images).permute(0, 3, 1, 2),
        out / "preview.png",
        "real world images (rows: object, columns: colour, panels: texture)",
    )
    return {"n_reference": len(scenes), "n_concepts": sum(len(v) for v in names.values())}


def load_reference(path: str | Path) -> torch.Tensor:
    """The saved real reference images as NCHW floats in [0, 1]."""
    with np.load(Path(path) / "reference.npz") as f:
        return torch.from_numpy(f["images"]).permute(0, 3, 1, 2).float() / 255
