"""The `Adapter`: what `personalize` returns, and the save / load / mix / unload verbs around it.

A pipeline may carry several db-adapters adapters at once, each under its own name
(`attached_adapters`): `load_adapter(pipe, path, name=...)` adds one, `set_adapter_weights` mixes
them, `unload_adapter(pipe, name)` takes one out and leaves the others as they were. Adapters share
a pipeline only when their strategies can be mixed (the same `Strategy.mix_group`: LoRA with DoRA,
LoHa with LoHa, LoKr with LoKr); a full fine-tune or an OFT adapter is alone in its pipeline.
`personalize` trains on a pipeline without adapters only.
"""

from __future__ import annotations

import math
import os
import re
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from numbers import Real
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import __version__
from .adapter_file import check_output_path, pack_metadata, unpack_metadata
from .errors import AdapterError, InputError
from .families import family_of
from .files import named_write_errors
from .pipelines import architecture_fingerprint, weights_fingerprint
from .safe_reading import read_header
from .strategies import Strategy, available_strategies, get_strategy

if TYPE_CHECKING:
    import torch
    from diffusers import DiffusionPipeline

# On the pipeline: the adapters it carries by name, in loading order, and their weights.
_ATTRIBUTE = "_db_adapters"
_WEIGHTS = "_db_adapter_weights"
_NAME = re.compile(r"[A-Za-z0-9_-]+")


class BaseModelWarning(UserWarning):
    """The adapter was trained on another checkpoint of the same architecture."""


@dataclass
class Adapter:
    """A trained subject adapter, attached to the pipeline it lives in.

    Attributes:
        name (`str`): its name in the pipeline: the file's stem after `load_adapter` ("dog" for
            dog.safetensors) unless given, "dreambooth" after `personalize`.
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

    @property
    def name(self) -> str:
        """The adapter's name in its pipeline (its layers' peft adapter name)."""
        return self.strategy.adapter_name

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
        main process writes the file and the others return at once without waiting for it. In a
        pipeline carrying several adapters, the file holds this adapter's weights only.

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
        if self.pipe is None or attached_adapters(self.pipe).get(self.name) is not self:
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


def attached_adapters(pipe: Any) -> dict[str, Adapter]:
    """The db-adapters adapters a pipeline carries, by name, in the order they came in (empty: none).

    Args:
        pipe (`DiffusionPipeline`): any pipeline.

    Example:
        >>> dog = load_adapter(pipe, "dog.safetensors")  # doctest: +SKIP
        >>> cat = load_adapter(pipe, "cat.safetensors")  # doctest: +SKIP
        >>> list(attached_adapters(pipe))  # doctest: +SKIP
        ['dog', 'cat']
    """
    return dict(getattr(pipe, _ATTRIBUTE, {}))


def attached_adapter(pipe: Any) -> Adapter | None:
    """The one db-adapters adapter a pipeline carries, or None; `AdapterError` if it carries several.

    Args:
        pipe (`DiffusionPipeline`): any pipeline.

    Example:
        >>> adapter = personalize(pipe, "photos/", "dog")  # doctest: +SKIP
        >>> attached_adapter(pipe) is adapter  # doctest: +SKIP
        True
    """
    adapters = attached_adapters(pipe)
    if len(adapters) > 1:
        raise AdapterError(
            f"this pipeline carries {len(adapters)} adapters ({', '.join(map(repr, adapters))}); "
            "pick one from db_adapters.attached_adapters(pipe), a dict by name."
        )
    return next(iter(adapters.values()), None)


def attach(pipe: Any, adapter: Adapter) -> None:
    """Record that `pipe` carries `adapter` (whose layers are in it), under its name, at weight 1."""
    if not hasattr(pipe, _ATTRIBUTE):
        # Plain attributes, not pipeline components: object.__setattr__ keeps diffusers' config out of it.
        object.__setattr__(pipe, _ATTRIBUTE, {})
        object.__setattr__(pipe, _WEIGHTS, {})
    getattr(pipe, _ATTRIBUTE)[adapter.name] = adapter
    getattr(pipe, _WEIGHTS)[adapter.name] = 1.0
    adapter.pipe = pipe


def detach(pipe: Any, adapter: Adapter) -> None:
    """Record that `pipe` no longer carries `adapter` (its layers were taken out, or fused)."""
    adapters, weights = getattr(pipe, _ATTRIBUTE), getattr(pipe, _WEIGHTS)
    del adapters[adapter.name]
    del weights[adapter.name]
    if not adapters:
        object.__delattr__(pipe, _ATTRIBUTE)
        object.__delattr__(pipe, _WEIGHTS)
    adapter.pipe = None


def refuse_if_adapted(pipe: Any) -> None:
    """`AdapterError` if the pipeline carries any adapter, ours or a peft LoRA: `personalize` trains bare ones."""
    adapters = attached_adapters(pipe)
    if adapters:
        raise AdapterError(
            f"this pipeline already carries the adapter(s) {_described(adapters.values())}; personalize trains a "
            "pipeline without adapters: call db_adapters.unload_adapter(pipe) first (it takes them all out), or use "
            "a fresh pipeline."
        )
    _refuse_foreign_layers(pipe, ours=())


def _refuse_foreign_layers(pipe: Any, ours: Iterable[str]) -> None:
    for component in family_of(pipe).components():
        module = getattr(pipe, component, None)
        foreign = sorted(_adapters_in_layers(module) - set(ours)) if module is not None else []
        if foreign:
            raise AdapterError(
                f"the pipeline's {component} already carries LoRA layers ({', '.join(foreign)}); "
                "take them out with pipe.unload_lora_weights(), or make them part of the base weights with "
                "pipe.fuse_lora() then pipe.unload_lora_weights(), and try again."
            )


def _adapters_in_layers(module: Any) -> set[str]:
    # The names held by injected layers: after fuse_lora() + unload_lora_weights() diffusers may leave
    # an empty or stale `peft_config` behind, with no layer left, which carries no adapter.
    from peft.tuners.tuners_utils import BaseTunerLayer

    return {
        name
        for layer in module.modules()
        if isinstance(layer, BaseTunerLayer)
        for attribute in layer.adapter_layer_names
        for name in getattr(layer, attribute)
    }


def load_adapter(pipe: DiffusionPipeline, path: str | os.PathLike, name: str | None = None) -> Adapter:
    """Put a saved adapter into a pipeline, beside the ones it carries; the pipeline then generates the subject.

    Adapters share a pipeline when their strategies mix (LoRA with DoRA, LoHa with LoHa, LoKr with
    LoKr); each starts at weight 1 (see `set_adapter_weights`). A full fine-tune or an OFT adapter
    must be alone in its pipeline.

    Args:
        pipe (`DiffusionPipeline`): a pipeline of the model the adapter was trained on.
        path (`str | PathLike`): the adapter's `.safetensors` file.
        name (`str | None`): its name in the pipeline, for `set_adapter_weights` and `unload_adapter`:
            letters, digits, "_" and "-". None: the file's stem (`default_adapter_name`: "dog" for
            dog.safetensors, "dog_v2" for dog.v2.safetensors). A name in use is refused.

    Returns:
        The `Adapter`, with `.identifier` to use in prompts and `.name`.

    Example:
        >>> adapter = load_adapter(pipe, "my_dog.safetensors")  # doctest: +SKIP
        >>> image = pipe(f"a {adapter.identifier} dog on the beach").images[0]  # doctest: +SKIP
        >>> cat = load_adapter(pipe, "cat_v2.safetensors", name="cat")  # doctest: +SKIP
        >>> image = pipe(f"a {adapter.identifier} dog and a {cat.identifier} cat").images[0]  # doctest: +SKIP
    """
    family = family_of(pipe)
    name = _adapter_name(name, path)
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
    present = attached_adapters(pipe)
    _refuse_name_in_use(present, name, path)
    _refuse_foreign_layers(pipe, ours=present)
    strategy = _strategy_of(info, path)
    _refuse_unmixable(strategy, present.values(), path)
    check_base_model(pipe, family, info, path)
    strategy.adapter_name = name
    tokens, rows = _tokens_of(info, path)
    subjects = _subjects_of(info, path)
    # A strategy's `load` checks the weights against the pipeline and, if it raises, leaves it as it was.
    strategy.load(pipe, family, Path(path))
    if tokens:
        subjects, tokens = _load_tokens(pipe, family, strategy, subjects, tokens, rows, path)
    trained_text_encoder = info.get("train_text_encoder")
    if trained_text_encoder is not None and strategy.train_text_encoder != trained_text_encoder:
        strategy.remove(pipe)
        _apply_weights(pipe)
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
    _apply_weights(pipe)  # adding an adapter makes it the only active one; all act, each at its weight
    _warn_if_identifier_shared(adapter, present.values())
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


def _warn_if_identifier_shared(adapter: Adapter, others: Iterable[Adapter]) -> None:
    # The binder picks the same rare token for the same seed: two subjects trained with the defaults share it.
    for other in others:
        if other.identifier == adapter.identifier:
            warnings.warn(
                f"adapters {other.name!r} and {adapter.name!r} share the identifier {adapter.identifier!r}, so a "
                "prompt cannot ask for one without the other; train one of them with another identifier "
                "(identifier=..., or another seed).",
                stacklevel=3,
            )


def default_adapter_name(path: str | os.PathLike) -> str:
    """The name `load_adapter` gives the adapter in `path` when none is given: the file's stem, with "_"
    for each run of characters other than letters, digits, "_" and "-".

    Args:
        path (`str | PathLike`): an adapter file.

    Example:
        >>> default_adapter_name("adapters/dog.safetensors"), default_adapter_name("my dog v1.5.safetensors")
        ('dog', 'my_dog_v1_5')
    """
    return re.sub(r"[^A-Za-z0-9_-]+", "_", Path(path).stem)


def _adapter_name(name: str | None, path: str | os.PathLike) -> str:
    if name is None:
        return default_adapter_name(path)
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise InputError(f"adapter name {name!r}: use letters, digits, '_' and '-' only, e.g. name='dog'.")
    return name


def _refuse_name_in_use(present: dict[str, Adapter], name: str, path: str | os.PathLike) -> None:
    if name in present:
        raise AdapterError(
            f"this pipeline already carries an adapter named {name!r} (for {present[name].instance_prompt!r}); "
            f"load {str(path)!r} under another name, load_adapter(pipe, path, name=...), or take the other out "
            f"first with db_adapters.unload_adapter(pipe, {name!r})."
        )


def _refuse_unmixable(strategy: Strategy, present: Iterable[Adapter], path: str | os.PathLike) -> None:
    others = [a for a in present if strategy.mix_group is None or a.strategy.mix_group != strategy.mix_group]
    if others:
        raise AdapterError(
            f"{str(path)!r} is a {strategy.name} adapter and this pipeline carries {_described(others)}; "
            f"{_mixing_rule()}. Unload with db_adapters.unload_adapter(pipe, name), or use another pipeline."
        )


def _mixing_rule() -> str:
    """Which strategies' adapters can share a pipeline, from the registry, for error messages."""
    groups: dict[str | None, list[str]] = {}
    for name in available_strategies():
        groups.setdefault(get_strategy(name).mix_group, []).append(name)
    alone = groups.pop(None, [])
    # "dora with lora" for a group of several strategies, "loha with loha" for a group of one.
    mixing = "; ".join(" with ".join(names if len(names) > 1 else names * 2) for names in groups.values())
    return f"adapters share a pipeline only as {mixing}; {' and '.join(alone)} adapters must be alone in it"


def _described(adapters: Iterable[Adapter]) -> str:
    return ", ".join(f"{a.name!r} ({a.strategy.name}, {a.instance_prompt!r})" for a in adapters)


def set_adapter_weights(pipe: DiffusionPipeline, weights: Mapping[str, float]) -> None:
    """Set how strongly each adapter the pipeline carries acts; the ones left out keep their weight.

    Built on diffusers' `pipe.set_adapters`: each adapter's update is scaled by its weight (1: as
    trained, 0: off; the default after loading is 1), so adapters loaded together mix. A DoRA
    adapter's learned magnitudes stay at weight 0, as in diffusers: only its direction update scales.

    Args:
        pipe (`DiffusionPipeline`): a pipeline carrying db-adapters adapters.
        weights (`Mapping[str, float]`): adapter name -> weight, a finite number.

    Example:
        >>> dog = load_adapter(pipe, "dog.safetensors")  # doctest: +SKIP
        >>> cat = load_adapter(pipe, "cat.safetensors")  # doctest: +SKIP
        >>> set_adapter_weights(pipe, {"dog": 1.0, "cat": 0.7})  # doctest: +SKIP
    """
    adapters = attached_adapters(pipe)
    if not adapters:
        raise AdapterError("this pipeline carries no db-adapters adapter to weight; load some with load_adapter.")
    if not isinstance(weights, Mapping):
        raise InputError(f"weights must be a dict of adapter name -> weight, e.g. {{'dog': 1.0}}; got {weights!r}.")
    for name, weight in weights.items():
        if name not in adapters:
            raise AdapterError(f"this pipeline carries no adapter named {name!r}; it carries {_names(adapters)}.")
        if isinstance(weight, bool) or not isinstance(weight, Real) or not math.isfinite(weight):
            raise InputError(f"the weight of {name!r} is {weight!r}; give a finite number (1: as trained, 0: off).")
    strategy = next(iter(adapters.values())).strategy
    if strategy.mix_group is None:
        raise AdapterError(
            f"a {strategy.name} adapter acts at full strength and cannot be weighted; weights apply to adapters "
            f"that mix ({_mixing_rule()})."
        )
    getattr(pipe, _WEIGHTS).update({name: float(weight) for name, weight in weights.items()})
    _apply_weights(pipe)


def _apply_weights(pipe: DiffusionPipeline) -> None:
    """Make every adapter the pipeline carries active, each at its recorded weight."""
    adapters = attached_adapters(pipe)
    if not adapters or next(iter(adapters.values())).strategy.mix_group is None:
        return  # none, or one that is always alone and at full strength
    pipe.set_adapters(list(adapters), [getattr(pipe, _WEIGHTS)[name] for name in adapters])
    for adapter in adapters.values():
        adapter.strategy.finish(pipe)  # set_adapters makes the active adapters trainable; they are not


def unload_adapter(pipe: DiffusionPipeline, name: str | None = None) -> None:
    """Take db-adapters adapters out of a pipeline: one by name (the others act as before), or all of them.

    With all out, the pipeline is the base model again, exactly.

    Args:
        pipe (`DiffusionPipeline`): a pipeline returned by `personalize` or given to `load_adapter`.
        name (`str | None`): the adapter to take out; None: every one.

    Example:
        >>> unload_adapter(pipe, "cat")  # doctest: +SKIP
        >>> unload_adapter(pipe)  # doctest: +SKIP
    """
    adapters = attached_adapters(pipe)
    if not adapters:
        raise AdapterError("this pipeline carries no db-adapters adapter; nothing to unload.")
    if name is not None and name not in adapters:
        raise AdapterError(f"this pipeline carries no adapter named {name!r}; it carries {_names(adapters)}.")
    leaving = [adapters[name]] if name is not None else list(adapters.values())[::-1]
    for adapter in leaving:
        adapter.strategy.remove(pipe)
        if adapter.tokens:
            from .pivotal import unload_tokens

            unload_tokens(pipe, family_of(pipe), adapter.tokens)
        detach(pipe, adapter)
    _apply_weights(pipe)


def _names(adapters: dict[str, Adapter]) -> str:
    return ", ".join(map(repr, adapters))


def _strategy_of(info: dict[str, Any], path: str | os.PathLike) -> Strategy:
    # A bad strategy name or option in a file is a damaged adapter, not a mistake in the caller's input.
    try:
        return get_strategy(info["strategy"])(**info["strategy_config"])
    except (InputError, TypeError) as error:
        raise AdapterError(f"{str(path)!r}: metadata names a strategy it cannot build ({error}).") from None


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
