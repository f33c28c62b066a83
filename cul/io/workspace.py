"""A worker's own checkout of the project for one flow run: what a machine that shares no disk
with anyone starts from (a Prefect pull step, see prefect.yaml).

    pull:
      - cul.io.workspace.checkout: {}

The image holds the code; the checkout holds the project's records at the latest commit
(params.yaml, the accepted steps, dvc.lock, the base model and judge committed to git). Weights
of the champion come from the MLflow registry, step outputs go to the DVC remote on S3, and the
step's commit goes back to the git remote (`cul.io.versioning`). Everything comes from the
environment: `CUL_REPO_URL` (with `CUL_REPO_BRANCH`), `CUL_DVC_REMOTE_URL`, `CUL_S3_ENDPOINT`.
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
from pathlib import Path

from cul.io.versioning import Versioner


class WorkspaceError(RuntimeError):
    """The repository cannot be cloned; the message names it without credentials."""


def _redact(url: str) -> str:
    return re.sub(r"//[^/@]+@", "//***@", url)


def checkout(repository: str | None = None, branch: str | None = None, root: str | None = None) -> dict[str, str]:
    """Clone the project into a new folder under `root` (`CUL_WORKSPACES`, else the current
    folder), point DVC at the team's remote, and return `{"directory": folder}`: Prefect runs the
    flow there."""
    url = repository or os.environ.get("CUL_REPO_URL")
    if not url:
        raise WorkspaceError("no repository to clone: set CUL_REPO_URL to the project's git URL")
    branch = branch or os.environ.get("CUL_REPO_BRANCH") or None
    base = Path(root or os.environ.get("CUL_WORKSPACES") or Path.cwd())
    base.mkdir(parents=True, exist_ok=True)
    dest = Path(tempfile.mkdtemp(prefix="cul-", dir=base))
    cmd = ["git", "clone", "--quiet", *(["--branch", branch] if branch else []), url, str(dest)]
    done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "GIT_TERMINAL_PROMPT": "0"})
    if done.returncode != 0:
        raise WorkspaceError(f"git clone {_redact(url)} failed: {_redact(done.stderr.strip())[-500:]}")
    Versioner(dest).configure_remote()
    return {"directory": str(dest)}
