"""One request step as a reproducible job: `theta_parent -> theta_key`, evaluated.

A `StepSpec` holds everything the step depends on (parent model, concepts forgotten before,
the request, the method after any escalation, seeds), so the same spec run twice gives the same
weights and metrics. The Prefect flow runs attempts with it; an accepted spec is written to
`requests/steps.yaml`, where the DVC stage `step@KEY` reads it (`cul step KEY`), so `dvc repro`
rebuilds exactly what the flow registered.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict

from cul.config import Params
from cul.unlearning.request import Request
from cul.unlearning.sequence import EvalSpec, MethodSpec, request_config

STEPS_FILE = Path("requests/steps.yaml")


class StepSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    key: str  # "s01": model in models/steps/KEY, data in data/steps/KEY, metrics in reports/steps/KEY
    request: Request
    parent: str  # model folder: models/base or models/steps/<earlier key>
    parent_version: int | None = None  # registered version of the parent (None: the base model)
    forgotten: list[str] = []  # forgotten by the parent, in order
    method: str = "dfr"
    spec: MethodSpec = MethodSpec()  # after escalation
    attempt: int = 0
    eval: EvalSpec = EvalSpec()
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
    data = {"steps": {k: {"parent": s.parent, **s.model_dump(mode="json", exclude={"parent"})}
                      for k, s in sorted(steps.items())}}
    path.write_text("# accepted request steps, written by the flow; read by dvc.yaml's step stages\n"
                    + yaml.safe_dump(data, sort_keys=False))


def next_key(existing: list[str]) -> str:
    return f"s{max((int(k[1:]) for k in existing if k[1:].isdigit()), default=0) + 1:02d}"


def evidence_prompts(concept_name: str, forgotten: list[str]) -> list[str]:
    """Prompts for before/after grids: the concept in four contexts (one with a held-out
    paraphrase), then its retained confusables."""
    from cul.world import CONCEPTS, CONFUSABLES, Kind, caption, concept

    c = concept(concept_name)
    others = {k: [x.name for x in CONCEPTS[k] if x.name not in forgotten and x.name != c.name] for k in Kind}
    pick = {k: v[:4] for k, v in others.items()}
    out = []
    for i in range(4):
        words = {k: pick[k][i % len(pick[k])] for k in Kind}
        words[c.kind] = c.held_out[0] if (i == 3 and c.held_out) else c.name
        out.append(caption(words[Kind.OBJECT], words[Kind.COLOUR], words[Kind.TEXTURE]))
    for n in [x for x in CONFUSABLES[c.name] if x not in forgotten][:3]:
        words = {k: pick[k][0] for k in Kind}
        words[concept(n).kind] = n
        out.append(caption(words[Kind.OBJECT], words[Kind.COLOUR], words[Kind.TEXTURE]))
    return out


def paraphrase_ua(model, judge, concept_name: str, forgotten: list[str], seed: int, n_scenes: int = 16,
                  steps: int | None = None) -> dict[str, float]:
    """UA when the concept is named by each of its other words (training synonyms and held-out
    paraphrases): erasing the name alone is not erasing the concept."""
    from cul.evaluation import judge_images
    from cul.world import CONCEPTS, Kind, Scene, caption, concept

    c = concept(concept_name)
    kinds = list(Kind)
    others = {k: [x.name for x in CONCEPTS[k] if x.name not in forgotten or k == c.kind] for k in kinds}
    scenes = []
    for i in range(n_scenes):
        names = {k: others[k][(i * (j + 3)) % len(others[k])] for j, k in enumerate(kinds)}
        names[c.kind] = c.name
        scenes.append(Scene(names[kinds[0]], names[kinds[1]], names[kinds[2]]))
    out = {}
    for w, word in enumerate(c.words[1:]):
        prompts = []
        for s in scenes:
            parts = {"object": s.object, "colour": s.colour, "texture": s.texture}
            parts[c.kind.value] = word
            prompts.append(caption(parts["object"], parts["colour"], parts["texture"]))
        images = model.sample(prompts, seed=seed + w, steps=steps)
        verdict = judge_images(judge, images, scenes)
        out[word] = 1.0 - float(verdict.correct(c.kind.value).mean())
    return out


def prepare_data(spec: StepSpec, params: Params, out_data: Path | None = None):
    """Data preparation of a step: its prompt set and replay buffers from the parent model (the
    same for every attempt of a request, so retries reuse them)."""
    from cul.models import load_model
    from cul.unlearning.sequence import prepare_step
    from cul.unlearning.trainer import replay_sources

    out_data = Path(out_data or spec.data_dir)
    parent = load_model(spec.parent)
    ps = prepare_step(parent, spec.request, spec.forgotten, spec.spec, seed=spec.seed)
    ps.save(out_data / "prompts.json")
    t0 = time.perf_counter()
    replay_sources(parent, ps, _train_config(spec), out_data / "replay", anchor=_anchor(spec, params))
    (out_data / "replay" / "seconds.json").write_text(json.dumps({"seconds": time.perf_counter() - t0}) + "\n")
    return out_data


def _anchor(spec: StepSpec, params: Params):
    """The base model, when the method distils what it keeps from it (`retain_teacher: base`) or
    pulls its weights toward it (`reg_reference: base`)."""
    from cul.models import load_model

    cfg = _train_config(spec)
    return load_model(params.paths.base_model) if "base" in (cfg.retain_teacher, cfg.reg_reference) else None


def _train_config(spec: StepSpec):
    return request_config(spec.spec.unlearn, spec.seed)


def load_buffers(data_dir: Path, spec: StepSpec) -> dict:
    from cul.unlearning.replay import ReplayBuffer

    if _train_config(spec).replay == "online":
        return None
    return {d.name: ReplayBuffer.load(d) for d in sorted((Path(data_dir) / "replay").iterdir()) if d.is_dir()}


def train_and_evaluate(spec: StepSpec, params: Params, data_dir: Path | None = None, out_model: Path | None = None,
                       out_report: Path | None = None, progress: bool = False, log=print) -> dict:
    """Unlearn from the parent with the prepared data, save the weights, evaluate against the base
    model, and write metrics.json and a before/after grid."""
    import torch

    from cul.judge import Judge
    from cul.models import load_model
    from cul.plots import before_after
    from cul.unlearning.prompts import PromptSet
    from cul.unlearning.sequence import Evaluator, weight_drift
    from cul.unlearning.trainer import unlearn

    data_dir = Path(data_dir or spec.data_dir)
    out_model = Path(out_model or spec.model_dir)
    out_report = Path(out_report or spec.report_dir)
    parent = load_model(spec.parent)
    ps = PromptSet.load(data_dir / "prompts.json")
    replay_seconds = json.loads((data_dir / "replay" / "seconds.json").read_text())["seconds"]
    result = unlearn(parent, ps, _train_config(spec), buffers=load_buffers(data_dir, spec), progress=progress,
                     anchor=_anchor(spec, params))
    result.student.save_pretrained(out_model)

    t1 = time.perf_counter()
    base = load_model(params.paths.base_model)
    judge = Judge.from_pretrained(params.paths.judge)
    evaluator = Evaluator(judge, spec.eval, params.world.size, params.world.eval_seed)
    evaluator.set_base(base, cache=params.paths.reports / "base" / f"eval-stride{spec.eval.stride}.npz")
    forgotten = spec.forgotten + [ps.concept]
    m = evaluator(result.student, forgotten)
    paraphrases = paraphrase_ua(result.student, judge, ps.concept, spec.forgotten, spec.eval.seed,
                                spec.eval.paraphrase_scenes, spec.eval.steps)
    prompts = evidence_prompts(ps.concept, spec.forgotten)
    before = parent.sample(prompts, seed=spec.eval.seed, steps=spec.eval.steps)
    after = result.student.sample(prompts, seed=spec.eval.seed, steps=spec.eval.steps)
    out_report.mkdir(parents=True, exist_ok=True)
    before_after(before, after, prompts, out_report / "samples.png", f"{spec.key}: forget {ps.concept}")
    metrics = {
        "key": spec.key, "request": spec.request.id, "concept": ps.concept, "forgotten": forgotten,
        "attempt": spec.attempt, "surrogates": ps.surrogates,
        **{k: m.get(k) for k in ("ua", "ra_in", "ra_cross", "ra_neighbour", "ra_all", "fd", "fd_ratio")},
        "paraphrase_ua": paraphrases,
        "drift_from_base": weight_drift(result.student, dict(base.unet.named_parameters())),
        "drift_from_parent": result.drift,
        "seconds_replay": round(replay_seconds, 1), "seconds_train": round(result.seconds_train, 1),
        "seconds_step": round(replay_seconds + result.seconds_train, 1),
        "seconds_eval": round(time.perf_counter() - t1, 1),
        "replay_images": sum(len(b) for b in (load_buffers(data_dir, spec) or {}).values()) or result.replay_images,
        "threads": torch.get_num_threads(),
        "base": m.get("base"), "per_concept": m["per_concept"], "history": result.history,
    }
    (out_report / "metrics.json").write_text(json.dumps(metrics, indent=1) + "\n")
    log(f"{spec.key} forget {ps.concept}: UA {m['ua']:.1%} RA-I {m['ra_in']:.1%} RA-C {m['ra_cross']:.1%} "
        f"RA-N {(m['ra_neighbour'] or 0):.1%} FDx {m.get('fd_ratio') or float('nan'):.2f} "
        f"({metrics['seconds_step']:.0f} s step)")
    return metrics


def run_step(spec: StepSpec, params: Params, progress: bool = False, log=print) -> dict:
    """The whole step, as `dvc repro step@KEY` runs it."""
    prepare_data(spec, params)
    return train_and_evaluate(spec, params, progress=progress, log=log)
