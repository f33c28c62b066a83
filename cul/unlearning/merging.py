"""TIES merging of independently erased models (CUR's model-merging add-on).

Each concept is erased from theta_0 on its own; the task vectors tau_i = theta_i - theta_0 are
trimmed to their top-k entries by magnitude, a sign is elected per entry by the sum of the trimmed
vectors, the entries that agree with it are averaged, and lambda times the result is added to
theta_0. Only the named parameters (cross-attention K/V and the text path) are merged.
"""

from __future__ import annotations

import torch


def ties_merge(
    base: dict[str, torch.Tensor],
    finetuned: list[dict[str, torch.Tensor]],
    keys: list[str],
    k: float = 0.5,
    lam: float = 1.5,
) -> dict[str, torch.Tensor]:
    """A new state dict: `base` with the TIES merge of `finetuned` applied to `keys`."""
    if not 0 < k <= 1:
        raise ValueError(f"TIES keeps a fraction k in (0, 1] of each task vector, got {k}")
    if not finetuned:
        return {n: v.clone() for n, v in base.items()}
    merged = {n: v.clone() for n, v in base.items()}
    for name in keys:
        taus = torch.stack([f[name] - base[name] for f in finetuned])  # [m, ...]
        flat = taus.reshape(len(finetuned), -1)
        keep = max(1, int(round(k * flat.shape[1])))
        thresh = flat.abs().topk(keep, dim=1).values[:, -1:]
        trimmed = torch.where(flat.abs() >= thresh, flat, torch.zeros_like(flat))
        sign = torch.sign(trimmed.sum(0))
        agree = (torch.sign(trimmed) == sign) & (trimmed != 0)
        count = agree.sum(0).clamp(min=1)
        mean = (trimmed * agree).sum(0) / count
        merged[name] = base[name] + lam * mean.reshape(base[name].shape)
    return merged
