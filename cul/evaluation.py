"""Measuring what a model draws: judge accuracy per kind and per concept, Frechet distance, and
the unlearning metrics of a step (UA, RA-I, RA-C, RA-N, FD) as one typed `StepMetrics`.

Fixed seeds throughout, so two evaluations of the same weights agree exactly.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field
from scipy import linalg

from cul.catalogue import Catalogue
from cul.judge import KINDS, Judge, labels, to_tensor
from cul.models.diffusion import DiffusionModel
from cul.probes import ProbeSpec
from cul.world import CATALOGUE, CONCEPTS, CONFUSABLES, Kind, Scene, World, all_scenes, caption, concept


def _gaussian_fits(a: np.ndarray, b: np.ndarray):
    """Means, covariances and (C_a C_b)^1/2 of two feature sets, as FID fits them."""
    if len(a) < 2 or len(b) < 2:
        raise ValueError("Frechet distance needs at least two samples on each side")
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = linalg.sqrtm(cov_a @ cov_b)
    if not np.isfinite(covmean).all():
        eps = np.eye(len(mu_a)) * 1e-6
        covmean = linalg.sqrtm((cov_a + eps) @ (cov_b + eps))
    return mu_a, mu_b, cov_a, cov_b, covmean.real


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Frechet distance between Gaussians fitted to two feature sets (FID's formula)."""
    mu_a, mu_b, cov_a, cov_b, covmean = _gaussian_fits(a, b)
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2 * np.trace(covmean))


def frechet_terms(a: np.ndarray, b: np.ndarray) -> dict[str, float]:
    """The Frechet distance's two parts: |mu_a - mu_b|^2 (where the sets sit) and
    tr(C_a + C_b - 2 (C_a C_b)^1/2) (how they spread)."""
    mu_a, mu_b, cov_a, cov_b, covmean = _gaussian_fits(a, b)
    return {
        "mean_term": float(((mu_a - mu_b) ** 2).sum()),
        "cov_term": float(np.trace(cov_a) + np.trace(cov_b) - 2 * np.trace(covmean)),
    }


@dataclass
class Judgement:
    """The judge's verdict on a set of generated images of known scenes."""

    scenes: list[Scene]
    predictions: dict[str, np.ndarray]
    features: np.ndarray
    truth: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        self.truth = labels(self.scenes).numpy()

    def correct(self, kind: str) -> np.ndarray:
        i = [k.value for k in KINDS].index(kind)
        return self.predictions[kind] == self.truth[:, i]

    def accuracy_per_kind(self) -> dict[str, float]:
        return {k.value: float(self.correct(k.value).mean()) for k in KINDS}

    def accuracy_per_concept(self) -> dict[str, float]:
        """For each concept: share of images meant to show it that the judge says show it."""
        out = {}
        for i, k in enumerate(KINDS):
            ok = self.correct(k.value)
            for j, c in enumerate(CONCEPTS[k]):
                sel = self.truth[:, i] == j
                if sel.any():
                    out[c.name] = float(ok[sel].mean())
        return out


def judge_images(judge: Judge, images: torch.Tensor, scenes: list[Scene]) -> Judgement:
    return Judgement(scenes, judge.predict(images), judge.embed(images))


def generate_scenes(
    model: DiffusionModel,
    scenes: list[Scene],
    seed: int,
    batch_size: int = 128,
    progress: bool = False,
    steps: int | None = None,
) -> torch.Tensor:
    """One image per scene, prompted with its canonical caption."""
    prompts = [caption(s.object, s.colour, s.texture) for s in scenes]
    return model.sample(prompts, seed=seed, batch_size=batch_size, progress=progress, steps=steps)


def evaluate_model(
    model: DiffusionModel, judge: Judge, real: torch.Tensor, seed: int, batch_size: int = 128, progress: bool = False
) -> tuple[dict, torch.Tensor]:
    """Every object x colour x texture once: per-kind and per-concept accuracy, and FD to `real`
    (the world stage's reference images of the same scenes)."""
    scenes = all_scenes()
    images = generate_scenes(model, scenes, seed, batch_size, progress)
    verdict = judge_images(judge, images, scenes)
    real_features = judge.embed(real)
    fd = frechet_distance(verdict.features, real_features)
    # a second real set of the same scenes: the FD that sampling noise alone gives
    size = real.shape[-1]
    floor_set = to_tensor(World(size=size, seed=seed + 1).render_all(scenes))
    per_concept = verdict.accuracy_per_concept()
    metrics = {
        "n_images": len(scenes),
        "accuracy": verdict.accuracy_per_kind(),
        "per_concept": per_concept,
        "worst_concept": min(per_concept, key=lambda n: per_concept[n]),
        "worst_concept_accuracy": min(per_concept.values()),
        "fd": fd,
        "real_fd_floor": frechet_distance(judge.embed(floor_set), real_features),
        "seed": seed,
        "sampling": model.sampling.model_dump(),
    }
    return metrics, images


def _mean(xs: list[float]) -> float | None:
    return float(np.mean(xs)) if xs else None


def retention(
    per_concept: dict[str, float], forgotten: Sequence[str], catalogue: Catalogue = CATALOGUE
) -> dict[str, float | None]:
    """RA-I, RA-C and RA-N from per-concept scores, with every concept in `forgotten` gone.

    - RA-I: for each forgotten concept, the mean score of the retained concepts of its category
      (in-domain), averaged over the forgotten concepts;
    - RA-C: the same over the retained concepts of the other categories (cross-domain);
    - RA-N: the mean score of the forgotten concepts' retained neighbours (their confusables).
    """
    gone = set(forgotten)
    kept = {n: v for n, v in per_concept.items() if n not in gone}
    category = {c.name: c.category for c in catalogue.concepts}
    ra_in, ra_cross = [], []
    for f in forgotten:
        ra_in.append(_mean([v for n, v in kept.items() if category[n] == category[f]]))
        ra_cross.append(_mean([v for n, v in kept.items() if category[n] != category[f]]))
    neighbours = sorted({n for f in forgotten for n in catalogue.get(f).neighbours if n in kept})
    return {
        "ra_in": _mean([x for x in ra_in if x is not None]),
        "ra_cross": _mean([x for x in ra_cross if x is not None]),
        "ra_neighbour": _mean([kept[n] for n in neighbours]),
    }


class Figures(BaseModel):
    """The headline figures of one judged model (fractions; FD on judge features)."""

    model_config = ConfigDict(extra="ignore")

    ua: float | None = None  # unlearning accuracy: 1 - the forgotten concepts' mean score
    ra_in: float | None = None
    ra_cross: float | None = None
    ra_neighbour: float | None = None
    ra_all: float | None = None  # mean score of every retained concept
    fd: float | None = None  # on the fixed FD set when there is one, else on the clean scenes
    fd_clean: float | None = None  # on the clean scenes of the UA/RA set (with a fixed FD set)


class StepMetrics(Figures):
    """A step's evaluation: its figures, per-concept scores, and the base model's figures on the
    same scenes (`base`), against which the gate and the reports read it."""

    per_concept: dict[str, float] = Field(default_factory=dict)  # share of its images judged as it
    counts: dict[str, tuple[int, int]] = Field(default_factory=dict)  # forgotten: (images judged as it, images)
    n_clean_images: int = 0
    fd_ratio: float | None = None  # fd / the base model's fd
    base: Figures | None = None


def unlearning_metrics(
    verdict: Judgement, forgotten: list[str], real_features: np.ndarray | None = None
) -> StepMetrics:
    """UA, RA-I, RA-C, RA-N and per-concept scores from one judged set of scene images.

    A forgotten concept's score is the share of images prompted with it that the judge still
    recognises as it (UA = 100% - that); a retained concept's score is the same share on *clean*
    scenes (no forgotten concept in them). RA-I, RA-C, RA-N: see `retention`.
    """
    gone = set(forgotten)
    clean = np.array([not ({s.object, s.colour, s.texture} & gone) for s in verdict.scenes])
    scores: dict[str, float] = {}
    counts: dict[str, tuple[int, int]] = {}
    for i, k in enumerate(KINDS):
        ok = verdict.correct(k.value)
        for j, c in enumerate(CONCEPTS[k]):
            has = verdict.truth[:, i] == j
            sel = has if c.name in gone else has & clean
            if sel.any():
                scores[c.name] = float(ok[sel].mean())
                if c.name in gone:
                    counts[c.name] = (int(ok[sel].sum()), int(sel.sum()))
    retained = {n: v for n, v in scores.items() if n not in gone}
    fd = None
    if real_features is not None and clean.sum() >= 2:
        fd = frechet_distance(verdict.features[clean], real_features[clean])
    return StepMetrics(
        ua=_mean([1 - scores[f] for f in forgotten if f in scores]),
        **retention(scores, forgotten),
        ra_all=_mean(list(retained.values())),
        fd=fd,
        per_concept=scores,
        counts=counts,
        n_clean_images=int(clean.sum()),
    )


# -- the unlearning evaluation ---------------------------------------------------------------------
class EvalSpec(BaseModel):
    """Seeds and sizes of every unlearning evaluation."""

    model_config = ConfigDict(extra="forbid")

    seed: int = 1234
    stride: int = Field(1, ge=1)  # evaluate on about 1/stride of the 512 scenes (see eval_scenes)
    batch_size: int = Field(128, ge=1)
    steps: int | None = Field(None, ge=1)  # DDIM steps of evaluation sampling (None: the model's own)
    paraphrase_scenes: int = Field(16, ge=1)  # images per paraphrase in a step's paraphrase UA
    images_per_concept: int = Field(8, ge=1)  # a catalogue evaluation's images of each concept (not the world's)
    fd_images: int = Field(200, ge=2)  # size of the benchmark's fixed FD set (see fd_scenes)
    probes: ProbeSpec = ProbeSpec()  # robustness probes of each step (cul.probes)


def eval_scenes(stride: int) -> list[Scene]:
    """About 1/stride of the 512 scenes: those whose object, colour and texture indices sum to a
    multiple of min(stride, 8) (a Latin-square design: every concept equally often for strides
    2, 4 and 8); larger strides take a fixed random share of the stride-8 set, which cannot stay
    exactly balanced. (A plain [::stride] slice would keep only some textures.)"""
    latin = [s for s in all_scenes() if sum(s.label()) % min(stride, 8) == 0]
    if stride <= 8:
        return latin
    keep = np.random.default_rng(0).permutation(len(latin))[: max(2, len(latin) * 8 // stride)]
    return [latin[i] for i in sorted(keep)]


def fd_scenes(exclude: Sequence[str], n: int) -> list[Scene]:
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


class Evaluator:
    """Fixed scenes, seeds and real features: two evaluations of the same weights agree exactly.

    With `fd_exclude` (a benchmark passes every concept of its sequence), FD is measured on a
    fixed set of `spec.fd_images` scenes free of those concepts (`fd`), besides the clean scenes
    of the UA/RA set (`fd_clean`); without it, `fd` is the clean-scene FD (the pipeline, which
    cannot know later requests). Call `set_base` with the base model before judging steps."""

    def __init__(
        self, judge, spec: EvalSpec, size: int = 32, real_seed: int = 4242, fd_exclude: Sequence[str] | None = None
    ) -> None:
        self.judge = judge
        self.spec = spec
        self.size, self.real_seed = size, real_seed
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

    @property
    def has_base(self) -> bool:
        return self._base is not None

    def settings(self) -> dict:
        """What decides this evaluator's figures besides the judge: a benchmark records it with
        every step and refuses to resume under other settings."""
        return {
            "evaluator": "world",
            "spec": self.spec.model_dump(mode="json"),
            "size": self.size,
            "real_seed": self.real_seed,
        }

    def fixed_fd(self, model) -> float | None:
        """FD of `model`'s images of the fixed FD set to real images of the same scenes."""
        if self.fd_scenes is None or self.fd_real_features is None:
            return None
        images = generate_scenes(model, self.fd_scenes, self.spec.seed + 1, self.spec.batch_size, steps=self.spec.steps)
        return frechet_distance(self.judge.embed(images), self.fd_real_features)

    def paraphrase_ua(self, model, name: str, forgotten: list[str]) -> dict[str, float]:
        """`paraphrase_ua` with this evaluation's judge and seeds."""
        spec = self.spec
        return paraphrase_ua(model, self.judge, name, forgotten, spec.seed, spec.paraphrase_scenes, spec.steps)

    def evidence_prompts(self, name: str, forgotten: list[str]) -> list[str]:
        return evidence_prompts(name, forgotten)

    def more_images(self, model, name: str, round_: int) -> tuple[int, int]:
        """Fresh evidence for an open UA check: the evaluation's scenes of `name` drawn again at
        another seed (one per round), as (images the judge sees as `name`, images)."""
        c = concept(name)
        scenes = [s for s in self.scenes if getattr(s, c.kind.value) == name]
        seed = self.spec.seed + 7919 * round_
        images = generate_scenes(model, scenes, seed, self.spec.batch_size, steps=self.spec.steps)
        ok = judge_images(self.judge, images, scenes).correct(c.kind.value)
        return int(ok.sum()), len(scenes)

    def judge_model(self, model) -> Judgement:
        images = generate_scenes(model, self.scenes, self.spec.seed, self.spec.batch_size, steps=self.spec.steps)
        return judge_images(self.judge, images, self.scenes)

    def _cache_key(self, base_model) -> str:
        fd_key = [(x.object, x.colour, x.texture) for x in self.fd_scenes or []]
        return base_model.digest(f"{self.spec.seed}:{len(self.scenes)}:{self.spec.steps}:{fd_key}".encode())

    def set_base(self, base_model, cache: str | Path | None = None) -> StepMetrics:
        """Judge the base model once; with `cache`, keep its verdict in an .npz keyed by the base
        weights, the scenes and the seed, so every later step skips that generation."""
        key = self._cache_key(base_model) if cache is not None else None
        if cache is not None and Path(cache).exists():
            data = np.load(cache)
            if str(data["key"]) == key:
                preds = {k[5:]: data[k] for k in data.files if k.startswith("pred_")}
                self._base = Judgement(self.scenes, preds, data["features"])
                self._base_fd = float(data["fixed_fd"]) if "fixed_fd" in data.files else None
                return self._base_metrics([])
        self._base = self.judge_model(base_model)
        self._base_fd = self.fixed_fd(base_model)
        if cache is not None:
            cache = Path(cache)
            cache.parent.mkdir(parents=True, exist_ok=True)
            extra = {"fixed_fd": self._base_fd} if self._base_fd is not None else {}
            tmp = cache.with_name(f".{cache.stem}-{os.getpid()}.npz")  # atomic: runs may share it
            arrays: dict[str, Any] = {"key": key, "features": self._base.features, **extra}
            arrays.update({f"pred_{k}": v for k, v in self._base.predictions.items()})
            np.savez(tmp, **arrays)
            os.replace(tmp, cache)
        return self._base_metrics([])

    def _base_metrics(self, forgotten: list[str]) -> StepMetrics:
        if self._base is None:
            raise RuntimeError("set_base first: the base model has not been judged")
        m = unlearning_metrics(self._base, forgotten, self.real_features)
        if self._base_fd is not None:
            m.fd_clean, m.fd = m.fd, self._base_fd
        return m

    def __call__(self, model, forgotten: list[str]) -> StepMetrics:
        m = unlearning_metrics(self.judge_model(model), forgotten, self.real_features)
        if self.fd_scenes is not None:
            m.fd_clean, m.fd = m.fd, self.fixed_fd(model)
        if self._base is not None:
            base = self._base_metrics(forgotten)
            m.base = Figures(**base.model_dump(include=set(Figures.model_fields)))
            if base.fd and m.fd is not None:
                m.fd_ratio = m.fd / base.fd
        return m


def weight_drift(model, reference: dict[str, torch.Tensor]) -> float:
    """Euclidean distance of `model`'s UNet weights from `reference` (name -> tensor)."""
    with torch.no_grad():
        return float(sum(((p - reference[n]) ** 2).sum() for n, p in model.unet.named_parameters()).sqrt())


def paraphrase_ua(
    model, judge, concept_name: str, forgotten: list[str], seed: int, n_scenes: int = 16, steps: int | None = None
) -> dict[str, float]:
    """UA when the concept is named by each of its other words (training synonyms and held-out
    paraphrases): erasing the name alone is not erasing the concept."""
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


def evidence_prompts(concept_name: str, forgotten: list[str]) -> list[str]:
    """Prompts for before/after grids: the concept in four contexts (one with a held-out
    paraphrase), then its retained confusables."""
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
