"""Benchmark: how much room gradient projection leaves to erase with, on the first request.

For each text-reading linear map, the rank of the protected inputs (neighbours, retained and
earlier forgotten prompts, as the trainer builds them) and the share of the forget prompts' input
norm left after the projection, for the full span and for `projection_max_rank` values.

Run: python scripts/projection_span.py [--method ca+gradient_projection] -> reports/benchmark/projection_span.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from cul.benchmark import load_sequence
from cul.config import Params
from cul.models import load_model
from cul.unlearning.preparation import prepare_step
from cul.unlearning.recipes import load_recipe
from cul.unlearning.regularizers import GradientProjector, text_layer_inputs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--method", default="experiments/ca+gradient_projection.yaml")
    ap.add_argument("--sequence", default="benchmarks/default-sequence.yaml")
    ap.add_argument("--ranks", default="full,128,64,32,16")
    ap.add_argument("--out", default="reports/benchmark/projection_span.json")
    args = ap.parse_args()

    p = Params.load("params.yaml")
    _, recipe = load_recipe(args.method)
    base = load_model(p.paths.base_model)
    ps = prepare_step(base, load_sequence(args.sequence)[0], [], recipe, seed=1)
    protected = ps.retain.get("neighbour", []) + ps.retain.get("retained", []) + ps.retain.get("forgotten", [])
    _, forget_inputs = text_layer_inputs(base, ps.forget[:64])
    result = {"method": args.method, "request": ps.concept, "protected_prompts": len(protected), "layers": {}}
    for r in args.ranks.split(","):
        gp = GradientProjector.from_prompts(base, protected, max_rank=None if r == "full" else int(r))
        for name, P in gp.P.items():
            x = forget_inputs[name]
            entry = result["layers"].setdefault(name, {"dim": P.shape[0]})
            entry[r] = {
                "protected_rank": int(torch.linalg.matrix_rank(torch.eye(P.shape[0]) - P)),
                "forget_norm_left": round(float((x @ P).norm() / x.norm()), 3),
            }
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
