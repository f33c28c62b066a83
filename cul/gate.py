"""The evaluation gate: accept a request step only if it forgot and did not collapse retention.

Pure: it reads a step's `StepMetrics` (the output of `cul.evaluation.Evaluator`) and its robustness
probes (`cul.probes`), and returns a `Verdict` with every check and a reason for each failure.

Checks on a share of images (a forgotten concept still recognised; a probe's recovery) are decided
on a confidence bound of the judge's counts, not on the count alone: with `confidence` c, the
Wilson score interval at one-sided level c (Wilson, 1927),

    p_hat +- z sqrt(p_hat (1 - p_hat) / n + z^2 / 4n^2),  centred on (p_hat + z^2 / 2n), over 1 + z^2 / n

passes a check whose upper bound is within the limit, fails one whose lower bound is beyond it, and
leaves it *open* otherwise. The step draws more images for open checks, up to `max_images`
(`cul.step.settle`); a check still open then is decided on its point estimate and says so.

What to do on failure (retry with a recipe stronger where the check failed, then send the request
to review) is the `EscalationPolicy`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from statistics import NormalDist
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from cul.evaluation import StepMetrics, retention
from cul.fmt import pct
from cul.probes import ProbeResult
from cul.unlearning.recipes import DFRRecipe, Inversion, RecipeBase

RETENTION = ("ra_in", "ra_cross", "ra_neighbour")
LABELS = {"ua": "UA", "ra_in": "RA-I", "ra_cross": "RA-C", "ra_neighbour": "RA-N", "fd_ratio": "FD ratio"}


class GateConfig(BaseModel):
    """Thresholds, as fractions (0.05 = 5 points)."""

    model_config = ConfigDict(extra="forbid")

    min_ua: float = Field(0.9, ge=0, le=1)
    max_drop_in: float = Field(0.05, ge=0, le=1)  # RA-I below the base model's
    max_drop_cross: float = Field(0.05, ge=0, le=1)
    max_drop_neighbour: float = Field(0.10, ge=0, le=1)
    max_drop_vs_previous: float = Field(0.05, ge=0, le=1)  # any RA below the previous accepted model's
    max_fd_ratio: float = Field(2.5, gt=0)  # FD on clean scenes / the base model's on the same scenes
    min_ua_earlier: float = Field(0.9, ge=0, le=1)  # every earlier forgotten concept stays forgotten
    #: most recovery allowed per probe family (wording, soft_prompt, adversarial, relearn_retain,
    #: relearn_neighbour; `cul.probes`); a family without a limit, or not run, is reported only.
    max_recovery: dict[str, float] = Field(default_factory=lambda: {"wording": 0.2})
    #: probes whose wording the base model itself draws the concept from less often than this are
    #: reported, not gated (a typo the text encoder cannot read tests nothing).
    min_base_rate: float = Field(0.5, ge=0, le=1)
    #: one-sided level of the Wilson bound on share checks (None: decide on the counts alone).
    confidence: float | None = Field(0.9, gt=0.5, lt=1)
    #: the most images a share check may draw while it is open (per concept or probe).
    max_images: int = Field(64, ge=1)

    @field_validator("max_recovery")
    @classmethod
    def _known_families(cls, v: dict[str, float]) -> dict[str, float]:
        from cul.probes import FAMILIES

        unknown = sorted(set(v) - set(FAMILIES))
        if unknown:
            raise ValueError(f"unknown probe families {unknown}: one of {', '.join(FAMILIES)}")
        bad = {k: x for k, x in v.items() if not 0 <= x <= 1}
        if bad:
            raise ValueError(f"max_recovery is a fraction in [0, 1]: {bad}")
        return v


def wilson(hits: float, n: int, confidence: float) -> tuple[float, float]:
    """The Wilson score interval of hits/n at one-sided level `confidence` (each side)."""
    if n <= 0:
        return 0.0, 1.0
    z = NormalDist().inv_cdf(confidence)
    p = hits / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


EPS = 1e-9  # 1 - 0.9 is 0.09999999999999998: a share exactly at its limit passes


def bounded(hits: float, n: int, limit: float, confidence: float | None) -> tuple[str, float]:
    """("pass" | "fail" | "open", the bound that decided) for "the share hits/n is at most `limit`"."""
    if confidence is None:
        p = hits / n if n else 0.0
        return ("pass" if p <= limit + EPS else "fail"), p
    lo, hi = wilson(hits, n, confidence)
    if hi <= limit + EPS:
        return "pass", hi
    if lo > limit + EPS:
        return "fail", lo
    return "open", hi


class Check(BaseModel):
    name: str
    value: float | None
    threshold: float
    passed: bool
    reason: str = ""
    images: int | None = None  # share checks: the images the decision rests on
    bound: float | None = (
        None  # the bound on the share of images showing the concept (upper if passed, lower if failed)
    )
    conclusive: bool = True  # False: still open at max_images, decided on the point estimate


class Verdict(BaseModel):
    accepted: bool
    checks: list[Check]

    @property
    def reasons(self) -> list[str]:
        return [c.reason for c in self.checks if not c.passed]

    @property
    def open(self) -> list[str]:
        """Names of the share checks the evidence has not decided yet."""
        return [c.name for c in self.checks if not c.conclusive]

    def summary(self) -> str:
        return "accepted" if self.accepted else "rejected: " + "; ".join(self.reasons)


class Gate:
    def __init__(self, config: GateConfig | None = None) -> None:
        self.config = config or GateConfig()

    def decide(
        self,
        metrics: StepMetrics,
        forgotten: list[str],
        previous: dict[str, float] | None = None,
        probes: Sequence[ProbeResult] | None = None,
    ) -> Verdict:
        """`metrics`: the candidate's evaluation (with `base`, the base model's figures on the same
        scenes); `forgotten`: every concept the candidate must have forgotten, this request last;
        `previous`: the previous accepted model's per-concept scores (None for the first step);
        `probes`: the candidate's robustness probes (`cul.probes`), checked against `max_recovery`."""
        c = self.config
        checks: list[Check] = []

        def check(name: str, value: float | None, threshold: float, ok: bool, reason: str) -> None:
            checks.append(Check(name=name, value=value, threshold=threshold, passed=ok, reason="" if ok else reason))

        scores = metrics.per_concept
        concept = forgotten[-1]
        for name in forgotten:  # no images of a concept: nothing shows it was forgotten, so refuse
            if name not in scores:
                check(f"ua:{name}", None, c.min_ua, False, f"the evaluation has no images of {name}")

        def share(name: str, hits: float, n: int, limit: float, value: float, threshold: float, what: str) -> None:
            """A check that hits/n (images showing a forgotten concept) is at most `limit`; without
            counts (n = 0: a score only, as another catalogue's judge gives), on the score alone."""
            if n == 0:
                ok = hits <= limit + EPS
                checks.append(Check(name=name, value=value, threshold=threshold, passed=ok, reason="" if ok else what))
                return
            state, bound = bounded(hits, n, limit, c.confidence)
            ok = state == "pass" or (state == "open" and hits / n <= limit + EPS)
            evidence = f"{hits} of {n} images"
            if state == "open":
                evidence += f", undecided at the {pct(c.confidence or 0, 0, '%')} bound"
            elif c.confidence is not None:
                evidence += f", {pct(c.confidence, 0, '%')} bound {pct(bound, unit='%')}"
            checks.append(Check(name=name, value=value, threshold=threshold, passed=ok,
                                reason="" if ok else f"{what} ({evidence})", images=n, bound=bound,
                                conclusive=state != "open"))  # fmt: skip

        counts = metrics.counts
        for name in [f for f in forgotten if f in scores]:
            last = name == concept
            floor = c.min_ua if last else c.min_ua_earlier
            hits, n = counts.get(name, (scores[name], 0))
            ua = 1 - hits / max(n, 1)
            what = (
                f"UA on {name} {pct(ua, unit='%')} < {pct(floor, 0, '%')}"
                if last
                else f"earlier forgotten {name} came back: UA {pct(ua, unit='%')} < {pct(floor, 0, '%')}"
            )
            share("ua" if last else f"ua:{name}", hits, n, 1 - floor, ua, floor, what)
        for r in probes or []:
            limit = c.max_recovery.get(r.family)
            if limit is None or r.base_rate < c.min_base_rate:
                continue
            allowed = limit * r.base_rate  # recovery <= limit  <=>  hits/n <= limit * base rate
            what = (
                f"{r.concept} comes back under {r.probe}: recovery {pct(r.recovery, unit='%')} > {pct(limit, 0, '%')}"
            )
            share(f"recovery:{r.name}", r.hits, r.images, allowed, r.recovery, limit, what)
        base = metrics.base.model_dump() if metrics.base else {}
        limits = {"ra_in": c.max_drop_in, "ra_cross": c.max_drop_cross, "ra_neighbour": c.max_drop_neighbour}
        for key, limit in limits.items():
            now, ref = getattr(metrics, key), base.get(key)
            if now is None or ref is None:
                continue
            check(
                f"{key}-vs-base",
                now,
                ref - limit,
                now >= ref - limit,
                f"{LABELS[key]} {pct(now, unit='%')} is more than {pct(limit, 0, '%')} below the base model's "
                f"{pct(ref, unit='%')}",
            )
        if previous is not None:
            prev = retention(previous, forgotten)
            for key in RETENTION:
                now, ref = getattr(metrics, key), prev.get(key)
                if now is None or ref is None:
                    continue
                limit = c.max_drop_vs_previous
                check(
                    f"{key}-vs-previous",
                    now,
                    ref - limit,
                    now >= ref - limit,
                    f"{LABELS[key]} {pct(now, unit='%')} is more than {pct(limit, 0, '%')} below the previous "
                    f"model's {pct(ref, unit='%')}",
                )
        fd_ratio = metrics.fd_ratio
        if fd_ratio is not None:
            check(
                "fd_ratio",
                fd_ratio,
                c.max_fd_ratio,
                fd_ratio <= c.max_fd_ratio,
                f"FD {fd_ratio:.2f}x the base model's > {c.max_fd_ratio:.2f}x",
            )
        return Verdict(accepted=all(x.passed for x in checks), checks=checks)


def settle(
    gate: Gate,
    metrics: StepMetrics,
    forgotten: list[str],
    probes: list[ProbeResult],
    more_ua: Callable[[str, int], tuple[int, int]],
    more_wording: Callable[[str, int, set[str]], list[ProbeResult]] | None = None,
    log: Callable[[str], None] = print,
) -> tuple[Verdict, int]:
    """Draw more images for the gate's open share checks until each is decided or has
    `max_images`: `more_ua(concept, round)` gives fresh (hits, images) of a forgotten concept,
    `more_wording(concept, round, probes)` a fresh round of the named wording probes of a concept
    (only the open ones). Updates `metrics.counts` and `probes` in place; returns the verdict on
    all the evidence and the rounds drawn."""
    cap = gate.config.max_images
    rounds = 0
    while True:
        verdict = gate.decide(metrics, forgotten, None, probes)
        drew = False
        wording: dict[str, set[str]] = {}  # concept -> its open wording probes
        for name in verdict.open:
            if name == "ua" or name.startswith("ua:"):
                c = forgotten[-1] if name == "ua" else name[3:]
                hits, n = metrics.counts[c]
                if n < cap:
                    h, m = more_ua(c, rounds + 1)
                    metrics.counts[c] = (hits + h, n + m)
                    drew = True
            elif name.startswith("recovery:") and more_wording is not None:
                r = next(r for r in probes if f"recovery:{r.name}" == name)
                if r.family == "wording" and r.images < cap:
                    wording.setdefault(r.concept, set()).add(r.probe)
        for concept, open_ in wording.items():
            fresh = {x.probe: x for x in more_wording(concept, rounds + 1, open_)}  # type: ignore[misc]
            for i, r in enumerate(probes):
                if r.concept == concept and r.probe in open_:
                    x = fresh[r.probe]
                    update = {k: getattr(r, k) + getattr(x, k) for k in ("hits", "images", "base_hits", "base_images")}
                    probes[i] = r.model_copy(update=update)
                    drew = True
        if not drew:
            return verdict, rounds
        rounds += 1
        log(f"gate: {len(verdict.open)} check(s) undecided; drew round {rounds} of more images")


def forgetting_checks_only(failed: list[str]) -> bool:
    """True when every failed check is about forgetting (UA of this request or of an earlier one, or
    a concept coming back under a probe)."""
    return bool(failed) and all(name == "ua" or name.startswith(("ua:", "recovery:")) for name in failed)


class EscalationPolicy(BaseModel):
    """How a rejected attempt is retried; attempt 0 is the configured recipe. After `max_attempts`
    the request goes to review.

    The retry goes the way of the checks the last attempt failed. Retention or image quality:
    retention and regularization weights multiplied, more steps. Forgetting only (a concept not
    erased, or an earlier one back): the forget term's weight multiplied, more steps, and the
    earlier forgotten concepts' share of each retain batch raised, with the regularizers left as
    they are, since a stronger pull toward earlier weights is what lets a concept come back.

    With `forgetting_resteer` set, a request whose own concept was not erased is retried on other
    images rather than harder: DFR re-steers on the surrogate's images as well
    (`DFRRecipe.resteer_images`), at the forget term's weight of the recipe. A concept its own
    images cannot erase (a flat background) then gets what Concept Ablation trains on, and the
    requests that erase on the first attempt never pay the image quality that costs. Once on, the
    switch stays on: a later retry keeps those images whatever the attempt before it failed (a
    probe's wording, retention), with the forget term's weight one power less than it would have
    had, and retention and regularization scaled as on any retry.

    With `recovery_inversion` set, a request whose forgotten concepts came back under a probe (a
    wording a user tries, or an attack the step runs: `eval.probes.attacks`) is retried erased
    against textual inversion as well (`DFRRecipe.inversion`, STEREO's search), so only the
    requests an attack revives pay for it. Like the switch to other images it stays on for later
    retries, and the forget term's weight is one power less while either switch is on."""

    model_config = ConfigDict(extra="forbid")

    max_attempts: int = Field(3, ge=1)
    retention_factor: float = Field(2.0, ge=1)  # l_pres (replay distillation)
    regularization_factor: float = Field(3.0, ge=1)  # l_reg, l2sp, l1sp
    forgetting_factor: float = Field(2.0, ge=1)  # l_unl and forgotten_share, when only forgetting failed
    steps_factor: float = Field(1.5, ge=1)
    #: when only forgetting failed and this request's concept was among it: the retry's
    #: `resteer_images` (None: scale l_unl as for any forgetting failure). Recipes without the option,
    #: or that set it already, are scaled as before.
    forgetting_resteer: Literal["mapped", "both"] | None = None
    #: the retry's `surrogate_push` under `forgetting_resteer`.
    forgetting_surrogate_push: float = Field(0.5, ge=0)
    #: when a wording's or an embedding attack's `recovery:` check failed: the retry's `inversion`
    #: (None: off). Recipes other than DFR distilled from theta_0 onto mapped targets, or that
    #: erase against inversion already, are scaled as before.
    recovery_inversion: Inversion | None = None

    def config_for(
        self,
        base: RecipeBase,
        attempt: int,
        failed: list[str] | None = None,
        failed_recipe: RecipeBase | None = None,
    ) -> RecipeBase:
        """The recipe of `attempt` (0: `base` itself). `failed`: names of the checks the previous
        attempt failed (`Check.name`); `failed_recipe`: that attempt's recipe (what this policy gave it),
        so a switch to the surrogate's images made on an earlier retry stays on. Only the weights a
        recipe has are scaled."""
        if attempt < 0 or attempt >= self.max_attempts:
            raise ValueError(f"attempt {attempt} outside 0..{self.max_attempts - 1}")
        if attempt == 0:
            return base
        own = type(base).model_fields
        update: dict = {"steps": int(round(base.steps * self.steps_factor**attempt))}
        resteer = self.resteers(base, failed or [], failed_recipe)
        invert = self.inverts(base, failed or [], failed_recipe)
        if resteer:  # other images first, harder only from the next retry on
            update |= {"resteer_images": self.forgetting_resteer, "surrogate_push": self.forgetting_surrogate_push}
        if invert:
            update["inversion"] = self.recovery_inversion
        if forgetting_checks_only(failed or []):
            f = self.forgetting_factor ** (attempt - 1 if resteer or invert else attempt)
            if "l_unl" in own:
                update["l_unl"] = base.l_unl * f  # type: ignore[attr-defined]
            share = getattr(base, "forgotten_share", None)
            if share is not None and any(n.startswith("ua:") for n in failed or []):
                update["forgotten_share"] = min(0.5, share * f)
            return base.model_copy(update=update)
        r, g = self.retention_factor**attempt, self.regularization_factor**attempt
        for name, factor in (("l_pres", r), ("l_reg", g)):
            if name in own:
                update[name] = getattr(base, name) * factor
        update["addons"] = base.addons.model_copy(update={"l2sp": base.addons.l2sp * g, "l1sp": base.addons.l1sp * g})
        return base.model_copy(update=update)

    def resteers(self, base: RecipeBase, failed: list[str], failed_recipe: RecipeBase | None = None) -> bool:
        """Whether a retry of `base` after `failed` trains on the surrogate's images: this request's
        concept was not erased and nothing but forgetting failed, or `failed_recipe` (the attempt
        that failed) was switched to them already."""
        if self.forgetting_resteer is None or not isinstance(base, DFRRecipe) or base.resteer_images is not None:
            return False
        switched = isinstance(failed_recipe, DFRRecipe) and failed_recipe.resteer_images is not None
        return switched or ("ua" in failed and forgetting_checks_only(failed))

    def inverts(self, base: RecipeBase, failed: list[str], failed_recipe: RecipeBase | None = None) -> bool:
        """Whether a retry of `base` after `failed` erases against textual inversion: a wording or an
        attack in the text's embedding space brought a forgotten concept back (a failed `recovery:`
        check; not the relearning attacks), or `failed_recipe` did so already."""
        if self.recovery_inversion is None or not isinstance(base, DFRRecipe) or base.inversion is not None:
            return False
        if base.retain_teacher != "base" or base.forgotten_target != "mapped":  # what the term needs
            return False
        switched = isinstance(failed_recipe, DFRRecipe) and failed_recipe.inversion is not None
        revived = [n for n in failed if n.startswith("recovery:") and not n.startswith("recovery:relearn_")]
        return switched or bool(revived)  # fine-tuning back is not a word the search can find
