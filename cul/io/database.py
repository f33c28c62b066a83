"""The team's shared state in PostgreSQL: the request queue and the lineage locks.

On a laptop the queue is a YAML file and the locks are file locks (`cul.queue`, `cul.io.locks`).
A team whose workers share no disk sets `CUL_DATABASE_URL` (`postgresql://USER:PASSWORD@HOST/DB`,
the same server its Prefect and MLflow use) and both move here:

- `SqlQueue`: one row per request in `cul_requests`, scoped to the registered model; every change
  is a transaction on that row (`SELECT ... FOR UPDATE`), adds are serialised by a table lock, and
  each change is appended to `cul_request_events`, the queue's own audit trail. A request added
  by anyone is seen by every worker at once and is never lost to a merge.
- `PgLineageLock`: the right to build on a lineage, a PostgreSQL session advisory lock held on a
  dedicated connection for the whole step. PostgreSQL drops it the moment that connection ends,
  so a killed worker never leaves the lineage locked and a watcher sees it free at once.

The URL comes from the environment only: it carries a password, which never goes in a tracked file.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa

from cul.catalogue import Catalogue
from cul.io.locks import LineageLock, LockBusy, busy_message
from cul.queue import QueuedRequest, QueueReads, RequestQueue, new_request
from cul.world import CATALOGUE

if TYPE_CHECKING:
    from cul.config import PipelineSettings

ENV = "CUL_DATABASE_URL"

metadata = sa.MetaData()
requests_table = sa.Table(
    "cul_requests",
    metadata,
    sa.Column("lineage", sa.String(200), primary_key=True),  # the registered model
    sa.Column("id", sa.String(32), primary_key=True),
    sa.Column("state", sa.String(32), nullable=False),
    sa.Column("doc", sa.Text, nullable=False),  # the QueuedRequest as JSON
)
events_table = sa.Table(
    "cul_request_events",
    metadata,
    sa.Column("seq", sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True, autoincrement=True),
    sa.Column("lineage", sa.String(200), nullable=False),
    sa.Column("id", sa.String(32), nullable=False),
    sa.Column("at", sa.String(40), nullable=False),
    sa.Column("doc", sa.Text, nullable=False),
)
holders_table = sa.Table(
    "cul_lineage_holders",
    metadata,
    sa.Column("lineage", sa.String(200), primary_key=True),
    sa.Column("doc", sa.Text, nullable=False),  # pid, host, command, since, flow run
)


class DatabaseError(RuntimeError):
    """The database cannot be reached or is not PostgreSQL; the message says which URL (no password)."""


def database_url() -> str | None:
    """`CUL_DATABASE_URL`, or None (the laptop's file queue and file locks)."""
    return os.environ.get(ENV) or None


def _driver_url(url: str) -> str:
    for prefix in ("postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix) :]
    if not url.startswith("postgresql+"):
        raise DatabaseError(f"{ENV} must name a PostgreSQL database (postgresql://...), not {_safe(url)}")
    return url


def _safe(url: str) -> str:
    try:
        return sa.engine.make_url(url).render_as_string(hide_password=True)
    except Exception:
        return "<unparsable URL>"


@cache
def engine(url: str) -> sa.Engine:
    """One pooled engine per URL, with the tables created on first use."""
    # TCP keepalives: a lineage lock's connection idles for a whole step, and a middlebox that
    # drops it silently would free the lock under a live holder
    keepalive = {"keepalives": 1, "keepalives_idle": 30, "keepalives_interval": 10, "keepalives_count": 3}
    eng = sa.create_engine(_driver_url(url), pool_pre_ping=True, connect_args=keepalive)
    try:
        with eng.begin() as conn:
            conn.execute(sa.text("SELECT pg_advisory_xact_lock(:k)"), {"k": _key("cul-schema")})
            metadata.create_all(conn)
    except sa.exc.OperationalError as e:
        raise DatabaseError(f"cannot reach the database {_safe(url)}: {str(e.orig).strip()[:300]}") from e
    return eng


def _key(name: str) -> int:
    """A stable signed 64-bit advisory-lock key for `name`."""
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big", signed=True)


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


class SqlQueue(QueueReads):
    """The request queue of one lineage (registered model) in PostgreSQL; the same interface as
    the YAML `RequestQueue`."""

    def __init__(self, url: str, lineage: str, catalogue: Catalogue | None = None) -> None:
        self.url, self.lineage = url, lineage
        self.catalogue = catalogue  # what requests resolve against (None: the world's)
        self.path = f"table cul_requests ({lineage})"  # what messages call the queue

    @property
    def engine(self) -> sa.Engine:
        return engine(self.url)

    def items(self) -> list[QueuedRequest]:
        with self.engine.connect() as conn:
            return self._items(conn)

    def _items(self, conn: sa.Connection) -> list[QueuedRequest]:
        rows = conn.execute(sa.select(requests_table.c.doc).where(requests_table.c.lineage == self.lineage)).scalars()
        items = [QueuedRequest.model_validate_json(doc) for doc in rows]
        return sorted(items, key=lambda r: (len(r.id), r.id))  # r999 before r1000

    def add(self, concept: str, kind: str | None = None, note: str = "", by: str | None = None) -> QueuedRequest:
        """Validate against the catalogue and the queue, then insert; adds are serialised by a
        table lock, so two people adding at once get distinct ids and no duplicate concept."""
        with self.engine.begin() as conn:
            conn.execute(sa.text("LOCK TABLE cul_requests IN SHARE ROW EXCLUSIVE MODE"))
            item = new_request(self._items(conn), concept, kind, note, by, self.catalogue or CATALOGUE)
            conn.execute(requests_table.insert().values(lineage=self.lineage, id=item.id, **self._row(item)))
            self._event(conn, item)
        return item

    def update(self, request_id: str, **changes: Any) -> QueuedRequest:
        with self.engine.begin() as conn:
            where = (requests_table.c.lineage == self.lineage) & (requests_table.c.id == request_id)
            doc = conn.execute(sa.select(requests_table.c.doc).where(where).with_for_update()).scalar()
            if doc is None:
                raise KeyError(f"no request {request_id!r} in {self.path}")
            item = QueuedRequest.model_validate_json(doc).model_copy(update={**changes, "updated": _now()})
            item = QueuedRequest.model_validate(item.model_dump())  # changes validated like a new item
            conn.execute(requests_table.update().where(where).values(**self._row(item)))
            self._event(conn, item)
        return item

    def bump_tries(self, request_id: str, seen: int) -> QueuedRequest:
        """Count one more dispatch that ended without an outcome, unless another watcher already
        counted it (`tries` is no longer `seen`): the next dispatch key is then the same for all."""
        with self.engine.begin() as conn:
            where = (requests_table.c.lineage == self.lineage) & (requests_table.c.id == request_id)
            doc = conn.execute(sa.select(requests_table.c.doc).where(where).with_for_update()).scalar()
            if doc is None:
                raise KeyError(f"no request {request_id!r} in {self.path}")
            item = QueuedRequest.model_validate_json(doc)
            if item.tries == seen:
                item = item.model_copy(update={"tries": seen + 1, "dispatches": item.dispatches + 1, "updated": _now()})
                conn.execute(requests_table.update().where(where).values(**self._row(item)))
                self._event(conn, item)
        return item

    def history(self, request_id: str) -> list[QueuedRequest]:
        """Every state the request went through, oldest first."""
        with self.engine.connect() as conn:
            rows = conn.execute(
                sa.select(events_table.c.doc)
                .where((events_table.c.lineage == self.lineage) & (events_table.c.id == request_id))
                .order_by(events_table.c.seq)
            ).scalars()
            return [QueuedRequest.model_validate_json(doc) for doc in rows]

    @staticmethod
    def _row(item: QueuedRequest) -> dict:
        return {"state": item.state.value, "doc": item.model_dump_json()}

    def _event(self, conn: sa.Connection, item: QueuedRequest) -> None:
        conn.execute(
            events_table.insert().values(lineage=self.lineage, id=item.id, at=_now(), doc=item.model_dump_json())
        )


class PgLineageLock:
    """The right to build on a registered model's lineage, held by one process at a time across
    every machine that reaches the database; the same interface as the file `LineageLock`."""

    def __init__(self, url: str, model: str, poll: float = 2.0) -> None:
        self.url, self.model, self.poll = url, model, poll
        self.key = _key(f"cul-lineage:{model}")
        self.holder = ""  # what the holder is running (a flow run id), stored with its pid and host
        self._conn: sa.Connection | None = None  # the session holding the lock, inside `hold`

    def owner(self) -> dict:
        with engine(self.url).connect() as conn:
            doc = conn.execute(sa.select(holders_table.c.doc).where(holders_table.c.lineage == self.model)).scalar()
        return json.loads(doc) if doc else {}

    def is_free(self) -> bool:
        """Whether no live session holds the lineage (a dead holder's lock is free)."""
        with engine(self.url).connect() as conn:
            got = conn.execute(sa.text("SELECT pg_try_advisory_lock(:k)"), {"k": self.key}).scalar()
            if got:
                conn.execute(sa.text("SELECT pg_advisory_unlock(:k)"), {"k": self.key})
            conn.commit()
        return bool(got)

    @contextmanager
    def hold(self, wait: float = 0.0) -> Iterator[None]:
        """Hold the lineage for the block, waiting up to `wait` seconds for the holder to finish;
        then raise `LockBusy` naming it."""
        conn = engine(self.url).connect().execution_options(isolation_level="AUTOCOMMIT")
        try:
            deadline = time.monotonic() + wait
            while not conn.execute(sa.text("SELECT pg_try_advisory_lock(:k)"), {"k": self.key}).scalar():
                if time.monotonic() >= deadline:
                    raise LockBusy(busy_message(self.model, self.owner()))
                time.sleep(self.poll)
            doc = json.dumps(
                {
                    "pid": os.getpid(),
                    "host": socket.gethostname(),
                    "command": " ".join(sys.argv)[:200],
                    "since": _now(),
                    "holder": self.holder,
                }
            )
            conn.execute(
                sa.text(
                    "INSERT INTO cul_lineage_holders (lineage, doc) VALUES (:m, :d) "
                    "ON CONFLICT (lineage) DO UPDATE SET doc = EXCLUDED.doc"
                ),
                {"m": self.model, "d": doc},
            )
            self._conn = conn
            try:
                yield
            finally:
                self._conn = None
                conn.execute(sa.text("SELECT pg_advisory_unlock(:k)"), {"k": self.key})
                conn.execute(sa.text("DELETE FROM cul_lineage_holders WHERE lineage = :m"), {"m": self.model})
        except BaseException:
            conn.invalidate()  # never hand a session that may still hold the lock back to the pool
            raise
        finally:
            conn.close()

    def still_held(self) -> bool:
        """Whether this process's session still holds the lock (inside `hold`): checked before a
        step registers anything, so a lock lost with its connection never lets two runs register."""
        if self._conn is None:
            return False
        try:
            return bool(
                self._conn.execute(
                    sa.text(  # a bigint advisory key shows as classid (high 32 bits) and objid (low 32)
                        "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted "
                        "AND pid = pg_backend_pid() AND classid::bigint = :hi AND objid::bigint = :lo"
                    ),
                    {"hi": (self.key >> 32) & 0xFFFFFFFF, "lo": self.key & 0xFFFFFFFF},
                ).scalar()
            )
        except sa.exc.DBAPIError:
            return False


def open_queue(pl: PipelineSettings, catalogue: Catalogue | None = None) -> RequestQueue | SqlQueue:
    """The request queue of these settings: the lineage's rows in `CUL_DATABASE_URL` if set,
    else the YAML file `pipeline.requests_file`."""
    url = database_url()
    if url:
        return SqlQueue(url, pl.tracking.registered_model, catalogue)
    return RequestQueue(pl.requests_file, catalogue)


def lineage_lock(pl: PipelineSettings) -> LineageLock | PgLineageLock:
    """The lineage lock of these settings: in `CUL_DATABASE_URL` if set, else a file lock."""
    url = database_url()
    model = pl.tracking.registered_model
    return PgLineageLock(url, model) if url else LineageLock(model)
