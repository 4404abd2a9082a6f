"""LyCORIS keys for LoHa and LoKr adapters, the kohya-style file ComfyUI and A1111 read beside kohya's LoRA:
kohya's module names (`kohya_names`: `lora_unet_...`, `lora_te_...`, SDXL's SGM blocks) with LyCORIS's tensors
per module and `.alpha`, and kohya's `ss_*` header with `ss_network_module` "lycoris.kohya".

Pure functions, state dict in, state dict out. The input is a db-adapters LoHa or LoKr file's tensors, peft's
adapter state dict under `component.` keys (`unet.<module>.hada_w1_a`), and each component's peft config.
peft ported these layers from LyCORIS and kept its tensor names and shapes; what differs is where the scale
alpha / r is applied, settled here per module so that ComfyUI's loaders (comfy/weight_adapter/loha.py and
lokr.py, `calculate_weight`) rebuild exactly the update the peft layer adds (its `get_delta_weight`):

- LoHa: (w1_a @ w1_b) * (w2_a @ w2_b) * alpha / r, through Tucker cores `hada_t1`/`hada_t2` where peft has
  them. ComfyUI scales by `.alpha` / w1_b's rank, as peft does: the tensors are written as they are.
- LoKr: kron(w1, w2) * alpha / r, each factor whole (`lokr_w1`) or a product (`lokr_w1_a @ lokr_w1_b`).
  LyCORIS, ComfyUI and A1111 apply `.alpha` / rank only when a factor is a product, and scale 1 when both are
  whole; peft always scales. So where both are whole the scale goes into w1, and `.alpha` is the rank, as
  LyCORIS itself writes then.

OFT is refused (`OFT_REFUSAL` says why: no LyCORIS keys hold peft's OFT exactly), and so are families other
than SD and SDXL (`check_lycoris`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from ..errors import AdapterError
from .kohya import kohya_metadata, kohya_names

if TYPE_CHECKING:
    import torch

# Our strategies whose files hold peft LyCORIS layers, and the tensors per module each writes.
TENSORS = {
    "loha": ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2"),
    "lokr": ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2"),
}
KINDS = (*TENSORS, "oft")
FAMILIES = ("sd", "sdxl")
NETWORK_MODULE = "lycoris.kohya"

OFT_REFUSAL = (
    "an oft adapter cannot be written as LyCORIS keys (ComfyUI, A1111) exactly. peft's OFT, which db-adapters "
    "trains, turns each adapted layer's input features: W -> W @ R^T, R block-diagonal with one block per "
    "block_size input features, each block the Cayley-Neumann series I + 2Q + 2Q^2 + 2Q^3 + Q^4 of a "
    "skew-symmetric Q (peft's default, only nearly orthogonal). The `oft_blocks` that LyCORIS, ComfyUI and "
    "A1111 read turn the output features instead: W -> R^T @ W, blocks over output features, R the exact Cayley "
    "transform (I + Q)(I - Q)^-1; no such blocks give peft's weights in general. Keep the db-adapters file "
    "(format 'diffusers'; load_adapter and db-adapt generate read it), or train loha or lokr for a ComfyUI/A1111 "
    "file."
)


def check_lycoris(strategy: str, family: str) -> None:
    """`AdapterError` unless an adapter of `strategy` (loha, lokr) on a `family` model can be written as LyCORIS keys.

    Args:
        strategy (`str`): "loha", "lokr" or "oft".
        family (`str`): the adapter's model family.

    Example:
        >>> check_lycoris("loha", "sdxl")
    """
    if strategy == "oft":
        raise AdapterError(OFT_REFUSAL)
    if strategy not in TENSORS:
        raise AdapterError(f"LyCORIS keys are written for {', '.join(TENSORS)} adapters, not {strategy!r}.")
    if not family:
        raise AdapterError("kohya names depend on the model family, and the adapter's metadata names none.")
    if family not in FAMILIES:
        why = _OTHER_FAMILIES.get(family, "no kohya naming is written for it")
        raise AdapterError(
            f"{strategy} adapters of family {family!r} are not offered in kohya/LyCORIS format: {why}. LyCORIS keys "
            f"are written for {' and '.join(FAMILIES)}; keep the db-adapters file (format 'diffusers'; load_adapter "
            "reads it)."
        )


_OTHER_FAMILIES = {
    "flux": "BFL's Flux layers, which kohya's names follow, fuse q, k and v (and the single blocks' MLP input) "
    "in one Linear, and a LoHa or LoKr per part is not one LoHa or LoKr of the fused layer",
    "sd3": "diffusers has no kohya reader for SD3, so the names could not be checked",
}


def to_lycoris(
    state: Mapping[str, torch.Tensor],
    strategy: str,
    configs: Mapping[str, Mapping[str, Any]],
    family: str,
    *,
    layers_per_block: int | None = None,
) -> dict[str, torch.Tensor]:
    """A db-adapters LoHa or LoKr adapter as LyCORIS keys, each module's update exactly as the peft layer's.

    Args:
        state (`Mapping[str, Tensor]`): peft's tensors under `component.` keys (`unet.<module>.hada_w1_a`).
        strategy (`str`): "loha" or "lokr".
        configs (`Mapping[str, Mapping]`): each component's peft config as saved (`r`, `alpha`).
        family (`str`): "sd" or "sdxl".
        layers_per_block (`int | None`): SDXL only: the UNet's `layers_per_block` (None: inferred, see `kohya_names`).

    Example:
        >>> import torch
        >>> name = "unet.mid_block.attentions.0.transformer_blocks.0.attn1.to_q"
        >>> state = {f"{name}.{t}": torch.ones(8, 2) if t.endswith("a") else torch.ones(2, 8)
        ...          for t in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")}
        >>> out = to_lycoris(state, "loha", {"unet": {"r": 2, "alpha": 4}}, "sd")
        >>> out["lora_unet_mid_block_attentions_0_transformer_blocks_0_attn1_to_q.alpha"].item()
        4.0
    """
    import torch

    check_lycoris(strategy, family)
    modules = _modules(state, TENSORS[strategy])
    names = kohya_names(modules, family, layers_per_block=layers_per_block)
    write = _loha if strategy == "loha" else _lokr
    result = {}
    for name, tensors in modules.items():
        rank, alpha = _rank_and_alpha(configs, name.partition(".")[0])
        written, alpha = write(name, tensors, rank, alpha)
        key = names[name]
        result |= {f"{key}.{kind}": tensor.contiguous() for kind, tensor in written.items()}
        result[f"{key}.alpha"] = torch.tensor(float(alpha), dtype=torch.float32)
    return result


def lycoris_metadata(info: Mapping[str, Any], state: Mapping[str, torch.Tensor], family: str) -> dict[str, str]:
    """kohya's `ss_*` header for a LyCORIS file: `ss_network_module` "lycoris.kohya" and `ss_network_args`
    with LyCORIS's `algo` and options, as LyCORIS's kohya trainer writes them (strings).

    Args:
        info (`Mapping[str, Any]`): the adapter's db-adapters metadata (`unpack_metadata`).
        state (`Mapping[str, Tensor]`): the adapter's peft tensors (for SD 2.x detection).
        family (`str`): "sd" or "sdxl".

    Example:
        >>> info = {"identifier": "olg", "class_noun": "dog", "instance_prompt": "a olg dog", "strategy": "lokr",
        ...         "strategy_config": {"rank": 4, "alpha": 8, "decompose_factor": -1}}
        >>> lycoris_metadata(info, {}, "sd")["ss_network_args"]
        '{"algo": "lokr", "factor": "-1", "rank_dropout": "0.0", "module_dropout": "0.0"}'
    """
    config = info.get("strategy_config") or {}
    args = {"algo": info["strategy"]}
    if info["strategy"] == "lokr":
        args["factor"] = str(config.get("decompose_factor", -1))
    for option in ("rank_dropout", "module_dropout"):
        args[option] = str(float(config.get(option) or 0.0))
    if any(".hada_t1" in key or ".lokr_t2" in key for key in state):
        args["use_tucker"] = "True"
    return kohya_metadata(
        info, family, context_widths=_context_widths(state), network_module=NETWORK_MODULE, network_args=args
    )


def peft_configs(header: Mapping[str, str]) -> dict[str, dict[str, Any]]:
    """Each component's peft config from a LoHa/LoKr/OFT file's header; `AdapterError` if it is missing or damaged.

    Example:
        >>> peft_configs({"peft_config": '{"unet": {"r": 4, "alpha": 8}}'})["unet"]["alpha"]
        8
    """
    from ..strategies.peft_adapters import PEFT_CONFIG_KEY

    try:
        configs = json.loads(header[PEFT_CONFIG_KEY])
    except (KeyError, TypeError, ValueError, RecursionError):
        configs = None
    if not isinstance(configs, dict) or not all(isinstance(c, dict) for c in configs.values()):
        raise AdapterError(
            f"the file's header lacks a readable {PEFT_CONFIG_KEY!r} (its peft configs); the file is damaged."
        )
    return configs


# --- per module: the tensors ComfyUI reads, and the `.alpha` that makes its scale peft's -------------------


# peft scales every layer's update by alpha / r (`LoHaLayer.update_layer`, `LoKrLayer.update_layer`).


def _loha(
    name: str, tensors: dict[str, torch.Tensor], rank: float, alpha: float
) -> tuple[dict[str, torch.Tensor], float]:
    required = {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"}
    tucker = {"hada_t1", "hada_t2"} & tensors.keys()
    if not required <= tensors.keys() or len(tucker) == 1:
        raise _incomplete("LoHa", name, tensors)
    # ComfyUI's loha.py scales by `.alpha` / hada_w1_b.shape[0] (the rank).
    return tensors, alpha / rank * tensors["hada_w1_b"].shape[0]


def _lokr(
    name: str, tensors: dict[str, torch.Tensor], rank: float, alpha: float
) -> tuple[dict[str, torch.Tensor], float]:
    w1_whole, w2_whole = "lokr_w1" in tensors, "lokr_w2" in tensors
    w1_product = {"lokr_w1_a", "lokr_w1_b"} <= tensors.keys()
    w2_product = {"lokr_w2_a", "lokr_w2_b"} <= tensors.keys()
    if w1_whole == w1_product or w2_whole == w2_product or ("lokr_t2" in tensors and not w2_product):
        raise _incomplete("LoKr", name, tensors)
    # ComfyUI's lokr.py scales by `.alpha` / the product factor's rank (w2's when both are products) ...
    stored = tensors["lokr_w2_b"].shape[0] if w2_product else tensors["lokr_w1_b"].shape[0] if w1_product else None
    if stored is not None:
        return tensors, alpha / rank * stored
    # ... and by 1 when both factors are whole: peft's scale goes into w1, and `.alpha` is the rank, what
    # LyCORIS writes then (its alpha = lora_dim), which no reader applies.
    w1 = tensors["lokr_w1"]
    return {**tensors, "lokr_w1": (w1.float() * (alpha / rank)).to(w1.dtype)}, rank


def _incomplete(kind: str, name: str, tensors: Mapping[str, Any]) -> AdapterError:
    return AdapterError(
        f"{kind} module {name!r} has tensors {sorted(tensors)}, not a whole {kind}; the file is damaged."
    )


# --- shared ------------------------------------------------------------------------------------------------


def _rank_and_alpha(configs: Mapping[str, Mapping[str, Any]], component: str) -> tuple[float, float]:
    config = configs.get(component)
    if config is None:
        raise AdapterError(f"the file's peft configs have none for {component!r}; the file is damaged.")
    if config.get("rank_pattern") or config.get("alpha_pattern"):
        raise AdapterError(
            f"the {component} peft config sets a per-module rank_pattern/alpha_pattern, which db-adapters' "
            "strategies never set and this export does not follow; keep the db-adapters file."
        )
    rank, alpha = config.get("r"), config.get("alpha")
    numbers = all(isinstance(v, int | float) and not isinstance(v, bool) and v > 0 for v in (rank, alpha))
    if not numbers:
        raise AdapterError(f"the {component} peft config's r={rank!r}, alpha={alpha!r} are not positive numbers.")
    return rank, alpha


def _modules(state: Mapping[str, torch.Tensor], kinds: tuple[str, ...]) -> dict[str, dict[str, torch.Tensor]]:
    """`component.<module>` -> {tensor kind: tensor}; `AdapterError` for a tensor that is none of `kinds`."""
    parts = {key: key.rpartition(".") for key in sorted(state)}
    stray = [key for key, (name, _, kind) in parts.items() if kind not in kinds or not name]
    if stray:
        raise AdapterError(f"tensor {stray[0]!r} is not one of this adapter kind's tensors ({', '.join(kinds)}).")
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for key, (name, _, kind) in parts.items():
        modules.setdefault(name, {})[kind] = state[key]
    return modules


def _context_widths(state: Mapping[str, torch.Tensor]) -> set[int]:
    # The input width of each adapted cross-attention key/value layer: LoHa's w1_b has it whole, LoKr splits it
    # between its two factors' columns.
    modules = _modules(state, TENSORS["loha"] + TENSORS["lokr"]) if state else {}
    widths = set()
    for name, tensors in modules.items():
        if not name.endswith(("attn2.to_k", "attn2.to_v")):
            continue
        if "hada_w1_b" in tensors:
            widths.add(tensors["hada_w1_b"].shape[1])
            continue
        w1 = tensors.get("lokr_w1", tensors.get("lokr_w1_b"))
        w2 = tensors.get("lokr_w2", tensors.get("lokr_w2_b"))
        if w1 is not None and w2 is not None:
            widths.add(w1.shape[1] * w2.shape[1])
    return widths
