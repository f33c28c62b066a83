"""Erasure that holds after fine-tuning (meta-unlearning: Gao et al., "Meta-Unlearning on Diffusion
Models: Preventing Relearning Unlearned Concepts", 2024), in a continual step.

"Erased or Dormant?": a few fine-tuning steps on data the model keeps, a neighbour of the concept
above all, bring an erased concept back (the `relearn_*` attacks of `cul.probes`;
reports/benchmark/README.md, "Under attack"). Meta-unlearning asks the erasure to hold at the weights
such fine-tuning reaches, not only at the student's own:

    Delta     = FT_k(theta) - theta,       k AdamW steps of the plain denoising loss,
                                           || eps_theta(x_t, t, r) - eps ||^2, on theta_0's images
                                           of retained captions r (the neighbours', all of them,
                                           or half of each)
    L_relearn = L_unl(theta + sg[Delta]).

Its gradient in theta is L_unl's gradient at the fine-tuned weights: MAML's first-order
approximation, which drops how Delta itself depends on theta. Delta is simulated again from the
student every `every` training steps and held in between. With `hold: request` only the request's
concept is asked to hold at theta + Delta. With `hold: all` the earlier forgotten concepts are too:
the terms that keep them forgotten at theta (their part of L_pres, under `forgotten_target: mapped`
distilled toward theta_0 on the surrogate's caption; L_rehold where the recipe has it) are added at
theta + sg[Delta] as well: after a sequence the attack revives earlier concepts too. With
`neighbours_of: all` the attack simulated is, from a step's second simulation on, the one on a
forgotten concept drawn at random (the request's or an earlier one): Delta fine-tunes on the kept
captions that name that concept's kept neighbours, the data of the `relearn_neighbour` attack on it
(for the request's concept, its prompt set's neighbour captions, which also hold the neighbours
found by text embedding).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from cul import threads
from cul.unlearning.objectives.common import noised


class Shifted:
    """`model` seen at its UNet's weights plus `delta`: `predict_noise` runs the UNet on
    theta + delta, and gradients reach theta. Everything else is `model`'s."""

    def __init__(self, model, delta: dict[str, torch.Tensor]) -> None:
        self.model, self.delta = model, delta

    def predict_noise(self, x_t: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        weights = {n: p + self.delta[n] for n, p in self.model.unet.named_parameters()}
        return self.model.predict_noise(x_t, t, context, weights=weights)

    def __getattr__(self, name: str):
        return getattr(self.model, name)


class RelearningAdversary:
    """The simulated fine-tuning and the erasure terms of one step.

    Args:
        spec: `cul.unlearning.recipes.Relearning`.
    """

    def __init__(self, spec) -> None:
        self.spec = spec
        self.delta: dict[str, torch.Tensor] | None = None
        self.calls = 0
        #: the concept whose attack each simulation so far stood for (its neighbours' captions)
        self.simulated: list[str] = []

    def target(self, batches, gen: torch.Generator) -> str | None:
        """Whose neighbours the next simulation fine-tunes on: None for the request's concept (the
        first simulation of a step, and every one under `neighbours_of: request`); under `all`, from
        the second on, a forgotten concept drawn uniformly, the request's or an earlier one."""
        earlier = list(batches.prompts.neighbour_captions)
        if self.spec.neighbours_of != "all" or not self.simulated or not earlier:
            return None
        pick = int(torch.randint(0, len(earlier) + 1, (1,), generator=gen))
        return earlier[pick - 1] if pick else None

    def simulate(self, student, batches, gen: torch.Generator) -> None:
        """Delta: `spec.steps` AdamW steps (`spec.lr`) of a copy of the student's UNet on batches of
        theta_0's images of retained captions (`spec.data`, about `target`'s neighbours); the student
        is left as it is."""
        spec = self.spec
        about = self.target(batches, gen)
        self.simulated.append(about or batches.prompts.concept)
        scratch = student.copy()
        scratch.unet.train().requires_grad_(True)
        opt = torch.optim.AdamW(scratch.unet.parameters(), lr=spec.lr)
        for _ in range(spec.steps):
            threads.tick()
            b = batches.relearn(gen, spec.data, spec.batch, about)
            x_t, t, noise = noised(student, b.x0, gen)
            with torch.no_grad():
                context = student.encode_prompts(b.prompts)
            loss = F.mse_loss(scratch.predict_noise(x_t, t, context).float(), noise)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        own = dict(student.unet.named_parameters())
        self.delta = {n: (p.detach() - own[n].detach()) for n, p in scratch.unet.named_parameters()}

    def losses(self, student, batches, gen: torch.Generator, held) -> dict[str, torch.Tensor]:
        """`held(model)`, the erasure terms asked to hold (L_unl; with `hold: all` the earlier
        concepts' too), at the student's weights plus Delta. Simulates Delta first when `spec.every`
        steps have passed."""
        if self.calls % self.spec.every == 0:
            self.simulate(student, batches, gen)
        self.calls += 1
        assert self.delta is not None
        return held(Shifted(student, self.delta))
