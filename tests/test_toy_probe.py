"""The toy probe: the shipped weights read fresh renders back into attributes, embed subjects apart, and retrain."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from db_adapters.toy import ATTRIBUTES, SUBJECTS, Probe, load_probe, render, train_probe
from db_adapters.toy.probe import (
    HELDOUT_SEED_START,
    METADATA_KEY,
    TEST_SEED_START,
    heldout_accuracy,
    prior_jobs,
    probe_metadata,
    render_examples,
    training_jobs,
)

# The bar for every attribute; the shipped probe is trained until it clears it.
MIN_ACCURACY = 0.98
TEST_RENDERS = 500
TINY = {"steps": 3, "batch_size": 8, "heldout_size": 16, "log_every": 0, "workers": 1}


@pytest.fixture(scope="module")
def probe() -> Probe:
    return load_probe()


def test_shipped_probe_reads_fresh_renders_above_98_percent_per_attribute(probe):
    images, labels = render_examples(prior_jobs(TEST_RENDERS, TEST_SEED_START), workers=1)
    accuracy = heldout_accuracy(probe, images, labels)
    assert set(accuracy) == set(ATTRIBUTES)
    low = {name: value for name, value in accuracy.items() if value < MIN_ACCURACY}
    assert not low, f"attributes below {MIN_ACCURACY}: {low}"


def test_test_seeds_are_disjoint_from_training_and_heldout_seeds():
    record = probe_metadata()
    start, stop = record["heldout_seeds"]
    assert start == HELDOUT_SEED_START and stop <= TEST_SEED_START
    training_seeds = [seed for seed, _ in training_jobs(record["training_pool"], record["seed"])]
    assert max(training_seeds) < HELDOUT_SEED_START
    assert all(record["heldout_accuracy"][name] >= MIN_ACCURACY for name in ATTRIBUTES)


def test_predict_gives_every_attribute_a_valid_value_for_pil_and_tensor_inputs(probe):
    images = [render(TEST_SEED_START + 7), render(TEST_SEED_START + 8, size=64)]
    tensor = torch.rand(3, 3, 48, 48)
    predictions = probe.predict(images) + probe.predict(tensor)
    assert len(predictions) == 5
    for prediction in predictions:
        assert list(prediction) == list(ATTRIBUTES)
        assert all(prediction[name] in ATTRIBUTES[name] for name in ATTRIBUTES)
    proba = probe.predict_proba(tensor)
    assert all(proba[name].shape == (3, len(values)) for name, values in ATTRIBUTES.items())
    assert torch.allclose(proba["mark"].sum(dim=1), torch.ones(3))


def test_embed_is_unit_norm_and_groups_renders_of_the_same_subject(probe):
    names = list(SUBJECTS)
    vectors = probe.embed([image for name in names for image in SUBJECTS[name].reference_images(5)])
    assert vectors.shape == (5 * len(names), probe.embed_dim)
    assert torch.allclose(vectors.norm(dim=1), torch.ones(len(vectors)), atol=1e-5)
    similarity = vectors @ vectors.T
    owner = torch.arange(len(names)).repeat_interleave(5)
    same = (owner[:, None] == owner[None, :]) & ~torch.eye(len(vectors), dtype=torch.bool)
    different = owner[:, None] != owner[None, :]
    for index, name in enumerate(names):
        rows = owner == index
        within, between = similarity[rows][same[rows]].mean(), similarity[rows][different[rows]].mean()
        assert within > between, f"{name}: within-subject similarity {within:.3f} <= between {between:.3f}"


def test_shipped_probe_is_frozen(probe):
    assert not probe.training
    assert not any(parameter.requires_grad for parameter in probe.parameters())
    with pytest.raises(RuntimeError, match="frozen"):
        probe.train()
    assert load_probe() is probe


def test_tiny_training_run_writes_a_loadable_probe_file(tmp_path):
    out = tmp_path / "probe.safetensors"
    record = train_probe(seed=3, lr=1e-3, out_path=out, **TINY)
    assert record["steps"] == 3 and set(record["heldout_accuracy"]) == set(ATTRIBUTES)
    with safe_open(str(out), framework="pt") as handle:
        stored = json.loads(handle.metadata()[METADATA_KEY])
    assert stored["attributes"] == {name: list(values) for name, values in ATTRIBUTES.items()}
    assert stored["steps"] == 3 and stored["seed"] == 3
    loaded = load_probe(out)
    assert isinstance(loaded, Probe) and not loaded.training
    assert loaded.predict([render(0)])[0].keys() == ATTRIBUTES.keys()


def test_training_is_deterministic_for_a_seed(tmp_path):
    first, second = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    train_probe(seed=5, lr=1e-3, out_path=first, **TINY)
    train_probe(seed=5, lr=1e-3, out_path=second, **TINY)
    a, b = load_file(str(first)), load_file(str(second))
    assert a.keys() == b.keys() and all(torch.equal(a[name], b[name]) for name in a)


def test_missing_probe_file_says_how_to_train_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="python -m db_adapters.toy.probe"):
        load_probe(tmp_path / "missing.safetensors")


def test_importing_the_toy_world_does_not_import_torch():
    code = "import sys, db_adapters.toy; print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.stdout.strip() == "False", result.stderr
