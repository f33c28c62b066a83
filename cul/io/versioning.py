"""DVC and git: every accepted step becomes a `step@KEY` stage whose outputs (prompts, replay
buffer, weights) are DVC-cached and pushed, and whose spec and lock are committed to git, so
`git checkout REV && dvc pull && dvc repro --single-item step@KEY` rebuilds it (only it: the
base model and judge it reads are committed to git).

The remote is whatever `.dvc/config` names (a local folder by default). S3: add a remote with
`dvc remote add --local` and pass credentials through the environment (AWS_ACCESS_KEY_ID, ...):
nothing secret is ever written to a tracked file. A worker on a fresh machine gets its remote from
the environment instead (`CUL_DVC_REMOTE_URL`, `CUL_S3_ENDPOINT`: `configure_remote`).

On a team, a step's git records reach the others through the git remote: `sync` rebases the
checkout on what others pushed before a step takes its key, and `publish` pushes the step's commit,
rebasing and retrying when someone pushed in between.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import yaml


class VersioningError(RuntimeError):
    pass


def _redact(text: str) -> str:
    """Git and DVC output without credentials in URLs (https://TOKEN@host/...)."""
    return re.sub(r"//[^/@\s]+@", "//***@", text)


def _run(cmd: list[str], cwd: Path, check: bool = True) -> str:
    env = {**os.environ, "GIT_TERMINAL_PROMPT": "0"}
    p = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env=env)
    if check and p.returncode != 0:
        said = _redact(p.stderr.strip() or p.stdout.strip())
        raise VersioningError(f"{' '.join(cmd[:4])} failed ({p.returncode}):\n{said}")
    return p.stdout.strip()


WHO = ["-c", "user.name=cul-pipeline", "-c", "user.email=cul-pipeline@localhost"]


class Versioner:
    def __init__(self, root: str | Path = ".", remote: str | None = None, share: bool = False) -> None:
        self.root = Path(root).resolve()
        self.remote = remote or os.environ.get("CUL_DVC_REMOTE") or None
        self.share = share  # a team's checkout: `sync` and `publish` go through the git remote

    def dvc(self, *args: str, check: bool = True) -> str:
        return _run([sys.executable, "-m", "dvc", *args], self.root, check)

    def git(self, *args: str, check: bool = True) -> str:
        return _run(["git", *args], self.root, check)

    def is_repo(self) -> bool:
        return (self.root / ".dvc").is_dir() and (self.root / ".git").exists()

    def head(self) -> str:
        return self.git("rev-parse", "HEAD", check=False) or "unknown"

    def record_step(self, key: str) -> str:
        """Write the step's outputs into dvc.lock (the step ran in the flow, not under `dvc repro`)
        and return the md5 DVC gave the model folder."""
        self.dvc("commit", "--force", f"step@{key}")
        return self.output_hash(f"step@{key}", f"models/steps/{key}")

    def output_hash(self, stage: str, path: str) -> str:
        lock = yaml.safe_load((self.root / "dvc.lock").read_text())
        for out in lock["stages"][stage].get("outs", []):
            if out["path"] == path:
                return out["md5"]
        raise VersioningError(f"{path} is not an output of {stage} in dvc.lock")

    def push(self, *targets: str) -> None:
        self.dvc("push", *(["--remote", self.remote] if self.remote else []), *targets)

    def staged(self) -> list[str]:
        """Paths with changes staged in the index (a user's work in progress, before a run)."""
        out = self.git("diff", "--cached", "--name-only", check=False)
        return [line for line in out.splitlines() if line]

    def commit(self, message: str, paths: list[str]) -> str:
        """Commit exactly `paths` (the files the step wrote), whatever else is staged or untracked
        in the tree; returns the new revision (the step's DVC revision)."""
        present = [p for p in paths if (self.root / p).exists()]
        if present:
            self.git("add", "--", *present)
        changed = self.git("diff", "--cached", "--name-only", "--", *paths).splitlines() if paths else []
        if not changed:
            return self.head()
        self.git(*WHO, "commit", "-q", "--no-verify", "-m", message, "--only", "--", *changed)
        return self.head()

    # -- a team's shared remotes ------------------------------------------------------------------
    def configure_remote(self) -> str | None:
        """Point DVC at `CUL_DVC_REMOTE_URL` (with endpoint `CUL_S3_ENDPOINT`, for MinIO or another
        S3), as the local default remote `team`; returns its name, or None when the variable is unset."""
        url = os.environ.get("CUL_DVC_REMOTE_URL")
        if not url:
            return None
        self.dvc("remote", "add", "--local", "--force", "--default", "team", url)
        if endpoint := os.environ.get("CUL_S3_ENDPOINT"):
            self.dvc("remote", "modify", "--local", "team", "endpointurl", endpoint)
        self.remote = "team"
        return "team"

    def upstream(self) -> tuple[str, str] | None:
        """(remote, branch) the checkout tracks, or None (a repository without a remote)."""
        ref = self.git("rev-parse", "--abbrev-ref", "--symbolic-full-name", "@{u}", check=False)
        if not ref or "/" not in ref:
            return None
        remote, branch = ref.split("/", 1)
        return remote, branch

    def sync(self) -> str:
        """Rebase a shared checkout on its upstream (what other workers pushed); returns HEAD.
        A laptop's checkout (`share` off) is left as it is."""
        if self.share and self.upstream() is not None:
            self.git(*WHO, "pull", "--rebase", "--quiet")
        return self.head()

    def publish(self, tries: int = 5) -> str:
        """Push HEAD to the upstream, rebasing on what others pushed meanwhile; returns HEAD.
        A conflict stops with a message and leaves the commit local."""
        if not self.share or (up := self.upstream()) is None:
            return self.head()
        remote, branch = up
        for attempt in range(tries):
            pushed = subprocess.run(
                ["git", "push", "--quiet", remote, f"HEAD:{branch}"], cwd=self.root, capture_output=True, text=True
            )
            if pushed.returncode == 0:
                return self.head()
            rebased = subprocess.run(
                ["git", *WHO, "pull", "--rebase", "--quiet", remote, branch],
                cwd=self.root,
                capture_output=True,
                text=True,
            )
            if rebased.returncode != 0:
                self.git("rebase", "--abort", check=False)
                said = _redact(rebased.stderr.strip())[-500:]
                raise VersioningError(f"cannot rebase on {remote}/{branch} to push the step's commit: {said}")
            time.sleep(0.5 * (attempt + 1))
        raise VersioningError(
            f"git push to {remote}/{branch} refused {tries} times: {_redact(pushed.stderr.strip())[-500:]}"
        )
