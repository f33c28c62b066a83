"""Which concepts make up what each erasure leaves beyond retraining, per attack.

    python scripts/beyond_retraining_shares.py [--runs reports/benchmark/heldout] [--families soft_prompt,adversarial]

For every probed run under RUNS beside the retrained model of its sequence (`cul retrain --probes`),
the per-concept gaps of `cul.reports.retraining_gaps` (images of 16 above the retrained model's) and
each concept's share of their sum; `cul report`'s "Beyond retraining" table holds their mean and worst.
"""

from __future__ import annotations

import argparse
from collections import defaultdict

from cul.reports import load_robustness, retraining_gaps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", default="reports/benchmark/heldout")
    ap.add_argument("--families", default="soft_prompt,adversarial")
    args = ap.parse_args()
    records = load_robustness(args.runs)
    gold = {r["sequence"]: r for r in records.values() if r.get("method") == "retrain"}
    for label, record in records.items():
        if record.get("method") == "retrain" or record["sequence"] not in gold:
            continue
        for family in args.families.split(","):
            gaps: dict[str, float] = defaultdict(float)
            for r, gap in retraining_gaps(record, gold[record["sequence"]]):
                if r.family == family:
                    gaps[r.concept] += gap
            total = sum(gaps.values())
            if not total:
                continue
            parts = ", ".join(f"{c} {100 * g / total:.0f}%" for c, g in sorted(gaps.items(), key=lambda x: -x[1]) if g)
            print(f"{label}, {family}: summed gap {100 * total:.1f} points; {parts}")


if __name__ == "__main__":
    main()
