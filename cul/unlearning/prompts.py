"""Prompt sets of one request: what to forget, what to map it to, and what to keep.

DFR's recipe, on the world's vocabulary:
- forget prompts show the concept in varied contexts (other attributes, templates, synonyms);
- mapped prompts are the same contexts with a surrogate of the same kind in its place, using
  several surrogates, chosen as the candidates whose noise predictions are closest to the forget
  prompt's (the later DFR code);
- retain prompts: the concept's neighbours (the world's confusables and the nearest concepts by
  text embedding), the other retained concepts, unrelated prompts (partial captions and the empty
  prompt that classifier-free guidance relies on), and the prompts of every concept forgotten
  earlier, so distillation from the previous model keeps them forgotten.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from cul.catalogue import Catalogue
from cul.world import (
    CONCEPTS,
    CONFUSABLES,
    PARTIAL_TEMPLATES,
    TRAIN_TEMPLATES,
    Kind,
    Scene,
    all_scenes,
    concept,
    fill,
)

SLOT = {Kind.OBJECT: "o", Kind.COLOUR: "c", Kind.TEXTURE: "t"}
FIELD = {Kind.OBJECT: "object", Kind.COLOUR: "colour", Kind.TEXTURE: "texture"}


@dataclass
class PromptSet:
    """All prompts one request trains and evaluates with; saved as JSON (a DVC output)."""

    concept: str
    kind: str
    forget: list[str]
    mapped: list[str]  # parallel to `forget`
    surrogates: list[str]
    neighbours: list[str]
    retain: dict[str, list[str]] = field(default_factory=dict)  # group -> prompts
    # captions of many clean scenes, no images: targets of the coverage term (see coverage_loss)
    coverage: list[str] = field(default_factory=list)
    # parallel to retain["forgotten"] when built with `forgotten_surrogates`: the same captions with
    # each earlier forgotten concept replaced by its surrogate (targets of forgotten_target: mapped)
    forgotten_mapped: list[str] = field(default_factory=list)
    # earlier forgotten concept -> the kept captions that name one of its kept neighbours: what the
    # relearning attack on that concept fine-tunes on (`Relearning.neighbours_of: all`); left empty,
    # and out of the saved file, where the recipe does not simulate it
    neighbour_captions: dict[str, list[str]] = field(default_factory=dict)

    def retain_prompts(self) -> list[str]:
        return [p for group in self.retain.values() for p in group]

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        data = asdict(self)
        if not data["neighbour_captions"]:  # prompt sets made before it keep their bytes
            del data["neighbour_captions"]
        path.write_text(json.dumps(data, indent=2) + "\n")
        return path

    @classmethod
    def load(cls, path: str | Path) -> PromptSet:
        return cls(**json.loads(Path(path).read_text()))


def scene_prompt(
    scene: Scene, rng: np.random.Generator, template: str | None = None, swap: tuple[Kind, str] | None = None
) -> tuple[str, str | None]:
    """A training-style caption of a scene (random template and synonyms); with `swap`, also the
    same caption with the concept of that kind replaced by another name (the mapped prompt)."""
    template = template or TRAIN_TEMPLATES[rng.integers(len(TRAIN_TEMPLATES))]
    words = {}
    for kind in (Kind.OBJECT, Kind.COLOUR, Kind.TEXTURE):
        c = concept(getattr(scene, FIELD[kind]))
        words[SLOT[kind]] = c.synonyms[rng.integers(len(c.synonyms))]
    prompt = fill(template, **words)
    if swap is None:
        return prompt, None
    kind, name = swap
    mapped = dict(words)
    mapped[SLOT[kind]] = name
    return prompt, fill(template, **mapped)


def _clean_scenes(exclude: set[str], required: tuple[Kind, str] | None = None) -> list[Scene]:
    out = []
    for s in all_scenes():
        names = {s.object, s.colour, s.texture}
        if required is not None:
            kind, name = required
            if getattr(s, FIELD[kind]) != name:
                continue
            names.discard(name)
        if not names & exclude:
            out.append(s)
    return out


def text_neighbours(name: str, candidates: Sequence[str], text_encoder, k: int = 2) -> list[str]:
    """The k candidates nearest to `name` by cosine of pooled text embeddings."""
    if not candidates or text_encoder is None:
        return []
    v = torch.nn.functional.normalize(text_encoder.pooled([name, *candidates]), dim=-1)
    sims = (v[1:] @ v[0]).tolist()
    order = sorted(range(len(candidates)), key=lambda i: -sims[i])
    return [candidates[i] for i in order[:k]]


def build_prompt_set(
    name: str,
    forgotten_before: Sequence[str] = (),
    surrogates: Sequence[str] = (),
    extra_retain: Sequence[str] = (),
    n_forget: int = 64,
    n_per_retained: int = 4,
    n_per_neighbour: int = 12,
    n_per_forgotten: int = 8,
    n_coverage: int = 256,
    text_encoder=None,
    seed: int = 0,
    forgotten_surrogates: dict[str, str] | None = None,
) -> PromptSet:
    """Prompts for forgetting `name` after `forgotten_before`. Surrogates must be chosen already
    (see `rank_surrogates`); they are assigned to forget prompts in turn. `forgotten_surrogates`
    (earlier concept -> its surrogate) also gives the forgotten group mapped captions."""
    c = concept(name)
    kind = c.kind
    rng = np.random.default_rng(seed)
    gone = set(forgotten_before) | {name}
    if not surrogates:
        raise ValueError("at least one surrogate is needed to build mapped prompts")
    # forget: the concept in varied, clean contexts (no other forgotten concept in them)
    contexts = _clean_scenes(gone, required=(kind, name))
    perm = rng.permutation(len(contexts))
    idx = [perm[i % len(perm)] for i in range(n_forget)]  # repeats get other templates and synonyms
    forget, mapped = [], []
    for j, i in enumerate(idx):
        p, m = scene_prompt(contexts[i], rng, swap=(kind, surrogates[j % len(surrogates)]))
        assert m is not None  # a swap always gives the mapped caption
        forget.append(p)
        mapped.append(m)
    # a few partial captions too ("a red circle"): the concept without full context
    for template in PARTIAL_TEMPLATES:
        if "{" + kind.value + "}" not in template:
            continue
        s = contexts[rng.integers(len(contexts))]
        words = {SLOT[k]: concept(getattr(s, FIELD[k])).name for k in SLOT}
        sur = surrogates[len(forget) % len(surrogates)]
        forget.append(fill(template, **{**words, SLOT[kind]: c.synonyms[rng.integers(len(c.synonyms))]}))
        mapped.append(fill(template, **{**words, SLOT[kind]: sur}))

    same_kind = [x.name for x in CONCEPTS[kind] if x.name not in gone]
    neighbours = [n for n in CONFUSABLES[name] if n not in gone]
    for n in text_neighbours(name, [x for x in same_kind if x not in neighbours], text_encoder):
        neighbours.append(n)
    for n in extra_retain:
        if n not in neighbours and n not in gone:
            neighbours.append(n)

    retain: dict[str, list[str]] = {"neighbour": [], "retained": [], "unrelated": [], "forgotten": []}
    for n in neighbours:
        pool = _clean_scenes(gone, required=(concept(n).kind, n))
        for i in rng.permutation(len(pool))[:n_per_neighbour]:
            retain["neighbour"].append(scene_prompt(pool[i], rng)[0])
    for group in CONCEPTS.values():
        for x in group:
            if x.name in gone or x.name in neighbours:
                continue
            pool = _clean_scenes(gone, required=(x.kind, x.name))
            for i in rng.permutation(len(pool))[:n_per_retained]:
                retain["retained"].append(scene_prompt(pool[i], rng)[0])
    clean = _clean_scenes(gone)
    retain["unrelated"].append("")  # the unconditional prompt used by classifier-free guidance
    for template in PARTIAL_TEMPLATES:
        for i in rng.permutation(len(clean))[:6]:
            s = clean[i]
            retain["unrelated"].append(fill(template, o=s.object, c=s.colour, t=s.texture))
    forgotten_mapped = []
    for f in forgotten_before:
        fk = concept(f).kind
        pool = _clean_scenes(gone, required=(fk, f))
        swap = (fk, forgotten_surrogates[f]) if forgotten_surrogates else None
        for i in rng.permutation(len(pool))[:n_per_forgotten]:
            prompt, swapped = scene_prompt(pool[i], rng, swap=swap)  # the same draws with or without swap
            retain["forgotten"].append(prompt)
            if swapped is not None:
                forgotten_mapped.append(swapped)
    # coverage: its own stream, so the groups above stay what they were before it existed
    crng = np.random.default_rng([seed, 1])
    coverage = [scene_prompt(clean[i], crng)[0] for i in crng.permutation(len(clean))[:n_coverage]]
    return PromptSet(
        name,
        kind.value,
        forget,
        mapped,
        list(surrogates),
        neighbours,
        retain,
        coverage,
        forgotten_mapped,
    )


@torch.no_grad()
def rank_surrogates(
    model, name: str, candidates: Sequence[str], n_prompts: int = 8, draws: int = 32, seed: int = 0
) -> list[tuple[str, float]]:
    """Candidates ordered by how close their noise predictions are to the concept's (mean MSE over
    `draws` random (x_t, t) under the current model, on the same contexts)."""
    c = concept(name)
    rng = np.random.default_rng(seed)
    contexts = _clean_scenes({name}, required=(c.kind, name))
    scenes = [contexts[i] for i in rng.permutation(len(contexts))[:n_prompts]]
    template = TRAIN_TEMPLATES[0]
    gen = torch.Generator().manual_seed(seed)
    shape = model.latent_shape()
    x = torch.randn((draws, *shape), generator=gen).to(model.device)
    t = torch.randint(0, model.scheduler.config.num_train_timesteps, (draws,), generator=gen).to(model.device)
    scores = {}
    base_prompts = [fill(template, o=s.object, c=s.colour, t=s.texture) for s in scenes]
    ctx = model.encode_prompts([base_prompts[i % len(base_prompts)] for i in range(draws)])
    target = model.predict_noise(x, t, ctx)
    for cand in candidates:
        prompts = [
            fill(template, **{SLOT[k]: (cand if k == c.kind else getattr(s, FIELD[k])) for k in SLOT}) for s in scenes
        ]
        ctx_c = model.encode_prompts([prompts[i % len(prompts)] for i in range(draws)])
        scores[cand] = float(((model.predict_noise(x, t, ctx_c) - target) ** 2).mean())
    return sorted(scores.items(), key=lambda kv: kv[1])


def catalogue_prompt_set(
    catalogue: Catalogue,
    name: str,
    forgotten_before: Sequence[str] = (),
    n_forget: int = 64,
    n_per_neighbour: int = 12,
    n_per_retained: int = 4,
    n_per_forgotten: int = 8,
    seed: int = 0,
    surrogates: Sequence[str] | None = None,
    extra_retain: Sequence[str] = (),
) -> PromptSet:
    """A request's prompt set from any catalogue (the world's compositional scenes aside).

    Forget prompts are the catalogue's training templates of the concept's category, filled with
    its name and synonyms; each mapped prompt is the same prompt with a surrogate in its place
    (cycling through the entry's surrogates, DFR's re-steering pairs). Retain groups: the entry's
    neighbours, every other concept, the unconditional prompt, and each earlier forgotten concept
    (with `forgotten_mapped`: the same prompts with that concept's first surrogate). Other slots of
    a template take random concepts that are neither forgotten nor the concept itself.
    `surrogates` (default: the entry's) and `extra_retain` (more neighbours) come from the request.
    """
    entry = catalogue.get(name)
    surrogates = list(entry.surrogates if surrogates is None else surrogates)
    if not surrogates:
        raise ValueError(
            f"{name!r} has no surrogates in the catalogue {catalogue.name!r}: add some (`cul concept add`)"
        )
    gone = {name, *forgotten_before}
    rng = np.random.default_rng(seed)

    def prompts(concept_name: str, words: Sequence[str], n: int, swap_in: Sequence[str] = ()) -> tuple[list, list]:
        category = catalogue.get(concept_name).category
        templates = catalogue.templates_for(category)
        out, swapped = [], []
        for i in range(n):
            t = templates[i % len(templates)]
            others = catalogue.slot_words(category, rng, gone)
            out.append(catalogue.fill(t, {**others, category: words[int(rng.integers(len(words)))]}))
            if swap_in:
                swapped.append(catalogue.fill(t, {**others, category: swap_in[i % len(swap_in)]}))
        return out, swapped

    forget, mapped = prompts(name, [entry.name, *entry.synonyms], n_forget, surrogates)
    neighbours = [n for n in dict.fromkeys([*entry.neighbours, *extra_retain]) if n not in gone]
    retain: dict[str, list[str]] = {"neighbour": [], "retained": [], "unrelated": [""], "forgotten": []}
    for n in neighbours:
        retain["neighbour"] += prompts(n, [n], n_per_neighbour)[0]
    for other in catalogue.concepts:
        if other.name not in gone and other.name not in neighbours:
            retain["retained"] += prompts(other.name, [other.name], n_per_retained)[0]
    forgotten_mapped: list[str] = []
    for f in forgotten_before:
        earlier = catalogue.get(f)
        p, m = prompts(f, [f, *earlier.synonyms], n_per_forgotten, earlier.surrogates[:1] or [""])
        retain["forgotten"] += p
        forgotten_mapped += m
    return PromptSet(name, entry.category, forget, mapped, surrogates, neighbours, retain, [], forgotten_mapped)
