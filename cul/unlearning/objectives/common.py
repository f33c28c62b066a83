"""What every objective shares: noising teacher samples, and the single-term objective shape."""

from __future__ import annotations

import torch


def noised(model, x0: torch.Tensor, gen: torch.Generator, t_max: int | None = None):
    """(x_t, t, noise) for x0 at timesteps drawn uniformly below `t_max` (default: all of them)."""
    x0 = x0.to(model.device)
    n = x0.shape[0]
    high = t_max if t_max is not None else model.scheduler.config.num_train_timesteps
    t = torch.randint(0, high, (n,), generator=gen).to(x0.device)
    noise = torch.randn(x0.shape, generator=gen).to(x0.device)
    return model.add_noise(x0, noise, t), t, noise


class ForgetOnly:
    """An objective with one term, the forget loss `unl` of weight 1 (CA, ESD, naive)."""

    weights = {"unl": 1.0}

    def __init__(self, recipe, teacher, keep_teacher=None, reference=None) -> None:
        self.recipe, self.teacher = recipe, teacher

    def forget_term(self, student, batches, gen: torch.Generator) -> torch.Tensor:
        raise NotImplementedError

    def losses(self, student, batches, gen: torch.Generator) -> dict[str, torch.Tensor]:
        return {"unl": self.forget_term(student, batches, gen)}
