"""LoHa: peft's low-rank Hadamard product layers (from LyCORIS) on the denoiser's attention projections.

Each adapted weight gets the update (w1_a @ w1_b) * (w2_a @ w2_b): two rank-r pairs multiplied
elementwise, so rank r reaches rank r² for twice LoRA's parameters. Plain diffusers cannot load
LoHa, so the file is db-adapters' own (see peft_adapters.py); `load_adapter` reads it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from . import register_strategy
from .peft_adapters import LycorisOptions, PeftAdapter

if TYPE_CHECKING:
    from peft import LoHaConfig


@register_strategy
class Loha(PeftAdapter):
    """peft LoHa layers; only they train, the base weights stay frozen and untouched."""

    name = "loha"
    Options = LycorisOptions
    default_learning_rate = 1e-4  # peft's DreamBooth example trains LoHa as it trains LoRA
    marker = ".hada_"
    mix_group = "loha"  # several LoHa adapters share its peft layers, each scaled on its own

    def peft_config(self, targets: list[str]) -> LoHaConfig:
        from peft import LoHaConfig

        options = self.options
        return LoHaConfig(
            r=options.rank,
            alpha=options.alpha,
            rank_dropout=options.rank_dropout,
            module_dropout=options.module_dropout,
            target_modules=targets,
        )
