"""Where does a step's FD come from? Split it, and find which retained scenes moved.

FD on judge features is a mean term plus a covariance term; and since generation uses fixed
seeds, each image of a benchmark step can be compared with the base model's image of the same
scene and noise. This script generates the benchmark's fixed FD set (200 images of scenes free of
every sequence concept) for the base model and each given step, and reports per model: FD, its
mean and covariance terms, the judge's accuracy on the set, and the mean squared pixel change
from the base model's paired image, overall and per object, colour and texture.

Run: python scripts/paired_change.py --weights reports/benchmark/dfr/steps/06/unet ...
     -> reports/benchmark/paired_change.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from cul.benchmark import load_sequence, sequence_concepts
from cul.config import Params
from cul.evaluation import fd_scenes, frechet_distance, frechet_terms, generate_scenes
from cul.judge import Judge, labels, to_tensor
from cul.models import load_model
from cul.world import World


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--weights", type=Path, nargs="+", help="unet folders of benchmark steps")
    ap.add_argument("--sequence", default="benchmarks/default-sequence.yaml")
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--out", type=Path, default=Path("reports/benchmark/paired_change.json"))
    args = ap.parse_args()

    p = Params.load(args.params)
    scenes = fd_scenes(sequence_concepts(load_sequence(args.sequence)), 200)
    judge = Judge.from_pretrained(p.paths.judge)
    real = judge.embed(to_tensor(World(size=p.world.size, seed=p.world.eval_seed + 1).render_all(scenes)))
    truth = labels(scenes).numpy()
    base = load_model(p.paths.base_model)
    seed = p.eval.seed + 1  # the benchmark's FD seed
    result: dict = {"images": len(scenes), "seed": seed, "models": {}}
    base_images = None
    for name in ["base", *map(str, args.weights)]:
        model = base if name == "base" else base.with_unet(name)
        images = generate_scenes(model, scenes, seed, p.eval.batch_size)
        features = judge.embed(images)
        predictions = judge.predict(images)
        row = {
            "fd": frechet_distance(features, real),
            **frechet_terms(features, real),
            "judge_accuracy": {k: float((v == truth[:, i]).mean()) for i, (k, v) in enumerate(predictions.items())},
            "pixel_std": float(images.std()),
        }
        if base_images is None:
            base_images = images
        else:
            change = ((images - base_images) ** 2).flatten(1).mean(1).numpy()
            row["pixel_change"] = float(change.mean())
            for attr in ("object", "colour", "texture"):
                groups: dict[str, list[float]] = {}
                for scene, c in zip(scenes, change):
                    groups.setdefault(getattr(scene, attr), []).append(float(c))
                row[f"pixel_change_by_{attr}"] = dict(
                    sorted(((k, round(float(np.mean(v)), 5)) for k, v in groups.items()), key=lambda kv: -kv[1])
                )
        result["models"][name] = row
        print(name, json.dumps({k: v for k, v in row.items() if not k.startswith("pixel_change_by")}), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"-> {args.out}")


if __name__ == "__main__":
    main()
