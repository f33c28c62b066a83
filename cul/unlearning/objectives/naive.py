"""Naive fine-tuning toward a surrogate: the baseline every eraser must beat.

Images x_0 of the surrogate, captioned with the forget prompt, trained with the plain diffusion
loss on the true noise:

    L = E_{x_0 ~ T(p_m), t, eps} || eps_theta(x_t, t, p_f) - eps ||^2
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from cul.unlearning.objectives.common import ForgetOnly, noised


class NaiveFineTuning(ForgetOnly):
    def forget_term(self, student, batches, gen: torch.Generator) -> torch.Tensor:
        b = batches.forget(gen)
        x_t, t, noise = noised(self.teacher, b.x0_mapped, gen)
        return F.mse_loss(student.predict_noise(x_t, t, student.encode_prompts(b.forget)), noise)
