"""Adapter files on disk: safetensors only, written atomically, with our metadata as JSON under one key.

Strategies decide which tensors go into a file; this module decides how a file is written and read,
so every strategy gets the same safety: no pickle is ever opened, a crash never leaves a half-written
adapter in place of a good one, and every damaged or foreign file is an `AdapterError` naming it
(a missing or unreadable file stays an `OSError`, as the file system reports it).
"""

from __future__ import annotations

import errno
import glob
import json
import math
import os
import re
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
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
    The data is flushed to disk before the rename, so a power cut cannot leave an empty file
    in place of the old one either.

    A process killed outright (SIGKILL, out of memory, power cut) runs no cleanup and leaves its
    temporary file behind; so each write first removes the temporary files of `path` left by
    writers that are no longer running (the writer's process id is part of the temporary name).

    Args:
        path (`str | PathLike`): the file to write; its folder is created if needed.
        write (`Callable[[Path], None]`): writes the whole file to the path it is given.

    Example:
        >>> import tempfile
        >>> target = Path(tempfile.mkdtemp()) / "note.txt"
        >>> write_atomically(target, lambda tmp: tmp.write_text("hello")).read_text()
        'hello'
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sweep_stale_temporaries(path)
    handle, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp", dir=path.parent)
    os.close(handle)
    tmp = Path(tmp_name)
    try:
        with named_write_errors(path):
            write(tmp)
        # mkstemp makes owner-only files; give the result the permissions a plain open() would.
        os.chmod(tmp, 0o666 & ~_umask())
        _flush_to_disk(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _flush_to_disk(path.parent)
    return path


# safetensors reports a failed write (disk full, quota, file too large) as a SafetensorError whose text
# holds Rust's io::Error: "I/O error: No space left on device (os error 28)" (0.8), or in older versions
# "IoError(Os { code: 28, kind: StorageFull, ... })".
_RUST_OS_ERROR = re.compile(r"\(os error (\d+)\)|\bOs \{ code: (\d+)")
# Errors a user fixes by making room; the message says so.
_SPACE_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}


@contextmanager
def named_write_errors(path: str | os.PathLike) -> Iterator[None]:
    """Make a failed write an `OSError` that names `path`, the file the user asked for.

    A full disk reaches us as an `OSError` naming a temporary file, or none, or (from safetensors'
    Rust writer) as a `SafetensorError`; each becomes `OSError(errno, reason, path)`, so the caller
    and `db-adapt` report "No space left on device ... : 'my_dog.safetensors'".

    Args:
        path (`str | PathLike`): the file being written.

    Example:
        >>> with named_write_errors("a.safetensors"):  # doctest: +ELLIPSIS
        ...     raise OSError(28, "No space left on device")
        Traceback (most recent call last):
        ...
        OSError: [Errno 28] No space left on device; free some space or write elsewhere: 'a.safetensors'
    """
    from safetensors import SafetensorError

    try:
        yield
    except (OSError, SafetensorError) as error:
        code = error.errno if isinstance(error, OSError) else _rust_os_error_code(error)
        if code is None:
            raise
        reason = f"{os.strerror(code)}; free some space or write elsewhere" if code in _SPACE_ERRORS else None
        raise OSError(code, reason or os.strerror(code), str(path)) from error


def _rust_os_error_code(error: Exception) -> int | None:
    match = _RUST_OS_ERROR.search(str(error))
    return int(match.group(1) or match.group(2)) if match else None


def sweep_stale_temporaries(path: str | os.PathLike) -> list[Path]:
    """Delete the temporary files `write_atomically` left beside `path` in processes that died.

    Temporary names are `.NAME.PID.RANDOM.tmp`; a file whose writer process is still alive (another
    process writing the same file right now) is left alone.

    Args:
        path (`str | PathLike`): the file whose stale temporaries to remove.

    Returns:
        The temporary files removed.

    Example:
        >>> import tempfile
        >>> folder = Path(tempfile.mkdtemp())
        >>> _ = (folder / ".a.txt.999999999.x1y2.tmp").write_text("half")
        >>> [p.name for p in sweep_stale_temporaries(folder / "a.txt")]
        ['.a.txt.999999999.x1y2.tmp']
    """
    path = Path(path)
    prefix = f".{path.name}."
    removed = []
    for candidate in path.parent.glob(f"{glob.escape(prefix)}*.tmp"):
        owner = candidate.name[len(prefix) :].split(".", 1)[0]
        if owner.isdigit() and _process_alive(int(owner)):
            continue
        candidate.unlink(missing_ok=True)
        removed.append(candidate)
    return removed


def _process_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except (PermissionError, OSError, OverflowError):
        return True  # it exists but is someone else's, or we cannot tell: leave its file alone
    return True


def _flush_to_disk(path: Path) -> None:
    # A rename is atomic, but without fsync a power cut can persist the rename before the data.
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return  # e.g. folders cannot be opened on Windows; the rename is still atomic there
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems do not support fsync on this kind of file
    finally:
        os.close(fd)


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


def save_tensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> Path:
    """Write `tensors` and text `metadata` to the safetensors file `path`, atomically."""
    from safetensors.torch import save_file

    contiguous = {name: tensor.detach().contiguous() for name, tensor in tensors.items()}
    return write_atomically(path, lambda tmp: save_file(contiguous, str(tmp), metadata=metadata))


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
        prefix = handle.read(8)
        if len(prefix) < 8:
            raise _invalid(path, f"truncated to {size} bytes, shorter than the 8-byte header length")
        for start, kind in _FOREIGN_STARTS:
            if prefix.startswith(start):
                raise _invalid(path, f"its bytes are {kind}, which db-adapters never unpickles. {_CONVERT_HINT}")
        length = int.from_bytes(prefix, "little")
        if length > MAX_HEADER_BYTES:
            raise _invalid(path, f"header length {length} is absurd (safetensors allows {MAX_HEADER_BYTES} bytes)")
        if length > size - 8:
            raise _invalid(path, f"header length {length} runs past the end of the file ({size} bytes): truncated?")
        text = handle.read(length)
    try:
        header = json.loads(text.decode("utf-8"), object_pairs_hook=_no_duplicate_keys)
    except (ValueError, RecursionError) as error:  # RecursionError: nesting deeper than any real header
        raise _invalid(path, f"header is not JSON ({_short(error)})") from None
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
        raise AdapterError(f"{str(path)!r} is not a valid safetensors file ({_short(error)}).") from None


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


def tensors_by_component(
    tensors: dict[str, torch.Tensor], path: str | os.PathLike, components: tuple[str, ...] = ("unet", "text_encoder")
) -> dict[str, dict[str, torch.Tensor]]:
    """Split `component.name` keys (diffusers' layout) per component; `AdapterError` for unknown ones or no UNet.

    Args:
        tensors (`dict[str, Tensor]`): an adapter file's tensors.
        path (`str | PathLike`): the file, for messages.
        components (`tuple[str, ...]`): the components an adapter may change.

    Example:
        >>> import torch
        >>> sorted(tensors_by_component({"unet.a": torch.zeros(1)}, "x.safetensors"))
        ['unet']
    """
    split: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        component, _, name = key.partition(".")
        if component not in components or not name:
            raise AdapterError(f"{str(path)!r}: unexpected tensor {key!r}; adapter keys start with {components}.")
        split.setdefault(component, {})[name] = tensor
    if "unet" not in split:
        raise AdapterError(f"{str(path)!r} holds no UNet weights (no 'unet.' keys); it is not a db-adapters adapter.")
    return split


def pack_metadata(info: dict[str, Any]) -> dict[str, str]:
    """Our metadata as safetensors header text: JSON under the one key `db_adapters`."""
    return {METADATA_KEY: json.dumps({"format_version": FORMAT_VERSION, **info}, sort_keys=True)}


# Our metadata's fields and their JSON types; the first five must be present (and the strings non-empty).
_REQUIRED_FIELDS = {
    "identifier": str,
    "class_noun": str,
    "instance_prompt": str,
    "strategy": str,
    "strategy_config": dict,
}
_OPTIONAL_FIELDS = {
    "format_version": int,
    "train_text_encoder": bool,
    "base_model": dict,
    "resolution": int,
    "steps": int,
    "library_version": str,
}


def unpack_metadata(metadata: dict[str, str], path: str | os.PathLike) -> dict[str, Any]:
    """Parse and type-check our metadata from a header; `AdapterError` naming the file and field otherwise.

    Args:
        metadata (`dict[str, str]`): a safetensors header's text metadata (`read_file_metadata`).
        path (`str | PathLike`): the file, for messages.

    Example:
        >>> unpack_metadata(pack_metadata({"identifier": "olg", "class_noun": "dog", "instance_prompt": "a olg dog",
        ...     "strategy": "lora", "strategy_config": {}}), "x.safetensors")["identifier"]
        'olg'
    """
    if METADATA_KEY not in metadata:
        raise AdapterError(
            f"{str(path)!r} has no db-adapters metadata; it was not saved by db-adapters. A plain diffusers "
            "LoRA file loads with pipe.load_lora_weights(path)."
        )
    try:
        info = json.loads(metadata[METADATA_KEY])
    except (TypeError, ValueError, RecursionError) as error:
        raise AdapterError(f"{str(path)!r} has malformed db-adapters metadata, not JSON ({_short(error)}).") from None
    if not isinstance(info, dict):
        raise AdapterError(f"{str(path)!r} has db-adapters metadata that is not a JSON object.")
    for key, kind in (_REQUIRED_FIELDS | _OPTIONAL_FIELDS).items():
        value = info.get(key)
        if value is None and key in _OPTIONAL_FIELDS:
            continue
        # bool is an int to Python, but `true` is no step count; "" is no identifier.
        wrong = not isinstance(value, kind) or (kind is int and isinstance(value, bool))
        if wrong or (kind is str and key in _REQUIRED_FIELDS and not value.strip()):
            raise AdapterError(
                f"{str(path)!r}: metadata field {key!r} is {_json_repr(value)}, not a {_JSON_NAMES[kind]}; "
                "the file is damaged or was edited."
            )
    version = info.get("format_version")  # null counts as absent, like every optional field
    if version is not None and not 1 <= version <= FORMAT_VERSION:
        raise AdapterError(
            f"{str(path)!r} has format_version {version}; this db-adapters reads 1 to {FORMAT_VERSION} "
            "(upgrade db-adapters for newer files)."
        )
    for key in ("resolution", "steps"):
        if (info.get(key) or 0) < 0:
            raise AdapterError(f"{str(path)!r}: metadata field {key!r} is {info[key]}, not a non-negative integer.")
    base = info.get("base_model") or {}
    if not all(isinstance(value, str) for value in base.values()):
        raise AdapterError(f"{str(path)!r}: metadata field 'base_model' must map names to strings.")
    return info


_JSON_NAMES = {str: "non-empty string", dict: "JSON object", int: "integer", bool: "true/false"}


def _json_repr(value: object) -> str:
    text = "missing" if value is None else json.dumps(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _short(error: Exception) -> str:
    text = str(error).strip().splitlines()
    return text[0][:200] if text else type(error).__name__
