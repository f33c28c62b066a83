"""Which wording probes does the base model itself read? A probe whose prompts the base model draws
the concept from in fewer than `min_base_rate` (0.5) of its images tests nothing: the gate leaves it
out and the summaries do not average it (`cul.probes.summarise`). This draws every wording probe of
every concept but the composed one (it needs a second forgotten concept) with the base model, once,
and writes how often the judge sees the concept.

Run: python scripts/wording_reading.py [--concepts circle,red] [--images 8]
        [--out reports/base/wording_reading.json]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from cul.config import Params
from cul.io.provenance import code_revision
from cul.judge import Judge
from cul.models import load_model
from cul.probes import Prober, _scenes, wording_prompts
from cul.world import CATALOGUE, concept


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--concepts", default="", help="comma-separated (default: every concept of the world)")
    ap.add_argument("--images", type=int, default=8, help="images per probe and concept")
    ap.add_argument("--seed", type=int, default=5)
    ap.add_argument("--out", default="reports/base/wording_reading.json")
    args = ap.parse_args()
    p = Params.load()
    base = load_model(p.paths.base_model)
    prober = Prober(Judge.from_pretrained(p.paths.judge), p.eval.probes, base, p.world.size, p.eval.steps)
    names = [x for x in args.concepts.split(",") if x] or [c.name for c in CATALOGUE.concepts]
    n, floor = args.images, p.pipeline.gate.min_base_rate
    read: dict[str, dict[str, int]] = {}
    for name in names:
        probes = wording_prompts(name, [], _scenes(concept(name), n))
        prompts = [x for ps in probes.values() for x in ps]
        seen = prober.seen(base.sample(prompts, seed=args.seed, steps=p.eval.steps), name)
        read[name] = {k: int(seen[i * n : (i + 1) * n].sum()) for i, k in enumerate(probes)}
        print(name, " ".join(f"{k}={v}/{n}" for k, v in read[name].items()), flush=True)
    by_probe: dict[str, list[int]] = {}
    for figures in read.values():
        for k, v in figures.items():
            by_probe.setdefault(k.split(":")[0], []).append(int(v >= floor * n))
    commit, dirty = code_revision(".")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(
        json.dumps(
            {
                "images": n,
                "seed": args.seed,
                "min_base_rate": floor,
                "read_by_the_base_model": {k: f"{sum(v)} of {len(v)}" for k, v in by_probe.items()},
                "hits": read,
                "git_commit": commit,
                "git_dirty": dirty,
            },
            indent=1,
        )
        + "\n"
    )
    print(json.dumps({k: f"{sum(v)} of {len(v)}" for k, v in by_probe.items()}))
    print(f"-> {args.out}")


if __name__ == "__main__":
    main()
