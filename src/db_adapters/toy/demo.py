"""The whole DreamBooth story on the toy base model, as one PNG sheet a person can judge.

reference photos -> personalize (LoRA, prior preservation) -> "a [V] {class}" samples,
the subject recontextualised in three scenes it was never photographed in, and "a {class}"
before and after (prior preservation should keep it diverse).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import InputError
from .world import ATTRIBUTES, IDENTITY_ATTRIBUTES, SUBJECTS, Subject, subject_caption

if TYPE_CHECKING:
    from diffusers import StableDiffusionPipeline
    from PIL import Image

SAMPLES_PER_ROW = 5
SHEET_SCALE = 4  # 32 px images are drawn 4x larger (nearest neighbour) so a person can see them
LABEL_WIDTH = 260


@dataclass
class DemoResult:
    """Where the demo wrote its files, and how long it took."""

    sheet: Path
    adapter: Path
    identifier: str
    personalize_s: float
    total_s: float
    # How many of the "a [V] {class}" samples the probe reads with each of the subject's attributes
    # right, and with all of them ("identity"), out of `SAMPLES_PER_ROW`.
    subject_read: dict[str, int]


def novel_scenes(subject_name: str, count: int = 3) -> list[str]:
    """Scenes the subject was never photographed in (the recontextualisation prompts)."""
    seen = set(SUBJECTS[subject_name].reference_scenes)
    return [scene for scene in ATTRIBUTES["scene"] if scene not in seen][:count]


def samples(pipe: StableDiffusionPipeline, prompt: str, count: int, steps: int) -> list[Image.Image]:
    from ..generation import render

    return render(pipe, prompt, num_images=count, seed=1000, steps=steps, guidance_scale=4.0)


def read_subject(images: list[Image.Image], subject: Subject) -> dict[str, int]:
    """How many `images` the frozen probe reads with each identity attribute of `subject`, and with all."""
    from .benchmark import matches_identity
    from .probe import load_probe

    reads = load_probe().predict(images)
    counts = {name: sum(r[name] == subject.attributes[name] for r in reads) for name in IDENTITY_ATTRIBUTES}
    return counts | {"identity": sum(matches_identity(r, subject) for r in reads)}


def sheet(rows: list[tuple[str, list[Image.Image]]]) -> Image.Image:
    """Rows of labelled images, scaled up for the eye."""
    from PIL import Image, ImageDraw

    cell = 32 * SHEET_SCALE + 4
    width = LABEL_WIDTH + cell * max(len(images) for _, images in rows)
    canvas = Image.new("RGB", (width, cell * len(rows)), "white")
    draw = ImageDraw.Draw(canvas)
    for r, (label, images) in enumerate(rows):
        draw.text((6, r * cell + cell // 2 - 6), label, fill="black")
        for c, image in enumerate(images):
            big = image.resize((32 * SHEET_SCALE, 32 * SHEET_SCALE), Image.NEAREST)
            canvas.paste(big, (LABEL_WIDTH + c * cell + 2, r * cell + 2))
    return canvas


def run_demo(
    subject: str = "star_box",
    out: str | Path = "runs/demo",
    *,
    pipe: StableDiffusionPipeline | None = None,
    sample_steps: int = 20,
    **personalize_options: Any,
) -> DemoResult:
    """Personalize the toy base model on one toy subject and write `out/demo.png`.

    Args:
        subject (`str`): a name in `db_adapters.toy.SUBJECTS`.
        out (`str | Path`): folder for the sheet, the adapter and the run's files.
        pipe (`StableDiffusionPipeline | None`): default the shipped toy base model.
        sample_steps (`int`): sampler steps per image.
        **personalize_options: passed to `personalize` (e.g. `steps=100`); what they leave out comes
            from the model folder's recommendation, as for any personalization.

    Example:
        >>> from db_adapters.toy.demo import run_demo
        >>> result = run_demo("star_box", "runs/demo")  # doctest: +SKIP
        >>> result.sheet  # doctest: +SKIP
        PosixPath('runs/demo/demo.png')
    """
    from ..adapter import unload_adapter
    from ..api import personalize
    from .base import load_base_pipeline

    if subject not in SUBJECTS:
        raise InputError(f"unknown subject {subject!r}; choose one of: {', '.join(SUBJECTS)}.")
    started = time.perf_counter()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    pipe = pipe if pipe is not None else load_base_pipeline()
    chosen = SUBJECTS[subject]
    cls = chosen.attributes["cls"]
    references = chosen.reference_images()
    class_before = samples(pipe, subject_caption(chosen), SAMPLES_PER_ROW, sample_steps)

    trained_at = time.perf_counter()
    adapter = personalize(pipe, references, cls, output_dir=out / "run", **personalize_options)
    personalize_s = time.perf_counter() - trained_at
    adapter_path = adapter.save(out / f"{subject}.safetensors")

    rows = [(f"reference photos of {subject}", references)]
    identity = samples(pipe, adapter.instance_prompt, SAMPLES_PER_ROW, sample_steps)
    rows.append((f"a [V] {cls}   ([V] = {adapter.identifier})", identity))
    for scene in novel_scenes(subject):
        prompt = subject_caption(chosen, adapter.identifier, scene)
        rows.append((prompt.replace(adapter.identifier, "[V]"), samples(pipe, prompt, SAMPLES_PER_ROW, sample_steps)))
    rows.append((f"a {cls}  (before)", class_before))
    rows.append((f"a {cls}  (after)", samples(pipe, subject_caption(chosen), SAMPLES_PER_ROW, sample_steps)))
    unload_adapter(pipe)
    path = out / "demo.png"
    sheet(rows).save(path)
    total_s = time.perf_counter() - started
    return DemoResult(path, adapter_path, adapter.identifier, personalize_s, total_s, read_subject(identity, chosen))
