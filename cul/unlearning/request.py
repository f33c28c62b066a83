"""A deletion request, and its resolution against the world's vocabulary.

A bad request must fail loudly (or be a clear no-op), never silently damage the model: an empty
concept, an unknown one, a kind that does not match, a concept already forgotten, or a mere
synonym of a concept (forgetting "crimson" alone would damage "red", which stays retained).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

from pydantic import BaseModel, Field, field_validator

from cul.world import CONCEPTS, Kind, concept, resolve

KindName = Literal["object", "colour", "texture", "other"]


class RequestError(ValueError):
    """A request that cannot be honoured as stated; the message says why and what to do."""


class AlreadyForgotten(RequestError):
    """The concept is already forgotten: processing it again is a no-op."""


class Request(BaseModel):
    """What a user asks to forget, with optional hints."""

    concept: str
    kind: KindName | None = None
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


class ResolvedRequest(BaseModel):
    """A request mapped onto a concept of the world (its canonical name and kind)."""

    request: Request
    concept: str
    kind: Kind
    surrogates: list[str]
    retain: list[str]


def _resolve_names(words: list[str], what: str) -> list[str]:
    out = []
    for w in words:
        c = resolve(w)
        if c is None:
            raise RequestError(f"unknown {what} {w!r}: not a concept of this world")
        out.append(c.name)
    return out


def resolve_request(request: Request, forgotten: Sequence[str] = (), protected: Sequence[str] = ()) -> ResolvedRequest:
    """Check a request against the vocabulary and the concepts forgotten so far."""
    c = resolve(request.concept)
    if c is None:
        known = ", ".join(x.name for g in CONCEPTS.values() for x in g)
        raise RequestError(f"unknown concept {request.concept!r}; this world's concepts are: {known}")
    word = " ".join(request.concept.lower().split())
    if word != c.name:
        raise RequestError(
            f"{request.concept!r} is a synonym of {c.name!r}: forgetting a synonym alone would damage "
            f"{c.name!r}, which stays retained. Request {c.name!r} to forget the concept with all its names."
        )
    if request.kind not in (None, c.kind.value):
        raise RequestError(f"{c.name!r} is a(n) {c.kind.value}, not a(n) {request.kind}")
    if c.name in forgotten:
        raise AlreadyForgotten(f"{c.name!r} is already forgotten; nothing to do")
    if c.name in protected:
        raise RequestError(f"{c.name!r} is protected by policy and cannot be forgotten")
    surrogates = _resolve_names(request.surrogates, "surrogate")
    retain = _resolve_names(request.retain, "retain concept")
    for s in surrogates:
        if s == c.name or s in forgotten:
            raise RequestError(f"surrogate {s!r} is the concept itself or already forgotten")
        if concept(s).kind != c.kind:
            raise RequestError(f"surrogate {s!r} is not a(n) {c.kind.value}")
    if c.name in retain:
        raise RequestError(f"{c.name!r} is both the concept to forget and a concept to retain")
    return ResolvedRequest(request=request, concept=c.name, kind=c.kind, surrogates=surrogates, retain=retain)
