"""Tiny offline pipelines of the real Stable Diffusion architectures, for tests and first tries.

`tiny_pipeline()` builds a `StableDiffusionPipeline` with random weights that runs in well under a
second on a CPU: the same classes, code paths and file formats as a real SD 1.x/2.x checkpoint, only
small. Its tokenizer is a real byte-level BPE (CLIP's format, with merges) trained locally on the
shipped English word list; the trained files ship in `assets/tiny_tokenizer/` so every build is the same.
The tokenizers, and how their files were trained, are in `tiny_tokenizers`.

`tiny_sdxl_pipeline()` does the same for SDXL's `StableDiffusionXLPipeline`: two CLIP text encoders
(the second with a projection, for the pooled embedding), a `text_time` UNet and SDXL's Euler
scheduler. Its second tokenizer is a second BPE over a smaller vocabulary (`assets/tiny_tokenizer_2/`),
so the two tokenizers split some words differently, as a test of "one token in both" needs.

`tiny_sd3_pipeline()` and `tiny_flux_pipeline()` do the same for the MMDiT families, SD3's
`StableDiffusion3Pipeline` (two CLIP encoders and a T5 encoder feeding an `SD3Transformer2DModel`) and
Flux.1's `FluxPipeline` (CLIP for the pooled embedding, T5 for the sequence, a `FluxTransformer2DModel`),
both with flow-matching schedulers. Their T5 tokenizer is a real Unigram (sentencepiece-style) model in
T5's format, trained locally on the same word list; it ships in `assets/tiny_t5/`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from .tiny_tokenizers import tiny_t5_tokenizer, tiny_tokenizer, tiny_tokenizer_2

if TYPE_CHECKING:
    from diffusers import FluxPipeline, StableDiffusion3Pipeline, StableDiffusionPipeline, StableDiffusionXLPipeline
    from transformers import CLIPTokenizer, T5EncoderModel, T5TokenizerFast


def tiny_components(
    seed: int = 0,
    *,
    v_prediction: bool = False,
    sample_size: int = 16,
) -> dict[str, Any]:
    """The components of a tiny SD pipeline: SD 1.x-style by default, SD 2.x-style with `v_prediction`.

    The SD 2.x variant, like stable-diffusion-2, uses `use_linear_projection`, per-block attention
    head dims and a v-prediction scheduler.
    """
    import torch
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    tokenizer = tiny_tokenizer()
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=sample_size,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=(2, 4) if v_prediction else 8,
        use_linear_projection=v_prediction,
        norm_num_groups=8,
    )
    torch.manual_seed(seed + 1)
    vae = _tiny_vae(sample_size * 2)
    torch.manual_seed(seed + 2)
    text_encoder = CLIPTextModel(_tiny_clip_text_config(tokenizer))
    scheduler = sd_scheduler("v_prediction" if v_prediction else "epsilon")
    return {
        "unet": unet,
        "vae": vae,
        "text_encoder": text_encoder,
        "tokenizer": tokenizer,
        "scheduler": scheduler,
        "safety_checker": None,
        "feature_extractor": None,
        "image_encoder": None,
        "requires_safety_checker": False,
    }


def sd_scheduler(prediction_type: str = "epsilon") -> Any:
    """Stable Diffusion 1.x's scheduler, as its model folder configures it (`scheduler_config.json`).

    Example:
        >>> sd_scheduler().config.beta_schedule
        'scaled_linear'
    """
    from diffusers import PNDMScheduler

    return PNDMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        skip_prk_steps=True,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type=prediction_type,
    )


def _tiny_vae(sample_size: int) -> Any:
    """SD's VAE layout with two blocks (a factor-2 VAE: 32 px images, 16x16x4 latents)."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=(16, 32),
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=4,
        norm_num_groups=8,
        sample_size=sample_size,
    )


def tiny_pipeline(seed: int = 0, *, v_prediction: bool = False) -> StableDiffusionPipeline:
    """Build a tiny random-weight `StableDiffusionPipeline` offline (32x32 images, fp32, CPU).

    Args:
        seed (`int`): seeds the random weights; the same seed gives the same pipeline.
        v_prediction (`bool`): build the SD 2.x-style variant (v-prediction, linear projections).

    Example:
        >>> from db_adapters.testing import tiny_pipeline
        >>> pipe = tiny_pipeline()
        >>> pipe("a dog", num_inference_steps=2, output_type="np").images.shape
        (1, 32, 32, 3)
    """
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(**tiny_components(seed, v_prediction=v_prediction))
    for module in (pipe.unet, pipe.vae, pipe.text_encoder):
        module.eval()  # as from_pretrained leaves them
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _tiny_clip_text_config(tokenizer: CLIPTokenizer, **kwargs: Any) -> Any:
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **kwargs,
    )


def tiny_sdxl_components(seed: int = 0) -> dict[str, Any]:
    """The components of a tiny SDXL pipeline, shaped like diffusers' own SDXL pipeline tests.

    As in SDXL, the UNet's cross-attention width is the two encoders' hidden sizes side by side
    (32 + 32), and its `text_time` embedding takes the six size/crop time ids (8 dims each) plus the
    second encoder's pooled projection (32).

    Args:
        seed (`int`): seeds the random weights; the same seed gives the same components.

    Example:
        >>> from db_adapters.testing import tiny_sdxl_components
        >>> components = tiny_sdxl_components()
        >>> components["unet"].config.cross_attention_dim, components["text_encoder_2"].config.projection_dim
        (64, 32)
    """
    import torch
    from diffusers import EulerDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    tokenizer = tiny_tokenizer()
    tokenizer_2 = tiny_tokenizer_2()
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        # SDXL's layout: no attention at the highest resolution, deeper transformers lower down.
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        transformer_layers_per_block=(1, 2),
        use_linear_projection=True,
        cross_attention_dim=64,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=6 * 8 + 32,
        norm_num_groups=8,
    )
    torch.manual_seed(seed + 1)
    vae = _tiny_vae(32)
    torch.manual_seed(seed + 2)
    text_encoder = CLIPTextModel(_tiny_clip_text_config(tokenizer))
    torch.manual_seed(seed + 3)
    text_encoder_2 = CLIPTextModelWithProjection(_tiny_clip_text_config(tokenizer_2, projection_dim=32))
    # stable-diffusion-xl-base-1.0's scheduler config.
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        steps_offset=1,
        timestep_spacing="leading",
        prediction_type="epsilon",
    )
    return {
        "unet": unet,
        "vae": vae,
        "text_encoder": text_encoder,
        "text_encoder_2": text_encoder_2,
        "tokenizer": tokenizer,
        "tokenizer_2": tokenizer_2,
        "scheduler": scheduler,
        "image_encoder": None,
        "feature_extractor": None,
        "force_zeros_for_empty_prompt": True,
    }


def tiny_sdxl_pipeline(seed: int = 0) -> StableDiffusionXLPipeline:
    """Build a tiny random-weight `StableDiffusionXLPipeline` offline (32x32 images, fp32, CPU).

    Args:
        seed (`int`): seeds the random weights; the same seed gives the same pipeline.

    Example:
        >>> from db_adapters.testing import tiny_sdxl_pipeline
        >>> pipe = tiny_sdxl_pipeline()
        >>> pipe("a dog", num_inference_steps=2, output_type="np").images.shape
        (1, 32, 32, 3)
    """
    from diffusers import StableDiffusionXLPipeline

    # No watermark, even where invisible-watermark is installed: it would change the pixels.
    pipe = StableDiffusionXLPipeline(**tiny_sdxl_components(seed), add_watermarker=False)
    for module in (pipe.unet, pipe.vae, pipe.text_encoder, pipe.text_encoder_2):
        module.eval()  # as from_pretrained leaves them
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _tiny_t5_encoder(tokenizer: T5TokenizerFast, d_model: int) -> T5EncoderModel:
    from transformers import T5Config, T5EncoderModel

    # T5 v1.1's shape (gated GELU, untied embeddings), the encoder SD3 and Flux ship, in small. T5's
    # relative position buckets have no length limit, so any `max_sequence_length` runs.
    config = T5Config(
        vocab_size=len(tokenizer),
        d_model=d_model,
        d_kv=8,
        d_ff=64,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        feed_forward_proj="gated-gelu",
        tie_word_embeddings=False,
        is_encoder_decoder=False,
        use_cache=False,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return T5EncoderModel(config)


def _tiny_flow_vae(seed: int, *, scaling_factor: float, shift_factor: float) -> Any:
    import torch
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    # SD3's and Flux's VAEs have no quant convs and shift as well as scale their latents. Two blocks make
    # `vae_scale_factor` 2; 4 latent channels (the real ones have 16) keep it tiny.
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=(16, 32),
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=4,
        norm_num_groups=8,
        sample_size=32,
        scaling_factor=scaling_factor,
        shift_factor=shift_factor,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )


def tiny_sd3_components(seed: int = 0) -> dict[str, Any]:
    """The components of a tiny SD3 pipeline, shaped like diffusers' own SD3 pipeline tests.

    As in SD3, the transformer's context is the two CLIP encoders' penultimate hidden states side by
    side (32 + 32), zero-padded to the T5 width, followed by T5's sequence: so `joint_attention_dim` is
    the T5 width, here 96 (real SD3: 2048 padded to 4096). The pooled embedding is the two CLIP
    projections side by side (`pooled_projection_dim` 64).

    Args:
        seed (`int`): seeds the random weights; the same seed gives the same components.

    Example:
        >>> from db_adapters.testing import tiny_sd3_components
        >>> components = tiny_sd3_components()
        >>> config = components["transformer"].config
        >>> config.joint_attention_dim == components["text_encoder_3"].config.d_model, config.pooled_projection_dim
        (True, 64)
    """
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
    from transformers import CLIPTextModelWithProjection

    tokenizer = tiny_tokenizer()
    tokenizer_2 = tiny_tokenizer_2()
    tokenizer_3 = tiny_t5_tokenizer()
    t5_width = 96  # wider than the CLIP pair (64), so their embeddings are padded as in SD3
    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(
        sample_size=16,  # the pipeline's default height is sample_size * vae_scale_factor = 32 px
        patch_size=1,
        in_channels=4,
        # Two, not one: SD3's last block updates only the image stream (no `attn.to_add_out`, no
        # `ff_context`), so a single block would lack layers LoRA targets in every other block.
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=4,
        joint_attention_dim=t5_width,
        caption_projection_dim=32,
        pooled_projection_dim=64,
        out_channels=4,
        pos_embed_max_size=32,
    )
    # stable-diffusion-3-medium's VAE latent scaling.
    vae = _tiny_flow_vae(seed + 1, scaling_factor=1.5305, shift_factor=0.0609)
    torch.manual_seed(seed + 2)
    text_encoder = CLIPTextModelWithProjection(_tiny_clip_text_config(tokenizer, projection_dim=32))
    torch.manual_seed(seed + 3)
    text_encoder_2 = CLIPTextModelWithProjection(_tiny_clip_text_config(tokenizer_2, projection_dim=32))
    torch.manual_seed(seed + 4)
    text_encoder_3 = _tiny_t5_encoder(tokenizer_3, d_model=t5_width)
    return {
        "transformer": transformer,
        "vae": vae,
        "text_encoder": text_encoder,
        "text_encoder_2": text_encoder_2,
        "text_encoder_3": text_encoder_3,
        "tokenizer": tokenizer,
        "tokenizer_2": tokenizer_2,
        "tokenizer_3": tokenizer_3,
        # stable-diffusion-3-medium's scheduler config.
        "scheduler": FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0),
        "image_encoder": None,
        "feature_extractor": None,
    }


def tiny_sd3_pipeline(seed: int = 0) -> StableDiffusion3Pipeline:
    """Build a tiny random-weight `StableDiffusion3Pipeline` offline (32x32 images, fp32, CPU).

    The default `max_sequence_length` (256 T5 tokens) runs as is.

    Args:
        seed (`int`): seeds the random weights; the same seed gives the same pipeline.

    Example:
        >>> from db_adapters.testing import tiny_sd3_pipeline
        >>> pipe = tiny_sd3_pipeline()
        >>> pipe("a dog", num_inference_steps=2, output_type="np").images.shape
        (1, 32, 32, 3)
    """
    from diffusers import StableDiffusion3Pipeline

    pipe = StableDiffusion3Pipeline(**tiny_sd3_components(seed))
    for module in (pipe.transformer, pipe.vae, pipe.text_encoder, pipe.text_encoder_2, pipe.text_encoder_3):
        module.eval()  # as from_pretrained leaves them
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_flux_components(seed: int = 0, *, guidance: bool = True) -> dict[str, Any]:
    """The components of a tiny Flux.1 pipeline, shaped like diffusers' own Flux pipeline tests.

    FLUX.1-dev-style by default: a guidance-distilled transformer (`guidance_embeds`, the pipeline's
    `guidance_scale` goes in as an embedding) and resolution-dependent timestep shifting. With
    `guidance=False`, FLUX.1-schnell-style: no guidance embedding and a fixed, unshifted schedule.
    The pipeline packs 2x2 latent patches into tokens, so the transformer takes 4 * 4 = 16 channels;
    CLIP gives only the pooled embedding (32) and T5 the whole sequence (`joint_attention_dim` 32).

    Args:
        seed (`int`): seeds the random weights; the same seed gives the same components.
        guidance (`bool`): build the guidance-distilled (dev) variant rather than the schnell one.

    Example:
        >>> from db_adapters.testing import tiny_flux_components
        >>> components = tiny_flux_components(guidance=False)
        >>> config = components["transformer"].config
        >>> config.in_channels, config.guidance_embeds, components["scheduler"].config.use_dynamic_shifting
        (16, False, False)
    """
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
    from transformers import CLIPTextModel

    tokenizer = tiny_tokenizer()
    tokenizer_2 = tiny_t5_tokenizer()
    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=4 * 4,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        pooled_projection_dim=32,
        guidance_embeds=guidance,
        axes_dims_rope=(4, 4, 8),  # sums to attention_head_dim
    )
    # FLUX.1's VAE latent scaling.
    vae = _tiny_flow_vae(seed + 1, scaling_factor=0.3611, shift_factor=0.1159)
    torch.manual_seed(seed + 2)
    text_encoder = CLIPTextModel(_tiny_clip_text_config(tokenizer))
    torch.manual_seed(seed + 3)
    text_encoder_2 = _tiny_t5_encoder(tokenizer_2, d_model=32)
    # FLUX.1-dev's and FLUX.1-schnell's scheduler configs.
    if guidance:
        scheduler = FlowMatchEulerDiscreteScheduler(
            num_train_timesteps=1000,
            shift=3.0,
            use_dynamic_shifting=True,
            base_shift=0.5,
            max_shift=1.15,
            base_image_seq_len=256,
            max_image_seq_len=4096,
        )
    else:
        scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=False)
    return {
        "transformer": transformer,
        "vae": vae,
        "text_encoder": text_encoder,
        "text_encoder_2": text_encoder_2,
        "tokenizer": tokenizer,
        "tokenizer_2": tokenizer_2,
        "scheduler": scheduler,
        "image_encoder": None,
        "feature_extractor": None,
    }


def tiny_flux_pipeline(seed: int = 0, *, guidance: bool = True) -> FluxPipeline:
    """Build a tiny random-weight `FluxPipeline` offline (32x32 images, fp32, CPU).

    `FluxPipeline` fixes its default size in code (`default_sample_size = 128`, 256 px here), so this sets
    it to 16 on the instance: a copy saved and loaded again renders 256 px unless given `height` and `width`
    (multiples of 4, twice `vae_scale_factor`). The default `max_sequence_length` (512 T5 tokens) runs as is.

    Args:
        seed (`int`): seeds the random weights; the same seed gives the same pipeline.
        guidance (`bool`): FLUX.1-dev-style (guidance-distilled) if true, FLUX.1-schnell-style if false.

    Example:
        >>> from db_adapters.testing import tiny_flux_pipeline
        >>> pipe = tiny_flux_pipeline()
        >>> pipe("a dog", num_inference_steps=2, output_type="np").images.shape
        (1, 32, 32, 3)
    """
    from diffusers import FluxPipeline

    pipe = FluxPipeline(**tiny_flux_components(seed, guidance=guidance))
    pipe.default_sample_size = 16
    for module in (pipe.transformer, pipe.vae, pipe.text_encoder, pipe.text_encoder_2):
        module.eval()  # as from_pretrained leaves them
    pipe.set_progress_bar_config(disable=True)
    return pipe


# Each model family's tiny pipeline, by family name: the family contract suite (tests/test_families.py)
# runs every registered family on its entry here, so a new family adds its builder to this table.
TINY_PIPELINES: dict[str, Callable[..., Any]] = {
    "sd": tiny_pipeline,
    "sdxl": tiny_sdxl_pipeline,
    "sd3": tiny_sd3_pipeline,
    "flux": tiny_flux_pipeline,
}


def tiny_pipeline_of(family: str, seed: int = 0) -> Any:
    """The tiny random-weight pipeline of a model family ("sd", "sdxl"), built offline.

    Args:
        family (`str`): a registered family's name.
        seed (`int`): seeds the random weights.

    Example:
        >>> type(tiny_pipeline_of("sdxl")).__name__
        'StableDiffusionXLPipeline'
    """
    return TINY_PIPELINES[family](seed)


def quantize_linear_layers(module: Any, quant_type: str = "nf4") -> Any:
    """Replace every `nn.Linear` of `module` by a bitsandbytes 4-bit layer holding its weights, in place.

    Stands in, on a CPU, for a denoiser loaded with diffusers' `BitsAndBytesConfig(load_in_4bit=True)`
    (which refuses to run without a GPU): the same bitsandbytes layers and packed weights, so a test can
    train LoRA on a quantized base. Real users load their model quantized, or pass `quantize_base`.

    Args:
        module (`torch.nn.Module`): e.g. a tiny pipeline's denoiser.
        quant_type (`str`): "nf4" or "fp4".

    Example:
        >>> from db_adapters.testing import quantize_linear_layers, tiny_pipeline
        >>> unet = quantize_linear_layers(tiny_pipeline().unet)
        >>> type(unet.time_embedding.linear_1).__name__
        'Linear4bit'
    """
    import bitsandbytes as bnb
    import torch

    for name, child in list(module.named_children()):
        if isinstance(child, torch.nn.Linear):
            layer = bnb.nn.Linear4bit(
                child.in_features,
                child.out_features,
                bias=child.bias is not None,
                quant_type=quant_type,
                compute_dtype=child.weight.dtype,
            )
            layer.weight = bnb.nn.Params4bit(child.weight.data, requires_grad=False, quant_type=quant_type)
            if child.bias is not None:
                layer.bias = torch.nn.Parameter(child.bias.data, requires_grad=False)
            setattr(module, name, layer.to(child.weight.device))  # moving a Params4bit quantizes it
        else:
            quantize_linear_layers(child, quant_type)
    return module
