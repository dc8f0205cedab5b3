"""Whitespace conventions and word -> subtoken mapping for byte-level BPE and SentencePiece.

Byte-level BPE vocabularies (GPT-2, Llama 3, SmolLM2) write a leading space as "Ġ"; SentencePiece
vocabularies (Llama 2, Mistral, Gemma) write it as "▁". A new token is always stored in *surface
form* (the text it stands for, e.g. " hepatotoxicity"), and added to the tokenizer as an
``AddedToken`` with ``normalized=False`` so that it matches raw text exactly.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

logger = logging.getLogger(__name__)

BYTE_LEVEL_SPACE = "Ġ"
SENTENCEPIECE_SPACE = "▁"
# Text placed before a word so that it is tokenized as it appears after other text; its tokens are
# removed again. A newline never merges with letters in the tokenizers we support.
_CONTEXT_PREFIX = "\n"


@dataclass(frozen=True)
class NewToken:
    """One token to add.

    Attributes:
        text: surface form, e.g. " hepatotoxicity" (a leading space is part of the token).
        subtoken_ids: the source tokenizer's ids for ``text`` in running text, length >= 2.
        token_id: id in the extended tokenizer (-1 before the tokenizer is extended).
    """

    text: str
    subtoken_ids: tuple[int, ...]
    token_id: int = -1


def whitespace_marker(tokenizer) -> str | None:
    """Return the vocabulary's space marker ("Ġ" or "▁"), or None if neither is used.

    Detected from how " the" is tokenized, not from the tokenizer's class name.
    """
    pieces = tokenizer.convert_ids_to_tokens(tokenizer.encode("a the", add_special_tokens=False))
    joined = "".join(p for p in pieces if isinstance(p, str))
    if BYTE_LEVEL_SPACE in joined:
        return BYTE_LEVEL_SPACE
    if SENTENCEPIECE_SPACE in joined:
        return SENTENCEPIECE_SPACE
    return None


def marker_to_surface(token: str) -> str:
    """Convert a vocabulary entry in marker form ("Ġword", "▁word") to surface text (" word")."""
    return token.replace(BYTE_LEVEL_SPACE, " ").replace(SENTENCEPIECE_SPACE, " ")


def subtoken_ids(tokenizer, text: str) -> list[int]:
    """Ids the tokenizer produces for ``text`` when it occurs inside running text.

    The word is tokenized after a newline and the newline's tokens are removed, so that
    SentencePiece tokenizers that prepend a dummy "▁" to the start of a text do not change the
    result. Falls back to plain encoding if the prefix does not tokenize separately.

    Returns:
        list of token ids (no special tokens).
    """
    prefix_ids = tokenizer.encode(_CONTEXT_PREFIX, add_special_tokens=False)
    full = tokenizer.encode(_CONTEXT_PREFIX + text, add_special_tokens=False)
    if prefix_ids and full[: len(prefix_ids)] == prefix_ids:
        return list(full[len(prefix_ids):])
    return list(tokenizer.encode(text, add_special_tokens=False))


def in_vocabulary(tokenizer, text: str) -> bool:
    """True if ``text`` is already a single token of the tokenizer (in running text)."""
    return len(subtoken_ids(tokenizer, text)) == 1


def add_new_tokens(tokenizer, texts: list[str]) -> list[int]:
    """Add surface-form tokens to ``tokenizer`` (in place) and return their new ids, in order.

    Tokens are added with ``normalized=False`` (matched on raw text, the leading space included),
    ``single_word=False``.

    Raises:
        ValueError: if a token could not be added (already present).
    """
    from tokenizers import AddedToken

    before = len(tokenizer)
    added = tokenizer.add_tokens([AddedToken(t, normalized=False, single_word=False) for t in texts])
    if added != len(texts):
        raise ValueError(f"expected to add {len(texts)} tokens, tokenizer added {added}")
    ids = tokenizer.convert_tokens_to_ids(list(texts))
    if any(i is None or i < before for i in ids):
        raise ValueError("new tokens did not receive fresh ids")
    return list(ids)


def bos_prefix(tokenizer) -> list[int]:
    """Ids put in front of every snippet: ``[bos_token_id]``, or ``[]`` when there is no BOS.

    Models without a BOS token (e.g. Qwen) see snippets that start directly with text.
    """
    return [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
