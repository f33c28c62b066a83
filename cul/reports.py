"""Writing evaluation reports: metrics JSON beside the pictures that explain them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from cul.fmt import pct, times
from cul.plots import concept_bars, scene_grid
from cul.results import BenchmarkError, inherited, read_json, read_results

if TYPE_CHECKING:
    from cul.probes import ProbeResult


def write_base_report(metrics: dict, images: torch.Tensor, out: str | Path) -> None:
    """metrics.json, samples.png (every object x colour x texture) and per_concept.png."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    scene_grid(images, out / "samples.png", "base model samples (rows: object, columns: colour, panels: texture)")
    concept_bars(
        metrics["per_concept"],
        out / "per_concept.png",
        "base model: share of samples the judge finds correct, per concept",
        threshold=0.8,
    )


def _label(record: dict, name: str | None, folder: Path, taken: dict) -> str:
    """A run's name: its recipe's (the folder's where it records none), with the request order's
    seed when `--order-seed` shuffled the sequence, "(gated)" for a run through the gate (`cul
    bench --gated`), and its folder when another run has that name."""
    seed = record.get("order_seed")
    label = (name or folder.name) + (f" (order {seed})" if seed is not None else "")
    label += " (gated)" if record.get("mode") == "gated" else ""
    return f"{label} [{folder.name}]" if label in taken else label


def load_runs(folder: str | Path) -> dict[str, list[dict]]:
    """Every FOLDER/*/results.json that has steps, keyed by its run's name (`_label`)."""
    runs: dict[str, list[dict]] = {}
    for f in sorted(Path(folder).glob("*/results.json")):
        results = read_results(f)
        if not all(map(inherited, results)):  # a branch that has run none of its own: not yet
            runs[_label(results[-1], results[-1].get("recipe_name"), f.parent, runs)] = results
    return runs


def _made_by(r: dict) -> str:
    """`hash @ commit` of the recipe and code that made a result ("-" where it records none)."""
    if not r.get("recipe_hash"):
        return "-"
    return f"`{r['recipe_hash'][:8]}` @ `{str(r.get('git_commit', '?'))[:7]}`" + ("+" if r.get("git_dirty") else "")


def _mean3(r: dict) -> float | None:
    trio = [r.get(k) for k in ("ua", "ra_in", "ra_cross")]
    return sum(trio) / 3 if all(v is not None for v in trio) else None  # type: ignore[arg-type]


def relapses(results: list[dict], floor: float = 0.9) -> int | None:
    """Evaluated steps after which some concept forgotten by then is still recognised in more than
    1 - floor of its images, or has no score: the steps the gate's UA rule (`min_ua`,
    `min_ua_earlier`, 0.9 in production) rejects on its point estimate. Steps run without an
    evaluation (`cul bench --eval-every`) count neither way. None where an evaluated step records
    no per-concept scores."""
    from cul.gate import EPS

    if any("per_concept" not in r for r in results):
        return None
    gone: list[str] = []
    count = 0
    for r in results:  # a gated run's entry says what its champion has forgotten (not the rejected)
        gone = list(r["forgotten"]) if "forgotten" in r else gone + [r["concept"]]
        if r.get("evaluated", True):
            count += any(r["per_concept"].get(c, 1.0) > 1 - floor + EPS for c in gone)
    return count


def evaluated(results: list[dict]) -> int:
    """How many of `results`' steps were evaluated (all but those `cul bench --eval-every` skipped)."""
    return sum(bool(r.get("evaluated", True)) for r in results)


def _reference(runs: dict[str, list[dict]]) -> dict | None:
    """The base model's figures against the longest forgotten set any run was judged on (RA
    depends on what is forgotten): a run's last judged step, a gated run's counted by what its
    champion has forgotten."""
    best, most = None, -1
    for results in runs.values():
        for r in results:
            n = len(r["forgotten"]) if "forgotten" in r else r["step"]
            if r.get("base") and r.get("evaluated", True) and n > most:
                best, most = r["base"], n
    return best


def benchmark_table(runs: dict[str, list[dict]]) -> str:
    """Markdown: each method's metrics after its last step, and its mean cost per request."""
    head = (
        "| method | steps | UA | RA-I | RA-C | RA-N | mean(UA, RA-I, RA-C) | FD / base | drift "
        "| steps a concept is back | s / request | replay images / request | recipe @ commit |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|\n"
    )
    rows = []
    base = _reference(runs)
    if base:  # the base model judged by the same evaluation, against the same forgotten set
        rows.append(
            f"| base model (reference) | 0 | {pct(base.get('ua'))} | {pct(base.get('ra_in'))} "
            f"| {pct(base.get('ra_cross'))} | {pct(base.get('ra_neighbour'))} | - | 1.00 | 0.00 | - | - | - | - |"
        )
    for name, results in runs.items():
        r = results[-1]
        own = [x for x in results if not inherited(x)]  # a branch's costs are its own requests'
        secs = sum(x["seconds"] for x in own) / len(own)
        known = [x["replay_images"] for x in own if "replay_images" in x]
        imgs = f"{sum(known) / len(known):.0f}" if known else "-"
        back = relapses(results)
        if r.get("mode") == "gated":  # what production delivers: requests the gate let through
            name += f", {sum(x['accepted'] for x in own)} of {len(own)} accepted"
        if len(own) < len(results):
            name += f" (from {Path(results[0]['inherited_from']).name} after request {len(results) - len(own)})"
        rows.append(
            f"| {name} | {r['step']} | {pct(r['ua'])} | {pct(r['ra_in'])} | {pct(r['ra_cross'])} "
            f"| {pct(r['ra_neighbour'])} | {pct(_mean3(r))} | {times(r.get('fd_ratio'))} "
            f"| {times(r.get('drift'))} | {'-' if back is None else f'{back} of {evaluated(results)}'} "
            f"| {secs:.0f} | {imgs} | {_made_by(r)} |"
        )
    return head + "\n".join(rows) + "\n"


def steps_table(name: str, results: list[dict]) -> str:
    """Markdown: one method's metrics after every request, with the base model's FD beside."""
    lines = [
        f"#### {name}\n",
        "| step | concept | UA | RA-I | RA-C | RA-N | FD / base | drift | s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        concept = r["concept"] + (" (rejected: champion unchanged)" if r.get("accepted") is False else "")
        concept += f" ({Path(r['inherited_from']).name}'s)" if inherited(r) else ""  # a branch's start
        lines.append(
            f"| {r['step']} | {concept} | {pct(r['ua'])} | {pct(r['ra_in'])} | {pct(r['ra_cross'])} "
            f"| {pct(r['ra_neighbour'])} | {times(r.get('fd_ratio'))} | {times(r.get('drift'))} "
            f"| {r['seconds']:.0f} |"
        )
    return "\n".join(lines) + "\n"


def side_by_side(runs: dict[str, list[dict]]) -> str:
    """Markdown: methods as columns, requests as rows: mean(UA, RA-I, RA-C) and FD / base after
    each request, so runs of different lengths are compared at equal steps, not at their ends."""
    names = list(runs)
    n = max((len(v) for v in runs.values()), default=0)
    lines = ["| after request | " + " | ".join(f"{m}: mean / FDx" for m in names) + " |", "|---|" + "---|" * len(names)]
    for i in range(n):
        if not any(i < len(v) and v[i].get("evaluated", True) for v in runs.values()):
            continue  # no run judged this request (`--eval-every`)
        cells = []
        for m in names:
            if i >= len(runs[m]):
                cells.append("")
                continue
            r = runs[m][i]
            cells.append(f"{pct(_mean3(r))} / {times(r.get('fd_ratio'))}")
        concept = next((runs[m][i]["concept"] for m in names if i < len(runs[m])), "")
        lines.append(f"| {i + 1} ({concept}) | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def robustness_record(
    method: str,
    sequence: str,
    steps: int,
    after: dict,
    made_by: dict,
    probed_at: dict,
    stamps: dict,
    probe_spec: dict,
    families: str,
    found: list,
    **extra,
) -> dict:
    """The `robustness.json` of a probed model (`cul bench --probes`, `cul retrain --probes`):
    `after` its UA, RA and FD; `made_by` the recipe hash and commit that made it; `probed_at` the
    code that probed, `stamps` per concept where a concept was read back from the journal of an
    earlier process at another revision; `extra` (order seed, gated mode) goes after `steps`."""
    from cul.probes import summarise, to_records

    return {
        "method": method,
        "sequence": sequence,
        "steps": steps,
        **extra,
        "after": after,
        **{k: made_by.get(k) for k in ("recipe_hash", "git_commit", "git_dirty")},
        "probed_at": probed_at,
        **({"probed_at_by_concept": stamps} if any(v != probed_at for v in stamps.values()) else {}),
        "probe_spec": probe_spec,
        "families": families,
        "summary": summarise(found),
        "probes": to_records(found),
    }


def load_robustness(folder: str | Path) -> dict[str, dict]:
    """Every FOLDER/*/robustness.json (`cul bench --probes`), keyed by its run's name (`_label`)."""
    found: dict[str, dict] = {}
    for f in sorted(Path(folder).glob("*/robustness.json")):
        r = read_json(f)
        if not isinstance(r, dict):
            raise BenchmarkError(f"{f} is not a robustness record (`cul bench --probes` writes one object)")
        found[_label(r, r.get("method"), f.parent, found)] = r
    return found


def robustness_table(records: dict[str, dict]) -> str:
    """Markdown: for every probed run (`load_robustness`: label -> robustness.json), the worst and
    mean recovery of each probe family over the forgotten concepts, beside UA, RA and FD after the run."""
    from cul.probes import FAMILIES

    rows = []
    for label, r in records.items():
        last = r["after"]
        cells = []
        for fam in FAMILIES:
            s = r["summary"].get(fam)
            cells.append(f"{pct(s['worst'])} / {pct(s['mean'])}" if s else "-")
        rows.append(
            f"| {label} | {r['sequence']} | {r['steps']} | {pct(last.get('ua'))} | {pct(last.get('ra_in'))} "
            f"| {pct(last.get('ra_cross'))} | {pct(last.get('ra_neighbour'))} | {times(last.get('fd_ratio'))} | "
            + " | ".join(cells)
            + f" | {_made_by(r)} |"
        )
    columns = ["method", "sequence", "requests", "UA", "RA-I", "RA-C", "RA-N", "FD / base"]
    return _table([*columns, *(f"{fam}: worst / mean" for fam in FAMILIES), "recipe @ commit"], rows)


def _table(columns: list[str], rows: list[str]) -> str:
    """Markdown: a header of `columns` over `rows` (already written); "" without rows."""
    if not rows:
        return ""
    return "| " + " | ".join(columns) + " |\n|" + "---|" * len(columns) + "\n" + "\n".join(rows) + "\n"


def retraining_gaps(run: dict, retrained: dict, min_base_rate: float = 0.5) -> list[tuple[ProbeResult, float]]:
    """What an erasure leaves beyond retraining, probe by probe: over the probes both records ran
    (same probe, same concept: the same prompts and seeds) that the base model reads
    (`cul.probes.summarise`), each with max(0, the run's recovery - the retrained model's)."""
    from cul.probes import from_records

    gold = {r.name: r.recovery for r in from_records(retrained["probes"])}  # a name is probe:concept
    return [
        (r, max(0.0, r.recovery - gold[r.name]))
        for r in from_records(run["probes"])
        if r.base_rate >= min_base_rate and r.name in gold
    ]


def beyond_retraining(run: dict, retrained: dict, min_base_rate: float = 0.5) -> dict[str, dict]:
    """Per probe family, `retraining_gaps`' mean and worst."""
    from cul.probes import FAMILIES

    probes = retraining_gaps(run, retrained, min_base_rate)
    out: dict[str, dict] = {}
    for family in FAMILIES:
        gaps = [gap for r, gap in probes if r.family == family]
        if gaps:
            out[family] = {"mean": float(sum(gaps) / len(gaps)), "worst": max(gaps), "probes": len(gaps)}
    return out


def beyond_retraining_table(records: dict[str, dict]) -> str:
    """Markdown: for every probed run whose sequence has a retrained model probed beside it (`cul
    retrain --probes`, method "retrain"), `beyond_retraining` per family: worst / mean."""
    from cul.probes import FAMILIES

    gold = {r["sequence"]: r for r in records.values() if r.get("method") == "retrain"}
    rows = []
    for label, r in records.items():
        if r.get("method") == "retrain" or r["sequence"] not in gold:
            continue
        gaps = beyond_retraining(r, gold[r["sequence"]])
        cells = [f"{pct(gaps[f]['worst'])} / {pct(gaps[f]['mean'])}" if f in gaps else "-" for f in FAMILIES]
        rows.append(f"| {label} | {r['sequence']} | {r['steps']} | " + " | ".join(cells) + " |")
    return _table(["method", "sequence", "requests", *(f"{fam}: worst / mean" for fam in FAMILIES)], rows)
