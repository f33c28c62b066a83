"""Pretraining the base world model: the theta_0 every deletion request starts from.

What makes it converge on two CPU cores (measured, see reports/base): large shapes that nearly
fill the image, a frozen pretrained text encoder with cached embeddings, min-SNR-gamma loss
weighting, a short warm-up then cosine decay, and EMA weights for sampling.

Resumable: a checkpoint (safetensors for every tensor, JSON for the rest) is written every
`checkpoint_every` steps and at the end; a rerun continues from the newest one. The stream of
training batches depends only on (seed, step), so a resumed run sees the same data.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import cast

import torch
from pydantic import BaseModel, ConfigDict, Field
from safetensors.torch import load_file, save_file

from cul.models.diffusion import SamplingConfig, WorldDiffusion, WorldUNetConfig
from cul.world import World


class PretrainConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    steps: int = Field(4000, ge=1)
    batch_size: int = Field(64, ge=1)
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = 1e-2
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1
    snr_gamma: float | None = 5.0
    ema_decay: float = 0.999
    grad_clip: float = 1.0
    seed: int = 0
    checkpoint_every: int = 250
    threads: int | None = None


def min_snr_weights(scheduler, t: torch.Tensor, gamma: float | None) -> torch.Tensor:
    """min(SNR, gamma) / SNR per sample (eps-prediction): tames the easy, low-noise steps."""
    if gamma is None:
        return torch.ones_like(t, dtype=torch.float32)
    abar = scheduler.alphas_cumprod.to(t.device)[t]
    snr = abar / (1 - abar)
    return torch.clamp(snr, max=gamma) / snr


def lr_factor(step: int, cfg: PretrainConfig) -> float:
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * cosine


def _optimizer_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for pid, state in sd["state"].items():
        for k, v in state.items():
            if torch.is_tensor(v):
                tensors[f"{pid}.{k}"] = v.contiguous()
            else:
                scalars[f"{pid}.{k}"] = v
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _load_optimizer(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    state: dict[int, dict] = {}
    for key, v in tensors.items():
        pid, k = key.split(".", 1)
        state.setdefault(int(pid), {})[k] = v
    for key, v in meta["scalars"].items():
        pid, k = key.split(".", 1)
        state.setdefault(int(pid), {})[k] = v
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


class Pretrainer:
    """Owns the model, optimizer, EMA and the loop; `run()` resumes from `checkpoint_dir`."""

    def __init__(
        self,
        unet_config: WorldUNetConfig,
        cfg: PretrainConfig,
        checkpoint_dir: str | Path,
        sampling: SamplingConfig | None = None,
        world: World | None = None,
    ) -> None:
        self.cfg = cfg
        self.dir = Path(checkpoint_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(cfg.seed)
        self.model = WorldDiffusion.from_config(unet_config, sampling)
        self.world = world or World(size=unet_config.sample_size, seed=cfg.seed)
        self.unet = self.model.unet.train()
        self.opt = torch.optim.AdamW(self.unet.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        from diffusers.training_utils import EMAModel  # here: reading settings needs no diffusers

        self.ema = EMAModel(self.unet.parameters(), decay=cfg.ema_decay, use_ema_warmup=True, power=2 / 3)
        self.step = 0
        self.history: list[dict] = []
        self.seconds = 0.0
        self._resume()

    # -- checkpoints --------------------------------------------------------------------------
    def _resume(self) -> None:
        meta_file = self.dir / "state.json"
        if not meta_file.exists():
            return
        meta = json.loads(meta_file.read_text())
        self.unet.load_state_dict(load_file(self.dir / "unet.safetensors"))
        ema = load_file(self.dir / "ema.safetensors")
        for p, name in zip(self.ema.shadow_params, sorted(ema, key=int)):
            p.data.copy_(ema[name])
        self.ema.optimization_step = meta["ema_step"]
        _load_optimizer(self.opt, load_file(self.dir / "optimizer.safetensors"), meta["optimizer"])
        self.step = meta["step"]
        self.seconds = meta["seconds"]
        self.history = meta["history"]

    def save_checkpoint(self) -> None:
        tensors, opt_meta = _optimizer_tensors(self.opt)
        tmp = self.dir / "tmp"
        tmp.mkdir(exist_ok=True)
        save_file({k: v.contiguous() for k, v in self.unet.state_dict().items()}, tmp / "unet.safetensors")
        save_file({str(i): p.contiguous() for i, p in enumerate(self.ema.shadow_params)}, tmp / "ema.safetensors")
        save_file(tensors, tmp / "optimizer.safetensors")
        meta = {
            "step": self.step,
            "seconds": self.seconds,
            "ema_step": self.ema.optimization_step,
            "optimizer": opt_meta,
            "history": self.history,
            "config": self.cfg.model_dump(),
        }
        (tmp / "state.json").write_text(json.dumps(meta))
        # state.json last: a crash mid-save leaves the previous checkpoint readable
        for name in ("unet.safetensors", "ema.safetensors", "optimizer.safetensors", "state.json"):
            (tmp / name).replace(self.dir / name)

    # -- training -----------------------------------------------------------------------------
    def loss(self, images: torch.Tensor, captions: list[str], gen: torch.Generator) -> torch.Tensor:
        x0 = self.model.to_latents(images)
        noise = torch.randn(x0.shape, generator=gen)
        t = torch.randint(0, self.model.scheduler.config.num_train_timesteps, (x0.shape[0],), generator=gen)
        x_t = self.model.add_noise(x0, noise, t)
        eps = self.model.predict_noise(x_t, t, self.model.encode_prompts(captions))
        per_sample = ((eps - noise) ** 2).mean(dim=(1, 2, 3))
        return (per_sample * min_snr_weights(self.model.scheduler, t, self.cfg.snr_gamma)).mean()

    def run(self, progress: bool = True) -> WorldDiffusion:
        from tqdm.auto import tqdm

        if self.cfg.threads:
            torch.set_num_threads(self.cfg.threads)
        bar = tqdm(total=self.cfg.steps, initial=self.step, desc="pretrain", disable=not progress)
        running = self.history[-1]["loss"] if self.history else None
        while self.step < self.cfg.steps:
            t0 = time.perf_counter()
            imgs, captions, _ = self.world.batch(self.cfg.batch_size, self.step)
            images = torch.from_numpy(imgs).permute(0, 3, 1, 2).contiguous()
            gen = torch.Generator().manual_seed(self.cfg.seed * 7_919 + self.step)
            for g in self.opt.param_groups:
                g["lr"] = self.cfg.lr * lr_factor(self.step, self.cfg)
            loss = self.loss(images, captions, gen)
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.unet.parameters(), self.cfg.grad_clip)
            self.opt.step()
            self.ema.step(self.unet.parameters())
            self.step += 1
            self.seconds += time.perf_counter() - t0
            running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
            bar.update(1)
            bar.set_postfix(loss=f"{running:.4f}")
            if self.step % 50 == 0:
                self.history.append({"step": self.step, "loss": running, "seconds": round(self.seconds, 1)})
            if self.step % self.cfg.checkpoint_every == 0 or self.step == self.cfg.steps:
                self.save_checkpoint()
        bar.close()
        return self.ema_model()

    def ema_model(self) -> WorldDiffusion:
        """A copy of the model carrying the EMA weights (what gets sampled and shipped)."""
        model = cast(WorldDiffusion, self.model.copy())
        self.ema.copy_to(model.unet.parameters())
        model.unet.eval()
        return model

    def record(self) -> dict:
        """How the weights were made: for the committed base model's provenance file."""
        return {
            "steps": self.step,
            "train_seconds": round(self.seconds, 1),
            "final_loss": self.history[-1]["loss"] if self.history else None,
            "config": self.cfg.model_dump(),
            "sampling": self.model.sampling.model_dump(),
            "unet_parameters": sum(p.numel() for p in self.unet.parameters()),
            "torch_threads": torch.get_num_threads(),
            "history": self.history,
        }
