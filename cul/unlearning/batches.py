"""What one step trains on: teacher samples of its prompts, and the batches drawn from them.

`replay_sources` generates the teacher samples a recipe needs (once per request into a
`ReplayBuffer`, or online per batch as DFR does); `Batches` draws seeded forget and retain batches
from them. Under `retain_teacher: base` the retain prompts come in two sources: "retain"
(theta_{k-1}'s samples of the earlier forgotten concepts' prompts) and "retain_base" (theta_0's
samples of the rest). Under `forgotten_images: both` a source of its own, "forgotten_base", holds
theta_0's samples of the earlier forgotten concepts' prompts (the concepts as they were erased).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from cul.unlearning.prompts import PromptSet
from cul.unlearning.replay import OnlineReplay, ReplayBuffer

Source = ReplayBuffer | OnlineReplay
#: sources whose seed does not depend on which others a recipe draws (the rest take their position)
FIXED_SLOTS = {"forgotten_base": 10}


@dataclass
class ForgetBatch:
    """Forget prompts, their mapped prompts, and teacher samples of one of the two."""

    concept: str
    forget: list[str]
    mapped: list[str]  # parallel to `forget`
    x0_forget: torch.Tensor | None  # teacher samples of the forget prompts (DFR, ESD)
    x0_mapped: torch.Tensor | None  # teacher samples of the mapped prompts (CA, naive)


@dataclass
class RetainBatch:
    prompts: list[str]
    x0: torch.Tensor
    targets: list[str] | None = None  # the teacher's prompts, when not `prompts` (forgotten_target: mapped)


def split_retain(prompts: PromptSet) -> tuple[list[str], list[str]]:
    """The retain prompts by teacher under `retain_teacher: base`: (theta_0's: every group but the
    earlier forgotten concepts', theta_{k-1}'s: those)."""
    kept = [p for g, ps in prompts.retain.items() if g != "forgotten" for p in ps]
    return kept, list(prompts.retain.get("forgotten", []))


def simulates_earlier_attacks(recipe) -> bool:
    """Whether the recipe fine-tunes on earlier forgotten concepts' neighbours in training
    (`Relearning.neighbours_of: all`), and so needs `PromptSet.neighbour_captions`."""
    relearning = getattr(recipe, "relearning", None)
    return relearning is not None and relearning.neighbours_of == "all"


def check_prompts(prompts: PromptSet, recipe) -> None:
    """Refuse a prompt set the recipe cannot train on (before any sample is drawn)."""
    if getattr(recipe, "forgotten_target", "previous") == "mapped" and len(prompts.forgotten_mapped) != len(
        prompts.retain.get("forgotten", [])
    ):
        raise ValueError(
            "forgotten_target 'mapped' needs the prompt set's forgotten_mapped captions "
            "(build it with forgotten_surrogates)"
        )
    if simulates_earlier_attacks(recipe) and prompts.retain.get("forgotten"):
        if not prompts.neighbour_captions:
            raise ValueError(
                "relearning neighbours_of 'all' needs the earlier forgotten concepts' neighbours "
                "(PromptSet.neighbour_captions: prepare the prompt set with this recipe)"
            )


def replay_sources(
    teacher,
    prompts: PromptSet,
    recipe,
    buffers_dir: str | Path | None = None,
    keep_teacher=None,
    have: dict[str, Source] | None = None,
) -> dict[str, Source]:
    """The teacher samples of a step: forget prompts (DFR, ESD noise the concept's own images) or
    mapped prompts (CA, naive train on the surrogate's), and the retain prompts when the recipe
    replays them. `keep_teacher`: the model whose samples stand for what is kept (theta_0 under
    `retain_teacher: base`; the teacher otherwise). `have`: samples prepared already for the same
    teacher and prompts (a retry of the request): only the sources missing from it are generated,
    each with the seed a preparation from scratch would give it."""
    keep_teacher = keep_teacher or teacher
    forget_sources = recipe.forget_sources()
    by_source = {"forget": (prompts.forget, teacher), "mapped": (prompts.mapped, keep_teacher)}
    wanted = {forget_sources[0]: by_source[forget_sources[0]]}
    if recipe.replays_retained() and prompts.retain_prompts():
        if recipe.distils_from_base():
            kept, forgotten = split_retain(prompts)
            wanted["retain"] = (forgotten, teacher)
            wanted["retain_base"] = (kept, keep_teacher)
        else:
            wanted["retain"] = (prompts.retain_prompts(), teacher)
    for name in forget_sources[1:]:  # after the retain sources, whose seeds stay as they were
        wanted[name] = by_source[name]
    if getattr(recipe, "forgotten_images", "previous") == "both":
        wanted["forgotten_base"] = (split_retain(prompts)[1], keep_teacher)
    sources: dict[str, Source] = {}
    for i, (name, (plist, model)) in enumerate(wanted.items()):
        if not plist:
            continue
        if have and name in have:
            sources[name] = have[name]
            continue
        seed = recipe.seed * 1_000 + FIXED_SLOTS.get(name, i)
        if recipe.replay == "online":
            sources[name] = OnlineReplay(model, plist, seed, recipe.replay_steps, recipe.replay_guidance)
            continue
        buf = ReplayBuffer.generate(
            model, plist, seed, recipe.replay_steps, recipe.replay_guidance, recipe.replay_copies
        )
        if buffers_dir is not None:
            buf.save(Path(buffers_dir) / name)
        sources[name] = buf
    return sources


class Batches:
    """Seeded batches of a step's prompts with their teacher samples."""

    def __init__(self, prompts: PromptSet, sources: dict[str, Source], recipe) -> None:
        self.prompts, self.sources, self.recipe = prompts, sources, recipe
        self.copies = recipe.replay_copies if recipe.replay == "buffer" else 1
        if recipe.distils_from_base():
            kept, gone = split_retain(prompts)
            self.pool = [("retain_base", p, i) for i, p in enumerate(kept)] + [
                ("retain", p, i) for i, p in enumerate(gone)
            ]
        else:
            self.pool = [("retain", p, i) for i, p in enumerate(prompts.retain_prompts())]
        self.n_kept = sum(1 for src, _, _ in self.pool if src == "retain_base") * self.copies
        self.n_gone = len(self.pool) * self.copies - self.n_kept
        share = getattr(recipe, "forgotten_share", None)
        self.fixed_gone = round(share * recipe.retain_batch) if share and self.n_kept and self.n_gone else None
        mapped = getattr(recipe, "forgotten_target", "previous") == "mapped"
        self.gone_targets = prompts.forgotten_mapped if mapped else None
        self._near: dict[str, list[int]] = {}  # earlier concept -> kept captions naming its neighbours

    @property
    def has_retain(self) -> bool:
        return bool(self.pool)

    @property
    def has_rehold(self) -> bool:
        return "forgotten_base" in self.sources

    def rehold(self, gen: torch.Generator) -> ForgetBatch:
        """`forget_batch` of theta_0's samples of the earlier forgotten concepts' prompts, as a forget
        batch with their mapped captions (`forgotten_images: both`)."""
        gone = split_retain(self.prompts)[1]  # the source's own list repeats each caption per copy
        idx = torch.randint(0, len(gone) * self.copies, (self.recipe.forget_batch,), generator=gen).tolist()
        return ForgetBatch(
            "earlier forgotten",
            [gone[i // self.copies] for i in idx],
            [self.prompts.forgotten_mapped[i // self.copies] for i in idx],
            self.sources["forgotten_base"].take(idx),
            None,
        )

    def forget(self, gen: torch.Generator) -> ForgetBatch:
        n = self.recipe.forget_batch
        idx = torch.randint(0, len(self.prompts.forget) * self.copies, (n,), generator=gen).tolist()
        pidx = [i // self.copies for i in idx]
        x0 = {name: self.sources[name].take(idx) if name in self.sources else None for name in ("forget", "mapped")}
        return ForgetBatch(
            self.prompts.concept,
            [self.prompts.forget[i] for i in pidx],
            [self.prompts.mapped[i] for i in pidx],
            x0["forget"],
            x0["mapped"],
        )

    def relearn(self, gen: torch.Generator, data: str, n: int, about: str | None = None) -> RetainBatch:
        """`n` of theta_0's samples of retained captions, as an attacker who fine-tunes on kept data
        would hold them (`Relearning`): the concept's neighbours' (`data="neighbour"`), every kept
        caption's ("retain"), or half of each ("both"). Needs `retain_teacher: base`, whose
        "retain_base" source holds them, the neighbours first. `about`: an earlier forgotten concept
        whose neighbours to take instead of the request's (the kept captions that name one of
        them, `PromptSet.neighbour_captions`; every kept caption where there are none)."""
        if "retain_base" not in self.sources:
            raise ValueError("relearning needs theta_0's samples of the retained captions (retain_teacher: base)")
        kept, c = split_retain(self.prompts)[0], self.copies
        near = list(range(len(self.prompts.retain.get("neighbour", [])))) if about is None else self._naming(about)
        if not near and about is None and data != "retain":
            raise ValueError(
                f"relearning on {data!r} data: the prompt set of {self.prompts.concept!r} has no neighbour captions"
            )
        everything = list(range(len(kept)))
        near = near or everything
        parts = {"neighbour": [(near, n)], "retain": [(everything, n)]}
        parts["both"] = [(near, n // 2), (everything, n - n // 2)]
        idx = [
            pool[k // c] * c + k % c
            for pool, m in parts[data]
            for k in torch.randint(0, len(pool) * c, (m,), generator=gen).tolist()
        ]
        return RetainBatch([kept[i // c] for i in idx], self.sources["retain_base"].take(idx))

    def _naming(self, about: str) -> list[int]:
        """Positions in the kept captions of those that name one of `about`'s kept neighbours."""
        if about not in self._near:
            captions = self.prompts.neighbour_captions.get(about)
            if captions is None:
                raise ValueError(
                    f"no relearning captions recorded for the earlier forgotten concept {about!r}: "
                    "prepare the prompt set with the recipe (PromptSet.neighbour_captions)"
                )
            wanted = set(captions)
            self._near[about] = [i for i, p in enumerate(split_retain(self.prompts)[0]) if p in wanted]
        return self._near[about]

    def forgotten(self, gen: torch.Generator) -> RetainBatch | None:
        """The earlier forgotten concepts' share of a retain batch (theta_{k-1}'s samples of their
        captions, with their targets' captions), drawn on its own; None when there are none."""
        n = self.fixed_gone
        if n is None:  # no fixed share: as many as a retain batch draws on average
            n = round(self.recipe.retain_batch * self.n_gone / max(1, self.n_kept + self.n_gone))
        if not self.n_gone or not n:
            return None
        idx = (self.n_kept + torch.randint(0, self.n_gone, (n,), generator=gen)).tolist()
        return self._pooled("retain", idx)

    def _pooled(self, name: str, idx: list[int]) -> RetainBatch | None:
        """The batch of the draws `idx` (positions in the pool, copies counted) that fall in source
        `name`, with the teacher's captions for the earlier forgotten concepts' under
        `forgotten_target: mapped`; None when none does (the source is not asked for samples)."""
        c = self.copies
        picked = [(self.pool[i // c][1], self.pool[i // c][2] * c + i % c) for i in idx if self.pool[i // c][0] == name]
        if not picked:
            return None
        targets = None
        if name == "retain" and self.gone_targets is not None:
            targets = [self.gone_targets[j // c] for _, j in picked]
        return RetainBatch([p for p, _ in picked], self.sources[name].take([j for _, j in picked]), targets)

    def retain(self, gen: torch.Generator) -> list[tuple[str, RetainBatch, float]]:
        """One retain batch over all retain prompts (with `forgotten_share` of it from the earlier
        forgotten concepts', when set), split by source: (source, batch, share of the batch)."""
        n, c = self.recipe.retain_batch, self.copies
        if self.fixed_gone is None:
            idx = torch.randint(0, len(self.pool) * c, (n,), generator=gen).tolist()
        else:  # the pool lists the kept prompts first, then the forgotten ones
            idx = (
                torch.randint(0, self.n_kept, (n - self.fixed_gone,), generator=gen).tolist()
                + (self.n_kept + torch.randint(0, self.n_gone, (self.fixed_gone,), generator=gen)).tolist()
            )
        out = []
        for name in ("retain", "retain_base"):
            batch = self._pooled(name, idx)
            if batch is not None:
                out.append((name, batch, len(batch.prompts) / len(idx)))
        return out
