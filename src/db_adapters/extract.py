"""LoRA extraction: a full fine-tune's weight changes, as a LoRA file that plain diffusers loads.

Every Linear and Conv2d weight the fine-tune changed becomes one LoRA layer: the truncated SVD of the
change (fine-tuned minus base weight; a conv kernel read as an (out, in * kh * kw) matrix). As peft and
diffusers hold a conv LoRA, the down factor is a conv with the layer's kernel, stride and padding and
the up factor a 1x1 conv. The rank is fixed (`rank`, capped by each layer's size) or chosen per layer:
the smallest that keeps `energy` of the change's squared Frobenius norm. Biases, norm weights and
embeddings have no low-rank form; what they changed is reported, with its share of the whole change.

The result is an ordinary db-adapters LoRA file, written by the `lora` strategy (`Lora.write`) with
per-layer ranks as peft's `rank_pattern` and alpha = rank for every layer (scale 1): `load_adapter`
and `pipe.load_lora_weights` both read it.
"""

from __future__ import annotations

import collections
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .adapter import Adapter, as_dtype, check_base_model, refuse_if_adapted
from .adapter_file import check_output_path, pack_metadata, tensors_by_component, unpack_metadata
from .errors import AdapterError, InputError
from .families import family_of
from .files import named_write_errors
from .safe_reading import check_adapter_file, read_header, read_weights
from .strategies.full import check_state_fits
from .strategies.lora import Lora
from .strategies.peft_adapters import check_positive_int

if TYPE_CHECKING:
    import torch
    from diffusers import DiffusionPipeline

    from .families import Family

# Our metadata's fields that describe the full fine-tune itself, not the subject: the LoRA gets its own.
_FINE_TUNE_FIELDS = ("format_version", "strategy", "strategy_config", "train_text_encoder", "library_version")


@dataclass(frozen=True)
class ExtractedLayer:
    """One LoRA layer: which weight, its rank, and how much of the weight's change it keeps.

    Attributes:
        component (`str`): "unet", "text_encoder", ...
        module (`str`): the layer's module name in the component.
        shape (`tuple[int, ...]`): the weight's shape.
        rank (`int`): the LoRA rank chosen.
        full_rank (`int`): the most a rank can be: min(out, in * kernel area).
        retained_energy (`float`): share of the change's squared Frobenius norm the rank keeps.
        change (`float`): the change's squared Frobenius norm.
    """

    component: str
    module: str
    shape: tuple[int, ...]
    rank: int
    full_rank: int
    retained_energy: float
    change: float


@dataclass(frozen=True)
class LeftOut:
    """A changed weight a LoRA cannot hold (a bias, a norm weight, an embedding), with its squared change."""

    name: str
    change: float


@dataclass
class Extraction:
    """What `extract_lora` found: the LoRA layers and what stays out; `save` writes the LoRA file.

    Attributes:
        source (`Path`): the full fine-tune's file.
        layers (`list[ExtractedLayer]`): the LoRA layers, in the pipeline's module order.
        left_out (`list[LeftOut]`): changed weights the LoRA cannot hold, largest change first.
    """

    source: Path
    layers: list[ExtractedLayer]
    left_out: list[LeftOut]
    rank: int | None
    energy: float | None
    pipe: Any = field(repr=False)
    family: type[Family] = field(repr=False)
    info: dict[str, Any] = field(repr=False)
    factors: dict[str, dict[str, torch.Tensor]] = field(repr=False)

    @property
    def layer_change(self) -> float:
        """The LoRA-able weights' change: sum of their squared Frobenius norms."""
        return sum(layer.change for layer in self.layers)

    @property
    def total_change(self) -> float:
        """Every weight's change, those the LoRA cannot hold included."""
        return self.layer_change + sum(item.change for item in self.left_out)

    @property
    def retained_energy(self) -> float:
        """Share of the LoRA-able weights' change the LoRA keeps."""
        return sum(layer.retained_energy * layer.change for layer in self.layers) / self.layer_change

    def share(self, item: LeftOut) -> float:
        """Share of the whole change that one left-out weight made."""
        return item.change / self.total_change

    def save(self, path: str | os.PathLike, dtype: torch.dtype | str | None = None) -> Path:
        """Write the LoRA as a db-adapters LoRA file (strategy "lora"), atomically.

        Args:
            path (`str | PathLike`): a `.safetensors` file name; its folder is created if needed.
            dtype (`torch.dtype | str | None`): float16/bfloat16 halve the file; None keeps float32.

        Example:
            >>> extract_lora(pipe, "dog_full.safetensors", rank=16).save("dog_r16.safetensors")  # doctest: +SKIP
        """
        path = check_output_path(path)
        if path.resolve() == self.source.resolve():
            raise InputError(f"output {str(path)!r} is the full fine-tune itself; write the LoRA to another file.")
        dtype = as_dtype(dtype)
        strategy = Lora(**self.lora_options())
        strategy.use(self.family, train_text_encoder=len(self.factors) > 1)
        adapter = Adapter(
            identifier=self.info["identifier"],
            class_noun=self.info["class_noun"],
            instance_prompt=self.info["instance_prompt"],
            strategy=strategy,
            base_model=self.info.get("base_model") or {},
            resolution=self.info.get("resolution") or 0,
            steps=self.info.get("steps") or 0,
            extra={**self._subject_fields(), "extracted_from": self._provenance()},
        )
        path.parent.mkdir(parents=True, exist_ok=True)
        with named_write_errors(path):
            strategy.write(self.pipe, path, self.factors, pack_metadata(adapter.metadata()), dtype)
        return path

    def lora_options(self) -> dict[str, Any]:
        """The `lora` strategy's options for these layers: exactly them as targets, each at its rank, scale 1."""
        ranks = {f"{layer.component}.{layer.module}": layer.rank for layer in self.layers}
        common = collections.Counter(ranks.values()).most_common(1)[0][0]
        denoiser = [layer.module for layer in self.layers if layer.component == self.family.denoiser]
        # SDXL's two CLIP encoders share module names: their targets keep the component's name.
        encoders = [name for name in ranks if not name.startswith(f"{self.family.denoiser}.")]
        return {
            "rank": common,
            "alpha": None,  # alpha = rank, and alpha_pattern = rank_pattern: every layer at scale 1
            "rank_pattern": {name: rank for name, rank in ranks.items() if rank != common} or None,
            "target_modules": denoiser,
            "text_encoder_target_modules": encoders or None,
        }

    def _subject_fields(self) -> dict[str, Any]:
        known = {"identifier", "class_noun", "instance_prompt", "base_model", "resolution", "steps"}
        return {k: v for k, v in self.info.items() if k not in known and k not in _FINE_TUNE_FIELDS}

    def _provenance(self) -> dict[str, Any]:
        return {
            "file": self.source.name,
            "rank": self.rank,
            "energy": self.energy,
            "retained_energy": round(self.retained_energy, 6),
            "left_out_share": round(1 - self.layer_change / self.total_change, 6),
        }


def extract_lora(
    pipe: DiffusionPipeline,
    full_adapter_path: str | os.PathLike,
    *,
    rank: int | None = None,
    energy: float | None = None,
) -> Extraction:
    """Approximate a full fine-tune by a LoRA: the truncated SVD of each changed Linear and Conv2d weight.

    Give exactly one of `rank` and `energy`. The pipeline must be the fine-tune's base model, carrying
    no adapter; it is not changed.

    Args:
        pipe (`DiffusionPipeline`): the base model the fine-tune started from.
        full_adapter_path (`str | PathLike`): a db-adapters file saved with strategy "full".
        rank (`int | None`): one rank for every layer (a layer smaller than it gets its full rank).
        energy (`float | None`): in (0, 1]: per layer, the smallest rank keeping this share of the
            change's squared Frobenius norm (0.9 is a usual start).

    Returns:
        The `Extraction`: per-layer ranks and retained energy, what the LoRA cannot hold, and `.save(path)`.

    Example:
        >>> extraction = extract_lora(pipe, "dog_full.safetensors", energy=0.9)  # doctest: +SKIP
        >>> extraction.save("dog_lora.safetensors")  # doctest: +SKIP
        >>> pipe.load_lora_weights("dog_lora.safetensors")  # doctest: +SKIP
    """
    check_rank_or_energy(rank, energy)
    path = Path(full_adapter_path)
    info = full_fine_tune_info(path)
    family = family_of(pipe)
    refuse_if_adapted(pipe)
    check_base_model(pipe, family, info, path)
    tuned = tensors_by_component(read_weights(path), path, family)
    layers, left_out, factors = [], [], {}
    for component in (c for c in family.components() if c in tuned):  # the denoiser first
        module, state = getattr(pipe, component), tuned[component]
        check_state_fits(module, state, component, path)
        found, skipped, lora = _extract_component(module, state, component, rank, energy)
        layers += found
        left_out += skipped
        if lora:
            factors[component] = lora
    _check_extractable(factors, tuned, family, path)
    left_out.sort(key=lambda item: -item.change)
    return Extraction(path, layers, left_out, rank, energy, pipe, family, info, factors)


def check_rank_or_energy(rank: object, energy: object) -> None:
    """`InputError` unless exactly one of `rank` (a positive integer) and `energy` (in (0, 1]) is given.

    Example:
        >>> check_rank_or_energy(None, 0.9)
    """
    if (rank is None) == (energy is None):
        raise InputError(
            "give either rank (one LoRA rank for every layer) or energy (per layer, the share of the change "
            "to keep, e.g. 0.9), not both and not neither."
        )
    if rank is not None:
        check_positive_int("rank", rank, " (the LoRA rank of every extracted layer)")
    elif isinstance(energy, bool) or not isinstance(energy, int | float) or not 0 < energy <= 1:
        raise InputError(f"energy={energy!r} must be in (0, 1]: the share of each layer's change to keep, e.g. 0.9.")


def full_fine_tune_info(path: str | os.PathLike) -> dict[str, Any]:
    """A full fine-tune file's metadata; `AdapterError` for a file of any other strategy (or no adapter file).

    Only the header is read: a pickle or a damaged file is refused before any weight is.

    Example:
        >>> full_fine_tune_info("dog_full.safetensors")["base_model"]["model_id"]  # doctest: +SKIP
        'stable-diffusion-v1-5/stable-diffusion-v1-5'
    """
    check_adapter_file(path)
    info = unpack_metadata(read_header(path).metadata, path)
    if info["strategy"] != "full":
        raise AdapterError(
            f"{str(path)!r} is a {info['strategy']} adapter, not a full fine-tune; extraction reads a file saved "
            "with strategy 'full' (personalize(..., strategy='full') or db-adapt train --strategy full)."
        )
    return info


def _extract_component(
    module: torch.nn.Module, state: dict[str, torch.Tensor], component: str, rank: int | None, energy: float | None
) -> tuple[list[ExtractedLayer], list[LeftOut], dict[str, torch.Tensor]]:
    """One component's LoRA layers (with peft's state-dict keys) and the changed weights left out."""
    base = module.state_dict()
    layers, factors, held = [], {}, set()
    for name, layer in module.named_modules():
        if not _has_lora_form(layer):
            continue
        key = f"{name}.weight"
        held.add(key)
        delta = _change(state[key], base[key])
        if delta is None:
            continue
        down, up, report = _low_rank(delta, rank, energy)
        layers.append(ExtractedLayer(component, name, tuple(delta.shape), *report))
        factors[f"{name}.lora_A.weight"] = down
        factors[f"{name}.lora_B.weight"] = up
    left_out = []
    for key, tensor in state.items():
        delta = None if key in held else _change(tensor, base[key])
        if delta is not None:
            left_out.append(LeftOut(f"{component}.{key}", float(delta.double().square().sum())))
    return layers, left_out, factors


def _has_lora_form(layer: torch.nn.Module) -> bool:
    import torch

    if type(layer) is torch.nn.Linear:
        return True
    # peft's conv LoRA down layer takes the kernel, stride and padding, but no dilation, groups or padding mode.
    return (
        type(layer) is torch.nn.Conv2d
        and layer.groups == 1
        and layer.dilation == (1, 1)
        and layer.padding_mode == "zeros"
        and isinstance(layer.padding, tuple)
    )


def _change(tuned: torch.Tensor, base: torch.Tensor) -> torch.Tensor | None:
    """The fine-tune's change of one weight in float32 on the base's device, or None if it did not change.

    Compared in the coarser of the two dtypes: an fp16 file of an fp32 base (or the other way round)
    differs everywhere by rounding, which is no change.
    """
    import torch

    if not (tuned.is_floating_point() and base.is_floating_point()):
        return None
    coarse = max((tuned.dtype, base.dtype), key=lambda dtype: torch.finfo(dtype).eps)
    if torch.equal(tuned.to(base.device, coarse), base.to(coarse)):
        return None
    return tuned.to(base.device, torch.float32) - base.float()


def _low_rank(
    delta: torch.Tensor, rank: int | None, energy: float | None
) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int, float, float]]:
    """LoRA down and up weights of one change, and (rank, full rank, retained energy, change) for the report.

    The singular values are split evenly between the factors (down = sqrt(S) V^T, up = U sqrt(S)), so
    neither factor is much larger than the other when stored in half precision.
    """
    import torch

    matrix = delta.reshape(delta.shape[0], -1)  # a conv kernel (out, in, kh, kw) as (out, in * kh * kw)
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    squares = s.double().square()
    kept = squares.cumsum(0) / squares.sum()
    # The smallest rank whose kept share reaches `energy` (every shorter prefix falls short of it).
    k = min(rank if rank is not None else int((kept < energy).sum()) + 1, s.numel())
    root = s[:k].sqrt()
    down = (root[:, None] * vh[:k]).cpu()
    up = (u[:, :k] * root).cpu()
    if delta.ndim == 4:  # peft's conv LoRA: down a conv with the layer's kernel, up a 1x1 conv
        down = down.reshape(k, *delta.shape[1:])
        up = up.reshape(*up.shape, 1, 1)
    return down.contiguous(), up.contiguous(), (k, s.numel(), float(kept[k - 1]), float(squares.sum()))


def _check_extractable(
    factors: dict[str, dict[str, torch.Tensor]], tuned: dict[str, Any], family: type[Family], path: Path
) -> None:
    if family.denoiser not in factors:
        raise AdapterError(
            f"{str(path)!r}: the fine-tune changed no Linear or Conv2d weight of the {family.denoiser}, so a LoRA "
            "has nothing to hold."
        )
    # The lora strategy adapts either no text encoder or every one it trains.
    bare = [name for name in tuned if name != family.denoiser and name not in factors]
    changed = [name for name in factors if name != family.denoiser]
    if bare and changed:
        raise AdapterError(
            f"{str(path)!r}: the fine-tune changed Linear weights of {', '.join(changed)} but none of "
            f"{', '.join(bare)}; a db-adapters LoRA adapts every trained text encoder or none."
        )


def report_lines(extraction: Extraction, most: int = 10) -> list[str]:
    """The per-layer table (rank, retained energy), then the `most` largest changes the LoRA cannot hold.

    Example:
        >>> print("\\n".join(report_lines(extract_lora(pipe, "dog_full.safetensors", rank=8))))  # doctest: +SKIP
    """
    names = [f"{layer.component}.{layer.module}" for layer in extraction.layers]
    width = max(len(name) for name in names)
    lines = [f"{'layer':<{width}}  {'shape':<16} {'rank':<12}  retained"]
    for name, layer in zip(names, extraction.layers, strict=True):
        shape = "x".join(str(n) for n in layer.shape)
        rank = f"{layer.rank:>4} of {layer.full_rank:<4}"
        lines.append(f"{name:<{width}}  {shape:<16} {rank}  {layer.retained_energy:.4f}")
    left_out = extraction.left_out
    if left_out:
        share = 1 - extraction.layer_change / extraction.total_change
        lines.append(f"not held by a LoRA: {len(left_out)} changed weights, {share:.2%} of the whole change")
        lines += [f"  {item.name:<{width - 2}}  {extraction.share(item):.2%}" for item in left_out[:most]]
        if len(left_out) > most:
            lines.append(f"  ... and {len(left_out) - most} smaller ones")
    return lines
