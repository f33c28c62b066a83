"""Deletion records: for each accepted request, the evidence that it was honoured (markdown for
people, JSON for machines), linking the request, the model version, the DVC stage and revision,
and the evaluation (UA on the concept and its paraphrases, retention, sample grid)."""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime
from pathlib import Path

from cul.fmt import pct, times
from cul.unlearning.recipes import recipe_hash

AUDIT_DIR = Path("reports/audit")
_MARKDOWN = re.compile(r"([\\`*_\[\]<>|~])")  # inline markup; the text never starts a line


def md_text(text: str) -> str:
    """User text as literal markdown: on one line, every markup character escaped, so a note
    cannot add lines, links, tables or emphasis to a record."""
    return _MARKDOWN.sub(r"\\\1", " ".join(str(text).split()))


def md_code(text: str) -> str:
    """Catalogue text (a concept's name or wording, which `cul concept add` takes from a user) as
    one inline code span: a fence longer than any backtick run inside, table pipes escaped."""
    text = " ".join(str(text).split()).replace("|", "\\|")
    fence = "`" * (max((len(run) for run in re.findall(r"`+", text)), default=0) + 1)
    pad = " " if text.startswith("`") or text.endswith("`") else ""
    return f"{fence}{pad}{text}{pad}{fence}"


def probe_lines(probes: list[dict], key: str) -> list[str]:
    """The record's robustness section: every probe's figure (`cul.probes`) and its sample grid."""
    if not probes:
        return []
    out = [
        "## Does it come back?",
        "",
        "Recovery: how often the judge sees the concept under the probe, over how often it sees it in "
        "the base model's images of the same prompts and seeds (0%: never comes back).",
        "",
        "| concept | probe | recovery | images showing it | base model | example prompt |",
        "|---|---|---|---|---|---|",
    ]
    for r in probes:
        out.append(
            f"| {md_code(r['concept'])} | {md_code(r['probe'])} | {pct(r['recovery'], unit='%')} "
            f"| {r['hits']} of {r['images']} | {r['base_hits']} of {r['base_images']} | {md_code(r['prompt'])} |"
        )
    return out + ["", f"![probe samples](../steps/{key}/probes.png)", ""]


def share_lines(verdict) -> list[str]:
    """How sure the gate is: the images and the confidence bound behind each share check."""
    rows = [c for c in verdict.checks if c.images is not None]
    if not rows:
        return []
    out = [
        "## The gate's evidence",
        "",
        "Each share check on the judge's counts: the images it rests on, and the confidence bound it "
        "reached on the share of them that show the forgotten concept.",
        "",
        "| check | value | limit | images | bound on the share | decided |",
        "|---|---|---|---|---|---|",
    ]
    for c in rows:
        decided = "yes" if c.conclusive else "no: point estimate at the image budget"
        out.append(
            f"| {md_code(c.name)} | {pct(c.value, unit='%')} | {pct(c.threshold, unit='%')} | {c.images} "
            f"| {pct(c.bound, unit='%')} | {decided} |"
        )
    return out + [""]


def write_deletion_record(
    item, spec, metrics: dict, verdict, version: int, model_name: str, tags: dict, out: Path = AUDIT_DIR
) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    base = metrics.get("base") or {}
    record = {
        "request": item.model_dump(mode="json"),
        "model": {
            "name": model_name,
            "version": version,
            "uri": f"models:/{model_name}/{version}",
            "parent_version": spec.parent_version,
            "step": spec.key,
            "dvc_stage": f"step@{spec.key}",
            "dvc_md5": tags.get("dvc_md5"),
            "code_commit": tags.get("git_commit"),
        },
        "forgotten_so_far": metrics["forgotten"],
        "evidence": {
            "ua": metrics["ua"],
            "paraphrase_ua": metrics.get("paraphrase_ua", {}),
            "ra_in": metrics["ra_in"],
            "ra_cross": metrics["ra_cross"],
            "ra_neighbour": metrics["ra_neighbour"],
            "fd_ratio": metrics.get("fd_ratio"),
            "base": base,
            "earlier_forgotten_ua": {c: 1 - metrics["per_concept"][c] for c in metrics["forgotten"][:-1]},
            "probes": metrics.get("probes", []),
            "probe_samples": str(spec.report_dir / "probes.png") if metrics.get("probes") else None,
            "samples": str(spec.report_dir / "samples.png"),
            "metrics": str(spec.report_dir / "metrics.json"),
        },
        "gate": verdict.model_dump(),
        "recipe": {
            "name": spec.recipe_name,
            "attempt": spec.attempt,
            "hash": recipe_hash(spec.recipe),
            "config": spec.recipe.model_dump(mode="json"),
        },
        "written": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    (out / f"{item.id}.json").write_text(json.dumps(record, indent=1) + "\n")

    lines = [
        f"# Deletion record {item.id}: forget {md_code(item.concept)} ({md_text(item.kind)})",
        "",
        f"- Requested by {md_text(item.by or 'unknown')} at {item.at}"
        + (f": {md_text(item.note)}" if item.note else ""),
        f"- Honoured by model **{model_name} version {version}** (`models:/{model_name}/{version}`), "
        f"step `{spec.key}` from version {spec.parent_version or 'base'}, attempt {spec.attempt}, "
        f"recipe `{spec.recipe_name}` (`{recipe_hash(spec.recipe)}`)",
        f"- Reproduce: `git checkout <commit of this record> && dvc pull && dvc repro --single-item step@{spec.key}` "
        f"(model md5 `{tags.get('dvc_md5')}`)",
        f"- Concepts forgotten by this version: {', '.join(md_code(c) for c in metrics['forgotten'])}",
        "",
        "| evidence | this version | base model |",
        "|---|---|---|",
        f"| UA on {md_code(item.concept)} | {pct(metrics['ua'], unit='%')} | {pct(base.get('ua'), unit='%')} |",
    ]
    for word, ua in (metrics.get("paraphrase_ua") or {}).items():
        lines.append(f"| UA when asked with {md_code(word)} | {pct(ua, unit='%')} | |")
    for c, ua in record["evidence"]["earlier_forgotten_ua"].items():
        lines.append(f"| UA on earlier forgotten {md_code(c)} | {pct(ua, unit='%')} | |")
    lines += [
        f"| RA-I (same kind) | {pct(metrics['ra_in'], unit='%')} | {pct(base.get('ra_in'), unit='%')} |",
        f"| RA-C (other kinds) | {pct(metrics['ra_cross'], unit='%')} | {pct(base.get('ra_cross'), unit='%')} |",
        f"| RA-N (confusables) | {pct(metrics['ra_neighbour'], unit='%')} "
        f"| {pct(base.get('ra_neighbour'), unit='%')} |",
        f"| FD ratio to base | {times(metrics.get('fd_ratio'))} | 1.00 |",
        "",
        f"Gate: {verdict.summary()}",
        "",
        f"![before and after](../steps/{spec.key}/samples.png)",
        "",
    ]
    lines += probe_lines(metrics.get("probes") or [], spec.key)
    lines += share_lines(verdict)
    path = out / f"{item.id}.md"
    path.write_text("\n".join(lines))
    return path
