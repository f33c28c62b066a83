import torch


def test_minilm_gives_per_token_states_of_fixed_length(text_encoder):
    e = text_encoder.encode(["a red circle on a striped background", ""])
    assert e.shape == (2, 16, 384)
    assert torch.isfinite(e).all()


def test_embeddings_are_cached_and_deterministic(text_encoder):
    a = text_encoder.encode(["a crimson disc"])
    b = text_encoder.encode(["a crimson disc"])
    assert torch.equal(a, b)
    assert "a crimson disc" in text_encoder._cache


def test_pretrained_encoder_places_synonyms_nearer_than_other_concepts(text_encoder):
    """A real pretrained encoder, not random: 'crimson' sits nearer 'red' than 'blue' does."""
    v = text_encoder.pooled(["a red circle", "a crimson circle", "a blue circle"])
    v = torch.nn.functional.normalize(v, dim=-1)
    assert (v[0] @ v[1]) > (v[1] @ v[2])


def test_encode_rejects_a_bare_string(text_encoder):
    import pytest

    with pytest.raises(TypeError):
        text_encoder.encode("a red circle")
