"""The toy base model's recipe: runs end to end at toy scale, and a paused run resumes bit-exactly."""

from __future__ import annotations

import shutil

import pytest
import torch

from db_adapters.toy import pretrain
from db_adapters.toy.base import MAX_TOKENS, load_base_pipeline, toy_caption_words

SMALL = {"num_images": 48, "vae_steps": 4, "vae_batch_size": 4, "steps": 6, "batch_size": 4, "warmup_steps": 2}


def config(work, **overrides):
    return pretrain.PretrainConfig(work_dir=work, checkpoint_every=3, log_every=1, threads=1, **(SMALL | overrides))


def test_recipe_runs_end_to_end_into_a_loadable_pipeline(tmp_path):
    folder = pretrain.run(config(tmp_path))
    pipe = load_base_pipeline(folder)
    assert type(pipe).__name__ == "StableDiffusionPipeline"
    assert pipe.tokenizer.model_max_length == MAX_TOKENS
    image = pipe("a red box on the grass", num_inference_steps=2, output_type="np").images
    assert image.shape == (1, 32, 32, 3)
    recipe = (tmp_path / "recipe.json").read_text()
    assert all(stage in recipe for stage in ("stage_dataset", "stage_vae", "stage_denoiser", "stage_export"))
    lines = (tmp_path / "denoiser_loss.csv").read_text().splitlines()
    assert lines[0] == "step,loss,lr,elapsed_s"


def test_caption_words_are_single_tokens(tmp_path):
    from db_adapters.toy.base import build_tokenizer

    tokenizer = build_tokenizer(tmp_path / "tok")
    for word in toy_caption_words():
        assert len(tokenizer(word, add_special_tokens=False).input_ids) == 1, word


def test_paused_run_resumes_bit_exactly(tmp_path, monkeypatch):
    straight = tmp_path / "straight"
    pretrain.run(config(straight))

    paused = tmp_path / "paused"
    paused.mkdir()
    # The same trained tokenizer, as a resumed run reads back its own.
    shutil.copytree(straight / "tokenizer", paused / "tokenizer")

    def out_of_time_at_step_3(self):
        return self.name == "denoiser" and self.step == 3

    monkeypatch.setattr(pretrain.Loop, "out_of_time", out_of_time_at_step_3)
    with pytest.raises(pretrain.OutOfTime, match="step 3"):
        pretrain.run(config(paused))
    monkeypatch.undo()
    assert (paused / "denoiser_checkpoints" / "denoiser-0000003.json").exists()
    pretrain.run(config(paused))

    from diffusers import UNet2DConditionModel

    a = UNet2DConditionModel.from_pretrained(straight / "unet").state_dict()
    b = UNet2DConditionModel.from_pretrained(paused / "unet").state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    steps = [line.split(",")[0] for line in (paused / "denoiser_loss.csv").read_text().splitlines()[1:]]
    assert steps == sorted(steps)  # the log continues, it does not restart


def test_missing_base_model_says_how_to_train_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="train_toy_base.py"):
        load_base_pipeline(tmp_path)
