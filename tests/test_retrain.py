import json

import pytest

from cul.pretrain import PretrainConfig
from cul.retrain import Retraining


def _job(tiny_world_config, exclude=("ring", "plain"), steps=2):
    return Retraining(
        exclude=exclude,
        pretrain=PretrainConfig(steps=steps, batch_size=4, checkpoint_every=1, warmup_steps=1),
        model=tiny_world_config,
    )


def test_retraining_trains_on_the_world_without_the_concepts_and_resumes_only_its_own_run(tiny_world_config, tmp_path):
    job = _job(tiny_world_config)
    trainer = job.trainer(tmp_path)
    assert trainer.world.exclude == ("plain", "ring")
    assert trainer.dir == tmp_path / f"retrain-{job.digest()}"
    trainer.run(progress=False)
    assert json.loads((trainer.dir / "state.json").read_text())["step"] == 2
    assert job.trainer(tmp_path).step == 2  # the same job resumes its checkpoint
    # another exclusion or another length never reads it
    assert _job(tiny_world_config, exclude=("ring",)).trainer(tmp_path).step == 0
    assert _job(tiny_world_config, steps=3).trainer(tmp_path).step == 0
    assert _job(tiny_world_config, exclude=("plain", "ring", "ring")).digest() == job.digest()  # a set of concepts


def test_retraining_refuses_a_concept_the_world_lacks(tiny_world_config, tmp_path):
    with pytest.raises(KeyError, match="unicorn"):
        _job(tiny_world_config, exclude=("unicorn",)).trainer(tmp_path)


def test_a_retrained_models_robustness_record_is_read_like_a_runs(tmp_path):
    from cul.plots import robustness_bars
    from cul.probes import ProbeResult
    from cul.reports import load_robustness, robustness_record, robustness_table

    found = [
        ProbeResult(probe="soft_prompt", family="soft_prompt", concept="plain", hits=6, images=16, base_hits=16,
                    base_images=16, prompt="a red circle on a <v> background"),
        ProbeResult(probe="soft_prompt", family="soft_prompt", concept="ring", hits=0, images=16, base_hits=16,
                    base_images=16, prompt="a red <v> on a plain background"),
    ]  # fmt: skip
    after = {"ua": 1.0, "ra_in": 1.0, "ra_cross": 1.0, "ra_neighbour": 1.0, "fd_ratio": 1.1}
    made = {"recipe_hash": "abcdef123456", "git_commit": "0123456789", "git_dirty": False}
    here = {"git_commit": "0123456789", "git_dirty": False}
    record = robustness_record("retrain", "s.yaml", 2, after, made, here, {}, {}, "soft_prompt", found)
    (tmp_path / "retrain").mkdir()
    (tmp_path / "retrain" / "robustness.json").write_text(json.dumps(record))
    records = load_robustness(tmp_path)
    row = robustness_table(records).splitlines()[-1]
    assert row.startswith("| retrain | s.yaml | 2 |") and "| 37.5 / 18.8 |" in row and "`abcdef12` @ `0123456`" in row
    assert robustness_bars(records, tmp_path / "r.png").exists()


def test_beyond_retraining_counts_only_what_the_erasure_leaves_over_the_retrained_model():
    from cul.probes import ProbeResult, to_records
    from cul.reports import beyond_retraining, beyond_retraining_table

    def probes(plain, ring, typo):
        return to_records([
            ProbeResult(probe="soft_prompt", family="soft_prompt", concept="plain", hits=plain, images=16,
                        base_hits=16, base_images=16, prompt="p"),
            ProbeResult(probe="soft_prompt", family="soft_prompt", concept="ring", hits=ring, images=16,
                        base_hits=16, base_images=16, prompt="p"),
            ProbeResult(probe="typo", family="wording", concept="ring", hits=typo, images=16,
                        base_hits=4, base_images=16, prompt="p"),  # the base model barely reads it
        ])  # fmt: skip

    run = {"method": "dfr", "sequence": "s.yaml", "steps": 2, "probes": probes(14, 4, 8)}
    gold = {"method": "retrain", "sequence": "s.yaml", "steps": 2, "probes": probes(12, 6, 0)}
    gaps = beyond_retraining(run, gold)
    assert gaps == {"soft_prompt": {"mean": 1 / 16, "worst": 2 / 16, "probes": 2}}  # plain +2 images, ring 0
    table = beyond_retraining_table({"dfr": run, "retrain": gold, "other": {**run, "sequence": "t.yaml"}})
    assert table.splitlines()[-1].startswith("| dfr | s.yaml | 2 | - | 12.5 / 6.2 |")
    assert len(table.splitlines()) == 3  # no row for the retrained model itself, nor for another sequence
    assert beyond_retraining_table({"dfr": run}) == ""
