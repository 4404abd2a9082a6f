"""Shared fixtures: the real CLIP vocabulary, built offline from the open-clip-torch wheel."""

from __future__ import annotations

import gzip
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import pytest

from db_adapters.tiny_tokenizers import bytes_to_unicode

if os.environ.get("PYTEST_XDIST_WORKER"):
    # `pytest -n 2` on two cores: one thread per worker, so the workers do not fight over the cores
    # (and subprocesses the tests start inherit it).
    os.environ["OMP_NUM_THREADS"] = "1"

CLIP_VOCAB_DIR = Path.home() / ".cache" / "db_adapters_tests" / "clip_vocab"
_BPE_MEMBER = "open_clip/bpe_simple_vocab_16e6.txt.gz"
_PIP_TIMEOUT_S = 120


def _write_clip_vocab(bpe_gz: bytes, folder: Path) -> None:
    # Exactly open_clip's SimpleTokenizer: the first 49152 - 256 - 2 merges after the header line,
    # 256 byte symbols, the same with "</w>", one token per merge, then the two special tokens.
    lines = gzip.decompress(bpe_gz).decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1 : 49152 - 256 - 2 + 1]]
    vocab = list(bytes_to_unicode().values())
    vocab += [v + "</w>" for v in vocab]
    vocab += ["".join(merge) for merge in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    folder.mkdir(parents=True)
    (folder / "vocab.json").write_text(
        json.dumps({token: i for i, token in enumerate(vocab)}, ensure_ascii=False), encoding="utf-8"
    )
    (folder / "merges.txt").write_text(
        "#version: 0.2\n" + "\n".join(" ".join(merge) for merge in merges) + "\n", encoding="utf-8"
    )


def _fetch_clip_vocab() -> None:
    CLIP_VOCAB_DIR.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=CLIP_VOCAB_DIR.parent) as tmp:
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:"]
        command += ["--disable-pip-version-check", "-q", "open-clip-torch", "-d", tmp]
        try:
            subprocess.run(command, check=True, capture_output=True, text=True, timeout=_PIP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            pytest.skip(f"real CLIP vocabulary unavailable: pip download took over {_PIP_TIMEOUT_S} s")
        except (OSError, subprocess.CalledProcessError) as error:
            detail = getattr(error, "stderr", "") or str(error)
            pytest.skip(f"real CLIP vocabulary unavailable: pip download failed: {detail.strip()[-300:]}")
        wheels = sorted(Path(tmp).glob("open_clip_torch-*.whl"))
        if not wheels:
            pytest.skip("real CLIP vocabulary unavailable: pip gave no open_clip_torch wheel")
        try:
            with zipfile.ZipFile(wheels[-1]) as wheel:
                bpe_gz = wheel.read(_BPE_MEMBER)
        except (KeyError, zipfile.BadZipFile) as error:
            pytest.skip(f"real CLIP vocabulary unavailable: {wheels[-1].name}: {error}")
        # Build beside the cache and rename into place, so an interrupted run never leaves a
        # half-written cache behind.
        staging = Path(tmp) / "clip_vocab"
        _write_clip_vocab(bpe_gz, staging)
        try:
            os.rename(staging, CLIP_VOCAB_DIR)
        except OSError:
            if not (CLIP_VOCAB_DIR / "merges.txt").is_file():
                raise


def pytest_configure(config: pytest.Config) -> None:
    if os.environ.get("PYTEST_XDIST_WORKER"):
        import torch

        torch.set_num_threads(1)


@pytest.fixture(scope="session")
def clip_tokenizer():
    """`transformers.CLIPTokenizer` over the real 49,408-token CLIP vocabulary (SD 1.x/2.x/XL).

    Downloaded once per machine into `~/.cache/db_adapters_tests/clip_vocab`; skips if unavailable.
    """
    from transformers import CLIPTokenizer

    if not (CLIP_VOCAB_DIR / "merges.txt").is_file():
        if CLIP_VOCAB_DIR.exists():
            shutil.rmtree(CLIP_VOCAB_DIR)
        _fetch_clip_vocab()
    return CLIPTokenizer.from_pretrained(str(CLIP_VOCAB_DIR), model_max_length=77)


# --- tiny pipelines and subject images, shared by the library and CLI tests ---------------------

FAST = {"steps": 4, "num_class_images": 2, "class_inference_steps": 2, "progress": False}


@pytest.fixture
def fast() -> dict:
    """Settings that make `personalize` on the tiny pipeline take about a second."""
    return dict(FAST)


def make_subject_images(count: int = 3, size: int = 40) -> list:
    from PIL import Image, ImageDraw

    images = []
    for i, background in enumerate(["skyblue", "lightgreen", "wheat", "white", "pink"][:count]):
        image = Image.new("RGB", (size, size), background)
        ImageDraw.Draw(image).ellipse((8 + i, 8, size - 8 + i, size - 8), fill="red")
        images.append(image)
    return images


@pytest.fixture
def subject_images() -> list:
    return make_subject_images()


@pytest.fixture
def subject_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "subject"
    folder.mkdir()
    for i, image in enumerate(make_subject_images()):
        image.save(folder / f"photo_{i}.png")
    return folder


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny pipeline saved as a diffusers folder, as `--model` takes it."""
    from db_adapters.testing import tiny_pipeline

    folder = tmp_path_factory.mktemp("models") / "tiny-sd"
    tiny_pipeline(seed=0).save_pretrained(folder)
    return folder


def render_np(pipe, prompt: str = "a dog", seed: int = 0, steps: int = 3):
    """Deterministic images as a float array, for comparing pipelines pixel by pixel."""
    import torch

    generator = torch.Generator("cpu").manual_seed(seed)
    return pipe(prompt, num_inference_steps=steps, generator=generator, output_type="np").images


@pytest.fixture(scope="session")
def small_toy_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A toy base model trained by the real recipe at toy scale (seconds): the shipped model's code path."""
    from db_adapters.toy.pretrain import run
    from db_adapters.toy.recipe import PretrainConfig

    work = tmp_path_factory.mktemp("toy-base")
    # v1's smaller architecture: the same classes and code path, quicker for the many tests that use it
    # (test_toy_pretrain runs the shipped v2 recipe end to end).
    small = {"num_images": 48, "vae_steps": 2, "vae_batch_size": 4, "decoder_steps": 2, "steps": 2, "batch_size": 4}
    small["architecture"], small["restarts"] = "v1", ()
    folder = run(PretrainConfig(work_dir=work, threads=1, warmup_steps=1, **small))
    # What the export recommended (v1's settings), kept for test_toy_pretrain; then what a model trained
    # this briefly can usefully recommend: few steps, few class images.
    (work / "exported_recommendations.json").write_text((folder / "db_adapters.json").read_text())
    (folder / "db_adapters.json").write_text(json.dumps({"steps": 4, "learning_rate": 1e-3, "num_class_images": 2}))
    return folder


def fixed_instance_loss(pipe, images, prompt: str) -> float:
    """The instance loss on fixed latents, noise and timesteps: comparable before and after training.

    Computed through the pipeline's family (its conditioning, denoiser call and objective), so it is
    the loss training minimises, for any family.
    """
    import torch

    from db_adapters.config import TrainConfig
    from db_adapters.data import crop_geometry, image_batch
    from db_adapters.families import family_of
    from db_adapters.latents import encode_images

    family = family_of(pipe)
    resolution = family.native_resolution(pipe)
    bank = encode_images(pipe.vae, image_batch(images, resolution))
    latents = ((bank.mean - bank.shift_factor) * bank.scaling_factor).repeat(4, 1, 1, 1)
    generator = torch_generator(1234)
    objective = family.objective(pipe, TrainConfig())
    noise = torch.randn(latents.shape, generator=generator)
    timesteps = objective.sample_timesteps(latents.shape[0], generator)
    with torch.no_grad():
        prompt_cond = family.encode_prompt(pipe, family.prompt_ids(pipe, prompt))
        conditioning_shared = family.run_conditioning(pipe, TrainConfig())
        conditioning = {k: v.expand(latents.shape[0], *v.shape[1:]) for k, v in prompt_cond.items()}
        per_image = family.image_conditioning([crop_geometry(i, resolution) for i in images], resolution)
        conditioning |= {k: v.repeat(4, *[1] * (v.ndim - 1)) for k, v in per_image.items()}
        conditioning |= {k: v.expand(latents.shape[0], *v.shape[1:]) for k, v in conditioning_shared.items()}
        noisy = objective.add_noise(latents, noise, timesteps)
        prediction = family.predict(getattr(pipe, family.denoiser), noisy, timesteps, conditioning)
    target = objective.target(latents, noise, timesteps)
    return torch.nn.functional.mse_loss(prediction, target).item()


def torch_generator(seed: int):
    import torch

    return torch.Generator().manual_seed(seed)
