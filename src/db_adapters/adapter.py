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
        subjects (`list[dict]`): every subject the adapter holds, in training order, each with its
            "identifier", "class_noun", "instance_prompt" and "class_prompt"; the first is also
            `identifier`, `class_noun` and `instance_prompt`.
        tokens (`list[str]`): pivotal tuning's new tokens (["<s0>", "<s1>"]), in the pipeline's CLIP
            tokenizers while the adapter is attached; empty without pivotal tuning.
        history (`list[dict]`): per-step losses of the training run (empty after `load_adapter`).
    """

    identifier: str
    class_noun: str
    instance_prompt: str
    strategy: Strategy
    base_model: dict[str, str]
    resolution: int
    steps: int
    subjects: list[dict[str, str]] = field(default_factory=list)
    tokens: list[str] = field(default_factory=list)
    pipe: Any = field(repr=False, default=None)
    history: list[dict[str, float]] = field(default_factory=list, repr=False)
    extra: dict[str, Any] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if not self.subjects:  # a one-subject adapter (or one from a file written before `subjects`)
            self.subjects = [
                {"identifier": self.identifier, "class_noun": self.class_noun, "instance_prompt": self.instance_prompt}
            ]

    @property
    def identifiers(self) -> list[str]:
        """Every subject's identifier, in training order.

        Example:
            >>> adapter.identifiers  # doctest: +SKIP
            ['ki', 'olg']
        """
        return [subject["identifier"] for subject in self.subjects]

    def metadata(self) -> dict[str, Any]:
        """Everything the file's header records about this adapter (JSON-able)."""
        return {
            "identifier": self.identifier,
            "class_noun": self.class_noun,
            "instance_prompt": self.instance_prompt,
            "subjects": self.subjects,
            "new_tokens": self.tokens,
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
        dtype = as_dtype(dtype)
        from .distributed import processes

        if not processes(self.pipe.device).is_main:
            return path  # several processes trained it; the main process alone writes the file
        path.parent.mkdir(parents=True, exist_ok=True)
        # A strategy may write scratch files with other writers (diffusers' for LoRA): a full disk there
        # is reported as an OSError naming `path` too.
        with named_write_errors(path):
            if format == "diffusers" and self.tokens:
                self._save_with_tokens(path, dtype)
            elif format == "diffusers":
                self.strategy.save(self.pipe, path, pack_metadata(self.metadata()), dtype)
            else:
                self._save_converted(path, dtype, format)
            if self.tokens:
                self.save_embeddings(embeddings_path(path), dtype)
        return path

    def save_embeddings(self, path: str | os.PathLike, dtype: torch.dtype | str | None = None) -> Path:
        """Write pivotal tuning's token embeddings as a textual-inversion file (`Adapter.save` writes it too).

        The file is what diffusers' `pipe.load_textual_inversion(path, token=[...])` reads (SD 1.x/2.x:
        `emb_params`; SDXL: `clip_l` / `clip_g`, per encoder, as A1111 and ComfyUI read SDXL embeddings).

        Args:
            path (`str | PathLike`): a `.safetensors` file name.
            dtype (`torch.dtype | str | None`): float16/bfloat16 to halve the file; None keeps float32.

        Example:
            >>> adapter.save_embeddings("my_dog_emb.safetensors")  # doctest: +SKIP
        """
        from .files import save_tensors
        from .pivotal import embedding_file_tensors, pipeline_rows

        if not self.tokens:
            raise AdapterError("this adapter has no token embeddings (it was trained without pivotal_tokens).")
        path = check_output_path(path)
        family = family_of(self.pipe)
        rows, dtype = pipeline_rows(self.pipe, family, self.tokens), as_dtype(dtype)
        rows = {component: tensor.to(dtype) for component, tensor in rows.items()} if dtype else rows
        return save_tensors(path, embedding_file_tensors(family, rows), {"tokens": ",".join(self.tokens)})

    def _save_with_tokens(self, path: Path, dtype: torch.dtype | None) -> None:
        # The strategy writes its file (into a scratch folder beside `path`); the token rows join it, under keys
        # plain diffusers' load_lora_weights skips (see pivotal.KEY_PREFIX), and the whole moves into place.
        import tempfile

        from .files import save_tensors
        from .pivotal import file_tensors, pipeline_rows
        from .safe_reading import read_file_metadata, read_tensors

        rows = pipeline_rows(self.pipe, family_of(self.pipe), self.tokens)
        with tempfile.TemporaryDirectory(prefix=".db-adapters-", dir=path.parent) as scratch:
            staged = Path(scratch) / "adapter.safetensors"
            self.strategy.save(self.pipe, staged, pack_metadata(self.metadata()), dtype)
            save_tensors(path, {**read_tensors(staged), **file_tensors(rows, dtype)}, read_file_metadata(staged))

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


def embeddings_path(path: str | os.PathLike) -> Path:
    """Where `Adapter.save` writes the token embeddings beside an adapter file: `name_emb.safetensors`
    (the name diffusers' advanced DreamBooth script gives them).

    Example:
        >>> embeddings_path("runs/my_dog.safetensors").name
        'my_dog_emb.safetensors'
    """
    path = Path(path)
    return path.with_name(f"{path.stem}_emb{path.suffix}")


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
    check_base_model(pipe, family, info, path)
    strategy = _strategy_of(info, path)
    tokens, rows = _tokens_of(info, path)
    # A strategy's `load` checks the weights against the pipeline and, if it raises, leaves it as it was.
    strategy.load(pipe, family, Path(path))
    subjects = _subjects_of(info, path)
    if tokens:
        subjects, tokens = _load_tokens(pipe, family, strategy, subjects, tokens, rows, path)
    trained_text_encoder = info.get("train_text_encoder")
    if trained_text_encoder is not None and strategy.train_text_encoder != trained_text_encoder:
        strategy.remove(pipe)
        held = "holds" if strategy.train_text_encoder else "holds no"
        raise AdapterError(
            f"{str(path)!r}: its metadata says train_text_encoder={trained_text_encoder} but the file {held} "
            "text-encoder weights; the file is damaged or was edited."
        )
    first = subjects[0] if subjects else info
    adapter = Adapter(
        identifier=first["identifier"],
        class_noun=first["class_noun"],
        instance_prompt=first["instance_prompt"],
        strategy=strategy,
        base_model=info.get("base_model") or {},
        resolution=info.get("resolution") or 0,
        steps=info.get("steps") or 0,
        subjects=subjects,
        tokens=tokens,
    )
    attach(pipe, adapter)
    return adapter


def _subjects_of(info: dict[str, Any], path: str | os.PathLike) -> list[dict[str, str]]:
    subjects = info.get("subjects")
    if subjects is None:
        return []  # written before several subjects: the one subject is identifier / class_noun / prompt
    fields = ("identifier", "class_noun", "instance_prompt")
    if (
        not isinstance(subjects, list)
        or not subjects
        or not all(isinstance(s, dict) and all(isinstance(s.get(f), str) for f in fields) for s in subjects)
    ):
        raise AdapterError(f"{str(path)!r}: metadata field 'subjects' is not a list of subjects; the file is damaged.")
    return subjects


def _tokens_of(info: dict[str, Any], path: str | os.PathLike) -> tuple[list[str], dict[str, torch.Tensor]]:
    from .pivotal import rows_in_file
    from .safe_reading import read_weights

    tokens = info.get("new_tokens") or []
    if not isinstance(tokens, list) or not all(isinstance(t, str) and t for t in tokens):
        raise AdapterError(f"{str(path)!r}: metadata field 'new_tokens' is not a list of tokens; the file is damaged.")
    if not tokens:
        return [], {}
    rows = rows_in_file(read_weights(path))
    if not rows:
        raise AdapterError(f"{str(path)!r}: its metadata names new tokens {tokens} but it holds no token embeddings.")
    return tokens, rows


def _load_tokens(
    pipe: Any,
    family: Any,
    strategy: Strategy,
    subjects: list[dict[str, str]],
    tokens: list[str],
    rows: dict[str, torch.Tensor],
    path: str | os.PathLike,
) -> tuple[list[dict[str, str]], list[str]]:
    """Put pivotal tuning's tokens in (renamed if another adapter holds their names); the subjects' prompts
    with the names used. If it fails, the strategy's weights come out again."""
    from .pivotal import free_tokens, load_tokens, renamed, token_encoders

    expected = set(token_encoders(family))
    if set(rows) != expected:
        strategy.remove(pipe)
        raise AdapterError(
            f"{str(path)!r} holds token embeddings for {sorted(rows)}; this pipeline's tokens go in {sorted(expected)}."
        )
    mapping = free_tokens(pipe, family, tokens)
    try:
        load_tokens(pipe, family, [mapping[t] for t in tokens], rows)
    except BaseException:
        strategy.remove(pipe)
        raise
    subjects = [{key: renamed(value, mapping) for key, value in subject.items()} for subject in subjects]
    return subjects, [mapping[t] for t in tokens]


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
    check_base_model(pipe, family_of(pipe), info, path)
    rows = _export_embeddings(pipe, info, path)
    try:
        pipe.load_lora_weights(str(path))
    except (ValueError, KeyError, RuntimeError) as error:
        raise AdapterError(f"{str(path)!r}: diffusers' kohya reader could not load it ({error}).") from None
    if rows:
        from .pivotal import load_tokens

        try:
            load_tokens(pipe, family_of(pipe), info["new_tokens"], rows)
        except BaseException:
            pipe.unload_lora_weights()
            raise
    return info["identifier"]


def _export_embeddings(pipe: Any, info: dict[str, Any], path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A pivotal-tuning export's token rows, from the embedding file written beside it (empty without tokens)."""
    from .pivotal import rows_from_embedding_file
    from .safe_reading import read_weights

    if not info.get("new_tokens"):
        return {}
    embeddings = embeddings_path(path)
    if not embeddings.is_file():
        raise AdapterError(
            f"{str(path)!r} was trained with pivotal tuning; its token embeddings are in {embeddings.name}, which is "
            "not beside it. Put it there, or generate from the db-adapters file."
        )
    try:
        return rows_from_embedding_file(family_of(pipe), read_weights(embeddings))
    except AdapterError as error:
        raise AdapterError(f"{str(embeddings)!r}: {error}") from None


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
    if adapter.tokens:
        from .pivotal import unload_tokens

        unload_tokens(pipe, family_of(pipe), adapter.tokens)
    object.__delattr__(pipe, _ATTRIBUTE)
    adapter.pipe = None


def check_base_model(pipe: DiffusionPipeline, family: Any, info: dict[str, Any], path: str | os.PathLike) -> None:
    """`AdapterError` unless `pipe` is of the family and architecture the adapter file `path` records in `info`.

    Another checkpoint of the same architecture is allowed, with a `BaseModelWarning`.

    Args:
        pipe (`DiffusionPipeline`): the pipeline the adapter goes into.
        family (`type[Family]`): the pipeline's family (`family_of(pipe)`).
        info (`dict`): the file's metadata (`unpack_metadata`).
        path (`str | PathLike`): the file, for messages.

    Example:
        >>> check_base_model(pipe, family_of(pipe), unpack_metadata(header, path), path)  # doctest: +SKIP
    """
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


def as_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    """A save dtype by name ("fp16", "bfloat16", ...) or as a torch dtype; `AdapterError` for any other.

    Example:
        >>> as_dtype("fp16")
        torch.float16
    """
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
