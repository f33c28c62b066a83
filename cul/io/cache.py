"""The base model's figures, shared between a team's workers.

A step judges the base model on the same prompts and seeds as its candidate (the evaluation's base
verdict, the probes' base rates) and keeps those figures in `reports/base/` (`eval-stride*.npz`,
`probes-*.json`), keyed inside by the base model's weights and the settings. On a laptop that
folder persists; on a team's pool every flow run works in a fresh clone where it is empty, so
without sharing each request judges the base model again: on Stable Diffusion, as much work as
judging the candidate.

`CUL_CACHE_URL` (a folder, or `s3://bucket/prefix`, with `CUL_S3_ENDPOINT` for MinIO or another
S3) holds them, one folder per base model (the digest of its weight files): a flow run pulls them
before its step and pushes what changed after it. A stale or foreign file is harmless: its key no
longer matches, so the step computes the figures again and pushes the new file.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import uuid
from collections.abc import Mapping
from pathlib import Path

#: the cache files a step reads and writes in `reports/base/`.
PATTERNS = ("eval-stride*.npz", "probes-*.json")


class CacheError(RuntimeError):
    """The shared cache cannot be read or written; the message names it without credentials."""


def weights_digest(folder: str | Path) -> str:
    """SHA-256 of a model folder's weight files (names and bytes, in path order)."""
    h = hashlib.sha256()
    for f in sorted(Path(folder).rglob("*.safetensors")):
        h.update(f.relative_to(folder).as_posix().encode())
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 24), b""):
                h.update(chunk)
    return h.hexdigest()


class SharedCache:
    """A shared folder of the base model's figures.

    Args:
        url: a local folder or an fsspec URL (`s3://bucket/prefix`).
        base_model: the base model's folder; its weights' digest names the subfolder used.
        endpoint: an S3 endpoint (MinIO, moto), when `url` is on S3 but not on AWS.
    """

    def __init__(self, url: str, base_model: str | Path, endpoint: str | None = None) -> None:
        from fsspec.core import url_to_fs

        options = {"client_kwargs": {"endpoint_url": endpoint}} if endpoint and url.startswith("s3://") else {}
        self.url = url.rstrip("/")
        try:
            self.fs, root = url_to_fs(self.url, **options)
        except Exception as e:  # an unknown scheme, a missing backend
            raise CacheError(f"cannot open the shared cache {self.url.split('@')[-1]}: {e}") from e
        self.digest = weights_digest(base_model)[:16]
        self.root = f"{root.rstrip('/')}/{self.digest}"

    @classmethod
    def from_env(cls, base_model: str | Path, environ: Mapping[str, str] | None = None) -> SharedCache | None:
        """The cache `CUL_CACHE_URL` names (None when it is unset)."""
        env = os.environ if environ is None else environ
        url = env.get("CUL_CACHE_URL")
        return cls(url, base_model, env.get("CUL_S3_ENDPOINT")) if url else None

    def _where(self) -> str:
        return f"{self.url.split('@')[-1]}/{self.digest}"  # no user:password@ in messages

    def _local(self, folder: Path) -> dict[str, Path]:
        return {f.name: f for pattern in PATTERNS for f in sorted(folder.glob(pattern))}

    def _remote(self) -> dict[str, dict]:
        try:
            self.fs.invalidate_cache(self.root)  # what other workers pushed since the last look
            entries = self.fs.ls(self.root, detail=True) if self.fs.exists(self.root) else []
        except Exception as e:
            raise CacheError(f"cannot list the shared cache {self._where()}: {e}") from e
        files = {Path(e["name"]).name: e for e in entries if e.get("type") == "file"}
        return {n: e for n, e in files.items() if any(Path(n).match(p) for p in PATTERNS)}

    def _read(self, name: str) -> bytes:
        try:
            return self.fs.cat_file(f"{self.root}/{name}")
        except Exception as e:
            raise CacheError(f"cannot read {name} from the shared cache {self._where()}: {e}") from e

    def pull(self, folder: str | Path) -> list[str]:
        """Copy the cache's files that `folder` lacks, or holds with other bytes, into it. Returns
        their names. Each lands whole (a temporary name, then a rename). The files are tens of
        kilobytes: each is read once and compared byte for byte, since a figure recomputed under
        another key can keep its size."""
        folder = Path(folder)
        pulled = []
        for name in self._remote():
            data = self._read(name)
            target, tmp = folder / name, folder / f".{name}-{os.getpid()}.part"
            try:
                if target.is_file() and target.read_bytes() == data:
                    continue
                folder.mkdir(parents=True, exist_ok=True)
                tmp.write_bytes(data)
                os.replace(tmp, target)
            except OSError as e:
                tmp.unlink(missing_ok=True)
                raise CacheError(f"cannot write {name} into {folder}: {e}") from e
            pulled.append(name)
        return pulled

    def push(self, folder: str | Path) -> list[str]:
        """Copy `folder`'s cache files the cache lacks, or holds with other bytes, into it. Returns
        their names. Each lands whole, so a reader never sees part of one: it is written under a
        temporary name, then moved (a rename in a folder; in a bucket an object appears whole).
        An `.npz` saved again holds new timestamps, so the same figures saved twice are pushed
        twice: harmless."""
        remote = self._remote()
        pushed = []
        for name, path in self._local(Path(folder)).items():
            try:
                data = path.read_bytes()
            except OSError as e:
                raise CacheError(f"cannot read {path}: {e}") from e
            if name in remote and remote[name].get("size") == len(data) and self._read(name) == data:
                continue
            tmp = f"{self.root}/.{name}-{uuid.uuid4().hex[:8]}.part"
            try:
                self.fs.makedirs(self.root, exist_ok=True)  # a local folder's; a no-op in a bucket
                self.fs.pipe_file(tmp, data)
                self.fs.mv(tmp, f"{self.root}/{name}")
            except Exception as e:
                with contextlib.suppress(Exception):  # never written, or already moved
                    self.fs.rm(tmp)
                raise CacheError(f"cannot write {name} to the shared cache {self._where()}: {e}") from e
            pushed.append(name)
        return pushed
