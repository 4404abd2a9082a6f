"""Adapter file formats people load: "diffusers" (db-adapters' own file, `pipe.load_lora_weights` reads a LoRA's),
"kohya" (A1111, ComfyUI: kohya's LoRA keys, `kohya.py`, or LyCORIS's LoHa/LoKr keys, `lycoris.py`) and "peft"
(`peft.py`).

The format modules are pure state-dict conversions; `convert` picks one, and `export_adapter` converts a
saved db-adapters file into another, read safely and written atomically. LoRA converts to every format,
LoHa and LoKr to kohya (on SD and SDXL); a full fine-tune holds whole weights, not adapter layers, and
OFT has no exact LyCORIS form (`lycoris.OFT_REFUSAL`).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import AdapterError, InputError
from ..pivotal import KEY_PREFIX as TOKEN_KEY_PREFIX

if TYPE_CHECKING:
    import torch

FORMATS = ("diffusers", "kohya", "peft")
# Our metadata's field naming the layout of a file's tensors; absent means "diffusers".
FILE_FORMAT_FIELD = "file_format"


def check_format(format: str) -> str:
    """`InputError` unless `format` is one of `FORMATS`.

    Example:
        >>> check_format("kohya")
        'kohya'
    """
    if format not in FORMATS:
        raise InputError(f"format={format!r} is not a known adapter file format; use one of {', '.join(FORMATS)}.")
    return format


def check_convertible(strategy: str, family: str | None, format: str) -> None:
    """`AdapterError` if an adapter of `strategy` on a `family` model cannot be written in `format`.

    Example:
        >>> check_convertible("loha", "sdxl", "kohya")
        >>> check_convertible("full", "sd", "kohya")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        db_adapters.errors.AdapterError: a full fine-tune cannot be written in kohya format: ...
    """
    from .lycoris import KINDS as LYCORIS_KINDS

    check_format(format)
    if format == "diffusers":
        return
    if strategy in LYCORIS_KINDS:
        if format == "peft":
            raise AdapterError(
                f"a {strategy} adapter is not written in peft format: that format holds LoRA layers and a "
                f"LoraConfig. The db-adapters {strategy} file already holds peft's own {strategy} state dict "
                "(under component. keys) and its peft config (header field 'peft_config'); for ComfyUI and "
                "A1111 use format 'kohya'."
            )
        from .lycoris import check_lycoris

        check_lycoris(strategy, family or "")
        return
    if strategy != "lora":
        held = "whole weights" if strategy == "full" else f"{strategy} layers"
        fuse = ", or bake it into a full pipeline folder with `db-adapt fuse`" if strategy == "full" else ""
        raise AdapterError(
            f"a {strategy} fine-tune cannot be written in {format} format: {format} files hold LoRA layers, and a "
            f"{strategy} fine-tune holds {held}. Save it in format 'diffusers' (load_adapter reads it){fuse}."
        )
    if format == "kohya":
        from .kohya import check_family

        check_family(family or "")


def convert(
    tensors: Mapping[str, torch.Tensor],
    header: Mapping[str, str],
    info: Mapping[str, Any],
    format: str,
    *,
    layers_per_block: int | None = None,
    text_model_level: bool = False,
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """A db-adapters adapter file's tensors and header as `format`'s tensors and header text.

    Args:
        tensors (`Mapping[str, Tensor]`): the file's tensors (LoRA: diffusers' layout; LoHa, LoKr: peft's).
        header (`Mapping[str, str]`): the file's header text (diffusers' `lora_adapter_metadata` or our
            `peft_config`, and ours).
        info (`Mapping[str, Any]`): our metadata, parsed (`unpack_metadata`).
        format (`str`): "diffusers", "kohya" or "peft".
        layers_per_block (`int | None`): SDXL's UNet `layers_per_block` for kohya's block numbers (None: inferred).
        text_model_level (`bool`): peft: whether CLIP text models have a `text_model.` level (transformers 4).

    Returns:
        The tensors and the header text, which keeps our metadata (with `file_format`) for `db-adapt inspect`.
    """
    from ..adapter_file import METADATA_KEY, pack_metadata

    check_convertible(info["strategy"], _family(info), format)
    ours = pack_metadata({**{k: v for k, v in info.items() if k != "format_version"}, FILE_FORMAT_FIELD: format})
    if format == "diffusers":
        return dict(tensors), {**header, METADATA_KEY: ours[METADATA_KEY]}
    if format == "kohya" and info["strategy"] != "lora":
        from .lycoris import lycoris_metadata, peft_configs, to_lycoris

        family = _family(info)
        configs = peft_configs(header)
        converted = to_lycoris(tensors, info["strategy"], configs, family, layers_per_block=layers_per_block)
        return converted, {"format": "pt", **lycoris_metadata(info, tensors, family), **ours}
    if format == "kohya":
        from .kohya import kohya_metadata, lora_context_widths, to_kohya

        family, alpha = _family(info), _alpha(info)
        scaled = _fold_layer_alphas(tensors, header, alpha)
        converted = to_kohya(scaled, family, alpha, layers_per_block=layers_per_block)
        metadata = kohya_metadata(info, family, context_widths=lora_context_widths(tensors))
        return converted, {"format": "pt", **metadata, **ours}
    from .peft import lora_configs, peft_metadata, to_peft

    components = sorted({key.partition(".")[0] for key in tensors})
    configs = lora_configs(header.get("lora_adapter_metadata"), components)
    converted = to_peft(tensors, text_model_level=text_model_level)
    return converted, {"format": "pt", **peft_metadata(configs), **ours}


def export_adapter(
    source: str | os.PathLike,
    output: str | os.PathLike,
    format: str,
    *,
    layers_per_block: int | None = None,
) -> Path:
    """Write the db-adapters file `source` as `format` to `output`, atomically; never unpickles anything.

    Args:
        source (`str | PathLike`): a db-adapters adapter file in its own ("diffusers") format.
        output (`str | PathLike`): the `.safetensors` file to write (not `source` itself).
        format (`str`): "diffusers", "kohya" or "peft".
        layers_per_block (`int | None`): SDXL to kohya: the UNet's `layers_per_block` (None: inferred).

    Example:
        >>> export_adapter("my_dog.safetensors", "my_dog_kohya.safetensors", "kohya")  # doctest: +SKIP
    """
    return write_converted(source, output, format, layers_per_block=layers_per_block, name=source)


def write_converted(
    source: str | os.PathLike,
    output: str | os.PathLike,
    format: str,
    *,
    layers_per_block: int | None,
    name: str | os.PathLike,
) -> Path:
    """`export_adapter`, with errors about the adapter naming `name` (`Adapter.save` converts a scratch file)."""
    from ..adapter_file import check_output_path, tensors_by_component, unpack_metadata
    from ..families import get_family
    from ..files import save_tensors
    from ..safe_reading import read_header, read_weights

    check_format(format)
    output = check_output_path(output)
    header = read_header(source)  # refuses a pickle by name and bytes, before anything else
    info = unpack_metadata(header.metadata, source)
    if Path(source).resolve() == output.resolve():
        raise InputError(f"output {str(output)!r} is the adapter file itself; write the export to another file.")
    held = info.get(FILE_FORMAT_FIELD) or "diffusers"
    if held != "diffusers":
        raise AdapterError(
            f"{str(name)!r} is already a {held}-format export; export from the db-adapters file it was made from."
        )
    try:
        check_convertible(info["strategy"], _family(info), format)
    except AdapterError as error:
        raise AdapterError(f"{str(name)!r}: {error}") from None
    # Pivotal tuning's token rows stay out: kohya and peft files hold layers, and A1111, ComfyUI and diffusers
    # read the tokens from the embedding file `Adapter.save` writes beside the adapter (name_emb.safetensors).
    every = read_weights(source)
    tensors = {key: t for key, t in every.items() if not key.startswith(TOKEN_KEY_PREFIX)}
    family = _family(info)
    if family is not None:
        try:
            spec = get_family(family)
        except InputError:
            raise AdapterError(f"{str(name)!r}: metadata names an unknown model family {family!r}.") from None
        tensors_by_component(tensors, source, spec)  # every key belongs to one of the family's components
    try:
        converted, metadata = convert(
            tensors,
            header.metadata,
            info,
            format,
            layers_per_block=layers_per_block,
            text_model_level=clip_has_text_model_level(),
        )
    except AdapterError as error:
        raise AdapterError(f"{str(name)!r}: {error}") from None
    written = save_tensors(output, converted, metadata)
    if info.get("new_tokens") and format != "diffusers":
        _write_embeddings(every, output, family)
    return written


def _write_embeddings(tensors: Mapping[str, torch.Tensor], output: Path, family: str | None) -> Path:
    """Pivotal tuning's token rows beside an export, as the textual-inversion file A1111 and ComfyUI read."""
    from ..adapter import embeddings_path
    from ..families import get_family
    from ..files import save_tensors
    from ..pivotal import embedding_file_tensors, rows_in_file

    spec = get_family(family or "")
    return save_tensors(embeddings_path(output), embedding_file_tensors(spec, rows_in_file(tensors)), {})


@functools.cache
def clip_has_text_model_level() -> bool:
    """Whether the installed transformers' `CLIPTextModel` nests its layers under `text_model.` (4.x; 5.x does not)."""
    from transformers import CLIPTextConfig, CLIPTextModel

    sizes = {"hidden_size": 4, "intermediate_size": 4, "num_hidden_layers": 1, "num_attention_heads": 1}
    config = CLIPTextConfig(vocab_size=8, bos_token_id=0, eos_token_id=1, pad_token_id=1, **sizes)
    return any(name.startswith("text_model.") for name, _ in CLIPTextModel(config).named_modules())


def _fold_layer_alphas(
    tensors: Mapping[str, torch.Tensor], header: Mapping[str, str], alpha: float
) -> dict[str, torch.Tensor]:
    """The LoRA weights with any layer's own alpha folded into its down weight, for a file of one alpha.

    The kohya file gives every layer the adapter's one alpha, so each scales by alpha / its rank; a layer
    with its own alpha (peft's `alpha_pattern`, as a LoRA extracted at per-layer ranks has) scales by its
    alpha / rank in peft. Its down weight times (its alpha / alpha) makes the two updates equal.
    """
    from peft.utils.other import get_pattern_key

    from .peft import lora_configs

    if "lora_adapter_metadata" not in header:  # no per-layer alphas recorded: every layer has the one alpha
        return dict(tensors)
    components = sorted({key.partition(".")[0] for key in tensors})
    configs = lora_configs(header["lora_adapter_metadata"], components)
    folded = {}
    for key, tensor in tensors.items():
        component, _, name = key.partition(".")
        pattern = configs[component].get("alpha_pattern") or {}
        if pattern and ".lora_A." in name:
            # peft's own lookup (a pattern matches a module name's dotted suffix, with or without `text_model.`).
            module = name.partition(".lora_A.")[0]
            own = pattern.get(get_pattern_key(list(pattern), module), configs[component].get("lora_alpha", alpha))
            tensor = tensor * (float(own) / alpha)
        folded[key] = tensor
    return folded


def _family(info: Mapping[str, Any]) -> str | None:
    return (info.get("base_model") or {}).get("family")


def _alpha(info: Mapping[str, Any]) -> float:
    config = info.get("strategy_config") or {}
    alpha = config.get("alpha") if config.get("alpha") is not None else config.get("rank")
    if isinstance(alpha, bool) or not isinstance(alpha, int | float) or alpha <= 0:
        raise AdapterError(f"metadata's LoRA alpha {alpha!r} is not a positive number; the file is damaged.")
    return float(alpha)


__all__ = ["FORMATS", "check_convertible", "check_format", "convert", "export_adapter"]
