"""Do the attacks of `cul.probes` work at their budget? Run them against a model that can still draw
the concept (the base model by default): the soft prompt starts from a generic word ("shape") and
the adversarial search from random tokens, so drawing the concept here shows the optimisation finds
it. A recovery of 0% on an erased model then means the erasure held, not that the attack is idle.

Run: python scripts/probe_strength.py [--model models/base] [--concepts circle,red]
        [--out reports/benchmark/robustness/probe_strength.json]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from cul.config import Params
from cul.io.provenance import code_revision
from cul.judge import Judge
from cul.models import load_model
from cul.probes import Prober, to_records


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="models/base")
    ap.add_argument("--concepts", default="circle")
    ap.add_argument("--out", default="reports/benchmark/robustness/probe_strength.json")
    args = ap.parse_args()
    p = Params.load()
    base = load_model(p.paths.base_model)
    model = base if Path(args.model) == p.paths.base_model else load_model(args.model)
    prober = Prober(Judge.from_pretrained(p.paths.judge), p.eval.probes, base, p.world.size, p.eval.steps)
    found = []
    for name in args.concepts.split(","):
        for attack in ("soft_prompt", "adversarial"):
            r = prober.attack(model, attack, name, [name])
            print(f"{name} {attack}: {r.hits}/{r.images} (base model on plain captions {r.base_hits}/{r.base_images})")
            print(f"  prompt: {r.prompt}")
            found.append(r)
    commit, dirty = code_revision(".")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    record = {"model": args.model, "git_commit": commit, "git_dirty": dirty, "probe_spec": p.eval.probes.model_dump()}
    out.write_text(json.dumps({**record, "probes": to_records(found)}, indent=1) + "\n")
    print(f"-> {out}")


if __name__ == "__main__":
    main()
