import json
import re

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from cul.cli import app

runner = CliRunner()
COMMANDS = [
    "world",
    "pretrain",
    "judge",
    "generate",
    "eval",
    "run",
    "vocab",
    "bench",
    "retrain",
    "report",
    "step",
    "promote",
    "versions",
    "serve",
    "request add",
    "request list",
    "request retry",
]


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help(command):
    result = runner.invoke(app, [*command.split(), "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage" in result.output


def test_generate_writes_a_png(root, tmp_path, monkeypatch):
    monkeypatch.chdir(root)
    out = tmp_path / "out.png"
    result = runner.invoke(
        app,
        [
            "generate",
            "a red circle on a striped background",
            "-o",
            str(out),
            "--n",
            "2",
            "--steps",
            "4",
            "--scale",
            "1",
        ],
    )
    assert result.exit_code == 0, result.output
    img = np.asarray(Image.open(out))
    assert img.shape == (34, 67, 3)  # two 32 px images with 1 px borders


def test_generate_refuses_an_empty_prompt(root, tmp_path, monkeypatch):
    monkeypatch.chdir(root)
    result = runner.invoke(app, ["generate", "  ", "-o", str(tmp_path / "x.png")])
    assert result.exit_code != 0
    assert "empty" in result.output


def _text(output: str) -> str:
    """What a person reads in typer's boxed error: the words, without the box or line breaks."""
    return " ".join(re.sub(r"[\u2500-\u257f]", " ", output).split())


def test_a_missing_or_empty_params_file_is_an_error_not_defaults(tmp_path):
    result = runner.invoke(app, ["world", "--params", str(tmp_path / "nope.yaml"), "--out", str(tmp_path / "w")])
    assert result.exit_code != 0 and "no such params file" in _text(result.output)
    (tmp_path / "empty.yaml").write_text("")
    result = runner.invoke(app, ["world", "--params", str(tmp_path / "empty.yaml"), "--out", str(tmp_path / "w")])
    assert result.exit_code != 0 and "empty" in _text(result.output)
    assert not (tmp_path / "w").exists()


def test_bad_params_file_names_the_bad_key(tmp_path):
    bad = tmp_path / "params.yaml"
    bad.write_text("pretrain:\n  stepz: 3\n")
    result = runner.invoke(app, ["world", "--params", str(bad), "--out", str(tmp_path / "w")])
    assert result.exit_code != 0
    assert "stepz" in result.output


def test_world_stage_writes_reference_images_and_vocabulary(root, tmp_path):
    from cul.data import load_reference

    result = runner.invoke(app, ["world", "--params", str(root / "params.yaml"), "--out", str(tmp_path / "w")])
    assert result.exit_code == 0, result.output
    ref = load_reference(tmp_path / "w")
    assert ref.shape == (512, 3, 32, 32)
    assert (tmp_path / "w" / "preview.png").exists()
    assert (tmp_path / "w" / "vocabulary.json").exists()


def test_request_queue_commands(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text(f"pipeline:\n  requests_file: {tmp_path / 'queue.yaml'}\n")
    ok = runner.invoke(app, ["request", "add", "Red", "--note", "ticket 9", "--by", "dpo", "-p", str(params)])
    assert ok.exit_code == 0 and "queued r001: forget red (colour)" in ok.output
    again = runner.invoke(app, ["request", "add", "red", "-p", str(params)])
    assert again.exit_code == 1 and "already requested" in again.output
    unknown = runner.invoke(app, ["request", "add", "pikachu", "-p", str(params)])
    assert unknown.exit_code == 1 and "unknown concept" in unknown.output
    listing = runner.invoke(app, ["request", "list", "-p", str(params)])
    assert listing.exit_code == 0 and "r001" in listing.output and "pending" in listing.output
    early = runner.invoke(app, ["request", "retry", "r001", "-p", str(params)])
    assert early.exit_code == 1 and "only a request waiting for review" in early.output

    from cul.queue import RequestQueue, State

    RequestQueue(tmp_path / "queue.yaml").update("r001", state=State.review, reasons=["UA on red 50.0% < 90%"])
    retry = runner.invoke(app, ["request", "retry", "r001", "-p", str(params)])
    assert retry.exit_code == 0 and "pending again" in retry.output
    assert RequestQueue(tmp_path / "queue.yaml").get("r001").state == State.pending
    # a request the dispatcher gave up on (max_tries runs ended without settling it) can be retried,
    # with a fresh count of tries but its dispatch counter kept (a new dispatch key, a new flow run)
    RequestQueue(tmp_path / "queue.yaml").update("r001", tries=3, dispatches=3)
    retry = runner.invoke(app, ["request", "retry", "r001", "-p", str(params)])
    assert retry.exit_code == 0
    again = RequestQueue(tmp_path / "queue.yaml").get("r001")
    assert (again.state, again.tries, again.dispatches) == (State.pending, 0, 3)


def test_report_tables_every_method_and_step_with_the_base_model_first(tmp_path):
    import json

    def step(k, concept, ua, fd_ratio):
        return {
            "step": k,
            "concept": concept,
            "ua": ua,
            "ra_in": 0.9,
            "ra_cross": 0.8,
            "ra_neighbour": 0.7,
            "fd_ratio": fd_ratio,
            "drift": 1.5,
            "seconds": 100.0 + k,
            "replay_images": 50,
            "base": {"ua": 0.0, "ra_in": 1.0, "ra_cross": 1.0, "ra_neighbour": 0.95, "fd": 0.3},
        }

    made_by = {
        "recipe_name": "b-recipe",
        "recipe_hash": "0123456789ab",
        "git_commit": "feedbeef" * 5,
        "git_dirty": False,
    }
    # per concept: circle is back in 25% of its images after request 1, gone after request 2
    scores = [{"circle": 0.25, "red": 1.0}, {"circle": 0.0, "red": 0.0625}]
    runs = {
        "a": [
            step(1, "circle", 0.5, 1.2) | {"per_concept": scores[0]},
            step(2, "red", 0.6, 1.4) | {"per_concept": scores[1]},
        ],
        "b": [step(1, "circle", 1.0, 2.0) | made_by],
        # the same recipe on the sequence shuffled by --order-seed 3: a run of its own
        "b-order3": [step(1, "red", 1.0, 2.0) | made_by | {"order_seed": 3}],
    }
    for name, rows in runs.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "results.json").write_text(json.dumps(rows))
    # run a was probed after its last request: its recovery per family, worst and mean
    summary = {"wording": {"mean": 0.125, "worst": 0.5, "worst_probe": "bare:red", "probes": 4}}
    after = {"ua": 0.6, "ra_in": 0.9, "ra_cross": 0.8, "ra_neighbour": 0.7, "fd_ratio": 1.4}
    robustness = {"method": "a", "sequence": "s.yaml", "steps": 2, "after": after, "summary": summary}
    robustness["families"] = "wording"  # what its --probes was
    (tmp_path / "a" / "robustness.json").write_text(json.dumps(robustness))
    result = runner.invoke(app, ["report", "--runs", str(tmp_path)])
    assert result.exit_code == 0, result.output
    table = (tmp_path / "table.md").read_text()
    attack = table.split("### Under attack")[1].split("###")[0]
    assert attack.startswith(" (`cul bench --probes wording`)")  # the probes that ran, as they were asked for
    assert "| a | s.yaml | 2 | 60.0 | 90.0 | 80.0 | 70.0 | 1.40 | 50.0 / 12.5 | - |" in attack
    assert (tmp_path / "robustness.png").stat().st_size > 0
    summary, rest = table.split("### Under attack")[0], table.split("### At equal steps")[1]
    side = rest.split("### Every step")[0]
    # at equal steps: b stops after request 1, a goes on; a's mean after 1 is (50 + 90 + 80) / 3
    assert "b-recipe: mean / FDx" in side  # a run is named by the recipe its results record
    assert "| 1 (circle) | 73.3 / 1.20 | 90.0 / 2.00 |" in side and "| 2 (red) | 76.7 / 1.40 |  |" in side
    lines = [x for x in summary.splitlines() if x.startswith("| ") and not x.startswith("| method")]
    assert lines[0].startswith("| base model") and "| 95.0 |" in lines[0]
    # method a: its last step (2), mean of UA 60, RA-I 90, RA-C 80 = 76.7, mean cost 101.5 -> 102
    assert lines[1].startswith("| a | 2 | 60.0 | 90.0 | 80.0 | 70.0 | 76.7 | 1.40 |") and "| 102 |" in lines[1]
    assert "| 1 of 2 |" in lines[1] and "| 1.50 | - | 101 |" in lines[2]  # the UA rule fails after request 1 only
    assert lines[2].startswith("| b-recipe | 1 | 100.0 |") and lines[2].endswith("| `01234567` @ `feedbee` |")
    assert lines[3].startswith("| b-recipe (order 3) | 1 | 100.0 |")
    assert lines[1].endswith("| - |")  # a result that records no recipe says so
    assert "| 1 | circle | 50.0 |" in table and "| 2 | red | 60.0 |" in table
    assert (tmp_path / "metrics.png").stat().st_size > 0
    (tmp_path / "a" / "robustness.json").write_text('{"method": "a",')  # cut short by a crash
    result = runner.invoke(app, ["report", "--runs", str(tmp_path)])
    assert result.exit_code == 1 and "robustness.json is not readable JSON" in result.output, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)


def test_the_robustness_legend_names_the_length_of_runs_that_differ_in_it():
    from cul.plots import run_labels

    ten, eight = {"steps": 10, "summary": {}}, {"steps": 8, "summary": {}}
    assert run_labels({"dfr": ten, "ca": ten}) == {"dfr": "dfr (mean)", "ca": "ca (mean)"}
    assert run_labels({"dfr": ten, "dfr_stereo": eight}) == {
        "dfr": "dfr (mean, after 10)",
        "dfr_stereo": "dfr_stereo (mean, after 8)",
    }


def test_at_equal_steps_leaves_out_the_requests_no_run_judged():
    from cul.reports import side_by_side

    def row(k, concept, judged):
        scores = {"ua": 1.0, "ra_in": 1.0, "ra_cross": 0.7, "fd_ratio": 1.5} if judged else {}
        return {"step": k, "concept": concept, "evaluated": judged, **scores}

    every_2nd = [row(1, "circle", False), row(2, "red", True)]
    table = side_by_side({"a": every_2nd, "b": [row(1, "circle", True), row(2, "red", True)]})
    assert "| 1 (circle) | n/a / n/a | 90.0 / 1.50 |" in table  # b judged it: the row stays
    assert "(circle)" not in side_by_side({"a": every_2nd}) and "| 2 (red) | 90.0 / 1.50 |" in side_by_side(
        {"a": every_2nd}
    )


def test_the_base_reference_is_judged_against_the_longest_forgotten_set_of_any_run():
    from cul.reports import benchmark_table

    def row(k, ra, **more):
        return {
            "step": k,
            "concept": "c",
            "ua": 1.0,
            "ra_in": 1.0,
            "ra_cross": 1.0,
            "ra_neighbour": 1.0,
            "seconds": 1.0,
            "base": {"ua": 0.0, "ra_in": ra, "ra_cross": ra, "ra_neighbour": ra},
            **more,
        }

    gated = [
        row(1, 0.9, mode="gated", forgotten=["c"], accepted=True),
        row(2, 0.9, mode="gated", forgotten=["c"], accepted=False),
    ]
    plain = [row(1, 0.9), row(2, 0.8), row(3, 0.7), {**row(4, 0.6), "base": None, "evaluated": False}]
    table = benchmark_table({"gated first": gated, "plain": plain})
    assert "| base model (reference) | 0 | 0.0 | 70.0 |" in table  # plain's 3rd step: 3 forgotten, the most judged
    assert "| plain | 4 |" in table and "| gated first, 1 of 2 accepted | 2 |" in table


def test_an_unreadable_results_file_is_refused_with_a_message(tmp_path):
    from cul.benchmark import BenchmarkError, _load_results
    from cul.unlearning.recipes import DFRRecipe

    (tmp_path / "results.json").write_text('[{"step": 1, "concept"')  # cut short
    with pytest.raises(BenchmarkError, match="not readable JSON.*move it away"):
        _load_results(tmp_path, DFRRecipe(), "dfr", print)


def test_a_branch_starts_from_another_gated_runs_champion_and_goes_on_under_its_own_recipe(tmp_path):
    from cul.benchmark import BenchmarkError, _load_results, branch_results
    from cul.unlearning.recipes import DFRRecipe

    source, out = tmp_path / "a" / "run", tmp_path / "b" / "branch"
    entries = [
        {"step": k, "mode": "gated", "recipe_hash": "other", "champion": f"steps/0{k}/attempt-0/model"}
        for k in (1, 2, 3)
    ]
    source.mkdir(parents=True)
    (source / "results.json").write_text(json.dumps(entries))
    with pytest.raises(BenchmarkError, match="not on disk"):
        branch_results(source, 2, out)
    (source / "steps/02/attempt-0/model").mkdir(parents=True)
    branch_results(source, 2, out)
    made = json.loads((out / "results.json").read_text())
    assert [e["step"] for e in made] == [1, 2] and {e["inherited_from"] for e in made} == {"../../a/run"}
    assert (out / made[-1]["champion"]).resolve() == (source / "steps/02/attempt-0/model").resolve()
    # another recipe goes on from there; only its own entries must share its hash
    kept = _load_results(out, DFRRecipe(), "dfr", print, mode="gated", weights=lambda rs: out / rs[-1]["champion"])
    assert len(kept) == 2
    assert not branch_results(source, 2, out)  # started already: left as it is
    with pytest.raises(BenchmarkError, match="not a branch of"):
        branch_results(source, 1, out)
    # its source's weights gone: refused, not started again from the base model
    (source / "steps/02/attempt-0/model").rmdir()
    with pytest.raises(BenchmarkError, match="not on disk"):
        _load_results(out, DFRRecipe(), "dfr", print, mode="gated", weights=lambda rs: out / rs[-1]["champion"])
    with pytest.raises(BenchmarkError, match="has 3 requests"):
        branch_results(source, 4, tmp_path / "c")
    (source / "results.json").write_text(json.dumps([{**e, "mode": "plain"} for e in entries]))
    with pytest.raises(BenchmarkError, match="not a gated run"):
        branch_results(source, 2, tmp_path / "d")
    (out / "results.json").write_text('[{"step": 1,')  # a branch's own file cut short: a message
    with pytest.raises(BenchmarkError, match="not readable JSON"):
        branch_results(source, 2, out)


def test_a_branch_reports_its_own_requests_and_marks_what_it_inherited(tmp_path):
    from cul.reports import benchmark_table, load_runs, steps_table

    scores = {"ua": 1.0, "ra_in": 1.0, "ra_cross": 1.0, "ra_neighbour": 1.0, "fd_ratio": 1.1, "drift": 1.0}
    run = {"mode": "gated", "accepted": True, "base": None, "per_concept": {}, **scores}
    inherited = [
        {**run, "step": k, "concept": c, "seconds": 1000.0, "inherited_from": "../src", "recipe_name": "a"}
        for k, c in ((1, "red"), (2, "circle"))
    ]
    (tmp_path / "branch").mkdir()
    (tmp_path / "branch" / "results.json").write_text(json.dumps(inherited))
    assert load_runs(tmp_path) == {}  # nothing of its own yet: not a run to report
    results = [*inherited, {**run, "step": 3, "concept": "star", "seconds": 100.0, "recipe_name": "b"}]
    (tmp_path / "branch" / "results.json").write_text(json.dumps(results))
    [(name, _)] = load_runs(tmp_path).items()
    assert "| 1 | red (src's) |" in steps_table(name, results) and "| 3 | star |" in steps_table(name, results)
    row = benchmark_table({name: results}).splitlines()[-1]
    assert "1 of 1 accepted (from src after request 2)" in row and "| 100 |" in row  # its own seconds


@pytest.mark.parametrize("args", [["--branch", "reports/x:2"], ["--gated", "--branch", "reports/x"]])
def test_bench_refuses_a_branch_it_cannot_read_before_loading_a_model(root, monkeypatch, args):
    monkeypatch.chdir(root)
    result = runner.invoke(app, ["bench", *args])
    assert result.exit_code == 2 and "RUN_FOLDER:K" in result.output


def test_retrain_refuses_a_sequence_that_leaves_a_kind_empty_before_training(root, tmp_path, monkeypatch):
    monkeypatch.chdir(root)
    import cul.world as w

    seq = tmp_path / "textures.yaml"
    seq.write_text("requests:\n" + "".join(f"  - {{concept: {t.name}, kind: texture}}\n" for t in w.TEXTURES))
    result = runner.invoke(app, ["retrain", "--sequence", str(seq), "--out", str(tmp_path / "out")])
    assert result.exit_code == 2 and "leaves no texture to draw" in _text(result.output)
    assert not (tmp_path / "out").exists()


def test_relapses_count_a_share_at_the_limit_as_kept_and_a_missing_score_as_back():
    from cul.reports import relapses

    at_limit = [{"concept": "circle", "per_concept": {"circle": 0.1}}]
    assert relapses(at_limit) == 0  # 1 of 10 images: exactly the gate's 10%, which it passes
    missing = at_limit + [{"concept": "red", "per_concept": {"circle": 0.0}}]
    assert relapses(missing) == 1  # red has no score after its own request: the gate rejects that
    assert relapses(missing + [{"concept": "star"}]) is None  # a step without scores: unknown
    # a step `--eval-every` skipped counts neither way, but its concept is forgotten from then on
    skipped = [{"concept": "circle", "per_concept": None, "evaluated": False}]
    later = {"concept": "red", "per_concept": {"circle": 0.5, "red": 0.0}}
    assert relapses(skipped + [later]) == 1 and relapses(skipped) == 0


def test_sigterm_interrupts_a_run_like_ctrl_c_and_the_old_handler_comes_back():
    import os
    import signal
    import time

    from cul.cli import _sigterm_as_interrupt

    seen: list[int] = []
    original = signal.signal(signal.SIGTERM, lambda signum, frame: seen.append(signum))  # never kills pytest
    try:
        before = signal.getsignal(signal.SIGTERM)
        with pytest.raises(KeyboardInterrupt), _sigterm_as_interrupt():
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # the handler runs at the next bytecode: never reached
        assert signal.getsignal(signal.SIGTERM) is before and seen == []
    finally:
        signal.signal(signal.SIGTERM, original)


def test_tables_are_not_cut_when_stdout_is_a_log():
    """Off a terminal (a log, CI) rich would draw 80 columns and cut the flow summary's cells to
    "1…"; the console is wider there, and COLUMNS still decides when set."""
    import os
    import subprocess
    import sys

    code = (
        "from cul import cli; from cul.config import Params\n"
        "r = dict(request='req-01-circle', version=3, step='steps/01', accepted=True, attempts=2, ua=1.0,"
        " ra_in=1.0, ra_cross=1.0, ra_neighbour=1.0, fd_ratio=1.13, seconds_step=719, seconds_total=1116,"
        " overhead=0.12)\n"
        "cli._print_steps([r], 1116.0, Params())"
    )
    env = {k: v for k, v in os.environ.items() if k != "COLUMNS"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True).stdout
    assert "…" not in out and "1.13" in out and "100" in out
    narrow = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env={**env, "COLUMNS": "60"}, check=True
    ).stdout
    assert "…" in narrow  # the user's width, even when it cuts
