"""Which parameters train, and the add-on regularizers that keep an eraser from drifting (CUR).

- `select_parameters`: the whole UNet, cross-attention only, or cross-attention K/V only.
- `ParameterAnchor`: L1SP / L2SP (mean over trained parameters, CUR) and DFR's L_reg (sum).
- `SelectiveMask`: SelFT, train only the top-k most important elements (|theta * g|).
- `TailAverage`: the mean of a step's last iterates (Polyak / SWA tail averaging).
- `GradientProjector`: CUR's projection, G <- G P on every linear map that reads the text context
  (cross-attention K and V), so W c is unchanged for c in the protected span.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Literal, cast

import torch
from torch import nn

Trainable = Literal["all", "xattn", "xattn_kv"]


TEXT_PATH = ("encoder_hid_proj", "add_embedding")


def text_input_linears(unet: nn.Module) -> dict[str, nn.Linear]:
    """The linear maps that read the text context: cross-attention K and V, plus (world UNet)
    the context projection and the pooled-text embedding that feeds the time embedding."""
    return {
        name: m
        for name, m in unet.named_modules()
        if isinstance(m, nn.Linear) and (name.endswith((".attn2.to_k", ".attn2.to_v")) or name.startswith(TEXT_PATH))
    }


def text_path_parameters(unet: nn.Module) -> list[str]:
    """Parameters outside cross-attention that also read the prompt (the world UNet feeds a pooled
    text embedding into the time embedding and projects the context once): cross-attention-only
    erasers must train these too, or the concept still flows in around them."""
    return [n for n, _ in unet.named_parameters() if n.startswith(TEXT_PATH)]


def trainable_names(unet: nn.Module, which: Trainable) -> list[str]:
    """Names of the parameters that train: the whole UNet, cross-attention (and the text path),
    or cross-attention K/V (and the text path)."""
    names = [n for n, _ in unet.named_parameters()]
    if which == "all":
        return names
    if which == "xattn":
        chosen = [n for n in names if ".attn2." in n]
    elif which == "xattn_kv":
        chosen = [n for n in names if ".attn2.to_k." in n or ".attn2.to_v." in n]
    else:
        raise ValueError(f"unknown trainable set {which!r}: all, xattn or xattn_kv")
    return chosen + [n for n in text_path_parameters(unet) if n not in chosen]


def select_parameters(unet: nn.Module, which: Trainable) -> dict[str, nn.Parameter]:
    """Name -> parameter of the part of the UNet that trains; the rest is frozen."""
    chosen = set(trainable_names(unet, which))
    params = {}
    for n, p in unet.named_parameters():
        p.requires_grad_(n in chosen)
        if n in chosen:
            params[n] = p
    return params


class ParameterAnchor:
    """Penalty on the distance to reference weights (a snapshot taken at construction)."""

    def __init__(self, params: dict[str, nn.Parameter], reference: dict[str, torch.Tensor] | None = None) -> None:
        self.params = params
        self.reference = {n: (reference[n] if reference else p).detach().clone() for n, p in params.items()}
        self.numel = sum(p.numel() for p in params.values())

    def l2_sum(self) -> torch.Tensor:
        """DFR's L_reg: sum ||theta - theta_{k-1}||^2."""
        return cast(torch.Tensor, sum(((p - self.reference[n]) ** 2).sum() for n, p in self.params.items()))

    def l2_mean(self) -> torch.Tensor:
        """CUR's L2SP: mean (theta - theta_ref)^2 over every trained element."""
        return self.l2_sum() / self.numel

    def l1_mean(self) -> torch.Tensor:
        """CUR's L1SP: mean |theta - theta_ref|."""
        return cast(torch.Tensor, sum((p - self.reference[n]).abs().sum() for n, p in self.params.items()) / self.numel)

    def drift(self) -> float:
        """Euclidean distance to the reference (for reports)."""
        with torch.no_grad():
            return float(self.l2_sum().sqrt())


class SelectiveMask:
    """SelFT: keep the global top-k fraction of elements by importance |theta * g| trainable.

    `restore()` after each optimizer step puts every other element back to its starting value, so
    masked weights stay bit-identical whatever the optimizer (Adam moments, weight decay) does."""

    def __init__(self, params: dict[str, nn.Parameter], importance: dict[str, torch.Tensor], fraction: float) -> None:
        if not 0 < fraction <= 1:
            raise ValueError(f"SelFT fraction must be in (0, 1], got {fraction}")
        self.params = params
        flat = torch.cat([importance[n].flatten() for n in params])
        k = max(1, int(round(fraction * flat.numel())))
        threshold = torch.topk(flat, k).values.min()
        self.mask = {n: importance[n] >= threshold for n in params}
        self.frozen = {n: p.detach().clone() for n, p in params.items()}
        self.fraction = fraction

    @staticmethod
    def importance(
        params: dict[str, nn.Parameter], loss_fn: Callable[[], torch.Tensor], batches: int
    ) -> dict[str, torch.Tensor]:
        """|theta * g| with g the eraser's gradient accumulated over `batches` sampled batches."""
        grads = {n: torch.zeros_like(p) for n, p in params.items()}
        for _ in range(batches):
            for p in params.values():
                p.grad = None
            loss_fn().backward()
            for n, p in params.items():
                if p.grad is not None:
                    grads[n] += p.grad
        for p in params.values():
            p.grad = None
        return {n: (p.detach() * grads[n]).abs() for n, p in params.items()}

    def mask_gradients(self) -> None:
        for n, p in self.params.items():
            if p.grad is not None:
                p.grad.mul_(self.mask[n])

    @torch.no_grad()
    def restore(self) -> None:
        for n, p in self.params.items():
            p.copy_(torch.where(self.mask[n], p, self.frozen[n]))

    def trainable_fraction(self) -> float:
        total = sum(m.numel() for m in self.mask.values())
        return sum(int(m.sum()) for m in self.mask.values()) / total


def projection_matrix(
    c: torch.Tensor, eps: float = 1e-4, dedupe_cos: float = 0.95, max_rank: int | None = None
) -> torch.Tensor:
    """P = I - C (C^T C + eps I)^-1 C^T for C = [d x n] (columns: protected inputs).

    Near-duplicate columns (cosine >= `dedupe_cos`) are dropped first. With `max_rank`, C is
    replaced by its top singular directions, so a rich protected set cannot freeze every direction
    of a small text space."""
    c = c.double()
    unit = torch.nn.functional.normalize(c, dim=0)
    keep: list[int] = []
    for j in range(c.shape[1]):
        if not keep or (unit[:, keep].T @ unit[:, j]).max() < dedupe_cos:
            keep.append(j)
    c = c[:, keep]
    if max_rank is not None and max_rank < min(c.shape):
        u, s, _ = torch.linalg.svd(c, full_matrices=False)
        c = u[:, :max_rank] * s[:max_rank]
    d = c.shape[0]
    gram = c.T @ c + eps * torch.eye(c.shape[1], dtype=c.dtype)
    p = torch.eye(d, dtype=c.dtype) - c @ torch.linalg.solve(gram, c.T)
    return p.float()


@torch.no_grad()
def text_layer_inputs(model, prompts: list[str]) -> tuple[dict[str, nn.Linear], dict[str, torch.Tensor]]:
    """The text-reading linear maps of the UNet and what each reads for `prompts` (rows: token
    inputs), recorded with forward pre-hooks so the same code serves the world model and SD."""
    layers = text_input_linears(model.unet)
    captured: dict[str, torch.Tensor] = {}
    hooks = []
    for name, layer in layers.items():

        def hook(mod, args, name=name):
            if name not in captured:  # the context is the same at every denoising step
                captured[name] = args[0].reshape(-1, args[0].shape[-1]).detach().cpu()

        hooks.append(layer.register_forward_pre_hook(hook))
    try:
        ctx = model.encode_prompts(prompts)
        x = torch.zeros((len(prompts), *model.latent_shape()), device=model.device)
        model.predict_noise(x, torch.zeros(len(prompts), dtype=torch.long, device=model.device), ctx)
    finally:
        for h in hooks:
            h.remove()
    return layers, captured


class GradientProjector:
    """CUR's gradient projection on the text-reading linear maps (K and V of cross-attention).

    The protected inputs of each layer are recorded by running the protected prompts' context
    through that very layer's input (forward pre-hooks), so the same code serves the world model
    and Stable Diffusion. After `loss.backward()`, `project()` replaces G by G P."""

    def __init__(
        self,
        layers: dict[str, nn.Linear],
        inputs: dict[str, torch.Tensor],
        eps: float = 1e-4,
        dedupe_cos: float = 0.95,
        max_rank: int | None = None,
        frozen: Iterable[nn.Parameter] = (),
    ) -> None:
        self.layers = layers
        self.P = {n: projection_matrix(inputs[n].T, eps, dedupe_cos, max_rank) for n in layers}
        # biases and norms on the text path would shift W c + b for every prompt: held still
        self.frozen = list(frozen)

    @classmethod
    def from_prompts(cls, model, prompts: list[str], **kw) -> GradientProjector:
        layers, captured = text_layer_inputs(model, prompts)
        weights = {id(m.weight) for m in layers.values()}
        frozen = [
            p
            for n, p in model.unet.named_parameters()
            if id(p) not in weights and (n.startswith(TEXT_PATH) or (".attn2.to_k." in n or ".attn2.to_v." in n))
        ]
        return cls(layers, captured, frozen=frozen, **kw)

    def project(self) -> None:
        for n, layer in self.layers.items():
            g = layer.weight.grad
            if g is not None:
                layer.weight.grad = g @ self.P[n].to(g.device)
        for p in self.frozen:
            p.grad = None


class TailAverage:
    """Running mean of the trainable parameters over the steps from `first_step` on. Not torch's
    `swa_utils.AveragedModel`, which copies the whole module: this keeps only what trains (the
    cross-attention K/V subset on SD is a small part of its UNet)."""

    def __init__(self, params: dict[str, torch.nn.Parameter], first_step: int) -> None:
        self.params, self.first_step, self.count = params, first_step, 0
        self.mean = {n: torch.zeros_like(p) for n, p in params.items()}

    @torch.no_grad()
    def update(self, step: int) -> None:
        if step < self.first_step:
            return
        self.count += 1
        for n, p in self.params.items():
            self.mean[n].add_(p.detach() - self.mean[n], alpha=1.0 / self.count)

    @torch.no_grad()
    def apply(self) -> None:
        """Write the mean into the parameters (a no-op before the first averaged step)."""
        if self.count:
            for n, p in self.params.items():
                p.copy_(self.mean[n])
