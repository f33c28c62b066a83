"""Benchmark: what one request costs with a replay buffer (generated once) and with DFR's online
replay (fresh teacher samples every training step), on the first request of a sequence.

Both start from the same model with the same prompt set and recipe (a method or experiment file, only
`replay` differs). The buffer run is timed in full (generation + every training step). The online
run is timed over `--online-steps` training steps and extrapolated to the recipe's step count,
since a full online request generates thousands of teacher images (hours on two CPU cores); the
extrapolation is reported as such. Whether the two reach the same UA/RA is a separate question,
answered by `cul bench --method dfr_online` next to `cul bench --method dfr`.

Run: python scripts/bench_replay.py [--method dfr] [--online-steps 5]
     -> reports/benchmark/replay_cost.json
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from cul.benchmark import load_sequence
from cul.config import Params
from cul.io.provenance import provenance
from cul.models import load_model
from cul.unlearning.preparation import prepare_step
from cul.unlearning.recipes import load_recipe
from cul.unlearning.trainer import unlearn


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--method", default="dfr", help="a production method (dfr, ca, esd, naive) or experiments/NAME.yaml"
    )
    ap.add_argument("--sequence", default="benchmarks/default-sequence.yaml")
    ap.add_argument("--online-steps", type=int, default=5, help="training steps timed with online replay")
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--out", default="reports/benchmark/replay_cost.json")
    args = ap.parse_args()

    p = Params.load(args.params)
    name, recipe = load_recipe(args.method)
    base = load_model(p.paths.base_model)
    request = load_sequence(args.sequence)[0]
    prompts = prepare_step(base, request, [], recipe, seed=1)
    steps = recipe.steps

    buffer_cfg = recipe.model_copy(update={"replay": "buffer", "seed": 101})
    t0 = time.perf_counter()
    buffered = unlearn(base, prompts, buffer_cfg, base=base)
    buffer_wall = time.perf_counter() - t0

    online_cfg = recipe.model_copy(update={"replay": "online", "steps": args.online_steps, "seed": 101})
    t0 = time.perf_counter()
    online = unlearn(base, prompts, online_cfg, base=base)
    online_wall = time.perf_counter() - t0
    per_step = online.seconds_train / args.online_steps
    online_request = online.seconds_replay + per_step * steps
    images_per_step = online.replay_images / args.online_steps

    result = {
        "method": name,
        **provenance(name, recipe),
        "request": prompts.concept,
        "training_steps": steps,
        "buffer": {
            "replay_images": buffered.replay_images,
            "seconds_replay": round(buffered.seconds_replay, 1),
            "seconds_train": round(buffered.seconds_train, 1),
            "seconds_request": round(buffered.seconds, 1),
            "wall_seconds": round(buffer_wall, 1),
        },
        "online": {
            "timed_steps": args.online_steps,
            "seconds_per_step": round(per_step, 2),
            "replay_images_per_step": images_per_step,
            "replay_images_per_request": round(images_per_step * steps),
            "seconds_request_extrapolated": round(online_request, 1),
            "wall_seconds": round(online_wall, 1),
        },
        "cost_ratio_online_over_buffer": round(online_request / buffered.seconds, 2),
        "images_ratio_online_over_buffer": round(images_per_step * steps / buffered.replay_images, 1),
        "torch_threads": torch.get_num_threads(),
        "cpu": platform.machine(),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
