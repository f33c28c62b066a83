"""Concept Ablation (Kumari et al., ICCV 2023), the model-based variant.

On images x_0 of the anchor (surrogate) concept, the student's prediction for the target prompt
is matched to the frozen teacher's prediction for the anchor prompt:

    L = E_{x_0 ~ T(p_m), t, eps} || eps_theta(x_t, t, p_f) - sg[eps_T(x_t, t, p_m)] ||^2

so the concept's prompt comes to draw the anchor. Trained on cross-attention K/V.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from cul.unlearning.objectives.common import ForgetOnly, noised


class ConceptAblation(ForgetOnly):
    def forget_term(self, student, batches, gen: torch.Generator) -> torch.Tensor:
        b = batches.forget(gen)
        x_t, t, _ = noised(self.teacher, b.x0_mapped, gen)
        with torch.no_grad():
            target = self.teacher.predict_noise(x_t, t, self.teacher.encode_prompts(b.mapped))
        return F.mse_loss(student.predict_noise(x_t, t, student.encode_prompts(b.forget)), target)
