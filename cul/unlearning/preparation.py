"""Step preparation: from a request and the model it starts from, the prompt set it trains on.

Surrogates: the request's hints first, then the same-kind candidates whose noise predictions under
the current model are closest to the concept's (the later DFR code's mapping rule). Under
`forgotten_target: mapped`, each earlier forgotten concept is named by what the current model now
draws for it: the candidate closest to it in the same sense.
"""

from __future__ import annotations

from cul.catalogue import Catalogue, noise_distances
from cul.unlearning.batches import simulates_earlier_attacks, split_retain
from cul.unlearning.prompts import PromptSet, build_prompt_set, catalogue_prompt_set, rank_surrogates
from cul.unlearning.recipes import Recipe
from cul.unlearning.request import Request, resolve_request
from cul.world import CATALOGUE, CONCEPTS, CONFUSABLES, concept


class PreparationError(ValueError):
    """A request that cannot be prepared as asked; the message says why."""


def choose_surrogates(
    model, name: str, forgotten: list[str], hints: list[str], n: int, neighbours: bool = True
) -> list[str]:
    """Hints first, then the same-kind candidates closest in noise prediction; with
    `neighbours=False` the concept's confusables are candidates only when no other concept of its
    kind is left (late in a sequence that erased the rest, as `benchmarks/clusters-20.yaml` does)."""
    kind = concept(name).kind
    banned = set(forgotten) | set(hints) | {name}
    left = [c.name for c in CONCEPTS[kind] if c.name not in banned]
    candidates = left if neighbours else [c for c in left if c not in CONFUSABLES[name]] or left
    if not hints and not candidates:
        raise PreparationError(
            f"nothing is left to map {name!r} to: every other {kind.value} is forgotten "
            f"({', '.join(sorted(set(forgotten) & {c.name for c in CONCEPTS[kind]}))})"
        )
    ranked = [c for c, _ in rank_surrogates(model, name, candidates)]
    return (list(hints) + ranked)[:n]


def prepare_step(model, request: Request, forgotten: list[str], recipe: Recipe, seed: int) -> PromptSet:
    """The prompt set of `request` after `forgotten`, from `model` (theta_{k-1})."""
    r = resolve_request(request, forgotten)
    surrogates = choose_surrogates(
        model, r.concept, forgotten, r.surrogates, recipe.n_surrogates, recipe.surrogate_neighbours
    )
    earlier = None
    if getattr(recipe, "forgotten_target", "previous") == "mapped":
        gone = forgotten + [r.concept]
        earlier = {f: choose_surrogates(model, f, gone, [], 1, recipe.surrogate_neighbours)[0] for f in forgotten}
    ps = build_prompt_set(
        r.concept, forgotten, surrogates, r.retain, text_encoder=model.text, seed=seed, forgotten_surrogates=earlier
    )
    if simulates_earlier_attacks(recipe):
        ps.neighbour_captions = earlier_neighbour_captions(CATALOGUE, ps, forgotten)
    return ps


def earlier_neighbour_captions(catalogue: Catalogue, ps: PromptSet, forgotten: list[str]) -> dict[str, list[str]]:
    """Each earlier forgotten concept's relearning data: the prompt set's kept captions that name one
    of its neighbours still kept (`Catalogue.named_in`), or, where every neighbour is forgotten too,
    the first kept concept of its category, as the `relearn_neighbour` attack takes (`cul.probes`)."""
    gone = {ps.concept, *forgotten}
    kept = split_retain(ps)[0]
    named = [set(catalogue.named_in(p)) for p in kept]
    out = {}
    for f in forgotten:
        entry = catalogue.get(f)
        near = {n for n in entry.neighbours if n not in gone}
        kept_kind = [c.name for c in catalogue.of(entry.category) if c.name not in gone]
        near = near or set(kept_kind[:1])
        out[f] = list(dict.fromkeys(p for p, names in zip(kept, named, strict=True) if names & near))
    return out


def prepare_catalogue_step(
    model, catalogue: Catalogue, request: Request, forgotten: list[str], recipe: Recipe, seed: int
) -> PromptSet:
    """The prompt set of `request` on any catalogue: surrogates are the request's hints, then the
    entry's candidates, ranked by noise-prediction distance under `model` (theta_{k-1}), the first
    `recipe.n_surrogates` kept; the request's extra retain concepts join the neighbours."""
    r = resolve_request(request, forgotten, catalogue=catalogue)
    entry = catalogue.get(r.concept)
    candidates = [s for s in entry.surrogates if s not in forgotten and s not in r.surrogates]
    if len(candidates) > 1:
        distance = noise_distances(model, catalogue, r.concept, entry.category, candidates)
        candidates.sort(key=lambda s: distance[s])
    surrogates = (r.surrogates + candidates)[: recipe.n_surrogates]
    if not surrogates:
        why = (
            f"its surrogates in {catalogue.name!r} are all forgotten ({', '.join(entry.surrogates)})"
            if entry.surrogates
            else f"it has no surrogates in {catalogue.name!r}"
        )
        raise PreparationError(
            f"nothing is left to map {r.concept!r} to: {why}; add some (`cul concept add`) or name one in the request"
        )
    ps = catalogue_prompt_set(catalogue, r.concept, forgotten, seed=seed, surrogates=surrogates, extra_retain=r.retain)
    if simulates_earlier_attacks(recipe):
        ps.neighbour_captions = earlier_neighbour_captions(catalogue, ps, forgotten)
    return ps


def merge_prompt_sets(sets: list[PromptSet]) -> PromptSet:
    """All concepts at once: every forget/mapped pair, and the last set's retain groups (built
    knowing every concept), without the 'forgotten' group since nothing was forgotten before."""
    last = sets[-1]
    retain = {k: v for k, v in last.retain.items() if k != "forgotten"}
    return PromptSet(
        "+".join(s.concept for s in sets),
        last.kind,
        [p for s in sets for p in s.forget],
        [p for s in sets for p in s.mapped],
        sorted({x for s in sets for x in s.surrogates}),
        sorted({x for s in sets for x in s.neighbours}),
        retain,
        last.coverage,
    )
