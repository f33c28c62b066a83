"""Settings: `params.yaml` validated by pydantic. One file drives the CLI, the flows and DVC."""

from __future__ import annotations

from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field

from cul.gate import EscalationPolicy, GateConfig
from cul.io.tracking import TrackingSettings
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


class QuickProfile(BaseModel):
    """`cul run --quick`: fewer requests, shorter training, a thinner evaluation."""

    model_config = ConfigDict(extra="forbid")

    requests: int = Field(2, ge=1)
    train_steps: int | None = Field(None, ge=1)  # None: the method's own steps
    eval_stride: int = Field(8, ge=1)
    max_attempts: int = Field(1, ge=1)


class PipelineSettings(BaseModel):
    """The flows: which method, the gate, retries, where tracking and versions go."""

    model_config = ConfigDict(extra="forbid")

    method: str = "dfr"
    requests_file: Path = Path("requests/queue.yaml")
    default_requests: Path = Path("benchmarks/default-sequence.yaml")  # what `cul run` queues
    eval_stride: int = Field(2, ge=1)
    gate: GateConfig = GateConfig()
    escalation: EscalationPolicy = EscalationPolicy()
    auto_promote: bool = False  # True: an accepted step becomes champion without a person
    tracking: TrackingSettings = TrackingSettings()
    dvc_push: bool = True
    git_commit: bool = True  # commit each accepted step's records (spec, lock, metrics)
    quick: QuickProfile = QuickProfile()
    cron: str = "0 2 * * *"  # the scheduled deployment of the continual flow


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
    pipeline: PipelineSettings = PipelineSettings()

    def quick_profile(self) -> "Params":
        """These settings with `pipeline.quick` applied (`cul run --quick`): the pipeline's method
        with the quick profile's training steps (if set), a thinner evaluation, fewer attempts."""
        q, pl = self.pipeline.quick, self.pipeline
        spec = self.unlearn.method(pl.method)
        if q.train_steps is not None:
            spec = spec.model_copy(update={"unlearn": spec.unlearn.model_copy(update={"steps": q.train_steps})})
        unlearn = self.unlearn.model_copy(update={"methods": {**self.unlearn.methods, pl.method: spec}})
        pipeline = pl.model_copy(update={
            "eval_stride": q.eval_stride,
            "escalation": pl.escalation.model_copy(update={"max_attempts": q.max_attempts})})
        return self.model_copy(update={"unlearn": unlearn, "pipeline": pipeline})

    @classmethod
    def load(cls, path: str | Path = "params.yaml") -> "Params":
        path = Path(path)
        if not path.exists():
            return cls()
        data = yaml.safe_load(path.read_text()) or {}
        return cls.model_validate(data)
