"""Tuning sweep: single DFR requests under a few recipe variants, from the base model.

Each (variant, concept) run: prepare prompts, one unlearning step, evaluation on every
`--stride`-th scene. Results are appended to OUT (resumable: finished runs are skipped).
Run: python scripts/sweep_dfr.py [--concepts circle,red,striped] [--out reports/tuning/dfr_sweep.json]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from cul.config import Params
from cul.evaluation import Evaluator
from cul.judge import Judge
from cul.models import load_model
from cul.unlearning.preparation import prepare_step
from cul.unlearning.recipes import load_recipe
from cul.unlearning.request import Request
from cul.unlearning.trainer import unlearn

# name -> (overrides of the recipe's losses, overrides of its surrogate choice), on experiments/dfr_paper.yaml
VARIANTS: dict[str, tuple[dict, dict]] = {
    "dfr-recipe": ({}, {}),
    "l_unl10": ({"l_unl": 10.0}, {}),
    # the world's cosine schedule decides shapes above t = 600 (DFR's T_max was for SD's schedule)
    "tmax1000-l_unl10": ({"l_unl": 10.0, "t_max": 1000}, {}),
    "tmax1000-l_unl10-push1": ({"l_unl": 10.0, "t_max": 1000, "push": 1.0}, {}),
    "tmax1000-l_unl10-push1-nonneighbour": (
        {"l_unl": 10.0, "t_max": 1000, "push": 1.0},
        {"surrogate_neighbours": False},
    ),
    # image-quality (FD) follow-ups of the previous row
    "tmax1000-l_unl10-push1-nonneighbour-lpres30": (
        {"l_unl": 10.0, "t_max": 1000, "push": 1.0, "l_pres": 30.0},
        {"surrogate_neighbours": False},
    ),
    "tmax1000-l_unl10-push0.5-nonneighbour": (
        {"l_unl": 10.0, "t_max": 1000, "push": 0.5},
        {"surrogate_neighbours": False},
    ),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--concepts", default="circle,red,striped")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--stride", type=int, default=4)
    ap.add_argument("--out", default="reports/tuning/dfr_sweep.json")
    args = ap.parse_args()

    p = Params.load()
    base = load_model(p.paths.base_model)
    evaluator = Evaluator(Judge.from_pretrained(p.paths.judge), p.eval.model_copy(update={"stride": args.stride}))
    base_metrics = evaluator.set_base(base)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    done = json.loads(out.read_text()) if out.exists() else []
    keys = {(r["variant"], r["concept"]) for r in done}
    for concept in args.concepts.split(","):
        for variant in args.variants.split(","):
            if (variant, concept) in keys:
                continue
            cfg_over, spec_over = VARIANTS[variant]
            _, paper = load_recipe("experiments/dfr_paper.yaml")  # variants are changes to DFR's own recipe
            recipe = paper.model_copy(update={**cfg_over, **spec_over})
            t0 = time.perf_counter()
            ps = prepare_step(base, Request(concept=concept), [], recipe, seed=1)
            result = unlearn(base, ps, recipe, base=base)
            m = evaluator(result.student, [concept])
            row = {
                "variant": variant,
                "concept": concept,
                "surrogates": ps.surrogates,
                **m.model_dump(include={"ua", "ra_in", "ra_cross", "ra_neighbour", "ra_all", "fd_ratio"}),
                "base_ra_all": base_metrics.ra_all,
                "seconds_replay": round(result.seconds_replay, 1),
                "seconds_train": round(result.seconds_train, 1),
                "seconds_total": round(time.perf_counter() - t0, 1),
                "per_concept": m.per_concept,
            }
            done.append(row)
            out.write_text(json.dumps(done, indent=1) + "\n")
            print(
                f"{variant:40s} {concept:9s} UA {100 * row['ua']:5.1f} RA-I {100 * row['ra_in']:5.1f} "
                f"RA-C {100 * row['ra_cross']:5.1f} RA-N {100 * (row['ra_neighbour'] or 0):5.1f} "
                f"FDx {row['fd_ratio']:.2f} ({row['seconds_replay']:.0f}+{row['seconds_train']:.0f} s)",
                flush=True,
            )


if __name__ == "__main__":
    main()
