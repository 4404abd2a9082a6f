"""The examples run as users run them, and `import db_adapters` stays quiet and light."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

from conftest import make_subject_images

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def load_example(name: str):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_sd15_example_runs_against_a_local_model_folder(tiny_dir, tmp_path):
    photos = tmp_path / "dog"
    photos.mkdir()
    for i, image in enumerate(make_subject_images()):
        image.save(photos / f"{i}.png")
    out = tmp_path / "dog.safetensors"
    load_example("sd15_dreambooth").main(
        [
            "--model",
            str(tiny_dir),
            "--images",
            str(photos),
            "--class-noun",
            "dog",
            "--output",
            str(out),
            "--output-dir",
            str(tmp_path / "run"),
            "--steps",
            "3",
            "--num-class-images",
            "2",
            "--sample-steps",
            "2",
            "--device",
            "cpu",
        ]
    )
    assert out.exists() and (tmp_path / "run" / "beach.png").exists()


def test_offline_quickstart_runs(tmp_path, capsys):
    load_example("quickstart_tiny").main(["--out", str(tmp_path), "--steps", "3"])
    printed = capsys.readouterr().out
    assert "max pixel difference 0 (of 255)" in printed
    assert (tmp_path / "sheet.png").exists() and (tmp_path / "ball.safetensors").exists()


def test_import_is_quiet_and_loads_no_heavy_modules():
    code = (
        "import sys, db_adapters; heavy = ('torch', 'diffusers', 'peft', 'transformers', 'bitsandbytes'); "
        "print(sorted(m for m in heavy if m in sys.modules)); print(db_adapters.__version__)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0
    assert result.stderr == ""
    assert result.stdout.splitlines()[0] == "[]"
