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

Where an extended model's extra bits go (:func:`excess_split`). The documents are cut into segments
at the characters where a token of *both* tokenizations ends; a segment is read as one or more tokens
by each model, so its bits compare directly. Segments that hold a new token are "at the words"; in
the others the extra bits split into the probability the new tokens take from the original ones
(``-log2(1 - P_new)`` per target, with ``P_new`` the extended model's total probability of the new
tokens there) and the rest (mostly the tokens read after a new token, i.e. the input rows).

An expected-cost floor for any method that adds rows and keeps the original ones (this project's
derivation; a floor on average over text drawn from the teacher, not on the bits of a given text). Where
the teacher gives the word probability ``q`` (its subtokens' product), an extended model whose
original tokens keep the teacher's relative probabilities writes the word with probability ``p`` and
every other continuation with ``(1 - p)`` times the teacher's; the word's first subtoken keeps its
mass, which the word's mass was part of. The expected extra cost at that position is
``-q log(p / q) - (1 - q) log(1 - p)``, smallest at ``p = q``, where it is ``-(1 - q) log(1 - q) ~ q``
nats. Summed over the positions where the word does not come that is about ``1 - q`` nats per
expected use of the word (``q`` where it comes): even output rows that match the teacher everywhere
leave up to log2(e) = 1.44 bits per use of a new token. ``floor_bits`` below estimates it on the
observed uses, ``log2(e) * sum(1 - q)`` with ``q`` the original model's probability of each word
segment. It assumes the teacher expects as many uses as the text has, which documents chosen because
they contain the words can exceed (the estimate is then high, and output rows can pay less on such
text: on the 24-word SmolLM2 evaluation they paid 1.01 bits per use against an estimate of 1.22); it
also takes ``-log(1 - q) ~ q`` where the word does not come, which is low where ``q`` is large there.
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
        new_mass_bits: summed ``-log2(1 - P_new)`` over the other targets, ``P_new`` the model's total
            probability of the new tokens there: what the other targets pay because new tokens take
            probability from the original ones (0 for a model without new tokens).
        docs: documents scored.
        per_doc: with ``keep_tokens``, per document the :class:`TokenBits` of its targets (not in
            :meth:`as_dict`).
    """

    bits: float = 0.0
    bytes: int = 0
    tokens: int = 0
    new_targets: int = 0
    new_target_bits: float = 0.0
    new_mass_bits: float = 0.0
    docs: int = 0
    per_doc: list | None = None

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
                "new_mass_bits": self.new_mass_bits,
                "bits_per_other_target": ((self.bits - self.new_target_bits) / (self.tokens - self.new_targets)
                                          if self.tokens > self.new_targets else None)}


@dataclass
class TokenBits:
    """One document's targets, in order.

    Attributes:
        ends: character offset where each target token ends (fast tokenizer offsets).
        bits: ``-log2 p`` of each target.
        new_mass: ``-log2(1 - P_new)`` at each target that is not a new token (0 at new-token targets).
        is_new: whether each target is a new token.
    """

    ends: list[int]
    bits: list[float]
    new_mass: list[float]
    is_new: list[bool]


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
                max_len: int = 0, starts: list[int] | None = None, keep_tokens: bool = False) -> ByteScore:
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
        keep_tokens: also keep every target's end offset and bits (``per_doc``, for :func:`excess_split`;
            needs a fast tokenizer; not with ``starts``).

    Returns:
        the totals (:class:`ByteScore`).

    Raises:
        ConfigError: the tokenizer has no BOS/EOS, or a document is longer than ``max_len`` tokens.
    """
    ctx = context_ids(tokenizer)
    if keep_tokens and starts is not None:
        raise ValueError("score_bytes: keep_tokens and starts cannot be combined")
    enc = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=starts is not None or keep_tokens)
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
                      docs=len(texts), per_doc=[None] * len(texts) if keep_tokens else None)
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
        if len(new):  # -log2(1 - P_new) = -log2 of the original tokens' share of the probability
            log_new = torch.logsumexp(logp.index_select(-1, new), -1).clamp(max=-1e-7)   # log P_new
            mass = -torch.log(-torch.expm1(log_new)) / math.log(2)
            mass = torch.where(is_new, torch.zeros_like(mass), mass)
        else:
            mass = torch.zeros_like(bits)
        score.bits += float(bits[valid].double().sum())
        score.tokens += int(valid.sum())
        score.new_targets += int(is_new.sum())
        score.new_target_bits += float(bits[is_new].double().sum())
        score.new_mass_bits += float(mass[valid].double().sum())
        if keep_tokens:
            for r, i in enumerate(rows):
                n = len(seqs[i]) - 1
                score.per_doc[i] = TokenBits([e for _, e in enc["offset_mapping"][i]], bits[r, :n].tolist(),
                                             mass[r, :n].tolist(), is_new[r, :n].tolist())
    return score


def excess_split(original: ByteScore, extended: ByteScore) -> dict:
    """Where the extended model's extra bits go, by segments of text both tokenizations end a token at
    (see the module docstring). Both scores must come from :func:`score_bytes` with ``keep_tokens`` on
    the same texts.

    Returns:
        bits (summed over the documents): ``at_words`` (segments with a new token: the extended model's
        bits minus the original's for the same characters), ``new_mass`` (other segments: what the new
        tokens' probability costs the original tokens there), ``rest`` (other segments: the remaining
        difference), ``total`` (their sum: the extended model's bits minus the original's),
        ``word_segments`` (segments with a new token), ``uses`` (new-token targets) and ``floor_bits``
        (the floor estimated in the module docstring: ``log2(e) * sum(1 - q)`` over the word segments,
        ``q = 2 ** -(the original's bits of the segment)``).

    Raises:
        ValueError: the scores were made without ``keep_tokens`` or on different documents.
    """
    if original.per_doc is None or extended.per_doc is None or len(original.per_doc) != len(extended.per_doc):
        raise ValueError("excess_split needs two scores of the same documents made with keep_tokens=True")
    out = dict.fromkeys(("at_words", "new_mass", "rest"), 0.0)
    segments, floor = 0, 0.0
    for o, e in zip(original.per_doc, extended.per_doc):
        cuts = sorted(set(o.ends) & set(e.ends))
        o_seg, e_seg = _segment_sums(o, cuts), _segment_sums(e, cuts)
        for (ob, _, _), (eb, em, has_new) in zip(o_seg, e_seg):
            if has_new:
                out["at_words"] += eb - ob
                segments += 1
                floor += -math.expm1(-ob * math.log(2))  # 1 - q
            else:
                out["new_mass"] += em
                out["rest"] += eb - ob - em
    out["total"] = sum(out.values())
    return {**out, "word_segments": segments, "uses": extended.new_targets,
            "floor_bits": floor / math.log(2)}


def _segment_sums(doc: TokenBits, cuts: list[int]) -> list[tuple[float, float, bool]]:
    """Per segment (tokens up to each cut, the last segment also taking any tokens after the last cut):
    summed bits, summed new-token mass bits, and whether a new token is among them."""
    out = [[0.0, 0.0, False] for _ in range(max(len(cuts), 1))]
    k = 0
    for end, b, m, n in zip(doc.ends, doc.bits, doc.new_mass, doc.is_new):
        while k < len(cuts) - 1 and end > cuts[k]:
            k += 1
        out[k][0] += b
        out[k][1] += m
        out[k][2] = out[k][2] or n
    return [tuple(x) for x in out]


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
