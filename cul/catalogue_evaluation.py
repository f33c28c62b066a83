"""Unlearning metrics over any catalogue, with any judge that answers per category.

For each concept, `images_per_concept` prompts (the catalogue's templates of its category; other
slots take concepts that are neither forgotten nor it) are drawn with fixed seeds, and the judge
(`cul.judge.Judge` for the world, `cul.clip_judge.ClipJudge` for any catalogue) names, per
category, the concept each image shows. A concept's score is the share of its images judged as it,
so UA = 1 - the forgotten concepts' mean score, and RA-I, RA-C, RA-N are
`cul.evaluation.retention` over the catalogue's categories and neighbours.

FD needs a reference distribution. A Stable Diffusion team has no real images of its model's
distribution, so the reference is the base model itself, drawn with another seed: `fd` is the
Frechet distance (judge features) between the model's images of the retained concepts and the
base model's images of the same prompts under a second seed, and the base model's own `fd` (its
two draws against each other) is the floor, so `fd_ratio` reads as in the world's evaluation.
"""

from __future__ import annotations

import numpy as np
import torch

from cul.catalogue import Catalogue
from cul.evaluation import Figures, StepMetrics, _mean, frechet_distance, retention


class CatalogueEvaluator:
    """Fixed prompts and seeds per concept: two evaluations of the same weights agree exactly.

    Args:
        catalogue: the concepts to score.
        judge: anything with `predict(images) -> {category: index in catalogue.of(category)}` and
            `embed(images) -> features`.
        images_per_concept: images drawn per concept.
        seed: sampling seed; the FD reference is drawn with `seed + 1`.
        steps: DDIM steps (None: the model's own).
        batch_size: images sampled at once.
        paraphrase_images: images per synonym, paraphrase or description in `paraphrase_ua`.
    """

    def __init__(
        self,
        catalogue: Catalogue,
        judge,
        images_per_concept: int = 8,
        seed: int = 1234,
        steps: int | None = None,
        batch_size: int = 128,
        paraphrase_images: int = 8,
    ) -> None:
        self.catalogue = catalogue
        self.judge = judge
        self.images_per_concept = images_per_concept
        self.seed = seed
        self.steps = steps
        self.batch_size = batch_size
        self.paraphrase_images = paraphrase_images
        self.base = None

    def settings(self) -> dict:
        """What decides this evaluator's figures besides the judge (see `Evaluator.settings`)."""
        return {
            "evaluator": "catalogue",
            "catalogue": self.catalogue.name,
            "images_per_concept": self.images_per_concept,
            "seed": self.seed,
            "steps": self.steps,
            "batch_size": self.batch_size,
            "paraphrase_images": self.paraphrase_images,
        }

    def prompts(self, forgotten: list[str]) -> list[tuple[str, str]]:
        """(concept, prompt) pairs: `images_per_concept` per concept, cycling its templates."""
        rng = np.random.default_rng(self.seed)
        out = []
        for entry in self.catalogue.concepts:
            templates = self.catalogue.templates_for(entry.category)
            for i in range(self.images_per_concept):
                words = {**self.catalogue.slot_words(entry.category, rng, forgotten), entry.category: entry.name}
                out.append((entry.name, self.catalogue.fill(templates[i % len(templates)], words)))
        return out

    @property
    def has_base(self) -> bool:
        return self.base is not None

    def set_base(self, base) -> None:
        """The base model: the reference of FD and of the `base` figures."""
        self.base = base

    def _judge(self, model, prompts: list[str], seed: int) -> tuple[dict[str, np.ndarray], np.ndarray]:
        with torch.no_grad():
            images = model.sample(prompts, seed=seed, steps=self.steps, batch_size=self.batch_size)
        return self.judge.predict(images), self.judge.embed(images)

    def _figures(self, model, pairs, forgotten, reference) -> tuple[Figures, dict[str, float]]:
        predictions, features = self._judge(model, [p for _, p in pairs], self.seed)
        names = {c: [e.name for e in self.catalogue.of(c)] for c in self.catalogue.categories()}
        judged = [
            names[self.catalogue.get(c).category][predictions[self.catalogue.get(c).category][i]]
            for i, (c, _) in enumerate(pairs)
        ]
        scores: dict[str, float] = {}
        for entry in self.catalogue.concepts:
            mine = [j == entry.name for j, (c, _) in zip(judged, pairs) if c == entry.name]
            if mine:
                scores[entry.name] = float(np.mean(mine))
        kept = np.array([c not in forgotten for c, _ in pairs])
        fd = frechet_distance(features[kept], reference[kept]) if kept.sum() >= 2 else None
        retained = [v for n, v in scores.items() if n not in forgotten]
        figures = Figures(
            ua=_mean([1 - scores[f] for f in forgotten if f in scores]),
            **retention(scores, forgotten, self.catalogue),
            ra_all=_mean(retained),
            fd=fd,
        )
        return figures, scores

    def _filled(self, name: str, word: str, n: int, use: str, forgotten: list[str]) -> list[str]:
        """`n` prompts of the `use` templates of `name`'s category with `word` in its slot."""
        category = self.catalogue.get(name).category
        templates = self.catalogue.templates_for(category, use)
        rng = np.random.default_rng([self.seed, n])
        out = []
        for i in range(n):
            words = {**self.catalogue.slot_words(category, rng, [*forgotten, name]), category: word}
            out.append(self.catalogue.fill(templates[i % len(templates)], words))
        return out

    def paraphrase_ua(self, model, name: str, forgotten: list[str]) -> dict[str, float]:
        """UA when the concept is named by each of its other words (synonyms, held-out
        paraphrases) or described without a name (`descriptions`) in the held-out templates:
        erasing the name alone is not erasing the concept."""
        entry = self.catalogue.get(name)
        index = [e.name for e in self.catalogue.of(entry.category)].index(name)
        out = {}
        for w, word in enumerate([*entry.synonyms, *entry.paraphrases, *entry.descriptions]):
            predictions, _ = self._judge(
                model, self._filled(name, word, self.paraphrase_images, "held_out", forgotten), self.seed + 7 + w
            )
            out[word] = 1.0 - float(np.mean(predictions[entry.category] == index))
        return out

    def evidence_prompts(self, name: str, forgotten: list[str]) -> list[str]:
        """Prompts for before/after grids: the concept in three training contexts and one held-out
        wording, then up to three of its kept neighbours."""
        entry = self.catalogue.get(name)
        words = [*entry.paraphrases, *entry.synonyms][:1] or [name]
        out = self._filled(name, name, 3, "train", forgotten) + self._filled(name, words[0], 1, "held_out", forgotten)
        for n in [x for x in entry.neighbours if x not in forgotten][:3]:
            out += self._filled(n, n, 1, "train", forgotten)
        return out

    def __call__(self, model, forgotten: list[str]) -> StepMetrics:
        """The model's UA, RA-I, RA-C, RA-N, FD and per-concept scores, with the base model's."""
        if self.base is None:
            raise ValueError("call set_base(base_model) first: FD and the base figures need it")
        pairs = self.prompts(forgotten)
        _, reference = self._judge(self.base, [p for _, p in pairs], self.seed + 1)
        figures, scores = self._figures(model, pairs, forgotten, reference)
        base, _ = self._figures(self.base, pairs, forgotten, reference)
        ratio = figures.fd / base.fd if figures.fd is not None and base.fd else None
        return StepMetrics(
            **figures.model_dump(),
            per_concept=scores,
            n_clean_images=int(sum(c not in forgotten for c, _ in pairs)),
            fd_ratio=ratio,
            base=base,
        )
