"""Before/after grid of retained scenes: the base model against a benchmark step, same prompts and
seeds. FD says *that* retained images changed; this shows *how* (a hue shift, a darker
background, a new artefact).

Run: python scripts/retained_samples.py --run reports/benchmark/dfr_chain --step 2
     -> reports/benchmark/dfr_chain/retained_step02.png
"""

from __future__ import annotations

import argparse
from pathlib import Path

from cul.benchmark import load_sequence, sequence_concepts, step_unet
from cul.evaluation import fd_scenes
from cul.models import load_model
from cul.plots import before_after
from cul.world import caption


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", type=Path, required=True, help="a cul bench output folder with steps/ on disk")
    ap.add_argument("--step", type=int, required=True)
    ap.add_argument("--sequence", default="benchmarks/default-sequence.yaml")
    ap.add_argument("--base", default="models/base")
    ap.add_argument("--n", type=int, default=12, help="scenes shown (from the benchmark's fixed FD set)")
    ap.add_argument("--seed", type=int, default=5)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()

    weights = step_unet(args.run, args.step)
    if not weights.exists():
        raise SystemExit(f"{weights} is not on disk (steps/ is not committed): rerun `cul bench` first")
    base = load_model(args.base)
    model = base.with_unet(weights)
    concepts = sequence_concepts(load_sequence(args.sequence))
    pool = fd_scenes(concepts, 100)
    scenes = pool[:: max(1, len(pool) // args.n)][: args.n]
    prompts = [caption(s.object, s.colour, s.texture) for s in scenes]
    out = args.out or args.run / f"retained_step{args.step:02d}.png"
    before_after(
        base.sample(prompts, seed=args.seed),
        model.sample(prompts, seed=args.seed),
        prompts,
        out,
        f"retained scenes: base vs {args.run.name} after request {args.step}",
    )
    print(f"-> {out}")


if __name__ == "__main__":
    main()
