"""Several processes, one run: which process this is, which one writes files, and sharing results.

Launched by `torchrun` or `accelerate launch`, each process (rank) runs the same script; accelerate's
`PartialState` knows the rank and the number of processes. The rules the library keeps:

- the main process (rank 0) alone writes files; the others wait at a barrier where they need them;
- work that splits (class-image generation) goes to rank r as items r, r + world, r + 2 world, ...;
- every rank draws its own training noise and data order (`rank_seed`), from identical weights.

A process that was not launched as one of several never touches `PartialState`, so single-process
use stays exactly as it was (and a CUDA pipeline is never moved by a CPU-initialised state).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    import torch
    from PIL import Image

T = TypeVar("T")

# The environment variables torchrun, accelerate and MPI launchers set to the number of processes
# (the same list accelerate reads).
_WORLD_SIZE_VARIABLES = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE", "WORLD_SIZE")
# Odd multiplier (the golden ratio's 64-bit constant): rank r's seed lies far from seed + r, which
# a user may pick for another run.
_RANK_SEED_STRIDE = 0x9E3779B97F4A7C15


def launched_processes() -> int:
    """How many processes the launcher started for this run (1 when run as a plain script).

    Example:
        >>> launched_processes()  # under `torchrun --nproc_per_node 2` this is 2
        1
    """
    from accelerate.utils import get_int_from_env

    return get_int_from_env(list(_WORLD_SIZE_VARIABLES), 1)


@dataclass(frozen=True)
class Processes:
    """This process's place among the run's processes; `Processes()` is a single process.

    Attributes:
        rank (`int`): this process's index, 0 for the main process.
        world (`int`): how many processes train together.
    """

    rank: int = 0
    world: int = 1
    state: Any = field(default=None, repr=False)  # accelerate's PartialState when world > 1

    @property
    def is_main(self) -> bool:
        """True on the one process that writes files."""
        return self.rank == 0

    def share(self, items: Sequence[T]) -> list[T]:
        """This rank's part of `items`: disjoint between ranks, all of them together cover `items`.

        Example:
            >>> Processes(rank=1, world=2).share([0, 1, 2, 3, 4])
            [1, 3]
        """
        return list(items[self.rank :: self.world])

    def barrier(self) -> None:
        """Wait until every process arrives here (nothing to wait for in a single process)."""
        if self.world > 1:
            self.state.wait_for_everyone()

    def any(self, flags: Sequence[bool]) -> list[bool]:
        """Element-wise OR of `flags` over all processes (each passes a list of the same length)."""
        if self.world == 1:
            return list(flags)
        import torch
        from accelerate.utils import reduce

        summed = reduce(torch.tensor([int(f) for f in flags], dtype=torch.int64, device=self.state.device), "sum")
        return [bool(v) for v in summed.tolist()]

    def gather_images(self, images: dict[int, Image.Image], per_rank: int, resolution: int) -> dict[int, Image.Image]:
        """Every rank's `{index: image}` on every rank, sent as uint8 tensors (no pickle).

        Args:
            images (`dict[int, PIL.Image]`): this rank's images, at most `per_rank`, each
                `resolution` x `resolution` RGB.
            per_rank (`int`): the most images any rank sends in this call (the same on every rank).
            resolution (`int`): the images' side.

        Example:
            >>> from PIL import Image
            >>> Processes().gather_images({3: Image.new("RGB", (8, 8))}, 1, 8).keys()
            dict_keys([3])
        """
        if self.world == 1:
            return dict(images)
        import numpy as np
        import torch
        from accelerate.utils import gather
        from PIL import Image

        pixels = torch.zeros((per_rank, resolution, resolution, 3), dtype=torch.uint8)
        indices = torch.full((per_rank,), -1, dtype=torch.int64)  # -1: an empty slot
        for slot, (index, image) in enumerate(sorted(images.items())):
            pixels[slot] = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.uint8).copy())
            indices[slot] = index
        device = self.state.device  # nccl sends only tensors on the rank's own GPU
        all_pixels, all_indices = gather(pixels.to(device)).cpu(), gather(indices.to(device)).cpu()
        return {
            int(index): Image.fromarray(all_pixels[slot].numpy())
            for slot, index in enumerate(all_indices.tolist())
            if index >= 0
        }


def processes(device: torch.device | str | None = None) -> Processes:
    """This process's `Processes`: rank and world size from accelerate when several were launched.

    Args:
        device (`torch.device | str | None`): where this process trains; "cpu" makes accelerate use
            gloo on a machine without GPUs. None: CPU when torch sees no GPU.

    Example:
        >>> processes("cpu")
        Processes(rank=0, world=1)
    """
    expected = launched_processes()
    if expected <= 1:
        return Processes()
    import torch
    from accelerate.state import PartialState

    on_cpu = torch.device(device).type == "cpu" if device is not None else not torch.cuda.is_available()
    state = PartialState(cpu=on_cpu)
    if state.num_processes != expected:
        from .errors import TrainingError

        raise TrainingError(
            f"{expected} processes were launched but accelerate set this one up as {state.num_processes} of "
            f"{state.num_processes} ({state.distributed_type}); on CPU-only machines something created "
            "`PartialState()` or `Accelerator()` without cpu=True first. Create `Accelerator(cpu=True)` before "
            "anything else, or leave it to db_adapters."
        )
    return Processes(rank=state.process_index, world=state.num_processes, state=state)


def training_device() -> torch.device:
    """Where this process should put its pipeline: its own GPU when several were launched on GPUs.

    Without GPUs it is the CPU; a single process with a GPU gets "cuda" (the current GPU).

    Example:
        >>> pipe = tiny_pipeline().to(training_device())  # doctest: +SKIP
    """
    import torch

    procs = processes()
    if procs.world > 1:
        return torch.device(procs.state.device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def rank_seed(seed: int, rank: int) -> int:
    """The training-noise seed of process `rank`: `seed` itself on rank 0, a distant one elsewhere.

    Example:
        >>> rank_seed(7, 0), rank_seed(7, 1) != rank_seed(7, 0)
        (7, True)
    """
    if rank == 0:
        return seed
    return (seed + rank * _RANK_SEED_STRIDE) % 2**63
