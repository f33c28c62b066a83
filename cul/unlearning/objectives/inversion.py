"""STEREO's search stage (Srivatsan et al., "STEREO: A Two-Stage Framework for Adversarially Robust
Concept Erasing from Text-to-Image Diffusion Models", CVPR 2025), in a continual step.

AdvUnlearn's inner step (`objectives/adversarial.py`) searches a ball around the prompt's own
context. Textual inversion learns a new word anywhere in the embedding space, and after a sequence it
revives concepts that step does not reach (reports/benchmark/README.md, "Under attack"). STEREO
"searches thoroughly enough": it runs the attack itself against the model being erased, then
erases what the attack found. For each forgotten concept, with w its mention in a caption c (the
words c has where its mapped caption m has the surrogate), textual inversion against the student,

    v* = argmin_v  E_{x0 ~ theta_0(c), t, eps} || eps_theta(x_t, t, c[w -> v]) - eps ||^2,

(x0: theta_0's images of c, which show the concept; c[w -> v] the caption with w replaced by one
new token of input embedding v), and the erasure asks the caption with v* for the surrogate too:

    L_inv = E || eps_theta(x_t, t, c[w -> v*]) - sg[eps_0(x_t, t, m) + push (eps_0(x_t, t, m) - eps_0(x_t, t, c))] ||^2.

With `random_share`, part of each batch puts a random word in v*'s place (a draw from a Gaussian
fitted to the input-embedding table; the share of rows rounded down, the search skipped only when
every row is random): a concept that is a slot's default, what the model draws when
the word there names nothing (plain, a flat background), comes back under any such word, and a
search finds one point of that region where the random words cover it.
Over a sequence the earlier forgotten concepts are the ones that come back, so every forgotten
concept is searched, the request's and the earlier ones (from the prompt set's `forgotten` captions
and their `forgotten_mapped` twins; one word per mention of an earlier concept, see `concepts`),
every `every` training steps, each search warm-started from the last v*. The first search starts from
the mention's own embedding, or with `start: mean` from the embedding table's mean (a word that names
nothing), or with `start: both` from each (two words per concept, searched and erased apart). The
attack of `cul.probes` starts from a generic word of the concept's kind (`cul.probes.GENERIC`: shape,
colour or pattern): the two need not find the same word.
STEREO's second stage (erasing once from theta_0 with anchor concepts) is not taken: DFR's own terms
keep what is retained.
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from dataclasses import dataclass
from difflib import SequenceMatcher

import torch
import torch.nn.functional as F

from cul import threads
from cul.text import random_words
from cul.unlearning.objectives.common import noised, pushed_target

WORD = re.compile(r"\w+(?:['-]\w+)*|\S")  # words, and each punctuation mark on its own


def mention(caption: str, mapped: str) -> tuple[str, str, tuple[str, str]] | None:
    """(the words of `caption` that `mapped` replaces or drops, the words that replace them, the
    caption's text before and after them); None when the two differ in anything but one run of words.
    Punctuation is a word of its own: "circle," against "square," is the mention "circle"."""
    a, b = list(WORD.finditer(caption)), list(WORD.finditer(mapped))
    ops = SequenceMatcher(a=[m[0] for m in a], b=[m[0] for m in b], autojunk=False).get_opcodes()
    changes = [op for op in ops if op[0] != "equal"]
    if len(changes) != 1 or changes[0][0] not in ("replace", "delete"):
        return None
    _, i, j, k, n = changes[0]
    start, end = a[i].start(), a[j - 1].end()
    swap = mapped[b[k].start() : b[n - 1].end()] if n > k else ""  # "": a concept mapped to nothing
    return caption[start:end], swap, (caption[:start], caption[end:])


@dataclass
class Forgotten:
    """One forgotten concept as the search sees it: captions that name it, their mapped twins,
    theta_0's images of them, and the new word's embedding the last search found."""

    concept: str  # the request's concept, or a mention of an earlier one
    templates: list[tuple[str, str]]  # each caption's text before and after the concept's mention
    captions: list[str]
    mapped: list[str]
    x0: torch.Tensor  # theta_0's latents of `captions`
    v: torch.Tensor  # [1, dim]


def concepts(prompts) -> dict[str, list[tuple[str, tuple[str, str], str, str]]]:
    """The words to invert, each with its (mention, template, caption, mapped) rows: the request's
    concept (every forget caption, whichever synonym it uses: one word) and each mention of an
    earlier concept in the `forgotten` captions and their `forgotten_mapped` twins. The prompt set
    does not say which concept a forgotten caption names, and two earlier concepts can share a
    surrogate, so each mention of an earlier concept (a name, a synonym) gets a word of its own.
    A caption that does not differ from its twin in one run of words is an error."""
    forgotten = prompts.retain.get("forgotten", [])
    if len(prompts.forgotten_mapped) != len(forgotten):
        raise ValueError("inversion needs the forgotten captions' mapped twins (forgotten_target: mapped)")
    groups: dict[str, list[tuple[str, tuple[str, str], str, str]]] = defaultdict(list)
    pairs = [(prompts.concept, c, m) for c, m in zip(prompts.forget, prompts.mapped, strict=True)]
    pairs += [(None, c, m) for c, m in zip(forgotten, prompts.forgotten_mapped, strict=True)]
    for name, caption, mapped in pairs:
        found = mention(caption, mapped)
        if found is None:
            raise ValueError(
                f"inversion: {caption!r} and its mapped caption {mapped!r} differ in more than one run of words"
            )
        word, _, template = found
        groups[name or word].append((word, template, caption, mapped))
    return dict(groups)


class InversionAdversary:
    """The search and the erasure term of one step. Built lazily from the step's prompt set.

    Args:
        spec: `cul.unlearning.recipes.Inversion`.
        base: theta_0 (DFR's keep teacher): it draws the forgotten concepts and gives the targets.
        seed: the recipe's seed (theta_0's images are drawn from it).
        replay_steps, replay_guidance: how theta_0 samples the images (the recipe's replay settings).
    """

    def __init__(self, spec, base, seed: int, replay_steps: int, replay_guidance: float) -> None:
        self.spec, self.base, self.seed = spec, base, seed
        self.replay_steps, self.replay_guidance = replay_steps, replay_guidance
        self.found: list[Forgotten] = []
        self.calls = 0
        self.words: tuple[torch.Tensor, torch.Tensor] | None = None  # the embedding table's mean and std

    def prepare(self, prompts) -> None:
        """The request's concept and every earlier forgotten one, with theta_0's images of each
        (its first `spec.images` captions, repeated when it has fewer)."""
        text = self.base.text
        table = text.word_embeddings().detach()
        self.words = text.word_statistics()
        for k, (name, rows) in enumerate(sorted(concepts(prompts).items())):
            rows = [rows[i % len(rows)] for i in range(self.spec.images)]
            captions = [r[2] for r in rows]
            x0 = self.base.sample_latents(
                captions, seed=self.seed * 1000 + k, steps=self.replay_steps, guidance=self.replay_guidance
            )
            ids = text.tokenizer(rows[0][0], add_special_tokens=False).input_ids
            starts = {
                "mention": table[torch.tensor(ids, device=table.device)].mean(0, keepdim=True),  # its own words
                "mean": self.words[0].unsqueeze(0),  # a word that names nothing
            }
            templates, mapped = [r[1] for r in rows], [r[3] for r in rows]
            for where in ("mention", "mean") if self.spec.start == "both" else (self.spec.start,):
                label = f"{name} (from the mean)" if self.spec.start == "both" and where == "mean" else name
                self.found.append(Forgotten(label, templates, captions, mapped, x0, starts[where].clone()))
        if not self.found:
            raise ValueError(
                f"inversion: no forget caption of {prompts.concept!r} differs from its mapped caption in one "
                "run of words, so no mention of a forgotten concept can be replaced by a new word"
            )

    def soft(self, m: Forgotten, rows: list[int]) -> list[str]:
        word = self.base.text.placeholder
        return [f"{m.templates[i][0]}{word}{m.templates[i][1]}" for i in rows]

    def search(self, student, gen: torch.Generator) -> None:
        """Textual inversion of every forgotten concept against `student`, from the last v* (Adam,
        `spec.steps` steps of `spec.batch` images); gradients reach only v."""
        text = student.text
        for m in self.found:
            v = m.v.clone().requires_grad_(True)
            opt = torch.optim.Adam([v], lr=self.spec.lr)
            for _ in range(self.spec.steps):
                threads.tick()
                rows = torch.randint(0, len(m.x0), (self.spec.batch,), generator=gen).tolist()
                x_t, t, noise = noised(student, m.x0[rows], gen)
                eps = student.predict_noise(x_t, t, text.encode_soft(self.soft(m, rows), v).to(x_t.device))
                # a sum: Adam ignores the scale, and a mean's gradient underflows in half precision
                (v.grad,) = torch.autograd.grad(F.mse_loss(eps.float(), noise, reduction="sum"), v)
                opt.step()
            m.v = v.detach()

    def loss(self, student, gen: torch.Generator, t_max: int, push: float) -> torch.Tensor:
        """L_inv on one batch of one forgotten concept (drawn at random), at timesteps below `t_max`
        as L_unl: the caption with v* (or, on `random_share` of the rows, a random word) must lead
        where the mapped caption leads theta_0. Searches first when `spec.every` steps have passed,
        unless every row is random."""
        n_random = math.floor(self.spec.random_share * self.spec.batch)  # rows on random words, rounded down
        if self.calls % self.spec.every == 0 and n_random < self.spec.batch:
            self.search(student, gen)
        self.calls += 1
        m = self.found[int(torch.randint(0, len(self.found), (1,), generator=gen))]
        rows = torch.randint(0, len(m.x0), (self.spec.batch,), generator=gen).tolist()
        x_t, t, _ = noised(self.base, m.x0[rows], gen, t_max)
        target = pushed_target(self.base, x_t, t, [m.captions[i] for i in rows], [m.mapped[i] for i in rows], push)
        soft, text = self.soft(m, rows), student.text
        with torch.no_grad():
            contexts = [text.encode_soft(soft[n_random:], m.v)] if n_random < len(rows) else []
            if n_random:
                assert self.words is not None, "prepare() first"
                words = random_words(self.words, n_random, gen).unsqueeze(1)
                contexts = [text.encode_soft(soft[:n_random], words), *contexts]  # one word per row
            context = torch.cat(contexts).to(x_t.device)
        return F.mse_loss(student.predict_noise(x_t, t, context), target)
