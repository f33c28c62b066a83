"""The trainer and the sequence runner, on a tiny model (structure) and the base model (effect)."""

import json
import re

import numpy as np
import pytest
import torch

from cul.benchmark import run_sequence
from cul.evaluation import EvalSpec, Evaluator
from cul.unlearning.prompts import PromptSet, build_prompt_set
from cul.unlearning.recipes import PRODUCTION, AddOns, DFRRecipe
from cul.unlearning.replay import ReplayBuffer
from cul.unlearning.request import Request
from cul.unlearning.trainer import unlearn

FAST = dict(steps=3, forget_batch=4, replay_steps=2, replay_guidance=1.0)
# DFR as published: every target from theta_{k-1}, its own loss weights, no add-ons
PAPER = dict(
    retain_teacher="previous",
    forgotten_share=None,
    forgotten_target="previous",
    addons=AddOns(),
    t_max=600,
    l_unl=1.0,
    l_pres=10.0,
    push=0.0,
)


def dfr(**kw) -> DFRRecipe:
    """A few steps of DFR as published, with `kw` changed."""
    return DFRRecipe(**{**PAPER, **FAST, "retain_batch": 4, **kw})


def fast(method: str, **kw):
    """A few steps of a production recipe other than DFR."""
    return PRODUCTION[method](**{**FAST, **kw})


@pytest.fixture(scope="module")
def small_prompts(text_encoder):
    ps = build_prompt_set(
        "circle",
        surrogates=["square", "star"],
        n_forget=6,
        n_per_retained=1,
        n_per_neighbour=2,
        text_encoder=text_encoder,
    )
    return ps


@pytest.mark.parametrize("method", ["dfr", "ca", "esd", "naive"])
def test_teacher_never_changes_and_student_does(tiny_world_model, small_prompts, method):
    before = {n: p.detach().clone() for n, p in tiny_world_model.unet.named_parameters()}
    trainable = "all" if method in ("dfr", "naive") else "xattn_kv"
    recipe = dfr() if method == "dfr" else fast(method, trainable=trainable)
    result = unlearn(tiny_world_model, small_prompts, recipe)
    for n, p in tiny_world_model.unet.named_parameters():
        assert torch.equal(p, before[n]), n
        assert not p.requires_grad
    changed = [n for n, p in result.student.unet.named_parameters() if not torch.equal(p, before[n])]
    assert changed
    if trainable == "xattn_kv":
        assert all(
            "attn2.to_k" in n or "attn2.to_v" in n or n.startswith(("encoder_hid", "add_embedding")) for n in changed
        )
    assert result.drift > 0 and result.history


def test_dfr_loss_terms_read_the_frozen_teacher(tiny_world_model, small_prompts):
    """The teacher's forward passes carry no graph: backprop reaches the student only."""
    calls = []
    teacher_unet = tiny_world_model.unet
    # the student is a deep copy and inherits the hook: record the teacher's own calls only
    hook = teacher_unet.register_forward_hook(
        lambda m, i, o: calls.append(torch.is_grad_enabled()) if m is teacher_unet else None
    )
    try:
        unlearn(tiny_world_model, small_prompts, dfr())
    finally:
        hook.remove()
    assert calls and not any(calls)


def test_replay_buffer_is_generated_once_and_online_replay_every_step(tiny_world_model, small_prompts, tmp_path):
    buffered = unlearn(tiny_world_model, small_prompts, dfr(), buffers_dir=tmp_path)
    n_prompts = len(small_prompts.forget) + len(small_prompts.retain_prompts())
    assert buffered.replay_images == n_prompts
    loaded = ReplayBuffer.load(tmp_path / "retain")
    assert loaded.prompts == small_prompts.retain_prompts() and loaded.x0.shape[1:] == (3, 32, 32)
    online = unlearn(tiny_world_model, small_prompts, dfr(replay="online"))
    assert online.replay_images == FAST["steps"] * (FAST["forget_batch"] + 4)


def test_selft_and_projection_run_inside_the_trainer(tiny_world_model, small_prompts):
    r = unlearn(tiny_world_model, small_prompts, fast("ca", addons=AddOns(selft_fraction=0.1, projection=True)))
    assert 0.05 < r.trainable_fraction < 0.2


def test_ties_merge_elects_signs_and_averages_agreeing_entries():
    from cul.unlearning.merging import ties_merge

    base = {"w": torch.zeros(4)}
    a = {"w": torch.tensor([1.0, -2.0, 0.1, 3.0])}
    b = {"w": torch.tensor([3.0, 1.0, 0.0, -1.0])}
    merged = ties_merge(base, [a, b], ["w"], k=1.0, lam=1.0)
    # entry 0: both +, mean 2; entry 1: sum -1 -> '-', only a agrees: -2; entry 3: sum + -> 3
    assert torch.allclose(merged["w"], torch.tensor([2.0, -2.0, 0.1, 3.0]))
    trimmed = ties_merge(base, [a, b], ["w"], k=0.5, lam=2.0)
    assert trimmed["w"][2] == 0  # small entries are trimmed away


@pytest.mark.slow(seconds=100)
def test_one_dfr_step_lowers_the_forgotten_concepts_judge_score(base_model, judge):
    """On the committed base model: forgetting 'red' makes red prompts stop drawing red."""
    from cul.evaluation import generate_scenes, judge_images
    from cul.world import all_scenes

    red = [s for s in all_scenes() if s.colour == "red"][::2]  # 32 scenes
    ps = build_prompt_set(
        "red",
        surrogates=["orange", "pink", "purple"],
        n_forget=32,
        n_per_retained=1,
        n_per_neighbour=4,
        text_encoder=base_model.text,
    )
    cfg = dfr(
        steps=12, forget_batch=16, retain_batch=16, lr=8e-4, replay_steps=10, replay_guidance=3.0, l_unl=10.0, push=1.0
    )
    before = judge_images(judge, generate_scenes(base_model, red, seed=7, steps=10), red).accuracy_per_concept()["red"]
    student = unlearn(base_model, ps, cfg).student
    after = judge_images(judge, generate_scenes(student, red, seed=7, steps=10), red).accuracy_per_concept()["red"]
    assert before >= 0.8 and after < before - 0.3, (before, after)


def test_two_request_smoke_run_resumes_and_writes_results(tiny_world_model, judge, tmp_path):
    # the production recipe, a few steps of it, on a tiny untrained model: what is recorded
    # matters here, not its quality
    base_model = tiny_world_model
    recipe = DFRRecipe(**FAST, retain_batch=4, n_surrogates=2)
    evaluator = Evaluator(judge, EvalSpec(stride=32, steps=4))
    requests = [Request(concept="circle", kind="object"), Request(concept="red", kind="colour")]
    first = run_sequence(
        base_model, evaluator, requests, recipe, tmp_path, name="tiny", max_steps=1, progress=False, log=lambda m: None
    )
    assert len(first) == 1
    logs = []
    started = ("c0ffee", True)  # the revision the process started from, not the one at this step
    results = run_sequence(
        base_model, evaluator, requests, recipe, tmp_path, name="tiny", progress=False, log=logs.append, code=started
    )
    assert "resuming after step 1" in logs[0]
    assert [r["concept"] for r in results] == ["circle", "red"]
    stored = json.loads((tmp_path / "results.json").read_text())
    for key in (
        "request",
        "concept",
        "ua",
        "ra_in",
        "ra_cross",
        "ra_neighbour",
        "fd",
        "drift",
        "seconds",
        "recipe",
        "recipe_hash",
        "git_commit",
    ):
        assert key in stored[-1]
    # each entry says what made it: the resolved recipe, its hash, the commit
    from cul.unlearning.recipes import parse_recipe, recipe_hash

    assert parse_recipe(stored[-1]["recipe"]) == recipe and stored[-1]["recipe_hash"] == recipe_hash(recipe)
    assert stored[-1]["recipe_name"] == "tiny" and (stored[-1]["git_commit"], stored[-1]["git_dirty"]) == started
    assert stored[0]["git_commit"] not in ("c0ffee", "")  # the default: the checkout's revision
    # a name is never reused for another recipe: resuming with a different one is refused
    from cul.benchmark import BenchmarkError

    with pytest.raises(BenchmarkError, match="another recipe"):
        run_sequence(
            base_model,
            evaluator,
            requests,
            recipe.with_steps(4),
            tmp_path,
            name="tiny",
            progress=False,
            log=lambda m: None,
        )
    # nor is a folder resumed in another request order (--order-seed)
    with pytest.raises(BenchmarkError, match="another order"):
        run_sequence(base_model, evaluator, requests, recipe, tmp_path, name="tiny", order_seed=3, progress=False)
    assert 0 <= stored[-1]["ua"] <= 1 and stored[-1]["drift"] > 0
    assert (tmp_path / "steps" / "02" / "unet" / "diffusion_pytorch_model.safetensors").exists()
    second = PromptSet.load(tmp_path / "steps" / "02" / "prompts.json")
    gone = second.retain["forgotten"]  # circle's captions, and their targets with circle swapped out
    assert gone and len(second.forgotten_mapped) == len(gone) and second.forgotten_mapped != gone
    # a clone has results.json but not the (uncommitted) weights: start over instead of failing
    import shutil

    shutil.rmtree(tmp_path / "steps")
    logs.clear()
    again = run_sequence(
        base_model, evaluator, requests, recipe, tmp_path, name="tiny", max_steps=1, progress=False, log=logs.append
    )
    assert "starting again" in logs[0] and [r["concept"] for r in again] == ["circle"]


def test_eval_every_skips_the_evaluation_between_every_nth_request_but_never_the_last(
    tiny_world_model, judge, tmp_path
):
    from cul.reports import evaluated, relapses

    evaluator = Evaluator(judge, EvalSpec(stride=32, steps=4))
    calls = []
    judged = evaluator.__call__

    class Counting:  # the real evaluator, counting its calls
        has_base = True

        def __call__(self, model, forgotten):
            calls.append(list(forgotten))
            return judged(model, forgotten)

        def settings(self) -> dict:
            return evaluator.settings()

    evaluator.set_base(tiny_world_model)
    requests = [Request(concept="circle", kind="object"), Request(concept="red", kind="colour")]
    recipe = DFRRecipe(**FAST, retain_batch=4, n_surrogates=2)
    logs: list[str] = []
    results = run_sequence(
        tiny_world_model, Counting(), requests, recipe, tmp_path, progress=False, log=logs.append, eval_every=3
    )
    assert calls == [["circle", "red"]]  # step 1 is neither a 3rd request nor the last: not evaluated
    assert results[0]["evaluated"] is False and results[0]["ua"] is None and results[0]["per_concept"] is None
    assert "not evaluated" in logs[0] and results[1]["evaluated"] is True and results[1]["ua"] is not None
    # the skipped step counts neither way: what the evaluated one says alone
    back_after_2 = any(results[1]["per_concept"].get(c, 1.0) > 0.1 + 1e-9 for c in ("circle", "red"))
    assert evaluated(results) == 1 and relapses(results) == int(back_after_2)


def test_evaluation_is_exactly_reproducible(base_model, judge):
    evaluator = Evaluator(judge, EvalSpec(stride=32, steps=2))
    a = evaluator(base_model, ["circle"])
    b = evaluator(base_model, ["circle"])
    assert a.per_concept == b.per_concept and a.ua == b.ua
    assert np.isfinite(a.fd)


def test_strided_evaluation_keeps_every_concept_equally_often():
    from collections import Counter

    from cul.evaluation import eval_scenes

    assert len(eval_scenes(32)) == 16
    for stride, n in ((2, 256), (4, 128), (8, 64)):
        scenes = eval_scenes(stride)
        assert len(scenes) == n
        for field in ("object", "colour", "texture"):
            counts = Counter(getattr(s, field) for s in scenes)
            assert len(counts) == 8 and len(set(counts.values())) == 1, (stride, field, counts)


def test_fixed_fd_set_avoids_the_sequence_and_stays_the_same_across_steps(base_model, judge):
    from cul.evaluation import fd_scenes

    seq = ["circle", "red", "striped"]
    scenes = fd_scenes(seq, 40)
    assert len(scenes) == 40
    assert not any({s.object, s.colour, s.texture} & set(seq) for s in scenes)
    from cul.world import CONCEPTS, Kind

    with pytest.raises(ValueError, match="no scene"):  # every object excluded: nothing left to draw
        fd_scenes([c.name for c in CONCEPTS[Kind.OBJECT]], 4)
    evaluator = Evaluator(judge, EvalSpec(stride=32, fd_images=24, steps=2), fd_exclude=seq)
    evaluator.set_base(base_model)
    one = evaluator(base_model, ["circle"])
    two = evaluator(base_model, ["circle", "red"])
    # the same model on the same fixed set: the same FD whatever has been forgotten, ratio 1
    assert one.fd == two.fd == one.base.fd and one.fd_ratio == 1.0
    # the clean-scene FD is still reported, and it does depend on what has been forgotten
    assert one.fd_clean != two.fd_clean


def test_unconditional_replay_distils_both_branches_on_the_same_noised_images(tiny_world_model):
    import torch.nn.functional as F

    from cul.unlearning.batches import RetainBatch
    from cul.unlearning.objectives.common import noised
    from cul.unlearning.objectives.dfr import replay_loss

    teacher = tiny_world_model
    student = teacher.copy()
    with torch.no_grad():  # make the student differ from the teacher
        for p in student.unet.parameters():
            p.add_(0.01 * torch.randn_like(p))
    batch = RetainBatch(["a red circle", "a blue square"], torch.rand(2, 3, 32, 32))
    with torch.no_grad():
        got = replay_loss(student, teacher, batch, torch.Generator().manual_seed(3), uncond=True)
        x_t, t, _ = noised(teacher, batch.x0, torch.Generator().manual_seed(3))
        parts = []
        for prompts in (batch.prompts, ["", ""]):
            ctx = teacher.encode_prompts(prompts)
            parts.append(F.mse_loss(student.predict_noise(x_t, t, ctx), teacher.predict_noise(x_t, t, ctx)))
        plain = replay_loss(student, teacher, batch, torch.Generator().manual_seed(3))
    assert torch.allclose(got, (parts[0] + parts[1]) / 2, rtol=1e-5)
    assert torch.allclose(plain, parts[0], rtol=1e-5) and not torch.allclose(got, plain)


def test_coverage_captions_avoid_every_forgotten_concept_and_train_only_when_asked(tiny_world_model, text_encoder):
    from cul.world import concept

    ps = build_prompt_set(
        "red",
        forgotten_before=["circle"],
        surrogates=["blue"],
        n_forget=4,
        n_per_retained=1,
        n_per_neighbour=1,
        n_coverage=64,
        text_encoder=text_encoder,
    )
    assert len(ps.coverage) == 64 and len(set(ps.coverage)) > 32
    words = {w for c in ("red", "circle") for w in concept(c).synonyms}
    assert not any(set(p.replace(",", " ").split()) & words for p in ps.coverage)
    # coverage has its own random stream: the other groups are what they were without it
    without = build_prompt_set(
        "red",
        forgotten_before=["circle"],
        surrogates=["blue"],
        n_forget=4,
        n_per_retained=1,
        n_per_neighbour=1,
        n_coverage=0,
        text_encoder=text_encoder,
    )
    assert without.coverage == [] and (without.forget, without.retain) == (ps.forget, ps.retain)
    with_cover = unlearn(tiny_world_model, ps, dfr(coverage=True))
    plain = unlearn(tiny_world_model, ps, dfr())
    assert all("cover" in h for h in with_cover.history) and not any("cover" in h for h in plain.history)


def test_base_retain_teacher_pulls_what_is_kept_back_to_the_base_model(tiny_world_model, text_encoder, tmp_path):
    """retain_teacher "base": a drifted previous model is distilled toward theta_0 on the kept
    prompts, the earlier forgotten concept's prompts come from theta_{k-1}, and neither teacher
    changes; "previous" (DFR) keeps the drift."""
    ps = build_prompt_set(
        "circle",
        forgotten_before=["red"],
        surrogates=["square"],
        n_forget=4,
        n_per_retained=1,
        n_per_neighbour=1,
        n_per_forgotten=2,
        text_encoder=text_encoder,
    )
    torch.manual_seed(1)
    previous = tiny_world_model.copy()
    with torch.no_grad():
        for p in previous.unet.parameters():
            p.add_(0.05 * p.std().nan_to_num(0.01) * torch.randn_like(p))
    base_before = {n: p.clone() for n, p in tiny_world_model.unet.named_parameters()}
    prev_before = {n: p.clone() for n, p in previous.unet.named_parameters()}
    cfg = dict(l_unl=0.0, l_reg=0.0, steps=80, lr=1e-3, forget_batch=2, retain_batch=8)

    kept = [p for g, group in ps.retain.items() if g != "forgotten" for p in group]
    gen = torch.Generator().manual_seed(0)
    x = torch.randn((len(kept), *tiny_world_model.latent_shape()), generator=gen)
    t = torch.randint(0, 1000, (len(kept),), generator=gen)

    @torch.no_grad()
    def gap(model) -> float:  # how far the model's predictions on kept prompts are from the base's
        return float(
            (
                (
                    model.predict_noise(x, t, model.encode_prompts(kept))
                    - tiny_world_model.predict_noise(x, t, tiny_world_model.encode_prompts(kept))
                )
                ** 2
            ).mean()
        )

    with pytest.raises(ValueError, match="base model"):
        unlearn(previous, ps, dfr(retain_teacher="base", **cfg))
    anchored = unlearn(previous, ps, dfr(retain_teacher="base", **cfg), buffers_dir=tmp_path, base=tiny_world_model)
    chained = unlearn(previous, ps, dfr(**{**cfg, "steps": 10}))  # zero gradient at any length
    assert ReplayBuffer.load(tmp_path / "retain_base").prompts == kept
    assert ReplayBuffer.load(tmp_path / "retain").prompts == ps.retain["forgotten"]
    assert gap(anchored.student) < 0.5 * gap(previous)
    # self-distillation from theta_{k-1} has zero gradient: the drift stays exactly where it was
    assert gap(chained.student) == pytest.approx(gap(previous), rel=1e-6)
    for model, before in ((tiny_world_model, base_before), (previous, prev_before)):
        assert all(torch.equal(p, before[n]) for n, p in model.unet.named_parameters())


def test_reg_reference_base_pulls_toward_theta_0_where_the_previous_reference_does_not(tiny_world_model, small_prompts):
    torch.manual_seed(2)
    previous = tiny_world_model.copy()
    with torch.no_grad():
        for p in previous.unet.parameters():
            p.add_(0.05 * p.std().nan_to_num(0.01) * torch.randn_like(p))
    base = {n: p.detach().clone() for n, p in tiny_world_model.unet.named_parameters()}

    def distance(model) -> float:
        return float(sum(((p - base[n]) ** 2).sum() for n, p in model.unet.named_parameters()).sqrt())

    cfg = dict(l_unl=0.0, l_pres=0.0, l_reg=0.0, steps=20, lr=1e-3)
    with pytest.raises(ValueError, match="needs a penalty"):
        dfr(l_reg=0.0, addons=AddOns(reg_reference="base"))
    to_base = AddOns(l2sp=1e4, reg_reference="base")
    with pytest.raises(ValueError, match="base model"):
        unlearn(previous, small_prompts, dfr(addons=to_base, **cfg))
    pulled = unlearn(previous, small_prompts, dfr(addons=to_base, **cfg), base=tiny_world_model)
    kept = unlearn(previous, small_prompts, dfr(addons=AddOns(l2sp=1e4), **cfg))
    # L2SP to theta_{k-1} has zero gradient at the start: nothing moves; to theta_0 it closes the gap
    assert distance(kept.student) == pytest.approx(distance(previous), rel=1e-6)
    assert distance(pulled.student) < 0.8 * distance(previous)
    assert all(torch.equal(p, base[n]) for n, p in tiny_world_model.unet.named_parameters())


def test_forgotten_share_fixes_how_much_of_each_retain_batch_the_forgotten_concepts_get(tiny_world_model, text_encoder):
    ps = build_prompt_set(
        "circle",
        forgotten_before=["red"],
        surrogates=["square"],
        n_forget=4,
        n_per_retained=1,
        n_per_neighbour=1,
        n_per_forgotten=2,
        text_encoder=text_encoder,
    )
    taken: dict[str, list[int]] = {"retain": [], "retain_base": []}

    class Recording(ReplayBuffer):
        def __init__(self, name, prompts):
            super().__init__(prompts, torch.zeros(len(prompts), 3, 32, 32))
            self.name = name

        def take(self, idx):
            taken[self.name].append(len(idx))
            return super().take(idx)

    kept = [p for g, group in ps.retain.items() if g != "forgotten" for p in group]
    buffers = {
        "forget": ReplayBuffer(ps.forget, torch.zeros(len(ps.forget), 3, 32, 32)),
        "retain": Recording("retain", ps.retain["forgotten"]),
        "retain_base": Recording("retain_base", kept),
    }
    cfg = dfr(retain_teacher="base", forgotten_share=0.25, retain_batch=8)
    unlearn(tiny_world_model, ps, cfg, buffers=buffers, base=tiny_world_model)
    assert taken == {"retain": [2] * FAST["steps"], "retain_base": [6] * FAST["steps"]}
    with pytest.raises(ValueError, match="retain_teacher"):
        dfr(forgotten_share=0.25)


def test_mapped_forgotten_targets_swap_only_the_forgotten_concept(tiny_world_model, text_encoder):
    """forgotten_target "mapped": the forgotten group's captions get a parallel copy with the earlier
    concept replaced by its surrogate (drawn without changing any other prompt), and the trainer
    refuses a prompt set without them."""
    kw = dict(
        surrogates=["square"],
        n_forget=4,
        n_per_retained=1,
        n_per_neighbour=1,
        n_per_forgotten=3,
        text_encoder=text_encoder,
    )
    plain = build_prompt_set("circle", forgotten_before=["red"], **kw)
    mapped = build_prompt_set("circle", forgotten_before=["red"], forgotten_surrogates={"red": "teal"}, **kw)
    assert mapped.retain == plain.retain and mapped.forget == plain.forget and not plain.forgotten_mapped
    assert len(mapped.forgotten_mapped) == len(mapped.retain["forgotten"]) == 3
    for p, m in zip(mapped.retain["forgotten"], mapped.forgotten_mapped):
        assert "teal" in m and "teal" not in p and not re.search(r"\b(red|crimson)\b", m)
    cfg = dict(retain_teacher="base", forgotten_target="mapped")
    with pytest.raises(ValueError, match="forgotten_mapped"):
        unlearn(tiny_world_model, plain, dfr(**cfg), base=tiny_world_model)
    assert unlearn(tiny_world_model, mapped, dfr(**cfg), base=tiny_world_model).history
    with pytest.raises(ValueError, match="retain_teacher"):
        dfr(forgotten_target="mapped")


@pytest.mark.parametrize(
    "path, alone", [("benchmarks/default-sequence.yaml", {"triangle"}), ("benchmarks/heldout-sequence.yaml", set())]
)
def test_shipped_sequences_are_valid_and_keep_a_confusable_of_every_request(path, alone):
    """What the sequence files promise: ten requests that resolve one after another, a fixed FD set
    left to draw, and a confusable neighbour still retained for every forgotten concept but the
    ones the file names (`alone`)."""
    from cul.benchmark import load_sequence, sequence_concepts
    from cul.evaluation import fd_scenes
    from cul.unlearning.request import resolve_request
    from cul.world import CONFUSABLES
    from tests.support import ROOT

    requests = load_sequence(ROOT / path)
    assert len(requests) == 10
    gone: list[str] = []
    for r in requests:
        gone.append(resolve_request(r, gone).concept)
    assert sequence_concepts(requests) == gone
    assert fd_scenes(gone, 200)
    assert {c for c in gone if not set(CONFUSABLES[c]) - set(gone)} == alone


def test_adversarial_context_stays_in_its_ball_and_brings_the_student_closer_to_the_concept(tiny_world_model):
    """AdvUnlearn's inner step: within radius x |c| per token, and the student's prediction under
    the found context is closer to the concept teacher's than under the prompt's own."""
    import torch.nn.functional as F

    from cul.unlearning.objectives.adversarial import adversarial_context
    from cul.unlearning.recipes import Adversarial

    teacher = tiny_world_model
    student = teacher.copy()
    with torch.no_grad():  # a student that differs from its teacher, as after an erasure
        for p in student.unet.parameters():
            p.add_(0.05 * torch.randn_like(p))
    gen = torch.Generator().manual_seed(0)
    x_t = torch.randn((4, 3, 32, 32), generator=gen)
    t = torch.tensor([100, 300, 500, 700])
    ctx = student.encode_prompts(["a red circle on a striped background"] * 4)
    adv = Adversarial(steps=5, radius=0.5, step_size=0.2)
    found = adversarial_context(student, teacher, x_t, t, ctx, adv)
    ratio = (found - ctx).norm(dim=-1) / ctx.norm(dim=-1)
    assert float(ratio.max()) <= 0.5 + 1e-4 and float(ratio.max()) > 0.1
    with torch.no_grad():
        target = teacher.predict_noise(x_t, t, ctx)
        before = F.mse_loss(student.predict_noise(x_t, t, ctx), target)
        after = F.mse_loss(student.predict_noise(x_t, t, found), target)
    assert after < before


def test_robust_dfr_trains_an_adversarial_term(tiny_world_model, small_prompts):
    from cul.unlearning.recipes import Adversarial

    result = unlearn(tiny_world_model, small_prompts, dfr(adversarial=Adversarial(steps=1)))
    assert all("adv" in row for row in result.history)
    assert result.drift > 0


def test_robust_ca_adds_the_adversarial_term_and_leaves_plain_ca_as_it_was(tiny_world_model, small_prompts):
    """CA with `adversarial` trains L_adv beside its own term; without it the same seed gives
    the same first loss and no L_adv (the option changes nothing when unset, hash included)."""
    from cul.unlearning.recipes import Adversarial, recipe_hash

    plain = fast("ca", trainable="xattn_kv")
    robust = plain.model_copy(update={"adversarial": Adversarial(steps=1)})
    a = unlearn(tiny_world_model.copy(), small_prompts, plain)
    b = unlearn(tiny_world_model.copy(), small_prompts, robust)
    assert all("adv" not in row for row in a.history) and all("adv" in row for row in b.history)
    assert a.history[0]["unl"] == pytest.approx(b.history[0]["unl"])  # same draws, same first step
    assert recipe_hash(plain) == recipe_hash(PRODUCTION["ca"](**{**FAST, "trainable": "xattn_kv"}))
    assert recipe_hash(robust) != recipe_hash(plain)
