"""Training speed, peak VRAM and MFU of `personalize` on the real architectures at random init, on one GPU.

SD 1.5 (512 px), SDXL (1024 px) and FLUX.1-dev (512 px) are built from their published configs (embedded
below and in gpu_flux_memory.py; nothing is downloaded) in bf16, straight on the GPU. Each run trains
`--steps` steps after a few class images and reports: steps/s (mean from the fourth step to the last
step), the projected time of 1,000 steps, peak allocated VRAM over the training steps, and MFU: the
FLOPs of one training step counted by `torch.utils.flop_counter.FlopCounterMode` (matmuls, convolutions
and attention, forward and backward; with gradient checkpointing the recomputed forward counts too, so
it is hardware rather than model FLOPs utilisation there) over the step time and the GPU's peak dense
bf16 FLOP/s. Rows are appended to benchmarks/results/gpu_speed.md as each run ends.

    python benchmarks/gpu_speed.py --models sd15 sdxl          # on a GPU machine (see gpu_speed.sh)
    python benchmarks/gpu_speed.py --models flux
    python benchmarks/gpu_speed.py --tiny --device cpu --steps 6   # the same code on tiny pipelines

Anchors (REFERENCE.md): SD 1.5 LoRA with checkpointing ~10 GB and ~11 min per 1k steps on an A100; peft's
8.12 GB; full DreamBooth with 8-bit Adam fits 16 GB; SDXL LoRA < 16 GB; Flux QLoRA ~9 GB.
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

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent / "src"))
sys.path.insert(0, str(ROOT))

from gpu_flux_memory import CLIP_L, full_size_flux, subject_images  # noqa: E402

from db_adapters import personalize, unload_adapter  # noqa: E402

RESULTS = ROOT / "results" / "gpu_speed.md"
# Peak dense bf16 tensor-core FLOP/s (vendor datasheets, without sparsity).
PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "4090": 165e12, "A10G": 70e12}

SD15_UNET = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "block_out_channels": (320, 640, 1280, 1280),
    "layers_per_block": 2,
    "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    "cross_attention_dim": 768,
    "attention_head_dim": 8,
    "norm_num_groups": 32,
}
SD_VAE = {
    "in_channels": 3,
    "out_channels": 3,
    "block_out_channels": (128, 256, 512, 512),
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "layers_per_block": 2,
    "latent_channels": 4,
    "norm_num_groups": 32,
    "sample_size": 512,
}
SDXL_UNET = {
    "sample_size": 128,
    "in_channels": 4,
    "out_channels": 4,
    "block_out_channels": (320, 640, 1280),
    "layers_per_block": 2,
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    "transformer_layers_per_block": (1, 2, 10),
    "attention_head_dim": (5, 10, 20),
    "cross_attention_dim": 2048,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816,
    "use_linear_projection": True,
    "norm_num_groups": 32,
}
CLIP_BIG_G = {
    "vocab_size": 49408,
    "hidden_size": 1280,
    "intermediate_size": 5120,
    "num_hidden_layers": 32,
    "num_attention_heads": 20,
    "max_position_embeddings": 77,
    "projection_dim": 1280,
    "hidden_act": "gelu",
}
SD_SCHEDULER = {
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "steps_offset": 1,
}


def _built_in_bf16(device: str, build):
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # no fp32 copy first
    try:
        with torch.device(device):
            return build()
    finally:
        torch.set_default_dtype(previous)


def full_size_sd15(device: str):
    """SD 1.5's architecture at random init in bf16 (the tokenizer is the tiny offline one)."""
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from db_adapters.testing import tiny_tokenizer

    torch.manual_seed(0)
    unet, vae, text = _built_in_bf16(
        device,
        lambda: (
            UNet2DConditionModel(**SD15_UNET),
            AutoencoderKL(**SD_VAE, scaling_factor=0.18215),
            CLIPTextModel(CLIPTextConfig(**CLIP_L)),
        ),
    )
    pipe = StableDiffusionPipeline(
        unet=unet,
        vae=vae,
        text_encoder=text,
        tokenizer=tiny_tokenizer(),
        scheduler=PNDMScheduler(**SD_SCHEDULER, skip_prk_steps=True, set_alpha_to_one=False),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def full_size_sdxl(device: str):
    """SDXL base's architecture at random init in bf16 (tiny offline tokenizers)."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from db_adapters.testing import tiny_tokenizer

    torch.manual_seed(0)
    unet, vae, text, text_2 = _built_in_bf16(
        device,
        lambda: (
            UNet2DConditionModel(**SDXL_UNET),
            AutoencoderKL(**(SD_VAE | {"sample_size": 1024}), scaling_factor=0.13025, force_upcast=True),
            CLIPTextModel(CLIPTextConfig(**CLIP_L)),
            CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_BIG_G)),
        ),
    )
    pipe = StableDiffusionXLPipeline(
        unet=unet,
        vae=vae,
        text_encoder=text,
        text_encoder_2=text_2,
        tokenizer=tiny_tokenizer(),
        tokenizer_2=tiny_tokenizer(),
        scheduler=EulerDiscreteScheduler(**SD_SCHEDULER),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny(model: str):
    from db_adapters import testing

    return {"sd15": testing.tiny_pipeline, "sdxl": testing.tiny_sdxl_pipeline, "flux": testing.tiny_flux_pipeline}[
        model
    ]()


# Each model's runs: (label, resolution, personalize settings).
RUNS = {
    "sd15": [
        ("LoRA r4, batch 1+1", 512, {"strategy": "lora", "rank": 4, "batch_size": 1}),
        ("LoRA r4, batch 4+4", 512, {"strategy": "lora", "rank": 4, "batch_size": 4}),
        ("LoRA r4, batch 1+1, memory='8gb'", 512, {"strategy": "lora", "rank": 4, "memory": "8gb"}),
        (
            "full, batch 1+1, 8-bit Adam + checkpointing",
            512,
            {"strategy": "full", "use_8bit_adam": True, "gradient_checkpointing": True, "learning_rate": 5e-6},
        ),
        ("full, batch 4+4, bf16", 512, {"strategy": "full", "batch_size": 4, "learning_rate": 5e-6}),
    ],
    "sdxl": [
        ("LoRA r4, batch 1+1", 1024, {"strategy": "lora", "rank": 4}),
        ("LoRA r4, batch 1+1, memory='16gb'", 1024, {"strategy": "lora", "rank": 4, "memory": "16gb"}),
    ],
    "flux": [
        ("LoRA r4, batch 1+1, checkpointing", 512, {"strategy": "lora", "rank": 4, "gradient_checkpointing": True}),
        ("LoRA r4, batch 1+1, memory='12gb' (nf4 QLoRA)", 512, {"strategy": "lora", "rank": 4, "memory": "12gb"}),
    ],
}


def peak_flops(device: str) -> float | None:
    if not device.startswith("cuda"):
        return None
    name = torch.cuda.get_device_name()
    return next((flops for key, flops in PEAK_BF16.items() if key in name), None)


def run(pipe, model: str, label: str, resolution: int, settings: dict, args: argparse.Namespace) -> dict:
    from torch.utils.flop_counter import FlopCounterMode

    cuda = args.device.startswith("cuda")
    times: list[float] = []
    counter = FlopCounterMode(display=False)
    counted: dict[str, float] = {}
    batch = settings.get("batch_size", 1)

    def on_step(step: int, logs: dict) -> None:
        times.append(time.perf_counter())
        if step == 1 and cuda:
            torch.cuda.reset_peak_memory_stats()  # the training steps' own peak from here on
        # Step 3 runs under the FLOP counter (slower): it is left out of the timing.
        if step == 2:
            counter.__enter__()
        elif step == 3:
            counter.__exit__(None, None, None)
            counted["flops"] = counter.get_total_flops()

    if cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as out:
        personalize(
            pipe,
            subject_images(resolution),
            "dog",
            steps=args.steps,
            learning_rate=settings.pop("learning_rate", 1e-4),
            resolution=resolution,
            num_class_images=max(4, batch),
            class_inference_steps=4,
            callback=on_step,
            output_dir=out,
            progress=False,
            **settings,
        )
    total = time.perf_counter() - start
    # times[i] ends step i + 1, so steps 4.. are the gaps after times[2]: step 3 (FLOP-counted, slower)
    # is the gap times[1] -> times[2] and stays out. (Dropping times[2] instead would time steps 3+4 as one.)
    timed = times[2:]
    per_step = (timed[-1] - timed[0]) / (len(timed) - 1) if len(timed) > 1 else float("nan")
    flops, peak = counted.get("flops"), peak_flops(args.device)
    row = {
        "model": model,
        "run": label,
        "resolution": resolution,
        "steps_per_s": round(1 / per_step, 2),
        "s_per_1k_steps": round(1000 * per_step, 1),
        "peak_train_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None,
        "gflop_per_step": round(flops / 1e9, 1) if flops else None,
        "mfu": round(flops / per_step / peak, 3) if flops and peak else None,
        "total_s": round(total, 1),
    }
    unload_adapter(pipe)
    print(json.dumps(row), flush=True)
    return row


def append(rows: list[dict], args: argparse.Namespace) -> None:
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor() or "cpu"
    new = not RESULTS.exists()
    with RESULTS.open("a", encoding="utf-8") as handle:
        if new:
            handle.write("# GPU training speed\n\nWritten by benchmarks/gpu_speed.py (see its docstring).\n")
        handle.write(f"\n## {time.strftime('%Y-%m-%d')} {device}, torch {torch.__version__}, {' '.join(sys.argv)}\n\n")
        handle.write("| model | run | px | steps/s | s per 1k steps | peak VRAM training (GiB) | GFLOP/step | MFU |\n")
        handle.write("|---|---|---|---|---|---|---|---|\n")
        for r in rows:
            handle.write(
                f"| {r['model']} | {r['run']} | {r['resolution']} | {r['steps_per_s']} | {r['s_per_1k_steps']} "
                f"| {r['peak_train_gib']} | {r['gflop_per_step']} | {r['mfu']} |\n"
            )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", choices=list(RUNS), default=["sd15", "sdxl"])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--tiny", action="store_true", help="tiny pipelines (CPU check of the code path)")
    args = parser.parse_args(argv)
    builders = {"sd15": full_size_sd15, "sdxl": full_size_sdxl, "flux": full_size_flux}
    for model in args.models:
        start = time.perf_counter()
        pipe = tiny(model).to(args.device) if args.tiny else builders[model](args.device)
        print(f"built {model} in {time.perf_counter() - start:.0f} s", flush=True)
        rows = []
        for label, resolution, settings in RUNS[model]:
            if args.tiny:
                resolution = 32
                if "quantize" in label or "nf4" in label or "memory='8gb'" in label:
                    continue  # bitsandbytes quantization needs CUDA
            try:
                rows.append(run(pipe, model, label, resolution, dict(settings), args))
            except Exception as error:  # one run's failure (e.g. out of memory) must not lose the others' rows
                print(f"{model} {label}: {type(error).__name__}: {error}", flush=True)
                if args.device.startswith("cuda"):
                    torch.cuda.empty_cache()
        if not args.tiny:  # a CPU check of the code path, not a figure
            append(rows, args)
        del pipe
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
