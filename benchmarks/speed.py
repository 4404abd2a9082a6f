"""Time to an adapter: where `personalize` spends its time and memory, and how it compares with a plain loop.

    python benchmarks/speed.py --pipeline tiny --steps 20 --class-images 4          # ours, one row
    python benchmarks/speed.py --pipeline medium --steps 400 --class-images 100 --compare --threads 1
    python benchmarks/speed.py --pipeline medium --steps 30 --class-images 4 --profile   # torch.profiler table

Phases of our run (timed by wrapping `db_adapters.api`'s own steps): import, model load, class images
(`_prior_images`), encoding (`training_set`: VAE and text encoder once), training (`_train`: strategy,
trainer, all steps) and save (`Adapter.save`). Step time is the mean between the first and the last step
callback, so it leaves out the set-up before the first step.

The reference is a plain loop written as diffusers' examples/dreambooth/train_dreambooth_lora.py trains:
peft LoRA (rank `--rank`, gaussian init) on the UNet's attention projections via `unet.add_adapter`, the
VAE encoding the instance + class pixels and the text encoder the prompts every step (no caching), class
images generated as the example does (`pipeline(prompts)` in batches of 4: the pipeline's own PNDM
scheduler at its default 50 steps and guidance 7.5; ours: DPM-Solver++ at `--class-steps`, 20),
AdamW, instance and class batch concatenated, prior loss, gradient clipping, `loss.item()` logged every step, saved with
`save_lora_weights`. `--compare` runs each side in its own subprocess (so each one's peak RSS is its
own), ours first, and prints the ratios. Both train in fp32 (`mixed_precision="no"`) on the pipeline's
device. A row per run goes to benchmarks/results/speed.md.

`medium` is SD 1.5's layout at reduced width (built offline, random weights, 128 px): the UNet's
CrossAttnDownBlock2D x3 + DownBlock2D and mirrored up blocks, 2 layers per block, 8 attention heads,
channels (64, 128, 256, 256); SD's four-block VAE at channels (32, 64, 128, 128); a 4-layer, 128-wide
CLIP text encoder with the tiny tokenizer of `db_adapters.testing`.
"""

from __future__ import annotations

import time

_START = time.perf_counter()

import argparse  # noqa: E402
import datetime  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import platform  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "speed.md"
PROMPT_CLASS = "dog"
FIGURES = ("import_s", "load_s", "class_images_s", "encoding_s", "training_s", "save_s", "total_s")

MEDIUM_UNET = {
    "sample_size": 16,
    "in_channels": 4,
    "out_channels": 4,
    "block_out_channels": (64, 128, 256, 256),
    "layers_per_block": 2,
    "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    "cross_attention_dim": 128,
    "attention_head_dim": 8,
    "norm_num_groups": 32,
}
MEDIUM_VAE = {
    "in_channels": 3,
    "out_channels": 3,
    "block_out_channels": (32, 64, 128, 128),
    "layers_per_block": 2,
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "latent_channels": 4,
    "norm_num_groups": 32,
    "sample_size": 128,
}
MEDIUM_TEXT = {"hidden_size": 128, "intermediate_size": 512, "num_hidden_layers": 4, "num_attention_heads": 4}
RESOLUTION = {"tiny": 32, "medium": 128}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pipeline", choices=("tiny", "medium"), default="tiny")
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--class-images", type=int, default=100)
    parser.add_argument("--class-steps", type=int, default=20, help="our sampler's steps per class image (our default)")
    parser.add_argument(
        "--reference-class-steps",
        type=int,
        default=50,
        help="the reference's steps per class image (50: the pipeline's default, which the example uses)",
    )
    parser.add_argument(
        "--class-precision",
        choices=("no", "fp16", "bf16"),
        default=None,
        help="our class images' autocast (default: personalize's choice, bf16 on a CPU that computes it natively)",
    )
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--device", default="cuda" if _cuda() else "cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--side", choices=("ours", "reference"), default="ours")
    parser.add_argument("--compare", action="store_true", help="run both sides, each in a subprocess")
    parser.add_argument("--profile", action="store_true", help="profile our training steps; print the top entries")
    parser.add_argument("--json", action="store_true", help="print the figures as one JSON line (for --compare)")
    parser.add_argument("--output", type=Path, default=RESULTS)
    parser.add_argument("--no-write", action="store_true", help="do not append to the results file")
    return parser.parse_args(argv)


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def medium_pipeline(seed: int = 0):
    """An SD-1.5-shaped StableDiffusionPipeline at reduced width, random weights, built offline."""
    import torch
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from db_adapters.testing import sd_scheduler, tiny_tokenizer

    tokenizer = tiny_tokenizer()
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**MEDIUM_UNET)
    torch.manual_seed(seed + 1)
    vae = AutoencoderKL(**MEDIUM_VAE)
    torch.manual_seed(seed + 2)
    text_config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        max_position_embeddings=77,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **MEDIUM_TEXT,
    )
    scheduler = sd_scheduler()
    pipe = StableDiffusionPipeline(
        unet=unet,
        vae=vae,
        text_encoder=CLIPTextModel(text_config),
        tokenizer=tokenizer,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    for module in (pipe.unet, pipe.vae, pipe.text_encoder):
        module.eval()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def load_pipeline(name: str, device: str):
    if name == "tiny":
        from db_adapters.testing import tiny_pipeline

        return tiny_pipeline().to(device)
    return medium_pipeline().to(device)


def subject_images(resolution: int) -> list:
    from PIL import Image

    return [Image.new("RGB", (resolution, resolution), color) for color in ("red", "orange", "brown")]


class Clock:
    """Named phase durations, and the time of each training step."""

    def __init__(self) -> None:
        self.phases: dict[str, float] = {}
        self.step_times: list[float] = []
        self.peak_by: dict[str, float] = {}
        self.notes: dict[str, str] = {}  # settings the run chose, written beside the figures

    def timed(self, name: str, function):
        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                self.phases[name] = self.phases.get(name, 0.0) + time.perf_counter() - start
                self.peak_by[name] = _peak_rss_mb()  # the process's peak so far: where it grows

        return wrapper

    def step(self, *_: object) -> None:
        self.step_times.append(time.perf_counter())

    def step_s(self) -> float:
        times = self.step_times
        return (times[-1] - times[0]) / (len(times) - 1) if len(times) > 1 else float("nan")


def run_ours(args: argparse.Namespace, pipe, clock: Clock, work: Path) -> None:
    """`personalize` with its phases timed through `db_adapters.api`'s own functions."""
    import db_adapters.api as api

    phases = {"_prior_images": "class_images_s", "training_set": "encoding_s", "_train": "training_s"}
    originals = {name: getattr(api, name) for name in (*phases, "make_class_images")}
    for attribute, phase in phases.items():
        setattr(api, attribute, clock.timed(phase, originals[attribute]))

    def class_images_noting_precision(*a, **k):
        clock.notes["class_precision"] = k["precision"]  # what personalize chose, for the row
        return originals["make_class_images"](*a, **k)

    api.make_class_images = class_images_noting_precision
    try:
        adapter = api.personalize(
            pipe,
            subject_images(RESOLUTION[args.pipeline]),
            PROMPT_CLASS,
            steps=args.steps,
            num_class_images=args.class_images,
            class_inference_steps=args.class_steps,
            class_guidance_scale=7.5,
            rank=args.rank,
            learning_rate=1e-4,
            mixed_precision="no",
            class_precision=args.class_precision,
            progress=False,
            output_dir=work,
            seed=0,
            callback=clock.step,
        )
    finally:
        for attribute, function in originals.items():
            setattr(api, attribute, function)
    clock.timed("save_s", adapter.save)(work / "adapter.safetensors")


def run_reference(args: argparse.Namespace, pipe, clock: Clock, work: Path) -> None:
    """diffusers' train_dreambooth_lora.py loop, reduced to what decides its speed and memory."""
    import torch
    import torch.nn.functional as F
    from diffusers import DDPMScheduler, StableDiffusionPipeline
    from diffusers.optimization import get_scheduler
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    from db_adapters.data import image_batch

    resolution, device = RESOLUTION[args.pipeline], torch.device(args.device)
    torch.manual_seed(0)
    start = time.perf_counter()
    # The example's class images: `pipeline(example["prompt"]).images` over batches of `sample_batch_size`
    # (4): the pipeline's own scheduler (PNDM, as SD 1.5 ships) at its default guidance (7.5) and steps.
    class_images = []
    for first in range(0, args.class_images, 4):
        count = min(4, args.class_images - first)
        with torch.no_grad():
            out = pipe([f"a {PROMPT_CLASS}"] * count, num_inference_steps=args.reference_class_steps)
        class_images += out.images
    clock.phases["class_images_s"] = time.perf_counter() - start
    clock.peak_by["class_images_s"] = _peak_rss_mb()
    clock.phases["encoding_s"] = 0.0  # the reference encodes inside every step

    start = time.perf_counter()
    unet, vae, text_encoder, tokenizer = pipe.unet, pipe.vae, pipe.text_encoder, pipe.tokenizer
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    for module in (unet, vae, text_encoder):
        module.requires_grad_(False)
    unet.add_adapter(
        LoraConfig(
            r=args.rank,
            lora_alpha=args.rank,
            init_lora_weights="gaussian",
            target_modules=["to_k", "to_q", "to_v", "to_out.0", "add_k_proj", "add_v_proj"],
        )
    )
    params = [p for p in unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)
    lr_scheduler = get_scheduler("constant", optimizer, num_warmup_steps=0, num_training_steps=args.steps)

    def ids(prompt: str) -> torch.Tensor:
        return tokenizer(
            prompt, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
        ).input_ids

    instance_images = subject_images(resolution)
    instance_ids, class_ids = ids(f"a sks {PROMPT_CLASS}"), ids(f"a {PROMPT_CLASS}")
    unet.train()
    for step in range(args.steps):
        # The example's DataLoader: one instance and one class example, transformed from the image each time.
        pixel_values = torch.cat(
            [
                image_batch([instance_images[step % len(instance_images)]], resolution),
                image_batch([class_images[step % len(class_images)]], resolution),
            ]
        ).to(device)
        input_ids = torch.cat([instance_ids, class_ids]).to(device)
        model_input = vae.encode(pixel_values).latent_dist.sample() * vae.config.scaling_factor
        noise = torch.randn_like(model_input)
        timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (model_input.shape[0],), device=device)
        noisy = noise_scheduler.add_noise(model_input, noise, timesteps)
        encoder_hidden_states = text_encoder(input_ids)[0]
        model_pred = unet(noisy, timesteps, encoder_hidden_states, return_dict=False)[0]
        model_pred, model_pred_prior = torch.chunk(model_pred, 2, dim=0)
        target, target_prior = torch.chunk(noise, 2, dim=0)
        loss = F.mse_loss(model_pred.float(), target.float(), reduction="mean")
        loss = loss + F.mse_loss(model_pred_prior.float(), target_prior.float(), reduction="mean")
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        lr_scheduler.step()
        optimizer.zero_grad()
        _ = loss.detach().item()  # the example logs it on the progress bar every step
        clock.step()
    clock.phases["training_s"] = time.perf_counter() - start
    clock.peak_by["training_s"] = _peak_rss_mb()

    start = time.perf_counter()
    StableDiffusionPipeline.save_lora_weights(work, unet_lora_layers=get_peft_model_state_dict(unet))
    clock.phases["save_s"] = time.perf_counter() - start


def measure(args: argparse.Namespace) -> dict:
    """Run one side in this process; its figures."""
    import torch

    import db_adapters  # noqa: F401  (the import phase: torch, diffusers, db_adapters)

    if args.threads:
        torch.set_num_threads(args.threads)
    imported = time.perf_counter()
    clock = Clock()
    clock.phases["import_s"] = imported - _START
    pipe = clock.timed("load_s", load_pipeline)(args.pipeline, args.device)
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    with tempfile.TemporaryDirectory() as work:
        (run_ours if args.side == "ours" else run_reference)(args, pipe, clock, Path(work))
    figures = {name: clock.phases.get(name, 0.0) for name in FIGURES if name != "total_s"}
    figures["total_s"] = sum(figures.values())
    figures["adapter_s"] = figures["total_s"] - figures["import_s"] - figures["load_s"]
    figures["step_s"] = clock.step_s()
    figures["steps_per_s"] = 1.0 / figures["step_s"]
    figures["peak_rss_mb"] = _peak_rss_mb()
    for phase in ("class_images_s", "training_s"):  # the peak RSS reached by the end of each
        figures[f"rss_mb_by_{phase.removesuffix('_s')}"] = clock.peak_by.get(phase, float("nan"))
    if args.device.startswith("cuda"):
        figures["peak_vram_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return figures | clock.notes


def _peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux


def profile(args: argparse.Namespace) -> str:
    """torch.profiler over our training steps (class images and encoding run outside it); the top table."""
    import torch
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    import db_adapters.api as api

    if args.threads:
        torch.set_num_threads(args.threads)
    pipe = load_pipeline(args.pipeline, args.device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if args.device.startswith("cuda") else [])
    original = api._train
    tables = []

    def profiled_train(*a, **k):
        with torch_profile(activities=activities) as prof:
            result = original(*a, **k)
        sort = "self_cuda_time_total" if args.device.startswith("cuda") else "self_cpu_time_total"
        averages = prof.key_averages()
        tables.append(averages.table(sort_by=sort, row_limit=15, max_name_column_width=40))
        counts = {e.key: e.count for e in averages}
        # Host syncs (`.item()`, `float(tensor)`, `.tolist()`) and tensor copies, per training step.
        per_step = {name: counts.get(name, 0) / args.steps for name in ("aten::_local_scalar_dense", "aten::copy_")}
        tables.append("per step: " + ", ".join(f"{name} {count:.1f}" for name, count in per_step.items()))
        return result

    api._train = profiled_train
    try:
        with tempfile.TemporaryDirectory() as work:
            run_ours(args, pipe, Clock(), Path(work))
    finally:
        api._train = original
    return "\n".join(tables)


def compare(args: argparse.Namespace) -> dict[str, dict]:
    """Each side in its own subprocess (its own peak RSS); their figures."""
    results = {}
    for side in ("ours", "reference"):
        command = [sys.executable, __file__, *_passed_on(args), "--side", side, "--json", "--no-write"]
        env = dict(os.environ, OMP_NUM_THREADS=str(args.threads)) if args.threads else None
        out = subprocess.run(command, check=True, capture_output=True, text=True, env=env).stdout
        results[side] = json.loads(out.strip().splitlines()[-1])
        print(side, _format(results[side]), flush=True)
    return results


def _passed_on(args: argparse.Namespace) -> list[str]:
    passed = ["--pipeline", args.pipeline, "--steps", str(args.steps), "--class-images", str(args.class_images)]
    passed += ["--class-steps", str(args.class_steps), "--reference-class-steps", str(args.reference_class_steps)]
    passed += ["--rank", str(args.rank), "--device", args.device]
    passed += ["--class-precision", args.class_precision] if args.class_precision else []
    return passed + (["--threads", str(args.threads)] if args.threads else [])


def ratios(results: dict[str, dict]) -> dict[str, float]:
    """Reference / ours for times (above 1: ours faster), ours / reference for memory (below 1: ours smaller)."""
    ours, ref = results["ours"], results["reference"]
    out = {
        "adapter_speedup": ref["adapter_s"] / ours["adapter_s"],
        "training_speedup": ref["training_s"] / ours["training_s"],
        "step_speedup": ref["step_s"] / ours["step_s"],
        "rss_ratio": ours["peak_rss_mb"] / ref["peak_rss_mb"],
    }
    if "peak_vram_mb" in ours:
        out["vram_ratio"] = ours["peak_vram_mb"] / ref["peak_vram_mb"]
    return out


def _format(figures: dict) -> str:
    return ", ".join(f"{k} {v:.3g}" if isinstance(v, int | float) else f"{k} {v}" for k, v in figures.items())


def append_row(path: Path, args: argparse.Namespace, side: str, figures: dict) -> None:
    import diffusers
    import torch

    header = (
        "# Time to an adapter\n\nWritten by benchmarks/speed.py; one row per run (times in seconds, memory in MiB; "
        "ratios: reference / ours for time, ours / reference for memory).\n\n"
        "| date | device | torch | diffusers | command | side | figures |\n|---|---|---|---|---|---|---|\n"
    )
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(header)
    device = args.device if args.device != "cpu" else f"cpu ({platform.processor() or platform.machine()})"
    if args.device.startswith("cuda"):
        device = torch.cuda.get_device_name()
    command = "python benchmarks/speed.py " + " ".join(sys.argv[1:])
    row = (
        f"| {datetime.date.today()} | {device} | {torch.__version__} | {diffusers.__version__} | `{command}` "
        f"| {side} | {_format(figures)} |\n"
    )
    with path.open("a") as file:
        file.write(row)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.profile:
        print(profile(args))
        return
    if args.compare:
        results = compare(args)
        figures = ratios(results)
        print("ratios", _format(figures))
        if not args.no_write:
            for side, values in results.items():
                append_row(args.output, args, side, values)
            append_row(args.output, args, "ratios", figures)
        return
    figures = measure(args)
    if args.json:
        print(json.dumps(figures))
    else:
        print(args.side, _format(figures))
    if not args.no_write:
        append_row(args.output, args, args.side, figures)


if __name__ == "__main__":
    main()
