"""Where the models run and in what precision (`device` in params.yaml): the embedded world on the
CPU in fp32, Stable Diffusion on a CUDA GPU in bf16 with gradient checkpointing.

Mixed precision (Micikevicius et al., 2018): the weights and AdamW's moments stay fp32; matrix
products and convolutions inside `autocast()` run in bf16 or fp16. fp16's narrow range needs the
loss scaled before the backward pass and the gradients unscaled before clipping and the step
(`grad_scaler()`); bf16 has fp32's range and needs none. Gradient checkpointing keeps only each
UNet block's inputs in the forward pass and recomputes the rest in the backward pass: about a
third more compute for a fraction of the activation memory (the memory of SD's activations is
most of a request's, see docs/stable-diffusion.md).

`configure()` is called once per process with the settings (the CLI and the flows do); the rest
reads them: `load_model` places every model with `place`, the trainer and the sampler wrap their
forward passes in `autocast()`.
"""

from __future__ import annotations

import contextlib
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict

PRECISIONS = {"bf16": torch.bfloat16, "fp16": torch.float16}


class DeviceError(ValueError):
    """Settings this machine cannot honour (CUDA asked for and absent, fp16 on a CPU)."""


class DeviceSettings(BaseModel):
    """`device` in params.yaml."""

    model_config = ConfigDict(extra="forbid")

    #: auto: CUDA when this machine has it, else the CPU; cpu; cuda (an error without a GPU).
    type: Literal["auto", "cpu", "cuda"] = "auto"
    #: fp32, or autocast to bf16 / fp16 (fp16 only on CUDA, with loss scaling).
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    #: recompute activations in the backward pass (the UNet's blocks): less memory, more time.
    gradient_checkpointing: bool = False

    def resolved(self) -> torch.device:
        """The torch device these settings name on this machine."""
        if self.type == "cuda" and not torch.cuda.is_available():
            raise DeviceError("device.type is cuda but this machine has no CUDA GPU (set it to auto or cpu)")
        kind = "cuda" if self.type == "cuda" or (self.type == "auto" and torch.cuda.is_available()) else "cpu"
        if self.precision == "fp16" and kind == "cpu":
            raise DeviceError("fp16 autocast needs a CUDA GPU; on the CPU use bf16 or fp32")
        return torch.device(kind)


_settings = DeviceSettings()


def configure(settings: DeviceSettings) -> None:
    """Adopt `settings` for this process; whether this machine can honour them is checked when a
    model is placed (queueing a request needs no GPU)."""
    global _settings
    _settings = settings


def settings() -> DeviceSettings:
    return _settings


def place(model):
    """Move a `DiffusionModel`'s networks (UNet, text encoder, VAE) to the configured device, and
    turn on gradient checkpointing where configured; returns the model."""
    device = _settings.resolved()
    model.unet.to(device)
    model.text.model.to(device)
    if getattr(model, "vae", None) is not None:
        model.vae.to(device)
    if _settings.gradient_checkpointing:
        model.unet.enable_gradient_checkpointing()
    return model


def autocast():
    """The mixed-precision context of the configured precision (nothing under fp32)."""
    if _settings.precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(_settings.resolved().type, dtype=PRECISIONS[_settings.precision])


def grad_scaler() -> torch.amp.GradScaler:
    """Loss scaling for fp16 (a pass-through otherwise)."""
    return torch.amp.GradScaler(_settings.resolved().type, enabled=_settings.precision == "fp16")
