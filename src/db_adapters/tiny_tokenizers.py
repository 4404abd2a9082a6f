"""Tiny tokenizers in the real formats, trained offline: CLIP's byte-level BPE and T5's Unigram.

The tiny pipelines (`testing`) need tokenizers that load and split text as a hub checkpoint's do, without
the hub. These are trained locally on the shipped English word list with `tokenizers`, with the caption
words weighted up so they are single tokens as in CLIP's real vocabulary. The trained files ship in
`assets/tiny_tokenizer/`, `assets/tiny_tokenizer_2/` and `assets/tiny_t5/`, so every build loads the same
vocabulary; `write_tiny_tokenizer_files` and `write_tiny_t5_files` wrote them.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

from .binder import english_words

if TYPE_CHECKING:
    from transformers import CLIPTokenizer, T5TokenizerFast

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
        >>> from db_adapters.tiny_tokenizers import tiny_tokenizer
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
        >>> from db_adapters.tiny_tokenizers import tiny_tokenizer, tiny_tokenizer_2
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


TINY_T5_VOCAB_SIZE = 2000
# T5's sentencepiece layout: <pad>, </s> and <unk> take ids 0, 1 and 2; the pipelines pad with id 0.
_T5_SPECIAL_TOKENS = ("<pad>", "</s>", "<unk>")
# Real T5 tokenizers (and SD3's and Flux's tokenizer folders) say 512, the longest `max_sequence_length`
# either pipeline accepts. Nothing in the pipelines reads it: they pass `max_length=max_sequence_length`.
_T5_MODEL_MAX_LENGTH = 512


def train_tiny_unigram(
    vocab_size: int = TINY_T5_VOCAB_SIZE, caption_words: tuple[str, ...] = _CAPTION_WORDS
) -> list[tuple[str, float]]:
    """Train a T5-format Unigram model on the English word list; return its (piece, log-probability) vocabulary.

    The layout is T5's: `<pad>`, `</s>`, `<unk>` first, then pieces by falling score, words starting
    with the "▁" space marker. Printable ASCII is in the alphabet, so capitals and punctuation are pieces
    rather than `<unk>` (T5 is cased). Every caption word is then a whole piece: the trainer seeds only
    substrings seen in two or more distinct words, so some ("city", "stuffed") would split otherwise; each
    such word is added scoring just above its split, which Viterbi then prefers. So the vocabulary can
    hold a few more than `vocab_size` pieces.
    """
    import string

    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    alphabet = list(string.ascii_letters + string.digits + string.punctuation)
    tokenizer = Tokenizer(models.Unigram())
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    trainer = trainers.UnigramTrainer(
        vocab_size=vocab_size,
        special_tokens=list(_T5_SPECIAL_TOKENS),
        unk_token="<unk>",
        initial_alphabet=alphabet,
        show_progress=False,
    )
    corpus = english_words() + list(caption_words) * _CAPTION_WEIGHT
    tokenizer.train_from_iterator(corpus, trainer=trainer)
    # Rounded (sentencepiece keeps float32 scores anyway): the multithreaded trainer's last digits vary
    # from run to run, and ties then sort by piece, so the written files are reproducible.
    scores = {piece: round(score, 6) for piece, score in json.loads(tokenizer.to_str())["model"]["vocab"]}
    # Alphabet characters absent from the corpus get arbitrary (hash-ordered) scores from the trainer;
    # no longer piece holds them, so one fixed score changes no split.
    unseen = set(alphabet) - set("".join(corpus))
    floor = min(score for piece, score in scores.items() if piece not in unseen)
    scores.update(dict.fromkeys(unseen, floor - 1.0))
    for word in caption_words:
        if "▁" + word not in scores:
            scores["▁" + word] = sum(scores[piece] for piece in tokenizer.encode(word).tokens) + 1.0
    pieces = sorted(
        (item for item in scores.items() if item[0] not in _T5_SPECIAL_TOKENS), key=lambda item: (-item[1], item[0])
    )
    return [(special, 0.0) for special in _T5_SPECIAL_TOKENS] + pieces


def write_tiny_t5_files(
    folder: str | Path, caption_words: tuple[str, ...] = _CAPTION_WORDS, vocab_size: int = TINY_T5_VOCAB_SIZE
) -> None:
    """Train the tiny Unigram and write it as a T5 tokenizer folder, as `assets/tiny_t5/` was written.

    The files are those of a hub checkpoint's `tokenizer_3/` (SD3) or `tokenizer_2/` (Flux) folder without
    `spiece.model`: `tokenizer.json` (the `tokenizers` pipeline `T5TokenizerFast` builds: whitespace split,
    "▁" metaspace, `</s>` appended), `tokenizer_config.json` and `special_tokens_map.json`. They are written
    with `tokenizers` alone, so they do not depend on the installed transformers version.

    Args:
        folder (`str` or `Path`): the folder to write; created if missing.
        caption_words (`tuple[str, ...]`): words weighted up in the corpus and kept whole.
        vocab_size (`int`): the trainer's vocabulary size.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    vocab = train_tiny_unigram(vocab_size=vocab_size, caption_words=caption_words)
    tokenizer = Tokenizer(models.Unigram(vocab, unk_id=_T5_SPECIAL_TOKENS.index("<unk>"), byte_fallback=False))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.WhitespaceSplit(),
            pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True),
        ]
    )
    tokenizer.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    tokenizer.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", _T5_SPECIAL_TOKENS.index("</s>"))]
    )
    tokenizer.add_special_tokens([AddedToken(token, normalized=False) for token in _T5_SPECIAL_TOKENS])
    special = {"pad_token": "<pad>", "eos_token": "</s>", "unk_token": "<unk>"}
    # No sentinel `<extra_id_N>` tokens: they serve T5's span-corruption pretraining, not text encoding.
    config = {
        "tokenizer_class": "T5Tokenizer",
        "model_max_length": _T5_MODEL_MAX_LENGTH,
        "extra_ids": 0,
        "additional_special_tokens": [],
        **special,
    }
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n", encoding="utf-8")


def tiny_t5_tokenizer() -> T5TokenizerFast:
    """A real T5 tokenizer over the shipped tiny Unigram vocabulary (~2k pieces), built offline.

    Example:
        >>> from db_adapters.tiny_tokenizers import tiny_t5_tokenizer
        >>> tok = tiny_t5_tokenizer()
        >>> tok.convert_ids_to_tokens(tok("a dog").input_ids)
        ['▁a', '▁dog', '</s>']
        >>> tok.pad_token_id, tok.eos_token_id, tok.unk_token_id, tok.model_max_length
        (0, 1, 2, 512)
    """
    from transformers import T5TokenizerFast

    # The same loading path as a hub checkpoint's tokenizer_3/ (SD3) or tokenizer_2/ (Flux) folder.
    return T5TokenizerFast.from_pretrained(str(_tiny_tokenizer_dir("tiny_t5")))
