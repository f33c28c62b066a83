"""Settings: `params.yaml` validated by pydantic. One file drives the CLI, the flows and DVC.

`params.yaml` holds what production runs; the code defaults here equal it (a test checks), and
recipes other than the production ones live in `experiments/`. A missing or unreadable params file
is an error, never a silent fall-back to defaults."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from cul.catalogue import Catalogue, CatalogueError
from cul.device import DeviceSettings
from cul.evaluation import EvalSpec
from cul.gate import EscalationPolicy, GateConfig
from cul.io.tracking import TrackingSettings
from cul.judge import JudgeConfig
from cul.models.diffusion import SamplingConfig, WorldUNetConfig
from cul.pretrain import PretrainConfig
from cul.threads import ComputeSettings
from cul.unlearning.recipes import Recipe, RecipeError, load_recipe


class ParamsError(ValueError):
    """A params file that is missing, unreadable or invalid; the message names the file and key."""


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


class QuickProfile(BaseModel):
    """`cul run --quick`: fewer requests, shorter training, a thinner evaluation."""

    model_config = ConfigDict(extra="forbid")

    requests: int = Field(2, ge=1)
    train_steps: int | None = Field(None, ge=1)  # None: the method's own steps
    eval_stride: int = Field(4, ge=1)
    max_attempts: int = Field(2, ge=1)


class DispatchSettings(BaseModel):
    """A team's pipeline: the continual flow (on a CPU pool) runs each request as a flow run of
    the request deployment (on the GPU pool) and watches it. Needs `CUL_DATABASE_URL`: the queue
    and the lineage lock every worker shares (`cul.io.database`)."""

    model_config = ConfigDict(extra="forbid")

    deployment: str = "cul-request/gpu"  # FLOW/DEPLOYMENT of the request flow (prefect.yaml)
    job_variables: dict[str, Any] = Field(default_factory=lambda: {"gpu_count": 1})  # for the GPU pool's job
    poll_seconds: float = Field(5.0, gt=0)  # how often the dispatcher looks at a request's flow run
    max_tries: int = Field(3, ge=1)  # flow runs of one request that may end without an outcome
    lineage_wait_seconds: float = Field(6 * 3600, ge=0)  # how long a request run waits for the lineage


class PipelineSettings(BaseModel):
    """The flows: which method, the gate, retries, where tracking and versions go."""

    model_config = ConfigDict(extra="forbid")

    method: str = "dfr"  # a production method (dfr, ca, esd, naive) or a recipe file (experiments/NAME.yaml)
    catalogue: str = "world"  # what requests may name: catalogues/NAME.yaml, or a path to a catalogue file
    train_steps: int | None = Field(None, ge=1)  # None: the recipe's own steps (the quick profile may set it)
    requests_file: Path = Path("requests/queue.yaml")
    default_requests: Path = Path("benchmarks/default-sequence.yaml")  # what `cul run` queues
    eval_stride: int = Field(2, ge=1)
    gate: GateConfig = GateConfig()
    escalation: EscalationPolicy = EscalationPolicy()
    auto_promote: bool = True  # True: an accepted step becomes champion without a person
    tracking: TrackingSettings = TrackingSettings()
    dvc_push: bool = True
    git_commit: bool = True  # commit each accepted step's records (spec, lock, metrics)
    quick: QuickProfile = QuickProfile()
    cron: str = "0 2 * * *"  # the scheduled deployment of the continual flow
    dispatch: DispatchSettings | None = None  # None: each request runs in the continual flow's process

    @field_validator("catalogue")
    @classmethod
    def _catalogue_loads(cls, v: str) -> str:
        try:
            Catalogue.load(v)
        except CatalogueError as e:
            raise ValueError(str(e)) from e
        return v

    def concept_catalogue(self) -> Catalogue:
        return Catalogue.load(self.catalogue)

    @field_validator("method")
    @classmethod
    def _resolves(cls, v: str) -> str:
        try:
            load_recipe(v)
        except RecipeError as e:
            raise ValueError(str(e)) from e
        return v

    def recipe(self) -> tuple[str, Recipe]:
        """(name, recipe) the pipeline runs: `method` resolved, with `train_steps` applied."""
        name, recipe = load_recipe(self.method)
        return name, (recipe.with_steps(self.train_steps) if self.train_steps else recipe)


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
    pipeline: PipelineSettings = PipelineSettings()
    compute: ComputeSettings = ComputeSettings()  # CPU threads: the free cores, measured (cul/threads.py)
    device: DeviceSettings = DeviceSettings()  # where models run, precision, checkpointing (cul/device.py)

    @model_validator(mode="after")
    def _judge_knows_the_catalogue(self) -> Params:
        if self.judge.kind == "world" and self.pipeline.concept_catalogue().name != "world":
            raise ValueError(
                f"judge.kind world (the world's CNN) cannot judge the catalogue {self.pipeline.catalogue!r}: "
                "set judge.kind to clip or vlm and paths.judge to a local model directory"
            )
        return self

    def quick_profile(self) -> Params:
        """These settings with `pipeline.quick` applied (`cul run --quick`): the quick profile's
        training steps (if set), a thinner evaluation, at most its attempts (never more than
        `escalation.max_attempts`)."""
        q, pl = self.pipeline.quick, self.pipeline
        pipeline = pl.model_copy(
            update={
                "train_steps": q.train_steps or pl.train_steps,
                "eval_stride": q.eval_stride,
                "escalation": pl.escalation.model_copy(
                    update={"max_attempts": min(q.max_attempts, pl.escalation.max_attempts)}
                ),
            }
        )
        return self.model_copy(update={"pipeline": pipeline})

    @classmethod
    def load(cls, path: str | Path = "params.yaml") -> Params:
        """The settings of `path`; a missing, unreadable, empty or invalid file raises `ParamsError`."""
        path = Path(path)
        if not path.is_file():
            raise ParamsError(f"{path}: no such params file (run from the project root, or pass --params)")
        try:
            data = yaml.safe_load(path.read_text())
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
            raise ParamsError(f"{path}: cannot be read as YAML ({e})") from e
        if not isinstance(data, dict) or not data:
            raise ParamsError(f"{path}: empty, or not a mapping of settings")
        try:
            return cls.model_validate(data)
        except ValidationError as e:
            raise ParamsError(f"{path}: {e}") from e
