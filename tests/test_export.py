"""Adapter files: plain diffusers loads our LoRA files; load_adapter restores every strategy exactly."""

from __future__ import annotations

import json
import logging
import warnings

import pytest
import torch
from conftest import render_np

from db_adapters import AdapterError, load_adapter, personalize, unload_adapter
from db_adapters.adapter import BaseModelWarning
from db_adapters.testing import tiny_pipeline


def trained(strategy: str, tmp_path, subject_images, **kwargs):
    pipe = tiny_pipeline()
    settings = {"steps": 6, "learning_rate": 5e-3 if strategy == "lora" else 5e-4, "num_class_images": 2}
    settings |= {"class_inference_steps": 2, "progress": False, "output_dir": tmp_path / "run"}
    adapter = personalize(pipe, subject_images, "dog", strategy=strategy, **(settings | kwargs))
    return pipe, adapter


@pytest.mark.parametrize("train_text_encoder", [False, True])
def test_plain_diffusers_loads_lora_file_and_renders_the_same(train_text_encoder, tmp_path, subject_images, caplog):
    pipe, adapter = trained("lora", tmp_path, subject_images, rank=4, alpha=8, train_text_encoder=train_text_encoder)
    prompt = f"a {adapter.identifier} dog"
    expected = render_np(pipe, prompt)
    path = adapter.save(tmp_path / "dog.safetensors")

    fresh = tiny_pipeline()
    base = render_np(fresh, prompt)
    with warnings.catch_warnings(), caplog.at_level(logging.WARNING):
        warnings.simplefilter("error")
        fresh.load_lora_weights(str(path))
    assert not [r for r in caplog.records if "unexpected" in r.getMessage().lower()]
    got = render_np(fresh, prompt)
    assert abs(got - expected).max() <= 1e-4
    assert abs(got - base).max() > 1e-2  # and the adapter visibly does something


def test_lora_file_carries_alpha_and_our_metadata(tmp_path, subject_images):
    pipe, adapter = trained("lora", tmp_path, subject_images, rank=4, alpha=8, train_text_encoder=True)
    path = adapter.save(tmp_path / "dog.safetensors")
    from safetensors import safe_open

    with safe_open(str(path), "pt") as handle:
        header = handle.metadata()
        keys = list(handle.keys())
    lora_meta = json.loads(header["lora_adapter_metadata"])
    assert lora_meta["unet.lora_alpha"] == 8 and lora_meta["unet.r"] == 4
    assert lora_meta["text_encoder.lora_alpha"] == 8
    ours = json.loads(header["db_adapters"])
    assert ours["identifier"] == adapter.identifier and ours["class_noun"] == "dog"
    assert ours["instance_prompt"] == f"a {adapter.identifier} dog"
    assert ours["strategy"] == "lora" and ours["strategy_config"]["rank"] == 4
    assert ours["base_model"]["architecture"] and ours["base_model"]["weights"]
    assert ours["resolution"] == 32 and ours["steps"] == 6 and ours["library_version"]
    assert all(k.startswith(("unet.", "text_encoder.")) for k in keys)


@pytest.mark.parametrize("strategy", ["lora", "full"])
def test_load_adapter_round_trip_and_unload(strategy, tmp_path, subject_images):
    pipe, adapter = trained(strategy, tmp_path, subject_images, train_text_encoder=True)
    prompt = f"a {adapter.identifier} dog"
    expected = render_np(pipe, prompt)
    path = adapter.save(tmp_path / "dog.safetensors")

    fresh = tiny_pipeline()
    base = render_np(fresh, prompt)
    loaded = load_adapter(fresh, path)
    assert (loaded.identifier, loaded.class_noun, loaded.strategy.name) == (adapter.identifier, "dog", strategy)
    assert abs(render_np(fresh, prompt) - expected).max() <= 1e-5
    unload_adapter(fresh)
    assert abs(render_np(fresh, prompt) - base).max() == 0
    with pytest.raises(AdapterError, match="no db-adapters adapter"):
        unload_adapter(fresh)


def test_full_adapter_restores_weights_exactly_and_saves_half_precision(tmp_path, subject_images):
    pipe, adapter = trained("full", tmp_path, subject_images)
    path32 = adapter.save(tmp_path / "full32.safetensors")
    path16 = adapter.save(tmp_path / "full16.safetensors", dtype="fp16")
    fresh = tiny_pipeline()
    load_adapter(fresh, path32)
    for key, value in pipe.unet.state_dict().items():
        assert torch.equal(fresh.unet.state_dict()[key], value), key
    assert path16.stat().st_size < 0.6 * path32.stat().st_size
    half = tiny_pipeline()
    load_adapter(half, path16)
    assert torch.allclose(half.unet.conv_in.weight, pipe.unet.conv_in.weight, atol=1e-3)


def test_other_architecture_is_refused_other_checkpoint_warns(tmp_path, subject_images):
    _, adapter = trained("lora", tmp_path, subject_images)
    path = adapter.save(tmp_path / "dog.safetensors")
    with pytest.raises(AdapterError, match="another architecture"):
        load_adapter(tiny_pipeline(v_prediction=True), path)
    with pytest.warns(BaseModelWarning, match="another checkpoint"):
        load_adapter(tiny_pipeline(seed=7), path)


def test_pickles_and_foreign_files_are_refused(tmp_path, subject_images):
    pickle = tmp_path / "model.ckpt"
    pickle.write_bytes(b"\x80\x04 this would run code if unpickled")
    with pytest.raises(AdapterError, match="only safetensors"):
        load_adapter(tiny_pipeline(), pickle)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not a safetensors file at all")
    with pytest.raises(AdapterError, match="not a valid safetensors"):
        load_adapter(tiny_pipeline(), garbage)
    from safetensors.torch import save_file

    foreign = tmp_path / "foreign.safetensors"
    save_file({"x": torch.zeros(2)}, str(foreign))
    with pytest.raises(AdapterError, match="no db-adapters metadata"):
        load_adapter(tiny_pipeline(), foreign)
    with pytest.raises(FileNotFoundError, match="does not exist"):  # the file system's error stays an OSError
        load_adapter(tiny_pipeline(), tmp_path / "missing.safetensors")


def test_save_is_atomic_and_keeps_the_old_file_on_failure(tmp_path, subject_images, monkeypatch):
    _, adapter = trained("lora", tmp_path, subject_images)
    path = adapter.save(tmp_path / "dog.safetensors")
    good = path.read_bytes()
    import safetensors.torch

    def broken(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", broken)
    with pytest.raises(OSError, match="No space"):
        adapter.save(path)
    assert path.read_bytes() == good
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_file()) == ["dog.safetensors"]


def test_saving_needs_a_safetensors_name(tmp_path, subject_images):
    from db_adapters import InputError

    _, adapter = trained("lora", tmp_path, subject_images)
    with pytest.raises(InputError, match=".safetensors"):
        adapter.save(tmp_path / "dog.bin")


def test_rank4_lora_file_size(tmp_path, subject_images):
    _, adapter = trained("lora", tmp_path, subject_images, rank=4)
    size = adapter.save(tmp_path / "r4.safetensors").stat().st_size
    _, adapter8 = trained("lora", tmp_path, subject_images, rank=8)
    size8 = adapter8.save(tmp_path / "r8.safetensors").stat().st_size
    print(f"rank-4 LoRA on the tiny pipeline: {size} bytes; rank 8: {size8} bytes")
    assert size < size8 < 2.2 * size
