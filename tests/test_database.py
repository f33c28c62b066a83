"""The team's queue and lineage lock in a real PostgreSQL (cul/io/database.py): requests added at
once from several processes all get in with distinct ids, every state change is kept, and a lineage
lock is free the moment its holder dies."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor

import pytest

from cul.io.database import DatabaseError, PgLineageLock, SqlQueue, lineage_lock, open_queue
from cul.io.locks import LineageLock, LockBusy
from cul.queue import RequestQueue, State
from cul.unlearning.request import RequestError
from tests.support import ROOT


@pytest.fixture()
def db(pg, request):
    from tests.support.postgres import create_database

    return create_database(pg, f"q_{request.node.name[:40].lower()}")


def _add(url: str, concept: str) -> str:
    return SqlQueue(url, "cul-world").add(concept).id


def test_requests_added_at_once_by_several_processes_all_get_in_once(db):
    concepts = ["red", "circle", "striped", "star", "blue", "dotted"]
    with ProcessPoolExecutor(3) as pool:
        ids = list(pool.map(_add, [db] * len(concepts), concepts))
    assert sorted(ids) == [f"r{i:03d}" for i in range(1, 7)]
    queue = SqlQueue(db, "cul-world")
    assert {r.concept for r in queue.pending()} == set(concepts)
    with pytest.raises(RequestError, match="already requested"):
        queue.add("red")
    assert SqlQueue(db, "another-model").items() == []  # lineages do not see each other's requests


def test_every_state_change_is_kept_and_tries_count_once(db):
    queue = SqlQueue(db, "cul-world")
    queue.add("red", "colour", note="ticket 7", by="dpo")
    queue.update("r001", state=State.in_progress, holder="run-a")
    assert queue.bump_tries("r001", seen=0).tries == 1
    assert queue.bump_tries("r001", seen=0).tries == 1  # a second watcher that saw the same try counts nothing
    queue.update("r001", state=State.accepted, version=3)
    assert [(h.state, h.tries) for h in queue.history("r001")] == [
        (State.pending, 0),
        (State.in_progress, 0),
        (State.in_progress, 1),
        (State.accepted, 1),
    ]
    item = queue.get("r001")
    assert (item.note, item.by, item.version) == ("ticket 7", "dpo", 3)
    with pytest.raises(KeyError):
        queue.update("r404", state=State.review)


def test_a_lineage_lock_is_exclusive_and_free_the_moment_its_holder_is_killed(db):
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from cul.io.database import PgLineageLock as L\n"
            "with L(sys.argv[1], 'cul-world').hold():\n    print('held', flush=True); time.sleep(600)",
            db,
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        lock = PgLineageLock(db, "cul-world", poll=0.2)
        assert not lock.is_free() and lock.owner()["pid"] == holder.pid
        with pytest.raises(LockBusy, match=f"pid {holder.pid}"):
            with lock.hold(wait=0.5):
                pass
        assert PgLineageLock(db, "another-model").is_free()
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait()
        deadline = time.monotonic() + 5
        while not lock.is_free():  # PostgreSQL ends the dead session's locks as soon as it sees the socket close
            assert time.monotonic() < deadline, "the killed holder's lock was not released"
            time.sleep(0.1)
        with lock.hold():
            assert not PgLineageLock(db, "cul-world").is_free()
    finally:
        holder.kill()


def test_the_settings_pick_the_database_only_when_the_environment_names_one(db, monkeypatch, root):
    from cul.config import Params

    pl = Params.load(root / "params.yaml").pipeline
    monkeypatch.delenv("CUL_DATABASE_URL", raising=False)
    assert isinstance(open_queue(pl), RequestQueue) and isinstance(lineage_lock(pl), LineageLock)
    monkeypatch.setenv("CUL_DATABASE_URL", db)
    assert isinstance(open_queue(pl), SqlQueue) and isinstance(lineage_lock(pl), PgLineageLock)
    monkeypatch.setenv("CUL_DATABASE_URL", "mysql://someone:secret@db/cul")
    with pytest.raises(DatabaseError, match="PostgreSQL") as e:
        open_queue(pl).items()
    assert "secret" not in str(e.value)


def test_a_holder_knows_whether_it_still_holds_the_lineage(db):
    lock = PgLineageLock(db, "cul-world")
    assert not lock.still_held()
    with lock.hold():
        assert lock.still_held()
        assert lock._conn is not None
        lock._conn.execute(
            __import__("sqlalchemy").text("SELECT pg_advisory_unlock_all()")
        )  # as if the session was lost
        assert not lock.still_held()
    assert lock.is_free()
