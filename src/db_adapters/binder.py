"""Rare-token identifiers for DreamBooth prompts (Ruiz et al., 2023, section 3.2).

DreamBooth binds a subject to a unique identifier `[V]` and trains on prompts like "a [V] dog".
The identifier should carry as little meaning as possible before training, so that fine-tuning
does not have to unlearn (and does not leak) an existing concept. The paper's recipe:

1. take tokens from a rare part of the vocabulary (ids 5000-10000 of T5-XXL's 32k vocabulary);
2. keep those whose text is at most 3 characters without spaces;
3. map the sampled tokens back to text and use that as the identifier.

This module applies the recipe to `transformers` tokenizers, one or several (a model with several
text encoders needs an identifier that is one rare token in every one of them: SDXL's two CLIP
tokenizers; SD3's two CLIP tokenizers and T5's sentencepiece vocabulary, where the identifier must be
one word-initial piece "▁xyz" with an id in the paper's band). It adds the checks that make the
choice safe for CLIP-style byte-level BPE vocabularies: the identifier must stay exactly one token
when written between "a" and the class noun, and must not be an English word (a word has a
meaning, whatever its id). Random letter strings like "xyz" fail the first check (they split into
pieces, often single letters, each with a strong prior), and community picks like "sks" are flagged for their
known meaning (the SKS rifle).

Example:
    >>> from db_adapters.binder import choose_identifier, instance_prompt, class_prompt
    >>> from db_adapters.testing import tiny_tokenizer
    >>> tok = tiny_tokenizer()
    >>> identifier = choose_identifier(tok, "dog", seed=0)
    >>> instance_prompt(identifier, "dog"), class_prompt("dog")
    ('a ki dog', 'a dog')
"""

from __future__ import annotations

import functools
import gzip
import os
import random
import re
import sys
import warnings
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import InputError

if TYPE_CHECKING:
    from collections.abc import Collection, Sequence

    from transformers import PreTrainedTokenizerBase

    Tokenizers = PreTrainedTokenizerBase | Sequence[PreTrainedTokenizerBase]

__all__ = [
    "CLIP_RARE_ID_RANGE",
    "CLIP_VOCAB_SIZE",
    "KNOWN_STRONG_PRIORS",
    "T5_RARE_ID_RANGE",
    "IdentifierWarning",
    "choose_identifier",
    "class_prompt",
    "english_words",
    "identifier_candidates",
    "instance_prompt",
    "rare_id_range",
    "validate_class_noun",
    "validate_identifier",
]

CLIP_VOCAB_SIZE = 49_408
# The rare band as fractions of the vocabulary: [50%, 95%).
# - Start halfway: CLIP's ids after the 512 byte symbols are BPE merges in the order they were
#   learned, i.e. by falling frequency in CLIP's captions, so a later id is a rarer string with a
#   weaker prior. The first half holds the common words, suffixes and popular abbreviations; the
#   paper likewise skipped the frequent head (ids < 5000) of T5's vocabulary.
# - Stop at 95%: the paper sampled a band (5000-10000 of 32k), not the rarest tail. The last merges
#   are likely the strings CLIP saw least, so their embeddings are the least trained and the least
#   predictable starting point; the tail is also where special tokens sit (CLIP's
#   <|startoftext|>/<|endoftext|> are the last two ids).
_RARE_START_PERCENT = 50
_RARE_STOP_PERCENT = 95
# For CLIP (SD 1.x/2.x/XL text encoders) the rule above gives this fixed, documented band.
CLIP_RARE_ID_RANGE = range(24_704, 46_937)
# T5 (SD3's and Flux's third/second encoder): the paper's band of T5-XXL's vocabulary, used as is.
T5_VOCAB_SIZE = 32_100
T5_RARE_ID_RANGE = range(5_000, 10_000)

# Short strings that tokenize as a single rare token yet carry a known meaning, so neither the id
# range nor the word list catches them. Extend as new cases are reported.
KNOWN_STRONG_PRIORS: dict[str, str] = {
    # The identifier of many DreamBooth tutorials: one CLIP token (id 48136, past the rare band)
    # and no English word, but CLIP knows it as the SKS rifle, which can leak into generations.
    "sks": "names the SKS rifle, which CLIP knows well",
}

_MAX_IDENTIFIER_CHARS = 3
_IDENTIFIER_PATTERN = re.compile(rf"[a-z]{{1,{_MAX_IDENTIFIER_CHARS}}}")


class IdentifierWarning(UserWarning):
    """A user-given identifier is likely to carry an existing meaning into the prompts."""


@functools.lru_cache(maxsize=1)
def _english_word_tuple() -> tuple[str, ...]:
    path = resources.files("db_adapters") / "assets" / "english_words.txt.gz"
    with gzip.open(path.open("rb"), "rt", encoding="utf-8") as handle:
        return tuple(line.strip() for line in handle if line.strip() and not line.startswith("#"))


@functools.lru_cache(maxsize=1)
def _english_word_set() -> frozenset[str]:
    return frozenset(_english_word_tuple())


def english_words() -> list[str]:
    """The shipped English word list (SCOWL size 50 via Debian's wamerican), lower-case, sorted.

    The file is read once per process; each call returns a fresh list that the caller may change.

    Returns:
        `list[str]`: about 73k words, letters a-z only.

    Example:
        >>> from db_adapters.binder import english_words
        >>> words = english_words()
        >>> "dog" in words, "sks" in words
        (True, False)
    """
    return list(_english_word_tuple())


def validate_class_noun(class_noun: str) -> str:
    """Check the subject's class noun ("dog", "backpack") and return it stripped.

    Args:
        class_noun (`str`): the coarse class of the subject, as used in "a [V] dog".

    Returns:
        `str`: the class noun without surrounding whitespace.

    Raises:
        InputError: if `class_noun` is not a string or is empty after stripping.

    Example:
        >>> from db_adapters.binder import validate_class_noun
        >>> validate_class_noun("  dog ")
        'dog'
    """
    if not isinstance(class_noun, str) or not class_noun.strip():
        raise InputError(f"class noun {class_noun!r} is empty; pass the subject's class, e.g. 'dog'")
    return class_noun.strip()


def _validate_identifier_text(identifier: str) -> str:
    if not isinstance(identifier, str) or not identifier.strip():
        raise InputError(
            f"identifier {identifier!r} is empty; pass a rare token, or get one from "
            "db_adapters.choose_identifier(tokenizer, class_noun)"
        )
    return identifier.strip()


def instance_prompt(identifier: str, class_noun: str) -> str:
    """The prompt of the subject's own images: "a [V] [class noun]".

    Args:
        identifier (`str`): the subject's identifier `[V]`, e.g. from `choose_identifier`.
        class_noun (`str`): the subject's class, e.g. "dog".

    Returns:
        `str`: e.g. "a ki dog".

    Raises:
        InputError: if the identifier or the class noun is empty.

    Example:
        >>> from db_adapters.binder import instance_prompt
        >>> instance_prompt("ki", "dog")
        'a ki dog'
    """
    return f"a {_validate_identifier_text(identifier)} {validate_class_noun(class_noun)}"


def class_prompt(class_noun: str) -> str:
    """The prompt of the prior-preservation (class) images: "a [class noun]".

    Args:
        class_noun (`str`): the subject's class, e.g. "dog".

    Returns:
        `str`: e.g. "a dog".

    Raises:
        InputError: if the class noun is empty.

    Example:
        >>> from db_adapters.binder import class_prompt
        >>> class_prompt("dog")
        'a dog'
    """
    return f"a {validate_class_noun(class_noun)}"


def rare_id_range(tokenizer: PreTrainedTokenizerBase) -> range:
    """The ids identifiers are drawn from: a rare band of the tokenizer's base vocabulary.

    - CLIP-style byte-level BPE (SD 1.x/2.x, SDXL, the CLIP encoders of SD3 and Flux): the band
      [50%, 95%); for CLIP's 49,408-token vocabulary `CLIP_RARE_ID_RANGE`, ids 24,704-46,936: the later
      half of the BPE merges (merged later, so rarer in CLIP's training text), without the last 5%
      (likely the least-trained embeddings; also where the special tokens sit).
    - T5's sentencepiece vocabulary (SD3's and Flux's T5 encoder): the paper's own band, ids
      5,000-9,999 of T5's 32,100 (pieces ordered by falling probability, so past the frequent head);
      another sentencepiece vocabulary gets the same fractions of its size.

    Added tokens (`len(tokenizer) > tokenizer.vocab_size`) are never in the range; special tokens
    inside it are skipped by `identifier_candidates`.

    Args:
        tokenizer (`PreTrainedTokenizerBase`): a text encoder's tokenizer.

    Returns:
        `range`: the rare ids.

    Example:
        >>> from db_adapters.binder import rare_id_range
        >>> from db_adapters.testing import tiny_tokenizer
        >>> rare_id_range(tiny_tokenizer())
        range(2048, 3891)
    """
    size = tokenizer.vocab_size
    if _is_sentencepiece(tokenizer):
        return range(size * T5_RARE_ID_RANGE.start // T5_VOCAB_SIZE, size * T5_RARE_ID_RANGE.stop // T5_VOCAB_SIZE)
    if size == CLIP_VOCAB_SIZE:
        return CLIP_RARE_ID_RANGE
    return range(size * _RARE_START_PERCENT // 100, size * _RARE_STOP_PERCENT // 100)


def _is_sentencepiece(tokenizer: PreTrainedTokenizerBase) -> bool:
    # T5's tokenizers (slow and fast) are the sentencepiece ones db-adapters meets (SD3, Flux).
    return type(tokenizer).__name__.startswith(("T5Tokenizer", "T5TokenizerFast"))


def _ids(tokenizer: PreTrainedTokenizerBase, texts: list[str]) -> list[list[int]]:
    return tokenizer(texts, add_special_tokens=False)["input_ids"]


def _token_problem(tokenizer: PreTrainedTokenizerBase, identifier: str, class_noun: str) -> str | None:
    """Why `identifier` is not one token of its own in "a {identifier} {class_noun}", or None."""
    (ids,) = _identifier_ids(tokenizer, [identifier], class_noun)
    if ids is None:
        return "does not stay a separate word in the prompt{where} (it merges with the words around it)"
    if len(ids) != 1:
        pieces = ", ".join(repr(piece) for piece in tokenizer.convert_ids_to_tokens(ids))
        return f"is split{{where}} into {len(ids)} tokens ({pieces}), each with its own meaning, not one rare token"
    return None


def _identifier_ids(
    tokenizer: PreTrainedTokenizerBase, identifiers: list[str], class_noun: str
) -> list[list[int] | None]:
    """The ids each identifier gets inside "a {identifier} {class_noun}", or None if it does not stay
    apart from its neighbours.

    Tokenizing in context, not alone, is what matters: the model only ever sees the identifier in
    the prompt, and some tokenizers merge or split a string differently next to other words.
    """
    prefix, suffix = _ids(tokenizer, ["a", class_noun])
    prompts = [f"a {identifier} {class_noun}" for identifier in identifiers]
    result: list[list[int] | None] = []
    for ids in _ids(tokenizer, prompts) if prompts else []:
        end = len(ids) - len(suffix)
        if end < len(prefix) or ids[: len(prefix)] != prefix or ids[end:] != suffix:
            result.append(None)
        else:
            result.append(ids[len(prefix) : end])
    return result


def identifier_candidates(tokenizer: Tokenizers, class_noun: str) -> list[str]:
    """Every identifier the paper's recipe allows for these tokenizer(s) and class noun, sorted.

    A candidate is the text of a token `t` in `rare_id_range(tokenizer)` (special tokens excluded)
    such that the text is 1-3 letters a-z, "a {text} {class_noun}" tokenizes to "a", then exactly
    `t`, then the class noun (so `t` is a whole, word-final token: it stands alone as a word), the
    text is not in the English word list, and it is not in `KNOWN_STRONG_PRIORS`. With several
    tokenizers (SDXL has two), a candidate must be one by these rules in every one of them.

    Args:
        tokenizer (`PreTrainedTokenizerBase | Sequence[PreTrainedTokenizerBase]`): the text encoder's
            tokenizer, or every text encoder's tokenizer (a CLIP-style BPE for Stable Diffusion).
        class_noun (`str`): the subject's class, e.g. "dog".

    Returns:
        `list[str]`: the candidates, sorted and without repeats (the same list on every call).

    Raises:
        InputError: if the class noun is empty.

    Example:
        >>> from db_adapters.binder import identifier_candidates
        >>> from db_adapters.testing import tiny_tokenizer
        >>> candidates = identifier_candidates(tiny_tokenizer(), "dog")
        >>> len(candidates), candidates[:3]
        (108, ['acs', 'ae', 'ahs'])
    """
    class_noun = validate_class_noun(class_noun)
    common: set[str] | None = None
    for one in _as_list(tokenizer):
        found = set(_candidates_of(one, class_noun))
        common = found if common is None else common & found
    return sorted(common or ())


def _candidates_of(tokenizer: PreTrainedTokenizerBase, class_noun: str) -> list[str]:
    special = set(tokenizer.all_special_ids)
    words = _english_word_set()
    # A text can belong to several rare ids (CLIP has both "xyz" inside a word and "xyz</w>" at its
    # end); the prompt decides which one the model would see.
    by_text: dict[str, set[int]] = {}
    for token_id in rare_id_range(tokenizer):
        if token_id in special:
            continue
        # decode() drops the tokenizer's word-boundary marker (CLIP's "</w>"); whether the token is
        # a whole word is settled by the in-context check below, which works for any marker.
        text = tokenizer.decode([token_id]).strip()
        if _IDENTIFIER_PATTERN.fullmatch(text) and text not in words and text not in KNOWN_STRONG_PRIORS:
            by_text.setdefault(text, set()).add(token_id)
    texts = sorted(by_text)
    in_context = _identifier_ids(tokenizer, texts, class_noun)
    return [
        text
        for text, ids in zip(texts, in_context, strict=True)
        if ids is not None and len(ids) == 1 and ids[0] in by_text[text]
    ]


def _as_list(tokenizer: Tokenizers) -> list[PreTrainedTokenizerBase]:
    return list(tokenizer) if isinstance(tokenizer, list | tuple) else [tokenizer]


def choose_identifier(tokenizer: Tokenizers, class_noun: str, seed: int = 0, exclude: Collection[str] = ()) -> str:
    """Sample a rare-token identifier `[V]` for "a [V] [class noun]", reproducibly.

    Args:
        tokenizer (`PreTrainedTokenizerBase | Sequence[PreTrainedTokenizerBase]`): the text encoder's
            tokenizer, or all of them (the identifier is then one rare token in each).
        class_noun (`str`): the subject's class, e.g. "dog".
        seed (`int`): the same seed, tokenizers and class noun always give the same identifier.
        exclude (`Collection[str]`): identifiers already taken (by the other subjects of a run).

    Returns:
        `str`: one of `identifier_candidates(tokenizer, class_noun)`.

    Raises:
        InputError: if the class noun is empty, or the vocabulary has no candidate.

    Example:
        >>> from db_adapters.binder import choose_identifier
        >>> from db_adapters.testing import tiny_tokenizer
        >>> choose_identifier(tiny_tokenizer(), "dog", seed=0)
        'ki'
    """
    candidates = [c for c in identifier_candidates(tokenizer, class_noun) if c not in exclude]
    if not candidates:
        bands = ", ".join(
            f"ids {r.start}-{r.stop - 1} of a {one.vocab_size}-token vocabulary"
            for one in _as_list(tokenizer)
            for r in [rare_id_range(one)]
        )
        raise InputError(
            f"no identifier candidate for class noun {class_noun.strip()!r}: no 1-3 letter non-English word is a "
            f"rare token ({bands}) that stays one token in the prompt in every tokenizer; pass your own "
            "identifier and check it with db_adapters.validate_identifier"
        )
    # A private generator: the choice depends only on the seed, not on global random state.
    return random.Random(seed).choice(candidates)


def validate_identifier(tokenizer: Tokenizers, identifier: str, class_noun: str, *, strict: bool = False) -> str:
    """Check a user-given identifier and return it stripped; warn if it likely carries a meaning.

    An identifier is flagged when, inside "a {identifier} {class_noun}", it is not exactly one
    token (its pieces, often single letters, each have strong priors), when it is a common English
    word, or when it is in `KNOWN_STRONG_PRIORS` (e.g. "sks", the rifle).

    Args:
        tokenizer (`PreTrainedTokenizerBase | Sequence[PreTrainedTokenizerBase]`): the text encoder's
            tokenizer, or all of them (each is checked).
        identifier (`str`): the identifier `[V]` the user wants.
        class_noun (`str`): the subject's class, e.g. "dog".
        strict (`bool`): raise `InputError` instead of warning.

    Returns:
        `str`: the identifier without surrounding whitespace.

    Raises:
        InputError: if the identifier or class noun is empty, or, with `strict`, if it is flagged.

    Warns:
        IdentifierWarning: if the identifier is flagged and `strict` is False.

    Example:
        >>> import warnings
        >>> from db_adapters.binder import validate_identifier
        >>> from db_adapters.testing import tiny_tokenizer
        >>> tok = tiny_tokenizer()
        >>> validate_identifier(tok, " ki ", "dog")
        'ki'
        >>> with warnings.catch_warnings(record=True) as caught:
        ...     warnings.simplefilter("always")
        ...     _ = validate_identifier(tok, "sks", "dog")
        >>> "2 tokens" in str(caught[0].message)
        True
    """
    identifier = _validate_identifier_text(identifier)
    class_noun = validate_class_noun(class_noun)
    reasons = []
    tokenizers = _as_list(tokenizer)
    for number, one in enumerate(tokenizers, start=1):
        where = f" by tokenizer {number}" if len(tokenizers) > 1 else ""
        reason = _token_problem(one, identifier, class_noun)
        if reason:
            reasons.append(reason.replace("{where}", where))
    lowered = identifier.lower()
    if lowered in _english_word_set():
        reasons.append("is a common English word, so the text encoder already has a meaning for it")
    if lowered in KNOWN_STRONG_PRIORS:
        reasons.append(KNOWN_STRONG_PRIORS[lowered])
    if reasons:
        message = (
            f"identifier {identifier!r} in {instance_prompt(identifier, class_noun)!r} "
            + "; it ".join(reasons)
            + f". Training would have to overwrite that prior; use a rare single token such as "
            f"db_adapters.choose_identifier(tokenizer, {class_noun!r}) returns."
        )
        if strict:
            raise InputError(message)
        warnings.warn(message, IdentifierWarning, stacklevel=_stacklevel_outside_package())
    return identifier


def _stacklevel_outside_package() -> int:
    """The `stacklevel` that points a warning at the first caller outside db_adapters.

    `validate_identifier` is reached from `personalize` through several of our frames; a fixed level
    would name one of them, not the user's line. (Python 3.12's `skip_file_prefixes` does this; we
    support 3.11.)
    """
    package = str(Path(__file__).parent) + os.sep
    frame, level = sys._getframe(1), 1
    while frame is not None and frame.f_code.co_filename.startswith(package):
        frame, level = frame.f_back, level + 1
    return level
