"""Bits per byte of raw text: each model reads held-out documents through its own tokenizer.

The continuation metrics of :mod:`token_distillation.metrics` score only the *original* tokens that
follow a word. A user who scores or generates text with the extended tokenizer also needs the model
to predict the new token where the word comes, and reads the word in every context the extended
tokenizer produces (inside longer words too). Bits per byte of raw text measures all of this at
once, on a scale that does not depend on the tokenizer:

    BPB = sum over the document's tokens of -log2 p(token | previous tokens) / UTF-8 bytes of the text

Every token of the document is a target, each predicted from the tokens before it; the document
starts after the tokenizer's BOS token (or its EOS token when it has no BOS, as a document
separator), which is context only. The softmax runs over the model's whole vocabulary (for an
extended model: original and new tokens). Gap closed on this scale (Dobler et al., arXiv
2505.20133, compare methods on the same held-out text; the formula is this project's):

    gap_closed = 1 - (BPB(method) - BPB(original)) / (BPB(subtoken mean) - BPB(original))
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .config import ConfigError

#: padded tokens per forward pass (rows x longest row): bounds the ``[batch, seq, vocab]`` logits
BATCH_TOKENS = 4096


@dataclass
class ByteScore:
    """Totals over a set of documents for one model and its tokenizer.

    Attributes:
        bits: summed -log2 p of every target token (bits).
        bytes: UTF-8 bytes of the documents' text.
        tokens: target tokens (the document's tokens, the BOS/EOS context not counted).
        new_targets: targets that are new tokens (ids in ``new_ids``).
        new_target_bits: bits of those targets.
        docs: documents scored.
    """

    bits: float = 0.0
    bytes: int = 0
    tokens: int = 0
    new_targets: int = 0
    new_target_bits: float = 0.0
    docs: int = 0

    @property
    def bpb(self) -> float:
        """Bits per byte."""
        return self.bits / self.bytes if self.bytes else math.nan

    @property
    def tokens_per_byte(self) -> float:
        return self.tokens / self.bytes if self.bytes else math.nan

    def as_dict(self) -> dict:
        """The totals and the derived rates (JSON-ready)."""
        return {"bpb": self.bpb, "tokens_per_byte": self.tokens_per_byte, "bits": self.bits, "bytes": self.bytes,
                "tokens": self.tokens, "docs": self.docs, "new_token_targets": self.new_targets,
                "bits_per_new_token_target": self.new_target_bits / self.new_targets if self.new_targets else None,
                "bits_per_other_target": ((self.bits - self.new_target_bits) / (self.tokens - self.new_targets)
                                          if self.tokens > self.new_targets else None)}


def clip_text(text: str, max_chars: int) -> str:
    """``text`` cut to at most ``max_chars`` characters, at the last whitespace before the cut (so no
    tokenizer sees half a word); unchanged when shorter or ``max_chars`` is 0."""
    if not max_chars or len(text) <= max_chars:
        return text
    cut = text[:max_chars]
    space = max(cut.rfind(" "), cut.rfind("\n"))
    return cut[:space] if space > 0 else cut


def context_ids(tokenizer) -> list[int]:
    """The context every document is read after: ``[BOS]``, else ``[EOS]``.

    Raises:
        ConfigError: the tokenizer has neither (the first token of a document would have no context).
    """
    for tid in (tokenizer.bos_token_id, tokenizer.eos_token_id):
        if tid is not None:
            return [int(tid)]
    raise ConfigError("bits per byte: the tokenizer has neither a BOS nor an EOS token to start documents with; "
                      "pass --bpb_docs 0 to skip the metric")


def _batches(lengths: list[int], batch_tokens: int) -> list[list[int]]:
    """Document indices grouped (longest first) so that rows x longest row <= ``batch_tokens``."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    out: list[list[int]] = []
    for i in order:
        if out and (len(out[-1]) + 1) * lengths[out[-1][0]] <= batch_tokens:
            out[-1].append(i)
        else:
            out.append([i])
    return out


@torch.no_grad()
def score_bytes(model, tokenizer, texts: list[str], device, new_ids=(), batch_tokens: int = BATCH_TOKENS,
                max_len: int = 0, starts: list[int] | None = None) -> ByteScore:
    """Bits per byte of ``texts`` under ``model`` reading them through ``tokenizer``.

    With ``starts`` (a character position per text), only the tokens that start at or after it are
    targets and only ``text[start:]`` counts as bytes; the text before is context (a fast tokenizer's
    offsets decide where a token starts).

    Args:
        model: a causal LM (its logits ``[batch, seq, vocab]``; the whole vocabulary is the softmax).
        tokenizer: the model's own tokenizer (the extended one for an extended model).
        texts: the documents (already clipped, see :func:`clip_text`).
        new_ids: ids counted as new-token targets (their bits are reported apart).
        batch_tokens: padded tokens per forward pass.
        max_len: longest token sequence the model may read (0: no limit).

    Returns:
        the totals (:class:`ByteScore`).

    Raises:
        ConfigError: the tokenizer has no BOS/EOS, or a document is longer than ``max_len`` tokens.
    """
    ctx = context_ids(tokenizer)
    enc = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=starts is not None)
    seqs = [ctx + ids for ids in enc["input_ids"]]
    # per text: does each target (token after the context) count
    counted = [[True] * (len(s) - 1) for s in seqs] if starts is None else \
        [[False] * (len(ctx) - 1) + [a >= st for a, _ in off] for off, st in zip(enc["offset_mapping"], starts)]
    if max_len and max(len(s) for s in seqs) > max_len:
        raise ConfigError(f"bits per byte: a document has {max(len(s) for s in seqs)} tokens, more than the "
                          f"model's {max_len}; lower --bpb_max_chars")
    new = torch.tensor(sorted(set(new_ids)), dtype=torch.long, device=device)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else ctx[0]
    score = ByteScore(bytes=sum(len(t[st:].encode("utf-8")) for t, st in zip(texts, starts or [0] * len(texts))),
                      docs=len(texts))
    for rows in _batches([len(s) for s in seqs], batch_tokens):
        width = len(seqs[rows[0]])
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        att = torch.zeros((len(rows), width), dtype=torch.long)
        use = torch.zeros((len(rows), width - 1), dtype=torch.bool)
        for r, i in enumerate(rows):
            ids[r, : len(seqs[i])] = torch.tensor(seqs[i])
            att[r, : len(seqs[i])] = 1
            use[r, : len(seqs[i]) - 1] = torch.tensor(counted[i], dtype=torch.bool)
        ids, att = ids.to(device), att.to(device)
        logits = model(input_ids=ids, attention_mask=att, use_cache=False).logits
        logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
        tgt = ids[:, 1:]
        bits = -logp.gather(-1, tgt[..., None])[..., 0] / math.log(2)   # [rows, width - 1]
        valid = att[:, 1:].bool() & use.to(device)
        is_new = torch.isin(tgt, new) & valid
        score.bits += float(bits[valid].double().sum())
        score.tokens += int(valid.sum())
        score.new_targets += int(is_new.sum())
        score.new_target_bits += float(bits[is_new].double().sum())
    return score


def gap_closed(bpb: float, original: float, reference: float) -> float | None:
    """``1 - (bpb - original) / (reference - original)``; None when the reference is no worse than
    the original (no gap to close)."""
    if not reference > original:
        return None
    return 1.0 - (bpb - original) / (reference - original)


def select_docs(window_docs: list[int], n: int) -> list[int]:
    """The first ``n`` distinct documents in the order their windows were mined (a seeded order;
    see :func:`token_distillation.metrics.mine_windows`): held-out documents that contain words."""
    seen: dict[int, None] = {}
    for d in window_docs:
        seen.setdefault(int(d), None)
        if len(seen) >= n:
            break
    return list(seen)


def read_texts(texts, wanted: list[int], max_chars: int) -> dict[int, str]:
    """The clipped texts of documents ``wanted`` (corpus positions) from the corpus's text stream
    ``texts`` (in corpus order), read only as far as the last one wanted."""
    want = set(wanted)
    out: dict[int, str] = {}
    last = max(want) if want else -1
    for d, text in enumerate(texts):
        if d in want:
            out[d] = clip_text(text, max_chars)
        if d >= last:
            break
    return out


def documents_for_bpb(window_docs: list[int], n: int, texts, max_chars: int) -> tuple[list[int], list[str]]:
    """Held-out documents that contain words, with their clipped texts (empty texts dropped).

    Returns:
        ``(document positions, texts)``, in the same order.
    """
    docs = select_docs(window_docs, n)
    got = read_texts(texts, docs, max_chars)
    keep = [d for d in docs if got.get(d, "").strip()]
    return keep, [got[d] for d in keep]


@dataclass
class InflectedContext:
    """Text around one place where a new token fires inside a longer word (" agonist" in " agonists").

    Attributes:
        text: the window's text (cut at whitespace).
        start: character where the scored continuation starts: the first whitespace after the word.
        word: index of the new token (into the evaluated word list).
        doc: corpus position of the document.
    """

    text: str
    start: int
    word: int
    doc: int


def inflected_contexts(texts, docs: set[int], words: list[str], per_word: int, left_chars: int = 200,
                       right_chars: int = 400) -> list[InflectedContext]:
    """Up to ``per_word`` windows per word around its *inexact* firings (the extended tokenizer uses the
    new token inside a longer word, see :func:`token_distillation.firing.fires_inexactly`) in the
    documents ``docs`` of ``texts`` (the corpus's texts in order), for "train as you infer".

    Each window keeps about ``left_chars`` characters before the word and ``right_chars`` after it,
    cut at whitespace, and ends before the next use of any new token (so the scored text is read as
    original tokens by every model and measures how well the inflected word was read, not how well
    later new tokens are predicted); the continuation (scored by :func:`score_bytes` with
    ``starts``) begins at the first whitespace after the word that contains the firing, where every
    tokenizer starts a token.
    """
    import ahocorasick_rs

    from .firing import fires_inexactly

    if not words or per_word <= 0:
        return []
    ac = ahocorasick_rs.AhoCorasick(words, matchkind=ahocorasick_rs.MatchKind.LeftmostLongest)
    spaced, counts, out = set(words), [0] * len(words), []
    last = max(docs, default=-1)
    for d, text in enumerate(texts):
        if d > last or min(counts) >= per_word:
            break
        if d not in docs or not text:
            continue
        for pat, s, e in ac.find_matches_as_indexes(text):
            if counts[pat] >= per_word or not fires_inexactly(text, s, e, words[pat], spaced):
                continue
            end = e
            while end < len(text) and not text[end].isspace():
                end += 1
            if end >= len(text):
                continue
            a = max(0, s - left_chars)
            if a > 0:
                a = next((i + 1 for i in range(a, s) if text[i].isspace()), s)
            b = min(len(text), end + right_chars)
            nxt = next(iter(ac.find_matches_as_indexes(text[end:b])), None)
            if nxt is not None:  # stop before the next use of any new token: only original tokens are scored
                b = end + nxt[1]
            elif b < len(text):
                b = max(end + 1, text.rfind(" ", end + 1, b))
            if not text[end:b].strip():
                continue
            out.append(InflectedContext(text[a:b], end - a, pat, d))
            counts[pat] += 1
    return out
