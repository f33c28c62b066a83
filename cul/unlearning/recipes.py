"""Recipes: everything one eraser needs to turn theta_{k-1} into theta_k, typed per method.

A recipe is a pydantic model chosen by its `method` (a discriminated union): `DFRRecipe`,
`CARecipe`, `ESDRecipe`, `NaiveRecipe`. Each holds only its own fields; every method shares the
training settings of `RecipeBase` and the add-ons of `AddOns` (CUR's regularizers, SelFT, gradient
projection, TIES merging, tail averaging). **The code default of each recipe is what production
runs**: `DFRRecipe()` is the pipeline's `dfr`. Every other variant is a fully resolved YAML file
under `experiments/` (`load_recipe("experiments/NAME.yaml")`).

Every result records the resolved recipe, its hash (`recipe_hash`) and the git commit, so a name
can never silently stand for two recipes.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Annotated, ClassVar, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, model_serializer, model_validator

from cul.unlearning.regularizers import Trainable

METHODS = ("dfr", "ca", "esd", "naive")
Reference = Literal["previous", "base"]


class RecipeError(ValueError):
    """A recipe that cannot be found or read; the message says which and why."""


class TiesMerge(BaseModel):
    """TIES merging (Yadav et al., 2023): each concept erased from theta_0 on its own; the task
    vectors trimmed to their top `k` entries, signs elected, agreeing entries averaged, and
    `lam` times the result added to theta_0."""

    model_config = ConfigDict(extra="forbid")

    k: float = Field(0.5, gt=0, le=1)
    lam: float = Field(1.5, gt=0)


class AddOns(BaseModel):
    """Add-ons any eraser can take (CUR, Lee et al. 2025, and SWA)."""

    model_config = ConfigDict(extra="forbid")

    #: L1SP weight: `l1sp * mean |theta - theta_ref|` over the trained weights.
    l1sp: float = Field(0.0, ge=0)
    #: L2SP weight: `l2sp * mean (theta - theta_ref)^2` over the trained weights.
    l2sp: float = Field(0.0, ge=0)
    #: theta_ref of L1SP, L2SP and DFR's L_reg: "previous" (the request's start theta_{k-1}, as DFR and
    #: CUR) or "base" (theta_0). A pull toward theta_{k-1} resets every request, so moves no loss asks
    #: for add up like a random walk; a pull toward theta_0 takes them back.
    reg_reference: Reference = "previous"
    #: SelFT: train only this top fraction of elements by |theta * g| (None: off).
    selft_fraction: float | None = Field(None, gt=0, le=1)
    #: forget batches whose gradients rank SelFT's importance.
    selft_batches: int = Field(4, ge=1)
    #: CUR's gradient projection: K/V gradients of cross-attention kept off the protected prompts' span.
    projection: bool = False
    #: keep only the span's top directions (None: the whole span).
    projection_max_rank: int | None = Field(None, ge=1)
    #: share of the last training steps whose iterates are averaged into the returned weights
    #: (Polyak / SWA tail averaging; 0: the last iterate).
    tail_average: float = Field(0.0, ge=0, lt=1)
    #: merge per-concept erasures from theta_0 with TIES instead of chaining them (None: chain).
    ties: TiesMerge | None = None


class RecipeBase(BaseModel):
    """Training settings every eraser shares."""

    model_config = ConfigDict(extra="forbid")

    #: which UNet parameters train: "all", cross-attention ("xattn") or its K/V ("xattn_kv"),
    #: each with the text path that reads the prompt.
    trainable: Trainable = "all"
    #: optimizer steps per request.
    steps: int = Field(150, ge=1)
    #: forget prompts per step.
    forget_batch: int = Field(16, ge=1)
    #: AdamW learning rate.
    lr: float = Field(2e-4, gt=0)
    #: "constant", or "cosine" decay to 0 by the last step.
    lr_schedule: Literal["constant", "cosine"] = "constant"
    #: AdamW weight decay.
    weight_decay: float = Field(0.0, ge=0)
    #: AdamW epsilon.
    adam_eps: float = Field(1e-8, gt=0)
    #: gradient-norm clip (0: none).
    grad_clip: float = Field(1.0, ge=0)
    #: teacher samples: generated once per request ("buffer") or fresh every step ("online", DFR's).
    replay: Literal["buffer", "online"] = "buffer"
    #: DDIM steps of the teacher samples.
    replay_steps: int = Field(20, ge=1)
    #: classifier-free guidance of the teacher samples.
    replay_guidance: float = Field(3.0, ge=0)
    #: teacher samples per prompt in a buffer.
    replay_copies: int = Field(1, ge=1)
    #: surrogates per request (hints first, then the nearest by noise prediction).
    n_surrogates: int = Field(5, ge=1)
    #: whether a concept's confusable neighbours may be its surrogates.
    surrogate_neighbours: bool = True
    #: "sequential" (theta_{k-1} -> theta_k) or "simultaneous" (every concept so far at once from
    #: theta_0: the reference upper bound, for benchmarks).
    mode: Literal["sequential", "simultaneous"] = "sequential"
    #: training seed; request k trains with `seed * 100 + k` (`for_request`).
    seed: int = 0
    addons: AddOns = AddOns()

    #: which teacher samples the forget term noises: of the forget prompts or of the mapped prompts.
    forget_images: ClassVar[str] = "forget"

    def forget_sources(self) -> tuple[str, ...]:
        """The teacher samples the forget term noises, by source ("forget", "mapped")."""
        return (self.forget_images,)

    def needs_base(self) -> bool:
        """Whether a step needs the base model theta_0 beside its teacher."""
        return self.addons.reg_reference == "base" or self.distils_from_base()

    def distils_from_base(self) -> bool:
        return False

    def replays_retained(self) -> bool:
        """Whether the step distils retain prompts (and so needs their teacher samples)."""
        return False

    def penalties(self) -> float:
        return self.addons.l1sp + self.addons.l2sp

    @model_validator(mode="after")
    def _reference_needs_a_penalty(self):
        if self.addons.reg_reference == "base" and not self.penalties():
            raise ValueError("addons.reg_reference: base needs a penalty to apply it to (l_reg, l1sp or l2sp)")
        return self

    def for_request(self, k: int):
        """Request k's recipe: its own seed, so a resumed, re-timed or pipeline step draws what the
        benchmark's step k drew."""
        return self.model_copy(update={"seed": self.seed * 100 + k})

    def with_steps(self, steps: int):
        return self.model_copy(update={"steps": steps})


class Adversarial(BaseModel):
    """Adversarial erasure (AdvUnlearn, Zhang et al., 2024): before each forget term, an inner
    minimisation finds the text context, within a ball around the forget prompt's, under which the
    student draws the concept again,

        delta* = argmin_{|delta_i| <= radius |c_i|}  || eps_theta(x_t, t, c + delta) - eps_0(x_t, t, c) ||^2,

    and the outer step re-steers that context too, at the cost of `steps` extra passes per training
    step. It aims at the soft-prompt and adversarial attacks of `cul.probes`; measured, it holds
    against the prompt search but not against textual inversion, whose learned embedding lies
    outside the ball (reports/benchmark/README.md, "Under attack")."""

    model_config = ConfigDict(extra="forbid")

    #: inner descent steps per training step.
    steps: int = Field(3, ge=1)
    #: the ball's radius per token, relative to the token's own context norm.
    radius: float = Field(0.5, gt=0)
    #: each inner step's length, relative to the token's context norm (normalised gradient).
    step_size: float = Field(0.25, gt=0)
    #: weight of the adversarial re-steering term, relative to l_unl.
    weight: float = Field(1.0, gt=0)


def drop_unset(data: dict, unset: dict[str, object]) -> dict:
    """`data` (a model's dump) without the options in `unset` that hold their unset value: an option
    added to a recipe stays out of its dump and hash until it is set, so recipes made before it keep
    their hashes."""
    for key, value in unset.items():
        if key in data and data[key] == value:
            del data[key]
    return data


class Inversion(BaseModel):
    """Erasure against textual inversion (STEREO's search stage, Srivatsan et al., 2025): every
    `every` training steps, textual inversion of each forgotten concept (the request's and the
    earlier ones') against the student, from theta_0's images of it; the new word found must then
    lead to the surrogate too (`cul/unlearning/objectives/inversion.py`). An experiment: each search
    costs `steps` forward and backward passes per forgotten concept."""

    model_config = ConfigDict(extra="forbid")

    #: training steps between searches (the first runs before the first step).
    every: int = Field(50, ge=1)
    #: Adam steps of each search, per forgotten concept (each search starts from the last one's word).
    steps: int = Field(20, ge=1)
    #: the search's Adam learning rate (input-embedding space; the soft-prompt probe's).
    lr: float = Field(0.02, gt=0)
    #: theta_0's images per forgotten concept the search learns from and the term trains on.
    images: int = Field(8, ge=1)
    #: images per search step and per erasure term.
    batch: int = Field(8, ge=1)
    #: weight of the term, relative to l_unl.
    weight: float = Field(1.0, gt=0)
    #: share of each term's rows (rounded down) whose new word is a random one (a draw from a Gaussian
    #: fitted to the input-embedding table, fresh each step) instead of v*: the words that name
    #: nothing, which a slot answers with its default (a flat background for an unknown texture
    #: word: plain). With every row random the search is skipped.
    random_share: float = Field(0.0, ge=0, le=1)
    #: where each concept's first search starts: `mention`, the input embedding of the caption's own
    #: words for it; `mean`, the embedding table's mean, a word that names nothing (where a slot's
    #: default lies, and nearer to where an attack that starts from a generic word ends); `both`, two
    #: words per concept, one from each start, each searched and erased on its own (twice the search's cost).
    start: Literal["mention", "mean", "both"] = "mention"

    @model_serializer(mode="wrap")
    def _drop_unset(self, handler):
        return drop_unset(handler(self), {"random_share": 0.0, "start": "mention"})


class Relearning(BaseModel):
    """Erasure that holds after fine-tuning (meta-unlearning, Gao et al., 2024): every `every`
    training steps, a copy of the student is fine-tuned for `steps` steps on theta_0's images of
    retained captions, as the relearning attack does (with `neighbours_of: all`, the attack on a
    forgotten concept drawn at random), and L_unl (with `hold: all`, every forgotten concept's
    erasure terms) is asked to hold at the weights it reaches too
    (`cul/unlearning/objectives/relearning.py`). An experiment: each simulation costs `steps` forward
    and backward passes, and the terms one more per training step each."""

    model_config = ConfigDict(extra="forbid")

    #: training steps between simulations (the first runs before the first step).
    every: int = Field(50, ge=1)
    #: AdamW steps of each simulated fine-tuning.
    steps: int = Field(20, ge=1)
    #: its learning rate (the relearning attack's, `cul.probes.ProbeSpec.relearn_lr`).
    lr: float = Field(2e-4, gt=0)
    #: images per simulated fine-tuning step.
    batch: int = Field(16, ge=1)
    #: what it fine-tunes on: the concept's neighbours' captions, every retained caption, or `both`
    #: (half of each batch from each: the two relearning attacks of `cul.probes`).
    data: Literal["neighbour", "retain", "both"] = "neighbour"
    #: weight of the terms, relative to the weights they have at theta (l_unl; l_pres for the
    #: earlier concepts' share of L_pres).
    weight: float = Field(1.0, gt=0)
    #: which erasures must hold at the fine-tuned weights: the request's concept (`request`), or
    #: every forgotten concept (`all`: the terms that keep the earlier ones forgotten too).
    hold: Literal["request", "all"] = "request"
    #: whose neighbours `data` means: the request's concept's (`request`), or, from the second
    #: simulation of a step on, a forgotten concept's drawn at random, the request's or an earlier
    #: one's (`all`: the relearning attack on an earlier concept fine-tunes on its own neighbours).
    #: Needs `hold: all`.
    neighbours_of: Literal["request", "all"] = "request"

    @model_validator(mode="after")
    def _neighbours_need_hold(self) -> Relearning:
        if self.neighbours_of == "all" and self.hold != "all":
            raise ValueError("neighbours_of 'all' simulates attacks on earlier concepts: it needs hold 'all'")
        if self.neighbours_of == "all" and self.data == "retain":
            raise ValueError("neighbours_of 'all' chooses whose neighbours to fine-tune on: data 'retain' takes none")
        return self

    @model_serializer(mode="wrap")
    def _drop_unset(self, handler):
        return drop_unset(handler(self), {"hold": "request", "neighbours_of": "request"})


#: options absent from a recipe's dump and hash while unset (at these values), so recipes made before them keep
#: their hashes.
UNSET_OPTIONS: dict[str, object] = {
    **dict.fromkeys(("adversarial", "inversion", "relearning", "resteer_images", "surrogate_push")),
    "forgotten_images": "previous",
}


class AdversarialOption(BaseModel):
    """The erasers that offer adversarial erasure (DFR, CA)."""

    #: adversarial erasure (None: off); see `Adversarial`.
    adversarial: Adversarial | None = None

    @model_serializer(mode="wrap")
    def _drop_unset_options(self, handler):
        return drop_unset(handler(self), UNSET_OPTIONS)


class DFRRecipe(AdversarialOption, RecipeBase):
    """DFR (Distillation-based Forgetting and Retention) with the changes that make it hold over ten
    requests here (docs/method.md). The defaults are the production recipe."""

    method: Literal["dfr"] = "dfr"
    surrogate_neighbours: bool = False
    #: retain prompts per step (replay distillation).
    retain_batch: int = Field(32, ge=1)
    #: re-steering only below this timestep (DFR's T_max).
    t_max: int = Field(1000, ge=1, le=1000)
    #: weight of the re-steering term L_unl.
    l_unl: float = Field(10.0, ge=0)
    #: extra push of the re-steering target away from the concept (0: DFR's plain match).
    push: float = Field(1.0, ge=0)
    #: weight of the replay distillation term L_pres (0: none).
    l_pres: float = Field(30.0, ge=0)
    #: weight of DFR's L_reg, the sum-L2 to theta_ref (0: none).
    l_reg: float = Field(1e-4, ge=0)
    #: also distil eps(x_t, "") on replayed images.
    replay_uncond: bool = False
    #: also distil the teacher on captions of many clean scenes (no images of their own).
    coverage: bool = False
    #: who supplies the targets of what is kept: "previous" (DFR: theta_{k-1}) or "base" (theta_0).
    retain_teacher: Reference = "base"
    #: with retain_teacher base: the share of each retain batch given to the earlier forgotten
    #: concepts' prompts (None: drawn uniformly with the rest).
    forgotten_share: float | None = Field(0.25, gt=0, lt=1)
    #: with retain_teacher base, the targets of earlier forgotten concepts' prompts: "previous"
    #: (theta_{k-1}, same prompt) or "mapped" (theta_0 on the prompt with the concept swapped for the
    #: surrogate theta_{k-1} now draws for it).
    forgotten_target: Literal["previous", "mapped"] = "mapped"
    #: the images that keep earlier forgotten concepts forgotten: "previous" (the replay's, theta_{k-1}'s
    #: samples of their prompts, which show their surrogates now) or "both" (those, and L_rehold: a
    #: forget batch of theta_0's samples, which show the concepts themselves, with L_unl's pushed target
    #: and weight). Needs forgotten_target mapped; refused with gradient projection, which protects
    #: those prompts' keys and values.
    forgotten_images: Literal["previous", "both"] = "previous"
    #: erasure against textual inversion (None: off); see `Inversion`. Needs retain_teacher base.
    inversion: Inversion | None = None
    #: erasure that holds after fine-tuning on kept data (None: off); see `Relearning`. Needs
    #: retain_teacher base.
    relearning: Relearning | None = None
    #: the images the re-steering term noises. None: DFR's, the teacher's samples of the forget
    #: prompts (the concept's own trajectories); "mapped": theta_0's samples of the mapped prompts
    #: (the surrogate's images, as Concept Ablation trains on); "both": each forget batch on both.
    #: On the concept's own images the surrogate's prediction can only steer what noise still
    #: hides, which is little for a texture as weak as a flat background.
    resteer_images: Literal["mapped", "both"] | None = None
    #: the push on the surrogate's images under `resteer_images` (None: `push`; 0: the target is
    #: what theta_0 predicts for the mapped prompt, Concept Ablation's).
    surrogate_push: float | None = Field(None, ge=0)
    addons: AddOns = AddOns(l2sp=2500.0, reg_reference="base", tail_average=0.5)

    def forget_sources(self) -> tuple[str, ...]:
        return {None: ("forget",), "mapped": ("mapped",), "both": ("forget", "mapped")}[self.resteer_images]

    def distils_from_base(self) -> bool:
        return self.retain_teacher == "base"

    def replays_retained(self) -> bool:
        return self.l_pres > 0

    def penalties(self) -> float:
        return self.l_reg + super().penalties()

    @model_validator(mode="after")
    def _options_need_base_teacher(self) -> DFRRecipe:
        if self.retain_teacher != "base":
            if self.forgotten_share is not None:
                raise ValueError("forgotten_share only applies with retain_teacher: base (set it to null)")
            if self.forgotten_target != "previous":
                raise ValueError("forgotten_target: mapped only applies with retain_teacher: base")
        if self.forgotten_images != "previous" and (self.retain_teacher != "base" or self.forgotten_target != "mapped"):
            raise ValueError(
                "forgotten_images: both needs retain_teacher: base and forgotten_target: mapped (theta_0 draws "
                "the forgotten concepts, and their mapped captions give the targets)"
            )
        if self.forgotten_images != "previous" and self.addons.projection:
            raise ValueError(
                "forgotten_images: both with projection: gradient projection protects the earlier forgotten "
                "prompts' keys and values, which L_rehold trains"
            )
        if self.relearning is not None and (self.retain_teacher != "base" or self.l_pres == 0):
            raise ValueError(
                "relearning needs retain_teacher: base and l_pres > 0 (it fine-tunes on theta_0's samples of "
                "the retained captions)"
            )
        if self.inversion is not None and (self.retain_teacher != "base" or self.forgotten_target != "mapped"):
            raise ValueError(
                "inversion needs retain_teacher: base and forgotten_target: mapped (theta_0 draws the "
                "forgotten concepts, and their mapped captions give the targets)"
            )
        return self


class CARecipe(AdversarialOption, RecipeBase):
    """Concept Ablation (Kumari et al., 2023), model-based, on cross-attention K/V."""

    method: Literal["ca"] = "ca"
    trainable: Trainable = "xattn_kv"
    lr: float = Field(1e-3, gt=0)
    forget_images: ClassVar[str] = "mapped"


class ESDRecipe(RecipeBase):
    """ESD-x (Gandikota et al., 2023): negative guidance on cross-attention."""

    method: Literal["esd"] = "esd"
    trainable: Trainable = "xattn"
    lr: float = Field(1e-3, gt=0)
    #: strength of the negative guidance.
    eta: float = Field(1.0, ge=0)
    #: erase the concept's name alone ("concept", as ESD erases "Van Gogh"), or the full forget
    #: captions ("context"), whose negative guidance also pushes away their other words.
    erase: Literal["concept", "context"] = "concept"


class NaiveRecipe(RecipeBase):
    """Plain fine-tuning: images of the surrogate captioned with the forget prompt."""

    method: Literal["naive"] = "naive"
    forget_images: ClassVar[str] = "mapped"


Recipe = Annotated[DFRRecipe | CARecipe | ESDRecipe | NaiveRecipe, Field(discriminator="method")]
_ADAPTER: TypeAdapter = TypeAdapter(Recipe)
PRODUCTION = {"dfr": DFRRecipe, "ca": CARecipe, "esd": ESDRecipe, "naive": NaiveRecipe}


def parse_recipe(data: dict) -> Recipe:
    """A recipe from a mapping (its `method` picks the class; unknown keys are an error)."""
    return _ADAPTER.validate_python(data)


def recipe_hash(recipe: RecipeBase) -> str:
    """12 hex digits of the SHA-256 of the resolved recipe (canonical JSON)."""
    text = json.dumps(recipe.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def load_recipe(name_or_path: str | Path) -> tuple[str, Recipe]:
    """(name, recipe) of a production method name (dfr, ca, esd, naive: the code default) or of an
    experiment file (its name is the file's stem)."""
    text = str(name_or_path)
    if text in PRODUCTION:
        return text, PRODUCTION[text]()
    path = Path(text)
    if not path.suffix and (Path("experiments") / f"{text}.yaml").exists():
        path = Path("experiments") / f"{text}.yaml"
    if not path.is_file():
        raise RecipeError(f"{text!r} is neither a method ({', '.join(METHODS)}) nor a recipe file")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise RecipeError(f"{path}: not valid YAML ({e})") from e
    if not isinstance(data, dict) or "method" not in data:
        raise RecipeError(f"{path}: a recipe file is a mapping with a `method` ({', '.join(METHODS)})")
    try:
        return path.stem, parse_recipe(data)
    except ValidationError as e:
        raise RecipeError(f"{path}: {e}") from e


def dump_recipe(recipe: RecipeBase, header: str = "") -> str:
    """The fully resolved YAML of a recipe (every field written), under an optional comment."""
    data = recipe.model_dump(mode="json")
    body = yaml.safe_dump({"method": data.pop("method"), **data}, sort_keys=False)
    return "".join(f"# {line}\n" if line else "#\n" for line in header.splitlines()) + body
