"""LPIPS v0.1 "alex" (Zhang et al. 2018), implemented here: the DIV metric's image distance.

The `lpips` package cannot be used beside our torch: it imports torchvision (which does not load
with this torch) and downloads weights on first use. This module rebuilds the same network in plain
torch and only ever reads weights from a safetensors file the user provides.

The network, as lpips' `LPIPS(net="alex", version="0.1")`:

1. inputs in [-1, 1], shifted and scaled per channel (shift `SHIFT`, scale `SCALE`);
2. torchvision's `alexnet().features` trunk; the outputs of its 5 ReLUs are the taps
   (64, 192, 384, 256, 256 channels);
3. each tap unit-normalised over channels, then the squared difference of the two images;
4. a learned 1x1 convolution per tap (non-negative weights, no bias) to one channel;
5. the spatial mean per tap, summed over the 5 taps.

Weight file (`load_lpips`): a safetensors file with the trunk as torchvision names it,
`features.{0,3,6,8,10}.weight` / `.bias`, and the heads as `heads.{0..4}.weight` (`[1, C, 1, 1]`).
lpips' own names are accepted too: `net.slice{1..5}.{i}.weight` / `.bias` for the trunk and
`lin{0..4}.model.1.weight` for the heads; `scaling_layer.*` and torchvision's `classifier.*`
are ignored. Conversion recipe, run by you on files you downloaded yourself and trust (it needs
`torch.load`, which db-adapters never calls)::

    import torch
    from safetensors.torch import save_file

    # lpips/weights/v0.1/alex.pth from github.com/richzhang/PerceptualSimilarity (the heads), and
    # torchvision's alexnet-owt-7be5be79.pth (the trunk; download.pytorch.org/models/).
    heads = torch.load("alex.pth", map_location="cpu", weights_only=True)
    trunk = torch.load("alexnet-owt-7be5be79.pth", map_location="cpu", weights_only=True)
    tensors = {k: v for k, v in trunk.items() if k.startswith("features.")} | heads
    save_file({k: v.contiguous() for k, v in tensors.items()}, "lpips_alex_v0.1.safetensors")

Example:
    >>> import torch
    >>> net = random_lpips(seed=0)
    >>> x = torch.rand(2, 3, 64, 64) * 2 - 1
    >>> net(x, x).tolist()
    [0.0, 0.0]
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from ..errors import InputError

if TYPE_CHECKING:
    from PIL import Image

# lpips' ScalingLayer constants (lpips/pretrained_networks.py, v0.1).
SHIFT = (-0.030, -0.088, -0.188)
SCALE = (0.458, 0.448, 0.450)
TAP_CHANNELS = (64, 192, 384, 256, 256)
# Indices, in torchvision's alexnet.features, of the convolutions and of the ReLUs LPIPS taps.
CONV_INDICES = (0, 3, 6, 8, 10)
TAP_INDICES = (1, 4, 7, 9, 11)
_EPS = 1e-10  # lpips' normalize_tensor epsilon
_LPIPS_TRUNK_KEY = re.compile(r"^net\.slice[1-5]\.(\d+)\.(weight|bias)$")
_LPIPS_HEAD_KEY = re.compile(r"^lin([0-4])\.model\.1\.weight$")
_IGNORED_PREFIXES = ("scaling_layer.", "classifier.")


class LPIPS(nn.Module):
    """LPIPS v0.1 with the AlexNet trunk; `forward(x, y)` gives one distance per image pair.

    Inputs are `[N, 3, H, W]` tensors in [-1, 1] (H, W at least 32 or so: AlexNet shrinks by 32).
    """

    def __init__(self) -> None:
        super().__init__()
        self.features = _alexnet_trunk()
        self.heads = nn.ModuleList(nn.Conv2d(c, 1, kernel_size=1, bias=False) for c in TAP_CHANNELS)
        self.register_buffer("shift", torch.tensor(SHIFT).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor(SCALE).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False).eval()

    def taps(self, images: torch.Tensor) -> list[torch.Tensor]:
        """The 5 ReLU outputs of the trunk, each unit-normalised over channels."""
        x = (images - self.shift) / self.scale
        taps = []
        for index, layer in enumerate(self.features):
            x = layer(x)
            if index in TAP_INDICES:
                taps.append(x / (x.pow(2).sum(dim=1, keepdim=True).sqrt() + _EPS))
        return taps

    def distance_between_taps(self, taps_a: list[torch.Tensor], taps_b: list[torch.Tensor]) -> torch.Tensor:
        """`[N]` LPIPS distances from two images' (or batches') normalised taps."""
        pairs = zip(self.heads, taps_a, taps_b, strict=True)
        return torch.stack([head((a - b).pow(2)).mean(dim=(1, 2, 3)) for head, a, b in pairs]).sum(dim=0)

    @torch.no_grad()
    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.distance_between_taps(self.taps(x), self.taps(y))

    @torch.no_grad()
    def pairwise(self, images: torch.Tensor) -> torch.Tensor:
        """`[N, N]` symmetric matrix of distances among `images`; the trunk runs once per image."""
        taps = self.taps(images)
        n = len(images)
        matrix = torch.zeros(n, n, dtype=torch.float64)
        for i in range(n):
            for j in range(i + 1, n):
                pair = self.distance_between_taps([t[i : i + 1] for t in taps], [t[j : j + 1] for t in taps])
                matrix[i, j] = matrix[j, i] = float(pair)
        return matrix


def _alexnet_trunk() -> nn.Sequential:
    # torchvision's alexnet().features up to its last ReLU (the final max-pool feeds no tap), with the
    # same indices so its state-dict keys read across unchanged.
    return nn.Sequential(
        nn.Conv2d(3, 64, kernel_size=11, stride=4, padding=2),
        nn.ReLU(),
        nn.MaxPool2d(kernel_size=3, stride=2),
        nn.Conv2d(64, 192, kernel_size=5, padding=2),
        nn.ReLU(),
        nn.MaxPool2d(kernel_size=3, stride=2),
        nn.Conv2d(192, 384, kernel_size=3, padding=1),
        nn.ReLU(),
        nn.Conv2d(384, 256, kernel_size=3, padding=1),
        nn.ReLU(),
        nn.Conv2d(256, 256, kernel_size=3, padding=1),
        nn.ReLU(),
    )


def to_lpips_input(images: list[Image.Image]) -> torch.Tensor:
    """PIL images (all one size) as the `[N, 3, H, W]` batch in [-1, 1] that LPIPS takes.

    Example:
        >>> from PIL import Image
        >>> to_lpips_input([Image.new("RGB", (8, 8), "white")]).amax().item()
        1.0
    """
    import numpy as np

    sizes = {image.size for image in images}
    if len(sizes) != 1:
        raise InputError(f"LPIPS compares images of one size; got sizes {sorted(sizes)}.")
    array = np.stack([np.asarray(image.convert("RGB"), dtype=np.float32) for image in images])
    return torch.from_numpy(array).permute(0, 3, 1, 2) / 127.5 - 1.0


def random_lpips(seed: int = 0) -> LPIPS:
    """An LPIPS network with random weights (non-negative heads), for tests; the same seed, the same net.

    Example:
        >>> bool((random_lpips(1).heads[0].weight >= 0).all())
        True
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = LPIPS()
        for head in net.heads:
            head.weight.abs_()
    return net


def load_lpips(path: str | os.PathLike, device: str | torch.device | None = None) -> LPIPS:
    """LPIPS v0.1 alex from a safetensors file: a local path, or `owner/repo/file` in the hub cache.

    Args:
        path (`str | PathLike`): the weights file (key names in this module's docstring), or a hub
            file `owner/repo/filename.safetensors` already in the local hub cache (never downloaded).
        device (`str | torch.device | None`): where to put the network (default cpu).

    Raises:
        InputError: the file is missing, is not safetensors, lacks weights, or has negative heads.

    Example:
        >>> net = load_lpips("lpips_alex_v0.1.safetensors")  # doctest: +SKIP
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    file = _resolve_weights_file(str(path))
    try:
        tensors = load_file(file)
    except (SafetensorError, OSError) as error:
        raise InputError(f"--lpips-weights {str(file)!r} is not a readable safetensors file ({error}).") from None
    net = LPIPS()
    state = _our_key_names(tensors)
    expected = set(net.state_dict())
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise InputError(
            f"--lpips-weights {str(file)!r} is not an LPIPS alex file: missing {missing[:4]}, unexpected "
            f"{unexpected[:4]} (see db_adapters.evaluation.lpips for the key names and a conversion recipe)."
        )
    try:
        net.load_state_dict(state)
    except RuntimeError as error:
        raise InputError(f"--lpips-weights {str(file)!r}: tensor shapes do not fit LPIPS alex ({error}).") from None
    if any(bool((head.weight < 0).any()) for head in net.heads):
        raise InputError(f"--lpips-weights {str(file)!r}: LPIPS heads must be non-negative; is this the right file?")
    return net.to(device or "cpu")


def _our_key_names(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    state = {}
    for key, tensor in tensors.items():
        if key.startswith(_IGNORED_PREFIXES):
            continue
        if trunk := _LPIPS_TRUNK_KEY.match(key):
            key = f"features.{trunk[1]}.{trunk[2]}"
        elif head := _LPIPS_HEAD_KEY.match(key):
            key = f"heads.{head[1]}.weight"
        state[key] = tensor.float()
    return state


def _resolve_weights_file(spec: str) -> Path:
    local = Path(spec).expanduser()
    if local.is_file():
        return local
    parts = spec.split("/")
    if not local.is_absolute() and len(parts) >= 3 and not local.exists():
        from huggingface_hub import hf_hub_download

        try:
            return Path(hf_hub_download("/".join(parts[:2]), "/".join(parts[2:]), local_files_only=True))
        except Exception:  # any failure means "not in the cache"; the error below says what to do
            pass
    raise InputError(
        f"--lpips-weights {spec!r} was not found: pass a local safetensors file, or owner/repo/file of a hub "
        "file already in the hub cache (see db_adapters.evaluation.lpips for how to make one)."
    )
