"""The pipeline's pure parts: the evaluation gate, the escalation policy, the request queue, step
specs and deletion records. No servers, no models: each runs in milliseconds."""

from __future__ import annotations

import json
import re

import pytest
import yaml

from cul.gate import EscalationPolicy, Gate, GateConfig
from cul.queue import RequestQueue, State
from cul.step import StepSpec, load_steps, next_key, run_attempts, save_step
from cul.unlearning.recipes import AddOns, CARecipe, DFRRecipe, Inversion, recipe_hash
from cul.unlearning.request import AlreadyForgotten, Request, RequestError
from tests.support.fakes import ALL, evaluation, metrics_for


def test_gate_accepts_a_clean_step():
    v = Gate().decide(metrics_for({"red": 0.0}, ["red"]), ["red"])
    assert v.accepted and v.reasons == []
    assert {c.name for c in v.checks} >= {"ua", "ra_in-vs-base", "ra_cross-vs-base", "ra_neighbour-vs-base", "fd_ratio"}


def test_gate_rejects_weak_forgetting_with_a_reason():
    v = Gate(GateConfig(min_ua=0.95)).decide(metrics_for({"red": 0.2}, ["red"]), ["red"])
    assert not v.accepted
    assert v.reasons == ["UA on red 80.0% < 95%"]


def test_gate_rejects_neighbour_collapse_but_tolerates_a_small_drop():
    ok = Gate().decide(metrics_for({"red": 0.0, "orange": 0.85, "pink": 1.0}, ["red"]), ["red"])
    assert ok.accepted  # RA-N 92.5%: within 10 points of the base model
    bad = Gate().decide(metrics_for({"red": 0.0, "orange": 0.3, "pink": 0.6}, ["red"]), ["red"])
    assert not bad.accepted
    assert any(r.startswith("RA-N") for r in bad.reasons)


def test_gate_rejects_an_earlier_concept_coming_back():
    v = Gate().decide(metrics_for({"red": 0.0, "circle": 0.5}, ["circle", "red"]), ["circle", "red"])
    assert not v.accepted
    assert any("circle came back" in r for r in v.reasons)


def test_gate_refuses_when_the_evaluation_never_showed_the_concept():
    m = metrics_for({"red": 0.0}, ["red"])
    del m.per_concept["red"]
    v = Gate().decide(m, ["red"])
    assert not v.accepted and "no images of red" in v.reasons[0]


def test_gate_compares_with_the_previous_accepted_model():
    previous = {n: 1.0 for n in ALL} | {"circle": 0.0}
    now = metrics_for(
        {n: 0.9 for n in ALL} | {"circle": 0.0, "red": 0.0}, ["circle", "red"], base_scores={n: 0.9 for n in ALL}
    )
    # within 5 points of the base model (90%) but 10 points below the previous model (100%)
    v = Gate().decide(now, ["circle", "red"], previous)
    assert not v.accepted
    assert any("previous model" in r for r in v.reasons)
    assert Gate().decide(now, ["circle", "red"], None).accepted


def test_gate_rejects_image_quality_loss():
    v = Gate(GateConfig(max_fd_ratio=1.5)).decide(metrics_for({"red": 0.0}, ["red"], fd_ratio=2.0), ["red"])
    assert v.reasons == ["FD 2.00x the base model's > 1.50x"]


def test_escalation_strengthens_retention_and_stops_at_the_limit():
    policy = EscalationPolicy(max_attempts=3, retention_factor=2, regularization_factor=3, steps_factor=1.5)
    base = DFRRecipe(l_pres=10, l_reg=1e-4, addons=AddOns(l2sp=100), steps=100)
    assert policy.config_for(base, 0) == base
    second = policy.config_for(base, 2)
    assert (second.l_pres, second.l_reg, second.addons.l2sp, second.steps) == (40, pytest.approx(9e-4), 900, 225)
    assert second.lr == base.lr and second.method == base.method
    with pytest.raises(ValueError, match="outside"):
        policy.config_for(base, 3)
    # a recipe without replay or L_reg (CA) gets only what it has scaled
    ca = policy.config_for(CARecipe(addons=AddOns(l2sp=25.0)), 1)
    assert (ca.addons.l2sp, ca.steps) == (75.0, 225) and ca.method == "ca"


def test_escalation_forgets_harder_when_only_forgetting_failed():
    policy = EscalationPolicy(
        max_attempts=3, retention_factor=2, regularization_factor=3, forgetting_factor=2, steps_factor=1.5
    )
    base = DFRRecipe(
        l_unl=10,
        l_pres=10,
        addons=AddOns(l2sp=100, reg_reference="base"),
        steps=100,
        retain_teacher="base",
        forgotten_share=0.25,
    )
    relapse = policy.config_for(base, 1, failed=["ua:red"])  # an earlier concept came back
    assert (relapse.l_unl, relapse.forgotten_share, relapse.steps) == (20, 0.5, 150)
    assert (relapse.l_pres, relapse.addons, relapse.l_reg) == (base.l_pres, base.addons, base.l_reg)
    weak = policy.config_for(base, 2, failed=["ua"])  # this request's concept not erased
    assert (weak.l_unl, weak.forgotten_share, weak.steps) == (40, 0.25, 225)
    # any retention or quality failure means the regularizing direction, as before
    mixed = policy.config_for(base, 1, failed=["ua", "ra_in-vs-base"])
    assert (mixed.l_unl, mixed.l_pres, mixed.addons.l2sp) == (10, 20, 300)
    assert policy.config_for(base, 1, failed=[]) == policy.config_for(base, 1)


def test_escalation_resteers_on_the_surrogates_images_when_the_concept_was_not_erased():
    policy = EscalationPolicy(forgetting_factor=2, steps_factor=1.5, forgetting_resteer="both")
    base = DFRRecipe(l_unl=10, steps=100, forgotten_share=0.25)
    first = policy.config_for(base, 1, failed=["ua"])
    assert (first.resteer_images, first.surrogate_push, first.l_unl, first.steps) == ("both", 0.5, 10, 150)
    assert first.forget_sources() == ("forget", "mapped")
    second = policy.config_for(base, 2, failed=["ua", "ua:red"])  # then harder, one power less
    assert (second.resteer_images, second.l_unl, second.forgotten_share, second.steps) == ("both", 20, 0.5, 225)
    # an earlier concept back, a recipe that re-steers already, or a retention failure: as before
    off = EscalationPolicy(forgetting_factor=2, steps_factor=1.5)
    assert policy.config_for(base, 1, failed=["ua:red"]) == off.config_for(base, 1, failed=["ua:red"])
    both = base.model_copy(update={"resteer_images": "both"})
    assert policy.config_for(both, 1, failed=["ua"]).l_unl == 20
    assert policy.config_for(base, 1, failed=["ua", "fd_ratio"]).resteer_images is None
    assert policy.config_for(CARecipe(), 1, failed=["ua"]) == off.config_for(CARecipe(), 1, failed=["ua"])
    assert recipe_hash(first) != recipe_hash(off.config_for(base, 1, failed=["ua"]))


def test_a_switch_to_the_surrogates_images_stays_on_whatever_the_retry_then_fails():
    policy = EscalationPolicy(forgetting_factor=2, steps_factor=1.5, forgetting_resteer="both")
    base = DFRRecipe(l_unl=10, l_pres=5, steps=100)
    first = policy.config_for(base, 1, failed=["ua"])
    # erased on the retry, but a misspelling brings it back: harder, on the same images
    wording = policy.config_for(base, 2, failed=["recovery:wording:typo"], failed_recipe=first)
    assert (wording.resteer_images, wording.surrogate_push, wording.l_unl, wording.steps) == ("both", 0.5, 20, 225)
    # retention failed on the retry: the regularizing direction, still on the same images
    kept = policy.config_for(base, 2, failed=["ra_in-vs-base"], failed_recipe=first)
    assert (kept.resteer_images, kept.l_unl, kept.l_pres) == ("both", 10, 20)
    # without the switch before, a wording failure is scaled as any forgetting failure
    assert policy.config_for(base, 2, failed=["recovery:wording:typo"], failed_recipe=base).resteer_images is None
    assert policy.config_for(base, 2, failed=["recovery:wording:typo"], failed_recipe=base).l_unl == 40


def test_a_concept_a_probe_revives_is_retried_erased_against_textual_inversion_and_stays_so():
    inversion = Inversion(weight=0.3)
    policy = EscalationPolicy(forgetting_factor=2, recovery_inversion=inversion)
    base = DFRRecipe(l_unl=10, l_pres=5, steps=100)
    # textual inversion brought the concept back: the retry erases against it, at the same forget weight
    first = policy.config_for(base, 1, failed=["recovery:soft_prompt:plain"])
    assert (first.inversion, first.l_unl) == (inversion, 10)
    # erased against it, but retention fell: it stays on, the retry regularizes
    second = policy.config_for(base, 2, failed=["ra_in-vs-base"], failed_recipe=first)
    assert (second.inversion, second.l_unl, second.l_pres) == (inversion, 10, 20)
    # a concept simply not erased is scaled as before; so is a recipe the term cannot train
    assert policy.config_for(base, 1, failed=["ua"]).inversion is None
    assert policy.config_for(base, 1, failed=["ua"]).l_unl == 20
    own = DFRRecipe(retain_teacher="previous", forgotten_share=None, forgotten_target="previous")
    assert policy.config_for(own, 1, failed=["recovery:soft_prompt:plain"]).inversion is None
    assert policy.config_for(CARecipe(), 1, failed=["recovery:typo:red"]) == policy.config_for(CARecipe(), 1, ["ua"])
    # fine-tuning brought it back: no word to search for
    assert policy.config_for(base, 1, failed=["recovery:relearn_neighbour:plain"]).inversion is None
    # a revival and a retention drop together: erased against inversion, on the regularizing path
    mixed = policy.config_for(base, 1, failed=["recovery:typo:plain", "ra_in-vs-base"])
    assert (mixed.inversion, mixed.l_unl, mixed.l_pres) == (inversion, 10, 10)
    assert EscalationPolicy().config_for(base, 1, failed=["recovery:soft_prompt:plain"]).inversion is None  # off


def test_with_both_switches_on_the_forget_weight_is_one_power_less_not_two():
    policy = EscalationPolicy(forgetting_factor=2, forgetting_resteer="both", recovery_inversion=Inversion())
    base = DFRRecipe(l_unl=10, steps=100)
    first = policy.config_for(base, 1, failed=["ua"])  # not erased: the surrogate's images, same weight
    assert (first.resteer_images, first.inversion, first.l_unl) == ("both", None, 10)
    second = policy.config_for(base, 2, failed=["recovery:soft_prompt:plain"], failed_recipe=first)
    assert (second.resteer_images, second.inversion, second.l_unl) == ("both", Inversion(), 20)


def test_the_attempts_stop_at_the_first_accepted_and_a_retry_on_other_images_stays_on_them():
    policy = EscalationPolicy(max_attempts=4, forgetting_resteer="both")
    spec = StepSpec(key="s01", request=Request(concept="red"), parent="models/base",
                    recipe=DFRRecipe(l_unl=10, l_pres=5, steps=100))  # fmt: skip
    # attempt 0 leaves red in half its images; attempt 1 erases it but blurs; attempt 2 passes
    outcomes = [evaluation(["red"], 0.5), evaluation(["red"], 0.0) | {"fd_ratio": 5.0}, evaluation(["red"], 0.0)]
    trained = []

    def train(s: StepSpec) -> dict:
        trained.append(s)
        return outcomes[s.attempt]

    tried = list(run_attempts(spec, policy, None, train))
    assert [a.spec.attempt for a in tried] == [0, 1, 2] and len(trained) == 3  # the fourth is never trained
    assert [a.verdict.accepted for a in tried] == [False, False, True]
    assert [c.name for c in tried[1].verdict.checks if not c.passed] == ["fd_ratio"]
    first, second, third = (a.spec.recipe for a in tried)
    assert first == spec.recipe and (second.resteer_images, second.l_unl) == ("both", 10)
    # image quality failed on the surrogate's images: still on them, regularized as any retry
    assert (third.resteer_images, third.l_unl, third.l_pres) == ("both", 10, 20)


def test_queue_adds_validates_and_refuses_duplicates(tmp_path):
    q = RequestQueue(tmp_path / "queue.yaml")
    first = q.add("red", "colour", note="ticket 7", by="legal")
    assert (first.id, first.concept, first.kind, first.state) == ("r001", "red", "colour", State.pending)
    with pytest.raises(RequestError, match="already requested"):
        q.add("red")
    with pytest.raises(RequestError, match="unknown concept"):
        q.add("pikachu")
    with pytest.raises(RequestError, match="not a"):
        q.add("circle", "colour")
    with pytest.raises(ValueError, match="empty"):
        q.add("  ")
    assert [r.id for r in q.items()] == ["r001"]  # refused requests leave no trace


def test_queue_states_survive_a_reload_and_an_accepted_concept_cannot_come_again(tmp_path):
    path = tmp_path / "queue.yaml"
    q = RequestQueue(path)
    q.add("red")
    q.add("circle")
    q.update("r001", state=State.accepted, version=1, step="s01")
    q.update("r002", state=State.review, reasons=["UA on circle 40.0% < 90%"])
    again = RequestQueue(path)
    assert [r.describe() for r in again.items()] == ["accepted as model version 1", "rejected, waiting for review"]
    assert again.pending() == []
    with pytest.raises(AlreadyForgotten):
        again.add("red")
    assert not list(tmp_path.glob(".queue-*"))  # atomic writes leave no temp files


def test_step_specs_round_trip_through_the_dvc_params_file(tmp_path):
    path = tmp_path / "steps.yaml"
    assert load_steps(path) == {} and next_key([]) == "s01"
    spec = StepSpec(key="s01", request=Request(concept="red", kind="colour", id="r001"), parent="models/base")
    save_step(spec, path)
    save_step(
        spec.model_copy(
            update={
                "key": "s02",
                "parent": "models/steps/s01",
                "forgotten": ["red"],
                "request": Request(concept="circle", id="r002"),
            }
        ),
        path,
    )
    loaded = load_steps(path)
    assert loaded["s01"] == spec and loaded["s02"].forgotten == ["red"]
    assert next_key(list(loaded)) == "s03"
    assert yaml.safe_load(path.read_text())["steps"]["s02"]["parent"] == "models/steps/s01"


def test_deletion_record_links_request_version_and_evidence(tmp_path):
    from cul.audit import write_deletion_record

    q = RequestQueue(tmp_path / "queue.yaml")
    item = q.add("red", note="GDPR art. 17", by="dpo")
    spec = StepSpec(
        key="s02", request=item.request(), parent="models/steps/s01", parent_version=1, forgotten=["circle"]
    )
    evaluation = metrics_for({"red": 0.0, "circle": 0.0}, ["circle", "red"])
    m = evaluation.model_dump() | {"forgotten": ["circle", "red"], "paraphrase_ua": {"scarlet": 1.0}}
    verdict = Gate().decide(evaluation, ["circle", "red"])
    md = write_deletion_record(
        item, spec, m, verdict, 2, "cul-world", {"dvc_md5": "abc.dir", "git_commit": "f00"}, out=tmp_path / "audit"
    )
    record = json.loads((tmp_path / "audit" / "r001.json").read_text())
    assert record["model"]["uri"] == "models:/cul-world/2" and record["model"]["dvc_stage"] == "step@s02"
    assert record["evidence"]["earlier_forgotten_ua"] == {"circle": 1.0}
    text = md.read_text()
    assert (
        "GDPR art. 17" in text and "UA when asked with `scarlet`" in text and "dvc repro --single-item step@s02" in text
    )
    assert record["recipe"]["name"] == "dfr" and record["recipe"]["config"]["method"] == "dfr"


@pytest.mark.parametrize("name", ["x` | [forged](http://evil) |", "``a`b``", "| RA-I | 100% |"])
def test_catalogue_text_in_a_record_stays_one_code_span(name):
    """Concept names and wordings come from `cul concept add`, so from a user: in a record each is
    one code span that cannot close early, add a link or split a table row."""
    from cul.audit import md_code

    span = md_code(name)
    fence = re.match(r"`+", span).group(0)
    inner = span[len(fence) : -len(fence)]
    assert span.endswith(fence) and fence not in inner  # nothing inside closes the span
    assert "|" not in inner.replace("\\|", "")  # every pipe escaped: the table row keeps its cells
    assert inner.strip().replace("\\|", "|") == " ".join(name.split())


def test_a_shared_checkout_pushes_its_step_commit_rebased_on_what_another_worker_pushed(tmp_path):
    """Two workers' clones of one git remote: both commit a step record; the second push is
    refused, rebased on the first, and lands; a laptop checkout (share off) pushes nothing."""
    import subprocess

    from cul.io.versioning import Versioner

    def git(cwd, *args):
        return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True).stdout.strip()

    remote = tmp_path / "remote.git"
    git(tmp_path, "init", "-q", "--bare", "-b", "main", str(remote))
    seed = tmp_path / "seed"
    git(tmp_path, "clone", "-q", str(remote), str(seed))
    (seed / "steps.txt").write_text("steps\n")
    git(seed, "add", "steps.txt")
    git(seed, "-c", "user.name=t", "-c", "user.email=t@x", "commit", "-q", "-m", "seed")
    git(seed, "push", "-q", "origin", "HEAD:main")
    a, b = tmp_path / "a", tmp_path / "b"
    for clone in (a, b):
        git(tmp_path, "clone", "-q", str(remote), str(clone))
    for clone, name in ((a, "s01"), (b, "s02")):
        Versioner(clone, share=True).sync()
        (clone / f"{name}.txt").write_text(name)
        Versioner(clone, share=True).commit(f"step {name}", [f"{name}.txt"])
    Versioner(a, share=True).publish()
    rev = Versioner(b, share=True).publish()
    assert git(remote, "rev-parse", "main") == rev
    assert git(remote, "log", "--format=%s", "main").splitlines() == ["step s02", "step s01", "seed"]
    (b / "s03.txt").write_text("s03")
    Versioner(b).commit("step s03", ["s03.txt"])
    assert Versioner(b).publish() == git(b, "rev-parse", "HEAD") != git(remote, "rev-parse", "main")
