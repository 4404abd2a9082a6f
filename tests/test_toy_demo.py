"""The toy demo and the toy model's recommended settings, on a toy model trained at toy scale."""

from __future__ import annotations

import json
import re
from types import SimpleNamespace

import torch
from click.testing import CliRunner
from PIL import Image

from db_adapters import personalize
from db_adapters.cli import main
from db_adapters.toy import SUBJECTS, load_base_pipeline
from db_adapters.toy.demo import novel_scenes, run_demo

QUICK = {"steps": 2, "num_class_images": 2, "class_inference_steps": 2, "progress": False}


def test_demo_writes_a_sheet_with_every_row(small_toy_dir, tmp_path):
    result = run_demo("star_box", tmp_path, pipe=load_base_pipeline(small_toy_dir), sample_steps=2, **QUICK)
    sheet = Image.open(result.sheet)
    rows = 1 + 1 + 3 + 2  # references, [V], three new scenes, class before and after
    assert sheet.height == rows * (32 * 4 + 4)
    assert result.adapter.exists() and result.identifier
    read = result.subject_read
    assert set(read) == {"cls", "color", "pattern", "second_color", "mark", "identity"}
    assert all(0 <= count <= 5 for count in read.values()) and read["identity"] <= min(read.values())


def test_recontextualisation_uses_scenes_outside_the_references():
    for name, subject in SUBJECTS.items():
        scenes = novel_scenes(name)
        assert len(scenes) == 3 and not set(scenes) & set(subject.reference_scenes)


def test_model_folder_recommendations_fill_in_left_out_settings(small_toy_dir, subject_images, tmp_path):
    recommended = json.loads((small_toy_dir / "db_adapters.json").read_text())
    assert recommended["steps"] > 0
    pipe = load_base_pipeline(small_toy_dir)
    (small_toy_dir / "db_adapters.json").write_text(json.dumps({**recommended, "steps": 3}))
    try:
        adapter = personalize(
            pipe,
            subject_images,
            "box",
            num_class_images=2,
            class_inference_steps=2,
            progress=False,
            output_dir=tmp_path,
        )
    finally:
        (small_toy_dir / "db_adapters.json").write_text(json.dumps(recommended))
    assert len(adapter.history) == 3


def test_recommendations_may_differ_by_strategy_and_set_its_options(small_toy_dir, subject_images):
    from db_adapters.plan import make_plan
    from db_adapters.subjects import Subject

    recommended = json.loads((small_toy_dir / "db_adapters.json").read_text())
    per_strategy = {"lora": {"steps": 5, "rank": 2}, "full": {"learning_rate": 5e-5}}
    pipe = load_base_pipeline(small_toy_dir)
    (small_toy_dir / "db_adapters.json").write_text(json.dumps({**recommended, "strategies": per_strategy}))
    try:

        def plan(strategy, **settings):
            return make_plan(pipe, [Subject(subject_images, "box")], strategy=strategy, settings=settings)

        lora, full, chosen = plan("lora"), plan("full"), plan("lora", rank=8, steps=7)
    finally:
        (small_toy_dir / "db_adapters.json").write_text(json.dumps(recommended))
    assert (lora.config.steps, lora.config.learning_rate, lora.strategy.options.rank) == (5, 1e-3, 2)
    assert (full.config.steps, full.config.learning_rate) == (recommended["steps"], 5e-5)
    assert (chosen.config.steps, chosen.strategy.options.rank) == (7, 8)  # the caller's own values win


def test_a_recommended_text_encoder_yields_to_the_caller_and_to_pivotal_full(small_toy_dir, subject_images):
    import pytest

    from db_adapters import InputError
    from db_adapters.plan import make_plan
    from db_adapters.subjects import Subject

    recommended = json.loads((small_toy_dir / "db_adapters.json").read_text())
    pipe = load_base_pipeline(small_toy_dir)

    def plan(strategy="lora", **settings):
        return make_plan(pipe, [Subject(subject_images, "box")], strategy=strategy, settings=settings).config

    try:
        (small_toy_dir / "db_adapters.json").write_text(json.dumps({**recommended, "train_text_encoder": True}))
        assert plan().train_text_encoder is True  # left out: the folder's recommendation
        assert plan(train_text_encoder=False).train_text_encoder is False  # the caller's own value wins
        # A full fine-tune with new tokens trains the embedding table already: the recommendation yields.
        assert plan("full", pivotal_tokens=2).train_text_encoder is False
        per_strategy = {"train_text_encoder": True, "strategies": {"full": {"train_text_encoder": False}}}
        (small_toy_dir / "db_adapters.json").write_text(json.dumps({**recommended, **per_strategy}))
        assert plan().train_text_encoder is True and plan("full").train_text_encoder is False
        (small_toy_dir / "db_adapters.json").write_text(json.dumps({**recommended, "train_text_encoder": "yes"}))
        with pytest.raises(InputError, match="train_text_encoder='yes' must be True, False or None"):
            plan()
    finally:
        (small_toy_dir / "db_adapters.json").write_text(json.dumps(recommended))
    assert plan().train_text_encoder is False  # no recommendation: off, as for real models


def test_demo_command(small_toy_dir, tmp_path):
    result = CliRunner().invoke(main, ["demo", "--model", str(small_toy_dir), "--out", str(tmp_path), "--steps", "2"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "demo.png").exists() and "personalize" in result.output
    assert re.search(r"probe +the subject in [0-5] of 5 'a \[V\]' samples \(cls [0-5], color", result.output)
    help_text = CliRunner().invoke(main, ["demo", "--help"]).output
    assert "default: the model's recommended steps" in " ".join(help_text.split())  # as run_demo does


def test_demo_rejects_unknown_subject(small_toy_dir, tmp_path):
    result = CliRunner().invoke(main, ["demo", "--model", str(small_toy_dir), "--subject", "nope"])
    assert result.exit_code == 2 and "not a toy subject" in result.output


def test_base_model_quality_report_shape(small_toy_dir):
    from db_adapters.toy.quality import TARGETS, base_model_quality, prompt_attributes

    report = base_model_quality(load_base_pipeline(small_toy_dir), samples=4, class_samples=2, steps=2)
    assert set(report["accuracy"]) == set(TARGETS) and all(0 <= v <= 1 for v in report["accuracy"].values())
    assert set(report["class_prior"]) == {"box", "ball", "cup", "tent"}
    assert sum(report["class_prior"]["box"]["colors"].values()) == 2
    assert prompt_attributes(5, 0) == prompt_attributes(5, 0) != prompt_attributes(5, 1)
    assert set(report["met"]["every_colour_and_pattern"]) == {"box", "ball", "cup", "tent"}
    assert not any(report["met"]["every_colour_and_pattern"].values())  # 2 samples cannot show 8 colours
    assert set(report["ceiling"]) == set(TARGETS)
    assert 0 <= report["colour_swaps"] <= 1
    asked_patterns = {a["pattern"] for a in prompt_attributes(4, 0)}
    assert set(report["colours_by_pattern"]) == set(report["ceiling_colours_by_pattern"]) == asked_patterns
    assert sum(row["prompts"] for row in report["colours_by_pattern"].values()) == 4


def test_colour_swaps_count_only_the_exchange_of_both_colours():
    from db_adapters.toy.quality import colour_swap_rate

    asked = [{"color": "red", "second_color": "blue"}] * 4
    read = [
        {"color": "blue", "second_color": "red"},  # swapped
        {"color": "blue", "second_color": "blue"},  # body wrong, pattern right: not a swap
        {"color": "red", "second_color": "red"},  # pattern took the body's colour: not a swap
        {"color": "red", "second_color": "blue"},  # right
    ]
    assert colour_swap_rate(read, asked) == 0.25


def test_colours_by_pattern_split_errors_by_the_prompts_pattern():
    from db_adapters.toy.quality import colours_by_pattern

    red_blue = {"color": "red", "second_color": "blue"}
    asked = [red_blue | {"pattern": "checkered"}] * 2 + [red_blue | {"pattern": "dotted"}] * 2
    read = [
        {"color": "blue", "second_color": "red"},  # checks swapped: right in either order
        {"color": "red", "second_color": "blue"},
        {"color": "red", "second_color": "red"},  # dots drawn in the body's colour: wrong in either order
        {"color": "red", "second_color": "blue"},
    ]
    split = colours_by_pattern(read, asked)
    assert split["checkered"] == {
        "prompts": 2,
        "color": 0.5,
        "second_color": 0.5,
        "colour_swaps": 0.5,
        "either_order": 1.0,
    }
    assert split["dotted"] == {
        "prompts": 2,
        "color": 1.0,
        "second_color": 0.5,
        "colour_swaps": 0.0,
        "either_order": 0.5,
    }


class RoundTrip(torch.nn.Module):
    """An autoencoder stand-in: `decode(encode(x))` is `x` itself, or `x` blurred to its mean colour."""

    def __init__(self, lossless: bool) -> None:
        super().__init__()
        self.lossless = lossless
        self.anchor = torch.nn.Parameter(torch.zeros(()))  # gives the module a device and dtype

    device = property(lambda self: self.anchor.device)
    dtype = property(lambda self: self.anchor.dtype)

    def encode(self, pixels):
        return SimpleNamespace(latent_dist=SimpleNamespace(mode=lambda: pixels))

    def decode(self, latents):
        kept = latents if self.lossless else latents.mean(dim=(2, 3), keepdim=True).expand_as(latents)
        return SimpleNamespace(sample=kept)


def test_quality_reports_a_vae_folders_ceiling_alone(tmp_path, capsys):
    # A recipe's VAE is judged before any denoiser is trained on its latents.
    from db_adapters.toy.base import build_vae
    from db_adapters.toy.quality import SCORED, main

    build_vae("v3").save_pretrained(tmp_path / "vae")
    main(["--vae", str(tmp_path / "vae"), "--samples", "4"])
    report = json.loads(capsys.readouterr().out)
    assert set(report["ceiling"]) == set(SCORED) and report["settings"] == {"samples": 4, "seed": 0}


def test_reconstruction_ceiling_reads_what_the_round_trip_keeps():
    from db_adapters.toy.quality import SCORED, prompt_attributes, reconstruction_ceiling

    asked = prompt_attributes(24, 0)
    perfect = reconstruction_ceiling(RoundTrip(lossless=True), asked, seed=0)
    assert set(perfect) == set(SCORED) and min(perfect.values()) >= 0.95, perfect  # the probe reads renders
    blurred = reconstruction_ceiling(RoundTrip(lossless=False), asked, seed=0)
    assert blurred["mark"] < 0.6 and blurred["pattern"] < 0.6, blurred  # a flat colour has neither
