"""The family contract suite: every registered model family, on its tiny pipeline, passes the same checks.

A new family adds its tiny pipeline to `db_adapters.testing.TINY_PIPELINES`; nothing here changes.
Family-specific checks (a family's conditioning equals its pipeline's own) follow the shared ones.
"""

from __future__ import annotations

import pytest
import torch
from conftest import fixed_instance_loss, make_subject_images, render_np

from db_adapters import InputError, load_adapter, personalize
from db_adapters.binder import identifier_candidates
from db_adapters.families import available_families, family_of, get_family
from db_adapters.testing import TINY_PIPELINES, tiny_pipeline_of

FAMILIES = [family.name for family in available_families()]
QUICK = {"num_class_images": 2, "class_inference_steps": 2, "progress": False}


def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def test_every_family_has_a_tiny_pipeline():
    assert set(FAMILIES) == set(TINY_PIPELINES), "add the new family's tiny pipeline to testing.TINY_PIPELINES"
    for name in FAMILIES:
        assert family_of(tiny_pipeline_of(name)).name == name


@pytest.mark.parametrize("family", FAMILIES)
def test_lora_learns_and_changes_only_adapter_weights(family, tmp_path):
    pipe = tiny_pipeline_of(family)
    denoiser_name = get_family(family).denoiser
    base = snapshot(getattr(pipe, denoiser_name))
    images = make_subject_images()
    adapter = personalize(pipe, images, "dog", steps=40, learning_rate=1e-2, output_dir=tmp_path, **QUICK)
    before = fixed_instance_loss(tiny_pipeline_of(family), images, adapter.instance_prompt)
    after = fixed_instance_loss(pipe, images, adapter.instance_prompt)
    # Random-weight tiny models: LoRA on the attention projections lowers the loss by 10-15% here.
    assert after < 0.92 * before, (before, after)
    state = getattr(pipe, denoiser_name).state_dict()
    assert any(".lora_B" in k and state[k].abs().sum() > 0 for k in state)
    for key, value in base.items():
        current = state.get(
            key, state.get(key.replace(".weight", ".base_layer.weight").replace(".bias", ".base_layer.bias"))
        )
        assert torch.equal(current, value), key


@pytest.mark.parametrize("family", FAMILIES)
def test_full_learns_and_changes_the_denoiser(family, tmp_path):
    pipe = tiny_pipeline_of(family)
    spec = get_family(family)
    base = snapshot(getattr(pipe, spec.denoiser))
    encoders = {name: snapshot(getattr(pipe, name)) for name in spec.text_encoders}
    images = make_subject_images()
    adapter = personalize(
        pipe, images, "dog", strategy="full", steps=20, learning_rate=1e-3, output_dir=tmp_path, **QUICK
    )
    before = fixed_instance_loss(tiny_pipeline_of(family), images, adapter.instance_prompt)
    after = fixed_instance_loss(pipe, images, adapter.instance_prompt)
    assert after < 0.9 * before, (before, after)
    changed = [k for k, v in getattr(pipe, spec.denoiser).state_dict().items() if not torch.equal(v, base[k])]
    assert len(changed) > 0.5 * len(base)
    for name, state in encoders.items():  # frozen unless asked
        assert all(torch.equal(v, state[k]) for k, v in getattr(pipe, name).state_dict().items()), name


@pytest.mark.parametrize("strategy", ["lora", "full"])
@pytest.mark.parametrize("family", FAMILIES)
def test_every_text_encoder_trains_when_asked(family, strategy, tmp_path):
    pipe = tiny_pipeline_of(family)
    spec = get_family(family)
    trained = spec.components(train_text_encoder=True)[1:]
    assert trained
    before = {name: snapshot(getattr(pipe, name)) for name in spec.text_encoders}
    personalize(
        pipe,
        make_subject_images(),
        "dog",
        strategy=strategy,
        train_text_encoder=True,
        steps=3,
        learning_rate=1e-3,
        output_dir=tmp_path,
        **QUICK,
    )
    for name in spec.text_encoders:
        state = getattr(pipe, name).state_dict()
        if name not in trained:  # T5 (SD3, Flux) is never trained
            assert all(torch.equal(v, before[name][k]) for k, v in state.items()), name
        elif strategy == "full":
            assert any(not torch.equal(state[k], v) for k, v in before[name].items()), name
        else:
            assert any(".lora_B" in k and state[k].abs().sum() > 0 for k in state), name


@pytest.mark.parametrize("family", FAMILIES)
def test_text_encoder_lora_learns_under_gradient_checkpointing(family, tmp_path):
    """peft-injected text-encoder LoRA layers get gradients (and change) with checkpointing on."""
    pipe = tiny_pipeline_of(family)
    spec = get_family(family)
    seen: dict[str, list[torch.Tensor]] = {}

    trained = spec.components(train_text_encoder=True)[1:]

    def record(step, logs):
        for name in trained:
            params = [p for n, p in getattr(pipe, name).named_parameters() if ".lora_A" in n]
            seen.setdefault(name, []).append(torch.cat([p.detach().flatten() for p in params]).clone())

    settings = {"steps": 3, "learning_rate": 1e-2, "gradient_checkpointing": True, "train_text_encoder": True}
    personalize(pipe, make_subject_images(), "dog", callback=record, output_dir=tmp_path, **settings, **QUICK)
    for name in trained:
        first, last = seen[name][0], seen[name][-1]
        assert not torch.equal(first, last), f"{name}'s LoRA A weights did not change between steps 1 and 3"
        state = getattr(pipe, name).state_dict()
        assert any(".lora_B" in k and state[k].abs().sum() > 0 for k in state), name


@pytest.mark.parametrize("family", FAMILIES)
def test_lora_file_renders_the_same_in_plain_diffusers(family, tmp_path):
    """No db_adapters on the loading side: the pipeline class's own load_lora_weights, alpha != rank,
    LoRA in every text encoder."""
    pipe = tiny_pipeline_of(family)
    adapter = personalize(
        pipe,
        make_subject_images(),
        "dog",
        rank=4,
        alpha=8,
        train_text_encoder=True,
        steps=3,
        learning_rate=5e-2,
        output_dir=tmp_path,
        **QUICK,
    )
    path = adapter.save(tmp_path / "dog.safetensors")
    prompt = f"a {adapter.identifier} dog"
    trained = render_np(pipe, prompt)

    plain = tiny_pipeline_of(family)
    base = render_np(plain, prompt)
    plain.load_lora_weights(str(path))
    assert abs(render_np(plain, prompt) - trained).max() <= 1e-4
    assert abs(trained - base).max() > 1e-3
    for name in get_family(family).components(train_text_encoder=True)[1:]:  # every trained encoder's layers
        assert any("lora" in k for k in getattr(plain, name).state_dict()), name


@pytest.mark.parametrize("strategy", ["lora", "full"])
@pytest.mark.parametrize("family", FAMILIES)
def test_load_adapter_renders_the_same(family, strategy, tmp_path):
    pipe = tiny_pipeline_of(family)
    settings = {"steps": 2, "learning_rate": 1e-2 if strategy == "lora" else 1e-3, "train_text_encoder": True}
    adapter = personalize(
        pipe, make_subject_images(), "dog", strategy=strategy, output_dir=tmp_path, **settings, **QUICK
    )
    path = adapter.save(tmp_path / "dog.safetensors")
    prompt = f"a {adapter.identifier} dog"
    fresh = tiny_pipeline_of(family)
    loaded = load_adapter(fresh, path)
    assert loaded.identifier == adapter.identifier
    assert abs(render_np(fresh, prompt) - render_np(pipe, prompt)).max() <= 1e-4


@pytest.mark.parametrize("family", FAMILIES)
def test_identifier_is_one_rare_token_in_every_tokenizer(family):
    pipe = tiny_pipeline_of(family)
    spec = get_family(family)
    tokenizers = spec.tokenizer_list(pipe)
    candidates = identifier_candidates(tokenizers, "dog")
    assert candidates
    for tokenizer in tokenizers:
        alone = set(identifier_candidates(tokenizer, "dog"))
        assert set(candidates) <= alone
        for identifier in candidates:
            with_it = tokenizer(f"a {identifier} dog", add_special_tokens=False).input_ids
            without = tokenizer("a dog", add_special_tokens=False).input_ids
            assert len(with_it) == len(without) + 1, (identifier, tokenizer.name_or_path)
    if len(tokenizers) > 1:  # the intersection is a real constraint: each tokenizer alone allows more
        assert any(len(identifier_candidates(t, "dog")) > len(candidates) for t in tokenizers)


def _img2img_variants(family: str) -> list:
    import diffusers

    pipe = tiny_pipeline_of(family)
    components = dict(pipe.components)
    variants = []
    if family == "sd":
        variants.append(diffusers.StableDiffusionImg2ImgPipeline(**components))
        variants.append(diffusers.StableDiffusionInpaintPipeline(**components))
    elif family == "sdxl":
        variants.append(diffusers.StableDiffusionXLImg2ImgPipeline(**components))
        variants.append(diffusers.StableDiffusionXLInpaintPipeline(**components))
        # The refiner: an img2img pipeline without the first text encoder.
        refiner = {**components, "text_encoder": None, "tokenizer": None}
        variants.append(diffusers.StableDiffusionXLImg2ImgPipeline(**refiner, requires_aesthetics_score=True))
    elif family == "sd3":
        variants.append(diffusers.StableDiffusion3Img2ImgPipeline(**components))
    elif family == "flux":
        variants.append(diffusers.FluxImg2ImgPipeline(**components))
    return variants


@pytest.mark.parametrize("family", FAMILIES)
def test_unsupported_pipelines_are_named_with_what_is_supported(family):
    variants = _img2img_variants(family)
    assert variants
    for pipe in variants:
        with pytest.raises(InputError, match=type(pipe).__name__) as raised:
            personalize(pipe, make_subject_images(), "dog", steps=1, **QUICK)
        message = str(raised.value)
        assert "StableDiffusionPipeline" in message and "StableDiffusionXLPipeline" in message


# --- each family's conditioning is what its pipeline computes at inference ---------------------------


def test_sd_conditioning_equals_the_pipelines_own():
    pipe = tiny_pipeline_of("sd")
    family = get_family("sd")
    ours = family.encode_prompt(pipe, family.prompt_ids(pipe, "a red dog"))
    theirs, _ = pipe.encode_prompt("a red dog", "cpu", 1, False)
    assert torch.equal(ours["encoder_hidden_states"], theirs)


def test_sdxl_conditioning_equals_the_pipelines_own():
    from db_adapters.data import CropGeometry

    pipe = tiny_pipeline_of("sdxl")
    family = get_family("sdxl")
    ours = family.encode_prompt(pipe, family.prompt_ids(pipe, "a red dog"))
    embeds, _, pooled, _ = pipe.encode_prompt("a red dog", device="cpu", do_classifier_free_guidance=False)
    assert torch.equal(ours["encoder_hidden_states"], embeds)  # (1, 77, 32 + 32): both penultimate layers
    assert torch.equal(ours["text_embeds"], pooled)
    time_ids = family.image_conditioning([CropGeometry((48, 40), (4, 0))], 32)["time_ids"]
    expected = pipe._get_add_time_ids((48, 40), (4, 0), (32, 32), dtype=torch.float32, text_encoder_projection_dim=32)
    assert torch.equal(time_ids, expected)


def test_sdxl_time_ids_follow_each_training_image():
    from db_adapters.data import crop_geometry

    tall, wide = make_subject_images(1, size=40)[0].resize((40, 80)), make_subject_images(1)[0].resize((96, 48))
    rows = get_family("sdxl").image_conditioning([crop_geometry(tall, 32), crop_geometry(wide, 32)], 32)["time_ids"]
    # (original h, w, crop top, left, target h, w): 80x40 -> 64x32, centre crop from row 16; 48x96 -> 32x64.
    assert rows.tolist() == [[80, 40, 16, 0, 32, 32], [48, 96, 0, 16, 32, 32]]


@pytest.mark.parametrize("family", FAMILIES)
def test_rank4_lora_file_size(family, tmp_path):
    """Prints the size of a rank-4 LoRA file (denoiser only, and with every text encoder) per family."""
    sizes = {}
    for train_text_encoder in (False, True):
        pipe = tiny_pipeline_of(family)
        settings = {"steps": 1, "rank": 4, "train_text_encoder": train_text_encoder}
        adapter = personalize(pipe, make_subject_images(), "dog", output_dir=tmp_path, **settings, **QUICK)
        path = adapter.save(tmp_path / f"{family}-{train_text_encoder}.safetensors")
        sizes[train_text_encoder] = path.stat().st_size
    print(f"{family}: rank-4 LoRA file {sizes[False]} bytes; with the text encoders {sizes[True]} bytes")
    assert sizes[False] < sizes[True] < 10 * sizes[False]


# --- flow-matching families: memory defaults ----------------------------------------------------------

FLOW = [name for name in FAMILIES if name in ("sd3", "flux")]


@pytest.mark.parametrize("family", FLOW)
def test_frozen_parts_leave_the_accelerator_while_training(family, tmp_path, monkeypatch):
    """offload_frozen: after caching, the VAE and the frozen T5 are moved to the CPU (here the CPU is the
    training device, so the calls are what can be checked), the trained CLIP encoder is not, and every part
    is back where it was afterwards."""
    pipe = tiny_pipeline_of(family)
    spec = get_family(family)
    frozen = {"vae", *(name for name in spec.text_encoders if name not in spec.components(True))}
    moves: list[tuple[str, str]] = []
    names = {id(getattr(pipe, name)): name for name in ("vae", *spec.text_encoders)}
    real_to = torch.nn.Module.to

    def spying_to(self, *args, **kwargs):
        if id(self) in names and args and isinstance(args[0], str | torch.device):
            moves.append((names[id(self)], str(args[0])))
        return real_to(self, *args, **kwargs)

    monkeypatch.setattr(torch.nn.Module, "to", spying_to)
    settings = {"steps": 2, "offload_frozen": True, "train_text_encoder": True}
    personalize(pipe, make_subject_images(), "dog", output_dir=tmp_path, **settings, **QUICK)
    assert {name for name, device in moves if device == "cpu"} == frozen
    trained_encoders = set(spec.components(True)[1:])
    assert not {name for name, _ in moves} & trained_encoders
    for name in ("vae", *spec.text_encoders):
        assert {p.device.type for p in getattr(pipe, name).parameters()} == {"cpu"}


@pytest.mark.parametrize("family", FLOW)
def test_checkpointing_and_8bit_adam_on_the_transformer(family, tmp_path, monkeypatch):
    import torch.utils.checkpoint

    from db_adapters import trainer

    checkpointed, optimizers = [], []
    real_checkpoint, real_optimizer = torch.utils.checkpoint.checkpoint, trainer.make_optimizer
    monkeypatch.setattr(
        torch.utils.checkpoint, "checkpoint", lambda *a, **k: checkpointed.append(1) or real_checkpoint(*a, **k)
    )
    monkeypatch.setattr(
        trainer, "make_optimizer", lambda *a, **k: optimizers.append(real_optimizer(*a, **k)) or optimizers[-1]
    )
    pipe = tiny_pipeline_of(family)
    settings = {"steps": 3, "learning_rate": 1e-2, "gradient_checkpointing": True, "use_8bit_adam": True}
    adapter = personalize(
        pipe, make_subject_images(), "dog", adam_min_8bit_size=16, output_dir=tmp_path, **settings, **QUICK
    )
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in adapter.history)
    assert checkpointed  # the transformer's blocks ran through torch.utils.checkpoint
    states = [s for s in optimizers[0].state.values() if "state1" in s]
    assert states and all(s["state1"].dtype == torch.uint8 for s in states)
    state = pipe.transformer.state_dict()
    assert any(".lora_B" in k and state[k].abs().sum() > 0 for k in state)


@pytest.mark.parametrize("family", FLOW)
def test_ddpm_settings_are_refused_on_flow_models_and_the_reverse(family, tmp_path):
    with pytest.raises(InputError, match="snr_gamma=5.0 applies to DDPM models"):
        personalize(tiny_pipeline_of(family), make_subject_images(), "dog", snr_gamma=5.0, **QUICK)
    with pytest.raises(InputError, match="loss_weighting='cosmap' applies to flow-matching models"):
        personalize(tiny_pipeline_of("sd"), make_subject_images(), "dog", loss_weighting="cosmap", **QUICK)
    with pytest.raises(InputError, match="class_sampler='ddpm' does not suit"):
        personalize(tiny_pipeline_of(family), make_subject_images(), "dog", class_sampler="ddpm", **QUICK)


def test_flux_dev_is_given_the_guidance_value_and_schnell_none(tmp_path, monkeypatch):
    from db_adapters.testing import tiny_flux_pipeline

    seen = []
    flux = get_family("flux")
    real_predict = flux.predict.__func__
    monkeypatch.setattr(
        flux,
        "predict",
        classmethod(lambda cls, d, n, t, c: seen.append(c.get("guidance")) or real_predict(cls, d, n, t, c)),
    )
    personalize(
        tiny_flux_pipeline(),
        make_subject_images(),
        "dog",
        steps=1,
        guidance_scale=3.5,
        output_dir=tmp_path / "a",
        **QUICK,
    )
    assert seen[-1] is not None and seen[-1].tolist() == [3.5, 3.5]  # instance and class sample
    personalize(
        tiny_flux_pipeline(guidance=False), make_subject_images(), "dog", steps=1, output_dir=tmp_path / "b", **QUICK
    )
    assert seen[-1] is None


@pytest.mark.parametrize("family", FLOW)
def test_frozen_t5_runs_once_per_prompt_while_clip_trains(family, tmp_path):
    pipe = tiny_pipeline_of(family)
    spec = get_family(family)
    (t5_name,) = [name for name in spec.text_encoders if name not in spec.components(True)]
    calls, seen_at_step = [], {}
    getattr(pipe, t5_name).register_forward_hook(lambda *args: calls.append(1))
    settings = {"steps": 3, "train_text_encoder": True, "learning_rate": 1e-2}
    personalize(
        pipe,
        make_subject_images(),
        "dog",
        callback=lambda step, logs: seen_at_step.setdefault(step, len(calls)),
        output_dir=tmp_path,
        **settings,
        **QUICK,
    )
    # T5 ran for the class images and once per prompt before training; no step ran it again.
    assert seen_at_step[1] >= 2 and seen_at_step[3] == seen_at_step[1], seen_at_step
    state = getattr(pipe, spec.components(True)[1]).state_dict()
    assert any(".lora_B" in k and state[k].abs().sum() > 0 for k in state)


def test_sd3_conditioning_equals_the_pipelines_own():
    pipe = tiny_pipeline_of("sd3")
    family = get_family("sd3")
    ours = family.encode_prompt(pipe, family.prompt_ids(pipe, "a red dog"))
    embeds, _, pooled, _ = pipe.encode_prompt(
        "a red dog", prompt_2=None, prompt_3=None, device="cpu", do_classifier_free_guidance=False
    )
    assert torch.equal(ours["encoder_hidden_states"], embeds)  # CLIP-L + CLIP-G padded, then T5's 256 tokens
    assert torch.equal(ours["pooled_projections"], pooled)
    pipe.text_encoder_3, pipe.tokenizer_3 = None, None  # SD3 without T5: zeros in its place, as the pipeline
    ours = family.encode_prompt(pipe, family.prompt_ids(pipe, "a red dog"))
    embeds, _, _, _ = pipe.encode_prompt(
        "a red dog", prompt_2=None, prompt_3=None, device="cpu", do_classifier_free_guidance=False
    )
    assert torch.equal(ours["encoder_hidden_states"], embeds)


def test_flux_conditioning_and_packing_equal_the_pipelines_own():
    from diffusers import FluxPipeline

    pipe = tiny_pipeline_of("flux")
    family = get_family("flux")
    ours = family.encode_prompt(pipe, family.prompt_ids(pipe, "a red dog"))
    embeds, pooled, text_ids = pipe.encode_prompt("a red dog", prompt_2=None, device="cpu")
    assert torch.equal(ours["encoder_hidden_states"], embeds)  # T5's 512 tokens
    assert torch.equal(ours["pooled_projections"], pooled)  # CLIP's pooled output
    # The denoiser call: the same output as the transformer on the pipeline's own packing and ids.
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    sigmas = torch.tensor([0.3, 0.7])
    conditioning = {
        "encoder_hidden_states": embeds.expand(2, -1, -1),
        "pooled_projections": pooled.expand(2, -1),
        "guidance": torch.full((2,), 3.5),
    }
    with torch.no_grad():
        ours = family.predict(pipe.transformer, latents, sigmas, conditioning)
        packed = FluxPipeline._pack_latents(latents, 2, 4, 8, 8)
        image_ids = FluxPipeline._prepare_latent_image_ids(2, 4, 4, "cpu", latents.dtype)
        theirs = pipe.transformer(
            hidden_states=packed,
            timestep=sigmas,
            guidance=conditioning["guidance"],
            pooled_projections=conditioning["pooled_projections"],
            encoder_hidden_states=conditioning["encoder_hidden_states"],
            txt_ids=text_ids,
            img_ids=image_ids,
        ).sample
    assert ours.shape == latents.shape
    assert torch.equal(FluxPipeline._pack_latents(ours, 2, 4, 8, 8), theirs)
