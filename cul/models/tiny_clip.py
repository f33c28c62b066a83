"""A tiny, randomly initialised CLIP (text and vision towers) saved as a local directory.

No CLIP can be downloaded here: tests exercise the CLIP judge (`cul.clip_judge`) on this
miniature, which loads through the same `from_pretrained` as a real one. Its judgements are
arbitrary; its plumbing is the real thing.
"""

from __future__ import annotations

from pathlib import Path

from cul.models.tiny_sd import char_tokenizer


def build_tiny_clip(path: str | Path, image_size: int = 32, seed: int = 0) -> Path:
    """Build and save a tiny CLIP directory (about 0.1M parameters) with a character tokenizer."""
    import torch
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(seed)
    path = Path(path)
    tokenizer = char_tokenizer(64)
    tokenizer.save_pretrained(path)
    tower = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
    config = CLIPConfig(
        text_config=dict(
            vocab_size=len(tokenizer),
            max_position_embeddings=64,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            **tower,
        ),
        vision_config=dict(image_size=image_size, patch_size=8, **tower),
        projection_dim=16,
    )
    CLIPModel(config).save_pretrained(path, safe_serialization=True)
    return path
