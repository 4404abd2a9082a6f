"""Class-image generation time by batch size, on the medium pipeline of `speed.py` (issue 13's lever).

    OMP_NUM_THREADS=1 python benchmarks/class_image_batch.py --threads 1 --images 8 --rounds 2

Generates `--images` class images at 128 px with DPM-Solver++ (`--steps`, 20 as `personalize` does), in
batches of each `--batch-sizes`, alternating the sizes within each round so a machine that slows down
mid-run slows all of them alike. Prints seconds per size and round, and each size's time against batch 4
(`personalize`'s default). Nothing is written: it is a probe for choosing a default, not a result table.
"""

from __future__ import annotations

import argparse
import time

import torch
from speed import medium_pipeline


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--precisions", nargs="+", choices=("no", "bf16"), default=["no"])
    parser.add_argument("--images", type=int, default=8, help="images per size and round")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None)
    return parser.parse_args(argv)


def generation_seconds(pipe, batch_size: int, images: int, steps: int, precision: str = "no") -> float:
    started = time.perf_counter()
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
        for _ in range(0, images, batch_size):
            pipe(["a photo of a dog"] * batch_size, num_inference_steps=steps, height=128, width=128)
    return time.perf_counter() - started


def main(argv: list[str] | None = None) -> None:
    from diffusers import DPMSolverMultistepScheduler

    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    pipe = medium_pipeline()
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)  # as `personalize` samples
    pipe.set_progress_bar_config(disable=True)
    for precision in args.precisions:  # warm-up, not timed
        generation_seconds(pipe, args.batch_sizes[0], args.batch_sizes[0], args.steps, precision)
    settings = [(size, precision) for precision in args.precisions for size in args.batch_sizes]
    for round_ in range(1, args.rounds + 1):
        seconds = {
            (size, precision): generation_seconds(pipe, size, args.images, args.steps, precision)
            for size, precision in settings
        }
        baseline = seconds.get((4, "no"), float("nan"))
        against_4 = ", ".join(f"{baseline / s:.2f}x" for s in seconds.values())
        timings = ", ".join(f"batch {size} {precision} {s:.1f} s" for (size, precision), s in seconds.items())
        print(f"round {round_}: {timings} (batch 4 fp32 / each: {against_4})", flush=True)


if __name__ == "__main__":
    main()
