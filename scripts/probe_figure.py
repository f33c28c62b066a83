"""Redraw a benchmark run's probes.png from its robustness.json and probe journal.

    python scripts/probe_figure.py reports/benchmark/heldout/dfr

`cul bench --probes` draws the figure when it probes; this redraws it (say, after the layout
changed) from the samples the journal kept (`probes-journal.safetensors`, not committed), without
loading a model.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from safetensors.torch import load_file

from cul.plots import probe_grid
from cul.probes import from_records


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path, help="a benchmark output folder with robustness.json")
    run = ap.parse_args().run
    journal = run / "probes-journal.safetensors"
    if not (run / "robustness.json").exists() or not journal.exists():
        raise SystemExit(f"{run} has no robustness.json or no {journal.name}: run `cul bench --probes` there")
    record = json.loads((run / "robustness.json").read_text())
    found = from_records(record["probes"])
    # the journal must hold these very results (a later, interrupted probing would hold another model's)
    kept = json.loads(journal.with_suffix(".json").read_text()).get("done", {})
    journalled = {r.name: r.hits for c in kept.values() for r in from_records(c["records"])}
    if any(journalled.get(r.name) != r.hits for r in found):
        raise SystemExit(f"{journal} holds other results than {run / 'robustness.json'}: rerun `cul bench --probes`")
    samples = load_file(journal)
    order = f" (order {record['order_seed']})" if record.get("order_seed") is not None else ""
    title = f"{record['method']}{order} after {record['steps']} requests of {record['sequence']}: probes (recovery)"
    path = probe_grid({r.name: samples[r.name] for r in found if r.name in samples}, {r.name: r.figure for r in found},
                      run / "probes.png", title)  # fmt: skip
    print(path)


if __name__ == "__main__":
    main()
