"""A zero-shot CLIP judge: which concept of each catalogue category an image shows, and image
features for FD, from a local CLIP directory (transformers; no hub).

It answers what the world's CNN judge (`cul.judge.Judge`) answers, so the evaluation can take
either: `predict(images)` gives, per category, the index of the recognised concept among
`catalogue.of(category)`, and `embed(images)` the image features FD is computed on.

Recognition is CLIP's zero-shot classification (Radford et al., 2021) with prompt ensembling: each
concept's text embedding is the normalised mean of its prompts' (the catalogue's templates for its
category), and an image is assigned, per category, the concept whose embedding is nearest by cosine:

    label_c(x) = argmax_{k in category c} cos(f_img(x), mean_p f_txt(p_k))

For a Stable Diffusion catalogue this is how DFR and LACU score unlearning (UA: the share of
images prompted with a forgotten concept that the judge no longer assigns to it).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from cul.catalogue import Catalogue

# CLIP's image normalisation (the values every released CLIP was trained with)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class ClipJudge:
    """Zero-shot recognition of a catalogue's concepts with a CLIP model.

    Args:
        model: a `transformers.CLIPModel`.
        tokenizer: its tokenizer.
        catalogue: the concepts to recognise; each category is one classification.
    """

    def __init__(self, model, tokenizer, catalogue: Catalogue) -> None:
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.catalogue = catalogue
        self.categories = catalogue.categories()
        self.image_size = int(model.config.vision_config.image_size)
        self.text_embeddings = {c: self._concept_embeddings(c) for c in self.categories}

    @classmethod
    def from_pretrained(cls, path: str | Path, catalogue: Catalogue) -> ClipJudge:
        """A CLIP directory (`config.json`, safetensors weights, tokenizer files)."""
        from transformers import CLIPModel, CLIPTokenizer

        path = Path(path)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{path}: not a CLIP directory (no config.json)")
        model = CLIPModel.from_pretrained(path, use_safetensors=True)
        return cls(model, CLIPTokenizer.from_pretrained(path), catalogue)

    def prompts(self, name: str, category: str) -> list[str]:
        """The prompts whose mean embedding stands for `name`: every template of its category."""
        return self.catalogue.prompts_for(name, category, k=1_000)

    @torch.no_grad()
    def _concept_embeddings(self, category: str) -> torch.Tensor:
        rows = []
        for entry in self.catalogue.of(category):
            tok = self.tokenizer(self.prompts(entry.name, category), padding=True, truncation=True, return_tensors="pt")
            text = self.model.get_text_features(**tok)
            text = getattr(text, "pooler_output", text)  # a tensor, or an output object on newer transformers
            rows.append(torch.nn.functional.normalize(torch.nn.functional.normalize(text, dim=-1).mean(0), dim=-1))
        return torch.stack(rows)

    def _pixels(self, images: torch.Tensor) -> torch.Tensor:
        """[N, 3, H, W] in [0, 1] -> CLIP's input: resized to its side, normalised."""
        x = torch.nn.functional.interpolate(
            images.float(), size=(self.image_size, self.image_size), mode="bicubic", align_corners=False
        ).clamp(0, 1)
        mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
        std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
        return (x - mean) / std

    @torch.no_grad()
    def _image_features(self, images: torch.Tensor, batch_size: int) -> torch.Tensor:
        out = []
        for i in range(0, len(images), batch_size):
            feats = self.model.get_image_features(pixel_values=self._pixels(images[i : i + batch_size]))
            out.append(getattr(feats, "pooler_output", feats))
        return torch.cat(out)

    def predict(self, images: torch.Tensor, batch_size: int = 64) -> dict[str, np.ndarray]:
        """Per category, the index (in `catalogue.of(category)`) of the concept each image shows."""
        feats = torch.nn.functional.normalize(self._image_features(images, batch_size), dim=-1)
        return {c: (feats @ self.text_embeddings[c].T).argmax(1).numpy() for c in self.categories}

    def embed(self, images: torch.Tensor, batch_size: int = 64) -> np.ndarray:
        """Image features for FD: CLIP's projected image embeddings."""
        return self._image_features(images, batch_size).numpy()
