"""Benchmark: a training step alone and beside another CPU-heavy job, with torch's thread defaults
and with cul's (`cul/threads.py`: as many threads as the cores other processes leave free,
re-measured every 2 s).

Each measurement is a fresh worker process (OpenMP reads its settings when torch loads) that trains
the production `dfr` recipe on the base model for `--steps` steps (request: circle; the teacher
samples are drawn with 2 DDIM steps, which changes what they look like, not what a training step
costs) and reports seconds per training step. The neighbour is a second process training the
world's UNet on random batches, either with torch's defaults (two threads, the way a plain torch
job beside a run would) or with cul's settings (another cul job); its own steps per second are
recorded too, so a setting that only wins by starving the neighbour shows.

Run: python scripts/bench_under_load.py  -> reports/benchmark/under_load.json (about 25 min here;
it resumes, measuring only what the file lacks)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

SETTINGS = {
    # name: (environment changes, use cul's governor)
    "torch defaults": ({"OMP_WAIT_POLICY": None, "OMP_NUM_THREADS": None}, False),
    "one thread": ({"OMP_WAIT_POLICY": None, "OMP_NUM_THREADS": "1"}, False),
    "auto threads, passive wait": ({"OMP_WAIT_POLICY": "PASSIVE", "OMP_NUM_THREADS": None}, True),
    "auto threads (cul)": ({"OMP_WAIT_POLICY": None, "OMP_NUM_THREADS": None}, True),
}
NEIGHBOURS = {"torch defaults": False, "cul": True}  # name: governed by cul's settings
# (setting, neighbour) to measure; neighbour None: alone
PLAN = (
    [(s, None) for s in SETTINGS]
    + [(s, "torch defaults") for s in SETTINGS]
    + [
        ("torch defaults", "cul"),
        ("auto threads (cul)", "cul"),
    ]
)


def _env(changes: dict[str, str | None]) -> dict[str, str]:
    env = dict(os.environ)
    for k, v in changes.items():
        if v is None:
            env.pop(k, None)
        else:
            env[k] = v
    return env


def worker(steps: int, governed: bool) -> dict:
    """One measurement: seconds per training step of the production dfr recipe."""
    policy = os.environ.get("OMP_WAIT_POLICY", "(unset)")  # what OpenMP reads as torch loads
    import torch  # before cul, so cul/__init__ cannot change the wait policy the parent chose

    from cul import threads
    from cul.config import Params
    from cul.models import load_model
    from cul.unlearning.preparation import prepare_step
    from cul.unlearning.recipes import DFRRecipe
    from cul.unlearning.request import Request
    from cul.unlearning.trainer import unlearn

    p = Params.load("params.yaml")
    if governed:
        threads.configure(p.compute)
    base = load_model(p.paths.base_model)
    recipe = DFRRecipe().model_copy(update={"steps": steps, "replay_steps": 2})
    prompts = prepare_step(base, Request(concept="circle"), [], recipe, seed=1)
    threads.reset_used()
    result = unlearn(base, prompts, recipe, base=base)
    return {
        "seconds_per_step": round(result.seconds_train / steps, 3),
        "threads": threads.threads_used(),
        "omp_wait_policy": policy,
        "torch_threads_at_end": torch.get_num_threads(),
    }


def other_job(seconds: float, out: str, governed: bool) -> None:
    """The CPU-heavy neighbour: the world's UNet trained on random batches."""
    import torch

    from cul import threads
    from cul.config import Params

    p = Params.load("params.yaml")
    if governed:
        threads.configure(p.compute)
    unet = p.model.build(384)
    opt = torch.optim.AdamW(unet.parameters(), lr=1e-4)
    x, ctx = torch.randn(64, 3, 32, 32), torch.randn(64, 16, 384)
    t0, n = time.perf_counter(), 0
    while time.perf_counter() - t0 < seconds:
        threads.tick()
        loss = unet(x, torch.randint(0, 1000, (64,)), encoder_hidden_states=ctx).sample.pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        n += 1
        Path(out + ".tmp").write_text(json.dumps({"steps": n, "seconds": time.perf_counter() - t0}))
        os.replace(out + ".tmp", out)  # whole, for the reader


def measure(name: str, steps: int, neighbour: str | None, log: Path) -> dict:
    changes, governed = SETTINGS[name]
    me = [sys.executable, __file__]
    other = None
    if neighbour is not None:
        other_out = log.with_suffix(".other.json")
        other_out.unlink(missing_ok=True)
        other = subprocess.Popen(
            [*me, "--other-job", "3600", "--other-out", str(other_out)]
            + (["--governed"] if NEIGHBOURS[neighbour] else []),
            env=_env({"OMP_WAIT_POLICY": None, "OMP_NUM_THREADS": None}),
        )
        while not other_out.exists():  # loaded and training
            time.sleep(0.5)
        time.sleep(5)
        mark = json.loads(other_out.read_text())
    try:
        done = subprocess.run(
            [*me, "--worker", str(steps), *(["--governed"] if governed else [])],
            env=_env(changes),
            capture_output=True,
            text=True,
            check=True,
        )
    finally:
        if other is not None:
            end = json.loads(other_out.read_text())
            other.kill()
            other.wait()
            other_out.unlink(missing_ok=True)
    row = {"setting": name, "neighbour": neighbour, **json.loads(done.stdout.strip().splitlines()[-1])}
    if neighbour is not None:
        row["other_job_steps_per_second"] = round(
            (end["steps"] - mark["steps"]) / max(end["seconds"] - mark["seconds"], 1e-9), 3
        )
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=12, help="training steps per measurement")
    ap.add_argument("--out", default="reports/benchmark/under_load.json")
    ap.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--governed", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--other-job", type=float, help=argparse.SUPPRESS)
    ap.add_argument("--other-out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.governed)))
        return
    if args.other_job:
        other_job(args.other_job, args.other_out, args.governed)
        return

    out = Path(args.out)
    data = json.loads(out.read_text()) if out.exists() else {}  # resumes
    rows = data.get("rows", [])
    other_alone = data.get("other_job_alone_steps_per_second") or other_job_alone(out)
    done = {(r["setting"], r["neighbour"]) for r in rows}
    for name, neighbour in PLAN:
        if (name, neighbour) in done:
            continue
        row = measure(name, args.steps, neighbour, out)
        rows.append(row)
        print(json.dumps(row), flush=True)
        _write(out, rows, args.steps, other_alone)
    _write(out, rows, args.steps, other_alone)
    print(f"wrote {out}")


def other_job_alone(out: Path, seconds: float = 60.0) -> float:
    """The other job's own speed with the machine to itself (steps per second, after loading)."""
    other_out = out.with_suffix(".other.json")
    subprocess.run(
        [sys.executable, __file__, "--other-job", str(seconds), "--other-out", str(other_out)],
        env=_env({"OMP_WAIT_POLICY": None, "OMP_NUM_THREADS": None}),
        check=True,
    )
    end = json.loads(other_out.read_text())
    other_out.unlink()
    return round(end["steps"] / end["seconds"], 3)


def _write(out: Path, rows: list[dict], steps: int, other_alone: float) -> None:
    from cul.io.provenance import provenance
    from cul.unlearning.recipes import DFRRecipe

    alone = {r["setting"]: r["seconds_per_step"] for r in rows if r["neighbour"] is None}
    fastest_alone = min(alone.values()) if alone else None
    for r in rows:
        if r["neighbour"] is not None and r["setting"] in alone:
            r["slowdown_vs_its_own_alone"] = round(r["seconds_per_step"] / alone[r["setting"]], 2)
        if fastest_alone:
            r["slowdown_vs_fastest_alone"] = round(r["seconds_per_step"] / fastest_alone, 2)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "what": "seconds per training step of the production dfr recipe, alone and beside a CPU-heavy job",
                "command": "python scripts/bench_under_load.py",
                "steps": steps,
                "cores": len(os.sched_getaffinity(0)),
                "other_job_alone_steps_per_second": other_alone,
                "machine": platform.processor() or platform.machine(),
                **provenance("dfr", DFRRecipe()),
                "rows": rows,
            },
            indent=1,
        )
        + "\n"
    )


if __name__ == "__main__":
    main()
