"""Seconds per step and peak VRAM of a FLUX.1-dev LoRA run: bf16 base vs nf4 base (QLoRA), on one GPU.

The full-size FLUX.1-dev architecture at random init (configs embedded below; nothing is downloaded):
the 12B transformer, T5-XXL, CLIP-L and Flux's VAE, in bf16. LoRA rank 16 at 512 px, batch 1 (+1 class
image), gradient checkpointing and 8-bit Adam, frozen parts offloaded (the defaults on CUDA), the
peers' LoRA targets. Each run reports the peak allocated VRAM over the training steps alone and over
the whole call (class images included), and seconds per step after the first. It appends its rows to
benchmarks/results/gpu_flux_memory.md and prints them as it goes.

Anchors (REFERENCE.md): Flux QLoRA ~9 GB peak on a 4090 (rank 4, cached latents and text embeddings);
fp8 LoRA 36.6 GB on an H100; diffusers' bf16 script > 40 GB.

Run on a GPU machine (about 6 minutes on an H100/H200, most of it building and quantizing):
    python benchmarks/gpu_flux_memory.py --steps 8
Exercised on a CPU with the tiny Flux pipeline (what CI-sized machines can check):
    python benchmarks/gpu_flux_memory.py --tiny --device cpu --steps 3
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from db_adapters import personalize, unload_adapter  # noqa: E402
from db_adapters.testing import tiny_flux_pipeline, tiny_t5_tokenizer, tiny_tokenizer  # noqa: E402

# black-forest-labs/FLUX.1-dev's configs (transformer, VAE, text encoders, scheduler), as published.
TRANSFORMER = {
    "attention_head_dim": 128,
    "guidance_embeds": True,
    "in_channels": 64,
    "joint_attention_dim": 4096,
    "num_attention_heads": 24,
    "num_layers": 19,
    "num_single_layers": 38,
    "patch_size": 1,
    "pooled_projection_dim": 768,
    "axes_dims_rope": [16, 56, 56],
}
VAE = {
    "in_channels": 3,
    "out_channels": 3,
    "latent_channels": 16,
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "sample_size": 1024,
    "scaling_factor": 0.3611,
    "shift_factor": 0.1159,
    "use_quant_conv": False,
    "use_post_quant_conv": False,
    "force_upcast": True,
}
CLIP_L = {
    "vocab_size": 49408,
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "max_position_embeddings": 77,
    "projection_dim": 768,
    "hidden_act": "quick_gelu",
}
T5_XXL = {
    "vocab_size": 32128,
    "d_model": 4096,
    "d_ff": 10240,
    "d_kv": 64,
    "num_heads": 64,
    "num_layers": 24,
    "feed_forward_proj": "gated-gelu",
    "relative_attention_num_buckets": 32,
    "relative_attention_max_distance": 128,
    "layer_norm_epsilon": 1e-6,
}
SCHEDULER = {
    "base_image_seq_len": 256,
    "base_shift": 0.5,
    "max_image_seq_len": 4096,
    "max_shift": 1.15,
    "num_train_timesteps": 1000,
    "shift": 3.0,
    "use_dynamic_shifting": True,
}


def full_size_flux(device: str) -> object:
    """FLUX.1-dev's architecture at random init in bf16, built on `device` (the tokenizers are the tiny
    offline ones: their ids are valid rows of the real embedding tables)."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # built in bf16: no 48 GB fp32 copy of the transformer first
    try:
        with torch.device(device):
            transformer = FluxTransformer2DModel(**TRANSFORMER)
            vae = AutoencoderKL(**VAE)
            clip = CLIPTextModel(CLIPTextConfig(**CLIP_L))
            t5 = T5EncoderModel(T5Config(**T5_XXL))
    finally:
        torch.set_default_dtype(previous)
    pipe = FluxPipeline(
        transformer=transformer,
        vae=vae,
        text_encoder=clip,
        tokenizer=tiny_tokenizer(),
        text_encoder_2=t5,
        tokenizer_2=tiny_t5_tokenizer(),
        scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER),
    )
    for module in (transformer, vae, clip, t5):
        module.eval()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def subject_images(size: int) -> list[Image.Image]:
    images = []
    for i, background in enumerate(["skyblue", "lightgreen", "wheat", "white"]):
        image = Image.new("RGB", (size, size), background)
        ImageDraw.Draw(image).ellipse((size // 5 + i, size // 5, 4 * size // 5 + i, 4 * size // 5), fill="red")
        images.append(image)
    return images


def run(pipe: object, label: str, args: argparse.Namespace, **settings: object) -> dict:
    cuda = args.device.startswith("cuda")
    times: list[float] = []
    peaks: list[int] = []

    def on_step(step: int, logs: dict) -> None:
        times.append(time.perf_counter())
        if cuda:
            peaks.append(torch.cuda.max_memory_allocated())
            if step == 1:
                torch.cuda.reset_peak_memory_stats()  # the training steps' own peak from here on

    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as out:
        adapter = personalize(
            pipe,
            subject_images(args.resolution),
            "dog",
            steps=args.steps,
            rank=16,
            learning_rate=1e-4,
            resolution=args.resolution,
            num_class_images=2,
            class_inference_steps=4,
            gradient_checkpointing=True,
            use_8bit_adam=cuda,  # bitsandbytes' 8-bit Adam runs on CUDA
            callback=on_step,
            output_dir=out,
            progress=False,
            **settings,
        )
        size = adapter.save(Path(out) / "flux.safetensors").stat().st_size
    total = time.perf_counter() - start
    whole_peak = max(peaks[:1] or [0])  # includes class images and caching, up to step 1
    step_peak = max(peaks[1:] or [0])
    per_step = (times[-1] - times[0]) / max(1, len(times) - 1)
    unload_adapter(pipe)
    row = {
        "run": label,
        "s_per_step": round(per_step, 3),
        "peak_train_gib": round(step_peak / 2**30, 2),
        "peak_whole_gib": round(max(whole_peak, step_peak) / 2**30, 2),
        "total_s": round(total, 1),
        "lora_file_mb": round(size / 1e6, 2),
    }
    print(json.dumps(row), flush=True)
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--tiny", action="store_true", help="the tiny Flux pipeline instead of the full size")
    parser.add_argument("--skip-nf4", action="store_true")
    args = parser.parse_args()
    if args.tiny:
        args.resolution = min(args.resolution, 32)
    start = time.perf_counter()
    pipe = tiny_flux_pipeline() if args.tiny else full_size_flux(args.device)
    pipe.to(args.device)
    built = time.perf_counter() - start
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor() or "cpu"
    print(f"built {'tiny' if args.tiny else 'full-size'} FLUX.1-dev in {built:.0f} s on {device}", flush=True)
    rows = [run(pipe, "bf16 base, LoRA r16, checkpointing, 8-bit Adam, offload", args)]
    if not args.skip_nf4 and args.device.startswith("cuda"):
        rows.append(
            run(pipe, "nf4 base (QLoRA), LoRA r16, checkpointing, 8-bit Adam, offload", args, quantize_base="nf4")
        )
    results = ROOT / "benchmarks" / "results" / "gpu_flux_memory.md"
    with results.open("a", encoding="utf-8") as handle:
        handle.write(f"\n## {time.strftime('%Y-%m-%d')} {device}, torch {torch.__version__}, {' '.join(sys.argv)}\n\n")
        handle.write("| run | s/step | peak VRAM, training (GiB) | peak VRAM, whole call | total s | LoRA file MB |\n")
        handle.write("|---|---|---|---|---|---|\n")
        for row in rows:
            handle.write(
                f"| {row['run']} | {row['s_per_step']} | {row['peak_train_gib']} | {row['peak_whole_gib']} "
                f"| {row['total_s']} | {row['lora_file_mb']} |\n"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
