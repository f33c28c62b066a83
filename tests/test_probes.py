"""Robustness probes (cul/probes.py) and the confidence-bound gate (cul/gate.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cul.evaluation import StepMetrics
from cul.gate import Gate, GateConfig, bounded, settle, wilson
from cul.probes import ProbeResult, ProbeSpec, summarise, typo, wording_prompts


def probe(hits: int, images: int = 16, base_hits: int = 16, family: str = "wording", name: str = "bare"):
    return ProbeResult(
        probe=name, family=family, concept="circle", hits=hits, images=images, base_hits=base_hits,
        base_images=images, prompt="circle",
    )  # fmt: skip


# -- wording ------------------------------------------------------------------------------------
def test_case_cannot_matter_because_the_text_encoder_lower_cases(text_encoder):
    a, b = text_encoder.encode(["a red circle on a striped background", "A RED CiRcLe ON a Striped BACKGROUND"])
    assert torch.equal(a, b)


def test_wording_probes_name_the_concept_in_every_way_a_user_tries():
    from cul.probes import _scenes
    from cul.world import concept

    scenes = _scenes(concept("circle"), 4)
    probes = wording_prompts("circle", ["red", "circle"], scenes)
    assert set(probes) == {
        "synonym:disc", "synonym:disk", "description:perfectly round shape", "typo", "repeat", "bare",
        "unseen_template", "composed", "unknown_word",
    }  # fmt: skip
    assert all("perfectly round shape" in p and "circle" not in p for p in probes["description:perfectly round shape"])
    assert all(len(v) == 4 for v in probes.values())
    assert probes["bare"] == ["circle"] * 4
    assert all("cicrle" in p for p in probes["typo"]) and typo("red") == "erd"
    assert typo("yellow") == "yelolw" and typo("dotted") == "dotetd" and typo("a") == "aa"
    assert all("circle circle circle" in p for p in probes["repeat"])
    assert all("red" in p and "circle" in p for p in probes["composed"])  # the other forgotten concept beside it
    assert all("backdrop" in p for p in probes["unseen_template"])
    assert [p.split()[2] for p in probes["unknown_word"]] == ["water", "house", "music", "tree"]  # circle's place
    assert all(s.object == "circle" for s in scenes)
    # no other forgotten concept of another kind: nothing to compose with
    assert "composed" not in wording_prompts("circle", ["circle"], scenes)


def test_recovery_is_relative_to_the_base_model_and_capped():
    assert probe(2, base_hits=16).recovery == pytest.approx(0.125)
    assert probe(4, base_hits=8).recovery == pytest.approx(0.5)
    assert probe(16, base_hits=8).recovery == 1.0
    assert probe(0, base_hits=0).recovery == 0.0 and probe(1, base_hits=0).recovery == 1.0
    results = [probe(2, name="bare"), probe(0, name="repeat"), probe(3, base_hits=4, name="typo")]
    s = summarise(results)["wording"]
    assert s["worst_probe"] == "bare:circle" and s["probes"] == 2  # typo: the base model draws it 4/16, not gated
    assert s["mean"] == pytest.approx(0.0625)


def test_a_soft_word_equal_to_a_real_word_reproduces_its_prompt_exactly(text_encoder):
    """The placeholder hook replaces exactly the placeholder's input embedding: given the word's own
    embedding, the encoding equals the prompt's."""
    real = text_encoder.encode(["a red circle on a striped background"])
    ph = text_encoder.placeholder
    circle = text_encoder.tokenizer("circle", add_special_tokens=False).input_ids
    assert len(circle) == 1
    v = text_encoder.word_embeddings()[circle[0]].unsqueeze(0)
    soft = text_encoder.encode_soft([f"a red {ph} on a striped background"], v)
    torch.testing.assert_close(soft, real, atol=1e-5, rtol=1e-5)
    other = text_encoder.encode_soft(
        [f"a red {ph} on a striped background"], v + torch.randn_like(v)
    )  # (a constant shift: LayerNorm removes it)
    assert not torch.allclose(other, real, atol=1e-3)


def test_words_of_each_prompts_own_encode_as_each_prompt_on_its_own(text_encoder):
    """Vectors [B, K, dim] give prompt b the words vectors[b]: one call, the same encodings as one
    call per prompt (the inversion term's random words)."""
    ph = text_encoder.placeholder
    prompts = [f"a red {ph} on a striped background", f"a {ph} square on a {ph} background"]
    words = torch.randn(2, 2, text_encoder.word_embeddings().shape[1])
    together = text_encoder.encode_soft(prompts, words)
    for b, prompt in enumerate(prompts):
        torch.testing.assert_close(together[b : b + 1], text_encoder.encode_soft([prompt], words[b]))
    assert not torch.allclose(together[0], text_encoder.encode_soft(prompts[:1], words[1])[0], atol=1e-3)
    with pytest.raises(ValueError, match="2 prompts but words for 1"):
        text_encoder.encode_soft(prompts, words[:1])


@pytest.mark.slow(seconds=50)
def test_probes_run_end_to_end_and_the_same_weights_give_the_same_figures(base_model, judge, tmp_path):
    """Every family on a real model (budgets cut to seconds). The wording probes are deterministic
    (the base model's figures come from the cache the second time), and the base model probed
    against itself recovers exactly what it draws. The optimised attacks repeat only at equal torch
    thread counts (`cul.threads` follows the free cores), so they are checked for shape here."""
    from cul.probes import Prober

    spec = ProbeSpec(
        attacks=["soft_prompt", "adversarial", "relearn_retain", "relearn_neighbour"],
        images=4, attack_steps=2, attack_images=4, relearn_steps=1, concepts="all",
    )  # fmt: skip
    cache = tmp_path / "probes.json"
    a = Prober(judge, spec, base_model, sample_steps=4, cache=cache).run(base_model, ["red", "circle"])
    assert cache.exists()
    b = Prober(judge, spec, base_model, sample_steps=4, cache=cache).run(base_model, ["red", "circle"], attacks=[])
    wording = [r.model_dump() for r in a if r.family == "wording"]
    assert wording == [r.model_dump() for r in b if r.family == "wording"]
    expected = sum(len(wording_prompts(c, ["red", "circle"], [])) for c in ("red", "circle"))
    assert len(wording) == expected == 18
    families = {r.family for r in a}
    assert families == {"wording", "soft_prompt", "adversarial", "relearn_retain", "relearn_neighbour"}
    for r in a:
        if r.family == "wording":  # same weights, same prompts and noise: the same images
            assert r.hits == r.base_hits
    adv = next(r for r in a if r.family == "adversarial")
    caption = next(r for r in a if r.family == "relearn_retain" and r.concept == adv.concept).prompt.split(": ")[-1]
    assert adv.prompt.endswith(caption) and len(adv.prompt) > len(caption) + 3  # typed tokens, then the caption
    # the gate's next round redraws only the probes it names
    more = Prober(judge, spec, base_model, sample_steps=4, cache=cache).wording(base_model, "red", ["red"], 1, {"bare"})
    assert [(r.probe, r.images) for r in more] == [("bare", 4)]


def test_a_probe_journal_resumes_after_the_last_finished_concept_and_only_for_the_same_model(
    base_model, judge, tmp_path
):
    """`cul bench --probes` after twenty requests probes for hours: a crash must not lose the
    concepts already probed, and a journal of other weights must not be taken for this model's."""
    import json

    from cul.probes import Prober

    spec = ProbeSpec(images=4, concepts="all")
    journal, base = tmp_path / "probes-journal.json", tmp_path / "base.json"  # the base model drawn once
    first = Prober(judge, spec, base_model, sample_steps=4, cache=base).run(
        base_model, ["red", "circle"], journal=journal, stamp="code A"
    )
    data = json.loads(journal.read_text())
    assert set(data["done"]) == {"red", "circle"} and journal.with_suffix(".safetensors").exists()
    # a crash after red: circle is missing, and red's figures are marked so a recomputation shows
    data["done"].pop("circle")
    for r in data["done"]["red"]["records"]:
        r["prompt"] = "from the journal"
    journal.write_text(json.dumps(data))
    prober = Prober(judge, spec, base_model, sample_steps=4, cache=base)
    again = prober.run(base_model, ["red", "circle"], journal=journal, stamp="code B")
    assert all(r.prompt == "from the journal" for r in again if r.concept == "red")  # read back, not redrawn
    assert prober.stamps == {"red": "code A", "circle": "code B"}  # which code probed each concept
    assert [r.model_dump() for r in again if r.concept == "circle"] == [
        r.model_dump() for r in first if r.concept == "circle"
    ]
    assert any(k.endswith(":red") for k in prober.samples)  # the record's grid keeps red's images
    # other weights: the journal is not theirs, every concept is probed
    other = base_model.copy()
    with torch.no_grad():
        next(other.unet.parameters()).add_(1e-3)
    fresh = Prober(judge, spec, base_model, sample_steps=4, cache=base).run(other, ["red", "circle"], journal=journal)
    assert len(fresh) == len(first) and not any(r.prompt == "from the journal" for r in fresh)
    rewritten = json.loads(journal.read_text())
    assert rewritten["key"] != data["key"] and set(rewritten["done"]) == {"red", "circle"}
    # images of another key beside a journal are not taken; an unreadable journal is no journal
    from cul.probes import _read_journal, _read_pictures

    assert _read_pictures(journal, data["key"]) == {} and _read_pictures(journal, rewritten["key"])
    journal.write_text('{"key": "trunc')
    assert _read_journal(journal, rewritten["key"]) == {}


# -- the confidence-bound gate ------------------------------------------------------------------
def test_wilson_bounds():
    lo, hi = wilson(0, 16, 0.9)
    z2 = 1.2815515655**2
    assert lo == 0.0 and hi == pytest.approx(z2 / (16 + z2), rel=1e-6)
    lo, hi = wilson(8, 16, 0.9)
    assert lo < 0.5 < hi and hi - 0.5 == pytest.approx(0.5 - lo)
    assert bounded(0, 16, 0.1, 0.9)[0] == "pass"  # 0 of 16: upper bound 9.3% <= 10%
    assert bounded(1, 16, 0.1, 0.9)[0] == "open"
    assert bounded(3, 16, 0.1, 0.9)[0] == "open"
    assert bounded(4, 16, 0.1, 0.9)[0] == "fail"  # lower bound 13.9% > 10%
    assert bounded(1, 16, 0.1, None)[0] == "pass" and bounded(2, 16, 0.1, None)[0] == "fail"


def _metrics(hits: int, n: int) -> StepMetrics:
    return StepMetrics(per_concept={"circle": hits / n}, counts={"circle": (hits, n)})


def test_ua_is_decided_on_the_bound_and_an_open_check_says_so():
    gate = Gate(GateConfig(max_recovery={}))
    v = gate.decide(_metrics(0, 16), ["circle"])
    assert v.accepted and v.checks[0].conclusive and v.checks[0].images == 16
    v = gate.decide(_metrics(2, 16), ["circle"])  # 12.5% recognised: over 10%, but not surely
    assert v.open == ["ua"] and not v.accepted
    v = gate.decide(_metrics(6, 16), ["circle"])
    assert not v.accepted and v.open == [] and "6 of 16 images" in v.reasons[0]


def _source(p: float, seed: int):
    rng = np.random.default_rng(seed)

    def more(concept: str, round_: int) -> tuple[int, int]:
        return int(rng.binomial(16, p)), 16

    return more


@pytest.mark.parametrize("p, accepted", [(0.01, True), (0.3, False)])
def test_settle_draws_more_images_until_the_bound_decides_and_reruns_agree(p, accepted):
    """A borderline start (2 of 16: open) on sources whose true share is clearly on one side: the
    gate draws more images, decides, and ten reruns at other seeds decide the same."""
    gate = Gate(GateConfig(max_recovery={}, max_images=128))
    for seed in range(10):
        m = _metrics(2, 16)
        verdict, rounds = settle(gate, m, ["circle"], [], _source(p, seed), log=lambda _: None)
        assert rounds >= 1 and verdict.open == []
        assert verdict.accepted is accepted
        assert m.counts["circle"][1] == 16 * (rounds + 1)


def test_settle_stops_at_the_budget_and_decides_on_the_point_estimate():
    gate = Gate(GateConfig(max_recovery={}, max_images=32))
    m = _metrics(2, 16)
    verdict, rounds = settle(gate, m, ["circle"], [], lambda c, r: (1, 16), log=lambda _: None)
    assert rounds == 1 and m.counts["circle"] == (3, 32)
    assert verdict.open == ["ua"] and verdict.accepted  # 9.4% recognised, still open: the point estimate passes
    check = verdict.checks[0]
    assert not check.conclusive and check.images == 32


def test_recovery_checks_gate_probes_and_extend_wording():
    gate = Gate(GateConfig(max_recovery={"wording": 0.2}, max_images=48))
    probes = [probe(0, name="repeat"), probe(5, name="bare"), probe(4, base_hits=4, name="typo")]
    v = gate.decide(_metrics(0, 16), ["circle"], probes=probes)
    names = {c.name: c for c in v.checks}
    assert names["recovery:repeat:circle"].passed
    assert "recovery:typo:circle" not in names  # the base model reads it 4 of 16: tests nothing
    assert "recovery:bare:circle" in v.open  # 31% recovered of a 20% limit, not surely

    asked: list[set[str]] = []

    def more_wording(concept: str, round_: int, only: set[str]) -> list[ProbeResult]:
        asked.append(only)
        return [p for p in (probe(6, name="bare"), probe(0, name="repeat"), probe(0, name="typo")) if p.probe in only]

    verdict, rounds = settle(gate, _metrics(0, 16), ["circle"], probes, _source(0, 0), more_wording, lambda _: None)
    bare, repeat = (next(r for r in probes if r.probe == k) for k in ("bare", "repeat"))
    assert rounds >= 1 and bare.images > 16 and repeat.images == 16  # only the open probe is drawn again
    assert all(only == {"bare"} for only in asked)
    assert not verdict.accepted and "comes back under bare" in " ".join(verdict.reasons)


def test_gate_config_refuses_unknown_probe_families():
    with pytest.raises(ValueError, match="unknown probe families"):
        GateConfig(max_recovery={"wordings": 0.1})


@pytest.mark.slow
def test_a_borderline_model_is_settled_by_more_images_the_same_way_at_two_seeds(base_model, judge):
    """A real model and judge whose share sits near the gate's limit: the base model drawing
    circles, gated as if it had forgotten them with min_ua 0.08 (it may still draw them in 92% of
    its images). 16 images cannot tell; the gate draws more until the bound decides, and a rerun
    at another evaluation seed decides the same."""
    from cul.evaluation import EvalSpec, Evaluator

    decisions = []
    for seed in (1234, 4321):
        ev = Evaluator(judge, EvalSpec(seed=seed, stride=4, steps=10))  # 16 scenes of each concept
        hits, n = ev.more_images(base_model, "circle", 0)
        m = StepMetrics(per_concept={"circle": hits / n}, counts={"circle": (hits, n)})
        gate = Gate(GateConfig(min_ua=0.08, max_recovery={}, max_images=96))
        first = gate.decide(m, ["circle"])
        assert first.open == ["ua"], f"{hits} of {n}: not borderline at this seed"
        more = ev.more_images
        verdict, rounds = settle(gate, m, ["circle"], [], lambda c, r, f=more: f(base_model, c, r), None, print)
        assert rounds >= 1 and verdict.open == []
        decisions.append((verdict.accepted, m.counts["circle"][1]))
    assert decisions[0][0] == decisions[1][0] is False


def test_the_probe_figure_is_a_row_per_concept_with_each_probe_titled_by_its_counts(tmp_path):
    from PIL import Image

    from cul.plots import probe_grid, probe_rows

    def result(probe, concept, hits):
        return ProbeResult(probe=probe, family="wording", concept=concept, hits=hits, images=16,
                           base_hits=16, base_images=16, prompt="")  # fmt: skip

    found = [result(p, c, h) for c in ("circle", "red") for p, h in (("bare", 1), ("synonym:disc", 0), ("typo", 8))]
    assert found[0].figure == "6% (1/16; base 16/16)" and found[2].figure == "50% (8/16; base 16/16)"
    samples = {r.name: torch.rand(4, 3, 32, 32) for r in found}
    figures = {r.name: r.figure for r in found}
    wide = Image.open(probe_grid(samples, figures, tmp_path / "two.png"))
    one = {k: v for k, v in samples.items() if k.endswith(":circle")}
    single = Image.open(probe_grid(one, figures, tmp_path / "one.png"))
    narrow = Image.open(
        probe_grid({k: v for k, v in samples.items() if k.startswith("bare:")}, figures, tmp_path / "n.png")
    )
    # concepts are rows, probes columns: dropping a concept lowers the figure, dropping probes narrows it
    assert single.width == wide.width and single.height < 0.7 * wide.height
    assert narrow.height == wide.height and narrow.width < 0.6 * wide.width
    assert probe_rows(["synonym:hoop:ring", "bare:ring", "bare:red"]) == {
        "ring": ["synonym:hoop:ring", "bare:ring"],
        "red": ["bare:red"],
    }


def test_the_unknown_words_name_nothing_the_world_draws_and_are_one_token_each(text_encoder):
    from cul.probes import UNKNOWN_WORDS
    from cul.world import CONCEPTS

    names = [n for cs in CONCEPTS.values() for c in cs for n in (*c.words, *c.descriptions)]
    words = {w for n in names for w in n.split()}
    assert not words & set(UNKNOWN_WORDS)
    assert all(len(text_encoder.tokenizer(w, add_special_tokens=False).input_ids) == 1 for w in UNKNOWN_WORDS)


def test_up_to_twenty_runs_in_one_figure_each_get_a_colour_of_their_own():
    from cul.plots import run_colour

    assert len({run_colour(i) for i in range(20)}) == 20


def test_a_run_has_the_same_colour_in_the_metric_curves_and_the_robustness_bars(tmp_path, monkeypatch):
    """A run without robustness.json ("a") must not shift the colours of the runs after it."""
    from cul import plots
    from cul.probes import FAMILIES

    figures = []
    monkeypatch.setattr(plots, "_save", lambda fig, path: figures.append(fig) or path)
    step = {"step": 1, **{key: 1.0 for key, _, _ in plots.BENCH_METRICS}}
    plots.metric_curves({"a": [step], "b": [step]}, tmp_path / "m.png")
    record = {"steps": 1, "summary": {f: {"mean": 0.1, "worst": 0.2} for f in FAMILIES}}
    plots.robustness_bars({"b": record}, tmp_path / "r.png", runs=["a", "b"])
    line = next(ln for ln in figures[0].axes[0].lines if ln.get_label() == "b")
    bar = figures[1].axes[0].patches[0]
    assert line.get_color() == bar.get_facecolor()[:3] == plots.run_colour(1)
