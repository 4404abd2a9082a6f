"""Every input db-adapters rejects, one row each, with what the user sees.

`ROWS` is the table. A library row calls the library and expects its error class and a fragment of
the message. A `db-adapt` row runs the command and expects exit code 2, exactly one line of output
(the error, naming the input), no traceback, and, rerun with `--debug`, the same error class raised.
docs/bad_inputs.md shows the same rows in the same order, each with the class and the fragment
(checked below), so the docs and the tests cannot drift apart.

Rows fail before training wherever the library checks cheaply first; the rows that need a trained
adapter or checkpoints share one 1-step run (library) and one 1-step `db-adapt train` (command line).
Damaged adapter files of 30 more kinds are in test_safe_loading.py's DAMAGE table.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click
import pytest
import safetensors.torch
import torch
from click.testing import CliRunner
from conftest import make_subject_images
from PIL import Image
from safetensors import SafetensorError

from db_adapters import AdapterError, InputError, load_adapter, personalize, set_adapter_weights, unload_adapter
from db_adapters.adapter import attached_adapter
from db_adapters.cli import main
from db_adapters.testing import tiny_pipeline, tiny_pipeline_of, tiny_sdxl_pipeline

DOC = Path(__file__).resolve().parents[1] / "docs" / "bad_inputs.md"
# A run that starts by mistake (a row that is not rejected) takes a second, not an hour.
CHEAP = {"steps": 1, "num_class_images": 1, "class_inference_steps": 1, "prior_preservation": False, "progress": False}
ONE_STEP = {**CHEAP, "learning_rate": 1e-3}
# What safetensors' writer raises when the disk fills up (seen on a full tmpfs, safetensors 0.8).
DISK_FULL = "Error while serializing: I/O error: No space left on device (os error 28)"


@dataclass(frozen=True)
class Row:
    """One rejected input: where it is rejected, the error class, and a fragment of the message."""

    name: str
    where: str  # "personalize", "load_adapter", ..., or "db-adapt <command>"
    error: type[BaseException]
    fragment: str
    run: Callable[[Env], Any]  # library: raises; command line: returns the arguments
    after: Callable[[Env], None] | None = None  # checks once the error happened

    @property
    def cli(self) -> bool:
        return self.where.startswith("db-adapt")


class Env:
    """What a row needs: a fresh folder (`tmp`), `monkeypatch`, and any fixture by name (`e.pipe`)."""

    def __init__(self, request: pytest.FixtureRequest, tmp: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        self.request, self.tmp, self.monkeypatch = request, tmp, monkeypatch
        self.state: dict[str, Any] = {}

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        # Fixtures are built on first use, so a row pays only for what it touches.
        return self.request.getfixturevalue(name)


# --- shared pipelines, files and runs ----------------------------------------------------------------


@pytest.fixture(scope="module")
def pipe():
    """A clean tiny pipeline; every row leaves it clean (checked after each row)."""
    return tiny_pipeline()


@pytest.fixture(scope="module")
def vpred_pipe():
    """Another architecture: the SD 2.x-style tiny pipeline."""
    return tiny_pipeline(v_prediction=True)


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict[str, Any]:
    """A 1-step LoRA run with checkpoints, its pipeline (still adapted) and its saved adapter file."""
    root = tmp_path_factory.mktemp("trained")
    run = {"output_dir": root / "run", "checkpoint_every": 1, **ONE_STEP}
    adapted = tiny_pipeline()
    adapter = personalize(adapted, make_subject_images(), "dog", **run)
    return {"pipe": adapted, "adapter": adapter, "file": adapter.save(root / "dog.safetensors"), "run": run}


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory, vpred_pipe) -> dict[str, Path]:
    """Saved pipelines for `--model`: an img2img pipeline and the SD 2.x-style one."""
    from diffusers import StableDiffusionImg2ImgPipeline

    from db_adapters.testing import tiny_components

    root = tmp_path_factory.mktemp("models")
    StableDiffusionImg2ImgPipeline(**tiny_components()).save_pretrained(root / "img2img")
    vpred_pipe.save_pretrained(root / "vpred")
    return {"img2img": root / "img2img", "vpred": root / "vpred"}


@pytest.fixture(scope="module")
def photos_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("photos")
    for i, image in enumerate(make_subject_images()):
        image.save(folder / f"{i}.png")
    return folder


@pytest.fixture(scope="module")
def cli_trained(tiny_dir, photos_dir, tmp_path_factory) -> dict[str, Any]:
    """A 1-step `db-adapt train` with checkpoints: its arguments and its adapter file."""
    root = tmp_path_factory.mktemp("cli")
    args = [*train_args(tiny_dir, photos_dir, root / "dog.safetensors")]
    args += ["--output-dir", str(root / "run"), "--checkpoint-every", "1", "--learning-rate", "1e-3"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    return {"args": args, "file": root / "dog.safetensors"}


# --- helpers the rows share --------------------------------------------------------------------------


def train(e: Env, images: Any = None, class_noun: Any = "dog", *, pipeline: Any = None, **settings: Any) -> None:
    """`personalize` on the clean pipeline with the subject's photos and cheap settings, overridden by `settings`."""
    images = make_subject_images() if images is None else images
    personalize(e.pipe if pipeline is None else pipeline, images, class_noun, **{**CHEAP, **settings})


def folder(e: Env, name: str, files: dict[str, bytes] | None = None) -> Path:
    """A folder in the row's temporary folder, holding `files`."""
    path = e.tmp / name
    path.mkdir()
    for file_name, data in (files or {}).items():
        (path / file_name).write_bytes(data)
    return path


def png_bytes(size: tuple[int, int] = (40, 40)) -> bytes:
    from io import BytesIO

    buffer = BytesIO()
    Image.new("RGB", size, "red").save(buffer, format="PNG")
    return buffer.getvalue()


def truncated_png(e: Env) -> Path:
    data = png_bytes()
    return folder(e, "photos", {"0.png": png_bytes(), "1.png": data[: len(data) // 2]})


def read_only_folder(e: Env) -> Path:
    """A folder the process may not write to; as root (who may write anywhere) `os.access` is told so."""
    locked = folder(e, "locked")
    locked.chmod(0o555)
    if os.access(locked, os.W_OK):
        real = os.access
        e.monkeypatch.setattr(os, "access", lambda p, mode, **kw: False if Path(p) == locked else real(p, mode, **kw))
    return locked


def fill_disk(e: Env) -> None:
    """Make every safetensors write fail midway as on a full disk: half a file written, then the error."""

    def save_file(tensors, filename, metadata=None):
        data = safetensors.torch.save(tensors, metadata=metadata)
        Path(filename).write_bytes(data[: len(data) // 2])
        raise SafetensorError(DISK_FULL)

    e.monkeypatch.setattr(safetensors.torch, "save_file", save_file)


def old_adapter(e: Env, source: Path) -> Path:
    """A copy of a good adapter file in the row's folder, remembered to check it survives."""
    path = e.tmp / "out" / "dog.safetensors"
    path.parent.mkdir()
    shutil.copyfile(source, path)
    e.state["old"] = (path, path.read_bytes())
    return path


def old_adapter_intact(e: Env) -> None:
    path, before = e.state["old"]
    assert path.read_bytes() == before, "the old adapter changed"
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name], "a temporary file was left"


def disk_full_save(e: Env) -> None:
    adapter = e.trained["adapter"]
    path = old_adapter(e, e.trained["file"])
    fill_disk(e)
    adapter.save(path)


def trained_kind(e: Env, strategy: str) -> Any:
    """A 1-step adapter of `strategy` on a fresh tiny pipeline (the shared one stays clean)."""
    return personalize(tiny_pipeline(), make_subject_images(), "dog", strategy=strategy, **CHEAP)


def lycoris_export(e: Env) -> Path:
    return trained_kind(e, "loha").save(e.tmp / "dog_comfyui.safetensors", format="kohya")


def saved_after_unload(e: Env) -> None:
    adapter = load_adapter(e.pipe, e.trained["file"])
    unload_adapter(e.pipe)
    adapter.save(e.tmp / "dog.safetensors")


def users_own_lora(e: Env) -> None:
    from peft import LoraConfig

    styled = tiny_pipeline()
    styled.unet.add_adapter(LoraConfig(r=2, target_modules=["to_q"]), adapter_name="style")
    train(e, pipeline=styled)


def sdxl_refiner(e: Env) -> None:
    from diffusers import StableDiffusionXLImg2ImgPipeline

    from db_adapters.testing import tiny_sdxl_components

    parts = {**tiny_sdxl_components(), "text_encoder": None, "tokenizer": None}
    train(e, pipeline=StableDiffusionXLImg2ImgPipeline(**parts, requires_aesthetics_score=True))


def half_pipeline_without_autocast(e: Env) -> None:
    import torch

    train(e, pipeline=tiny_pipeline().to(dtype=torch.bfloat16), mixed_precision="no")


def img2img(e: Env) -> None:
    from diffusers import StableDiffusionImg2ImgPipeline

    from db_adapters.testing import tiny_components

    train(e, pipeline=StableDiffusionImg2ImgPipeline(**tiny_components()))


def adapter_file(e: Env, name: str, data: bytes) -> Path:
    path = e.tmp / name
    path.write_bytes(data)
    return path


def foreign_safetensors(e: Env) -> Path:
    path = e.tmp / "other.safetensors"
    safetensors.torch.save_file({"unet.weight": torch.zeros(2)}, str(path))
    return path


def resume_changed(e: Env) -> None:
    train(e, **{**e.trained["run"], "resume": True, "learning_rate": 2e-3})


def fresh_run_over_checkpoints(e: Env) -> None:
    train(e, **e.trained["run"])


def run_demo(e: Env) -> None:
    from db_adapters.toy.demo import run_demo as demo

    demo("unicorn", e.tmp / "demo")


def train_args(model: Path, images: Path | None, output: Path, *extra: str) -> list[str]:
    """`db-adapt train` with cheap settings; `extra` options come last, so they override."""
    args = ["train", "--model", str(model), "--class-noun", "dog", "--output", str(output)]
    args += ["--images", str(images)] if images is not None else []
    return [*args, "--steps", "1", "--no-prior-preservation", "--num-class-images", "1", *extra]


def cli_train(e: Env, *extra: str, images: Path | None | str = "photos") -> list[str]:
    return train_args(e.tiny_dir, e.photos_dir if images == "photos" else images, e.tmp / "dog.safetensors", *extra)


def cli_generate(e: Env, *extra: str, model: Path | None = None) -> list[str]:
    args = ["generate", "--model", str(model or e.tiny_dir), "--prompt", "a {id} dog", "--steps", "1"]
    return [*args, "--output", str(e.tmp / "grid.png"), *extra]


def cli_eval(e: Env, *extra: str) -> list[str]:
    args = ["eval", "--model", str(e.tiny_dir), "--images", str(e.photos_dir), "--class-noun", "dog"]
    return [*args, "--output", str(e.tmp / "report"), *extra]


def cli_resume_changed(e: Env) -> list[str]:
    return [*e.cli_trained["args"], "--resume", "--learning-rate", "2e-3", "--output", str(e.tmp / "b.safetensors")]


def cli_disk_full(e: Env) -> list[str]:
    path = old_adapter(e, e.cli_trained["file"])
    fill_disk(e)
    return cli_train(e, "--output", str(path))


def not_an_image(e: Env) -> Path:
    return adapter_file(e, "notes.png", b"shopping list: milk, eggs")


def truncated_adapter(e: Env) -> Path:
    return adapter_file(e, "cut.safetensors", e.trained["file"].read_bytes()[:-100])


PHOTO = Image.new("RGB", (40, 40), "red")

# --- the table ---------------------------------------------------------------------------------------

ROWS = [
    # Subject images (personalize's `images`).
    Row("images: folder missing", "personalize", InputError, "does not exist; pass a folder of images",
        lambda e: train(e, e.tmp / "nowhere")),
    Row("images: folder empty", "personalize", InputError, "has no images", lambda e: train(e, folder(e, "empty"))),
    Row("images: folder of non-image files", "personalize", InputError, "has no images",
        lambda e: train(e, folder(e, "docs", {"notes.txt": b"hi", "data.csv": b"1,2"}))),
    Row("images: a file that is not an image", "personalize", InputError, "is not a readable image",
        lambda e: train(e, not_an_image(e))),
    Row("images: a truncated image", "personalize", InputError, "is not a readable image",
        lambda e: train(e, truncated_png(e))),
    Row("images: empty list", "personalize", InputError, "images: the list is empty", lambda e: train(e, [])),
    Row("images: list holding a number", "personalize", InputError, "images[1]: got a int",
        lambda e: train(e, [PHOTO, 5])),
    Row("images: list holding a folder", "personalize", InputError, "is a folder; pass the folder itself",
        lambda e: train(e, [folder(e, "nested")])),
    Row("images: neither a path nor a list", "personalize", InputError, "images: got a dict",
        lambda e: train(e, {"a": PHOTO})),
    Row("images: a 0-pixel image", "personalize", InputError, "is 0x0 px, empty",
        lambda e: train(e, [PHOTO, Image.new("RGB", (0, 0))])),
    Row("images: a tiny image", "personalize", InputError, "images[1] is 3x3 px, too small to train at resolution 32",
        lambda e: train(e, [PHOTO, Image.new("RGB", (3, 3))])),
    Row("images: a pixel mode with no RGB", "personalize", InputError, "cannot be converted to RGB",
        lambda e: train(e, [Image.new("La", (40, 40))])),
    # Class noun and identifier.
    Row("class noun: empty", "personalize", InputError, "class noun ' ' is empty", lambda e: train(e, class_noun=" ")),
    Row("class noun: not text", "personalize", InputError, "class noun 3 is empty", lambda e: train(e, class_noun=3)),
    Row("identifier: empty", "personalize", InputError, "identifier '' is empty", lambda e: train(e, identifier="")),
    Row("identifier: several tokens, strict", "personalize", InputError, "is split into 2 tokens",
        lambda e: train(e, identifier="sks", strict=True)),
    Row("identifier: an English word, strict", "personalize", InputError, "is a common English word",
        lambda e: train(e, identifier="cat", strict=True)),
    # Settings.
    Row("resolution: not a multiple of 8", "personalize", InputError, "resolution must be a positive multiple of 8",
        lambda e: train(e, resolution=30)),
    Row("steps: 0", "personalize", InputError, "steps=0 must be a positive integer", lambda e: train(e, steps=0)),
    Row("steps: not an integer", "personalize", InputError, "steps=2.5 must be a positive integer",
        lambda e: train(e, steps=2.5)),
    Row("learning rate: 0", "personalize", InputError, "learning_rate=0 must be a positive number",
        lambda e: train(e, learning_rate=0)),
    Row("learning rate: NaN", "personalize", InputError, "learning_rate=nan must be a positive number",
        lambda e: train(e, learning_rate=float("nan"))),
    Row("batch size: 0", "personalize", InputError, "batch_size=0 must be a positive integer",
        lambda e: train(e, batch_size=0)),
    Row("gradient accumulation: 0", "personalize", InputError, "gradient_accumulation_steps=0 must be a positive",
        lambda e: train(e, gradient_accumulation_steps=0)),
    Row("class images: count 0", "personalize", InputError, "num_class_images=0 must be a positive integer",
        lambda e: train(e, num_class_images=0)),
    Row("prior loss weight: negative", "personalize", InputError, "prior_loss_weight=-1.0 must be >= 0",
        lambda e: train(e, prior_loss_weight=-1.0)),
    Row("seed: negative", "personalize", InputError, "seed=-1 must be an integer >= 0", lambda e: train(e, seed=-1)),
    Row("mixed precision: unknown", "personalize", InputError, "mixed_precision='fp8' is not one of",
        lambda e: train(e, mixed_precision="fp8")),
    Row("lr scheduler: unknown", "personalize", InputError, "lr_scheduler='warm' is not one of",
        lambda e: train(e, lr_scheduler="warm")),
    Row("class sampler: unknown", "personalize", InputError, "class_sampler='magic' is not one of",
        lambda e: train(e, class_sampler="magic")),
    Row("strategy: unknown", "personalize", InputError, "unknown strategy 'nope'", lambda e: train(e, strategy="nope")),
    Row("strategy: option of another strategy", "personalize", InputError, "rank do not belong to strategy 'full'",
        lambda e: train(e, strategy="full", rank=4)),
    Row("strategy: misspelt option", "personalize", InputError, "stpes do not belong to strategy 'lora'",
        lambda e: train(e, stpes=5)),
    Row("LoRA rank: 0", "personalize", InputError, "rank=0 must be a positive integer", lambda e: train(e, rank=0)),
    Row("LoRA dropout: 1", "personalize", InputError, "dropout=1.0 must be in [0, 1)",
        lambda e: train(e, dropout=1.0)),
    Row("previews: validation_every without prompts", "personalize", InputError, "validation_prompts is empty",
        lambda e: train(e, validation_every=1, output_dir=e.tmp)),
    Row("previews: validation_every without output_dir", "personalize", InputError, "validation_every needs output_dir",
        lambda e: train(e, validation_every=1, validation_prompts=["a {id} dog"])),
    Row("class images: folder missing", "personalize", InputError, "class_images: ",
        lambda e: train(e, class_images=e.tmp / "nowhere", prior_preservation=True, class_image_dir=e.tmp / "c")),
    # Checkpoints and resume.
    Row("checkpoints: checkpoint_every without output_dir", "personalize", InputError,
        "checkpoint_every needs output_dir", lambda e: train(e, checkpoint_every=1)),
    Row("checkpoints: resume without output_dir", "personalize", InputError, "resume needs output_dir",
        lambda e: train(e, resume=True)),
    Row("checkpoints: keep 0", "personalize", InputError, "keep_checkpoints=0 must be a positive integer",
        lambda e: train(e, keep_checkpoints=0, output_dir=e.tmp)),
    Row("checkpoints: resume with changed settings", "personalize", InputError,
        "learning_rate: checkpoint 0.001, now 0.002", resume_changed),
    Row("checkpoints: fresh run over a run's checkpoints", "personalize", InputError, "already holds checkpoints",
        fresh_run_over_checkpoints),
    # Pipelines.
    Row("pipeline: unsupported kind", "personalize", InputError, "StableDiffusionImg2ImgPipeline is not supported",
        img2img),
    Row("pipeline: SDXL refiner", "personalize", InputError, "StableDiffusionXLImg2ImgPipeline is not supported",
        sdxl_refiner),
    Row("pipeline: half precision, other mixed_precision", "personalize", InputError,
        "mixed_precision='no' cannot train a pipeline loaded in bfloat16", half_pipeline_without_autocast),
    Row("settings: quantize_base without a GPU", "personalize", InputError, "quantize_base='nf4' needs a CUDA GPU",
        lambda e: train(e, quantize_base="nf4")),
    Row("settings: full fine-tune of a quantized base", "personalize", InputError,
        "strategy='full' cannot train a quantized base", lambda e: train(e, strategy="full", quantize_base="nf4")),
    Row("settings: snr_gamma on a flow-matching model", "personalize", InputError, "snr_gamma=5.0 applies to DDPM",
        lambda e: train(e, pipeline=tiny_pipeline_of("flux"), snr_gamma=5.0)),
    Row("pipeline: already carries an adapter", "personalize", AdapterError, "already carries the adapter",
        lambda e: train(e, pipeline=e.trained["pipe"])),
    Row("pipeline: carries the user's own LoRA", "personalize", AdapterError, "already carries LoRA layers (style)",
        users_own_lora),
    # Saving.
    Row("output: not .safetensors", "Adapter.save", InputError, "must end in .safetensors",
        lambda e: e.trained["adapter"].save(e.tmp / "dog.pt")),
    Row("output: a folder", "Adapter.save", InputError, "is a folder; give a file name",
        lambda e: e.trained["adapter"].save(folder(e, "dog.safetensors"))),
    Row("output: folder not writable", "Adapter.save", InputError, "is not writable",
        lambda e: e.trained["adapter"].save(read_only_folder(e) / "dog.safetensors")),
    Row("output: folder is a file", "Adapter.save", InputError, "is not a folder",
        lambda e: e.trained["adapter"].save(adapter_file(e, "notes", b"x") / "dog.safetensors")),
    Row("output: disk full", "Adapter.save", OSError, "No space left on device; free some space",
        disk_full_save, after=old_adapter_intact),
    Row("output: unknown dtype", "Adapter.save", AdapterError, "dtype 'int8' is not supported",
        lambda e: e.trained["adapter"].save(e.tmp / "dog.safetensors", dtype="int8")),
    Row("output: adapter unloaded", "Adapter.save", AdapterError, "no longer attached", saved_after_unload),
    Row("output: oft adapter in kohya format", "Adapter.save", AdapterError, "cannot be written as LyCORIS keys",
        lambda e: trained_kind(e, "oft").save(e.tmp / "oft_comfyui.safetensors", format="kohya")),
    # Loading.
    Row("adapter: pickle file (.pt)", "load_adapter", AdapterError, "loads only safetensors",
        lambda e: load_adapter(e.pipe, adapter_file(e, "dog.pt", b"\x80\x04pickle"))),
    Row("adapter: pickle file (.bin)", "load_adapter", AdapterError, "loads only safetensors",
        lambda e: load_adapter(e.pipe, adapter_file(e, "pytorch_lora_weights.bin", b"\x80\x04pickle"))),
    Row("adapter: truncated", "load_adapter", AdapterError, "is not a valid safetensors file",
        lambda e: load_adapter(e.pipe, truncated_adapter(e))),
    Row("adapter: another architecture", "load_adapter", AdapterError, "was trained on another architecture",
        lambda e: load_adapter(e.vpred_pipe, e.trained["file"])),
    Row("adapter: another model family", "load_adapter", AdapterError, "was trained on a 'sd' model",
        lambda e: load_adapter(tiny_sdxl_pipeline(), e.trained["file"])),
    Row("adapter: not saved by db-adapters", "load_adapter", AdapterError, "has no db-adapters metadata",
        lambda e: load_adapter(e.pipe, foreign_safetensors(e))),
    Row("adapter: file missing", "load_adapter", FileNotFoundError, "adapter file does not exist",
        lambda e: load_adapter(e.pipe, e.tmp / "none.safetensors")),
    Row("adapter: a folder", "load_adapter", IsADirectoryError, "is a folder; pass the adapter's",
        lambda e: load_adapter(e.pipe, folder(e, "dog.safetensors"))),
    Row("adapter: name already in use", "load_adapter", AdapterError, "already carries an adapter named 'dreambooth'",
        lambda e: load_adapter(e.trained["pipe"], e.trained["file"], name="dreambooth")),
    Row("adapter: name with other characters", "load_adapter", InputError, "use letters, digits, '_' and '-' only",
        lambda e: load_adapter(e.pipe, e.trained["file"], name="my dog")),
    Row("weights: no such adapter", "set_adapter_weights", AdapterError, "carries no adapter named 'cat'",
        lambda e: set_adapter_weights(e.trained["pipe"], {"cat": 0.5})),
    Row("weights: not a number", "set_adapter_weights", InputError, "give a finite number",
        lambda e: set_adapter_weights(e.trained["pipe"], {"dreambooth": "strong"})),
    Row("unload: nothing loaded", "unload_adapter", AdapterError, "carries no db-adapters adapter",
        lambda e: unload_adapter(e.pipe)),
    Row("unload: no such adapter", "unload_adapter", AdapterError, "carries no adapter named 'cat'",
        lambda e: unload_adapter(e.trained["pipe"], "cat")),
    Row("toy demo: unknown subject", "run_demo", InputError, "unknown subject 'unicorn'", run_demo),
    # The command line.
    Row("train: --images not given", "db-adapt train", InputError, "give --images and --class-noun",
        lambda e: cli_train(e, images=None)),
    Row("train: --images folder missing", "db-adapt train", InputError, "does not exist",
        lambda e: cli_train(e, "--images", str(e.tmp / "nowhere"))),
    Row("train: --images folder empty", "db-adapt train", InputError, "has no images",
        lambda e: cli_train(e, "--images", str(folder(e, "empty")))),
    Row("train: --images holds a broken image", "db-adapt train", InputError, "1.png is not a readable image",
        lambda e: cli_train(e, "--images", str(truncated_png(e)))),
    Row("train: --class-noun empty", "db-adapt train", InputError, "class noun ' ' is empty",
        lambda e: cli_train(e, "--class-noun", " ")),
    Row("train: --output not .safetensors", "db-adapt train", InputError, "must end in .safetensors",
        lambda e: cli_train(e, "--output", str(e.tmp / "dog.pt"))),
    Row("train: --output a folder", "db-adapt train", click.UsageError, "is a directory",
        lambda e: cli_train(e, "--output", str(folder(e, "dog.safetensors")))),
    Row("train: --output folder not writable", "db-adapt train", InputError, "is not writable",
        lambda e: cli_train(e, "--output", str(read_only_folder(e) / "dog.safetensors"))),
    Row("train: --model folder missing", "db-adapt train", InputError, "could not be loaded: no such folder",
        lambda e: cli_train(e, "--model", str(e.tmp / "no-model"))),
    Row("train: --model not a pipeline folder", "db-adapt train", InputError, "it has no model_index.json",
        lambda e: cli_train(e, "--model", str(folder(e, "empty")))),
    Row("train: --model of an unsupported kind", "db-adapt train", InputError, "Img2ImgPipeline is not supported",
        lambda e: cli_train(e, "--model", str(e.model_dirs["img2img"]))),
    Row("train: --device unknown", "db-adapt train", InputError, "--device 'toaster' cannot be used",
        lambda e: cli_train(e, "--device", "toaster")),
    Row("train: --strategy unknown", "db-adapt train", InputError, "unknown strategy 'nope'",
        lambda e: cli_train(e, "--strategy", "nope")),
    Row("train: --rank with --strategy full", "db-adapt train", InputError, "do not belong to strategy 'full'",
        lambda e: cli_train(e, "--strategy", "full", "--rank", "4")),
    Row("train: --steps 0", "db-adapt train", InputError, "steps=0 must be a positive integer",
        lambda e: cli_train(e, "--steps", "0")),
    Row("train: --steps not a number", "db-adapt train", click.UsageError, "Invalid value for '--steps'",
        lambda e: cli_train(e, "--steps", "many")),
    Row("train: --learning-rate negative", "db-adapt train", InputError, "learning_rate=-0.001 must be a positive",
        lambda e: cli_train(e, "--learning-rate=-1e-3")),
    Row("train: --resolution not a multiple of 8", "db-adapt train", InputError, "positive multiple of 8",
        lambda e: cli_train(e, "--resolution", "30")),
    Row("train: --mixed-precision unknown", "db-adapt train", click.UsageError, "Invalid value for '--mixed-precision'",
        lambda e: cli_train(e, "--mixed-precision", "fp8")),
    Row("train: --identifier of several tokens, --strict", "db-adapt train", InputError, "is split into 2 tokens",
        lambda e: cli_train(e, "--identifier", "sks", "--strict")),
    Row("train: misspelt option", "db-adapt train", click.UsageError, "No such option '--stpes'",
        lambda e: cli_train(e, "--stpes", "5")),
    Row("train: --checkpoint-every without --output-dir", "db-adapt train", InputError,
        "checkpoint_every needs output_dir", lambda e: cli_train(e, "--checkpoint-every", "1")),
    Row("train: --resume with changed settings", "db-adapt train", InputError,
        "learning_rate: checkpoint 0.001, now 0.002", cli_resume_changed),
    Row("train: disk full", "db-adapt train", OSError, "No space left on device; free some space", cli_disk_full,
        after=old_adapter_intact),
    Row("generate: --output not .png", "db-adapt generate", InputError, "must end in .png",
        lambda e: [*cli_generate(e), "--output", str(e.tmp / "grid.jpg")]),
    Row("generate: --num-images 0", "db-adapt generate", InputError, "--num-images and --steps must be positive",
        lambda e: cli_generate(e, "--num-images", "0")),
    Row("generate: {id} without --adapter", "db-adapt generate", InputError, 'uses "{id}" but no --adapter',
        lambda e: cli_generate(e)),
    Row("generate: --weight count", "db-adapt generate", InputError, "give one --weight per --adapter",
        lambda e: cli_generate(e, "--weight", "0.5")),
    Row("generate: --adapter a pickle", "db-adapt generate", AdapterError, "loads only safetensors",
        lambda e: cli_generate(e, "--adapter", str(adapter_file(e, "dog.bin", b"\x80\x04pickle")))),
    Row("generate: --adapter for another architecture", "db-adapt generate", AdapterError, "another architecture",
        lambda e: cli_generate(e, "--adapter", str(e.cli_trained["file"]), model=e.model_dirs["vpred"])),
    Row("generate: --adapter a LyCORIS kohya file", "db-adapt generate", AdapterError, "a file for ComfyUI and A1111",
        lambda e: cli_generate(e, "--adapter", str(lycoris_export(e)))),
    Row("inspect: truncated adapter", "db-adapt inspect", AdapterError, "is not a valid safetensors file",
        lambda e: ["inspect", str(truncated_adapter(e))]),
    Row("eval: --output a file", "db-adapt eval", click.UsageError, "report.json' is a file",
        lambda e: [*cli_eval(e), "--output", str(adapter_file(e, "report.json", b"{}"))]),
    Row("eval: --dino-model folder missing", "db-adapt eval", InputError, "the DINO model folder",
        lambda e: cli_eval(e, "--dino-model", str(e.tmp / "no-dino"))),
    Row("demo: --subject unknown", "db-adapt demo", InputError, "--subject 'unicorn' is not a toy subject",
        lambda e: ["demo", "--subject", "unicorn", "--out", str(e.tmp / "demo")]),
    Row("db-adapt: unknown command", "db-adapt", click.UsageError, "No such command 'trian'", lambda e: ["trian"]),
]  # fmt: skip


# --- the tests ---------------------------------------------------------------------------------------


@pytest.fixture
def env(request, tmp_path, monkeypatch):
    yield Env(request, tmp_path, monkeypatch)
    # A row that was not rejected would have trained the shared pipeline: take that out for the next rows.
    shared = request.getfixturevalue("pipe")
    if attached_adapter(shared) is not None:
        unload_adapter(shared)
        pytest.fail("the shared pipeline was left with an adapter")


@pytest.mark.parametrize("row", ROWS, ids=[row.name for row in ROWS])
def test_bad_input_is_rejected_by_name(row: Row, env: Env) -> None:
    if row.cli:
        _check_command_line(row, env)
    else:
        with pytest.raises(row.error) as caught:
            row.run(env)
        assert row.fragment in str(caught.value), f"{row.fragment!r} not in {str(caught.value)!r}"
    if row.after is not None:
        row.after(env)


def _check_command_line(row: Row, env: Env) -> None:
    args = row.run(env)
    result = CliRunner().invoke(main, args)
    # A row that fails after training (disk full) also shows the training's progress bar before the error.
    lines = [line for line in result.output.splitlines() if line.strip() and not line.startswith("personalize")]
    assert result.exit_code == 2, result.output
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    assert row.fragment in lines[0], f"{row.fragment!r} not in {lines[0]!r}"
    assert "Traceback" not in result.output
    if not issubclass(row.error, click.UsageError):
        # --debug raises the error itself: its class is the one the table names.
        debug = CliRunner().invoke(main, ["--debug", *args])
        assert isinstance(debug.exception, row.error), repr(debug.exception)


def test_enough_rows_and_unique_names() -> None:
    names = [row.name for row in ROWS]
    assert len(names) == len(set(names))
    assert len(ROWS) >= 35


def doc_rows() -> list[list[str]]:
    """The cells of every table row in docs/bad_inputs.md (header and separator lines left out)."""
    rows = []
    for line in DOC.read_text(encoding="utf-8").splitlines():
        if not line.startswith("| ") or line.startswith(("| input |", "|---")):
            continue
        rows.append([cell.strip() for cell in re.split(r"(?<!\\)\|", line.strip())[1:-1]])
    return rows


def test_docs_table_has_the_same_rows() -> None:
    documented = doc_rows()
    assert [cells[0] for cells in documented] == [row.name for row in ROWS]
    for cells, row in zip(documented, ROWS, strict=True):
        name, where, sees = cells[:3]
        assert where == f"`{row.where}`", name
        assert f"`{row.error.__name__}`" in sees, f"{name}: the docs do not name {row.error.__name__}"
        assert row.fragment.replace("|", "\\|") in sees, f"{name}: the docs do not quote {row.fragment!r}"


def test_disk_full_on_a_real_small_file_system(trained, tmp_path) -> None:
    """The "disk full" rows' stand-in matches a real full disk: a 256 KiB tmpfs, where mounting is allowed."""
    small = tmp_path / "small"
    small.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(small)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        path = trained["adapter"].save(small / "dog.safetensors")
        before = path.read_bytes()
        _fill(small / "filler")
        with pytest.raises(OSError) as caught:
            trained["adapter"].save(path)
        assert caught.value.errno == errno.ENOSPC and caught.value.filename == str(path), repr(caught.value)
        assert "No space left on device; free some space" in str(caught.value)
        assert path.read_bytes() == before
        assert sorted(os.listdir(small)) == ["dog.safetensors", "filler"]
    finally:
        subprocess.run(["umount", str(small)], capture_output=True)


def _fill(path: Path) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT)
    try:
        while os.write(fd, bytes(4096)):
            pass
    except OSError as error:
        assert error.errno == errno.ENOSPC
    finally:
        os.close(fd)
