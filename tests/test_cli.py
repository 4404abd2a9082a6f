"""db-adapt: each command works, and every bad input is one line and exit code 2, never a traceback."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from db_adapters.cli import main

FAST = ["--steps", "3", "--num-class-images", "2", "--class-inference-steps", "2"]


@pytest.fixture(scope="module")
def trained_adapter(tiny_dir, tmp_path_factory) -> Path:
    from conftest import make_subject_images

    root = tmp_path_factory.mktemp("cli")
    (root / "dog").mkdir()
    for i, image in enumerate(make_subject_images()):
        image.save(root / "dog" / f"{i}.png")
    out = root / "dog.safetensors"
    result = CliRunner().invoke(
        main,
        [
            "train",
            "--model",
            str(tiny_dir),
            "--images",
            str(root / "dog"),
            "--class-noun",
            "dog",
            "--output",
            str(out),
            "--output-dir",
            str(root / "run"),
            "--rank",
            "2",
            "--alpha",
            "4",
            *FAST,
        ],
    )
    assert result.exit_code == 0, result.output
    assert "identifier:" in result.output
    return out


def test_train_writes_an_adapter(trained_adapter, tiny_dir):
    from db_adapters.adapter_file import unpack_metadata
    from db_adapters.safe_reading import read_file_metadata, read_tensors

    header = read_file_metadata(trained_adapter)
    info = unpack_metadata(header, trained_adapter)
    assert info["strategy"] == "lora" and info["class_noun"] == "dog" and info["steps"] == 3
    assert info["strategy_config"]["rank"] == 2 and info["strategy_config"]["alpha"] == 4
    assert info["instance_prompt"] == f"a {info['identifier']} dog"
    assert info["base_model"]["family"] == "sd" and info["base_model"]["model_id"] == str(tiny_dir)
    # diffusers' own record, for plain load_lora_weights: rank 2, alpha 4.
    lora_metadata = json.loads(header["lora_adapter_metadata"])
    assert lora_metadata["unet.r"] == 2 and lora_metadata["unet.lora_alpha"] == 4
    tensors = read_tensors(trained_adapter)
    assert tensors and all(key.startswith("unet.") and ".lora_" in key for key in tensors)
    down = [t for k, t in tensors.items() if "lora_A" in k]
    assert down and all(t.shape[0] == 2 for t in down)  # rank 2
    assert any(t.abs().sum() > 0 for k, t in tensors.items() if "lora_B" in k)  # trained, not the zero init


def test_inspect_prints_metadata(trained_adapter):
    result = CliRunner().invoke(main, ["inspect", str(trained_adapter)])
    assert result.exit_code == 0, result.output
    info = json.loads(result.output)
    assert info["class_noun"] == "dog" and info["strategy"] == "lora"
    assert info["strategy_config"]["rank"] == 2 and info["strategy_config"]["alpha"] == 4
    assert info["tensors"] > 0


def test_generate_makes_a_grid_with_the_identifier(tiny_dir, trained_adapter, tmp_path):
    from PIL import Image

    out = tmp_path / "grid.png"
    result = CliRunner().invoke(
        main,
        [
            "generate",
            "--model",
            str(tiny_dir),
            "--adapter",
            str(trained_adapter),
            "--prompt",
            "a {id} dog",
            "--num-images",
            "4",
            "--steps",
            "2",
            "--seed",
            "3",
            "--guidance-scale",
            "5",
            "--negative-prompt",
            "blurry",
            "--lora-scale",
            "0.5",
            "--output",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    identifier = json.loads(CliRunner().invoke(main, ["inspect", str(trained_adapter)]).output)["identifier"]
    assert f"a {identifier} dog" in result.output
    assert Image.open(out).size == (64, 64)  # 2 x 2 grid of 32 px images


def _generate(tiny_dir: Path, adapter: Path, output: Path):
    args = ["generate", "--model", str(tiny_dir), "--adapter", str(adapter), "--prompt", "a {id} dog"]
    return CliRunner().invoke(main, [*args, "--num-images", "2", "--steps", "2", "--output", str(output)])


def test_generate_reads_a_kohya_lora_export_as_the_adapter_file_renders(tiny_dir, tmp_path):
    import numpy as np
    from conftest import make_subject_images
    from PIL import Image

    from db_adapters import personalize
    from db_adapters.testing import tiny_pipeline

    settings = {"rank": 4, "alpha": 8, "train_text_encoder": True, "steps": 2, "learning_rate": 5e-2}
    quick = {"prior_preservation": False, "progress": False, "output_dir": tmp_path}
    lora = personalize(tiny_pipeline(seed=0), make_subject_images(), "dog", **settings, **quick)
    own = lora.save(tmp_path / "dog.safetensors")
    kohya = lora.save(tmp_path / "dog_kohya.safetensors", format="kohya")
    results = {"own": _generate(tiny_dir, own, tmp_path / "own.png")}
    results["kohya"] = _generate(tiny_dir, kohya, tmp_path / "kohya.png")
    base = ["generate", "--model", str(tiny_dir), "--prompt", lora.instance_prompt, "--num-images", "2"]
    results["base"] = CliRunner().invoke(main, [*base, "--steps", "2", "--output", str(tmp_path / "base.png")])
    assert all(result.exit_code == 0 for result in results.values()), {k: r.output for k, r in results.items()}
    assert f"of {lora.instance_prompt!r}" in results["kohya"].output  # the identifier, from the kohya file
    pixels = {name: np.asarray(Image.open(tmp_path / f"{name}.png"), dtype=int) for name in results}
    assert np.abs(pixels["kohya"] - pixels["own"]).max() <= 1  # through diffusers' kohya reader: the same images
    assert np.abs(pixels["base"] - pixels["own"]).max() > 3  # and the adapter is in them


def test_generate_refuses_a_lycoris_kohya_file_with_what_to_use(tiny_dir, tmp_path):
    from conftest import make_subject_images

    from db_adapters import personalize
    from db_adapters.testing import tiny_pipeline

    quick = {"steps": 1, "prior_preservation": False, "progress": False, "output_dir": tmp_path}
    loha = personalize(tiny_pipeline(seed=0), make_subject_images(), "dog", strategy="loha", **quick)
    result = _generate(tiny_dir, loha.save(tmp_path / "dog_comfyui.safetensors", format="kohya"), tmp_path / "g.png")
    assert result.exit_code == 2 and "Traceback" not in result.output
    (line,) = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert "loha adapter in LyCORIS/kohya keys, a file for ComfyUI and A1111" in line
    assert "Generate from the db-adapters file" in line and not (tmp_path / "g.png").exists()


@pytest.fixture(scope="module")
def img2img_dir(tmp_path_factory) -> Path:
    from diffusers import StableDiffusionImg2ImgPipeline

    from db_adapters.testing import tiny_components

    folder = tmp_path_factory.mktemp("models") / "img2img"
    StableDiffusionImg2ImgPipeline(**tiny_components()).save_pretrained(folder)
    return folder


def bad_input_cases(tiny_dir: Path, img2img_dir: Path, tmp: Path, adapter: Path) -> dict[str, tuple[list[str], str]]:
    empty = tmp / "empty"
    empty.mkdir(exist_ok=True)
    corrupt = tmp / "corrupt"
    corrupt.mkdir(exist_ok=True)
    (corrupt / "good.png").write_bytes((adapter.parent / "dog" / "0.png").read_bytes())
    (corrupt / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    dog = str(adapter.parent / "dog")
    pickle = tmp / "adapter.bin"
    pickle.write_bytes(b"\x80\x04pickle")
    train = ["train", "--model", str(tiny_dir), "--class-noun", "dog", "--output", str(tmp / "o.safetensors"), *FAST]
    gen = ["generate", "--model", str(tiny_dir), "--prompt", "a {id} dog", "--output", str(tmp / "g.png")]
    return {
        "missing folder": ([*train, "--images", str(tmp / "nowhere")], "does not exist"),
        "folder without images": ([*train, "--images", str(empty)], "no images"),
        "corrupt image": ([*train, "--images", str(corrupt)], "broken.jpg"),
        "empty class noun": (
            [
                "train",
                "--model",
                str(tiny_dir),
                "--images",
                dog,
                "--class-noun",
                " ",
                "--output",
                str(tmp / "o.safetensors"),
            ],
            "class noun",
        ),
        "output not safetensors": ([*train[:-6], "--images", dog, "--output", str(tmp / "o.pt")], ".safetensors"),
        "pickle adapter": ([*gen, "--adapter", str(pickle)], "only safetensors"),
        "adapter missing": ([*gen, "--adapter", str(tmp / "nope.safetensors")], "does not exist"),
        "unsupported pipeline": (
            [
                "train",
                "--model",
                str(img2img_dir),
                "--images",
                dog,
                "--class-noun",
                "dog",
                "--output",
                str(tmp / "o.safetensors"),
            ],
            "StableDiffusionImg2ImgPipeline",
        ),
        "missing model": (
            [
                "train",
                "--model",
                str(tmp / "no-model"),
                "--images",
                dog,
                "--class-noun",
                "dog",
                "--output",
                str(tmp / "o.safetensors"),
            ],
            "could not be loaded",
        ),
        "not a pipeline folder": (
            [
                "train",
                "--model",
                str(empty),
                "--images",
                dog,
                "--class-noun",
                "dog",
                "--output",
                str(tmp / "o.safetensors"),
            ],
            "model_index.json",
        ),
        "id without adapter": (gen, "no --adapter"),
        "inspect non-safetensors": (["inspect", str(pickle)], "only safetensors"),
        "bad steps": ([*train[:-6], "--images", dog, "--steps", "0"], "steps"),
        "unknown strategy": ([*train, "--images", dog, "--strategy", "nope"], "unknown strategy"),
    }


CASES = [
    "missing folder",
    "folder without images",
    "corrupt image",
    "empty class noun",
    "output not safetensors",
    "pickle adapter",
    "adapter missing",
    "unsupported pipeline",
    "missing model",
    "not a pipeline folder",
    "id without adapter",
    "inspect non-safetensors",
    "bad steps",
    "unknown strategy",
]


@pytest.mark.parametrize("case", CASES)
def test_bad_input_is_one_line_exit_2(case, tiny_dir, img2img_dir, trained_adapter, tmp_path):
    args, expected = bad_input_cases(tiny_dir, img2img_dir, tmp_path, trained_adapter)[case]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(lines) == 1 and expected in lines[0], result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "o.safetensors").exists()


def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    command = [sys.executable, "-m", "db_adapters.cli", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)


def test_commands_as_real_subprocesses(tiny_dir, trained_adapter, tmp_path):
    out = tmp_path / "sub.safetensors"
    trained = run_cli(
        "train",
        "--model",
        str(tiny_dir),
        "--images",
        str(trained_adapter.parent / "dog"),
        "--class-noun",
        "dog",
        "--output",
        str(out),
        "--output-dir",
        str(tmp_path / "run"),
        *FAST,
    )
    assert trained.returncode == 0, trained.stderr
    assert out.exists() and "saved" in trained.stdout
    inspected = run_cli("inspect", str(out))
    assert inspected.returncode == 0 and json.loads(inspected.stdout)["class_noun"] == "dog"
    generated = run_cli(
        "generate",
        "--model",
        str(tiny_dir),
        "--adapter",
        str(out),
        "--prompt",
        "a {id} dog",
        "--steps",
        "2",
        "--output",
        str(tmp_path / "g.png"),
    )
    assert generated.returncode == 0, generated.stderr
    assert (tmp_path / "g.png").exists()


def test_bad_input_as_a_real_subprocess(tiny_dir, tmp_path):
    result = run_cli(
        "train",
        "--model",
        str(tiny_dir),
        "--images",
        str(tmp_path / "nowhere"),
        "--class-noun",
        "dog",
        "--output",
        str(tmp_path / "o.safetensors"),
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("Error: --images:") and "does not exist" in lines[0]


def test_entry_point_is_installed():
    result = subprocess.run(["db-adapt", "--help"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and "train" in result.stdout and "generate" in result.stdout


@pytest.mark.parametrize("family", ["sdxl", "sd3", "flux"])
def test_train_generate_inspect_on_other_families_folders(family, tmp_path, subject_dir):
    from db_adapters.testing import tiny_pipeline_of

    model = tmp_path / f"tiny-{family}"
    tiny_pipeline_of(family).save_pretrained(model)
    adapter = tmp_path / f"dog_{family}.safetensors"
    trained = CliRunner().invoke(
        main,
        ["train", "--model", str(model), "--images", str(subject_dir), "--class-noun", "dog", "--output", str(adapter)]
        # 32 px: a saved tiny Flux folder forgets its tiny default size (FluxPipeline fixes it at 128 latents).
        + ["--output-dir", str(tmp_path / "run"), "--train-text-encoder", "--resolution", "32", *FAST],
    )
    assert trained.exit_code == 0, trained.output
    inspected = CliRunner().invoke(main, ["inspect", str(adapter)])
    assert inspected.exit_code == 0, inspected.output
    info = json.loads(inspected.output)
    assert info["base_model"]["family"] == family and info["train_text_encoder"] is True
    out = tmp_path / "grid.png"
    generated = CliRunner().invoke(
        main,
        ["generate", "--model", str(model), "--adapter", str(adapter), "--prompt", "a {id} dog", "--steps", "2"]
        + ["--num-images", "2", "--output", str(out)],
    )
    assert generated.exit_code == 0, generated.output
    assert f"a {info['identifier']} dog" in generated.output and out.stat().st_size > 0


def test_each_settings_help_is_written_once_and_shown_in_both_places():
    """help(personalize) and `db-adapt train --help` show the same text, from the field in config.py
    (or the strategy's Options), for every setting the command line offers."""
    from dataclasses import fields

    from db_adapters import personalize
    from db_adapters.config import TrainConfig
    from db_adapters.strategies import get_strategy

    cli_help = " ".join(CliRunner().invoke(main, ["train", "--help"], terminal_width=400).output.split())
    doc = " ".join((personalize.__doc__ or "").split())
    specs = [s for s in (*fields(TrainConfig), *fields(get_strategy("lora").Options)) if s.metadata["cli"]]
    for spec in specs:
        text = " ".join(spec.metadata["help"].split())
        assert text in doc, spec.name
        assert text in cli_help, spec.name
        flag = spec.metadata.get("flag") or "--" + spec.name.replace("_", "-")
        assert flag in cli_help, flag
    # Every keyword is in the signature too, with its default (IDEs and inspect read it).
    import inspect

    parameters = inspect.signature(personalize).parameters
    assert all(parameters[s.name].default == s.default for s in fields(TrainConfig))
