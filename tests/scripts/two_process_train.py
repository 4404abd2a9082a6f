"""Run by tests/test_multiprocess.py under `torchrun --nproc_per_node 2`: personalize the tiny pipeline.

Every rank trains one run per strategy (into OUT/run-STRATEGY, class images cached in
OUT/class_images), calls `adapter.save` (as a user's script would, on every
rank) and prints one line `RANK_REPORT {json}` per run with what this rank itself saw: its rank and
world size from torch.distributed and accelerate, the class-image indices it generated, its losses
and learning rates, a hash of its trained weights, and every file write it made under OUT.

Usage: torchrun --standalone --nproc_per_node 2 tests/scripts/two_process_train.py OUT [STRATEGY ...] [JSON]
(JSON: more `personalize` keywords, e.g. '{"train_text_encoder": true}'). With --nproc_per_node 1 it
is the single-process baseline for timings; the same total work on 1 and on 2 processes:

    W='"steps": 120, "num_class_images": 8, "validation_prompts": null, "validation_every": null'
    OMP_NUM_THREADS=1 torchrun --standalone --nproc_per_node 1 tests/scripts/two_process_train.py /tmp/t1 lora \
        "{$W, \"batch_size\": 2}"
    OMP_NUM_THREADS=1 torchrun --standalone --nproc_per_node 2 tests/scripts/two_process_train.py /tmp/t2 lora \
        "{$W, \"batch_size\": 1}"

Each report's "seconds" is personalize + save on that rank.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import sys
import time
from pathlib import Path

SETTINGS = {
    "steps": 3,
    "num_class_images": 5,  # odd, so the two shares differ in length
    "class_inference_steps": 2,
    "class_batch_size": 2,
    "learning_rate": 1e-3,
    "lr_scheduler": "linear",
    "lr_warmup_steps": 1,
    "validation_prompts": ["a {id} dog"],
    "validation_every": 3,
    "progress": False,
    "seed": 0,
}
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
_SHARE = re.compile(r"process (\d+) of (\d+): class images \[([\d, ]*)\]")

OUT = Path(".")  # set by main()
writes: list[str] = []
shares: list[int] = []


def _under_out(path: object) -> str | None:
    if isinstance(path, bytes):
        path = os.fsdecode(path)
    if not isinstance(path, str | os.PathLike):
        return None  # a file descriptor
    resolved = Path(os.path.abspath(path))
    return str(resolved) if resolved == OUT or OUT in resolved.parents else None


def _audit(event: str, args: tuple) -> None:
    # Every way our stack creates, replaces or deletes a file passes one of these audit events.
    if event == "open":
        path, mode, flags = args
        writing = any(c in mode for c in "wax+") if isinstance(mode, str) else bool(flags & _WRITE_FLAGS)
        target = _under_out(path) if writing else None
    elif event == "os.rename":  # os.rename and os.replace: the destination is what appears
        target = _under_out(args[1])
    elif event in ("os.remove", "os.mkdir", "os.rmdir", "tempfile.mkstemp", "tempfile.mkdtemp"):
        target = _under_out(args[0])
    else:
        return
    if target is not None:
        writes.append(f"{event} {target}")


class _ShareLog(logging.Handler):
    """Keeps the class-image indices prior.py logs as this rank's share."""

    def emit(self, record: logging.LogRecord) -> None:
        found = _SHARE.match(record.getMessage())
        if found and found.group(3).strip():
            shares.extend(int(i) for i in found.group(3).split(","))


def weights_hash(strategy, pipe) -> str:
    """sha256 of the strategy's trainable tensors in `pipe`, in their order (the test uses it too)."""
    digest = hashlib.sha256()
    for component, params in sorted(strategy.trainable_parameters(pipe).items()):
        for param in params:
            digest.update(component.encode())
            digest.update(param.detach().float().contiguous().numpy().tobytes())
    return digest.hexdigest()


def _subject_images() -> list:
    from PIL import Image, ImageDraw

    images = []
    for i, background in enumerate(["skyblue", "lightgreen", "wheat"]):
        image = Image.new("RGB", (40, 40), background)
        ImageDraw.Draw(image).ellipse((8 + i, 8, 32 + i, 32), fill="red")
        images.append(image)
    return images


def main(argv: list[str]) -> None:
    global OUT
    import torch.distributed as dist
    from accelerate.state import PartialState

    from db_adapters import personalize
    from db_adapters.testing import tiny_pipeline

    OUT = Path(argv[0]).resolve()
    strategies = [a for a in argv[1:] if not a.startswith("{")] or ["lora"]
    settings = dict(SETTINGS)
    settings.update(*(json.loads(a) for a in argv[1:] if a.startswith("{")))
    logger = logging.getLogger("db_adapters")
    logger.setLevel(logging.DEBUG)
    logger.addHandler(_ShareLog())
    sys.addaudithook(_audit)
    for strategy in strategies:
        writes.clear()
        shares.clear()
        pipe = tiny_pipeline(seed=0)
        # One class-image cache for all runs: the second run finds it complete and generates nothing.
        run = {"output_dir": OUT / f"run-{strategy}", "class_image_dir": OUT / "class_images", **settings}
        started = time.perf_counter()
        adapter = personalize(pipe, _subject_images(), "dog", strategy=strategy, **run)
        adapter.save(OUT / f"{strategy}.safetensors")
        seconds = time.perf_counter() - started
        state = PartialState()
        report = {
            "strategy": strategy,
            "rank": dist.get_rank() if dist.is_initialized() else 0,
            "world": dist.get_world_size() if dist.is_initialized() else 1,
            "backend": dist.get_backend() if dist.is_initialized() else None,
            "accelerate_rank": state.process_index,
            "accelerate_world": state.num_processes,
            "share": sorted(shares),
            "losses": [h["loss"] for h in adapter.history],
            "lr": [h["lr"] for h in adapter.history],
            "weights": weights_hash(adapter.strategy, pipe),
            "writes": sorted(set(writes)),
            "seconds": round(seconds, 2),  # personalize + save on this rank (for timing runs)
        }
        print("RANK_REPORT " + json.dumps(report), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
