"""The feature models behind the metrics: DINO ViT-S/16 (DINO, PRES) and CLIP ViT-B/32 (CLIP-I, CLIP-T).

Both load offline only (`local_files_only=True`): from a local folder, or from the hub cache when
the model was downloaded before. A missing model is an `InputError` that names it and says how to
get it. Preprocessing is done here in plain PIL + torch (no torchvision, which does not import beside
our torch, and no transformers image processor), following the reference pipelines:

- DINO (torch.hub DINO evaluation): resize the shorter side to 256 (bicubic), centre-crop 224,
  ImageNet mean/std. The crop is the model config's `image_size` (224 for real models), and the
  resize keeps the 256/224 ratio.
- CLIP (CLIP's own preprocessing): resize the shorter side to 224 (bicubic), centre-crop 224,
  CLIP's mean/std; again sized by the vision config's `image_size`.

The DINO embedding is the CLS token after the final layer norm, `last_hidden_state[:, 0]`, never a
pooler: the DINO checkpoints have no trained pooler.

Example:
    >>> from PIL import Image
    >>> embedders = tiny_embedders()
    >>> embedders.dino.embed([Image.new("RGB", (40, 30), "red")]).shape
    torch.Size([1, 32])
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image

from ..errors import InputError
from .lpips import LPIPS, load_lpips, random_lpips

if TYPE_CHECKING:
    from transformers import CLIPModel, ViTModel

DINO_MODEL = "facebook/dino-vits16"
CLIP_MODEL = "openai/clip-vit-base-patch32"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# torch.hub DINO evaluation: Resize(256) then CenterCrop(224).
DINO_RESIZE_RATIO = 256 / 224
BATCH_SIZE = 32
TINY_IDS = {"dino": "tiny-random-vit", "clip": "tiny-random-clip", "lpips": "tiny-random-lpips"}


def preprocess(
    images: Sequence[Image.Image], *, resize: int, crop: int, mean: Sequence[float], std: Sequence[float]
) -> torch.Tensor:
    """Resize the shorter side to `resize` (bicubic), centre-crop `crop`, scale to [0, 1] and normalise.

    Sizes and rounding follow torchvision's `Resize(int)` + `CenterCrop` on PIL images, which call
    PIL's bicubic resize, so the result matches the reference pipelines without importing torchvision.

    Args:
        images (`Sequence[PIL.Image.Image]`): images of any size and mode.
        resize (`int`): target length of the shorter side.
        crop (`int`): side of the square centre crop.
        mean (`Sequence[float]`): per-channel mean to subtract (after scaling to [0, 1]).
        std (`Sequence[float]`): per-channel standard deviation to divide by.

    Returns:
        A `[N, 3, crop, crop]` float32 tensor.

    Example:
        >>> from PIL import Image
        >>> image = Image.new("RGB", (300, 200), "white")
        >>> preprocess([image], resize=37, crop=32, mean=(0, 0, 0), std=(1, 1, 1)).shape
        torch.Size([1, 3, 32, 32])
    """
    arrays = [np.asarray(_centre_crop(_resize_shorter_side(image.convert("RGB"), resize), crop)) for image in images]
    batch = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 255.0
    return (batch - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


def _resize_shorter_side(image: Image.Image, size: int) -> Image.Image:
    width, height = image.size
    short, long = min(width, height), max(width, height)
    # torchvision truncates the longer side (int(), not round()).
    new_long = int(size * long / short)
    new_size = (size, new_long) if width <= height else (new_long, size)
    return image if new_size == image.size else image.resize(new_size, Image.Resampling.BICUBIC)


def _centre_crop(image: Image.Image, size: int) -> Image.Image:
    width, height = image.size
    if width < size or height < size:
        raise InputError(f"cannot centre-crop {size} px from an image of {width}x{height}.")
    left, top = int(round((width - size) / 2.0)), int(round((height - size) / 2.0))
    return image.crop((left, top, left + size, top + size))


def _device_of(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def _batches(items: Sequence[Any], size: int = BATCH_SIZE) -> list[Sequence[Any]]:
    return [items[start : start + size] for start in range(0, len(items), size)]


@dataclass
class DinoEmbedder:
    """DINO image embeddings: the CLS token of `ViTModel`'s `last_hidden_state`, after its final layer norm.

    Attributes:
        model (`transformers.ViTModel`): a DINO ViT (e.g. facebook/dino-vits16).
        model_id (`str`): the hub id or folder it came from, recorded in reports.
    """

    model: ViTModel
    model_id: str

    @property
    def crop_size(self) -> int:
        return int(self.model.config.image_size)

    @property
    def resize_size(self) -> int:
        return int(round(self.crop_size * DINO_RESIZE_RATIO))

    def preprocessing(self) -> str:
        return f"resize shorter side {self.resize_size} bicubic, centre crop {self.crop_size}, ImageNet mean/std"

    def pixel_values(self, images: Sequence[Image.Image]) -> torch.Tensor:
        return preprocess(images, resize=self.resize_size, crop=self.crop_size, mean=IMAGENET_MEAN, std=IMAGENET_STD)

    @torch.no_grad()
    def embed(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """`[N, D]` float32 CPU embeddings of `images`.

        Example:
            >>> from PIL import Image
            >>> tiny_embedders().dino.embed([Image.new("RGB", (32, 32))] * 2).shape
            torch.Size([2, 32])
        """
        device = _device_of(self.model)
        outputs = []
        for batch in _batches(images):
            hidden = self.model(pixel_values=self.pixel_values(batch).to(device)).last_hidden_state
            # ViTModel.forward applies its final `layernorm` to the encoder output and returns that as
            # last_hidden_state (transformers/models/vit/modeling_vit.py, ViTModel.forward:
            # `sequence_output = self.layernorm(hidden_states)`), exactly DINO's `self.norm(x)[:, 0]`.
            outputs.append(hidden[:, 0].float().cpu())
        return torch.cat(outputs)


@dataclass
class ClipEmbedder:
    """CLIP image and text embeddings (the projected ones that CLIP compares with cosine similarity).

    Attributes:
        model (`transformers.CLIPModel`): e.g. openai/clip-vit-base-patch32.
        tokenizer: the model's CLIP tokenizer.
        model_id (`str`): the hub id or folder it came from, recorded in reports.
    """

    model: CLIPModel
    tokenizer: Any
    model_id: str

    @property
    def crop_size(self) -> int:
        return int(self.model.config.vision_config.image_size)

    def preprocessing(self) -> str:
        return f"resize shorter side {self.crop_size} bicubic, centre crop {self.crop_size}, CLIP mean/std"

    def pixel_values(self, images: Sequence[Image.Image]) -> torch.Tensor:
        return preprocess(images, resize=self.crop_size, crop=self.crop_size, mean=CLIP_MEAN, std=CLIP_STD)

    @torch.no_grad()
    def embed_images(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """`[N, D]` float32 CPU CLIP image embeddings.

        Example:
            >>> from PIL import Image
            >>> tiny_embedders().clip.embed_images([Image.new("RGB", (32, 32))]).shape
            torch.Size([1, 16])
        """
        device = _device_of(self.model)
        features = [
            _projected(self.model.get_image_features(pixel_values=self.pixel_values(batch).to(device)))
            for batch in _batches(images)
        ]
        return torch.cat(features)

    @torch.no_grad()
    def embed_texts(self, texts: Sequence[str]) -> torch.Tensor:
        """`[N, D]` float32 CPU CLIP text embeddings.

        Example:
            >>> tiny_embedders().clip.embed_texts(["a dog in the snow"]).shape
            torch.Size([1, 16])
        """
        device = _device_of(self.model)
        features = []
        for batch in _batches(list(texts)):
            tokens = self.tokenizer(
                list(batch),
                padding=True,
                truncation=True,
                max_length=self.tokenizer.model_max_length,
                return_tensors="pt",
            )
            output = self.model.get_text_features(
                input_ids=tokens.input_ids.to(device), attention_mask=tokens.attention_mask.to(device)
            )
            features.append(_projected(output))
        return torch.cat(features)


def _projected(output: Any) -> torch.Tensor:
    # transformers 4 returns the projected embeddings as a tensor; transformers 5 returns a model
    # output whose pooler_output holds them (already through the projection).
    tensor = output if isinstance(output, torch.Tensor) else output.pooler_output
    return tensor.float().cpu()


@dataclass
class Embedders:
    """The three feature models of the protocol, and the ids recorded with every report.

    Attributes:
        dino (`DinoEmbedder`): for DINO and PRES.
        clip (`ClipEmbedder`): for CLIP-I and CLIP-T.
        lpips (`LPIPS | None`): for DIV; None skips DIV (reported as null).
        lpips_id (`str | None`): the LPIPS weights file or id.
    """

    dino: DinoEmbedder
    clip: ClipEmbedder
    lpips: LPIPS | None = None
    lpips_id: str | None = None

    def model_ids(self) -> dict[str, str | None]:
        """The model of each metric, e.g. `{"dino": "facebook/dino-vits16", ...}`."""
        return {"dino": self.dino.model_id, "clip": self.clip.model_id, "lpips": self.lpips_id}

    def preprocessing(self) -> dict[str, str]:
        """How each model's inputs were prepared, in words, for the report."""
        return {
            "dino": self.dino.preprocessing(),
            "clip": self.clip.preprocessing(),
            "lpips": "generated images at full resolution, scaled to [-1, 1]",
        }


def load_embedders(
    dino_model: str = DINO_MODEL,
    clip_model: str = CLIP_MODEL,
    lpips_weights: str | os.PathLike | None = None,
    *,
    device: str | torch.device | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> Embedders:
    """The real feature models, offline: from local folders or the hub cache, never the network.

    Args:
        dino_model (`str`): DINO ViT hub id or local folder (default facebook/dino-vits16).
        clip_model (`str`): CLIP hub id or local folder (default openai/clip-vit-base-patch32).
        lpips_weights (`str | PathLike | None`): LPIPS safetensors file (see `lpips.load_lpips`);
            None leaves DIV out.
        device (`str | torch.device | None`): where the models run (default cpu).
        cache_dir (`str | PathLike | None`): the hub cache to read (default: huggingface_hub's).

    Raises:
        InputError: a model is neither a usable local folder nor in the hub cache; the message names it.

    Example:
        >>> embedders = load_embedders(lpips_weights="lpips_alex_v0.1.safetensors")  # doctest: +SKIP
        >>> embedders.model_ids()["clip"]  # doctest: +SKIP
        'openai/clip-vit-base-patch32'
    """
    device = torch.device(device or "cpu")
    dino = DinoEmbedder(load_dino_model(dino_model, cache_dir=cache_dir).to(device), dino_model)
    clip, tokenizer = load_clip_model(clip_model, cache_dir=cache_dir)
    lpips = load_lpips(lpips_weights, device) if lpips_weights is not None else None
    return Embedders(dino, ClipEmbedder(clip.to(device), tokenizer, clip_model), lpips, _id(lpips_weights))


def _id(path: str | os.PathLike | None) -> str | None:
    return None if path is None else str(path)


def load_dino_model(model_id: str, *, cache_dir: str | os.PathLike | None = None) -> ViTModel:
    """A DINO `ViTModel` from a local folder or the hub cache, with no pooler (DINO has none trained).

    Example:
        >>> model = load_dino_model("facebook/dino-vits16")  # doctest: +SKIP
    """
    from transformers import ViTModel

    return _offline(
        "DINO",
        "--dino-model",
        model_id,
        lambda: ViTModel.from_pretrained(model_id, add_pooling_layer=False, use_safetensors=True, **_hub(cache_dir)),
    ).eval()


def load_clip_model(model_id: str, *, cache_dir: str | os.PathLike | None = None) -> tuple[CLIPModel, Any]:
    """A `CLIPModel` and its tokenizer from a local folder or the hub cache.

    Example:
        >>> model, tokenizer = load_clip_model("openai/clip-vit-base-patch32")  # doctest: +SKIP
    """
    from transformers import CLIPModel, CLIPTokenizer

    model = _offline(
        "CLIP",
        "--clip-model",
        model_id,
        lambda: CLIPModel.from_pretrained(model_id, use_safetensors=True, **_hub(cache_dir)),
    )
    tokenizer = _offline(
        "CLIP", "--clip-model", model_id, lambda: CLIPTokenizer.from_pretrained(model_id, **_hub(cache_dir))
    )
    return model.eval(), tokenizer


def _hub(cache_dir: str | os.PathLike | None) -> dict[str, Any]:
    # Weights come from the local folder or the cache only: evaluation must work offline and never
    # start a multi-hundred-MB download in the middle of a run. Model weights load as safetensors only
    # (facebook/dino-vits16 has them on its refs/pr/1 revision, or convert a trusted .bin yourself).
    return {"local_files_only": True, "cache_dir": None if cache_dir is None else str(cache_dir)}


def _offline(role: str, option: str, model_id: str, load: Any) -> Any:
    try:
        return load()
    except (OSError, ValueError) as error:
        raise InputError(_unavailable_message(role, option, model_id, error)) from None


def _unavailable_message(role: str, option: str, model_id: str, error: Exception) -> str:
    first_sentence = " ".join(str(error).split()).split(". ")[0][:200]
    if Path(model_id).expanduser().exists():
        return f"the {role} model folder {model_id!r} could not be loaded ({first_sentence})."
    if model_id.startswith(("/", ".", "~")) or model_id.count("/") > 1:
        return f"the {role} model folder {model_id!r} does not exist; pass an existing folder with {option}."
    return (
        f"the {role} model {model_id!r} is not in the local hub cache ({first_sentence}). On a machine with network "
        f"run `huggingface-cli download {model_id}` and copy its hub cache (~/.cache/huggingface/hub) here, "
        f"or pass a local folder of the model with {option}."
    )


def tiny_embedders(seed: int = 0, image_size: int = 32) -> Embedders:
    """Tiny random DINO-like ViT, CLIP and LPIPS models, built offline, to exercise the plumbing in tests.

    Args:
        seed (`int`): seeds the random weights.
        image_size (`int`): the models' input size (their configs' `image_size`; patch 16).

    Example:
        >>> tiny_embedders().model_ids()
        {'dino': 'tiny-random-vit', 'clip': 'tiny-random-clip', 'lpips': 'tiny-random-lpips'}
    """
    from transformers import CLIPConfig, CLIPModel, ViTConfig, ViTModel

    from ..tiny_tokenizers import tiny_tokenizer

    tokenizer = tiny_tokenizer()
    layers = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4}
    vision = {**layers, "image_size": image_size, "patch_size": 16}
    text = {
        **layers,
        "vocab_size": len(tokenizer),
        "max_position_embeddings": 77,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vit = ViTModel(ViTConfig(**vision), add_pooling_layer=False).eval()
        clip = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).eval()
    dino = DinoEmbedder(vit, TINY_IDS["dino"])
    return Embedders(dino, ClipEmbedder(clip, tokenizer, TINY_IDS["clip"]), random_lpips(seed), TINY_IDS["lpips"])
