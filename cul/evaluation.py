"""Measuring what a model draws: judge accuracy per kind and per concept, and Frechet distance.

Fixed seeds throughout, so two evaluations of the same weights agree exactly.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from scipy import linalg

from cul.judge import KINDS, Judge, labels, to_tensor
from cul.models.diffusion import DiffusionModel
from cul.world import CONCEPTS, Scene, World, all_scenes, caption


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
    return {"mean_term": float(((mu_a - mu_b) ** 2).sum()),
            "cov_term": float(np.trace(cov_a) + np.trace(cov_b) - 2 * np.trace(covmean))}


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


def generate_scenes(model: DiffusionModel, scenes: list[Scene], seed: int, batch_size: int = 128,
                    progress: bool = False, steps: int | None = None) -> torch.Tensor:
    """One image per scene, prompted with its canonical caption."""
    prompts = [caption(s.object, s.colour, s.texture) for s in scenes]
    return model.sample(prompts, seed=seed, batch_size=batch_size, progress=progress, steps=steps)


def evaluate_model(model: DiffusionModel, judge: Judge, real: torch.Tensor, seed: int, batch_size: int = 128,
                   progress: bool = False) -> tuple[dict, torch.Tensor]:
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
        "worst_concept": min(per_concept, key=per_concept.get),
        "worst_concept_accuracy": min(per_concept.values()),
        "fd": fd,
        "real_fd_floor": frechet_distance(judge.embed(floor_set), real_features),
        "seed": seed,
        "sampling": model.sampling.model_dump(),
    }
    return metrics, images


def _mean(xs: list[float]) -> float | None:
    return float(np.mean(xs)) if xs else None


def unlearning_metrics(verdict: Judgement, forgotten: list[str], real_features: np.ndarray | None = None) -> dict:
    """UA, RA-I, RA-C, RA-N and per-concept scores from one judged set of scene images.

    - a forgotten concept's score: share of images prompted with it that the judge still
      recognises as it (UA = 100% - that);
    - a retained concept's score: the same share on *clean* scenes (no forgotten concept in them);
    - RA-I: for each forgotten concept, the mean score of retained concepts of its kind
      (in-domain), averaged over forgotten concepts; RA-C: likewise for the other kinds
      (cross-domain); RA-N: mean score of the forgotten concepts' retained confusables.
    """
    from cul.world import CONFUSABLES, concept

    gone = set(forgotten)
    clean = np.array([not ({s.object, s.colour, s.texture} & gone) for s in verdict.scenes])
    scores: dict[str, float] = {}
    for i, k in enumerate(KINDS):
        ok = verdict.correct(k.value)
        for j, c in enumerate(CONCEPTS[k]):
            has = verdict.truth[:, i] == j
            sel = has if c.name in gone else has & clean
            if sel.any():
                scores[c.name] = float(ok[sel].mean())
    retained = {n: v for n, v in scores.items() if n not in gone}
    ra_in, ra_cross = [], []
    for f in forgotten:
        kind = concept(f).kind
        same = [v for n, v in retained.items() if concept(n).kind == kind]
        other = [v for n, v in retained.items() if concept(n).kind != kind]
        ra_in.append(_mean(same))
        ra_cross.append(_mean(other))
    neighbours = sorted({n for f in forgotten for n in CONFUSABLES[f] if n not in gone})
    out = {
        "ua": _mean([1 - scores[f] for f in forgotten if f in scores]),
        "ra_in": _mean([x for x in ra_in if x is not None]),
        "ra_cross": _mean([x for x in ra_cross if x is not None]),
        "ra_neighbour": _mean([retained[n] for n in neighbours if n in retained]),
        "ra_all": _mean(list(retained.values())),
        "per_concept": scores,
        "n_clean_images": int(clean.sum()),
    }
    if real_features is not None and clean.sum() >= 2:
        out["fd"] = frechet_distance(verdict.features[clean], real_features[clean])
    return out
