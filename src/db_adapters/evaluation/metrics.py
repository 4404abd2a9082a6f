"""The DreamBooth paper's metrics as pure functions on embeddings and distances (no models here).

Definitions (Ruiz et al. 2023, section 4.1; REFERENCE.md):

- DINO: mean cosine similarity over ALL (generated, real) pairs of DINO CLS embeddings.
- CLIP-I: the same with CLIP image embeddings.
- CLIP-T: mean cosine over MATCHED pairs only: each image against the prompt that made it.
  Averaging over every (image, prompt) pair, a common mistake, blurs prompt fidelity away.
- PRES: DINO between class-prompt generations ("a dog") and the subject's real images.
  Lower is better: a high value means "a dog" has drifted onto the subject.
- DIV: mean LPIPS distance over unordered pairs i < j of generations of one prompt.

Example:
    >>> import torch
    >>> generated = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    >>> dino_score(generated, generated)  # two pairs of 1.0 and two orthogonal pairs of 0.0
    0.5
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import torch
import torch.nn.functional as F

from ..errors import InputError

T = TypeVar("T")


def mean_pairwise_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean cosine similarity over all pairs (a_i, b_j): generated vs real.

    Args:
        a (`torch.Tensor`): `[N, D]` embeddings, e.g. of generated images.
        b (`torch.Tensor`): `[M, D]` embeddings, e.g. of the subject's real images.

    Returns:
        The mean of the `N x M` cosine similarities, as a float.

    Example:
        >>> import torch
        >>> mean_pairwise_cosine(torch.tensor([[1.0, 0.0]]), torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
        0.5
    """
    _check_embeddings(a, "a")
    _check_embeddings(b, "b")
    _check_same_width(a, b)
    similarities = F.normalize(a.double(), dim=1) @ F.normalize(b.double(), dim=1).T
    return float(similarities.mean())


def matched_cosine(images_emb: torch.Tensor, texts_emb: torch.Tensor) -> float:
    """Mean cosine similarity of row i of `images_emb` with row i of `texts_emb` (matched pairs only).

    Args:
        images_emb (`torch.Tensor`): `[N, D]` image embeddings.
        texts_emb (`torch.Tensor`): `[N, D]` embeddings of each image's own prompt (repeat a prompt's
            embedding once per image generated from it).

    Example:
        >>> import torch
        >>> matched_cosine(torch.eye(2), torch.eye(2))
        1.0
    """
    _check_embeddings(images_emb, "images_emb")
    _check_embeddings(texts_emb, "texts_emb")
    _check_same_width(images_emb, texts_emb)
    if len(images_emb) != len(texts_emb):
        raise InputError(
            f"matched pairs need one text per image; got {len(images_emb)} images and {len(texts_emb)} texts."
        )
    cosines = F.cosine_similarity(images_emb.double(), texts_emb.double(), dim=1)
    return float(cosines.mean())


def dino_score(generated: torch.Tensor, real: torch.Tensor) -> float:
    """DINO: mean pairwise cosine of DINO CLS embeddings, generated `[N, D]` vs real `[M, D]`.

    Example:
        >>> import torch
        >>> dino_score(torch.ones(2, 4), torch.ones(3, 4))
        1.0
    """
    return mean_pairwise_cosine(generated, real)


def clip_i(generated: torch.Tensor, real: torch.Tensor) -> float:
    """CLIP-I: mean pairwise cosine of CLIP image embeddings, generated `[N, D]` vs real `[M, D]`.

    Example:
        >>> import torch
        >>> clip_i(torch.ones(2, 4), -torch.ones(3, 4))
        -1.0
    """
    return mean_pairwise_cosine(generated, real)


def clip_t(images_emb: torch.Tensor, prompts_emb: torch.Tensor) -> float:
    """CLIP-T: mean cosine of each image's CLIP embedding with ITS OWN prompt's (identifier removed).

    Args:
        images_emb (`torch.Tensor`): `[N, D]` CLIP image embeddings.
        prompts_emb (`torch.Tensor`): `[N, D]` CLIP text embeddings; row i is image i's prompt.

    Example:
        >>> import torch
        >>> clip_t(torch.eye(2), torch.eye(2))  # all-pairs averaging would give 0.5 here
        1.0
    """
    return matched_cosine(images_emb, prompts_emb)


def pres(class_generated: torch.Tensor, real: torch.Tensor) -> float:
    """PRES: DINO score of class-prompt generations ("a dog") vs the subject's real images; lower is better.

    Example:
        >>> import torch
        >>> pres(torch.tensor([[0.0, 1.0]]), torch.tensor([[1.0, 0.0]]))
        0.0
    """
    return dino_score(class_generated, real)


def div(items: Sequence[T] | torch.Tensor, distance: Callable[[T, T], Any] | None = None) -> float:
    """DIV: mean distance over unordered pairs i < j, from a distance function or a precomputed matrix.

    Args:
        items (`Sequence | torch.Tensor`): the generations of ONE prompt (with `distance`), or, without
            `distance`, a square `[N, N]` matrix of pairwise distances (only its upper triangle is read).
        distance (`Callable | None`): `distance(x, y)` -> a number or 0-d tensor, e.g. LPIPS.

    Returns:
        The mean of the `N (N - 1) / 2` pair distances.

    Example:
        >>> import torch
        >>> div(torch.tensor([[0.0, 0.25, 0.5], [0.25, 0.0, 0.75], [0.5, 0.75, 0.0]]))  # (.25 + .5 + .75) / 3
        0.5
    """
    matrix = torch.as_tensor(items, dtype=torch.float64) if distance is None else distance_matrix(items, distance)
    if matrix.dim() != 2 or matrix.shape[0] != matrix.shape[1]:
        raise InputError(f"DIV needs a square distance matrix; got shape {tuple(matrix.shape)}.")
    if matrix.shape[0] < 2:
        raise InputError("DIV needs at least 2 generations of a prompt (there are no pairs otherwise).")
    rows, cols = torch.triu_indices(*matrix.shape, offset=1)
    return float(matrix[rows, cols].double().mean())


def distance_matrix(items: Sequence[T], distance: Callable[[T, T], Any]) -> torch.Tensor:
    """`[N, N]` symmetric matrix of `distance(items[i], items[j])`, computed once per pair i < j.

    Example:
        >>> distance_matrix([0.0, 1.0, 3.0], lambda x, y: abs(x - y)).tolist()
        [[0.0, 1.0, 3.0], [1.0, 0.0, 2.0], [3.0, 2.0, 0.0]]
    """
    n = len(items)
    matrix = torch.zeros(n, n, dtype=torch.float64)
    for i in range(n):
        for j in range(i + 1, n):
            matrix[i, j] = matrix[j, i] = float(distance(items[i], items[j]))
    return matrix


def _check_embeddings(embeddings: torch.Tensor, name: str) -> None:
    if not isinstance(embeddings, torch.Tensor) or embeddings.dim() != 2:
        shape = tuple(embeddings.shape) if isinstance(embeddings, torch.Tensor) else type(embeddings).__name__
        raise InputError(f"{name} must be a [N, D] tensor of embeddings; got {shape}.")
    if len(embeddings) == 0:
        raise InputError(f"{name} holds no embeddings.")


def _check_same_width(a: torch.Tensor, b: torch.Tensor) -> None:
    if a.shape[1] != b.shape[1]:
        raise InputError(f"embeddings of different widths cannot be compared: {a.shape[1]} vs {b.shape[1]}.")
