"""LoKr: peft's Kronecker product layers (from LyCORIS) on the denoiser's attention projections.

Each adapted weight (out, in) gets the update w1 ⊗ w2, with w1 (a, b) and w2 (out / a, in / b), w2
itself low-rank when `rank` is small next to its size: the fewest parameters of the peft kinds.
Plain diffusers loads LoKr only into a few newer pipelines (Flux 2, Z-Image), none of the families
here, so the file is db-adapters' own (see peft_adapters.py); `load_adapter` reads it.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

from ..config import setting
from ..errors import InputError
from . import register_strategy
from .peft_adapters import LycorisOptions, PeftAdapter

if TYPE_CHECKING:
    from peft import LoKrConfig


@dataclasses.dataclass
class LokrOptions(LycorisOptions):
    """LoKr's options: LoHa's, and the size of the Kronecker product's first factor."""

    decompose_factor: int = setting(
        -1, "LoKr: the first Kronecker factor's size, used where it divides a layer's widths; -1: near-square factors."
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        factor = self.decompose_factor
        if not isinstance(factor, int) or isinstance(factor, bool) or not (factor == -1 or factor > 0):
            raise InputError(f"decompose_factor={factor!r} must be -1 (near-square) or a positive integer.")


@register_strategy
class Lokr(PeftAdapter):
    """peft LoKr layers; only they train, the base weights stay frozen and untouched."""

    name = "lokr"
    Options = LokrOptions
    default_learning_rate = 1e-4  # peft's DreamBooth example trains LoKr as it trains LoRA
    marker = ".lokr_"
    mix_group = "lokr"  # several LoKr adapters share its peft layers, each scaled on its own

    def peft_config(self, targets: list[str]) -> LoKrConfig:
        from peft import LoKrConfig

        options = self.options
        return LoKrConfig(
            r=options.rank,
            alpha=options.alpha,
            rank_dropout=options.rank_dropout,
            module_dropout=options.module_dropout,
            decompose_factor=options.decompose_factor,
            target_modules=targets,
        )
