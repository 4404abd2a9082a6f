"""Tiny offline pipelines of the real Stable Diffusion architectures, for tests and first tries.

`tiny_pipeline()` builds a `StableDiffusionPipeline` with random weights that runs in well under a
second on a CPU: the same classes, code paths and file formats as a real SD 1.x/2.x checkpoint, only
small. Its tokenizer is a real byte-level BPE (CLIP's format, with merges) trained locally on the
shipped English word list; the trained files ship in `assets/tiny_tokenizer/` so every build is the same.

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

import json
from collections.abc import Callable
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .binder import english_words

if TYPE_CHECKING:
    from diffusers import FluxPipeline, StableDiffusion3Pipeline, StableDiffusionPipeline, StableDiffusionXLPipeline
    from transformers import CLIPTokenizer, T5EncoderModel, T5TokenizerFast

TINY_VOCAB_SIZE = 4096
# Smaller than the first, so tokenizer_2 keeps fewer merges: words that are one token in the first
# tokenizer can be two in the second.
TINY_VOCAB_SIZE_2 = 3072
# Caption words (DreamBench's prompts and class nouns) weighted up in the BPE corpus, so that they
# become single tokens as they are in CLIP's real vocabulary.
_CAPTION_WORDS = (
    "a an the of in on with and photo picture dog cat backpack stuffed animal bowl can candle clock "
    "sneaker toy boot glasses cartoon teapot vase jungle snow beach cobblestone street top pink fabric "
    "wooden floor city background mountain blue house purple rug forest wheat field tree autumn leaves "
    "eiffel tower floating water ocean milk green grass sunflowers around it mirror sidewalk crowded "
    "dirt road white wearing red hat santa rainbow scarf black monocle chef outfit firefighter police "
    "yellow shirt wizard shiny wet cube shaped box ball tent cup car bird"
).split()
_CAPTION_WEIGHT = 200
_SPECIAL_TOKENS = ("<|startoftext|>", "<|endoftext|>")


def bytes_to_unicode() -> dict[int, str]:
    """CLIP's (and GPT-2's) reversible byte -> printable character table, as its BPE files use."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in chars), strict=True))


def train_tiny_bpe(
    vocab_size: int = TINY_VOCAB_SIZE, caption_words: tuple[str, ...] = _CAPTION_WORDS
) -> tuple[dict[str, int], list[str]]:
    """Train a CLIP-format byte-level BPE on the English word list; return (vocab, merges).

    The vocabulary is laid out as CLIP's is: 256 byte symbols, the same with the end-of-word
    marker `</w>`, one entry per merge in merge order, then the two special tokens. So low ids are
    frequent pieces and the last merges are the rarest, as in the real CLIP vocabulary.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    byte_chars = list(bytes_to_unicode().values())
    num_merges = vocab_size - 2 * len(byte_chars) - len(_SPECIAL_TOKENS)
    tokenizer = Tokenizer(models.BPE(end_of_word_suffix="</w>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        # The trainer's vocabulary also holds every symbol it starts from; leave room for the merges.
        vocab_size=2 * len(byte_chars) + num_merges,
        initial_alphabet=byte_chars,
        end_of_word_suffix="</w>",
        show_progress=False,
    )
    corpus = english_words() + list(caption_words) * _CAPTION_WEIGHT
    tokenizer.train_from_iterator(corpus, trainer=trainer)
    trained = json.loads(tokenizer.to_str())["model"]["merges"]
    merges = [" ".join(pair) if isinstance(pair, list) else pair for pair in trained][:num_merges]
    vocab: dict[str, int] = {}
    for symbol in byte_chars + [c + "</w>" for c in byte_chars]:
        vocab[symbol] = len(vocab)
    for merge in merges:
        vocab.setdefault(merge.replace(" ", ""), len(vocab))
    for special in _SPECIAL_TOKENS:
        vocab[special] = len(vocab)
    return vocab, merges


def _tiny_tokenizer_dir(name: str = "tiny_tokenizer") -> Path:
    return Path(str(resources.files("db_adapters") / "assets" / name))


def write_tiny_tokenizer_files(
    folder: str | Path, caption_words: tuple[str, ...] = _CAPTION_WORDS, vocab_size: int = TINY_VOCAB_SIZE
) -> None:
    """Train the tiny BPE and write `vocab.json` and `merges.txt` into `folder` (CLIP's file layout).

    `assets/tiny_tokenizer_2/` was written with `vocab_size=TINY_VOCAB_SIZE_2`.
    """
    vocab, merges = train_tiny_bpe(vocab_size=vocab_size, caption_words=caption_words)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")


def tiny_tokenizer() -> CLIPTokenizer:
    """A real CLIP tokenizer over the shipped tiny vocabulary (~4k tokens), built offline.

    Example:
        >>> from db_adapters.testing import tiny_tokenizer
        >>> tok = tiny_tokenizer()
        >>> tok("a dog").input_ids[0] == tok.bos_token_id
        True
    """
    from transformers import CLIPTokenizer

    # The same loading path as a hub checkpoint's tokenizer/ folder.
    return CLIPTokenizer.from_pretrained(str(_tiny_tokenizer_dir()), model_max_length=77)


def tiny_tokenizer_2() -> CLIPTokenizer:
    """SDXL's second tokenizer in small: a CLIP tokenizer over the shipped ~3k vocabulary, pad token "!".

    Real SDXL pads its second prompt with "!" (id 0) rather than `<|endoftext|>`; so does this one.

    Example:
        >>> from db_adapters.testing import tiny_tokenizer, tiny_tokenizer_2
        >>> tok_2 = tiny_tokenizer_2()
        >>> len(tok_2), tok_2.pad_token, tok_2.pad_token_id
        (3072, '!', 0)
        >>> len(tok_2) < len(tiny_tokenizer())
        True
    """
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(
        str(_tiny_tokenizer_dir("tiny_tokenizer_2")), model_max_length=77, pad_token="!"
    )


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
    from diffusers import AutoencoderKL, PNDMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

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
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=(16, 32),
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=4,
        norm_num_groups=8,
        sample_size=sample_size * 2,
    )
    torch.manual_seed(seed + 2)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=77,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    scheduler = PNDMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        skip_prk_steps=True,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type="v_prediction" if v_prediction else "epsilon",
    )
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
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel
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
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=(16, 32),
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=4,
        norm_num_groups=8,
        sample_size=32,
    )
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


# Each model family's tiny pipeline, by family name: the family contract suite (tests/test_families.py)
# runs every registered family on its entry here, so a new family adds its builder to this table.
TINY_PIPELINES: dict[str, Callable[..., Any]] = {"sd": tiny_pipeline, "sdxl": tiny_sdxl_pipeline}


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
