"""Which judge scores a project's steps (`judge.kind` in params), and the evaluation that goes with it.

- `world`: the CNN `cul judge` trains on the world's renderer (`cul.judge.Judge`), scoring the
  world's scenes against real renders (`cul.evaluation.Evaluator`);
- `clip`: a local CLIP directory (`cul.clip_judge.ClipJudge`), zero-shot over the active catalogue,
- `vlm`: a local vision-language model (`cul.vlm_judge.VlmJudge`) asked a yes/no question per
  concept; both score the catalogue's prompts with the base model as FD's reference
  (`cul.catalogue_evaluation.CatalogueEvaluator`).

Both evaluations answer the same calls: `(model, forgotten) -> StepMetrics`,
`paraphrase_ua(model, concept, forgotten)` and `evidence_prompts(concept, forgotten)`.
"""

from __future__ import annotations

from pathlib import Path

from cul.catalogue import Catalogue


class JudgeError(ValueError):
    """A judge that does not fit the settings (kind, catalogue, directory); the message says why."""


def uses_world_scenes(catalogue: Catalogue, kind: str) -> bool:
    """The world's own evaluation (scenes, real renders) applies: its catalogue and its judge."""
    return catalogue.name == "world" and kind == "world"


def load_judge(kind: str, path: str | Path, catalogue: Catalogue):
    """The judge of `kind` from `path`, answering for `catalogue`'s concepts."""
    path = Path(path)
    if kind == "world":
        from cul.judge import Judge

        if catalogue.name != "world":
            raise JudgeError(
                f"the world's judge only knows the world's concepts, not the catalogue {catalogue.name!r}: "
                "set judge.kind: clip and paths.judge to a local CLIP directory"
            )
        if not (path / "judge.safetensors").is_file():
            raise JudgeError(f"{path}: no world judge here (train it with `cul judge`)")
        return Judge.from_pretrained(path)
    if kind == "clip":
        from cul.clip_judge import ClipJudge

        try:
            return ClipJudge.from_pretrained(path, catalogue)
        except Exception as e:  # transformers and safetensors raise many kinds
            raise JudgeError(f"{path}: cannot load a CLIP judge ({type(e).__name__}: {str(e)[:300]})") from e
    if kind == "vlm":
        from cul.vlm_judge import VlmJudge

        try:
            return VlmJudge.from_pretrained(path, catalogue)
        except Exception as e:  # transformers and safetensors raise many kinds
            raise JudgeError(f"{path}: cannot load a VLM judge ({type(e).__name__}: {str(e)[:300]})") from e
    raise JudgeError(f"unknown judge kind {kind!r}: world, clip or vlm")


def step_evaluator(params, catalogue: Catalogue, spec, base, cache: str | Path | None = None):
    """The evaluation of a step (`spec`: an `EvalSpec`) against the base model `base`."""
    from cul.catalogue_evaluation import CatalogueEvaluator
    from cul.evaluation import Evaluator

    judge = load_judge(params.judge.kind, params.paths.judge, catalogue)
    if uses_world_scenes(catalogue, params.judge.kind):
        world = Evaluator(judge, spec, params.world.size, params.world.eval_seed)
        world.set_base(base, cache=cache)
        return world
    any_catalogue = CatalogueEvaluator(
        catalogue, judge, spec.images_per_concept, spec.seed, spec.steps, spec.batch_size, spec.paraphrase_scenes
    )
    any_catalogue.set_base(base)
    return any_catalogue
