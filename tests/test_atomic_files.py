"""Atomic files: a write that fails midway (an exception, or SIGKILL) leaves the old file byte for byte
and no temporary file behind; checkpoints are pruned only after their successor is complete."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import safetensors.torch
import torch
from conftest import FAST

from db_adapters import personalize
from db_adapters.checkpoint import is_complete, latest_checkpoint, load_checkpoint, save_checkpoint
from db_adapters.files import save_tensors, sweep_stale_temporaries, write_atomically
from db_adapters.safe_reading import read_tensors
from db_adapters.testing import tiny_pipeline

OLD = {"weight": torch.arange(1000, dtype=torch.float32)}
NEW = {"weight": torch.zeros(4000)}


def temporaries(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.name.endswith(".tmp") or p.name.startswith(".db-adapters-"))


def half_then(error: BaseException, calls: dict | None = None, fail_on_call: int = 1):
    """A stand-in for safetensors' save_file that writes half the real file, then fails."""
    real_save = safetensors.torch.save

    def save_file(tensors, filename, metadata=None):
        if calls is not None:
            calls["n"] = calls.get("n", 0) + 1
            if calls["n"] != fail_on_call:
                Path(filename).write_bytes(real_save(tensors, metadata=metadata))
                return
        data = real_save(tensors, metadata=metadata)
        Path(filename).write_bytes(data[: len(data) // 2])
        raise error

    return save_file


@pytest.mark.parametrize("error", [OSError(errno.ENOSPC, "No space left on device"), KeyboardInterrupt()])
def test_failed_write_keeps_the_old_file_and_leaves_no_temporary(error, tmp_path, monkeypatch):
    path = save_tensors(tmp_path / "adapter.safetensors", OLD, {"v": "old"})
    before = path.read_bytes()
    monkeypatch.setattr(safetensors.torch, "save_file", half_then(error))
    with pytest.raises(type(error)):
        save_tensors(path, NEW, {"v": "new"})
    assert path.read_bytes() == before
    assert temporaries(tmp_path) == []


def test_a_writer_dying_midway_leaves_the_old_text(tmp_path):
    path = write_atomically(tmp_path / "report.json", lambda tmp: tmp.write_text('{"old": 1}'))

    def dies(tmp: Path) -> None:
        tmp.write_text('{"new": ')
        raise RuntimeError("writer failed")

    with pytest.raises(RuntimeError, match="writer failed"):
        write_atomically(path, dies)
    assert path.read_text() == '{"old": 1}' and temporaries(tmp_path) == []


CHILD = """
import os, signal, sys
from pathlib import Path
import safetensors.torch, torch
from db_adapters.files import save_tensors

def half_then_sigkill(tensors, filename, metadata=None):
    data = safetensors.torch.save(tensors, metadata=metadata)
    with open(filename, "wb") as handle:
        handle.write(data[: len(data) // 2])
        handle.flush()
        os.fsync(handle.fileno())
    print("TEMP", filename, flush=True)
    os.kill(os.getpid(), signal.SIGKILL)  # no cleanup runs: no except, no finally

safetensors.torch.save_file = half_then_sigkill
save_tensors(sys.argv[1], {"weight": torch.zeros(4000)}, {"v": "new"})
print("NOT REACHED", flush=True)
"""


def test_sigkill_mid_write_keeps_the_old_file_and_the_next_write_sweeps_its_temporary(tmp_path):
    path = save_tensors(tmp_path / "adapter.safetensors", OLD, {"v": "old"})
    before = path.read_bytes()
    other = tmp_path / ".other.safetensors.1.abc.tmp"  # another file's leftover: not ours to sweep
    other.write_bytes(b"x")
    child = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(CHILD), str(path)], capture_output=True, text=True, timeout=120
    )
    assert child.returncode == -signal.SIGKILL, child.stdout + child.stderr
    assert "NOT REACHED" not in child.stdout
    assert path.read_bytes() == before  # the old adapter, byte for byte
    left = [p for p in temporaries(tmp_path) if p != other]
    # SIGKILL runs no cleanup, so the half-written temporary is still there, named with the dead pid.
    assert [p.name for p in left] == [Path(child.stdout.split()[1]).name]

    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        busy = tmp_path / f".adapter.safetensors.{alive.pid}.xyz.tmp"  # a live writer's file
        busy.write_bytes(b"in progress")
        save_tensors(path, NEW, {"v": "new"})
        assert busy.exists(), "a temporary of a process that is still writing was removed"
    finally:
        alive.kill()
        alive.wait()
    assert torch.equal(read_tensors(path)["weight"], NEW["weight"])
    assert sorted(temporaries(tmp_path)) == sorted([other, busy])
    assert sweep_stale_temporaries(path) == [busy] and other.exists()  # now its writer is gone too


def test_checkpoint_prune_keeps_the_older_when_the_newer_fails(tmp_path, subject_images, monkeypatch):
    # The first save_file is the step-2 checkpoint, the second the step-4 one: it fails halfway.
    calls: dict = {}
    monkeypatch.setattr(
        safetensors.torch, "save_file", half_then(OSError(errno.ENOSPC, "No space left"), calls, fail_on_call=2)
    )
    run = tmp_path / "run"
    with pytest.raises(OSError, match="No space left"):
        personalize(
            tiny_pipeline(),
            subject_images,
            "dog",
            **{**FAST, "steps": 4},
            output_dir=run,
            checkpoint_every=2,
            keep_checkpoints=1,
        )
    folder = run / "checkpoints"
    assert sorted(p.name for p in folder.iterdir()) == ["step-00000002.json", "step-00000002.safetensors"]
    assert is_complete(folder / "step-00000002") and latest_checkpoint(folder, "step") == folder / "step-00000002"
    assert load_checkpoint(folder / "step-00000002")[1]["step"] == 2
    assert temporaries(tmp_path) == []


def test_crash_between_the_two_checkpoint_files_leaves_the_checkpoint_incomplete(tmp_path, monkeypatch):
    import db_adapters.checkpoint as checkpoint

    save_checkpoint(tmp_path / "step-00000001", OLD, {"step": 1})
    save_checkpoint(tmp_path / "step-00000002", OLD, {"step": 2})

    def json_write_fails(path, write):
        if str(path).endswith(".json"):
            raise OSError(errno.EIO, "I/O error")
        return write_atomically(path, write)

    monkeypatch.setattr(checkpoint, "write_atomically", json_write_fails)
    with pytest.raises(OSError):
        save_checkpoint(tmp_path / "step-00000002", NEW, {"step": 2})  # rewritten, then the JSON fails
    # Its tensors were replaced but its JSON is gone: not complete, so the older one is the newest.
    assert not is_complete(tmp_path / "step-00000002")
    assert latest_checkpoint(tmp_path, "step") == tmp_path / "step-00000001"
    # A JSON that names other tensors than those on disk is not complete either.
    monkeypatch.undo()
    save_checkpoint(tmp_path / "step-00000003", OLD, {"step": 3})
    save_tensors(tmp_path / "step-00000003.safetensors", NEW, {"checkpoint_id": "another"})
    assert not is_complete(tmp_path / "step-00000003")
    assert latest_checkpoint(tmp_path, "step") == tmp_path / "step-00000001"


def test_adapter_save_failing_midway_keeps_the_old_adapter(tmp_path, subject_images, monkeypatch):
    adapter = personalize(tiny_pipeline(), subject_images, "dog", **{**FAST, "steps": 1, "prior_preservation": False})
    path = adapter.save(tmp_path / "dog.safetensors")
    before = path.read_bytes()
    # LoRA files pass through diffusers' writer first, then ours: fail ours on its final write.
    real = safetensors.torch.save_file

    def fail_on_target(tensors, filename, metadata=None):
        if Path(filename).name.startswith(".dog.safetensors."):
            return half_then(OSError(errno.ENOSPC, "No space left"))(tensors, filename, metadata)
        return real(tensors, filename, metadata=metadata)

    monkeypatch.setattr(safetensors.torch, "save_file", fail_on_target)
    with pytest.raises(OSError):
        adapter.save(path)
    assert path.read_bytes() == before
    assert temporaries(tmp_path) == []
    assert os.listdir(tmp_path) == ["dog.safetensors"]
