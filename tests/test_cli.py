import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from cul.cli import app

runner = CliRunner()
COMMANDS = ["world", "pretrain", "judge", "generate", "eval", "run", "vocab", "bench", "report", "step", "promote",
            "versions", "serve", "request add", "request list", "request retry"]


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help(command):
    result = runner.invoke(app, [*command.split(), "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage" in result.output


def test_generate_writes_a_png(root, tmp_path, monkeypatch):
    monkeypatch.chdir(root)
    out = tmp_path / "out.png"
    result = runner.invoke(app, ["generate", "a red circle on a striped background", "-o", str(out),
                                 "--n", "2", "--steps", "4", "--scale", "1"])
    assert result.exit_code == 0, result.output
    img = np.asarray(Image.open(out))
    assert img.shape == (34, 67, 3)  # two 32 px images with 1 px borders


def test_generate_refuses_an_empty_prompt(root, tmp_path, monkeypatch):
    monkeypatch.chdir(root)
    result = runner.invoke(app, ["generate", "  ", "-o", str(tmp_path / "x.png")])
    assert result.exit_code != 0
    assert "empty" in result.output


def test_bad_params_file_names_the_bad_key(tmp_path):
    bad = tmp_path / "params.yaml"
    bad.write_text("pretrain:\n  stepz: 3\n")
    result = runner.invoke(app, ["world", "--params", str(bad), "--out", str(tmp_path / "w")])
    assert result.exit_code != 0
    assert "stepz" in result.output


def test_world_stage_writes_reference_images_and_vocabulary(tmp_path):
    from cul.data import load_reference

    result = runner.invoke(app, ["world", "--params", str(tmp_path / "none.yaml"), "--out", str(tmp_path / "w")])
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
