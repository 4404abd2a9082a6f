"""The strategy contract: a strategy defined here, outside the library, registers and trains."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from db_adapters import InputError, available_strategies, get_strategy, load_adapter, personalize, register_strategy
from db_adapters.files import save_tensors
from db_adapters.safe_reading import read_tensors
from db_adapters.strategies import Strategy
from db_adapters.testing import tiny_pipeline


@dataclasses.dataclass
class BiasOptions:
    scope: str = "attentions"

    def __post_init__(self):
        if self.scope not in ("attentions", "all"):
            raise InputError(f"scope={self.scope!r} must be 'attentions' or 'all'.")


@register_strategy
class BiasOnly(Strategy):
    """BitFit-style: trains only the denoiser's bias vectors (a third strategy, defined in a test file)."""

    name = "bias-only-test"
    Options = BiasOptions
    default_learning_rate = 1e-3

    def _biases(self, pipe):
        return {
            n: p
            for n, p in getattr(pipe, self.family.denoiser).named_parameters()
            if n.endswith(".bias") and (self.options.scope == "all" or "attentions" in n)
        }

    def apply(self, pipe, family, *, train_text_encoder):
        self.use(family, train_text_encoder=False)
        self._backup = {n: p.detach().clone() for n, p in self._biases(pipe).items()}

    def trainable_parameters(self, pipe):
        return {self.family.denoiser: list(self._biases(pipe).values())}

    def remove(self, pipe):
        with torch.no_grad():
            for name, param in self._biases(pipe).items():
                param.copy_(self._backup[name])

    def save(self, pipe, path, metadata, dtype):
        denoiser = self.family.denoiser
        save_tensors(path, {f"{denoiser}.{n}": p.detach() for n, p in self._biases(pipe).items()}, metadata)

    def load(self, pipe, family, path):
        self.use(family, train_text_encoder=False)
        self._backup = {n: p.detach().clone() for n, p in self._biases(pipe).items()}
        parameters = dict(getattr(pipe, family.denoiser).named_parameters())
        with torch.no_grad():
            for key, tensor in read_tensors(path).items():
                parameters[key.removeprefix(f"{family.denoiser}.")].copy_(tensor)


def test_builtins_and_the_test_strategy_are_registered():
    assert {"full", "lora", "bias-only-test"} <= set(available_strategies())
    assert get_strategy("bias-only-test") is BiasOnly


def test_third_strategy_trains_saves_and_loads_without_library_changes(subject_images, tmp_path, fast):
    pipe = tiny_pipeline()
    before = {n: p.detach().clone() for n, p in pipe.unet.named_parameters()}
    adapter = personalize(pipe, subject_images, "dog", strategy="bias-only-test", output_dir=tmp_path, **fast)
    after = dict(pipe.unet.named_parameters())
    changed = {n for n, p in after.items() if not torch.equal(p, before[n])}
    assert changed and all(n.endswith(".bias") and "attentions" in n for n in changed)
    path = adapter.save(tmp_path / "bias.safetensors")
    fresh = tiny_pipeline()
    loaded = load_adapter(fresh, path)
    assert loaded.strategy.name == "bias-only-test"
    assert all(torch.equal(p, after[n]) for n, p in fresh.unet.named_parameters())


def test_strategy_options_are_validated_by_the_strategy(subject_images):
    with pytest.raises(InputError, match="scope"):
        personalize(tiny_pipeline(), subject_images, "dog", strategy="bias-only-test", scope="everything")
    with pytest.raises(InputError, match="do not belong to strategy 'bias-only-test'"):
        personalize(tiny_pipeline(), subject_images, "dog", strategy="bias-only-test", rank=4)


def test_registry_refuses_clashes_and_non_strategies():
    class Clash(Strategy):
        name = "lora"

    with pytest.raises(ValueError, match="already registered"):
        register_strategy(Clash)
    with pytest.raises(TypeError):
        register_strategy(int)


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"rank": 0}, "rank"),
        ({"alpha": -1}, "alpha"),
        ({"dropout": 1.0}, "dropout"),
        ({"target_modules": []}, "target"),
    ],
)
def test_lora_options_validated(options, match):
    with pytest.raises(InputError, match=match):
        get_strategy("lora")(**options)
