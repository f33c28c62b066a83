"""The judge: a small CNN with one head per kind (object, colour, texture).

It plays the role of UnlearnCanvas's classifiers and DFR's VLM judge: it says which concept of
each kind a generated image shows, and its penultimate features give the Frechet distance between
generated and real world images. Trained on real world images with mild noise and blur so that it
stays fair to the slightly soft images a diffusion model draws.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Literal, cast

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from safetensors.torch import load_file, save_file
from torch import nn

from cul.world import CONCEPTS, Kind, Scene, World

KINDS: tuple[Kind, ...] = (Kind.OBJECT, Kind.COLOUR, Kind.TEXTURE)


class JudgeConfig(BaseModel):
    """Which judge scores a step (`kind`, loaded from `paths.judge`), and how `cul judge` trains
    the world's own (the other fields)."""

    model_config = ConfigDict(extra="forbid")

    #: world: this CNN, trained by `cul judge` on the world's renderer; clip: a local CLIP directory
    #: judging zero-shot over the active catalogue (`cul.clip_judge`); vlm: a local vision-language
    #: model asked a yes/no question per concept (`cul.vlm_judge`).
    kind: Literal["world", "clip", "vlm"] = "world"
    steps: int = Field(2000, ge=1)
    batch_size: int = Field(128, ge=1)
    lr: float = 2e-3
    width: int = 16
    seed: int = 1
    noise_std: float = 0.05


class Judge(nn.Module):
    """Three-headed classifier; `features()` is the 128-d embedding used for Frechet distance."""

    def __init__(self, width: int = 32) -> None:
        super().__init__()
        w = width

        def block(i: int, o: int) -> nn.Sequential:
            return nn.Sequential(
                nn.Conv2d(i, o, 3, padding=1),
                nn.GroupNorm(8, o),
                nn.SiLU(),
                nn.Conv2d(o, o, 3, padding=1),
                nn.GroupNorm(8, o),
                nn.SiLU(),
            )

        self.body = nn.Sequential(
            block(3, w),
            nn.MaxPool2d(2),
            block(w, 2 * w),
            nn.MaxPool2d(2),
            block(2 * w, 4 * w),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.feature_dim = 4 * w
        self.heads = nn.ModuleDict({k.value: nn.Linear(4 * w, len(CONCEPTS[k])) for k in KINDS})
        self.width = width

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """images: NCHW in [0, 1]."""
        return self.body(images * 2 - 1)

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        f = self.features(images)
        return {k: head(f) for k, head in self.heads.items()}

    @torch.no_grad()
    def predict(self, images: torch.Tensor, batch_size: int = 512) -> dict[str, np.ndarray]:
        """Predicted concept index per kind: {'object': [N], 'colour': [N], 'texture': [N]}."""
        self.eval()
        out: dict[str, list[np.ndarray]] = {k.value: [] for k in KINDS}
        for i in range(0, len(images), batch_size):
            logits = self(images[i : i + batch_size])
            for k, v in logits.items():
                out[k].append(v.argmax(-1).cpu().numpy())
        return {k: np.concatenate(v) for k, v in out.items()}

    @torch.no_grad()
    def embed(self, images: torch.Tensor, batch_size: int = 512) -> np.ndarray:
        self.eval()
        return np.concatenate(
            [self.features(images[i : i + batch_size]).cpu().numpy() for i in range(0, len(images), batch_size)]
        )

    def save_pretrained(self, path: str | Path, record: dict | None = None) -> None:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in self.state_dict().items()}, path / "judge.safetensors")
        (path / "config.json").write_text(json.dumps({"width": self.width}) + "\n")
        if record is not None:
            (path / "record.json").write_text(json.dumps(record, indent=2) + "\n")

    @classmethod
    def from_pretrained(cls, path: str | Path) -> Judge:
        path = Path(path)
        if not (path / "judge.safetensors").exists():
            raise FileNotFoundError(f"no judge weights in {path}; train one with `cul judge`")
        judge = cls(**json.loads((path / "config.json").read_text()))
        judge.load_state_dict(load_file(path / "judge.safetensors"))
        return judge.eval()


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """NHWC float [0, 1] (as the world draws them) -> NCHW tensor."""
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float()


def labels(scenes: list[Scene]) -> torch.Tensor:
    return torch.tensor([s.label() for s in scenes])


def _augment(x: torch.Tensor, gen: torch.Generator, noise_std: float) -> torch.Tensor:
    """Noise and a random soft blur, like the artefacts of a small diffusion model."""
    blur = torch.rand(x.shape[0], 1, 1, 1, generator=gen) < 0.5
    soft = F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    soft = 0.5 * x + 0.5 * soft
    x = torch.where(blur, soft, x)
    return (x + noise_std * torch.rand(x.shape[0], 1, 1, 1, generator=gen) * torch.randn(x.shape, generator=gen)).clamp(
        0, 1
    )


def train_judge(cfg: JudgeConfig, size: int = 32, progress: bool = True) -> tuple[Judge, dict]:
    """Train on an endless stream of world images; returns the judge and its training record."""
    from tqdm.auto import tqdm

    torch.manual_seed(cfg.seed)
    world = World(size=size, seed=10_000 + cfg.seed)
    judge = Judge(cfg.width)
    opt = torch.optim.AdamW(judge.parameters(), lr=cfg.lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=cfg.steps)
    gen = torch.Generator().manual_seed(cfg.seed)
    t0 = time.perf_counter()
    judge.train()
    for step in tqdm(range(cfg.steps), desc="judge", disable=not progress):
        imgs, _, scenes = world.batch(cfg.batch_size, step)
        x = _augment(to_tensor(imgs), gen, cfg.noise_std)
        y = labels(scenes)
        logits = judge(x)
        loss = cast(torch.Tensor, sum(F.cross_entropy(logits[k.value], y[:, i]) for i, k in enumerate(KINDS)))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    judge.eval()
    record = {
        "steps": cfg.steps,
        "train_seconds": round(time.perf_counter() - t0, 1),
        "config": cfg.model_dump(),
        "held_out_accuracy": held_out_accuracy(judge, size),
    }
    return judge, record


def held_out_accuracy(judge: Judge, size: int = 32, n: int = 2048, seed: int = 987_654) -> dict[str, float]:
    """Accuracy per head on fresh real images the judge never saw (another seed)."""
    world = World(size=size, seed=seed)
    imgs, _, scenes = world.batch(n, 0)
    pred = judge.predict(to_tensor(imgs))
    y = labels(scenes).numpy()
    return {k.value: float((pred[k.value] == y[:, i]).mean()) for i, k in enumerate(KINDS)}
