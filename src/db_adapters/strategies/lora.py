"""LoRA: low-rank peft layers on the denoiser's attention projections (and the text encoders').

The file is diffusers' own LoRA format, written by the pipeline class's `save_lora_weights` (the
family knows how), so plain diffusers loads it with `pipe.load_lora_weights(path)`; it carries
`lora_adapter_metadata` for every component so a rank != alpha scale survives the round trip, and
DoRA's `use_dora` with it (DoRA's magnitude vectors are `lora_magnitude_vector` keys). Layers of
their own rank (`rank_pattern`, as a LoRA extracted from a full fine-tune has) are peft's
`rank_pattern` / `alpha_pattern` in each component's config, which diffusers reads back.
"""

from __future__ import annotations

import dataclasses
import json
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..config import setting
from ..errors import AdapterError, InputError
from ..files import save_tensors
from ..safe_reading import read_file_metadata, read_tensors
from . import register_strategy
from .peft_adapters import (
    PeftAdapter,
    alpha_setting,
    check_positive_int,
    check_positive_number,
    check_probability,
    check_targets,
    names_in_component,
    rank_setting,
    target_setting,
    text_target_setting,
)

if TYPE_CHECKING:
    import torch
    from peft import LoraConfig

    from ..families import Family


@dataclasses.dataclass
class LoraOptions:
    """LoRA's options. `alpha` None means alpha = rank (scale 1), as in the peers' defaults."""

    rank: int = rank_setting()
    alpha: float | None = alpha_setting()
    target_modules: list[str] | None = target_setting()
    text_encoder_target_modules: list[str] | None = text_target_setting()
    dropout: float = setting(0.0, "Dropout on the LoRA layers' input.")
    # None rather than False: `db-adapt train` passes an unset on/off option as None, which it leaves out.
    use_dora: bool | None = setting(
        None, "DoRA: LoRA that also learns each adapted weight's magnitude (the same as strategy 'dora')."
    )
    rank_pattern: dict[str, int] | None = setting(
        None,
        "Ranks of single layers, {module: rank}, overriding `rank` (peft's rank_pattern); a name that starts "
        "with a component's name ('text_encoder_2.') applies to that component alone.",
        cli=False,
    )
    alpha_pattern: dict[str, float] | None = setting(
        None,
        "Alphas of single layers, {module: alpha} (peft's alpha_pattern); None with alpha None: alpha = rank.",
        cli=False,
    )

    def __post_init__(self) -> None:
        check_positive_int("rank", self.rank, " (4-64 is usual)")
        self.rank_pattern = _pattern("rank_pattern", self.rank_pattern, check_positive_int)
        if self.alpha is None:
            self.alpha = self.rank
            # alpha = rank means scale 1; a layer of another rank keeps scale 1 with its own alpha.
            self.alpha_pattern = self.alpha_pattern if self.alpha_pattern is not None else self.rank_pattern
        check_positive_number("alpha", self.alpha, " (often equal to rank)")
        self.alpha_pattern = _pattern("alpha_pattern", self.alpha_pattern, check_positive_number)
        check_probability("dropout", self.dropout)
        if self.use_dora is not None and not isinstance(self.use_dora, bool):
            raise InputError(f"use_dora={self.use_dora!r} must be True or False.")
        self.use_dora = bool(self.use_dora)
        check_targets(self)


def _pattern(name: str, value: object, check_value: Callable[[str, object, str], None]) -> dict[str, Any] | None:
    """A rank or alpha pattern checked: None, or a mapping of module names to valid values (a copy)."""
    if value is None:
        return None
    if not isinstance(value, dict) or not all(isinstance(key, str) and key.strip() for key in value):
        raise InputError(f"{name}={value!r} must map module names to values, e.g. {{'to_q': 8}}.")
    for key, item in value.items():
        check_value(f"{name}[{key!r}]", item, "")
    return dict(value)


@register_strategy
class Lora(PeftAdapter):
    """peft LoRA layers; only they train, the base weights stay frozen and untouched."""

    name = "lora"
    Options = LoraOptions
    default_learning_rate = 1e-4  # diffusers' LoRA DreamBooth README
    marker = ".lora_"
    mix_group = "lora"  # LoRA and DoRA adapters share peft's LoRA layers, each scaled on its own

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        if not self.options.use_dora:
            self.quantized_base_refusal = None  # QLoRA (see quantize.py); DoRA keeps the peft kinds' refusal

    def peft_config(self, targets: list[str], patterns: dict[str, dict[str, Any]] | None = None) -> LoraConfig:
        from peft import LoraConfig

        return LoraConfig(
            r=self.options.rank,
            lora_alpha=self.options.alpha,
            lora_dropout=self.options.dropout,
            init_lora_weights="gaussian",
            target_modules=targets,
            use_dora=self.options.use_dora,
            **(patterns or {}),
        )

    def component_peft_config(self, component: str) -> LoraConfig:
        return self.peft_config(self.targets(component), self.component_patterns(component))

    def component_patterns(self, component: str) -> dict[str, dict[str, Any]]:
        """The options' rank and alpha patterns for the layers of `component`, by peft's names inside it."""
        parts = (self.family.denoiser, *self.family.text_encoders)
        patterns = {}
        for name in ("rank_pattern", "alpha_pattern"):
            pattern = getattr(self.options, name) or {}
            chosen = names_in_component(pattern, component, parts)
            patterns[name] = {inner: pattern[key] for key, inner in chosen.items()}
        return patterns

    def inject(self, pipe: Any, component: str) -> None:
        if component != self.family.denoiser:
            # transformers 5's CLIPTextModel.add_adapter demands peft >= 0.22; peft's own injection
            # is what it would call, and works with the peft releases we support.
            return super().inject(pipe, component)
        # diffusers' own verb, so that its LoRA verbs (set_adapters, unload_lora_weights) know the layers.
        getattr(pipe, component).add_adapter(self.component_peft_config(component), adapter_name=self.adapter_name)

    def save(self, pipe: Any, path: Path, metadata: dict[str, str], dtype: torch.dtype | None) -> None:
        from peft.utils import get_peft_model_state_dict

        layers = {
            component: get_peft_model_state_dict(getattr(pipe, component), adapter_name=self.adapter_name)
            for component in self.components
        }
        self.write(pipe, path, layers, metadata, dtype)

    def write(
        self,
        pipe: Any,
        path: Path,
        layers: dict[str, dict[str, torch.Tensor]],
        metadata: dict[str, str],
        dtype: torch.dtype | None,
    ) -> None:
        """Write LoRA weights as this strategy's file: diffusers' layout and configs, and our `metadata`.

        Args:
            pipe (`DiffusionPipeline`): a pipeline of the family (its class writes diffusers' layout).
            path (`Path`): the `.safetensors` file, written atomically.
            layers (`dict[str, dict[str, Tensor]]`): per component, peft's state dict of the layers
                (`<module>.lora_A.weight`, ...), as `get_peft_model_state_dict` gives it.
            metadata (`dict[str, str]`): our header text (`pack_metadata`).
            dtype (`torch.dtype | None`): the weights' dtype in the file; None keeps theirs.

        Example:
            >>> strategy.write(pipe, Path("dog.safetensors"), layers, metadata, None)  # doctest: +SKIP
        """
        prepared, configs = {}, {}
        for component, state in layers.items():
            if component != self.family.denoiser:
                state = _text_encoder_keys(state)
            prepared[component] = {k: v.to("cpu", dtype) if dtype else v.to("cpu") for k, v in state.items()}
            configs[component] = self.peft_config_dict(component)
        with tempfile.TemporaryDirectory(prefix=".db-adapters-", dir=Path(path).parent) as scratch:
            # diffusers writes its own key layout and `lora_adapter_metadata`; we add our metadata
            # beside them and move the file into place atomically.
            self.family.save_lora_weights(pipe, scratch, prepared, configs, weight_name="lora.safetensors")
            written = Path(scratch) / "lora.safetensors"
            save_tensors(path, read_tensors(written), {**read_file_metadata(written), **metadata})

    def load(self, pipe: Any, family: type[Family], path: Path) -> None:
        """Inject LoRA layers as `apply` does and fill them from the file; if it raises, the pipeline is unchanged.

        The file's weights are checked (keys, shapes, rank) against the layers `apply` would inject,
        then handed to peft as a state dict; the file itself never goes to `pipe.load_lora_weights`,
        whose fallback for a file safetensors cannot read is unpickling it.
        """
        self.family = family
        _check_lora_metadata(read_file_metadata(path), path, self.options, self.component_patterns)
        super().load(pipe, family, path)

    def check_file_state(
        self, module: torch.nn.Module, component: str, state: dict[str, torch.Tensor], path: Path
    ) -> None:
        # Checked against the layers `apply` would inject, before any are, so a damaged file costs no
        # injection and cannot touch the pipeline; `fill` checks again against the injected layers.
        _match_lora_state(state, self._expected_shapes(module, component), component, path, self._ranks_text())

    def match_state(
        self, state: dict[str, torch.Tensor], shapes: dict[str, tuple[int, ...]], component: str, path: Path
    ) -> dict[str, torch.Tensor]:
        return _match_lora_state(state, shapes, component, path, self._ranks_text())

    def _ranks_text(self) -> str:
        return f"rank {self.options.rank}" + (" (and rank_pattern)" if self.options.rank_pattern else "")

    def _expected_shapes(self, module: torch.nn.Module, component: str) -> dict[str, tuple[int, ...] | None]:
        """The LoRA weights `apply` would give `module`, by peft's key names; shapes for Linear layers."""
        import torch
        from peft.tuners.tuners_utils import check_target_module_exists
        from peft.utils.other import get_pattern_key

        config = self.component_peft_config(component)
        shapes: dict[str, tuple[int, ...] | None] = {}
        for name, layer in module.named_modules():
            if name and check_target_module_exists(config, name):
                # peft's own lookup, so the check expects the rank peft will give the layer.
                rank = config.rank_pattern.get(get_pattern_key(config.rank_pattern.keys(), name), config.r)
                linear = isinstance(layer, torch.nn.Linear)  # other layer kinds: shapes checked after injection
                shapes[f"{name}.lora_A.weight"] = (rank, layer.in_features) if linear else None
                shapes[f"{name}.lora_B.weight"] = (layer.out_features, rank) if linear else None
                if self.options.use_dora:  # DoRA's magnitude: one per output feature
                    shapes[f"{name}.lora_magnitude_vector"] = (layer.out_features,) if linear else None
        return shapes


def _text_encoder_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A text encoder's peft keys as plain diffusers loads them.

    transformers 5 flattened CLIPTextModel (no `text_model.` level); older diffusers releases and kohya
    converters expect the `text_model.` prefix, and current diffusers strips it when needed. DoRA's
    magnitude keys get peft's parameter name `.weight`: transformers 5 loads a text encoder's adapter by
    renaming keys, and finds `lora_magnitude_vector.<adapter>.weight` only from that spelling.
    """
    renamed = {}
    for key, tensor in state.items():
        key = key if key.startswith("text_model.") else f"text_model.{key}"
        renamed[f"{key}.weight" if key.endswith(".lora_magnitude_vector") else key] = tensor
    return renamed


def _check_lora_metadata(
    header: dict[str, str], path: Path, options: LoraOptions, patterns: Callable[[str], dict[str, Any]]
) -> None:
    # diffusers' own record of rank, alpha, DoRA and per-layer ranks (for plain diffusers users) must agree
    # with ours; `patterns(component)` gives our rank and alpha patterns inside a component.
    text = header.get("lora_adapter_metadata")
    if text is None:
        return
    try:
        parsed = json.loads(text)
    except (ValueError, RecursionError):
        raise AdapterError(f"{str(path)!r}: lora_adapter_metadata is not JSON.") from None
    if not isinstance(parsed, dict):
        raise AdapterError(f"{str(path)!r}: lora_adapter_metadata is not a JSON object.")
    ours = {"r": options.rank, "lora_alpha": options.alpha, "use_dora": options.use_dora}
    for key, value in parsed.items():
        component, _, field = key.partition(".")
        want = patterns(component)[field] if field in ("rank_pattern", "alpha_pattern") else ours.get(field)
        if field not in ours and want is None:
            continue
        # bool is an int to Python: `true` is no rank, and 1 is no use_dora.
        if isinstance(value, bool) != isinstance(want, bool) or value != want:
            raise AdapterError(
                f"{str(path)!r}: lora_adapter_metadata has {key}={value!r} but the db-adapters metadata says "
                f"{field}={want!r}; the file is damaged or was edited."
            )


def _match_lora_state(
    state: dict[str, torch.Tensor],
    expected: dict[str, tuple[int, ...] | None],
    component: str,
    path: Path,
    ranks: str,
) -> dict[str, torch.Tensor]:
    """The file's `state` under the expected key names, after checking keys and shapes (None: any) match."""
    # Saved text-encoder keys are spelt for plain diffusers (see `_text_encoder_keys`): compare them unspelt.
    names = {_short_key(key): key for key in expected}
    short_state = {_short_key(key): tensor for key, tensor in state.items()}
    if len(short_state) != len(state):
        raise AdapterError(
            f"{str(path)!r}: {component} LoRA keys repeat in two spellings (with and without 'text_model.')."
        )
    missing, extra = sorted(set(names) - set(short_state)), sorted(set(short_state) - set(names))
    if missing or extra:
        parts = [f"missing {missing[:2]} ({len(missing)} in all)"] if missing else []
        parts += [f"unexpected {extra[:2]} ({len(extra)} in all)"] if extra else []
        raise AdapterError(f"{str(path)!r}: {component} LoRA weights do not match this pipeline: {'; '.join(parts)}.")
    for short, key in names.items():
        got, want = tuple(short_state[short].shape), expected[key]
        if want is not None and got != want:
            raise AdapterError(
                f"{str(path)!r}: {component}.{short} has shape {got}; this pipeline with {ranks} expects {want}."
            )
    return {key: short_state[short] for short, key in names.items()}


def _short_key(key: str) -> str:
    key = key.removeprefix("text_model.")
    return key.removesuffix(".weight") if key.endswith(".lora_magnitude_vector.weight") else key
