"""personalize() end to end on the tiny pipeline: both strategies learn, and only what they should."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import fixed_instance_loss, make_subject_images, render_np

from db_adapters import AdapterError, InputError, personalize, unload_adapter
from db_adapters.data import image_batch
from db_adapters.testing import tiny_pipeline


def assert_instance_loss_fell(pipe, images, prompt: str) -> None:
    # A fresh tiny pipeline has the same weights the trained one started from.
    before = fixed_instance_loss(tiny_pipeline(), images, prompt)
    after = fixed_instance_loss(pipe, images, prompt)
    assert after < 0.9 * before, (before, after)


def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def test_lora_learns_and_changes_only_adapter_weights(subject_images, tmp_path):
    pipe = tiny_pipeline()
    base_unet = snapshot(pipe.unet)
    before_images = render_np(pipe)
    adapter = personalize(
        pipe,
        subject_images,
        "dog",
        steps=40,
        learning_rate=2e-3,
        num_class_images=2,
        class_inference_steps=2,
        output_dir=tmp_path,
        progress=False,
    )
    assert_instance_loss_fell(pipe, subject_images, adapter.instance_prompt)
    assert len(adapter.history) == 40 and {"instance", "prior", "loss", "lr"} <= set(adapter.history[0])
    state = pipe.unet.state_dict()
    lora_keys = [k for k in state if ".lora_" in k]
    assert lora_keys
    for key, value in base_unet.items():
        current = state.get(
            key, state.get(key.replace(".weight", ".base_layer.weight").replace(".bias", ".base_layer.bias"))
        )
        assert torch.equal(current, value), key
    assert any(state[k].abs().sum() > 0 for k in lora_keys if "lora_B" in k)
    assert not any(p.requires_grad for n, p in pipe.unet.named_parameters() if ".lora_" in n)
    assert abs(render_np(pipe) - before_images).max() > 0  # the pipe itself now carries the adapter


def test_full_learns_and_changes_the_unet(subject_images, tmp_path):
    pipe = tiny_pipeline()
    base_unet = snapshot(pipe.unet)
    base_text = snapshot(pipe.text_encoder)
    adapter = personalize(
        pipe,
        subject_images,
        "dog",
        strategy="full",
        steps=20,
        learning_rate=3e-4,
        num_class_images=2,
        class_inference_steps=2,
        output_dir=tmp_path,
        progress=False,
    )
    assert_instance_loss_fell(pipe, subject_images, adapter.instance_prompt)
    changed = [k for k, v in pipe.unet.state_dict().items() if not torch.equal(v, base_unet[k])]
    assert len(changed) > 0.5 * len(base_unet)
    assert all(torch.equal(v, base_text[k]) for k, v in pipe.text_encoder.state_dict().items())


@pytest.mark.parametrize("strategy", ["lora", "full"])
def test_text_encoder_trains_when_asked(strategy, subject_images, tmp_path, fast):
    pipe = tiny_pipeline()
    base_text = snapshot(pipe.text_encoder)
    personalize(
        pipe,
        subject_images,
        "dog",
        strategy=strategy,
        train_text_encoder=True,
        learning_rate=1e-3,
        output_dir=tmp_path,
        **fast,
    )
    state = pipe.text_encoder.state_dict()
    if strategy == "full":
        assert any(not torch.equal(state[k], v) for k, v in base_text.items())
    else:
        assert any(".lora_B" in k and state[k].abs().sum() > 0 for k in state)


@pytest.mark.parametrize("strategy", ["lora", "full"])
def test_failure_leaves_the_pipeline_as_it_was(strategy, subject_images, tmp_path, fast):
    pipe = tiny_pipeline()
    unet_before, text_before = snapshot(pipe.unet), snapshot(pipe.text_encoder)
    grads_before = {n: p.requires_grad for n, p in pipe.unet.named_parameters()}
    images_before = render_np(pipe)

    def crash(step, logs):
        if step == 2:
            raise KeyboardInterrupt  # what Ctrl-C raises mid-run

    with pytest.raises(KeyboardInterrupt):
        personalize(
            pipe,
            subject_images,
            "dog",
            strategy=strategy,
            train_text_encoder=True,
            callback=crash,
            learning_rate=1e-2,
            output_dir=tmp_path,
            **fast,
        )
    assert snapshot(pipe.unet).keys() == unet_before.keys()
    assert all(torch.equal(v, unet_before[k]) for k, v in pipe.unet.state_dict().items())
    assert all(torch.equal(v, text_before[k]) for k, v in pipe.text_encoder.state_dict().items())
    assert {n: p.requires_grad for n, p in pipe.unet.named_parameters()} == grads_before
    assert not getattr(pipe.unet, "peft_config", None)
    assert not pipe.unet.training
    assert abs(render_np(pipe) - images_before).max() == 0
    personalize(pipe, subject_images, "dog", strategy=strategy, output_dir=tmp_path, **fast)  # usable again


def test_second_personalize_is_refused_until_unloaded(subject_images, tmp_path, fast):
    pipe = tiny_pipeline()
    personalize(pipe, subject_images, "dog", output_dir=tmp_path, **fast)
    with pytest.raises(AdapterError, match="unload_adapter"):
        personalize(pipe, subject_images, "cat", output_dir=tmp_path, **fast)
    unload_adapter(pipe)
    second = personalize(pipe, subject_images, "cat", output_dir=tmp_path, **fast)
    assert second.class_noun == "cat"


def test_a_users_own_lora_is_not_trained_over(subject_images, tmp_path, fast):
    from peft import LoraConfig

    pipe = tiny_pipeline()
    pipe.unet.add_adapter(LoraConfig(r=2, target_modules=["to_q"]), adapter_name="style")
    with pytest.raises(AdapterError, match="unload_lora_weights"):
        personalize(pipe, subject_images, "dog", output_dir=tmp_path, **fast)


def test_sd2_style_v_prediction_pipeline_trains(subject_images, tmp_path, fast, monkeypatch):
    from db_adapters.objectives import DDPMObjective

    pipe = tiny_pipeline(v_prediction=True)
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    assert pipe.unet.config.use_linear_projection
    targets = []
    original = DDPMObjective.target

    def recording(self, latents, noise, timesteps):
        target = original(self, latents, noise, timesteps)
        targets.append((latents, noise, timesteps, target))
        return target

    monkeypatch.setattr(DDPMObjective, "target", recording)
    adapter = personalize(pipe, subject_images, "dog", snr_gamma=5.0, output_dir=tmp_path, **fast)
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in adapter.history)
    assert len(targets) == 2 * fast["steps"]  # instance and prior half, every step
    alphas = pipe.scheduler.alphas_cumprod
    for latents, noise, timesteps, target in targets:
        # v = sqrt(alpha_bar_t) * noise - sqrt(1 - alpha_bar_t) * x_0, by hand from the pipeline's schedule
        a = alphas[timesteps].reshape(-1, 1, 1, 1)
        assert torch.allclose(target, a.sqrt() * noise - (1 - a).sqrt() * latents, atol=1e-5)
        assert not torch.allclose(target, noise)


def test_no_prior_preservation_logs_only_the_instance_term(subject_images, tmp_path, fast):
    adapter = personalize(tiny_pipeline(), subject_images, "dog", prior_preservation=False, output_dir=tmp_path, **fast)
    assert "prior" not in adapter.history[0]
    assert not (tmp_path / "class_images").exists()


OPTIONS = {
    "gradient_accumulation_steps": 2,
    "batch_size": 2,
    "lr_scheduler": "linear",
    "lr_warmup_steps": 2,
    "learning_rate": 1e-3,
}


def test_options_callback_previews_and_schedule(subject_images, tmp_path, fast, monkeypatch):
    import torch.utils.checkpoint

    from db_adapters import latents

    checkpointed, training_sets = [], []
    real_checkpoint, real_training_set = torch.utils.checkpoint.checkpoint, latents.training_set

    def counting_checkpoint(*args, **kwargs):
        checkpointed.append(1)
        return real_checkpoint(*args, **kwargs)

    def recording_training_set(*args, **kwargs):
        training_sets.append(real_training_set(*args, **kwargs))
        return training_sets[-1]

    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", counting_checkpoint)
    monkeypatch.setattr("db_adapters.api.training_set", recording_training_set)
    seen = []
    fast["steps"] = 6
    adapter = personalize(
        tiny_pipeline(),
        subject_images,
        "dog",
        output_dir=tmp_path / "a",
        callback=lambda s, logs: seen.append(s),
        gradient_checkpointing=True,
        noise_offset=0.1,
        random_flip=True,
        validation_prompts=["a {id} dog"],
        validation_every=3,
        validation_steps=2,
        **OPTIONS,
        **fast,
    )
    assert seen == [1, 2, 3, 4, 5, 6]
    lrs = [h["lr"] for h in adapter.history]
    # Two warmup steps, then linear decay to 0; accumulation must not advance the schedule per micro-batch.
    assert lrs[:2] == pytest.approx([0.5e-3, 1e-3]) and lrs[-1] == pytest.approx(0.0)
    previews = sorted(p.name for p in (tmp_path / "a" / "previews").iterdir())
    assert previews == ["step_000003_0.png", "step_000006_0.png"]
    # Checkpointing was on during the steps: the UNet's blocks ran through torch.utils.checkpoint.
    assert len(checkpointed) >= 6 * 2
    # random_flip: the subject is encoded in both orientations, the second half mirrored.
    instance = training_sets[0].instance.latents
    assert len(instance) == 2 * len(subject_images)
    flipped = latents.encode_images(tiny_pipeline().vae, image_batch(subject_images, 32, flip=True))
    assert torch.allclose(instance.mean[len(subject_images) :], flipped.mean, atol=1e-5)
    assert not torch.allclose(instance.mean[: len(subject_images)], flipped.mean, atol=1e-3)

    # noise_offset changed the noise: the same run without it has other losses from the first step.
    checkpointed.clear()
    plain = personalize(
        tiny_pipeline(), subject_images, "dog", output_dir=tmp_path / "b", random_flip=True, **OPTIONS, **fast
    )
    assert not checkpointed  # and without gradient_checkpointing, nothing is checkpointed
    assert plain.history[0]["loss"] != adapter.history[0]["loss"]


def test_bf16_mixed_precision_keeps_trainable_weights_fp32(subject_images, tmp_path, fast):
    # A pipeline loaded in bf16 (dtype=torch.bfloat16), mixed_precision left unset: bf16 autocast.
    pipe = tiny_pipeline().to(dtype=torch.bfloat16)
    dtypes = []

    def check(step, logs):
        params = [p for n, p in pipe.unet.named_parameters() if ".lora_" in n]
        dtypes.extend({p.dtype for p in params})

    adapter = personalize(pipe, subject_images, "dog", callback=check, output_dir=tmp_path, **fast)
    assert set(dtypes) == {torch.float32}
    assert all(math.isfinite(h["loss"]) for h in adapter.history)
    assert {p.dtype for n, p in pipe.unet.named_parameters() if ".lora_" not in n} == {torch.bfloat16}


@pytest.mark.parametrize(
    ("pipeline_dtype", "mixed_precision", "expected"),
    [("bfloat16", None, "bf16"), ("float16", None, "fp16"), ("float32", None, "no"), ("float32", "bf16", "bf16")],
)
def test_mixed_precision_left_unset_matches_the_pipeline(pipeline_dtype, mixed_precision, expected):
    from db_adapters.plan import resolve_mixed_precision

    assert resolve_mixed_precision(mixed_precision, getattr(torch, pipeline_dtype)) == expected


@pytest.mark.parametrize(("bf16_supported", "expected"), [(True, "bf16"), (False, "no")])
def test_a_float32_pipeline_on_a_gpu_trains_in_bf16_where_the_gpu_supports_it(bf16_supported, expected, monkeypatch):
    from db_adapters import plan

    monkeypatch.setattr(plan, "_cuda_bf16_supported", lambda: bf16_supported)
    assert plan.resolve_mixed_precision(None, torch.float32, torch.device("cuda", 0)) == expected
    assert plan.resolve_mixed_precision(None, torch.float32, torch.device("cpu")) == "no"
    assert plan.resolve_mixed_precision("no", torch.float32, torch.device("cuda", 0)) == "no"  # asked for: kept
    assert plan.resolve_mixed_precision(None, torch.float16, torch.device("cuda", 0)) == "fp16"


@pytest.mark.parametrize(("cpu_bf16", "on_cpu"), [(False, "no"), (True, "bf16")])
def test_class_images_follow_the_runs_precision_unless_told(cpu_bf16, on_cpu, subject_images, fast, monkeypatch):
    from db_adapters import api, plan

    monkeypatch.setattr(plan, "_cpu_bf16_native", lambda: cpu_bf16)
    seen = []
    real = api.make_class_images
    monkeypatch.setattr(api, "make_class_images", lambda *a, **k: seen.append(k["precision"]) or real(*a, **k))
    personalize(tiny_pipeline(), subject_images, "dog", **fast)
    personalize(tiny_pipeline(), subject_images, "dog", class_precision="bf16", **fast)
    personalize(tiny_pipeline().to(dtype=torch.bfloat16), subject_images, "dog", **fast)  # generates in bf16 as is
    personalize(tiny_pipeline(), subject_images, "dog", class_precision="no", **fast)
    assert seen == [on_cpu, "bf16", "no", "no"]  # a float32 pipeline on a CPU with native bf16: bf16


@pytest.mark.parametrize(
    ("requested", "mixed_precision", "dtype", "device", "cpu_bf16", "expected"),
    [
        (None, "bf16", "float32", "cuda", False, "bf16"),  # the run's autocast, on a GPU
        (None, "no", "float32", "cuda", True, "no"),  # a GPU run in fp32 asked for: the CPU's flags don't matter
        (None, "no", "float32", "cpu", True, "bf16"),
        (None, "no", "float32", "cpu", False, "no"),  # emulated bf16 is slower than fp32
        (None, "fp16", "float16", "cuda", True, "no"),  # generates in its own dtype
        ("fp16", "no", "float32", "cpu", True, "fp16"),  # asked for: kept
    ],
)
def test_class_precision_left_unset(requested, mixed_precision, dtype, device, cpu_bf16, expected, monkeypatch):
    from db_adapters import plan

    monkeypatch.setattr(plan, "_cpu_bf16_native", lambda: cpu_bf16)
    resolved = plan.resolve_class_precision(requested, mixed_precision, getattr(torch, dtype), torch.device(device))
    assert resolved == expected


def test_a_torch_without_the_cpu_bf16_queries_means_fp32_class_images(monkeypatch):
    from db_adapters import plan

    for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):
        monkeypatch.delattr(torch.cpu, name, raising=False)
    assert plan._cpu_bf16_native() is False
    assert plan.resolve_class_precision(None, "no", torch.float32, torch.device("cpu")) == "no"


@pytest.mark.parametrize("mixed_precision", ["no", "fp16"])
def test_a_half_pipeline_under_another_precision_is_refused_naming_both(mixed_precision, subject_images, fast):
    pipe = tiny_pipeline().to(dtype=torch.bfloat16)
    with pytest.raises(InputError, match=rf"mixed_precision='{mixed_precision}' .* loaded in bfloat16"):
        personalize(pipe, subject_images, "dog", mixed_precision=mixed_precision, **fast)


def test_training_runs_on_the_pipelines_device_not_accelerates(subject_images, tmp_path, fast, monkeypatch):
    """A pipeline on cuda:1 trains on cuda:1: here accelerate is told its device is `meta`, and training
    must still run where the pipeline is (no tensor or module may follow accelerate's device)."""
    import accelerate

    monkeypatch.setattr(accelerate.Accelerator, "device", property(lambda self: torch.device("meta")))
    pipe = tiny_pipeline()
    adapter = personalize(pipe, subject_images, "dog", output_dir=tmp_path, **fast)
    assert all(math.isfinite(h["loss"]) for h in adapter.history)
    assert {p.device.type for p in pipe.unet.parameters()} == {"cpu"}


def test_a_fused_then_unloaded_lora_is_accepted(subject_images, tmp_path, fast):
    from peft import LoraConfig

    pipe = tiny_pipeline()
    pipe.unet.add_adapter(LoraConfig(r=2, target_modules=["to_q"], init_lora_weights=False), adapter_name="style")
    pipe.fuse_lora()
    pipe.unload_lora_weights()
    adapter = personalize(pipe, subject_images, "dog", output_dir=tmp_path, **fast)
    assert len(adapter.history) == fast["steps"]


def test_8bit_adam_state_is_uint8():
    from db_adapters.config import TrainConfig
    from db_adapters.trainer import make_optimizer

    layer = torch.nn.Linear(16, 16)
    optimizer = make_optimizer(
        [{"params": list(layer.parameters()), "lr": 1e-3}], TrainConfig(use_8bit_adam=True, adam_min_8bit_size=16)
    )
    layer(torch.randn(4, 16)).pow(2).mean().backward()
    optimizer.step()
    state = optimizer.state[layer.weight]
    assert state["state1"].dtype == torch.uint8 and state["state2"].dtype == torch.uint8


def test_fused_adamw_is_chosen_for_floating_tensors_all_on_cuda_or_all_on_the_cpu():
    from types import SimpleNamespace

    from db_adapters.trainer import fused_adamw_suits

    def on(device: str, dtype: torch.dtype = torch.float32) -> SimpleNamespace:  # a CPU-only stand-in for a tensor
        return SimpleNamespace(device=torch.device(device), dtype=dtype)

    assert fused_adamw_suits([on("cuda"), on("cuda:1", torch.bfloat16)])
    assert fused_adamw_suits([on("cpu")])
    assert not fused_adamw_suits([on("cuda"), on("mps")])  # one tensor elsewhere: torch's own choice
    assert not fused_adamw_suits([on("cuda", torch.int8)])
    assert not fused_adamw_suits([])


def test_cpu_training_uses_fused_adamw_with_the_for_loop_adamws_numbers():
    from db_adapters.config import TrainConfig
    from db_adapters.trainer import make_optimizer

    torch.manual_seed(0)
    layers = [torch.nn.Linear(4, 4) for _ in range(2)]
    layers[1].load_state_dict(layers[0].state_dict())
    fused = make_optimizer([{"params": list(layers[0].parameters()), "lr": 1e-2}], TrainConfig())
    loop = torch.optim.AdamW(layers[1].parameters(), lr=1e-2, weight_decay=1e-2, foreach=False)
    assert fused.param_groups[0]["fused"]
    initial = layers[0].weight.detach().clone()
    inputs = torch.randn(8, 4)
    for _ in range(5):
        for layer, optimizer in zip(layers, (fused, loop), strict=True):
            layer(inputs).pow(2).mean().backward()
            optimizer.step()
            optimizer.zero_grad()
    assert (layers[0].weight - initial).abs().max() > 1e-3  # the steps moved the weights
    torch.testing.assert_close(layers[0].weight, layers[1].weight, rtol=1e-5, atol=1e-6)


def test_8bit_adam_trains_the_tiny_pipeline(subject_images, tmp_path, monkeypatch):
    from db_adapters import trainer

    optimizers = []
    real = trainer.make_optimizer
    monkeypatch.setattr(trainer, "make_optimizer", lambda *a, **k: optimizers.append(real(*a, **k)) or optimizers[-1])
    pipe = tiny_pipeline()
    adapter = personalize(
        pipe,
        subject_images,
        "dog",
        use_8bit_adam=True,
        adam_min_8bit_size=16,
        steps=40,
        learning_rate=2e-3,
        num_class_images=2,
        class_inference_steps=2,
        progress=False,
        output_dir=tmp_path,
    )
    assert len(adapter.history) == 40
    assert_instance_loss_fell(pipe, subject_images, adapter.instance_prompt)
    (optimizer,) = optimizers
    states = [state for state in optimizer.state.values() if "state1" in state]
    assert states and all(s["state1"].dtype == torch.uint8 and s["state2"].dtype == torch.uint8 for s in states)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"steps": 0}, "steps"),
        ({"learning_rate": -1.0}, "learning_rate"),
        ({"resolution": 30}, "resolution"),
        ({"strategy": "nope"}, "unknown strategy"),
        ({"rank": 4, "strategy": "full"}, "do not belong"),
        ({"mixed_precision": "fp8"}, "mixed_precision"),
        ({"validation_every": 2}, "validation_prompts"),
        ({"rank": 0}, "rank"),
    ],
)
def test_bad_settings_are_input_errors(kwargs, match, subject_images):
    with pytest.raises(InputError, match=match):
        personalize(tiny_pipeline(), subject_images, "dog", progress=False, **kwargs)


def test_unsupported_pipeline_is_named():
    from diffusers import StableDiffusionImg2ImgPipeline

    from db_adapters.testing import tiny_components

    pipe = StableDiffusionImg2ImgPipeline(**tiny_components())
    with pytest.raises(InputError, match="StableDiffusionImg2ImgPipeline is not supported"):
        personalize(pipe, [], "dog")


def test_progress_in_a_log_is_a_few_whole_lines(capsys, fast):
    """stderr is not a terminal under pytest: one line every ~5% of the steps, no carriage-return redraws."""
    personalize(tiny_pipeline(), make_subject_images(), "dog", **{**fast, "steps": 40, "progress": True})
    lines = capsys.readouterr().err.splitlines()
    steps = [line for line in lines if line.startswith("personalize ")]
    assert len(steps) == 20 and steps[-1].startswith("personalize 40/40 (100%) loss=")
    assert "it/s ETA" in steps[0] and not any("\r" in line for line in steps)


def test_compile_trains_through_the_compiled_denoiser(subject_images, tmp_path, monkeypatch):
    compiled = []
    real_compile = torch.compile

    def recording_compile(module, **kwargs):
        compiled.append(module)
        # aot_eager traces the UNet with its LoRA layers and the backward as inductor would, without the C++ build.
        return real_compile(module, backend="aot_eager", **kwargs)

    monkeypatch.setattr(torch, "compile", recording_compile)
    pipe = tiny_pipeline()
    adapter = personalize(
        pipe,
        subject_images,
        "dog",
        compile=True,
        steps=3,
        num_class_images=2,
        class_inference_steps=2,
        progress=False,
        output_dir=tmp_path,
    )
    assert [m for m in compiled if isinstance(m, torch.nn.Module)] == [pipe.unet]  # (libraries compile functions)
    assert len(adapter.history) == 3 and all(math.isfinite(h["loss"]) for h in adapter.history)
    assert type(pipe.unet).__name__ == "UNet2DConditionModel"  # the pipeline keeps its own, uncompiled module
