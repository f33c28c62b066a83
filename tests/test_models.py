import pytest
import torch

from cul.models import StableDiffusion, WorldDiffusion, load_model


def test_world_model_predicts_noise_of_the_input_shape(tiny_world_model):
    x = torch.randn(2, 3, 32, 32)
    ctx = tiny_world_model.encode_prompts(["a red circle", "a blue square"])
    eps = tiny_world_model.predict_noise(x, torch.tensor([10, 500]), ctx)
    assert eps.shape == x.shape


def test_sampling_is_deterministic_by_seed(tiny_world_model):
    prompts = ["a red circle on a striped background", "a blue square"]
    a = tiny_world_model.sample(prompts, seed=1)
    b = tiny_world_model.sample(prompts, seed=1)
    c = tiny_world_model.sample(prompts, seed=2)
    assert a.shape == (2, 3, 32, 32)
    assert 0 <= a.min() and a.max() <= 1
    assert torch.allclose(a, b, atol=1e-5) and not torch.allclose(a, c, atol=1e-2)  # (thread counts may differ)


def test_an_image_depends_on_its_seed_and_index_not_on_the_batching(tiny_world_model):
    prompts = [f"a red circle {i}" for i in range(5)]
    whole = tiny_world_model.sample(prompts, seed=4)
    split = tiny_world_model.sample(prompts, seed=4, batch_size=2)
    assert torch.allclose(whole, split, atol=1e-5)


def test_guidance_changes_the_images(tiny_world_model):
    a = tiny_world_model.sample(["a red circle"], seed=0, guidance=1.0)
    b = tiny_world_model.sample(["a red circle"], seed=0, guidance=5.0)
    assert not torch.allclose(a, b)


def test_save_and_load_roundtrip_is_exact(tiny_world_model, tmp_path):
    tiny_world_model.save_pretrained(tmp_path / "m")
    assert (tmp_path / "m" / "unet" / "diffusion_pytorch_model.safetensors").exists()
    loaded = load_model(tmp_path / "m")
    assert isinstance(loaded, WorldDiffusion)
    assert loaded.sampling == tiny_world_model.sampling
    original = tiny_world_model.unet.state_dict()
    assert all(torch.equal(v, original[k]) for k, v in loaded.unet.state_dict().items())
    x = torch.randn(1, 3, 32, 32)
    ctx = tiny_world_model.encode_prompts(["a green star"])
    t = torch.tensor([300])
    with torch.no_grad():
        assert torch.allclose(tiny_world_model.predict_noise(x, t, ctx), loaded.predict_noise(x, t, ctx), atol=1e-5)


def test_copy_does_not_share_weights(tiny_world_model):
    clone = tiny_world_model.copy()
    p = next(clone.unet.parameters())
    with torch.no_grad():
        p.add_(1.0)
    assert not torch.equal(p, next(tiny_world_model.unet.parameters()))
    assert clone.text is tiny_world_model.text  # the frozen encoder is shared


def test_load_model_refuses_unknown_directories(tmp_path):
    from cul.models.diffusion import ModelLoadError

    with pytest.raises(ModelLoadError, match="no model directory"):
        load_model(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="neither"):
        load_model(tmp_path / "empty")


@pytest.fixture(scope="module")
def tiny_sd(tmp_path_factory):
    from cul.models.tiny_sd import build_tiny_sd

    return load_model(build_tiny_sd(tmp_path_factory.mktemp("sd") / "tiny-sd"))


def test_tiny_stable_diffusion_loads_through_the_real_pipeline_and_draws(tiny_sd):
    assert isinstance(tiny_sd, StableDiffusion)
    from diffusers import StableDiffusionPipeline

    assert isinstance(tiny_sd.pipe, StableDiffusionPipeline)
    assert tiny_sd.latent_shape() == (4, 8, 8)
    imgs = tiny_sd.sample(["a red circle", "a photo of a dog"], seed=0, steps=3)
    assert imgs.shape == (2, 3, 16, 16)  # the VAE decodes 8x8 latents to 16x16 pixels
    assert 0 <= imgs.min() and imgs.max() <= 1 and imgs.std() > 0
    again = tiny_sd.sample(["a red circle", "a photo of a dog"], seed=0, steps=3)
    assert torch.allclose(imgs, again, atol=1e-5)  # bit for bit at equal thread counts (threads follow the free cores)


def test_tiny_sd_latent_roundtrip_and_noise_prediction(tiny_sd):
    images = torch.rand(2, 3, 16, 16)
    z = tiny_sd.to_latents(images)
    assert z.shape == (2, 4, 8, 8)
    ctx = tiny_sd.encode_prompts(["a", "b"])
    assert ctx.shape[0] == 2 and ctx.shape[-1] == 32  # CLIP hidden size of the tiny encoder
    eps = tiny_sd.predict_noise(z, torch.tensor([1, 999]), ctx)
    assert eps.shape == z.shape


def test_tiny_sd_save_load_roundtrip(tiny_sd, tmp_path):
    tiny_sd.save_pretrained(tmp_path / "again")
    loaded = load_model(tmp_path / "again")
    z = torch.randn(1, 4, 8, 8)
    ctx = tiny_sd.encode_prompts(["x"])
    original = tiny_sd.unet.state_dict()
    assert all(torch.equal(v, original[k]) for k, v in loaded.unet.state_dict().items())
    with torch.no_grad():
        assert torch.allclose(
            tiny_sd.predict_noise(z, torch.tensor([5]), ctx), loaded.predict_noise(z, torch.tensor([5]), ctx), atol=1e-5
        )
