"""A frozen image probe for the toy world: a small CNN that reads a 32 px image back into its attributes.

It is the toy stand-in for DINO and CLIP in DreamBooth's evaluation: `Probe.predict` reads cls, colour,
pattern, second colour, mark and scene off a generated image (subject fidelity and prompt fidelity
become exact attribute matches), and `Probe.embed` gives unit-norm features whose dot product is a
DINO-like cosine similarity. The probe is trained on renders of `world.render` only, and frozen
before any base model is trained, so no generator is ever tuned towards it.

The shipped weights (`assets/toy/probe.safetensors`, 1.5 MB) were trained on a 2-core CPU machine with::

    python -m db_adapters.toy.probe --steps 3000 --pool 40000 --log-every 250 \
        --out src/db_adapters/assets/toy/probe.safetensors

in 16 min of wall time (955 s inside `train_probe`: 57 s rendering 42,000 images, ~0.3 s a step at batch
128). Held-out accuracy on 2,000 renders (seeds 10**9 onwards): 1.0 for every attribute but pattern,
0.9995 (one plain cup read as dotted). The file's metadata (key "db_adapters_probe") records the
architecture, the attribute value lists, the held-out accuracy, steps, seed, wall time and date.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import functools
import json
import random
import time
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from ..files import save_tensors
from .world import ATTRIBUTES, render, sample_attributes

IMAGE_SIZE = 32
WIDTHS = (16, 48, 128, 128)
METADATA_KEY = "db_adapters_probe"
FORMAT_VERSION = 1
PROBE_FILE = Path(__file__).resolve().parent.parent / "assets" / "toy" / "probe.safetensors"
# Training seeds are drawn below this bound, held-out seeds start at it, and the tests use seeds from
# TEST_SEED_START: three disjoint sets, so no accuracy is ever measured on an image the probe trained on.
HELDOUT_SEED_START = 10**9
TEST_SEED_START = 2 * 10**9
# Pre-render in worker processes only when there is enough to render to pay for starting them.
MIN_RENDERS_PER_WORKER = 2000
PREDICT_CHUNK = 512

ImageInput = Image.Image | Sequence[Image.Image] | torch.Tensor


# ---------------------------------------------------------------------------------------------------- model


def _conv_block(channels_in: int, channels_out: int) -> list[nn.Module]:
    return [nn.Conv2d(channels_in, channels_out, 3, padding=1, bias=False), nn.BatchNorm2d(channels_out), nn.ReLU()]


def _backbone(widths: Sequence[int]) -> nn.Sequential:
    first, second, third, last = widths
    # Full resolution for the first two convolutions: a mark badge is only ~6 px wide on the smallest
    # objects, so star, ring and cross must be told apart before any pooling.
    layers = [*_conv_block(3, first), *_conv_block(first, first), nn.MaxPool2d(2)]
    layers += [*_conv_block(first, second), *_conv_block(second, second), nn.MaxPool2d(2)]
    layers += [*_conv_block(second, third), *_conv_block(third, third), nn.MaxPool2d(2)]
    layers += [*_conv_block(third, last), nn.AdaptiveAvgPool2d(1), nn.Flatten()]
    return nn.Sequential(*layers)


def to_batch(images: ImageInput, size: int = IMAGE_SIZE) -> torch.Tensor:
    """Turn images into the probe's input: a float tensor (N, 3, size, size) with values in [0, 1].

    Other sizes are resized with bilinear interpolation and antialiasing (`F.interpolate(...,
    antialias=True)`), so a 64 or 128 px sample is averaged down, not aliased.

    Args:
        images: A PIL image, a list of PIL images (any mode, any size; converted to RGB), or a float
            tensor (3, H, W) or (N, 3, H, W) with values in [0, 1].
        size: The side of the output images.

    Example:
        >>> from db_adapters.toy import render
        >>> to_batch([render(0, size=64), render(1)]).shape
        torch.Size([2, 3, 32, 32])
    """
    if isinstance(images, Image.Image):
        images = [images]
    if isinstance(images, torch.Tensor):
        batch = images.unsqueeze(0) if images.dim() == 3 else images
        if batch.dim() != 4 or batch.shape[1] != 3:
            raise ValueError(f"expected images of shape (N, 3, H, W) or (3, H, W), got {tuple(images.shape)}")
        batch = batch.float()
    else:
        arrays = [np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0 for image in images]
        if not arrays:
            raise ValueError("expected at least one image")
        if any(array.shape != arrays[0].shape for array in arrays):
            arrays = [_resized_array(array, size) for array in arrays]
        batch = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)
    if batch.shape[-2:] != (size, size):
        batch = F.interpolate(batch, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return batch


def _resized_array(array: np.ndarray, size: int) -> np.ndarray:
    # Mixed sizes cannot be stacked: bring each to `size` exactly as a stacked batch would be.
    tensor = torch.from_numpy(array).permute(2, 0, 1).unsqueeze(0)
    if tensor.shape[-2:] != (size, size):
        tensor = F.interpolate(tensor, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return tensor[0].permute(1, 2, 0).numpy()


class Probe(nn.Module):
    """A small CNN (~0.39M parameters) that classifies each toy attribute of a 32x32 RGB image.

    Seven 3x3 conv + BatchNorm + ReLU layers (widths 16, 48, 128, 128, max-pooling 32 -> 16 -> 8 -> 4),
    global average pooling to a 128-d feature vector, and one linear head per attribute in `ATTRIBUTES`
    order, each with that attribute's values as classes. Use `load_probe` for the shipped, frozen one.

    Args:
        widths: Channels of the four stages; the last is the embedding dimension.
        attributes: Attribute names and their values, in head order; `ATTRIBUTES` by default.

    Example:
        >>> probe = Probe()
        >>> {name: logits.shape[1] for name, logits in probe(torch.rand(2, 3, 32, 32)).items()}["scene"]
        7
    """

    def __init__(self, widths: Sequence[int] = WIDTHS, attributes: Mapping[str, Sequence[str]] = ATTRIBUTES) -> None:
        super().__init__()
        self.widths = tuple(int(width) for width in widths)
        self.attributes = {name: tuple(values) for name, values in attributes.items()}
        self.frozen = False
        self.features = _backbone(self.widths)
        self.heads = nn.ModuleDict({name: nn.Linear(self.embed_dim, len(v)) for name, v in self.attributes.items()})

    @property
    def embed_dim(self) -> int:
        """The length of the feature vector `embed` returns."""
        return self.widths[-1]

    def config(self) -> dict[str, Any]:
        """The constructor arguments, as JSON-ready data (stored in the weights file)."""
        return {"widths": list(self.widths), "image_size": IMAGE_SIZE, "norm": "batchnorm", "embed_dim": self.embed_dim}

    def train(self, mode: bool = True) -> Probe:
        # A frozen probe is shared (load_probe caches it): training mode would let BatchNorm statistics
        # drift with whatever images pass through, silently changing every later measurement.
        if mode and self.frozen:
            raise RuntimeError("this Probe is frozen (from load_probe) and must not be trained; build a new Probe()")
        return super().train(mode)

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Logits per attribute for a batch (N, 3, 32, 32) with values in [0, 1], already on the probe's device."""
        features = self.penultimate(images)
        return {name: head(features) for name, head in self.heads.items()}

    def penultimate(self, images: torch.Tensor) -> torch.Tensor:
        """The pooled features (N, embed_dim) the heads read, before normalisation."""
        # Centre [0, 1] pixels around zero; BatchNorm handles the rest of the scaling.
        return self.features((images - 0.5) / 0.25)

    @contextlib.contextmanager
    def _evaluating(self) -> Iterator[None]:
        was_training = self.training
        self.eval()
        try:
            with torch.no_grad():
                yield
        finally:
            if was_training:
                self.train()

    def _chunks(self, images: ImageInput) -> Iterator[torch.Tensor]:
        batch = to_batch(images)
        parameter = next(self.parameters())
        for start in range(0, len(batch), PREDICT_CHUNK):
            yield batch[start : start + PREDICT_CHUNK].to(parameter.device, parameter.dtype)

    def predict_proba(self, images: ImageInput) -> dict[str, torch.Tensor]:
        """Class probabilities per attribute: (N, number of values) each, columns in `ATTRIBUTES` order.

        Args:
            images: PIL images or a tensor in [0, 1], as `to_batch` takes; resized to 32 px if needed.

        Example:
            >>> from db_adapters.toy import load_probe, render
            >>> round(load_probe().predict_proba([render(0)])["cls"].sum().item(), 4)
            1.0
        """
        with self._evaluating():
            parts = [self(chunk) for chunk in self._chunks(images)]
        return {name: torch.cat([part[name] for part in parts]).softmax(dim=1).cpu() for name in self.heads}

    def predict(self, images: ImageInput) -> list[dict[str, str]]:
        """The most likely value of every attribute, for each image.

        Args:
            images: PIL images or a tensor in [0, 1], as `to_batch` takes; resized to 32 px if needed.

        Example:
            >>> from db_adapters.toy import load_probe, render, sample_attributes
            >>> load_probe().predict([render(7)])[0] == sample_attributes(7)
            True
        """
        indices = {name: proba.argmax(dim=1).tolist() for name, proba in self.predict_proba(images).items()}
        count = len(next(iter(indices.values())))
        return [{name: self.attributes[name][indices[name][i]] for name in self.attributes} for i in range(count)]

    def embed(self, images: ImageInput) -> torch.Tensor:
        """L2-normalised penultimate features (N, embed_dim): the toy stand-in for DINO embeddings.

        Rows have unit norm, so the cosine similarity of two images is the dot product of their rows
        (`a @ b.T` for all pairs).

        Args:
            images: PIL images or a tensor in [0, 1], as `to_batch` takes; resized to 32 px if needed.

        Example:
            >>> from db_adapters.toy import load_probe, render
            >>> vectors = load_probe().embed([render(0), render(1)])
            >>> vectors.shape, round(vectors.norm(dim=1)[0].item(), 4)
            (torch.Size([2, 128]), 1.0)
        """
        with self._evaluating():
            features = torch.cat([self.penultimate(chunk) for chunk in self._chunks(images)])
        return F.normalize(features, dim=1).cpu()


# ---------------------------------------------------------------------------------------------------- data


def _labels(attributes: Mapping[str, str]) -> list[int]:
    return [ATTRIBUTES[name].index(attributes[name]) for name in ATTRIBUTES]


def _render_examples(jobs: Sequence[tuple[int, dict[str, str]]]) -> tuple[np.ndarray, np.ndarray]:
    images = np.stack([np.asarray(render(seed, IMAGE_SIZE, **attributes)) for seed, attributes in jobs])
    labels = np.array([_labels(attributes) for _, attributes in jobs], dtype=np.int64)
    return images, labels


def render_examples(jobs: Sequence[tuple[int, dict[str, str]]], workers: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """Render (seed, attributes) jobs into uint8 images (N, 32, 32, 3) and label indices (N, len(ATTRIBUTES)).

    Args:
        jobs: Seeds with full attribute dicts (from `sample_attributes`).
        workers: Processes to render in; small jobs render in this process.

    Example:
        >>> images, labels = render_examples([(0, sample_attributes(0))], workers=1)
        >>> images.shape, labels.shape
        ((1, 32, 32, 3), (1, 6))
    """
    workers = max(1, min(workers, len(jobs) // MIN_RENDERS_PER_WORKER))
    if workers == 1:
        return _render_examples(jobs)
    chunks = [jobs[i::workers] for i in range(workers)]
    # fork, not spawn: spawn re-imports the caller's __main__, which breaks scripts without a main guard.
    # Forking after torch started its thread pools is safe here since the workers only run PIL and numpy.
    with ProcessPoolExecutor(workers, mp_context=get_context("fork")) as pool:
        parts = list(pool.map(_render_examples, chunks))
    order = np.argsort(np.concatenate([np.arange(len(jobs))[i::workers] for i in range(workers)]), kind="stable")
    return np.concatenate([p[0] for p in parts])[order], np.concatenate([p[1] for p in parts])[order]


def training_jobs(count: int, seed: int) -> list[tuple[int, dict[str, str]]]:
    """The training renders: random seeds below `HELDOUT_SEED_START`, every other one with balanced rare values.

    Under the world's prior, "none" is 70% of marks and second colours, so each named mark or second
    colour is only ~3-10% of renders. Half of the jobs fix mark and second_color uniformly (the rest
    drawn by `sample_attributes`, conditioned on them), so the rare values a DreamBooth subject has
    are learnt as well as "none"; the other half follow the prior the held-out set is drawn from.

    Args:
        count: How many renders.
        seed: Fixes the render seeds and the balanced values.

    Example:
        >>> [seed < HELDOUT_SEED_START for seed, _ in training_jobs(3, seed=0)]
        [True, True, True]
    """
    rng = random.Random(f"probe-training:{seed}")
    jobs = []
    for index, render_seed in enumerate(rng.sample(range(HELDOUT_SEED_START), count)):
        mark, second = rng.choice(ATTRIBUTES["mark"]), rng.choice(ATTRIBUTES["second_color"])
        fixed = {"mark": mark, "second_color": second} if index % 2 else {}
        jobs.append((render_seed, sample_attributes(render_seed, **fixed)))
    return jobs


def prior_jobs(count: int, start: int) -> list[tuple[int, dict[str, str]]]:
    """Renders as `render(seed)` draws them (the world's prior), for seeds `start`, `start + 1`, ...

    Args:
        count: How many renders.
        start: The first seed; `HELDOUT_SEED_START` for the held-out set, `TEST_SEED_START` for tests.

    Example:
        >>> prior_jobs(1, HELDOUT_SEED_START)[0][1] == sample_attributes(HELDOUT_SEED_START)
        True
    """
    return [(seed, sample_attributes(seed)) for seed in range(start, start + count)]


# ---------------------------------------------------------------------------------------------------- training


def heldout_accuracy(probe: Probe, images: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """The fraction of images whose predicted value is right, per attribute.

    Args:
        probe: The probe to score.
        images: uint8 images (N, 32, 32, 3), as `render_examples` returns.
        labels: Label indices (N, len(ATTRIBUTES)), in `ATTRIBUTES` order.

    Example:
        >>> images, labels = render_examples(prior_jobs(4, TEST_SEED_START), workers=1)
        >>> heldout_accuracy(load_probe(), images, labels)["cls"]
        1.0
    """
    proba = probe.predict_proba(_as_float(images))
    return {
        name: round(float((proba[name].argmax(dim=1) == torch.from_numpy(labels[:, k])).float().mean()), 5)
        for k, name in enumerate(ATTRIBUTES)
    }


def _as_float(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0


def _training_loss(probe: Probe, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    logits = probe(images)
    return sum(F.cross_entropy(logits[name], labels[:, k]) for k, name in enumerate(ATTRIBUTES))


def _batches(count: int, batch_size: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    # Epochs over a shuffled pool: every image is seen equally often.
    while True:
        order = torch.randperm(count, generator=generator)
        for start in range(0, count - batch_size + 1, batch_size):
            yield order[start : start + batch_size]
        if count < batch_size:
            yield order


def _metadata(probe: Probe, record: dict[str, Any]) -> dict[str, str]:
    body = {"format": FORMAT_VERSION, "architecture": probe.config(), "attributes": probe.attributes, **record}
    # No sort_keys: the attribute names must stay in ATTRIBUTES (head) order.
    return {METADATA_KEY: json.dumps(body)}


def train_probe(
    *,
    steps: int = 3000,
    batch_size: int = 128,
    seed: int = 0,
    lr: float = 3e-3,
    out_path: str | Path = PROBE_FILE,
    log_every: int = 500,
    pool_size: int = 40_000,
    heldout_size: int = 2000,
    workers: int = 2,
) -> dict[str, Any]:
    """Train a `Probe` on toy renders, score it on held-out renders and save it as safetensors.

    The training images are rendered once into a pool of `pool_size` distinct random seeds, then cycled
    in shuffled epochs. Rendering costs ~2.5 ms an image on one core, more than a training step's
    share per image on 2 cores, so rendering fresh images every step would more than double the wall
    time; and the world is deterministic and noise-free (a render is a pure function of its seed), so
    cycling a large pool needs no augmentation. The pool is capped at `steps * batch_size`, so a short
    run renders only what it uses.

    Args:
        steps: Optimiser steps (AdamW, one-cycle learning-rate schedule).
        batch_size: Images per step.
        seed: Fixes the initial weights, the training renders and the batch order.
        lr: The peak learning rate.
        out_path: Where to write the weights (`.safetensors`, written atomically).
        log_every: Print the loss and held-out accuracy every this many steps (0: print nothing).
        pool_size: The most training renders to make.
        heldout_size: Held-out renders, seeds `HELDOUT_SEED_START` onwards, drawn from the world's prior.
        workers: Processes to render in.

    Returns:
        The training record also stored in the file's metadata: held-out accuracy per attribute,
        steps, seed, wall time, date, and the path written.

    Example:
        >>> import tempfile, os
        >>> path = os.path.join(tempfile.mkdtemp(), "probe.safetensors")
        >>> sorted(train_probe(steps=2, batch_size=4, heldout_size=8, log_every=0, out_path=path)["heldout_accuracy"])
        ['cls', 'color', 'mark', 'pattern', 'scene', 'second_color']
    """
    started = time.perf_counter()
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    probe = Probe()
    train_images, train_labels = render_examples(training_jobs(min(pool_size, steps * batch_size), seed), workers)
    heldout_images, heldout_labels = render_examples(prior_jobs(heldout_size, HELDOUT_SEED_START), workers)
    render_s = time.perf_counter() - started
    if log_every:
        print(f"rendered {len(train_images)} training and {heldout_size} held-out images in {render_s:.0f} s")
    pool, pool_labels = torch.from_numpy(train_images).permute(0, 3, 1, 2).contiguous(), torch.from_numpy(train_labels)

    optimizer = torch.optim.AdamW(probe.parameters(), lr=lr, weight_decay=0.05)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.15)
    probe.train()
    batches = _batches(len(pool), batch_size, generator)
    running = 0.0
    for step in range(1, steps + 1):
        index = next(batches)
        loss = _training_loss(probe, pool[index].float() / 255.0, pool_labels[index])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        running += loss.item()
        if log_every and step % log_every == 0 and step < steps:
            accuracy = heldout_accuracy(probe, heldout_images, heldout_labels)
            elapsed = time.perf_counter() - started
            print(f"step {step}/{steps} loss {running / log_every:.4f} held-out {accuracy} ({elapsed:.0f} s)")
            running = 0.0

    accuracy = heldout_accuracy(probe, heldout_images, heldout_labels)
    record = {
        "heldout_accuracy": accuracy,
        "heldout_seeds": [HELDOUT_SEED_START, HELDOUT_SEED_START + heldout_size],
        "training_pool": len(pool),
        "steps": steps,
        "batch_size": batch_size,
        "lr": lr,
        "seed": seed,
        "wall_time_s": round(time.perf_counter() - started, 1),
        "render_time_s": round(render_s, 1),
        "trained_on": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "torch_version": torch.__version__,
        "parameters": sum(p.numel() for p in probe.parameters()),
    }
    save_tensors(out_path, probe.state_dict(), _metadata(probe, record))
    return {**record, "path": str(out_path)}


# ---------------------------------------------------------------------------------------------------- loading


def probe_metadata(path: str | Path = PROBE_FILE) -> dict[str, Any]:
    """The training record stored in a probe file: architecture, attribute values, held-out accuracy, ...

    Args:
        path: A file written by `train_probe`; the shipped probe by default.

    Example:
        >>> probe_metadata()["heldout_accuracy"]["cls"] >= 0.98
        True
    """
    from safetensors import safe_open

    path = _existing_probe_file(path)
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata() or {}
    if METADATA_KEY not in metadata:
        raise ValueError(f"{str(path)!r} is not a probe file: its metadata has no {METADATA_KEY!r} key")
    return json.loads(metadata[METADATA_KEY])


def _existing_probe_file(path: str | Path) -> Path:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"no trained toy probe at {str(path)!r}. Train it (about 15 minutes on 2 CPU cores) with: "
            f"python -m db_adapters.toy.probe --out {path}"
        )
    return path


def _read_probe(path: Path) -> Probe:
    from safetensors.torch import load_file

    record = probe_metadata(path)
    attributes = {name: tuple(values) for name, values in record["attributes"].items()}
    if attributes != ATTRIBUTES:
        raise ValueError(
            f"the probe at {str(path)!r} was trained on other toy attributes than the world has now; retrain it with "
            f"python -m db_adapters.toy.probe --out {path}"
        )
    # Heads are matched by name, so build them in ATTRIBUTES order whatever order the file lists them in.
    probe = Probe(record["architecture"]["widths"], ATTRIBUTES)
    probe.load_state_dict(load_file(str(path)))
    probe.eval().requires_grad_(False)
    probe.frozen = True
    return probe


@functools.lru_cache(maxsize=1)
def _shipped_probe() -> Probe:
    return _read_probe(_existing_probe_file(PROBE_FILE))


def load_probe(path: str | Path | None = None) -> Probe:
    """The trained probe, frozen: eval mode, no gradients, and `.train()` refuses.

    The shipped probe is loaded once and shared (cached), which is why it refuses training mode.

    Args:
        path: A file written by `train_probe`; the shipped weights by default (loaded once, then shared).

    Example:
        >>> probe = load_probe()
        >>> probe.training, probe is load_probe()
        (False, True)
    """
    if path is None:
        return _shipped_probe()
    return _read_probe(_existing_probe_file(path))


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Train the probe from the command line and print its held-out accuracy per attribute.

    Args:
        argv: Command-line arguments (`sys.argv[1:]` when None).

    Example:
        >>> import tempfile, os
        >>> out = os.path.join(tempfile.mkdtemp(), "probe.safetensors")
        >>> main(["--steps", "2", "--batch-size", "4", "--heldout", "8", "--out", out])["steps"]  # doctest: +ELLIPSIS
        rendered ...
        2
    """
    parser = argparse.ArgumentParser(prog="python -m db_adapters.toy.probe", description=main.__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--pool", type=int, default=40_000, help="training renders, cycled (default 40000)")
    parser.add_argument("--heldout", type=int, default=2000, help="held-out renders (default 2000)")
    parser.add_argument("--log-every", type=int, default=500)
    parser.add_argument("--workers", type=int, default=2, help="processes to render in")
    parser.add_argument("--out", type=Path, default=PROBE_FILE, help="the .safetensors file to write")
    args = parser.parse_args(argv)
    record = train_probe(
        steps=args.steps,
        batch_size=args.batch_size,
        seed=args.seed,
        lr=args.lr,
        out_path=args.out,
        log_every=args.log_every,
        pool_size=args.pool,
        heldout_size=args.heldout,
        workers=args.workers,
    )
    for name, value in record["heldout_accuracy"].items():
        print(f"held-out accuracy {name:>12}: {value:.4f}")
    print(f"wrote {record['path']} in {record['wall_time_s']:.0f} s")
    return record


if __name__ == "__main__":
    main()
