"""Where models run (`device` in params): gradient checkpointing changes memory, not results; bf16
autocast trains with fp32 weights; settings this machine cannot honour are refused with a message."""

from __future__ import annotations

import pytest
import torch
import yaml
from typer.testing import CliRunner

from cul import device
from cul.catalogue import Catalogue
from cul.cli import app
from cul.device import DeviceError, DeviceSettings
from cul.unlearning.prompts import catalogue_prompt_set
from cul.unlearning.recipes import DFRRecipe
from cul.unlearning.trainer import unlearn


@pytest.fixture(scope="module")
def sd_dir(tmp_path_factory):
    from cul.models.tiny_sd import build_tiny_sd

    return build_tiny_sd(tmp_path_factory.mktemp("sd") / "tiny-sd")


@pytest.fixture()
def settings():
    yield
    device.configure(DeviceSettings())  # the next tests run with the defaults again


def _train(sd_dir, settings: DeviceSettings):
    from cul.models import load_model

    device.configure(settings)
    model = load_model(sd_dir)
    prompts = catalogue_prompt_set(Catalogue.load("sd-dfr10"), "Pikachu", seed=0)
    recipe = DFRRecipe(steps=2, replay_steps=1, forget_batch=2, retain_batch=2, addons={"tail_average": 0.0})
    return model, unlearn(model, prompts, recipe, base=model)


def test_gradient_checkpointing_recomputes_the_same_losses_and_weights(sd_dir, settings):
    plain_model, plain = _train(sd_dir, DeviceSettings(type="cpu"))
    ckpt_model, ckpt = _train(sd_dir, DeviceSettings(type="cpu", gradient_checkpointing=True))
    assert ckpt_model.unet.is_gradient_checkpointing and not plain_model.unet.is_gradient_checkpointing
    assert [h["loss"] for h in ckpt.history] == pytest.approx([h["loss"] for h in plain.history], rel=1e-5)
    for (name, a), b in zip(plain.student.unet.state_dict().items(), ckpt.student.unet.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-6), name


def test_bf16_autocast_trains_in_bf16_and_keeps_fp32_weights(sd_dir, settings):
    _, plain = _train(sd_dir, DeviceSettings(type="cpu"))
    _, bf16 = _train(sd_dir, DeviceSettings(type="cpu", precision="bf16"))
    assert {p.dtype for p in bf16.student.unet.parameters()} == {torch.float32}
    first, first_bf16 = plain.history[0]["loss"], bf16.history[0]["loss"]
    assert first_bf16 != first and first_bf16 == pytest.approx(first, rel=0.1)  # bf16 rounding, same objective
    with device.autocast():
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
@pytest.mark.parametrize(
    "asked, says",
    [({"type": "cuda"}, "no CUDA GPU"), ({"type": "cpu", "precision": "fp16"}, "fp16 autocast needs a CUDA GPU")],
)
def test_settings_this_machine_cannot_honour_are_refused_with_a_message(sd_dir, tmp_path, settings, asked, says):
    with pytest.raises(DeviceError, match=says):
        DeviceSettings(**asked).resolved()
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"device": asked}))
    result = CliRunner().invoke(app, ["generate", "a dog", "--model", str(sd_dir), "--params", str(params)])
    assert result.exit_code == 1 and says in result.output and "Traceback" not in result.output
