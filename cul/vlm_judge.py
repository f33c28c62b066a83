"""A yes/no VLM judge: which concept of each catalogue category an image shows, asked of a local
vision-language model (transformers; no hub), as LACU evaluates with Qwen2.5-VL.

For an image x and each concept k of a category, the model is asked "Does this image show k?
Answer yes or no." and the answer's next-token logits are read: its belief that x shows k is

    s_k(x) = logit("yes" | x, q_k) - logit("no" | x, q_k)

and `predict` assigns, per category, the concept with the highest s_k (one question per concept of
the category: a category of K concepts costs K forward passes per image). `embed` gives FD's
features: the model's projected image tokens, averaged over the image.

Any `AutoModelForImageTextToText` with an `AutoProcessor` that has a chat template works
(Qwen2.5-VL, LLaVA, ...); `cul.models.tiny_vlm` builds a random LLaVA of this shape for tests.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from cul.catalogue import Catalogue

QUESTION = "Does this image show {concept}? Answer yes or no."


def _pool(features) -> torch.Tensor:
    """[N, D] from what `get_image_features` returns (a tensor, per-image token lists, or an
    output object holding either)."""
    pooled = getattr(features, "pooler_output", None)
    if pooled is None:
        pooled = getattr(features, "last_hidden_state", features)
    if isinstance(pooled, (list, tuple)):
        return torch.stack([p.float().reshape(-1, p.shape[-1]).mean(0) for p in pooled])
    return pooled.float().mean(1) if pooled.ndim == 3 else pooled.float()


class VlmJudge:
    """Yes/no recognition of a catalogue's concepts with a vision-language model.

    Args:
        model: an `AutoModelForImageTextToText`.
        processor: its `AutoProcessor` (tokenizer, image processor, chat template).
        catalogue: the concepts to recognise; each category is one choice among its concepts.
        question: the question asked per concept (`{concept}` is its name).
    """

    def __init__(self, model, processor, catalogue: Catalogue, question: str = QUESTION) -> None:
        self.model = model.eval().requires_grad_(False)
        self.processor = processor
        self.processor.tokenizer.padding_side = "left"  # the answer's logits are the last position's
        self.catalogue = catalogue
        self.question = question
        self.categories = catalogue.categories()
        self.yes, self.no = (self._token(w) for w in ("yes", "no"))

    @classmethod
    def from_pretrained(cls, path: str | Path, catalogue: Catalogue) -> VlmJudge:
        """A VLM directory (`config.json`, safetensors weights, processor files)."""
        from transformers import AutoModelForImageTextToText, AutoProcessor

        path = Path(path)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{path}: not a model directory (no config.json)")
        model = AutoModelForImageTextToText.from_pretrained(path, use_safetensors=True)
        return cls(model, AutoProcessor.from_pretrained(path), catalogue)

    def _token(self, word: str) -> int:
        ids = self.processor.tokenizer.encode(word, add_special_tokens=False)
        if len(ids) != 1:
            raise ValueError(f"the VLM's tokenizer splits {word!r} into {len(ids)} tokens; a yes/no judge needs one")
        return ids[0]

    def _inputs(self, images: torch.Tensor, questions: list[str]):
        texts = [
            self.processor.apply_chat_template(
                [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]}],
                add_generation_prompt=True,
            )
            for q in questions
        ]
        pixels = [img.permute(1, 2, 0).float().clamp(0, 1).numpy() for img in images]
        return self.processor(text=texts, images=pixels, return_tensors="pt", padding=True, do_rescale=False)

    @torch.no_grad()
    def scores(self, images: torch.Tensor, concept: str, batch_size: int = 16) -> np.ndarray:
        """s_k(x) for every image: logit(yes) - logit(no) after the question about `concept`."""
        out = []
        for i in range(0, len(images), batch_size):
            chunk = images[i : i + batch_size]
            inputs = self._inputs(chunk, [self.question.format(concept=concept)] * len(chunk))
            logits = self.model(**inputs).logits[:, -1].float()
            out.append((logits[:, self.yes] - logits[:, self.no]).numpy())
        return np.concatenate(out)

    def predict(self, images: torch.Tensor, batch_size: int = 16) -> dict[str, np.ndarray]:
        """Per category, the index (in `catalogue.of(category)`) of the concept each image shows."""
        out = {}
        for c in self.categories:
            s = np.stack([self.scores(images, e.name, batch_size) for e in self.catalogue.of(c)], axis=1)
            out[c] = s.argmax(1)
        return out

    @torch.no_grad()
    def embed(self, images: torch.Tensor, batch_size: int = 16) -> np.ndarray:
        """Image features for FD: the model's projected image tokens, averaged per image."""
        out = []
        for i in range(0, len(images), batch_size):
            inputs = self._inputs(images[i : i + batch_size], [""] * len(images[i : i + batch_size]))
            extra = {k: inputs[k] for k in ("image_grid_thw", "image_sizes") if k in inputs}
            out.append(_pool(self.model.get_image_features(pixel_values=inputs["pixel_values"], **extra)))
        return torch.cat(out).numpy()
