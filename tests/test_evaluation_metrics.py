"""The paper's metrics as pure functions, checked on hand-made embeddings with hand-computed answers."""

from __future__ import annotations

import math

import pytest
import torch

from db_adapters.errors import InputError
from db_adapters.evaluation import metrics

X, Y = [1.0, 0.0], [0.0, 1.0]
DIAGONAL = [1.0, 1.0]
INV_SQRT2 = 1 / math.sqrt(2)


def t(*rows: list[float]) -> torch.Tensor:
    return torch.tensor(rows)


def test_parallel_sets_score_one_whatever_the_lengths():
    # cos = 1 for every pair: cosine ignores length, so [1, 0] and [3, 0] are "identical".
    assert metrics.mean_pairwise_cosine(t(X, [3.0, 0.0]), t([0.5, 0.0])) == pytest.approx(1.0)
    assert metrics.dino_score(t(X), t(X)) == pytest.approx(1.0)


def test_orthogonal_sets_score_zero():
    # every generated vector is orthogonal to every real one: all cosines are 0.
    assert metrics.mean_pairwise_cosine(t(X, [2.0, 0.0]), t(Y, [0.0, 5.0])) == pytest.approx(0.0)


def test_identical_sets_of_distinct_vectors_average_over_all_pairs():
    # {X, Y} vs itself: pairs (X,X)=1, (X,Y)=0, (Y,X)=0, (Y,Y)=1 -> 2 / 4 = 0.5, not 1.0: DINO
    # compares every generated image with every real one (hence the paper's real-vs-real 0.774).
    assert metrics.dino_score(t(X, Y), t(X, Y)) == pytest.approx(0.5)


def test_two_by_two_case_with_a_known_mean():
    # a = {X, Y}, b = {X, (1,1)}: cos(X,X)=1, cos(X,(1,1))=1/sqrt2, cos(Y,X)=0, cos(Y,(1,1))=1/sqrt2
    # -> (1 + 2/sqrt2) / 4 = 0.6035534
    expected = (1 + 2 * INV_SQRT2) / 4
    assert metrics.mean_pairwise_cosine(t(X, Y), t(X, DIAGONAL)) == pytest.approx(expected)
    assert expected == pytest.approx(0.6035534, abs=1e-7)


def test_opposite_sets_score_minus_one_for_clip_i():
    assert metrics.clip_i(t(X, X), t([-1.0, 0.0])) == pytest.approx(-1.0)


def test_clip_t_uses_matched_pairs_not_the_all_pairs_average():
    images, texts = t(X, Y), t(DIAGONAL, Y)
    # matched: cos(X,(1,1)) = 1/sqrt2 and cos(Y,Y) = 1 -> (1/sqrt2 + 1) / 2 = 0.8535534
    assert metrics.clip_t(images, texts) == pytest.approx((INV_SQRT2 + 1) / 2)
    assert metrics.matched_cosine(images, texts) == pytest.approx(0.8535534, abs=1e-7)
    # the common mistake, averaging all four (image, prompt) pairs: (1/sqrt2 + 0 + 1/sqrt2 + 1) / 4
    all_pairs = metrics.mean_pairwise_cosine(images, texts)
    assert all_pairs == pytest.approx((2 * INV_SQRT2 + 1) / 4)
    assert metrics.clip_t(images, texts) - all_pairs == pytest.approx(0.25)


def test_clip_t_perfect_matches_score_one_where_all_pairs_would_say_half():
    # image i is exactly its own prompt, orthogonal to the other prompt: matched 1.0, all pairs 0.5.
    assert metrics.clip_t(t(X, Y), t(X, Y)) == pytest.approx(1.0)


def test_clip_t_needs_one_text_per_image():
    with pytest.raises(InputError, match="one text per image"):
        metrics.clip_t(t(X, Y), t(X))


def test_pres_is_dino_of_class_generations_against_real_images():
    class_generations, real = t(X, DIAGONAL), t(Y)
    # cos(X,Y) = 0 and cos((1,1),Y) = 1/sqrt2 -> PRES = 1/(2 sqrt2) = 0.3535534
    assert metrics.pres(class_generations, real) == pytest.approx(INV_SQRT2 / 2)
    assert metrics.pres(class_generations, real) == metrics.dino_score(class_generations, real)


def test_div_averages_the_upper_triangle_of_a_distance_matrix():
    # pairs (0,1)=0.1, (0,2)=0.2, (1,2)=0.6 -> (0.1 + 0.2 + 0.6) / 3 = 0.3; the diagonal and the lower
    # triangle (filled with junk here) are never read.
    matrix = t([0.0, 0.1, 0.2], [9.0, 0.0, 0.6], [9.0, 9.0, 0.0])
    assert metrics.div(matrix) == pytest.approx(0.3)


def test_div_calls_the_distance_once_per_unordered_pair():
    calls = []

    def distance(a: float, b: float) -> float:
        calls.append((a, b))
        return abs(a - b)

    # items 0, 1, 3: |0-1| = 1, |0-3| = 3, |1-3| = 2 -> mean 2.0 over 3 pairs
    assert metrics.div([0.0, 1.0, 3.0], distance) == pytest.approx(2.0)
    assert calls == [(0.0, 1.0), (0.0, 3.0), (1.0, 3.0)]


def test_div_needs_two_generations_and_a_square_matrix():
    with pytest.raises(InputError, match="at least 2"):
        metrics.div(t([0.0]))
    with pytest.raises(InputError, match="square"):
        metrics.div(t([0.0, 1.0]))


@pytest.mark.parametrize("bad", [torch.zeros(3), torch.zeros(0, 2)])
def test_embeddings_must_be_non_empty_matrices(bad):
    with pytest.raises(InputError):
        metrics.dino_score(bad, t(X))


def test_embeddings_of_different_widths_are_refused():
    with pytest.raises(InputError, match="widths"):
        metrics.clip_i(t(X), t([1.0, 0.0, 0.0]))


def test_metrics_return_plain_floats():
    assert type(metrics.dino_score(t(X), t(Y))) is float
    assert type(metrics.div(t([0.0, 1.0], [1.0, 0.0]))) is float
