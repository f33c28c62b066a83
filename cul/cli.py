"""`cul`: the command line. Thin: read params.yaml, call the library, write files, print tables."""

from __future__ import annotations

import itertools
import json
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import NoReturn

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from cul import device, threads
from cul.config import Params
from cul.files import write_atomic

app = typer.Typer(
    help="Continual unlearning for text-to-image diffusion models.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
    add_completion=False,
)
# off a terminal (a log, CI) rich would draw 80 columns and cut the tables' cells; COLUMNS still wins
console = Console(width=None if sys.stdout.isatty() or "COLUMNS" in os.environ else 140)

ParamsOpt = typer.Option(Path("params.yaml"), "--params", "-p", help="Settings file (validated).")

# exit codes: what kind of failure it was (typer's own usage errors, bad options and params, are 2)
REFUSED, BUSY, STOPPED = 1, 3, 4  # bad input refused / another run holds the lineage / the pipeline stopped
INTERRUPTED = 130  # Ctrl-C or SIGTERM (the shell's convention for SIGINT)


@contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """Within the block, SIGTERM (`kill`, `timeout`, a scheduler) ends a run as Ctrl-C does:
    Prefect marks the flow run crashed, context managers release the lineage and end the
    attempt's MLflow run as failed (the next run closes the request's), and the user reads a
    message instead of a traceback. The previous handler is put back after; off the main thread
    (where Python allows no handler) nothing changes."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:  # None: a handler set outside Python, which cannot be put back; the default then
        signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)


def _fail(message: str, code: int = REFUSED) -> NoReturn:
    """Print a message (user text escaped, never taken as markup) and exit with `code`."""
    console.print(Text("error: ", style="red") + Text(message), soft_wrap=True)
    raise typer.Exit(code)


def _params(path: Path) -> Params:
    from cul.config import ParamsError

    try:
        p = Params.load(path)
    except ParamsError as e:  # names the file and the bad key
        raise typer.BadParameter(str(e)) from e
    threads.configure(p.compute)
    device.configure(p.device)
    return p


def _model(path: Path):
    """The model at `path`, or a message (a missing, foreign or corrupt directory)."""
    from cul.models.diffusion import ModelLoadError, load_model

    try:
        return load_model(path)
    except (ModelLoadError, device.DeviceError) as e:
        _fail(str(e))


def _judge(path: Path):
    from cul.judge import Judge

    try:
        return Judge.from_pretrained(path)
    except Exception as e:  # a missing or corrupt judge
        _fail(f"{path}: the judge cannot be loaded ({type(e).__name__}: {str(e)[:300]})")


def _evaluator(p: Params, catalogue, spec, base):
    """The step evaluation of `p`'s judge kind over `catalogue`, or a message."""
    from cul.judges import JudgeError, step_evaluator

    try:
        return step_evaluator(p, catalogue, spec, base)
    except JudgeError as e:
        _fail(str(e))


def _write_json(path: Path, data: dict) -> None:
    write_atomic(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


@app.command()
def world(params: Path = ParamsOpt, out: Path | None = typer.Option(None, help="Output folder.")) -> None:
    """Build the world data: real reference images, caption probes, vocabulary and a preview."""
    from cul.data import build_world

    p = _params(params)
    out = out or p.paths.world
    summary = build_world(p.world, out)
    console.print(f"world: {summary['n_reference']} reference images, {summary['n_concepts']} concepts -> {out}")


@app.command()
def pretrain(
    params: Path = ParamsOpt,
    out: Path | None = typer.Option(None, help="Where the EMA weights go."),
    steps: int | None = typer.Option(None, help="Override pretrain.steps."),
    quiet: bool = typer.Option(False, help="No progress bar."),
) -> None:
    """Pretrain the base world model (resumes from its checkpoints)."""
    from cul.pretrain import Pretrainer

    p = _params(params)
    cfg = p.pretrain.model_copy(update={"steps": steps}) if steps else p.pretrain
    out = out or p.paths.base_model
    trainer = Pretrainer(p.model, cfg, p.paths.checkpoints / "pretrain", p.sampling)
    if trainer.step:
        console.print(f"resuming pretraining at step {trainer.step}/{cfg.steps}")
    model = trainer.run(progress=not quiet)
    model.save_pretrained(out)
    _write_json(out / "record.json", trainer.record())
    console.print(f"base model ({trainer.step} steps, {trainer.seconds / 60:.1f} min) -> {out}")


@app.command()
def judge(
    params: Path = ParamsOpt,
    out: Path | None = typer.Option(None, help="Where the judge goes."),
    quiet: bool = typer.Option(False, help="No progress bar."),
) -> None:
    """Train the three-headed judge on real world images and report its held-out accuracy."""
    from cul.judge import train_judge

    p = _params(params)
    out = out or p.paths.judge
    model, record = train_judge(p.judge, p.world.size, progress=not quiet)
    model.save_pretrained(out, record)
    acc = record["held_out_accuracy"]
    console.print("judge held-out accuracy: " + ", ".join(f"{k} {100 * v:.2f}%" for k, v in acc.items()))


@app.command()
def generate(
    prompt: str = typer.Argument(..., help="What to draw."),
    output: Path = typer.Option(Path("out.png"), "-o", "--output", help="PNG to write."),
    model: Path | None = typer.Option(None, help="Model directory (default: the base model)."),
    n: int = typer.Option(1, min=1, max=256, help="How many images (tiled)."),
    seed: int = typer.Option(0, help="Random seed."),
    steps: int | None = typer.Option(None, min=1, help="DDIM steps."),
    guidance: float | None = typer.Option(None, min=0.0, help="Classifier-free guidance."),
    scale: int = typer.Option(4, min=1, help="Upscale factor of the PNG (nearest)."),
    params: Path = ParamsOpt,
) -> None:
    """Sample images from a prompt to a PNG."""
    from cul.plots import save_png

    if not prompt.strip():
        raise typer.BadParameter("the prompt is empty")
    p = _params(params)
    m = _model(model or p.paths.base_model)
    images = m.sample([prompt] * n, seed=seed, steps=steps, guidance=guidance)
    save_png(images, output, ncol=min(n, 8), scale=scale)
    console.print(f"{n} image(s) of {prompt!r} -> {output}")


@app.command("eval")
def evaluate(
    params: Path = ParamsOpt,
    model: Path | None = typer.Option(None, help="Model directory (default: the base model)."),
    out: Path | None = typer.Option(None, help="Report folder (default reports/base)."),
    forgotten: str | None = typer.Option(
        None,
        help="Comma-separated concepts forgotten so far: report UA, RA-I, RA-C, RA-N and FD against the base model.",
    ),
    probes: str | None = typer.Option(
        None,
        help="With --forgotten: robustness probes on every forgotten concept, comma-separated families "
        "(wording, soft_prompt, adversarial, relearn_retain, relearn_neighbour) or 'all'.",
    ),
    quiet: bool = typer.Option(False, help="No progress bar."),
) -> None:
    """Judge a model on every object x colour x texture: accuracy per kind and concept, FD; with
    --forgotten, the unlearning metrics too."""
    from cul.data import load_reference
    from cul.evaluation import evaluate_model
    from cul.judges import uses_world_scenes
    from cul.reports import write_base_report

    p = _params(params)
    if probes and not forgotten:
        raise typer.BadParameter("--probes needs --forgotten: the concepts to probe")
    model_dir = model or p.paths.base_model
    catalogue = p.pipeline.concept_catalogue()
    m = _model(model_dir)
    if forgotten or not uses_world_scenes(catalogue, p.judge.kind):
        from cul.fmt import pct, times

        words = [x.strip() for x in (forgotten or "").split(",") if x.strip()]
        unknown = [x for x in words if catalogue.resolve(x) is None]
        if unknown:
            raise typer.BadParameter(f"not concepts of the catalogue {catalogue.name!r}: {', '.join(unknown)}")
        names = [catalogue.resolve(x).name for x in words]  # type: ignore[union-attr]
        base = m if Path(model_dir) == Path(p.paths.base_model) else _model(p.paths.base_model)
        evaluator = _evaluator(p, catalogue, p.eval, base)
        metrics = evaluator(m, names)
        out = out or Path(model_dir) / "eval"
        found = _probe(p, probes, m, base, evaluator, names, out) if probes else []
        from cul.probes import summarise, to_records

        _write_json(
            out / "metrics.json",
            {
                "model": str(model_dir),
                "forgotten": names,
                **metrics.model_dump(),
                "probes": to_records(found),
                "probe_summary": summarise(found),
            },
        )
        t = Table(
            title=f"{model_dir}: forgotten {', '.join(names) or 'nothing'} ({catalogue.name}, {p.judge.kind} judge)"
        )
        for col in ("UA", "RA-I", "RA-C", "RA-N", "FD / base"):
            t.add_column(col, justify="right")
        t.add_row(
            pct(metrics.ua),
            pct(metrics.ra_in),
            pct(metrics.ra_cross),
            pct(metrics.ra_neighbour),
            times(metrics.fd_ratio),
        )
        console.print(t)
        console.print(f"-> {out}/metrics.json")
        return
    j = _judge(p.paths.judge)
    if not (p.paths.world / "reference.npz").exists():
        world(params, None)
    out = out or p.paths.reports / "base"
    t0 = time.perf_counter()
    report, images = evaluate_model(
        m, j, load_reference(p.paths.world), p.eval.seed, p.eval.batch_size, progress=not quiet
    )
    report["model"] = str(model_dir)
    seconds = time.perf_counter() - t0  # printed, not stored: report.json stays byte-identical on reruns
    report["judge_held_out_accuracy"] = json.loads((p.paths.judge / "record.json").read_text())["held_out_accuracy"]
    write_base_report(report, images, out)
    print_metrics(report)
    console.print(f"report -> {out}/metrics.json, {out}/samples.png ({seconds:.0f} s)")


def _probe(
    p: Params,
    families: str,
    model,
    base,
    evaluator,
    names: list[str],
    out: Path,
    journal: Path | None = None,
    stamp: dict | None = None,
    stamps: dict | None = None,
) -> list:
    """`cul eval --probes`: the chosen probes on every forgotten concept, printed and plotted (with
    `journal`, resumable concept by concept: `Prober.run`). `stamp`: the code revision probing
    (default: the checkout's now); `stamps` gets, per concept, the revision that probed it."""
    from cul.plots import probe_grid
    from cul.probes import ATTACKS, FAMILIES, Prober, base_cache

    chosen = list(FAMILIES) if families.strip() == "all" else [x.strip() for x in families.split(",") if x.strip()]
    unknown = [x for x in chosen if x not in FAMILIES]
    if unknown:
        raise typer.BadParameter(f"unknown probe families {', '.join(unknown)}: {', '.join(FAMILIES)} or all")
    if not names:
        raise typer.BadParameter("--probes needs --forgotten: the concepts to probe")
    if not hasattr(evaluator, "more_images"):
        raise typer.BadParameter("robustness probes run on the world's scenes and judge only (judge.kind: world)")
    spec = p.eval.probes.model_copy(
        update={"wording": "wording" in chosen, "attacks": [a for a in ATTACKS if a in chosen], "concepts": "all"}
    )
    cache = base_cache(p.paths.reports, p.eval.steps)
    prober = Prober(evaluator.judge, spec, base, p.world.size, p.eval.steps, cache, log=console.print)
    from cul.io.provenance import code_revision

    stamp = stamp or dict(zip(("git_commit", "git_dirty"), code_revision("."), strict=True))
    found = prober.run(model, names, journal=journal, stamp=stamp)
    if stamps is not None:
        stamps.update(prober.stamps)
    t = Table(title="recovery under each probe (share of the base model's recognition)")
    for col in ("concept", "probe", "recovery", "images", "base", "prompt"):
        t.add_column(col)
    for r in found:
        t.add_row(r.concept, r.probe, f"{100 * r.recovery:.0f}%", f"{r.hits}/{r.images}",
                  f"{r.base_hits}/{r.base_images}", r.prompt[:48])  # fmt: skip
    console.print(t)
    probe_grid(prober.samples, {r.name: r.figure for r in found}, out / "probes.png", "probes (recovery)")
    return found


def print_metrics(metrics: dict) -> None:
    t = Table(title="judged correct (%)")
    t.add_column("kind")
    t.add_column("all images", justify="right")
    t.add_column("worst concept", justify="right")
    from cul.world import CONCEPTS, Kind

    for kind, acc in metrics["accuracy"].items():
        worst = min(CONCEPTS[Kind(kind)], key=lambda c: metrics["per_concept"][c.name])
        t.add_row(kind, f"{100 * acc:.1f}", f"{worst.name} {100 * metrics['per_concept'][worst.name]:.1f}")
    console.print(t)
    console.print(
        f"FD to real images (judge features): {metrics['fd']:.3f} (real-vs-real floor {metrics['real_fd_floor']:.3f})"
    )


def _embedded_prefect() -> None:
    """Embedded defaults: with no PREFECT_API_URL `cul run` starts a temporary local server
    (flows/embedded.py); keep its database in the project, offline, quiet."""
    import os

    Path(".prefect").mkdir(exist_ok=True)
    os.environ.setdefault("PREFECT_HOME", str(Path(".prefect").resolve()))
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")


def _ensure_base(p: Params, params: Path, quiet: bool) -> None:
    """The world's data, base model, judge and base report (built if missing); for any other
    catalogue, the team's own model and judge must be where params says."""
    if (catalogue := p.pipeline.concept_catalogue()).name != "world":
        from cul.judges import JudgeError, load_judge

        for what, key, path in (("base model", "base_model", p.paths.base_model), ("judge", "judge", p.paths.judge)):
            if not Path(path).is_dir():
                _fail(
                    f"no {what} at {path}: set paths.{key} in {params} to a local directory (README: Stable Diffusion)",
                )
        try:  # before any step trains: a judge that cannot load would only fail after training
            load_judge(p.judge.kind, p.paths.judge, catalogue)
        except JudgeError as e:
            _fail(str(e))
        _model(p.paths.base_model)
        return
    world(params, None)
    if not (p.paths.base_model / "unet").exists():
        console.print("no committed base model: pretraining (hours on two CPU cores)")
        pretrain(params, None, None, quiet)
    if not (p.paths.judge / "judge.safetensors").exists():
        judge(params, None, quiet)
    if not (p.paths.reports / "base" / "metrics.json").exists():
        evaluate(params, None, None, None, None, quiet)


@app.command()
def run(
    quick: bool = typer.Option(False, "--quick", help="The quick profile of params.yaml (2 short requests)."),
    limit: int | None = typer.Option(None, min=1, help="Process at most this many pending requests."),
    summary: Path | None = typer.Option(None, help="Also write the table of steps as JSON here."),
    params: Path = ParamsOpt,
    quiet: bool = typer.Option(False, help="No progress bars."),
) -> None:
    """The main job: queue the default requests (if the queue is empty), then run the continual
    flow on the embedded defaults (temporary Prefect server, MLflow in ./mlflow.db, the DVC
    remote of .dvc/config) and print what happened and where to look."""
    p = _params(params)
    with _sigterm_as_interrupt():
        try:
            _run(p, params, quick, limit, summary, quiet)
        except KeyboardInterrupt:
            _fail(
                "interrupted. Requests not finished stay in the queue (`cul request list`); the next "
                "`cul run` takes them up (and a base model being built resumes from its checkpoint).",
                INTERRUPTED,
            )


def _run(p: Params, params: Path, quick: bool, limit: int | None, summary: Path | None, quiet: bool) -> None:
    """`cul run`'s body, with settings `p` read from the file `params`."""
    from cul.benchmark import load_sequence
    from cul.io.database import lineage_lock, open_queue
    from cul.io.locks import LockBusy, busy_message
    from cul.pipeline import PipelineError

    lock = lineage_lock(p.pipeline)
    if not lock.is_free():  # who holds it: the pid, host and start its lock records
        _fail(busy_message(p.pipeline.tracking.registered_model, lock.owner()), BUSY)
    _ensure_base(p, params, quiet)
    queue = open_queue(p.pipeline)
    if not queue.items():
        todo = load_sequence(p.pipeline.default_requests)
        todo = todo[: p.pipeline.quick.requests] if quick else todo
        for r in todo:
            queue.add(r.concept, r.kind, note=f"default request from {p.pipeline.default_requests}", by="cul run")
        console.print(f"queued {len(todo)} default requests from {p.pipeline.default_requests}")
    pending = queue.pending()
    if quick:
        limit = limit or p.pipeline.quick.requests
    if not pending:
        console.print("no pending requests; add one with `cul request add CONCEPT`")
        return
    _embedded_prefect()
    from flows.embedded import crash_dead_runs, embedded_server  # before Prefect: it sets PREFECT_API_URL

    with embedded_server(log=Path(".prefect") / "server.log") as url:
        from flows.continual import continual_flow

        if url and (crashed := crash_dead_runs()):
            console.print(f"{crashed} flow run(s) left running by a killed `cul run` marked crashed")
        t0 = time.perf_counter()
        try:
            results = continual_flow(str(params), quick=quick, limit=limit)
        except LockBusy as e:
            _fail(str(e), BUSY)
        except PipelineError as e:
            _fail(str(e), STOPPED)
        seconds = time.perf_counter() - t0
    _print_steps(results, seconds, p)
    if summary:
        _write_json(
            summary, {"profile": "quick" if quick else "default", "seconds_flow": round(seconds, 1), "steps": results}
        )


def _print_steps(results: list[dict], seconds: float, p: Params) -> None:
    t = Table(title=f"continual flow: {len(results)} request(s) in {seconds / 60:.1f} min")
    for col in ("request", "outcome", "UA", "RA-I", "RA-C", "RA-N", "FD x", "s step/all", "orch."):
        t.add_column(col, no_wrap=True)

    from cul.fmt import pct, times

    for r in results:
        outcome = "no-op" if r.get("noop") else f"v{r['version']} {r['step']}" if r["accepted"] else "review"
        if r.get("attempts", 0) > 1:
            outcome += f" ({r['attempts']} tries)"
        took = (f"{r['seconds_step']:.0f}/" if r.get("seconds_step") else "") + f"{r.get('seconds_total', 0):.0f}"
        t.add_row(
            r["request"],
            outcome,
            pct(r.get("ua"), 0),
            pct(r.get("ra_in"), 0),
            pct(r.get("ra_cross"), 0),
            pct(r.get("ra_neighbour"), 0),
            times(r.get("fd_ratio")),
            took,
            f"{100 * r['overhead']:.0f}%" if r.get("overhead") is not None else "-",
        )
    console.print(t)
    for r in results:
        if not r["accepted"]:
            console.print(
                f"[yellow]{r['request']} sent to review[/yellow] (champion unchanged): " + "; ".join(r["reasons"])
            )
    uri = p.pipeline.tracking.resolved_uri()
    console.print(
        f"MLflow UI:  mlflow ui --backend-store-uri {uri}  -> Models -> {p.pipeline.tracking.registered_model}"
        " (move `champion` there, or `cul promote VERSION`)"
    )
    console.print(
        "Records:    reports/audit/*.md (deletion records), reports/steps/*/ (metrics, before/after),"
        " `cul request list`, `cul versions`"
    )
    console.print("Reproduce:  dvc pull && dvc repro --single-item step@KEY")


request_app = typer.Typer(help="The deletion-request queue.", no_args_is_help=True)
app.add_typer(request_app, name="request")


@request_app.command("add")
def request_add(
    concept: str,
    kind: str | None = typer.Option(None, help="The concept's category in the catalogue (object, colour, style...)."),
    note: str = typer.Option("", help="Why (ticket, legal basis...)."),
    by: str | None = typer.Option(None, help="Who asks (default: your user name)."),
    params: Path = ParamsOpt,
) -> None:
    """Queue a deletion request (refused with a reason if invalid or a duplicate)."""
    from pydantic import ValidationError

    from cul.io.database import open_queue
    from cul.unlearning.request import RequestError

    p = _params(params)
    try:
        item = open_queue(p.pipeline, p.pipeline.concept_catalogue()).add(concept, kind, note, by)
    except RequestError as e:
        _fail(f"refused: {e}")
    except ValidationError as e:  # an empty concept, a kind that is not one
        _fail("refused: " + "; ".join(f"{'.'.join(map(str, x['loc'])) or 'request'}: {x['msg']}" for x in e.errors()))
    said = "" if " ".join(concept.split()) == item.concept else f" ({' '.join(concept.split())!r} names it)"
    console.print(Text(f"queued {item.id}: forget {item.concept} ({item.kind}){said}"))


@request_app.command("list")
def request_list(params: Path = ParamsOpt) -> None:
    """Every request with its state."""
    from cul.io.database import open_queue

    p = _params(params)
    queue = open_queue(p.pipeline)
    t = Table(title=str(queue.path))
    for col in ("id", "concept", "kind", "state", "by", "at", "note"):
        t.add_column(col)
    for r in queue.items():
        state = r.describe() + (f" ({'; '.join(r.reasons)[:80]})" if r.reasons else "")
        t.add_row(*(Text(x) for x in (r.id, r.concept, r.kind, state, r.by, r.at, r.note)))  # text, not markup
    console.print(t)


@request_app.command("retry")
def request_retry(request_id: str, params: Path = ParamsOpt) -> None:
    """Send a request that waits for review back to the queue (after changing the gate, the method
    or the champion), or one a dead run left in progress: the next run tries it again."""
    from cul.io.database import lineage_lock, open_queue
    from cul.queue import State

    p = _params(params)
    queue = open_queue(p.pipeline)
    try:
        item = queue.get(request_id)
    except KeyError as e:
        _fail(str(e.args[0]))
    stranded = item.state == State.in_progress and lineage_lock(p.pipeline).is_free()
    given_up = item.state == State.pending and item.tries > 0  # the dispatcher stopped after max_tries
    if item.state != State.review and not stranded and not given_up:
        _fail(
            f"{request_id} is {item.describe()}; only a request waiting for review, one left in progress "
            "by a run that has ended, or one the dispatcher gave up on can be retried"
        )
    queue.update(request_id, state=State.pending, reasons=[], tries=0)
    console.print(f"{request_id} ({item.concept}) is pending again")


@app.command()
def step(key: str, params: Path = ParamsOpt, quiet: bool = typer.Option(True, help="No progress bars.")) -> None:
    """Run one accepted request step from requests/steps.yaml (what `dvc repro step@KEY` calls)."""
    from cul.step import load_steps, run_step

    steps = load_steps()
    if key not in steps:
        raise typer.BadParameter(f"no step {key!r} in requests/steps.yaml (known: {', '.join(steps) or 'none'})")
    run_step(steps[key], _params(params), progress=not quiet, log=console.print)


@app.command()
def promote(version: int, params: Path = ParamsOpt) -> None:
    """Point the `champion` alias at VERSION (what a person does in the MLflow UI)."""
    from mlflow.exceptions import MlflowException

    from cul.io.tracking import Tracker

    p = _params(params)
    tracker = Tracker(p.pipeline.tracking)
    try:
        tracker.promote(version)
    except MlflowException:
        known = ", ".join(str(v["version"]) for v in tracker.versions()) or "none"
        _fail(f"{p.pipeline.tracking.registered_model} has no version {version} (registered: {known})")
    console.print(f"champion -> version {version}")


@app.command()
def versions(params: Path = ParamsOpt) -> None:
    """Registered model versions with their aliases and tags."""
    from cul.io.tracking import Tracker

    t = Table(title="registered versions")
    for col in ("version", "aliases", "request", "concept", "forgotten", "step", "dvc_rev"):
        t.add_column(col)
    for v in Tracker(_params(params).pipeline.tracking).versions():
        t.add_row(
            str(v["version"]),
            ",".join(v["aliases"]),
            v.get("request_id", ""),
            v.get("concept", ""),
            v.get("forgotten", ""),
            v.get("step", ""),
            v.get("dvc_rev", "")[:10],
        )
    console.print(t)


@app.command()
def serve(params: Path = ParamsOpt, quick: bool = typer.Option(False, "--quick")) -> None:
    """Serve the continual flow as a deployment on the cron schedule of params.yaml (needs a
    Prefect server: `prefect server start`, and PREFECT_API_URL pointing at it)."""
    from flows.continual import continual_flow

    p = _params(params)
    continual_flow.serve(
        name="scheduled", cron=p.pipeline.cron, parameters={"params_path": str(params), "quick": quick}
    )


def _bench_evaluator(p: Params, catalogue, spec, base, requests):
    """The benchmark's evaluation of a sequence: on the world, FD on a fixed set of scenes without
    any concept of the sequence (comparable across steps and methods), the base model judged once
    per setting; on another catalogue, the step evaluation of `p`'s judge kind."""
    from cul.benchmark import sequence_concepts
    from cul.evaluation import Evaluator
    from cul.judges import uses_world_scenes

    if not uses_world_scenes(catalogue, p.judge.kind):
        return _evaluator(p, catalogue, spec, base)
    evaluator = Evaluator(
        _judge(p.paths.judge), spec, p.world.size, p.world.eval_seed, fd_exclude=sequence_concepts(requests)
    )
    evaluator.set_base(base, cache=p.paths.reports / "benchmark" / ".cache" / f"base-stride{spec.stride}.npz")
    return evaluator


@app.command()
def bench(
    sequence: Path = typer.Option(Path("benchmarks/default-sequence.yaml"), help="YAML list of requests."),
    method: str = typer.Option(
        "dfr", help="A production method (dfr, ca, esd, naive) or an experiment file (experiments/NAME.yaml)."
    ),
    out: Path | None = typer.Option(None, help="Output folder (default reports/benchmark/NAME)."),
    max_steps: int | None = typer.Option(None, min=1, help="Stop after this many requests."),
    order_seed: int | None = typer.Option(
        None, help="Shuffle the sequence's order with this seed (default folder NAME-orderSEED)."
    ),
    stride: int | None = typer.Option(
        None, min=1, help="Evaluate on about 1/stride of the scenes, every concept equally often."
    ),
    eval_every: int | None = typer.Option(
        None, min=1, help="Evaluate only after every Nth request and the last (default: after every request)."
    ),
    gated: bool = typer.Option(
        False,
        "--gated",
        help="Run each request as production does: the step with its probes, the gate, escalation "
        "(params.yaml's pipeline); a rejected request leaves the champion as it was.",
    ),
    model: Path | None = typer.Option(None, help="Starting model (default: the base model)."),
    branch: str | None = typer.Option(
        None,
        help="With --gated: RUN:K starts from the champion the gated run in folder RUN had after its request K "
        "(its first K entries are copied into OUT, marked inherited_from) and goes on with this recipe.",
    ),
    probes: str | None = typer.Option(
        None,
        help="After the last request: robustness probes on every forgotten concept (comma-separated "
        "families, or 'all'), written to OUT/robustness.json (resumable concept by concept).",
    ),
    params: Path = ParamsOpt,
    quiet: bool = typer.Option(False, help="No progress bars."),
) -> None:
    """Run a sequence of deletion requests with one recipe, evaluating after every step
    (resumable: a rerun continues after the last finished step, with the same recipe only)."""
    from cul.benchmark import BenchmarkError, load_sequence, run_sequence
    from cul.io.provenance import code_revision
    from cul.plots import metric_curves
    from cul.unlearning.preparation import PreparationError
    from cul.unlearning.recipes import RecipeError, load_recipe

    p = _params(params)
    started = code_revision(".")  # the code this process loaded: what probes the final model
    try:
        name, recipe = load_recipe(method)
        requests = load_sequence(sequence)
    except (RecipeError, BenchmarkError) as e:
        raise typer.BadParameter(str(e)) from e
    if gated and (model or eval_every):
        raise typer.BadParameter(
            "--gated starts from params.yaml's base model and judges the champion after every request"
        )
    branch_from: tuple[Path, int] | None = None
    branched = False
    if branch:
        source, _, after = branch.rpartition(":")
        if not gated or not source or not after.isdigit() or int(after) < 1:
            raise typer.BadParameter(f"--branch {branch!r}: give it as RUN_FOLDER:K (K a request number) with --gated")
        branch_from = (Path(source), int(after))
    eval_spec = p.eval.model_copy(update={"stride": stride}) if stride else p.eval
    folder = name
    if order_seed is not None:
        import numpy as np

        requests = [requests[i] for i in np.random.default_rng(order_seed).permutation(len(requests))]
        folder = f"{name}-order{order_seed}"
    out = out or p.paths.reports / "benchmark" / (f"{folder}-gated" if gated else folder)
    base = _model(model or p.paths.base_model)
    catalogue = p.pipeline.concept_catalogue()
    evaluator = _bench_evaluator(p, catalogue, eval_spec, base, requests)
    try:
        if branch_from:
            from cul.benchmark import branch_results

            branched = branch_results(*branch_from, out)
        if gated:
            from cul.gated import run_gated_sequence

            results = run_gated_sequence(
                p,
                base,
                evaluator,
                requests,
                recipe,
                out,
                name=name,
                max_steps=max_steps,
                log=console.print,
                order_seed=order_seed,
                code=started,
            )
        else:
            results = run_sequence(
                base,
                evaluator,
                requests,
                recipe,
                out,
                name=name,
                max_steps=max_steps,
                progress=not quiet,
                log=console.print,
                catalogue=catalogue,
                order_seed=order_seed,
                code=started,
                eval_every=eval_every,
            )
    except BenchmarkError as e:
        if branched:  # a branch refused before its first request leaves nothing behind
            (out / "results.json").unlink()
        raise typer.BadParameter(str(e)) from e
    except PreparationError as e:  # a request of the sequence that cannot be prepared: what is kept stays
        _fail(f"{e} (the finished requests are in {out}/results.json)")
    metric_curves({name: results}, out / "metrics.png", f"{name} on {sequence.name}")
    console.print(f"{len(results)} steps -> {out}/results.json, {out}/metrics.png")
    if probes and results and gated and not results[-1]["forgotten"]:
        console.print("the gate accepted no request: nothing is forgotten, nothing to probe")
    elif probes and results:
        from cul.benchmark import step_unet
        from cul.device import place
        from cul.reports import robustness_record

        if gated:  # the champion the gate left, and what it has forgotten
            from cul.models import load_model

            final = place(load_model(out / results[-1]["champion"]))
            names = results[-1]["forgotten"]
        else:
            final = place(base.with_unet(step_unet(out, len(results))))
            names = [r["concept"] for r in results]
        stamps: dict = {}
        here = dict(zip(("git_commit", "git_dirty"), started, strict=True))
        found = _probe(p, probes, final, base, evaluator, names, out, out / "probes-journal.json", here, stamps)
        last = results[-1]
        keep = ("ua", "ra_in", "ra_cross", "ra_neighbour", "fd_ratio", "recipe_name", "recipe_hash", "git_commit")
        record = robustness_record(
            name,
            sequence.name,
            len(results),
            {k: last.get(k) for k in keep},
            last,
            here,
            stamps,
            p.eval.probes.model_dump(mode="json"),
            probes,
            found,
            **({"order_seed": order_seed} if order_seed is not None else {}),
            **({"mode": "gated", "forgotten": names} if gated else {}),
        )
        _write_json(out / "robustness.json", record)
        console.print(f"robustness -> {out}/robustness.json, {out}/probes.png")


@app.command()
def retrain(
    sequence: Path = typer.Option(Path("benchmarks/default-sequence.yaml"), help="YAML list of requests."),
    out: Path | None = typer.Option(None, help="Output folder (default reports/benchmark/retrain-SEQUENCE)."),
    probes: str | None = typer.Option(
        None, help="Robustness probes on every concept of the sequence, as `cul bench --probes` (or 'all')."
    ),
    stride: int | None = typer.Option(
        None, min=1, help="Evaluate on about 1/stride of the scenes, as `cul bench --stride`."
    ),
    steps: int | None = typer.Option(None, min=1, help="Override pretrain.steps (the base model's by default)."),
    params: Path = ParamsOpt,
    quiet: bool = typer.Option(False, help="No progress bar."),
) -> None:
    """The gold standard of a sequence's erasures: the base model's pretraining run again, same
    settings and seed, on the world without any concept of the sequence (resumable), judged as
    `cul bench` judges a run after its last request and probed with the same attacks. What an
    attack brings back here, from a model that never saw the concept, no erasure can be asked to
    prevent. Writes OUT/retrain.json (and OUT/robustness.json with --probes); the weights go to
    OUT/model."""
    from cul.benchmark import BenchmarkError, load_sequence, sequence_concepts
    from cul.device import place
    from cul.fmt import pct, times
    from cul.io.provenance import code_revision
    from cul.judges import uses_world_scenes
    from cul.reports import robustness_record
    from cul.results import read_json
    from cul.retrain import Retraining

    p = _params(params)
    started = code_revision(".")
    catalogue = p.pipeline.concept_catalogue()
    if not uses_world_scenes(catalogue, p.judge.kind):
        raise typer.BadParameter("retraining runs on the world's scenes and judge only (judge.kind: world)")
    cfg = p.pretrain.model_copy(update={"steps": steps}) if steps else p.pretrain
    try:
        requests = load_sequence(sequence)
        names = sequence_concepts(requests)
        job = Retraining(exclude=tuple(names), pretrain=cfg, model=p.model)
        excluded = job.world().exclude  # refuses a concept the world lacks, or a kind left empty
    except (BenchmarkError, KeyError, ValueError) as e:
        raise typer.BadParameter(f"{sequence}: {e}") from e
    out = out or p.paths.reports / "benchmark" / f"retrain-{sequence.stem}"
    before = read_json(out / "retrain.json") if (out / "retrain.json").exists() else {}
    if isinstance(before, dict) and before and before.get("recipe_hash") != job.digest():
        raise typer.BadParameter(f"{out} holds a model retrained otherwise: give another --out")
    base = _model(p.paths.base_model)
    spec = p.eval.model_copy(update={"stride": stride}) if stride else p.eval
    evaluator = _bench_evaluator(p, catalogue, spec, base, requests)
    trainer = job.trainer(p.paths.checkpoints, p.sampling)
    console.print(
        f"retraining without {', '.join(excluded)}"
        + (f": resuming at step {trainer.step}/{cfg.steps}" if trainer.step else f": {cfg.steps} steps")
    )
    model = place(trainer.run(progress=not quiet))
    model.save_pretrained(out / "model")
    m = evaluator(model, names)
    here = dict(zip(("git_commit", "git_dirty"), started, strict=True))
    made = {"recipe_name": "retrain", "recipe": job.recipe(), "recipe_hash": job.digest(), **here}
    keep = {"ua", "ra_in", "ra_cross", "ra_neighbour", "ra_all", "fd", "fd_ratio", "fd_clean"}
    after = {**m.model_dump(include=keep), **{k: made[k] for k in ("recipe_name", "recipe_hash", "git_commit")}}
    _write_json(
        out / "retrain.json",
        {
            **made,
            "sequence": sequence.name,
            "forgotten": names,
            "after": after,
            "per_concept": m.per_concept,
            "base": m.base.model_dump() if m.base else None,
            "evaluation": evaluator.settings(),
            "training": trainer.record(),
        },
    )
    console.print(
        f"retrained without the sequence: UA {pct(m.ua)} RA-I {pct(m.ra_in)} RA-C {pct(m.ra_cross)} "
        f"RA-N {pct(m.ra_neighbour)} FDx {times(m.fd_ratio)} -> {out}/retrain.json"
    )
    (out / "robustness.json").unlink(missing_ok=True)  # never a record of another probing beside this one
    if not probes:
        return
    stamps: dict = {}
    found = _probe(p, probes, model, base, evaluator, names, out, out / "probes-journal.json", here, stamps)
    probe_spec = p.eval.probes.model_dump(mode="json")
    record = robustness_record(
        "retrain", sequence.name, len(names), after, made, here, stamps, probe_spec, probes, found
    )
    _write_json(out / "robustness.json", record)
    console.print(f"robustness -> {out}/robustness.json, {out}/probes.png")


@app.command()
def report(
    runs: Path = typer.Option(Path("reports/benchmark"), help="Folder of METHOD/results.json runs."),
    out: Path | None = typer.Option(None, help="Where table.md and metrics.png go (default: RUNS)."),
) -> None:
    """Combine benchmark runs: a markdown table of the last step of each method, and plots of
    every metric against the request step for all methods."""
    from cul.plots import metric_curves
    from cul.reports import (
        benchmark_table,
        beyond_retraining_table,
        load_robustness,
        load_runs,
        robustness_table,
        side_by_side,
        steps_table,
    )
    from cul.results import BenchmarkError

    out = out or runs
    try:
        found, records = load_runs(runs), load_robustness(runs)
    except BenchmarkError as e:
        _fail(str(e))
    if not found:
        raise typer.BadParameter(f"no */results.json under {runs}")
    out.mkdir(parents=True, exist_ok=True)
    robust = robustness_table(records)
    probed = sorted({str(r.get("families", "all")) for r in records.values()})  # what --probes each run had
    probes = f"cul bench --probes {probed[0]}" if len(probed) == 1 else "cul bench --probes, as each run"
    beyond = beyond_retraining_table(records)
    (out / "table.md").write_text(
        benchmark_table(found)
        + (f"\n### Under attack (`{probes}`)\n\n" + robust if robust else "")
        + (
            "\n### Beyond retraining (recovery over the retrained model's on the same probe, counted where "
            "higher)\n\n" + beyond
            if beyond
            else ""
        )
        + "\n### At equal steps\n\n"
        + side_by_side(found)
        + "\n### Every step\n\n"
        + "\n".join(steps_table(k, v) for k, v in found.items())
    )
    metric_curves(found, out / "metrics.png", "continual unlearning on the world: all methods")
    console.print((out / "table.md").read_text())
    console.print(f"-> {out}/table.md, {out}/metrics.png")
    if records:
        from cul.plots import robustness_bars

        steps = sorted({r["steps"] for r in records.values()})
        requests = "request" if steps == [1] else "requests"
        title = f"recovery after {'/'.join(map(str, steps))} {requests} ({probes})"
        console.print(f"-> {robustness_bars(records, out / 'robustness.png', title=title, runs=list(found))}")


hooks_app = typer.Typer(help="Promotion in the MLflow UI starts the next request (a webhook).", no_args_is_help=True)
app.add_typer(hooks_app, name="hooks")
SECRET_ENV = "CUL_WEBHOOK_SECRET"


def _secret() -> str:
    import os

    if not (secret := os.environ.get(SECRET_ENV, "")):
        _fail(f"set {SECRET_ENV}: the webhook's shared secret (unsigned deliveries are refused)")
    return secret


@hooks_app.command("serve")
def hooks_serve(
    deployment: str = typer.Option("cul-continual/dispatch", help="FLOW/DEPLOYMENT started by a promotion."),
    host: str = typer.Option("0.0.0.0", help="Address to listen on."),
    port: int = typer.Option(8090, help="Port to listen on."),
    model: str | None = typer.Option(None, help="The registered model (default: params' pipeline.tracking)."),
    params: Path = ParamsOpt,
) -> None:
    """Receive MLflow's alias webhook: a `champion` move of this lineage starts DEPLOYMENT."""
    from flows.promotion import serve as serve_hook

    model = model or _params(params).pipeline.tracking.registered_model
    console.print(f"promotions of {model} start {deployment}; listening on {host}:{port} (POST /mlflow)")
    serve_hook(model, deployment, _secret(), host, port)


@hooks_app.command("install")
def hooks_install(
    url: str = typer.Argument(..., help="Where MLflow reaches `cul hooks serve`: http(s)://HOST:PORT/mlflow."),
    params: Path = ParamsOpt,
) -> None:
    """Register (or replace) the MLflow webhook that tells `cul hooks serve` of alias moves."""
    from mlflow.exceptions import MlflowException

    from cul.io.tracking import Tracker

    tracker = Tracker(_params(params).pipeline.tracking)
    try:
        hook = tracker.install_webhook(url, _secret())
    except MlflowException as e:
        _fail(f"MLflow refused the webhook: {e.message}")
    console.print(f"webhook {hook} -> {url} on model_version_alias.created")


concept_app = typer.Typer(help="The concept catalogue: what requests may name.", no_args_is_help=True)
app.add_typer(concept_app, name="concept")
CatalogueOpt = typer.Option(None, "--catalogue", help="A catalogue name or file (default: pipeline.catalogue).")


def _catalogue(p: Params, catalogue: str | None):
    from cul.catalogue import Catalogue, CatalogueError

    try:
        return Catalogue.load(catalogue or p.pipeline.catalogue)
    except CatalogueError as e:
        _fail(str(e))


@concept_app.command("list")
def concept_list(catalogue: str | None = CatalogueOpt, params: Path = ParamsOpt) -> None:
    """Every concept of the catalogue with its synonyms, paraphrases, neighbours and surrogates."""
    cat = _catalogue(_params(params), catalogue)
    t = Table(title=f"catalogue {cat.name}: {len(cat.concepts)} concepts")
    for col in ("category", "concept", "synonyms", "paraphrases", "neighbours", "surrogates"):
        t.add_column(col)
    for c in cat.concepts:
        cells = (c.category, c.name, *(", ".join(x) for x in (c.synonyms, c.paraphrases, c.neighbours, c.surrogates)))
        t.add_row(*(Text(x) for x in cells))
    console.print(t)


@concept_app.command("add")
def concept_add(
    name: str = typer.Argument(..., help="The concept's name, as prompts write it."),
    category: str = typer.Option(..., help="Its category: an existing one (object, style...) or a new one."),
    synonyms: list[str] = typer.Option([], "--synonym", help="Another name of it (repeatable)."),
    paraphrases: list[str] = typer.Option([], "--paraphrase", help="A held-out wording for probing (repeatable)."),
    descriptions: list[str] = typer.Option(
        [], "--description", help="A phrase that describes it without naming it, for probing (repeatable)."
    ),
    neighbours: list[str] = typer.Option([], "--neighbour", help="A concept to keep when it is forgotten."),
    surrogates: list[str] = typer.Option([], "--surrogate", help="What it may be mapped to when erased."),
    model: Path | None = typer.Option(None, help="Rank automatic choices by this model's noise predictions."),
    catalogue: str | None = CatalogueOpt,
    params: Path = ParamsOpt,
) -> None:
    """Add a concept to the catalogue; missing neighbours and surrogates are chosen automatically
    (text embedding, then the model's noise predictions) and written into the entry for review."""
    from pydantic import ValidationError

    from cul.catalogue import CATALOGUES, CatalogueError, ConceptEntry
    from cul.text import TextEncoder

    p = _params(params)
    target = catalogue or p.pipeline.catalogue
    cat = _catalogue(p, target)
    path = Path(target) if Path(target).suffix in (".yaml", ".yml") else CATALOGUES / f"{target}.yaml"
    try:
        entry = ConceptEntry(
            name=name,
            category=category,
            synonyms=synonyms,
            paraphrases=paraphrases,
            descriptions=descriptions,
            neighbours=neighbours,
            surrogates=surrogates,
        )
        m = _model(model) if model else None
        entry = cat.add(entry, TextEncoder.from_minilm().pooled, model=m)
    except ValidationError as e:
        _fail("refused: " + "; ".join(f"{'.'.join(map(str, x['loc'])) or 'entry'}: {x['msg']}" for x in e.errors()))
    except (CatalogueError, KeyError) as e:
        _fail(f"refused: {str(e).strip(chr(34))}")
    lines = path.read_text().splitlines()
    header = "".join(line + "\n" for line in itertools.takewhile(lambda line: line.startswith("#"), lines))
    cat.save(path, header=header)
    how = f" (chosen: {entry.chosen['rule']})" if entry.chosen else ""
    console.print(
        Text(
            f"added {entry.name} ({entry.category}) to {path}: neighbours {', '.join(entry.neighbours) or '-'}; "
            f"surrogates {', '.join(entry.surrogates) or '-'}{how}"
        )
    )


@app.command()
def vocab(params: Path = ParamsOpt) -> None:
    """The active catalogue's concepts (the same as `cul concept list`)."""
    concept_list(None, params)


if __name__ == "__main__":  # pragma: no cover
    app()
