"""Benchmark: does a request step cost more when more concepts were forgotten before it?

For each chosen request k of a finished `cul bench` run, start from that run's saved weights
after request k-1 (the base model for k=1) and time the step exactly as `cul bench` runs it:
prepare the prompt set (surrogate choice, including the surrogates theta_{k-1} now draws for
every earlier concept under `forgotten_target: mapped`), generate the replay buffer, train.
Evaluation is not timed. All requests run in one process, one after the other, on the same
threads, so the timings compare with each other (the `seconds` in a benchmark's results.json
were taken beside other runs and do not).

Run: python scripts/bench_step_cost.py --run reports/benchmark/dfr --requests 1,5,10
     -> reports/benchmark/step_cost.json
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from cul.benchmark import load_sequence, step_unet
from cul.config import Params
from cul.io.provenance import provenance
from cul.models import load_model
from cul.unlearning.preparation import prepare_step
from cul.unlearning.recipes import load_recipe
from cul.unlearning.trainer import unlearn


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", default="reports/benchmark/dfr", help="a cul bench output folder with steps/ on disk")
    ap.add_argument(
        "--method", default="dfr", help="a production method (dfr, ca, esd, naive) or experiments/NAME.yaml"
    )
    ap.add_argument("--requests", default="1,5,10", help="1-based request numbers to time")
    ap.add_argument("--sequence", default="benchmarks/default-sequence.yaml")
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--out", default="reports/benchmark/step_cost.json")
    args = ap.parse_args()

    p = Params.load(args.params)
    name, recipe = load_recipe(args.method)
    if recipe.mode != "sequential" or recipe.addons.ties is not None:
        raise SystemExit(f"{args.method} does not chain its steps; this script times sequential steps")
    base = load_model(p.paths.base_model)
    requests = load_sequence(args.sequence)
    ks = [int(k) for k in args.requests.split(",")]
    for k in ks:
        if not 1 <= k <= len(requests):
            raise SystemExit(f"request {k} is outside the sequence (1-{len(requests)})")
        if k > 1 and not step_unet(args.run, k - 1).exists():
            raise SystemExit(f"{step_unet(args.run, k - 1)} is missing: run `cul bench` to request {k - 1} first")

    rows = []
    for k in ks:
        start = base if k == 1 else base.with_unet(step_unet(args.run, k - 1))
        forgotten = [r.concept for r in requests[: k - 1]]
        t0 = time.perf_counter()
        prompts = prepare_step(start, requests[k - 1], forgotten, recipe, seed=k)
        prepare = time.perf_counter() - t0
        result = unlearn(start, prompts, recipe.for_request(k), base=base)
        total = time.perf_counter() - t0
        row = {
            "request": k,
            "concept": prompts.concept,
            "forgotten_before": len(forgotten),
            "seconds_prepare": round(prepare, 1),
            "seconds_replay": round(result.seconds_replay, 1),
            "seconds_train": round(result.seconds_train, 1),
            "seconds": round(total, 1),
            "replay_images": result.replay_images,
        }
        rows.append(row)
        print(json.dumps(row))

    out = {
        "method": name,
        **provenance(name, recipe),
        "run": args.run,
        "threads": torch.get_num_threads(),
        "machine": platform.processor() or platform.machine(),
        "steps": recipe.steps,
        "requests": rows,
        "growth": round(rows[-1]["seconds"] / rows[0]["seconds"], 3) if len(rows) > 1 else None,
    }
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
