"""One request step: copy the previous model, train the copy, return it with what it cost.

The teacher (theta_{k-1}) is frozen for the whole step: every target is computed from it under
no_grad, and its weights are never handed to the optimizer. Replay data come from a per-request
buffer generated once (default) or from DFR's online per-step generation (`replay: online`).

`retain_teacher: base` (our change to DFR): what is kept is distilled from the base model theta_0
instead of theta_{k-1}. DFR's chain theta_0 -> theta_1 -> ... copies each step's small errors on
retained concepts into the next teacher, so they compound with the number of requests; anchoring
the retained prompts (neighbours, other concepts, unrelated captions) and the surrogate targets
to theta_0 stops the chain there. The prompts of earlier forgotten concepts are the exception:
theta_0 still draws those concepts. By default (`forgotten_target: previous`) their targets come
from theta_{k-1}, the one model that has them forgotten, which lets its drift back through;
`forgotten_target: mapped` (the `dfr` default in params.yaml) distils them toward theta_0 on the
same caption with the concept swapped for the surrogate theta_{k-1} now draws for it, so every
target of a step comes from theta_0, and `forgotten_share` fixes their part of each retain batch.

The weights are anchored to theta_0 too (`reg_reference: base` with `l2sp`, in the `dfr` default):
targets from theta_0 stop errors from compounding, but every step still moves weights no loss asks
for, and an L2 pull toward each step's own start forgets those moves at the next request, so the
distance from theta_0 grows like a random walk. L2SP toward theta_0 takes them back. Each step
returns the mean of its last training iterates (`tail_average`), which cancels the rest of that
noise within the step.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from diffusers.optimization import get_cosine_schedule_with_warmup
from pydantic import BaseModel, ConfigDict, Field, model_validator

from cul.unlearning.methods import (
    Batch,
    RetainBatch,
    ca_loss,
    dfr_forget_loss,
    esd_loss,
    naive_loss,
    coverage_loss,
    replay_loss,
)
from cul.unlearning.prompts import PromptSet
from cul.unlearning.regularizers import (
    GradientProjector,
    ParameterAnchor,
    SelectiveMask,
    Trainable,
    select_parameters,
)
from cul.unlearning.replay import OnlineReplay, ReplayBuffer

Method = Literal["dfr", "ca", "esd", "naive"]


class UnlearnConfig(BaseModel):
    """One eraser with its add-ons; every field can be set per method in params.yaml."""

    model_config = ConfigDict(extra="forbid")

    method: Method = "dfr"
    trainable: Trainable = "all"
    steps: int = Field(150, ge=1)
    forget_batch: int = Field(16, ge=1)
    retain_batch: int = Field(32, ge=1)
    lr: float = Field(2e-4, gt=0)
    lr_schedule: Literal["constant", "cosine"] = "constant"  # cosine: decays to 0 by the last step
    weight_decay: float = 0.0
    # AdamW's epsilon. Most per-parameter gradients of a step are noise (|mean| / rms about 0.16 at
    # the median), and Adam scales each to a full lr-sized update: a larger epsilon damps parameters
    # whose gradients are below it, so only those the losses agree on move far (tried for FD: it did
    # not lower it; reports/benchmark/README.md, experiments)
    adam_eps: float = Field(1e-8, gt=0)
    grad_clip: float = 1.0
    # share of the last training steps whose iterates are averaged into the returned weights (Polyak /
    # SWA tail averaging; 0: the last iterate). Adam's per-step noise moves every scene a little and
    # the base model itself is an EMA of its pretraining iterates; the average keeps the direction
    # the losses agree on and cancels much of that noise
    tail_average: float = Field(0.0, ge=0, lt=1)
    t_max: int = Field(600, ge=1, le=1000)
    l_unl: float = 1.0
    l_pres: float = 10.0  # replay distillation weight (0: no retain term)
    l_reg: float = 1e-4  # DFR's sum-L2 to the previous weights (0: none)
    replay: Literal["buffer", "online"] = "buffer"
    replay_steps: int = 20
    replay_guidance: float = 1.0
    replay_copies: int = 1
    replay_uncond: bool = False  # also distil eps(x_t, "") on replayed images (see replay_loss)
    coverage: bool = False  # also distil the teacher on the coverage captions (see coverage_loss)
    esd_eta: float = 1.0
    # esd: erase the concept's name alone ("concept", as ESD erases "Van Gogh"), or the full forget
    # prompts ("context"), whose negative guidance also pushes away the other words in them
    esd_prompt: Literal["context", "concept"] = "context"
    push: float = 0.0  # dfr: extra push of the re-steering target away from the concept (0 = DFR)
    l1sp: float = 0.0
    l2sp: float = 0.0
    # the weights L_reg, L1SP and L2SP pull toward: "previous" (the request's start theta_{k-1}, as DFR
    # and CUR do) or "base" (theta_0, L2-SP's original starting point). A pull toward theta_{k-1}
    # resets every request, so changes no loss asks for still add up from one request to the next
    # (drift grows like a random walk); a pull toward theta_0 takes them back
    reg_reference: Literal["previous", "base"] = "previous"
    selft_fraction: float | None = None
    selft_batches: int = 4
    projection: bool = False
    projection_max_rank: int | None = None
    # who supplies the targets for what is kept: "previous" (DFR: theta_{k-1}) or "base" (theta_0;
    # earlier forgotten concepts still from theta_{k-1}); see the module docstring
    retain_teacher: Literal["previous", "base"] = "previous"
    # with retain_teacher "base": the share of each retain batch given to the earlier forgotten
    # concepts' prompts (None: drawn uniformly with the rest, about 4% per concept). Everything else
    # now pulls toward theta_0, which still knows them, so their few prompts need a fixed voice.
    forgotten_share: float | None = Field(None, gt=0, lt=1)
    # with retain_teacher "base", the targets of the earlier forgotten concepts' prompts: "previous"
    # (theta_{k-1} on the same prompt) or "mapped" (theta_0 on the prompt with the concept replaced
    # by a surrogate, as the forget term does): then every target of a step comes from theta_0
    forgotten_target: Literal["previous", "mapped"] = "previous"
    seed: int = 0

    @model_validator(mode="after")
    def _options_need_base_teacher(self) -> "UnlearnConfig":
        if self.retain_teacher != "base":
            if self.forgotten_share is not None:
                raise ValueError("forgotten_share only applies with retain_teacher: base")
            if self.forgotten_target != "previous":
                raise ValueError("forgotten_target: mapped only applies with retain_teacher: base")
        return self

    @model_validator(mode="after")
    def _reference_needs_a_penalty(self) -> "UnlearnConfig":
        if self.reg_reference == "base" and not (self.l_reg or self.l1sp or self.l2sp):
            raise ValueError("reg_reference: base needs a penalty to apply it to (l_reg, l1sp or l2sp)")
        return self


@dataclass
class StepResult:
    student: object
    seconds_replay: float
    seconds_train: float
    replay_images: int
    history: list[dict] = field(default_factory=list)
    drift: float = 0.0
    trainable_fraction: float = 1.0

    @property
    def seconds(self) -> float:
        return self.seconds_replay + self.seconds_train


class TailAverage:
    """Running mean of the trainable parameters over the steps from `first_step` on. Not torch's
    `swa_utils.AveragedModel`, which copies the whole module: this keeps only what trains (the
    cross-attention K/V subset on SD is a small part of its UNet)."""

    def __init__(self, params: dict[str, torch.nn.Parameter], first_step: int) -> None:
        self.params, self.first_step, self.count = params, first_step, 0
        self.mean = {n: torch.zeros_like(p) for n, p in params.items()}

    @torch.no_grad()
    def update(self, step: int) -> None:
        if step < self.first_step:
            return
        self.count += 1
        for n, p in self.params.items():
            self.mean[n].add_(p.detach() - self.mean[n], alpha=1.0 / self.count)

    @torch.no_grad()
    def apply(self) -> None:
        """Write the mean into the parameters (a no-op before the first averaged step)."""
        if self.count:
            for n, p in self.params.items():
                p.copy_(self.mean[n])


def _forget_loss(cfg: UnlearnConfig):
    if cfg.method == "dfr":
        return lambda s, t, b, g: dfr_forget_loss(s, t, b, g, cfg.t_max, cfg.push)
    if cfg.method == "ca":
        return ca_loss
    if cfg.method == "esd":
        return lambda s, t, b, g: esd_loss(s, t, b, g, cfg.esd_eta)
    if cfg.method == "naive":
        return naive_loss
    raise ValueError(f"unknown method {cfg.method!r}")


def anchored_retain(prompts: PromptSet) -> tuple[list[str], list[str]]:
    """The retain prompts split by teacher under `retain_teacher: base`: (from theta_0: every group
    but the earlier forgotten concepts', from theta_{k-1}: those)."""
    kept = [p for g, ps in prompts.retain.items() if g != "forgotten" for p in ps]
    return kept, list(prompts.retain.get("forgotten", []))


def _teachers(teacher, anchor, cfg: UnlearnConfig):
    """(teacher of the retained prompts and surrogate targets, teacher of the forgotten prompts)."""
    if cfg.retain_teacher == "previous":
        return teacher, teacher
    if anchor is None:
        raise ValueError("retain_teacher 'base' needs the base model: pass anchor=<base model>")
    anchor.unet.eval().requires_grad_(False)
    return anchor, teacher


def replay_sources(teacher, prompts: PromptSet, cfg: UnlearnConfig, buffers_dir: str | Path | None = None,
                   anchor=None) -> dict[str, ReplayBuffer | OnlineReplay]:
    """The teacher samples a step trains on: forget prompts (DFR, ESD noise the concept's own
    images) or mapped prompts (CA, naive train on the surrogate's), and the retain prompts when
    there is a replay term; generated once, or online per batch. Under `retain_teacher: base` the
    retain prompts come in two sources, "retain" (theta_{k-1}: earlier forgotten concepts) and
    "retain_base" (`anchor`, theta_0: the rest)."""
    keep_teacher, _ = _teachers(teacher, anchor, cfg)
    wanted = {"mapped": (prompts.mapped, keep_teacher)} if cfg.method in ("ca", "naive") else \
        {"forget": (prompts.forget, teacher)}
    if cfg.l_pres > 0 and prompts.retain_prompts():
        if cfg.retain_teacher == "base":
            kept, forgotten = anchored_retain(prompts)
            wanted["retain"] = (forgotten, teacher)
            wanted["retain_base"] = (kept, keep_teacher)
        else:
            wanted["retain"] = (prompts.retain_prompts(), teacher)
    sources: dict[str, ReplayBuffer | OnlineReplay] = {}
    for i, (name, (plist, model)) in enumerate(wanted.items()):
        if not plist:
            continue
        seed = cfg.seed * 1_000 + i
        if cfg.replay == "online":
            sources[name] = OnlineReplay(model, plist, seed, cfg.replay_steps, cfg.replay_guidance)
        else:
            buf = ReplayBuffer.generate(model, plist, seed, cfg.replay_steps, cfg.replay_guidance, cfg.replay_copies)
            if buffers_dir is not None:
                buf.save(Path(buffers_dir) / name)
            sources[name] = buf
    return sources


def unlearn(teacher, prompts: PromptSet, cfg: UnlearnConfig, buffers_dir: str | Path | None = None,
            progress: bool = False, buffers: dict[str, ReplayBuffer] | None = None, anchor=None) -> StepResult:
    """Forget `prompts.concept` starting from `teacher`; `teacher` is left untouched. `buffers`:
    replay buffers prepared earlier (by `replay_sources` for the same teacher and prompts).
    `anchor`: the base model, needed by `retain_teacher: base` (left untouched too)."""
    from tqdm.auto import tqdm

    torch.manual_seed(cfg.seed)
    teacher.unet.eval().requires_grad_(False)
    keep_teacher, _ = _teachers(teacher, anchor, cfg)
    student = teacher.copy()
    student.unet.train()
    params = select_parameters(student.unet, cfg.trainable)
    start = ParameterAnchor(params)
    reg = start
    if cfg.reg_reference == "base":
        if anchor is None:
            raise ValueError("reg_reference 'base' needs the base model: pass anchor=<base model>")
        reg = ParameterAnchor(params, dict(anchor.unet.named_parameters()))
    forget_loss = _forget_loss(cfg)
    needs_mapped = cfg.method in ("ca", "naive")
    if cfg.retain_teacher == "base":
        kept, gone = anchored_retain(prompts)
        retain_pool = [("retain_base", p, i) for i, p in enumerate(kept)] + \
            [("retain", p, i) for i, p in enumerate(gone)]
    else:
        retain_pool = [("retain", p, i) for i, p in enumerate(prompts.retain_prompts())]
    retain_models = {"retain": teacher, "retain_base": keep_teacher}
    gone_targets = None
    if cfg.forgotten_target == "mapped":
        gone_targets = prompts.forgotten_mapped
        if len(gone_targets) != len(prompts.retain.get("forgotten", [])):
            raise ValueError("forgotten_target 'mapped' needs the prompt set's forgotten_mapped captions "
                             "(build it with forgotten_surrogates)")
        retain_models["retain"] = keep_teacher
    use_retain = cfg.l_pres > 0 and bool(retain_pool)
    use_coverage = cfg.coverage and bool(prompts.coverage)

    # -- replay data ------------------------------------------------------------------------------
    t0 = time.perf_counter()
    sources = buffers if buffers is not None else replay_sources(teacher, prompts, cfg, buffers_dir, anchor)
    online = [s for s in sources.values() if isinstance(s, OnlineReplay)]
    replay_images = 0 if buffers is not None else sum(len(s) for s in sources.values() if isinstance(s, ReplayBuffer))
    seconds_replay = time.perf_counter() - t0

    # -- add-ons ----------------------------------------------------------------------------------
    t1 = time.perf_counter()
    gen = torch.Generator().manual_seed(cfg.seed)
    n_forget = len(prompts.forget)
    n_copies = cfg.replay_copies if cfg.replay == "buffer" else 1

    def forget_batch() -> Batch:
        idx = torch.randint(0, n_forget * n_copies, (cfg.forget_batch,), generator=gen).tolist()
        pidx = [i // n_copies for i in idx]
        forget = [prompts.forget[i] for i in pidx]
        if cfg.method == "esd" and cfg.esd_prompt == "concept":
            forget = [prompts.concept] * len(pidx)  # x_t still from images of the concept in context
        return Batch(forget, [prompts.mapped[i] for i in pidx],
                     sources["forget"].take(idx) if not needs_mapped else None,
                     sources["mapped"].take(idx) if needs_mapped else None)

    n_kept = sum(1 for src, _, _ in retain_pool if src == "retain_base") * n_copies
    n_gone = len(retain_pool) * n_copies - n_kept
    fixed_gone = round(cfg.forgotten_share * cfg.retain_batch) if cfg.forgotten_share and n_kept and n_gone else None

    def retain_batches() -> list[tuple[object, RetainBatch, float]]:
        """One retain batch drawn over all retain prompts (or with `forgotten_share` of it from the
        earlier forgotten concepts'), split by source: (teacher, batch, share)."""
        if fixed_gone is None:
            idx = torch.randint(0, len(retain_pool) * n_copies, (cfg.retain_batch,), generator=gen).tolist()
        else:  # the pool lists the kept prompts first, then the forgotten ones
            idx = torch.randint(0, n_kept, (cfg.retain_batch - fixed_gone,), generator=gen).tolist() + \
                (n_kept + torch.randint(0, n_gone, (fixed_gone,), generator=gen)).tolist()
        out = []
        for name in ("retain", "retain_base"):
            picked = [(retain_pool[i // n_copies][1], retain_pool[i // n_copies][2] * n_copies + i % n_copies)
                      for i in idx if retain_pool[i // n_copies][0] == name]
            if picked:
                targets = [gone_targets[j // n_copies] for _, j in picked] if name == "retain" and gone_targets \
                    is not None else None
                batch = RetainBatch([p for p, _ in picked], sources[name].take([j for _, j in picked]), targets)
                out.append((retain_models[name], batch, len(picked) / len(idx)))
        return out

    projector = None
    if cfg.projection:
        protected = prompts.retain.get("neighbour", []) + prompts.retain.get("retained", []) + \
            prompts.retain.get("forgotten", [])
        projector = GradientProjector.from_prompts(student, protected, max_rank=cfg.projection_max_rank)
    mask = None
    if cfg.selft_fraction is not None:
        importance = SelectiveMask.importance(
            params, lambda: forget_loss(student, keep_teacher, forget_batch(), gen), cfg.selft_batches)
        mask = SelectiveMask(params, importance, cfg.selft_fraction)

    opt = torch.optim.AdamW(params.values(), lr=cfg.lr, weight_decay=cfg.weight_decay, eps=cfg.adam_eps)
    sched = get_cosine_schedule_with_warmup(opt, 0, cfg.steps) if cfg.lr_schedule == "cosine" else None
    averager = TailAverage(params, first_step=round(cfg.steps * (1 - cfg.tail_average))) \
        if cfg.tail_average else None
    history = []
    for step in tqdm(range(cfg.steps), desc=f"{cfg.method}: forget {prompts.concept}", disable=not progress):
        terms = {"unl": forget_loss(student, keep_teacher, forget_batch(), gen)}
        if use_retain:
            parts = retain_batches()
            terms["pres"] = sum(share * replay_loss(student, t, rb, gen, cfg.replay_uncond) for t, rb, share in parts)
            if use_coverage:
                terms["cover"] = sum(share * coverage_loss(student, keep_teacher, rb.x0, prompts.coverage, gen)
                                     for _, rb, share in parts)
        loss = cfg.l_unl * terms["unl"]
        if "pres" in terms:
            loss = loss + cfg.l_pres * terms["pres"]
        if "cover" in terms:
            loss = loss + cfg.l_pres * terms["cover"]
        if cfg.l_reg:
            terms["reg"] = reg.l2_sum()
            loss = loss + cfg.l_reg * terms["reg"]
        if cfg.l2sp:
            terms["l2sp"] = reg.l2_mean()
            loss = loss + cfg.l2sp * terms["l2sp"]
        if cfg.l1sp:
            terms["l1sp"] = reg.l1_mean()
            loss = loss + cfg.l1sp * terms["l1sp"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if projector is not None:
            projector.project()
        if mask is not None:
            mask.mask_gradients()
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_([p for p in params.values() if p.grad is not None], cfg.grad_clip)
        opt.step()
        if sched is not None:
            sched.step()
        if mask is not None:
            mask.restore()
        if averager is not None:
            averager.update(step)
        if step % 10 == 0 or step == cfg.steps - 1:
            history.append({"step": step, "loss": loss.item(), **{k: v.item() for k, v in terms.items()}})
    if averager is not None:
        averager.apply()
    student.unet.eval().requires_grad_(False)
    seconds_train = time.perf_counter() - t1
    if online:  # online generation happened inside the loop (its time is in seconds_train)
        replay_images = sum(r.images_generated for r in online)
    return StepResult(student, seconds_replay, seconds_train, replay_images, history, start.drift(),
                      mask.trainable_fraction() if mask else 1.0)
