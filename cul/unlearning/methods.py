"""The erasers: one request's training objective, each a step theta_{k-1} -> theta_k.

Every loss reads a frozen teacher (the previous model; the base model for what a step keeps
under `retain_teacher: base`, see trainer.py) and the student (a copy being trained):

- `dfr`: trajectory re-steering on forget prompts (student eps for p_f matches the teacher's eps
  for the mapped prompt p_m, t < T_max) + generative replay distillation on retain prompts
  (student matches teacher) + L2 to the previous weights (added by the trainer).
- `ca`: Concept Ablation: on anchor (surrogate) images, the student's eps for the target prompt
  matches the teacher's eps for the anchor prompt.
- `esd`: ESD: the student's eps for the concept matches the teacher's negatively guided
  prediction eps(x_t, "") - eta (eps(x_t, c) - eps(x_t, "")).
- `naive`: plain fine-tuning: images of the surrogate, captioned with the forget prompt.
"""

from __future__ import annotations

from dataclasses import dataclass
import torch
import torch.nn.functional as F


@dataclass
class Batch:
    """A forget batch: forget prompts, their mapped prompts, teacher samples of each."""

    forget: list[str]
    mapped: list[str]
    x0_forget: torch.Tensor | None  # teacher samples of the forget prompts (DFR, ESD)
    x0_mapped: torch.Tensor | None  # teacher samples of the mapped prompts (CA, naive)


@dataclass
class RetainBatch:
    prompts: list[str]
    x0: torch.Tensor
    targets: list[str] | None = None  # the teacher's prompts, when not `prompts` (forgotten_target: mapped)


def _noised(model, x0: torch.Tensor, gen: torch.Generator, t_max: int | None = None):
    n = x0.shape[0]
    high = t_max if t_max is not None else model.scheduler.config.num_train_timesteps
    t = torch.randint(0, high, (n,), generator=gen).to(x0.device)
    noise = torch.randn(x0.shape, generator=gen).to(x0.device)
    return model.add_noise(x0, noise, t), t, noise


def dfr_forget_loss(student, teacher, b: Batch, gen: torch.Generator, t_max: int, push: float = 0.0) -> torch.Tensor:
    """Contextual trajectory re-steering: || eps_s(x_t, t, p_f) - sg[eps_T(x_t, t, p_m)] ||^2.

    `push` > 0 (our option, not in DFR) moves the target further from the concept,
    eps_T(p_m) + push (eps_T(p_m) - eps_T(p_f)), as ESD's negative guidance does: classifier-free
    guidance multiplies whatever is left of the concept in eps(p_f), so a plain match leaves traces."""
    x_t, t, _ = _noised(teacher, b.x0_forget, gen, t_max)
    with torch.no_grad():
        target = teacher.predict_noise(x_t, t, teacher.encode_prompts(b.mapped))
        if push:
            target = target + push * (target - teacher.predict_noise(x_t, t, teacher.encode_prompts(b.forget)))
    return F.mse_loss(student.predict_noise(x_t, t, student.encode_prompts(b.forget)), target)


def replay_loss(student, teacher, r: RetainBatch, gen: torch.Generator, uncond: bool = False) -> torch.Tensor:
    """Generative replay with distillation: || eps_s(x_t, t, r) - sg[eps_T(x_t, t, r)] ||^2.

    `uncond` (our option, not in DFR): distil the unconditional prediction on the same x_t too.
    Classifier-free guidance extrapolates from eps(x_t, "") on every image it draws, so a drift of
    that branch on retained images is amplified (x (w - 1)) in all of them; DFR's replay only
    anchors it where the empty prompt itself is replayed."""
    x_t, t, _ = _noised(teacher, r.x0, gen)
    ctx = teacher.encode_prompts(r.prompts)
    tctx = teacher.encode_prompts(r.targets) if r.targets is not None else ctx
    if uncond:
        ctx = torch.cat([ctx, teacher.encode_prompts([""]).expand_as(ctx)])
        tctx = torch.cat([tctx, teacher.encode_prompts([""]).expand_as(tctx)])
        x_t, t = torch.cat([x_t, x_t]), torch.cat([t, t])
    with torch.no_grad():
        target = teacher.predict_noise(x_t, t, tctx)
    return F.mse_loss(student.predict_noise(x_t, t, ctx), target)


def coverage_loss(student, teacher, x0: torch.Tensor, captions: list[str], gen: torch.Generator) -> torch.Tensor:
    """Replay distillation over the prompt space, not only the buffer's prompts (our option, not
    in DFR): the teacher's prediction is defined for any (x_t, t, c), so replayed images are noised
    again and paired with captions drawn from many clean scenes that have no images of their own.
    The buffer anchors a hundred-odd prompts; this anchors the text conditioning of the rest at no
    generation cost (one more forward pass per step)."""
    idx = torch.randint(0, len(captions), (x0.shape[0],), generator=gen).tolist()
    return replay_loss(student, teacher, RetainBatch([captions[i] for i in idx], x0), gen)


def ca_loss(student, teacher, b: Batch, gen: torch.Generator) -> torch.Tensor:
    """Concept Ablation (model-based): anchor images, target prompt -> teacher's anchor prediction."""
    x_t, t, _ = _noised(teacher, b.x0_mapped, gen)
    with torch.no_grad():
        target = teacher.predict_noise(x_t, t, teacher.encode_prompts(b.mapped))
    return F.mse_loss(student.predict_noise(x_t, t, student.encode_prompts(b.forget)), target)


def esd_loss(student, teacher, b: Batch, gen: torch.Generator, eta: float = 1.0) -> torch.Tensor:
    """ESD: x_t from the teacher's own samples of the concept (standing in for partial sampling)."""
    x_t, t, _ = _noised(teacher, b.x0_forget, gen)
    with torch.no_grad():
        cond = teacher.predict_noise(x_t, t, teacher.encode_prompts(b.forget))
        uncond = teacher.predict_noise(x_t, t, teacher.encode_prompts([""] * len(b.forget)))
        target = uncond - eta * (cond - uncond)
    return F.mse_loss(student.predict_noise(x_t, t, student.encode_prompts(b.forget)), target)


def naive_loss(student, teacher, b: Batch, gen: torch.Generator) -> torch.Tensor:
    """Fine-tune toward the surrogate: surrogate images, forget prompt, true noise as target."""
    x_t, t, noise = _noised(teacher, b.x0_mapped, gen)
    return F.mse_loss(student.predict_noise(x_t, t, student.encode_prompts(b.forget)), noise)

