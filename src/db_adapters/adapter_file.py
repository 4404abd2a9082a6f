"""The adapter file format: one safetensors file, `component.name` tensor keys, and our metadata as
JSON under the one header key `db_adapters` (beside whatever diffusers writes for its own loaders).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import AdapterError, InputError
from .safe_reading import short_error

if TYPE_CHECKING:
    import torch

    from .families import Family

METADATA_KEY = "db_adapters"
FORMAT_VERSION = 1


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


def tensors_by_component(
    tensors: dict[str, torch.Tensor], path: str | os.PathLike, family: type[Family]
) -> dict[str, dict[str, torch.Tensor]]:
    """Split `component.name` keys (diffusers' layout) per component; `AdapterError` for unknown ones or none
    for the denoiser.

    Args:
        tensors (`dict[str, Tensor]`): an adapter file's tensors.
        path (`str | PathLike`): the file, for messages.
        family (`type[Family]`): the pipeline's family: its denoiser and text encoders are the components.

    Example:
        >>> import torch
        >>> from db_adapters.families import get_family
        >>> sorted(tensors_by_component({"unet.a": torch.zeros(1)}, "x.safetensors", get_family("sd")))
        ['unet']
    """
    from .pivotal import KEY_PREFIX

    components = family.components()
    split: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        if key.startswith(KEY_PREFIX):
            continue  # pivotal tuning's token embeddings: `load_adapter` puts them in, not the strategy
        component, _, name = key.partition(".")
        if component not in components or not name:
            raise AdapterError(f"{str(path)!r}: unexpected tensor {key!r}; adapter keys start with {components}.")
        split.setdefault(component, {})[name] = tensor
    if family.denoiser not in split:
        raise AdapterError(
            f"{str(path)!r} holds no {family.denoiser} weights (no '{family.denoiser}.' keys); "
            "it is not a db-adapters adapter for this pipeline."
        )
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
    "file_format": str,  # the tensors' layout: "diffusers" (absent), "kohya" or "peft" (db_adapters.formats)
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
        raise AdapterError(
            f"{str(path)!r} has malformed db-adapters metadata, not JSON ({short_error(error)})."
        ) from None
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
