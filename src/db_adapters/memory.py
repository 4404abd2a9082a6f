"""Accelerator memory for the trainer: frozen parts moved off the GPU while it runs, and back after.

Once class images are generated and the subject's latents and prompt embeddings are cached, a frozen
VAE and frozen text encoders have nothing left to do until the run ends (a Flux LoRA run would
otherwise hold T5-XXL's ~9 GB on the GPU for nothing). `FrozenParts.offload` moves them to the CPU,
`restore` puts them back where they were; previews borrow them back for a moment (`restored`).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from collections.abc import Iterator

    import torch

    from .plan import RunPlan


class FrozenParts:
    """The pipeline's frozen VAE and text encoders, and where each was before it was offloaded.

    Args:
        pipe (`DiffusionPipeline`): the pipeline being trained.
        names (`list[str]`): the frozen components to move.

    Example:
        >>> parts = FrozenParts.of(pipe, plan)  # doctest: +SKIP
        >>> parts.offload(); parts.restore()  # doctest: +SKIP
    """

    def __init__(self, pipe: Any, names: list[str]) -> None:
        self.pipe = pipe
        self.names = [name for name in names if getattr(pipe, name, None) is not None]
        self.devices: dict[str, torch.device] = {}

    @classmethod
    def of(cls, pipe: Any, plan: RunPlan) -> FrozenParts:
        """The parts a run leaves frozen: the VAE and every text encoder the strategy does not train."""
        trained = set(plan.family.components(plan.prompts_encoded_each_step))
        return cls(pipe, ["vae", *(name for name in plan.family.text_encoders if name not in trained)])

    def offload(self) -> None:
        """Move every part to the CPU, remembering where it was."""
        for name in self.names:
            module = getattr(self.pipe, name)
            self.devices.setdefault(name, module.device)
            module.to("cpu")

    def restore(self) -> None:
        """Put every offloaded part back on the device it came from."""
        for name, device in self.devices.items():
            getattr(self.pipe, name).to(device)
        self.devices = {}

    @contextmanager
    def restored(self) -> Iterator[None]:
        """The parts back in place for the block (a preview render), offloaded again after it."""
        was_offloaded = bool(self.devices)
        self.restore()
        try:
            yield
        finally:
            if was_offloaded:
                self.offload()


def offload_wanted(requested: bool | None, device: torch.device) -> bool:
    """`offload_frozen` resolved: None means on when training on a GPU, where its memory is scarce.

    Example:
        >>> import torch
        >>> offload_wanted(None, torch.device("cpu")), offload_wanted(None, torch.device("cuda", 1))
        (False, True)
    """
    return device.type == "cuda" if requested is None else bool(requested)
