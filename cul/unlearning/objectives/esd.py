"""Erased Stable Diffusion, ESD-x (Gandikota et al., ICCV 2023).

The student's prediction for the concept c is matched to the teacher's negatively guided one:

    L = E || eps_theta(x_t, t, c) - sg[eps_T(x_t, t, "") - eta (eps_T(x_t, t, c) - eps_T(x_t, t, ""))] ||^2

x_t comes from the teacher's own samples of the concept in context (standing in for ESD's partial
sampling). `erase: concept` (as published) conditions on the concept's name alone; `context` on
the whole forget captions.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from cul.unlearning.objectives.common import ForgetOnly, noised


class ESD(ForgetOnly):
    def forget_term(self, student, batches, gen: torch.Generator) -> torch.Tensor:
        b = batches.forget(gen)
        prompts = [b.concept] * len(b.forget) if self.recipe.erase == "concept" else b.forget
        x_t, t, _ = noised(self.teacher, b.x0_forget, gen)
        with torch.no_grad():
            cond = self.teacher.predict_noise(x_t, t, self.teacher.encode_prompts(prompts))
            uncond = self.teacher.predict_noise(x_t, t, self.teacher.encode_prompts([""] * len(prompts)))
            target = uncond - self.recipe.eta * (cond - uncond)
        return F.mse_loss(student.predict_noise(x_t, t, student.encode_prompts(prompts)), target)
