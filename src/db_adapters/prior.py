"""Class images for prior preservation: generated once by the frozen base pipeline, cached on disk.

The cache key is everything that changes the images (base-model fingerprint, class prompt, resolution,
count, seed, sampler, its steps and guidance), so a rerun with the same settings reuses the images, a
changed setting makes new ones, and an interrupted generation resumes with only the missing ones.
Image i is always drawn from seed (seed, i), whatever the batch size or the number of processes, so
the set is reproducible. Launched as several processes, rank r generates images r, r + world, ...;
the ranks exchange them, the main process alone writes the cache, and all wait for it at a barrier.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .distributed import Processes, processes
from .errors import InputError
from .files import write_atomically

if TYPE_CHECKING:
    from collections.abc import Iterator

    from diffusers import DiffusionPipeline
    from PIL import Image

logger = logging.getLogger("db_adapters")

# A generated image whose brightest pixel is this dark is what a tripped safety checker (or an
# fp16 overflow) returns: reject it rather than teach the prior that the class is black.
BLACK_MAX_VALUE = 8
MAX_BLACK_RETRIES = 3


def cache_key(base_fingerprint: str, class_prompt: str, resolution: int, count: int, seed: int, **sampling: Any) -> str:
    """The cache folder name for one class-image set: a hash of everything that changes the images.

    Args:
        base_fingerprint (`str`): the base model's weights fingerprint.
        class_prompt (`str`): e.g. "a dog".
        resolution (`int`): the images' size.
        count (`int`): how many images the set holds.
        seed (`int`): the set's seed.
        **sampling: the sampler's settings (name, steps, guidance scale).

    Example:
        >>> cache_key("w", "a dog", 32, 2, 0, sampler="ddim") != cache_key("w", "a dog", 32, 2, 0, sampler="ddpm")
        True
    """
    text = json.dumps([base_fingerprint, class_prompt, resolution, count, seed, sampling], sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def image_seed(seed: int, index: int, attempt: int = 0) -> int:
    """The generator seed of class image `index` (a fresh one per retry of a black image)."""
    return (seed * 1_000_003 + index + attempt * 7_919_993) % (2**63)


def _sampler(pipe: DiffusionPipeline, name: str) -> Any:
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
def generation_setup(pipe: DiffusionPipeline, sampler: str, precision: str = "no") -> Iterator[None]:
    """Set the pipeline up for class images, and back as it was after.

    The class-image sampler is swapped in; the safety checker is off; the VAE decodes one image at a
    time (diffusers' VAE slicing: the decoder's full-resolution activations are the peak memory of a
    batch, e.g. several GB for four SDXL images); with `precision` "fp16" or "bf16", the pipeline
    runs under that autocast (class images in half precision on a float32 pipeline).

    Args:
        pipe (`DiffusionPipeline`): the frozen base pipeline.
        sampler (`str`): one of `config.CLASS_SAMPLERS`.
        precision (`str`): "no", "fp16" or "bf16".

    Example:
        >>> from db_adapters.testing import tiny_pipeline
        >>> pipe = tiny_pipeline()
        >>> with generation_setup(pipe, "ddim"):
        ...     type(pipe.scheduler).__name__, pipe.vae.use_slicing
        ('DDIMScheduler', True)
        >>> pipe.vae.use_slicing
        False
    """
    import torch

    scheduler, checker = pipe.scheduler, getattr(pipe, "safety_checker", None)
    vae = getattr(pipe, "vae", None)
    slicing = getattr(vae, "use_slicing", None)
    # The safety checker replaces flagged images with black ones silently; black images are
    # rejected below instead, so a flagged class prompt is an error, not a poisoned prior.
    pipe.scheduler, pipe.safety_checker = _sampler(pipe, sampler), None
    if slicing is not None:
        vae.use_slicing = True
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(precision)
    try:
        with torch.autocast(pipe.device.type, dtype=dtype, enabled=dtype is not None):
            yield
    finally:
        pipe.scheduler, pipe.safety_checker = scheduler, checker
        if slicing is not None:
            vae.use_slicing = slicing


def is_black(image: Image.Image) -> bool:
    return max(high for _, high in image.getextrema()) <= BLACK_MAX_VALUE


def generate_images(
    pipe: DiffusionPipeline,
    prompt: str,
    seeds: Sequence[int],
    resolution: int,
    *,
    num_inference_steps: int,
    batch_size: int,
    guidance_scale: float | None = None,
) -> list[Image.Image]:
    """Generate one image per seed from `prompt`, `batch_size` at a time (guidance None: the pipeline's default)."""
    import torch

    images: list[Image.Image] = []
    for start in range(0, len(seeds), batch_size):
        chunk = seeds[start : start + batch_size]
        generators = [torch.Generator("cpu").manual_seed(s) for s in chunk]
        guidance = {} if guidance_scale is None else {"guidance_scale": guidance_scale}
        # Inference mode, not just no_grad: no autograd bookkeeping at all (8% faster a class image on
        # the CPU benchmark); nothing made here reaches training but the PIL images.
        with torch.inference_mode():
            out = pipe(
                [prompt] * len(chunk),
                height=resolution,
                width=resolution,
                num_inference_steps=num_inference_steps,
                generator=generators,
                output_type="pil",
                **guidance,
            )
        images.extend(out.images)
    return images


def class_images(
    pipe: DiffusionPipeline,
    class_prompt: str,
    count: int,
    resolution: int,
    *,
    seed: int,
    cache_dir: Path,
    base_fingerprint: str,
    sampler: str = "dpmsolver++",
    num_inference_steps: int = 25,
    guidance_scale: float = 7.5,
    batch_size: int = 4,
    given: Sequence[Image.Image] = (),
    precision: str = "no",
) -> list[Image.Image]:
    """Return `count` class images: the user's `given` ones first, the rest generated and cached.

    Args:
        pipe (`DiffusionPipeline`): the frozen base pipeline (before any adapter).
        class_prompt (`str`): e.g. "a dog".
        count (`int`): how many class images training uses.
        resolution (`int`): generated images' size.
        seed (`int`): seeds image i with `image_seed(seed, i)`.
        cache_dir (`Path`): the cache root; images go to `cache_dir/<cache_key>/`.
        base_fingerprint (`str`): identifies the base model in the cache key.
        sampler (`str`): "dpmsolver++" (default), "ddim", "euler", "ddpm" or "pipeline".
        num_inference_steps (`int`): sampler steps per image.
        guidance_scale (`float`): classifier-free guidance scale.
        batch_size (`int`): images per pipeline call.
        given (`Sequence[PIL.Image]`): the user's own class images.
        precision (`str`): "no", or "fp16"/"bf16" to generate under that autocast.

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
    sampling = {"sampler": sampler, "steps": num_inference_steps, "guidance_scale": guidance_scale}
    if precision != "no":  # only then, so the caches of full-precision runs keep their keys
        sampling["precision"] = precision
    folder = Path(cache_dir) / cache_key(base_fingerprint, class_prompt, resolution, missing, seed, **sampling)
    return given + _cached_generation(pipe, class_prompt, missing, resolution, seed, folder, sampling, batch_size)


def _cached_generation(
    pipe: DiffusionPipeline,
    prompt: str,
    count: int,
    resolution: int,
    seed: int,
    folder: Path,
    sampling: dict[str, Any],
    batch_size: int,
) -> list[Image.Image]:
    from PIL import Image

    procs = processes(pipe.device)
    paths = [folder / f"class_{i:05d}.png" for i in range(count)]
    # An image missing on any rank's disk is made again, so ranks on nodes without a shared
    # cache folder still agree on what to generate.
    missing = procs.any([not path.exists() for path in paths])
    todo = [i for i, absent in enumerate(missing) if absent]
    made: dict[int, Image.Image] = {}
    if todo:
        write = None
        if procs.is_main:  # the one process that writes files
            folder.mkdir(parents=True, exist_ok=True)
            logger.info("generating %d class images for %r into %s", len(todo), prompt, folder)

            def write(index: int, image: Image.Image) -> None:
                write_atomically(paths[index], lambda tmp: image.save(tmp, format="PNG"))

        with generation_setup(pipe, sampling["sampler"], sampling.get("precision", "no")):
            made, failed = _generate_shared(pipe, prompt, todo, resolution, seed, sampling, batch_size, procs, write)
        if procs.is_main and not failed:
            info = {"prompt": prompt, "count": count, "seed": seed, **sampling}
            (folder / "info.json").write_text(json.dumps(info))
        procs.barrier()  # the cache is complete on disk before any rank moves on
        if failed:
            raise InputError(
                f"{len(failed)} class images for {prompt!r} came out black {MAX_BLACK_RETRIES + 1} times; "
                "the model may be producing NaNs (try fp32) or the prompt is filtered. Pass your own class_images."
            )
    return [made[i] if i in made else _read(path, Image) for i, path in enumerate(paths)]


def _generate_shared(
    pipe: DiffusionPipeline,
    prompt: str,
    todo: list[int],
    resolution: int,
    seed: int,
    sampling: dict[str, Any],
    batch_size: int,
    procs: Processes,
    write: Callable[[int, Image.Image], None] | None,
) -> tuple[dict[int, Image.Image], list[int]]:
    """Generate images `todo`, each rank its share; every rank gets every good image.

    `write` (main process only) stores each image as it arrives. Returns the images and the indices
    still black after the retries (both the same on every rank).
    """
    made: dict[int, Image.Image] = {}
    for attempt in range(MAX_BLACK_RETRIES + 1):
        mine = procs.share(todo)
        logger.debug("process %d of %d: class images %s (attempt %d)", procs.rank, procs.world, mine, attempt)
        seeds = [image_seed(seed, i, attempt) for i in mine]
        images = generate_images(
            pipe,
            prompt,
            seeds,
            resolution,
            num_inference_steps=sampling["steps"],
            guidance_scale=sampling["guidance_scale"],
            batch_size=batch_size,
        )
        good = {i: image for i, image in zip(mine, images, strict=True) if not is_black(image)}
        largest_share = math.ceil(len(todo) / procs.world)
        for index, image in sorted(procs.gather_images(good, largest_share, resolution).items()):
            made[index] = image
            if write is not None:
                write(index, image)
        todo = [i for i in todo if i not in made]
        if not todo:
            break
    return made, todo


def _read(path: Path, image_module: Any) -> Image.Image:
    with image_module.open(path) as handle:
        return handle.convert("RGB")
