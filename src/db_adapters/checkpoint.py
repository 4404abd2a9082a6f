"""Training state on disk without pickle: tensors in safetensors, everything else in JSON.

A checkpoint is two files beside each other, `NAME.safetensors` and `NAME.json`, each written
atomically; the JSON is written last, so a checkpoint whose JSON exists is complete. Optimizer state
is split into its tensors and its plain values, so `torch.load` (and unpickling) is never needed.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .export import save_tensors, write_atomically

if TYPE_CHECKING:
    import torch


def optimizer_state(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split an optimizer's state into tensors (for safetensors) and JSON-able values."""
    import torch

    state = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    plain: dict[str, Any] = {"param_groups": state["param_groups"], "state": {}}
    for param_id, values in state["state"].items():
        for key, value in values.items():
            if torch.is_tensor(value):
                tensors[f"optimizer.{param_id}.{key}"] = value
            else:
                plain["state"].setdefault(str(param_id), {})[key] = value
    return tensors, plain


def restore_optimizer(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], plain: dict) -> None:
    """Inverse of `optimizer_state`."""
    state: dict[int, dict[str, Any]] = {}
    for name, tensor in tensors.items():
        if name.startswith("optimizer."):
            _, param_id, key = name.split(".", 2)
            state.setdefault(int(param_id), {})[key] = tensor
    for param_id, values in plain["state"].items():
        state.setdefault(int(param_id), {}).update(values)
    optimizer.load_state_dict({"state": state, "param_groups": plain["param_groups"]})


def save_checkpoint(stem: str | Path, tensors: dict[str, torch.Tensor], info: dict[str, Any]) -> Path:
    """Write `stem.safetensors` then `stem.json` (the JSON marks the checkpoint complete)."""
    stem = Path(stem)
    save_tensors(stem.with_suffix(".safetensors"), tensors, {"format": "pt"})
    text = json.dumps(info, indent=1, sort_keys=True)
    write_atomically(stem.with_suffix(".json"), lambda tmp: tmp.write_text(text))
    return stem


def load_checkpoint(stem: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read a checkpoint written by `save_checkpoint`."""
    from .export import read_tensors

    stem = Path(stem)
    info = json.loads(stem.with_suffix(".json").read_text())
    return read_tensors(stem.with_suffix(".safetensors")), info


def latest_checkpoint(folder: str | Path, prefix: str) -> Path | None:
    """The newest complete checkpoint `folder/prefix-NNNNNN` (by step), or None."""
    folder = Path(folder)
    stems = sorted(p.with_suffix("") for p in folder.glob(f"{prefix}-*.json"))
    complete = [s for s in stems if s.with_suffix(".safetensors").exists()]
    return complete[-1] if complete else None


def prune_checkpoints(folder: str | Path, prefix: str, keep: int) -> None:
    """Delete all but the newest `keep` complete checkpoints (called after a new one is complete)."""
    stems = sorted(p.with_suffix("") for p in Path(folder).glob(f"{prefix}-*.json"))
    for stem in stems[:-keep] if keep > 0 else stems:
        stem.with_suffix(".json").unlink(missing_ok=True)
        stem.with_suffix(".safetensors").unlink(missing_ok=True)
