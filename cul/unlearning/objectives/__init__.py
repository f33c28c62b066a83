"""The erasers' objectives: one module per method, each reading like its paper.

An objective is built per request step from its recipe, the frozen teacher(s) and the weight
reference, and returns its *named* losses for the student at every training step
(`losses(student, batches, gen)`); `weights` says how the trainer sums them. The trainer adds the
shared add-ons (L1SP/L2SP, SelFT, projection, tail averaging) around any objective.
"""

from __future__ import annotations

from cul.unlearning.objectives.ca import ConceptAblation
from cul.unlearning.objectives.dfr import DFR
from cul.unlearning.objectives.esd import ESD
from cul.unlearning.objectives.naive import NaiveFineTuning

OBJECTIVES = {"dfr": DFR, "ca": ConceptAblation, "esd": ESD, "naive": NaiveFineTuning}

__all__ = ["OBJECTIVES", "DFR", "ConceptAblation", "ESD", "NaiveFineTuning"]
