"""The contract every strategy meets: put trainable weights into a pipeline, and take them out again.

The trainer sees only `trainable_parameters()`; it never knows which strategy it runs. A strategy
never sees the CLI or the data; it knows how its weights enter a pipeline (`apply`, `load`), how they
leave it (`remove`) and how they are written to one safetensors file (`save`). Which components it
may train (the denoiser, the text encoders) it learns from the pipeline's model family.

A pipeline may carry several adapters at once (see adapter.py): each strategy instance carries the
name its layers have in the pipeline (`adapter_name`), and `mix_group` says which others may share
the pipeline with it.
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from ..errors import InputError

# The name a strategy's layers get when nobody names them: what `personalize` trains under.
DEFAULT_ADAPTER_NAME = "dreambooth"

if TYPE_CHECKING:
    import torch

    from ..families import Family


@dataclasses.dataclass
class NoOptions:
    """Options of a strategy that takes none."""


class Strategy(ABC):
    """Base class of strategies. Subclasses set `name`, `Options` and `default_learning_rate`.

    `Options` is a dataclass whose fields are the strategy's keyword options (`rank=8` for LoRA);
    its `__post_init__` rejects bad values with `InputError`.
    """

    name: ClassVar[str] = ""
    Options: ClassVar[type] = NoOptions
    default_learning_rate: ClassVar[float] = 1e-4
    # Why the strategy cannot train a 4/8-bit quantized denoiser (QLoRA), for the error; None: it can.
    # An instance may decide by its options (LoRA can, DoRA cannot).
    quantized_base_refusal: str | None = None
    # Whether every weight of the denoiser trains (a full fine-tune: fp32 weights, gradients and AdamW state
    # for all of them), which is what memory presets must budget for.
    trains_every_weight: ClassVar[bool] = False
    # The pipeline's family and the components this strategy trains; set by `apply` and `load`.
    family: type[Family] | None = None
    components: tuple[str, ...] = ()
    # The name of this strategy's layers in the pipeline (peft's adapter name); `load_adapter` sets it.
    adapter_name: str = DEFAULT_ADAPTER_NAME
    # Adapters whose strategies share a mix group can be in one pipeline together, each at its own weight
    # (peft layers of one kind, scaled per adapter); None: this strategy's adapter must be alone.
    mix_group: ClassVar[str | None] = None

    def __init__(self, **options: Any) -> None:
        known = {f.name for f in dataclasses.fields(self.Options)}
        unknown = sorted(set(options) - known)
        if unknown:
            accepted = ", ".join(sorted(known)) or "none"
            raise InputError(
                f"option(s) {', '.join(unknown)} do not belong to strategy {self.name!r}; it accepts: {accepted}."
            )
        self.options = self.Options(**options)
        self.train_text_encoder = False

    def config(self) -> dict[str, Any]:
        """The options as plain JSON-able values, for metadata."""
        return dataclasses.asdict(self.options)

    def use(self, family: type[Family], train_text_encoder: bool) -> None:
        """Record the family and which of its components this strategy trains (call first in `apply`)."""
        self.family = family
        self.train_text_encoder = train_text_encoder
        self.components = family.components(train_text_encoder)

    @abstractmethod
    def apply(self, pipe: Any, family: type[Family], *, train_text_encoder: bool) -> None:
        """Make the pipeline trainable in this strategy's way (before training)."""

    @abstractmethod
    def trainable_parameters(self, pipe: Any) -> dict[str, list[torch.nn.Parameter]]:
        """The parameters to optimise, per component name ("unet", "text_encoder", ...)."""

    def finish(self, pipe: Any) -> None:  # noqa: B027 - optional hook
        """Called after training succeeds: leave the pipeline ready for inference."""

    @abstractmethod
    def remove(self, pipe: Any) -> None:
        """Take this strategy's weights out again: the pipeline is the base model once more."""

    @abstractmethod
    def save(self, pipe: Any, path: Path, metadata: dict[str, str], dtype: torch.dtype | None) -> None:
        """Write the trained weights to the safetensors file `path` (atomically), with `metadata`."""

    @abstractmethod
    def load(self, pipe: Any, family: type[Family], path: Path) -> None:
        """Put the weights of the file `path` into the pipeline (the inverse of `save`)."""
