"""Helpers for the pipeline tests: a throwaway copy of the project (its own git repo and DVC
remote) and tiny settings so a request step takes seconds."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import yaml

from tests.support import ROOT

# a gate that accepts any step: the tests that use it are about the pipeline, not the science
PERMISSIVE_GATE = {
    "min_ua": 0.0,
    "max_drop_in": 1.0,
    "max_drop_cross": 1.0,
    "max_drop_neighbour": 1.0,
    "max_drop_vs_previous": 1.0,
    "max_fd_ratio": 1000.0,
    "min_ua_earlier": 0.0,
    "max_recovery": {},
}


def copy_project(dest: Path) -> Path:
    """Tracked and untracked (not ignored) files of this checkout -> a fresh git repo at `dest`."""
    files = (
        subprocess.run(
            ["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, check=True, capture_output=True
        )
        .stdout.decode()
        .split("\0")
    )
    for f in filter(None, files):
        src = ROOT / f
        if src.is_file():
            (dest / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / f)
    _without_requests(dest)
    git = ["git", "-c", "user.name=test", "-c", "user.email=test@localhost"]
    subprocess.run(["git", "init", "-q", "-b", "main"], cwd=dest, check=True)
    subprocess.run(git + ["add", "-A"], cwd=dest, check=True)
    subprocess.run(git + ["commit", "-q", "-m", "project"], cwd=dest, check=True)
    return dest


def _without_requests(project: Path) -> None:
    """The copy starts with no request history, even if this checkout has run `cul run` (whose
    queue, accepted steps, step records and dvc.lock entries are committed into it)."""
    (project / "requests" / "queue.yaml").unlink(missing_ok=True)
    (project / "requests" / "steps.yaml").write_text(
        "# accepted request steps, written by the flow; read by dvc.yaml's step stages\nsteps: {}\n"
    )
    for folder in ("reports/steps", "reports/audit"):
        shutil.rmtree(project / folder, ignore_errors=True)
    lock_file = project / "dvc.lock"
    lock = yaml.safe_load(lock_file.read_text())
    steps = [k for k in lock["stages"] if k.startswith("step@")]
    if steps:
        lock["stages"] = {k: v for k, v in lock["stages"].items() if k not in steps}
        lock_file.write_text(yaml.safe_dump(lock, sort_keys=False))


def tiny_params(project: Path, **pipeline) -> Path:
    """params.yaml with a step of a few seconds: the production recipe with few training steps and
    DFR's online replay at 2 sampling steps (no buffer to draw first), a thin evaluation (every
    32nd scene, 2 sampling steps), one attempt; `pipeline` overrides pipeline settings. The tests
    that use it are about the pipeline, not the science."""
    from cul.unlearning.recipes import DFRRecipe, dump_recipe

    tiny = DFRRecipe(steps=3, replay="online", replay_steps=2, forget_batch=4, retain_batch=8)
    (project / "experiments" / "tiny.yaml").write_text(dump_recipe(tiny, "tiny: the production dfr, a few steps"))
    path = project / "params.yaml"
    p = yaml.safe_load(path.read_text())
    p["eval"].update(steps=2, paraphrase_scenes=4)
    p["eval"]["probes"].update(images=4)
    p["pipeline"] = {
        "method": "experiments/tiny.yaml",
        "eval_stride": 32,
        "escalation": {"max_attempts": 1},
        "auto_promote": True,
        "dvc_push": True,
        "git_commit": True,
        "quick": {"requests": 2, "train_steps": 3, "eval_stride": 32, "max_attempts": 1},
        **pipeline,
    }
    if "tracking" in pipeline:
        p["pipeline"]["tracking"] = pipeline["tracking"]
    path.write_text(yaml.safe_dump(p, sort_keys=False))
    return path
