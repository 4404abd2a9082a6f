"""The toy base model's recipe: runs end to end at toy scale, and a paused run resumes bit-exactly."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from db_adapters.toy import pretrain, recipe
from db_adapters.toy.base import MAX_TOKENS, RECOMMENDED_BY_ARCHITECTURE, load_base_pipeline, toy_caption_words

SMALL = {
    "num_images": 48,
    "vae_steps": 4,
    "vae_batch_size": 4,
    "decoder_steps": 4,
    "steps": 6,
    "batch_size": 4,
    "warmup_steps": 2,
    "rare_from_step": 2,  # the rare stream joins mid-run, so resuming across the switch is tested
    "restarts": (),
}


def config(work, **overrides):
    return recipe.PretrainConfig(work_dir=work, checkpoint_every=3, log_every=1, threads=1, **(SMALL | overrides))


def test_recipe_runs_end_to_end_into_a_loadable_pipeline(tmp_path):
    folder = pretrain.run(config(tmp_path))
    pipe = load_base_pipeline(folder)
    assert type(pipe).__name__ == "StableDiffusionPipeline"
    assert pipe.tokenizer.model_max_length == MAX_TOKENS
    image = pipe("a red box on the grass", num_inference_steps=2, output_type="np").images
    assert image.shape == (1, 32, 32, 3)
    recipe_text = (tmp_path / "recipe.json").read_text()
    stages = ("stage_dataset", "stage_vae", "stage_decoder", "stage_denoiser", "stage_export")
    assert all(stage in recipe_text for stage in stages)
    lines = (tmp_path / "denoiser_loss.csv").read_text().splitlines()
    assert lines[0] == "step,loss,lr,elapsed_s"
    assert_decoder_stage_tuned_the_decoder_alone(tmp_path, pipe.vae.state_dict())
    assert json.loads((folder / "db_adapters.json").read_text()) == RECOMMENDED_BY_ARCHITECTURE["v3"]


def test_the_export_recommends_its_own_architectures_settings(small_toy_dir):
    # small_toy_dir is a v1 model: it must not inherit the shipped (v3) model's settings and text-encoder training.
    exported = json.loads((small_toy_dir.parent / "exported_recommendations.json").read_text())
    assert exported == RECOMMENDED_BY_ARCHITECTURE["v1"] != RECOMMENDED_BY_ARCHITECTURE["v3"]


def assert_decoder_stage_tuned_the_decoder_alone(work, shipped):
    # The encoder (and so every latent the denoiser learned from) is the vae stage's; the decoder is new.
    from diffusers import AutoencoderKL

    before = AutoencoderKL.from_pretrained(work / "vae").state_dict()
    after = AutoencoderKL.from_pretrained(work / "vae_ft").state_dict()
    frozen = [k for k in before if k.startswith(("encoder.", "quant_conv."))]
    tuned = [k for k in before if k.startswith(("decoder.", "post_quant_conv."))]
    assert frozen and tuned
    assert all(torch.equal(before[k], after[k]) for k in frozen)
    assert any(not torch.equal(before[k], after[k]) for k in tuned)
    assert pretrain.tuned_vae_dir(work) == work / "vae_ft"
    assert all(torch.equal(shipped[k], after[k]) for k in tuned)  # the pipeline ships the tuned decoder


def test_the_defaults_are_the_shipped_models_recorded_recipe():
    # "The defaults produced the shipped weights": v4's run recorded every weight-shaping setting.
    from pathlib import Path

    recipe_file = Path(__file__).resolve().parents[1] / "toy_training" / "toy-base-v4" / "recipe.json"
    recorded = json.loads(recipe_file.read_text())["config"]
    defaults = recipe.PretrainConfig(work_dir=Path("."))
    as_recorded = json.loads(json.dumps({name: getattr(defaults, name) for name in recipe.WEIGHT_SETTINGS}))
    assert as_recorded == {name: recorded[name] for name in recipe.WEIGHT_SETTINGS}


def test_a_started_run_continues_with_the_settings_it_began_with(tmp_path):
    from db_adapters.errors import InputError

    started = recipe.config_for(tmp_path, architecture="v3", steps=12, rare_from_step=0, max_minutes=1.0)
    recipe.record_settings(tmp_path, started)
    resumed = recipe.config_for(tmp_path, max_minutes=30.0, render_workers=2)  # this sitting's settings only
    assert (resumed.architecture, resumed.steps, resumed.rare_from_step) == ("v3", 12, 0)
    assert (resumed.max_minutes, resumed.render_workers, resumed.work_dir) == (30.0, 2, tmp_path)
    assert recipe.config_for(tmp_path, steps=12).steps == 12  # the same value is no change
    with pytest.raises(InputError, match=r"steps=10000 \(the run has 12\).*new --work-dir"):
        recipe.config_for(tmp_path, steps=10_000)
    with pytest.raises(InputError, match=r"steps=10000 \(the run has 12\)"):
        pretrain.run(recipe.PretrainConfig(work_dir=tmp_path, architecture="v3", steps=10_000, rare_from_step=0))


def test_a_run_recorded_by_an_older_recipe_must_name_what_it_did_not_record(tmp_path):
    # v1's recipe.json predates `architecture`: taking today's default ("v3") would change the run.
    from db_adapters.errors import InputError

    (tmp_path / "recipe.json").write_text(json.dumps({"config": {"steps": 8000, "seed": 0}}))
    with pytest.raises(InputError, match="does not record.*architecture"):
        recipe.config_for(tmp_path)
    every_other = {name: getattr(recipe.PretrainConfig(tmp_path), name) for name in recipe.WEIGHT_SETTINGS}
    named = {**every_other, "architecture": "v1", "steps": 8000}
    assert recipe.config_for(tmp_path, **named).architecture == "v1"


def test_caption_words_are_single_tokens(tmp_path):
    from db_adapters.toy.base import build_tokenizer

    tokenizer = build_tokenizer(tmp_path / "tok")
    for word in toy_caption_words():
        assert len(tokenizer(word, add_special_tokens=False).input_ids) == 1, word


@pytest.mark.parametrize("architecture", ["v2", "v3"])
def test_a_saved_model_folder_names_its_architecture(tmp_path, architecture):
    # v2 and v3 share the UNet and differ in the VAE, so the name must be read off both.
    from db_adapters.toy import base

    tokenizer = base.build_tokenizer(tmp_path / "tok")
    parts = base.build_vae(architecture), base.build_unet(architecture)
    base.assemble_pipeline(*parts, base.build_text_encoder(tokenizer, architecture), tokenizer).save_pretrained(
        tmp_path / "model"
    )
    assert base.architecture_name(tmp_path / "model") == architecture
    assert parts[0].config.block_out_channels[0] == {"v2": 32, "v3": 48}[architecture]


def test_paused_run_resumes_bit_exactly(tmp_path, monkeypatch):
    straight = tmp_path / "straight"
    pretrain.run(config(straight))

    paused = tmp_path / "paused"
    paused.mkdir()
    # The same trained tokenizer, as a resumed run reads back its own.
    shutil.copytree(straight / "tokenizer", paused / "tokenizer")

    def out_of_time_in_each_stage(self):
        return (self.name, self.step) in {("decoder", 2), ("denoiser", 3)}

    monkeypatch.setattr(pretrain.Loop, "out_of_time", out_of_time_in_each_stage)
    with pytest.raises(pretrain.OutOfTime, match="decoder stopped at step 2"):
        pretrain.run(config(paused))
    with pytest.raises(pretrain.OutOfTime, match="denoiser stopped at step 3"):
        pretrain.run(config(paused))
    monkeypatch.undo()
    assert (paused / "denoiser_checkpoints" / "denoiser-0000003.json").exists()
    probed = pretrain.checkpoint_pipeline(paused)  # what `quality --work-dir` reads mid-run
    assert probed("a red box", num_inference_steps=2, output_type="np").images.shape == (1, 32, 32, 3)
    pretrain.run(config(paused))

    from diffusers import AutoencoderKL, UNet2DConditionModel

    for model, folder in ((UNet2DConditionModel, "unet"), (AutoencoderKL, "vae_ft")):
        a = model.from_pretrained(straight / folder).state_dict()
        b = model.from_pretrained(paused / folder).state_dict()
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), folder
    steps = [line.split(",")[0] for line in (paused / "denoiser_loss.csv").read_text().splitlines()[1:]]
    assert steps == sorted(steps)  # the log continues, it does not restart
    sittings = json.loads((paused / "recipe.json").read_text())["sittings"]
    assert [(s["stage"], s["from_step"], s["to_step"]) for s in sittings] == [
        ("vae", 0, 4),
        ("decoder", 0, 2),
        ("decoder", 2, 4),
        ("denoiser", 0, 3),
        ("denoiser", 3, 6),
    ]


def test_a_restart_is_a_new_warmed_up_cosine_cycle_after_the_first():
    schedule = {"steps": 100, "learning_rate": 1e-3, "warmup_steps": 10}
    first = recipe.PretrainConfig(work_dir=".", **schedule, restarts=())
    grown = recipe.PretrainConfig(work_dir=".", **schedule, restarts=[[50, "2e-4"]])  # as recipe.json holds it
    assert grown.restarts == ((50, 2e-4),) and grown.denoiser_steps == 150
    assert [pretrain._denoiser_lr(step, grown) for step in range(100)] == [
        pretrain._denoiser_lr(step, first) for step in range(100)
    ]  # the first cycle is the run it grew from
    assert pretrain._denoiser_lr(99, grown) < 1e-6
    assert pretrain._denoiser_lr(100, grown) == pytest.approx(2e-4 / 10)  # warming up again
    assert pretrain._denoiser_lr(109, grown) == pytest.approx(2e-4)
    assert pretrain._denoiser_lr(149, grown) < 1e-6


def test_a_branched_run_ends_as_the_straight_run_with_its_restarts(tmp_path):
    from db_adapters.errors import InputError

    pretrain.run(config(tmp_path / "finished"))  # 6 steps; then 3 more in a branch of it
    # 6 + 3 denoiser steps in one run, on the finished run's copied data and VAEs (the stages skip them).
    (tmp_path / "straight").mkdir()
    for stage_output in ("dataset.safetensors", "latents.safetensors", "vae", "vae_ft", "tokenizer"):
        copy = shutil.copytree if (tmp_path / "finished" / stage_output).is_dir() else shutil.copy2
        copy(tmp_path / "finished" / stage_output, tmp_path / "straight" / stage_output)
    pretrain.run(config(tmp_path / "straight", restarts=((3, 1e-3),)))
    source_recipe = (tmp_path / "finished" / "recipe.json").read_text()
    recipe.branch_run(tmp_path / "finished", tmp_path / "branch", [(3, 1e-3)])
    with pytest.raises(InputError, match="not empty"):
        recipe.branch_run(tmp_path / "finished", tmp_path / "branch", [(3, 1e-3)])
    branch = recipe.config_for(tmp_path / "branch", checkpoint_every=3, log_every=1, threads=1)
    assert branch.restarts == ((3, 1e-3),) and branch.denoiser_steps == 9
    pretrain.run(branch)

    from diffusers import UNet2DConditionModel

    straight = UNet2DConditionModel.from_pretrained(tmp_path / "straight" / "unet").state_dict()
    branched = UNet2DConditionModel.from_pretrained(tmp_path / "branch" / "unet").state_dict()
    assert all(torch.equal(straight[k], branched[k]) for k in straight)
    finished = UNet2DConditionModel.from_pretrained(tmp_path / "finished" / "unet").state_dict()
    assert not all(torch.equal(finished[k], branched[k]) for k in finished)
    branch_record = json.loads((tmp_path / "branch" / "recipe.json").read_text())
    assert branch_record["branched_from"]["step"] == 6
    assert [(s["stage"], s["from_step"], s["to_step"]) for s in branch_record["sittings"]][-2:] == [
        ("denoiser", 0, 6),
        ("denoiser", 6, 9),
    ]
    assert (tmp_path / "finished" / "recipe.json").read_text() == source_recipe  # the source is not touched
    assert (tmp_path / "branch" / "pipeline" / "model_index.json").exists()


def test_a_branch_needs_a_checkpointed_source_and_cycles(tmp_path):
    from db_adapters.errors import InputError

    with pytest.raises(InputError, match="not a run with a denoiser checkpoint"):
        recipe.branch_run(tmp_path / "nothing", tmp_path / "branch", [(3, 1e-3)])
    (tmp_path / "run" / "denoiser_checkpoints").mkdir(parents=True)
    recipe.record_settings(tmp_path / "run", config(tmp_path / "run"))
    pretrain.save_checkpoint(tmp_path / "run" / "denoiser_checkpoints" / "denoiser-0000006", {}, {"step": 6})
    with pytest.raises(InputError, match="--restarts STEPS:PEAK"):
        recipe.branch_run(tmp_path / "run", tmp_path / "branch", [])
    assert not (tmp_path / "branch").exists()
    # Branched from a checkpoint older than the run's end, the loss log stops at the checkpoint's step.
    log = "step,loss,lr,elapsed_s\n3,0.5,1e-3,1\n6,0.4,1e-3,2\n9,0.3,0,3\n"
    (tmp_path / "run" / "denoiser_loss.csv").write_text(log)
    recipe.branch_run(tmp_path / "run", tmp_path / "branch", [(3, 1e-3)])
    logged = (tmp_path / "branch" / "denoiser_loss.csv").read_text().splitlines()
    assert [row.split(",")[0] for row in logged] == ["step", "3", "6"]
    assert (tmp_path / "run" / "denoiser_loss.csv").read_text() == log  # the source is not touched


def test_rare_stream_draws_images_with_a_second_colour_or_mark_and_names_both():
    import random

    from db_adapters.toy.world import ATTRIBUTES, sample_attributes

    codes = torch.tensor([pretrain.attribute_codes(sample_attributes(seed)) for seed in range(400)])
    rare = pretrain.rare_images(codes)
    names = list(ATTRIBUTES)
    has_detail = [(c[names.index("second_color")] != 0 or c[names.index("mark")] != 0).item() for c in codes]
    assert sorted(rare.tolist()) == [i for i, yes in enumerate(has_detail) if yes]
    assert 0.3 < len(rare) / len(codes) < 0.6

    settings = config("unused", batch_size=8, rare_share=0.5, rare_from_step=10)
    generator, captions = torch.Generator().manual_seed(0), random.Random(0)
    index, texts = pretrain._denoiser_batch(codes, rare, 9, settings, generator, captions)
    assert len(index) == len(texts) == 8 and not set(index.tolist()) <= set(rare.tolist())
    index, texts = pretrain._denoiser_batch(codes, rare, 10, settings, generator, captions)
    assert len(index) == len(texts) == 8
    for i, text in zip(index[4:].tolist(), texts[4:], strict=True):
        attributes = pretrain.attribute_dict(codes[i].tolist())
        assert has_detail[i]
        if attributes["mark"] != "none":
            assert f"a {attributes['mark']}" in text, text
        if attributes["second_color"] != "none":
            assert f"with {attributes['second_color']} " in text, text


def test_missing_base_model_says_how_to_train_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="train_toy_base.py"):
        load_base_pipeline(tmp_path)
