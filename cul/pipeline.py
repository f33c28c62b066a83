"""The life of one deletion request, with the services it needs passed in (no Prefect here).

    champion -> no-op if already forgotten -> prepare data -> attempts (unlearn, evaluate, gate,
    escalate) -> accepted: version (DVC), register (MLflow), record, commit (git)
               -> rejected after every attempt: review, outputs removed, champion unchanged

`process_request` takes a queue, a tracker (MLflow), a versioner (DVC and git) and a runner that
does the compute (prepare a step's data; run one attempt and return its metrics). The Prefect flows
in `flows/` pass the real services and run the compute as tasks; the unit tests pass small
in-memory stand-ins.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from cul.audit import write_deletion_record
from cul.config import Params
from cul.evaluation import StepMetrics
from cul.fmt import pct, times
from cul.gate import Verdict
from cul.queue import QueuedRequest, State
from cul.step import STEPS_FILE, StepSpec, load_steps, next_key, run_attempts, save_step
from cul.unlearning.preparation import PreparationError
from cul.unlearning.recipes import RecipeBase, recipe_hash


class PipelineError(RuntimeError):
    """The pipeline refuses or stops a request; the message says why and what state it left."""


MAX_REDO = 3  # times a step is redone because a person moved `champion` while it ran


def step_records(key: str, request_id: str) -> list[str]:
    """The files of a step that git keeps, and only those: the step's DVC revision commits them."""
    return [
        "requests/queue.yaml",
        str(STEPS_FILE),
        "dvc.lock",
        f"reports/steps/{key}/metrics.json",
        f"reports/steps/{key}/samples.png",
        f"reports/audit/{request_id}.md",
        f"reports/audit/{request_id}.json",
    ]


class Queue(Protocol):
    def get(self, request_id: str) -> QueuedRequest: ...
    def update(self, request_id: str, **changes: Any) -> QueuedRequest: ...


class Tracker(Protocol):
    def champion(self): ...
    def candidate(self): ...
    def fetch_weights(self, version: int, dest: Path) -> Path: ...
    def open_request(self, request_id: str, concept: str, tags: dict[str, str]) -> str: ...
    def open_attempt(self, parent_run_id: str, attempt: int, params: dict, tags: dict[str, str]) -> str: ...
    def log_attempt(self, run_id: str, metrics: dict, verdict: Verdict, report_dir: Path) -> None: ...
    def close(self, run_id: str, ok: bool = True) -> None: ...
    def set_outcome(self, run_id: str, outcome: str) -> None: ...
    def register(self, run_id: str, model_dir: Path, tags: dict[str, str], auto_promote: bool = False) -> int: ...
    def tag_version(self, version: int, key: str, value: str) -> None: ...
    def fail_open_runs(self, request_id: str) -> int: ...


class Versioner(Protocol):
    def head(self) -> str: ...
    def staged(self) -> list[str]: ...
    def record_step(self, key: str) -> str: ...
    def push(self, *targets: str) -> None: ...
    def commit(self, message: str, paths: list[str]) -> str: ...
    def sync(self) -> str: ...
    def publish(self) -> str: ...


class Runner(Protocol):
    def prepare(self, spec: StepSpec) -> str:
        """The step's data folder (prompt set and teacher samples), shared by its attempts."""

    def attempt(self, spec: StepSpec, data_dir: str, run_id: str) -> dict:
        """Train and evaluate one attempt; its metrics (what `cul.step.train_and_evaluate` writes)."""


@dataclass
class RequestOutcome:
    """What became of a request: accepted as a version (or a no-op), or sent to review."""

    request: str
    concept: str
    accepted: bool
    version: int | None = None
    step: str | None = None
    noop: bool = False
    reasons: list[str] = field(default_factory=list)
    attempts: list[dict] = field(default_factory=list)  # one row per attempt, for tables
    metrics: dict = field(default_factory=dict)  # of the last attempt
    record: Path | None = None  # the deletion record (markdown)
    dvc: dict[str, str] = field(default_factory=dict)
    # what this run spent, measured here: data already prepared by an earlier (killed) run costs
    # only the time to find it, and every attempt's training and evaluation count
    seconds_prepare: float = 0.0
    seconds_train: float = 0.0
    seconds_eval: float = 0.0

    def summary(self) -> dict:
        """The flat dict the flows return and `cul run` prints."""
        keys = ("ua", "ra_in", "ra_cross", "ra_neighbour", "fd_ratio")
        out: dict = {"request": self.request, "accepted": self.accepted, "version": self.version}
        if self.noop:
            return {**out, "noop": True}
        out["attempts"] = len(self.attempts)
        if self.accepted:
            out.update(step=self.step, **self.dvc)
        else:
            out["reasons"] = self.reasons
        seconds = {
            "seconds_step": round(self.seconds_prepare + self.seconds_train, 1),  # data, replay and training
            "seconds_eval": round(self.seconds_eval, 1),
        }
        return {**out, **{k: self.metrics.get(k) for k in keys}, **seconds}


def starting_point(tracker: Tracker, params: Params) -> tuple[str, int | None, list[str], dict | None]:
    """(model folder, version, forgotten, per-concept scores) of the champion, else the base model."""
    champ = tracker.champion()
    if champ is None or champ.step is None:
        return str(params.paths.base_model), (champ.version if champ else None), [], None
    model_dir = Path("models/steps") / champ.step
    tracker.fetch_weights(champ.version, model_dir)
    metrics_file = Path("reports/steps") / champ.step / "metrics.json"
    previous = json.loads(metrics_file.read_text())["per_concept"] if metrics_file.exists() else None
    return str(model_dir), champ.version, champ.forgotten, previous


def _version(info) -> int | None:
    return info.version if info is not None else None


def waiting_for_promotion(tracker: Tracker, params: Params) -> int | None:
    """The candidate version a person has still to promote before the next request may start
    (None when nothing waits): without auto-promotion, a step newer than the champion holds the
    queue, since the next step must build on it and only a person makes it the champion."""
    if params.pipeline.auto_promote:
        return None
    candidate, champion = _version(tracker.candidate()), _version(tracker.champion())
    return candidate if candidate is not None and (champion is None or candidate > champion) else None


def flat_recipe(recipe: RecipeBase) -> dict[str, Any]:
    """The recipe as flat MLflow params (`addons.l2sp`, ...)."""
    data = recipe.model_dump(mode="json")
    addons = data.pop("addons")
    return {**data, **{f"addons.{k}": v for k, v in addons.items()}}


def attempt_row(attempt: int, recipe: RecipeBase, m: StepMetrics, seconds: float, verdict: Verdict) -> dict:
    """One line of the attempts table: the knobs escalation turns, the figures, the verdict."""
    knobs = {k: getattr(recipe, k) for k in ("l_unl", "l_pres", "l_reg") if k in type(recipe).model_fields}
    return {
        "attempt": attempt,
        **knobs,
        "l2sp": recipe.addons.l2sp,
        "steps": recipe.steps,
        "UA": pct(m.ua),
        "RA-I": pct(m.ra_in),
        "RA-C": pct(m.ra_cross),
        "RA-N": pct(m.ra_neighbour),
        "FD ratio": times(m.fd_ratio),
        "seconds": round(seconds, 1),
        "verdict": verdict.summary(),
    }


def _to_review(
    outcome: RequestOutcome, reasons: list[str], spec: StepSpec, queue: Queue, tracker: Tracker, run_id: str
) -> None:
    """The request waits for a person with `reasons`; the step's folders go, its run closes."""
    outcome.reasons = reasons
    queue.update(outcome.request, state=State.review, reasons=reasons)
    for d in (spec.model_dir, spec.report_dir, spec.data_dir):
        shutil.rmtree(d, ignore_errors=True)
    tracker.set_outcome(run_id, "review")
    tracker.close(run_id)


def process_request(
    request_id: str,
    params: Params,
    queue: Queue,
    tracker: Tracker,
    versioner: Versioner,
    runner: Runner,
    log: Callable[[str], None] = print,
    holder: str = "",
    redo: int = 0,
    holds_lineage: Callable[[], bool] = lambda: True,
) -> RequestOutcome:
    """One deletion request: attempts with escalation until the gate accepts (then version,
    register, record, commit) or the attempts run out (then review; the champion stays).

    A step registers only on the parent it started from: if `champion` moved while it ran, the
    step is dropped and redone from the new champion (`redo` counts those). `holder` names what
    processes it (a flow run id), for the dispatcher that watches it; `holds_lineage` is asked
    before anything is versioned or registered (a lineage lock lost with its connection stops the
    step there)."""
    pl = params.pipeline
    item = queue.get(request_id)
    if pl.git_commit and (staged := versioner.staged()):
        raise PipelineError(
            f"the git index holds staged changes ({', '.join(staged[:5])}{' ...' if len(staged) > 5 else ''}); "
            "the pipeline commits its records and will not take them along. Commit or unstage them "
            "(`git restore --staged PATH`), then run again; nothing was done."
        )
    if pl.git_commit:  # the steps others pushed: the key and the parent's records come from them
        versioner.sync()
    parent, parent_version, forgotten, previous = starting_point(tracker, params)
    if item.concept in forgotten:
        queue.update(request_id, state=State.accepted, version=parent_version)
        log(f"{request_id}: {item.concept} is already forgotten by version {parent_version}; no-op")
        return RequestOutcome(request_id, item.concept, accepted=True, version=parent_version, noop=True)

    queue.update(request_id, state=State.in_progress, holder=holder)
    key = next_key(list(load_steps()))
    name, recipe = pl.recipe()
    base_spec = StepSpec.for_request(params, key, item.request(), parent, forgotten, name, recipe, parent_version)
    code_rev = versioner.head()
    run_id = tracker.open_request(
        request_id,
        item.concept,
        {
            "step": key,
            "git_commit": code_rev,
            "parent_version": str(parent_version),
            "recipe_name": name,
            "recipe_hash": recipe_hash(recipe),
        },
    )
    log(f"{request_id}: forget {item.concept} from {parent} (version {parent_version}) as step {key} with {name}")
    outcome = RequestOutcome(request_id, item.concept, accepted=False)
    t0 = time.perf_counter()
    try:
        data_dir = runner.prepare(base_spec)
    except PreparationError as e:  # nothing to train on as asked: a person decides, nothing is tried
        _to_review(outcome, [f"cannot be prepared: {e}"], base_spec, queue, tracker, run_id)
        log(f"{request_id}: {outcome.reasons[0]}; sent to review, champion unchanged")
        return outcome
    outcome.seconds_prepare = time.perf_counter() - t0
    runs: dict[int, tuple[str, float]] = {}  # attempt -> its MLflow run, when it started

    def train(spec: StepSpec) -> dict:
        run = tracker.open_attempt(
            run_id,
            spec.attempt,
            {**flat_recipe(spec.recipe), "parent": parent, "forgotten": forgotten},
            {"recipe_name": name, "recipe_hash": recipe_hash(spec.recipe), "git_commit": code_rev},
        )
        runs[spec.attempt] = run, time.perf_counter()
        return runner.attempt(spec, data_dir, run)

    for a in run_attempts(base_spec, pl.escalation, previous, train):
        spec, verdict, (attempt_run, started) = a.spec, a.verdict, runs[a.spec.attempt]
        outcome.metrics = a.metrics
        outcome.seconds_train += a.metrics.get("seconds_train", 0.0)
        outcome.seconds_eval += a.metrics.get("seconds_eval", 0.0)
        tracker.log_attempt(attempt_run, a.metrics, verdict, spec.report_dir)
        tracker.close(attempt_run)
        seconds = time.perf_counter() - started
        outcome.attempts.append(attempt_row(spec.attempt, spec.recipe, a.scores, seconds, verdict))
        log(f"{request_id} attempt {spec.attempt}: {verdict.summary()}")

    if verdict.accepted and (now := _version(tracker.champion())) != parent_version:
        for d in (spec.model_dir, spec.report_dir, spec.data_dir):
            shutil.rmtree(d, ignore_errors=True)
        reason = f"its parent, version {parent_version}, stopped being champion during the step (now {now})"
        tracker.set_outcome(run_id, "stale parent: redone")
        tracker.close(run_id)
        queue.update(request_id, state=State.pending, reasons=[f"redone: {reason}"])
        if redo + 1 >= MAX_REDO:
            raise PipelineError(f"{request_id}: {reason}, {MAX_REDO} times; it is pending, nothing registered")
        log(f"{request_id}: {reason}; not registered, redone from version {now}")
        return process_request(
            request_id, params, queue, tracker, versioner, runner, log, holder, redo + 1, holds_lineage
        )

    if not verdict.accepted:
        _to_review(outcome, verdict.reasons, spec, queue, tracker, run_id)
        log(f"{request_id}: rejected after {len(outcome.attempts)} attempt(s); champion unchanged")
        return outcome

    if not holds_lineage():
        tracker.set_outcome(run_id, "lineage lost")
        tracker.close(run_id, ok=False)
        raise PipelineError(
            f"{request_id}: this run lost the lineage lock during the step (its database connection ended); "
            "nothing was versioned or registered, and the run that holds the lineage now processes it"
        )
    tags = {
        "request_id": request_id,
        "concept": item.concept,
        "step": key,
        "gate": "accepted",
        "forgotten": json.dumps(forgotten + [item.concept]),
        "parent_version": str(parent_version or "base"),
        "git_commit": code_rev,
        "attempt": str(spec.attempt),
        "recipe_name": name,
        "recipe_hash": recipe_hash(spec.recipe),
    }
    version_step(spec, versioner, pl.dvc_push, tags, queue, tracker, run_id)
    version = tracker.register(attempt_run, spec.model_dir, tags, pl.auto_promote)
    queue.update(request_id, state=State.accepted, version=version, step=key, reasons=[])
    outcome.record = write_deletion_record(
        item, spec, outcome.metrics, verdict, version, pl.tracking.registered_model, tags
    )
    message = f"cul: {request_id} forget {item.concept} -> step {key}"
    if pl.git_commit:  # committed, then pushed to the git remote (rebased on what others pushed)
        versioner.commit(message, step_records(key, request_id))
        rev = versioner.publish()
    else:
        rev = versioner.head()
    tracker.tag_version(version, "dvc_rev", rev)
    tracker.set_outcome(run_id, f"version {version}")
    tracker.close(run_id)
    outcome.accepted, outcome.version, outcome.step = True, version, key
    outcome.dvc = {"dvc_md5": tags["dvc_md5"], "dvc_rev": rev}
    return outcome


def version_step(
    spec: StepSpec, versioner: Versioner, push: bool, tags: dict[str, str], queue: Queue, tracker: Tracker, run_id: str
) -> None:
    """All or nothing: the step joins `requests/steps.yaml` and `dvc.lock` (and the remote) only
    if `dvc commit` and `dvc push` both succeed; otherwise both files are put back as they were,
    the request is pending again and nothing is registered, so a rerun takes the same key. An
    interrupt in between puts the files back too and goes on (the next run recovers the request)."""
    kept = {path: path.read_bytes() if path.exists() else None for path in (Path(STEPS_FILE), Path("dvc.lock"))}
    try:
        save_step(spec)
        tags["dvc_md5"] = versioner.record_step(spec.key)
        if push:
            versioner.push(f"step@{spec.key}")
    except BaseException as e:
        for path, data in kept.items():
            if data is None:
                path.unlink(missing_ok=True)
            else:
                path.write_bytes(data)
        if not isinstance(e, Exception):  # Ctrl-C or SIGTERM: files put back, the interrupt goes on
            raise
        reason = f"versioning step {spec.key} failed, nothing registered: {str(e).strip()[-300:]}"
        queue.update(spec.request.id or "", state=State.pending, reasons=[reason])
        tracker.set_outcome(run_id, "versioning failed")
        tracker.close(run_id, ok=False)
        raise PipelineError(
            f"{spec.request.id}: {reason}. The request is pending again; fix the DVC remote and run again."
        ) from e
    tags["dvc_stage"] = f"step@{spec.key}"


def recover_stranded(queue, tracker: Tracker, log: Callable[[str], None] = print) -> list[str]:
    """Requests left "in progress" by a run that ended without finishing (killed, crashed): their
    open MLflow runs are marked failed and they are pending again. Call it only while holding the
    lineage lock, when no other run can be processing them."""
    stranded = [r.id for r in queue.items() if r.state == State.in_progress]
    for request_id in stranded:
        closed = tracker.fail_open_runs(request_id)
        queue.update(
            request_id,
            state=State.pending,
            reasons=["interrupted: the run processing it ended without finishing; processed again"],
        )
        log(
            f"{request_id} was left in progress by a run that ended without finishing ({closed} MLflow run(s) "
            "marked failed); it is pending again"
        )
    return stranded


def stops_the_run(summary: dict, params: Params) -> bool:
    """Whether a continual run stops after a request (its `RequestOutcome.summary()`): without
    auto-promotion it stops after its first accepted step, since the next request must start from
    that step and only a person makes it the champion."""
    return bool(summary["accepted"] and not summary.get("noop") and not params.pipeline.auto_promote)
