"""Adapter files on disk: safetensors only, written atomically, with our metadata as JSON under one key.

Strategies decide which tensors go into a file; this module decides how a file is written and read,
so every strategy gets the same safety: no pickle is ever opened, a crash never leaves a half-written
adapter in place of a good one, and every unreadable file is an `AdapterError` naming it.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import AdapterError, InputError

if TYPE_CHECKING:
    import torch

METADATA_KEY = "db_adapters"
FORMAT_VERSION = 1
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")


def check_output_path(path: str | os.PathLike) -> Path:
    """Validate where an adapter will be written: a `.safetensors` name in a writable folder.

    Args:
        path (`str | PathLike`): the adapter file to write.

    Example:
        >>> check_output_path("my_dog.safetensors").name
        'my_dog.safetensors'
    """
    path = Path(path)
    if path.suffix != ".safetensors":
        raise InputError(f"output {str(path)!r} must end in .safetensors (adapters are saved as safetensors only).")
    if path.is_dir():
        raise InputError(f"output {str(path)!r} is a folder; give a file name such as my_dog.safetensors.")
    folder = path.parent if str(path.parent) else Path(".")
    if folder.exists() and not os.access(folder, os.W_OK):
        raise InputError(f"output folder {str(folder)!r} is not writable; choose another --output.")
    if folder.exists() and not folder.is_dir():
        raise InputError(f"output folder {str(folder)!r} is not a folder; choose another --output.")
    return path


def write_atomically(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Run `write(tmp)` on a temporary name beside `path`, then rename it into place.

    A rename within one folder is atomic, so readers see either the old file or the new one, never
    a partial file; if `write` fails the temporary file is removed and the old file stays intact.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(handle)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        # mkstemp makes owner-only files; give the result the permissions a plain open() would.
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


def save_tensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> Path:
    """Write `tensors` and text `metadata` to the safetensors file `path`, atomically."""
    from safetensors.torch import save_file

    contiguous = {name: tensor.detach().contiguous() for name, tensor in tensors.items()}
    return write_atomically(path, lambda tmp: save_file(contiguous, str(tmp), metadata=metadata))


def check_adapter_file(path: str | os.PathLike) -> Path:
    """Refuse anything that is not an existing safetensors file, without opening pickles."""
    path = Path(path)
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise AdapterError(
            f"{str(path)!r} is a pickle-based {path.suffix} file; db-adapters loads only safetensors, since "
            "unpickling can run arbitrary code. Convert it where you trust its origin: "
            "safetensors.torch.save_file(torch.load(path, weights_only=True), 'adapter.safetensors')."
        )
    if not path.exists():
        raise AdapterError(f"adapter file {str(path)!r} does not exist; check the path.")
    if path.is_dir():
        raise AdapterError(f"{str(path)!r} is a folder; pass the adapter's .safetensors file.")
    return path


def read_file_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The text metadata of a safetensors file; `AdapterError` if it is not a readable safetensors file."""
    from safetensors import safe_open

    path = check_adapter_file(path)
    try:
        with safe_open(str(path), framework="pt") as handle:
            return dict(handle.metadata() or {})
    except OSError:
        raise
    except Exception as error:
        raise AdapterError(f"{str(path)!r} is not a valid safetensors file ({_short(error)}).") from None


def read_tensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """All tensors of a safetensors file, on CPU; `AdapterError` if the file cannot be read."""
    from safetensors.torch import load_file

    path = check_adapter_file(path)
    try:
        return load_file(str(path))
    except OSError:
        raise
    except Exception as error:
        raise AdapterError(f"{str(path)!r} is not a valid safetensors file ({_short(error)}).") from None


def pack_metadata(info: dict[str, Any]) -> dict[str, str]:
    """Our metadata as safetensors header text: JSON under the one key `db_adapters`."""
    return {METADATA_KEY: json.dumps({"format_version": FORMAT_VERSION, **info}, sort_keys=True)}


def unpack_metadata(metadata: dict[str, str], path: str | os.PathLike) -> dict[str, Any]:
    """Parse our metadata from a header; `AdapterError` naming the file when absent or malformed."""
    if METADATA_KEY not in metadata:
        raise AdapterError(
            f"{str(path)!r} has no db-adapters metadata; it was not saved by db-adapters. A plain diffusers "
            "LoRA file loads with pipe.load_lora_weights(path)."
        )
    try:
        info = json.loads(metadata[METADATA_KEY])
    except json.JSONDecodeError as error:
        raise AdapterError(f"{str(path)!r} has malformed db-adapters metadata ({error}).") from None
    if not isinstance(info, dict):
        raise AdapterError(f"{str(path)!r} has db-adapters metadata that is not a JSON object.")
    required = {
        "identifier": str,
        "class_noun": str,
        "instance_prompt": str,
        "strategy": str,
        "strategy_config": dict,
    }
    for key, kind in required.items():
        if not isinstance(info.get(key), kind):
            raise AdapterError(f"{str(path)!r}: metadata field {key!r} is missing or not a {kind.__name__}.")
    return info


def _short(error: Exception) -> str:
    text = str(error).strip().splitlines()
    return text[0][:200] if text else type(error).__name__
