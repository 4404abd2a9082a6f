"""Checkpoints and resume: a run killed with SIGKILL and resumed equals the uninterrupted run, tensor for
tensor; changed settings are refused by name; a non-finite loss stops with a clear message and leaves
the last checkpoint intact; trainable weights stay fp32 under mixed precision."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from conftest import FAST, make_subject_images

from db_adapters import InputError, personalize
from db_adapters.checkpoint import (
    is_complete,
    latest_checkpoint,
    load_checkpoint,
    optimizer_state,
    restore_optimizer,
    restore_rng,
    rng_state,
    save_checkpoint,
)
from db_adapters.errors import TrainingError
from db_adapters.families import available_families
from db_adapters.loss import LossTerms
from db_adapters.safe_reading import read_file_metadata, read_tensors
from db_adapters.testing import tiny_pipeline, tiny_pipeline_of
from db_adapters.trainer import Trainer

SCRIPT = Path(__file__).parent / "scripts" / "resume_run.py"
FAMILIES = [family.name for family in available_families()]
# The kill/resume run: every piece of state that can drift is in play (LoRA dropout draws from the
# global RNG, a warmup+cosine schedule, gradient accumulation, the text encoder trains, prior images).
# 5 subject and 5 class images, 2 of each drawn per step: the checkpoints at steps 3, 6 and 9 all fall
# mid-pass, so a resume that lost the data order would draw other images (checked by sabotage).
KILL_STEPS, KILL_EVERY, KILL_IMAGES = 10, 3, 5
KILL_SETTINGS = {
    "subject_images": KILL_IMAGES,
    "steps": KILL_STEPS,
    "checkpoint_every": KILL_EVERY,
    "learning_rate": 1e-3,
    "lr_scheduler": "cosine",
    "lr_warmup_steps": 2,
    "gradient_accumulation_steps": 2,
    "train_text_encoder": True,
    "dropout": 0.1,
    "num_class_images": KILL_IMAGES,
    "class_inference_steps": 2,
    "progress": False,
}


def adapter_tensors(path: Path) -> dict[str, torch.Tensor]:
    return read_tensors(path)


def assert_same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], context: str) -> None:
    assert a.keys() == b.keys(), context
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"{context}: {len(different)} of {len(a)} tensors differ, e.g. {different[:3]}"


def comparable_metadata(path: Path) -> dict:
    """The header with JSON values parsed (key order inside the JSON does not matter)."""
    return {
        key: json.loads(value) if value.startswith("{") else value for key, value in read_file_metadata(path).items()
    }


def run_script(out: Path, adapter: Path, settings: dict) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    command = [sys.executable, str(SCRIPT), str(out), str(adapter), json.dumps(settings)]
    return subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)


def steps_printed(output: str) -> list[int]:
    return [int(n) for n in re.findall(r"^STEP (\d+)$", output, flags=re.MULTILINE)]


# --- the kill test ---------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_sigkilled_run_resumes_to_the_same_adapter(tmp_path, family):
    seed = int(os.environ.get("DB_ADAPTERS_KILL_SEED", random.SystemRandom().randrange(2**32)))
    kill_at = random.Random(seed).randint(KILL_EVERY + 1, KILL_STEPS)  # after the first checkpoint
    # The callback runs before that step's checkpoint is written: the newest checkpoint is strictly before k.
    resume_step = KILL_EVERY * ((kill_at - 1) // KILL_EVERY)
    context = (
        f"{family}: S={KILL_STEPS}, checkpoint every {KILL_EVERY}, killed at k={kill_at} (DB_ADAPTERS_KILL_SEED={seed})"
    )
    print(context)

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the script does: the same kernels and summation order
    try:
        settings = {k: v for k, v in KILL_SETTINGS.items() if k not in ("checkpoint_every", "subject_images")}
        straight = personalize(
            tiny_pipeline_of(family),
            make_subject_images(KILL_IMAGES),
            "dog",
            output_dir=tmp_path / "straight",
            **settings,
        )
    finally:
        torch.set_num_threads(threads)
    straight.save(tmp_path / "straight.safetensors")

    out, resumed_path = tmp_path / "run", tmp_path / "resumed.safetensors"
    killed = run_script(out, resumed_path, {**KILL_SETTINGS, "kill_at": kill_at, "family": family})
    assert killed.returncode == -signal.SIGKILL, f"{context}\n{killed.stdout}\n{killed.stderr}"
    assert steps_printed(killed.stdout) == list(range(1, kill_at + 1)), context
    assert "SAVED" not in killed.stdout and not resumed_path.exists()
    assert latest_checkpoint(out / "checkpoints", "step").name == f"step-{resume_step:08d}", context

    resumed = run_script(out, resumed_path, {**KILL_SETTINGS, "resume": True, "family": family})
    assert resumed.returncode == 0, f"{context}\n{resumed.stdout}\n{resumed.stderr}"
    log = resumed.stdout
    # From the resumed run's own output: where it started, and that it ran only the remaining steps.
    assert f"resuming from step {resume_step} of {KILL_STEPS}" in log, f"{context}\n{log}"
    assert steps_printed(log) == list(range(resume_step + 1, KILL_STEPS + 1)), f"{context}\n{log}"
    ran = KILL_STEPS - resume_step
    assert f"trained steps {resume_step + 1}-{KILL_STEPS}: {ran} of {KILL_STEPS} steps run" in log, log
    assert "generating" not in log  # the class images came from the killed run's cache

    assert_same_tensors(adapter_tensors(tmp_path / "straight.safetensors"), adapter_tensors(resumed_path), context)
    assert comparable_metadata(tmp_path / "straight.safetensors") == comparable_metadata(resumed_path)
    assert not list(out.rglob("*.tmp")), "temporary files left behind"


# --- in-process resume, settings, folders ------------------------------------------------------------


class Stop(Exception):
    pass


def stop_at(step_to_stop: int):
    def callback(step: int, logs: dict) -> None:
        if step == step_to_stop:
            raise Stop

    return callback


def test_stopped_full_fine_tune_resumes_to_the_same_weights(tmp_path, subject_images):
    settings = {**FAST, "steps": 4, "strategy": "full", "learning_rate": 5e-4, "prior_preservation": False}
    straight = personalize(tiny_pipeline(), subject_images, "dog", **settings)
    straight.save(tmp_path / "straight.safetensors")
    run = {"output_dir": tmp_path / "run", "checkpoint_every": 2, **settings}
    with pytest.raises(Stop):
        personalize(tiny_pipeline(), subject_images, "dog", callback=stop_at(3), **run)
    resumed = personalize(tiny_pipeline(), subject_images, "dog", resume=True, **run)
    resumed.save(tmp_path / "resumed.safetensors")
    a, b = adapter_tensors(tmp_path / "straight.safetensors"), adapter_tensors(tmp_path / "resumed.safetensors")
    assert_same_tensors(a, b, "full fine-tune, stopped at step 3, resumed from step 2")
    assert [h["step"] for h in resumed.history] == [1, 2, 3, 4]
    assert [h["loss"] for h in resumed.history] == [h["loss"] for h in straight.history]


@pytest.fixture(scope="module")
def checkpointed_run(tmp_path_factory):
    """A finished run with checkpoints, begun with resume=True on an empty folder (shared: tests only read it)."""
    root = tmp_path_factory.mktemp("checkpointed")
    settings = {**FAST, "steps": 4, "learning_rate": 1e-3, "output_dir": root / "run", "checkpoint_every": 1}
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append
    logger = logging.getLogger("db_adapters")
    logger.addHandler(handler)
    try:
        personalize(tiny_pipeline(), make_subject_images(), "dog", resume=True, **settings)
    finally:
        logger.removeHandler(handler)
    return settings, "\n".join(r.getMessage() for r in records)


def test_resume_without_a_checkpoint_starts_afresh_and_says_so(checkpointed_run):
    settings, log = checkpointed_run
    assert "no complete checkpoint" in log and "starting afresh" in log
    # keep_checkpoints=2 by default: only the newest two of four survive, each complete.
    folder = settings["output_dir"] / "checkpoints"
    names = sorted(p.name for p in folder.iterdir())
    assert names == [f"step-0000000{s}.{ext}" for s in (3, 4) for ext in ("json", "safetensors")]
    assert all(is_complete(folder / f"step-0000000{s}") for s in (3, 4))


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"learning_rate": 2e-3}, "learning_rate: checkpoint 0.001, now 0.002"),
        ({"seed": 1}, "seed: checkpoint 0, now 1"),
        ({"rank": 8}, "strategy_options: checkpoint"),
        ({"strategy": "full"}, "strategy: checkpoint lora, now full"),
        ({"steps": 6}, "steps: checkpoint 4, now 6"),
        ({"images": "other"}, "images: checkpoint"),
    ],
)
def test_resume_refuses_other_settings_naming_them(checkpointed_run, change, expected):
    settings, _ = checkpointed_run
    images = make_subject_images(4) if change.pop("images", None) else make_subject_images()
    with pytest.raises(InputError, match=re.escape(expected)):
        personalize(tiny_pipeline(), images, "dog", resume=True, **{**settings, **change})


def test_fresh_run_refuses_a_folder_with_checkpoints(checkpointed_run):
    settings, _ = checkpointed_run
    with pytest.raises(InputError, match="already holds checkpoints.*resume=True"):
        personalize(tiny_pipeline(), make_subject_images(), "dog", **settings)


@pytest.mark.parametrize(
    ("settings", "expected"),
    [
        ({"checkpoint_every": 2}, "checkpoint_every needs output_dir"),
        ({"resume": True}, "resume needs output_dir"),
        ({"checkpoint_every": 0, "output_dir": "x"}, "checkpoint_every=0 must be a positive integer"),
        ({"keep_checkpoints": 0, "output_dir": "x"}, "keep_checkpoints=0 must be a positive integer"),
        ({"resume": "yes", "output_dir": "x"}, "resume='yes' must be True or False"),
    ],
)
def test_checkpoint_settings_are_checked(settings, expected, subject_images):
    with pytest.raises(InputError, match=re.escape(expected)):
        personalize(tiny_pipeline(), subject_images, "dog", **FAST, **settings)


def test_cli_checkpoints_and_refuses_a_changed_resume(tiny_dir, subject_dir, tmp_path, caplog):
    import shutil

    from db_adapters.cli import main

    base = ["train", "--model", str(tiny_dir), "--images", str(subject_dir), "--class-noun", "dog"]
    base += ["--steps", "4", "--num-class-images", "2", "--class-inference-steps", "2", "--learning-rate", "1e-3"]
    base += ["--checkpoint-every", "1", "--keep-checkpoints", "4"]
    first = CliRunner().invoke(
        main, [*base, "--output-dir", str(tmp_path / "run"), "--output", str(tmp_path / "a.safetensors")]
    )
    assert first.exit_code == 0, first.output
    checkpoints = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in checkpoints.glob("*.json")) == [f"step-0000000{i}.json" for i in (1, 2, 3, 4)]
    # A run stopped after step 2: its folder holds the checkpoints up to step 2 only.
    stopped = tmp_path / "stopped"
    shutil.copytree(tmp_path / "run", stopped)
    for path in (stopped / "checkpoints").glob("step-0000000[34].*"):
        path.unlink()
    base += ["--output-dir", str(stopped)]
    changed = CliRunner().invoke(
        main, [*base, "--resume", "--learning-rate", "2e-3", "--output", str(tmp_path / "b.safetensors")]
    )
    assert changed.exit_code == 2, changed.output
    errors = [line for line in changed.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and "learning_rate: checkpoint 0.001, now 0.002" in errors[0], changed.output
    with caplog.at_level(logging.INFO, logger="db_adapters"):
        same = CliRunner().invoke(main, [*base, "--resume", "--output", str(tmp_path / "c.safetensors")])
    assert same.exit_code == 0, same.output
    assert "resuming from step 2 of 4" in caplog.text and "trained steps 3-4: 2 of 4 steps run" in caplog.text
    assert "generating" not in caplog.text  # the class images came from the first run's cache
    assert_same_tensors(
        adapter_tensors(tmp_path / "a.safetensors"), adapter_tensors(tmp_path / "c.safetensors"), "CLI resume"
    )


# --- state round trips -------------------------------------------------------------------------------


def _train_a_little(optimizer, params, steps: int, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        for param in params:
            param.grad = torch.randn(param.shape, generator=generator)
        optimizer.step()


def _optimizer_round_trip(make, tmp_path) -> None:
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(64, 80)), torch.nn.Parameter(torch.randn(7))]
    optimizer = make([{"params": params[:1], "lr": 1e-2}, {"params": params[1:], "lr": 3e-3}])
    _train_a_little(optimizer, params, 3, seed=1)
    tensors, plain = optimizer_state(optimizer)
    stem = save_checkpoint(tmp_path / "step-00000003", tensors, {"optimizer": plain})
    saved_tensors, info = load_checkpoint(stem)

    copies = [torch.nn.Parameter(p.detach().clone()) for p in params]
    restored = make([{"params": copies[:1], "lr": 0.5}, {"params": copies[1:], "lr": 0.5}])
    restore_optimizer(restored, saved_tensors, info["optimizer"])
    for original, copy in zip(optimizer.state.values(), restored.state.values(), strict=True):
        for key, value in original.items():
            if torch.is_tensor(value):
                assert value.dtype == copy[key].dtype and torch.equal(value, copy[key]), key
            else:
                assert value == copy[key], key
    assert [g["lr"] for g in restored.param_groups] == [1e-2, 3e-3]
    _train_a_little(optimizer, params, 2, seed=2)
    _train_a_little(restored, copies, 2, seed=2)
    assert all(torch.equal(p, c) for p, c in zip(params, copies, strict=True))


def test_adamw_state_round_trips_through_safetensors_and_json(tmp_path):
    _optimizer_round_trip(lambda groups: torch.optim.AdamW(groups, weight_decay=1e-2), tmp_path)
    tensors, _ = optimizer_state(torch.optim.AdamW([torch.nn.Parameter(torch.ones(1))]))
    assert tensors == {}  # no state before the first step
    params = [torch.nn.Parameter(torch.ones(3))]
    optimizer = torch.optim.AdamW(params)
    _train_a_little(optimizer, params, 2, seed=0)
    tensors, _ = optimizer_state(optimizer)
    assert tensors["optimizer.0.step"].dtype == torch.float32 and float(tensors["optimizer.0.step"]) == 2.0


def test_8bit_adam_state_round_trips(tmp_path):
    bnb = pytest.importorskip("bitsandbytes")
    make = lambda groups: bnb.optim.AdamW8bit(groups, min_8bit_size=4096)  # noqa: E731
    try:
        _optimizer_round_trip(make, tmp_path)
    except (RuntimeError, NotImplementedError) as error:
        if "cuda" in str(error).lower() or "not implemented" in str(error).lower():
            pytest.skip(f"bitsandbytes cannot run on this machine: {error}")
        raise
    params = [torch.nn.Parameter(torch.randn(5000))]
    optimizer = make([{"params": params}])
    _train_a_little(optimizer, params, 1, seed=0)
    tensors, _ = optimizer_state(optimizer)
    assert tensors["optimizer.0.__bnb_optimizer_quant_state__.state1"].dtype == torch.uint8


def test_rng_state_round_trips():
    import numpy as np

    tensors, plain = rng_state()
    plain = json.loads(json.dumps(plain))  # as stored
    first = (torch.rand(3), np.random.rand(3), random.random())
    restore_rng(tensors, plain)
    again = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(first[0], again[0]) and (first[1] == again[1]).all() and first[2] == again[2]


# --- non-finite losses ----------------------------------------------------------------------------------


def _digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def inject_nan(monkeypatch, term: str, at_step: int, seen: dict) -> None:
    """From `at_step` on, the loss term `term` comes out NaN; the checkpoints are hashed just before."""
    original = Trainer._loss_terms
    calls = {"n": 0}

    def loss_terms(self, accelerator):
        terms = original(self, accelerator)
        calls["n"] += 1
        if calls["n"] < at_step:
            return terms
        if self.checkpoints is not None:
            seen["before"] = _digests(self.checkpoints.folder)
        nan = torch.tensor(float("nan"))
        instance = terms.instance + nan if term == "instance" else terms.instance
        prior = terms.prior + nan if term == "prior" else terms.prior
        return LossTerms(instance + prior, instance, prior)

    monkeypatch.setattr(Trainer, "_loss_terms", loss_terms)


@pytest.mark.parametrize(("term", "mixed_precision"), [("instance", "bf16"), ("prior", "no")])
def test_non_finite_loss_stops_naming_step_term_and_fix_and_keeps_checkpoint(
    term, mixed_precision, monkeypatch, tmp_path, subject_images
):
    seen: dict = {}
    inject_nan(monkeypatch, term, at_step=3, seen=seen)
    run = tmp_path / "run"
    with pytest.raises(TrainingError) as raised:
        personalize(
            tiny_pipeline(),
            subject_images,
            "dog",
            **{**FAST, "steps": 4},
            learning_rate=1e-3,
            mixed_precision=mixed_precision,
            output_dir=run,
            checkpoint_every=2,
        )
    message = str(raised.value)
    assert f"the {term} loss became nan at step 3 of 4" in message
    assert "lower the learning rate (now 0.001)" in message
    assert ("fp32" in message) == (mixed_precision != "no")
    assert "step-00000002" in message and "is intact" in message
    # The last good checkpoint: byte for byte what it was before the NaN, complete, and loadable.
    assert _digests(run / "checkpoints") == seen["before"]
    assert latest_checkpoint(run / "checkpoints", "step").name == "step-00000002"
    tensors, info = load_checkpoint(run / "checkpoints" / "step-00000002")
    assert info["step"] == 2 and all(torch.isfinite(t).all() for k, t in tensors.items() if k.startswith("weights."))


def test_cli_non_finite_loss_is_one_line_and_keeps_the_old_adapter(monkeypatch, tiny_dir, subject_dir, tmp_path):
    from db_adapters.cli import main

    inject_nan(monkeypatch, "instance", at_step=2, seen={})
    output = tmp_path / "dog.safetensors"
    output.write_bytes(b"an earlier adapter")
    args = ["train", "--model", str(tiny_dir), "--images", str(subject_dir), "--class-noun", "dog"]
    args += ["--steps", "3", "--num-class-images", "2", "--class-inference-steps", "2", "--output", str(output)]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and "instance loss became nan at step 2 of 3" in errors[0], result.output
    assert "Traceback" not in result.output
    assert output.read_bytes() == b"an earlier adapter"


# --- fp32 trainable weights under mixed precision ----------------------------------------------------


def grab_trainer(monkeypatch) -> dict:
    holder: dict = {}
    original = Trainer.__init__

    def init(self, *args, **kwargs):
        original(self, *args, **kwargs)
        holder["trainer"] = self

    monkeypatch.setattr(Trainer, "__init__", init)
    return holder


@pytest.mark.parametrize(
    ("strategy", "pipe_dtype", "mixed_precision"),
    [
        ("lora", torch.float32, "bf16"),
        ("lora", torch.bfloat16, "bf16"),
        ("full", torch.bfloat16, "bf16"),
        ("lora", torch.float16, "fp16"),  # accelerate makes fp16 autocast a no-op on CPU
    ],
)
def test_trainable_weights_and_grads_stay_fp32_under_mixed_precision(
    strategy, pipe_dtype, mixed_precision, monkeypatch, subject_images
):
    holder = grab_trainer(monkeypatch)
    pipe = tiny_pipeline().to(dtype=pipe_dtype)
    seen = {"params": set(), "grads": [], "activations": set()}
    # The UNet's first layer under autocast: proves bf16 mixed precision was really on.
    pipe.unet.conv_in.register_forward_hook(
        lambda module, inputs, output: seen["activations"].add(output.dtype) if torch.is_grad_enabled() else None
    )

    def callback(step: int, logs: dict) -> None:
        trainer = holder["trainer"]
        params = [p for group in trainer.strategy.trainable_parameters(trainer.pipe).values() for p in group]
        seen["params"] |= {p.dtype for p in params}
        if step == 1:
            for param in params:
                param.register_post_accumulate_grad_hook(lambda p: seen["grads"].append(p.grad.dtype))
            seen["count"] = len(params)

    personalize(
        pipe,
        subject_images,
        "dog",
        strategy=strategy,
        mixed_precision=mixed_precision,
        prior_preservation=False,
        callback=callback,
        **{**FAST, "steps": 2},
    )
    assert seen["params"] == {torch.float32}
    assert len(seen["grads"]) == seen["count"] and set(seen["grads"]) == {torch.float32}
    if mixed_precision == "bf16":
        assert seen["activations"] == {torch.bfloat16}


def test_a_strategy_leaving_half_precision_weights_is_stopped(monkeypatch, subject_images):
    from db_adapters.strategies.lora import Lora

    original = Lora.apply

    def apply(self, pipe, family, *, train_text_encoder):
        original(self, pipe, family, train_text_encoder=train_text_encoder)
        for params in self.trainable_parameters(pipe).values():
            for param in params:
                param.data = param.data.to(torch.bfloat16)

    monkeypatch.setattr(Lora, "apply", apply)
    with pytest.raises(TrainingError, match=r"left trainable weights in bfloat16.*must be float32"):
        personalize(tiny_pipeline(), subject_images, "dog", mixed_precision="bf16", **{**FAST, "steps": 1})
