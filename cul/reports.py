"""Writing evaluation reports: metrics JSON beside the pictures that explain them."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from cul.plots import concept_bars, labelled_grids
from cul.world import vocabulary


def write_base_report(metrics: dict, images: torch.Tensor, out: str | Path) -> None:
    """metrics.json, samples.png (every object x colour x texture) and per_concept.png."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    names = vocabulary()
    labelled_grids(images, names["texture"], names["object"], names["colour"], out / "samples.png",
                   "base model samples (rows: object, columns: colour, panels: texture)")
    concept_bars(metrics["per_concept"], out / "per_concept.png",
                 "base model: share of samples the judge finds correct, per concept", threshold=0.8)
