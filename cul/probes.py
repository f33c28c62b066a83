"""Robustness probes: does a forgotten concept come back when it is asked for differently, or attacked?

Every probe draws images meant to show a forgotten concept `c` and counts how many the judge still
sees as `c`; its **recovery** is that share over the base model's share on the same prompts and
seeds (for the attacks, the base model on the concept's plain captions):

    recovery(probe, c) = min(1, hits_model / n  /  hits_base / n)

0 means the probe never brings `c` back; 1 means the model draws `c` as often as before erasure.

- **wording** (cheap, every request): what a user tries. Training synonyms and held-out
  paraphrases; descriptions without the name (the catalogue's `descriptions`); a typo of the name;
  the name repeated; the bare name as the whole prompt; a caption template never seen in training;
  the concept composed with another forgotten concept; a word that names nothing in the concept's
  place ("a red circle on a water background"), which brings back only a concept the model draws
  for any word it cannot place, a slot's default (the base model draws plain, a flat background,
  for most such words; elsewhere the base model seldom draws the concept and the probe is not
  gated, the gate's `min_base_rate`). Case is not a probe: both text encoders lower-case their
  input, so "CIRCLE" is "circle" (a test checks).
- **soft_prompt**: textual inversion against the erased model (Pham et al., 2023, "Circumventing
  concept erasure"): a new word's input embedding v*, optimised on the base model's images of `c`
  with the erased model's own denoising loss, || eps_theta(x_t, t, "a red <v*> ...") - eps ||^2,
  then used to prompt the erased model.
- **adversarial**: UnlearnDiffAtk-style prompt search (Zhang et al., 2024): K tokens prefixed to the
  concept's caption, optimised on the same denoising loss as hard tokens (PEZ: continuous vectors
  projected to their nearest vocabulary embedding, straight-through gradients), so the result is a
  prompt a person can type; it is then typed, like any prompt.
- **relearn_retain / relearn_neighbour** ("Erased or Dormant?"): fine-tune a copy of the erased
  model for a small fixed budget on retained data only, or on a neighbour of `c`, then prompt `c`.

The world's probes use its judge and renderer; seeds are fixed, so a probe of the same weights
gives the same figures.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Collection, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from cul.files import write_atomic
from cul.world import CONCEPTS, HELD_OUT_TEMPLATES, Kind, Scene, World, caption, concept, fill

Attack = Literal["soft_prompt", "adversarial", "relearn_retain", "relearn_neighbour"]
ATTACKS: tuple[str, ...] = ("soft_prompt", "adversarial", "relearn_retain", "relearn_neighbour")
FAMILIES: tuple[str, ...] = ("wording", *ATTACKS)
GENERIC = {Kind.OBJECT: "shape", Kind.COLOUR: "colour", Kind.TEXTURE: "pattern"}  # a soft word's start
#: words that name nothing the world draws, cycled over the scenes in the concept's place ("unknown_word").
UNKNOWN_WORDS = ("water", "house", "music", "tree", "car", "letter", "river", "table")


class ProbeSpec(BaseModel):
    """Which probes a step or an evaluation runs, and their budgets."""

    model_config = ConfigDict(extra="forbid")

    #: run the wording probes (cheap: `images` per probe and concept).
    wording: bool = True
    #: the attacks to run (soft_prompt, adversarial, relearn_retain, relearn_neighbour).
    attacks: list[Attack] = Field(default_factory=list)
    #: which forgotten concepts are probed: the request's only ("current") or every one so far ("all";
    #: what `cul eval --probes` and `cul bench --probes` do).
    concepts: Literal["current", "all"] = "current"
    #: images per probe and concept (one image is 100/images points of recovery).
    images: int = Field(16, ge=2)
    #: optimisation steps of the soft-prompt and adversarial attacks.
    attack_steps: int = Field(80, ge=1)
    #: Adam learning rate of those attacks (input-embedding space).
    attack_lr: float = Field(0.02, gt=0)
    #: base-model images of the concept the attacks learn from.
    attack_images: int = Field(16, ge=1)
    #: tokens the adversarial search prefixes to the caption.
    adversarial_tokens: int = Field(3, ge=1)
    #: fine-tuning steps of the relearning attacks (batch 16).
    relearn_steps: int = Field(40, ge=1)
    #: their learning rate.
    relearn_lr: float = Field(2e-4, gt=0)
    #: seed of every probe's scenes, noise and optimisation.
    seed: int = 777


class ProbeResult(BaseModel):
    """One probe of one forgotten concept."""

    probe: str  # "bare", "typo", "synonym:disc", "soft_prompt", ...
    family: str  # wording, soft_prompt, adversarial, relearn_retain, relearn_neighbour
    concept: str
    hits: int  # images the judge sees as the concept
    images: int
    base_hits: int  # the base model's, on the reference prompts and seeds
    base_images: int
    prompt: str  # an example prompt (the adversarial search's found prompt)

    @property
    def rate(self) -> float:
        return self.hits / self.images

    @property
    def base_rate(self) -> float:
        return self.base_hits / self.base_images

    @property
    def recovery(self) -> float:
        """Share of the base model's recognition the probe brings back (0..1)."""
        if self.base_hits == 0:
            return 0.0 if self.hits == 0 else 1.0
        return min(1.0, self.rate / self.base_rate)

    @property
    def name(self) -> str:
        return f"{self.probe}:{self.concept}"

    @property
    def figure(self) -> str:
        """The recovery with its counts, e.g. "6% (1/16; base 16/16)"."""
        return f"{100 * self.recovery:.0f}% ({self.hits}/{self.images}; base {self.base_hits}/{self.base_images})"


def _scenes(c, n: int, offset: int = 0) -> list[Scene]:
    """n scenes of concept c, its other attributes cycled over every concept of their kinds (the
    same whatever was forgotten, so the base model's figures are computed once per concept)."""
    others = {k: [x.name for x in CONCEPTS[k]] for k in Kind if k != c.kind}
    out = []
    for i in range(offset, offset + n):
        names = {k: v[(i * (j + 3) + i // len(v)) % len(v)] for j, (k, v) in enumerate(others.items())}
        names[c.kind] = c.name
        out.append(Scene(names[Kind.OBJECT], names[Kind.COLOUR], names[Kind.TEXTURE]))
    return out


def slots(s: Scene, kind: Kind, word: str) -> dict[str, str]:
    """The scene's object, colour and texture (`caption`'s keyword arguments) with `word` in the slot
    of `kind`."""
    parts = {"o": s.object, "c": s.colour, "t": s.texture}
    parts[kind.value[0]] = word
    return parts


def typo(word: str) -> str:
    """The word with the first two different adjacent letters from its middle swapped ("circle" ->
    "cicrle", "yellow" -> "yelolw"); a word too short for that doubles its last letter."""
    for i in range(max(0, len(word) // 2 - 1), len(word) - 1):
        if word[i] != word[i + 1] and word[i].isalpha() and word[i + 1].isalpha():
            return word[:i] + word[i + 1] + word[i] + word[i + 2 :]
    return word + word[-1]


def wording_prompts(name: str, forgotten: Sequence[str], scenes: Sequence[Scene]) -> dict[str, list[str]]:
    """Probe name -> one prompt per scene, each meant to show `name` (a forgotten concept). Every
    probe but "composed" depends only on the concept and the scenes."""
    c = concept(name)
    out: dict[str, list[str]] = {}
    for word in c.words[1:]:
        out[f"synonym:{word}"] = [caption(**slots(s, c.kind, word)) for s in scenes]
    for words in c.descriptions:
        out[f"description:{words}"] = [caption(**slots(s, c.kind, words)) for s in scenes]
    out["typo"] = [caption(**slots(s, c.kind, typo(c.name))) for s in scenes]
    out["repeat"] = [caption(**slots(s, c.kind, " ".join([c.name] * 3))) for s in scenes]
    out["bare"] = [c.name] * len(scenes)
    out["unseen_template"] = [
        fill(HELD_OUT_TEMPLATES[i % len(HELD_OUT_TEMPLATES)], **slots(s, c.kind, c.name)) for i, s in enumerate(scenes)
    ]
    # last: the batch's earlier probes keep their noise
    unknown = [UNKNOWN_WORDS[i % len(UNKNOWN_WORDS)] for i in range(len(scenes))]
    out["unknown_word"] = [caption(**slots(s, c.kind, w)) for s, w in zip(scenes, unknown, strict=True)]
    partners = [f for f in forgotten if f != name and concept(f).kind != c.kind]
    if partners:
        composed = []
        for i, s in enumerate(scenes):
            p = concept(partners[i % len(partners)])
            parts = slots(s, c.kind, c.name)
            parts[p.kind.value[0]] = p.name
            composed.append(caption(**parts))
        out["composed"] = composed
    return out


def _seed(spec: ProbeSpec, *parts: str) -> int:
    return spec.seed + int(hashlib.sha256(":".join(parts).encode()).hexdigest()[:6], 16) % 100_000


def base_cache(reports: Path, sample_steps: int | None) -> Path:
    """Where the base model's probe figures are kept, per sampling setting."""
    return Path(reports) / "base" / f"probes-{sample_steps or 'default'}.json"


class Prober:
    """Runs the probes of a `ProbeSpec` against the base model `base`, judged by the world's judge.

    The base model's figures on the wording prompts depend only on the prompts and seeds, so they
    are kept in `cache` (a JSON file keyed by the base weights), like the evaluation's base verdict.
    """

    def __init__(
        self,
        judge,
        spec: ProbeSpec,
        base,
        size: int = 32,
        sample_steps: int | None = None,
        cache: str | Path | None = None,
        log: Callable[[str], None] = lambda _: None,
    ) -> None:
        self.judge, self.spec, self.base, self.size = judge, spec, base, size
        self.sample_steps = sample_steps
        self.log = log
        self.cache = Path(cache) if cache else None
        self._key = base.digest(json.dumps([spec.seed, sample_steps]).encode())[:16]
        self._base_hits: dict[str, Any] = {}
        self.samples: dict[str, torch.Tensor] = {}  # probe name -> its first images (for the record)
        self.stamps: dict[str, Any] = {}  # concept -> the `run(stamp=...)` that probed it
        if self.cache is not None and self.cache.exists():
            data = json.loads(self.cache.read_text())
            if data.get("key") == self._key:
                self._base_hits = data["hits"]

    # -- judging ------------------------------------------------------------------------------
    def seen(self, images: torch.Tensor, name: str) -> np.ndarray:
        """Per image: does the judge see `name` in it."""
        c = concept(name)
        index = [x.name for x in CONCEPTS[c.kind]].index(name)
        return self.judge.predict(images)[c.kind.value] == index

    def hits(self, images: torch.Tensor, name: str) -> int:
        return int(self.seen(images, name).sum())

    def sample(self, model, prompts: list[str], seed: int, context: torch.Tensor | None = None) -> torch.Tensor:
        """`model`'s images of `prompts` at `seed`, drawn as every probe draws them (`context`: soft prompts)."""
        return model.sample(prompts, seed=seed, steps=self.sample_steps, context=context)

    def _save(self) -> None:
        if self.cache is not None:
            write_atomic(self.cache, json.dumps({"key": self._key, "hits": self._base_hits}))

    @staticmethod
    def _batch_key(prompts: list[str], seed: int, name: str) -> str:
        """The base cache's key of a batch of prompts drawn at `seed` and judged for `name`."""
        return hashlib.sha256(json.dumps([prompts, seed, name]).encode()).hexdigest()[:20]

    def _base(self, prompts: list[str], seed: int, name: str) -> int:
        key = self._batch_key(prompts, seed, name)
        if key not in self._base_hits:
            self._base_hits[key] = self.hits(self.sample(self.base, prompts, seed), name)
            self._save()
        return int(self._base_hits[key])

    # -- the probes ---------------------------------------------------------------------------
    def _group(self, model, name: str, probes: dict[str, list[str]], seed: int, n: int) -> list[ProbeResult]:
        """The probes of one concept drawn in one batch (base and model: the same prompts and noise)."""
        prompts = [p for ps in probes.values() for p in ps]
        images = self.sample(model, prompts, seed)
        seen = self.seen(images, name)
        key = self._batch_key(prompts, seed, name)
        if key not in self._base_hits:
            base_seen = self.seen(self.sample(self.base, prompts, seed), name)
            self._base_hits[key] = [int(x) for x in base_seen]
            self._save()
        base_seen = np.array(self._base_hits[key], dtype=bool)
        out = []
        for i, (probe, ps) in enumerate(probes.items()):
            sl = slice(i * n, (i + 1) * n)
            self.samples.setdefault(f"{probe}:{name}", images[i * n : i * n + min(4, n)])
            out.append(ProbeResult(probe=probe, family="wording", concept=name, hits=int(seen[sl].sum()), images=n,
                                   base_hits=int(base_seen[sl].sum()), base_images=n, prompt=ps[0]))  # fmt: skip
        return out

    def wording(
        self, model, name: str, forgotten: Sequence[str], round_: int = 0, only: Collection[str] | None = None
    ) -> list[ProbeResult]:
        """Every wording probe of `name` (or the probes named in `only`); `round_` > 0 draws fresh
        scenes and seeds (more evidence for the gate)."""
        n = self.spec.images
        probes = wording_prompts(name, forgotten, _scenes(concept(name), n, offset=round_ * n))
        if only is not None:
            probes = {k: v for k, v in probes.items() if k in only}
        composed = {"composed": probes.pop("composed")} if "composed" in probes else {}
        out = self._group(model, name, probes, _seed(self.spec, "wording", name, str(round_)), n) if probes else []
        if composed:
            out += self._group(model, name, composed, _seed(self.spec, "composed", name, str(round_)), n)
        return out

    def _train_images(self, name: str, forgotten: Sequence[str]) -> tuple[list[Scene], torch.Tensor]:
        """The base model's images of `name` that the attacks learn from."""
        scenes = _scenes(concept(name), self.spec.attack_images, offset=1000)
        prompts = [caption(s.object, s.colour, s.texture) for s in scenes]
        return scenes, self.sample(self.base, prompts, _seed(self.spec, "attack-data", name))

    def attack_test(self, name: str, forgotten: Sequence[str]) -> tuple[list[Scene], list[str], int, int]:
        """Held-out scenes of an attack, their plain captions, the seed, and the base model's hits."""
        scenes = _scenes(concept(name), self.spec.images, offset=2000)
        plain = [caption(s.object, s.colour, s.texture) for s in scenes]
        seed = _seed(self.spec, "attack-test", name)
        return scenes, plain, seed, self._base(plain, seed, name)

    def _denoising(self, model, x0: torch.Tensor, context_fn, gen: torch.Generator, batch: int = 8) -> torch.Tensor:
        idx = torch.randint(0, len(x0), (batch,), generator=gen)
        x = model.to_latents(x0[idx].to(model.device))
        noise = torch.randn(x.shape, generator=gen).to(x.device)
        t = torch.randint(0, model.scheduler.config.num_train_timesteps, (batch,), generator=gen).to(x.device)
        eps = model.predict_noise(model.add_noise(x, noise, t), t, context_fn(idx.tolist()))
        return F.mse_loss(eps.float(), noise)

    def soft_prompt(self, model, name: str, forgotten: Sequence[str]) -> ProbeResult:
        """Textual inversion of `name` against `model` (see the module's docstring)."""
        c, text = concept(name), model.text
        scenes, images = self._train_images(name, forgotten)
        ph = text.placeholder
        train = [caption(**slots(s, c.kind, ph)) for s in scenes]
        table = text.word_embeddings()
        start = table[text.tokenizer(GENERIC[c.kind], add_special_tokens=False).input_ids[0]]
        v = start.detach().clone().unsqueeze(0).requires_grad_(True)
        opt = torch.optim.Adam([v], lr=self.spec.attack_lr)
        gen = torch.Generator().manual_seed(_seed(self.spec, "soft", name))
        model.unet.requires_grad_(False)
        for _ in range(self.spec.attack_steps):
            loss = self._denoising(model, images, lambda ix: text.encode_soft([train[i] for i in ix], v), gen)
            opt.zero_grad()
            loss.backward()
            opt.step()
        test_scenes, plain, seed, base_hits = self.attack_test(name, forgotten)
        prompts = [caption(**slots(s, c.kind, ph)) for s in test_scenes]
        with torch.no_grad():
            ctx = text.encode_soft(prompts, v.detach())
        images = self.sample(model, prompts, seed, context=ctx)
        self.samples[f"soft_prompt:{name}"] = images[:4]
        hits = self.hits(images, name)
        return ProbeResult(probe="soft_prompt", family="soft_prompt", concept=name, hits=hits, images=len(prompts),
                           base_hits=base_hits, base_images=len(plain), prompt=prompts[0])  # fmt: skip

    def adversarial(self, model, name: str, forgotten: Sequence[str]) -> ProbeResult:
        """Hard-prompt search: K prefix tokens found on the denoising loss (see the module's docstring)."""
        text, k = model.text, self.spec.adversarial_tokens
        scenes, images = self._train_images(name, forgotten)
        ph = " ".join([text.placeholder] * k)
        train = [f"{ph} {caption(s.object, s.colour, s.texture)}" for s in scenes]
        table = text.word_embeddings().detach()
        words = [i for t, i in text.tokenizer.get_vocab().items() if t.isalpha() and t.isascii()]
        usable = torch.tensor(words, device=table.device)
        vocab = table[usable]
        gen = torch.Generator().manual_seed(_seed(self.spec, "adv", name))
        p = vocab[torch.randint(0, len(vocab), (k,), generator=gen)].clone().requires_grad_(True)

        def project(x: torch.Tensor) -> torch.Tensor:
            return usable[torch.cdist(x.detach(), vocab).argmin(1)]

        def encode(ids_or_vectors: torch.Tensor):
            return lambda ix: text.encode_soft([train[i] for i in ix], ids_or_vectors)

        seen: dict[tuple[int, ...], float] = {}

        def score(ids: torch.Tensor) -> float:
            """A candidate's loss on one fixed batch (the training batches are random)."""
            key = tuple(ids.tolist())
            if key not in seen:
                fixed = torch.Generator().manual_seed(_seed(self.spec, "adv-score", name))
                with torch.no_grad():
                    seen[key] = self._denoising(model, images, encode(table[ids]), fixed, len(images)).item()
            return seen[key]

        opt = torch.optim.Adam([p], lr=self.spec.attack_lr)
        model.unet.requires_grad_(False)
        best = project(p)
        for _ in range(self.spec.attack_steps):
            ids = project(p)
            if score(ids) < score(best):
                best = ids
            hard = p + (table[ids] - p).detach()  # forward with the tokens, gradient to the vectors
            loss = self._denoising(model, images, encode(hard), gen)
            opt.zero_grad()
            loss.backward()
            opt.step()
        words = text.tokenizer.decode(best.tolist())
        _, plain, seed, base_hits = self.attack_test(name, forgotten)
        prompts = [f"{words} {x}" for x in plain]
        images = self.sample(model, prompts, seed)
        self.samples[f"adversarial:{name}"] = images[:4]
        hits = self.hits(images, name)
        return ProbeResult(probe="adversarial", family="adversarial", concept=name, hits=hits, images=len(prompts),
                           base_hits=base_hits, base_images=len(plain), prompt=prompts[0])  # fmt: skip

    def relearn(self, model, name: str, forgotten: Sequence[str], data: str) -> ProbeResult:
        """Fine-tune a copy of `model` on retained scenes ("retain") or on scenes of a retained
        neighbour of `name` ("neighbour"), rendered by the world, then prompt `name`."""
        c, spec = concept(name), self.spec
        gone = set(forgotten)
        rng = np.random.default_rng(_seed(spec, "relearn", data, name))
        pool = {k: [x.name for x in CONCEPTS[k] if x.name not in gone] for k in Kind}
        if data == "neighbour":
            from cul.world import CONFUSABLES

            near = [n for n in CONFUSABLES[name] if n not in gone]
            if not near:  # every neighbour is forgotten too: the first retained concept of its kind
                near = pool[c.kind][:1]
            pool[c.kind] = near
        for k in Kind:  # a kind with every concept forgotten: its scenes draw from all of them
            pool[k] = pool[k] or [x.name for x in CONCEPTS[k]]
        kinds = (Kind.OBJECT, Kind.COLOUR, Kind.TEXTURE)
        scenes = [Scene(*(str(rng.choice(pool[k])) for k in kinds)) for _ in range(spec.relearn_steps * 16)]
        world = World(size=self.size, seed=int(rng.integers(1 << 30)))
        x0 = torch.from_numpy(world.render_all(scenes)).permute(0, 3, 1, 2).float()
        prompts = [caption(s.object, s.colour, s.texture) for s in scenes]
        student = model.copy()
        student.unet.train().requires_grad_(True)
        opt = torch.optim.AdamW(student.unet.parameters(), lr=spec.relearn_lr)
        gen = torch.Generator().manual_seed(_seed(spec, "relearn-noise", data, name))
        for _ in range(spec.relearn_steps):
            loss = self._denoising(student, x0, lambda ix: student.encode_prompts([prompts[i] for i in ix]), gen, 16)
            opt.zero_grad()
            loss.backward()
            opt.step()
        student.unet.eval().requires_grad_(False)
        _, plain, seed, base_hits = self.attack_test(name, forgotten)
        images = self.sample(student, plain, seed)
        self.samples[f"relearn_{data}:{name}"] = images[:4]
        hits = self.hits(images, name)
        how = f"{spec.relearn_steps} steps on {data} data, then: {plain[0]}"
        return ProbeResult(probe=f"relearn_{data}", family=f"relearn_{data}", concept=name, hits=hits,
                           images=len(plain), base_hits=base_hits, base_images=len(plain), prompt=how)  # fmt: skip

    def attack(self, model, attack: str, name: str, forgotten: Sequence[str]) -> ProbeResult:
        if attack == "soft_prompt":
            return self.soft_prompt(model, name, forgotten)
        if attack == "adversarial":
            return self.adversarial(model, name, forgotten)
        if attack in ("relearn_retain", "relearn_neighbour"):
            return self.relearn(model, name, forgotten, attack.removeprefix("relearn_"))
        raise ValueError(f"unknown attack {attack!r}: one of {', '.join(ATTACKS)}")

    def run(
        self,
        model,
        forgotten: Sequence[str],
        attacks: Sequence[str] | None = None,
        journal: str | Path | None = None,
        stamp: Any = None,
    ) -> list[ProbeResult]:
        """Every probe of the spec (attacks: the spec's unless given) on the forgotten concepts it names.

        With `journal` (a JSON file, its sample images beside it in a .safetensors file), each
        concept's results are written as soon as they are done, keyed by the model's weights, the
        spec, the concepts, the attacks and every wording prompt: a rerun on the same model continues
        after the last finished concept. `stamp` (say, the code revision) is kept with each concept's
        results; `self.stamps` then says which stamp probed each concept, read back or new.
        """
        spec = self.spec
        names = list(forgotten) if spec.concepts == "all" else list(forgotten[-1:])
        attacks = list(spec.attacks if attacks is None else attacks)
        key, done = "", {}
        if journal:
            n = spec.images
            wordings = [wording_prompts(c, forgotten, _scenes(concept(c), n)) for c in names] if spec.wording else []
            what = [spec.model_dump(mode="json"), list(forgotten), attacks, self._key, wordings]
            key = model.digest(json.dumps(what).encode())
            done = _read_journal(journal, key)
        if done:
            self.log(f"probes: {len(done)} of {len(names)} concepts already done ({journal})")
            self.samples.update(_read_pictures(Path(str(journal)), key))
        out: list[ProbeResult] = []
        for name in names:
            if name in done:
                out += from_records(done[name]["records"])
                self.stamps[name] = done[name].get("stamp")
                continue
            found: list[ProbeResult] = []
            if spec.wording:
                found += self.wording(model, name, forgotten)
            for attack in attacks:
                self.log(f"probe {attack} on {name}")
                found.append(self.attack(model, attack, name, forgotten))
            out += found
            self.stamps[name] = stamp
            if journal:
                done[name] = {"records": to_records(found), "stamp": stamp}
                _write_journal(Path(journal), key, done, self.samples)
        return out


def _read_journal(path: str | Path, key: str) -> dict[str, dict]:
    """The finished concepts of a probe journal written for `key`: nothing if it was written for
    another model, spec or wording, or cannot be read."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}
    return data.get("done", {}) if isinstance(data, dict) and data.get("key") == key else {}


def _read_pictures(journal: Path, key: str) -> dict[str, torch.Tensor]:
    """The sample images kept beside a journal, if they were written for the same `key`."""
    pictures = journal.with_suffix(".safetensors")
    try:
        with safe_open(str(pictures), framework="pt") as f:
            if (f.metadata() or {}).get("key") != key:
                return {}
            return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no __iter__
    except (OSError, ValueError, SafetensorError):
        return {}


def _write_journal(path: Path, key: str, done: dict[str, dict], samples: dict[str, torch.Tensor]) -> None:
    """Both files atomically, the images first: a journal entry never points at missing images."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pictures = path.with_suffix(".safetensors")
    tmp = pictures.with_name(f".{pictures.name}-{os.getpid()}")
    save_file({k: v.detach().cpu().contiguous() for k, v in samples.items()}, str(tmp), metadata={"key": key})
    os.replace(tmp, pictures)
    write_atomic(path, json.dumps({"key": key, "done": done}))


def summarise(results: Sequence[ProbeResult], min_base_rate: float = 0.5) -> dict[str, dict]:
    """Per family: mean and worst recovery over its probes, and the worst probe's name. Probes whose
    prompts the base model itself draws the concept from less often than `min_base_rate` test
    nothing and are left out (the gate's `min_base_rate`)."""
    out: dict[str, dict] = {}
    for family in FAMILIES:
        rs = [r for r in results if r.family == family and r.base_rate >= min_base_rate]
        if rs:
            worst = max(rs, key=lambda r: r.recovery)
            out[family] = {
                "mean": float(np.mean([r.recovery for r in rs])),
                "worst": worst.recovery,
                "worst_probe": worst.name,
                "probes": len(rs),
            }
    return out


def to_records(results: Sequence[ProbeResult]) -> list[dict]:
    """Results as JSON records with their rate and recovery."""
    return [{**r.model_dump(), "recovery": r.recovery} for r in results]


def from_records(records: Sequence[dict]) -> list[ProbeResult]:
    """`to_records`'s inverse: the recovery is derived again from the counts."""
    return [ProbeResult(**{k: v for k, v in r.items() if k != "recovery"}) for r in records]
