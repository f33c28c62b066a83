"""A benchmark run as production runs it: every request through the gate, with escalation.

`cul.benchmark.run_sequence` measures a recipe: each request is trained once and the next one
starts from it, whatever the gate would say. Production does not work that way (`cul.pipeline`):
an attempt the gate rejects is retried with a stronger recipe (`EscalationPolicy`), and when every
attempt fails the request goes to review and the champion stays as it was. `run_gated_sequence`
measures what that delivers. For each request it runs the production step (`cul.step`: the
prompt set and teacher samples, training, the evaluation at `pipeline.eval_stride`, the wording
probes, the confidence-bound settlement) and the gate's verdict, attempt after attempt. Then the
benchmark's evaluator judges the champion left behind, against the concepts accepted so far, the
same way as any other run.

Each entry of `results.json` carries the usual figures (of the champion), plus `accepted`, the
attempts' verdicts and `forgotten` (what the champion has forgotten). Resumable per request, like
`run_sequence`.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path

from cul.benchmark import _load_results, _remaining, write_results
from cul.config import Params
from cul.evaluation import Evaluator, weight_drift
from cul.fmt import pct, times
from cul.io.provenance import provenance
from cul.results import BenchmarkError, inherited
from cul.step import StepSpec, prepare_data, run_attempts, train_and_evaluate
from cul.unlearning.recipes import Recipe, recipe_hash
from cul.unlearning.request import Request

SCORES = ("ua", "ra_in", "ra_cross", "ra_neighbour", "ra_all", "fd", "fd_ratio", "fd_clean")


def gate_settings(params: Params) -> tuple[dict, str]:
    """What decides a gated run's verdicts besides the recipe (`pipeline.gate`, `escalation`,
    `eval_stride`, `eval`, the catalogue, the judge, the world), and its short hash: a rerun under
    other settings would mix two gates' verdicts in one `results.json`."""
    pl = params.pipeline
    settings = {
        "gate": pl.gate.model_dump(mode="json"),
        # an option added later enters only when set, so runs gated before it keep their hash
        "escalation": pl.escalation.model_dump(
            mode="json", exclude={"recovery_inversion"} if pl.escalation.recovery_inversion is None else set()
        ),
        "eval_stride": pl.eval_stride,
        "eval": params.eval.model_dump(mode="json"),
        "catalogue": pl.catalogue,
        "judge": {"path": str(params.paths.judge), **params.judge.model_dump(mode="json")},
        "world": params.world.model_dump(mode="json"),
    }
    return settings, hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]


def run_gated_sequence(
    params: Params,
    base_model,
    evaluator: Evaluator,
    requests: list[Request],
    recipe: Recipe,
    out: str | Path,
    name: str = "",
    max_steps: int | None = None,
    log: Callable[[str], None] = print,
    order_seed: int | None = None,
    code: tuple[str, bool] | None = None,
) -> list[dict]:
    """Process `requests` as the pipeline does, with `params.pipeline`'s gate and escalation and
    `recipe` as attempt 0. `evaluator` (the benchmark's, with the base model set) judges the
    champion after every request; `base_model` is the model `params.paths.base_model` holds. Writes
    OUT/results.json after every request; OUT/steps/KK/attempt-A/ holds each attempt's report, and
    its model if the gate accepted it. Keys and training seeds count accepted steps, as production's
    do; a rerun is refused under another recipe, order or gate (`pipeline.gate`, `escalation`,
    `eval_stride`, `eval`).
    `order_seed`: the seed that shuffled the requests (recorded); `code`: the (commit, dirty) the
    process started from (`code_revision`)."""
    pl = params.pipeline
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    base_dir = Path(params.paths.base_model)

    def where(champion: str) -> Path:  # a champion is recorded as "base" or relative to OUT
        return base_dir if champion == "base" else out / champion

    results = _load_results(
        out,
        recipe,
        name,
        log,
        order_seed,
        mode="gated",
        weights=lambda rs: where(rs[-1]["champion"]),
        requests=requests,
        evaluation=evaluator.settings(),
    )
    settings, gate_hash = gate_settings(params)
    gated_here = {r.get("gate_hash") for r in results if not inherited(r)}
    if gated_here and gated_here != {gate_hash}:
        raise BenchmarkError(
            f"{out / 'results.json'} was gated under other settings (pipeline.gate, escalation, eval_stride or "
            "eval in the params file): give this run its own --out folder"
        )
    made_by = provenance(name, recipe, code=code)
    base_state = {n: p.detach().clone() for n, p in base_model.unet.named_parameters()}
    champion = base_dir
    forgotten: list[str] = []
    previous: dict[str, float] | None = None  # the champion's per-concept scores, from its own step
    if results:
        last = results[-1]
        champion, forgotten, previous = where(last["champion"]), last["forgotten"], last["champion_scores"]
        log(f"[{name}] resuming after request {len(results)}: {len(forgotten)} forgotten ({', '.join(forgotten)})")
    for request in _remaining(requests, len(results), max_steps):
        k = len(results) + 1
        step_dir = out / "steps" / f"{k:02d}"
        shutil.rmtree(step_dir, ignore_errors=True)  # a request cut short starts over
        key = f"s{len(forgotten) + 1:02d}"  # production's key and seed: a rejected request uses none up
        spec = StepSpec.for_request(params, key, request, str(champion), forgotten, name, recipe)
        t0 = time.perf_counter()
        data_dir = prepare_data(spec, params, step_dir / "data")
        seconds_prepare = time.perf_counter() - t0
        attempts: list[dict] = []
        accepted: Path | None = None
        metrics: dict = {}

        def train(s: StepSpec, step_dir: Path = step_dir, data_dir: Path = data_dir) -> dict:
            place = step_dir / f"attempt-{s.attempt}"
            return train_and_evaluate(s, params, data_dir, place / "model", place / "report", log=log)

        for a in run_attempts(spec, pl.escalation, previous, train):
            metrics, verdict, place = a.metrics, a.verdict, step_dir / f"attempt-{a.spec.attempt}"
            attempts.append(
                {
                    "attempt": a.spec.attempt,
                    "recipe_hash": recipe_hash(a.spec.recipe),
                    "accepted": verdict.accepted,
                    "reasons": verdict.reasons,
                    "ua": metrics["ua"],
                    "fd_ratio": metrics.get("fd_ratio"),
                    "seconds_train": metrics["seconds_train"],
                    "replay_images": metrics.get("replay_images", 0),
                    "seconds_eval": metrics["seconds_eval"],
                    "gate_rounds": metrics.get("gate_rounds", 0),
                }
            )
            log(f"[{name}] request {k} ({metrics['concept']}) attempt {a.spec.attempt}: {verdict.summary()}")
            if verdict.accepted:
                accepted = place / "model"
            else:
                shutil.rmtree(place / "model")  # as production drops it; its report stays
        shutil.rmtree(data_dir, ignore_errors=True)  # teacher samples and buffers, as production drops them
        concept = metrics["concept"]
        changed = accepted is not None
        if accepted is not None:
            champion, forgotten, previous = accepted, forgotten + [concept], metrics["per_concept"]
        if changed:
            from cul.models import load_model

            model = load_model(champion)
            m = evaluator(model, forgotten)
            scores = m.model_dump(include=set(SCORES))
            judged = {
                "base": m.base.model_dump() if m.base else None,
                "per_concept": m.per_concept,
                "drift": weight_drift(model, base_state),
            }
        elif results:  # the champion did not change: the same model, judged on the same forgotten set
            scores = {s: results[-1][s] for s in SCORES}
            judged = {s: results[-1][s] for s in ("base", "per_concept", "drift")}
        else:  # nothing accepted yet: the champion is the base model, nothing forgotten to judge
            scores = dict.fromkeys(SCORES)
            judged = {"base": None, "per_concept": {}, "drift": 0.0}
        entry = {
            "step": k,
            "method": name,
            "mode": "gated",
            "request": request.model_dump(),
            "concept": concept,
            "accepted": changed,
            "attempts": attempts,
            "forgotten": forgotten,
            "champion": "base" if champion == base_dir else str(champion.relative_to(out)),
            "champion_scores": previous,
            "gate_hash": gate_hash,
            "gate_settings": settings,
            # judged again only when the champion changed; a rejected request repeats its scores
            "evaluated": changed,
            **scores,
            **judged,
            "seconds": round(seconds_prepare + sum(a["seconds_train"] for a in attempts), 1),
            "seconds_gate": round(sum(a["seconds_eval"] for a in attempts), 1),
            "replay_images": sum(a["replay_images"] for a in attempts),
            "evaluation": evaluator.settings(),
            **({"order_seed": order_seed} if order_seed is not None else {}),
            **made_by,
        }
        results.append(entry)
        write_results(out, results)
        log(
            f"[{name}] request {k} forget {concept}: "
            + (f"accepted at attempt {len(attempts) - 1}" if changed else f"to review after {len(attempts)} attempts")
            + f"; champion UA {pct(entry['ua'])} RA-I {pct(entry['ra_in'])} RA-C {pct(entry['ra_cross'])} "
            f"RA-N {pct(entry['ra_neighbour'])} FDx {times(entry['fd_ratio'])}"
        )
    return results
