"""Calculation (not a measurement): GPU time and memory of one `dfr` request on Stable Diffusion v1.5.

Compute does not depend on the weights' values, so the FLOPs are counted exactly on SD v1.5's
architecture (UNet, VAE decoder, CLIP text encoder built from their configs on PyTorch's meta
device: nothing is allocated or run) with `torch.utils.flop_counter`. Time then assumes a
sustained share of the GPU's bf16 peak (`--mfu`), and memory counts weights, gradients and AdamW
states by their dtypes plus an activation estimate per image; both are labelled as calculated in
the output. Replace them with measurements when a GPU is at hand.

The request: the production recipe scaled to DFR's SD recipe (`--steps` 300, effective batch
`--batch` 78 = 16 forget + 62 retain, the whole UNet trained in bf16 autocast with fp32 master
weights); each training image costs a student forward and backward (3 forwards) plus the frozen
teacher's target forwards (`--teacher-forwards` 2: the mapped prompt and the retained one); a
teacher buffer of `--buffer` images drawn with DDIM 20 steps and classifier-free guidance (2
forwards a step); evaluation of `--eval-images` images the same way, decoded by the VAE.

Run: python scripts/sd_request_cost.py -> reports/sd/request_cost.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

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


def flops(fn) -> float:
    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return float(counter.get_total_flops())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch", type=int, default=78)
    ap.add_argument("--teacher-forwards", type=int, default=2)
    ap.add_argument("--buffer", type=int, default=250, help="teacher images per request")
    ap.add_argument("--eval-images", type=int, default=512)
    ap.add_argument("--ddim-steps", type=int, default=20)
    ap.add_argument("--peak-tflops", type=float, default=989.0, help="bf16 dense peak (H100/H200 SXM)")
    ap.add_argument("--mfu", type=float, default=0.35, help="assumed sustained share of the peak")
    ap.add_argument("--checkpointing", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--activation-gb-per-image", type=float, default=0.3, help="with checkpointing (assumed)")
    ap.add_argument("--out", default="reports/sd/request_cost.json")
    args = ap.parse_args()

    from diffusers import AutoencoderKL, UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(**SD15_UNET)
        vae = AutoencoderKL(
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=(128, 256, 512, 512),
            layers_per_block=2,
            latent_channels=4,
            sample_size=512,
        )
    params = sum(p.numel() for p in unet.parameters())
    x = torch.empty(1, 4, 64, 64, device="meta")
    unet_fwd = flops(lambda: unet(x, torch.tensor([500], device="meta"), torch.empty(1, 77, 768, device="meta")))
    vae_decode = flops(lambda: vae.decode(x))

    per_image_step = (3 + (1 if args.checkpointing else 0) + args.teacher_forwards) * unet_fwd
    train = per_image_step * args.batch * args.steps
    buffer = args.buffer * args.ddim_steps * 2 * unet_fwd
    evaluation = args.eval_images * (args.ddim_steps * 2 * unet_fwd + vae_decode)
    rate = args.peak_tflops * 1e12 * args.mfu
    seconds = {"training": train / rate, "teacher buffer": buffer / rate, "evaluation": evaluation / rate}

    gb = 1e9
    memory = {
        "student: fp32 weights, grads, AdamW moments": params * 4 * 4 / gb,
        "student bf16 copy for autocast": params * 2 / gb,
        "frozen teacher and base model (bf16)": 2 * params * 2 / gb,
        "VAE and CLIP text encoder (bf16)": (84e6 + 123e6) * 2 / gb,
        "activations (assumed per image x batch)": args.activation_gb_per_image * args.batch,
    }
    out = {
        "kind": "calculated, not measured: FLOPs counted exactly, time and activations assumed",
        "command": "python scripts/sd_request_cost.py",
        "unet_params_millions": round(params / 1e6, 1),
        "unet_forward_gflop_per_image_64x64": round(unet_fwd / 1e9, 1),
        "vae_decode_gflop_per_image": round(vae_decode / 1e9, 1),
        "assumptions": {k: v for k, v in vars(args).items() if k != "out"},
        "pflop": {
            "training": round(train / 1e15, 1),
            "buffer": round(buffer / 1e15, 1),
            "eval": round(evaluation / 1e15, 1),
        },
        "seconds": {k: round(v) for k, v in seconds.items()},
        "minutes_per_request": round(sum(seconds.values()) / 60, 1),
        "memory_gb": {k: round(v, 1) for k, v in memory.items()},
        "peak_memory_gb": round(sum(memory.values()), 1),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
