"""A deletion request, and its resolution against a concept catalogue (`cul.catalogue`).

A request is free text: the concept's name or any of its synonyms, in any case and spacing,
resolves to the catalogue entry, and the whole concept (every name of it) is forgotten. A bad
request fails loudly (or is a clear no-op), never silently damages the model: an empty concept, a
word that names nothing (refused with the nearest entries as suggestions), a category that does not
match, a concept already forgotten.
"""

from __future__ import annotations

from collections.abc import Sequence

from pydantic import BaseModel, Field, field_validator

from cul.catalogue import Catalogue
from cul.world import CATALOGUE


class RequestError(ValueError):
    """A request that cannot be honoured as stated; the message says why and what to do."""


class AlreadyForgotten(RequestError):
    """The concept is already forgotten: processing it again is a no-op."""


class Request(BaseModel):
    """What a user asks to forget, with optional hints."""

    concept: str
    kind: str | None = None  # the concept's category, if the requester states it
    id: str | None = None
    surrogates: list[str] = Field(default_factory=list)  # preferred replacement concepts
    retain: list[str] = Field(default_factory=list)  # extra concepts that must stay intact
    note: str = ""

    @field_validator("concept")
    @classmethod
    def _not_empty(cls, v: str) -> str:
        v = " ".join(v.split())
        if not v:
            raise ValueError("the concept to forget is empty")
        return v

    @field_validator("kind")
    @classmethod
    def _kind(cls, v: str | None) -> str | None:
        v = " ".join(v.lower().split()) if v is not None else None
        if v == "":
            raise ValueError("the category is empty")
        return v


class ResolvedRequest(BaseModel):
    """A request mapped onto a catalogue entry (its canonical name and category)."""

    request: Request
    concept: str
    kind: str
    surrogates: list[str]
    retain: list[str]


def suggestions(text: str, catalogue: Catalogue, k: int = 3) -> list[str]:
    """The catalogue entries nearest to `text` by sentence embedding (the packaged MiniLM)."""
    from cul.text import TextEncoder

    return catalogue.suggest(text, TextEncoder.from_minilm().pooled, k=k)


def _resolve_names(words: list[str], what: str, catalogue: Catalogue) -> list[str]:
    out = []
    for w in words:
        c = catalogue.resolve(w)
        if c is None:
            raise RequestError(f"unknown {what} {w!r}: not a concept of the catalogue {catalogue.name!r}")
        out.append(c.name)
    return out


def resolve_request(
    request: Request,
    forgotten: Sequence[str] = (),
    protected: Sequence[str] = (),
    catalogue: Catalogue = CATALOGUE,
) -> ResolvedRequest:
    """Check a request against the catalogue and the concepts forgotten so far."""
    c = catalogue.resolve(request.concept)
    if c is None:
        near = ", ".join(repr(n) for n in suggestions(request.concept, catalogue))
        raise RequestError(
            f"unknown concept {request.concept!r}: not in the catalogue {catalogue.name!r}. Nearest: {near}. "
            "Request one of those, or add the concept (`cul concept add`)."
        )
    if request.kind is not None and request.kind not in catalogue.categories():
        raise RequestError(
            f"unknown category {request.kind!r}: the catalogue {catalogue.name!r} has "
            + ", ".join(catalogue.categories())
        )
    if request.kind not in (None, c.category):
        raise RequestError(f"{c.name!r} is a(n) {c.category}, not a(n) {request.kind}")
    if c.name in forgotten:
        raise AlreadyForgotten(f"{c.name!r} is already forgotten; nothing to do")
    if c.name in protected:
        raise RequestError(f"{c.name!r} is protected by policy and cannot be forgotten")
    surrogates = _resolve_names(request.surrogates, "surrogate", catalogue)
    retain = _resolve_names(request.retain, "retain concept", catalogue)
    for s in surrogates:
        if s == c.name or s in forgotten:
            raise RequestError(f"surrogate {s!r} is the concept itself or already forgotten")
        if catalogue.get(s).category != c.category:
            raise RequestError(f"surrogate {s!r} is not a(n) {c.category}")
    if c.name in retain:
        raise RequestError(f"{c.name!r} is both the concept to forget and a concept to retain")
    return ResolvedRequest(request=request, concept=c.name, kind=c.category, surrogates=surrogates, retain=retain)
