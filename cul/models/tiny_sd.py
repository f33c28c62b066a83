"""A tiny, randomly initialised Stable Diffusion pipeline built from small configs.

Real SD checkpoints cannot be downloaded here, so tests and smoke runs exercise the latent path
(CLIP tokenizer and text model, VAE, UNet, scheduler, saved and re-loaded as a diffusers
directory) on this miniature. Its images are noise; its plumbing is the real thing.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path


def _byte_alphabet() -> list[str]:
    """GPT-2 / CLIP byte-level alphabet: one printable unicode character per byte value."""
    keep = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars, extra = [], 0
    for b in range(256):
        if b in keep:
            chars.append(chr(b))
        else:
            chars.append(chr(256 + extra))
            extra += 1
    return chars


def write_char_tokenizer(path: str | Path) -> Path:
    """A CLIP tokenizer with a character-level vocabulary (no merges): enough to encode any text."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    chars = _byte_alphabet()
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    (path / "vocab.json").write_text(json.dumps(vocab))
    (path / "merges.txt").write_text("#version: 0.2\n")
    return path


def char_tokenizer(max_length: int):
    """A `CLIPTokenizer` over `write_char_tokenizer`'s vocabulary."""
    from transformers import CLIPTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        tok_dir = write_char_tokenizer(tmp)
        return CLIPTokenizer(str(tok_dir / "vocab.json"), str(tok_dir / "merges.txt"), model_max_length=max_length)


def build_tiny_sd(path: str | Path, sample_size: int = 8, seed: int = 0) -> Path:
    """Build and save a tiny SD pipeline directory (about 1M parameters)."""
    import torch
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    path = Path(path)
    tokenizer = char_tokenizer(32)
    text = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=32,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(16, 32),
        latent_channels=4,
        norm_num_groups=8,
        layers_per_block=1,
        sample_size=sample_size * 2,
    )
    unet = UNet2DConditionModel(
        sample_size=sample_size,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(32, 64),
        layers_per_block=1,
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=8,
    )
    scheduler = DDPMScheduler(
        num_train_timesteps=1000,
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        clip_sample=False,
        steps_offset=1,
    )
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(path, safe_serialization=True)
    return path
