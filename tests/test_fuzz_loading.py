"""Fuzzing `load_adapter`: hundreds of damaged copies of real adapter files, and not one surprise.

Every outcome must be a clean load (after which the pipeline still runs an inference step, and
unloading restores it exactly), an `AdapterError` naming the file, or an `OSError`; a load that
fails must leave the pipeline exactly as it was. Mutations are drawn from a seeded RNG, so a
failure names the mutation and reproduces. `pytest -s` prints the counts per kind and outcome;
they are also written to `fuzz_counts.json` in the test's tmp folder.
"""

from __future__ import annotations

import functools
import json
import random
import struct
import time
import warnings
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest
from test_safe_loading import (
    assert_unchanged,
    build_file,
    join_file,
    make_adapter_files,
    snapshot,
    split_file,
    tensor_blobs,
)

from db_adapters import AdapterError, load_adapter, unload_adapter
from db_adapters.pipelines import architecture_fingerprint
from db_adapters.testing import tiny_pipeline

SEED = 20240605
PER_KIND = 42  # 12 kinds: 504 mutations
DTYPES = ["BOOL", "U8", "I8", "I16", "U16", "F16", "BF16", "I32", "U32", "F32", "I64", "U64", "F64", "F8_E4M3"]

# A mutation takes (rng, file bytes, base name) and returns (new bytes, description).
Mutation = Callable[[random.Random, bytes, str], tuple[bytes, str]]


def _tensor_names(header: dict) -> list[str]:
    return sorted(name for name in header if name != "__metadata__")


def truncate(rng: random.Random, raw: bytes, base: str) -> tuple[bytes, str]:
    cut = rng.randrange(len(raw))
    return raw[:cut], f"cut at byte {cut} of {len(raw)}"


def header_bytes(rng: random.Random, raw: bytes, base: str) -> tuple[bytes, str]:
    length = struct.unpack("<Q", raw[:8])[0]
    data = bytearray(raw)
    spots = [8 + rng.randrange(length) for _ in range(rng.randint(1, 4))]
    for spot in spots:
        data[spot] ^= rng.randint(1, 255)
    return bytes(data), f"flipped header bytes at {spots}"


def data_bytes(rng: random.Random, raw: bytes, base: str) -> tuple[bytes, str]:
    start = 8 + struct.unpack("<Q", raw[:8])[0]
    data = bytearray(raw)
    if rng.random() < 0.2:  # random flips seldom make a float non-finite; write a NaN or inf on purpose
        spot = start + 4 * rng.randrange((len(raw) - start) // 4)
        value = rng.choice([float("nan"), float("inf"), float("-inf")])
        data[spot : spot + 4] = struct.pack("<f", value)
        return bytes(data), f"wrote {value} at byte {spot}"
    spots = [rng.randrange(start, len(raw)) for _ in range(rng.randint(1, 8))]
    for spot in spots:
        data[spot] ^= rng.randint(1, 255)
    return bytes(data), f"flipped data bytes at {spots}"


def header_length(rng: random.Random, raw: bytes, base: str) -> tuple[bytes, str]:
    length = struct.unpack("<Q", raw[:8])[0]
    choices = [0, 1, 7, length - 1, length + rng.randint(1, 64), length // 2, len(raw), len(raw) - 8]
    choices += [2**64 - 1, 2**63, rng.randrange(2**64), 100_000_001]
    bogus = rng.choice([c for c in choices if c != length])
    return struct.pack("<Q", bogus) + raw[8:], f"header length {length} -> {bogus}"


def non_json(rng: random.Random, raw: bytes, base: str) -> tuple[bytes, str]:
    text = split_file(raw)[0]
    good = json.dumps(text).encode()
    choices = {
        "random bytes": bytes(rng.randrange(256) for _ in range(rng.randint(1, 300))),
        "cut JSON": good[: rng.randrange(1, len(good) - 1)],
        "null": b"null",
        "a list": b"[1, 2, 3]",
        "a string": b'"header"',
        "a number": b"12345",
        "single quotes": b"{'a': 1}",
        "trailing garbage": good + b" garbage",
        "two objects": good + good,
        "empty": b"",
        "spaces": b" " * rng.randint(1, 64),
        "NUL bytes": b"\x00" * rng.randint(1, 64),
        "not UTF-8": b'{"\xff\xfe": 1}',
        "nested too deep": b"[" * rng.randint(10_000, 200_000),
    }
    name = rng.choice(sorted(choices))
    return join_file(choices[name], split_file(raw)[1]), f"header replaced by {name}"


def dtype(rng: random.Random, raw: bytes, base: str) -> tuple[bytes, str]:
    header, data = split_file(raw)
    name = rng.choice(_tensor_names(header))
    old = header[name]["dtype"]
    new = rng.choice([d for d in DTYPES if d != old] + ["F31", "f32", "", None, 32, "FLOAT", ["F32"]])
    header[name]["dtype"] = new
    return join_file(header, data), f"{name} dtype {old} -> {new!r}"


def offsets(rng: random.Random, raw: bytes, base: str) -> tuple[bytes, str]:
    header, data = split_file(raw)
    names = _tensor_names(header)
    name = rng.choice(names)
    begin, end = header[name]["data_offsets"]
    shift = rng.choice([-1, 1]) * rng.randint(1, 64)
    choices = {
        "shifted": [begin + shift, end + shift],
        "reversed": [end, begin],
        "grown": [begin, end + rng.randint(1, 64)],
        "negative": [-rng.randint(1, 64), end],
        "past the end": [len(data) + begin, len(data) + end],
        "one number": [begin],
        "three numbers": [begin, end, 0],
        "floats": [float(begin), float(end)],
        "a string": f"{begin}-{end}",
        "huge": [begin, end + 2**62],
    }
    same_size = [n for n in names if n != name and _size(header[n]) == end - begin]
    how = rng.choice(sorted(choices) + (["swapped"] * 3 if same_size else []))
    if how == "swapped":  # byte-consistent: a valid file whose two tensors trade values
        other = rng.choice(same_size)
        header[name]["data_offsets"], header[other]["data_offsets"] = header[other]["data_offsets"], [begin, end]
        return join_file(header, data), f"{name} and {other} swapped data_offsets"
    header[name]["data_offsets"] = choices[how]
    return join_file(header, data), f"{name} data_offsets {[begin, end]} {how} -> {choices[how]!r}"


def _size(entry: dict) -> int:
    return entry["data_offsets"][1] - entry["data_offsets"][0]


def shape(rng: random.Random, raw: bytes, base: str) -> tuple[bytes, str]:
    if rng.random() < 0.5:  # edit the header only: mostly inconsistent with the bytes
        header, data = split_file(raw)
        name = rng.choice(_tensor_names(header))
        old = list(header[name]["shape"])
        choices = {
            "reversed": old[::-1],
            "leading 1": [1, *old],
            "flattened": [_product(old)],
            "first +1": [old[0] + 1, *old[1:]],
            "first doubled": [old[0] * 2, *old[1:]],
            "last halved": [*old[:-1], max(old[-1] // 2, 0)],
            "negative": [-old[0], *old[1:]],
            "float": [float(old[0]), *old[1:]],
            "a string": "x".join(map(str, old)),
            "empty": [],
        }
        how = rng.choice(sorted(k for k, v in choices.items() if v != old))
        header[name]["shape"] = choices[how]
        return join_file(header, data), f"{name} shape {old} {how} -> {choices[how]!r}"
    # rebuild a consistent file in which one tensor has another shape (and matching bytes)
    blobs, metadata = tensor_blobs(raw)
    name = rng.choice(sorted(blobs))
    kind, old, _ = blobs[name]
    new = list(old)
    axis = rng.randrange(len(new))
    new[axis] = max(1, new[axis] + rng.choice([-1, 1, 2, 4]))
    if new == old:
        new = [*old, 2]
    blobs[name] = (kind, new, _random_floats(rng, _product(new)))
    return build_file(blobs, metadata), f"{name} replaced by a consistent {kind} tensor of shape {new} (was {old})"


def _product(values: list[int]) -> int:
    result = 1
    for value in values:
        result *= value
    return result


def _random_floats(rng: random.Random, count: int) -> bytes:
    return struct.pack(f"<{count}f", *(rng.uniform(-0.1, 0.1) for _ in range(count)))


def _edited_info(raw: bytes, change: Callable[[dict, dict], str]) -> tuple[bytes, str]:
    """Apply `change(info, metadata)`: it edits our parsed metadata (saying "info: ...") or the header's."""
    header, data = split_file(raw)
    metadata = header["__metadata__"]
    info = json.loads(metadata["db_adapters"])
    what = change(info, metadata)
    if what.startswith("info:"):
        metadata["db_adapters"] = json.dumps(info)
    return join_file(header, data), what


# Wrong-typed (or impossible) values for our metadata's fields; every one must be refused.
BAD_FIELDS = {
    "identifier": [5, None, "", "   ", ["olg"], {"a": 1}, True],
    "class_noun": [3, None, "", [], False],
    "instance_prompt": [{}, 7.5, None, ""],
    "strategy": [1, None, "", "dora", "LORA", ["lora"]],
    "strategy_config": ["rank=4", [], 4, None],
    "format_version": ["1", 1.0, 99, 0, -1, True, "latest"],
    "train_text_encoder": ["yes", 1, 0, "true", []],
    "base_model": ["sd15", [], 5, {"architecture": 5}, {"weights": ["x"]}],
    "resolution": ["32", -1, 32.0, True, [32]],
    "steps": [1.5, "1", -3, False, {}],
    "library_version": [0, [], {}],
}
BAD_OPTIONS = {
    "rank": ["4", 4.5, -1, 0, True, None, [4]],
    "alpha": ["x", 0, -2, True, [1]],
    "dropout": [2, -0.5, "0", True],
    "target_modules": [7, [], [1], [""], {}],
    "text_encoder_target_modules": [[None], 3, ""],
    "not_an_option": [1, "x"],
}


def metadata_types(rng: random.Random, raw: bytes, base: str) -> tuple[bytes, str]:
    def change(info: dict, metadata: dict) -> str:
        roll = rng.random()
        if roll < 0.45:
            key = rng.choice(sorted(BAD_FIELDS))
            info[key] = rng.choice(BAD_FIELDS[key])
            return f"info: {key} = {info[key]!r}"
        if roll < 0.75:
            key = rng.choice(sorted(BAD_OPTIONS))
            info["strategy_config"][key] = rng.choice(BAD_OPTIONS[key])  # (the full strategy takes none)
            return f"info: strategy_config.{key} = {info['strategy_config'][key]!r}"
        if roll < 0.8:
            key = rng.choice(["identifier", "class_noun", "instance_prompt", "strategy", "strategy_config"])
            del info[key]
            return f"info: {key} removed"
        choices = {
            "db_adapters not JSON": lambda: metadata.__setitem__("db_adapters", "{identifier: olg"),
            "db_adapters a JSON list": lambda: metadata.__setitem__("db_adapters", "[1, 2]"),
            "db_adapters a number": lambda: metadata.__setitem__("db_adapters", 5),
            "db_adapters null": lambda: metadata.__setitem__("db_adapters", None),
            "db_adapters removed": lambda: metadata.pop("db_adapters"),
            "format a number": lambda: metadata.__setitem__("format", 1),
        }
        if base != "full":  # the full strategy's files have no diffusers LoRA record to damage
            lora = json.loads(metadata["lora_adapter_metadata"])
            lora["unet.r"] = rng.choice([2, 8, 16, "4", True])
            choices |= {
                "lora_adapter_metadata not JSON": lambda: metadata.__setitem__("lora_adapter_metadata", "{r: 4"),
                "lora_adapter_metadata a list": lambda: metadata.__setitem__("lora_adapter_metadata", "[4]"),
                f"lora_adapter_metadata unet.r={lora['unet.r']!r}": lambda: metadata.__setitem__(
                    "lora_adapter_metadata", json.dumps(lora)
                ),
            }
        how = rng.choice(sorted(choices))
        choices[how]()
        return how

    return _edited_info(raw, change)


def drop_keys(rng: random.Random, raw: bytes, base: str) -> tuple[bytes, str]:
    blobs, metadata = tensor_blobs(raw)
    names = sorted(blobs)
    roll = rng.random()
    if roll < 0.1:
        dropped = names
    elif roll < 0.2 and base == "lora_te":
        dropped = [n for n in names if n.startswith("text_encoder.")]
    elif roll < 0.3:
        dropped = [n for n in names if n.startswith("unet.")]
    else:
        dropped = rng.sample(names, rng.randint(1, 3))
    for name in dropped:
        del blobs[name]
    return build_file(blobs, metadata), f"dropped {len(dropped)} tensor(s): {dropped[:3]}"


def add_keys(rng: random.Random, raw: bytes, base: str) -> tuple[bytes, str]:
    blobs, metadata = tensor_blobs(raw)
    source = rng.choice(sorted(blobs))
    component, _, rest = source.partition(".")
    other = "text_encoder" if component == "unet" else "unet"
    candidates = [
        source.replace("lora_A", "lora_C").replace("weight", "weight2"),
        f"{component}.extra.lora_A.weight",
        f"{component}.{rest}.bak",
        f"{other}.{rest}",
        f"vae.{rest}",
        "unet",
        "unet.",
        f"{component}.down_blocks.9.{rest}",
        f"{component}.{rest.replace('.weight', '.bias')}",
    ]
    added = [n for n in rng.sample(candidates, rng.randint(1, 2)) if n not in blobs] or [f"{source}.copy"]
    for name in added:
        blobs[name] = blobs[source]
    return build_file(blobs, metadata), f"added {added} (copies of {source})"


def architecture(rng: random.Random, raw: bytes, base: str) -> tuple[bytes, str]:
    def change(info: dict, metadata: dict) -> str:
        roll = rng.random()
        if roll < 0.6:
            old = info["base_model"]["architecture"]
            info["base_model"]["architecture"] = rng.choice(
                [_other_architecture(), f"{rng.getrandbits(64):016x}", old[::-1], old.upper(), "sd-1.5"]
            )
            if rng.random() < 0.5:
                info["base_model"]["model_id"] = "runwayml/stable-diffusion-v1-5"
            return f"info: architecture {old} -> {info['base_model']['architecture']}"
        # the other strategy's name, with its settings: a LoRA file read as full weights, or the reverse
        if info["strategy"] == "lora":
            info["strategy"], info["strategy_config"] = "full", {}
        else:
            info["strategy"], info["strategy_config"] = "lora", {"rank": 4}
        return f"info: strategy swapped to {info['strategy']}"

    return _edited_info(raw, change)


@functools.cache
def _other_architecture() -> str:
    """The fingerprint of a real other architecture: the SD 2.x-style tiny pipeline."""
    return architecture_fingerprint(tiny_pipeline(v_prediction=True))


# kind: (mutation, whether every mutation of this kind must be refused)
KINDS: dict[str, tuple[Mutation, bool]] = {
    "truncate": (truncate, True),
    "header_bytes": (header_bytes, False),
    "data_bytes": (data_bytes, False),
    "header_length": (header_length, True),
    "non_json_header": (non_json, True),
    "dtype": (dtype, True),
    "offsets": (offsets, False),
    "shape": (shape, True),
    "metadata_types": (metadata_types, True),
    "drop_keys": (drop_keys, True),
    "add_keys": (add_keys, True),
    "architecture": (architecture, True),
}


@pytest.fixture(scope="module")
def adapter_files(tmp_path_factory) -> dict[str, bytes]:
    files = make_adapter_files(tmp_path_factory.mktemp("fuzz-adapters"))
    return {name: path.read_bytes() for name, path in files.items()}


def test_fuzzed_adapter_files_load_cleanly_or_fail_cleanly(adapter_files, tmp_path):
    started = time.process_time()
    pipe = tiny_pipeline()
    base_state = snapshot(pipe)
    rng = random.Random(SEED)
    bases = sorted(adapter_files)
    counts: Counter = Counter()
    surprises: list[str] = []
    for index in range(PER_KIND * len(KINDS)):
        kind = list(KINDS)[index % len(KINDS)]
        mutate, must_fail = KINDS[kind]
        base = bases[(index // len(KINDS)) % len(bases)]
        raw, what = mutate(rng, adapter_files[base], base)
        if raw == adapter_files[base]:
            raw, what = mutate(rng, adapter_files[base], base)  # a no-op draw: draw once more
        label = f"#{index} {kind} on {base}: {what}"
        assert raw != adapter_files[base], f"{label}: the mutation changed nothing"
        path = tmp_path / f"fuzz-{index:04d}.safetensors"
        path.write_bytes(raw)
        outcome = _try_load(pipe, path, label, surprises)
        if outcome == "clean" and must_fail:
            surprises.append(f"{label}: loaded cleanly, but every {kind} mutation must be refused")
        try:
            assert_unchanged(pipe, base_state)
        except AssertionError as error:
            surprises.append(f"{label}: the pipeline was left changed ({error})")
            pipe = tiny_pipeline()  # go on with a fresh one, to report every surprise at once
            base_state = snapshot(pipe)
        counts[kind, outcome] += 1
        path.unlink()

    table = _report(counts, time.process_time() - started, tmp_path / "fuzz_counts.json")
    print(table)
    assert not surprises, f"{len(surprises)} surprise(s):\n" + "\n".join(surprises[:20])
    total = sum(counts.values())
    per_kind = Counter(kind for kind, _ in counts.elements())
    assert total >= 500 and all(per_kind[kind] >= PER_KIND for kind in KINDS), per_kind
    for kind in KINDS:
        assert counts[kind, "AdapterError"] > 0, f"no {kind} mutation was refused: the mutations do nothing"
    # The kinds that may load cleanly did, at least once: the harness exercises the clean path too.
    assert counts["data_bytes", "clean"] > 0 and counts["offsets", "clean"] + counts["header_bytes", "clean"] > 0


def _try_load(pipe, path: Path, label: str, surprises: list[str]) -> str:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. BaseModelWarning after a flipped weights hash
            load_adapter(pipe, path)
    except AdapterError as error:
        if str(path) not in str(error):
            surprises.append(f"{label}: AdapterError does not name the file: {error}")
        return "AdapterError"
    except OSError:
        return "OSError"
    except Exception as error:  # noqa: BLE001 - anything else is what the fuzzing looks for
        surprises.append(f"{label}: {type(error).__name__}: {str(error)[:300]}")
        return type(error).__name__
    try:
        pipe("a dog", num_inference_steps=1, guidance_scale=1.0, output_type="latent")
    except Exception as error:  # noqa: BLE001
        surprises.append(f"{label}: loaded, then inference failed: {type(error).__name__}: {str(error)[:300]}")
    unload_adapter(pipe)
    return "clean"


def _report(counts: Counter, cpu_s: float, path: Path) -> str:
    outcomes = sorted({outcome for _, outcome in counts})
    by_kind = {kind: {o: counts[kind, o] for o in outcomes if counts[kind, o]} for kind in KINDS}
    report = {"seed": SEED, "total": sum(counts.values()), "cpu_s": round(cpu_s, 1), "per_kind": by_kind}
    path.write_text(json.dumps(report, indent=1))
    lines = [f"fuzzed adapter files (seed {SEED}), outcome counts per kind:"]
    lines += [f"  {kind:16s} {sum(row.values()):4d}  {row}" for kind, row in by_kind.items()]
    lines.append(f"  {'total':16s} {sum(counts.values()):4d}  in {cpu_s:.1f} s of CPU; written to {path}")
    return "\n".join(lines)
