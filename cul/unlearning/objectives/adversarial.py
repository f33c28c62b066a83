"""AdvUnlearn's inner step (Zhang et al., "Defensive Unlearning with Adversarial Training for
Robust Concept Erasure in Diffusion Models", NeurIPS 2024), shared by the erasers that offer it.

Before each forget term, find the text context within a ball around the forget prompt's under
which the student draws the concept again,

    delta* = argmin_{|delta_i| <= radius |c_i|}  || eps_theta(x_t, t, c + delta) - eps_T(x_t, t, c) ||^2,

(T: a teacher that still draws the concept), and train on `c + delta*` too: the erasure should hold
for the contexts an attacker would reach near the prompt's own, not only for the prompt's. A
learned embedding far from it (textual inversion) is outside the ball: measured here, it still
revives the concept. Each training step pays `steps` extra forward and backward passes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def adversarial_context(student, concept_teacher, x_t, t, context: torch.Tensor, adv) -> torch.Tensor:
    """The context within `adv.radius` (per token, relative) of `context` under which the
    student's prediction is closest to the concept teacher's on `context`: normalised gradient
    descent, projected on the ball after every step. `adv`: `cul.unlearning.recipes.Adversarial`."""
    with torch.no_grad():
        concept_eps = concept_teacher.predict_noise(x_t, t, context)
    scale = context.norm(dim=-1, keepdim=True)
    delta = torch.zeros_like(context, requires_grad=True)
    for _ in range(adv.steps):
        # a sum, not a mean: only the gradient's direction is used, and a mean over every latent
        # element gives gradients small enough to vanish in half precision (Stable Diffusion on GPU)
        loss = F.mse_loss(student.predict_noise(x_t, t, context + delta), concept_eps, reduction="sum")
        (grad,) = torch.autograd.grad(loss, delta)
        with torch.no_grad():
            step = delta - adv.step_size * scale * grad / (grad.norm(dim=-1, keepdim=True) + 1e-12)
            norm = step.norm(dim=-1, keepdim=True)
            step = step * torch.clamp(adv.radius * scale / (norm + 1e-12), max=1.0)
        delta = step.requires_grad_(True)
    return (context + delta).detach()
