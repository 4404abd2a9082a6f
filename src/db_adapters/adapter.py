"""The `Adapter`: what `personalize` returns, and the save / load / unload verbs around it.

A pipeline carries at most one db-adapters adapter at a time (see `attached_adapter`); a second
`personalize` or `load_adapter` on it is refused until `unload_adapter(pipe)` takes the first out.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import __version__
from .adapter_file import check_output_path, pack_metadata, unpack_metadata
from .errors import AdapterError, InputError
from .families import family_of
from .files import named_write_errors
from .pipelines import architecture_fingerprint, weights_fingerprint
from .safe_reading import read_header
from .strategies import Strategy, get_strategy

if TYPE_CHECKING:
    import torch
    from diffusers import DiffusionPipeline

_ATTRIBUTE = "_db_adapter"


class BaseModelWarning(UserWarning):
    """The adapter was trained on another checkpoint of the same architecture."""


@dataclass
class Adapter:
    """A trained subject adapter, attached to the pipeline it lives in.

    Attributes:
        identifier (`str`): the rare token bound to the subject, e.g. "olg".
        class_noun (`str`): the subject's class, e.g. "dog".
        instance_prompt (`str`): the training prompt, e.g. "a olg dog".
        strategy (`Strategy`): the strategy whose weights are in the pipeline.
        history (`list[dict]`): per-step losses of the training run (empty after `load_adapter`).
    """

    identifier: str
    class_noun: str
    instance_prompt: str
    strategy: Strategy
    base_model: dict[str, str]
    resolution: int
    steps: int
    pipe: Any = field(repr=False, default=None)
    history: list[dict[str, float]] = field(default_factory=list, repr=False)
    extra: dict[str, Any] = field(default_factory=dict, repr=False)

    def metadata(self) -> dict[str, Any]:
        """Everything the file's header records about this adapter (JSON-able)."""
        return {
            "identifier": self.identifier,
            "class_noun": self.class_noun,
            "instance_prompt": self.instance_prompt,
            "strategy": self.strategy.name,
            "strategy_config": self.strategy.config(),
            "train_text_encoder": self.strategy.train_text_encoder,
            "base_model": self.base_model,
            "resolution": self.resolution,
            "steps": self.steps,
            "library_version": __version__,
            **self.extra,
        }

    def save(self, path: str | os.PathLike, dtype: torch.dtype | str | None = None, format: str = "diffusers") -> Path:
        """Write the adapter to one safetensors file, atomically.

        Launched as several processes (torchrun, accelerate launch), call it on every process: the
        main process writes the file and the others return at once without waiting for it.

        Args:
            path (`str | PathLike`): a `.safetensors` file name; its folder is created if needed.
            dtype (`torch.dtype | str | None`): store weights as float16/bfloat16 to halve the file;
                None keeps them as trained (fp32).
            format (`str`): "diffusers" (default: `load_adapter` reads it, and `pipe.load_lora_weights` a
                LoRA's), "kohya" (the keys A1111 and ComfyUI read: LoRA on SD, SDXL, Flux; LoHa and LoKr on SD,
                SDXL as LyCORIS keys) or "peft" (LoRA in peft's keys and `LoraConfig`). Full fine-tunes and OFT
                are written in the diffusers format only; `load_adapter` reads the diffusers file.

        Example:
            >>> adapter.save("my_dog.safetensors")  # doctest: +SKIP
            >>> adapter.save("my_dog_comfyui.safetensors", format="kohya")  # doctest: +SKIP
        """
        from .formats import check_convertible

        path = check_output_path(path)
        if self.pipe is None or attached_adapter(self.pipe) is not self:
            raise AdapterError("this adapter is no longer attached to its pipeline (it was unloaded); cannot save.")
        check_convertible(self.strategy.name, self.base_model.get("family"), format)
        dtype = _as_dtype(dtype)
        from .distributed import processes

        if not processes(self.pipe.device).is_main:
            return path  # several processes trained it; the main process alone writes the file
        path.parent.mkdir(parents=True, exist_ok=True)
        # A strategy may write scratch files with other writers (diffusers' for LoRA): a full disk there
        # is reported as an OSError naming `path` too.
        with named_write_errors(path):
            if format == "diffusers":
                self.strategy.save(self.pipe, path, pack_metadata(self.metadata()), dtype)
            else:
                self._save_converted(path, dtype, format)
        return path

    def _save_converted(self, path: Path, dtype: torch.dtype | None, format: str) -> None:
        # Our own file first, in a scratch folder beside `path`, then converted from it: the same code path
        # as `db-adapt export`, so a saved file and an exported one are alike.
        import tempfile

        from .formats import write_converted

        unet_config = getattr(getattr(self.pipe, "unet", None), "config", None)
        layers_per_block = getattr(unet_config, "layers_per_block", None)
        with tempfile.TemporaryDirectory(prefix=".db-adapters-", dir=path.parent) as scratch:
            staged = Path(scratch) / "adapter.safetensors"
            self.strategy.save(self.pipe, staged, pack_metadata(self.metadata()), dtype)
            write_converted(staged, path, format, layers_per_block=layers_per_block, name=path)


def attached_adapter(pipe: Any) -> Adapter | None:
    """The db-adapters adapter a pipeline carries, or None."""
    return getattr(pipe, _ATTRIBUTE, None)


def attach(pipe: Any, adapter: Adapter) -> None:
    adapter.pipe = pipe
    object.__setattr__(pipe, _ATTRIBUTE, adapter)


def refuse_if_adapted(pipe: Any) -> None:
    """Raise `AdapterError` if the pipeline already carries an adapter (ours or any peft LoRA)."""
    current = attached_adapter(pipe)
    if current is not None:
        raise AdapterError(
            f"this pipeline already carries the adapter for {current.instance_prompt!r}; "
            "call db_adapters.unload_adapter(pipe) first (one adapter per pipeline)."
        )
    for component in family_of(pipe).components():
        module = getattr(pipe, component, None)
        if module is not None and _has_lora_layers(module):
            raise AdapterError(
                f"the pipeline's {component} already carries LoRA layers ({', '.join(sorted(module.peft_config))}); "
                "take them out with pipe.unload_lora_weights(), or make them part of the base weights with "
                "pipe.fuse_lora() then pipe.unload_lora_weights(), and try again."
            )


def _has_lora_layers(module: Any) -> bool:
    # After fuse_lora() + unload_lora_weights() diffusers may leave an empty or stale `peft_config`
    # behind, with no layer left: only injected layers make a pipeline carry someone else's adapter.
    from peft.tuners.tuners_utils import BaseTunerLayer

    return bool(getattr(module, "peft_config", None)) and any(isinstance(m, BaseTunerLayer) for m in module.modules())


def load_adapter(pipe: DiffusionPipeline, path: str | os.PathLike) -> Adapter:
    """Put a saved adapter into a pipeline; the pipeline then generates the subject.

    Args:
        pipe (`DiffusionPipeline`): a pipeline of the model the adapter was trained on.
        path (`str | PathLike`): the adapter's `.safetensors` file.

    Returns:
        The `Adapter`, with `.identifier` to use in prompts.

    Example:
        >>> adapter = load_adapter(pipe, "my_dog.safetensors")  # doctest: +SKIP
        >>> image = pipe(f"a {adapter.identifier} dog on the beach").images[0]  # doctest: +SKIP
    """
    family = family_of(pipe)
    # Everything that can be checked from the header is, before the pipeline is touched: a pickle is
    # refused by name, a damaged file or metadata of the wrong types is an AdapterError naming the file.
    info = unpack_metadata(read_header(path).metadata, path)
    held = info.get("file_format") or "diffusers"
    if held != "diffusers":
        loader = {"kohya": "pipe.load_lora_weights(path), A1111 or ComfyUI", "peft": "peft"}.get(held, "its tool")
        if held == "kohya" and info["strategy"] != "lora":
            loader = "ComfyUI or A1111"  # LyCORIS keys, which diffusers' SD and SDXL loaders do not read
        raise AdapterError(
            f"{str(path)!r} is a {held}-format export; load_adapter reads db-adapters' own (diffusers-format) "
            f"file. Load this one with {loader}, or load the file it was exported from."
        )
    refuse_if_adapted(pipe)
    _check_base_model(pipe, family, info, path)
    strategy = _strategy_of(info, path)
    # A strategy's `load` checks the weights against the pipeline and, if it raises, leaves it as it was.
    strategy.load(pipe, family, Path(path))
    trained_text_encoder = info.get("train_text_encoder")
    if trained_text_encoder is not None and strategy.train_text_encoder != trained_text_encoder:
        strategy.remove(pipe)
        held = "holds" if strategy.train_text_encoder else "holds no"
        raise AdapterError(
            f"{str(path)!r}: its metadata says train_text_encoder={trained_text_encoder} but the file {held} "
            "text-encoder weights; the file is damaged or was edited."
        )
    adapter = Adapter(
        identifier=info["identifier"],
        class_noun=info["class_noun"],
        instance_prompt=info["instance_prompt"],
        strategy=strategy,
        base_model=info.get("base_model") or {},
        resolution=info.get("resolution") or 0,
        steps=info.get("steps") or 0,
    )
    attach(pipe, adapter)
    return adapter


def load_for_generation(pipe: DiffusionPipeline, path: str | os.PathLike) -> str:
    """Put an adapter file into a pipeline to render with it, and return the adapter's identifier.

    Reads db-adapters' own files (`load_adapter`) and kohya LoRA exports, the latter through the pipeline's
    own `load_lora_weights` (diffusers' kohya reader), so a kohya file renders as A1111 and ComfyUI users
    get it. A LyCORIS (LoHa, LoKr) kohya file is refused: diffusers' SD and SDXL loaders do not read it.

    Args:
        pipe (`DiffusionPipeline`): a pipeline of the model the adapter was trained on, carrying no adapter.
        path (`str | PathLike`): the adapter's `.safetensors` file (db-adapters' own, or its kohya export).

    Example:
        >>> identifier = load_for_generation(pipe, "my_dog_kohya.safetensors")  # doctest: +SKIP
    """
    info = unpack_metadata(read_header(path).metadata, path)
    if (info.get("file_format") or "diffusers") != "kohya":
        return load_adapter(pipe, path).identifier
    if info["strategy"] != "lora":
        raise AdapterError(
            f"{str(path)!r} is a {info['strategy']} adapter in LyCORIS/kohya keys, a file for ComfyUI and A1111; "
            "diffusers does not load it. Generate from the db-adapters file it was exported from."
        )
    refuse_if_adapted(pipe)
    _check_base_model(pipe, family_of(pipe), info, path)
    try:
        pipe.load_lora_weights(str(path))
    except (ValueError, KeyError, RuntimeError) as error:
        raise AdapterError(f"{str(path)!r}: diffusers' kohya reader could not load it ({error}).") from None
    return info["identifier"]


def _strategy_of(info: dict[str, Any], path: str | os.PathLike) -> Strategy:
    # A bad strategy name or option in a file is a damaged adapter, not a mistake in the caller's input.
    try:
        return get_strategy(info["strategy"])(**info["strategy_config"])
    except (InputError, TypeError) as error:
        raise AdapterError(f"{str(path)!r}: metadata names a strategy it cannot build ({error}).") from None


def unload_adapter(pipe: DiffusionPipeline) -> None:
    """Take the db-adapters adapter out of a pipeline: it is the base model again.

    Args:
        pipe (`DiffusionPipeline`): a pipeline returned to by `personalize` or `load_adapter`.

    Example:
        >>> unload_adapter(pipe)  # doctest: +SKIP
    """
    adapter = attached_adapter(pipe)
    if adapter is None:
        raise AdapterError("this pipeline carries no db-adapters adapter; nothing to unload.")
    adapter.strategy.remove(pipe)
    object.__delattr__(pipe, _ATTRIBUTE)
    adapter.pipe = None


def _check_base_model(pipe: DiffusionPipeline, family: Any, info: dict[str, Any], path: str | os.PathLike) -> None:
    base = info.get("base_model") or {}
    if not isinstance(base, dict):
        raise AdapterError(f"{str(path)!r}: metadata field 'base_model' is not a JSON object.")
    if base.get("family", family.name) != family.name:
        raise AdapterError(
            f"{str(path)!r} was trained on a {base['family']!r} model ({base.get('model_id') or 'unknown'}); this "
            f"pipeline is {family.title}. Load it into a pipeline of the model it was trained on."
        )
    if base.get("architecture") and base["architecture"] != architecture_fingerprint(pipe):
        raise AdapterError(
            f"{str(path)!r} was trained on another architecture ({base.get('model_id') or 'unknown model'}); "
            "load it into a pipeline of that model."
        )
    if base.get("weights") and base["weights"] != weights_fingerprint(pipe):
        warnings.warn(
            f"{str(path)!r} was trained on another checkpoint ({base.get('model_id') or 'unknown'}) of this "
            "architecture; results may differ from what was trained.",
            BaseModelWarning,
            stacklevel=2,
        )


def _as_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    import torch

    if dtype is None or isinstance(dtype, torch.dtype):
        if dtype not in (None, torch.float32, torch.float16, torch.bfloat16):
            raise AdapterError(f"dtype {dtype} is not supported; use float32, float16 or bfloat16.")
        return dtype
    names = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16, "float16": torch.float16}
    names |= {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16}
    if dtype not in names:
        raise AdapterError(f"dtype {dtype!r} is not supported; use float32, float16 or bfloat16.")
    return names[dtype]
