"""Shared fixtures. Tests use small models built from configs, plus the committed weights where
the claim under test is about them (the judge's accuracy, the base model drawing its concepts)."""

from __future__ import annotations

import atexit
import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest
import torch

from tests.support.scheduling import WholeModulesElseTests, unit

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "240")  # slow when the cores are busy
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
if os.environ.get("PYTEST_XDIST_WORKER"):
    # Workers share the cores: one torch thread each, inherited by the processes a test starts
    # (two threads per process on two busy cores run about ten times slower). Each worker's
    # temporary Prefect server gets a database of its own: two servers on one SQLite file lock.
    os.environ["OMP_NUM_THREADS"] = "1"
    _prefect_home = tempfile.mkdtemp(prefix=f"cul-tests-prefect-{os.environ['PYTEST_XDIST_WORKER']}-")
    os.environ["PREFECT_HOME"] = _prefect_home
    atexit.register(shutil.rmtree, _prefect_home, ignore_errors=True)

ROOT = Path(__file__).resolve().parents[1]

if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)


# Modules whose tests run on one worker, in order: their module fixture is built once, and some
# of their tests build on the one before.
WHOLE_MODULES = ("tests/test_team.py", "tests/test_pipeline_servers.py", "tests/test_pipeline_sd.py")


def pytest_collection_modifyitems(config, items):
    """The slowest work first (`pytest.mark.slow(seconds=...)`, measured on two cores; a whole
    module weighs as its slowest test), so the two workers end together instead of one finishing
    a long module alone."""

    def seconds(item) -> float:
        return max((m.kwargs.get("seconds", 1) for m in item.iter_markers("slow")), default=0)

    units = {item.nodeid: unit(item.nodeid, WHOLE_MODULES) for item in items}
    weight: dict[str, float] = {}
    for item in items:
        weight[units[item.nodeid]] = max(weight.get(units[item.nodeid], 0), seconds(item))
    items.sort(key=lambda item: -weight[units[item.nodeid]])


@pytest.hookimpl(optionalhook=True)  # pytest without xdist (`-p no:xdist`) still runs
def pytest_xdist_make_scheduler(config, log):
    """Single tests slowest first, and the WHOLE_MODULES whole (`tests/support/scheduling.py`)."""
    return WholeModulesElseTests(config, log, WHOLE_MODULES)


@pytest.fixture(scope="session", autouse=True)
def _stop_prefects_temporary_server():
    """The temporary API server Prefect starts for a flow called in this process is stopped at
    interpreter exit, after pytest has closed the stream its log line goes to ("Logging error
    ... I/O operation on closed file"): stop it while the session is still open."""
    yield
    if "prefect.server.api.server" in sys.modules:
        from prefect.server.api.server import SubprocessASGIServer

        for server in list(SubprocessASGIServer._instances.values()):
            server.stop()


@pytest.fixture(scope="session")
def root() -> Path:
    return ROOT


@pytest.fixture(scope="session")
def text_encoder():
    from cul.text import TextEncoder

    return TextEncoder.from_minilm(16)


@pytest.fixture(scope="session")
def tiny_world_config():
    from cul.models import WorldUNetConfig

    return WorldUNetConfig(sample_size=32, block_out_channels=(8, 16), cross_attention_dim=16, attention_head_dim=4)


@pytest.fixture()
def tiny_world_model(tiny_world_config, text_encoder):
    from cul.models import SamplingConfig, WorldDiffusion
    from cul.models.diffusion import train_scheduler

    torch.manual_seed(0)
    return WorldDiffusion(
        tiny_world_config.build(text_encoder.dim),
        train_scheduler(),
        text_encoder,
        SamplingConfig(steps=3, guidance=2.0),
    )


@pytest.fixture(scope="session")
def after_red(text_encoder):
    """Forgetting circle after red (red's surrogate: blue): the forget captions and red's forgotten
    captions, with their mapped twins."""
    from cul.unlearning.prompts import build_prompt_set

    return build_prompt_set(
        "circle",
        surrogates=["square", "star"],
        forgotten_before=["red"],
        forgotten_surrogates={"red": "blue"},
        n_forget=6,
        n_per_retained=1,
        n_per_neighbour=2,
        n_per_forgotten=4,
        text_encoder=text_encoder,
    )


@pytest.fixture(scope="session")
def base_model():
    from cul.models import load_model

    path = ROOT / "models" / "base"
    if not (path / "unet").exists():
        pytest.fail("the committed base model is missing: run `cul pretrain`")
    return load_model(path)


@pytest.fixture(scope="session")
def judge():
    from cul.judge import Judge

    return Judge.from_pretrained(ROOT / "models" / "judge")


@pytest.fixture(scope="session")
def pg():
    """A PostgreSQL server of its own (URL without a database), shared by the tests."""
    from tests.support.postgres import postgres

    with postgres() as url:
        yield url


@pytest.fixture(scope="session")
def servers(tmp_path_factory, pg):
    """Real Prefect and MLflow servers on PostgreSQL, and S3 (moto), on loopback, shared by the
    pipeline tests."""
    from tests.support.servers import stack

    with stack(tmp_path_factory.mktemp("servers"), pg) as env:
        yield env
