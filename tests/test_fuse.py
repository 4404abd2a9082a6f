"""Fusing: `fuse_adapter` + `save_pipeline` (and `db-adapt fuse`) write a full diffusers folder that loads with plain
`DiffusionPipeline.from_pretrained`, renders as the adapted pipeline, and holds base + the adapter's update."""

from __future__ import annotations

import errno

import pytest
import torch
from click.testing import CliRunner
from conftest import make_subject_images, render_np

from db_adapters import AdapterError, InputError, load_adapter, personalize
from db_adapters.adapter import attached_adapter
from db_adapters.cli import main
from db_adapters.families import get_family
from db_adapters.fuse import fuse_adapter, save_pipeline
from db_adapters.safe_reading import read_weights
from db_adapters.testing import tiny_pipeline_of

QUICK = {"prior_preservation": False, "progress": False, "train_text_encoder": True, "steps": 2}
SETTINGS = {"lora": {"rank": 4, "alpha": 8, "learning_rate": 5e-2}, "full": {"learning_rate": 5e-3}}
_TRAINED: dict[tuple[str, str], tuple] = {}


def trained(family: str, strategy: str, tmp_path_factory) -> tuple:
    """A trained adapter per (family, strategy) for the whole file: its file, prompt and rendered pixels."""
    if (family, strategy) not in _TRAINED:
        pipe = tiny_pipeline_of(family)
        folder = tmp_path_factory.mktemp(f"{family}-{strategy}")
        settings = SETTINGS[strategy] | QUICK
        adapter = personalize(pipe, make_subject_images(), "dog", strategy=strategy, output_dir=folder, **settings)
        path = adapter.save(folder / "dog.safetensors")
        _TRAINED[family, strategy] = (path, adapter.instance_prompt, render_np(pipe, adapter.instance_prompt))
    return _TRAINED[family, strategy]


def from_folder(family: str, folder):
    from diffusers import DiffusionPipeline

    # No invisible watermark on SDXL, as in the tiny pipeline: it would change the pixels.
    extra = {"add_watermarker": False} if family == "sdxl" else {}
    pipe = DiffusionPipeline.from_pretrained(str(folder), **extra)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def expected_weights(base: dict, path, component: str, strategy: str) -> dict[str, torch.Tensor]:
    """The component's weights the adapter file says it should have: base + (alpha / rank) B @ A, or the file's."""
    weights = read_weights(path)
    if strategy == "full":
        return {key.partition(".")[2]: t for key, t in weights.items() if key.startswith(f"{component}.")}
    expected = dict(base)
    for key, down in weights.items():
        if not key.startswith(f"{component}.") or ".lora_A." not in key:
            continue
        module = key.partition(".")[2].removesuffix(".lora_A.weight")
        name = f"{module}.weight" if f"{module}.weight" in base else f"{module.removeprefix('text_model.')}.weight"
        up = weights[key.replace(".lora_A.", ".lora_B.")]
        expected[name] = base[name] + (8 / 4) * up @ down  # alpha 8, rank 4
    return expected


@pytest.mark.parametrize("strategy", ["lora", "full"])
@pytest.mark.parametrize("family", ["sd", "sdxl"])
def test_fused_folder_renders_as_the_adapted_pipeline_and_holds_base_plus_update(
    family, strategy, tmp_path, tmp_path_factory
):
    path, prompt, expected = trained(family, strategy, tmp_path_factory)
    pipe = tiny_pipeline_of(family)
    components = get_family(family).components(train_text_encoder=True)
    base = {name: {k: v.clone() for k, v in getattr(pipe, name).state_dict().items()} for name in components}
    load_adapter(pipe, path)
    fuse_adapter(pipe)
    assert attached_adapter(pipe) is None
    assert not any("lora" in k for name in components for k in getattr(pipe, name).state_dict())
    folder = save_pipeline(pipe, tmp_path / "fused")
    assert [p.name for p in tmp_path.iterdir()] == ["fused"]  # the staging folder was renamed, nothing left over
    assert list(folder.rglob("*.safetensors")) and not list(folder.rglob("*.bin"))

    loaded = from_folder(family, folder)
    assert type(loaded) is type(pipe)
    got = render_np(loaded, prompt)
    diff = float(abs(got - expected).max())
    print(f"\n{family} {strategy}: fused folder vs adapted pipeline: max |pixel diff| {diff:.2e}")
    assert diff <= 1e-4
    assert abs(got - render_np(tiny_pipeline_of(family), prompt)).max() > 1e-3  # and it is not the base model
    for name in components:
        state = getattr(loaded, name).state_dict()
        want = expected_weights(base[name], path, name, strategy)
        assert set(state) == set(want), name
        for key, tensor in want.items():
            torch.testing.assert_close(state[key], tensor, rtol=1e-5, atol=1e-6, msg=f"{name}.{key}")


def test_a_failed_write_leaves_no_folder_and_names_the_output(tmp_path, monkeypatch):
    pipe = tiny_pipeline_of("sd")

    def full_disk(self, folder, **kwargs):
        (tmp_path / "partial").mkdir(exist_ok=True)
        real(self, folder, **kwargs)  # the whole pipeline is written, then the disk fills up
        raise OSError(errno.ENOSPC, "No space left on device")

    real = type(pipe).save_pretrained
    monkeypatch.setattr(type(pipe), "save_pretrained", full_disk)
    with pytest.raises(OSError, match="No space left on device") as raised:
        save_pipeline(pipe, tmp_path / "fused")
    assert raised.value.filename == str(tmp_path / "fused")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["partial"]


def test_fuse_refuses_a_used_folder_and_a_pipeline_without_adapter(tmp_path):
    used = tmp_path / "used"
    used.mkdir()
    (used / "keep.txt").write_text("mine")
    pipe = tiny_pipeline_of("sd")
    with pytest.raises(InputError, match="exists and is not empty"):
        save_pipeline(pipe, used)
    assert [p.name for p in used.iterdir()] == ["keep.txt"]
    with pytest.raises(AdapterError, match="carries no db-adapters adapter to fuse"):
        fuse_adapter(pipe)


# --- db-adapt fuse --------------------------------------------------------------------------------------------


def test_fuse_command_writes_a_pipeline_folder(tiny_dir, tmp_path, tmp_path_factory):
    path, prompt, expected = trained("sd", "lora", tmp_path_factory)
    output = tmp_path / "fused"
    output.mkdir()  # an empty folder is fine
    args = ["fuse", "--model", str(tiny_dir), "--adapter", str(path), "--output", str(output), "--device", "cpu"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert "fused" in result.output and "identifier:" in result.output
    assert abs(render_np(from_folder("sd", output), prompt) - expected).max() <= 1e-4

    half = tmp_path / "fused-fp16"
    result = CliRunner().invoke(main, [*args[:-4], "--output", str(half), "--dtype", "fp16", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert {t.dtype for t in read_weights(next((half / "unet").glob("*.safetensors"))).values()} == {torch.float16}


def bad_fuse_cases(tiny_dir, tmp_path, lora):
    from db_adapters.formats import export_adapter

    used = tmp_path / "used"
    used.mkdir()
    (used / "keep.txt").write_text("mine")
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    pickle = tmp_path / "adapter.bin"
    pickle.write_bytes(b"\x80\x04pickle")
    kohya = export_adapter(lora, tmp_path / "kohya.safetensors", "kohya")
    base = ["fuse", "--model", str(tiny_dir), "--device", "cpu"]
    out = ["--output", str(tmp_path / "out")]
    return {
        "output not empty": ([*base, "--adapter", str(lora), "--output", str(used)], "exists and is not empty"),
        "output is a file": ([*base, "--adapter", str(lora), "--output", str(a_file)], "a_file"),
        "adapter missing": ([*base, "--adapter", str(tmp_path / "nope.safetensors"), *out], "does not exist"),
        "pickle adapter": ([*base, "--adapter", str(pickle), *out], "only safetensors"),
        "kohya export": ([*base, "--adapter", str(kohya), *out], "kohya-format export"),
        "missing model": (["fuse", "--model", str(tmp_path / "nowhere"), "--adapter", str(lora), *out], "no such"),
        "bad dtype": ([*base, "--adapter", str(lora), *out, "--dtype", "fp8"], "'fp8' is not one of"),
    }


@pytest.mark.parametrize(
    "case",
    ["output not empty", "output is a file", "adapter missing", "pickle adapter", "kohya export", "missing model"]
    + ["bad dtype"],
)
def test_bad_fuse_input_is_one_line_exit_2(case, tiny_dir, tmp_path, tmp_path_factory):
    path, _, _ = trained("sd", "lora", tmp_path_factory)
    args, expected = bad_fuse_cases(tiny_dir, tmp_path, path)[case]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(lines) == 1 and expected in lines[0], result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "out").exists()
    assert [p.name for p in (tmp_path / "used").iterdir()] == ["keep.txt"]
