"""Pivotal tuning: the subject bound to new tokens whose embeddings train along with the adapter.

As in diffusers' advanced DreamBooth script (`--train_text_encoder_ti`): instead of a rare word, the
identifier is N new tokens ("<s0><s1>"), added to every CLIP tokenizer of the pipeline, with new
embedding rows that are trained jointly with the strategy's weights. T5 (SD3, Flux) gets no tokens
and reads the identifier as text, as the advanced scripts do by default.

While training, `NewTokenRows` stands in for each encoder's input embedding: the original table
stays frozen and untouched, and only the N new rows get gradients and optimizer state. Making the
whole table trainable (and putting the old rows back after each step, as diffusers' script does)
would carry gradients and Adam state for 49,408 rows of which N move. After training, and when an
adapter is loaded, the rows enter the pipeline as textual-inversion tokens do (`load_tokens`), and
`unload_tokens` takes them out with diffusers' `unload_textual_inversion`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from .errors import AdapterError, InputError

if TYPE_CHECKING:
    import torch

    from .families import Family

# Keys of the new rows in an adapter file: "lora_token_embeddings.text_encoder", ... Plain diffusers refuses a
# LoRA file with a key that does not contain "lora", and loads only its components' keys: so it skips these.
KEY_PREFIX = "lora_token_embeddings."


def new_tokens(count: int, first: int = 0) -> list[str]:
    """The tokens of one subject: "<s{first}>", "<s{first+1}>"... (the advanced script's names).

    Example:
        >>> new_tokens(2), new_tokens(2, first=2)
        (['<s0>', '<s1>'], ['<s2>', '<s3>'])
    """
    return [f"<s{first + i}>" for i in range(count)]


def token_encoders(family: type[Family]) -> tuple[str, ...]:
    """The text encoders that take new tokens: the CLIP encoders (those `train_text_encoder` trains)."""
    return family.trained_text_encoders or family.text_encoders


class NewTokenRows:
    """Training-time stand-in for a text encoder's input embedding: the frozen table plus N trainable rows.

    Ids below `first_id` read the table, ids from `first_id` on read `rows`; so only the new rows train.

    Args:
        table (`torch.nn.Embedding`): the encoder's embedding table (kept as it is).
        first_id (`int`): the id of the first new token (the table's size: the tokenizer adds tokens at the end).
        rows (`torch.Tensor`): the new rows' initial values, (N, width).
    """

    def __new__(cls, table: Any, first_id: int, rows: Any) -> Any:
        # Built as a torch Module subclass on first use, so importing this module does not import torch.
        return _module_class()(table, first_id, rows)


def _module_class() -> type:
    import torch

    class _NewTokenRows(torch.nn.Module):
        def __init__(self, table: torch.nn.Embedding, first_id: int, rows: torch.Tensor) -> None:
            super().__init__()
            self.table, self.first_id = table, first_id
            self.rows = torch.nn.Parameter(rows.detach().to(table.weight.device, torch.float32).clone())

        @property
        def weight(self) -> torch.Tensor:  # what code reading `get_input_embeddings().weight` expects
            return self.table.weight

        @property
        def embedding_dim(self) -> int:
            return self.table.embedding_dim

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            new = ids >= self.first_id
            old = self.table(torch.where(new, torch.zeros_like(ids), ids))
            fresh = self.rows[(ids - self.first_id).clamp(min=0, max=self.rows.shape[0] - 1)].to(old.dtype)
            return torch.where(new.unsqueeze(-1), fresh, old)

    return _NewTokenRows


class TokenEmbeddings:
    """The new tokens of a run, in every CLIP encoder of the pipeline: add, train, make permanent, remove.

    Args:
        tokens (`list[str]`): every subject's new tokens, e.g. ["<s0>", "<s1>"].

    Example:
        >>> from db_adapters.families import family_of
        >>> from db_adapters.testing import tiny_pipeline
        >>> pipe = tiny_pipeline()
        >>> tokens = TokenEmbeddings(["<s0>", "<s1>"])
        >>> tokens.add(pipe, family_of(pipe), seed=0)
        >>> [tuple(p.shape) for p in tokens.trainable_parameters()["token_embeddings"]]
        [(2, 32)]
        >>> tokens.remove(pipe)
        >>> "<s0>" in pipe.tokenizer.get_vocab()
        False
    """

    def __init__(self, tokens: list[str]) -> None:
        self.tokens = list(tokens)
        self.stand_ins: dict[str, Any] = {}

    def add(self, pipe: Any, family: type[Family], seed: int) -> None:
        """Add the tokens to each CLIP tokenizer and encoder, and a `NewTokenRows` over its table; on failure,
        nothing changes."""
        import torch

        generator = torch.Generator().manual_seed(seed)
        self.family = family
        initial = {}
        for component in token_encoders(family):
            table = tokenizer_and_encoder(pipe, family, component)[1].get_input_embeddings()
            # The advanced script's initialisation: random rows as spread as the table's own.
            std = table.weight.float().std().item()
            initial[component] = torch.randn(len(self.tokens), table.embedding_dim, generator=generator) * std
        load_tokens(pipe, family, self.tokens, initial)
        for component, rows in initial.items():
            encoder = getattr(pipe, component)
            table = encoder.get_input_embeddings()
            self.stand_ins[component] = NewTokenRows(table, table.num_embeddings - len(self.tokens), rows)
            encoder.set_input_embeddings(self.stand_ins[component])

    def trainable_parameters(self) -> dict[str, list[torch.nn.Parameter]]:
        """The new rows, one tensor per encoder, as one parameter group."""
        return {"token_embeddings": [stand_in.rows for stand_in in self.stand_ins.values()]}

    def rows(self) -> dict[str, torch.Tensor]:
        """The trained rows per encoder component, (N, width) each, on the CPU."""
        return {component: s.rows.detach().cpu() for component, s in self.stand_ins.items()}

    def finish(self, pipe: Any) -> None:
        """Write the trained rows into the grown tables: the pipeline is plain diffusers with new tokens."""
        import torch

        for stand_in in self._take_out_stand_ins(pipe).values():
            with torch.no_grad():
                stand_in.table.weight[-len(self.tokens) :] = stand_in.rows.to(stand_in.table.weight.dtype)

    def remove(self, pipe: Any) -> None:
        """Take the stand-ins and the tokens out again (a failed or interrupted run)."""
        if self.stand_ins:
            self._take_out_stand_ins(pipe)
            unload_tokens(pipe, self.family, self.tokens)

    def _take_out_stand_ins(self, pipe: Any) -> dict[str, Any]:
        stand_ins, self.stand_ins = self.stand_ins, {}
        for component, stand_in in stand_ins.items():
            getattr(pipe, component).set_input_embeddings(stand_in.table)
        return stand_ins


def tokenizer_and_encoder(pipe: Any, family: type[Family], component: str) -> tuple[Any, Any]:
    """The tokenizer that goes with a text-encoder component, and the encoder."""
    tokenizer_name = family.tokenizers[family.text_encoders.index(component)]
    return getattr(pipe, tokenizer_name), getattr(pipe, component)


def check_tokens_free(tokenizer: Any, table: Any, tokens: list[str], component: str) -> None:
    """`InputError` if a token is taken, or if the tokenizer and the table disagree on the vocabulary size."""
    taken = [token for token in tokens if token in tokenizer.get_vocab()]
    if taken:
        raise InputError(
            f"token {taken[0]!r} is already in the pipeline's {component} tokenizer (another adapter or a textual "
            "inversion uses it); unload that first."
        )
    if len(tokenizer) != table.num_embeddings:
        raise InputError(
            f"pivotal tuning adds tokens at the end of the vocabulary, but the {component} tokenizer has "
            f"{len(tokenizer)} tokens and its embedding table {table.num_embeddings} rows."
        )


def load_tokens(pipe: Any, family: type[Family], tokens: list[str], rows: Mapping[str, torch.Tensor]) -> None:
    """Add `tokens` with their `rows` (per encoder component) to the pipeline, as textual inversion does.

    These are the steps of diffusers' `load_textual_inversion` (add the tokens, grow the table, write the
    rows), done here because SD3's pipeline has no `load_textual_inversion`; tests check that diffusers'
    own loader puts identical rows in from our embedding file.

    Args:
        pipe (`DiffusionPipeline`): the pipeline.
        family (`type[Family]`): its model family.
        tokens (`list[str]`): the tokens, e.g. ["<s0>", "<s1>"].
        rows (`Mapping[str, Tensor]`): (len(tokens), width) per text-encoder component.

    Example:
        >>> load_tokens(pipe, family, ["<s0>", "<s1>"], {"text_encoder": rows})  # doctest: +SKIP
    """
    import torch

    done = []
    try:
        for component, values in rows.items():
            tokenizer, encoder = tokenizer_and_encoder(pipe, family, component)
            table = encoder.get_input_embeddings()
            check_tokens_free(tokenizer, table, tokens, component)
            if tuple(values.shape) != (len(tokens), table.embedding_dim):
                raise AdapterError(
                    f"the {component} token embeddings have shape {tuple(values.shape)}; this pipeline's encoder "
                    f"takes ({len(tokens)}, {table.embedding_dim})."
                )
            tokenizer.add_tokens(tokens)
            done.append(component)
            encoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)  # its rows are written next
            with torch.no_grad():
                weight = encoder.get_input_embeddings().weight
                weight[-len(tokens) :] = values.to(weight.device, weight.dtype)
    except BaseException:
        unload_tokens(pipe, family, tokens, done)
        raise


def unload_tokens(pipe: Any, family: type[Family], tokens: list[str], components: list[str] | None = None) -> None:
    """Remove `tokens` and their rows from the encoders (all CLIP encoders when `components` is None).

    Example:
        >>> unload_tokens(pipe, family, ["<s0>", "<s1>"])  # doctest: +SKIP
    """
    from diffusers.loaders.textual_inversion import TextualInversionLoaderMixin

    for component in token_encoders(family) if components is None else components:
        tokenizer, encoder = tokenizer_and_encoder(pipe, family, component)
        if any(token in tokenizer.get_vocab() for token in tokens):
            # diffusers' unloader uses only its arguments, so it serves pipelines without the mixin (SD3) too.
            TextualInversionLoaderMixin.unload_textual_inversion(
                pipe, tokens=tokens, tokenizer=tokenizer, text_encoder=encoder
            )


def embedding_file_tensors(family: type[Family], rows: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The textual-inversion file A1111, ComfyUI and diffusers' `load_textual_inversion` read.

    Keys are the family's `embedding_file_keys`: SD 1.x/2.x `emb_params`; SDXL and SD3 `clip_l` and `clip_g`;
    Flux `clip_l`.

    Example:
        >>> import torch
        >>> from db_adapters.families import get_family
        >>> sorted(embedding_file_tensors(get_family("sdxl"), {"text_encoder": torch.zeros(2, 4),
        ...                                                   "text_encoder_2": torch.zeros(2, 8)}))
        ['clip_g', 'clip_l']
    """
    names = family.embedding_file_keys
    return {names[component]: tensor.contiguous() for component, tensor in rows.items()}


def pipeline_rows(pipe: Any, family: type[Family], tokens: list[str]) -> dict[str, torch.Tensor]:
    """The rows of `tokens` in each CLIP encoder of a pipeline they were loaded into, on the CPU.

    Example:
        >>> pipeline_rows(pipe, family, adapter.tokens)  # doctest: +SKIP
    """
    rows = {}
    for component in token_encoders(family):
        tokenizer, encoder = tokenizer_and_encoder(pipe, family, component)
        ids = tokenizer.convert_tokens_to_ids(tokens)
        rows[component] = encoder.get_input_embeddings().weight[ids].detach().float().cpu()
    return rows


def file_tensors(rows: Mapping[str, torch.Tensor], dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """`rows` under an adapter file's keys (`KEY_PREFIX` + component)."""
    return {f"{KEY_PREFIX}{component}": (t.to(dtype) if dtype else t).contiguous() for component, t in rows.items()}


def rows_in_file(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The token rows an adapter file's tensors hold, per component (empty without pivotal tuning)."""
    return {key.removeprefix(KEY_PREFIX): t for key, t in tensors.items() if key.startswith(KEY_PREFIX)}


def free_tokens(pipe: Any, family: type[Family], tokens: list[str]) -> dict[str, str]:
    """A renaming of `tokens` ("<s0>"...) to names no CLIP tokenizer of the pipeline has yet.

    Two adapters trained apart both call their subject "<s0><s1>"; the second loaded takes the next free
    "<sK>" names (the embedding is the same vector under any name). The identity mapping when nothing is taken.

    Example:
        >>> free_tokens(pipe, family, ["<s0>", "<s1>"])  # doctest: +SKIP
        {'<s0>': '<s2>', '<s1>': '<s3>'}
    """
    vocabularies = [tokenizer_and_encoder(pipe, family, c)[0].get_vocab() for c in token_encoders(family)]

    def free(names: list[str]) -> bool:
        return not any(name in vocabulary for name in names for vocabulary in vocabularies)

    if free(tokens):
        return {token: token for token in tokens}
    start = 0
    while not free(new_tokens(len(tokens), first=start)):
        start += 1
    return dict(zip(tokens, new_tokens(len(tokens), first=start), strict=True))


def renamed(text: str, mapping: Mapping[str, str]) -> str:
    """`text` with every token of `mapping` replaced at once (so "<s0>"->"<s2>", "<s2>"->"<s4>" cannot chain).

    Example:
        >>> renamed("a <s0><s1> dog", {"<s0>": "<s2>", "<s1>": "<s3>"})
        'a <s2><s3> dog'
    """
    import re

    if all(old == new for old, new in mapping.items()):
        return text
    pattern = re.compile("|".join(re.escape(token) for token in sorted(mapping, key=len, reverse=True)))
    return pattern.sub(lambda match: mapping[match.group(0)], text)


def rows_from_embedding_file(family: type[Family], tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse of `embedding_file_tensors`: an embedding file's tensors as rows per encoder component.

    Example:
        >>> import torch
        >>> from db_adapters.families import get_family
        >>> list(rows_from_embedding_file(get_family("sd"), {"emb_params": torch.zeros(2, 4)}))
        ['text_encoder']
    """
    names = family.embedding_file_keys
    wanted = {names[component]: component for component in token_encoders(family)}
    if set(tensors) != set(wanted):
        raise AdapterError(f"an embedding file for {family.title} holds {sorted(wanted)}; this one {sorted(tensors)}.")
    return {component: tensors[name] for name, component in wanted.items()}
