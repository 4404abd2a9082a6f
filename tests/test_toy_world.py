"""The toy image world: deterministic renders, readable attributes, distinct scenes, captions and rare subjects."""

from __future__ import annotations

import itertools
import random
import re

import numpy as np
import pytest
from PIL import Image

from db_adapters.toy import (
    ATTRIBUTES,
    IDENTITY_ATTRIBUTES,
    SUBJECTS,
    caption,
    contact_sheet,
    layout,
    prior_match_probability,
    random_caption,
    render,
    render_background,
    sample_attributes,
    subject_caption,
)
from db_adapters.toy.world import COLORS, SCENE_PHRASES

# Every attribute fixed, with a pattern (so second_color shows) and a mark (so mark shows).
BASE = {"cls": "box", "color": "red", "pattern": "striped", "second_color": "none", "mark": "star", "scene": "grass"}
# The seeds with the smallest objects: the hardest case for an attribute to show at 32 px.
SMALL_SEEDS = sorted(range(200), key=lambda seed: layout(seed, 32).width)[:3]
# A change is "visible" if it moves the image at least as much as 4 pixels going from black to white:
# 4 px * 3 channels * 255 / (32 * 32 * 3 values) ~= 1.0 mean absolute difference. The smallest real
# change (star vs cross on the smallest object) measures ~1.4.
VISIBLE_MEAN_ABS_DIFF = 1.0
# Scene means are 60+ RGB units apart; texture placement moves a scene's mean by < 10 units between seeds.
SCENE_MEAN_DISTANCE = 40.0


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.float64)


def mean_abs_diff(a: Image.Image, b: Image.Image) -> float:
    return float(np.abs(pixels(a) - pixels(b)).mean())


def with_value(name: str, value: str) -> dict[str, str]:
    attributes = dict(BASE, **{name: value})
    if name == "pattern" and value == "plain":
        attributes["second_color"] = "none"  # a plain object has no pattern to colour
    return attributes


# ---------------------------------------------------------------------------------------------------- rendering


@pytest.mark.parametrize("seed", [0, 1, 12345])
def test_render_is_deterministic(seed):
    assert np.array_equal(pixels(render(seed, **BASE)), pixels(render(seed, **BASE)))
    assert np.array_equal(pixels(render(seed)), pixels(render(seed)))


def test_different_seeds_give_different_images():
    images = [pixels(render(seed, **BASE)) for seed in range(8)]
    for a, b in itertools.combinations(images, 2):
        assert not np.array_equal(a, b)


def test_layout_stays_in_the_stated_ranges():
    for seed in range(300):
        box = layout(seed, 100)
        assert 40 <= box.width <= 70
        assert 35 - 1e-9 <= box.centre_x <= 65 + 1e-9
        left, top, right, bottom = box.bounds
        assert left >= 0 and top >= 0 and right <= 100 and bottom <= 100


@pytest.mark.parametrize(("name", "value"), [(n, v) for n, values in ATTRIBUTES.items() for v in values])
@pytest.mark.parametrize("size", [32, 64])
def test_every_value_renders_rgb_at_size(name, value, size):
    image = render(3, size, **{name: value})
    assert image.mode == "RGB"
    assert image.size == (size, size)
    assert sample_attributes(3, **{name: value})[name] == value


@pytest.mark.parametrize("name", list(ATTRIBUTES))
def test_each_attribute_visibly_changes_the_image(name):
    values = [v for v in ATTRIBUTES[name] if not (name == "second_color" and v == BASE["color"])]
    for seed in SMALL_SEEDS:
        images = {value: render(seed, **with_value(name, value)) for value in values}
        for a, b in itertools.combinations(values, 2):
            diff = mean_abs_diff(images[a], images[b])
            assert diff > VISIBLE_MEAN_ABS_DIFF, f"{name} {a} vs {b} at seed {seed}: {diff:.2f}"


@pytest.mark.parametrize("cls", ATTRIBUTES["cls"])
@pytest.mark.parametrize("color", list(COLORS))
def test_object_centre_shows_its_named_colour(cls, color):
    for seed in range(6):
        image = pixels(render(seed, cls=cls, color=color, pattern="plain", mark="none"))
        box = layout(seed, 32)
        x, y = round(box.centre_x), round(box.centre_y)
        patch = image[y - 1 : y + 2, x - 1 : x + 2].reshape(-1, 3).mean(axis=0)
        distances = {name: np.linalg.norm(patch - np.array(rgb)) for name, rgb in COLORS.items()}
        assert min(distances, key=distances.get) == color
        assert distances[color] < 30


def test_scenes_have_distinct_mean_colours():
    means = {}
    for scene in ATTRIBUTES["scene"]:
        per_seed = [pixels(render_background(scene, seed, 32)).reshape(-1, 3).mean(axis=0) for seed in range(3)]
        assert max(np.linalg.norm(m - per_seed[0]) for m in per_seed) < 10
        means[scene] = per_seed[0]
    for a, b in itertools.combinations(means, 2):
        assert np.linalg.norm(means[a] - means[b]) > SCENE_MEAN_DISTANCE, (a, b)


def test_fixing_one_attribute_keeps_the_others_drawn_from_the_seed():
    free = sample_attributes(7)
    fixed = sample_attributes(7, scene="night" if free["scene"] != "night" else "snow")
    assert {k: v for k, v in fixed.items() if k != "scene"} == {k: v for k, v in free.items() if k != "scene"}


def test_sampling_frequencies_follow_the_stated_distribution():
    rng = random.Random(0)
    draws = [sample_attributes(rng) for _ in range(4000)]
    marks = sum(d["mark"] == "none" for d in draws) / len(draws)
    assert 0.66 < marks < 0.74
    assert all(d["second_color"] == "none" for d in draws if d["pattern"] == "plain")
    assert all(d["second_color"] != d["color"] for d in draws)
    assert {d["cls"] for d in draws} == set(ATTRIBUTES["cls"])


# ---------------------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("attributes", "named"),
    [
        ({"colour": "red"}, "colour"),
        ({"color": "teal"}, "teal"),
        ({"cls": "dog"}, "dog"),
        ({"scene": "moon"}, "moon"),
        ({"pattern": "plain", "second_color": "blue"}, "second_color"),
        ({"color": "blue", "second_color": "blue"}, "second_color"),
    ],
)
def test_bad_attributes_raise_value_error_naming_them(attributes, named):
    with pytest.raises(ValueError, match=named):
        render(0, **attributes)
    with pytest.raises(ValueError, match=named):
        caption(**({"cls": "box"} | attributes))


def test_unknown_value_error_lists_the_allowed_values():
    with pytest.raises(ValueError, match="red, orange, yellow"):
        render(0, color="teal")


def test_bad_size_is_rejected():
    with pytest.raises(ValueError, match="size"):
        render(0, size=4)


# ---------------------------------------------------------------------------------------------------- captions


@pytest.mark.parametrize(
    ("attributes", "expected"),
    [
        ({"cls": "box"}, "a box"),
        ({"cls": "box", "color": "red"}, "a red box"),
        ({"cls": "box", "scene": "grass"}, "a box on the grass"),
        ({"cls": "ball", "color": "orange"}, "an orange ball"),
        ({"cls": "box", "color": "red", "pattern": "striped", "scene": "snow"}, "a red striped box in the snow"),
        (
            {"cls": "cup", "color": "white", "pattern": "plain", "mark": "none", "scene": "rug"},
            "a white cup on a red rug",
        ),
        ({"cls": "tent", "pattern": "dotted", "second_color": "blue"}, "a tent with blue dots"),
        ({"cls": "tent", "mark": "ring", "scene": "night"}, "a tent with a ring at night"),
        (
            dict(BASE, second_color="blue", pattern="checkered", scene="floor"),
            "a red box with blue checks and a star on a wooden floor",
        ),
    ],
)
def test_caption_exact_text(attributes, expected):
    assert caption(**attributes) == expected


def test_caption_needs_the_class_noun():
    with pytest.raises(ValueError, match="cls"):
        caption(color="red")


def test_caption_leaves_out_what_is_not_given():
    text = caption(cls="ball", mark="cross")
    for value in (*COLORS, "striped", "dotted", "checkered", *SCENE_PHRASES.values()):
        assert value not in text


def test_random_caption_keeps_the_class_and_sometimes_drops_everything_else():
    attributes = dict(BASE, second_color="blue", scene="beach")
    full = caption(**attributes)
    rng = random.Random(0)
    captions = [random_caption(attributes, rng) for _ in range(500)]
    assert all(re.search(r"\bbox\b", text) for text in captions)
    assert "a box" in captions
    assert full in captions
    assert len(set(captions)) > 20


def test_every_caption_word_is_lower_case_letters():
    rng = random.Random(1)
    texts = [caption(**sample_attributes(seed)) for seed in range(200)]
    texts += [random_caption(sample_attributes(seed), rng) for seed in range(200)]
    for text in texts:
        assert all(re.fullmatch(r"[a-z]+", word) for word in text.split()), text


def test_caption_is_deterministic():
    attributes = sample_attributes(5)
    assert caption(**attributes) == caption(**attributes)
    assert random_caption(attributes, 9) == random_caption(attributes, 9)


# ---------------------------------------------------------------------------------------------------- subjects


def test_subject_set_covers_both_difficulties():
    assert len(SUBJECTS) >= 6
    assert {subject.difficulty for subject in SUBJECTS.values()} == {"easy", "hard"}


@pytest.mark.parametrize("name", list(SUBJECTS))
def test_subject_identity_is_readable_and_rare(name):
    subject = SUBJECTS[name]
    assert subject.name == name
    assert set(subject.attributes) == set(IDENTITY_ATTRIBUTES)
    assert all(value in ATTRIBUTES[key] for key, value in subject.attributes.items())
    assert 1 <= len(subject.reference_scenes) <= 2
    assert 0 < prior_match_probability(subject) < 0.05


@pytest.mark.parametrize("name", list(SUBJECTS))
@pytest.mark.parametrize("count", [4, 5])
def test_reference_images_show_only_the_subject_in_its_reference_scenes(name, count):
    subject = SUBJECTS[name]
    attribute_dicts = subject.reference_attributes(count)
    images = subject.reference_images(count)
    assert len(images) == len(attribute_dicts) == count
    for attributes in attribute_dicts:
        assert attributes["scene"] in subject.reference_scenes
        assert {k: attributes[k] for k in IDENTITY_ATTRIBUTES} == subject.attributes
    assert all(image.size == (32, 32) and image.mode == "RGB" for image in images)
    # Casually captured: the object moves and changes size between photos.
    assert len({layout(seed, 32) for seed in subject.reference_seeds(count)}) == count
    again = subject.reference_images(count)
    assert all(np.array_equal(pixels(a), pixels(b)) for a, b in zip(images, again, strict=True))


def test_subject_identities_are_pairwise_different():
    identities = [tuple(sorted(subject.attributes.items())) for subject in SUBJECTS.values()]
    assert len(set(identities)) == len(identities)


def test_prior_match_probability_agrees_with_sampling():
    subject = SUBJECTS["star_box"]
    rng = random.Random(0)
    draws = [sample_attributes(rng, cls="box") for _ in range(20000)]
    hits = sum(all(d[k] == v for k, v in subject.attributes.items()) for d in draws)
    expected = prior_match_probability(subject) * len(draws)  # 62.5 hits expected
    assert abs(hits - expected) < 4 * expected**0.5


def test_subject_caption():
    subject = SUBJECTS["ring_ball"]
    assert subject_caption(subject) == "a ball"
    assert subject_caption(subject, "sks", "beach") == "a sks ball on the beach"


def test_contact_sheet_writes_a_png(tmp_path):
    path = contact_sheet(tmp_path / "sheet.png", size=16, scale=1)
    with Image.open(path) as sheet:
        assert sheet.format == "PNG"
        assert sheet.width > 16 * 5
