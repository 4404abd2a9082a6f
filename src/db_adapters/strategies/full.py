"""Full fine-tuning, the paper's reference path: every denoiser weight trains (the text encoders' too
with `train_text_encoder`). The file holds the changed components' whole weights."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..adapter_file import tensors_by_component
from ..errors import AdapterError
from ..files import save_tensors
from ..safe_reading import read_weights
from . import register_strategy
from .base import Strategy

if TYPE_CHECKING:
    import torch

    from ..families import Family


@register_strategy
class FullFineTune(Strategy):
    """Train all weights of the denoiser (and text encoders); the base weights are kept on CPU to restore."""

    name = "full"
    default_learning_rate = 5e-6  # the paper's Stable Diffusion setting
    quantized_base_refusal = "its weights are 4/8-bit and frozen"
    trains_every_weight = True

    def apply(self, pipe: Any, family: type[Family], *, train_text_encoder: bool) -> None:
        import torch

        self.use(family, train_text_encoder)
        self._backup_base(pipe, self.components)
        for component in self.components:
            # Trainable weights stay fp32 even on an fp16 pipeline: AMP unscales only fp32 gradients.
            _cast(getattr(pipe, component), torch.float32)

    def trainable_parameters(self, pipe: Any) -> dict[str, list[torch.nn.Parameter]]:
        return {component: list(getattr(pipe, component).parameters()) for component in self.components}

    def finish(self, pipe: Any) -> None:
        for component in self.components:
            _cast(getattr(pipe, component), self._dtypes[component])

    def remove(self, pipe: Any) -> None:
        for component, state in self._backup.items():
            module = getattr(pipe, component)
            module.load_state_dict(state)
            _cast(module, self._dtypes[component])
        self._backup = {}

    def save(self, pipe: Any, path: Path, metadata: dict[str, str], dtype: torch.dtype | None) -> None:
        import torch

        tensors = {}
        for component in self.components:
            for key, tensor in getattr(pipe, component).state_dict().items():
                tensors[f"{component}.{key}"] = tensor.to("cpu", dtype or torch.float32)
        save_tensors(path, tensors, metadata)

    def load(self, pipe: Any, family: type[Family], path: Path) -> None:
        """Replace the components' weights by the file's; every check comes first, and a failure restores them."""
        per_component = tensors_by_component(read_weights(path), path, family)
        for component, state in per_component.items():
            check_state_fits(getattr(pipe, component), state, component, path)
        self.family, self.components = family, tuple(per_component)
        self.train_text_encoder = len(per_component) > 1
        self._backup_base(pipe, self.components)
        try:
            for component, state in per_component.items():
                module = getattr(pipe, component)
                dtype = self._dtypes[component]
                module.load_state_dict({name: tensor.to(dtype) for name, tensor in state.items()})
        except BaseException:
            self.remove(pipe)
            raise

    def _backup_base(self, pipe: Any, components: tuple[str, ...]) -> None:
        # A CPU copy is the only way back to the base model after every weight changed; it costs
        # host memory equal to the trained components (about 3.4 GB for SD 1.5's UNet in fp32).
        self._backup = {
            component: {k: v.detach().to("cpu", copy=True) for k, v in getattr(pipe, component).state_dict().items()}
            for component in components
        }
        self._dtypes = {component: getattr(pipe, component).dtype for component in components}


def _cast(module: torch.nn.Module, dtype: torch.dtype) -> None:
    # Only when needed: diffusers warns on every `.to(dtype)` of a model, even a no-op one.
    if module.dtype != dtype:
        module.to(dtype)


def check_state_fits(module: torch.nn.Module, state: dict, component: str, path: Path) -> None:
    """`AdapterError` unless `state` has exactly `module`'s weight names and shapes (a full fine-tune's component).

    Example:
        >>> import torch
        >>> state = {"weight": torch.zeros(3, 2), "bias": torch.zeros(3)}
        >>> check_state_fits(torch.nn.Linear(2, 3), state, "unet", Path("x.safetensors"))
    """
    expected = {name: tuple(t.shape) for name, t in module.state_dict().items()}
    missing = sorted(set(expected) - set(state))
    extra = sorted(set(state) - set(expected))
    if missing or extra:
        detail = f"missing {missing[:3]}" if missing else f"unexpected {extra[:3]}"
        raise AdapterError(f"{str(path)!r}: {component} weights do not match this pipeline ({detail}).")
    for name, tensor in state.items():
        if tuple(tensor.shape) != expected[name]:
            raise AdapterError(
                f"{str(path)!r}: {component}.{name} has shape {tuple(tensor.shape)}, "
                f"this pipeline expects {expected[name]}."
            )
