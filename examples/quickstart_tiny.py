"""The whole story offline in about a minute on a CPU: a tiny random-weight SD pipeline, three
generated "photos" of a subject, personalization with LoRA and prior preservation, a saved adapter
reloaded by plain diffusers, and a before/after sheet.

    python examples/quickstart_tiny.py [--out runs/quickstart]

The tiny pipeline has random weights, so its pictures are noise-like: this shows the machinery
(files, API, timing), not image quality.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import diffusers.utils.logging
import numpy as np
from PIL import Image, ImageDraw

# transformers notes at import that torchvision is absent; it is not needed here.
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from db_adapters import personalize  # noqa: E402
from db_adapters.generation import grid, render  # noqa: E402
from db_adapters.testing import tiny_pipeline  # noqa: E402


def subject_photos(folder: Path) -> Path:
    """Write three 'casual photos' of a red ball with a yellow stripe on varied backgrounds."""
    folder.mkdir(parents=True, exist_ok=True)
    for i, (background, offset) in enumerate([("skyblue", 0), ("lightgreen", 6), ("wheat", -5)]):
        image = Image.new("RGB", (64, 64), background)
        draw = ImageDraw.Draw(image)
        box = (14 + offset, 14, 50 + offset, 50)
        draw.ellipse(box, fill="red")
        draw.rectangle((box[0] + 4, 30, box[2] - 4, 34), fill="yellow")
        image.save(folder / f"ball_{i}.png")
    return folder


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/quickstart")
    parser.add_argument("--steps", type=int, default=60)
    args = parser.parse_args(argv)
    out = Path(args.out)

    start = time.perf_counter()
    pipe = tiny_pipeline(seed=0)
    photos = subject_photos(out / "photos")
    before = render(pipe, "a ball", num_images=4, steps=10)
    adapter = personalize(
        pipe,
        photos,
        "ball",
        steps=args.steps,
        learning_rate=1e-3,
        num_class_images=8,
        class_inference_steps=10,
        output_dir=out,
        rank=4,
    )
    path = adapter.save(out / "ball.safetensors")
    after = render(pipe, f"a {adapter.identifier} ball", num_images=4, steps=10)
    grid(before + after, rows=2).save(out / "sheet.png")

    # The file is a plain diffusers LoRA: a fresh pipeline loads it without db_adapters.
    fresh = tiny_pipeline(seed=0)
    diffusers.utils.logging.set_verbosity_error()  # its note that the file has no text-encoder keys
    fresh.load_lora_weights(str(path))
    again = render(fresh, f"a {adapter.identifier} ball", num_images=4, steps=10)
    same = max(int(np.abs(np.asarray(a, int) - np.asarray(b, int)).max()) for a, b in zip(after, again, strict=True))
    first, last = adapter.history[0]["instance"], adapter.history[-1]["instance"]
    print(f"identifier      {adapter.identifier!r} (prompt: {adapter.instance_prompt!r})")
    print(f"instance loss   {first:.4f} at step 1 -> {last:.4f} at step {args.steps}")
    print(f"adapter         {path} ({path.stat().st_size / 1024:.1f} KiB)")
    print(f"reloaded by plain diffusers: max pixel difference {same:.0f} (of 255)")
    print(f"sheet           {out / 'sheet.png'} (top: 'a ball' before; bottom: the subject prompt after)")
    print(f"wall time       {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
