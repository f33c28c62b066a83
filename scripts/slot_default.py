"""Is a forgotten concept its slot's default, what the model draws where the word names nothing?

For one concept and the base model plus each run's model after a given request, counts the images
the judge sees the concept in under (1) the `unknown_word` wording probe (a word that names nothing
in the concept's place, `cul.probes.UNKNOWN_WORDS`) and (2) random input embeddings in that place
(draws from a Gaussian fitted to the embedding table, 16 images each, the soft-prompt probe's test
scenes and seed). Textual inversion's figure for the same runs is in their robustness.json. The
unknown-word probe is drawn here alone, so its images are not those of a step's wording batch
(where it comes last): comparable figures, not identical ones. `--concept all`: the base model's
unknown-word figure for every concept of the world.

    python scripts/slot_default.py --concept plain --step 1 --out reports/benchmark/plain-first/slot_default.json \
        reports/benchmark/plain-first/M ...
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from cul.benchmark import step_unet
from cul.config import Params
from cul.judge import Judge
from cul.models.diffusion import load_model
from cul.probes import Prober, slots
from cul.text import random_words
from cul.world import CONCEPTS, caption, concept


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="*", type=Path, help="cul bench output folders")
    ap.add_argument("--concept", default="plain", help="a world concept, or all (the base model only)")
    ap.add_argument("--step", type=int, default=1, help="the request after which each run's model is probed")
    ap.add_argument("--random", type=int, default=4, help="random embeddings drawn (16 images each)")
    ap.add_argument("--out", type=Path, required=True)
    a = ap.parse_args()
    p = Params.load("params.yaml")
    base = load_model(Path(p.paths.base_model))
    judge = Judge.from_pretrained(Path(p.paths.judge))
    prober = Prober(judge, p.eval.probes, base, p.world.size, p.eval.steps, None)
    text = base.text

    if a.concept == "all":  # the base model's unknown-word figure for every concept: which are defaults
        if a.runs:
            ap.error("--concept all probes the base model only: no runs")
        rows = {}
        for name in (x.name for xs in CONCEPTS.values() for x in xs):
            (word,) = prober.wording(base, name, [name], only={"unknown_word"})
            rows[name] = [word.hits, word.images]
            print(name, rows[name], flush=True)
        a.out.write_text(json.dumps({"base_unknown_word": rows}, indent=1) + "\n")
        return

    c = concept(a.concept)
    vectors = random_words(text.word_statistics(), a.random, torch.Generator().manual_seed(0))
    scenes, _, seed, _ = prober.attack_test(a.concept, [a.concept])
    prompts = [caption(**slots(s, c.kind, text.placeholder)) for s in scenes]

    def measure(model) -> dict:
        (word,) = prober.wording(model, a.concept, [a.concept], only={"unknown_word"})
        hits = []
        for v in vectors:
            with torch.no_grad():
                ctx = text.encode_soft(prompts, v.unsqueeze(0))
            hits.append(prober.hits(prober.sample(model, prompts, seed, context=ctx), a.concept))
        return {"unknown_word": [word.hits, word.images], "random_embeddings": hits, "images_each": len(prompts)}

    out = {"concept": a.concept, "step": a.step, "base": measure(base)}
    print("base", out["base"], flush=True)
    for run in a.runs:
        out[run.name] = measure(base.with_unet(step_unet(run, a.step)))
        print(run.name, out[run.name], flush=True)
    a.out.write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
