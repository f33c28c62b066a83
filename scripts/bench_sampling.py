"""Benchmark: time to sample 64 images with the base model's default settings on this machine.

Target (issue 2): under 30 s on two CPU cores. Writes reports/base/sampling_benchmark.json.
Run: python scripts/bench_sampling.py [--model models/base] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from cul.models import load_model
from cul.world import all_scenes, caption


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="models/base")
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default="reports/base/sampling_benchmark.json")
    args = ap.parse_args()

    model = load_model(args.model)
    scenes = all_scenes()[:: max(1, 512 // args.n)][: args.n]
    prompts = [caption(s.object, s.colour, s.texture) for s in scenes]
    model.sample(prompts[:2], seed=0, steps=2)  # warm-up: first-call overheads, text cache
    times = []
    for r in range(args.repeats):
        model.text._cache.clear()  # encoding the prompts is part of the cost
        t0 = time.perf_counter()
        model.sample(prompts, seed=r)
        times.append(time.perf_counter() - t0)
    result = {
        "n_images": args.n,
        "sampling": model.sampling.model_dump(),
        "seconds": [round(t, 2) for t in times],
        "best_seconds": round(min(times), 2),
        "median_seconds": round(sorted(times)[len(times) // 2], 2),
        "target_seconds": 30,
        "torch_threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
