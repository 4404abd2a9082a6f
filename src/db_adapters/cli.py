"""`db-adapt`: the command line. Thin: it parses, calls the library, and turns errors into one line.

Every error db-adapters raises on purpose (`DbAdaptersError`), and file-system errors, become one
line on stderr naming the input and what to do, with exit code 2; `--debug` shows the traceback.
"""

from __future__ import annotations

import json
import os
import sys
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import wraps
from pathlib import Path
from typing import Any

import click

from .errors import DbAdaptersError, InputError

EXIT_BAD_INPUT = 2


def _fail(message: str, code: int = EXIT_BAD_INPUT) -> None:
    click.echo(f"Error: {message}", err=True)
    sys.exit(code)


def friendly_errors(command: Callable[..., Any]) -> Callable[..., Any]:
    """Run a command, turning expected errors into one line and an exit code instead of a traceback."""

    @wraps(command)
    def run(*args: Any, **kwargs: Any) -> Any:
        debug = click.get_current_context().find_root().params.get("debug", False)
        try:
            return command(*args, **kwargs)
        except (DbAdaptersError, OSError) as error:
            if debug:
                raise
            _fail(_one_line(error))
        except KeyboardInterrupt:
            _fail("interrupted; the adapter was not saved (checkpoints in --output-dir stay; --resume).", code=130)
        except Exception as error:  # a bug of ours: still one line, the traceback on request
            if debug:
                raise
            _fail(
                f"unexpected {type(error).__name__}: {_one_line(error)} (rerun with --debug for details)",
                code=1,
            )

    return run


def _one_line(error: BaseException) -> str:
    if isinstance(error, OSError) and error.filename:
        return f"{error.strerror or error} : {error.filename!r}"
    text = " ".join(str(error).split())
    return text or type(error).__name__


DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
_DTYPE_HELP = "Load the model in this dtype (fp16/bf16 halve its memory; training then autocasts to match)."


def load_pipeline(model: str, device: str | None, dtype: str = "fp32") -> Any:
    """Load a diffusers pipeline from a local folder or hub id (safetensors only) onto `device`, in `dtype`."""
    import diffusers.utils.logging
    import torch
    import transformers.utils.logging
    from diffusers import DiffusionPipeline

    from .distributed import training_device
    from .pipelines import check_supported

    transformers.utils.logging.disable_progress_bar()
    diffusers.utils.logging.disable_progress_bar()

    if not model:
        raise InputError("--model is required: a local diffusers folder or a hub id.")
    local = Path(model)
    if not local.exists() and (local.is_absolute() or model.startswith((".", "~")) or model.count("/") > 1):
        # A hub id is "owner/name"; anything else that looks like a path is a folder that is not there.
        raise InputError(
            f"--model {model!r} could not be loaded: no such folder; pass a local diffusers folder or a hub id "
            "(owner/name)."
        )
    if local.exists() and not (local / "model_index.json").is_file():
        raise InputError(f"--model {model!r} is not a diffusers pipeline folder (it has no model_index.json).")
    try:
        # use_safetensors=True: never unpickle weights; a .bin-only model is refused.
        pipe = DiffusionPipeline.from_pretrained(
            model, use_safetensors=True, safety_checker=None, dtype=getattr(torch, DTYPES[dtype])
        )
    except (OSError, ValueError) as error:
        raise InputError(
            f"--model {model!r} could not be loaded ({_one_line(error)[:200]}); pass a local diffusers folder, "
            "or a hub id with network access or a filled hub cache."
        ) from None
    check_supported(pipe)
    device = device or str(training_device())  # each launched process its own GPU
    try:
        pipe.to(torch.device(device))
    except (RuntimeError, AssertionError) as error:
        raise InputError(f"--device {device!r} cannot be used ({_one_line(error)[:120]}).") from None
    pipe.set_progress_bar_config(disable=True)
    return pipe


# `db-adapt` alone shows the help through this usage error (click >= 8.2); it stays as click prints it.
_SHOWS_HELP = (getattr(click.exceptions, "NoArgsIsHelpError", ()),)


@contextmanager
def _one_line_usage_errors() -> Iterator[None]:
    try:
        yield
    except click.UsageError as error:
        if error.ctx is None or isinstance(error, _SHOWS_HELP):
            raise
        hint = f" (see '{error.ctx.command_path} --help')"
        raise click.UsageError(" ".join(error.format_message().split()) + hint) from None


class OneLineUsageGroup(click.Group):
    """A command group whose usage errors (a missing or malformed option) are one line, like every other error.

    Click prints a usage error as the usage text, a hint and the error on three lines; here it is
    `Error: Missing option '--images'. (see 'db-adapt train --help')`, with the same exit code 2.
    """

    def make_context(self, *args: Any, **kwargs: Any) -> click.Context:
        with _one_line_usage_errors():
            return super().make_context(*args, **kwargs)

    def invoke(self, ctx: click.Context) -> Any:
        # A sub-command parses its options inside the group's invoke, so its usage errors pass here.
        with _one_line_usage_errors():
            return super().invoke(ctx)


@click.group(cls=OneLineUsageGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("--debug", is_flag=True, help="Show full tracebacks on errors.")
@click.version_option(package_name="db-adapters")
def main(debug: bool) -> None:
    """DreamBooth personalization for diffusers pipelines."""
    quiet_libraries()


def quiet_libraries() -> None:
    """Keep transformers' and diffusers' info chatter and loading bars off a command's output."""
    import logging

    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    # bitsandbytes (imported by peft) warns on CPUs that an optional `kernels` package is missing: nothing
    # a user of db-adapt can act on.
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    warnings.formatwarning = _one_line_warning


def _one_line_warning(message, category, filename, lineno, line=None) -> str:  # noqa: ANN001 - warnings' hook
    # Our warnings are meant for the person at the shell: no source file and line number.
    return f"Warning: {message}\n"


def _settings_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """Add one option per training setting and strategy option, with the help text written beside its field."""
    from dataclasses import fields

    from .config import TrainConfig
    from .strategies import available_strategies, get_strategy

    specs = [spec for spec in fields(TrainConfig) if spec.metadata.get("cli", True)]
    seen = {spec.name for spec in specs}
    for name in available_strategies():
        for spec in fields(get_strategy(name).Options):
            if spec.name not in seen and spec.metadata.get("cli", True):  # a shared option (rank) is offered once
                seen.add(spec.name)
                specs.append(spec)
    for spec in reversed(specs):
        command = click.option(*_option_declaration(spec), **_option_settings(spec))(command)
    return command


def _option_declaration(spec: Any) -> list[str]:
    flag = spec.metadata.get("flag") or "--" + spec.name.replace("_", "-")
    if _base_type(spec) == "bool" and spec.default is not False:  # on/off, and None (unset) when neither
        return [f"{flag}/--no-{flag.removeprefix('--')}", spec.name]
    return [flag, spec.name]


def _option_settings(spec: Any) -> dict[str, Any]:
    from .config import help_text

    kind = _base_type(spec)
    settings: dict[str, Any] = {"help": help_text(spec), "default": None}
    if kind == "bool":
        settings.update(default=spec.default, is_flag=True)
    elif spec.metadata.get("choices"):
        settings["type"] = click.Choice(list(spec.metadata["choices"]))
    elif kind.startswith("tuple["):
        settings["multiple"] = True
    elif kind in ("int", "float"):
        settings["type"] = {"int": int, "float": float}[kind]
    return settings


def _base_type(spec: Any) -> str:
    # Annotations are strings here (postponed evaluation); "int | None" -> "int".
    parts = [part.strip() for part in str(spec.type).split("|") if part.strip() != "None"]
    return parts[0] if parts else "str"


@main.command()
@click.option("--model", default=None, help="Local diffusers folder or hub id (default: the shipped toy base model).")
@click.option("--images", default=None, help="Folder of 3-5 photos of the subject.")
@click.option("--class-noun", default=None, help='The subject\'s class, e.g. "dog".')
@click.option(
    "--subject",
    "subjects",
    multiple=True,
    metavar="FOLDER:NOUN[:IDENTIFIER]",
    help="One subject of several trained into one adapter (repeat it; instead of --images/--class-noun).",
)
@click.option("--output", required=True, type=click.Path(dir_okay=False), help="Adapter file (.safetensors).")
@click.option("--strategy", default="lora", show_default=True, help="Registered strategy: lora, full, ...")
@click.option("--class-images", default=None, help="Folder of your own class images (topped up if too few).")
@click.option("--save-dtype", type=click.Choice(["fp32", "fp16", "bf16"]), default="fp32", show_default=True)
@click.option("--dtype", type=click.Choice(list(DTYPES)), default="fp32", show_default=True, help=_DTYPE_HELP)
@click.option("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda when available).")
@_settings_options
@friendly_errors
def train(
    model: str,
    images: str | None,
    class_noun: str | None,
    subjects: tuple[str, ...],
    output: str,
    class_images: str | None,
    device: str | None,
    dtype: str,
    save_dtype: str,
    **settings: Any,
) -> None:
    """Personalize a pipeline on a folder of subject photos and save the adapter."""
    from .adapter import embeddings_path
    from .adapter_file import check_output_path
    from .api import personalize
    from .binder import validate_class_noun
    from .data import load_images
    from .distributed import processes

    output_path = check_output_path(output)
    # Cheap checks first: a typo in --images should not wait for a multi-GB model to load.
    given = load_images(class_images, name="--class-images") if class_images is not None else None
    if subjects:
        if images is not None or class_noun is not None or given is not None:
            raise InputError("--subject replaces --images, --class-noun and --class-images; give one or the other.")
        inputs: dict[str, Any] = {"images": [_subject_option(text) for text in subjects]}
    elif images is None or class_noun is None:
        raise InputError("give --images and --class-noun (one subject), or --subject FOLDER:NOUN once per subject.")
    else:
        inputs = {"images": load_images(images, name="--images"), "class_noun": validate_class_noun(class_noun)}
    # Options left out are left to `personalize`, which resolves every default once.
    settings = {key: value for key, value in settings.items() if value not in (None, ())}
    pipe = load_pipeline(model, device, dtype) if model else load_toy_base(device, dtype=dtype)
    adapter = personalize(pipe, **inputs, class_images=given, **settings)
    adapter.save(output_path, dtype=save_dtype)
    if not processes(pipe.device).is_main:
        return  # under torchrun / accelerate launch the main process wrote the file and reports it
    click.echo(f"saved {output_path} ({output_path.stat().st_size / 1e6:.2f} MB)")
    if adapter.tokens:
        click.echo(f"saved {embeddings_path(output_path)} (the new tokens' embeddings, for A1111 and ComfyUI)")
    for subject in adapter.subjects:
        click.echo(f'identifier: {subject["identifier"]}   try: --prompt "{subject["instance_prompt"]} on the beach"')


def _subject_option(text: str) -> Any:
    """One `--subject FOLDER:NOUN[:IDENTIFIER]` as a `Subject`, its photos loaded (so a typo fails at once)."""
    from .binder import validate_class_noun
    from .data import load_images
    from .subjects import Subject

    parts = text.rsplit(":", 2) if text.count(":") >= 2 else text.rsplit(":", 1)
    if len(parts) < 2 or not all(part.strip() for part in parts):
        raise InputError(f"--subject {text!r}: write FOLDER:NOUN or FOLDER:NOUN:IDENTIFIER, e.g. photos/rex:dog.")
    folder, noun, *identifier = parts
    images = load_images(folder, name=f"--subject {text!r}")
    return Subject(images, validate_class_noun(noun), identifier=identifier[0] if identifier else None)


@main.command()
@click.option("--model", required=True, help="Local diffusers folder or hub id the adapter was trained on.")
@click.option(
    "--adapter",
    "adapter_paths",
    multiple=True,
    help="Adapter file; repeat to mix several (LoRA/DoRA, or LoHa, or LoKr ones). Without one, the base model.",
)
@click.option(
    "--weight", "weights", type=float, multiple=True, help="Each --adapter's weight, in their order (default: all 1)."
)
@click.option(
    "--prompt",
    required=True,
    help='Prompt; "{id}" becomes the adapter\'s identifier; with several, "{dog}" that of dog.safetensors.',
)
@click.option("--negative-prompt", default=None)
@click.option("--num-images", type=int, default=1, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--steps", type=int, default=25, show_default=True)
@click.option("--guidance-scale", type=float, default=7.5, show_default=True)
@click.option("--lora-scale", type=float, default=1.0, show_default=True, help="LoRA strength.")
@click.option(
    "--dtype", type=click.Choice(list(DTYPES)), default="fp32", show_default=True, help="Load the model in this dtype."
)
@click.option("--device", default=None)
@click.option("--output", required=True, type=click.Path(dir_okay=False), help="PNG grid of the images.")
@friendly_errors
def generate(
    model: str,
    adapter_paths: tuple[str, ...],
    weights: tuple[float, ...],
    prompt: str,
    negative_prompt: str | None,
    num_images: int,
    seed: int,
    steps: int,
    guidance_scale: float,
    lora_scale: float,
    dtype: str,
    device: str | None,
    output: str,
) -> None:
    """Generate images with saved adapters, mixed at their weights (a PNG grid)."""
    from .generation import check_png_path, render_grid

    output_path = check_png_path(output)
    if num_images <= 0 or steps <= 0:
        raise InputError("--num-images and --steps must be positive integers.")
    _check_adapter_options(adapter_paths, weights)
    pipe = load_pipeline(model, device, dtype)
    text = _prompt_with_identifiers(prompt, _load_adapters(pipe, adapter_paths, weights))
    render_grid(
        pipe,
        text,
        output_path,
        num_images=num_images,
        seed=seed,
        steps=steps,
        guidance_scale=guidance_scale,
        negative_prompt=negative_prompt,
        lora_scale=lora_scale,
    )
    click.echo(f"wrote {output_path} ({num_images} image(s) of {text!r})")


def _check_adapter_options(paths: tuple[str, ...], weights: tuple[float, ...]) -> None:
    """The --weight count and the names the --adapter files will have, checked before any model loads."""
    from .adapter import default_adapter_name

    if weights and len(weights) != len(paths):
        raise InputError(f"give one --weight per --adapter, in order: {len(paths)} adapters, {len(weights)} weights.")
    names = [default_adapter_name(path) for path in paths]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise InputError(f"two --adapter files have the name {repeated[0]!r} (a file's stem); rename one of them.")


def _load_adapters(pipe: Any, paths: tuple[str, ...], weights: tuple[float, ...]) -> dict[str, str]:
    """Load each --adapter beside the others and set their --weight; returns each one's identifier by name."""
    from .adapter import default_adapter_name, load_adapter, load_for_generation, set_adapter_weights

    if len(paths) == 1 and not weights:  # one file: a db-adapters file, or a kohya LoRA export diffusers reads
        return {default_adapter_name(paths[0]): load_for_generation(pipe, paths[0])}
    adapters = [load_adapter(pipe, path) for path in paths]
    if weights:
        set_adapter_weights(pipe, {adapter.name: weight for adapter, weight in zip(adapters, weights, strict=True)})
    return {adapter.name: adapter.identifier for adapter in adapters}


def _prompt_with_identifiers(prompt: str, identifiers: dict[str, str]) -> str:
    """--prompt with "{name}" as the identifier of that adapter, and "{id}" as that of the only one."""
    for name, identifier in identifiers.items():
        prompt = prompt.replace(f"{{{name}}}", identifier)
    if "{id}" in prompt and len(identifiers) != 1:
        if not identifiers:
            raise InputError('--prompt uses "{id}" but no --adapter was given.')
        instead = ", ".join(f'"{{{name}}}"' for name in identifiers)
        raise InputError(f'--prompt uses "{{id}}" but there are several --adapter files; name each one: {instead}.')
    return prompt.replace("{id}", next(iter(identifiers.values()), ""))


def load_toy_base(device: str | None, folder: str | None = None, dtype: str = "fp32") -> Any:
    """The shipped toy base model (or a toy model folder), as `--model`'s default."""
    from .toy.base import base_dir

    if folder is None and not (base_dir() / "model_index.json").is_file():
        raise InputError(
            "this install ships no toy base model yet; pass --model, or train one with examples/train_toy_base.py."
        )
    return load_pipeline(str(folder or base_dir()), device or "cpu", dtype)


@main.command()
@click.option("--subject", default="star_box", show_default=True, help="A toy subject (db_adapters.toy.SUBJECTS).")
@click.option("--out", default="runs/demo", show_default=True, type=click.Path(file_okay=False))
@click.option("--model", default=None, help="A toy model folder (default: the shipped toy base model).")
@click.option("--steps", type=int, default=None, help="Personalization steps (default: the model's recommended steps).")
@click.option("--device", default=None, help="Default cpu.")
@friendly_errors
def demo(subject: str, out: str, model: str | None, steps: int | None, device: str | None) -> None:
    """Personalize the toy base model on a toy subject and write a before/after sheet."""
    from .toy.demo import SAMPLES_PER_ROW, run_demo
    from .toy.world import SUBJECTS

    if subject not in SUBJECTS:
        raise InputError(f"--subject {subject!r} is not a toy subject; choose one of: {', '.join(SUBJECTS)}.")
    pipe = load_toy_base(device, model)
    result = run_demo(subject, out, pipe=pipe, **({"steps": steps} if steps is not None else {}))
    click.echo(f"sheet    {result.sheet}")
    click.echo(f"adapter  {result.adapter} (identifier {result.identifier!r})")
    click.echo(f"time     personalize {result.personalize_s:.0f} s, total {result.total_s:.0f} s")
    read = result.subject_read
    shown = ", ".join(f"{name.replace('_', ' ')} {count}" for name, count in read.items() if name != "identity")
    click.echo(f"probe    the subject in {read['identity']} of {SAMPLES_PER_ROW} 'a [V]' samples ({shown})")


@main.command()
@click.argument("adapter_path", metavar="ADAPTER")
@friendly_errors
def inspect(adapter_path: str) -> None:
    """Print an adapter file's metadata and size."""
    from .adapter_file import unpack_metadata
    from .safe_reading import read_file_metadata, read_tensors

    info = unpack_metadata(read_file_metadata(adapter_path), adapter_path)
    tensors = read_tensors(adapter_path)
    info["tensors"] = len(tensors)
    info["parameters"] = sum(t.numel() for t in tensors.values())
    info["file_bytes"] = Path(adapter_path).stat().st_size
    click.echo(json.dumps(info, indent=2, sort_keys=True))


@main.command()
@click.argument("adapter_path", metavar="ADAPTER")
@click.option(
    "--format",
    "file_format",
    type=click.Choice(["kohya", "peft", "diffusers"]),
    default="kohya",
    show_default=True,
    help="kohya: the keys A1111 and ComfyUI read (LoRA: SD, SDXL, Flux; LoHa, LoKr: SD, SDXL, as LyCORIS keys); "
    "peft: LoRA in peft's keys and LoraConfig; diffusers: db-adapters' own file.",
)
@click.option("--output", required=True, type=click.Path(dir_okay=False), help="The converted file (.safetensors).")
@friendly_errors
def export(adapter_path: str, file_format: str, output: str) -> None:
    """Convert an adapter file to the format another tool loads."""
    from .adapter import embeddings_path
    from .formats import export_adapter

    path = export_adapter(adapter_path, output, file_format)
    click.echo(f"wrote {path} ({file_format} format, {path.stat().st_size / 1e6:.2f} MB)")
    if file_format != "diffusers" and embeddings_path(path).is_file():
        click.echo(f"wrote {embeddings_path(path)} (the new tokens' embeddings, for A1111 and ComfyUI)")


@main.command()
@click.option("--model", required=True, help="Local diffusers folder or hub id the adapter was trained on.")
@click.option("--adapter", "adapter_path", required=True, help="Adapter file (LoRA or full fine-tune).")
@click.option("--output", required=True, type=click.Path(file_okay=False), help="New folder for the fused pipeline.")
@click.option(
    "--dtype", type=click.Choice(list(DTYPES)), default="fp32", show_default=True, help="Load, fuse and save in it."
)
@click.option("--device", default=None, help="cpu, cuda, ... (default: cuda when available).")
@friendly_errors
def fuse(model: str, adapter_path: str, output: str, dtype: str, device: str | None) -> None:
    """Bake an adapter into its model: a full diffusers pipeline folder that needs no adapter to load."""
    from .adapter import load_adapter
    from .fuse import check_output_folder, fuse_adapter, save_pipeline
    from .safe_reading import check_adapter_file

    # Cheap checks first: a used --output or a missing adapter should not wait for the model to load.
    folder = check_output_folder(output)
    check_adapter_file(adapter_path)
    pipe = load_pipeline(model, device, dtype)
    adapter = load_adapter(pipe, adapter_path)
    fuse_adapter(pipe)
    save_pipeline(pipe, folder)
    click.echo(f"wrote {folder} (the {adapter.strategy.name} adapter for {adapter.instance_prompt!r}, fused)")
    click.echo(f"identifier: {adapter.identifier}   load it with DiffusionPipeline.from_pretrained({str(folder)!r})")


@main.command()
@click.argument("adapter_path", metavar="FULL_ADAPTER")
@click.option(
    "--model", default=None, help="The fine-tune's base model, a folder or hub id (default: the one it records)."
)
@click.option("--rank", type=int, default=None, help="One LoRA rank for every layer (capped by the layer's size).")
@click.option("--energy", type=float, default=None, help="Per layer, the smallest rank keeping this share, e.g. 0.9.")
@click.option("--output", required=True, type=click.Path(dir_okay=False), help="The LoRA file (.safetensors).")
@click.option(
    "--dtype", type=click.Choice(list(DTYPES)), default="fp32", show_default=True, help="Load the model and save in it."
)
@click.option("--device", default=None, help="Where the SVDs run: cpu, cuda, ... (default: cuda when available).")
@friendly_errors
def extract(
    adapter_path: str,
    model: str | None,
    rank: int | None,
    energy: float | None,
    output: str,
    dtype: str,
    device: str | None,
) -> None:
    """Make a LoRA from a full fine-tune: the truncated SVD of every changed Linear and Conv2d weight."""
    from .adapter_file import check_output_path
    from .extract import check_rank_or_energy, extract_lora, full_fine_tune_info, report_lines

    # Cheap checks first: a bad option or file should not wait for the model to load.
    check_rank_or_energy(rank, energy)
    output_path = check_output_path(output)
    info = full_fine_tune_info(adapter_path)
    model = model or (info.get("base_model") or {}).get("model_id")
    if not model:
        raise InputError(f"{adapter_path!r} records no base model id; pass --model (a diffusers folder or hub id).")
    pipe = load_pipeline(model, device, dtype)
    extraction = extract_lora(pipe, adapter_path, rank=rank, energy=energy)
    path = extraction.save(output_path, dtype=DTYPES[dtype])
    for line in report_lines(extraction):
        click.echo(line)
    click.echo(
        f"wrote {path}: {len(extraction.layers)} layers, retained energy {extraction.retained_energy:.4f} "
        f"of their change, {path.stat().st_size:,} bytes"
    )


@main.command(name="eval")
@click.option("--model", required=True, help="Local diffusers folder or hub id (the adapter's base model).")
@click.option(
    "--adapter",
    "adapter_path",
    default=None,
    help="Adapter file (db-adapters' own, or a kohya LoRA export); without one, the base model.",
)
@click.option("--images", required=True, help="Folder of the subject's real photos.")
@click.option("--class-noun", default=None, help="The subject's class (default: the adapter's).")
@click.option("--live", is_flag=True, help="Live subject (pet): DreamBench's live-subject prompts.")
@click.option("--images-per-prompt", type=click.IntRange(min=1), default=4, show_default=True)
@click.option("--steps", type=click.IntRange(min=1), default=25, show_default=True)
@click.option("--guidance-scale", type=float, default=7.5, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--max-prompts", type=click.IntRange(min=1), default=None, help="Subsample the 25 prompts.")
@click.option("--pres-images", type=click.IntRange(min=1), default=16, show_default=True, help='"a [class]" images.')
@click.option("--embedder", type=click.Choice(["real", "tiny"]), default="real", show_default=True)
@click.option("--dino-model", default=None, help="DINO hub id or folder (default facebook/dino-vits16).")
@click.option("--clip-model", default=None, help="CLIP hub id or folder (default openai/clip-vit-base-patch32).")
@click.option("--lpips-weights", default=None, help="LPIPS alex safetensors file (for DIV).")
@click.option("--device", default=None, help="cpu, cuda, ... (default: cuda when available).")
@click.option("--output", required=True, type=click.Path(file_okay=False), help="Folder: report.json, sheet.png.")
@friendly_errors
def evaluate_command(
    model: str,
    adapter_path: str | None,
    images: str,
    class_noun: str | None,
    embedder: str,
    dino_model: str | None,
    clip_model: str | None,
    lpips_weights: str | None,
    device: str | None,
    output: str,
    **settings: Any,
) -> None:
    """Score a pipeline (and adapter) with the DreamBooth paper's metrics on DreamBench prompts."""
    from .data import load_images
    from .evaluation import evaluate

    output_dir = Path(output)
    if output_dir.exists() and not output_dir.is_dir():
        raise InputError(f"--output {output!r} is a file; give a folder for report.json and sheet.png.")
    # Cheap checks first: a typo in --images or a missing evaluator should not wait for the pipeline.
    real = load_images(images, name="--images")
    embedders = _evaluation_embedders(embedder, dino_model, clip_model, lpips_weights, device)
    pipe = load_pipeline(model, device)
    adapter = None
    if adapter_path is not None:
        from .adapter import load_adapter

        adapter = load_adapter(pipe, adapter_path)
    report = evaluate(
        pipe,
        adapter,
        real,
        class_noun,
        embedders=embedders,
        progress=lambda line: click.echo(line, err=True),
        **settings,
    )
    report.models["adapter"] = adapter_path
    json_path, png_path = report.save(output_dir / "report.json", output_dir / "sheet.png")
    scores = "  ".join(
        f"{name} {'n/a' if value is None else f'{value:.3f}'}" for name, value in report.metrics().items()
    )
    click.echo(scores)
    click.echo(f"wrote {json_path} and {png_path}")


def _evaluation_embedders(
    kind: str, dino_model: str | None, clip_model: str | None, lpips_weights: str | None, device: str | None
) -> Any:
    from .evaluation.embedders import CLIP_MODEL, DINO_MODEL, load_embedders, tiny_embedders

    if kind == "tiny":
        return tiny_embedders()
    import torch

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    embedders = load_embedders(dino_model or DINO_MODEL, clip_model or CLIP_MODEL, lpips_weights, device=device)
    if lpips_weights is None:
        warnings.warn("no --lpips-weights: DIV is left out of the report (null).", stacklevel=1)
    return embedders


if __name__ == "__main__":  # pragma: no cover
    main()
