"""Generative replay: teacher samples that the student is distilled on.

DFR regenerates replay images online, every training step, which dominates its cost (about 47k
teacher images per request). The default here is a per-request `ReplayBuffer`: teacher samples
generated once and reused across steps; `OnlineReplay` keeps DFR's original behaviour so the two
can be compared. Both hand out x0 (in the UNet's space) for given prompt indices: `take(idx)`.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


class ReplayBuffer:
    """Teacher samples for a fixed list of prompts, generated once (one per prompt per copy)."""

    def __init__(self, prompts: Sequence[str], x0: torch.Tensor) -> None:
        if len(prompts) != len(x0):
            raise ValueError(f"{len(prompts)} prompts but {len(x0)} samples")
        self.prompts = list(prompts)
        self.x0 = x0

    def __len__(self) -> int:
        return len(self.prompts)

    @classmethod
    def generate(
        cls,
        teacher,
        prompts: Sequence[str],
        seed: int,
        steps: int = 20,
        guidance: float = 1.0,
        copies: int = 1,
        progress: bool = False,
    ) -> ReplayBuffer:
        """`copies` samples per prompt (different noise), DDIM without guidance by default (DFR)."""
        prompts = [p for p in prompts for _ in range(copies)]
        x0 = teacher.sample_latents(prompts, seed=seed, steps=steps, guidance=guidance, progress=progress)
        return cls(prompts, x0.cpu())

    def take(self, idx: list[int]) -> torch.Tensor:
        return self.x0[idx]

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        save_file({"x0": self.x0.contiguous()}, path / "x0.safetensors")
        (path / "prompts.json").write_text(json.dumps(self.prompts) + "\n")
        return path

    @classmethod
    def load(cls, path: str | Path) -> ReplayBuffer:
        path = Path(path)
        return cls(json.loads((path / "prompts.json").read_text()), load_file(path / "x0.safetensors")["x0"])


class OnlineReplay:
    """DFR's original replay: fresh teacher samples for every batch (expensive)."""

    def __init__(self, teacher, prompts: Sequence[str], seed: int, steps: int = 20, guidance: float = 1.0) -> None:
        self.teacher = teacher
        self.prompts = list(prompts)
        self.seed = seed
        self.steps = steps
        self.guidance = guidance
        self.calls = 0
        self.images_generated = 0

    def __len__(self) -> int:
        return len(self.prompts)

    def take(self, idx: list[int]) -> torch.Tensor:
        """Fresh teacher samples of the indexed prompts (a new seed every call)."""
        x0 = self.teacher.sample_latents(
            [self.prompts[i] for i in idx],
            seed=self.seed * 100_003 + self.calls,
            steps=self.steps,
            guidance=self.guidance,
        )
        self.calls += 1
        self.images_generated += len(idx)
        return x0.cpu()
