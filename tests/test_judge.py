import numpy as np
import torch

from cul.evaluation import frechet_distance, frechet_terms
from cul.judge import held_out_accuracy


def test_committed_judge_is_at_least_98_percent_per_head_on_held_out_real_images(judge):
    acc = held_out_accuracy(judge, n=1024, seed=31337)
    assert min(acc.values()) >= 0.98, acc


def test_judge_features_and_predictions_have_the_right_shapes(judge):
    x = torch.rand(5, 3, 32, 32)
    pred = judge.predict(x)
    assert set(pred) == {"object", "colour", "texture"} and all(len(v) == 5 for v in pred.values())
    assert judge.embed(x).shape == (5, judge.feature_dim)


def test_frechet_distance_is_zero_for_identical_sets_and_grows_with_shift():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(400, 8))
    assert abs(frechet_distance(a, a)) < 1e-6
    near = frechet_distance(a, a + 0.1)
    far = frechet_distance(a, a + 1.0)
    assert 0 < near < far
    assert abs(far - 8.0) < 1e-4  # shift of 1 in 8 dims, same covariance: |mu|^2 = 8
    terms = frechet_terms(a, a + 1.0)  # the shift is all in the mean term; the parts add up to FD
    assert abs(terms["mean_term"] - 8.0) < 1e-9 and abs(terms["cov_term"]) < 1e-4
    assert abs(terms["mean_term"] + terms["cov_term"] - far) < 1e-9
