"""What made a result: the resolved recipe, its hash, and the git commit of the code.

Every benchmark `results.json` entry, every step's `metrics.json` and every MLflow run carries
`provenance(name, recipe)`, so a table built from results says which recipe and which code made
each row, and a name can be checked against the recipe it claims.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

from cul.unlearning.recipes import RecipeBase, recipe_hash

CODE_PATHS = ("cul", "flows", "pyproject.toml")


def code_revision(root: str | Path = ".") -> tuple[str, bool]:
    """(HEAD's commit, whether the code under it has uncommitted changes); ("unknown", False)
    outside a git checkout."""

    def git(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True)

    head = git("rev-parse", "HEAD")
    if head.returncode != 0:
        return "unknown", False
    dirty = git("status", "--porcelain", "--untracked-files=no", "--", *CODE_PATHS).stdout.strip()
    return head.stdout.strip(), bool(dirty)


def provenance(name: str, recipe: RecipeBase, root: str | Path = ".", code: tuple[str, bool] | None = None) -> dict:
    """{recipe_name, recipe, recipe_hash, git_commit, git_dirty} of a result. `code`: the
    `code_revision` a long process took when it started (the code it loaded), else the one now."""
    commit, dirty = code or code_revision(root)
    return {
        "recipe_name": name,
        "recipe": recipe.model_dump(mode="json"),
        "recipe_hash": recipe_hash(recipe),
        "git_commit": commit,
        "git_dirty": dirty,
    }
