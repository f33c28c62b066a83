"""Retraining without the forgotten concepts: the gold standard of machine unlearning.

Exact unlearning trains the model again on the data without what is to be forgotten (Bourtoule et
al., "Machine Unlearning", 2021, call it retraining from scratch; every approximate method is
measured against it). For the world this is cheap enough to run once per sequence: the base
model's pretraining (`cul.pretrain`), same settings, seed and initialisation, on a stream that
never shows a concept of the sequence (`World(exclude=...)`). It answers what no erasure can be
asked for: what an attack brings back from a model that never saw the concept (a flat background,
for one, is what any model draws for a texture word it cannot place).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from pydantic import BaseModel, ConfigDict

from cul.models.diffusion import SamplingConfig, WorldUNetConfig
from cul.pretrain import PretrainConfig, Pretrainer
from cul.world import World


class Retraining(BaseModel):
    """What a retrained model is made of.

    Args:
        exclude: the concepts no training image shows (a sequence's forgotten concepts).
        pretrain: the pretraining settings (the base model's: `params.yaml`'s `pretrain`).
        model: the UNet's configuration (the base model's: `params.yaml`'s `model`).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    exclude: tuple[str, ...]
    pretrain: PretrainConfig
    model: WorldUNetConfig

    def world(self) -> World:
        """The training stream: the base model's (same size and seed) without the excluded concepts;
        ValueError or KeyError for a concept the world lacks or a kind left empty."""
        return World(size=self.model.sample_size, seed=self.pretrain.seed, exclude=self.exclude)

    def recipe(self) -> dict:
        """The record of what was trained (its hash names the checkpoints and the result)."""
        return {
            "retrain": "pretrain without the sequence's concepts",
            "exclude": sorted(set(self.exclude)),
            "pretrain": self.pretrain.model_dump(mode="json"),
            "model": self.model.model_dump(mode="json"),
        }

    def digest(self) -> str:
        """12 hex digits of the SHA-256 of `recipe()` (sorted-key JSON)."""
        return hashlib.sha256(json.dumps(self.recipe(), sort_keys=True).encode()).hexdigest()[:12]

    def trainer(self, checkpoints: str | Path, sampling: SamplingConfig | None = None) -> Pretrainer:
        """The resumable pretraining run, its checkpoints under CHECKPOINTS/retrain-DIGEST (another
        exclusion or setting never resumes them)."""
        return Pretrainer(
            self.model, self.pretrain, Path(checkpoints) / f"retrain-{self.digest()}", sampling, world=self.world()
        )
