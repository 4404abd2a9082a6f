"""DoRA (weight-decomposed LoRA): LoRA that also learns the magnitude of each adapted weight's columns.

`strategy="dora"` is `strategy="lora", use_dora=True`: the same peft layers (`LoraConfig(use_dora=True)`)
and the same diffusers-format file, whose magnitude vectors plain diffusers loads with
`pipe.load_lora_weights(path)`.
"""

from __future__ import annotations

from typing import Any

from ..errors import InputError
from . import register_strategy
from .lora import Lora


@register_strategy
class Dora(Lora):
    """LoRA with peft's `use_dora=True`; everything else (options, file, loading) is LoRA's."""

    name = "dora"

    def __init__(self, **options: Any) -> None:
        if options.get("use_dora") is False:
            raise InputError("use_dora=False contradicts strategy 'dora'; for plain LoRA use strategy 'lora'.")
        super().__init__(**{**options, "use_dora": True})
