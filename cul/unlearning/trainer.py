"""One request step: copy the previous model, train the copy on its objective, return it.

The loop is the same for every eraser: an objective (`cul.unlearning.objectives`) returns named
losses, the trainer weights and sums them, adds the add-ons' penalties (L2SP, L1SP), and wraps the
optimizer step in the add-ons that shape it (gradient projection, SelFT's mask, tail averaging).

The teacher theta_{k-1} is frozen for the whole step: every target is computed from it (or from
the base model theta_0, where the recipe says so) under no_grad, and its weights are never handed
to the optimizer. Teacher samples come from a per-request buffer generated once (default) or
DFR's online per-step generation (`replay: online`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from diffusers.optimization import get_cosine_schedule_with_warmup

from cul import device, threads
from cul.unlearning.batches import Batches, Source, check_prompts, replay_sources
from cul.unlearning.objectives import OBJECTIVES
from cul.unlearning.prompts import PromptSet
from cul.unlearning.recipes import Recipe
from cul.unlearning.regularizers import (
    GradientProjector,
    ParameterAnchor,
    SelectiveMask,
    TailAverage,
    select_parameters,
)
from cul.unlearning.replay import OnlineReplay, ReplayBuffer


@dataclass
class StepResult:
    student: Any  # the trained copy (a DiffusionModel)
    seconds_replay: float
    seconds_train: float
    replay_images: int
    history: list[dict] = field(default_factory=list)
    drift: float = 0.0  # distance of the trained weights from the step's start
    trainable_fraction: float = 1.0
    #: the concept whose relearning attack each simulated fine-tuning stood for (`Relearning`), in order
    relearning_attacks: list[str] = field(default_factory=list)

    @property
    def seconds(self) -> float:
        return self.seconds_replay + self.seconds_train


def keep_teacher(teacher, base, recipe: Recipe):
    """The model whose predictions a step keeps: theta_0 when the recipe distils from the base
    model, else the teacher itself."""
    if not recipe.distils_from_base():
        return teacher
    if base is None:
        raise ValueError("retain_teacher 'base' needs the base model: pass base=<base model>")
    base.unet.eval().requires_grad_(False)
    return base


def protected_prompts(prompts: PromptSet) -> list[str]:
    """What gradient projection protects: neighbours, retained concepts, earlier forgotten ones."""
    return [p for g in ("neighbour", "retained", "forgotten") for p in prompts.retain.get(g, [])]


def unlearn(
    teacher,
    prompts: PromptSet,
    recipe: Recipe,
    buffers_dir: str | Path | None = None,
    progress: bool = False,
    buffers: dict[str, Source] | None = None,
    base=None,
) -> StepResult:
    """Forget `prompts.concept` starting from `teacher`, which is left untouched.

    Args:
        teacher: theta_{k-1}, the model the step starts from (frozen).
        prompts: the request's prompt set.
        recipe: the eraser and its add-ons.
        buffers_dir: where to save the teacher samples it generates (None: keep them in memory).
        progress: show a progress bar.
        buffers: teacher samples prepared earlier by `replay_sources` for the same teacher, prompts
            and recipe (None: generate them here).
        base: theta_0, needed when the recipe distils from it or pulls its weights toward it.
    """
    from tqdm.auto import tqdm

    torch.manual_seed(recipe.seed)
    teacher.unet.eval().requires_grad_(False)
    keep = keep_teacher(teacher, base, recipe)
    check_prompts(prompts, recipe)
    student = teacher.copy()
    student.unet.train()
    params = select_parameters(student.unet, recipe.trainable)
    addons = recipe.addons
    start = ParameterAnchor(params)
    reference = start
    if addons.reg_reference == "base":
        if base is None:
            raise ValueError("reg_reference 'base' needs the base model: pass base=<base model>")
        reference = ParameterAnchor(params, dict(base.unet.named_parameters()))

    t0 = time.perf_counter()
    sources = buffers if buffers is not None else replay_sources(teacher, prompts, recipe, buffers_dir, keep)
    online = [s for s in sources.values() if isinstance(s, OnlineReplay)]
    replay_images = 0 if buffers is not None else sum(len(s) for s in sources.values() if isinstance(s, ReplayBuffer))
    seconds_replay = time.perf_counter() - t0

    t1 = time.perf_counter()
    gen = torch.Generator().manual_seed(recipe.seed)
    batches = Batches(prompts, sources, recipe)
    objective = OBJECTIVES[recipe.method](recipe, teacher, keep, reference)
    projector = (
        GradientProjector.from_prompts(student, protected_prompts(prompts), max_rank=addons.projection_max_rank)
        if addons.projection
        else None
    )
    mask = None
    if addons.selft_fraction is not None:
        importance = SelectiveMask.importance(
            params, lambda: objective.forget_term(student, batches, gen), addons.selft_batches
        )
        mask = SelectiveMask(params, importance, addons.selft_fraction)
    opt = torch.optim.AdamW(params.values(), lr=recipe.lr, weight_decay=recipe.weight_decay, eps=recipe.adam_eps)
    sched = get_cosine_schedule_with_warmup(opt, 0, recipe.steps) if recipe.lr_schedule == "cosine" else None
    averager = (
        TailAverage(params, first_step=round(recipe.steps * (1 - addons.tail_average))) if addons.tail_average else None
    )
    weights = {**objective.weights, "l2sp": addons.l2sp, "l1sp": addons.l1sp}

    scaler = device.grad_scaler()  # fp16's loss scaling; a pass-through otherwise
    history = []
    for step in tqdm(range(recipe.steps), desc=f"{recipe.method}: forget {prompts.concept}", disable=not progress):
        threads.tick()
        with device.autocast():
            terms = objective.losses(student, batches, gen)
        if addons.l2sp:
            terms["l2sp"] = reference.l2_mean()
        if addons.l1sp:
            terms["l1sp"] = reference.l1_mean()
        weighted = [weights[name] * value.float() for name, value in terms.items()]
        loss = sum(weighted[1:], weighted[0])
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        if projector is not None:
            projector.project()
        if mask is not None:
            mask.mask_gradients()
        if recipe.grad_clip:
            torch.nn.utils.clip_grad_norm_([p for p in params.values() if p.grad is not None], recipe.grad_clip)
        scaler.step(opt)
        scaler.update()
        if sched is not None:
            sched.step()
        if mask is not None:
            mask.restore()
        if averager is not None:
            averager.update(step)
        if step % 10 == 0 or step == recipe.steps - 1:
            history.append({"step": step, "loss": loss.item(), **{k: v.item() for k, v in terms.items()}})
    if averager is not None:
        averager.apply()
    student.unet.eval().requires_grad_(False)
    seconds_train = time.perf_counter() - t1
    if online:  # online generation happened inside the loop (its time is in seconds_train)
        replay_images = sum(r.images_generated for r in online)
    return StepResult(
        student,
        seconds_replay,
        seconds_train,
        replay_images,
        history,
        start.drift(),
        mask.trainable_fraction() if mask else 1.0,
        list(getattr(getattr(objective, "relearning", None), "simulated", [])),
    )
