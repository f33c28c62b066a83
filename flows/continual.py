"""Prefect flows: one flow run per deletion request, and the continual flow that takes the pending
requests in order, each from the current `champion`.

Only wiring lives here: the request logic is `cul.pipeline.process_request`; these tasks run its
compute (data preparation, one attempt) and the flows publish its tables and records as Prefect
artifacts. Tasks pass paths, ids and small dicts, never tensors, so results cache and serialize.

On a laptop the continual flow holds the lineage and runs each request in its own process. On a
team's servers (`pipeline.dispatch`, `CUL_DATABASE_URL`) it dispatches each request as a flow run
of the request deployment on the GPU pool and watches it: the request run holds the lineage in
PostgreSQL, so requests of one model run one at a time whoever dispatched them, and a run whose
worker died (its lineage lock dropped) is crashed and dispatched again.
"""

from __future__ import annotations

import time
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import INPUTS, TASK_SOURCE

from cul import device, threads
from cul.config import Params
from cul.io.cache import CacheError, SharedCache, weights_digest
from cul.io.database import PgLineageLock, SqlQueue, lineage_lock, open_queue
from cul.io.tracking import Tracker, TrackingSettings
from cul.io.versioning import Versioner
from cul.pipeline import PipelineError, process_request, recover_stranded, stops_the_run, waiting_for_promotion
from cul.queue import State
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
    params, log = Params.model_validate_json(params_json), get_run_logger()
    tracker = Tracker(TrackingSettings.model_validate_json(tracking_json))
    shared = _pull_base_figures(params, log)
    with tracker.resume(run_id, system_metrics=True):
        metrics = train_and_evaluate(
            StepSpec.model_validate_json(spec_json), params, Path(data_dir), progress=True, log=log.info
        )
    if shared is not None:
        _push_base_figures(shared, params, log)
    return metrics


def _pull_base_figures(params: Params, log) -> SharedCache | None:
    """The base model's figures from `CUL_CACHE_URL` (`cul.io.cache`) into this clone before a step;
    the cache, or None when there is none. It only saves work: when it fails, the step goes on
    and computes the figures here."""
    try:
        cache = SharedCache.from_env(params.paths.base_model)
        if cache is not None:
            log.info(f"shared cache: pulled {', '.join(cache.pull(_base_reports(params))) or 'nothing new'}")
        return cache
    except CacheError as e:
        log.warning(f"shared cache: {e}; the base model's figures are computed here")
        return None


def _push_base_figures(cache: SharedCache, params: Params, log) -> None:
    """What the step added to the base model's figures, back to the shared cache."""
    try:
        log.info(f"shared cache: pushed {', '.join(cache.push(_base_reports(params))) or 'nothing new'}")
    except CacheError as e:
        log.warning(f"shared cache: {e}; the base model's figures stay in this clone only")


def _base_reports(params: Params) -> Path:
    return params.paths.reports / "base"


class TaskRunner:
    """`cul.pipeline.Runner` whose compute runs as Prefect tasks."""

    def __init__(self, params: Params) -> None:
        self.params = params

    def prepare(self, spec: StepSpec) -> str:
        # what the data depend on: not the attempt, nor the request's note
        data_spec = spec.model_copy(update={"request": spec.request.model_copy(update={"note": ""})})
        parent = weights_digest(spec.parent)
        args = (data_spec.model_dump_json(exclude={"attempt"}), self.params.model_dump_json(), parent)
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
    record as artifacts. Dispatched on a team's pool, it holds the lineage itself: it waits for
    the run ahead of it, then does nothing if the request was settled meanwhile."""
    params = load_params(params_path, quick)
    pl = params.pipeline
    if pl.dispatch is None:  # the continual flow of this process holds the lineage
        return _process(request_id, params, holder="")
    lock = _team_lock(params)
    from prefect.runtime import flow_run

    lock.holder = str(flow_run.id or "")
    with lock.hold(wait=pl.dispatch.lineage_wait_seconds):
        queue, tracker = open_queue(pl), Tracker(pl.tracking)
        recover_stranded(queue, tracker, log=get_run_logger().warning)  # the lineage is ours: in progress = dead
        item = queue.get(request_id)
        if item.state != State.pending:
            get_run_logger().info(f"{request_id} is {item.describe()} already; nothing to do")
            return {"request": request_id, "accepted": item.state == State.accepted, "version": item.version}
        if (waiting := waiting_for_promotion(tracker, params)) is not None:
            get_run_logger().warning(f"{request_id} waits: version {waiting} is the candidate, not yet champion")
            return {"request": request_id, "accepted": False, "version": None, "waiting_for": waiting}
        return _process(request_id, params, holder=lock.holder, holds_lineage=lock.still_held)


def _team_lock(params: Params) -> PgLineageLock:
    lock = lineage_lock(params.pipeline)
    if not isinstance(lock, PgLineageLock):
        raise PipelineError(
            "pipeline.dispatch needs the team's database: set CUL_DATABASE_URL (postgresql://...) on every "
            "worker, so the queue and the lineage lock are shared (infra/README.md)"
        )
    return lock


def _process(request_id: str, params: Params, holder: str, holds_lineage=lambda: True) -> dict:
    pl = params.pipeline
    outcome = process_request(
        request_id,
        params,
        open_queue(pl),
        Tracker(pl.tracking),
        Versioner(".", share=pl.dispatch is not None),  # a dispatched run's own clone: pull and push
        TaskRunner(params),
        log=get_run_logger().info,
        holder=holder,
        holds_lineage=holds_lineage,
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
    while a candidate waits for a person to promote it). On a laptop one run per model lineage at
    a time: a second run is refused (`LockBusy`); requests a dead run left in progress are redone.
    With `pipeline.dispatch`, each request runs on the GPU pool (`dispatch_request`)."""
    params = load_params(params_path, quick)
    if params.pipeline.dispatch is not None:
        return _publish(_dispatch_all(params, params_path, quick, limit))
    with lineage_lock(params.pipeline).hold():
        return _publish(_continual(params, params_path, quick, limit))


def _continual(params: Params, params_path: str, quick: bool, limit: int | None) -> list[dict]:
    if params.pipeline.concept_catalogue().name == "world":
        prepare_world(params.world.size, params.world.seed, params.world.eval_seed, str(params.paths.world))
    queue = open_queue(params.pipeline)
    recover_stranded(queue, Tracker(params.pipeline.tracking), log=get_run_logger().warning)
    pending = queue.pending()[: limit or None]
    results = []
    for item in pending:
        t0 = time.perf_counter()
        out = request_flow(item.id, params_path, quick)
        results.append(_with_overhead(out, time.perf_counter() - t0))
        waiting = len(pending) - len(results)
        if stops_the_run(out, params):
            if waiting:
                get_run_logger().warning(
                    f"version {out['version']} is the candidate; {waiting} request(s) wait "
                    "until a person moves `champion` to it (MLflow UI or `cul promote`)"
                )
            break
    return results


def _with_overhead(out: dict, seconds_total: float) -> dict:
    """Orchestration = everything but replay, training and evaluation, relative to them."""
    out["seconds_total"] = round(seconds_total, 1)
    if out.get("seconds_step") is not None:
        compute = out["seconds_step"] + out["seconds_eval"]
        out["overhead"] = round((out["seconds_total"] - compute) / compute, 3)
    return out


def _publish(results: list[dict]) -> list[dict]:
    if results:
        create_table_artifact(
            [{k: v for k, v in r.items() if not isinstance(v, (list, dict))} for r in results],
            key="continual-run",
            description="requests processed by this run",
        )
    return results


def _dispatch_all(params: Params, params_path: str, quick: bool, limit: int | None) -> list[dict]:
    """The pending requests one after another, each as a flow run on the GPU pool; stops while a
    candidate waits for promotion (a promotion starts the next run: flows/promotion.py)."""
    pl = params.pipeline
    queue, tracker, lock = open_queue(pl), Tracker(pl.tracking), _team_lock(params)
    assert isinstance(queue, SqlQueue)
    results: list[dict] = []
    while limit is None or len(results) < limit:
        if (waiting := waiting_for_promotion(tracker, params)) is not None:
            if queue.pending():
                get_run_logger().warning(
                    f"version {waiting} is the candidate; the pending requests wait until a person moves "
                    "`champion` to it (MLflow UI or `cul promote`)"
                )
            break
        pending = queue.pending()
        if not pending:
            break
        results.append(dispatch_request(pending[0].id, params, params_path, quick, queue, tracker, lock))
    return results


def dispatch_request(
    request_id: str,
    params: Params,
    params_path: str,
    quick: bool,
    queue: SqlQueue,
    tracker: Tracker,
    lock: PgLineageLock,
) -> dict:
    """Run one request on the GPU pool until it is settled (accepted or sent to review). Each
    flow run's idempotency key is the request and its try, so dispatchers racing for the same
    request share one run. A run whose worker died (the request in progress under it, its lineage
    lock gone) is marked crashed and the request dispatched again, up to `max_tries`."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.objects import FlowRun
    from prefect.deployments import run_deployment
    from prefect.states import Crashed

    d = params.pipeline.dispatch
    assert d is not None
    log = get_run_logger()
    t0 = time.perf_counter()
    while True:
        item = queue.get(request_id)
        if item.state in (State.accepted, State.review):
            break
        if item.tries >= d.max_tries:
            raise PipelineError(
                f"{request_id}: {item.tries} flow runs ended without settling it"
                f"{' (' + '; '.join(item.reasons) + ')' if item.reasons else ''}; it stays pending. "
                f"Read those runs' logs in the Prefect UI ({d.deployment}), fix the cause, then `cul request retry`."
            )
        dispatched = item.tries
        run: FlowRun = run_deployment(  # type: ignore[assignment]  # sync here: a FlowRun, not a coroutine
            d.deployment,
            parameters={"request_id": request_id, "params_path": params_path, "quick": quick},
            idempotency_key=f"{params.pipeline.tracking.registered_model}/{request_id}/dispatch-{item.dispatches}",
            job_variables=d.job_variables,
            timeout=0,
        )
        log.info(f"{request_id}: flow run {run.name} on {d.deployment} (try {item.tries})")
        suspect = 0
        with get_client(sync_client=True) as client:
            while True:
                state = client.read_flow_run(run.id).state
                if state is not None and state.is_final():
                    break
                now = queue.get(request_id)
                dead = now.state == State.in_progress and now.holder == str(run.id) and lock.is_free()
                suspect = suspect + 1 if dead else 0
                if suspect >= 2:  # seen twice, `poll_seconds` apart: its worker is gone
                    client.set_flow_run_state(
                        run.id, Crashed(message="its worker died: lineage lock dropped"), force=True
                    )
                    log.warning(f"{request_id}: the worker of {run.name} died during the step; dispatching again")
                    break
                time.sleep(d.poll_seconds)
        item = queue.get(request_id)
        if item.state not in (State.accepted, State.review):  # counted once, however many dispatchers watched
            queue.bump_tries(request_id, seen=dispatched)
    return _with_overhead(_settled(item, tracker), time.perf_counter() - t0)


def _settled(item, tracker: Tracker) -> dict:
    """A settled request as the continual table shows it, with its step's timings from MLflow."""
    out = {"request": item.id, "accepted": item.state == State.accepted, "version": item.version, "tries": item.tries}
    if item.state == State.accepted and item.version is not None:
        m = tracker.version_metrics(item.version)
        keys = ("ua", "ra_in", "ra_cross", "ra_neighbour", "fd_ratio")
        out.update({k: m.get(k) for k in keys}, step=item.step)
        if "seconds_step" in m:  # replay and training, as the step measured them
            out["seconds_step"], out["seconds_eval"] = m["seconds_step"], m.get("seconds_eval", 0.0)
    else:
        out["reasons"] = item.reasons
    return out
