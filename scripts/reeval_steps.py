"""Benchmark: re-judge saved benchmark steps on more scenes and more generation seeds.

`cul bench` evaluates at stride 4 (128 scenes: one image is 6 points of one concept) with one
seed, which cannot separate methods a fraction of a point apart. This loads a step's weights
(`DIR/steps/NN/unet`) into the base model and evaluates it with the benchmark's own Evaluator
(same fixed FD scene set) at the stride and for each seed given; the base model is judged at the
same settings, so each FD ratio has its own reference.

Run: python scripts/reeval_steps.py \
        --runs reports/benchmark/dfr_chain+gradient_projection reports/benchmark/ca+gradient_projection \
        --stride 1 --seeds 1234 --out reports/benchmark/reeval_stride1.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from cul.benchmark import load_sequence, sequence_concepts, step_unet
from cul.config import Params
from cul.evaluation import Evaluator
from cul.judge import Judge
from cul.models import load_model

KEYS = ("ua", "ra_in", "ra_cross", "ra_neighbour")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", nargs="+", required=True, help="benchmark folders with results.json and steps/")
    ap.add_argument("--step", type=int, default=None, help="which step (default: each run's last)")
    ap.add_argument("--stride", type=int, default=1)
    ap.add_argument("--seeds", default="1234", help="comma-separated evaluation seeds")
    ap.add_argument("--sequence", default="benchmarks/default-sequence.yaml")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()

    p = Params.load("params.yaml")
    base = load_model(p.paths.base_model)
    judge = Judge.from_pretrained(p.paths.judge)
    fd_exclude = sequence_concepts(load_sequence(args.sequence))
    seeds = [int(s) for s in args.seeds.split(",")]
    out = {"stride": args.stride, "seeds": seeds, "threads": torch.get_num_threads(), "runs": {}}
    evaluators = {}
    for seed in seeds:  # the base model's verdict once per seed
        spec = p.eval.model_copy(update={"stride": args.stride, "seed": seed})
        ev = Evaluator(judge, spec, p.world.size, p.world.eval_seed, fd_exclude=fd_exclude)
        ev.set_base(base)
        evaluators[seed] = ev
    for run in map(Path, args.runs):
        results = json.loads((run / "results.json").read_text())
        if results and results[-1].get("mode") == "gated":
            raise SystemExit(f"{run} is a gated run (cul bench --gated): its champions are not steps/NN/unet")
        k = args.step or len(results)
        unet_dir = step_unet(run, k)
        if not unet_dir.is_dir():
            raise SystemExit(f"{unet_dir} is missing: step weights are not committed; rerun `cul bench` for {run.name}")
        model = base.with_unet(unet_dir)
        forgotten = [r["concept"] for r in results[:k]]
        per_seed = []
        for seed, ev in evaluators.items():
            t0 = time.perf_counter()
            m = ev(model, forgotten).model_dump()
            per_seed.append(
                {
                    "seed": seed,
                    **{x: m[x] for x in KEYS},
                    "fd": m["fd"],
                    "fd_base": m["base"]["fd"],
                    "fd_ratio": m["fd_ratio"],
                    "seconds": round(time.perf_counter() - t0, 1),
                }
            )
            print(
                f"{run.name} step {k} seed {seed}: "
                + " ".join(f"{x} {100 * m[x]:.1f}" for x in KEYS)
                + f" FDx {m['fd_ratio']:.2f}",
                flush=True,
            )
        mean = {x: float(np.mean([s[x] for s in per_seed])) for x in KEYS}
        mean["mean_ua_ra"] = (mean["ua"] + mean["ra_in"] + mean["ra_cross"]) / 3
        # ratio of means: one FD draw moves by up to 1.39x with the seed alone (fd_noise.json)
        mean["fd_ratio_of_means"] = float(
            np.mean([s["fd"] for s in per_seed]) / np.mean([s["fd_base"] for s in per_seed])
        )
        out["runs"][run.name] = {
            "step": k,
            "concept": results[k - 1]["concept"],
            "mean": mean,
            "per_seed": per_seed,
            "bench": {x: results[k - 1][x] for x in KEYS} | {"fd_ratio": results[k - 1]["fd_ratio"]},
        }
        Path(args.out).write_text(json.dumps(out, indent=1) + "\n")  # after each run: nothing lost on a crash
    print(f"-> {args.out}")


if __name__ == "__main__":
    main()
