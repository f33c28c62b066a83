"""Prefect flows: one flow run per deletion request (prepare -> unlearn -> evaluate -> gate ->
register -> version), and the continual flow that takes the pending requests in order, each
starting from the current `champion`.

Only wiring lives here: every task calls `cul` (the library) or `cul.io` (MLflow, DVC, git).
Tasks pass paths, ids and small dicts, never tensors, so results cache and serialize.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import INPUTS, TASK_SOURCE

from cul.audit import write_deletion_record
from cul.config import Params
from cul.gate import Gate, Verdict
from cul.io.tracking import Tracker
from cul.io.versioning import Versioner
from cul.queue import RequestQueue, State
from cul.step import StepSpec, load_steps, next_key, prepare_data, save_step, train_and_evaluate
from cul.unlearning.sequence import EvalSpec

PIPELINE_OUTPUTS = ("requests", "dvc.lock", "reports/steps", "reports/audit")


def load_params(params_path: str, quick: bool) -> Params:
    """params.yaml, with the quick profile applied when asked."""
    p = Params.load(params_path)
    return p.quick_profile() if quick else p


# -- data preparation ---------------------------------------------------------------------------
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
    """Prompt set and replay buffers of a request; cached on the spec's data-relevant fields and
    the parent's weights, so retries and reruns reuse them."""
    spec = StepSpec.model_validate_json(spec_json)
    return str(prepare_data(spec, Params.model_validate_json(params_json)))


# -- one attempt ----------------------------------------------------------------------------------
@task
def unlearn_and_evaluate(spec_json: str, params_json: str, data_dir: str, run_id: str, tracking_json: str) -> dict:
    from cul.io.tracking import TrackingSettings

    spec = StepSpec.model_validate_json(spec_json)
    params = Params.model_validate_json(params_json)
    tracker = Tracker(TrackingSettings.model_validate_json(tracking_json))
    with tracker.resume(run_id, system_metrics=True):
        return train_and_evaluate(spec, params, Path(data_dir), progress=True, log=get_run_logger().info)


@task
def decide(metrics: dict, forgotten: list[str], previous: dict | None, gate_json: str) -> dict:
    from cul.gate import GateConfig

    return Gate(GateConfig.model_validate_json(gate_json)).decide(metrics, forgotten, previous).model_dump()


@task
def version_outputs(spec_json: str, push: bool) -> str:
    """The accepted spec joins requests/steps.yaml; dvc.lock gets the step (its outputs hashed
    into the DVC cache); the remote gets the outputs. Returns the model folder's DVC md5."""
    spec = StepSpec.model_validate_json(spec_json)
    v = Versioner(".")
    save_step(spec)
    md5 = v.record_step(spec.key)
    if push:
        v.push(f"step@{spec.key}")
    return md5


@task
def commit_records(message: str, commit: bool) -> str:
    """Git gets the spec, lock, queue, metrics and deletion record: that commit is the step's
    DVC revision (check it out, `dvc pull`, `dvc repro step@KEY`)."""
    v = Versioner(".")
    return v.commit(message, list(PIPELINE_OUTPUTS)) if commit else v.head()


@task
def register_version(run_id: str, spec_json: str, tags: dict, auto_promote: bool, tracking_json: str) -> int:
    from cul.io.tracking import TrackingSettings

    spec = StepSpec.model_validate_json(spec_json)
    tracker = Tracker(TrackingSettings.model_validate_json(tracking_json))
    return tracker.register(run_id, spec.model_dir, tags, auto_promote)


# -- flows ----------------------------------------------------------------------------------------
def _starting_point(tracker: Tracker, params: Params) -> tuple[str, int | None, list[str], dict | None]:
    """(model folder, version, forgotten, per-concept scores) of the champion, else the base."""
    champ = tracker.champion()
    if champ is None or champ.step is None:
        return str(params.paths.base_model), (champ.version if champ else None), [], None
    model_dir = Path("models/steps") / champ.step
    tracker.fetch_weights(champ.version, model_dir)
    metrics_file = Path("reports/steps") / champ.step / "metrics.json"
    previous = json.loads(metrics_file.read_text())["per_concept"] if metrics_file.exists() else None
    return str(model_dir), champ.version, champ.forgotten, previous


def _tree_hash(folder: str) -> str:
    import hashlib

    h = hashlib.sha256()
    for f in sorted(Path(folder).rglob("*.safetensors")):
        h.update(f.read_bytes())
    return h.hexdigest()


@flow(name="cul-request", log_prints=True)
def request_flow(request_id: str, params_path: str = "params.yaml", quick: bool = False) -> dict:
    """One deletion request: attempts with escalation until the gate accepts (then register,
    version, audit) or the attempts run out (then review; the champion stays)."""
    logger = get_run_logger()
    params = load_params(params_path, quick)
    pl = params.pipeline
    queue = RequestQueue(pl.requests_file)
    item = queue.get(request_id)
    tracker = Tracker(pl.tracking)
    versioner = Versioner(".")
    parent, parent_version, forgotten, previous = _starting_point(tracker, params)
    if item.concept in forgotten:
        queue.update(request_id, state=State.accepted, version=parent_version)
        logger.info(f"{request_id}: {item.concept} is already forgotten by version {parent_version}; no-op")
        return {"request": request_id, "accepted": True, "version": parent_version, "noop": True}
    queue.update(request_id, state=State.in_progress)
    key = next_key(list(load_steps()))
    method = params.unlearn.method(pl.method)
    base_spec = StepSpec(key=key, request=item.request(), parent=parent, parent_version=parent_version,
                         forgotten=forgotten, method=pl.method, spec=method,
                         eval=EvalSpec(**{**params.eval.model_dump(), "stride": pl.eval_stride}),
                         seed=int(key[1:]))
    code_rev = versioner.head()
    run_id = tracker.open_request(request_id, item.concept, {"step": key, "git_commit": code_rev,
                                                              "parent_version": str(parent_version)})
    logger.info(f"{request_id}: forget {item.concept} from {parent} (version {parent_version}) as step {key}")
    data_spec = base_spec.model_copy(update={"request": item.request().model_copy(update={"note": ""})})
    data_dir = prepare_step_data(data_spec.model_dump_json(exclude={"attempt"}), params.model_dump_json(),
                                 _tree_hash(parent))
    if not (Path(data_dir) / "prompts.json").exists():  # cached result but the folder was cleaned
        data_dir = prepare_step_data.with_options(refresh_cache=True)(
            data_spec.model_dump_json(exclude={"attempt"}), params.model_dump_json(), _tree_hash(parent))
    rows, verdict, metrics, spec, attempt_run, failed = [], None, None, base_spec, None, []
    for attempt in range(pl.escalation.max_attempts):
        cfg = pl.escalation.config_for(method.unlearn, attempt, failed)
        spec = base_spec.model_copy(update={"attempt": attempt, "spec": method.model_copy(update={"unlearn": cfg})})
        attempt_run = tracker.open_attempt(run_id, attempt, {"method": pl.method, **cfg.model_dump(),
                                                             "parent": parent, "forgotten": forgotten})
        t0 = time.perf_counter()
        metrics = unlearn_and_evaluate(spec.model_dump_json(), params.model_dump_json(), data_dir, attempt_run,
                                       pl.tracking.model_dump_json())
        verdict = decide(metrics, forgotten + [item.concept], previous, pl.gate.model_dump_json())
        v = Verdict.model_validate(verdict)
        tracker.log_attempt(attempt_run, metrics, v, spec.report_dir)
        tracker.close(attempt_run)
        rows.append({"attempt": attempt, "l_unl": cfg.l_unl, "l_pres": cfg.l_pres, "l_reg": cfg.l_reg,
                     "l2sp": cfg.l2sp, "steps": cfg.steps,
                     "UA": _pct(metrics["ua"]), "RA-I": _pct(metrics["ra_in"]), "RA-C": _pct(metrics["ra_cross"]),
                     "RA-N": _pct(metrics["ra_neighbour"]), "FD ratio": f"{metrics.get('fd_ratio') or 0:.2f}",
                     "seconds": round(time.perf_counter() - t0, 1), "verdict": v.summary()})
        logger.info(f"{request_id} attempt {attempt}: {v.summary()}")
        if v.accepted:
            break
        failed = [c.name for c in v.checks if not c.passed]
    create_table_artifact(rows, key=f"{request_id}-attempts", description=f"{request_id}: forget {item.concept}")
    if not v.accepted:
        queue.update(request_id, state=State.review, reasons=v.reasons)
        for d in (spec.model_dir, spec.report_dir, spec.data_dir):
            shutil.rmtree(d, ignore_errors=True)
        tracker.mlflow.MlflowClient().set_tag(run_id, "outcome", "review")
        tracker.close(run_id, ok=True)
        logger.warning(f"{request_id}: rejected after {len(rows)} attempt(s); champion unchanged")
        return {"request": request_id, "accepted": False, "reasons": v.reasons, "attempts": len(rows),
                **_step_figures(metrics)}

    message = f"cul: {request_id} forget {item.concept} -> step {key}"
    version_json = spec.model_dump_json()
    tags = {"request_id": request_id, "concept": item.concept, "step": key, "gate": "accepted",
            "forgotten": json.dumps(forgotten + [item.concept]), "parent_version": str(parent_version or "base"),
            "git_commit": code_rev, "attempt": str(spec.attempt)}
    tags["dvc_md5"] = version_outputs(version_json, pl.dvc_push)
    tags["dvc_stage"] = f"step@{key}"
    version = register_version(attempt_run, version_json, tags, pl.auto_promote, pl.tracking.model_dump_json())
    queue.update(request_id, state=State.accepted, version=version, step=key, reasons=[])
    record = write_deletion_record(item, spec, metrics, v, version, pl.tracking.registered_model, tags)
    rev = commit_records(message, pl.git_commit)
    tracker.client.set_model_version_tag(pl.tracking.registered_model, str(version), "dvc_rev", rev)
    dvc = {"dvc_md5": tags["dvc_md5"], "dvc_rev": rev}
    tracker.client.set_tag(run_id, "outcome", f"version {version}")
    tracker.close(run_id)
    create_markdown_artifact(Path(record).read_text(), key=f"{request_id}-deletion-record",
                             description=f"deletion record of {request_id}")
    return {"request": request_id, "accepted": True, "version": version, "step": key, **dvc, **_step_figures(metrics)}


@flow(name="cul-continual", log_prints=True)
def continual_flow(params_path: str = "params.yaml", quick: bool = False, limit: int | None = None) -> list[dict]:
    """Every pending request, oldest first, each from the champion at that moment. Without
    auto-promotion, a run stops after its first accepted step: the next request must start from
    that step, and only a person makes it the champion."""
    params = load_params(params_path, quick)
    prepare_world(params.world.size, params.world.seed, params.world.eval_seed, str(params.paths.world))
    queue = RequestQueue(params.pipeline.requests_file)
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
        if out["accepted"] and not out.get("noop") and not params.pipeline.auto_promote:
            # the next request must start from this step, which a person has yet to promote
            waiting = len(pending) - len(results)
            if waiting:
                get_run_logger().warning(f"version {out['version']} is the candidate; {waiting} request(s) wait "
                                         "until a person moves `champion` to it (MLflow UI or `cul promote`)")
            break
    if results:
        create_table_artifact([{k: v for k, v in r.items() if not isinstance(v, (list, dict))} for r in results],
                              key="continual-run", description="requests processed by this run")
    return results


def _step_figures(metrics: dict) -> dict:
    """What the summary table shows of an attempt's evaluation (the last attempt, if rejected)."""
    keys = ("ua", "ra_in", "ra_cross", "ra_neighbour", "fd_ratio", "seconds_step", "seconds_eval")
    return {k: metrics.get(k) for k in keys}


def _pct(x) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}"
