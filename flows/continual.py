"""Prefect flows: one flow run per deletion request, and the continual flow that takes the pending
requests in order, each from the current `champion`.

Only wiring lives here: the request logic is `cul.pipeline.process_request`; these tasks run its
compute (data preparation, one attempt) and the flows publish its tables and records as Prefect
artifacts. Tasks pass paths, ids and small dicts, never tensors, so results cache and serialize.
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import INPUTS, TASK_SOURCE

from cul import device, threads
from cul.config import Params
from cul.io.locks import LineageLock
from cul.io.tracking import Tracker, TrackingSettings
from cul.io.versioning import Versioner
from cul.pipeline import process_request, recover_stranded, stops_the_run
from cul.queue import RequestQueue
from cul.step import StepSpec, prepare_data, train_and_evaluate


def load_params(params_path: str, quick: bool) -> Params:
    """params.yaml, with the quick profile applied when asked."""
    p = Params.load(params_path)
    threads.configure(p.compute)
    device.configure(p.device)
    return p.quick_profile() if quick else p


@task(cache_policy=INPUTS + TASK_SOURCE, persist_result=True)
def prepare_world(size: int, seed: int, eval_seed: int, out: str) -> str:
    """The world's reference data (only needed once per world config)."""
    from cul.config import WorldConfig
    from cul.data import build_world

    if not (Path(out) / "reference.npz").exists():
        build_world(WorldConfig(size=size, seed=seed, eval_seed=eval_seed), Path(out))
    return out


@task(cache_policy=INPUTS + TASK_SOURCE, persist_result=True)
def prepare_step_data(spec_json: str, params_json: str, parent_hash: str) -> str:
    """Prompt set and teacher samples of a request; cached on the spec's data-relevant fields and
    the parent's weights, so retries and reruns reuse them."""
    return str(prepare_data(StepSpec.model_validate_json(spec_json), Params.model_validate_json(params_json)))


@task
def unlearn_and_evaluate(spec_json: str, params_json: str, data_dir: str, run_id: str, tracking_json: str) -> dict:
    tracker = Tracker(TrackingSettings.model_validate_json(tracking_json))
    with tracker.resume(run_id, system_metrics=True):
        return train_and_evaluate(
            StepSpec.model_validate_json(spec_json),
            Params.model_validate_json(params_json),
            Path(data_dir),
            progress=True,
            log=get_run_logger().info,
        )


def _tree_hash(folder: str) -> str:
    h = hashlib.sha256()
    for f in sorted(Path(folder).rglob("*.safetensors")):
        h.update(f.read_bytes())
    return h.hexdigest()


class TaskRunner:
    """`cul.pipeline.Runner` whose compute runs as Prefect tasks."""

    def __init__(self, params: Params) -> None:
        self.params = params

    def prepare(self, spec: StepSpec) -> str:
        # what the data depend on: not the attempt, nor the request's note
        data_spec = spec.model_copy(update={"request": spec.request.model_copy(update={"note": ""})})
        args = (data_spec.model_dump_json(exclude={"attempt"}), self.params.model_dump_json(), _tree_hash(spec.parent))
        data_dir = prepare_step_data(*args)
        if not (Path(data_dir) / "prompts.json").exists():  # a cached result whose folder was cleaned
            data_dir = prepare_step_data.with_options(refresh_cache=True)(*args)
        return data_dir

    def attempt(self, spec: StepSpec, data_dir: str, run_id: str) -> dict:
        return unlearn_and_evaluate(
            spec.model_dump_json(),
            self.params.model_dump_json(),
            data_dir,
            run_id,
            self.params.pipeline.tracking.model_dump_json(),
        )


@flow(name="cul-request", log_prints=True)
def request_flow(request_id: str, params_path: str = "params.yaml", quick: bool = False) -> dict:
    """One deletion request (`cul.pipeline.process_request`), with its attempts table and deletion
    record as artifacts."""
    params = load_params(params_path, quick)
    pl = params.pipeline
    outcome = process_request(
        request_id,
        params,
        RequestQueue(pl.requests_file),
        Tracker(pl.tracking),
        Versioner("."),
        TaskRunner(params),
        log=get_run_logger().info,
    )
    if outcome.attempts:
        create_table_artifact(
            outcome.attempts, key=f"{request_id}-attempts", description=f"{request_id}: forget {outcome.concept}"
        )
    if outcome.record is not None:
        create_markdown_artifact(
            Path(outcome.record).read_text(),
            key=f"{request_id}-deletion-record",
            description=f"deletion record of {request_id}",
        )
    if not outcome.accepted:
        get_run_logger().warning(f"{request_id}: sent to review; champion unchanged")
    return outcome.summary()


@flow(name="cul-continual", log_prints=True)
def continual_flow(params_path: str = "params.yaml", quick: bool = False, limit: int | None = None) -> list[dict]:
    """Every pending request, oldest first, each from the champion at that moment (a run stops
    after its first accepted step when a person promotes versions). One run per model lineage at a
    time: a second run is refused (`LockBusy`); requests a dead run left in progress are redone."""
    params = load_params(params_path, quick)
    with LineageLock(params.pipeline.tracking.registered_model).hold():
        return _continual(params, params_path, quick, limit)


def _continual(params: Params, params_path: str, quick: bool, limit: int | None) -> list[dict]:
    if params.pipeline.concept_catalogue().name == "world":
        prepare_world(params.world.size, params.world.seed, params.world.eval_seed, str(params.paths.world))
    queue = RequestQueue(params.pipeline.requests_file)
    recover_stranded(queue, Tracker(params.pipeline.tracking), log=get_run_logger().warning)
    pending = queue.pending()[: limit or None]
    results = []
    for item in pending:
        t0 = time.perf_counter()
        out = request_flow(item.id, params_path, quick)
        out["seconds_total"] = round(time.perf_counter() - t0, 1)
        if out.get("seconds_step") is not None:  # orchestration = everything but replay, training, evaluation
            compute = out["seconds_step"] + out["seconds_eval"]
            out["overhead"] = round((out["seconds_total"] - compute) / compute, 3)
        results.append(out)
        waiting = len(pending) - len(results)
        if stops_the_run(out, params):
            if waiting:
                get_run_logger().warning(
                    f"version {out['version']} is the candidate; {waiting} request(s) wait "
                    "until a person moves `champion` to it (MLflow UI or `cul promote`)"
                )
            break
    if results:
        create_table_artifact(
            [{k: v for k, v in r.items() if not isinstance(v, (list, dict))} for r in results],
            key="continual-run",
            description="requests processed by this run",
        )
    return results
