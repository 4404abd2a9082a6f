"""GPU checks of the model families: what a GPU user of SD 1.5 and SDXL hits first, on tiny pipelines.

For each family's tiny pipeline, loaded in fp16, bf16 and fp32 with `mixed_precision` left unset:
the run's autocast matches the pipeline (fp16 with a gradient scaler; fp32 -> bf16 on a bf16 GPU),
trainable weights stay fp32, every loss is finite, and every weight stays on the pipeline's device.
With two or more GPUs, a pipeline on `cuda:1` must train on `cuda:1`: no parameter, and no
allocation beyond the CUDA context, may land on `cuda:0`. It prints one line per check and exits non-zero if any failed.

Run on a GPU machine (about a minute):  python benchmarks/gpu_families.py
Exercised on a CPU (bf16 and fp32 only): python benchmarks/gpu_families.py --device cpu
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from db_adapters import personalize
from db_adapters.families import available_families
from db_adapters.testing import tiny_pipeline_of

FAST = {"steps": 6, "num_class_images": 2, "class_inference_steps": 2, "progress": False, "learning_rate": 1e-3}


def subject_images(count: int = 3, size: int = 40) -> list[Image.Image]:
    images = []
    for i, background in enumerate(["skyblue", "lightgreen", "wheat"][:count]):
        image = Image.new("RGB", (size, size), background)
        ImageDraw.Draw(image).ellipse((8 + i, 8, size - 8 + i, size - 8), fill="red")
        images.append(image)
    return images


def weight_devices(pipe) -> set[str]:
    modules = [m for m in pipe.components.values() if isinstance(m, torch.nn.Module)]
    return {str(p.device) for module in modules for p in module.parameters()}


def check_precision(family: str, dtype: torch.dtype, device: str) -> list[str]:
    """Train a pipeline loaded in `dtype` with mixed_precision unset; return the problems found."""
    from accelerate import Accelerator

    scalers = []
    real_init = Accelerator.__init__

    def spying_init(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        scalers.append((self.mixed_precision, self.scaler is not None))

    Accelerator.__init__ = spying_init
    try:
        pipe = tiny_pipeline_of(family).to(device, dtype)
        lora_dtypes = set()

        def record(step, logs):
            for name in ("unet", "transformer"):
                module = getattr(pipe, name, None)
                if module is not None:
                    lora_dtypes.update(p.dtype for n, p in module.named_parameters() if ".lora_" in n)

        with tempfile.TemporaryDirectory() as out:
            adapter = personalize(pipe, subject_images(), "dog", output_dir=out, callback=record, **FAST)
    finally:
        Accelerator.__init__ = real_init
    problems = []
    # A float32 pipeline trains in bf16 on a GPU that supports it (plan.resolve_mixed_precision).
    fp32_on_gpu = "bf16" if device.startswith("cuda") and torch.cuda.is_bf16_supported() else "no"
    expected = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: fp32_on_gpu}[dtype]
    precision, has_scaler = scalers[-1]
    if precision != expected:
        problems.append(f"mixed_precision {precision}, expected {expected}")
    if expected == "fp16" and device.startswith("cuda") and not has_scaler:
        problems.append("fp16 without a gradient scaler")
    if lora_dtypes != {torch.float32}:
        problems.append(f"trainable LoRA weights in {sorted(map(str, lora_dtypes))}")
    if not all(math.isfinite(h["loss"]) for h in adapter.history):
        problems.append("a non-finite loss")
    devices = {
        str(p.device)
        for module in pipe.components.values()
        if hasattr(module, "parameters")
        for p in module.parameters()
    }
    if devices != {str(torch.empty(0, device=device).device)}:  # "cuda" is "cuda:0" on a weight
        problems.append(f"weights on {sorted(devices)}")
    return problems


def check_second_device(family: str) -> list[str]:
    """A pipeline on cuda:1 trains on cuda:1 and leaves cuda:0 alone."""
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated(0)
    pipe = tiny_pipeline_of(family).to("cuda:1")
    with tempfile.TemporaryDirectory() as out:
        personalize(pipe, subject_images(), "dog", output_dir=out, **FAST)
    problems = []
    devices = {
        str(p.device)
        for module in pipe.components.values()
        if hasattr(module, "parameters")
        for p in module.parameters()
    }
    if devices != {"cuda:1"}:
        problems.append(f"weights on {sorted(devices)}")
    grown = torch.cuda.memory_allocated(0) - before
    if grown > 0:
        problems.append(f"{grown} bytes newly allocated on cuda:0")
    return problems


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args()
    dtypes = (
        [torch.float16, torch.bfloat16, torch.float32]
        if args.device.startswith("cuda")
        else [torch.bfloat16, torch.float32]
    )
    failures = 0
    if args.device.startswith("cuda"):
        print(f"device: {torch.cuda.get_device_name()} x {torch.cuda.device_count()}, torch {torch.__version__}")
    for family in (f.name for f in available_families()):
        for dtype in dtypes:
            start = time.perf_counter()
            problems = check_precision(family, dtype, args.device)
            failures += bool(problems)
            status = "ok" if not problems else "FAIL " + "; ".join(problems)
            print(f"{family:5s} {str(dtype):15s} {status} ({time.perf_counter() - start:.1f} s)", flush=True)
        if args.device.startswith("cuda"):
            if torch.cuda.device_count() < 2:
                print(f"{family:5s} cuda:1          skipped: {torch.cuda.device_count()} GPU on this machine")
            else:
                problems = check_second_device(family)
                failures += bool(problems)
                print(f"{family:5s} cuda:1          {'ok' if not problems else 'FAIL ' + '; '.join(problems)}")
    print(f"{failures} check(s) failed" if failures else "all checks passed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    raise SystemExit(main())
