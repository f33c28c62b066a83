"""The base model's figures shared between a team's flow runs (`cul/io/cache.py`). On S3 it runs in
`test_team.py`, where each flow run works in a fresh clone."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from cul.io.cache import CacheError, SharedCache


def _model(folder: Path, value: float) -> Path:
    (folder / "unet").mkdir(parents=True)
    save_file({"w": torch.full((4,), value)}, str(folder / "unet" / "diffusion_pytorch_model.safetensors"))
    return folder


def _figures(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "eval-stride4.npz").write_bytes(b"verdict" * 10)
    (folder / "probes-20.json").write_text('{"key": "k", "hits": {}}')
    (folder / "metrics.json").write_text("{}")  # the base model's report: not a cache file
    return folder


def test_a_fresh_clone_pulls_what_an_earlier_run_pushed_for_the_same_base_model(tmp_path):
    base = _model(tmp_path / "base", 1.0)
    cache = SharedCache(str(tmp_path / "shared"), base)
    assert sorted(cache.push(_figures(tmp_path / "run1"))) == ["eval-stride4.npz", "probes-20.json"]
    assert cache.push(tmp_path / "run1") == []  # nothing new

    fresh = tmp_path / "run2" / "reports" / "base"
    assert sorted(cache.pull(fresh)) == ["eval-stride4.npz", "probes-20.json"]
    assert (fresh / "eval-stride4.npz").read_bytes() == b"verdict" * 10
    assert not (fresh / "metrics.json").exists() and not list(fresh.glob(".*"))
    assert cache.pull(fresh) == []

    (fresh / "probes-20.json").write_text('{"key": "k", "hits": {"more": 1}}')  # the run added figures
    assert cache.push(fresh) == ["probes-20.json"]
    assert SharedCache(str(tmp_path / "shared"), base).pull(tmp_path / "run1") == ["probes-20.json"]


def test_a_figure_recomputed_at_the_same_size_is_pushed_and_pulled(tmp_path):
    base = _model(tmp_path / "base", 1.0)
    cache = SharedCache(str(tmp_path / "shared"), base)
    cache.push(_figures(tmp_path / "run1"))
    run2 = _figures(tmp_path / "run2")
    (run2 / "probes-20.json").write_text('{"key": "K", "hits": {}}')  # another key, the same size
    assert cache.push(run2) == ["probes-20.json"]
    assert cache.pull(tmp_path / "run1") == ["probes-20.json"]
    assert (tmp_path / "run1" / "probes-20.json").read_text() == '{"key": "K", "hits": {}}'


def test_another_base_model_has_a_folder_of_its_own(tmp_path):
    SharedCache(str(tmp_path / "shared"), _model(tmp_path / "a", 1.0)).push(_figures(tmp_path / "run"))
    other = SharedCache(str(tmp_path / "shared"), _model(tmp_path / "b", 2.0))
    assert other.pull(tmp_path / "fresh") == []
    assert len(list((tmp_path / "shared").iterdir())) == 1


def test_unset_is_no_cache_and_an_unwritable_one_says_where(tmp_path):
    base = _model(tmp_path / "base", 1.0)
    assert SharedCache.from_env(base, environ={}) is None
    assert SharedCache.from_env(base, environ={"CUL_CACHE_URL": str(tmp_path / "s")}) is not None
    blocked = tmp_path / "a-file"
    blocked.write_text("")
    with pytest.raises(CacheError, match="cannot write eval-stride4.npz to the shared cache"):
        SharedCache(str(blocked / "cache"), base).push(_figures(tmp_path / "run"))


def test_a_local_file_that_cannot_be_read_is_a_cache_error_not_a_crash(tmp_path):
    cache = SharedCache(str(tmp_path / "shared"), _model(tmp_path / "base", 1.0))
    run = _figures(tmp_path / "run")
    (run / "eval-stride4.npz").unlink()
    (run / "eval-stride4.npz").mkdir()  # what a glob finds but cannot read
    with pytest.raises(CacheError, match="cannot read .*eval-stride4.npz"):
        cache.push(run)
