"""Fusing: make an adapter part of the pipeline's own weights and write the whole pipeline as a diffusers folder,
which any diffusers user (or tool that reads diffusers folders) loads with no adapter step and no db-adapters.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from .adapter import attached_adapters, detach
from .errors import AdapterError, InputError
from .files import named_write_errors

if TYPE_CHECKING:
    from diffusers import DiffusionPipeline


def fuse_adapter(pipe: DiffusionPipeline) -> None:
    """Make the pipeline's db-adapters adapter part of its base weights; the pipeline then carries no adapter.

    A LoRA is merged into the layers it adapts (diffusers' `fuse_lora`, then `unload_lora_weights` takes
    the LoRA layers out); a full fine-tune's weights are the pipeline's weights already. Either way the
    pipeline renders as before, and `unload_adapter` has nothing left to take out.

    Args:
        pipe (`DiffusionPipeline`): a pipeline returned by `personalize`, or given to `load_adapter`.

    Example:
        >>> adapter = load_adapter(pipe, "my_dog.safetensors")  # doctest: +SKIP
        >>> fuse_adapter(pipe)  # doctest: +SKIP
        >>> pipe.save_pretrained("my-dog-model", safe_serialization=True)  # doctest: +SKIP
    """
    adapters = attached_adapters(pipe)
    if not adapters:
        raise AdapterError("this pipeline carries no db-adapters adapter to fuse; load one first (load_adapter).")
    if len(adapters) > 1:
        raise AdapterError(
            f"this pipeline carries {len(adapters)} adapters ({', '.join(map(repr, adapters))}); fusing takes one: "
            "take the others out with db_adapters.unload_adapter(pipe, name) first."
        )
    (adapter,) = adapters.values()
    if adapter.strategy.name == "lora":
        pipe.fuse_lora(components=list(adapter.strategy.components), lora_scale=1.0)
        pipe.unload_lora_weights()
    elif adapter.strategy.name != "full":
        name = adapter.strategy.name
        raise AdapterError(f"fusing is written for LoRA and full fine-tunes, not for strategy {name!r}.")
    # A full fine-tune keeps a CPU copy of the base weights to unload to; fused, there is no way back.
    adapter.strategy.__dict__.pop("_backup", None)
    detach(pipe, adapter)


def check_output_folder(folder: str | os.PathLike) -> Path:
    """Where a pipeline folder may be written: a new or empty folder in a writable place; else `InputError`.

    Example:
        >>> import tempfile
        >>> check_output_folder(Path(tempfile.mkdtemp()) / "my-dog-model").name
        'my-dog-model'
    """
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise InputError(f"output {str(folder)!r} is a file; give a new folder for the pipeline.")
    if folder.is_dir() and any(folder.iterdir()):
        raise InputError(f"output folder {str(folder)!r} exists and is not empty; give a new or empty folder.")
    parent = folder.parent if str(folder.parent) else Path(".")
    if parent.exists() and not os.access(parent, os.W_OK):
        raise InputError(f"output folder {str(parent)!r} is not writable; choose another output.")
    return folder


def save_pipeline(pipe: DiffusionPipeline, folder: str | os.PathLike) -> Path:
    """Write `pipe` as a diffusers folder (safetensors weights), all at once: a failure leaves no folder behind.

    The pipeline is written into a temporary folder beside `folder`, then renamed into place.

    Args:
        pipe (`DiffusionPipeline`): the pipeline, e.g. after `fuse_adapter`.
        folder (`str | PathLike`): a new or empty folder.

    Example:
        >>> save_pipeline(pipe, "my-dog-model")  # doctest: +SKIP
    """
    folder = check_output_folder(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".tmp", dir=folder.parent))
    try:
        # mkdtemp makes an owner-only folder; give the result the permissions a plain mkdir would.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(staging, 0o777 & ~umask)
        with named_write_errors(folder):
            pipe.save_pretrained(str(staging), safe_serialization=True)
        if folder.is_dir():
            folder.rmdir()  # empty, as checked; another writer filling it meanwhile makes this fail loudly
        os.replace(staging, folder)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return folder
