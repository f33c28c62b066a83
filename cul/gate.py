"""The evaluation gate: accept a request step only if it forgot and did not collapse retention.

Pure: it reads a step's `StepMetrics` (the output of `cul.evaluation.Evaluator`) and returns a
`Verdict` with every check and a reason for each failure. What to do on failure (retry with a
recipe stronger where the check failed, then send the request to review) is the `EscalationPolicy`.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from cul.evaluation import StepMetrics, retention
from cul.fmt import pct
from cul.unlearning.recipes import RecipeBase

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


class Check(BaseModel):
    name: str
    value: float | None
    threshold: float
    passed: bool
    reason: str = ""


class Verdict(BaseModel):
    accepted: bool
    checks: list[Check]

    @property
    def reasons(self) -> list[str]:
        return [c.reason for c in self.checks if not c.passed]

    def summary(self) -> str:
        return "accepted" if self.accepted else "rejected: " + "; ".join(self.reasons)


class Gate:
    def __init__(self, config: GateConfig | None = None) -> None:
        self.config = config or GateConfig()

    def decide(self, metrics: StepMetrics, forgotten: list[str], previous: dict[str, float] | None = None) -> Verdict:
        """`metrics`: the candidate's evaluation (with `base`, the base model's figures on the same
        scenes); `forgotten`: every concept the candidate must have forgotten, this request last;
        `previous`: the previous accepted model's per-concept scores (None for the first step)."""
        c = self.config
        checks: list[Check] = []

        def check(name: str, value: float | None, threshold: float, ok: bool, reason: str) -> None:
            checks.append(Check(name=name, value=value, threshold=threshold, passed=ok, reason="" if ok else reason))

        scores = metrics.per_concept
        concept = forgotten[-1]
        for name in forgotten:  # no images of a concept: nothing shows it was forgotten, so refuse
            if name not in scores:
                check(f"ua:{name}", None, c.min_ua, False, f"the evaluation has no images of {name}")
        if concept in scores:
            ua = 1 - scores[concept]
            check("ua", ua, c.min_ua, ua >= c.min_ua, f"UA on {concept} {pct(ua, unit='%')} < {pct(c.min_ua, 0, '%')}")
        for earlier in [f for f in forgotten[:-1] if f in scores]:
            ua_e = 1 - scores[earlier]
            check(
                f"ua:{earlier}",
                ua_e,
                c.min_ua_earlier,
                ua_e >= c.min_ua_earlier,
                f"earlier forgotten {earlier} came back: UA {pct(ua_e, unit='%')} < {pct(c.min_ua_earlier, 0, '%')}",
            )
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


def forgetting_checks_only(failed: list[str]) -> bool:
    """True when every failed check is about forgetting (UA of this request or of an earlier one)."""
    return bool(failed) and all(name == "ua" or name.startswith("ua:") for name in failed)


class EscalationPolicy(BaseModel):
    """How a rejected attempt is retried; attempt 0 is the configured recipe. After `max_attempts`
    the request goes to review.

    The retry goes the way of the checks the last attempt failed. Retention or image quality:
    retention and regularization weights multiplied, more steps. Forgetting only (a concept not
    erased, or an earlier one back): the forget term's weight multiplied, more steps, and the
    earlier forgotten concepts' share of each retain batch raised, with the regularizers left as
    they are, since a stronger pull toward earlier weights is what lets a concept come back."""

    model_config = ConfigDict(extra="forbid")

    max_attempts: int = Field(3, ge=1)
    retention_factor: float = Field(2.0, ge=1)  # l_pres (replay distillation)
    regularization_factor: float = Field(3.0, ge=1)  # l_reg, l2sp, l1sp
    forgetting_factor: float = Field(2.0, ge=1)  # l_unl and forgotten_share, when only forgetting failed
    steps_factor: float = Field(1.5, ge=1)

    def config_for(self, base: RecipeBase, attempt: int, failed: list[str] | None = None) -> RecipeBase:
        """The recipe of `attempt` (0: `base` itself). `failed`: names of the checks the previous
        attempt failed (`Check.name`). Only the weights a recipe has are scaled."""
        if attempt < 0 or attempt >= self.max_attempts:
            raise ValueError(f"attempt {attempt} outside 0..{self.max_attempts - 1}")
        if attempt == 0:
            return base
        own = type(base).model_fields
        update: dict = {"steps": int(round(base.steps * self.steps_factor**attempt))}
        if forgetting_checks_only(failed or []):
            f = self.forgetting_factor**attempt
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
