"""Running a sequence of deletion requests and evaluating after every step (the benchmark).

Three ways to reach theta_k:
- `sequential`: theta_{k-1} -> theta_k with the configured eraser (the continual setting);
- `simultaneous`: all concepts so far at once from theta_0 (the reference upper bound);
- `ties`: each concept erased from theta_0 on its own, then TIES-merged.

Resumable per step: each finished step's weights, prompts and metrics are on disk, and a rerun
continues after the last one.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Literal, Sequence

import numpy as np
import torch
import yaml
from diffusers import UNet2DConditionModel
from pydantic import BaseModel, ConfigDict, Field

from cul.evaluation import Judgement, frechet_distance, generate_scenes, judge_images, unlearning_metrics
from cul.judge import to_tensor
from cul.unlearning.merging import ties_merge
from cul.unlearning.prompts import PromptSet, build_prompt_set, rank_surrogates
from cul.unlearning.regularizers import trainable_names
from cul.unlearning.request import Request, resolve_request
from cul.unlearning.trainer import UnlearnConfig, unlearn
from cul.world import CONCEPTS, World, all_scenes

Mode = Literal["sequential", "simultaneous", "ties"]


class MethodSpec(BaseModel):
    """A named benchmark entry: an eraser configuration and how steps are composed."""

    model_config = ConfigDict(extra="forbid")

    mode: Mode = "sequential"
    unlearn: UnlearnConfig = UnlearnConfig()
    n_surrogates: int = Field(5, ge=1)
    surrogate_neighbours: bool = True  # False: never map a concept onto its own confusables
    ties_k: float = 0.5
    ties_lambda: float = 1.5


def eval_scenes(stride: int) -> list:
    """About 1/stride of the 512 scenes: those whose object, colour and texture indices sum to a
    multiple of min(stride, 8) (a Latin-square design: every concept equally often for strides
    2, 4 and 8); larger strides take a fixed random share of the stride-8 set, which cannot stay
    exactly balanced. (A plain [::stride] slice would keep only some textures.)"""
    latin = [s for s in all_scenes() if sum(s.label()) % min(stride, 8) == 0]
    if stride <= 8:
        return latin
    keep = np.random.default_rng(0).permutation(len(latin))[: max(2, len(latin) * 8 // stride)]
    return [latin[i] for i in sorted(keep)]


def fd_scenes(exclude: Sequence[str], n: int) -> list:
    """A fixed set of `n` scenes with none of the `exclude` concepts (all of a benchmark's
    sequence), cycled over the scenes that qualify. FD on it is comparable from step to step:
    FD on the clean scenes of the UA/RA set is not, because that set shrinks with every request
    and FD's estimate grows as the sample shrinks (the base model's own FD rose 0.29 -> 1.21
    over ten requests on it)."""
    gone = set(exclude)
    pool = [s for s in all_scenes() if not ({s.object, s.colour, s.texture} & gone)]
    if not pool:
        raise ValueError("no scene is free of the excluded concepts: FD has nothing to compare")
    return [pool[i % len(pool)] for i in range(n)]


class EvalSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    seed: int = 1234
    stride: int = Field(1, ge=1)  # evaluate on about 1/stride of the 512 scenes (see eval_scenes)
    batch_size: int = 128
    steps: int | None = Field(None, ge=1)  # DDIM steps of evaluation sampling (None: the model's own)
    paraphrase_scenes: int = Field(16, ge=1)  # scenes per paraphrase in a step's paraphrase UA
    fd_images: int = Field(200, ge=2)  # size of the benchmark's fixed FD set (see fd_scenes)


def load_sequence(path: str | Path) -> list[Request]:
    """A YAML list of requests: [{concept: circle, kind: object}, ...]."""
    data = yaml.safe_load(Path(path).read_text())
    items = data.get("requests", data) if isinstance(data, dict) else data
    if not isinstance(items, list) or not items:
        raise ValueError(f"{path}: expected a non-empty list of requests")
    return [Request(**(i if isinstance(i, dict) else {"concept": str(i)})) for i in items]


def sequence_concepts(requests: Sequence[Request]) -> list[str]:
    """The concept names of a sequence, as a fresh model would resolve them (the benchmark's FD
    set avoids all of them)."""
    return [resolve_request(r, []).concept for r in requests]


def step_unet(out: str | Path, k: int) -> Path:
    """Where `run_sequence` saves the UNet after request k (1-based)."""
    return Path(out) / "steps" / f"{k:02d}" / "unet"


def choose_surrogates(model, name: str, forgotten: list[str], hints: list[str], n: int,
                      neighbours: bool = True) -> list[str]:
    """Hints first, then the same-kind candidates closest in noise prediction (later DFR code);
    with `neighbours=False` the concept's confusables are not candidates."""
    from cul.world import CONFUSABLES, concept

    kind = concept(name).kind
    banned = set(forgotten) | set(hints) | {name} | (set() if neighbours else set(CONFUSABLES[name]))
    candidates = [c.name for c in CONCEPTS[kind] if c.name not in banned]
    ranked = [c for c, _ in rank_surrogates(model, name, candidates)]
    return (list(hints) + ranked)[:n]


def request_config(cfg: UnlearnConfig, k: int) -> UnlearnConfig:
    """Request k's training settings: its own seed, so a resumed, re-timed or pipeline step draws
    what the benchmark's step k drew."""
    return cfg.model_copy(update={"seed": cfg.seed * 100 + k})


def prepare_step(model, request: Request, forgotten: list[str], spec: MethodSpec, seed: int) -> PromptSet:
    r = resolve_request(request, forgotten)
    surrogates = choose_surrogates(model, r.concept, forgotten, r.surrogates, spec.n_surrogates,
                                   spec.surrogate_neighbours)
    earlier = None
    if spec.unlearn.forgotten_target == "mapped":
        # what `model` (theta_{k-1}) now draws for each earlier concept, named: the candidate whose
        # noise predictions are closest to the forgotten concept's under it
        gone = forgotten + [r.concept]
        earlier = {f: choose_surrogates(model, f, gone, [], 1, spec.surrogate_neighbours)[0] for f in forgotten}
    return build_prompt_set(r.concept, forgotten, surrogates, r.retain, text_encoder=model.text, seed=seed,
                            forgotten_surrogates=earlier)


def merge_prompt_sets(sets: list[PromptSet]) -> PromptSet:
    """All concepts at once: every forget/mapped pair, and the last set's retain groups (built
    knowing every concept), without the 'forgotten' group since nothing was forgotten before."""
    last = sets[-1]
    retain = {k: v for k, v in last.retain.items() if k != "forgotten"}
    return PromptSet("+".join(s.concept for s in sets), last.kind,
                     [p for s in sets for p in s.forget], [p for s in sets for p in s.mapped],
                     sorted({x for s in sets for x in s.surrogates}),
                     sorted({x for s in sets for x in s.neighbours}), retain, last.coverage)


class Evaluator:
    """Fixed scenes, seeds and real features: two evaluations of the same weights agree exactly.

    With `fd_exclude` (a benchmark passes every concept of its sequence), FD is measured on a
    fixed set of `spec.fd_images` scenes free of those concepts (`fd`), besides the clean scenes
    of the UA/RA set (`fd_clean`); without it, `fd` is the clean-scene FD (the pipeline, which
    cannot know later requests)."""

    def __init__(self, judge, spec: EvalSpec, size: int = 32, real_seed: int = 4242,
                 fd_exclude: Sequence[str] | None = None) -> None:
        self.judge = judge
        self.spec = spec
        self.scenes = eval_scenes(spec.stride)
        real = to_tensor(World(size=size, seed=real_seed).render_all(self.scenes))
        self.real_features = judge.embed(real)
        self.fd_scenes = fd_scenes(fd_exclude, spec.fd_images) if fd_exclude is not None else None
        self.fd_real_features = None
        if self.fd_scenes is not None:
            fd_real = to_tensor(World(size=size, seed=real_seed + 1).render_all(self.fd_scenes))
            self.fd_real_features = judge.embed(fd_real)
        self._base: Judgement | None = None
        self._base_fd: float | None = None

    def fixed_fd(self, model) -> float | None:
        """FD of `model`'s images of the fixed FD set to real images of the same scenes."""
        if self.fd_scenes is None:
            return None
        images = generate_scenes(model, self.fd_scenes, self.spec.seed + 1, self.spec.batch_size,
                                 steps=self.spec.steps)
        return frechet_distance(self.judge.embed(images), self.fd_real_features)

    def judge_model(self, model) -> Judgement:
        images = generate_scenes(model, self.scenes, self.spec.seed, self.spec.batch_size, steps=self.spec.steps)
        return judge_images(self.judge, images, self.scenes)

    def set_base(self, base_model, cache: str | Path | None = None) -> dict:
        """Judge the base model once; with `cache`, keep its verdict in an .npz keyed by the base
        weights, the scenes and the seed, so every later step skips that generation."""
        key = None
        if cache is not None:
            import hashlib

            fd_key = [(x.object, x.colour, x.texture) for x in self.fd_scenes or []]
            h = hashlib.sha256(f"{self.spec.seed}:{len(self.scenes)}:{self.spec.steps}:{fd_key}".encode())
            for n, p in sorted(base_model.unet.state_dict().items()):
                h.update(n.encode())
                h.update(p.detach().cpu().numpy().tobytes())
            key = h.hexdigest()
            cache = Path(cache)
            if cache.exists():
                data = np.load(cache)
                if str(data["key"]) == key:
                    preds = {k[5:]: data[k] for k in data.files if k.startswith("pred_")}
                    self._base = Judgement(self.scenes, preds, data["features"])
                    self._base_fd = float(data["fixed_fd"]) if "fixed_fd" in data.files else None
                    return self._base_metrics([])
        self._base = self.judge_model(base_model)
        self._base_fd = self.fixed_fd(base_model)
        if cache is not None:
            cache.parent.mkdir(parents=True, exist_ok=True)
            extra = {"fixed_fd": self._base_fd} if self._base_fd is not None else {}
            tmp = cache.with_name(f".{cache.stem}-{os.getpid()}.npz")  # atomic: runs may share it
            np.savez(tmp, key=key, features=self._base.features, **extra,
                     **{f"pred_{k}": v for k, v in self._base.predictions.items()})
            os.replace(tmp, cache)
        return self._base_metrics([])

    def _base_metrics(self, forgotten: list[str]) -> dict:
        m = unlearning_metrics(self._base, forgotten, self.real_features)
        if self._base_fd is not None:
            m["fd_clean"], m["fd"] = m.get("fd"), self._base_fd
        return m

    def __call__(self, model, forgotten: list[str]) -> dict:
        v = self.judge_model(model)
        m = unlearning_metrics(v, forgotten, self.real_features)
        if self.fd_scenes is not None:
            m["fd_clean"], m["fd"] = m.get("fd"), self.fixed_fd(model)
        if self._base is not None:
            base = self._base_metrics(forgotten)
            m["base"] = {k: base.get(k) for k in ("ua", "ra_in", "ra_cross", "ra_neighbour", "ra_all", "fd", "fd_clean")}
            if base.get("fd"):
                m["fd_ratio"] = m["fd"] / base["fd"]
        return m


def weight_drift(model, base_state: dict[str, torch.Tensor]) -> float:
    with torch.no_grad():
        return float(sum(((p - base_state[n]) ** 2).sum() for n, p in model.unet.named_parameters()).sqrt())


def run_sequence(base_model, evaluator: Evaluator, requests: list[Request], spec: MethodSpec, out: str | Path,
                 name: str = "", max_steps: int | None = None, progress: bool = True,
                 log=print) -> list[dict]:
    """Process `requests` in order; write DIR/results.json after every step; resume if present."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    results_file = out / "results.json"
    results: list[dict] = json.loads(results_file.read_text()) if results_file.exists() else []
    if results and not step_unet(out, len(results)).exists():
        log(f"[{name}] {results_file} has {len(results)} step(s) but their weights are not on disk "
            f"({out / 'steps'} is not committed): starting again from the first request")
        results = []
    base_state = {n: p.detach().clone() for n, p in base_model.unet.named_parameters()}
    if evaluator._base is None:
        evaluator.set_base(base_model)
    model = base_model
    forgotten: list[str] = [r["concept"] for r in results]
    if results:
        model = base_model.with_unet(step_unet(out, len(results)))
        log(f"[{name}] resuming after step {len(results)} ({', '.join(forgotten)})")
    sets: list[PromptSet] = [PromptSet.load(out / "steps" / f"{i + 1:02d}" / "prompts.json") for i in range(len(results))]
    ties_states: list[dict] = []
    if spec.mode == "ties":
        for i in range(len(results)):
            ties_states.append(UNet2DConditionModel.from_pretrained(out / "steps" / f"{i + 1:02d}" / "single",
                                                                    use_safetensors=True).state_dict())
    todo = requests[len(results):]
    if max_steps is not None:
        todo = todo[: max(0, max_steps - len(results))]
    for request in todo:
        k = len(results) + 1
        step_dir = out / "steps" / f"{k:02d}"
        t0 = time.perf_counter()
        start = base_model if spec.mode != "sequential" else model
        ps = prepare_step(start, request, forgotten if spec.mode == "sequential" else [], spec, seed=k)
        if spec.mode == "simultaneous":
            # context prompts must avoid every concept of the batch: rebuild each set knowing all of them
            names = forgotten + [ps.concept]
            sets_now = [build_prompt_set(c, [x for x in names if x != c], _valid(s.surrogates, c, names),
                                         text_encoder=base_model.text, seed=i + 1)
                        for i, (c, s) in enumerate(zip(names, sets + [ps]))]
            train_set = merge_prompt_sets(sets_now)
            cfg = spec.unlearn.model_copy(update={"steps": spec.unlearn.steps * len(names)})
        else:
            train_set, cfg = ps, spec.unlearn
        cfg = request_config(cfg, k)
        result = unlearn(start, train_set, cfg, progress=progress, anchor=base_model)
        student = result.student
        if spec.mode == "ties":
            step_dir.mkdir(parents=True, exist_ok=True)
            student.unet.save_pretrained(step_dir / "single", safe_serialization=True)
            ties_states.append(student.unet.state_dict())
            keys = trainable_names(base_model.unet, spec.unlearn.trainable)
            merged = ties_merge(base_model.unet.state_dict(), ties_states, keys, spec.ties_k, spec.ties_lambda)
            student = base_model.copy()
            student.unet.load_state_dict(merged)
            student.unet.eval()
        seconds_step = time.perf_counter() - t0
        forgotten = forgotten + [ps.concept]
        sets.append(ps)
        metrics = evaluator(student, forgotten)
        entry = {
            "step": k,
            "method": name,
            "request": request.model_dump(),
            "concept": ps.concept,
            "ua": metrics["ua"],
            "ra_in": metrics["ra_in"],
            "ra_cross": metrics["ra_cross"],
            "ra_neighbour": metrics["ra_neighbour"],
            "ra_all": metrics["ra_all"],
            "fd": metrics.get("fd"),
            "fd_ratio": metrics.get("fd_ratio"),
            "fd_clean": metrics.get("fd_clean"),
            "drift": weight_drift(student, base_state),
            "seconds": round(seconds_step, 1),
            "seconds_replay": round(result.seconds_replay, 1),
            "seconds_train": round(result.seconds_train, 1),
            "replay_images": result.replay_images,
            "threads": torch.get_num_threads(),  # timings are only comparable at equal threads
            "surrogates": ps.surrogates,
            "base": metrics.get("base"),
            "per_concept": metrics["per_concept"],
            "history": result.history,
        }
        step_dir.mkdir(parents=True, exist_ok=True)
        ps.save(step_dir / "prompts.json")
        student.unet.save_pretrained(step_unet(out, k), safe_serialization=True)
        results.append(entry)
        results_file.write_text(json.dumps(results, indent=1) + "\n")
        log(f"[{name}] step {k} forget {ps.concept}: UA {_pct(entry['ua'])} RA-I {_pct(entry['ra_in'])} "
            f"RA-C {_pct(entry['ra_cross'])} RA-N {_pct(entry['ra_neighbour'])} "
            f"FDx {entry['fd_ratio'] or float('nan'):.2f} ({entry['seconds']:.0f} s)")
        model = student
    return results


def _valid(surrogates: list[str], name: str, gone: list[str]) -> list[str]:
    """Surrogates that are not themselves being forgotten (else any retained concept of the kind)."""
    from cul.world import concept

    keep = [x for x in surrogates if x not in gone]
    return keep or [c.name for c in CONCEPTS[concept(name).kind] if c.name not in gone][:1]


def _pct(x: float | None) -> str:
    return "  n/a" if x is None else f"{100 * x:5.1f}"

