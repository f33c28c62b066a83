"""Measurement on a CUDA GPU: time and peak memory of one `dfr` request's work at Stable Diffusion
v1.5's size (`profiles/dfr_sd.yaml`), the counterpart of `scripts/sd_request_cost.py`'s calculation.

Time and memory do not depend on the weights' values, so the models are SD v1.5's UNet, VAE and
CLIP text encoder built from their configs with random weights (no checkpoint is needed or
loaded). What runs is the request's arithmetic, not `cul`'s code path (prompt sets, the judge,
MLflow and DVC are left out):

- training, one optimizer step: the student (fp32 master weights, bf16 autocast, gradient
  checkpointing as the profile sets it) forward and backward on 26 forget + 52 retain images;
  the frozen teacher (bf16) forwards for the targets: twice on the forget images (the surrogate's
  caption and, for `push`, the concept's), once on the retained ones; L2-SP to the base weights,
  AdamW, and the tail average's update. `--train-steps` steps are timed after `--warmup`, and the
  request's 300 are that mean times 300;
- the teacher buffer: DDIM with classifier-free guidance (two UNet forwards a step) on batches of
  `--sample-batch` images, one batch timed and scaled to `--buffer` images;
- evaluation: the same sampling plus the VAE decode for `--eval-images` images, one batch timed.

Run on the GPU node: python scripts/sd_request_time.py -> reports/sd/request_time.json
(`--tiny` runs a small UNet on the CPU, to check the script, and writes nothing by default.)
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

SD15_UNET = dict(
    sample_size=64,
    in_channels=4,
    out_channels=4,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    block_out_channels=(320, 640, 1280, 1280),
    layers_per_block=2,
    cross_attention_dim=768,
    attention_head_dim=8,
    norm_num_groups=32,
)
SD15_VAE = dict(
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(128, 256, 512, 512),
    layers_per_block=2,
    latent_channels=4,
    sample_size=512,
)
TINY_UNET = dict(
    SD15_UNET,
    sample_size=8,
    block_out_channels=(32, 32, 64, 64),
    layers_per_block=1,
    cross_attention_dim=32,
    attention_head_dim=4,
)
TINY_VAE = dict(SD15_VAE, block_out_channels=(8, 8, 16, 16), sample_size=64, norm_num_groups=8)


def timed(device: torch.device, fn) -> float:
    """Seconds `fn` takes, the GPU's queued work included."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=300, help="optimizer steps of one request (the profile's)")
    ap.add_argument("--forget-batch", type=int, default=26)
    ap.add_argument("--retain-batch", type=int, default=52)
    ap.add_argument("--train-steps", type=int, default=20, help="steps timed")
    ap.add_argument("--warmup", type=int, default=3, help="steps run before timing")
    ap.add_argument("--buffer", type=int, default=250, help="teacher images per request")
    ap.add_argument("--eval-images", type=int, default=512)
    ap.add_argument("--sample-batch", type=int, default=64, help="images drawn at once")
    ap.add_argument("--ddim-steps", type=int, default=20)
    ap.add_argument("--checkpointing", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--tiny", action="store_true", help="a small UNet on the CPU: checks the script")
    ap.add_argument("--out", default=None, help="default: reports/sd/request_time.json (none with --tiny)")
    args = ap.parse_args()

    from diffusers import AutoencoderKL, UNet2DConditionModel

    device = torch.device("cpu" if args.tiny else "cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA GPU here: run this on a GPU node, or pass --tiny to check the script on the CPU")
    amp = torch.bfloat16
    unet_cfg, vae_cfg = (TINY_UNET, TINY_VAE) if args.tiny else (SD15_UNET, SD15_VAE)
    side, dim = int(unet_cfg["sample_size"]), int(unet_cfg["cross_attention_dim"])  # type: ignore[call-overload]
    torch.manual_seed(0)

    student = UNet2DConditionModel(**unet_cfg).to(device)  # fp32 master weights
    if args.checkpointing:
        student.enable_gradient_checkpointing()
    teacher = copy.deepcopy(student).to(amp).requires_grad_(False).eval()
    reference = [p.detach().clone() for p in student.parameters()]  # L2-SP's base weights (fp32)
    average = [p.detach().clone() for p in student.parameters()]  # the tail average (fp32)
    vae = AutoencoderKL(**vae_cfg).to(device, amp).requires_grad_(False).eval()
    opt = torch.optim.AdamW(student.parameters(), lr=5e-5, weight_decay=0.01)
    params = sum(p.numel() for p in student.parameters())
    trained = {"student": student, "opt": opt}  # emptied after training: sampling runs without them
    del student, opt
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()

    nf, nr = args.forget_batch, args.retain_batch
    ctx = lambda n: torch.randn(n, 77, dim, device=device, dtype=amp)  # noqa: E731  text contexts (CLIP's shape)
    lat = lambda n: torch.randn(n, 4, side, side, device=device)  # noqa: E731

    def train_step() -> None:
        student, opt = trained["student"], trained["opt"]
        x_t, t = lat(nf + nr), torch.randint(0, 1000, (nf + nr,), device=device)
        c_forget, c_mapped, c_retain = ctx(nf), ctx(nf), ctx(nr)
        with torch.no_grad(), torch.autocast(device.type, dtype=amp):
            mapped = teacher(x_t[:nf], t[:nf], c_mapped).sample
            pushed = mapped + (mapped - teacher(x_t[:nf], t[:nf], c_forget).sample)
            target = torch.cat([pushed, teacher(x_t[nf:], t[nf:], c_retain).sample]).float()
        with torch.autocast(device.type, dtype=amp):
            pred = student(x_t, t, torch.cat([c_forget, c_retain])).sample.float()
        reg = sum(((p - r) ** 2).sum() for p, r in zip(student.parameters(), reference, strict=True))
        loss = F.mse_loss(pred, target) + 2e-4 * reg
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            torch._foreach_lerp_(average, [p.detach() for p in student.parameters()], 0.1)

    def sample(n: int, decode: bool) -> None:
        with torch.no_grad(), torch.autocast(device.type, dtype=amp):
            x, c = lat(n), torch.cat([ctx(n), ctx(n)])  # the prompt's and the empty caption's
            for step in range(args.ddim_steps):
                t = torch.full((2 * n,), 999 - step * (1000 // args.ddim_steps), device=device)
                eps = teacher(torch.cat([x, x]), t, c).sample.float()
                cond, uncond = eps.chunk(2)
                x = x - 0.05 * (uncond + 7.5 * (cond - uncond))  # the arithmetic of a DDIM step, not its schedule
            if decode:
                vae.decode((x / 0.18215).to(amp))

    print(f"{params / 1e6:.1f}M UNet parameters on {device}; {args.warmup} warm-up steps", flush=True)
    for _ in range(args.warmup):
        train_step()

    def train_steps() -> None:
        for _ in range(args.train_steps):
            train_step()

    step_s = timed(device, train_steps) / args.train_steps
    print(f"training: {step_s:.3f} s a step", flush=True)
    peak_train = torch.cuda.max_memory_allocated() / 1e9 if device.type == "cuda" else None
    trained.clear()
    n = args.sample_batch
    sample(min(n, 4), decode=True)  # warm-up
    buffer_s = timed(device, lambda: sample(n, decode=False)) / n
    eval_s = timed(device, lambda: sample(n, decode=True)) / n
    print(f"sampling: {buffer_s:.3f} s an image, {eval_s:.3f} s decoded", flush=True)
    seconds = {
        "training": step_s * args.steps,
        "teacher buffer": buffer_s * args.buffer,
        "evaluation": eval_s * args.eval_images,
    }
    argv = sys.argv[1:]
    given = [a for i, a in enumerate(argv) if not a.startswith("--out") and (i == 0 or argv[i - 1] != "--out")]
    out = {
        "kind": "measured: random weights of SD v1.5's architecture; per-step and per-image times scaled to a request",
        "command": " ".join(["python scripts/sd_request_time.py", *given]),
        "device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "unet_params_millions": round(params / 1e6, 1),
        "settings": {k: v for k, v in vars(args).items() if k != "out"},
        "seconds_per_training_step": round(step_s, 3),
        "seconds_per_image": {"buffer": round(buffer_s, 4), "evaluation": round(eval_s, 4)},
        "seconds": {k: round(v) for k, v in seconds.items()},
        "minutes_per_request": round(sum(seconds.values()) / 60, 1),
        "peak_memory_gb_training": None if peak_train is None else round(peak_train, 1),
        "peak_memory_gb": round(torch.cuda.max_memory_allocated() / 1e9, 1) if device.type == "cuda" else None,
    }
    print(json.dumps(out, indent=1))
    dest = args.out or (None if args.tiny else "reports/sd/request_time.json")
    if dest:
        Path(dest).parent.mkdir(parents=True, exist_ok=True)
        Path(dest).write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
