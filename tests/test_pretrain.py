import json

import torch

from cul.pretrain import PretrainConfig, Pretrainer, lr_factor, min_snr_weights


def _cfg(**kw):
    base = dict(steps=4, batch_size=4, checkpoint_every=2, warmup_steps=2, lr=1e-3)
    base.update(kw)
    return PretrainConfig(**base)


def test_resumed_run_matches_an_uninterrupted_one(tiny_world_config, tmp_path):
    straight = Pretrainer(tiny_world_config, _cfg(), tmp_path / "a")
    straight.run(progress=False)

    first = Pretrainer(tiny_world_config, _cfg(steps=2), tmp_path / "b")
    first.run(progress=False)
    assert json.loads((tmp_path / "b" / "state.json").read_text())["step"] == 2
    resumed = Pretrainer(tiny_world_config, _cfg(), tmp_path / "b")
    assert resumed.step == 2
    resumed.run(progress=False)

    for p, q in zip(straight.unet.parameters(), resumed.unet.parameters()):
        assert torch.allclose(p, q, atol=1e-6)
    for p, q in zip(straight.ema.shadow_params, resumed.ema.shadow_params):
        assert torch.allclose(p, q, atol=1e-6)


def test_training_lowers_the_loss_on_a_fixed_batch(tiny_world_config, tmp_path):
    trainer = Pretrainer(tiny_world_config, _cfg(steps=1, lr=3e-3), tmp_path)
    imgs, captions, _ = trainer.world.batch(8, 0)
    images = torch.from_numpy(imgs).permute(0, 3, 1, 2)

    def loss():
        return trainer.loss(images, captions, torch.Generator().manual_seed(0))

    before = loss().item()
    for _ in range(15):
        trainer.opt.zero_grad()
        loss().backward()
        trainer.opt.step()
    assert loss().item() < before


def test_ema_model_carries_the_averaged_weights(tiny_world_config, tmp_path):
    trainer = Pretrainer(tiny_world_config, _cfg(steps=3), tmp_path)
    trainer.run(progress=False)
    ema = trainer.ema_model()
    for p, s in zip(ema.unet.parameters(), trainer.ema.shadow_params):
        assert torch.equal(p, s)
    assert any(not torch.equal(p, q) for p, q in zip(ema.unet.parameters(), trainer.unet.parameters()))


def test_min_snr_weights_cap_the_easy_timesteps():
    from cul.models.diffusion import train_scheduler

    s = train_scheduler()
    w = min_snr_weights(s, torch.tensor([0, 500, 999]), 5.0)
    assert w[0] < 0.01  # nearly clean: SNR huge, weight gamma/SNR
    assert torch.isclose(w[2], torch.tensor(1.0))  # very noisy: SNR < gamma, weight 1
    assert torch.equal(min_snr_weights(s, torch.tensor([3]), None), torch.ones(1))


def test_learning_rate_warms_up_then_decays():
    cfg = PretrainConfig(steps=100, warmup_steps=10, min_lr_ratio=0.1)
    assert lr_factor(0, cfg) == 0.1 and lr_factor(9, cfg) == 1.0
    assert abs(lr_factor(100, cfg) - 0.1) < 1e-9
