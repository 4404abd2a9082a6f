"""The paper's evaluation run: DreamBench prompts in, a `Report` of DINO, CLIP-I, CLIP-T, PRES and DIV out.

For each of the 25 DreamBench prompts (objects or live subjects) `evaluate` renders
`images_per_prompt` images of "a [V] [class] ..." (image i with seed `seed + i`, the same seeds for
every prompt), plus `pres_images` images of the class prompt "a [class]" for PRES. Then:

- DINO, CLIP-I: all generated images vs all real photos (mean pairwise cosine);
- CLIP-T: each image vs its own prompt with the identifier removed ("a dog in the jungle");
- PRES: the class-prompt images vs the real photos, with DINO (lower: less language drift);
- DIV: LPIPS among the images of one prompt, averaged over prompts (needs 2+ images per prompt
  and LPIPS weights; otherwise null).

The report records the models behind every metric, their preprocessing, and the settings, since
numbers from different evaluators are not comparable.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..errors import InputError
from . import metrics
from .dreambench import dreambench_prompts, format_prompt, select_prompts
from .lpips import to_lpips_input

if TYPE_CHECKING:
    from diffusers import DiffusionPipeline
    from PIL import Image

    from ..adapter import Adapter
    from ..data import ImageInput
    from .embedders import Embedders

SHEET_CELL = 256  # contact-sheet thumbnails: at most this many pixels a side
CLASS_PROMPT = "a {0} {1}"


@dataclass
class Report:
    """The result of `evaluate`: the metrics, what they were measured with, and the images.

    Attributes:
        dino (`float`): DINO, generated vs real (higher: more subject fidelity).
        clip_i (`float`): CLIP-I, generated vs real.
        clip_t (`float`): CLIP-T, each image vs its own identifier-free prompt (prompt fidelity).
        pres (`float`): PRES, class-prompt images vs real, DINO (lower: less language drift).
        div (`float | None`): DIV, mean LPIPS within a prompt (higher: more diverse); None without LPIPS.
        clip_t_per_prompt (`dict[str, float]`): CLIP-T of each identifier-free prompt.
        prompts (`list[str]`): the prompts rendered, in sheet-row order.
        models (`dict[str, str | None]`): the model behind each metric, the pipeline, the adapter.
        preprocessing (`dict[str, str]`): how each feature model's inputs were prepared.
        settings (`dict[str, Any]`): class noun, identifier, seeds, steps, counts.
        images (`list[list[PIL.Image.Image]]`): the generations, one list per prompt (not saved in JSON).
        class_images (`list[PIL.Image.Image]`): the class-prompt generations behind PRES.
    """

    dino: float
    clip_i: float
    clip_t: float
    pres: float
    div: float | None
    clip_t_per_prompt: dict[str, float]
    prompts: list[str]
    models: dict[str, str | None]
    preprocessing: dict[str, str]
    settings: dict[str, Any]
    images: list[list[Image.Image]] = field(default_factory=list, repr=False)
    class_images: list[Image.Image] = field(default_factory=list, repr=False)

    def metrics(self) -> dict[str, float | None]:
        """The five headline numbers."""
        return {"dino": self.dino, "clip_i": self.clip_i, "clip_t": self.clip_t, "pres": self.pres, "div": self.div}

    def to_dict(self) -> dict[str, Any]:
        """Everything but the images, JSON-ready (a non-finite number becomes null)."""
        data = {key: value for key, value in asdict(self).items() if key not in ("images", "class_images")}
        return _finite_or_none(data)

    def sheet(self) -> Image.Image:
        """Contact sheet: row i holds prompt i's images; the last row holds class-prompt images (PRES)."""
        from ..generation import grid

        columns = max(len(row) for row in self.images)
        rows = [row + [row[0].copy().point(lambda _: 255)] * (columns - len(row)) for row in self.images]
        if self.class_images:
            rows.append((self.class_images + [self.class_images[0].copy().point(lambda _: 255)] * columns)[:columns])
        return grid([_thumbnail(image) for row in rows for image in row], rows=len(rows))

    def save(self, path_json: str | os.PathLike, path_png: str | os.PathLike) -> tuple[Path, Path]:
        """Write the JSON report and the PNG contact sheet, each atomically; folders are created.

        Example:
            >>> report.save("eval/report.json", "eval/sheet.png")  # doctest: +SKIP
        """
        from ..files import write_atomically

        text = json.dumps(self.to_dict(), indent=2, allow_nan=False) + "\n"
        json_path = write_atomically(path_json, lambda tmp: tmp.write_text(text, encoding="utf-8"))
        sheet = self.sheet()
        png_path = write_atomically(path_png, lambda tmp: sheet.save(tmp, format="PNG"))
        return json_path, png_path


def _thumbnail(image: Image.Image) -> Image.Image:
    if max(image.size) <= SHEET_CELL:
        return image
    small = image.copy()
    small.thumbnail((SHEET_CELL, SHEET_CELL))
    return small


def _finite_or_none(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: _finite_or_none(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_finite_or_none(item) for item in value]
    return value


def evaluate(
    pipe: DiffusionPipeline,
    adapter_or_none: Adapter | None,
    real_images: ImageInput,
    class_noun: str | None,
    *,
    live: bool,
    embedders: Embedders,
    images_per_prompt: int = 4,
    seed: int = 0,
    steps: int = 25,
    guidance_scale: float = 7.5,
    max_prompts: int | None = None,
    pres_images: int = 16,
    progress: Callable[[str], None] | None = None,
) -> Report:
    """Run the DreamBooth paper's evaluation of a (personalized) pipeline on the DreamBench prompts.

    Args:
        pipe (`DiffusionPipeline`): the pipeline, with the adapter already loaded into it.
        adapter_or_none (`Adapter | None`): the loaded adapter (its identifier goes into the prompts);
            None evaluates the base model with the class prompts ("a dog in the jungle").
        real_images (`ImageInput`): the subject's real photos (a folder, paths or PIL images).
        class_noun (`str | None`): the subject's class, e.g. "dog"; None takes the adapter's.
        live (`bool`): use the live-subject prompt list (pets) instead of the object list.
        embedders (`Embedders`): the feature models (`load_embedders()`, or `tiny_embedders()` in tests).
        images_per_prompt (`int`): generations per prompt (the paper: 4).
        seed (`int`): image i of every prompt uses seed `seed + i`.
        steps (`int`): sampler steps.
        guidance_scale (`float`): classifier-free guidance scale.
        max_prompts (`int | None`): evaluate only this many prompts, spread over the list (quick runs).
        pres_images (`int`): class-prompt generations for PRES.
        progress (`Callable[[str], None] | None`): called with a line before each prompt is rendered.

    Returns:
        A `Report`; `report.save("report.json", "sheet.png")` writes it.

    Example:
        >>> from db_adapters.evaluation import evaluate, tiny_embedders
        >>> from db_adapters.testing import tiny_pipeline
        >>> from PIL import Image
        >>> real = [Image.new("RGB", (32, 32), "red")] * 2
        >>> report = evaluate(tiny_pipeline(), None, real, "dog", live=True, embedders=tiny_embedders(),
        ...                   images_per_prompt=2, steps=2, max_prompts=1, pres_images=2)
        >>> sorted(report.metrics())
        ['clip_i', 'clip_t', 'dino', 'div', 'pres']
    """
    from ..binder import validate_class_noun
    from ..data import load_images

    _check_counts(images_per_prompt=images_per_prompt, steps=steps, pres_images=pres_images)
    real = load_images(real_images, name="real_images")
    identifier = adapter_or_none.identifier if adapter_or_none is not None else None
    noun = validate_class_noun(class_noun if class_noun is not None else getattr(adapter_or_none, "class_noun", ""))
    templates = select_prompts(dreambench_prompts(live), max_prompts)
    sampling = {"seed": seed, "steps": steps, "guidance_scale": guidance_scale}

    generated = []
    for number, template in enumerate(templates, start=1):
        prompt = format_prompt(template, identifier, noun)
        if progress is not None:
            progress(f"[{number}/{len(templates)}] {prompt}")
        generated.append(_render(pipe, prompt, images_per_prompt, sampling))
    class_images = _render(pipe, format_prompt(CLASS_PROMPT, None, noun), pres_images, sampling)
    # CLIP-T scores an image against its prompt without the identifier: the rare token means
    # nothing to the evaluation CLIP.
    text_prompts = [format_prompt(template, None, noun) for template in templates]

    scores = _scores(embedders, real, generated, class_images, text_prompts)
    return Report(
        **scores,
        prompts=[format_prompt(template, identifier, noun) for template in templates],
        models={**embedders.model_ids(), "pipeline": _pipeline_id(pipe)},
        preprocessing=embedders.preprocessing(),
        settings={
            "class_noun": noun,
            "identifier": identifier,
            "live": live,
            "prompt_list": "live" if live else "objects",
            "prompts": len(templates),
            "images_per_prompt": images_per_prompt,
            "pres_images": pres_images,
            "real_images": len(real),
            **sampling,
        },
        images=generated,
        class_images=class_images,
    )


def _check_counts(**counts: int) -> None:
    for name, value in counts.items():
        if not isinstance(value, int) or value < 1:
            raise InputError(f"{name} must be a positive integer; got {value!r}.")


def _render(pipe: DiffusionPipeline, prompt: str, count: int, sampling: dict[str, Any]) -> list[Image.Image]:
    from ..generation import render

    return render(pipe, prompt, num_images=count, **sampling)


def _pipeline_id(pipe: DiffusionPipeline) -> str:
    from ..pipelines import model_id

    return model_id(pipe)


def _scores(
    embedders: Embedders,
    real: list[Image.Image],
    generated: list[list[Image.Image]],
    class_images: list[Image.Image],
    text_prompts: list[str],
) -> dict[str, Any]:
    flat = [image for row in generated for image in row]
    counts = torch.tensor([len(row) for row in generated])
    real_dino, real_clip = embedders.dino.embed(real), embedders.clip.embed_images(real)
    generated_clip = embedders.clip.embed_images(flat)
    # One text embedding per image: its own prompt's, so CLIP-T compares matched pairs only.
    texts = embedders.clip.embed_texts(text_prompts).repeat_interleave(counts, dim=0)
    per_prompt = zip(text_prompts, generated_clip.split(counts.tolist()), texts.split(counts.tolist()), strict=True)
    return {
        "dino": metrics.dino_score(embedders.dino.embed(flat), real_dino),
        "clip_i": metrics.clip_i(generated_clip, real_clip),
        "clip_t": metrics.clip_t(generated_clip, texts),
        "pres": metrics.pres(embedders.dino.embed(class_images), real_dino),
        "div": _div(embedders, generated),
        "clip_t_per_prompt": {prompt: metrics.clip_t(images, text) for prompt, images, text in per_prompt},
    }


def _div(embedders: Embedders, generated: list[list[Image.Image]]) -> float | None:
    if embedders.lpips is None or min(len(row) for row in generated) < 2:
        return None
    device = next(embedders.lpips.parameters()).device
    per_prompt = [metrics.div(embedders.lpips.pairwise(to_lpips_input(row).to(device))) for row in generated]
    return sum(per_prompt) / len(per_prompt)
