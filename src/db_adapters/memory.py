"""Accelerator memory for the trainer: frozen parts moved off the GPU while it runs, and memory presets.

Once class images are generated and the subject's latents and prompt embeddings are cached, a frozen
VAE and frozen text encoders have nothing left to do until the run ends (a Flux LoRA run would
otherwise hold T5-XXL's ~9 GB on the GPU for nothing). `FrozenParts.offload` moves them to the CPU,
`restore` puts them back where they were; previews borrow them back for a moment (`restored`).

`memory="16gb"` (and "24gb", "12gb", "8gb") chooses gradient checkpointing, 8-bit Adam, offloading and a
quantized base for the settings a run leaves unset (`memory_preset`).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from .config import MEMORY_PRESETS
from .errors import InputError

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


# --- memory presets ---------------------------------------------------------------------------------

# What each budget switches on, cumulatively, before the fit check below: the peers' recipes for cards of
# that size (diffusers' DreamBooth READMEs: checkpointing + 8-bit Adam to fit 16 GB for a full fine-tune
# and 12 GB for LoRA; QLoRA for 8 GB).
_RUNGS = {
    "24gb": {"gradient_checkpointing": False, "use_8bit_adam": False, "quantize_base": None},
    "16gb": {"gradient_checkpointing": True, "use_8bit_adam": False, "quantize_base": None},
    "12gb": {"gradient_checkpointing": True, "use_8bit_adam": True, "quantize_base": None},
    "8gb": {"gradient_checkpointing": True, "use_8bit_adam": True, "quantize_base": "nf4"},
}
# Share of the budget the weights and optimizer state may take; the rest is activations (checkpointed
# from 16gb down), the CUDA context and the allocator's slack.
_STATIC_SHARE = 0.75
_BYTES_PER_WEIGHT = {None: None, "int8": 1.0, "nf4": 0.55}  # nf4: 4 bits + absmax and double-quant tables


def static_gigabytes(
    parameters: int, weight_bytes: int, *, trains_every_weight: bool, use_8bit_adam: bool, quantize_base: str | None
) -> float:
    """The denoiser's weights plus, for a full fine-tune, its fp32 master weights, gradients and AdamW state.

    An adapter's own weights and state (about 1% of the denoiser's for LoRA rank 4-16) are left out.

    Args:
        parameters (`int`): the denoiser's parameter count.
        weight_bytes (`int`): bytes per weight as loaded (2 for fp16/bf16, 4 for fp32).
        trains_every_weight (`bool`): a full fine-tune (fp32 weights, gradients and AdamW state for all).
        use_8bit_adam (`bool`): AdamW's two moments in 8 bits (2 bytes a weight instead of 8).
        quantize_base (`str | None`): "int8" or "nf4" for a quantized frozen denoiser.

    Example:
        >>> round(static_gigabytes(860_000_000, 2, trains_every_weight=True, use_8bit_adam=True, quantize_base=None), 1)
        8.6
    """
    if trains_every_weight:  # fp32 master weight 4 + gradient 4 + AdamW moments 8 (8-bit: 2)
        per_weight = 4 + 4 + (2 if use_8bit_adam else 8)
    else:
        per_weight = _BYTES_PER_WEIGHT[quantize_base] or weight_bytes
    return parameters * per_weight / 1e9


def memory_preset(
    budget: str,
    parameters: int,
    weight_bytes: int,
    *,
    trains_every_weight: bool,
    can_quantize: bool,
    fixed: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The settings a memory budget chooses: its rung of `_RUNGS`, stepped further down until the weights fit.

    While the weights and optimizer state take more than 75% of the budget, the next saving is switched
    on: 8-bit Adam (for a full fine-tune: an adapter's own AdamW state is too small to matter), then (for
    a strategy that can train one: LoRA) an int8 base, then an nf4 base. Settings the caller fixed are
    counted as given and never stepped. A budget nothing fits is an `InputError` naming the presets that
    would, and the fixed settings that stand in the way.

    Args:
        budget (`str`): one of `MEMORY_PRESETS`.
        parameters (`int`): the denoiser's parameter count.
        weight_bytes (`int`): bytes per weight as loaded.
        trains_every_weight (`bool`): a full fine-tune.
        can_quantize (`bool`): the strategy can train on a quantized base.
        fixed (`dict | None`): `use_8bit_adam` / `quantize_base` / `gradient_checkpointing` as the caller set them.

    Example:
        >>> memory_preset("24gb", 11_900_000_000, 2, trains_every_weight=False, can_quantize=True)["quantize_base"]
        'int8'
    """
    fixed = {name: value for name, value in (fixed or {}).items() if value is not None}
    chosen, needed = _fit(budget, parameters, weight_bytes, trains_every_weight, can_quantize, fixed)
    if chosen is None:
        fitting = [
            other
            for other in MEMORY_PRESETS
            if _fit(other, parameters, weight_bytes, trains_every_weight, can_quantize, fixed)[0] is not None
        ]
        raise InputError(_does_not_fit(budget, needed, fitting, trains_every_weight, fixed))
    return chosen


def _fit(
    budget: str,
    parameters: int,
    weight_bytes: int,
    trains_every_weight: bool,
    can_quantize: bool,
    fixed: dict[str, Any],
) -> tuple[dict[str, Any] | None, float]:
    chosen = dict(_RUNGS[budget])
    quantizable = can_quantize and not trains_every_weight
    if not quantizable:
        chosen["quantize_base"] = None
    chosen |= fixed
    savings = [("use_8bit_adam", True)] if trains_every_weight else []
    savings += [("quantize_base", "int8"), ("quantize_base", "nf4")] if quantizable else []
    savings = [(name, value) for name, value in savings if name not in fixed]
    order = [None, "int8", "nf4"]
    limit = _STATIC_SHARE * int(budget.removesuffix("gb"))
    while True:
        needed = static_gigabytes(
            parameters,
            weight_bytes,
            trains_every_weight=trains_every_weight,
            use_8bit_adam=chosen["use_8bit_adam"],
            quantize_base=chosen["quantize_base"],
        )
        if needed <= limit:
            return chosen | {"offload_frozen": True}, needed
        # The next saving not yet on (a lighter quantization than the rung's is no saving).
        pending = [
            (name, value)
            for name, value in savings
            if (name == "use_8bit_adam" and not chosen[name])
            or (name == "quantize_base" and order.index(value) > order.index(chosen[name]))
        ]
        if not pending:
            return None, needed
        name, value = pending[0]
        chosen[name] = value


def _does_not_fit(
    budget: str, needed: float, fitting: list[str], trains_every_weight: bool, fixed: dict[str, Any]
) -> str:
    advice = f"use memory='{fitting[-1]}' or a larger preset" if fitting else "use a GPU with more memory"
    for name, value in fixed.items():
        if name in ("use_8bit_adam", "quantize_base"):
            advice += f", or leave {name}={value!r} out so the preset may choose"
    if trains_every_weight:
        advice += ", or an adapter strategy such as strategy='lora'"
    return (
        f"memory='{budget}' cannot hold this run: the denoiser's weights and optimizer state alone take about "
        f"{needed:.1f} GB (at most {_STATIC_SHARE:.0%} of the budget may go to them); {advice}."
    )
