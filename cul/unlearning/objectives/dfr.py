"""DFR: Distillation-based Forgetting and Retention (Sony Research, continual unlearning).

One request theta_{k-1} -> theta_k minimises three terms (DFR, eqs. for L_unl, L_pres, L_reg):

    L(theta) = l_unl * L_unl + l_pres * L_pres + l_reg * L_reg

    L_unl  = E_{t < T_max} || eps_theta(x_t, t, p_f) - sg[eps_T(x_t, t, p_m)] ||^2
             contextual trajectory re-steering: on the teacher's images of a forget prompt p_f,
             predict what the teacher predicts for the same context with a surrogate (p_m);
    L_pres = E_t || eps_theta(x_t, t, r) - sg[eps_T(x_t, t, r)] ||^2
             generative replay distillation on the teacher's samples of the retain prompts r;
    L_reg  = || theta - theta_ref ||^2   (sum over the trained weights)

DFR's teacher T is theta_{k-1} throughout. What the production recipe changes (docs/method.md):
`retain_teacher: base` takes the targets of what is kept, and the re-steering targets, from theta_0,
so each step's errors do not become the next step's targets; `forgotten_target: mapped` distils the
earlier forgotten concepts' captions toward theta_0 on the caption with the concept swapped for the
surrogate theta_{k-1} draws for it; `push` moves the re-steering target further from the concept,
eps_T(p_m) + push (eps_T(p_m) - eps_T(p_f)), as ESD's negative guidance does. Two options are not in
the production recipe: `replay_uncond` (also distil eps(x_t, "")) and `coverage` (distil on captions
of many clean scenes, reusing replayed images). `adversarial` (AdvUnlearn) adds

    L_adv  = E || eps_theta(x_t, t, c_f + delta*) - sg[eps_T(x_t, t, p_m)] ||^2,

delta* the inner minimiser of `adversarial_context` (`objectives/adversarial.py`): the context near
the forget prompt's under which theta draws the concept again. `inversion` (STEREO's search,
`objectives/inversion.py`) adds L_inv: the new words textual inversion finds for every forgotten
concept must lead to the surrogate too. `relearning` (meta-unlearning, `objectives/relearning.py`)
adds L_relearn = L_unl(theta + sg[Delta]), Delta a simulated fine-tuning on kept data: the erasure
must hold after it too (with `hold: all`, the earlier concepts' erasure terms as well).
`resteer_images` noises the surrogate's images in L_unl instead of, or beside, the concept's own
(Concept Ablation's x_0 ~ p(x | p_m)), pushed by `surrogate_push` (0: Concept Ablation's target
eps_T(x_t, p_m)). `forgotten_images: both` adds

    L_rehold = E_{t < T_max} || eps_theta(x_t, t, p_g) - sg[pushed eps_T(x_t, t, p_g -> p_m)] ||^2,

L_unl for the earlier forgotten concepts' prompts p_g on theta_0's images of them, weighted as L_unl:
each earlier erasure made again where it was first made, not only on the surrogates theta_{k-1} draws.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from cul.unlearning.batches import ForgetBatch, RetainBatch
from cul.unlearning.objectives.adversarial import adversarial_context
from cul.unlearning.objectives.common import noised, pushed_target
from cul.unlearning.objectives.inversion import InversionAdversary
from cul.unlearning.objectives.relearning import RelearningAdversary


def resteer_images(
    b: ForgetBatch, push: float = 0.0, surrogate_push: float | None = None
) -> tuple[torch.Tensor, list[str], list[str], float | torch.Tensor]:
    """The images L_unl noises, their forget and mapped prompts, and the push on each: the forget
    prompts' samples (DFR), the mapped prompts' (`resteer_images: mapped`), or both, one after the
    other. `surrogate_push` (None: `push`) is the push on the mapped prompts' samples."""
    parts = [
        (x, p)
        for x, p in ((b.x0_forget, push), (b.x0_mapped, push if surrogate_push is None else surrogate_push))
        if x is not None
    ]
    assert parts, "a forget batch without teacher samples"
    x0 = torch.cat([x for x, _ in parts])
    pushes: float | torch.Tensor = parts[0][1]
    if len({p for _, p in parts}) > 1:
        pushes = torch.cat([torch.full((len(x), 1, 1, 1), p, dtype=x.dtype) for x, p in parts])
    return x0, b.forget * len(parts), b.mapped * len(parts), pushes


def resteer_loss(
    student,
    teacher,
    b: ForgetBatch,
    gen: torch.Generator,
    t_max: int,
    push: float = 0.0,
    surrogate_push: float | None = None,
):
    """L_unl on one forget batch (teacher samples of its forget prompts, or of its mapped ones)."""
    x0, forget, mapped, pushes = resteer_images(b, push, surrogate_push)
    x_t, t, _ = noised(teacher, x0, gen, t_max)
    target = pushed_target(teacher, x_t, t, forget, mapped, pushes)
    return F.mse_loss(student.predict_noise(x_t, t, student.encode_prompts(forget)), target)


def adversarial_resteer_loss(
    student, teacher, b: ForgetBatch, gen: torch.Generator, t_max: int, push: float, adv, surrogate_push=None
):
    """L_unl on the adversarial contexts of one forget batch: they too must lead to the surrogate."""
    x0, forget, mapped, pushes = resteer_images(b, push, surrogate_push)
    x_t, t, _ = noised(teacher, x0, gen, t_max)
    context = adversarial_context(student, teacher, x_t, t, student.encode_prompts(forget), adv)
    target = pushed_target(teacher, x_t, t, forget, mapped, pushes)
    return F.mse_loss(student.predict_noise(x_t, t, context), target)


def replay_loss(student, teacher, r: RetainBatch, gen: torch.Generator, uncond: bool = False):
    """L_pres on one retain batch (with `uncond`, the unconditional branch on the same x_t too)."""
    x_t, t, _ = noised(teacher, r.x0, gen)
    ctx = teacher.encode_prompts(r.prompts)
    tctx = teacher.encode_prompts(r.targets) if r.targets is not None else ctx
    if uncond:
        empty = teacher.encode_prompts([""])
        ctx, tctx = torch.cat([ctx, empty.expand_as(ctx)]), torch.cat([tctx, empty.expand_as(tctx)])
        x_t, t = torch.cat([x_t, x_t]), torch.cat([t, t])
    with torch.no_grad():
        target = teacher.predict_noise(x_t, t, tctx)
    return F.mse_loss(student.predict_noise(x_t, t, ctx), target)


def coverage_loss(student, teacher, x0: torch.Tensor, captions: list[str], gen: torch.Generator):
    """L_pres on replayed images noised again and paired with captions that have no images."""
    idx = torch.randint(0, len(captions), (x0.shape[0],), generator=gen).tolist()
    return replay_loss(student, teacher, RetainBatch([captions[i] for i in idx], x0), gen)


class DFR:
    """DFR's objective for one step. `teacher`: theta_{k-1}; `keep_teacher`: the model whose
    predictions are kept (theta_0 under `retain_teacher: base`); `reference`: theta_ref of L_reg."""

    def __init__(self, recipe, teacher, keep_teacher, reference) -> None:
        self.recipe, self.keep, self.reference = recipe, keep_teacher, reference
        mapped = recipe.forgotten_target == "mapped"
        self.teachers = {"retain": keep_teacher if mapped else teacher, "retain_base": keep_teacher}
        self.weights = {
            "unl": recipe.l_unl,
            "rehold": recipe.l_unl,
            "pres": recipe.l_pres,
            "cover": recipe.l_pres,
            "reg": recipe.l_reg,
        }
        if recipe.adversarial is not None:
            self.weights["adv"] = recipe.l_unl * recipe.adversarial.weight
        self.inversion = None
        if recipe.inversion is not None:
            self.weights["inv"] = recipe.l_unl * recipe.inversion.weight
            self.inversion = InversionAdversary(
                recipe.inversion, keep_teacher, recipe.seed, recipe.replay_steps, recipe.replay_guidance
            )
        self.relearning = None
        if recipe.relearning is not None:
            w = recipe.relearning.weight
            self.weights |= {
                "relearn": recipe.l_unl * w,
                "relearn_gone": recipe.l_pres * w,
                "relearn_rehold": recipe.l_unl * w,
            }
            self.relearning = RelearningAdversary(recipe.relearning)

    def forget_term(self, student, batches, gen: torch.Generator) -> torch.Tensor:
        r = self.recipe
        return resteer_loss(student, self.keep, batches.forget(gen), gen, r.t_max, r.push, r.surrogate_push)

    def held(self, model, batches, gen: torch.Generator) -> dict[str, torch.Tensor]:
        """The erasure terms `relearning` asks to hold after a simulated fine-tuning (`model`: the
        student at theta + sg[Delta]): L_unl; with `hold: all`, the earlier forgotten concepts' part of
        L_pres (scaled by its share of a retain batch, as at theta) and L_rehold too."""
        r = self.recipe
        terms = {"relearn": self.forget_term(model, batches, gen)}
        if r.relearning.hold == "all":
            gone = batches.forgotten(gen)
            if gone is not None:
                share = len(gone.prompts) / r.retain_batch
                terms["relearn_gone"] = share * replay_loss(model, self.teachers["retain"], gone, gen, r.replay_uncond)
            if batches.has_rehold:
                terms["relearn_rehold"] = resteer_loss(model, self.keep, batches.rehold(gen), gen, r.t_max, r.push)
        return terms

    def losses(self, student, batches, gen: torch.Generator) -> dict[str, torch.Tensor]:
        r = self.recipe
        terms = {"unl": self.forget_term(student, batches, gen)}
        if r.adversarial is not None:
            terms["adv"] = adversarial_resteer_loss(
                student, self.keep, batches.forget(gen), gen, r.t_max, r.push, r.adversarial, r.surrogate_push
            )
        if self.inversion is not None:
            if not self.inversion.found:
                self.inversion.prepare(batches.prompts)
            terms["inv"] = self.inversion.loss(student, gen, r.t_max, r.push)
        if self.relearning is not None:
            terms |= self.relearning.losses(student, batches, gen, lambda model: self.held(model, batches, gen))
        if batches.has_rehold:
            terms["rehold"] = resteer_loss(student, self.keep, batches.rehold(gen), gen, r.t_max, r.push)
        if r.l_pres > 0 and batches.has_retain:
            parts = batches.retain(gen)
            terms["pres"] = sum(
                share * replay_loss(student, self.teachers[name], rb, gen, r.replay_uncond) for name, rb, share in parts
            )
            if r.coverage and batches.prompts.coverage:
                terms["cover"] = sum(
                    share * coverage_loss(student, self.keep, rb.x0, batches.prompts.coverage, gen)
                    for _, rb, share in parts
                )
        if r.l_reg:
            terms["reg"] = self.reference.l2_sum()
        return terms
