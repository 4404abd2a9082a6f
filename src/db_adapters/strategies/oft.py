"""OFT: peft's orthogonal fine-tuning layers on the denoiser's attention projections.

Each adapted layer's input is turned by a block-diagonal orthogonal matrix (one block per
`block_size` input features, each the Cayley transform of a trained skew-symmetric block), which
keeps the angles between the layer's neurons. Plain diffusers cannot load OFT, so the file is
db-adapters' own (see peft_adapters.py); `load_adapter` reads it.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

from ..config import setting
from ..errors import InputError
from . import register_strategy
from .peft_adapters import (
    PeftAdapter,
    check_positive_int,
    check_probability,
    check_targets,
    module_dropout_setting,
    target_setting,
    text_target_setting,
)

if TYPE_CHECKING:
    import torch
    from peft import OFTConfig


@dataclasses.dataclass
class OftOptions:
    """OFT's options. peft takes a block size or a block count per layer; the size is the same for every layer."""

    block_size: int = setting(
        32, "OFT: input features per orthogonal block; must divide every adapted layer's input width."
    )
    target_modules: list[str] | None = target_setting()
    text_encoder_target_modules: list[str] | None = text_target_setting()
    module_dropout: float = module_dropout_setting()

    def __post_init__(self) -> None:
        check_positive_int("block_size", self.block_size, " (32 divides the widths of every supported model)")
        check_probability("module_dropout", self.module_dropout)
        check_targets(self)


@register_strategy
class Oft(PeftAdapter):
    """peft OFT layers; only they train, the base weights stay frozen and untouched."""

    name = "oft"
    Options = OftOptions
    default_learning_rate = 1e-4
    marker = ".oft_"

    def peft_config(self, targets: list[str]) -> OFTConfig:
        from peft import OFTConfig

        return OFTConfig(
            r=0,  # the block count follows from each layer's width and the block size
            oft_block_size=self.options.block_size,
            module_dropout=self.options.module_dropout,
            target_modules=targets,
        )

    def inject(self, pipe: Any, component: str) -> None:
        # peft would quietly change a block size that does not divide a layer's width, with a warning.
        self._check_widths(getattr(pipe, component), component)
        super().inject(pipe, component)

    def _check_widths(self, module: torch.nn.Module, component: str) -> None:
        from peft.tuners.tuners_utils import check_target_module_exists

        config, size = self.component_peft_config(component), self.options.block_size
        widths = {
            layer.in_features
            for name, layer in module.named_modules()
            if name and check_target_module_exists(config, name) and hasattr(layer, "in_features")
        }
        misfits = sorted(width for width in widths if width % size)
        if misfits:
            raise InputError(
                f"block_size={size} does not divide the input width {misfits[0]} of the {self.family.title} "
                f"{component}'s adapted layers (widths {sorted(widths)}); choose a common divisor, such as "
                f"{_largest_common_divisor(widths, size)}."
            )


def _largest_common_divisor(widths: set[int], limit: int) -> int:
    # The largest block size up to `limit` that divides every width.
    return max(d for d in range(1, limit + 1) if all(width % d == 0 for width in widths))
