"""What every strategy built on peft's adapter layers shares: inject them, train them, save, load and remove them.

A peft strategy (LoRA, DoRA, LoHa, LoKr, OFT) says which peft config it builds (`peft_config`) and how its
parameters are named (`marker`); `PeftAdapter` does the rest. Its file is ours: peft's adapter state dict
under `component.` keys, and each component's peft config as JSON under the header key `peft_config`, so
plain peft can rebuild the layers too (`PeftConfig.from_peft_type(**config)`, `inject_adapter_in_model`,
`set_peft_model_state_dict`). LoRA and DoRA write diffusers' format instead (see lora.py).

Each strategy's layers carry its `adapter_name`, so several adapters of one kind can sit in the same
layers; a strategy trains, saves and removes only its own.
"""

from __future__ import annotations

import dataclasses
import json
import warnings
from abc import abstractmethod
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from ..adapter_file import tensors_by_component
from ..config import setting
from ..errors import AdapterError, InputError
from ..files import save_tensors
from ..safe_reading import read_weights
from .base import Strategy

if TYPE_CHECKING:
    import torch
    from peft import PeftConfig

    from ..families import Family

PEFT_CONFIG_KEY = "peft_config"

# Options several peft strategies take, written once: `db-adapt train` offers an option that several
# strategies share once, with one help text, which must be right for all of them.


def rank_setting() -> Any:
    """The `rank` field of LoRA's, DoRA's, LoHa's and LoKr's options."""
    return setting(4, "Rank of the adapter's low-rank factors (LoRA, DoRA, LoHa, LoKr; 4-64 is usual for LoRA).")


def alpha_setting() -> Any:
    """The `alpha` field that goes with `rank`."""
    return setting(None, "Adapter alpha; the update is scaled by alpha / rank. None: alpha = rank.")


def target_setting() -> Any:
    """The `target_modules` field of a peft strategy's options."""
    return setting(
        None, "Denoiser modules to adapt, comma-separated; None: the family's (SD, SDXL: the attention projections)."
    )


def text_target_setting() -> Any:
    """The `text_encoder_target_modules` field of a peft strategy's options."""
    return setting(
        None,
        "Text-encoder modules to adapt; None: the family's (CLIP: q_proj,k_proj,v_proj,out_proj). A name that "
        "starts with a text encoder's name ('text_encoder_2.') adapts that encoder alone.",
    )


def module_dropout_setting() -> Any:
    """The `module_dropout` field of LoHa's, LoKr's and OFT's options."""
    return setting(
        0.0, "Probability of leaving out a whole adapted layer's update in a training step (LoHa, LoKr, OFT)."
    )


@dataclasses.dataclass
class LycorisOptions:
    """The options of peft's LyCORIS methods (LoHa, LoKr). `alpha` None means alpha = rank (scale 1)."""

    rank: int = rank_setting()
    alpha: float | None = alpha_setting()
    target_modules: list[str] | None = target_setting()
    text_encoder_target_modules: list[str] | None = text_target_setting()
    rank_dropout: float = setting(0.0, "Dropout on the rank dimension of the update while training (LoHa, LoKr).")
    module_dropout: float = module_dropout_setting()

    def __post_init__(self) -> None:
        check_positive_int("rank", self.rank, " (4-64 is usual)")
        if self.alpha is None:
            self.alpha = self.rank
        check_positive_number("alpha", self.alpha, " (often equal to rank)")
        check_probability("rank_dropout", self.rank_dropout)
        check_probability("module_dropout", self.module_dropout)
        check_targets(self)


class PeftAdapter(Strategy):
    """Base class of strategies that inject peft adapter layers; only those layers train.

    Subclasses set `name`, `Options`, `marker` and implement `peft_config`. Their options have
    `target_modules` and `text_encoder_target_modules` (None: the family's).

    Example:
        >>> from db_adapters.strategies import get_strategy
        >>> get_strategy("loha").marker
        '.hada_'
    """

    # A substring of every adapter parameter's name and of no base parameter's (".hada_" for LoHa).
    marker: ClassVar[str] = ""
    # peft's DoRA, LoHa, LoKr and OFT layers fail on the bitsandbytes layers of the CPU stand-in
    # (`testing.quantize_linear_layers`) and are untried on a GPU; plain LoRA clears this.
    quantized_base_refusal = "only plain LoRA, without use_dora, trains on 4/8-bit layers"

    @abstractmethod
    def peft_config(self, targets: list[str]) -> PeftConfig:
        """The peft config of this strategy's layers on the modules `targets`."""

    def component_peft_config(self, component: str) -> PeftConfig:
        """The peft config of this strategy's layers in one component (its targets, and any per-layer options)."""
        return self.peft_config(self.targets(component))

    # --- training ----------------------------------------------------------------------------------

    def apply(self, pipe: Any, family: type[Family], *, train_text_encoder: bool) -> None:
        """Inject the layers into the denoiser (and the trained text encoders); on failure the pipeline is unchanged."""
        self.use(family, train_text_encoder)
        try:
            for component in self.components:
                self._inject_or_explain(pipe, component)
        except BaseException:
            self.remove(pipe)
            raise
        for params in self.trainable_parameters(pipe).values():
            for param in params:
                # Trainable weights stay fp32 even on an fp16 pipeline: AMP unscales only fp32 gradients.
                param.data = param.data.float()

    def inject(self, pipe: Any, component: str) -> None:
        """Put this strategy's layers into one component with peft's `inject_adapter_in_model`."""
        from peft import inject_adapter_in_model

        inject_adapter_in_model(self.component_peft_config(component), getattr(pipe, component), self.adapter_name)

    def _inject_or_explain(self, pipe: Any, component: str) -> None:
        try:
            with warnings.catch_warnings():
                # peft warns when a module already holds an adapter; beside another one is where we put it.
                warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
                self.inject(pipe, component)
        except InputError:
            raise
        except ValueError as error:  # peft names the modules it could not find or adapt; add what and where
            raise InputError(
                f"strategy {self.name!r} cannot adapt the {component} of this {self.family.title} pipeline "
                f"(target modules {self.targets(component)}): {error}"
            ) from None

    def trainable_parameters(self, pipe: Any) -> dict[str, list[torch.nn.Parameter]]:
        return {
            component: [p for n, p in getattr(pipe, component).named_parameters() if self.owns(n)]
            for component in self.components
        }

    def owns(self, parameter_name: str) -> bool:
        """Whether a parameter is one of this strategy's adapter weights (not another adapter's, not a base weight).

        peft names them `<layer>.<marker kind>.<adapter name>[.weight]`, e.g. `to_q.hada_w1_a.dog`.
        """
        name = self.adapter_name
        return self.marker in parameter_name and (f".{name}." in parameter_name or parameter_name.endswith(f".{name}"))

    def finish(self, pipe: Any) -> None:
        for params in self.trainable_parameters(pipe).values():
            for param in params:
                param.requires_grad_(False)

    def remove(self, pipe: Any) -> None:
        for component in self.components:
            remove_adapter(getattr(pipe, component), self.adapter_name, self.marker)

    # --- the file ----------------------------------------------------------------------------------

    def save(self, pipe: Any, path: Path, metadata: dict[str, str], dtype: torch.dtype | None) -> None:
        from peft.utils import get_peft_model_state_dict

        tensors, configs = {}, {}
        for component in self.components:
            state = get_peft_model_state_dict(getattr(pipe, component), adapter_name=self.adapter_name)
            tensors |= {f"{component}.{key}": _to_cpu(value, dtype) for key, value in state.items()}
            configs[component] = self.peft_config_dict(component)
        save_tensors(path, tensors, {**metadata, PEFT_CONFIG_KEY: json.dumps(configs, sort_keys=True)})

    def peft_config_dict(self, component: str) -> dict[str, Any]:
        """The component's peft config as JSON-able values, the same in every process."""
        config = self.component_peft_config(component).to_dict()
        # peft keeps target_modules as a set, which would be written in the process's hash-seeded
        # order: sorted, the same training writes the same file in every process.
        config["target_modules"] = sorted(config["target_modules"])
        return config

    def load(self, pipe: Any, family: type[Family], path: Path) -> None:
        """Inject the layers as `apply` does and fill them from the file; if it raises, the pipeline is unchanged.

        The file's keys are checked against the layers `apply` would inject before any are, so a file
        for other modules costs no injection; shapes are checked against the injected layers.
        """
        weights = tensors_by_component(read_weights(path), path, family)
        self.family = family
        for component, state in weights.items():
            self.check_file_state(getattr(pipe, component), component, state, path)
        try:
            self.apply(pipe, family, train_text_encoder=len(weights) > 1)
            self.fill(pipe, weights, path)
        except BaseException as error:
            self.remove(pipe)
            if isinstance(error, AdapterError) or not isinstance(error, ValueError | RuntimeError | KeyError):
                raise
            raise AdapterError(f"{str(path)!r} does not fit this pipeline's {self.name} layers ({error}).") from None
        self.finish(pipe)

    def check_file_state(
        self, module: torch.nn.Module, component: str, state: dict[str, torch.Tensor], path: Path
    ) -> None:
        """Check, before injecting anything, that the file adapts exactly the layers `apply` would."""
        from peft.tuners.tuners_utils import check_target_module_exists

        config = self.component_peft_config(component)
        wanted = {name for name, _ in module.named_modules() if name and check_target_module_exists(config, name)}
        found = {key.partition(self.marker)[0] for key in state}
        _require_same(wanted, found, f"{component} {self.name} layers", path)

    def fill(self, pipe: Any, weights: dict[str, dict[str, torch.Tensor]], path: Path) -> None:
        """Copy the file's weights into the injected layers, after checking their keys and shapes."""
        from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict

        for component, state in weights.items():
            module = getattr(pipe, component)
            injected = get_peft_model_state_dict(module, adapter_name=self.adapter_name)
            shapes = {key: tuple(tensor.shape) for key, tensor in injected.items()}
            matched = self.match_state(state, shapes, component, path)
            result = set_peft_model_state_dict(module, matched, adapter_name=self.adapter_name)
            unexpected = [key for key in getattr(result, "unexpected_keys", []) if self.marker in key]
            if unexpected:
                raise AdapterError(f"{str(path)!r}: peft did not place {component} weights {unexpected[:3]}.")

    def match_state(
        self, state: dict[str, torch.Tensor], shapes: dict[str, tuple[int, ...]], component: str, path: Path
    ) -> dict[str, torch.Tensor]:
        """The file's `state` for peft, after checking it has exactly the keys and shapes of `shapes`."""
        _require_same(set(shapes), set(state), f"{component} {self.name} weights", path)
        for key, want in shapes.items():
            got = tuple(state[key].shape)
            if got != want:
                raise AdapterError(
                    f"{str(path)!r}: {component}.{key} has shape {got}; this pipeline's {self.name} layers "
                    f"with options {self.options} expect {want}."
                )
        return state

    # --- options -----------------------------------------------------------------------------------

    def targets(self, component: str) -> list[str]:
        """The modules adapted in `component`: the options' (those meant for it) or the family's."""
        if component == self.family.denoiser:
            names = self.options.target_modules or list(self.family.adapter_targets)
        else:
            names = self.options.text_encoder_target_modules or list(self.family.text_encoder_adapter_targets)
        parts = (self.family.denoiser, *self.family.text_encoders)
        return list(names_in_component(names, component, parts).values())

    def config(self) -> dict[str, Any]:
        """The options, with the target modules the family chose once the strategy has met a pipeline."""
        config = super().config()
        if self.family is not None:
            config["target_modules"] = self.options.target_modules or list(self.family.adapter_targets)
            config["text_encoder_target_modules"] = self.options.text_encoder_target_modules or list(
                self.family.text_encoder_adapter_targets
            )
        return config


def names_in_component(names: Iterable[str], component: str, components: Sequence[str]) -> dict[str, str]:
    """The module names (or patterns) of an option that apply to `component`, as peft sees them inside it.

    A name may start with a component's name and a dot ("text_encoder_2.encoder.layers.0.mlp.fc1"): it
    then applies to that component alone, without the prefix; every other name applies to every
    component. SDXL's two CLIP encoders share their module names, so only the prefix tells them apart.

    Args:
        names (`Iterable[str]`): target modules, or the keys of a rank or alpha pattern.
        component (`str`): the component being adapted ("text_encoder").
        components (`Sequence[str]`): the family's components, the prefixes that qualify a name.

    Returns:
        `{name as written: name inside the component}` for the names that apply.

    Example:
        >>> names_in_component(["to_q", "text_encoder_2.fc1", "text_encoder.fc2"], "text_encoder",
        ...                    ["unet", "text_encoder", "text_encoder_2"])
        {'to_q': 'to_q', 'text_encoder.fc2': 'fc2'}
    """
    chosen = {}
    for name in names:
        owner, dot, inner = name.partition(".")
        if dot and inner and owner in components:
            if owner == component:
                chosen[name] = inner
        else:
            chosen[name] = name
    return chosen


def strip_adapter_layers(module: torch.nn.Module) -> None:
    """Put back every layer peft wrapped, and drop the module's peft config: the module is as before injection.

    The wrapped layers themselves were never changed (the adapters live beside them), so this
    restores the base model exactly.

    Args:
        module (`torch.nn.Module`): a denoiser or text encoder peft injected layers into.

    Example:
        >>> import torch
        >>> from peft import LoHaConfig, inject_adapter_in_model
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 4))
        >>> layer = model[0]
        >>> _ = inject_adapter_in_model(LoHaConfig(r=2, target_modules=["0"]), model)
        >>> strip_adapter_layers(model)
        >>> model[0] is layer and not hasattr(model, "peft_config")
        True
    """
    from peft.tuners.tuners_utils import BaseTunerLayer

    wrapped = [(name, layer) for name, layer in module.named_modules() if isinstance(layer, BaseTunerLayer)]
    for name, layer in wrapped:
        module.set_submodule(name, layer.get_base_layer())
    if "peft_config" in vars(module):
        del module.peft_config
    if getattr(module, "_hf_peft_config_loaded", False):
        # diffusers' `add_adapter` marks a model as holding adapters (as its `unload_lora` unmarks it):
        # unmarked, the next `add_adapter` starts afresh instead of looking for the deleted config.
        module._hf_peft_config_loaded = False


def remove_adapter(module: torch.nn.Module, adapter_name: str, marker: str) -> None:
    """Take one adapter's layers out of a module and leave every other adapter as it was.

    A layer left holding no adapter is put back as its base layer, so once the last adapter is gone
    the module is as before injection (as `strip_adapter_layers` leaves it).

    Args:
        module (`torch.nn.Module`): a denoiser or text encoder holding peft adapters.
        adapter_name (`str`): the adapter to take out; a name the module does not hold changes nothing.
        marker (`str`): the adapter kind's parameter marker, e.g. ".lora_" (`PeftAdapter.marker`).

    Example:
        >>> import torch
        >>> from peft import LoraConfig, inject_adapter_in_model
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4))
        >>> _ = inject_adapter_in_model(LoraConfig(r=2, target_modules=["0", "1"]), model, "dog")
        >>> _ = inject_adapter_in_model(LoraConfig(r=2, target_modules=["1"]), model, "cat")
        >>> remove_adapter(model, "dog", ".lora_")
        >>> sorted(model.peft_config), type(model[0]).__name__, sorted(model[1].lora_A)
        (['cat'], 'Linear', ['cat'])
    """
    from peft.functional import delete_adapter
    from peft.tuners.tuners_utils import BaseTunerLayer

    # peft deletes the adapter's weights from every layer; the config entry and the layers it leaves
    # empty are ours to take out. Which adapters stay active is the caller's to set again (adapter.py
    # does), so peft's warning that it picked one is noise.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Adapter .* was active which is now deleted")
        delete_adapter(module, adapter_name, prefix=marker)
    configs = vars(module).get("peft_config")
    if configs:
        configs.pop(adapter_name, None)
    if not configs:
        strip_adapter_layers(module)
        return
    emptied = [
        (name, layer)
        for name, layer in module.named_modules()
        if isinstance(layer, BaseTunerLayer) and not any(len(getattr(layer, n)) for n in layer.adapter_layer_names)
    ]
    for name, layer in emptied:
        module.set_submodule(name, layer.get_base_layer())


def module_list(name: str, value: object) -> list[str] | None:
    """A target-modules option as a list: a comma-separated string is split; None stays None (the family's).

    Example:
        >>> module_list("target_modules", "to_q, to_v")
        ['to_q', 'to_v']
    """
    if value is None:
        return None  # the family's default, chosen when the strategy meets the pipeline
    if isinstance(value, str):
        value = [part.strip() for part in value.split(",") if part.strip()]
    if not value or not all(isinstance(v, str) and v for v in value):
        raise InputError(f"{name}={value!r} must be a non-empty list of module names, e.g. ['to_q', 'to_v'].")
    return list(value)


def check_targets(options: Any) -> None:
    """Normalise an options object's `target_modules` and `text_encoder_target_modules` with `module_list`."""
    options.target_modules = module_list("target_modules", options.target_modules)
    options.text_encoder_target_modules = module_list(
        "text_encoder_target_modules", options.text_encoder_target_modules
    )


def check_positive_int(name: str, value: object, hint: str) -> None:
    """`InputError` unless `value` is a positive integer (True is not one); `hint` ends the message.

    Example:
        >>> check_positive_int("rank", 4, " (4-64 is usual)")
    """
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise InputError(f"{name}={value!r} must be a positive integer{hint}.")


def check_positive_number(name: str, value: object, hint: str) -> None:
    """`InputError` unless `value` is a positive int or float; `hint` ends the message.

    Example:
        >>> check_positive_number("alpha", 8, " (often equal to rank)")
    """
    if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
        raise InputError(f"{name}={value!r} must be a positive number{hint}.")


def check_probability(name: str, value: object) -> None:
    """`InputError` unless `value` is a number in [0, 1).

    Example:
        >>> check_probability("dropout", 0.1)
    """
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value < 1:
        raise InputError(f"{name}={value!r} must be in [0, 1).")


def _require_same(wanted: set[str], found: set[str], what: str, path: Path) -> None:
    missing, extra = sorted(wanted - found), sorted(found - wanted)
    if missing or extra:
        parts = [f"missing {missing[:2]} ({len(missing)} in all)"] if missing else []
        parts += [f"unexpected {extra[:2]} ({len(extra)} in all)"] if extra else []
        raise AdapterError(f"{str(path)!r}: {what} do not match this pipeline: {'; '.join(parts)}.")


def _to_cpu(tensor: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    return tensor.to("cpu", dtype) if dtype else tensor.to("cpu")
