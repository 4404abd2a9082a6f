"""Tests of image loading and preprocessing: pixel modes, EXIF orientation, cropping, errors, file handles."""

from __future__ import annotations

import gc
import os
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from db_adapters.data import image_batch, load_images, preprocess, validate_resolution
from db_adapters.errors import InputError

RED, GREEN, BLUE, WHITE = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255)


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image)


def solid(colour: tuple[int, int, int], size: tuple[int, int] = (8, 8)) -> Image.Image:
    return Image.new("RGB", size, colour)


def bands(colours: list[tuple[int, int, int]], band_width: int, height: int) -> Image.Image:
    """Vertical stripes, left to right, each `band_width` pixels wide."""
    image = Image.new("RGB", (band_width * len(colours), height))
    for index, colour in enumerate(colours):
        image.paste(colour, (index * band_width, 0, (index + 1) * band_width, height))
    return image


def as_rgb_tensor(colour: tuple[int, int, int]) -> torch.Tensor:
    # 0 -> -1, 255 -> 255 / 127.5 - 1 = 1.
    return torch.tensor(colour, dtype=torch.float32) / 127.5 - 1.0


# --- pixel modes ----------------------------------------------------------------------------------


def test_rgba_transparent_pixel_becomes_white_and_opaque_pixel_keeps_its_colour():
    image = Image.new("RGBA", (3, 1))
    image.putpixel((0, 0), (10, 20, 30, 0))  # fully transparent: its colour must not show
    image.putpixel((1, 0), (10, 20, 30, 255))  # fully opaque: its colour unchanged
    image.putpixel((2, 0), (0, 0, 0, 128))  # half black over white: 255 * (1 - 128/255) = 127
    (loaded,) = load_images([image])
    assert loaded.mode == "RGB"
    assert pixels(loaded)[0].tolist() == [[255, 255, 255], [10, 20, 30], [127, 127, 127]]


@pytest.mark.parametrize(
    ("mode", "values", "expected"),
    [
        ("L", [0, 100, 255], [0, 100, 255]),
        ("1", [0, 1, 1], [0, 255, 255]),  # mode "1" stores 0/non-zero, shown as black/white
    ],
)
def test_greyscale_becomes_equal_rgb_channels(mode, values, expected):
    image = Image.new(mode, (3, 1))
    for x, value in enumerate(values):
        image.putpixel((x, 0), value)
    (loaded,) = load_images([image])
    assert pixels(loaded)[0].tolist() == [[value] * 3 for value in expected]


def test_greyscale_with_alpha_composites_onto_white():
    image = Image.new("LA", (2, 1), (100, 255))
    image.putpixel((1, 0), (0, 0))  # transparent black -> white
    (loaded,) = load_images([image])
    assert pixels(loaded)[0].tolist() == [[100, 100, 100], [255, 255, 255]]


@pytest.mark.parametrize("suffix", [".png", ".gif"])
def test_palette_image_with_transparent_index_from_file(tmp_path, suffix):
    image = Image.new("P", (2, 1))
    image.putpalette([*RED, *BLUE])  # index 0 red, index 1 blue
    image.putpixel((1, 0), 1)
    path = tmp_path / f"palette{suffix}"
    image.save(path, transparency=1)  # index 1 transparent: the blue must become white
    (loaded,) = load_images(path)
    assert pixels(loaded)[0].tolist() == [list(RED), list(WHITE)]


def test_palette_image_without_transparency_uses_palette_colours():
    image = Image.new("P", (2, 1))
    image.putpalette([*RED, *BLUE])
    image.putpixel((1, 0), 1)
    (loaded,) = load_images([image])
    assert pixels(loaded)[0].tolist() == [list(RED), list(BLUE)]


def sixteen_bit_png(tmp_path: Path) -> Path:
    path = tmp_path / "depth16.png"
    Image.fromarray(np.array([[0, 25700, 65535]], dtype=np.uint16)).save(path)
    return path


@pytest.mark.parametrize("source", ["I;16 png file", "I (32-bit) image"])
def test_sixteen_bit_greyscale_is_scaled_not_clipped(tmp_path, source):
    if source == "I;16 png file":
        images = sixteen_bit_png(tmp_path)
        assert Image.open(images).mode == "I;16"  # guards the premise of the test
    else:
        images = [Image.fromarray(np.array([[0, 25700, 65535]], dtype=np.int32))]
    (loaded,) = load_images(images)
    # 16-bit -> 8-bit divides by 257 (65535 / 255): 25700 / 257 = 100. Pillow's own convert("RGB")
    # clips instead, which would give 255 for 25700.
    assert pixels(loaded)[0].tolist() == [[0, 0, 0], [100, 100, 100], [255, 255, 255]]


@pytest.mark.parametrize("from_file", [False, True])
def test_cmyk_becomes_rgb(tmp_path, from_file):
    image = Image.new("CMYK", (4, 1))
    # (C, M, Y, K) -> (R, G, B) = 255 - ink: no ink is white, cyan ink removes red, K is black.
    cmyk_to_rgb = [
        ((0, 0, 0, 0), WHITE),
        ((255, 0, 0, 0), (0, 255, 255)),
        ((0, 255, 255, 0), RED),
        ((0, 0, 0, 255), (0, 0, 0)),
    ]
    for x, (cmyk, _) in enumerate(cmyk_to_rgb):
        image.putpixel((x, 0), cmyk)
    source: object = [image]
    if from_file:
        source = tmp_path / "cmyk.tif"  # TIFF is lossless, so the pixels survive exactly
        image.save(source)
    (loaded,) = load_images(source)
    assert pixels(loaded)[0].tolist() == [list(rgb) for _, rgb in cmyk_to_rgb]


# --- EXIF orientation -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("orientation", "red_at", "white_at"),
    [
        # Stored 64x32 image, 16x16 red block in its top-left corner (x, y in 0..15).
        # 6: display = stored rotated 90 degrees clockwise, (x, y) -> (31 - y, x): the block lands at
        #    x in 16..31, y in 0..15 of the 32x64 result, i.e. top-right; sample its centre (24, 8).
        (6, (24, 8), (8, 8)),
        # 8: rotated 90 degrees anticlockwise, (x, y) -> (y, 63 - x): block at x in 0..15,
        #    y in 48..63, i.e. bottom-left; sample (8, 56).
        (8, (8, 56), (8, 8)),
    ],
)
def test_exif_orientation_is_applied(tmp_path, orientation, red_at, white_at):
    stored = Image.new("RGB", (64, 32), WHITE)
    stored.paste(RED, (0, 0, 16, 16))
    exif = Image.Exif()
    exif[0x0112] = orientation  # the Orientation tag
    path = tmp_path / "rotated.jpg"
    stored.save(path, exif=exif, quality=95, subsampling=0)

    (loaded,) = load_images(path)

    assert loaded.size == (32, 64)  # width and height swap
    red, green, blue = loaded.getpixel(red_at)
    assert red > 220 and green < 40 and blue < 40  # JPEG is lossy: near red, not exactly
    assert min(loaded.getpixel(white_at)) > 220  # the stored top-left is no longer red


# --- what load_images accepts ---------------------------------------------------------------------


def test_folder_is_sorted_by_name_non_recursive_and_skips_hidden_and_non_images(tmp_path):
    # Colours encode the expected position; names sort by code point, so "D.TIF" comes before "a.bmp".
    solid((0, 0, 0)).save(tmp_path / "D.TIF")
    solid((1, 1, 1)).save(tmp_path / "a.bmp")
    solid((2, 2, 2)).save(tmp_path / "b.png")
    solid((3, 3, 3)).save(tmp_path / "c.webp", lossless=True)
    solid((9, 9, 9)).save(tmp_path / ".hidden.png")
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / "sub").mkdir()
    solid((9, 9, 9)).save(tmp_path / "sub" / "0.png")
    (tmp_path / "folder.png").mkdir()  # a folder with an image extension is not an image

    loaded = load_images(tmp_path)

    assert [image.getpixel((0, 0)) for image in loaded] == [(0, 0, 0), (1, 1, 1), (2, 2, 2), (3, 3, 3)]


def test_single_path_list_of_paths_and_pil_images_mixed(tmp_path):
    solid(RED).save(tmp_path / "red.png")
    as_string = str(tmp_path / "red.png")
    assert [image.getpixel((0, 0)) for image in load_images(as_string)] == [RED]
    mixed = load_images((tmp_path / "red.png", solid(BLUE), as_string))
    assert [image.getpixel((0, 0)) for image in mixed] == [RED, BLUE, RED]
    assert [image.getpixel((0, 0)) for image in load_images(solid(GREEN))] == [GREEN]


def test_callers_pil_image_is_left_untouched():
    original = Image.new("RGBA", (2, 2), (0, 0, 0, 0))
    (loaded,) = load_images([original])
    assert loaded is not original
    assert original.mode == "RGBA" and original.getpixel((0, 0)) == (0, 0, 0, 0)
    assert loaded.getpixel((0, 0)) == WHITE


def test_loaded_images_are_in_memory_after_the_files_are_gone(tmp_path):
    solid(BLUE).save(tmp_path / "blue.png")
    (loaded,) = load_images(tmp_path)
    (tmp_path / "blue.png").unlink()
    assert loaded.getpixel((3, 3)) == BLUE


def _open_paths_under(folder: Path) -> list[str]:
    fd_dir = Path("/proc/self/fd")
    targets = []
    for fd in os.listdir(fd_dir):
        try:
            targets.append(os.readlink(fd_dir / fd))
        except OSError:  # the descriptor listdir itself used is already closed
            continue
    return [target for target in targets if target.startswith(str(folder))]


def folder_of_single_and_multi_frame_images(folder: Path) -> None:
    # Pillow closes single-frame files itself after load(); multi-frame files (animated GIF,
    # multi-page TIFF) stay open for seeking until closed, so they are the ones that can leak.
    solid(RED).save(folder / "0.png")
    solid(RED).save(folder / "1.jpg")
    for name in ("2.gif", "3.tif"):
        solid(RED).save(folder / name, save_all=True, append_images=[solid(BLUE)])


def test_multi_frame_images_load_their_first_frame(tmp_path):
    folder_of_single_and_multi_frame_images(tmp_path)
    loaded = load_images(tmp_path)
    assert [image.getpixel((0, 0)) for image in loaded[2:]] == [RED, RED]


def test_no_unclosed_file_warnings(tmp_path):
    folder_of_single_and_multi_frame_images(tmp_path)
    (tmp_path / "4.png").write_bytes(b"garbage")  # the error path must close its file too
    with warnings.catch_warnings(record=True) as caught:
        # Files left open are closed when garbage-collected, with a ResourceWarning naming them.
        warnings.simplefilter("always", ResourceWarning)
        load_images([tmp_path / name for name in ("0.png", "1.jpg", "2.gif", "3.tif")])
        with pytest.raises(InputError):
            load_images(tmp_path)
        gc.collect()
    assert [str(warning.message) for warning in caught if warning.category is ResourceWarning] == []


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs Linux /proc to list open files")
def test_no_file_handles_stay_open(tmp_path):
    folder_of_single_and_multi_frame_images(tmp_path)
    fds_before = len(os.listdir("/proc/self/fd"))

    loaded = load_images(tmp_path)
    (tmp_path / "4.png").write_bytes(b"garbage")
    with pytest.raises(InputError):
        load_images(tmp_path)

    assert len(loaded) == 4
    assert _open_paths_under(tmp_path) == []
    assert len(os.listdir("/proc/self/fd")) <= fds_before


# --- errors ---------------------------------------------------------------------------------------


def test_missing_folder_is_named_with_what_to_do(tmp_path):
    missing = tmp_path / "no_such_folder"
    with pytest.raises(InputError) as caught:
        load_images(missing, name="instance_images")
    message = str(caught.value)
    assert "instance_images" in message and str(missing) in message and "does not exist" in message
    assert "pass a folder of images, image paths or PIL images" in message


def test_folder_without_images(tmp_path):
    (tmp_path / "readme.txt").write_text("no images here")
    with pytest.raises(InputError, match=r"class_images: folder .* has no images"):
        load_images(tmp_path, name="class_images")


def test_corrupt_file_in_folder_is_named(tmp_path):
    solid(RED).save(tmp_path / "good.png")
    (tmp_path / "broken.jpg").write_bytes(b"this is not a jpeg")
    with pytest.raises(InputError, match=r"broken\.jpg is not a readable image"):
        load_images(tmp_path)


def test_truncated_png_is_named(tmp_path):
    rng = np.random.default_rng(0)
    # Noise does not compress, so cutting the file in half really cuts into the pixel data.
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(tmp_path / "whole.png")
    data = (tmp_path / "whole.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match=r"cut\.png is not a readable image"):
        load_images([tmp_path / "whole.png", tmp_path / "cut.png"])


@pytest.mark.parametrize(
    ("images", "pattern"),
    [
        ([solid(RED), 42], r"images\[1\]: got a int"),
        ([b"bytes"], r"images\[0\]: got a bytes"),
        (42, r"images: got a int"),
        ({"a.png"}, r"images: got a set"),
        ([], r"images: the list is empty"),
        ((), r"images: the list is empty"),
    ],
)
def test_unsupported_inputs(images, pattern):
    with pytest.raises(InputError, match=pattern):
        load_images(images)


def test_list_item_that_is_missing_or_a_folder(tmp_path):
    with pytest.raises(InputError, match=r"images\[0\]: .*gone\.png does not exist"):
        load_images([tmp_path / "gone.png"])
    with pytest.raises(InputError, match=r"images\[0\]: .* is a folder"):
        load_images([tmp_path])


@pytest.mark.parametrize("resolution", [0, -8, 12, 513, 8.0, True, "512", None])
def test_bad_resolution(resolution):
    with pytest.raises(InputError, match="resolution must be a positive multiple of 8"):
        validate_resolution(resolution)
    with pytest.raises(InputError, match="resolution"):
        preprocess(solid(RED), resolution)


@pytest.mark.parametrize("resolution", [8, 512, np.int64(64)])
def test_good_resolution(resolution):
    assert validate_resolution(resolution) == int(resolution)
    assert type(validate_resolution(resolution)) is int


def test_image_batch_rejects_empty_and_non_images():
    with pytest.raises(InputError, match="empty"):
        image_batch([], 8)
    with pytest.raises(InputError, match="list of PIL images"):
        image_batch(solid(RED), 8)
    with pytest.raises(InputError, match="expected a PIL image"):
        image_batch([solid(RED), "red.png"], 8)


# --- preprocess -----------------------------------------------------------------------------------


def test_centre_crop_of_wide_image_without_resize_is_exact():
    # 48x16, three 16-px bands green | red | blue; the shorter side already equals 16, so only the
    # middle 16 columns (x = 16..31, the red band) are kept.
    tensor = preprocess(bands([GREEN, RED, BLUE], 16, 16), 16)
    assert tensor.shape == (3, 16, 16)
    assert torch.equal(tensor, as_rgb_tensor(RED).view(3, 1, 1).expand(3, 16, 16))


def test_centre_crop_of_tall_image_keeps_middle_rows():
    # 16x48: rotate the bands so they stack top to bottom; rows 16..31 (red) are kept.
    tall = bands([GREEN, RED, BLUE], 16, 16).transpose(Image.Transpose.ROTATE_90)
    assert tall.size == (16, 48)
    tensor = preprocess(tall, 16)
    assert torch.equal(tensor, as_rgb_tensor(RED).view(3, 1, 1).expand(3, 16, 16))


def test_resize_then_centre_crop_of_large_wide_image():
    # 192x64, bands of 64: green | red-left 32 + blue-right 32 | green. Shorter side 64 -> 16 is a
    # scale of 1/4, giving 48x16; the crop keeps resized columns 16..31 = source columns 64..127,
    # i.e. the middle band: red on the left half of the crop, blue on the right, no green.
    image = bands([GREEN, GREEN, RED, BLUE, GREEN, GREEN], 32, 64)
    tensor = preprocess(image, 16)
    assert tensor.shape == (3, 16, 16)
    # Crop column c is centred on source x = 4 * (16 + c) + 2 = 66 + 4c. Lanczos reaches 3 output
    # pixels = 12 source pixels either side, so a column is a pure colour when its centre is at
    # least 12 from the edges at x = 64, 96 and 128: c = 3..4 (red) and c = 11..12 (blue).
    assert torch.allclose(tensor[:, :, 3:5], as_rgb_tensor(RED).view(3, 1, 1).expand(3, 16, 2), atol=1e-6)
    assert torch.allclose(tensor[:, :, 11:13], as_rgb_tensor(BLUE).view(3, 1, 1).expand(3, 16, 2), atol=1e-6)
    # No column of the crop is dominantly green (green channel high, red and blue low).
    green_columns = (tensor[1] > 0.5) & (tensor[0] < 0) & (tensor[2] < 0)
    assert not green_columns.any()


def test_upscales_small_images():
    tensor = preprocess(solid(BLUE, (4, 2)), 8)
    assert tensor.shape == (3, 8, 8)
    assert torch.allclose(tensor, as_rgb_tensor(BLUE).view(3, 1, 1).expand(3, 8, 8), atol=1e-6)


def test_flip_mirrors_left_and_right():
    image = bands([RED, BLUE], 8, 16)  # left half red, right half blue
    plain, flipped = preprocess(image, 16), preprocess(image, 16, flip=True)
    assert torch.equal(plain[:, :, 0], as_rgb_tensor(RED).view(3, 1).expand(3, 16))
    assert torch.equal(flipped[:, :, 0], as_rgb_tensor(BLUE).view(3, 1).expand(3, 16))
    assert torch.equal(flipped, plain.flip(-1))


def test_values_are_float32_in_minus_one_to_one():
    rng = np.random.default_rng(1)
    noise = Image.fromarray(rng.integers(0, 256, (24, 24, 3), dtype=np.uint8))
    tensor = preprocess(noise, 24)
    assert tensor.dtype == torch.float32
    assert tensor.min() >= -1.0 and tensor.max() <= 1.0
    grey = preprocess(solid((0, 51, 255)), 8)
    # 0 / 127.5 - 1 = -1; 51 / 127.5 - 1 = 0.4 - 1 = -0.6; 255 / 127.5 - 1 = 1.
    assert grey[:, 0, 0].tolist() == pytest.approx([-1.0, -0.6, 1.0])


def test_preprocess_converts_non_rgb_modes():
    tensor = preprocess(Image.new("RGBA", (8, 8), (0, 0, 0, 0)), 8)  # transparent -> white -> 1
    assert torch.equal(tensor, torch.ones(3, 8, 8))


def test_image_batch_stacks_in_order():
    batch = image_batch([solid(RED), solid(BLUE, (16, 8))], 8, flip=True)
    assert batch.shape == (2, 3, 8, 8) and batch.dtype == torch.float32
    assert torch.equal(batch[0], as_rgb_tensor(RED).view(3, 1, 1).expand(3, 8, 8))
    assert torch.allclose(batch[1], as_rgb_tensor(BLUE).view(3, 1, 1).expand(3, 8, 8), atol=1e-6)
