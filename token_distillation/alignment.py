"""Teacher/student pairs: align student positions with teacher positions.

Training pairs are built by :func:`pair_texts` (character alignment): the student reads the extended
tokenizer's own encoding of a snippet's text, the teacher the original tokenizer's, and positions
whose tokens end at the same character are aligned. :func:`merge` (the id-level merge of exact
subtoken phrases, ``--alignment ids``) gives the same pairs wherever both segmentations coincide;
it also serves the metrics that score exact occurrences.

Token id sequences are searched as strings: id ``i`` becomes the character ``chr(0xE000 + i)``
(a private-use code point, above the surrogate range), so a multi-pattern matcher over strings
(``ahocorasick_rs``) finds phrases in token space with character index == token index.
Overlapping phrases resolve to the leftmost, then longest match, as the extended tokenizer does.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

import ahocorasick_rs

from .tokenization import NewToken

_CODEPOINT_OFFSET = 0xE000
_MAX_ID = 0x10FFFF - _CODEPOINT_OFFSET


def ids_to_str(ids) -> str:
    """Encode token ids ``[seq]`` as a string with one character per token."""
    arr = np.asarray(ids, dtype=np.int64)
    if arr.size and (arr.min() < 0 or arr.max() > _MAX_ID):
        raise ValueError(f"token ids must be in [0, {_MAX_ID}]")
    return (arr.astype(np.uint32) + _CODEPOINT_OFFSET).tobytes().decode("utf-32-le")


class PhraseMatcher:
    """Finds the subtoken sequences of new tokens in token-id sequences (leftmost-longest).

    Args:
        phrases: one subtoken-id sequence per pattern (each of length >= 1).
    """

    def __init__(self, phrases: list[tuple[int, ...]]):
        if not phrases:
            raise ValueError("PhraseMatcher needs at least one phrase")
        self.phrases = [tuple(p) for p in phrases]
        self._ac = ahocorasick_rs.AhoCorasick(
            [ids_to_str(p) for p in self.phrases], matchkind=ahocorasick_rs.MatchKind.LeftmostLongest
        )

    def find_in_str(self, haystack: str) -> list[tuple[int, int, int]]:
        """Non-overlapping matches ``(pattern_index, start, end)`` in an encoded string."""
        return self._ac.find_matches_as_indexes(haystack)

    def find(self, ids) -> list[tuple[int, int, int]]:
        """Non-overlapping matches ``(pattern_index, start, end)`` in a token-id sequence."""
        return self.find_in_str(ids_to_str(ids))


@dataclass
class MergedSequence:
    """A teacher sequence and its merged student counterpart.

    Attributes:
        teacher_ids: ``[teacher_len]`` original token ids.
        student_ids: ``[student_len]`` ids with every phrase replaced by its new id.
        student_to_teacher: ``[student_len]`` teacher position aligned with every student position
            (the teacher token that ends at the same character; a new token maps to the last subtoken
            of its phrase), -1 where none is (character alignment, e.g. the new token " word" in
            " words", whose teacher tokens end elsewhere).
        first_new: student position of the first new token, or -1 if none.
    """

    teacher_ids: np.ndarray
    student_ids: np.ndarray
    student_to_teacher: np.ndarray
    first_new: int


def merge(teacher_ids, matcher: PhraseMatcher, new_ids: list[int]) -> MergedSequence:
    """Replace every phrase occurrence in ``teacher_ids`` with its new token id.

    Args:
        teacher_ids: ``[seq]`` original token ids.
        matcher: matcher whose pattern ``j`` is the phrase of new id ``new_ids[j]``.
        new_ids: new token id per pattern.
    """
    t = np.asarray(teacher_ids, dtype=np.int64)
    student: list[int] = []
    s2t: list[int] = []
    first_new = -1
    pos = 0
    for pat, start, end in matcher.find(t):
        student.extend(t[pos:start].tolist())
        s2t.extend(range(pos, start))
        if first_new < 0:
            first_new = len(student)
        student.append(new_ids[pat])
        s2t.append(end - 1)
        pos = end
    student.extend(t[pos:].tolist())
    s2t.extend(range(pos, len(t)))
    return MergedSequence(t, np.asarray(student, dtype=np.int64), np.asarray(s2t, dtype=np.int64), first_new)


def expand(student_ids, new_tokens: list[NewToken]) -> np.ndarray:
    """Inverse of :func:`merge`: replace each new id by its original subtoken ids."""
    table = {nt.token_id: nt.subtoken_ids for nt in new_tokens}
    out: list[int] = []
    for i in np.asarray(student_ids).tolist():
        out.extend(table.get(i, (i,)))
    return np.asarray(out, dtype=np.int64)


@dataclass
class AlignedBatch:
    """A padded batch of teacher/student pairs with explicit masks (never derived from pad ids).

    Attributes:
        teacher_ids, teacher_attention: ``[batch, teacher_len]`` ids and bool attention mask.
        student_ids, student_attention: ``[batch, student_len]`` ids and bool attention mask.
        teacher_loss_mask: ``[batch, teacher_len]`` bool, aligned positions used in the loss.
        student_loss_mask: ``[batch, student_len]`` bool, the student positions aligned with them,
            in the same order (row-wise, both masks select the same number of positions).
        token_index: ``[batch]`` index (into the new-token list) of the token each snippet was
            mined for.
    """

    teacher_ids: torch.Tensor
    teacher_attention: torch.Tensor
    student_ids: torch.Tensor
    student_attention: torch.Tensor
    teacher_loss_mask: torch.Tensor
    student_loss_mask: torch.Tensor
    token_index: torch.Tensor

    def to(self, device) -> "AlignedBatch":
        return AlignedBatch(*(getattr(self, f).to(device) for f in self.__dataclass_fields__))


def collate(seqs: list[MergedSequence], token_index: list[int], pad_id: int = 0,
            from_start: bool = False) -> AlignedBatch:
    """Pad merged sequences on the right and build the alignment masks.

    Loss positions are the aligned student positions from the first new token on (earlier positions are
    identical in teacher and student under causal attention and contribute exactly zero), each
    paired with its teacher position. Sequences without a new token get no loss positions.
    ``from_start``: every student position of a sequence with a new token is a loss position (for
    ``--train_original_embeddings``, where the earlier positions change as well).
    """
    b = len(seqs)
    tl = max(len(s.teacher_ids) for s in seqs)
    sl = max(len(s.student_ids) for s in seqs)
    t_ids = torch.full((b, tl), pad_id, dtype=torch.long)
    s_ids = torch.full((b, sl), pad_id, dtype=torch.long)
    t_att = torch.zeros((b, tl), dtype=torch.bool)
    s_att = torch.zeros((b, sl), dtype=torch.bool)
    t_loss = torch.zeros((b, tl), dtype=torch.bool)
    s_loss = torch.zeros((b, sl), dtype=torch.bool)
    for r, s in enumerate(seqs):
        t_ids[r, : len(s.teacher_ids)] = torch.from_numpy(s.teacher_ids)
        s_ids[r, : len(s.student_ids)] = torch.from_numpy(s.student_ids)
        t_att[r, : len(s.teacher_ids)] = True
        s_att[r, : len(s.student_ids)] = True
        if s.first_new >= 0:
            start = 0 if from_start else s.first_new
            s2t = torch.from_numpy(s.student_to_teacher)
            pos = torch.nonzero(s2t[start:] >= 0).flatten() + start
            s_loss[r, pos] = True
            t_loss[r, s2t[pos]] = True
    return AlignedBatch(t_ids, t_att, s_ids, s_att, t_loss, s_loss, torch.tensor(token_index, dtype=torch.long))


def _final_ends(offsets) -> np.ndarray:
    """``[seq]`` character end of every token, or -1 where the next token ends at the same character
    (byte-fallback and multi-token characters: only the last token of a group completes the text)."""
    ends = np.maximum.accumulate(np.asarray([e for _, e in offsets], dtype=np.int64)) if len(offsets) else \
        np.zeros(0, dtype=np.int64)
    out = ends.copy()
    if len(ends) > 1:
        out[:-1][ends[:-1] == ends[1:]] = -1
    return out


def align_by_offsets(teacher_offsets, student_offsets) -> np.ndarray:
    """Student -> teacher position map of two tokenizations of the same text.

    A student position is aligned with the teacher position whose token ends at the same character
    (both have then read exactly the same text); positions with no such teacher token, and all but
    the last of several tokens ending at one character, map to -1.

    Args:
        teacher_offsets, student_offsets: ``[len, 2]`` character ``(start, end)`` of every token, as
            a fast tokenizer's ``return_offsets_mapping`` gives them.

    Returns:
        ``[student_len]`` int64 teacher positions, increasing where >= 0.
    """
    t_end, s_end = _final_ends(teacher_offsets), _final_ends(student_offsets)
    where = {int(e): i for i, e in enumerate(t_end) if e >= 0}
    return np.asarray([where.get(int(e), -1) if e >= 0 else -1 for e in s_end], dtype=np.int64)


def pair_texts(texts: list[str], original_tokenizer, extended_tokenizer, num_original: int,
               bos: list[int], batch_size: int = 512) -> list[MergedSequence]:
    """Character-aligned teacher/student pairs: the teacher reads the original tokenizer's encoding of
    each text, the student the extended tokenizer's own encoding (every way it uses a new token:
    inside longer words, at a text start, after punctuation, overlapping other new tokens), and
    positions are aligned where both tokens end at the same character (:func:`align_by_offsets`).

    Where the extended tokenizer only replaces exact subtoken phrases, the pair equals :func:`merge`'s
    (tested). ``first_new`` is the first student position holding a new id (``>= num_original``), or
    -1; the loss uses the aligned positions from there on (:func:`collate`).

    Args:
        texts: snippet texts (without BOS).
        original_tokenizer, extended_tokenizer: fast tokenizers (offsets needed) before and after the
            new tokens were added.
        num_original: size of the original vocabulary (ids at or above it are new).
        bos: ids put before both sequences (``[]`` or ``[bos_id]``), aligned with each other.

    Raises:
        ValueError: a tokenizer is not a fast tokenizer (no character offsets).
    """
    for tok in (original_tokenizer, extended_tokenizer):
        if not getattr(tok, "is_fast", False):
            raise ValueError(f"character alignment needs a fast tokenizer (offsets); {type(tok).__name__} is not one")
    nb = len(bos)
    bos_arr = np.asarray(bos, dtype=np.int64)
    out: list[MergedSequence] = []
    for b in range(0, len(texts), batch_size):
        chunk = texts[b: b + batch_size]
        kw = dict(add_special_tokens=False, return_offsets_mapping=True)
        t_enc, s_enc = original_tokenizer(chunk, **kw), extended_tokenizer(chunk, **kw)
        for t_ids, t_off, s_ids, s_off in zip(t_enc["input_ids"], t_enc["offset_mapping"], s_enc["input_ids"],
                                              s_enc["offset_mapping"]):
            s2t = align_by_offsets(t_off, s_off)
            s2t = np.concatenate([np.arange(nb, dtype=np.int64), np.where(s2t >= 0, s2t + nb, -1)])
            student = np.concatenate([bos_arr, np.asarray(s_ids, dtype=np.int64)])
            new = np.flatnonzero(student >= num_original)
            out.append(MergedSequence(np.concatenate([bos_arr, np.asarray(t_ids, dtype=np.int64)]), student, s2t,
                                      int(new[0]) if len(new) else -1))
    return out
