"""Concept catalogues: what a deletion request may name, and what the pipeline knows of each concept.

A catalogue is one YAML file under `catalogues/` (validated here): for each concept its category
(free text: object, colour, texture, style, character, person, ...), the synonyms a request or a
caption may use, held-out paraphrases for probing, the neighbours to keep, surrogate candidates,
and the prompt templates whose slots are categories (`a {colour} {object}`). The embedded world is
drawn from `catalogues/world.yaml`; a Stable Diffusion team writes its own.

A request is free text, resolved by name or synonym (case and spacing do not matter); a word that
names nothing is refused with the nearest entries by text embedding. `Catalogue.add` takes a new
entry; its missing neighbours and surrogates are chosen by text-embedding similarity among the
entries of the same category, then ranked by how close the model's noise predictions are (the
mapping rule of LACU, DFR's successor), and the choice is written into the entry for review.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Collection, Sequence
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

CATALOGUES = Path(__file__).resolve().parents[1] / "catalogues"
SLOT = re.compile(r"\{([a-z_]+)\}")


class CatalogueError(ValueError):
    """A catalogue that cannot be read, or an entry that cannot be added; the message says why."""


def normalise(text: str) -> str:
    """The form names are matched in: lower case, single spaces."""
    return " ".join(text.lower().split())


class ConceptEntry(BaseModel):
    """One concept of a catalogue."""

    model_config = ConfigDict(extra="forbid")

    #: the canonical name, as prompts write it ("circle", "Van Gogh style").
    name: str = Field(min_length=1)
    #: free text: object, colour, texture, style, character, person, ...
    category: str = Field(min_length=1)
    #: other names a request or a caption may use (the world trains on them).
    synonyms: list[str] = Field(default_factory=list)
    #: held-out wordings, never in training captions: UA is probed with them.
    paraphrases: list[str] = Field(default_factory=list)
    #: phrases that describe the concept without naming it ("shape with four equal sides"), written
    #: to fill its slot in a template; never in training captions: a robustness probe asks with them.
    descriptions: list[str] = Field(default_factory=list)
    #: concepts that must be kept when this one is forgotten (RA-N), names of this catalogue.
    neighbours: list[str] = Field(default_factory=list)
    #: what the concept may be mapped to when it is erased, best first (hints for the step).
    surrogates: list[str] = Field(default_factory=list)
    #: how automatic neighbours and surrogates were chosen, for a person to review.
    chosen: dict[str, Any] | None = None

    @field_validator("name", "category")
    @classmethod
    def _clean(cls, v: str) -> str:
        v = " ".join(v.split())
        if not v:
            raise ValueError("must not be empty")
        return v

    @model_validator(mode="after")
    def _descriptions_do_not_name_it(self) -> ConceptEntry:
        for d in self.descriptions:
            found = [w for w in self.words if re.search(rf"\b{re.escape(w)}\b", normalise(d))]
            if not d.strip() or found:
                raise ValueError(f"{self.name}: description {d!r} must describe it without naming it ({found})")
        return self

    @property
    def words(self) -> list[str]:
        """Every normalised wording that names this concept."""
        return [normalise(w) for w in (self.name, *self.synonyms, *self.paraphrases)]


class Catalogue(BaseModel):
    """The concepts a model knows, with their words, neighbours, surrogates and templates."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1)
    description: str = ""
    #: the concepts are fixed by a renderer and a judge (the embedded world): nothing can be added.
    closed: bool = False
    #: prompt templates by use ("train", "held_out", "partial", ...); slots are categories.
    templates: dict[str, list[str]] = Field(default_factory=dict)
    concepts: list[ConceptEntry] = Field(min_length=1)

    @model_validator(mode="after")
    def _consistent(self) -> Catalogue:
        owner: dict[str, str] = {}
        for c in self.concepts:
            for w in c.words:
                if owner.setdefault(w, c.name) != c.name:
                    raise ValueError(f"{w!r} names both {owner[w]!r} and {c.name!r}")
        names = {c.name for c in self.concepts}
        for c in self.concepts:
            for n in c.neighbours:
                if n not in names or n == c.name:
                    raise ValueError(f"{c.name}: neighbour {n!r} is not another concept of the catalogue")
        categories = set(self.categories())
        for use, templates in self.templates.items():
            for t in templates:
                unknown = set(SLOT.findall(t)) - categories
                if unknown:
                    raise ValueError(f"template {t!r} ({use}) has slots that are no category: {sorted(unknown)}")
        return self

    # -- reading ---------------------------------------------------------------------------------
    @classmethod
    def load(cls, path: str | Path) -> Catalogue:
        """A catalogue file, or a catalogue name under `catalogues/` ("world")."""
        path = Path(path)
        if path.suffix not in (".yaml", ".yml"):
            path = CATALOGUES / f"{path}.yaml"
        if not path.is_file():
            raise CatalogueError(f"{path}: no such catalogue")
        try:
            data = yaml.safe_load(path.read_text())
            return cls.model_validate(data)
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
            raise CatalogueError(f"{path}: cannot be read as YAML ({e})") from e
        except ValidationError as e:
            raise CatalogueError(f"{path}: {e}") from e

    def save(self, path: str | Path, header: str = "") -> None:
        """Write the catalogue as YAML (one line per concept where it fits)."""
        data = self.model_dump(mode="json", exclude_none=True, exclude_defaults=False)
        concepts = data.pop("concepts")
        text = header + yaml.safe_dump(data, sort_keys=False, width=120, allow_unicode=True) + "concepts:\n"
        for c in concepts:
            c = {k: v for k, v in c.items() if v not in ([], None)}
            text += "  - " + yaml.safe_dump(c, sort_keys=False, default_flow_style=True, width=10_000).strip() + "\n"
        Path(path).write_text(text)

    def categories(self) -> list[str]:
        """Categories in order of first appearance."""
        return list(dict.fromkeys(c.category for c in self.concepts))

    def of(self, category: str) -> list[ConceptEntry]:
        return [c for c in self.concepts if c.category == category]

    def get(self, name: str) -> ConceptEntry:
        for c in self.concepts:
            if c.name == name:
                return c
        raise KeyError(f"{name!r} is not a concept of the catalogue {self.name!r}")

    def resolve(self, text: str) -> ConceptEntry | None:
        """The concept a wording names (its name, a synonym or a paraphrase), or None."""
        w = normalise(text)
        for c in self.concepts:
            if w in c.words:
                return c
        return None

    def named_in(self, text: str) -> list[str]:
        """The concepts a caption names, in order: every wording of the catalogue, the longest first,
        matched as whole words (a hyphen joins words: "man" is not named in "spider-man"), so a
        wording inside a longer one ("cartoon" in "cartoon mouse") counts only as the longer."""
        owner = {w: c.name for c in self.concepts for w in c.words}
        alternatives = "|".join(re.escape(w) for w in sorted(owner, key=len, reverse=True))
        found = re.finditer(rf"(?<![\w-])(?:{alternatives})(?![\w-])", normalise(text))
        return [owner[m.group(0)] for m in found]

    def suggest(self, text: str, embed: Callable[[Sequence[str]], Any], k: int = 3) -> list[str]:
        """The `k` concept names nearest to `text` by text embedding (`embed`: texts -> [N, D])."""
        words = [(c.name, w) for c in self.concepts for w in (c.name, *c.synonyms)]
        scores = cosine_to(embed, text, [w for _, w in words])
        best: dict[str, float] = {}
        for (name, _), s in zip(words, scores):
            best[name] = max(best.get(name, -1.0), s)
        return sorted(best, key=lambda n: -best[n])[:k]

    def prompts_for(self, word: str, category: str, k: int = 4) -> list[str]:
        """Up to `k` prompts showing `word` as a `category`: the templates with that slot, every
        other slot filled with its category's first concept."""
        fillers = {cat: self.of(cat)[0].name for cat in self.categories()}
        out = []
        for template in (t for ts in self.templates.values() for t in ts if "{" + category + "}" in t):
            out.append(self.fill(template, {**fillers, category: word}))
        return list(dict.fromkeys(out))[:k] or [word]

    def templates_for(self, category: str, use: str = "train") -> list[str]:
        """The `use` templates with a slot for `category` (the bare slot if none has one)."""
        return [t for t in self.templates.get(use, []) if "{" + category + "}" in t] or ["{" + category + "}"]

    def slot_words(self, category: str, rng, avoid: Collection[str] = ()) -> dict[str, str]:
        """A random concept for every slot but `category`'s, each outside `avoid` (any of its
        category, if all are in it)."""
        words = {}
        for other in self.categories():
            if other != category:
                names = [e.name for e in self.of(other) if e.name not in avoid] or [e.name for e in self.of(other)]
                words[other] = names[int(rng.integers(len(names)))]
        return words

    @staticmethod
    def fill(template: str, words: dict[str, str]) -> str:
        """A template with its slots filled, on one line."""
        return " ".join(template.format(**words).split())

    def add(
        self,
        entry: ConceptEntry,
        embed: Callable[[Sequence[str]], Any],
        model=None,
        n_neighbours: int = 2,
        n_surrogates: int = 3,
        pool: int = 6,
    ) -> ConceptEntry:
        """Add `entry`; missing neighbours and surrogates are chosen automatically and recorded.

        Candidates are the `pool` entries of the same category (of all, if it has none yet) nearest
        by text embedding; with a `model`, they are ranked by how close its noise predictions for
        the candidate's prompts come to those for the new concept's (LACU's mapping rule), else by
        the embedding. Neighbours are the first `n_neighbours`, surrogates the first `n_surrogates`.
        """
        if self.closed:
            raise CatalogueError(
                f"the catalogue {self.name!r} is closed: its concepts are fixed by its renderer and judge"
            )
        for w in entry.words:
            if (other := self.resolve(w)) is not None:
                raise CatalogueError(f"{w!r} already names {other.name!r} in the catalogue {self.name!r}")
        for n in entry.neighbours:
            self.get(n)  # KeyError with the catalogue's name
        if not (entry.neighbours and entry.surrogates):
            same = [c.name for c in self.of(entry.category)] or [c.name for c in self.concepts]
            text = dict(zip(same, cosine_to(embed, entry.name, same)))
            candidates = sorted(same, key=lambda n: -text[n])[:pool]
            chosen: dict[str, Any] = {"rule": "nearest by text embedding (MiniLM, cosine)", "text_similarity": {}}
            chosen["text_similarity"] = {n: round(text[n], 4) for n in candidates}
            if model is not None:
                distance = noise_distances(model, self, entry.name, entry.category, candidates)
                candidates = sorted(candidates, key=lambda n: distance[n])
                chosen["rule"] += ", then by noise-prediction distance under the model (LACU)"
                chosen["noise_distance"] = {n: round(distance[n], 6) for n in candidates}
            update: dict[str, Any] = {"chosen": chosen}
            if not entry.neighbours:
                update["neighbours"] = candidates[:n_neighbours]
            if not entry.surrogates:
                update["surrogates"] = candidates[:n_surrogates]
            entry = entry.model_copy(update=update)
        added = Catalogue.model_validate({**self.model_dump(), "concepts": [*self.model_dump()["concepts"], entry]})
        self.concepts = added.concepts
        return entry


def noise_distances(
    model, catalogue: Catalogue, name: str, category: str, candidates: Sequence[str]
) -> dict[str, float]:
    """Mean squared distance between the model's noise predictions for prompts of `name` and for the
    same prompts with each candidate in its place, over shared random (x_t, t)."""
    import torch

    prompts = catalogue.prompts_for(name, category)
    gen = torch.Generator().manual_seed(0)
    draws = 4 * len(prompts)
    x = torch.randn((draws, *model.latent_shape()), generator=gen).to(model.device)
    t = torch.randint(0, model.scheduler.config.num_train_timesteps, (draws,), generator=gen).to(model.device)
    with torch.no_grad():
        target = model.predict_noise(x, t, model.encode_prompts([prompts[i % len(prompts)] for i in range(draws)]))
        out = {}
        for cand in candidates:
            theirs = catalogue.prompts_for(cand, category)
            ctx = model.encode_prompts([theirs[i % len(theirs)] for i in range(draws)])
            out[cand] = float(((model.predict_noise(x, t, ctx) - target) ** 2).mean())
    return out


def cosine_to(embed: Callable[[Sequence[str]], Any], query: str, texts: Sequence[str]) -> list[float]:
    """Cosine similarity of each of `texts` to `query` under `embed` (texts -> [N, D])."""
    import torch

    vectors = torch.nn.functional.normalize(embed([query, *texts]), dim=-1)
    return (vectors[1:] @ vectors[0]).tolist()
