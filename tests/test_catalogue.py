"""Concept catalogues: the world drawn from its catalogue unchanged, free-text requests resolved
against any catalogue (with suggestions when nothing matches), and `cul concept add` choosing and
recording neighbours and surrogates."""

from __future__ import annotations

import hashlib
import shutil

import pytest
import yaml
from typer.testing import CliRunner

from cul.catalogue import CATALOGUES, Catalogue, CatalogueError, ConceptEntry
from cul.cli import app
from cul.unlearning.request import Request, RequestError, resolve_request
from tests.support import ROOT

runner = CliRunner()
SD = Catalogue.load("sd-dfr10")


def test_the_world_is_drawn_from_its_catalogue_with_the_images_and_words_it_had_before():
    """Hashes of the world's training stream (captions, scenes, images), held-out stream and
    reference renders, and of its vocabulary, taken from the code before the catalogue existed."""
    import json

    from cul.world import CONCEPTS, CONFUSABLES, World, all_scenes, vocabulary

    h = hashlib.sha256()
    for held in (False, True):
        w = World(32, seed=0, held_out=held)
        for i in range(4):
            images, captions, scenes = w.batch(64, i)
            h.update(images.tobytes())
            h.update("\n".join(captions).encode())
            h.update(repr(scenes).encode())
    h.update(World(32, seed=0).render_all(all_scenes(), seed=4242).tobytes())
    assert h.hexdigest() == "390a98eb537f47efb994ab98014e39625de4ca39fe67a5f0764bc0edff614cac"
    kinds = {k.value: [(c.name, c.synonyms, c.held_out) for c in v] for k, v in CONCEPTS.items()}
    words = [vocabulary(), CONFUSABLES, kinds]
    digest = hashlib.sha256(json.dumps(words).encode()).hexdigest()
    assert digest == "fc99057ea0ab4e0db163029dedd380611ed1d6bfdb13721b0a284e88928132dd"


def test_the_sd_catalogue_holds_dfr_s_ten_concepts_and_its_sequence_resolves():
    from cul.benchmark import load_sequence

    sequence = load_sequence(ROOT / "benchmarks" / "sd-dfr10.yaml")
    resolved = [resolve_request(r, catalogue=SD) for r in sequence]
    assert [r.concept for r in resolved] == [
        "Pikachu",
        "Brad Pitt",
        "dog",
        "golf ball",
        "Van Gogh style",
        "apple",
        "Spider-Man",
        "Lionel Messi",
        "cartoon style",
        "banana",
    ]
    for r in resolved:
        entry = SD.get(r.concept)
        assert len(entry.neighbours) >= 2 and entry.surrogates and entry.paraphrases
        assert all(SD.get(n).category == entry.category for n in entry.neighbours)


@pytest.mark.parametrize(
    "text,name",
    [("  van GOGH   style ", "Van Gogh style"), ("spiderman", "Spider-Man"), ("Messi", "Lionel Messi"), ("dog", "dog")],
)
def test_free_text_resolves_by_name_or_synonym_whatever_the_case_and_spacing(text, name):
    assert resolve_request(Request(concept=text), catalogue=SD).concept == name


def test_a_word_outside_the_catalogue_is_refused_with_the_nearest_entries():
    with pytest.raises(RequestError, match="Nearest: .*'Van Gogh style'"):
        resolve_request(Request(concept="Vincent van Gough painting"), catalogue=SD)
    with pytest.raises(RequestError, match="is a\\(n\\) style, not a\\(n\\) person"):
        resolve_request(Request(concept="Van Gogh style", kind="person"), catalogue=SD)


@pytest.mark.parametrize(
    "change,says",
    [
        (lambda d: d["concepts"][1].update(synonyms=["pikachu"]), "names both"),
        (lambda d: d["concepts"][0].update(neighbours=["Garfield"]), "not another concept"),
        (lambda d: d["templates"]["train"].append("a {vehicle} on a road"), "no category"),
        (lambda d: d["concepts"][0].update(name="  "), "empty"),
        (lambda d: d["concepts"][0].update(descriptions=[f"the {d['concepts'][0]['name']} of old"]), "without naming"),
    ],
)
def test_a_catalogue_that_contradicts_itself_is_refused_when_read(tmp_path, change, says):
    data = yaml.safe_load((CATALOGUES / "sd-dfr10.yaml").read_text())
    change(data)
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(data))
    with pytest.raises(CatalogueError, match=says):
        Catalogue.load(tmp_path / "bad.yaml")


def _project(tmp_path, catalogue: str, judge: str = "clip"):
    """params.yaml with `catalogue` active, and a copy of the SD catalogue to add to."""
    shutil.copy(CATALOGUES / "sd-dfr10.yaml", tmp_path / "sd.yaml")
    p = yaml.safe_load((ROOT / "params.yaml").read_text())
    p["pipeline"].update(catalogue=catalogue, requests_file=str(tmp_path / "queue.yaml"))
    p["judge"]["kind"] = judge
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(p))
    return str(tmp_path / "params.yaml")


def test_cul_request_add_takes_free_text_of_the_active_catalogue(tmp_path):
    params = _project(tmp_path, str(tmp_path / "sd.yaml"))
    ok = runner.invoke(app, ["request", "add", "van gogh", "--params", params])
    assert ok.exit_code == 0 and "forget Van Gogh style (style) ('van gogh' names it)" in " ".join(ok.output.split())
    refused = runner.invoke(app, ["request", "add", "Garfield", "--params", params])
    assert refused.exit_code == 1 and "Nearest:" in refused.output
    missing = runner.invoke(app, ["run", "--params", params])  # paths.judge is the world's CNN folder
    assert missing.exit_code == 1 and "cannot load a CLIP judge" in " ".join(missing.output.split())
    world_judge = _project(tmp_path, str(tmp_path / "sd.yaml"), judge="world")
    refused = runner.invoke(app, ["run", "--params", world_judge])
    assert refused.exit_code == 2 and "judge.kind world" in " ".join(refused.output.split())


def test_cul_concept_add_chooses_neighbours_and_surrogates_and_writes_them_for_review(tmp_path):
    params = _project(tmp_path, "world")
    catalogue = str(tmp_path / "sd.yaml")
    described = ["--description", "a white cartoon cat with a red bow"]
    out = runner.invoke(
        app, ["concept", "add", "Hello Kitty", "--category", "character", "--catalogue", catalogue, *described]
    )
    assert out.exit_code == 0, out.output
    entry = Catalogue.load(catalogue).get("Hello Kitty")
    assert entry.descriptions == ["a white cartoon cat with a red bow"]
    characters = {c.name for c in SD.of("character")}
    assert len(entry.neighbours) == 2 and set(entry.neighbours) <= characters
    assert len(entry.surrogates) == 3 and set(entry.surrogates) <= characters
    assert entry.chosen and "text embedding" in entry.chosen["rule"]
    assert set(entry.chosen["text_similarity"]) >= set(entry.neighbours)
    assert (tmp_path / "sd.yaml").read_text().startswith("# DFR's ten-concept sequence")  # its header is kept
    # now a request may name it; the world's catalogue is closed, and a duplicate is refused
    assert resolve_request(Request(concept="hello kitty"), catalogue=Catalogue.load(catalogue)).concept == "Hello Kitty"
    closed = runner.invoke(app, ["concept", "add", "hexagon", "--category", "object", "--params", params])
    assert closed.exit_code == 1 and "closed" in closed.output
    again = runner.invoke(app, ["concept", "add", "spiderman", "--category", "character", "--catalogue", catalogue])
    assert again.exit_code == 1 and "already names 'Spider-Man'" in again.output
    naming = ["concept", "add", "Garfield", "--category", "character", "--description", "garfield the cat"]
    refused = runner.invoke(app, [*naming, "--catalogue", catalogue])
    assert refused.exit_code == 1 and "without naming it" in refused.output and "Traceback" not in refused.output


def test_a_model_ranks_the_automatic_choices_by_its_noise_predictions(tiny_world_model):
    from cul.catalogue import noise_distances

    world = Catalogue.load("world").model_copy(update={"closed": False})
    distances = noise_distances(tiny_world_model, world, "hexagon", "object", ["circle", "square", "star"])
    assert set(distances) == {"circle", "square", "star"} and all(d > 0 for d in distances.values())
    entry = world.add(ConceptEntry(name="hexagon", category="object"), tiny_world_model.text.pooled, tiny_world_model)
    ranked = list(entry.chosen["noise_distance"])
    assert entry.neighbours == ranked[:2] and entry.surrogates == ranked[:3]
    assert list(entry.chosen["noise_distance"].values()) == sorted(entry.chosen["noise_distance"].values())


def test_a_concept_whose_surrogates_are_all_forgotten_cannot_be_prepared_and_says_what_to_do():
    """Pikachu's one surrogate, "cartoon mouse", was forgotten first: nothing is left to map it to
    (a `PreparationError`, which sends the request to review), unless the request names one."""
    from cul.unlearning.preparation import PreparationError, prepare_catalogue_step
    from cul.unlearning.recipes import DFRRecipe

    with pytest.raises(PreparationError, match=r"its surrogates in 'sd-dfr10' are all forgotten \(cartoon mouse\)"):
        prepare_catalogue_step(None, SD, Request(concept="Pikachu"), ["cartoon mouse"], DFRRecipe(), seed=0)
    named = prepare_catalogue_step(
        None, SD, Request(concept="Pikachu", surrogates=["Mickey Mouse"]), ["cartoon mouse"], DFRRecipe(), seed=0
    )
    assert named.surrogates == ["Mickey Mouse"]


def test_a_prompt_set_from_any_catalogue_pairs_each_forget_prompt_with_a_surrogate_and_keeps_the_rest():
    from cul.unlearning.prompts import catalogue_prompt_set

    ps = catalogue_prompt_set(SD, "Spider-Man", forgotten_before=["Pikachu"], n_forget=12, seed=3)
    words = ["spider-man", "spiderman", "spider man"]
    assert ps.kind == "character" and ps.surrogates == ["superhero"] and len(ps.forget) == len(ps.mapped) == 12
    for f, m in zip(ps.forget, ps.mapped):
        said = next(w for w in words if w in f.lower())
        assert m.lower() == f.lower().replace(said, "superhero")  # the same prompt, the surrogate in place
    assert ps.neighbours == ["Batman", "Iron Man"]
    assert {p for p in ps.retain["neighbour"]} and all("Batman" in p or "Iron Man" in p for p in ps.retain["neighbour"])
    kept = ps.retain["neighbour"] + ps.retain["retained"]
    assert not any("spider" in p.lower() or "pikachu" in p.lower() for p in kept)  # nothing forgotten among the kept
    assert any("Van Gogh style" in p for p in ps.retain["retained"]) and "" in ps.retain["unrelated"]
    assert len(ps.retain["forgotten"]) == len(ps.forgotten_mapped) == 8
    for p, m in zip(ps.retain["forgotten"], ps.forgotten_mapped):
        said = next(w for w in ("pikachu pokemon", "pikachu") if w in p.lower())
        assert m.lower() == p.lower().replace(said, "cartoon mouse")
    assert catalogue_prompt_set(SD, "Spider-Man", ["Pikachu"], n_forget=12, seed=3) == ps  # a function of its seed
    with pytest.raises(ValueError, match="no surrogates"):
        catalogue_prompt_set(SD, "Batman")
