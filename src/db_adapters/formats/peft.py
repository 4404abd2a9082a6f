"""peft's own LoRA layout: the keys `PeftModel.save_pretrained` writes (`base_model.model.<module>.lora_A.weight`),
one set per component (`unet.base_model.model....`), and each component's `LoraConfig` as JSON.

Pure functions, state dict in, state dict out. To use a component with peft:
`model = get_peft_model(pipe.unet, LoraConfig(**configs["unet"]))`, then
`set_peft_model_state_dict(model, component_state(state, "unet"))`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from ..errors import AdapterError

if TYPE_CHECKING:
    import torch

CONFIG_KEY = "peft_config"  # header key: JSON {component: LoraConfig as a dict}
PREFIX = "base_model.model."


def to_peft(state: Mapping[str, torch.Tensor], *, text_model_level: bool) -> dict[str, torch.Tensor]:
    """diffusers-layout LoRA keys (`unet.<module>.lora_A.weight`) as peft's (`unet.base_model.model.<module>...`).

    Args:
        state (`Mapping[str, Tensor]`): a db-adapters LoRA file's tensors.
        text_model_level (`bool`): whether CLIP text models have a `text_model.` level (transformers 4 does,
            transformers 5 does not); peft's keys name modules as the model has them.

    Example:
        >>> import torch
        >>> state = {"text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(4, 8)}
        >>> list(to_peft(state, text_model_level=False))
        ['text_encoder.base_model.model.encoder.layers.0.self_attn.q_proj.lora_A.weight']
    """
    result = {}
    for key, tensor in state.items():
        component, _, module = key.partition(".")
        if ".lora_A." not in module and ".lora_B." not in module:
            raise AdapterError(f"tensor {key!r} is not a LoRA weight (lora_A/lora_B); only plain LoRA converts.")
        if component.startswith("text_encoder") and not text_model_level:
            module = module.removeprefix("text_model.")
        result[f"{component}.{PREFIX}{module}"] = tensor
    return result


def component_state(state: Mapping[str, torch.Tensor], component: str) -> dict[str, torch.Tensor]:
    """One component's tensors of a peft-layout file, as `get_peft_model_state_dict(peft_model)` names them.

    Example:
        >>> import torch
        >>> list(component_state({"unet.base_model.model.a.lora_A.weight": torch.zeros(1)}, "unet"))
        ['base_model.model.a.lora_A.weight']
    """
    return {key.removeprefix(f"{component}."): t for key, t in state.items() if key.startswith(f"{component}.")}


def lora_configs(lora_adapter_metadata: str | None, components: list[str]) -> dict[str, dict[str, Any]]:
    """Each component's `LoraConfig` fields from diffusers' `lora_adapter_metadata` header text.

    Args:
        lora_adapter_metadata (`str | None`): JSON of `{component}.{field}` values, as diffusers writes.
        components (`list[str]`): the components the file holds weights for.

    Example:
        >>> lora_configs('{"unet.r": 4, "unet.target_modules": ["to_q"]}', ["unet"])
        {'unet': {'r': 4, 'target_modules': ['to_q']}}
    """
    try:
        fields = json.loads(lora_adapter_metadata) if lora_adapter_metadata is not None else None
    except (ValueError, RecursionError):
        fields = None
    if not isinstance(fields, dict):
        raise AdapterError("the file's lora_adapter_metadata (each component's LoRA config) is missing or not JSON.")
    configs: dict[str, dict[str, Any]] = {}
    for key, value in sorted(fields.items()):
        component, _, field = key.partition(".")
        configs.setdefault(component, {})[field] = value
    missing = [c for c in components if "r" not in configs.get(c, {}) or "target_modules" not in configs.get(c, {})]
    if missing:
        raise AdapterError(f"the file's lora_adapter_metadata has no LoRA config for {missing[0]!r}.")
    return {component: configs.get(component, {}) for component in components}


def peft_metadata(configs: Mapping[str, Mapping[str, Any]]) -> dict[str, str]:
    """The header text holding every component's `LoraConfig` (peft keeps it in adapter_config.json)."""
    return {CONFIG_KEY: json.dumps(configs, sort_keys=True)}
