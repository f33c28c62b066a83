"""One small interface over two text-to-image diffusion models.

`WorldDiffusion`: the embedded default, a pixel-space diffusers `UNet2DConditionModel` conditioned
on frozen MiniLM token states. `StableDiffusion`: a real latent `StableDiffusionPipeline` loaded
from a local directory (CLIP text encoder, VAE, UNet). Both expose the same verbs, so unlearning
code never needs to know which one it has:

- `encode_prompts(prompts)`: the frozen text context,
- `predict_noise(x_t, t, context)`: the UNet's eps prediction (what the unlearning losses use),
- `sample(prompts, seed=...)`: images in [0, 1] with classifier-free guidance,
- `save_pretrained(dir)` / `load_model(dir)`.

The noise scheduler is a separate object (DDPM for training, DDIM built from the same config for
sampling), as in diffusers.
"""

from __future__ import annotations

import copy
import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch.func import functional_call

from cul import threads
from cul.device import autocast, place
from cul.text import MINILM, TextEncoder

if TYPE_CHECKING:  # diffusers is imported where it is used: reading settings needs no diffusers
    from diffusers import DDIMScheduler, DDPMScheduler, UNet2DConditionModel

MODEL_FILE = "cul_model.json"


class SamplingConfig(BaseModel):
    """How images are drawn by default: DDIM steps and classifier-free guidance."""

    model_config = ConfigDict(extra="forbid")

    steps: int = Field(20, ge=1, le=1000)
    guidance: float = Field(3.0, ge=0.0)
    eta: float = Field(0.0, ge=0.0, le=1.0)


class WorldUNetConfig(BaseModel):
    """Size of the pixel-space UNet of the embedded world (about 2M parameters)."""

    model_config = ConfigDict(extra="forbid")

    sample_size: int = 32
    block_out_channels: tuple[int, ...] = (32, 64, 128)
    layers_per_block: int = 1
    cross_attention_dim: int = 64
    attention_head_dim: int = 8
    text_max_length: int = 16

    def build(self, text_dim: int) -> UNet2DConditionModel:
        from diffusers import UNet2DConditionModel

        n = len(self.block_out_channels)
        down = ["DownBlock2D"] * (n - 1) + ["CrossAttnDownBlock2D"]
        up = ["CrossAttnUpBlock2D"] + ["UpBlock2D"] * (n - 1)
        return UNet2DConditionModel(
            sample_size=self.sample_size,
            in_channels=3,
            out_channels=3,
            down_block_types=tuple(down),
            up_block_types=tuple(up),
            mid_block_type="UNetMidBlock2DCrossAttn",
            block_out_channels=tuple(self.block_out_channels),
            layers_per_block=self.layers_per_block,
            cross_attention_dim=self.cross_attention_dim,
            attention_head_dim=self.attention_head_dim,
            encoder_hid_dim=text_dim,
            encoder_hid_dim_type="text_proj",
            addition_embed_type="text",
            norm_num_groups=8,
        )


def train_scheduler() -> DDPMScheduler:
    """The forward process of the world model: DDPM, 1000 steps, cosine schedule."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", clip_sample=False)


class DiffusionModel:
    """What every model in the project can do. Subclasses differ only in where x lives."""

    kind: str = "base"

    def __init__(
        self,
        unet: UNet2DConditionModel,
        scheduler: DDPMScheduler,
        text: TextEncoder,
        sampling: SamplingConfig | None = None,
    ) -> None:
        self.unet = unet
        self.scheduler = scheduler
        self.text = text
        self.sampling = sampling or SamplingConfig()

    # -- geometry -----------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    def latent_shape(self) -> tuple[int, int, int]:
        s = self.unet.config.sample_size
        return (self.unet.config.in_channels, s, s)

    def to_latents(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1], NCHW -> the space the UNet denoises."""
        return images * 2 - 1

    def to_images(self, x: torch.Tensor) -> torch.Tensor:
        """The UNet's space -> images in [0, 1], NCHW."""
        return ((x + 1) / 2).clamp(0, 1)

    # -- the verbs ----------------------------------------------------------------------------
    def encode_prompts(self, prompts: Sequence[str]) -> torch.Tensor:
        return self.text.encode(prompts).to(self.device)

    def predict_noise(
        self,
        x_t: torch.Tensor,
        t: torch.Tensor,
        context: torch.Tensor,
        weights: dict[str, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """eps(x_t, t, context). `weights`: the UNet's parameters by name to run it with instead of
        its own (`torch.func.functional_call`; gradients reach whatever they were computed from)."""
        if t.ndim == 0:
            t = t.expand(x_t.shape[0])
        if weights is not None:
            return functional_call(self.unet, weights, (x_t, t), {"encoder_hidden_states": context}).sample
        return self.unet(x_t, t, encoder_hidden_states=context).sample

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.scheduler.add_noise(x0, noise, t)

    def sampler(self, steps: int | None = None) -> DDIMScheduler:
        from diffusers import DDIMScheduler

        ddim = DDIMScheduler.from_config(self.scheduler.config)
        ddim.set_timesteps(steps or self.sampling.steps)
        return ddim

    @torch.no_grad()
    def sample_latents(
        self,
        prompts: Sequence[str],
        seed: int = 0,
        steps: int | None = None,
        guidance: float | None = None,
        eta: float | None = None,
        batch_size: int = 128,
        progress: bool = False,
        context: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """DDIM with classifier-free guidance; image i depends only on (seed, i).

        `context`: the text context of every prompt ([len(prompts), tokens, dim]) instead of
        encoding `prompts` (a soft prompt or an adversarial embedding, `cul.probes`)."""
        guidance = self.sampling.guidance if guidance is None else guidance
        eta = self.sampling.eta if eta is None else eta
        outs = []
        chunks = range(0, len(prompts), batch_size)
        if progress:
            from tqdm.auto import tqdm

            chunks = tqdm(chunks, desc="sampling", unit="batch")
        gen = torch.Generator().manual_seed(seed)
        noise = torch.randn((len(prompts), *self.latent_shape()), generator=gen)
        for i in chunks:
            batch = list(prompts[i : i + batch_size])
            x = noise[i : i + len(batch)].to(self.device)
            cond = self.encode_prompts(batch) if context is None else context[i : i + len(batch)].to(self.device)
            uncond = self.encode_prompts([""]).expand_as(cond) if guidance != 1.0 else None
            ddim = self.sampler(steps)
            step_gen = torch.Generator().manual_seed(seed * 1_000_003 + i)
            for t in ddim.timesteps:
                threads.tick()
                with autocast():
                    if uncond is not None:
                        eps = self.predict_noise(torch.cat([x, x]), t, torch.cat([uncond, cond])).float()
                        e_u, e_c = eps.chunk(2)
                        eps = e_u + guidance * (e_c - e_u)
                    else:
                        eps = self.predict_noise(x, t, cond).float()
                x = ddim.step(eps, t, x, eta=eta, generator=step_gen).prev_sample
            outs.append(x)
        return torch.cat(outs)

    def sample(self, prompts: Sequence[str], seed: int = 0, **kw) -> torch.Tensor:
        """Images in [0, 1], NCHW, on the CPU (fp32) wherever the model runs."""
        return self.to_images(self.sample_latents(prompts, seed=seed, **kw)).float().cpu()

    def digest(self, salt: bytes = b"") -> str:
        """SHA-256 of `salt` and the UNet's weights (names and bytes, in name order): the key under
        which figures of this model (the base model's evaluation, its probes) are cached."""
        h = hashlib.sha256(salt)
        for n, p in sorted(self.unet.state_dict().items()):
            h.update(n.encode())
            h.update(p.detach().cpu().numpy().tobytes())
        return h.hexdigest()

    def copy(self) -> DiffusionModel:
        """A deep copy of the trainable part (the UNet); the frozen encoder is shared."""
        clone = copy.copy(self)
        clone.unet = copy.deepcopy(self.unet)
        return clone

    def with_unet(self, path: str | Path) -> DiffusionModel:
        """A copy whose UNet is loaded from `path` (a benchmark step's `steps/NN/unet`): the
        unlearning methods save only the UNet, everything else is the base model's."""
        path = Path(path)
        if not path.is_dir():
            raise FileNotFoundError(f"no UNet weights at {path}")
        from diffusers import UNet2DConditionModel

        clone = copy.copy(self)
        clone.unet = UNet2DConditionModel.from_pretrained(path, use_safetensors=True).eval()
        return clone

    def save_pretrained(self, path: str | Path) -> None:  # pragma: no cover - abstract
        raise NotImplementedError


class WorldDiffusion(DiffusionModel):
    """The embedded default: pixel-space UNet over 32x32 world images, MiniLM text context."""

    kind = "world"

    @classmethod
    def from_config(cls, config: WorldUNetConfig, sampling: SamplingConfig | None = None) -> WorldDiffusion:
        text = TextEncoder.from_minilm(config.text_max_length)
        return cls(config.build(text.dim), train_scheduler(), text, sampling)

    def save_pretrained(self, path: str | Path) -> None:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.unet.save_pretrained(path / "unet", safe_serialization=True)
        self.scheduler.save_pretrained(path / "scheduler")
        meta = {
            "kind": self.kind,
            "text_encoder": MINILM,
            "text_max_length": self.text.max_length,
            "sampling": self.sampling.model_dump(),
        }
        (path / MODEL_FILE).write_text(json.dumps(meta, indent=2) + "\n")

    @classmethod
    def from_pretrained(cls, path: str | Path, text: TextEncoder | None = None) -> WorldDiffusion:
        path = Path(path)
        meta = json.loads((path / MODEL_FILE).read_text())
        from diffusers import DDPMScheduler, UNet2DConditionModel

        unet = UNet2DConditionModel.from_pretrained(path / "unet", use_safetensors=True)
        scheduler = DDPMScheduler.from_pretrained(path / "scheduler")
        text = text or TextEncoder.from_minilm(meta.get("text_max_length", 16))
        return cls(unet.eval(), scheduler, text, SamplingConfig(**meta.get("sampling", {})))


class StableDiffusion(DiffusionModel):
    """A real latent Stable Diffusion pipeline from a local directory (no hub access)."""

    kind = "stable-diffusion"

    def __init__(self, pipe, sampling: SamplingConfig | None = None) -> None:
        from diffusers import DDPMScheduler

        text = TextEncoder.from_pipeline(pipe.tokenizer, pipe.text_encoder)
        scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
        super().__init__(pipe.unet, scheduler, text, sampling or SamplingConfig(steps=30, guidance=7.5))
        self.vae = pipe.vae.eval().requires_grad_(False)
        self.pipe = pipe

    @property
    def vae_scale(self) -> float:
        return float(self.vae.config.scaling_factor)

    @torch.no_grad()
    def to_latents(self, images: torch.Tensor) -> torch.Tensor:
        posterior = self.vae.encode(images.to(self.device) * 2 - 1).latent_dist
        return posterior.mean * self.vae_scale

    @torch.no_grad()
    def to_images(self, x: torch.Tensor) -> torch.Tensor:
        return ((self.vae.decode(x / self.vae_scale).sample + 1) / 2).clamp(0, 1)

    def save_pretrained(self, path: str | Path) -> None:
        path = Path(path)
        self.pipe.unet = self.unet
        self.pipe.save_pretrained(path, safe_serialization=True)
        meta = {"kind": self.kind, "sampling": self.sampling.model_dump()}
        (path / MODEL_FILE).write_text(json.dumps(meta, indent=2) + "\n")

    @classmethod
    def from_pretrained(cls, path: str | Path) -> StableDiffusion:
        from diffusers import StableDiffusionPipeline

        path = Path(path)
        pipe = StableDiffusionPipeline.from_pretrained(
            path,
            safety_checker=None,
            requires_safety_checker=False,
            use_safetensors=True,
            local_files_only=True,
        )
        sampling = None
        if (path / MODEL_FILE).exists():
            sampling = SamplingConfig(**json.loads((path / MODEL_FILE).read_text()).get("sampling", {}))
        return cls(pipe, sampling)


class ModelLoadError(ValueError):
    """A model directory that cannot be opened (missing, foreign, corrupt); the message says which."""


def load_model(path: str | Path) -> DiffusionModel:
    """Open either kind of model directory: ours (cul_model.json) or a diffusers SD pipeline.
    Weights load from safetensors only; anything else, or a corrupt file, raises `ModelLoadError`."""
    path = Path(path)
    if not path.is_dir():
        raise ModelLoadError(f"no model directory at {path}")
    meta_file = path / MODEL_FILE
    try:
        kind = json.loads(meta_file.read_text()).get("kind") if meta_file.exists() else None
    except (ValueError, AttributeError) as e:
        raise ModelLoadError(f"{meta_file}: not a readable model description ({e})") from e
    if kind != WorldDiffusion.kind and kind != StableDiffusion.kind and not (path / "model_index.json").exists():
        raise ModelLoadError(f"{path} is neither a cul world model nor a Stable Diffusion pipeline directory")
    try:
        model = (
            WorldDiffusion.from_pretrained(path)
            if kind == WorldDiffusion.kind
            else StableDiffusion.from_pretrained(path)
        )
    except Exception as e:  # safetensors, diffusers and torch each raise their own kind
        raise ModelLoadError(f"{path}: the weights cannot be loaded ({type(e).__name__}: {str(e)[:300]})") from e
    return place(model)
