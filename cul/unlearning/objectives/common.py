"""What every objective shares: noising teacher samples, the pushed re-steering target, and the
single-term objective shape."""

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


def pushed_target(teacher, x_t, t, forget: list[str], mapped: list[str], push: float | torch.Tensor) -> torch.Tensor:
    """The re-steering target eps_T(x_t, p_m) + push (eps_T(x_t, p_m) - eps_T(x_t, p_f)), no gradient."""
    with torch.no_grad():
        target = teacher.predict_noise(x_t, t, teacher.encode_prompts(mapped))
        if isinstance(push, torch.Tensor) or push:
            away = target - teacher.predict_noise(x_t, t, teacher.encode_prompts(forget))
            target = target + (push.to(away) if isinstance(push, torch.Tensor) else push) * away
    return target


class ForgetOnly:
    """An objective with one term, the forget loss `unl` of weight 1 (CA, ESD, naive)."""

    weights = {"unl": 1.0}

    def __init__(self, recipe, teacher, keep_teacher=None, reference=None) -> None:
        self.recipe, self.teacher = recipe, teacher

    def forget_term(self, student, batches, gen: torch.Generator) -> torch.Tensor:
        raise NotImplementedError

    def losses(self, student, batches, gen: torch.Generator) -> dict[str, torch.Tensor]:
        return {"unl": self.forget_term(student, batches, gen)}
