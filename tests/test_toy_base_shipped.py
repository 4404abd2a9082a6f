"""The shipped toy base model: loads both ways, fits the size budget, follows a few prompts (read by the probe)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionPipeline

from db_adapters import choose_identifier
from db_adapters.pipelines import recommended_settings
from db_adapters.toy import load_base_pipeline, load_probe
from db_adapters.toy.base import RECOMMENDED, base_dir

MAX_PACKAGE_BYTES = 30 * 1024 * 1024
# One prompt per class, each with a colour and a scene, as the quality report asks for them.
PROMPTS = [
    ("box", "red", "grass", "a red box on the grass"),
    ("ball", "blue", "snow", "a blue ball in the snow"),
    ("cup", "yellow", "beach", "a yellow cup on the beach"),
    ("tent", "green", "night", "a green tent at night"),
]


@pytest.fixture(scope="module")
def shipped() -> StableDiffusionPipeline:
    return load_base_pipeline()


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def test_shipped_weights_fit_the_package_budget():
    assert (base_dir() / "model_index.json").is_file()
    assert not list(base_dir().rglob("*.bin")), "weights ship as safetensors only"
    assert 0 < folder_bytes(base_dir()) <= MAX_PACKAGE_BYTES


def test_plain_diffusers_loads_the_shipped_folder():
    pipe = StableDiffusionPipeline.from_pretrained(str(base_dir()), use_safetensors=True, safety_checker=None)
    assert pipe.unet.config.sample_size == 16 and pipe.tokenizer.model_max_length > 0


def test_shipped_model_recommends_its_personalization_settings(shipped):
    shared = {k: v for k, v in RECOMMENDED.items() if k != "strategies"}
    assert recommended_settings(shipped) == shared
    for strategy, own in RECOMMENDED["strategies"].items():
        assert recommended_settings(shipped, strategy) == shared | own
    rates = {strategy: recommended_settings(shipped, strategy)["learning_rate"] for strategy in ("lora", "full")}
    assert rates["full"] < rates["lora"]  # a full fine-tune moves every weight: a far smaller step


def test_binder_finds_an_identifier_the_model_never_saw(shipped):
    identifier = choose_identifier(shipped.tokenizer, "box", seed=0)
    (token,) = shipped.tokenizer.tokenize(f"{identifier} ")
    vocab = len(shipped.tokenizer)
    assert vocab // 2 <= shipped.tokenizer.convert_tokens_to_ids(token) < vocab


def test_base_model_draws_the_asked_class_colour_and_scene(shipped):
    generators = [torch.Generator().manual_seed(100 + i) for i in range(2 * len(PROMPTS))]
    prompts = [prompt for *_, prompt in PROMPTS for _ in range(2)]
    with torch.no_grad():
        images = shipped(prompts, num_inference_steps=20, guidance_scale=4.0, generator=generators).images
    reads = load_probe().predict(images)
    asked = [spec for spec in PROMPTS for _ in range(2)]
    right = {
        name: sum(read[name] == spec[i] for read, spec in zip(reads, asked, strict=True))
        for i, name in enumerate(("cls", "color", "scene"))
    }
    # The quality report reads class 1.00, colour 0.9275 and scene 1.00 on 400 prompts that name every
    # attribute; these name only colour and scene. 8 samples allow one miss per attribute.
    assert all(count >= len(prompts) - 1 for count in right.values()), (right, reads)


def test_class_prompt_alone_is_diverse(shipped):
    generators = [torch.Generator().manual_seed(500 + i) for i in range(12)]
    with torch.no_grad():
        images = shipped(["a ball"] * 12, num_inference_steps=20, guidance_scale=4.0, generator=generators).images
    reads = load_probe().predict(images)
    assert sum(read["cls"] == "ball" for read in reads) >= 11
    assert len({read["color"] for read in reads}) >= 4, reads
