"""Concept Ablation (Kumari et al., ICCV 2023), the model-based variant.

On images x_0 of the anchor (surrogate) concept, the student's prediction for the target prompt
is matched to the frozen teacher's prediction for the anchor prompt:

    L = E_{x_0 ~ T(p_m), t, eps} || eps_theta(x_t, t, p_f) - sg[eps_T(x_t, t, p_m)] ||^2

so the concept's prompt comes to draw the anchor. Trained on cross-attention K/V. With
`adversarial` (AdvUnlearn, `objectives/adversarial.py`) the same match is also asked of the
context c_f + delta* near the prompt's under which the student draws the concept again:

    L_adv = E || eps_theta(x_t, t, c_f + delta*) - sg[eps_T(x_t, t, p_m)] ||^2
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from cul.unlearning.objectives.adversarial import adversarial_context
from cul.unlearning.objectives.common import ForgetOnly, noised


class ConceptAblation(ForgetOnly):
    def __init__(self, recipe, teacher, keep_teacher=None, reference=None) -> None:
        super().__init__(recipe, teacher)
        adv = recipe.adversarial
        self.weights = {"unl": 1.0, **({"adv": adv.weight} if adv is not None else {})}

    def forget_term(self, student, batches, gen: torch.Generator) -> torch.Tensor:
        return self._terms(student, batches, gen, adversarial=False)["unl"]

    def losses(self, student, batches, gen: torch.Generator) -> dict[str, torch.Tensor]:
        return self._terms(student, batches, gen, adversarial=self.recipe.adversarial is not None)

    def _terms(self, student, batches, gen: torch.Generator, adversarial: bool) -> dict[str, torch.Tensor]:
        b = batches.forget(gen)
        x_t, t, _ = noised(self.teacher, b.x0_mapped, gen)
        with torch.no_grad():
            target = self.teacher.predict_noise(x_t, t, self.teacher.encode_prompts(b.mapped))
        context = student.encode_prompts(b.forget)
        terms = {"unl": F.mse_loss(student.predict_noise(x_t, t, context), target)}
        if adversarial:
            found = adversarial_context(student, self.teacher, x_t, t, context, self.recipe.adversarial)
            terms["adv"] = F.mse_loss(student.predict_noise(x_t, t, found), target)
        return terms
