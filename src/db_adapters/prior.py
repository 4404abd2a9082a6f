"""Class images for prior preservation: generated once by the frozen base pipeline, cached on disk.

The cache key is (base-model fingerprint, class prompt, resolution, count, seed), so a rerun with the
same settings reuses the images, and an interrupted generation resumes with only the missing ones.
Image i is always drawn from seed (seed, i), whatever the batch size, so the set is reproducible.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import InputError
from .export import write_atomically

if TYPE_CHECKING:
    from collections.abc import Iterator

    from diffusers import StableDiffusionPipeline
    from PIL import Image

logger = logging.getLogger("db_adapters")

# A generated image whose brightest pixel is this dark is what a tripped safety checker (or an
# fp16 overflow) returns: reject it rather than teach the prior that the class is black.
BLACK_MAX_VALUE = 8
MAX_BLACK_RETRIES = 3


def cache_key(base_fingerprint: str, class_prompt: str, resolution: int, count: int, seed: int) -> str:
    """The cache folder name for one class-image set."""
    text = json.dumps([base_fingerprint, class_prompt, resolution, count, seed])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def image_seed(seed: int, index: int, attempt: int = 0) -> int:
    """The generator seed of class image `index` (a fresh one per retry of a black image)."""
    return (seed * 1_000_003 + index + attempt * 7_919_993) % (2**63)


def _sampler(pipe: StableDiffusionPipeline, name: str) -> Any:
    from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler

    if name == "pipeline":
        return pipe.scheduler
    classes = {
        "dpmsolver++": DPMSolverMultistepScheduler,
        "ddim": DDIMScheduler,
        "euler": EulerDiscreteScheduler,
        "ddpm": DDPMScheduler,
    }
    return classes[name].from_config(pipe.scheduler.config)


@contextmanager
def generation_setup(pipe: StableDiffusionPipeline, sampler: str) -> Iterator[None]:
    """Swap in the class-image sampler and switch the safety checker off, restoring both after."""
    scheduler, checker = pipe.scheduler, getattr(pipe, "safety_checker", None)
    # The safety checker replaces flagged images with black ones silently; black images are
    # rejected below instead, so a flagged class prompt is an error, not a poisoned prior.
    pipe.scheduler, pipe.safety_checker = _sampler(pipe, sampler), None
    try:
        yield
    finally:
        pipe.scheduler, pipe.safety_checker = scheduler, checker


def is_black(image: Image.Image) -> bool:
    return max(high for _, high in image.getextrema()) <= BLACK_MAX_VALUE


def generate_images(
    pipe: StableDiffusionPipeline,
    prompt: str,
    seeds: Sequence[int],
    resolution: int,
    *,
    num_inference_steps: int,
    batch_size: int,
) -> list[Image.Image]:
    """Generate one image per seed from `prompt`, `batch_size` at a time."""
    import torch

    images: list[Image.Image] = []
    for start in range(0, len(seeds), batch_size):
        chunk = seeds[start : start + batch_size]
        generators = [torch.Generator("cpu").manual_seed(s) for s in chunk]
        with torch.no_grad():
            out = pipe(
                [prompt] * len(chunk),
                height=resolution,
                width=resolution,
                num_inference_steps=num_inference_steps,
                generator=generators,
                output_type="pil",
            )
        images.extend(out.images)
    return images


def class_images(
    pipe: StableDiffusionPipeline,
    class_prompt: str,
    count: int,
    resolution: int,
    *,
    seed: int,
    cache_dir: Path,
    base_fingerprint: str,
    sampler: str = "dpmsolver++",
    num_inference_steps: int = 25,
    batch_size: int = 4,
    given: Sequence[Image.Image] = (),
) -> list[Image.Image]:
    """Return `count` class images: the user's `given` ones first, the rest generated and cached.

    Args:
        pipe (`StableDiffusionPipeline`): the frozen base pipeline (before any adapter).
        class_prompt (`str`): e.g. "a dog".
        count (`int`): how many class images training uses.
        resolution (`int`): generated images' size.
        seed (`int`): seeds image i with `image_seed(seed, i)`.
        cache_dir (`Path`): the cache root; images go to `cache_dir/<cache_key>/`.
        base_fingerprint (`str`): identifies the base model in the cache key.
        sampler (`str`): "dpmsolver++" (default), "ddim", "euler", "ddpm" or "pipeline".
        num_inference_steps (`int`): sampler steps per image.
        batch_size (`int`): images per pipeline call.
        given (`Sequence[PIL.Image]`): the user's own class images.

    Example:
        >>> from db_adapters.testing import tiny_pipeline
        >>> imgs = class_images(tiny_pipeline(), "a dog", 2, 32, seed=0, cache_dir=Path("/tmp/c"),
        ...                     base_fingerprint="x", num_inference_steps=2)
        >>> len(imgs)
        2
    """
    given = list(given)[:count]
    missing = count - len(given)
    if missing <= 0:
        return given
    if given:
        logger.warning(
            "%d class images given, %d asked for: generating the other %d from %r.",
            len(given),
            count,
            missing,
            class_prompt,
        )
    folder = Path(cache_dir) / cache_key(base_fingerprint, class_prompt, resolution, missing, seed)
    return given + _cached_generation(
        pipe, class_prompt, missing, resolution, seed, folder, sampler, num_inference_steps, batch_size
    )


def _cached_generation(
    pipe: StableDiffusionPipeline,
    prompt: str,
    count: int,
    resolution: int,
    seed: int,
    folder: Path,
    sampler: str,
    steps: int,
    batch_size: int,
) -> list[Image.Image]:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"class_{i:05d}.png" for i in range(count)]
    todo = [i for i, path in enumerate(paths) if not path.exists()]
    if todo:
        logger.info("generating %d class images for %r into %s", len(todo), prompt, folder)
        with generation_setup(pipe, sampler):
            for attempt in range(MAX_BLACK_RETRIES + 1):
                seeds = [image_seed(seed, i, attempt) for i in todo]
                images = generate_images(
                    pipe, prompt, seeds, resolution, num_inference_steps=steps, batch_size=batch_size
                )
                for index, image in zip(todo, images, strict=True):
                    if not is_black(image):
                        write_atomically(paths[index], lambda tmp, im=image: im.save(tmp, format="PNG"))
                todo = [i for i in todo if not paths[i].exists()]
                if not todo:
                    break
        if todo:
            raise InputError(
                f"{len(todo)} class images for {prompt!r} came out black {MAX_BLACK_RETRIES + 1} times; "
                "the model may be producing NaNs (try fp32) or the prompt is filtered. Pass your own class_images."
            )
        (folder / "info.json").write_text(json.dumps({"prompt": prompt, "count": count, "seed": seed}))
    return [_read(path, Image) for path in paths]


def _read(path: Path, image_module: Any) -> Image.Image:
    with image_module.open(path) as handle:
        return handle.convert("RGB")
