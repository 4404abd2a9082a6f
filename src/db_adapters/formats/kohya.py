"""kohya-ss LoRA keys, the format A1111 and ComfyUI read: `lora_unet_<module path with _>.lora_down.weight`,
`.lora_up.weight` and `.alpha` per module, text encoders under `lora_te_` (SD 1.x/2.x) or `lora_te1_` /
`lora_te2_` (SDXL, Flux), and `ss_*` metadata.

Pure functions, state dict in, state dict out. The input is a db-adapters LoRA file's tensors in diffusers'
layout (`unet.<module>.lora_A.weight`, `text_encoder.text_model.<module>.lora_B.weight`, ...). The module
names (`kohya_names`, SDXL's SGM block numbers, the `ss_*` header) are shared with LyCORIS's keys
(lycoris.py); diffusers names only LoRA tensors, not modules, so they are written here by hand, each rule
with its reason. diffusers reads every file this writes back through `load_lora_weights`
(`_convert_non_diffusers_lora_to_diffusers` for SD and SDXL, `_convert_kohya_flux_lora_to_diffusers` for
Flux); it has no kohya reader for SD3, so SD3 is not offered.
"""

from __future__ import annotations

import json
import re
from collections.abc import Collection, Iterable, Mapping
from typing import TYPE_CHECKING, Any

from ..errors import AdapterError

if TYPE_CHECKING:
    import torch

# The families kohya files exist for, with diffusers' reader for each; and kohya's `ss_base_model_version`.
FAMILIES = ("sd", "sdxl", "flux")
BASE_MODEL_VERSIONS = {"sd": "sd_v1", "sdxl": "sdxl_base_v1-0", "flux": "flux1"}
NETWORK_MODULE = "networks.lora"


def check_family(family: str) -> None:
    """`AdapterError` unless kohya files of `family` exist and diffusers can read them back."""
    if family == "sd3":
        raise AdapterError(
            "kohya format is not offered for SD3: diffusers has no reader for kohya SD3 LoRA keys, so such a file "
            "could not be checked to render what was trained. Use the diffusers format (pipe.load_lora_weights "
            "reads it) or the peft format."
        )
    if not family:
        raise AdapterError("kohya names depend on the model family, and the adapter's metadata names none.")
    if family not in FAMILIES:
        raise AdapterError(f"kohya format is written for {', '.join(FAMILIES)} LoRAs, not for family {family!r}.")


def to_kohya(
    state: Mapping[str, torch.Tensor],
    family: str,
    alpha: float,
    *,
    layers_per_block: int | None = None,
) -> dict[str, torch.Tensor]:
    """A LoRA in diffusers' layout as kohya keys, with `.alpha` per module so each scales as trained.

    Args:
        state (`Mapping[str, Tensor]`): `component.<module>.lora_A.weight` / `.lora_B.weight` tensors.
        family (`str`): "sd", "sdxl" or "flux".
        alpha (`float`): the LoRA alpha (the update is scaled by alpha / rank).
        layers_per_block (`int | None`): SDXL only: the UNet's `layers_per_block`, which numbers kohya's SGM
            blocks; None infers it from the up blocks' attention layers in `state`.

    Example:
        >>> import torch
        >>> state = {"unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight": torch.ones(4, 8),
        ...          "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_B.weight": torch.ones(8, 4)}
        >>> sorted(to_kohya(state, "sd", alpha=8))  # doctest: +NORMALIZE_WHITESPACE
        ['lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.alpha',
         'lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight',
         'lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_up.weight']
    """
    check_family(family)
    modules = _modules(state)
    result = {}
    if family == "flux":
        denoiser = {name: pair for name, pair in modules.items() if name.startswith("transformer.")}
        modules = {name: pair for name, pair in modules.items() if name not in denoiser}
        result |= _flux_denoiser(denoiser, alpha)
    names = kohya_names(modules, family, layers_per_block=layers_per_block)
    for name, (down, up) in modules.items():
        result |= _lora(names[name], down, up, alpha)
    return result


def kohya_names(modules: Iterable[str], family: str, *, layers_per_block: int | None = None) -> dict[str, str]:
    """kohya's name of each adapted module: `lora_unet_<path with _>` (SDXL: in SGM blocks), `lora_te_...`.

    The names every kohya-style file uses, LoRA and LyCORIS alike (ComfyUI and A1111 map them back to
    modules). diffusers' `convert_state_dict_to_kohya` names only LoRA tensors, not modules, so the
    naming is written here once for both.

    Args:
        modules (`Iterable[str]`): `component.<module>` in diffusers' names: the UNet's (`unet.`) and the CLIP
            text encoders' (`text_encoder.`, `text_encoder_2.`), with or without CLIP's `text_model.` level.
        family (`str`): "sd", "sdxl" (or "flux" for its CLIP text encoder; its transformer is `to_kohya`'s).
        layers_per_block (`int | None`): SDXL only: the UNet's `layers_per_block`, which numbers kohya's SGM
            blocks; None infers it from the up blocks' attention layers in `modules`.

    Example:
        >>> kohya_names(["unet.mid_block.attentions.0.transformer_blocks.0.attn1.to_k",
        ...              "text_encoder.encoder.layers.0.self_attn.q_proj"], "sd")  # doctest: +NORMALIZE_WHITESPACE
        {'unet.mid_block.attentions.0.transformer_blocks.0.attn1.to_k':
             'lora_unet_mid_block_attentions_0_transformer_blocks_0_attn1_to_k',
         'text_encoder.encoder.layers.0.self_attn.q_proj': 'lora_te_text_model_encoder_layers_0_self_attn_q_proj'}
    """
    modules = list(modules)
    lpb = _layers_per_block(modules, layers_per_block) if family == "sdxl" else 0
    names = {}
    for name in modules:
        component, _, module = (_sgm_name(name, lpb) if family == "sdxl" else name).partition(".")
        if component not in _PREFIXES:
            raise AdapterError(f"kohya's names cover the UNet and CLIP text encoders; {name!r} is in neither.")
        if component.startswith("text_encoder") and not module.startswith("text_model."):
            # kohya's text-encoder keys spell out CLIP's `text_model.` level, which transformers 5 dropped.
            module = f"text_model.{module}"
        prefix = "lora_te_" if family == "sd" and component == "text_encoder" else _PREFIXES[component]
        names[name] = prefix + module.replace(".", "_")
    return names


# kohya's prefix per component; SD 1.x/2.x's one text encoder is `lora_te_`, not SDXL's first `lora_te1_`.
_PREFIXES = {"unet": "lora_unet_", "text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}


def kohya_metadata(
    info: Mapping[str, Any],
    family: str,
    *,
    context_widths: Collection[int] = (),
    network_module: str = NETWORK_MODULE,
    network_args: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """kohya's `ss_*` header fields for an adapter with db-adapters metadata `info` (what A1111 and ComfyUI show).

    Args:
        info (`Mapping[str, Any]`): the adapter's db-adapters metadata (`unpack_metadata`).
        family (`str`): "sd", "sdxl" or "flux".
        context_widths (`Collection[int]`): the input widths of the adapted cross-attention key/value layers;
            all 1024 (OpenCLIP-H's) marks SD 2.x, where SD 1.x has CLIP-L's 768.
        network_module (`str`): kohya's `ss_network_module`: "networks.lora", or "lycoris.kohya" for LyCORIS.
        network_args (`Mapping[str, str] | None`): kohya's `ss_network_args` (LyCORIS: `algo` and its options).

    Example:
        >>> info = {"identifier": "olg", "class_noun": "dog", "instance_prompt": "a olg dog", "steps": 400,
        ...         "resolution": 512, "strategy_config": {"rank": 4, "alpha": 8}, "base_model": {"model_id": "m"}}
        >>> kohya_metadata(info, "sd", context_widths={1024})["ss_base_model_version"]
        'sd_v2'
    """
    config = info.get("strategy_config") or {}
    base = info.get("base_model") or {}
    version = BASE_MODEL_VERSIONS[family]
    v2 = family == "sd" and set(context_widths) == {1024}
    if v2:
        version = "sd_v2"
    comment = (
        f"DreamBooth subject by db-adapters {info.get('library_version') or ''}".rstrip()
        + f": identifier {info['identifier']!r}, class {info['class_noun']!r}, prompt {info['instance_prompt']!r}"
    )
    metadata = {
        "ss_network_module": network_module,
        "ss_network_dim": str(config.get("rank")),
        "ss_network_alpha": str(float(config.get("alpha") or config.get("rank"))),
        "ss_base_model_version": version,
        "ss_sd_model_name": base.get("model_id") or "",
        "ss_v2": str(v2),
        "ss_training_comment": comment,
        "ss_max_train_steps": str(info.get("steps") or 0),
        "ss_resolution": f"({info.get('resolution') or 0}, {info.get('resolution') or 0})",
    }
    if network_args is not None:
        metadata["ss_network_args"] = json.dumps(dict(network_args))
    if info.get("learning_rate") is not None:
        metadata["ss_learning_rate"] = str(info["learning_rate"])
    return metadata


def lora_context_widths(state: Mapping[str, torch.Tensor]) -> set[int]:
    """The input widths of a LoRA's cross-attention key/value layers (`kohya_metadata`'s SD 2.x test)."""
    return {t.shape[-1] for k, t in state.items() if re.search(r"attn2\.to_[kv]\.lora_A\.weight$", k)}


# --- SDXL: kohya trains on Stability's SGM UNet, whose blocks are numbered differently ----------------------

_ATTENTION = re.compile(r"^unet\.(down_blocks\.(\d+)|mid_block|up_blocks\.(\d+))\.attentions\.(\d+)\.(.+)$")


def _sgm_name(name: str, layers_per_block: int) -> str:
    # diffusers has only the reverse (`_maybe_map_sgm_blocks_to_diffusers`), so this is its inverse by hand:
    # down_blocks.b.attentions.l -> input_blocks.(1 + b*(lpb+1) + l).1 (index 0 is conv_in, and every level
    # ends with a downsampler), mid_block.attentions.0 -> middle_block.1 (between two resnets),
    # up_blocks.b.attentions.l -> output_blocks.(b*(lpb+1) + l).1 (up blocks have lpb + 1 layers).
    if not name.startswith("unet."):
        return name
    match = _ATTENTION.match(name)
    if match is None:
        raise AdapterError(
            f"kohya's SDXL names are written for the UNet's attention layers (the default targets); {name!r} is "
            "not in one. Use the diffusers format for this adapter."
        )
    block, down, up, layer, rest = match.groups()
    step = layers_per_block + 1
    if down is not None:
        sgm = f"input_blocks.{1 + int(down) * step + int(layer)}.1"
    elif up is not None:
        sgm = f"output_blocks.{int(up) * step + int(layer)}.1"
    else:
        sgm = "middle_block.1"
    return f"unet.{sgm}.{rest}"


def _layers_per_block(modules: Mapping[str, Any], given: Any) -> int:
    down = [int(m.group(4)) for m in map(_ATTENTION.match, modules) if m and m.group(2) is not None]
    up = [int(m.group(4)) for m in map(_ATTENTION.match, modules) if m and m.group(3) is not None]
    if given is None:
        # An up block holds layers_per_block + 1 attention layers, all adapted by the default targets.
        if not up:
            raise AdapterError(
                "cannot number kohya's SDXL blocks: the adapter has no up-block attention layers to tell the UNet's "
                "layers_per_block from; save it from the pipeline (adapter.save(..., format='kohya'))."
            )
        given = max(up)
    if isinstance(given, bool) or not isinstance(given, int) or given < 1:
        raise AdapterError(
            f"kohya's SDXL block names need one layers_per_block for the whole UNet; this UNet has {given!r}."
        )
    if any(layer >= given for layer in down) or any(layer > given for layer in up):
        raise AdapterError(f"the adapter's attention layers do not fit a UNet with layers_per_block={given}.")
    return given


# --- Flux: BFL's transformer, which fuses q, k and v (and the single blocks' MLP input) in one Linear ------

# diffusers' module (in transformer_blocks.i) -> (kohya name in double_blocks_i, place in a fused Linear, parts).
_DOUBLE = {
    "attn.to_q": ("img_attn_qkv", 0, 3),
    "attn.to_k": ("img_attn_qkv", 1, 3),
    "attn.to_v": ("img_attn_qkv", 2, 3),
    "attn.to_out.0": ("img_attn_proj", 0, 1),
    "ff.net.0.proj": ("img_mlp_0", 0, 1),
    "ff.net.2": ("img_mlp_2", 0, 1),
    "norm1.linear": ("img_mod_lin", 0, 1),
    "attn.add_q_proj": ("txt_attn_qkv", 0, 3),
    "attn.add_k_proj": ("txt_attn_qkv", 1, 3),
    "attn.add_v_proj": ("txt_attn_qkv", 2, 3),
    "attn.to_add_out": ("txt_attn_proj", 0, 1),
    "ff_context.net.0.proj": ("txt_mlp_0", 0, 1),
    "ff_context.net.2": ("txt_mlp_2", 0, 1),
    "norm1_context.linear": ("txt_mod_lin", 0, 1),
}
# ... in single_transformer_blocks.i -> single_blocks_i: linear1 is [q; k; v; mlp input] in one Linear.
_SINGLE = {
    "attn.to_q": ("linear1", 0, 4),
    "attn.to_k": ("linear1", 1, 4),
    "attn.to_v": ("linear1", 2, 4),
    "proj_mlp": ("linear1", 3, 4),
    "proj_out": ("linear2", 0, 1),
    "norm.linear": ("modulation_lin", 0, 1),
}
# ... outside the blocks. (diffusers 0.42.1's reader converts these without the `transformer.` prefix, so its
# load_lora_weights skips them; ComfyUI and A1111 apply them. LoRA's default targets are all inside blocks.)
_OUTSIDE = {
    "x_embedder": "img_in",
    "context_embedder": "txt_in",
    "time_text_embed.timestep_embedder.linear_1": "time_in_in_layer",
    "time_text_embed.timestep_embedder.linear_2": "time_in_out_layer",
    "time_text_embed.text_embedder.linear_1": "vector_in_in_layer",
    "time_text_embed.text_embedder.linear_2": "vector_in_out_layer",
    "time_text_embed.guidance_embedder.linear_1": "guidance_in_in_layer",
    "time_text_embed.guidance_embedder.linear_2": "guidance_in_out_layer",
    "proj_out": "final_layer_linear",
    "norm_out.linear": "final_layer_adaLN_modulation_1",
}
_BLOCK = re.compile(r"^transformer\.(transformer_blocks|single_transformer_blocks)\.(\d+)\.(.+)$")
FLUX_MLP_RATIO = 4  # FluxSingleTransformerBlock's MLP width over the model width (fixed in diffusers)


def _flux_denoiser(modules: dict[str, tuple[Any, Any]], alpha: float) -> dict[str, torch.Tensor]:
    # diffusers reads kohya Flux files (`_convert_kohya_flux_lora_to_diffusers`) but writes none: this is that
    # reader inverted by hand. A fused Linear gets one LoRA of rank parts * r: the parts' downs stacked, their
    # ups block-diagonal, a zero block for a part not adapted. That is exactly the same update, and the layout
    # diffusers' reader splits back losslessly (its "sparse" case); alpha grows with the rank so alpha / rank
    # stays as trained.
    fused: dict[str, list[Any]] = {}
    result: dict[str, torch.Tensor] = {}
    for name, (down, up) in modules.items():
        match = _BLOCK.match(name)
        if match:
            kind, index, module = match.groups()
            table, prefix = (_DOUBLE, "double_blocks") if kind == "transformer_blocks" else (_SINGLE, "single_blocks")
            if module not in table:
                raise _unmapped(name)
            target, place, parts = table[module]
            slots = fused.setdefault(f"lora_unet_{prefix}_{index}_{target}", [None] * parts)
            slots[place] = (down, up)
            continue
        module = name.removeprefix("transformer.")
        if module not in _OUTSIDE:
            raise _unmapped(name)
        key = f"lora_unet_{_OUTSIDE[module]}"
        if module == "norm_out.linear":
            # BFL orders this modulation (scale, shift), diffusers (shift, scale): swap the up's halves back.
            from diffusers.loaders.lora_conversion_utils import swap_scale_shift

            up = swap_scale_shift(up)
        if module in ("proj_out", "norm_out.linear"):
            # diffusers' reader ignores the final layer's alpha (scale 1) while kohya's users apply it:
            # the scale goes into the weights and alpha = rank, right for both.
            down, scale = down * (alpha / down.shape[0]), down.shape[0]
            result |= _lora(key, down, up, scale)
        else:
            result |= _lora(key, down, up, alpha)
    for key, slots in fused.items():
        result |= _fused_lora(key, slots, alpha)
    return result


def _fused_lora(key: str, slots: list[Any], alpha: float) -> dict[str, torch.Tensor]:
    import torch

    present = [slot for slot in slots if slot is not None]
    ranks = {down.shape[0] for down, _ in present}
    if len(ranks) != 1 or any(down.ndim != 2 for down, _ in present):
        raise AdapterError(f"{key}: the fused parts' LoRAs must be Linear with one rank (found ranks {sorted(ranks)}).")
    rank, (down0, up0) = ranks.pop(), present[0]
    # q, k and v are all the model's width; the single blocks' MLP input is FLUX_MLP_RATIO times it.
    attention = [slot for slot in slots[:3] if slot is not None]
    width = attention[0][1].shape[0] if attention else slots[3][1].shape[0] // FLUX_MLP_RATIO
    downs, ups = [], []
    for place, slot in enumerate(slots):
        if slot is None:
            rows = width * FLUX_MLP_RATIO if place == 3 else width
            slot = (down0.new_zeros(rank, down0.shape[1]), up0.new_zeros(rows, rank))
        downs.append(slot[0])
        ups.append(slot[1])
    return _lora(key, torch.cat(downs), torch.block_diag(*ups), alpha * len(slots))


def _lora(key: str, down: torch.Tensor, up: torch.Tensor, alpha: float) -> dict[str, torch.Tensor]:
    import torch

    return {
        f"{key}.lora_down.weight": down.contiguous(),
        f"{key}.lora_up.weight": up.contiguous(),
        f"{key}.alpha": torch.tensor(float(alpha), dtype=torch.float32),
    }


def _unmapped(name: str) -> AdapterError:
    return AdapterError(
        f"kohya's Flux names have no place for {name!r}; use the diffusers format for this adapter "
        "(or train it with the default target modules)."
    )


# --- shared ------------------------------------------------------------------------------------------------


def _modules(state: Mapping[str, torch.Tensor]) -> dict[str, tuple[Any, Any]]:
    """`component.<module>` -> (lora_A, lora_B); `AdapterError` for any other tensor or a half pair."""
    downs, ups = {}, {}
    for key, tensor in state.items():
        name, dot, kind = key.rpartition(".lora_")
        if not dot or kind not in ("A.weight", "B.weight"):
            raise AdapterError(f"tensor {key!r} is not a LoRA weight (lora_A/lora_B); only plain LoRA converts.")
        (downs if kind == "A.weight" else ups)[name] = tensor
    unpaired = sorted(set(downs) ^ set(ups))
    if unpaired:
        raise AdapterError(f"LoRA module {unpaired[0]!r} lacks its lora_A or lora_B weight; the file is damaged.")
    return {name: (downs[name], ups[name]) for name in sorted(downs)}
