"""One request step as a reproducible job: `theta_parent -> theta_key`, evaluated.

A `StepSpec` holds everything the step depends on (parent model, concepts forgotten before,
the request, the recipe after any escalation, seeds), so the same spec run twice gives the same
weights and metrics. The pipeline runs attempts with it; an accepted spec is written to
`requests/steps.yaml`, where the DVC stage `step@KEY` reads it (`cul step KEY`), so `dvc repro`
rebuilds exactly what the pipeline registered.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field

from cul import threads
from cul.config import Params
from cul.evaluation import EvalSpec, StepMetrics
from cul.fmt import pct, times
from cul.gate import EscalationPolicy, Gate, GateConfig, Verdict
from cul.probes import ProbeResult, summarise, to_records
from cul.unlearning.recipes import DFRRecipe, Recipe
from cul.unlearning.request import Request

STEPS_FILE = Path("requests/steps.yaml")


class StepSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    key: str  # "s01": model in models/steps/KEY, data in data/steps/KEY, metrics in reports/steps/KEY
    request: Request
    parent: str  # model folder: models/base or models/steps/<earlier key>
    parent_version: int | None = None  # registered version of the parent (None: the base model)
    forgotten: list[str] = []  # forgotten by the parent, in order
    catalogue: str = "world"  # the concept catalogue the request was resolved in (catalogues/NAME.yaml)
    recipe_name: str = "dfr"  # the production method or experiment the recipe came from
    recipe: Recipe = Field(default_factory=DFRRecipe)  # after escalation
    attempt: int = 0
    eval: EvalSpec = EvalSpec()
    gate: GateConfig = GateConfig()  # its share checks decide how many images the step draws
    seed: int = 1

    @property
    def model_dir(self) -> Path:
        return Path("models/steps") / self.key

    @property
    def data_dir(self) -> Path:
        return Path("data/steps") / self.key

    @property
    def report_dir(self) -> Path:
        return Path("reports/steps") / self.key

    def train_recipe(self) -> Recipe:
        """The recipe with this step's own training seed."""
        return self.recipe.for_request(self.seed)

    @classmethod
    def for_request(
        cls,
        params: Params,
        key: str,
        request: Request,
        parent: str,
        forgotten: list[str],
        recipe_name: str,
        recipe: Recipe,
        parent_version: int | None = None,
    ) -> StepSpec:
        """The step production runs for `request` under `params`: the pipeline's catalogue, gate
        and evaluation (at `pipeline.eval_stride`), and the training seed its key counts (s07 -> 7).

        Args:
            params: the project's settings (`params.yaml`).
            key: the step's key, "s" and the number of accepted steps before it plus one.
            request: the deletion request.
            parent: the folder of the model the step starts from.
            forgotten: the concepts `parent` has forgotten, in order.
            recipe_name: the method or experiment the recipe came from.
            recipe: attempt 0's recipe (escalation replaces it on a retry).
            parent_version: the registered version of `parent` (None: the base model).
        """
        pl = params.pipeline
        return cls(
            key=key,
            request=request,
            parent=parent,
            parent_version=parent_version,
            forgotten=forgotten,
            catalogue=pl.catalogue,
            recipe_name=recipe_name,
            recipe=recipe,
            eval=params.eval.model_copy(update={"stride": pl.eval_stride}),
            gate=pl.gate,
            seed=int(key[1:]),
        )


def load_steps(path: str | Path = STEPS_FILE) -> dict[str, StepSpec]:
    path = Path(path)
    if not path.exists():
        return {}
    data = yaml.safe_load(path.read_text()) or {}
    return {k: StepSpec(**v) for k, v in (data.get("steps") or {}).items()}


def save_step(spec: StepSpec, path: str | Path = STEPS_FILE) -> None:
    """Add (or replace) an accepted step; the file is the DVC `vars` source of the step stages."""
    path = Path(path)
    steps = load_steps(path)
    steps[spec.key] = spec
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {
        "steps": {
            k: {"parent": s.parent, **s.model_dump(mode="json", exclude={"parent"})} for k, s in sorted(steps.items())
        }
    }
    path.write_text(
        "# accepted request steps, written by the flow; read by dvc.yaml's step stages\n"
        + yaml.safe_dump(data, sort_keys=False)
    )


def next_key(existing: list[str]) -> str:
    return f"s{max((int(k[1:]) for k in existing if k[1:].isdigit()), default=0) + 1:02d}"


def _base_if_needed(spec: StepSpec, params: Params):
    from cul.models import load_model

    return load_model(params.paths.base_model) if spec.recipe.needs_base() else None


def prepare_data(spec: StepSpec, params: Params, out_data: Path | None = None) -> Path:
    """Data preparation of a step: its prompt set and teacher samples from the parent model (the
    same for every attempt of a request, so retries reuse them)."""
    from cul.catalogue import Catalogue
    from cul.models import load_model
    from cul.unlearning.batches import replay_sources
    from cul.unlearning.preparation import prepare_catalogue_step, prepare_step
    from cul.unlearning.trainer import keep_teacher

    out_data = Path(out_data or spec.data_dir)
    parent = load_model(spec.parent)
    catalogue = Catalogue.load(spec.catalogue)
    if catalogue.name == "world":  # the world's compositional scenes
        ps = prepare_step(parent, spec.request, spec.forgotten, spec.recipe, seed=spec.seed)
    else:
        ps = prepare_catalogue_step(parent, catalogue, spec.request, spec.forgotten, spec.recipe, seed=spec.seed)
    ps.save(out_data / "prompts.json")
    recipe = spec.train_recipe()
    t0 = time.perf_counter()
    replay_sources(parent, ps, recipe, out_data / "replay", keep_teacher(parent, _base_if_needed(spec, params), recipe))
    (out_data / "replay").mkdir(parents=True, exist_ok=True)  # online replay (DFR's own) writes no buffer
    (out_data / "replay" / "seconds.json").write_text(json.dumps({"seconds": time.perf_counter() - t0}) + "\n")
    return out_data


def load_buffers(data_dir: Path, spec: StepSpec) -> dict | None:
    from cul.unlearning.replay import ReplayBuffer

    if spec.recipe.replay == "online":
        return None
    return {d.name: ReplayBuffer.load(d) for d in sorted((Path(data_dir) / "replay").iterdir()) if d.is_dir()}


def train_and_evaluate(
    spec: StepSpec,
    params: Params,
    data_dir: Path | None = None,
    out_model: Path | None = None,
    out_report: Path | None = None,
    progress: bool = False,
    log: Callable[[str], None] = print,
) -> dict:
    """Unlearn from the parent with the prepared data, save the weights, evaluate against the base
    model, and write metrics.json (with the recipe and commit that made it) and a before/after grid.
    The parent and the base model are each loaded once."""

    from cul.catalogue import Catalogue
    from cul.evaluation import weight_drift
    from cul.io.provenance import provenance
    from cul.judges import step_evaluator
    from cul.models import load_model
    from cul.plots import before_after
    from cul.unlearning.batches import replay_sources
    from cul.unlearning.prompts import PromptSet
    from cul.unlearning.trainer import keep_teacher, unlearn

    threads.reset_used()
    data_dir = Path(data_dir or spec.data_dir)
    out_model = Path(out_model or spec.model_dir)
    out_report = Path(out_report or spec.report_dir)
    parent = load_model(spec.parent)
    base = load_model(params.paths.base_model)
    ps = PromptSet.load(data_dir / "prompts.json")
    replay_seconds = json.loads((data_dir / "replay" / "seconds.json").read_text())["seconds"]
    recipe = spec.train_recipe()
    buffers = load_buffers(data_dir, spec)
    if buffers is not None:  # a retry may need samples attempt 0 did not (the surrogate's images)
        t0 = time.perf_counter()
        keep = keep_teacher(parent, base, recipe)
        buffers = replay_sources(parent, ps, recipe, data_dir / "replay", keep, have=buffers)
        replay_seconds += time.perf_counter() - t0
    result = unlearn(
        parent,
        ps,
        recipe,
        buffers=buffers,
        progress=progress,
        base=base if spec.recipe.needs_base() else None,
    )
    result.student.save_pretrained(out_model)

    t1 = time.perf_counter()
    cache = params.paths.reports / "base" / f"eval-stride{spec.eval.stride}.npz"
    evaluator = step_evaluator(params, Catalogue.load(spec.catalogue), spec.eval, base, cache)
    forgotten = spec.forgotten + [ps.concept]
    m = evaluator(result.student, forgotten)
    probes, rounds = robustness(result.student, base, evaluator, spec, params, forgotten, m, out_report, log)
    paraphrases = evaluator.paraphrase_ua(result.student, ps.concept, spec.forgotten)
    prompts = evaluator.evidence_prompts(ps.concept, spec.forgotten)
    before = parent.sample(prompts, seed=spec.eval.seed, steps=spec.eval.steps)
    after = result.student.sample(prompts, seed=spec.eval.seed, steps=spec.eval.steps)
    out_report.mkdir(parents=True, exist_ok=True)
    before_after(before, after, prompts, out_report / "samples.png", f"{spec.key}: forget {ps.concept}")
    metrics = {
        "key": spec.key,
        "request": spec.request.id,
        "concept": ps.concept,
        "forgotten": forgotten,
        "attempt": spec.attempt,
        "surrogates": ps.surrogates,
        **m.model_dump(exclude={"per_concept", "base"}),
        "paraphrase_ua": paraphrases,
        "probes": to_records(probes),
        "probe_summary": summarise(probes, spec.gate.min_base_rate),
        "gate_rounds": rounds,  # rounds of extra images the confidence-bound gate drew
        "drift_from_base": weight_drift(result.student, dict(base.unet.named_parameters())),
        "drift_from_parent": result.drift,
        "seconds_replay": round(replay_seconds, 1),
        "seconds_train": round(result.seconds_train, 1),
        "seconds_step": round(replay_seconds + result.seconds_train, 1),
        "seconds_eval": round(time.perf_counter() - t1, 1),
        "replay_images": sum(len(b) for b in (buffers or {}).values()) or result.replay_images,
        "threads": threads.threads_used(),  # torch's thread counts over the step, in order
        "base": m.base.model_dump() if m.base else None,
        "per_concept": m.per_concept,
        "history": result.history,
        **({"relearning_attacks": result.relearning_attacks} if result.relearning_attacks else {}),
        **provenance(spec.recipe_name, spec.recipe),
    }
    (out_report / "metrics.json").write_text(json.dumps(metrics, indent=1) + "\n")
    log(
        f"{spec.key} forget {ps.concept}: UA {pct(m.ua)} RA-I {pct(m.ra_in)} RA-C {pct(m.ra_cross)} "
        f"RA-N {pct(m.ra_neighbour)} FDx {times(m.fd_ratio)} ({metrics['seconds_step']:.0f} s step)"
    )
    return metrics


def robustness(student, base, evaluator, spec: StepSpec, params: Params, forgotten, m, out_report: Path, log):
    """The step's robustness probes (`spec.eval.probes`, on the world's scenes and judge), then more
    images for every share check the gate's confidence bound leaves open (`cul.gate.settle`),
    which updates `m.counts`. Writes the probes' sample grid. Returns (probes, rounds drawn)."""
    from cul.gate import Gate, settle
    from cul.plots import probe_grid
    from cul.probes import Prober, base_cache

    gate = Gate(spec.gate)
    if not hasattr(evaluator, "more_images"):  # another catalogue's judge: scores only, no probes yet
        probe_grid({}, {}, out_report / "probes.png")
        return [], 0
    spec_p = spec.eval.probes
    prober = None
    probes = []
    if spec_p.wording or spec_p.attacks:
        cache = base_cache(params.paths.reports, spec.eval.steps)
        prober = Prober(evaluator.judge, spec_p, base, params.world.size, spec.eval.steps, cache, log)
        probes = prober.run(student, forgotten)
    more_wording = (lambda c, r, o: prober.wording(student, c, forgotten, r, o)) if prober and spec_p.wording else None
    verdict, rounds = settle(
        gate, m, forgotten, probes, lambda c, r: evaluator.more_images(student, c, r), more_wording, log
    )
    by_name = {r.name: r for r in probes}
    samples = prober.samples if prober is not None else {}
    figures = {k: by_name[k].figure for k in samples if k in by_name}
    probe_grid(samples, figures, out_report / "probes.png", f"{spec.key}: probes (recovery)")
    return probes, rounds


@dataclass
class Attempt:
    """One attempt at a step: the spec it trained under (`spec.attempt`, the escalated recipe),
    the metrics `train_and_evaluate` returned, and the gate's verdict on them."""

    spec: StepSpec
    metrics: dict
    verdict: Verdict
    scores: StepMetrics  # `metrics` as the gate read them


def run_attempts(
    spec: StepSpec,
    escalation: EscalationPolicy,
    previous: dict[str, float] | None,
    train: Callable[[StepSpec], dict],
) -> Iterator[Attempt]:
    """The attempts at `spec` as production makes them, one at a time.

    Attempt 0 trains `spec.recipe`; a rejected attempt is retried with the recipe `escalation`
    gives for the checks it failed (and its own recipe, so a switch to the surrogate's images or
    to erasing against textual inversion stays on), until the gate (`spec.gate`) accepts or
    `escalation.max_attempts` run out. The last attempt yielded is the accepted one, or the last
    rejected one.

    Args:
        spec: the step, with attempt 0's recipe.
        escalation: how a rejected attempt is retried.
        previous: the parent's per-concept scores, from its own step (None: the base model).
        train: trains and evaluates one attempt's spec and returns its metrics
            (`train_and_evaluate`'s); the caller decides where it writes and what it records.
    """
    gate = Gate(spec.gate)
    tried, failed = spec, list[str]()
    for attempt in range(escalation.max_attempts):
        recipe = escalation.config_for(spec.recipe, attempt, failed, failed_recipe=tried.recipe)
        tried = spec.model_copy(update={"attempt": attempt, "recipe": recipe})
        metrics = train(tried)
        probes = [ProbeResult.model_validate(r) for r in metrics.get("probes", [])]
        scores = StepMetrics.model_validate(metrics)
        verdict = gate.decide(scores, spec.forgotten + [metrics["concept"]], previous, probes)
        yield Attempt(tried, metrics, verdict, scores)
        if verdict.accepted:
            return
        failed = [c.name for c in verdict.checks if not c.passed]


def run_step(spec: StepSpec, params: Params, progress: bool = False, log: Callable[[str], None] = print) -> dict:
    """The whole step, as `dvc repro step@KEY` runs it."""
    prepare_data(spec, params)
    return train_and_evaluate(spec, params, progress=progress, log=log)
