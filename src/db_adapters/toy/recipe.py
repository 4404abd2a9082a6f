"""The toy recipe's settings and their record: what a run began with, kept across sittings, and branched.

A run's folder holds recipe.json: the settings it began with (`config`), each stage's and sitting's wall
time, and, for a branch, the run and step it grew from. `config_for` continues a paused run with its own
settings, `record_settings` writes them, and `branch_run` starts a new run from another's last checkpoint.
The stages that train the model are in `pretrain`.

The defaults are the shipped (v4) model's recipe. v4 is v3's run (steps 0-12,000) grown by one more cosine
cycle of 3,000 steps at a peak rate of 2e-4 (`restarts`), made with `branch_run` from v3's last checkpoint;
v3 was the same recipe with `restarts=()` (`--restarts` alone). The first model (v1) was
`architecture="v1", vae_steps=1200, caption_omission=0.5, class_only_captions=0.0, snr_gamma=None,
steps=8000, export_unet_dtype="float32", decoder_steps=0, rare_share=0.0, restarts=()`. The second (v2:
v3's denoiser on a smaller VAE) was `architecture="v2", vae_steps=1200, decoder_steps=4000,
rare_from_step=7396, steps=10000, restarts=()`.
Each run's own recipe.json (toy_training/) records what it was run with.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from ..checkpoint import latest_checkpoint
from ..errors import InputError


@dataclass
class PretrainConfig:
    """Settings of the recipe; the defaults produced the shipped weights."""

    work_dir: Path
    architecture: str = "v3"  # a key of base.ARCHITECTURES
    seed: int = 0
    num_images: int = 40_000
    vae_steps: int = 3_000
    vae_batch_size: int = 32
    vae_learning_rate: float = 1e-3
    vae_kl_weight: float = 1e-6
    # The VAE stage alone leaves a decoder that loses the small details (v2's, after 1,200 steps: read back
    # by the probe, its reconstructions of the quality prompts' renders kept the second colour in 0.44).
    decoder_steps: int = 2_000
    decoder_learning_rate: float = 1e-3
    steps: int = 12_000
    batch_size: int = 64
    learning_rate: float = 5e-4
    warmup_steps: int = 300
    caption_dropout: float = 0.1
    # Each optional phrase of a caption is left out with this probability (v1: 0.5, so only 1 caption
    # in 32 named everything and a named second colour or mark was rarely drawn).
    caption_omission: float = 0.3
    class_only_captions: float = 0.1  # captions that are the class noun alone ("a box")
    # From rare_from_step on, this share of each batch is drawn from the images that have a second
    # colour or a mark, captioned with both: otherwise a named second colour is in ~1.5% of captions.
    # Captions that leave them out ("a box", "") still come from the uniform part, so the prior holds.
    rare_share: float = 0.5
    rare_from_step: int = 0  # v2 began it at 7,396, when its loss had flattened
    snr_gamma: float | None = 5.0  # min-SNR loss weighting (Hang et al. 2023); None: plain MSE
    # The UNet's weights are written in this dtype (the package's size limit); loading upcasts to float32.
    export_unet_dtype: str = "float16"
    ema_decay: float = 0.999
    # Further cosine cycles of the denoiser after `steps` (warm restarts, Loshchilov & Hutter 2017), each
    # (steps, peak learning rate) with `warmup_steps` of warmup: a finished run's schedule has reached
    # zero, so more steps teach it nothing until the rate rises again. `branch_run` grows one onto a
    # finished run, so the new run keeps the history it grew from.
    restarts: tuple[tuple[int, float], ...] = ((3_000, 2e-4),)
    checkpoint_every: int = 250
    log_every: int = 25
    keep_checkpoints: int = 2
    threads: int = 2
    max_minutes: float | None = None  # stop (after a checkpoint) when this much time has passed
    # Where the latents and denoiser stages compute. Random draws (data order, noise, timesteps,
    # captions) stay on the CPU generators, so a run continued on a GPU sees the same draws.
    device: str = "cpu"
    render_workers: int = 1  # processes that render the dataset (renders are per-seed deterministic)

    def __post_init__(self) -> None:
        # recipe.json and the command line give lists and strings; one form, so settings compare equal.
        self.restarts = tuple((int(steps), float(peak)) for steps, peak in self.restarts)

    @property
    def denoiser_steps(self) -> int:
        """The denoiser's steps in all: `steps`, then each restart's."""
        return self.steps + sum(steps for steps, _ in self.restarts)


# Settings that may change between the sittings of one run: where and how long it computes, and how
# often it writes. Every other setting shapes the weights, so a started run keeps the ones it began with.
SITTING_SETTINGS = frozenset(
    {"work_dir", "max_minutes", "render_workers", "device", "threads"}
    | {"checkpoint_every", "log_every", "keep_checkpoints"}
)


def config_for(work_dir: str | Path, **given: Any) -> PretrainConfig:
    """The settings to run `work_dir` with: a started run's recorded ones, with this sitting's given ones.

    A paused run must continue as it began (a v3 run resumed without its flags would otherwise take the
    defaults' step count and caption schedule), so a started run takes its settings from its
    recipe.json, and a given setting that would change the weights is refused.

    Args:
        work_dir (`str | Path`): the run's folder; a new one starts with `given` over the defaults.
        **given: settings from the command line (`PretrainConfig` fields).

    Raises:
        InputError: if the run was started with other values of settings in `given` that shape the
            weights, or its recipe.json (written by an older recipe) does not record one that `given`
            leaves out.

    Example:
        >>> import tempfile
        >>> config_for(tempfile.mkdtemp(), steps=8).steps
        8
    """
    work = Path(work_dir)
    recorded = recorded_settings(work)
    if recorded is None:
        return PretrainConfig(**{**given, "work_dir": work})
    missing = sorted(WEIGHT_SETTINGS - recorded.keys() - given.keys())
    if missing:
        raise InputError(
            f"{work / 'recipe.json'} does not record {', '.join(missing)} (the run was started by an older "
            "recipe): give each as a flag with the value the run began with, or give a new --work-dir."
        )
    refuse_changed_settings(work, recorded, given)
    kept = {name: value for name, value in recorded.items() if name in WEIGHT_SETTINGS}
    return PretrainConfig(**{**kept, **given, "work_dir": work})


WEIGHT_SETTINGS = frozenset(field.name for field in fields(PretrainConfig)) - SITTING_SETTINGS


def recorded_settings(work: Path) -> dict[str, Any] | None:
    """The settings recipe.json recorded for a started run; None for a run not started."""
    path = work / "recipe.json"
    return json.loads(path.read_text()).get("config", {}) if path.is_file() else None


def refuse_changed_settings(work: Path, recorded: dict[str, Any], settings: dict[str, Any]) -> None:
    changed = [
        f"{name}={value!r} (the run has {recorded[name]!r})"
        for name, value in settings.items()
        if name in WEIGHT_SETTINGS and name in recorded and not _same_setting(recorded[name], value)
    ]
    if changed:
        raise InputError(
            f"{work} is a run started with other settings: {', '.join(changed)}. Leave those out to continue it "
            "as it began, or give a new --work-dir to start another run. (To change a run on purpose, as v2's "
            "steps were cut from 12,000 to 10,000, edit the config in its recipe.json and say why in its sittings.)"
        )


def _same_setting(recorded: Any, given: Any) -> bool:
    # recipe.json holds lists where the config holds tuples (restarts); compare them as JSON writes them.
    return json.dumps(recorded) == json.dumps(given)


def branch_run(source: str | Path, target: str | Path, restarts: list[tuple[int, float]]) -> PretrainConfig:
    """Start `target` as `source` grown by more denoiser cycles: its stages, last checkpoint and history.

    The dataset, VAEs, latents and tokenizer are linked (copied where links are refused), with the newest
    denoiser checkpoint, the loss logs and recipe.json, whose config gains `restarts`. Running `target`
    then continues the denoiser from that checkpoint on the restarts' schedule; `source` is not touched.

    Args:
        source (`str | Path`): a run's work dir with a denoiser checkpoint (finished or not).
        target (`str | Path`): a new, empty or absent work dir.
        restarts (`list[tuple[int, float]]`): the cycles to add, each (steps, peak learning rate),
            after the ones `source` already has.

    Returns:
        The config `target` runs with (this sitting's settings are the defaults; `config_for` gives others).

    Raises:
        InputError: if `target` is not empty, `source` has no recipe.json or denoiser checkpoint, or
            `restarts` is empty.

    Example:
        >>> branch_run("toy_training/toy-base-v3", "toy_training/toy-base-v4", [(3000, 2e-4)])  # doctest: +SKIP
    """
    source, target = Path(source), Path(target)
    recorded = recorded_settings(source)
    checkpoint = latest_checkpoint(source / "denoiser_checkpoints", "denoiser")
    if recorded is None or checkpoint is None:
        raise InputError(f"{source} is not a run with a denoiser checkpoint: give a recipe's work dir to branch from.")
    missing = sorted(WEIGHT_SETTINGS - recorded.keys() - {"restarts"})
    if missing:
        raise InputError(f"{source / 'recipe.json'} does not record {', '.join(missing)}: add them as the run began.")
    if target.exists() and any(target.iterdir()):
        raise InputError(f"{target} is not empty: give a new --work-dir to branch into.")
    if not restarts:
        raise InputError("a branch needs --restarts STEPS:PEAK (the denoiser cycles to add).")
    (target / "denoiser_checkpoints").mkdir(parents=True, exist_ok=True)
    for name in ("dataset.safetensors", "latents.safetensors", "vae", "vae_ft", "tokenizer"):
        if (source / name).exists():
            _link_tree(source / name, target / name)
    for path in (*source.glob("*_loss.csv"), checkpoint.with_suffix(".safetensors"), checkpoint.with_suffix(".json")):
        shutil.copy2(path, target / path.relative_to(source))
    recipe = json.loads((source / "recipe.json").read_text())
    step = json.loads(checkpoint.with_suffix(".json").read_text())["step"]
    _cut_log_after(target / "denoiser_loss.csv", step)
    recipe["branched_from"] = {"work_dir": str(source), "step": step}
    for unfinished in ("stage_denoiser", "stage_export"):  # their wall times are recorded again when they end
        recipe.get("stages", {}).pop(unfinished, None)
    config = PretrainConfig(**{"restarts": (), **recorded, "work_dir": target})  # an older recipe had none
    config.restarts = (*config.restarts, *PretrainConfig(target, restarts=tuple(restarts)).restarts)
    recipe["config"] = {k: str(v) if isinstance(v, Path) else v for k, v in asdict(config).items()}
    (target / "recipe.json").write_text(json.dumps(recipe, indent=1, sort_keys=True))
    return config


def _cut_log_after(log: Path, step: int) -> None:
    # A branch from an older checkpoint (v3's committed 10,582 of 12,000) logs those steps again.
    if log.is_file():
        header, *rows = log.read_text().splitlines()
        kept = [row for row in rows if int(row.split(",", 1)[0]) <= step]
        log.write_text("\n".join([header, *kept]) + "\n")


def _link_tree(source: Path, target: Path) -> None:
    # Hard links: the dataset and latents are 0.4 GB, and a branch never writes to them.
    def link(src: str, dst: str) -> None:
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)

    if source.is_dir():
        shutil.copytree(source, target, copy_function=link)
    else:
        link(str(source), str(target))


def record_settings(work: Path, config: PretrainConfig, stage: str | None = None, seconds: float = 0.0) -> None:
    """Write the run's settings to recipe.json, and a finished stage's wall time when given."""
    path = work / "recipe.json"
    recipe = json.loads(path.read_text()) if path.exists() else {}
    recipe.setdefault("stages", {})
    if stage is not None:
        recipe["stages"][stage] = {"wall_s": round(seconds, 1)}
    recipe["config"] = {k: str(v) if isinstance(v, Path) else v for k, v in asdict(config).items()}
    path.write_text(json.dumps(recipe, indent=1, sort_keys=True))
