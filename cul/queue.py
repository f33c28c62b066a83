"""The request queue: deletion requests as they arrive, with who asked, when, why, and what became
of each (pending -> in progress -> accepted as model version N, or sent to review).

One YAML file (`requests/queue.yaml`, tracked by git so its history is the audit trail of the
queue itself). Writes are atomic (temp file + rename), so a crash never leaves half a file, and
every read-modify-write holds a lock across processes, so two people adding at once both get
their request in, each with its own id.
"""

from __future__ import annotations

import getpass
from datetime import UTC, datetime
from enum import Enum
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field

from cul.catalogue import Catalogue
from cul.files import write_atomic
from cul.io.locks import file_lock
from cul.unlearning.request import Request, RequestError, resolve_request
from cul.world import CATALOGUE


class State(str, Enum):
    pending = "pending"
    in_progress = "in_progress"
    accepted = "accepted"
    review = "review"  # rejected by the gate after every attempt; a person decides


class QueuedRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: str
    concept: str
    kind: str
    note: str = ""
    by: str = ""
    at: str = ""
    state: State = State.pending
    version: int | None = None  # registered model version once accepted
    step: str | None = None  # DVC step key (models/steps/KEY)
    reasons: list[str] = Field(default_factory=list)  # the gate's, when sent to review
    updated: str = ""
    tries: int = 0  # dispatches that ended without settling it since it was last queued (`max_tries`)
    dispatches: int = 0  # every dispatch that ended without settling it, never reset: the dispatch key
    holder: str = ""  # the flow run processing it while in progress (a dispatcher watches it)

    def request(self) -> Request:
        return Request(concept=self.concept, kind=self.kind, id=self.id, note=self.note)

    def describe(self) -> str:
        if self.state == State.accepted:
            return f"accepted as model version {self.version}"
        if self.state == State.review:
            return "rejected, waiting for review"
        return self.state.value.replace("_", " ")


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


class QueueReads:
    """What every queue derives from its `items()` (the YAML file's, the database's)."""

    path: Path | str  # what messages call the queue

    def items(self) -> list[QueuedRequest]:
        raise NotImplementedError

    def get(self, request_id: str) -> QueuedRequest:
        for r in self.items():
            if r.id == request_id:
                return r
        raise KeyError(f"no request {request_id!r} in {self.path}")

    def pending(self) -> list[QueuedRequest]:
        return [r for r in self.items() if r.state in (State.pending, State.in_progress)]


class RequestQueue(QueueReads):
    path: Path

    def __init__(self, path: str | Path = "requests/queue.yaml", catalogue: Catalogue | None = None) -> None:
        self.path = Path(path)
        self.catalogue = catalogue  # what requests resolve against (None: the world's)

    def _locked(self):
        """The queue's lock: held for every read-modify-write (`add`, `update`)."""
        return file_lock(self.path.parent / f".{self.path.name}.lock", what=f"the request queue {self.path}")

    def items(self) -> list[QueuedRequest]:
        if not self.path.exists():
            return []
        data = yaml.safe_load(self.path.read_text()) or {}
        return [QueuedRequest(**r) for r in data.get("requests", [])]

    def _write(self, items: list[QueuedRequest]) -> None:
        write_atomic(
            self.path, yaml.safe_dump({"requests": [r.model_dump(mode="json") for r in items]}, sort_keys=False)
        )

    def add(self, concept: str, kind: str | None = None, note: str = "", by: str | None = None) -> QueuedRequest:
        """Validate against the vocabulary and the queue; refuse duplicates with a clear message."""
        with self._locked():
            return self._add(concept, kind, note, by)

    def _add(self, concept: str, kind: str | None, note: str, by: str | None) -> QueuedRequest:
        items = self.items()
        item = new_request(items, concept, kind, note, by, self.catalogue or CATALOGUE)
        self._write(items + [item])
        return item

    def update(self, request_id: str, **changes) -> QueuedRequest:
        with self._locked():
            return self._update(request_id, changes)

    def _update(self, request_id: str, changes: dict) -> QueuedRequest:
        items = self.items()
        for i, r in enumerate(items):
            if r.id == request_id:
                items[i] = r.model_copy(update={**changes, "updated": _now()})
                self._write(items)
                return items[i]
        raise KeyError(f"no request {request_id!r} in {self.path}")


def new_request(
    items: list[QueuedRequest], concept: str, kind: str | None, note: str, by: str | None, catalogue: Catalogue
) -> QueuedRequest:
    """The next request of a queue holding `items`: resolved against the catalogue, refused
    (`RequestError`) if the concept is already forgotten or already waiting."""
    done = [r.concept for r in items if r.state == State.accepted]
    resolved = resolve_request(Request(concept=concept, kind=kind), forgotten=done, catalogue=catalogue)
    for r in items:
        if r.concept == resolved.concept and r.state in (State.pending, State.in_progress, State.review):
            raise RequestError(f"{resolved.concept!r} is already requested ({r.id}, {r.describe()})")
    number = max((int(r.id[1:]) for r in items if r.id[1:].isdigit()), default=0) + 1
    return QueuedRequest(
        id=f"r{number:03d}",
        concept=resolved.concept,
        kind=resolved.kind,
        note=note,
        by=by or _user(),
        at=_now(),
        updated=_now(),
    )


def _user() -> str:
    try:
        return getpass.getuser()
    except Exception:  # no login name in some containers
        return "unknown"
