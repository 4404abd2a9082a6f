"""A procedural toy image world in which DreamBooth personalization and prior preservation can be measured.

Every image shows one object (a class noun in a colour, with a surface pattern and an optional mark)
in one scene, drawn from a seed. The attributes are few and each is readable back from a 32 px
image, so a trained base model can be scored by a probe that reads attributes off its samples. The
sampling distribution is explicit (`value_probabilities`), so how rare a subject is under the class
prior ("a box") is exact arithmetic, not an estimate.

Layout (where the object sits and how big it is) and scene texture (stars, grass blades, planks)
come from the seed alone, never from the attributes: two renders that differ in one attribute differ
only in what that attribute draws.
"""

from __future__ import annotations

import hashlib
import math
import random
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image, ImageChops, ImageDraw, ImageFilter, ImageFont

from ..errors import InputError

RGB = tuple[int, int, int]

CLASSES = ("box", "ball", "cup", "tent")
COLORS: dict[str, RGB] = {
    "red": (220, 35, 35),
    "orange": (248, 140, 20),
    "yellow": (250, 225, 40),
    "green": (40, 170, 60),
    "blue": (35, 80, 225),
    "purple": (135, 45, 190),
    "pink": (250, 145, 205),
    "white": (245, 245, 245),
}
PATTERNS = ("plain", "striped", "dotted", "checkered")
MARKS = ("none", "star", "ring", "cross")
SCENE_PHRASES: dict[str, str] = {
    "snow": "in the snow",
    "grass": "on the grass",
    "rug": "on a red rug",
    "beach": "on the beach",
    "forest": "in the forest",
    "night": "at night",
    "floor": "on a wooden floor",
}

ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "cls": CLASSES,
    "color": tuple(COLORS),
    "pattern": PATTERNS,
    "second_color": ("none", *COLORS),
    "mark": MARKS,
    "scene": tuple(SCENE_PHRASES),
}
# The order attributes are drawn in: later draws may depend on earlier ones (second_color on color and pattern).
DRAW_ORDER = tuple(ATTRIBUTES)
IDENTITY_ATTRIBUTES = ("cls", "color", "pattern", "second_color", "mark")

# "none" is the common case, so a subject with a mark or a named second colour is rare under the class prior.
NONE_PROBABILITY = 0.7
# random_caption drops each optional phrase with this probability: "a box" alone comes out often enough
# (about 1 caption in 16) for the base model to learn that it means any box.
DROP_PROBABILITY = 0.5
PATTERN_NOUNS = {"striped": "stripes", "dotted": "dots", "checkered": "checks"}

SUPERSAMPLE = 4
MIN_SIZE = 8
OUTLINE = (30, 30, 30)
MARK_INK = (20, 20, 20)
BADGE = (250, 250, 250)
# A pattern with second_color "none" uses a darker shade of the body colour: never one of COLORS, so
# "none" and every named second colour render differently and a probe can tell them apart.
DEFAULT_SHADE = 0.45


def _stream(name: str, seed: int) -> random.Random:
    # Separate streams per purpose, so fixing one attribute leaves the layout and the scene texture unchanged.
    return random.Random(f"{name}:{seed}")


def check_attributes(attributes: Mapping[str, str]) -> None:
    """Raise `InputError` (a `ValueError`) for an unknown attribute name, value or impossible combination.

    Args:
        attributes: Some or all of the names in `ATTRIBUTES`, each with one of its allowed values.

    Example:
        >>> check_attributes({"cls": "box", "color": "red"})
        >>> check_attributes({"colour": "red"})
        Traceback (most recent call last):
        ...
        db_adapters.errors.InputError: unknown attribute 'colour'; the attributes are: cls, color, pattern, \
second_color, mark, scene
    """
    unknown = [name for name in attributes if name not in ATTRIBUTES]
    if unknown:
        names = ", ".join(repr(name) for name in unknown)
        raise InputError(f"unknown attribute {names}; the attributes are: {', '.join(ATTRIBUTES)}")
    for name, value in attributes.items():
        if value not in ATTRIBUTES[name]:
            raise InputError(f"unknown {name} {value!r}; allowed values: {', '.join(ATTRIBUTES[name])}")
    second = attributes.get("second_color", "none")
    if second != "none" and attributes.get("pattern") == "plain":
        raise InputError(f"second_color {second!r} needs a pattern to colour, but pattern is 'plain'")
    if second != "none" and second == attributes.get("color"):
        raise InputError(f"second_color {second!r} must differ from color, or the pattern would not show")


def _uniform(values: tuple[str, ...]) -> dict[str, float]:
    return {value: 1 / len(values) for value in values}


def _none_or_other(others: tuple[str, ...]) -> dict[str, float]:
    return {"none": NONE_PROBABILITY} | {value: (1 - NONE_PROBABILITY) / len(others) for value in others}


def value_probabilities(name: str, chosen: Mapping[str, str]) -> dict[str, float]:
    """The distribution `sample_attributes` draws attribute `name` from, given the attributes already chosen.

    Args:
        name: One of `ATTRIBUTES`.
        chosen: The attributes fixed by the caller or drawn before `name` (in `DRAW_ORDER`).

    Example:
        >>> value_probabilities("second_color", {"color": "red", "pattern": "striped"})["none"]
        0.7
        >>> value_probabilities("second_color", {"pattern": "plain"})
        {'none': 1.0}
    """
    second = chosen.get("second_color", "none")
    if name == "color" and second != "none":
        return _uniform(tuple(c for c in COLORS if c != second))
    if name == "pattern" and second != "none":
        return _uniform(tuple(p for p in PATTERNS if p != "plain"))
    if name == "second_color":
        if chosen.get("pattern") == "plain":
            return {"none": 1.0}
        return _none_or_other(tuple(c for c in COLORS if c != chosen.get("color")))
    if name == "mark":
        return _none_or_other(MARKS[1:])
    return _uniform(ATTRIBUTES[name])


def _pick(distribution: dict[str, float], u: float) -> str:
    total = 0.0
    for value, probability in distribution.items():
        total += probability
        if u < total:
            return value
    return value  # u within rounding of 1.0


def sample_attributes(rng_or_seed: int | random.Random = 0, **fixed: str) -> dict[str, str]:
    """Draw a full attribute dict, as `render` does for the attributes it is not given.

    Args:
        rng_or_seed: A seed (the same one `render` takes) or a `random.Random` to draw from.
        **fixed: Attributes to keep as given; the others are drawn conditioned on them.

    Example:
        >>> attributes = sample_attributes(3, cls="box")
        >>> attributes["cls"], sorted(attributes) == sorted(ATTRIBUTES)
        ('box', True)
    """
    check_attributes(fixed)
    rng = rng_or_seed if isinstance(rng_or_seed, random.Random) else _stream("attributes", rng_or_seed)
    chosen = dict(fixed)
    for name in DRAW_ORDER:
        # Always consume one draw per attribute, so fixing one attribute does not shift the others' draws.
        u = rng.random()
        if name not in chosen:
            chosen[name] = _pick(value_probabilities(name, chosen), u)
    return {name: chosen[name] for name in DRAW_ORDER}


@dataclass(frozen=True)
class Layout:
    """Where the object sits, in output pixels: its bounding square's centre and side."""

    centre_x: float
    centre_y: float
    width: float

    @property
    def bounds(self) -> tuple[float, float, float, float]:
        """(left, top, right, bottom) of the object's bounding square."""
        half = self.width / 2
        return (self.centre_x - half, self.centre_y - half, self.centre_x + half, self.centre_y + half)

    def scaled(self, factor: float) -> Layout:
        """The same layout on an image `factor` times larger."""
        return Layout(self.centre_x * factor, self.centre_y * factor, self.width * factor)


def layout(seed: int = 0, size: int = 32) -> Layout:
    """The object's place and size for `seed`: 40-70% of the image width, centre jittered by +-15%.

    Every class's shape is solid at the layout centre, so the pixel there shows the body colour
    (unless a pattern or mark covers it).

    Args:
        seed: The seed given to `render`.
        size: The image side in pixels.

    Example:
        >>> box = layout(0, 32)
        >>> 0.4 * 32 <= box.width <= 0.7 * 32
        True
    """
    rng = _stream("layout", seed)
    width = rng.uniform(0.4, 0.7)
    centre_x = 0.5 + rng.uniform(-0.15, 0.15)
    centre_y = 0.55 + rng.uniform(-0.15, 0.15)
    # Keep the whole object in frame: the largest object at the largest jitter would touch the edge.
    half = width / 2
    centre_x = min(max(centre_x, half), 1 - half)
    centre_y = min(max(centre_y, half), 1 - half)
    return Layout(centre_x * size, centre_y * size, width * size)


# ---------------------------------------------------------------------------------------------------- scenes


def _fill_band(draw: ImageDraw.ImageDraw, top: float, bottom: float, side: int, color: RGB) -> None:
    draw.rectangle((0, top, side, bottom), fill=color)


def _speckle(draw: ImageDraw.ImageDraw, rng: random.Random, region: tuple[float, float, float, float], **kw: Any):
    count, radius, color = kw["count"], kw["radius"], kw["color"]
    left, top, right, bottom = region
    for _ in range(count):
        x, y = rng.uniform(left, right), rng.uniform(top, bottom)
        draw.ellipse((x - radius, y - radius, x + radius, y + radius), fill=color)


def _scene_snow(draw: ImageDraw.ImageDraw, rng: random.Random, side: int) -> None:
    horizon = 0.5 * side
    _fill_band(draw, 0, horizon, side, (185, 205, 230))
    _fill_band(draw, horizon, side, side, (248, 250, 253))
    for _ in range(3):  # soft blue-grey drifts, so the ground reads as snow, not a white wall
        y = rng.uniform(horizon + 0.08 * side, side)
        draw.line((0, y, side, y + rng.uniform(-0.05, 0.05) * side), fill=(215, 225, 240), width=side // 40)
    _speckle(draw, rng, (0, 0, side, horizon), count=14, radius=side / 64, color=(255, 255, 255))


def _scene_grass(draw: ImageDraw.ImageDraw, rng: random.Random, side: int) -> None:
    horizon = 0.5 * side
    _fill_band(draw, 0, horizon, side, (110, 175, 240))
    _fill_band(draw, horizon, side, side, (75, 165, 55))
    for _ in range(40):
        x, y = rng.uniform(0, side), rng.uniform(horizon, side)
        draw.line((x, y, x + rng.uniform(-2, 2), y - side / 20), fill=(45, 120, 35), width=max(1, side // 64))


def _scene_rug(draw: ImageDraw.ImageDraw, rng: random.Random, side: int) -> None:
    horizon = 0.4 * side
    _fill_band(draw, 0, horizon, side, (236, 222, 190))
    _fill_band(draw, horizon, side, side, (180, 30, 40))
    border = side / 24
    for top in (horizon + 2 * border, side - 3 * border):  # gold border bands, as woven rugs have
        _fill_band(draw, top, top + border, side, (230, 180, 60))


def _scene_beach(draw: ImageDraw.ImageDraw, rng: random.Random, side: int) -> None:
    horizon = 0.55 * side
    _fill_band(draw, 0, 0.4 * side, side, (140, 205, 250))
    _fill_band(draw, 0.4 * side, horizon, side, (25, 105, 185))
    _fill_band(draw, horizon, side, side, (235, 208, 150))
    draw.line((0, horizon, side, horizon), fill=(250, 250, 250), width=side // 32)  # surf line


def _scene_forest(draw: ImageDraw.ImageDraw, rng: random.Random, side: int) -> None:
    horizon = 0.6 * side
    _fill_band(draw, 0, horizon, side, (120, 165, 110))
    for index in range(7):
        # Evenly spread trees, jittered: random overlaps would swing the scene's mean colour from seed to seed.
        x = ((index + 0.5) / 7 + rng.uniform(-0.04, 0.04)) * side
        half = rng.uniform(0.11, 0.14) * side
        top = rng.uniform(0.0, 0.1) * side
        draw.rectangle((x - side / 40, horizon - 0.2 * side, x + side / 40, horizon), fill=(80, 55, 30))
        draw.polygon(
            ((x, top), (x - half, horizon - 0.12 * side), (x + half, horizon - 0.12 * side)), fill=(20, 75, 35)
        )
    _fill_band(draw, horizon, side, side, (85, 70, 40))
    _speckle(draw, rng, (0, horizon, side, side), count=20, radius=side / 80, color=(120, 95, 45))


def _scene_night(draw: ImageDraw.ImageDraw, rng: random.Random, side: int) -> None:
    horizon = 0.55 * side
    _fill_band(draw, 0, horizon, side, (12, 16, 50))
    _fill_band(draw, horizon, side, side, (35, 40, 70))
    _speckle(draw, rng, (0, 0, side, horizon - side / 20), count=12, radius=side / 64, color=(255, 250, 210))


def _scene_floor(draw: ImageDraw.ImageDraw, rng: random.Random, side: int) -> None:
    horizon = 0.4 * side
    _fill_band(draw, 0, horizon, side, (150, 170, 200))
    _fill_band(draw, horizon, side, side, (155, 100, 52))
    plank = side / 10
    y = horizon + plank
    while y < side:
        draw.line((0, y, side, y), fill=(100, 62, 28), width=max(1, side // 64))
        x = rng.uniform(0, side)  # a staggered butt joint per plank row
        draw.line((x, y - plank, x, y), fill=(100, 62, 28), width=max(1, side // 64))
        y += plank


_SCENE_PAINTERS = {
    "snow": _scene_snow,
    "grass": _scene_grass,
    "rug": _scene_rug,
    "beach": _scene_beach,
    "forest": _scene_forest,
    "night": _scene_night,
    "floor": _scene_floor,
}


def _paint_scene(scene: str, seed: int, side: int) -> Image.Image:
    image = Image.new("RGB", (side, side))
    _SCENE_PAINTERS[scene](ImageDraw.Draw(image), _stream("scene", seed), side)
    return image


def render_background(scene: str, seed: int = 0, size: int = 32) -> Image.Image:
    """The scene alone, without an object: what `render` draws the object onto.

    Args:
        scene: One of `ATTRIBUTES["scene"]`.
        seed: The seed that places the scene's texture (stars, grass blades, plank joints).
        size: The image side in pixels.

    Example:
        >>> render_background("night", size=32).size
        (32, 32)
    """
    check_attributes({"scene": scene})
    _check_size(size)
    return _downsample(_paint_scene(scene, seed, size * SUPERSAMPLE), size)


# ---------------------------------------------------------------------------------------------------- objects


def _shape_mask(cls: str, box: Layout, side: int) -> Image.Image:
    mask = Image.new("L", (side, side), 0)
    draw = ImageDraw.Draw(mask)
    left, top, right, bottom = box.bounds
    w = box.width
    if cls == "ball":
        draw.ellipse((left, top, right, bottom), fill=255)
    elif cls == "box":
        draw.rectangle((left, top, right, top + 0.24 * w), fill=255)  # the lid overhangs the body
        draw.rectangle((left + 0.07 * w, top + 0.24 * w, right - 0.07 * w, bottom), fill=255)
    elif cls == "tent":
        draw.polygon(((box.centre_x, top), (left, bottom), (right, bottom)), fill=255)
    elif cls == "cup":
        draw.polygon(
            (
                (left, top + 0.1 * w),
                (left + 0.76 * w, top + 0.1 * w),
                (left + 0.64 * w, bottom),
                (left + 0.12 * w, bottom),
            ),
            fill=255,
        )
        ring = (left + 0.5 * w, top + 0.28 * w, right, top + 0.74 * w)
        draw.ellipse(ring, outline=255, width=max(1, round(0.11 * w)))
    return mask


def _pattern_color(color: str, second_color: str) -> RGB:
    if second_color != "none":
        return COLORS[second_color]
    return tuple(round(channel * DEFAULT_SHADE) for channel in COLORS[color])


def _paint_pattern(image: Image.Image, pattern: str, ink: RGB, box: Layout) -> None:
    draw = ImageDraw.Draw(image)
    left, top, right, bottom = box.bounds
    w = box.width
    if pattern == "striped":
        period = w / 3.5  # three-and-a-half bands: each stays >= 2 px at the smallest object at 32 px
        y = top + period / 2
        while y < bottom:
            draw.rectangle((left, y, right, y + period / 2), fill=ink)
            y += period
    elif pattern == "dotted":
        period = w / 3.2
        radius = period * 0.28
        for row in range(5):
            for col in range(5):
                x = left + (col - 0.25 + 0.5 * (row % 2)) * period
                y = top + (row + 0.35) * period
                draw.ellipse((x - radius, y - radius, x + radius, y + radius), fill=ink)
    elif pattern == "checkered":
        cell = w / 4
        for row in range(4):
            for col in range(4):
                if (row + col) % 2:
                    x, y = left + col * cell, top + row * cell
                    draw.rectangle((x, y, x + cell, y + cell), fill=ink)


def _mark_anchor(cls: str, box: Layout) -> tuple[float, float]:
    # The widest solid part of each shape, so the badge stays inside the outline.
    left, top, _, _ = box.bounds
    w = box.width
    anchors = {
        "ball": (box.centre_x, box.centre_y),
        "box": (box.centre_x, top + 0.6 * w),
        "tent": (box.centre_x, top + 0.7 * w),
        "cup": (left + 0.39 * w, top + 0.5 * w),
    }
    return anchors[cls]


def _star_points(x: float, y: float, outer: float, inner: float) -> list[tuple[float, float]]:
    points = []
    for k in range(10):
        radius = outer if k % 2 == 0 else inner
        angle = -math.pi / 2 + k * math.pi / 5
        points.append((x + radius * math.cos(angle), y + radius * math.sin(angle)))
    return points


def _paint_mark(image: Image.Image, mark: str, centre: tuple[float, float], radius: float) -> None:
    draw = ImageDraw.Draw(image)
    x, y = centre
    rim = max(1, round(radius * 0.12))
    # A white badge behind the symbol keeps it readable over any body colour and pattern.
    draw.ellipse((x - radius, y - radius, x + radius, y + radius), fill=BADGE, outline=OUTLINE, width=rim)
    inner = radius - rim
    if mark == "star":
        draw.polygon(_star_points(x, y + 0.06 * inner, 0.98 * inner, 0.42 * inner), fill=MARK_INK)
    elif mark == "ring":
        # A thick ring with a wide hole: at 32 px it must read as hollow, unlike the solid-centred star and cross.
        r = 0.92 * inner
        draw.ellipse((x - r, y - r, x + r, y + r), outline=MARK_INK, width=max(1, round(0.45 * inner)))
    elif mark == "cross":
        arm, half = 0.85 * inner, 0.22 * inner
        draw.rectangle((x - arm, y - half, x + arm, y + half), fill=MARK_INK)
        draw.rectangle((x - half, y - arm, x + half, y + arm), fill=MARK_INK)


def _paint_object(canvas: Image.Image, attributes: Mapping[str, str], box: Layout) -> None:
    side = canvas.width
    mask = _shape_mask(attributes["cls"], box, side)
    body = Image.new("RGB", (side, side), COLORS[attributes["color"]])
    _paint_pattern(body, attributes["pattern"], _pattern_color(attributes["color"], attributes["second_color"]), box)
    if attributes["cls"] == "cup":  # the dark opening is what tells a cup from a bucket-shaped block
        left, top, _, _ = box.bounds
        w = box.width
        ImageDraw.Draw(body).ellipse((left + 0.04 * w, top + 0.04 * w, left + 0.72 * w, top + 0.16 * w), fill=OUTLINE)
    thickness = 2 * (SUPERSAMPLE // 2) + 1
    outline = ImageChops.subtract(mask.filter(ImageFilter.MaxFilter(thickness)), mask)
    canvas.paste(OUTLINE, mask=outline)
    canvas.paste(body, mask=mask)
    if attributes["mark"] != "none":
        _paint_mark(canvas, attributes["mark"], _mark_anchor(attributes["cls"], box), 0.25 * box.width)


def _check_size(size: int) -> None:
    if not isinstance(size, int) or size < MIN_SIZE:
        raise InputError(f"size must be an integer of at least {MIN_SIZE} pixels, got {size!r}")


def _downsample(image: Image.Image, size: int) -> Image.Image:
    return image.resize((size, size), Image.Resampling.LANCZOS)


def render(seed: int = 0, size: int = 32, **attributes: str) -> Image.Image:
    """Render one toy image: the attributes given, the rest drawn from `seed` by `sample_attributes`.

    Drawn at 4x and downsampled with LANCZOS, so edges are antialiased at every size.

    Args:
        seed: Fixes the attributes not given, the layout and the scene texture.
        size: The image side in pixels (at least 8); 32 keeps every attribute readable.
        **attributes: Any of `ATTRIBUTES` (cls, color, pattern, second_color, mark, scene).

    Example:
        >>> image = render(seed=1, cls="box", color="red", scene="snow")
        >>> image.mode, image.size
        ('RGB', (32, 32))
    """
    _check_size(size)
    chosen = sample_attributes(seed, **attributes)
    side = size * SUPERSAMPLE
    canvas = _paint_scene(chosen["scene"], seed, side)
    _paint_object(canvas, chosen, layout(seed, size).scaled(SUPERSAMPLE))
    return _downsample(canvas, size)


# ---------------------------------------------------------------------------------------------------- captions


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def caption(**attributes: str) -> str:
    """The prompt for an image with these attributes; attributes left out are left out of the text.

    Order is fixed: "a {color} {pattern} {cls} with {second_color} {pattern noun} and a {mark} {scene}".
    "plain" and "none" say nothing, so "a red box" also describes a plain unmarked red box.

    Args:
        **attributes: `cls` (required) and any other of `ATTRIBUTES`. A named `second_color` needs a
            non-plain `pattern`, since it is said as the pattern's colour ("with blue stripes").

    Example:
        >>> caption(cls="box", color="red", pattern="striped", scene="snow")
        'a red striped box in the snow'
        >>> caption(cls="ball", color="orange", pattern="dotted", second_color="blue", mark="star")
        'an orange ball with blue dots and a star'
    """
    check_attributes(attributes)
    if "cls" not in attributes:
        raise InputError("a caption needs cls, the class noun")
    pattern, second = attributes.get("pattern", "plain"), attributes.get("second_color", "none")
    if second != "none" and "pattern" not in attributes:
        raise InputError(f"second_color {second!r} is said as the pattern's colour, so the caption needs pattern")
    words = [attributes.get("color", "")]
    if pattern != "plain" and second == "none":
        words.append(pattern)
    words.append(attributes["cls"])
    extras = []
    if second != "none":
        extras.append(f"{second} {PATTERN_NOUNS[pattern]}")
    if attributes.get("mark", "none") != "none":
        extras.append(f"a {attributes['mark']}")
    if extras:
        words.append("with " + " and ".join(extras))
    if "scene" in attributes:
        words.append(SCENE_PHRASES[attributes["scene"]])
    text = " ".join(word for word in words if word)
    return f"{_article(text)} {text}"


def random_caption(
    attributes: Mapping[str, str],
    rng: int | random.Random,
    omission: float = DROP_PROBABILITY,
    keep: tuple[str, ...] = (),
) -> str:
    """A training caption for `attributes` with random omissions; the class noun is never dropped.

    color, pattern, second_color, mark and scene are each dropped with probability `omission`
    (dropping the pattern drops its colour too), so "a box" alone appears in training and, over
    many images, stands for every box: the class prior that prior preservation protects.

    Args:
        attributes: The image's attributes, e.g. from `sample_attributes`; must include cls.
        rng: A `random.Random`, or a seed for one.
        omission: The probability of leaving out each optional phrase.
        keep: Phrases never left out (the draws for them are still made, so the rng advances alike).

    Example:
        >>> attributes = sample_attributes(0)
        >>> random_caption(attributes, 1).split()[1:].count(attributes["cls"])
        1
        >>> random_caption({**attributes, "mark": "star"}, 1, omission=1.0, keep=("mark",))
        'a box with a star'
    """
    rng = rng if isinstance(rng, random.Random) else random.Random(rng)
    kept = dict(attributes)
    for name in ("color", "pattern", "second_color", "mark", "scene"):
        # One draw per name whether present or not, so a caption's omissions depend only on the rng.
        if rng.random() < omission and name not in keep:
            kept.pop(name, None)
    if "pattern" not in kept:
        kept.pop("second_color", None)
    return caption(**kept)


# ---------------------------------------------------------------------------------------------------- subjects


def _name_seed(name: str, index: int) -> int:
    # Stable across processes and Python versions, unlike hash(str).
    return int.from_bytes(hashlib.sha256(f"{name}:{index}".encode()).digest()[:4], "big")


@dataclass(frozen=True)
class Subject:
    """A toy personalization subject, as one of DreamBench's 30: an identity and a few casual photos of it.

    Attributes:
        name: A short id, also the seed of its reference photos.
        attributes: The identity: a value for each of `IDENTITY_ATTRIBUTES`.
        difficulty: "easy" (coarse pattern in the default shade, a mark) or "hard" (fine two-colour pattern,
            a mark), fixed before any benchmark is run.
        reference_scenes: The one or two scenes of the reference photos, so backgrounds copied from the
            references show up as overfitting.
    """

    name: str
    attributes: dict[str, str] = field(hash=False)
    difficulty: str
    reference_scenes: tuple[str, ...]

    def __post_init__(self) -> None:
        if set(self.attributes) != set(IDENTITY_ATTRIBUTES):
            raise InputError(f"subject {self.name!r} needs exactly the attributes {', '.join(IDENTITY_ATTRIBUTES)}")
        check_attributes(self.attributes)
        if self.difficulty not in ("easy", "hard"):
            raise InputError(f"subject {self.name!r}: difficulty must be 'easy' or 'hard'")
        if not 1 <= len(self.reference_scenes) <= 2:
            raise InputError(f"subject {self.name!r}: give one or two reference scenes")
        for scene in self.reference_scenes:
            check_attributes({"scene": scene})

    def reference_seeds(self, count: int = 5) -> list[int]:
        """The render seeds of the reference photos: fixed by the subject's name."""
        return [_name_seed(self.name, index) for index in range(count)]

    def reference_attributes(self, count: int = 5) -> list[dict[str, str]]:
        """The full attribute dict of each reference photo: the identity, in the reference scenes in turn."""
        scenes = self.reference_scenes
        return [dict(self.attributes, scene=scenes[index % len(scenes)]) for index in range(count)]

    def reference_images(self, count: int = 5, size: int = 32) -> list[Image.Image]:
        """The subject's "casually captured" photos: same identity, varied place and size, only reference scenes.

        Args:
            count: How many photos (DreamBooth uses 3-5).
            size: The image side in pixels.

        Example:
            >>> images = SUBJECTS["star_box"].reference_images(4)
            >>> len(images), images[0].size
            (4, (32, 32))
        """
        pairs = zip(self.reference_seeds(count), self.reference_attributes(count), strict=True)
        return [render(seed, size, **attributes) for seed, attributes in pairs]


def _subject(name: str, difficulty: str, scenes: tuple[str, ...], **identity: str) -> tuple[str, Subject]:
    return name, Subject(name, identity, difficulty, scenes)


SUBJECTS: dict[str, Subject] = dict(
    [
        _subject(
            "star_box", "easy", ("floor",), cls="box", color="red", pattern="plain", second_color="none", mark="star"
        ),
        _subject(
            "ring_ball",
            "easy",
            ("grass",),
            cls="ball",
            color="blue",
            pattern="striped",
            second_color="none",
            mark="ring",
        ),
        _subject(
            "cross_tent",
            "easy",
            ("snow",),
            cls="tent",
            color="orange",
            pattern="striped",
            second_color="none",
            mark="cross",
        ),
        _subject(
            "ring_cup", "easy", ("rug",), cls="cup", color="white", pattern="plain", second_color="none", mark="ring"
        ),
        _subject(
            "checked_box",
            "hard",
            ("rug", "floor"),
            cls="box",
            color="green",
            pattern="checkered",
            second_color="purple",
            mark="cross",
        ),
        _subject(
            "dotted_ball",
            "hard",
            ("snow",),
            cls="ball",
            color="pink",
            pattern="dotted",
            second_color="blue",
            mark="star",
        ),
        _subject(
            "dotted_cup",
            "hard",
            ("floor", "grass"),
            cls="cup",
            color="purple",
            pattern="dotted",
            second_color="yellow",
            mark="star",
        ),
        _subject(
            "checked_tent",
            "hard",
            ("forest",),
            cls="tent",
            color="yellow",
            pattern="checkered",
            second_color="blue",
            mark="ring",
        ),
    ]
)


def prior_match_probability(subject: Subject) -> float:
    """The exact probability that an unconditioned "a {cls}" draw has all of the subject's identity attributes.

    The chain rule over `sample_attributes`' draws with only cls fixed: how often the class prior
    would produce this very subject by chance (DreamBooth needs it rare).

    Args:
        subject: A `Subject`, e.g. from `SUBJECTS`.

    Example:
        >>> round(prior_match_probability(SUBJECTS["star_box"]), 6)  # 1/8 colour x 1/4 pattern x 0.1 star
        0.003125
    """
    chosen = {"cls": subject.attributes["cls"]}
    probability = 1.0
    for name in DRAW_ORDER:
        if name in subject.attributes and name not in chosen:
            value = subject.attributes[name]
            probability *= value_probabilities(name, chosen).get(value, 0.0)
            chosen[name] = value
    return probability


def subject_caption(subject: Subject, identifier: str | None = None, scene: str | None = None) -> str:
    """DreamBooth's prompt for a subject: "a {identifier} {cls}", or the class prompt "a {cls}" without one.

    Args:
        subject: The subject.
        identifier: The rare token bound to the subject, or None for the class prompt.
        scene: A scene to add its phrase, e.g. "snow" -> "... in the snow".

    Example:
        >>> subject_caption(SUBJECTS["star_box"], "sks", "snow")
        'a sks box in the snow'
    """
    if scene is not None:
        check_attributes({"scene": scene})
    words = ["a", identifier, subject.attributes["cls"], SCENE_PHRASES[scene] if scene else None]
    return " ".join(word for word in words if word)


# ---------------------------------------------------------------------------------------------------- contact sheet


def _sheet_rows() -> list[tuple[str, list[Image.Image]]]:
    scenes = ATTRIBUTES["scene"]
    plain = {"pattern": "plain", "mark": "none"}
    rows = []
    for cls in CLASSES:
        tiles = [render(i, cls=cls, color=c, scene=scenes[i % len(scenes)], **plain) for i, c in enumerate(COLORS)]
        rows.append((cls, tiles))
    for pattern in PATTERNS[1:]:
        # First half in the default shade, second half with a named second colour.
        seconds = ["none"] * 4 + ["blue", "yellow", "white", "red"]
        tiles = [
            render(i, cls=CLASSES[i % 4], color=c, pattern=pattern, second_color=s if s != c else "green", mark="none")
            for i, (c, s) in enumerate(zip(COLORS, seconds, strict=True))
        ]
        rows.append((pattern, tiles))
    marks = [render(i, cls=CLASSES[i % 4], color=c, mark=MARKS[1 + i % 3]) for i, c in enumerate(COLORS)]
    rows.append(("marks", marks))
    for scene in scenes:
        rows.append((scene, [render(i, scene=scene) for i in range(8)]))
    for name, subject in SUBJECTS.items():
        rows.append((name, subject.reference_images(5)))
    return rows


def contact_sheet(path: str | Path, size: int = 32, scale: int = 4) -> Path:
    """Write a labelled PNG grid for a human to check the world: classes x colours, patterns, marks, scenes, subjects.

    Args:
        path: Where to write the PNG.
        size: The render size of each tile.
        scale: Nearest-neighbour magnification, so 32 px tiles are inspectable pixel by pixel.

    Example:
        >>> import tempfile, os
        >>> contact_sheet(os.path.join(tempfile.mkdtemp(), "sheet.png"), size=16, scale=1).suffix
        '.png'
    """
    rows = _sheet_rows()
    tile = size * scale
    label_width = 110
    columns = max(len(tiles) for _, tiles in rows)
    sheet = Image.new("RGB", (label_width + columns * (tile + 2), len(rows) * (tile + 2)), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default()
    for row, (label, tiles) in enumerate(rows):
        y = row * (tile + 2)
        draw.text((4, y + tile // 2 - 6), label, fill=(0, 0, 0), font=font)
        for column, image in enumerate(tiles):
            sheet.paste(image.resize((tile, tile), Image.Resampling.NEAREST), (label_width + column * (tile + 2), y))
    path = Path(path)
    sheet.save(path)
    return path
