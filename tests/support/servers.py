"""Real servers on loopback for the pipeline tests: PostgreSQL, moto's S3 server, an MLflow
tracking server on PostgreSQL with its artifacts in that S3, and a Prefect server on PostgreSQL:
the team's stack of infra/compose.yaml. No mocks: the pipeline talks to them over HTTP exactly as
it would to production services."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

BIN = Path(sys.executable).parent
BUCKET = "cul-test"
FAKE_AWS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, proc: subprocess.Popen, timeout: float, log: Path) -> None:
    t0 = time.time()
    while time.time() - t0 < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"{url}: server exited ({proc.returncode}):\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"{url} not up after {timeout} s:\n{log.read_text()[-3000:]}")


@contextmanager
def started(cmd: list[str], env: dict, log: Path):
    """`cmd` running in the background (output to `log`) until the block ends."""
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()


@contextmanager
def background(cmd: list[str], env: dict, log: Path, health: str, timeout: float = 120):
    """`cmd` in the background, once `health` answers."""
    with started(cmd, env, log) as proc:
        wait_http(health, proc, timeout, log)
        yield proc


@contextmanager
def stack(tmp: Path, pg: str):
    """S3 (moto), MLflow (on PostgreSQL `pg`, artifacts in S3, registry webhooks allowed to
    loopback) and Prefect (on `pg`); yields the environment a client process needs to use all
    three, with `CUL_TEST_PG` the PostgreSQL server for more databases."""
    import boto3
    from moto.server import ThreadedMotoServer

    from tests.support.postgres import create_database

    s3 = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    s3.start()
    host, port = s3.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    boto3.client("s3", endpoint_url=endpoint, **_boto_kw()).create_bucket(Bucket=BUCKET)
    # the venv's bin first on PATH, as for a user with the venv active (dvc.yaml runs `cul step`)
    path = f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"
    base_env = {
        **os.environ,
        **FAKE_AWS,
        "MLFLOW_S3_ENDPOINT_URL": endpoint,
        "NO_PROXY": "127.0.0.1,localhost",
        "PATH": path,
    }
    mlflow_port, prefect_port = free_port(), free_port()
    mlflow_cmd = [
        str(BIN / "mlflow"),
        "server",
        "--host",
        "127.0.0.1",
        "--port",
        str(mlflow_port),
        "--backend-store-uri",
        create_database(pg, "mlflow").replace("postgresql://", "postgresql+psycopg://"),
        "--default-artifact-root",
        f"s3://{BUCKET}/mlflow",
        "--no-serve-artifacts",
    ]
    mlflow_env = {
        **base_env,
        "MLFLOW_WEBHOOK_ALLOWED_SCHEMES": "http,https",
        "MLFLOW_WEBHOOK_ALLOW_PRIVATE_IPS": "true",
        "MLFLOW_WEBHOOK_CACHE_TTL": "1",  # a webhook installed during a test is used at once
        "MLFLOW_WEBHOOK_SECRET_ENCRYPTION_KEY": "b3BlbnNlc2FtZS10ZXN0LWtleS0wMTIzNDU2Nzg5YWI=",  # one for all workers
    }
    prefect_env = {
        **base_env,
        "PREFECT_API_DATABASE_CONNECTION_URL": create_database(pg, "prefect").replace(
            "postgresql://", "postgresql+asyncpg://"
        ),
        "PREFECT_HOME": str(tmp / "prefect-home"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_UI_ENABLED": "false",
        "PREFECT_API_URL": f"http://127.0.0.1:{prefect_port}/api",
    }
    prefect_cmd = [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(prefect_port)]
    try:
        # both start at once; each is waited for in turn
        with (
            started(mlflow_cmd, mlflow_env, tmp / "mlflow.log") as mlflow,
            started(prefect_cmd, prefect_env, tmp / "prefect.log") as prefect,
        ):
            wait_http(f"http://127.0.0.1:{mlflow_port}/health", mlflow, 120, tmp / "mlflow.log")
            wait_http(f"http://127.0.0.1:{prefect_port}/api/health", prefect, 180, tmp / "prefect.log")
            yield {
                **base_env,
                "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{mlflow_port}",
                "CUL_MLFLOW_ARTIFACTS": f"s3://{BUCKET}/mlflow",
                "PREFECT_API_URL": f"http://127.0.0.1:{prefect_port}/api",
                "PREFECT_HOME": str(tmp / "prefect-client"),
                "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
                "PREFECT_LOCAL_STORAGE_PATH": str(tmp / "prefect-results"),
                "CUL_S3_ENDPOINT": endpoint,
                "CUL_TEST_PG": pg,
            }
    finally:
        s3.stop()


def _boto_kw() -> dict:
    return {
        "aws_access_key_id": FAKE_AWS["AWS_ACCESS_KEY_ID"],
        "aws_secret_access_key": FAKE_AWS["AWS_SECRET_ACCESS_KEY"],
        "region_name": FAKE_AWS["AWS_DEFAULT_REGION"],
    }


def s3_keys(endpoint: str, prefix: str) -> list[str]:
    import boto3

    s3 = boto3.client("s3", endpoint_url=endpoint, **_boto_kw())
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
    return [o["Key"] for page in pages for o in page.get("Contents", [])]


def use_s3_remote(project: Path, endpoint: str, name: str = "s3") -> None:
    """An S3 DVC remote in the project's *local* (untracked) config; keys stay in the env."""
    dvc = [sys.executable, "-m", "dvc"]
    subprocess.run(dvc + ["remote", "add", "--local", "-f", "-d", name, f"s3://{BUCKET}/dvc"], cwd=project, check=True)
    subprocess.run(dvc + ["remote", "modify", "--local", name, "endpointurl", endpoint], cwd=project, check=True)


def cul(project: Path, env: dict, *args: str, check: bool = True, timeout: float = 600) -> subprocess.CompletedProcess:
    """The project's own CLI (`python -m cul.cli` from the project folder imports its copy)."""
    p = subprocess.run(
        [sys.executable, "-m", "cul.cli", *args], cwd=project, env=env, capture_output=True, text=True, timeout=timeout
    )
    if check and p.returncode != 0:
        raise AssertionError(f"cul {' '.join(args)} failed ({p.returncode}):\n{p.stdout[-4000:]}\n{p.stderr[-4000:]}")
    return p
