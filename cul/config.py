"""Settings: `params.yaml` validated by pydantic. One file drives the CLI, the flows and DVC."""

from __future__ import annotations

from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field

from cul.judge import JudgeConfig
from cul.models.diffusion import SamplingConfig, WorldUNetConfig
from cul.pretrain import PretrainConfig
from cul.unlearning.sequence import EvalSpec, MethodSpec


class WorldConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    size: int = Field(32, ge=16)
    seed: int = 0
    eval_seed: int = 4242


class PathsConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    world: Path = Path("data/world")
    base_model: Path = Path("models/base")
    judge: Path = Path("models/judge")
    checkpoints: Path = Path("checkpoints")
    reports: Path = Path("reports")


class UnlearnParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    default: str = "dfr"
    methods: dict[str, MethodSpec] = {"dfr": MethodSpec()}

    def method(self, name: str | None) -> MethodSpec:
        name = name or self.default
        if name not in self.methods:
            raise KeyError(f"unknown method {name!r}; params.yaml defines: {', '.join(self.methods)}")
        return self.methods[name]


class Params(BaseModel):
    """Everything in params.yaml. Unknown keys are an error, so typos do not pass silently."""

    model_config = ConfigDict(extra="forbid")

    world: WorldConfig = WorldConfig()
    model: WorldUNetConfig = WorldUNetConfig()
    sampling: SamplingConfig = SamplingConfig()
    pretrain: PretrainConfig = PretrainConfig()
    judge: JudgeConfig = JudgeConfig()
    eval: EvalSpec = EvalSpec()  # seeds of every evaluation; stride applies to unlearning runs
    paths: PathsConfig = PathsConfig()
    unlearn: UnlearnParams = UnlearnParams()

    @classmethod
    def load(cls, path: str | Path = "params.yaml") -> "Params":
        path = Path(path)
        if not path.exists():
            return cls()
        data = yaml.safe_load(path.read_text()) or {}
        return cls.model_validate(data)
