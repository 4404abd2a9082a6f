"""Images in, training tensors out: load a subject's photos and turn them into normalised batches.

`load_images` accepts what a user naturally has (a folder, image paths, PIL images) and returns
upright RGB images: EXIF orientation applied, transparency flattened onto white, every pixel mode
(greyscale, palette, 16-bit, CMYK) brought to 8-bit RGB. `preprocess` and `image_batch` turn those
into the square `[-1, 1]` tensors a Stable Diffusion VAE expects.

Example:
    >>> from PIL import Image
    >>> images = load_images([Image.new("RGBA", (64, 48), (255, 0, 0, 255))])
    >>> image_batch(images, 32).shape
    torch.Size([1, 3, 32, 32])
"""

from __future__ import annotations

import numbers
import os
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageOps

from .errors import InputError

if TYPE_CHECKING:
    import torch

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"})

# What Pillow raises for files that are not images, are truncated or are otherwise unreadable.
_UNREADABLE_IMAGE_ERRORS = (
    OSError,
    SyntaxError,
    ValueError,
    EOFError,
    struct.error,
    Image.DecompressionBombError,
)
_HOW_TO_PASS = "pass a folder of images, image paths or PIL images"
_WHITE = (255, 255, 255, 255)
# VAEs of the Stable Diffusion family downsample by 8, so the latent grid needs a multiple of 8.
_RESOLUTION_MULTIPLE = 8
# A photo upscaled more than this to the training resolution is a blur of a few pixels, not a subject.
MAX_UPSCALE = 8

ImageSource = str | os.PathLike[str] | Image.Image
ImageInput = ImageSource | Sequence[ImageSource]


def load_images(images: ImageInput, *, name: str = "images") -> list[Image.Image]:
    """Load images as upright 8-bit RGB PIL images, fully read into memory with no files left open.

    Args:
        images: A folder (its image files, sorted by name, not recursive, hidden files skipped), a
            single image file, a PIL image, or a list/tuple of image files and/or PIL images.
        name: What to call `images` in error messages, e.g. "instance_images" or "class_images".

    Returns:
        One RGB image per input image: EXIF orientation applied, transparency composited onto white.

    Raises:
        InputError: A path does not exist, a folder holds no images, a file is not a readable image,
            a list is empty or holds something other than a path or a PIL image, a PIL image has no pixels.

    Example:
        >>> from PIL import Image
        >>> [image.mode for image in load_images([Image.new("LA", (8, 8))])]
        ['RGB']
    """
    if isinstance(images, Image.Image):
        return [_normalise_image(images, f"{name}[0]")]
    if isinstance(images, str | os.PathLike):
        return [_load_image_file(path, name) for path in _image_files_at(Path(images), name)]
    if isinstance(images, list | tuple):
        return _load_image_list(images, name)
    raise InputError(f"{name}: got a {type(images).__name__}; {_HOW_TO_PASS}")


def preprocess(image: Image.Image, resolution: int, *, flip: bool = False) -> torch.Tensor:
    """Resize, centre-crop and normalise one image to a `(3, resolution, resolution)` tensor in [-1, 1].

    The shorter side is resized to `resolution` (Lanczos), then the centre square is kept, so the
    subject in the middle of a photo survives and the aspect ratio is never distorted.

    Args:
        image: A PIL image, ideally from `load_images` (other modes are converted to RGB here, but
            EXIF orientation is only applied by `load_images`).
        resolution: Side of the square output in pixels; a positive multiple of 8.
        flip: Mirror the image left-right (a cheap augmentation for subjects without handedness).

    Returns:
        A float32 tensor of shape (3, resolution, resolution) with values in [-1, 1].

    Example:
        >>> from PIL import Image
        >>> preprocess(Image.new("RGB", (96, 64), (255, 255, 255)), 32).shape
        torch.Size([3, 32, 32])
    """
    import torch

    size = validate_resolution(resolution)
    if not isinstance(image, Image.Image):
        raise InputError(f"preprocess: expected a PIL image, got a {type(image).__name__}; use load_images first")
    square = _centre_crop(_resize_shorter_side(_to_rgb(image), size), size)
    if flip:
        square = square.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    pixels = torch.from_numpy(np.array(square, dtype=np.float32))
    return (pixels / 127.5 - 1.0).permute(2, 0, 1).contiguous()


def image_batch(images: Sequence[Image.Image], resolution: int, *, flip: bool = False) -> torch.Tensor:
    """Stack images into one `(N, 3, resolution, resolution)` float32 batch in [-1, 1].

    Args:
        images: PIL images, e.g. from `load_images`.
        resolution: Side of each square image in pixels; a positive multiple of 8.
        flip: Mirror every image left-right.

    Returns:
        A float32 tensor of shape (N, 3, resolution, resolution).

    Example:
        >>> from PIL import Image
        >>> image_batch([Image.new("RGB", (8, 8))] * 2, 8).shape
        torch.Size([2, 3, 8, 8])
    """
    import torch

    if isinstance(images, Image.Image) or not isinstance(images, Sequence):
        raise InputError(f"image_batch: expected a list of PIL images, got a {type(images).__name__}")
    if not images:
        raise InputError("image_batch: the list of images is empty; pass at least one PIL image")
    return torch.stack([preprocess(image, resolution, flip=flip) for image in images])


@dataclass(frozen=True)
class CropGeometry:
    """Where a training image came from: its size before resizing, and the crop's top-left corner.

    SDXL conditions on both (its `add_time_ids`); the crop corner is in the resized image's pixels.

    Attributes:
        original_size: (height, width) of the image as loaded.
        crop_top_left: (top, left) of the square crop after the shorter side was resized.
    """

    original_size: tuple[int, int]
    crop_top_left: tuple[int, int]


def crop_geometry(image: Image.Image, resolution: int) -> CropGeometry:
    """The size and crop `preprocess` gives `image` at `resolution` (shorter side resized, centre crop).

    Args:
        image: A PIL image.
        resolution: Side of the square crop in pixels.

    Example:
        >>> crop_geometry(Image.new("RGB", (96, 64)), 32)
        CropGeometry(original_size=(64, 96), crop_top_left=(0, 8))
    """
    width, height = _resized_size(image.size, resolution)
    return CropGeometry((image.height, image.width), ((height - resolution) // 2, (width - resolution) // 2))


def validate_resolution(resolution: int) -> int:
    """Check that a training resolution is a positive multiple of 8 and return it as an int.

    Args:
        resolution: Side of the square training images in pixels.

    Returns:
        `resolution` as a plain int.

    Raises:
        InputError: It is not an integer, not positive or not a multiple of 8.

    Example:
        >>> validate_resolution(512)
        512
    """
    is_integer = isinstance(resolution, numbers.Integral) and not isinstance(resolution, bool)
    if not is_integer or resolution <= 0 or resolution % _RESOLUTION_MULTIPLE:
        raise InputError(
            f"resolution must be a positive multiple of {_RESOLUTION_MULTIPLE} (the VAE works on "
            f"{_RESOLUTION_MULTIPLE}x{_RESOLUTION_MULTIPLE} pixel cells), got {resolution!r}; use e.g. 512"
        )
    return int(resolution)


def check_image_sizes(images: Sequence[Image.Image], resolution: int, *, name: str = "images") -> None:
    """Refuse images too small to train at `resolution`: upscaled more than `MAX_UPSCALE` times.

    Args:
        images: PIL images, e.g. from `load_images`.
        resolution: The training resolution in pixels.
        name: What to call `images` in the error message.

    Raises:
        InputError: An image's shorter side times `MAX_UPSCALE` is below `resolution`; the message
            names the image (by index) and its size.

    Example:
        >>> from PIL import Image
        >>> check_image_sizes([Image.new("RGB", (64, 48))], 256)
    """
    for index, image in enumerate(images):
        if min(image.size) * MAX_UPSCALE < resolution:
            width, height = image.size
            smallest = -(-resolution // MAX_UPSCALE)
            raise InputError(
                f"{name}[{index}] is {width}x{height} px, too small to train at resolution {resolution} (it would "
                f"be upscaled more than {MAX_UPSCALE}x into a blur); use photos of at least {smallest} px on the "
                f"shorter side (ideally {resolution}), or a lower resolution"
            )


def _image_files_at(path: Path, name: str) -> list[Path]:
    if path.is_dir():
        return _image_files_in_folder(path, name)
    if path.is_file():
        return [path]
    raise InputError(f"{name}: {path} does not exist; {_HOW_TO_PASS}")


def _image_files_in_folder(folder: Path, name: str) -> list[Path]:
    files = sorted(
        (entry for entry in folder.iterdir() if _is_visible_image_file(entry)),
        key=lambda entry: entry.name,
    )
    if not files:
        extensions = " ".join(sorted(IMAGE_EXTENSIONS))
        raise InputError(
            f"{name}: folder {folder} has no images (looked for {extensions}, not in sub-folders); "
            "add image files to it or pass image paths"
        )
    return files


def _is_visible_image_file(entry: Path) -> bool:
    # Hidden files include macOS "._photo.jpg" resource forks: image extension, but not images.
    return not entry.name.startswith(".") and entry.suffix.lower() in IMAGE_EXTENSIONS and entry.is_file()


def _load_image_list(items: list | tuple, name: str) -> list[Image.Image]:
    if not items:
        raise InputError(f"{name}: the list is empty; {_HOW_TO_PASS}")
    return [_load_list_item(item, f"{name}[{index}]") for index, item in enumerate(items)]


def _load_list_item(item: object, label: str) -> Image.Image:
    if isinstance(item, Image.Image):
        return _normalise_image(item, label)
    if isinstance(item, str | os.PathLike):
        path = Path(item)
        if path.is_file():
            return _load_image_file(path, label)
        if path.is_dir():
            raise InputError(f"{label}: {path} is a folder; pass the folder itself, or a list of image files")
        raise InputError(f"{label}: {path} does not exist; {_HOW_TO_PASS}")
    raise InputError(f"{label}: got a {type(item).__name__}; a list may only hold image paths and PIL images")


def _load_image_file(path: Path, name: str) -> Image.Image:
    try:
        # load() inside the try: Image.open only reads the header, so truncated data surfaces here.
        with Image.open(path) as image:
            image.load()
            return _upright_rgb(image)
    except _UNREADABLE_IMAGE_ERRORS as error:
        raise InputError(
            f"{name}: {path} is not a readable image ({error}); remove it or replace it with a valid image file"
        ) from error


def _normalise_image(image: Image.Image, label: str) -> Image.Image:
    if 0 in image.size:
        # Pillow makes 0-pixel images, but there is nothing in them to resize or crop.
        raise InputError(f"{label}: this PIL image is {image.width}x{image.height} px, empty; remove it from the list")
    try:
        return _upright_rgb(image)
    except _UNREADABLE_IMAGE_ERRORS as error:
        raise InputError(f"{label}: this PIL image cannot be converted to RGB ({error})") from error


def _upright_rgb(image: Image.Image) -> Image.Image:
    # exif_transpose always returns a new image, so the caller's image (or open file) is never reused.
    return _to_rgb(ImageOps.exif_transpose(image))


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        return _sixteen_bit_to_rgb(image)
    if _has_transparency(image):
        return _composite_on_white(image)
    return image.convert("RGB")


def _has_transparency(image: Image.Image) -> bool:
    # Palette, greyscale and RGB images mark transparency with a key colour in info, not an alpha band.
    return "A" in image.getbands() or "a" in image.getbands() or "transparency" in image.info


def _composite_on_white(image: Image.Image) -> Image.Image:
    # Dropping alpha would turn transparent pixels into whatever colour they hold, usually black.
    rgba = image.convert("RGBA")
    return Image.alpha_composite(Image.new("RGBA", rgba.size, _WHITE), rgba).convert("RGB")


def _sixteen_bit_to_rgb(image: Image.Image) -> Image.Image:
    # Pillow's own conversion clips 16-bit values at 255 (mid-grey 32768 would become white), so scale.
    values = np.asarray(image).astype(np.float64)
    grey = np.clip(np.rint(values / 257.0), 0, 255).astype(np.uint8)
    return Image.fromarray(grey).convert("RGB")


def _resized_size(size: tuple[int, int], target: int) -> tuple[int, int]:
    width, height = size
    scale = target / min(width, height)
    # max() keeps rounding from leaving the longer side a pixel short of the crop.
    return max(target, round(width * scale)), max(target, round(height * scale))


def _resize_shorter_side(image: Image.Image, size: int) -> Image.Image:
    new_size = _resized_size(image.size, size)
    if new_size == image.size:
        return image
    return image.resize(new_size, Image.Resampling.LANCZOS)


def _centre_crop(image: Image.Image, size: int) -> Image.Image:
    width, height = image.size
    left, top = (width - size) // 2, (height - size) // 2
    return image.crop((left, top, left + size, top + size))
