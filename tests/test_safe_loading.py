"""Safe loading: only safetensors are read, every damaged adapter file is an `AdapterError` naming it,
file-system problems stay `OSError`, and a load that fails leaves the pipeline exactly as it was.

The helpers here (real adapter files, raw safetensors editing, pipeline snapshots) are shared with
`test_fuzz_loading.py`.
"""

from __future__ import annotations

import builtins
import errno
import io
import json
import os
import pickle
import struct
from pathlib import Path

import pytest
import torch
from conftest import make_subject_images

from db_adapters import AdapterError, load_adapter, personalize, unload_adapter
from db_adapters.adapter import attached_adapter
from db_adapters.pipelines import architecture_fingerprint
from db_adapters.testing import tiny_pipeline

COMPONENTS = ("unet", "text_encoder")


# --- shared helpers ---------------------------------------------------------------------------


def make_adapter_files(folder: Path) -> dict[str, Path]:
    """Real adapter files from one training step each: LoRA rank 4 (UNet; UNet + text encoder) and full."""
    folder.mkdir(parents=True, exist_ok=True)
    images = make_subject_images()
    settings = {"steps": 1, "prior_preservation": False, "progress": False, "learning_rate": 1e-3}
    files = {}
    for name, strategy, options in [
        ("lora", "lora", {"rank": 4}),
        ("lora_te", "lora", {"rank": 4, "train_text_encoder": True}),
        ("full", "full", {}),
    ]:
        adapter = personalize(tiny_pipeline(), images, "dog", strategy=strategy, **settings, **options)
        files[name] = adapter.save(folder / f"{name}.safetensors")
    return files


def split_file(raw: bytes) -> tuple[dict, bytes]:
    """A safetensors file's parsed JSON header (with `__metadata__`) and its data bytes."""
    length = struct.unpack("<Q", raw[:8])[0]
    return json.loads(raw[8 : 8 + length]), raw[8 + length :]


def join_file(header: dict | bytes, data: bytes) -> bytes:
    """Inverse of `split_file`; a header given as bytes is written as is (with its true length)."""
    text = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + data


def tensor_blobs(raw: bytes) -> tuple[dict[str, tuple[str, list[int], bytes]], dict[str, str]]:
    """Every tensor as (dtype, shape, bytes), in file order, and the text metadata."""
    header, data = split_file(raw)
    metadata = header.pop("__metadata__", {})
    ordered = sorted(header.items(), key=lambda item: item[1]["data_offsets"][0])
    blobs = {name: (e["dtype"], e["shape"], data[slice(*e["data_offsets"])]) for name, e in ordered}
    return blobs, metadata


def build_file(blobs: dict[str, tuple[str, list[int], bytes]], metadata: dict[str, str]) -> bytes:
    """A consistent safetensors file (offsets laid out afresh) from `tensor_blobs`-style parts."""
    header: dict = {"__metadata__": metadata}
    position = 0
    for name, (dtype, shape, blob) in blobs.items():
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [position, position + len(blob)]}
        position += len(blob)
    return join_file(header, b"".join(blob for _, _, blob in blobs.values()))


def edit_metadata(raw: bytes, change) -> bytes:
    """The file with `change(info)` applied to its parsed db-adapters metadata."""
    header, data = split_file(raw)
    info = json.loads(header["__metadata__"]["db_adapters"])
    change(info)
    header["__metadata__"]["db_adapters"] = json.dumps(info)
    return join_file(header, data)


def snapshot(pipe) -> dict[str, dict[str, torch.Tensor]]:
    return {c: {k: v.detach().clone() for k, v in getattr(pipe, c).state_dict().items()} for c in COMPONENTS}


def assert_unchanged(pipe, before: dict[str, dict[str, torch.Tensor]]) -> None:
    """The pipeline carries no adapter, no LoRA layer, and every weight as in `before`."""
    assert attached_adapter(pipe) is None
    for component in COMPONENTS:
        module = getattr(pipe, component)
        assert not getattr(module, "peft_config", None), component
        state = module.state_dict()
        # A LoRA layer left behind adds keys (and renames its base layer's); a half-written load changes values.
        assert state.keys() == before[component].keys(), component
        changed = [key for key, value in state.items() if not torch.equal(value, before[component][key])]
        assert not changed, f"{component}: {changed[:3]}"


# --- fixtures ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    return make_adapter_files(tmp_path_factory.mktemp("adapters"))


@pytest.fixture(scope="module")
def pipe():
    return tiny_pipeline()


@pytest.fixture(scope="module")
def base_state(pipe) -> dict[str, dict[str, torch.Tensor]]:
    return snapshot(pipe)


@pytest.fixture
def no_unpickling(monkeypatch):
    """Make every way of unpickling fail the test loudly."""

    def forbidden(*args, **kwargs):
        raise AssertionError("something tried to unpickle")

    monkeypatch.setattr(torch, "load", forbidden)
    monkeypatch.setattr(pickle, "load", forbidden)
    monkeypatch.setattr(pickle, "loads", forbidden)
    monkeypatch.setattr(pickle, "Unpickler", forbidden)


# --- pickles are refused --------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle", ".PT"])
def test_pickle_suffixes_are_refused_without_opening(suffix, tmp_path, pipe, monkeypatch, no_unpickling):
    path = tmp_path / f"adapter{suffix}"
    path.write_bytes(pickle.dumps({"unet.x": [1.0]}))
    gone = tmp_path / f"missing{suffix}"  # opening this would raise FileNotFoundError, not AdapterError

    def no_open(*args, **kwargs):
        raise AssertionError(f"opened {args[:1]}")

    import safetensors
    import safetensors.torch

    for owner, name in [(builtins, "open"), (io, "open"), (os, "open"), (safetensors, "safe_open")]:
        monkeypatch.setattr(owner, name, no_open)
    monkeypatch.setattr(safetensors.torch, "load_file", no_open)
    for target in (path, gone):
        with pytest.raises(AdapterError) as caught:
            load_adapter(pipe, target)
        message = str(caught.value)
        assert str(target) in message and "only safetensors" in message
        assert "safetensors.torch.save_file(" in message and "weights_only=True" in message
    monkeypatch.undo()
    assert attached_adapter(pipe) is None


def test_safetensors_name_with_pickle_or_zip_bytes_is_refused(tmp_path, pipe, no_unpickling):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))  # unpickling this would create `marker`

    evil = tmp_path / "evil.safetensors"
    evil.write_bytes(pickle.dumps(Payload(), protocol=4))
    with pytest.raises(AdapterError, match=r"evil\.safetensors.*bytes are a pickle.*save_file"):
        load_adapter(pipe, evil)
    zipped = tmp_path / "zipped.safetensors"
    buffer = io.BytesIO()
    torch.save({"unet.x": torch.zeros(2)}, buffer)
    zipped.write_bytes(buffer.getvalue())
    with pytest.raises(AdapterError, match=r"zipped\.safetensors.*ZIP archive"):
        load_adapter(pipe, zipped)
    old_pickle = tmp_path / "old.safetensors"
    old_pickle.write_bytes(pickle.dumps({"a": 1}, protocol=0))  # no magic byte: caught by the header checks
    with pytest.raises(AdapterError, match=r"old\.safetensors.*not a valid safetensors file"):
        load_adapter(pipe, old_pickle)
    assert not marker.exists()


def test_a_header_length_that_starts_like_a_pickle_is_still_read(tmp_path):
    """A header length of 0x..80 bytes begins with the pickle magic byte; the header after it decides."""
    from safetensors.torch import save_file

    from db_adapters.safe_reading import read_tensors

    path = tmp_path / "ok.safetensors"
    for padding in range(256):
        save_file({"unet.x": torch.ones(2)}, str(path), metadata={"note": "x" * padding})
        if path.read_bytes()[0] == 0x80:
            break
    assert path.read_bytes()[0] == 0x80
    assert torch.equal(read_tensors(path)["unet.x"], torch.ones(2))


# --- every damaged file is an AdapterError naming the file ------------------------------------------


def _set_header_length(raw: bytes, length: int) -> bytes:
    return struct.pack("<Q", length) + raw[8:]


def _edit_entry(raw: bytes, change, index: int = 0) -> bytes:
    header, data = split_file(raw)
    names = sorted((n for n in header if n != "__metadata__"), key=lambda n: header[n]["data_offsets"][0])
    change(header[names[index]], header, names)
    return join_file(header, data)


def _edit_blobs(raw: bytes, change) -> bytes:
    blobs, metadata = tensor_blobs(raw)
    change(blobs, metadata)
    return build_file(blobs, metadata)


def _first(blobs: dict, part: str) -> str:
    return next(name for name in blobs if part in name)


def _other_architecture(info: dict) -> None:
    info["base_model"]["architecture"] = architecture_fingerprint(tiny_pipeline(v_prediction=True))


def _set_config(key, value):
    return lambda info: info["strategy_config"].__setitem__(key, value)


def _set_field(key, value):
    return lambda info: info.__setitem__(key, value)


def _lora_metadata_rank(raw: bytes) -> bytes:
    header, data = split_file(raw)
    lora = json.loads(header["__metadata__"]["lora_adapter_metadata"])
    lora["unet.r"] = 8
    header["__metadata__"]["lora_adapter_metadata"] = json.dumps(lora)
    return join_file(header, data)


def _nan(blobs, metadata):
    dtype, shape, blob = blobs[_first(blobs, "lora_B")]
    blobs[_first(blobs, "lora_B")] = (dtype, shape, struct.pack("<f", float("nan")) + blob[4:])


# name: (base file, mutation of its bytes, what the message must say)
DAMAGE = {
    "truncated to 5 bytes": ("lora_te", lambda raw: raw[:5], r"truncated to 5 bytes"),
    "truncated in the header": ("lora_te", lambda raw: raw[:200], r"runs past the end of the file"),
    "truncated in the data": ("lora_te", lambda raw: raw[:-100], r"truncated\?"),
    "header length absurd": ("lora_te", lambda raw: _set_header_length(raw, 2**62), r"header length \d+ is absurd"),
    "header length past the end": (
        "lora_te",
        lambda raw: _set_header_length(raw, len(raw)),
        r"runs past the end of the file",
    ),
    "header length one short": (
        "lora_te",
        lambda raw: _set_header_length(raw, struct.unpack("<Q", raw[:8])[0] - 1),
        r"not a valid safetensors file",
    ),
    "header not JSON": ("lora_te", lambda raw: join_file(b"{this is not json", split_file(raw)[1]), r"not JSON"),
    "header not UTF-8": ("lora_te", lambda raw: join_file(b"\xff\xfe{}", split_file(raw)[1]), r"not JSON"),
    "header a JSON list": ("lora_te", lambda raw: join_file(b"[1, 2]", split_file(raw)[1]), r"not a JSON object"),
    "header nested too deep": ("lora_te", lambda raw: join_file(b"[" * 100_000, split_file(raw)[1]), r"not JSON"),
    "header repeats a key": (
        "lora_te",
        lambda raw: join_file(b'{"a": 1, "a": 2}', split_file(raw)[1]),
        r"duplicate key 'a'",
    ),
    "dtype unknown": (
        "lora_te",
        lambda raw: _edit_entry(raw, lambda e, h, n: e.__setitem__("dtype", "F31")),
        r"unknown dtype 'F31'",
    ),
    "dtype integer, same size": (
        "lora_te",
        lambda raw: _edit_entry(raw, lambda e, h, n: e.__setitem__("dtype", "I32")),
        r"has dtype I32; expected one of",
    ),
    "dtype of another size": (
        "lora_te",
        lambda raw: _edit_entry(raw, lambda e, h, n: e.__setitem__("dtype", "F16")),
        r"F16 \[\d+, \d+\] needs \d+",
    ),
    "offsets overlap": (
        "lora_te",
        lambda raw: _edit_entry(raw, lambda e, h, n: e.__setitem__("data_offsets", h[n[0]]["data_offsets"]), 1),
        r"overlaps the previous tensor",
    ),
    "offsets past the data": (
        "lora_te",
        lambda raw: _edit_entry(
            raw, lambda e, h, n: e.__setitem__("data_offsets", [x + 4096 for x in e["data_offsets"]]), -1
        ),
        r"leaves a gap before it",
    ),
    "offsets negative": (
        "lora_te",
        lambda raw: _edit_entry(raw, lambda e, h, n: e.__setitem__("data_offsets", [-4, e["data_offsets"][1]])),
        r"not two non-negative integers",
    ),
    "shape against its bytes": (
        "lora_te",
        lambda raw: _edit_entry(raw, lambda e, h, n: e.__setitem__("shape", [e["shape"][0] + 1, e["shape"][1]])),
        r"needs \d+",
    ),
    "__metadata__ not strings": (
        "lora_te",
        lambda raw: _edit_entry(raw, lambda e, h, n: h["__metadata__"].__setitem__("db_adapters", 5)),
        r"__metadata__ is not a JSON object of strings",
    ),
    "our metadata not JSON": (
        "lora_te",
        lambda raw: _edit_entry(raw, lambda e, h, n: h["__metadata__"].__setitem__("db_adapters", "{identifier")),
        r"malformed db-adapters metadata",
    ),
    "rank as a string": ("lora_te", lambda raw: edit_metadata(raw, _set_config("rank", "4")), r"rank='4'"),
    "identifier a number": (
        "lora_te",
        lambda raw: edit_metadata(raw, _set_field("identifier", 5)),
        r"'identifier' is 5",
    ),
    "identifier empty": ("lora_te", lambda raw: edit_metadata(raw, _set_field("identifier", "")), r"'identifier'"),
    "steps true": ("lora_te", lambda raw: edit_metadata(raw, _set_field("steps", True)), r"'steps' is true"),
    "resolution a string": ("lora", lambda raw: edit_metadata(raw, _set_field("resolution", "32")), r"'resolution'"),
    "base_model a string": ("lora", lambda raw: edit_metadata(raw, _set_field("base_model", "sd15")), r"'base_model'"),
    "format from the future": ("lora", lambda raw: edit_metadata(raw, _set_field("format_version", 99)), r"upgrade"),
    "unknown strategy": ("lora", lambda raw: edit_metadata(raw, _set_field("strategy", "nope")), r"unknown strategy"),
    "option of another strategy": (
        "full",
        lambda raw: edit_metadata(raw, _set_config("rank", 4)),
        r"do not belong to strategy 'full'",
    ),
    "text-encoder flag wrong (LoRA)": (
        "lora",
        lambda raw: edit_metadata(raw, _set_field("train_text_encoder", True)),
        r"train_text_encoder=True but the file holds no text-encoder",
    ),
    "text-encoder flag wrong (full)": (
        "full",
        lambda raw: edit_metadata(raw, _set_field("train_text_encoder", True)),
        r"train_text_encoder=True but the file holds no text-encoder",
    ),
    "diffusers' rank disagrees": ("lora", _lora_metadata_rank, r"lora_adapter_metadata has unet.r=8"),
    "missing key": (
        "lora_te",
        lambda raw: _edit_blobs(raw, lambda b, m: b.pop(_first(b, "text_encoder."))),
        r"text_encoder LoRA weights do not match this pipeline: missing",
    ),
    "extra key": (
        "lora",
        lambda raw: _edit_blobs(raw, lambda b, m: b.__setitem__("unet.extra.lora_A.weight", b[_first(b, "lora_A")])),
        r"unet LoRA weights do not match this pipeline: unexpected \['extra.lora_A.weight'\]",
    ),
    "key of no component": (
        "lora",
        lambda raw: _edit_blobs(raw, lambda b, m: b.__setitem__("vae.x", b[_first(b, "lora_A")])),
        r"unexpected tensor 'vae.x'",
    ),
    "no UNet weights": (
        "lora_te",
        lambda raw: _edit_blobs(raw, lambda b, m: [b.pop(k) for k in list(b) if k.startswith("unet.")]),
        r"holds no unet weights",
    ),
    "LoRA shape for another rank": (
        "lora",
        lambda raw: _edit_blobs(
            raw, lambda b, m: b.__setitem__(_first(b, "lora_A"), ("F32", [5, 32], bytes(5 * 32 * 4)))
        ),
        r"has shape \(5, 32\); this pipeline with rank 4 expects \(4, 32\)",
    ),
    "LoRA shape transposed": (
        "lora",
        lambda raw: _edit_entry(raw, lambda e, h, n: e.__setitem__("shape", e["shape"][::-1])),
        r"has shape \(32, 4\); this pipeline with rank 4 expects \(4, 32\)",
    ),
    "full weight of another shape": (
        "full",
        lambda raw: _edit_entry(raw, lambda e, h, n: e.__setitem__("shape", [1, *e["shape"]])),
        r"unet\.\S+ has shape \(1, \d+.*\), this pipeline expects",
    ),
    "full weight missing": (
        "full",
        lambda raw: _edit_blobs(raw, lambda b, m: b.pop(_first(b, "conv_out"))),
        r"unet weights do not match this pipeline \(missing \['conv_out",
    ),
    "NaN weight": ("lora", lambda raw: _edit_blobs(raw, _nan), r"holds NaN or infinite values"),
    "another architecture": ("lora", lambda raw: edit_metadata(raw, _other_architecture), r"another architecture"),
}


@pytest.mark.parametrize("case", list(DAMAGE))
def test_damaged_file_is_an_adapter_error_naming_it(case, files, pipe, base_state, tmp_path, no_unpickling):
    base, mutate, expected = DAMAGE[case]
    path = tmp_path / "damaged.safetensors"
    path.write_bytes(mutate(files[base].read_bytes()))
    with pytest.raises(AdapterError, match=expected) as caught:
        load_adapter(pipe, path)
    assert str(path) in str(caught.value)
    assert_unchanged(pipe, base_state)


@pytest.mark.parametrize("base", ["lora", "lora_te", "full"])
def test_undamaged_files_still_load_after_the_damaged_ones(base, files, pipe, base_state):
    adapter = load_adapter(pipe, files[base])
    assert adapter.strategy.name == ("full" if base == "full" else "lora")
    assert adapter.strategy.train_text_encoder == (base == "lora_te")
    pipe("a dog", num_inference_steps=1, guidance_scale=1.0, output_type="latent")
    unload_adapter(pipe)
    assert_unchanged(pipe, base_state)


def test_optional_metadata_fields_may_be_null(files, pipe, base_state, tmp_path):
    def nulls(info: dict) -> None:
        info.update(dict.fromkeys(["format_version", "train_text_encoder", "base_model", "resolution", "steps"]))

    path = tmp_path / "nulls.safetensors"
    path.write_bytes(edit_metadata(files["lora"].read_bytes(), nulls))
    adapter = load_adapter(pipe, path)
    assert (adapter.resolution, adapter.steps, adapter.base_model) == (0, 0, {})
    unload_adapter(pipe)
    assert_unchanged(pipe, base_state)


# --- the file system's errors stay OSError -------------------------------------------------------------


def test_missing_folder_and_unreadable_files_are_oserrors(files, pipe, tmp_path, monkeypatch):
    missing = tmp_path / "nope.safetensors"
    with pytest.raises(FileNotFoundError, match="does not exist") as caught:
        load_adapter(pipe, missing)
    assert caught.value.filename == str(missing)
    with pytest.raises(IsADirectoryError) as caught:
        load_adapter(pipe, tmp_path)
    assert caught.value.filename == str(tmp_path)

    locked = tmp_path / "locked.safetensors"
    locked.write_bytes(files["lora"].read_bytes())
    locked.chmod(0)
    if os.access(locked, os.R_OK):  # root reads anything: make the open fail as it would for a user
        real_open = builtins.open

        def denied(file, *args, **kwargs):
            if str(file) == str(locked):
                raise PermissionError(errno.EACCES, "Permission denied", str(file))
            return real_open(file, *args, **kwargs)

        monkeypatch.setattr(builtins, "open", denied)
    with pytest.raises(PermissionError) as caught:
        load_adapter(pipe, locked)
    assert not isinstance(caught.value, AdapterError) and caught.value.filename == str(locked)
    assert attached_adapter(pipe) is None


# --- a failed load leaves the pipeline as it was --------------------------------------------------------


@pytest.mark.parametrize("error", [RuntimeError("boom in peft"), KeyboardInterrupt()])
def test_lora_load_failing_inside_peft_leaves_no_lora_layers(error, files, pipe, base_state, monkeypatch):
    import peft.utils

    def fail(*args, **kwargs):
        raise error

    monkeypatch.setattr(peft.utils, "set_peft_model_state_dict", fail)
    expected = AdapterError if isinstance(error, RuntimeError) else KeyboardInterrupt
    with pytest.raises(expected, match="boom in peft" if expected is AdapterError else None):
        load_adapter(pipe, files["lora_te"])
    assert_unchanged(pipe, base_state)
    monkeypatch.undo()
    load_adapter(pipe, files["lora_te"])
    unload_adapter(pipe)
    assert_unchanged(pipe, base_state)


def test_full_load_failing_midway_restores_every_weight(files, pipe, base_state, monkeypatch):
    real = torch.nn.Module.load_state_dict
    calls = []

    def half_then_fail(module, state, *args, **kwargs):
        calls.append(module)
        if len(calls) > 1:  # the restore that follows the failure works
            return real(module, state, *args, **kwargs)
        # Write the first weight, as a failure partway through would, then fail.
        name = next(iter(state))
        with torch.no_grad():
            module.state_dict()[name].copy_(torch.full_like(state[name], 7.0))
        raise RuntimeError("disk went away")

    monkeypatch.setattr(torch.nn.Module, "load_state_dict", half_then_fail)
    with pytest.raises(RuntimeError, match="disk went away"):
        load_adapter(pipe, files["full"])
    monkeypatch.undo()
    assert len(calls) == 2  # the failed load, then the restore
    assert_unchanged(pipe, base_state)
