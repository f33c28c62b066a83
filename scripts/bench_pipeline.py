"""How long the main job takes on a fresh clone, and how much of it is orchestration.

Clones this repository's HEAD into a temporary folder (as a newcomer would), then runs
`cul run` there on the embedded defaults (temporary Prefect server, MLflow in a SQLite file, DVC
with a local remote) and times it. Compute is what the library does (replay buffer, training,
evaluation: `seconds_step + seconds_eval` of each step); orchestration is everything else that
happens per request (Prefect tasks and flow runs, MLflow logging and registration, DVC commit and
push, git commit, deletion record). Start-up (Python imports, the temporary Prefect server, world
data) is reported apart, once per run.

    python scripts/bench_pipeline.py --profile quick            # `cul run --quick`: 2 short requests
    python scripts/bench_pipeline.py --profile default --requests 1
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from cul.io.provenance import code_revision

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--profile", choices=["quick", "default"], default="quick")
    ap.add_argument("--requests", type=int, default=None, help="Process this many default requests.")
    ap.add_argument("--out", type=Path, default=None, help="Default: reports/pipeline/PROFILE.json")
    args = ap.parse_args()
    out = args.out or ROOT / "reports" / "pipeline" / f"{args.profile}.json"

    with tempfile.TemporaryDirectory(prefix="cul-bench-") as tmp:
        clone = Path(tmp) / "cul"
        subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True)
        commit, _ = code_revision(clone)  # a fresh clone: never dirty
        cmd = [sys.executable, "-m", "cul.cli", "run", "--quiet", "--summary", str(Path(tmp) / "summary.json")]
        if args.profile == "quick":
            cmd.append("--quick")
        if args.requests:
            cmd += ["--limit", str(args.requests)]
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_"))}
        t0 = time.perf_counter()
        p = subprocess.run(cmd, cwd=clone, env=env, capture_output=True, text=True)
        wall = time.perf_counter() - t0
        if p.returncode != 0:
            sys.exit(f"cul run failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
        summary = json.loads((Path(tmp) / "summary.json").read_text())

    steps = [s for s in summary["steps"] if s.get("seconds_step") is not None]
    compute = sum(s["seconds_step"] + s["seconds_eval"] for s in steps)
    per_request = sum(s["seconds_total"] for s in steps) - compute
    report = {
        "profile": args.profile,
        "git_commit": commit,
        "requests": len(summary["steps"]),
        "accepted": sum(bool(s.get("accepted")) for s in summary["steps"]),
        "seconds_command": round(wall, 1),
        "seconds_startup": round(wall - sum(s["seconds_total"] for s in summary["steps"]), 1),
        "seconds_compute": round(compute, 1),
        "seconds_orchestration": round(per_request, 1),
        "overhead": round(per_request / compute, 3) if compute else None,
        "cpu_count": os.cpu_count(),
        "steps": [
            {
                k: s.get(k)
                for k in (
                    "request",
                    "accepted",
                    "attempts",
                    "version",
                    "ua",
                    "ra_in",
                    "ra_cross",
                    "ra_neighbour",
                    "fd_ratio",
                    "seconds_step",
                    "seconds_eval",
                    "seconds_total",
                    "overhead",
                    "reasons",
                )
            }
            for s in summary["steps"]
        ],
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps({k: v for k, v in report.items() if k != "steps"}, indent=1))
    print(f"-> {out}")


if __name__ == "__main__":
    main()
