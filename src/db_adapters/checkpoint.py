"""Training state on disk without pickle: tensors in safetensors, everything else in JSON.

A checkpoint is two files beside each other, `NAME.safetensors` and `NAME.json`, each written
atomically; the JSON is written last and names the safetensors file's random id, so a checkpoint is
complete exactly when its JSON exists and matches its tensors. Optimizer state is split into its
tensors and its plain values, so `torch.load` (and unpickling) is never needed; RNG states are
tensors (torch, numpy) or JSON (python's `random`).

`RunCheckpoints` is what `personalize(..., checkpoint_every=N, resume=True)` uses: checkpoints under
`output_dir/checkpoints/`, the newest `keep` kept, each stamped with the run's fingerprint (images,
seed, strategy, every setting that changes the result) so that a resume with other settings is
refused, naming the difference.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import InputError
from .files import save_tensors, write_atomically
from .safe_reading import read_file_metadata, read_tensors

if TYPE_CHECKING:
    from collections.abc import Sequence

    import torch
    from PIL import Image

    from .config import TrainConfig

logger = logging.getLogger("db_adapters")

CHECKPOINT_FORMAT = "db_adapters.checkpoint"
CHECKPOINT_VERSION = 1
FOLDER_NAME = "checkpoints"
PREFIX = "step"
_ID_KEY = "checkpoint_id"
# TrainConfig settings that cannot change the trained weights: where files go, how often state is
# saved, progress output, previews (rendered with their own RNG), and memory/speed trade-offs.
NOT_IN_FINGERPRINT = frozenset(
    {
        "output_dir",
        "class_image_dir",
        "progress",
        "compile",  # how the same steps are computed; a run may resume with it switched on or off
        "checkpoint_every",
        "keep_checkpoints",
        "resume",
        "validation_prompts",
        "validation_every",
        "validation_steps",
        "gradient_checkpointing",
        "class_batch_size",
        "memory",  # a preset: what it chose (8-bit Adam, a quantized base) is compared setting by setting
    }
)


# --- optimizer state ------------------------------------------------------------------------------


def optimizer_state(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split an optimizer's state into tensors (for safetensors) and JSON-able values.

    Nested state (bitsandbytes' 8-bit optimizers keep theirs in a sub-dict) is flattened into
    tensor names `optimizer.<param id>.<key>[.<sub key>...]`; AdamW's `step` is a tensor and is kept so.

    Args:
        optimizer (`torch.optim.Optimizer`): any torch optimizer, or accelerate's wrapper of one.

    Example:
        >>> import torch
        >>> param = torch.nn.Parameter(torch.ones(2))
        >>> opt = torch.optim.AdamW([param])
        >>> param.grad = torch.ones(2); opt.step()
        >>> tensors, plain = optimizer_state(opt)
        >>> sorted(tensors)
        ['optimizer.0.exp_avg', 'optimizer.0.exp_avg_sq', 'optimizer.0.step']
    """
    state = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    plain: dict[str, Any] = {"param_groups": state["param_groups"], "state": {}}
    for param_id, values in state["state"].items():
        rest = _split_tensors(values, f"optimizer.{param_id}", tensors)
        if rest:
            plain["state"][str(param_id)] = rest
    return tensors, plain


def _split_tensors(values: dict[str, Any], prefix: str, tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
    import torch

    rest: dict[str, Any] = {}
    for key, value in values.items():
        if "." in str(key):
            raise ValueError(f"optimizer state key {key!r} contains a '.', which tensor names use as separator.")
        if torch.is_tensor(value):
            tensors[f"{prefix}.{key}"] = value.detach().cpu()
        elif isinstance(value, dict):
            nested = _split_tensors(value, f"{prefix}.{key}", tensors)
            rest[key] = nested
        else:
            rest[key] = value
    return rest


def restore_optimizer(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], plain: dict) -> None:
    """Inverse of `optimizer_state`: load the state back into an optimizer over the same parameters.

    Args:
        optimizer (`torch.optim.Optimizer`): built like the one saved (same parameter groups).
        tensors (`dict[str, Tensor]`): the checkpoint's tensors (other names are ignored).
        plain (`dict`): the JSON half from `optimizer_state`.

    Example:
        >>> import torch
        >>> param = torch.nn.Parameter(torch.ones(2))
        >>> opt = torch.optim.AdamW([param]); param.grad = torch.ones(2); opt.step()
        >>> tensors, plain = optimizer_state(opt)
        >>> fresh = torch.optim.AdamW([param]); restore_optimizer(fresh, tensors, plain)
        >>> float(fresh.state[param]["step"])
        1.0
    """
    state: dict[int, dict[str, Any]] = {}
    for param_id, values in plain["state"].items():
        state[int(param_id)] = json.loads(json.dumps(values))  # a copy: the tensors go into it
    for name, tensor in tensors.items():
        if not name.startswith("optimizer."):
            continue
        _, param_id, *keys = name.split(".")
        node = state.setdefault(int(param_id), {})
        for key in keys[:-1]:
            node = node.setdefault(key, {})
        node[keys[-1]] = tensor
    optimizer.load_state_dict({"state": state, "param_groups": plain["param_groups"]})


# --- RNG state ------------------------------------------------------------------------------------


def rng_state() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The process-wide RNG states that can influence training: torch (CPU and CUDA), numpy, `random`.

    Example:
        >>> tensors, plain = rng_state()
        >>> "rng.torch_cpu" in tensors and "python" in plain
        True
    """
    import numpy as np
    import torch

    tensors = {"rng.torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for index, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.torch_cuda.{index}"] = state
    kind, keys, position, has_gauss, cached = np.random.get_state()
    tensors["rng.numpy_keys"] = torch.from_numpy(np.asarray(keys, dtype=np.int64))
    version, internal, gauss_next = random.getstate()
    plain = {
        "numpy": {"kind": kind, "position": int(position), "has_gauss": int(has_gauss), "cached": float(cached)},
        "python": {"version": version, "state": list(internal), "gauss_next": gauss_next},
    }
    return tensors, plain


def restore_rng(tensors: dict[str, torch.Tensor], plain: dict[str, Any]) -> None:
    """Inverse of `rng_state`. CUDA states are restored only where that many devices exist."""
    import numpy as np
    import torch

    torch.set_rng_state(tensors["rng.torch_cpu"])
    cuda = sorted(int(k.rsplit(".", 1)[1]) for k in tensors if k.startswith("rng.torch_cuda."))
    if cuda and torch.cuda.is_available() and torch.cuda.device_count() >= len(cuda):
        torch.cuda.set_rng_state_all([tensors[f"rng.torch_cuda.{i}"] for i in cuda])
    numpy = plain["numpy"]
    keys = tensors["rng.numpy_keys"].numpy().astype(np.uint32)
    np.random.set_state((numpy["kind"], keys, numpy["position"], numpy["has_gauss"], numpy["cached"]))
    python = plain["python"]
    random.setstate((python["version"], tuple(python["state"]), python["gauss_next"]))


# --- checkpoint files -----------------------------------------------------------------------------


def save_checkpoint(stem: str | Path, tensors: dict[str, torch.Tensor], info: dict[str, Any]) -> Path:
    """Write `stem.safetensors` then `stem.json` (the JSON marks the checkpoint complete).

    Any JSON of an earlier checkpoint at the same stem is removed first, so that a crash between
    the two writes leaves an incomplete checkpoint (ignored) rather than a mismatched pair.

    Args:
        stem (`str | Path`): the checkpoint's path without suffix, e.g. `run/checkpoints/step-00000010`.
        tensors (`dict[str, Tensor]`): everything tensor-valued.
        info (`dict`): everything else, JSON-able.

    Example:
        >>> import tempfile, torch
        >>> stem = save_checkpoint(Path(tempfile.mkdtemp()) / "step-00000001", {"w": torch.ones(2)}, {"step": 1})
        >>> load_checkpoint(stem)[1]["step"]
        1
    """
    stem = Path(stem)
    token = uuid.uuid4().hex
    text = _to_json({**info, _ID_KEY: token}, stem.with_suffix(".json"))
    stem.with_suffix(".json").unlink(missing_ok=True)
    save_tensors(stem.with_suffix(".safetensors"), tensors, {"format": "pt", _ID_KEY: token})
    write_atomically(stem.with_suffix(".json"), lambda tmp: tmp.write_text(text, encoding="utf-8"))
    return stem


def _to_json(info: dict[str, Any], path: Path) -> str:
    try:
        return json.dumps(info, indent=1, sort_keys=True, allow_nan=True)
    except TypeError as error:
        raise TypeError(f"checkpoint {str(path)!r}: a value is not JSON-able ({error}).") from None


def load_checkpoint(stem: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read a checkpoint written by `save_checkpoint`.

    Example:
        >>> import tempfile, torch
        >>> stem = save_checkpoint(Path(tempfile.mkdtemp()) / "step-00000002", {"w": torch.ones(2)}, {"step": 2})
        >>> load_checkpoint(stem)[0]["w"].tolist()
        [1.0, 1.0]
    """
    stem = Path(stem)
    info = json.loads(stem.with_suffix(".json").read_text(encoding="utf-8"))
    return read_tensors(stem.with_suffix(".safetensors")), info


def is_complete(stem: str | Path) -> bool:
    """Both files exist, the JSON parses, and it names the id its safetensors file carries."""
    stem = Path(stem)
    try:
        info = json.loads(stem.with_suffix(".json").read_text(encoding="utf-8"))
        if not stem.with_suffix(".safetensors").is_file():
            return False
        if _ID_KEY not in info:
            return True  # written before ids existed (the toy base model's first checkpoints)
        return read_file_metadata(stem.with_suffix(".safetensors")).get(_ID_KEY) == info[_ID_KEY]
    except (OSError, ValueError):  # ValueError: bad JSON, or AdapterError for a bad safetensors file
        return False


def latest_checkpoint(folder: str | Path, prefix: str) -> Path | None:
    """The newest complete checkpoint `folder/prefix-NNNNNN` (by step), or None.

    Example:
        >>> import tempfile
        >>> latest_checkpoint(tempfile.mkdtemp(), "step") is None
        True
    """
    for stem in reversed(_stems(folder, prefix)):
        if is_complete(stem):
            return stem
    return None


def _stems(folder: str | Path, prefix: str) -> list[Path]:
    # Zero-padded step numbers: name order is step order.
    return sorted(p.with_suffix("") for p in Path(folder).glob(f"{prefix}-*.json"))


def prune_checkpoints(folder: str | Path, prefix: str, keep: int) -> None:
    """Delete all but the newest `keep` complete checkpoints, and incomplete leftovers.

    Call it only after a new checkpoint is complete: an old one is then never deleted before its
    successor exists. Tensor files without a JSON (a crash between the two writes) go too.

    Example:
        >>> import tempfile, torch
        >>> folder = Path(tempfile.mkdtemp())
        >>> for step in (1, 2, 3):
        ...     _ = save_checkpoint(folder / f"step-{step:08d}", {"w": torch.ones(1)}, {"step": step})
        >>> prune_checkpoints(folder, "step", keep=2)
        >>> [p.name for p in sorted(folder.glob("*.json"))]
        ['step-00000002.json', 'step-00000003.json']
    """
    folder = Path(folder)
    complete = [stem for stem in _stems(folder, prefix) if is_complete(stem)]
    kept = set(complete[-keep:]) if keep > 0 else set()
    for stem in _stems(folder, prefix):
        if stem not in kept:
            stem.with_suffix(".json").unlink(missing_ok=True)
            stem.with_suffix(".safetensors").unlink(missing_ok=True)
    for tensors in folder.glob(f"{prefix}-*.safetensors"):
        if tensors.with_suffix("") not in kept:
            tensors.unlink(missing_ok=True)


# --- a training run's checkpoints -----------------------------------------------------------------


def images_digest(images: Sequence[Image.Image]) -> str:
    """SHA-256 over the images' sizes, modes and pixels (so PIL images and files hash alike).

    Example:
        >>> from PIL import Image
        >>> images_digest([Image.new("RGB", (2, 2))]) == images_digest([Image.new("RGB", (2, 2))])
        True
    """
    digest = hashlib.sha256()
    for image in images:
        digest.update(json.dumps([image.size, image.mode]).encode())
        digest.update(image.tobytes())
    return digest.hexdigest()


def run_fingerprint(config: TrainConfig, **facts: Any) -> dict[str, Any]:
    """What a checkpoint must agree with to be resumed: every result-changing setting, plus `facts`.

    Args:
        config (`TrainConfig`): the run's settings (those in `NOT_IN_FINGERPRINT` are left out).
        **facts: resolved values that also decide the result (images digest, strategy and its
            options, base model, prompts, resolution, learning rates); they override same-named settings.

    Example:
        >>> from db_adapters.config import TrainConfig
        >>> run_fingerprint(TrainConfig(steps=10), strategy="lora")["steps"]
        10
    """
    settings = {k: v for k, v in asdict(config).items() if k not in NOT_IN_FINGERPRINT}
    return json.loads(json.dumps({**settings, **facts}, default=str))


def fingerprint_differences(saved: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """Human-readable differences, e.g. `learning_rate: checkpoint 0.001, now 0.002`.

    Example:
        >>> fingerprint_differences({"seed": 0, "steps": 8}, {"seed": 1, "steps": 8})
        ['seed: checkpoint 0, now 1']
    """
    lines = []
    for key in sorted(set(saved) | set(now)):
        before, after = saved.get(key, "(not set)"), now.get(key, "(not set)")
        if before != after:
            lines.append(f"{key}: checkpoint {_short(before)}, now {_short(after)}")
    return lines


def _short(value: Any) -> str:
    text = json.dumps(value) if not isinstance(value, str) else value
    return text if len(text) <= 80 else text[:77] + "..."


@dataclass
class RunCheckpoints:
    """The checkpoints of one `personalize` run, in `folder` (usually `output_dir/checkpoints`).

    Attributes:
        folder (`Path`): where the checkpoints live.
        fingerprint (`dict`): the run's `run_fingerprint`; stored in every checkpoint.
        every (`int | None`): save every this many steps; None saves none (a resume-only run).
        keep (`int`): how many of the newest checkpoints to keep.
    """

    folder: Path
    fingerprint: dict[str, Any]
    every: int | None = None
    keep: int = 2

    def due(self, step: int) -> bool:
        """Whether a checkpoint is due after `step`."""
        return bool(self.every) and step % self.every == 0

    def latest(self) -> Path | None:
        """The newest complete checkpoint, or None."""
        return latest_checkpoint(self.folder, PREFIX)

    def save(self, step: int, tensors: dict[str, torch.Tensor], info: dict[str, Any]) -> Path:
        """Write the checkpoint of `step`, then delete all but the newest `keep`."""
        meta = {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "fingerprint": self.fingerprint}
        stem = save_checkpoint(self.folder / f"{PREFIX}-{step:08d}", tensors, {**info, **meta, "step": step})
        prune_checkpoints(self.folder, PREFIX, self.keep)
        return stem

    def resume_point(self) -> tuple[Path, dict[str, torch.Tensor], dict[str, Any]] | None:
        """The newest checkpoint to resume from, checked against this run; None (and says so) if there is none.

        Raises:
            InputError: the checkpoint was made with other images, seed, strategy or settings.
        """
        stem = self.latest()
        if stem is None:
            logger.warning("resume: no complete checkpoint in %s; starting afresh.", self.folder)
            return None
        tensors, info = load_checkpoint(stem)
        if info.get("format") != CHECKPOINT_FORMAT:
            raise InputError(f"resume: {stem}.json is not a db-adapters training checkpoint; use another output_dir.")
        differences = fingerprint_differences(info.get("fingerprint", {}), self.fingerprint)
        if differences:
            raise InputError(
                f"resume: the checkpoint {stem.name} in {self.folder} was made with other inputs or settings "
                f"({'; '.join(differences)}). Rerun with the checkpoint's settings, or drop resume "
                "and use a new output_dir to start another run."
            )
        return stem, tensors, info

    def refuse_to_overwrite(self) -> None:
        """A fresh run must not mix its checkpoints with an older run's in the same folder."""
        stem = self.latest()
        if stem is not None:
            raise InputError(
                f"{self.folder} already holds checkpoints of a run (newest: {stem.name}); pass resume=True "
                "(--resume) to continue it, or choose another output_dir."
            )
