"""The benchmark: a sequence of deletion requests with one recipe, evaluated after every step (or every Nth).

Three ways to reach theta_k:
- sequential: theta_{k-1} -> theta_k with the recipe's eraser (the continual setting);
- simultaneous (`mode: simultaneous`): every concept so far at once from theta_0 (the reference);
- TIES (`addons.ties`): each concept erased from theta_0 on its own, then TIES-merged.

Resumable per step: each finished step's weights, prompts and metrics are on disk, and a rerun
continues after the last one, but only with the recipe that made them (a name is never reused for
another recipe). Every entry of `results.json` records the recipe, its hash and the git commit.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import yaml
from diffusers import UNet2DConditionModel

from cul import threads
from cul.evaluation import Evaluator, weight_drift
from cul.files import write_atomic
from cul.fmt import pct, times
from cul.io.provenance import provenance
from cul.results import BenchmarkError, inherited, read_results
from cul.unlearning.merging import ties_merge
from cul.unlearning.preparation import merge_prompt_sets, prepare_catalogue_step, prepare_step
from cul.unlearning.prompts import PromptSet, build_prompt_set
from cul.unlearning.recipes import Recipe, recipe_hash
from cul.unlearning.regularizers import trainable_names
from cul.unlearning.request import Request, resolve_request
from cul.unlearning.trainer import unlearn
from cul.world import CONCEPTS, concept


def load_sequence(path: str | Path) -> list[Request]:
    """A YAML list of requests: [{concept: circle, kind: object}, ...] (or under `requests:`)."""
    path = Path(path)
    if not path.is_file():
        raise BenchmarkError(f"{path}: no such sequence file")
    data = yaml.safe_load(path.read_text())
    items = data.get("requests", data) if isinstance(data, dict) else data
    if not isinstance(items, list) or not items:
        raise BenchmarkError(f"{path}: expected a non-empty list of requests")
    return [Request(**(i if isinstance(i, dict) else {"concept": str(i)})) for i in items]


def sequence_concepts(requests: Sequence[Request]) -> list[str]:
    """The concept names of a sequence, as a fresh model resolves them (the benchmark's FD set
    avoids all of them)."""
    return [resolve_request(r, []).concept for r in requests]


def step_unet(out: str | Path, k: int) -> Path:
    """Where `run_sequence` saves the UNet after request k (1-based)."""
    return Path(out) / "steps" / f"{k:02d}" / "unet"


def _valid(surrogates: list[str], name: str, gone: list[str]) -> list[str]:
    """Surrogates that are not themselves being forgotten (else any retained concept of the kind)."""
    keep = [x for x in surrogates if x not in gone]
    return keep or [c.name for c in CONCEPTS[concept(name).kind] if c.name not in gone][:1]


def _load_results(
    out: Path,
    recipe: Recipe,
    name: str,
    log: Callable,
    order_seed: int | None = None,
    mode: str = "plain",
    weights: Callable[[list[dict]], Path] | None = None,
    requests: list[Request] | None = None,
    evaluation: dict | None = None,
) -> list[dict]:
    """OUT/results.json's entries to resume after (none if their weights are gone); refused if another
    recipe, request order or `mode` ("plain" or "gated") made them, if their requests are not the
    first of `requests`, or if they were judged under other `evaluation` settings (the evaluator's
    `settings()`; entries that record none are not checked). `weights`: where the last entry's
    weights are (default: `step_unet`)."""
    results_file = out / "results.json"
    results = read_results(results_file)
    if requests is not None and results:
        done = [r["request"] for r in results]
        asked = [q.model_dump(mode="json") for q in requests[: len(results)]]
        if done != asked:
            k = next((i for i, (a, b) in enumerate(zip(done, asked)) if a != b), min(len(done), len(asked)))
            was = done[k]["concept"] if k < len(done) else "nothing"
            now = asked[k]["concept"] if k < len(asked) else "nothing"
            raise BenchmarkError(
                f"{results_file} holds another sequence (request {k + 1} was {was}, this run's is {now}): "
                "give this sequence its own --out folder"
            )
    recorded = {json.dumps(r["evaluation"], sort_keys=True) for r in results if "evaluation" in r}
    if evaluation is not None and recorded and recorded != {json.dumps(evaluation, sort_keys=True)}:
        raise BenchmarkError(
            f"{results_file} was judged under other evaluation settings ({', '.join(sorted(recorded))}; this run: "
            f"{json.dumps(evaluation, sort_keys=True)}), e.g. another --stride: give this run its own --out folder"
        )
    made_by = {r.get("recipe_hash") for r in results if not inherited(r)}
    if made_by and made_by != {recipe_hash(recipe)}:
        raise BenchmarkError(
            f"{results_file} was made by another recipe (hash {', '.join(sorted(map(str, made_by)))}, this one "
            f"{recipe_hash(recipe)}): give this recipe its own name or --out folder"
        )
    seeds = {r.get("order_seed") for r in results}
    if results and seeds != {order_seed}:
        raise BenchmarkError(
            f"{results_file} holds requests in another order (--order-seed {', '.join(map(str, seeds))}, this run "
            f"{order_seed}): give this order its own --out folder"
        )
    modes = {r.get("mode", "plain") for r in results}
    if results and modes != {mode}:
        raise BenchmarkError(
            f"{results_file} was made by a {'/'.join(sorted(modes))} run, this one is {mode}: "
            "give it its own --out folder"
        )
    if results and not (weights(results) if weights else step_unet(out, len(results))).exists():
        if any(inherited(r) for r in results):
            raise BenchmarkError(
                f"{results_file} branches from {results[0]['inherited_from']} (relative to {out}), whose weights are "
                "not on disk: run that run again first, or move this folder away"
            )
        log(
            f"[{name}] {results_file} has {len(results)} step(s) but their weights are not on disk "
            f"({out / 'steps'} is not committed): starting again from the first request"
        )
        results = []
    return results


def branch_results(source: Path, after: int, out: Path) -> bool:
    """Start OUT as a branch of the gated run in `source`: OUT/results.json begins with the first
    `after` entries of source's, each marked `inherited_from` (source, relative to OUT) and naming its
    champion where source keeps it, so the run continues from source's champion after request `after`
    under another recipe. Refused if source has no such request or its champion's weights are gone;
    a branch already started from the same source after the same request is left as it is.
    Returns whether it wrote OUT/results.json."""
    mine = out / "results.json"
    if mine.exists():
        sources = [r["inherited_from"] for r in read_results(mine) if inherited(r)]
        if len(sources) != after or any((out / h).resolve() != source.resolve() for h in sources):
            raise BenchmarkError(f"{mine} exists and is not a branch of {source} after request {after}")
        return False
    try:
        theirs = json.loads((source / "results.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise BenchmarkError(f"{source}/results.json cannot be read ({e})") from e
    if len(theirs) < after:
        raise BenchmarkError(f"{source} has {len(theirs)} requests, not the {after} to branch after")
    if any(r.get("mode") != "gated" for r in theirs[:after]):
        raise BenchmarkError(f"{source} is not a gated run: only a gated run's champions can be branched from")
    last = theirs[after - 1]["champion"]
    if last != "base" and not (source / last).exists():
        raise BenchmarkError(f"{source}'s champion after request {after} is not on disk ({source / last})")
    here = os.path.relpath(source, out)
    entries = [
        {
            **r,
            "champion": r["champion"] if r["champion"] == "base" else os.path.join(here, r["champion"]),
            "inherited_from": here,
        }
        for r in theirs[:after]
    ]
    out.mkdir(parents=True, exist_ok=True)
    write_results(out, entries)
    return True


def write_results(out: Path, results: list[dict]) -> None:
    """OUT/results.json, replaced at once (a kill while writing leaves the previous file whole)."""
    write_atomic(out / "results.json", json.dumps(results, indent=1) + "\n")


def _remaining(requests: list[Request], done: int, max_steps: int | None) -> list[Request]:
    """The requests after the `done` first, up to request `max_steps` of the sequence (None: all)."""
    todo = requests[done:]
    return todo if max_steps is None else todo[: max(0, max_steps - done)]


def run_sequence(
    base_model,
    evaluator: Evaluator,
    requests: list[Request],
    recipe: Recipe,
    out: str | Path,
    name: str = "",
    max_steps: int | None = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
    catalogue=None,
    order_seed: int | None = None,
    code: tuple[str, bool] | None = None,
    eval_every: int | None = None,
) -> list[dict]:
    """Process `requests` in order; write OUT/results.json after every step; resume if present.
    `eval_every` N evaluates only after every Nth request and the last one this call runs (the
    others record no UA, RA or FD and `"evaluated": false`): on a long sequence, the evaluation
    costs about as much as the training.
    `catalogue` (a `Catalogue` other than the world's) builds each step's prompts from it;
    `order_seed`, the seed that shuffled the sequence's order (recorded with every step); `code`,
    the (commit, dirty) the process started from (`code_revision`), recorded with every step
    (default: taken when this function starts, after any setup that came before it)."""
    on_world = catalogue is None or catalogue.name == "world"
    if not on_world and recipe.mode == "simultaneous":
        raise BenchmarkError("simultaneous erasure is built on the world's scenes only")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    results = _load_results(out, recipe, name, log, order_seed, requests=requests, evaluation=evaluator.settings())
    made_by = provenance(name, recipe, code=code)
    base_state = {n: p.detach().clone() for n, p in base_model.unet.named_parameters()}
    if not evaluator.has_base:
        evaluator.set_base(base_model)
    model = base_model
    forgotten: list[str] = [r["concept"] for r in results]
    if results:
        model = base_model.with_unet(step_unet(out, len(results)))
        log(f"[{name}] resuming after step {len(results)} ({', '.join(forgotten)})")
    sets = [PromptSet.load(out / "steps" / f"{i + 1:02d}" / "prompts.json") for i in range(len(results))]
    ties = recipe.addons.ties
    ties_states = (
        [
            UNet2DConditionModel.from_pretrained(
                out / "steps" / f"{i + 1:02d}" / "single", use_safetensors=True
            ).state_dict()
            for i in range(len(results))
        ]
        if ties
        else []
    )
    chained = recipe.mode == "sequential" and ties is None
    todo = _remaining(requests, len(results), max_steps)
    last = len(results) + len(todo)
    for request in todo:
        k = len(results) + 1
        step_dir = out / "steps" / f"{k:02d}"
        threads.reset_used()
        t0 = time.perf_counter()
        start = model if chained else base_model
        gone = forgotten if chained else []
        if on_world:
            ps = prepare_step(start, request, gone, recipe, seed=k)
        else:
            ps = prepare_catalogue_step(start, catalogue, request, gone, recipe, seed=k)
        train_set, step_recipe = ps, recipe
        if recipe.mode == "simultaneous":
            # context prompts must avoid every concept of the batch: rebuild each set knowing all of them
            names = forgotten + [ps.concept]
            sets_now = [
                build_prompt_set(
                    c,
                    [x for x in names if x != c],
                    _valid(s.surrogates, c, names),
                    text_encoder=base_model.text,
                    seed=i + 1,
                )
                for i, (c, s) in enumerate(zip(names, sets + [ps]))
            ]
            train_set, step_recipe = merge_prompt_sets(sets_now), recipe.with_steps(recipe.steps * len(names))
        result = unlearn(start, train_set, step_recipe.for_request(k), progress=progress, base=base_model)
        student = result.student
        if ties is not None:
            step_dir.mkdir(parents=True, exist_ok=True)
            student.unet.save_pretrained(step_dir / "single", safe_serialization=True)
            ties_states.append(student.unet.state_dict())
            keys = trainable_names(base_model.unet, recipe.trainable)
            merged = ties_merge(base_model.unet.state_dict(), ties_states, keys, ties.k, ties.lam)
            student = base_model.copy()
            student.unet.load_state_dict(merged)
            student.unet.eval()
        seconds_step = time.perf_counter() - t0
        forgotten = forgotten + [ps.concept]
        sets.append(ps)
        evaluate = eval_every is None or k % eval_every == 0 or k == last
        m = evaluator(student, forgotten) if evaluate else None
        scores = (
            m.model_dump(include={"ua", "ra_in", "ra_cross", "ra_neighbour", "ra_all", "fd", "fd_ratio", "fd_clean"})
            if m
            else dict.fromkeys(("ua", "ra_in", "ra_cross", "ra_neighbour", "ra_all", "fd", "fd_ratio", "fd_clean"))
        )
        entry = {
            "step": k,
            "method": name,
            "request": request.model_dump(),
            "concept": ps.concept,
            "evaluated": evaluate,
            **scores,
            "drift": weight_drift(student, base_state),
            "seconds": round(seconds_step, 1),
            "seconds_replay": round(result.seconds_replay, 1),
            "seconds_train": round(result.seconds_train, 1),
            "replay_images": result.replay_images,
            "threads": threads.threads_used(),  # timings are only comparable at equal threads
            "surrogates": ps.surrogates,
            "base": m.base.model_dump() if m and m.base else None,
            "per_concept": m.per_concept if m else None,
            "history": result.history,
            **({"relearning_attacks": result.relearning_attacks} if result.relearning_attacks else {}),
            **({"order_seed": order_seed} if order_seed is not None else {}),
            "evaluation": evaluator.settings(),
            **made_by,
        }
        step_dir.mkdir(parents=True, exist_ok=True)
        ps.save(step_dir / "prompts.json")
        student.unet.save_pretrained(step_unet(out, k), safe_serialization=True)
        results.append(entry)
        write_results(out, results)
        log(
            f"[{name}] step {k} forget {ps.concept}: "
            + (
                f"UA {pct(m.ua)} RA-I {pct(m.ra_in)} RA-C {pct(m.ra_cross)} RA-N {pct(m.ra_neighbour)} "
                f"FDx {times(m.fd_ratio)}"
                if m
                else f"not evaluated (--eval-every {eval_every})"
            )
            + f" ({entry['seconds']:.0f} s)"
        )
        model = student
    return results
