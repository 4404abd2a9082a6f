"""Safe safetensors reading: no pickle is ever opened, and every damaged or foreign file is an
`AdapterError` naming it (a missing or unreadable file stays an `OSError`, as the file system reports it).
"""

from __future__ import annotations

import errno
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import AdapterError

if TYPE_CHECKING:
    import torch

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")

_CONVERT_HINT = (
    "Convert it in an environment where you trust its origin: "
    "`import torch, safetensors.torch; safetensors.torch.save_file("
    "torch.load(PATH, weights_only=True), 'adapter.safetensors')` (a LoRA saved by diffusers also converts with "
    "pipe.load_lora_weights(PATH) then pipe.save_lora_weights(FOLDER, safe_serialization=True))."
)
# safetensors' element sizes, by the dtype names its headers use.
DTYPE_BYTES = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E5M2": 1,
    "F8_E4M3": 1,
    "I16": 2,
    "U16": 2,
    "F16": 2,
    "BF16": 2,
    "I32": 4,
    "U32": 4,
    "F32": 4,
    "I64": 8,
    "U64": 8,
    "F64": 8,
    "C64": 8,
    "F8_E8M0": 1,
}
# Trained weights are floats; an integer or boolean "weight" is a damaged or foreign file.
WEIGHT_DTYPES = ("F32", "F16", "BF16")
# safetensors' own limit on the JSON header; a larger length is a damaged or foreign file.
MAX_HEADER_BYTES = 100_000_000
# What a pickle-based file starts with: torch.save's ZIP archive, or a bare pickle (protocol 2+).
_FOREIGN_STARTS = ((b"PK\x03\x04", "a ZIP archive (what torch.save writes)"), (b"\x80", "a pickle"))


@dataclass(frozen=True)
class TensorEntry:
    """One tensor as a safetensors header describes it: dtype name, shape and byte range in the data."""

    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int


@dataclass(frozen=True)
class SafetensorsHeader:
    """A checked safetensors header: the text metadata and every tensor's entry."""

    metadata: dict[str, str]
    tensors: dict[str, TensorEntry]


def check_adapter_file(path: str | os.PathLike) -> Path:
    """Refuse pickle-based files by name, before anything opens them; `OSError` if `path` is no file.

    Args:
        path (`str | PathLike`): the file to read.

    Example:
        >>> check_adapter_file("model.ckpt")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        db_adapters.errors.AdapterError: 'model.ckpt' is a pickle-based .ckpt file; ...
    """
    path = Path(path)
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise AdapterError(
            f"{str(path)!r} is a pickle-based {path.suffix} file; db-adapters loads only safetensors, since "
            f"unpickling can run arbitrary code, and did not open it. {_CONVERT_HINT}"
        )
    # Missing files and folders are file-system errors, so they stay OSError (with the name).
    if not path.exists():
        raise FileNotFoundError(errno.ENOENT, "adapter file does not exist; check the path", str(path))
    if path.is_dir():
        raise IsADirectoryError(errno.EISDIR, "is a folder; pass the adapter's .safetensors file", str(path))
    return path


def read_header(path: str | os.PathLike) -> SafetensorsHeader:
    """Read and check a safetensors file's header, without reading its tensors.

    The checks are ours rather than safetensors' because its errors are one `SafetensorError` with
    terse, version-dependent texts (or no error, e.g. for a dtype that cannot be a weight); here every
    problem becomes an `AdapterError` that names the file and what is wrong with it, and nothing is
    handed to the parser that has not passed bounds checks first.

    Args:
        path (`str | PathLike`): a `.safetensors` file.

    Example:
        >>> header = read_header("my_dog.safetensors")  # doctest: +SKIP
        >>> sorted(header.metadata)  # doctest: +SKIP
        ['db_adapters', 'format', 'lora_adapter_metadata']
    """
    path = check_adapter_file(path)
    with open(path, "rb") as handle:
        size = os.fstat(handle.fileno()).st_size
        prefix = handle.read(9)  # the header length, and the header's first character
        if len(prefix) < 8:
            raise _invalid(path, f"truncated to {size} bytes, shorter than the 8-byte header length")
        length = int.from_bytes(prefix[:8], "little")
        # A header length whose low byte is 0x80 starts like a pickle: it is one only if what follows
        # is no safetensors header.
        if not (prefix[8:] == b"{" and length <= size - 8):
            for start, kind in _FOREIGN_STARTS:
                if prefix.startswith(start):
                    raise _invalid(path, f"its bytes are {kind}, which db-adapters never unpickles. {_CONVERT_HINT}")
        handle.seek(8)
        if length > MAX_HEADER_BYTES:
            raise _invalid(path, f"header length {length} is absurd (safetensors allows {MAX_HEADER_BYTES} bytes)")
        if length > size - 8:
            raise _invalid(path, f"header length {length} runs past the end of the file ({size} bytes): truncated?")
        text = handle.read(length)
    try:
        header = json.loads(text.decode("utf-8"), object_pairs_hook=_no_duplicate_keys)
    except (ValueError, RecursionError) as error:  # RecursionError: nesting deeper than any real header
        raise _invalid(path, f"header is not JSON ({short_error(error)})") from None
    if not isinstance(header, dict):
        raise _invalid(path, "header is not a JSON object")
    metadata = _header_metadata(header.pop("__metadata__", {}), path)
    tensors = {name: _tensor_entry(name, entry, path) for name, entry in header.items()}
    _check_layout(tensors, size - 8 - length, path)
    return SafetensorsHeader(metadata, tensors)


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # json keeps the last of two equal keys silently; a header naming a tensor twice is ambiguous.
    keys = [key for key, _ in pairs]
    if len(set(keys)) != len(keys):
        raise ValueError(f"duplicate key {next(k for k in keys if keys.count(k) > 1)!r}")
    return dict(pairs)


def _header_metadata(metadata: object, path: Path) -> dict[str, str]:
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise _invalid(path, "header __metadata__ is not a JSON object of strings")
    return metadata


def _tensor_entry(name: str, entry: object, path: Path) -> TensorEntry:
    if not name:
        raise _invalid(path, "a tensor has an empty name")
    if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
        raise _invalid(path, f"tensor {name!r} is not described by exactly dtype, shape and data_offsets")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if not isinstance(dtype, str) or dtype not in DTYPE_BYTES:
        raise _invalid(path, f"tensor {name!r} has unknown dtype {dtype!r}")
    if not isinstance(shape, list) or not all(_is_count(n) for n in shape):
        raise _invalid(path, f"tensor {name!r} has shape {shape!r}, not a list of non-negative integers")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_count(n) for n in offsets):
        raise _invalid(path, f"tensor {name!r} has data_offsets {offsets!r}, not two non-negative integers")
    begin, end = offsets
    expected = math.prod(shape) * DTYPE_BYTES[dtype]
    if end - begin != expected:
        raise _invalid(
            path, f"tensor {name!r}: data_offsets {offsets} hold {end - begin} bytes, {dtype} {shape} needs {expected}"
        )
    return TensorEntry(dtype, tuple(shape), begin, end)


def _is_count(value: object) -> bool:
    return type(value) is int and value >= 0


def _check_layout(tensors: dict[str, TensorEntry], data_bytes: int, path: Path) -> None:
    # As safetensors requires: the tensors tile the data exactly, with no gap, overlap or tail.
    position = 0
    for name, entry in sorted(tensors.items(), key=lambda item: (item[1].begin, item[1].end)):
        if entry.begin != position:
            problem = "overlaps the previous tensor" if entry.begin < position else "leaves a gap before it"
            raise _invalid(path, f"tensor {name!r} starts at byte {entry.begin} and {problem} (ends at {position})")
        position = entry.end
    if position != data_bytes:
        raise _invalid(
            path, f"the tensors' data_offsets end at byte {position}, but the file holds {data_bytes}: truncated?"
        )


def _invalid(path: Path, problem: str) -> AdapterError:
    return AdapterError(f"{str(path)!r} is not a valid safetensors file: {problem}.")


def read_file_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The text metadata of a safetensors file; `AdapterError` if it is not a valid safetensors file.

    Args:
        path (`str | PathLike`): a `.safetensors` file.

    Example:
        >>> "db_adapters" in read_file_metadata("my_dog.safetensors")  # doctest: +SKIP
        True
    """
    return read_header(path).metadata


def read_tensors(path: str | os.PathLike, dtypes: tuple[str, ...] | None = None) -> dict[str, torch.Tensor]:
    """All tensors of a safetensors file, on CPU; `AdapterError` if the file is not valid.

    Args:
        path (`str | PathLike`): a `.safetensors` file.
        dtypes (`tuple[str, ...] | None`): safetensors dtype names allowed (e.g. `WEIGHT_DTYPES`); None allows all.

    Example:
        >>> tensors = read_tensors("my_dog.safetensors")  # doctest: +SKIP
    """
    from safetensors.torch import load_file

    header = read_header(path)
    for name, entry in header.tensors.items():
        if dtypes is not None and entry.dtype not in dtypes:
            raise AdapterError(f"{str(path)!r}: tensor {name!r} has dtype {entry.dtype}; expected one of {dtypes}.")
    try:
        return load_file(str(path))
    except OSError:
        raise
    except Exception as error:  # the file changed since its header was checked
        raise AdapterError(f"{str(path)!r} is not a valid safetensors file ({short_error(error)}).") from None


def read_weights(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """An adapter file's weights: float tensors (F32/F16/BF16), every value finite; else `AdapterError`.

    Args:
        path (`str | PathLike`): an adapter's `.safetensors` file.

    Example:
        >>> weights = read_weights("my_dog.safetensors")  # doctest: +SKIP
    """
    import torch

    tensors = read_tensors(path, WEIGHT_DTYPES)
    for name, tensor in tensors.items():
        if not bool(torch.isfinite(tensor).all()):
            raise AdapterError(f"{str(path)!r}: tensor {name!r} holds NaN or infinite values; the file is damaged.")
    return tensors


def short_error(error: Exception) -> str:
    text = str(error).strip().splitlines()
    return text[0][:200] if text else type(error).__name__
