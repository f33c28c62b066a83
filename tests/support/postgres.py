"""A throwaway PostgreSQL server (Debian's PostgreSQL 15: `initdb` and `pg_ctl` into a temporary
folder, listening on a free loopback port) for the tests that need the team's database. PostgreSQL
refuses to run as root, so under root it runs as the `postgres` user that Debian's package makes."""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tests.support.servers import free_port

USER = "cul"


def _bin() -> Path:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if not found:
        raise RuntimeError("PostgreSQL is not installed: `apt-get install postgresql` (Debian's package)")
    return Path(found[-1]).parent


def _as_owner(cmd: list[str]) -> list[str]:
    return ["runuser", "-u", "postgres", "--", *cmd] if os.geteuid() == 0 else cmd


@contextmanager
def postgres() -> Iterator[str]:
    """A running server; yields its URL without a database (`postgresql://cul@127.0.0.1:PORT`)."""
    bin_dir, port = _bin(), free_port()
    folder = Path(tempfile.mkdtemp(prefix="cul-pg-"))  # not under pytest's root-only tmp: postgres must reach it
    if os.geteuid() == 0:
        shutil.chown(folder, "postgres")
    data = folder / "data"
    run = dict(check=True, capture_output=True, text=True)
    subprocess.run(_as_owner([str(bin_dir / "initdb"), "-D", str(data), "-A", "trust", "-U", USER]), **run)
    options = f"-p {port} -k {folder} -c listen_addresses=127.0.0.1 -c max_connections=200 -c fsync=off"
    ctl = [str(bin_dir / "pg_ctl"), "-D", str(data), "-l", str(folder / "log")]
    subprocess.run(_as_owner([*ctl, "-o", options, "-w", "start"]), **run)
    try:
        yield f"postgresql://{USER}@127.0.0.1:{port}"
    finally:
        subprocess.run(_as_owner([*ctl, "-m", "immediate", "stop"]), capture_output=True)
        shutil.rmtree(folder, ignore_errors=True)


def create_database(server: str, name: str) -> str:
    """A new database on `server`; its URL."""
    import psycopg

    with psycopg.connect(f"{server}/postgres", autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return f"{server}/{name}"
