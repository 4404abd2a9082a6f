"""LoRA: low-rank peft layers on the denoiser's attention projections (and the text encoders').

The file is diffusers' own LoRA format, written by the pipeline class's `save_lora_weights` (the
family knows how), so plain diffusers loads it with `pipe.load_lora_weights(path)`; it carries
`lora_adapter_metadata` for every component so a rank != alpha scale survives the round trip.
"""

from __future__ import annotations

import dataclasses
import json
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..adapter_file import tensors_by_component
from ..config import setting
from ..errors import AdapterError, InputError
from ..files import save_tensors
from ..safe_reading import read_file_metadata, read_tensors, read_weights
from . import register_strategy
from .base import Strategy

if TYPE_CHECKING:
    import torch

    from ..families import Family

ADAPTER_NAME = "dreambooth"


@dataclasses.dataclass
class LoraOptions:
    """LoRA's options. `alpha` None means alpha = rank (scale 1), as in the peers' defaults."""

    rank: int = setting(4, "LoRA rank (4-64 is usual).")
    alpha: float | None = setting(None, "LoRA alpha; the update is scaled by alpha / rank. None: alpha = rank.")
    target_modules: list[str] | None = setting(
        None, "Denoiser modules to adapt, comma-separated; None: the family's (SD, SDXL: the attention projections)."
    )
    text_encoder_target_modules: list[str] | None = setting(
        None, "Text-encoder modules to adapt; None: the family's (CLIP: q_proj,k_proj,v_proj,out_proj)."
    )
    dropout: float = setting(0.0, "Dropout on the LoRA layers' input.")

    def __post_init__(self) -> None:
        if not isinstance(self.rank, int) or isinstance(self.rank, bool) or self.rank <= 0:
            raise InputError(f"rank={self.rank!r} must be a positive integer (4-64 is usual).")
        if self.alpha is None:
            self.alpha = self.rank
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, int | float) or self.alpha <= 0:
            raise InputError(f"alpha={self.alpha!r} must be a positive number (often equal to rank).")
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, int | float) or not 0 <= self.dropout < 1:
            raise InputError(f"dropout={self.dropout!r} must be in [0, 1).")
        self.target_modules = _module_list("target_modules", self.target_modules)
        self.text_encoder_target_modules = _module_list("text_encoder_target_modules", self.text_encoder_target_modules)


def _module_list(name: str, value: object) -> list[str] | None:
    if value is None:
        return None  # the family's default, chosen when the strategy meets the pipeline
    if isinstance(value, str):
        value = [part.strip() for part in value.split(",") if part.strip()]
    if not value or not all(isinstance(v, str) and v for v in value):
        raise InputError(f"{name}={value!r} must be a non-empty list of module names, e.g. ['to_q', 'to_v'].")
    return list(value)


@register_strategy
class Lora(Strategy):
    """peft LoRA layers; only they train, the base weights stay frozen and untouched."""

    name = "lora"
    Options = LoraOptions
    default_learning_rate = 1e-4  # diffusers' LoRA DreamBooth README

    def _lora_config(self, targets: list[str]):
        from peft import LoraConfig

        return LoraConfig(
            r=self.options.rank,
            lora_alpha=self.options.alpha,
            lora_dropout=self.options.dropout,
            init_lora_weights="gaussian",
            target_modules=targets,
        )

    def apply(self, pipe: Any, family: type[Family], *, train_text_encoder: bool) -> None:
        from peft import inject_adapter_in_model

        self.use(family, train_text_encoder)
        denoiser = getattr(pipe, family.denoiser)
        denoiser.add_adapter(self._lora_config(self._targets(family.denoiser)), adapter_name=ADAPTER_NAME)
        for name in self.components[1:]:
            # transformers 5's CLIPTextModel.add_adapter demands peft >= 0.22; peft's own injection
            # is what it would call, and works with the peft releases we support.
            inject_adapter_in_model(self._lora_config(self._targets(name)), getattr(pipe, name), ADAPTER_NAME)
        for params in self.trainable_parameters(pipe).values():
            for param in params:
                # Trainable weights stay fp32 even on an fp16 pipeline: AMP unscales only fp32 gradients.
                param.data = param.data.float()

    def trainable_parameters(self, pipe: Any) -> dict[str, list[torch.nn.Parameter]]:
        return {
            component: [p for n, p in getattr(pipe, component).named_parameters() if ".lora_" in n]
            for component in self.components
        }

    def finish(self, pipe: Any) -> None:
        for params in self.trainable_parameters(pipe).values():
            for param in params:
                param.requires_grad_(False)

    def remove(self, pipe: Any) -> None:
        pipe.unload_lora_weights()

    def save(self, pipe: Any, path: Path, metadata: dict[str, str], dtype: torch.dtype | None) -> None:
        from peft.utils import get_peft_model_state_dict

        layers, configs = {}, {}
        for component in self.components:
            module = getattr(pipe, component)
            state = get_peft_model_state_dict(module, adapter_name=ADAPTER_NAME)
            if component != self.family.denoiser:
                state = _with_text_model_prefix(state)
            layers[component] = {k: v.to("cpu", dtype) if dtype else v.to("cpu") for k, v in state.items()}
            config = self._lora_config(self._targets(component)).to_dict()
            # peft keeps target_modules as a set, which would be written in the process's hash-seeded
            # order: sorted, the same training writes the same file in every process.
            config["target_modules"] = sorted(config["target_modules"])
            configs[component] = config
        with tempfile.TemporaryDirectory(prefix=".db-adapters-", dir=Path(path).parent) as scratch:
            # diffusers writes its own key layout and `lora_adapter_metadata`; we add our metadata
            # beside them and move the file into place atomically.
            self.family.save_lora_weights(pipe, scratch, layers, configs, weight_name="lora.safetensors")
            written = Path(scratch) / "lora.safetensors"
            save_tensors(path, read_tensors(written), {**read_file_metadata(written), **metadata})

    def load(self, pipe: Any, family: type[Family], path: Path) -> None:
        """Inject LoRA layers as `apply` does and fill them from the file; if it raises, the pipeline is unchanged.

        The file's weights are checked (keys, shapes, rank) against the layers `apply` would inject,
        then handed to peft as a state dict; the file itself never goes to `pipe.load_lora_weights`,
        whose fallback for a file safetensors cannot read is unpickling it.
        """
        weights = tensors_by_component(read_weights(path), path, family)
        _check_lora_metadata(read_file_metadata(path), path, self.options)
        self.family = family
        # Checked against the layers `apply` would inject before any are, so a damaged file costs no
        # injection and cannot touch the pipeline; `_fill` checks again against the injected layers.
        for component, state in weights.items():
            expected = self._expected_shapes(getattr(pipe, component), component)
            _match_lora_state(state, expected, component, path, self.options.rank)
        try:
            self.apply(pipe, family, train_text_encoder=len(weights) > 1)
            self._fill(pipe, weights, path)
        except BaseException as error:
            pipe.unload_lora_weights()
            if isinstance(error, AdapterError) or not isinstance(error, ValueError | RuntimeError | KeyError):
                raise
            raise AdapterError(f"{str(path)!r} does not fit this pipeline's LoRA layers ({error}).") from None
        self.finish(pipe)

    def _fill(self, pipe: Any, weights: dict[str, dict[str, torch.Tensor]], path: Path) -> None:
        from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict

        for component, state in weights.items():
            module = getattr(pipe, component)
            expected = get_peft_model_state_dict(module, adapter_name=ADAPTER_NAME)
            shapes = {key: tuple(tensor.shape) for key, tensor in expected.items()}
            matched = _match_lora_state(state, shapes, component, path, self.options.rank)
            result = set_peft_model_state_dict(module, matched, adapter_name=ADAPTER_NAME)
            unexpected = [key for key in getattr(result, "unexpected_keys", []) if "lora_" in key]
            if unexpected:
                raise AdapterError(f"{str(path)!r}: peft did not place {component} weights {unexpected[:3]}.")

    def _expected_shapes(self, module: torch.nn.Module, component: str) -> dict[str, tuple[int, ...] | None]:
        """The LoRA weights `apply` would give `module`, by peft's key names; shapes for Linear layers."""
        import torch
        from peft.tuners.tuners_utils import check_target_module_exists

        config, rank = self._lora_config(self._targets(component)), self.options.rank
        shapes: dict[str, tuple[int, ...] | None] = {}
        for name, layer in module.named_modules():
            if name and check_target_module_exists(config, name):
                linear = isinstance(layer, torch.nn.Linear)  # other layer kinds: shapes checked after injection
                shapes[f"{name}.lora_A.weight"] = (rank, layer.in_features) if linear else None
                shapes[f"{name}.lora_B.weight"] = (layer.out_features, rank) if linear else None
        return shapes

    def _targets(self, component: str) -> list[str]:
        if component == self.family.denoiser:
            return self.options.target_modules or list(self.family.adapter_targets)
        return self.options.text_encoder_target_modules or list(self.family.text_encoder_adapter_targets)

    def config(self) -> dict[str, Any]:
        """The options, with the target modules the family chose once the strategy has met a pipeline."""
        config = super().config()
        if self.family is not None:
            config["target_modules"] = self._targets(self.family.denoiser)
            config["text_encoder_target_modules"] = self._targets(self.family.text_encoders[0])
        return config


def _with_text_model_prefix(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # transformers 5 flattened CLIPTextModel (no `text_model.` level); older diffusers releases and
    # kohya converters expect the `text_model.` prefix, and current diffusers strips it when needed.
    return {k if k.startswith("text_model.") else f"text_model.{k}": v for k, v in state.items()}


def _check_lora_metadata(header: dict[str, str], path: Path, options: LoraOptions) -> None:
    # diffusers' own record of rank and alpha (for plain diffusers users) must agree with ours.
    text = header.get("lora_adapter_metadata")
    if text is None:
        return
    try:
        parsed = json.loads(text)
    except (ValueError, RecursionError):
        raise AdapterError(f"{str(path)!r}: lora_adapter_metadata is not JSON.") from None
    if not isinstance(parsed, dict):
        raise AdapterError(f"{str(path)!r}: lora_adapter_metadata is not a JSON object.")
    ours = {"r": options.rank, "lora_alpha": options.alpha}
    for key, value in parsed.items():
        field = key.partition(".")[2]
        if field in ours and (isinstance(value, bool) or value != ours[field]):
            raise AdapterError(
                f"{str(path)!r}: lora_adapter_metadata has {key}={value!r} but the db-adapters metadata says "
                f"{field}={ours[field]!r}; the file is damaged or was edited."
            )


def _match_lora_state(
    state: dict[str, torch.Tensor],
    expected: dict[str, tuple[int, ...] | None],
    component: str,
    path: Path,
    rank: int,
) -> dict[str, torch.Tensor]:
    """The file's `state` under the expected key names, after checking keys and shapes (None: any) match."""
    # Saved text-encoder keys carry `text_model.` (see `_with_text_model_prefix`); the model's may not.
    names = {_short_key(key): key for key in expected}
    short_state = {_short_key(key): tensor for key, tensor in state.items()}
    if len(short_state) != len(state):
        raise AdapterError(f"{str(path)!r}: {component} LoRA keys repeat with and without 'text_model.'.")
    missing, extra = sorted(set(names) - set(short_state)), sorted(set(short_state) - set(names))
    if missing or extra:
        parts = [f"missing {missing[:2]} ({len(missing)} in all)"] if missing else []
        parts += [f"unexpected {extra[:2]} ({len(extra)} in all)"] if extra else []
        raise AdapterError(f"{str(path)!r}: {component} LoRA weights do not match this pipeline: {'; '.join(parts)}.")
    for short, key in names.items():
        got, want = tuple(short_state[short].shape), expected[key]
        if want is not None and got != want:
            raise AdapterError(
                f"{str(path)!r}: {component}.{short} has shape {got}; this pipeline with rank {rank} expects {want}."
            )
    return {key: short_state[short] for short, key in names.items()}


def _short_key(key: str) -> str:
    return key.removeprefix("text_model.")
