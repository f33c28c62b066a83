"""MLflow: one experiment, a run per request with a nested run per attempt, and one registered
model whose versions are the accepted steps.

The gate sets the `candidate` alias; `champion` is moved by a person (MLflow UI or
`cul promote`), or by the flow when `pipeline.auto_promote` is on. The next step starts from
`models:/NAME@champion`. Weights travel as safetensors artifacts inside a pyfunc model that
generates images from prompts.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from contextlib import contextmanager
from pathlib import Path

from pydantic import BaseModel, ConfigDict

CHAMPION = "champion"
CANDIDATE = "candidate"


class TrackingSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    tracking_uri: str = "sqlite:///mlflow.db"  # env MLFLOW_TRACKING_URI wins
    experiment: str = "cul-continual-unlearning"
    registered_model: str = "cul-world"
    artifact_location: str | None = None  # e.g. s3://bucket/mlflow (env CUL_MLFLOW_ARTIFACTS wins)
    system_metrics: bool = True

    def resolved_uri(self) -> str:
        return os.environ.get("MLFLOW_TRACKING_URI") or self.tracking_uri

    def resolved_artifacts(self) -> str | None:
        return os.environ.get("CUL_MLFLOW_ARTIFACTS") or self.artifact_location


class ChampionInfo(BaseModel):
    version: int
    step: str | None  # DVC step key; None for the base model
    forgotten: list[str]
    run_id: str | None = None


class Tracker:
    def __init__(self, settings: TrackingSettings | None = None) -> None:
        import mlflow

        self.settings = settings or TrackingSettings()
        self.mlflow = mlflow
        mlflow.set_tracking_uri(self.settings.resolved_uri())
        self.client = mlflow.MlflowClient()
        self.experiment_id = self._experiment()

    def _experiment(self) -> str:
        exp = self.client.get_experiment_by_name(self.settings.experiment)
        if exp is not None:
            return exp.experiment_id
        return self.client.create_experiment(
            self.settings.experiment, artifact_location=self.settings.resolved_artifacts()
        )

    # -- runs ------------------------------------------------------------------------------------
    # Runs are opened by id and resumed where work happens, so a Prefect task in any thread or
    # process can log to them.
    def open_request(self, request_id: str, concept: str, tags: dict[str, str] | None = None) -> str:
        run = self.client.create_run(
            self.experiment_id,
            run_name=f"{request_id}-forget-{concept}",
            tags={"request_id": request_id, "concept": concept, **(tags or {})},
        )
        return run.info.run_id

    def open_attempt(self, parent_run_id: str, attempt: int, params: dict, tags: dict[str, str] | None = None) -> str:
        run = self.client.create_run(
            self.experiment_id,
            run_name=f"attempt-{attempt}",
            tags={"mlflow.parentRunId": parent_run_id, "attempt": str(attempt), **(tags or {})},
        )
        from mlflow.entities import Param

        self.client.log_batch(run.info.run_id, params=[Param(k, _short(v)) for k, v in params.items()])
        return run.info.run_id

    @contextmanager
    def resume(self, run_id: str, system_metrics: bool = False):
        """Make `run_id` the active run (sampling CPU/memory while inside, if asked)."""
        with self.mlflow.start_run(run_id=run_id, log_system_metrics=system_metrics and self.settings.system_metrics):
            yield

    def close(self, run_id: str, ok: bool = True) -> None:
        self.client.set_terminated(run_id, "FINISHED" if ok else "FAILED")

    def fail_open_runs(self, request_id: str) -> int:
        """Mark FAILED every run of `request_id` (and its attempts) still RUNNING: what a killed
        run leaves behind. Returns how many were closed."""
        running = "attributes.status = 'RUNNING'"
        found = self.client.search_runs([self.experiment_id], f"tags.request_id = '{request_id}' and {running}")
        for run in list(found):
            found += self.client.search_runs(
                [self.experiment_id], f"tags.mlflow.parentRunId = '{run.info.run_id}' and {running}"
            )
        for run in found:
            self.client.set_tag(run.info.run_id, "outcome", "interrupted")
            self.client.set_terminated(run.info.run_id, "FAILED")
        return len(found)

    def set_outcome(self, run_id: str, outcome: str) -> None:
        """What became of the request (`version N`, `review`), as the run's `outcome` tag."""
        self.client.set_tag(run_id, "outcome", outcome)

    def log_attempt(self, run_id: str, metrics: dict, verdict, report_dir: Path) -> None:
        """Metrics (training losses as series), the gate's checks and reasons, and the attempt's
        evaluation files."""
        with self.resume(run_id):
            scalars = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
            self.mlflow.log_metrics({k: float(v) for k, v in scalars.items()})
            for word, ua in (metrics.get("paraphrase_ua") or {}).items():
                self.mlflow.log_metric(f"paraphrase_ua.{re.sub(r'[^A-Za-z0-9_.-]', '_', word)}", ua)  # a valid name
            for family, summary in (metrics.get("probe_summary") or {}).items():  # cul.probes: worst per family
                self.mlflow.log_metric(f"recovery_worst.{family}", summary["worst"])
            if metrics.get("probes"):
                self.mlflow.log_dict({"probes": metrics["probes"]}, "probes.json")
            for row in metrics.get("history", []):
                self.mlflow.log_metrics({f"train.{k}": v for k, v in row.items() if k != "step"}, step=row["step"])
            self.mlflow.log_metric("gate_accepted", float(verdict.accepted))
            self.mlflow.set_tags(
                {
                    "gate": "accepted" if verdict.accepted else "rejected",
                    "gate_reasons": "; ".join(verdict.reasons)[:4900] or "-",
                }
            )
            self.mlflow.log_dict(verdict.model_dump(), "gate.json")
            if metrics.get("recipe") is not None:  # what made the attempt (cul.io.provenance)
                self.mlflow.log_dict(
                    {k: metrics.get(k) for k in ("recipe_name", "recipe_hash", "git_commit", "git_dirty", "recipe")},
                    "recipe.json",
                )
            for f in sorted(Path(report_dir).glob("*")):
                if f.is_file():
                    self.mlflow.log_artifact(str(f), "evaluation")

    # -- registry --------------------------------------------------------------------------------
    def register(self, run_id: str, model_dir: Path, tags: dict[str, str], auto_promote: bool = False) -> int:
        """Log the weights as a pyfunc in the (attempt) run and register a new version; tag it;
        point `candidate` at it (and `champion`, if auto-promoting)."""
        name = self.settings.registered_model
        with self.resume(run_id):
            info = self.mlflow.pyfunc.log_model(
                name="model",
                python_model=str(Path(__file__).with_name("pyfunc_model.py")),
                artifacts={"weights": str(model_dir)},
                pip_requirements=["cul"],
                registered_model_name=name,
            )
        version = int(info.registered_model_version)
        for k, v in tags.items():
            self.client.set_model_version_tag(name, str(version), k, str(v))
        self.client.set_registered_model_alias(name, CANDIDATE, str(version))
        if auto_promote:
            self.promote(version)
        return version

    def tag_version(self, version: int, key: str, value: str) -> None:
        self.client.set_model_version_tag(self.settings.registered_model, str(version), key, str(value))

    def promote(self, version: int) -> None:
        self.client.get_model_version(self.settings.registered_model, str(version))  # raises if unknown
        self.client.set_registered_model_alias(self.settings.registered_model, CHAMPION, str(version))

    def version_info(self, version: int) -> ChampionInfo:
        mv = self.client.get_model_version(self.settings.registered_model, str(version))
        return ChampionInfo(
            version=int(mv.version),
            step=mv.tags.get("step"),
            forgotten=json.loads(mv.tags.get("forgotten", "[]")),
            run_id=mv.run_id,
        )

    def champion(self) -> ChampionInfo | None:
        """The version the next step starts from, or None (no registered model or no champion)."""
        return self._alias(CHAMPION)

    def candidate(self) -> ChampionInfo | None:
        """The version the gate accepted last (alias `candidate`), or None."""
        return self._alias(CANDIDATE)

    def _alias(self, alias: str) -> ChampionInfo | None:
        """The version `alias` points at; None only when MLflow says the model or the alias does
        not exist (any other error is raised: a server that is down must not read as "no champion",
        or the next step would start from the base model)."""
        from mlflow.exceptions import MlflowException

        try:
            mv = self.client.get_model_version_by_alias(self.settings.registered_model, alias)
        except MlflowException as e:
            if e.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
                return None
            raise
        return self.version_info(int(mv.version))

    def version_metrics(self, version: int) -> dict[str, float]:
        """The metrics of the attempt that made `version` (UA, RA, FD, seconds...)."""
        mv = self.client.get_model_version(self.settings.registered_model, str(version))
        return dict(self.client.get_run(mv.run_id).data.metrics) if mv.run_id else {}

    def versions(self) -> list[dict]:
        from mlflow.exceptions import MlflowException

        name = self.settings.registered_model
        try:
            aliases = self.client.get_registered_model(name).aliases or {}
        except MlflowException:
            return []
        by_version: dict[str, list[str]] = {}
        for alias, v in aliases.items():
            by_version.setdefault(str(v), []).append(alias)
        out = []
        for mv in self.client.search_model_versions(f"name='{name}'"):
            out.append({"version": int(mv.version), "aliases": sorted(by_version.get(str(mv.version), [])), **mv.tags})
        return sorted(out, key=lambda r: r["version"])

    def install_webhook(self, url: str, secret: str) -> str:
        """The registry webhook telling `url` of alias moves (`cul hooks install`); an earlier
        one of this model is replaced. Returns its id."""
        name = f"cul-promotion-{self.settings.registered_model}"
        hook = self.client.create_webhook(
            name=name,
            url=url,
            events=["model_version_alias.created"],
            secret=secret,
            description=f"a champion move of {self.settings.registered_model} starts the next request",
        )
        page_token = None
        while True:  # then the earlier ones of this model, so no promotion falls between the two
            page = self.client.list_webhooks(page_token=page_token)
            for old in page:
                if old.name == name and old.webhook_id != hook.webhook_id:
                    self.client.delete_webhook(old.webhook_id)
            if not (page_token := page.token):
                break
        return hook.webhook_id

    def fetch_weights(self, version: int, dest: Path) -> Path:
        """The version's weights in `dest` (downloaded from the artifact store if not there: a
        worker on a fresh machine gets the champion this way)."""
        if (dest / "cul_model.json").exists():
            return dest
        import yaml

        tmp = Path(self.mlflow.artifacts.download_artifacts(f"models:/{self.settings.registered_model}/{version}"))
        # the pyfunc keeps the weights folder under the path its MLmodel names for `weights`
        flavor = yaml.safe_load((tmp / "MLmodel").read_text())["flavors"]["python_function"]
        src = tmp / flavor["artifacts"]["weights"]["path"]
        dest.mkdir(parents=True, exist_ok=True)
        shutil.copytree(src, dest, dirs_exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        return dest


def _short(v) -> str:
    s = v if isinstance(v, str) else json.dumps(v, default=str)
    return s[:6000]
