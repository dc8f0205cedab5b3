"""Output rows by distillation (``--output_embeddings distill``): the new token as a prediction.

Token Distillation trains the new tokens' *input* rows; their *output* rows decide how likely the
extended model is to write the new token. With zero or subtoken-mean output rows that probability is
far below the teacher's probability of the word (the product of its subtokens' probabilities), so
text with the word costs more bits under the extended tokenizer. This module trains the output rows
so that the extended model predicts the word as the teacher does.

Target. At a student position ``q`` (aligned with teacher position ``a``), the teacher's probability
that the next token is the word ``w = t1 .. tk`` is

    P*(w | q) = p_T(t1 | a) * c,   c = prod_{i=2..k} p_T(t_i | a, t1 .. t_{i-1})

The completion probability ``c`` is the teacher's own wherever it matters. Where the word follows
in the snippet the teacher read it, so at the position before each occurrence P* is the teacher's
word probability exactly. At the snippet's other positions whose teacher probability of ``t1`` is at
least :data:`COMPLETION_MIN_P1`, the teacher reads ``t1 .. t(k-1)`` after the position (a forward of
``k - 1`` tokens on the snippet's key/value cache, :func:`teacher_completions`). At the remaining
positions P* is below :data:`COMPLETION_MIN_P1` whatever ``c`` is, and ``c`` is estimated by the mean
completion probability of the word's occurrences in the same snippet. (Until 2026-12-05 that
estimate was used at every position away from the word. Where ``t1`` is a common word or a letter
(" and" of " androgen", " in" of " inducible") the word's completion in its own contexts is far
above the chance that ``t1`` continues to the word elsewhere. The fitted rows then put 7.5% of each
position's probability on new tokens that did not come next: 500 SmolLM2 words, PubMed held-out
documents, ``docs/sweep/raw_text/smollm2_n500_r2/``.)

The teacher's distribution over {word} and the original vocabulary is P*(w), p_T(t1) - P*(w) for
``t1``, and p_T(v) for every other token.

Background positions. A token's own snippets were mined because they contain the word, so all of
their positions are in the word's topic; fitted on them alone, the row learns "this topic" and gives
the word too much probability in ordinary text (100 SmolLM2 words, PubMed held-out documents: the
new tokens took 2.4% of the probability at positions where they did not come next,
``docs/sweep/raw_text/smollm2_n100_r3/``). So each token also gets up to
:data:`BACKGROUND_POSITIONS` positions drawn from :data:`BACKGROUND_SNIPPETS` snippets of other
tokens (:func:`background_pool`, :func:`background_sample`; never a snippet that uses the token),
with the same kind of target: ``p_T(t1)`` times the teacher's own completion where ``p_T(t1) >=``
:data:`COMPLETION_MIN_P1`, else ``p_T(t1)`` times the ``p_T(t1)``-weighted mean of those completions
(the rate at which ``t1`` goes on to the word in that text). They carry :data:`BACKGROUND_SHARE` of
the token's objective (:func:`position_weights`), its own positions the rest, whatever their counts.
The pool's teacher and student forwards are shared by a group's tokens.

Loss. The student reads the extended sequence (trained input rows) and its final hidden state ``h``
is fixed here; only the new row ``o`` of the output layer is trained, so the student's original
tokens keep their relative probabilities and its probability of the new token is
``p = sigmoid(o . h - logsumexp(W_orig h))``. The KL divergence between the teacher's and the
student's distributions then depends on ``o`` only through ``p`` and equals, up to a constant, the
binary cross-entropy between P* and ``p``; minus its minimum (the binary entropy of P*) it is the
binary KL reported here (nats, weighted mean over a token's own and background positions, 0 when
the student matches). The problem is convex in ``o``; each token's row is fitted on its own
positions only (the loss is a sum over tokens of per-token means, and Adam is element-wise), so a
token's row does not depend on the other tokens' output rows. It does depend on which other tokens
there are: their snippets give its background positions (below), read with their trained input
rows. Other new tokens are left out of the student's normaliser.

Shared shift (``--output_rows_shift``). Each token's fit sees its own positions only, and with many
new tokens their small probabilities where they do not come add up: at 500 SmolLM2 words every new
token was about e times too probable on held-out documents, and lowering all their logits by the
same 1 nat recovered about a fifth of the excess bits per byte; at 24 and 100 words no shift helped
(``docs/sweep/output_fit_calibration.md``). After the fit, every fitted row is also scored on its
held-out positions moved by ``s * d`` for each ``s`` of :data:`SHIFT_GRID`, where ``d`` is the
direction of the final hidden states with ``h @ d ~ 1`` (:func:`shift_direction`), so the move lowers
every new token's logit by about ``s`` nats everywhere. Two held-out measures per shift are logged and
reported: the fit's own objective summed over tokens (:func:`choose_shift`; it weighs a token's
positions as the fit does, so it cannot see the tokens' probabilities add up), and the extended
model's NLL of the held-out documents' text, every token a target under the full extended softmax
(:func:`text_nll_by_shift`, the quantity bits per byte measures). ``--output_rows_shift`` applies a
given shift, or ``heldout`` the one with the lowest text NLL.

Start and prior. The fit starts from the output row of the word's first subtoken ``t1`` (the word's
probability is ``p_T(t1)`` times the completion probability, so ``t1``'s logit is the natural first
guess) and adds a quadratic penalty that pulls it back there:
``ANCHOR * mean over entries of ((o - W[t1]) / rms)^2`` per token, with ``rms`` the RMS of the
original output rows' entries (a scale-free form: the same weight for every model). A token has a few
dozen positions where its word comes against a hidden size of hundreds, so the unpenalised fit
reaches near-zero KL on its training snippets and generalises worse. On the held-out snippets of
the 24-word PubMed runs of the two bundled models the start and the penalty lowered the mean binary
KL from 0.00292 to 0.00150 nats (SmolLM2) and from 0.00242 to 0.00186 (Gemma-3); 0.03 is within 5%
of the best weight on both (every variant: ``docs/sweep/output_fit_penalty.md``). The penalty's
weight relative to the data does not change with ``--snippet_num`` (the KL is a mean per token);
with many more snippets per word a smaller weight may fit better (not measured).
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import statistics
import time
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from .alignment import MergedSequence, collate
from .fastpath import forward_to_layer, num_layers
from .interrupts import check_stop
from .report import mean
from .models import text_config
from .train import NewRows, TrainResult, autocast_context, hidden_states, output_logits, soft_cap

logger = logging.getLogger(__name__)

#: full-batch Adam steps per group of tokens (the step size is ``--token_distillation_lr_relative``
#: times the RMS of the original output rows' entries)
STEPS = 200
#: weight of the penalty ``mean(((o - W[t1]) / rms) ** 2)`` per token (see the module docstring)
ANCHOR = 0.03
#: at most this many positions x hidden entries of final hidden states are held at once (float32)
CHUNK_ENTRIES = 64 * 2**20
#: away from the word, the teacher's own completion probability is computed at the positions where it
#: gives the word's first subtoken at least this probability (elsewhere P* is below it whatever the
#: completion; see the module docstring)
COMPLETION_MIN_P1 = 1e-4
#: completions computed per forward (rows of the copied key/value cache)
COMPLETION_ROWS = 64
#: snippets of other tokens read per token group for background positions (evenly spaced over the
#: snippet list, which holds every token's snippets in turn; see the module docstring)
BACKGROUND_SNIPPETS = 32
#: background positions drawn per token from those snippets (fewer where they have fewer)
BACKGROUND_POSITIONS = 256
#: share of each token's fit objective (and reported KL) on its background positions: 0.9 measured
#: better than 0.5 in bits per byte at 100 SmolLM2 words, the same at 24 (SmolLM2, Gemma-3), with less
#: probability on the new tokens where they do not come at all three (docs/sweep/raw_text/README.md); 0.97-0.999
#: and a share from each word's corpus frequency were worse at 24 and 100 words on the documents with the words
#: (better on generic held-out text: docs/sweep/output_fit_calibration.md)
BACKGROUND_SHARE = 0.9
#: shared shifts of every new token's logit (nats) whose held-out objective is measured after the fit
#: (``--output_rows_shift``; :func:`shift_direction`, :func:`choose_shift`)
SHIFT_GRID = tuple(s / 4 for s in range(-12, 5))
#: ridge weight of :func:`shift_direction`, relative to the mean diagonal entry of ``H^T H``
SHIFT_RIDGE = 1e-3
#: held-out documents (at most, evenly spaced over the held-out snippets' tokens) whose text
#: :func:`text_nll_by_shift` scores for ``--output_rows_shift``, and their length cap in original tokens
#: (the README's bits per byte reads 100 documents of at most 4,000 characters)
TEXT_DOCS = 100
TEXT_DOC_TOKENS = 1024


@dataclass
class Positions:
    """Student positions of a group of tokens, with what the fit needs.

    Attributes:
        h: ``[n, hidden]`` float32 final hidden states (after the final norm).
        log_z: ``[n]`` logsumexp of the student's original-vocabulary logits at these positions.
        target: ``[n]`` teacher probability P* that the next token is the word.
        owner: ``[n]`` long, index of the token (into the group) whose snippet the position is in, or
            for a background position, the token it was drawn for.
        completions: positions away from the word whose target took the teacher's own completion
            probability (:func:`teacher_completions`).
        background: ``[n]`` bool, positions of other tokens' snippets (:func:`background_positions`),
            or None (none).
    """

    h: torch.Tensor
    log_z: torch.Tensor
    target: torch.Tensor
    owner: torch.Tensor
    completions: int = 0
    background: torch.Tensor | None = None

    @staticmethod
    def empty(hidden: int, device) -> "Positions":
        """No positions (``h``: ``[0, hidden]``)."""
        none = torch.zeros(0, device=device)
        return Positions(torch.zeros((0, hidden), device=device), none, none,
                         torch.zeros(0, dtype=torch.long, device=device))

    @staticmethod
    def cat(own: "Positions", bg: "Positions") -> "Positions":
        """``own`` and ``bg`` (background) in one set, each flagged in ``background``."""
        flag = torch.cat([torch.zeros(len(own.target), dtype=torch.bool, device=own.target.device),
                          torch.ones(len(bg.target), dtype=torch.bool, device=own.target.device)])
        return Positions(torch.cat([own.h, bg.h]), torch.cat([own.log_z, bg.log_z]), torch.cat([own.target, bg.target]),
                         torch.cat([own.owner, bg.owner]), own.completions + bg.completions, flag)


def _new_cache(model):
    """An empty transformers ``DynamicCache`` for ``model`` (sliding-window layers where it has them)."""
    from transformers import DynamicCache

    return DynamicCache(config=model.config)


def _occurrences(seq: MergedSequence, new_id: int, subtokens: tuple[int, ...]) -> tuple[list[tuple[int, int]], list[int]]:
    """The new token's uses in ``seq``: ``(exact, inexact)``. ``exact``: ``(q, start)`` per exact
    occurrence, ``q`` the student position before it and ``start`` the teacher position of ``t1``;
    ``inexact``: the student positions before uses inside a longer word (character alignment:
    " agonist" in " agonists"), where the teacher never read the word."""
    k, exact, inexact = len(subtokens), [], []
    for p in torch.nonzero(torch.as_tensor(seq.student_ids) == new_id).flatten().tolist():
        end = int(seq.student_to_teacher[p])
        start = end - k + 1                                 # teacher position of t1
        if p == 0 or start < 1 or tuple(seq.teacher_ids[start: end + 1].tolist()) != tuple(subtokens):
            if p > 0:
                inexact.append(p - 1)
            continue
        exact.append((p - 1, start))
    return exact, inexact


def completion_positions(lp: torch.Tensor, seq: MergedSequence, new_id: int, subtokens: tuple[int, ...],
                         occ: tuple[list[tuple[int, int]], list[int]] | None = None) -> list[tuple[int, int]]:
    """Where :func:`word_targets` takes the teacher's own completion probability (computed by
    :func:`teacher_completions`): ``(q, a)`` for every student position ``q`` away from the word's
    uses whose aligned teacher position ``a`` gives the first subtoken a probability of at least
    :data:`COMPLETION_MIN_P1`. Empty for a one-subtoken word (its completion is 1) and for a snippet
    without an exact occurrence (left out of the fit).

    Args:
        lp: ``[teacher_len, vocab]`` teacher log-probabilities over the original vocabulary.
        occ: :func:`_occurrences` of the word in ``seq`` if the caller has them (else found here).
    """
    exact, inexact = occ or _occurrences(seq, new_id, subtokens)
    if len(subtokens) < 2 or not exact:
        return []
    s2t = torch.as_tensor(seq.student_to_teacher, device=lp.device)[:-1]
    ok = (s2t >= 0) & (lp[s2t.clamp(min=0), subtokens[0]] >= math.log(COMPLETION_MIN_P1))
    ok[[q for q, _ in exact] + inexact] = False
    return [(q, int(s2t[q])) for q in torch.nonzero(ok).flatten().tolist()]


def word_targets(lp: torch.Tensor, seq: MergedSequence, new_id: int, subtokens: tuple[int, ...],
                 occ: tuple[list[tuple[int, int]], list[int]] | None = None) -> torch.Tensor:
    """P* at every student position that predicts a next token (see the module docstring).

    Args:
        lp: ``[teacher_len, vocab]`` teacher log-probabilities over the original vocabulary.
        seq: the snippet (teacher and student ids, alignment).
        new_id: the word's new id; subtokens: its original subtoken ids ``t1 .. tk``.
        occ: :func:`_occurrences` of the word in ``seq`` if the caller has them (else found here).

    Returns:
        ``[student_len - 1]`` float32 probabilities (position ``q`` predicts student token ``q + 1``):
        the teacher's word probability before each exact occurrence, ``p_T(t1)`` times the mean
        completion of those occurrences elsewhere (:func:`collect_positions` replaces it by the
        teacher's own completion at :func:`completion_positions`); NaN (left out of the fit) at
        positions with no aligned teacher position (character alignment), before a use of the new
        token inside a longer word, and everywhere in a snippet without an exact occurrence.
    """
    s2t = torch.as_tensor(seq.student_to_teacher, device=lp.device)
    k = len(subtokens)
    log_p1 = lp[s2t[:-1].clamp(min=0), subtokens[0]]        # [student_len - 1]
    exact, inexact = occ or _occurrences(seq, new_id, subtokens)
    if not exact:  # no exact occurrence: the completion probability cannot be estimated here
        return torch.full_like(log_p1, math.nan).float()
    starts = [q for q, _ in exact]
    comps = torch.stack([sum(lp[start + i - 1, subtokens[i]] for i in range(1, k)) if k > 1 else lp.new_zeros(())
                         for _, start in exact])
    est = log_p1 + torch.logsumexp(comps, 0) - math.log(len(comps))
    est[torch.tensor(starts, device=lp.device)] = log_p1[starts] + comps
    est = est.exp().float()
    if inexact:
        est[torch.tensor(inexact, device=est.device)] = math.nan
    return torch.where(s2t[:-1] >= 0, est, torch.full_like(est, math.nan))


def _cache_covers(model, length: int) -> bool:
    """Whether a key/value cache of ``length`` positions keeps every position for every layer and the
    masks of a continuation after a gap are exact: no sliding-window attention, or a window longer
    than ``length`` (Gemma-3: 512; its sliding layers keep only the last window's keys)."""
    window = getattr(text_config(model.config), "sliding_window", None)
    return not isinstance(window, int) or length < window


@torch.no_grad()
def teacher_completions(model, rows: NewRows, teacher_ids: torch.Tensor, attention: torch.Tensor, cache,
                        wanted: list[tuple[int, int, tuple[int, ...]]], pad_id: int) -> list[float]:
    """The teacher's log probability of a word's remaining subtokens ``t2 .. tk`` read after ``t1``
    at positions of a batch of teacher sequences.

    Each ``(r, a, subtokens)`` of ``wanted`` continues batch row ``r`` after its position ``a``
    with ``t1 .. t(k-1)``. With the batch's key/value cache (``cache``): the row's cached keys and
    values are copied, the positions after ``a`` masked out and the continuation run at positions
    ``a + 1 ..``, a forward of ``k - 1`` tokens per entry instead of the prefix again. Where the
    cache does not keep every position (a sliding window shorter than the sequence,
    :func:`_cache_covers`) or ``cache`` is None, the prefix and the continuation run whole. At most
    :data:`COMPLETION_ROWS` entries per forward.

    Args:
        teacher_ids, attention: ``[batch, teacher_len]`` the batch's teacher ids and attention mask.
        cache: a transformers ``Cache`` of the teacher's forward over the batch (not changed), or None.

    Returns:
        ``log prod_{i=2..k} p_T(t_i | ..a, t1 .. t_{i-1})`` per entry of ``wanted`` (nats).
    """
    out: list[float] = []
    dev, length = attention.device, attention.shape[1]
    for c0 in range(0, len(wanted), COMPLETION_ROWS):
        chunk = wanted[c0: c0 + COMPLETION_ROWS]
        n, width = len(chunk), max(len(s) for _, _, s in chunk) - 1
        r = torch.tensor([w[0] for w in chunk], device=dev)
        a = torch.tensor([w[1] for w in chunk], device=dev)
        ids = torch.full((n, width), pad_id, dtype=torch.long)
        nxt = torch.zeros((n, width), dtype=torch.long)
        used = torch.zeros((n, width), dtype=torch.bool)
        for i, (_, _, s) in enumerate(chunk):
            ids[i, : len(s) - 1] = torch.tensor(s[:-1])
            nxt[i, : len(s) - 1] = torch.tensor(s[1:])
            used[i, : len(s) - 1] = True
        ids, nxt, used = ids.to(dev), nxt.to(dev), used.to(dev)
        past = attention[r].bool() & (torch.arange(length, device=dev)[None, :] <= a[:, None])
        steps = torch.arange(width, device=dev)[None, :]
        if cache is not None and _cache_covers(model, length + width):
            c = copy.deepcopy(cache)
            c.batch_select_indices(r)
            h = forward_to_layer(model, num_layers(model), torch.cat([past, used], 1), input_ids=ids, cache=c,
                                 position_ids=a[:, None] + 1 + steps)[used]
        else:  # whole sequences: the row's prefix up to a, then the continuation, right-padded
            span = int(a.max()) + 1 + width
            cols = torch.arange(span, device=dev)[None, :]
            whole = torch.full((n, span), pad_id, dtype=torch.long, device=dev)
            m = min(span, length)
            whole[:, :m] = torch.where(past, teacher_ids[r], pad_id)[:, :m]
            at = a[:, None] + 1 + steps                          # [n, width] where the continuation goes
            whole.scatter_(1, at, torch.where(used, ids, pad_id))
            mask = (cols <= a[:, None]) | (cols < a[:, None] + 1 + used.sum(1, keepdim=True))
            h = forward_to_layer(model, num_layers(model), mask, input_ids=whole)
            h = h.gather(1, at[..., None].expand(-1, -1, h.shape[-1]))[used]
        want = nxt[used]
        tok = torch.cat([torch.log_softmax(output_logits(model, rows, h[p: p + COMPLETION_ROWS], include_new=False,
                                                         frozen=True).float(), -1)
                         .gather(1, want[p: p + COMPLETION_ROWS, None])[:, 0]
                         for p in range(0, h.shape[0], COMPLETION_ROWS)])  # [COMPLETION_ROWS, vocab] logits at a time
        owner = torch.arange(n, device=dev)[:, None].expand(n, width)[used]
        out += torch.zeros(n, device=dev).index_add_(0, owner, tok).tolist()
    return out


def _forward(model, rows: NewRows, seqs: list[MergedSequence], tix: list[int], *, device, pad_id: int):
    """One batch of snippets: ``(batch, teacher key/value cache, teacher final states [b, t_len, hidden],
    student final states [b, s_len, hidden])`` (the caller holds autocast and no_grad)."""
    batch = collate(seqs, tix, pad_id).to(device)
    cache = _new_cache(model)
    t_len = batch.teacher_ids.shape[1]
    t_last = forward_to_layer(model, num_layers(model), batch.teacher_attention, input_ids=batch.teacher_ids,
                              cache=cache, position_ids=torch.arange(t_len, device=device).expand(len(seqs), -1))
    _, s_last = hidden_states(model, None, batch.student_attention,
                              inputs_embeds=rows.embed(model, batch.student_ids), need_last=True)
    return batch, cache, t_last, s_last


def _batches(model, rows: NewRows, seqs: list[MergedSequence], token_index: list[int], indices: list[int], *,
             batch_size: int, device, pad_id: int, autocast_dtype=None, bar=None):
    """:func:`_forward` over ``indices`` (into ``seqs``) in batches of ``batch_size``, under autocast:
    yields ``(batch's indices, batch, cache, teacher final states, student final states)``; checks for a
    stop signal before every batch and advances ``bar`` after it.

    Raises:
        Interrupted: a stop signal was received."""
    for b in range(0, len(indices), batch_size):
        check_stop("during the output-row fit")
        idx = indices[b: b + batch_size]
        with autocast_context(torch.device(device), autocast_dtype):
            out = _forward(model, rows, [seqs[i] for i in idx], [token_index[i] for i in idx], device=device,
                           pad_id=pad_id)
        yield (idx, *out)
        del out  # the caller dropped its references: the batch's cache is freed before the next forward
        if bar is not None:
            bar.update(len(idx))


def _teacher_lp(model, rows: NewRows, t_last: torch.Tensor, length: int) -> torch.Tensor:
    """``[length, vocab]`` float32 teacher log-probabilities over the original vocabulary (logits in the
    weights' dtype: no float32 copy of the ``[vocab, hidden]`` output matrix)."""
    return torch.log_softmax(output_logits(model, rows, t_last[:length], include_new=False, frozen=True).float(), -1)


@torch.no_grad()
def collect_positions(model, rows: NewRows, seqs: list[MergedSequence], token_index: list[int], group: list[int],
                      subtokens: list[tuple[int, ...]], *, batch_size: int, device, pad_id: int, autocast_dtype=None,
                      bar=None, background: tuple[list[MergedSequence], list[int], list[int]] | None = None) -> Positions:
    """Final hidden states, normalisers and targets of every predicting position of the snippets of
    the tokens ``group`` (indices into the new-token list; ``owner`` indexes ``group``);
    ``subtokens[j]``: new token ``j``'s original subtoken ids; ``bar``: a progress bar advanced by
    the snippets read; ``background``: ``(snippets, token index of each, pool)``, where ``pool`` indexes
    the snippets that give each token its background positions (:func:`background_positions`), or
    None (own snippets only).

    Raises:
        Interrupted: a stop signal was received (checked before every batch).
    """
    where = {t: g for g, t in enumerate(group)}
    picked = [i for i, t in enumerate(token_index) if t in where]
    hs, zs, ts, owners, read = [], [], [], [], 0
    occ = {g: [] for g in range(len(group))}  # log completion of every exact occurrence, per token
    for idx, batch, cache, t_last, s_last in _batches(model, rows, seqs, token_index, picked, batch_size=batch_size,
                                                      device=device, pad_id=pad_id, autocast_dtype=autocast_dtype,
                                                      bar=bar):
        with autocast_context(torch.device(device), autocast_dtype):
            targets, wanted, at = [], [], []
            for r, i in enumerate(idx):
                tok, seq = token_index[i], seqs[i]
                lp = _teacher_lp(model, rows, t_last[r], len(seq.teacher_ids))
                found = _occurrences(seq, rows.token_ids[tok], subtokens[tok])  # once for the three below
                targets.append(word_targets(lp, seq, rows.token_ids[tok], subtokens[tok], found))
                occ[where[tok]] += _occurrence_completions(lp, found[0], subtokens[tok])
                for q, a in completion_positions(lp, seq, rows.token_ids[tok], subtokens[tok], found):
                    wanted.append((r, a, subtokens[tok]))
                    at.append((r, q, float(lp[a, subtokens[tok][0]])))
                del lp
            # away from the word's uses, P* = p_T(t1) times the teacher's own completion there
            logc = (teacher_completions(model, rows, batch.teacher_ids, batch.teacher_attention, cache, wanted, pad_id)
                    if wanted else [])
            del cache
        for (r, q, log_p1), c in zip(at, logc):
            targets[r][q] = math.exp(log_p1 + c)
        read += len(logc)
        for r, i in enumerate(idx):
            tok, sl = token_index[i], len(seqs[i].student_ids)
            keep = ~torch.isnan(targets[r])  # aligned positions only
            h = s_last[r, : sl - 1][keep]
            zs.append(torch.logsumexp(output_logits(model, rows, h, include_new=False).float(), -1))
            h = h.float()
            hs.append(h)
            ts.append(targets[r][keep])
            owners.append(torch.full((h.shape[0],), where[tok], dtype=torch.long, device=h.device))
    if not hs:
        own = Positions.empty(rows.rows.shape[1], device)
    else:
        own = Positions(torch.cat(hs), torch.cat(zs), torch.cat(ts), torch.cat(owners), read)
    if not background or not background[2]:
        return own
    fallback = [torch.logsumexp(torch.tensor(occ[g]), 0).item() - math.log(len(occ[g])) if occ[g] else 0.0
                for g in range(len(group))]
    bg = background_positions(model, rows, *background, group, subtokens, fallback,
                              batch_size=batch_size, device=device, pad_id=pad_id, autocast_dtype=autocast_dtype,
                              bar=bar)
    return Positions.cat(own, bg)


def _occurrence_completions(lp: torch.Tensor, exact: list[tuple[int, int]], subtokens: tuple[int, ...]) -> list[float]:
    """The teacher's log completion ``log prod_{i>=2} p_T(t_i | ..)`` at each exact occurrence
    (``exact``: :func:`_occurrences`' first list) (nats)."""
    return [float(sum(lp[start + i - 1, subtokens[i]] for i in range(1, len(subtokens)))) for _, start in exact]


def background_sample(seqs: list[MergedSequence], token_index: list[int], pool: list[int], token: int, new_id: int,
                      n: int) -> list[tuple[int, int]]:
    """``(snippet, student position)`` pairs drawn without replacement (seeded by ``token``: the same on
    every run and process) from the aligned predicting positions of the ``pool`` snippets that are not
    ``token``'s own and do not use its new id; at most ``n``."""
    cand = [(i, q) for i in pool if token_index[i] != token and new_id not in seqs[i].student_ids
            for q in range(len(seqs[i].student_ids) - 1) if seqs[i].student_to_teacher[q] >= 0]
    if len(cand) <= n:
        return cand
    order = torch.randperm(len(cand), generator=torch.Generator().manual_seed(1_000_003 + token))[:n]
    return [cand[j] for j in sorted(order.tolist())]


@torch.no_grad()
def background_positions(model, rows: NewRows, seqs: list[MergedSequence], token_index: list[int], pool: list[int],
                         group: list[int], subtokens: list[tuple[int, ...]], fallback: list[float], *,
                         batch_size: int, device, pad_id: int, autocast_dtype=None, bar=None) -> Positions:
    """Positions of other tokens' snippets for each token of ``group``: where the word does not come,
    in text not chosen for it (see the module docstring). Each token gets up to
    :data:`BACKGROUND_POSITIONS` positions of the ``pool`` snippets (:func:`background_sample`);
    the target there is ``p_T(t1)`` times the teacher's own completion where ``p_T(t1) >=``
    :data:`COMPLETION_MIN_P1`, else ``p_T(t1)`` times the ``p_T(t1)``-weighted mean of those
    completions (``fallback[g]``, the token's mean log completion at its own occurrences, where
    none was computed).

    Args:
        pool: indices into ``seqs``; fallback: per token of ``group``, a log completion (nats).

    Raises:
        Interrupted: a stop signal was received (checked before every batch).
    """
    chosen: dict[int, list[tuple[int, int]]] = {}  # snippet -> [(token of group, position)]
    for g, t in enumerate(group):
        for i, q in background_sample(seqs, token_index, pool, t, rows.token_ids[t], BACKGROUND_POSITIONS):
            chosen.setdefault(i, []).append((g, q))
    snippets = sorted(chosen)
    hs, zs, p1s, owners, logc_all, read = [], [], [], [], [], 0
    for idx, batch, cache, t_last, s_last in _batches(model, rows, seqs, token_index, snippets, batch_size=batch_size,
                                                      device=device, pad_id=pad_id, autocast_dtype=autocast_dtype,
                                                      bar=bar):
        with autocast_context(torch.device(device), autocast_dtype):
            wanted, at = [], []
            for r, i in enumerate(idx):
                s2t = seqs[i].student_to_teacher
                lp = _teacher_lp(model, rows, t_last[r], len(seqs[i].teacher_ids))
                qs = sorted({q for _, q in chosen[i]})
                z = torch.logsumexp(output_logits(model, rows, s_last[r, qs], include_new=False).float(), -1)
                row_of = {q: j for j, q in enumerate(qs)}
                for g, q in chosen[i]:
                    subs = subtokens[group[g]]
                    log_p1 = float(lp[int(s2t[q]), subs[0]])
                    hs.append(s_last[r, q].float().clone())  # not a view that keeps the batch's states
                    zs.append(z[row_of[q]])
                    p1s.append(log_p1)
                    owners.append(g)
                    logc_all.append(math.nan)
                    if len(subs) == 1:
                        logc_all[-1] = 0.0
                    elif log_p1 >= math.log(COMPLETION_MIN_P1):
                        wanted.append((r, int(s2t[q]), subs))
                        at.append(len(logc_all) - 1)
                del lp
            logc = (teacher_completions(model, rows, batch.teacher_ids, batch.teacher_attention, cache, wanted, pad_id)
                    if wanted else [])
            del cache
        for j, c in zip(at, logc):
            logc_all[j] = c
        read += len(logc)
    if bar is not None:  # pool snippets no token of the group drew: counted as read, so that every group
        bar.update(len(pool) - len(snippets))  # advances the bar by the pool's size (a resume skips exactly that)
    if not hs:
        return Positions.empty(rows.rows.shape[1], device)
    owner = torch.tensor(owners, dtype=torch.long, device=device)
    log_p1 = torch.tensor(p1s, dtype=torch.float64)
    logc = torch.tensor(logc_all, dtype=torch.float64)
    known = ~torch.isnan(logc)
    # per token: the p_T(t1)-weighted mean completion of its computed positions (a rate of the word after
    # t1 in these snippets), else its own occurrences' mean
    own = owner.cpu()
    num = torch.zeros(len(group), dtype=torch.float64).index_add_(0, own[known], (log_p1 + logc)[known].exp())
    den = torch.zeros(len(group), dtype=torch.float64).index_add_(0, own[known], log_p1[known].exp())
    rate = torch.where(den > 0, num / den.clamp(min=1e-300), torch.tensor(fallback, dtype=torch.float64).exp())
    target = torch.where(known, (log_p1 + logc.nan_to_num(0.0)).exp(), log_p1.exp() * rate[own])
    return Positions(torch.stack(hs), torch.stack(zs), target.float().to(device), owner, read)


def binary_kl(logit: torch.Tensor, log_z: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``[n]`` KL(Bernoulli(target) || Bernoulli(p)) in nats with ``p = sigmoid(logit - log_z)``."""
    u = logit - log_z
    t = target.clamp(0.0, 1.0)
    ent = -(torch.xlogy(t, t) + torch.xlogy(1 - t, 1 - t))
    return -(t * torch.nn.functional.logsigmoid(u) + (1 - t) * torch.nn.functional.logsigmoid(-u)) - ent


def _logits(model, o: torch.Tensor, pos: Positions, bias: torch.Tensor | None) -> torch.Tensor:
    """``[n]`` the new token's logit at every position (output bias and soft-capping as the model)."""
    z = (pos.h * o[pos.owner]).sum(-1)
    if bias is not None:
        z = z + bias[pos.owner]
    return soft_cap(model, z)


def position_weights(pos: Positions, n: int) -> torch.Tensor:
    """``[m]`` each position's weight in its token's objective: the token's own positions share
    ``1 - BACKGROUND_SHARE`` and its background positions :data:`BACKGROUND_SHARE`, evenly; a token
    without background positions puts all on its own; one without own positions (no snippet with an
    exact occurrence) gets weight 0 everywhere (it is not fitted, the penalty keeps its start)."""
    bg = pos.background if pos.background is not None else torch.zeros_like(pos.owner, dtype=torch.bool)
    ones = torch.ones_like(pos.target)
    n_own = torch.zeros(n, device=ones.device).index_add_(0, pos.owner[~bg], ones[~bg])
    n_bg = torch.zeros(n, device=ones.device).index_add_(0, pos.owner[bg], ones[bg])
    share = torch.where(n_bg > 0, BACKGROUND_SHARE, 0.0) * (n_own > 0)
    return torch.where(bg, (share / n_bg.clamp(min=1))[pos.owner], ((n_own > 0) * (1 - share) / n_own.clamp(min=1))[pos.owner])


def per_token_kl(model, o: torch.Tensor, pos: Positions, bias, n: int) -> torch.Tensor:
    """``[n]`` binary KL per token (nats): the weighted mean over its positions of
    :func:`position_weights` (own and background), the objective :func:`fit` minimises without the
    penalty; NaN for a token without own positions."""
    kl = binary_kl(_logits(model, o, pos, bias), pos.log_z, pos.target)
    w = position_weights(pos, n)
    sums = torch.zeros(n, device=kl.device).index_add_(0, pos.owner, kl * w)
    total = torch.zeros(n, device=kl.device).index_add_(0, pos.owner, w)
    return sums / total


def fit(model, init: torch.Tensor, pos: Positions, bias, lr: float, steps: int | None = None, *,
        anchor_weight: float = 0.0, rms: float = 1.0) -> tuple[torch.Tensor, list[float]]:
    """Fit output rows ``[n, hidden]`` from ``init`` by full-batch Adam on the sum over tokens of
    their binary KL (weighted mean over own and background positions, :func:`position_weights`;
    each row sees only its own positions) plus
    ``anchor_weight * mean(((o - init) / rms) ** 2)`` per token; ``steps``: default :data:`STEPS`.

    Returns:
        ``(rows, loss curve: the summed per-token objective at every step)``.
    """
    n, steps = init.shape[0], steps or STEPS
    start = init.detach().float()
    o = start.clone().requires_grad_(True)
    opt = torch.optim.Adam([o], lr=lr)
    weight = position_weights(pos, n)
    curve = []
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        loss = (binary_kl(_logits(model, o, pos, bias), pos.log_z, pos.target) * weight).sum()
        if anchor_weight:
            loss = loss + anchor_weight * ((o - start) / rms).pow(2).mean(-1).sum()
        loss.backward()
        opt.step()
        curve.append(float(loss.detach()))
    return o.detach(), curve


@torch.no_grad()
def shift_direction(model, rows: NewRows, seqs: list[MergedSequence], token_index: list[int], pool: list[int], *,
                    batch_size: int, device, pad_id: int, autocast_dtype=None) -> tuple[torch.Tensor, float]:
    """A direction ``d`` of the final hidden states with ``h @ d ~ 1`` at every position: ridge least
    squares over the aligned student positions of the ``pool`` snippets (indices into ``seqs``; ridge
    weight :data:`SHIFT_RIDGE` times the mean diagonal entry of ``H^T H``). Adding ``s * d`` to a new
    token's output row changes its logit by about ``s`` nats at every position (before any logit
    soft-capping); the spread says how uniform that is (SmolLM2-135M and Gemma-3-270M: a standard
    deviation of 0.047 and 0.015, docs/sweep/output_fit_calibration.md). The same on every process
    given the same snippets.

    Returns:
        ``(d: [hidden] float32, standard deviation of h @ d over those positions)``; a zero direction
        and NaN when the pool has no aligned position.

    Raises:
        Interrupted: a stop signal was received (checked before every batch).
    """
    hidden = rows.rows.shape[1]
    gram = torch.zeros((hidden, hidden), dtype=torch.float64, device=device)
    rhs = torch.zeros(hidden, dtype=torch.float64, device=device)
    states = []
    for idx, _, cache, _, s_last in _batches(model, rows, seqs, token_index, pool, batch_size=batch_size,
                                             device=device, pad_id=pad_id, autocast_dtype=autocast_dtype):
        del cache
        for r, i in enumerate(idx):
            keep = torch.as_tensor(seqs[i].student_to_teacher[: len(seqs[i].student_ids) - 1], device=device) >= 0
            h = s_last[r, : len(seqs[i].student_ids) - 1][keep].double()
            gram += h.T @ h
            rhs += h.sum(0)
            states.append(h.float())
    if not states or not sum(len(h) for h in states):
        return torch.zeros(hidden, device=device), math.nan
    ridge = SHIFT_RIDGE * float(gram.diagonal().mean()) + 1e-12
    d = torch.linalg.solve(gram + ridge * torch.eye(hidden, dtype=torch.float64, device=device), rhs)
    proj = torch.cat(states) @ d.float()
    return d.float(), float(proj.std()) if len(proj) > 1 else 0.0


def shift_documents(corpus, heldout: list, bos: list[int], max_tokens: int, n: int | None = None) -> list:
    """The held-out documents whose text :func:`text_nll_by_shift` scores: the corpus documents that
    held-out snippets were mined from (each contains a new word, none was trained on), at most ``n``
    (default :data:`TEXT_DOCS`) of them spread evenly over the snippet list (which holds every token's
    snippets in turn), each as a snippet of its first ``max_tokens`` original tokens after ``bos`` (the
    word may lie beyond them). Documents are read at their own density of new words: a held-out
    snippet has its word in every ``--snippet_len`` tokens, which asks for more probability on the
    new tokens than text does.

    Args:
        corpus: the tokenized corpus (``doc(d)``: ``[len]`` original ids), or None (no documents).
        heldout: the held-out :class:`~token_distillation.snippets.Snippet` list; generated ones
            (``doc`` -1) have no document.
    Returns:
        ``[Snippet]`` (``token_index`` of the first held-out snippet from the document); empty without a
        corpus or corpus snippets.
    """
    from .snippets import Snippet

    if corpus is None:
        return []
    first: dict[int, int] = {}
    for s in heldout:
        if s.doc >= 0 and s.doc not in first:
            first[s.doc] = s.token_index
    docs = list(first)
    picked = [docs[i] for i in background_pool([0] * len(docs), TEXT_DOCS if n is None else n)]
    out = []
    for d in picked:
        ids = np.asarray(corpus.doc(d)[:max_tokens], dtype=np.int64)
        out.append(Snippet(np.concatenate([np.asarray(bos, dtype=np.int64), ids]), first[d], d))
    return out


@torch.no_grad()
def text_nll_by_shift(model, rows: NewRows, seqs: list[MergedSequence], indices: list[int], direction: torch.Tensor,
                      shifts: tuple[float, ...], *, batch_size: int, device, pad_id: int,
                      autocast_dtype=None) -> tuple[list[float], int, list[list[float]]]:
    """The extended model's total negative log-likelihood (nats) of the text of the ``indices`` sequences
    (into ``seqs``; their student sequences, the extended tokenizer's encoding; in a run, the held-out
    documents of :func:`shift_documents`) with every new output row
    moved by ``s * direction`` ``[hidden]``, for each ``s`` of ``shifts``: every student token after the
    first is a target (original and new tokens alike) under the full extended vocabulary's softmax, as
    bits per byte scores a text (``token_distillation.evaluate``). Unlike the fit's per-token objective it
    sees the new tokens' probabilities add up at every position. One student forward per batch of
    ``batch_size`` sequences; the original vocabulary's log-normaliser is computed once per position, so every shift costs only the new
    tokens' logits ``[positions, num_new]``.

    Returns:
        ``(total NLL in nats per shift, number of scored positions, per document: its NLL per shift)``;
        the last ``[len(indices)][len(shifts)]`` in the order of ``indices`` (for a paired comparison of
        two shifts over documents, :func:`shift_gain`).

    Raises:
        Interrupted: a stop signal was received (checked before every batch).
    """
    bias = getattr(model.get_output_embeddings(), "bias", None)
    new_rows = rows.output_new().float().to(device)
    new_bias = bias[torch.tensor(rows.token_ids, device=bias.device)].float().to(device) if bias is not None else None
    d = direction.float().to(device)
    per_doc = torch.zeros(len(indices), len(shifts), dtype=torch.float64)
    shift_t = torch.tensor(shifts, dtype=torch.float32, device=device)
    n_pos = 0
    for b in range(0, len(indices), batch_size):
        check_stop("while measuring the output rows' shift")
        part = [seqs[i] for i in indices[b: b + batch_size]]
        batch = collate(part, [0] * len(part), pad_id).to(device)
        with autocast_context(torch.device(device), autocast_dtype):
            _, s_last = hidden_states(model, None, batch.student_attention,
                                      inputs_embeds=rows.embed(model, batch.student_ids), need_last=True)
        for r, seq in enumerate(part):
            n = len(seq.student_ids) - 1
            for p in range(0, n, COMPLETION_ROWS):  # bounded [rows, vocab] logits at a time
                h = s_last[r, p: min(n, p + COMPLETION_ROWS)]
                tgt = batch.student_ids[r, p + 1: p + 1 + len(h)]
                row = rows.id_to_row[tgt]
                orig = output_logits(model, rows, h, include_new=False).float()
                log_z = torch.logsumexp(orig, -1)
                at = orig.gather(1, tgt.clamp(max=orig.shape[1] - 1)[:, None])[:, 0]
                base = h.float() @ new_rows.T  # [m, num_new], before the shift
                if new_bias is not None:
                    base = base + new_bias
                hd = h.float() @ d  # [m]: how much a unit shift moves each position's new logits
                for j in range(len(shifts)):
                    z = soft_cap(model, base + shift_t[j] * hd[:, None])
                    total = torch.logaddexp(log_z, torch.logsumexp(z, -1))
                    own = torch.where(row >= 0, z.gather(1, row.clamp(min=0)[:, None])[:, 0], at)
                    per_doc[b + r, j] += float((total - own).double().sum())
                n_pos += len(h)
    return per_doc.sum(0).tolist(), n_pos, per_doc.tolist()


def shift_gain(per_doc: list[list[float]], base: int, other: int) -> tuple[float, float]:
    """How much lower the text NLL is at shift index ``other`` than at ``base``, paired over documents
    (``per_doc``: each document's NLL per shift, from :func:`text_nll_by_shift`).

    Returns:
        ``(total gain in nats, the gain in standard errors)``: the standard error is that of the summed
        per-document differences (``sqrt(n) * sd``, sample standard deviation over the ``n`` documents);
        ``(gain, 0.0)`` with fewer than two documents, ``(gain, inf)`` when every document gains the same.
    """
    diffs = [d[base] - d[other] for d in per_doc]
    gain = math.fsum(diffs)
    n = len(diffs)
    if n < 2:
        return gain, 0.0
    sd = statistics.stdev(diffs)
    if sd == 0.0:
        return gain, math.inf if gain > 0 else 0.0
    return gain, gain / (sd * math.sqrt(n))


def choose_shift(kl: dict, shifts: tuple[float, ...]) -> tuple[float, list[float]]:
    """The shift of ``shifts`` with the lowest held-out objective summed over the measured tokens
    (``kl["heldout_shift"]``: per token, its held-out binary KL at each shift, or None), and those
    sums (nats). Ties go to the shift nearest 0. No measured token: ``(0.0, [])``."""
    measured = [v for v in kl.get("heldout_shift", []) if v is not None]
    if not measured:
        return 0.0, []
    sums = [math.fsum(v[j] for v in measured) for j in range(len(shifts))]
    return lowest(sums, shifts), sums


def lowest(values: list[float], shifts: tuple[float, ...]) -> float:
    """The shift of ``shifts`` whose value (one per shift) is lowest; ties go to the shift nearest 0."""
    return float(shifts[min(range(len(shifts)), key=lambda j: (values[j], abs(shifts[j])))])


def background_pool(token_index: list[int], n: int | None = None) -> list[int]:
    """Indices of ``n`` (default :data:`BACKGROUND_SNIPPETS`) snippets evenly spaced over a snippet list
    (``token_index``: the token of each snippet; the list holds every token's snippets in turn, so the
    pool spans many tokens): the snippets that give every token its background positions. All of
    them when there are fewer; the same on every run."""
    n = BACKGROUND_SNIPPETS if n is None else n
    m = len(token_index)
    if m <= n:
        return list(range(m))
    return sorted({(2 * j + 1) * m // (2 * n) for j in range(n)})


def _groups(token_index: list[int], tokens: list[int], seq_len: int, hidden: int) -> list[list[int]]:
    """Tokens in groups whose positions' hidden states (their snippets' and :data:`BACKGROUND_POSITIONS`
    each) fit in :data:`CHUNK_ENTRIES`."""
    bg = -(-BACKGROUND_POSITIONS // max(1, seq_len))  # background positions per token, in snippets
    counts = {t: bg for t in tokens}
    for t in token_index:
        if t in counts:
            counts[t] += 1
    per_token = max(1, CHUNK_ENTRIES // max(1, seq_len * hidden))  # snippets per group
    out, cur, used = [], [], 0
    for t in tokens:
        if cur and used + counts[t] > per_token:
            out.append(cur)
            cur, used = [], 0
        cur.append(t)
        used += counts[t]
    return out + ([cur] if cur else [])


def fit_key(rows: NewRows, groups: list[list[int]], lr: float, steps: int, rms: float = 1.0,
            shifts: tuple[float, ...] | None = None) -> str:
    """SHA-256 of what the fit of ``groups`` depends on besides the frozen model and the snippets
    (which the run's checkpoint fingerprint covers): the trained input rows, the output rows before
    the fit, the groups, the step size, the steps, the penalty (:data:`ANCHOR`, ``rms``) and the shifts
    measured on held-out positions (:func:`choose_shift`). Keys a
    saved partial fit (:class:`~token_distillation.checkpoint.OutputFitProgress`)."""
    h = hashlib.sha256()
    for t in (rows.rows, rows.out_rows):
        h.update(t.detach().float().cpu().contiguous().numpy().tobytes())
    h.update(json.dumps([groups, float(lr), int(steps), "start: W[t1]", float(ANCHOR), float(rms),
                         "completion: teacher's own", float(COMPLETION_MIN_P1), "background",
                         BACKGROUND_SNIPPETS, BACKGROUND_POSITIONS, float(BACKGROUND_SHARE)]
                        + ([] if shifts is None else ["shifts", [float(s) for s in shifts], float(SHIFT_RIDGE)])
                        ).encode())
    return h.hexdigest()


def _restore_groups(rows: NewRows, saved: dict, snippet_tokens: list[int], bar, n_groups: int, pool_size: int):
    """Put a saved partial fit (:class:`~token_distillation.checkpoint.OutputFitProgress`) back:
    its fitted rows into ``rows.out_rows``, the progress bar past their snippets (``snippet_tokens``:
    token of every training and held-out snippet; ``pool_size``: background pool snippets per group,
    training and held-out). Returns ``(groups done, kl, loss curve, seconds)``."""
    with torch.no_grad():
        rows.out_rows[saved["tokens"]] = saved["rows"].to(rows.out_rows.device, rows.out_rows.dtype)
    fitted = set(saved["tokens"])
    bar.update(sum(t in fitted for t in snippet_tokens) + int(saved["groups_done"]) * pool_size)
    if saved["groups_done"] >= n_groups:
        logger.info("--resume: every output-row group (%d token(s)) was fitted before the stop", len(fitted))
    else:
        logger.info("--resume: output-row fit continues after group %d of %d (%d token(s) fitted before the stop)",
                    saved["groups_done"], n_groups, len(fitted))
    return int(saved["groups_done"]), saved["kl"], list(saved["curve"]), float(saved["seconds"])


def _fit_group(model, rows: NewRows, group: list[int], train, heldout, subtokens, kl: dict, *, head_bias,
               lr: float, steps: int, rms: float, pools: tuple, shift: tuple | None = None,
               **collect_kw) -> list[float]:
    """Fit the output rows of one group of tokens in place: collect their training and held-out
    positions (:func:`collect_positions`; background positions from ``pools``: its ``background``
    argument for the training and the held-out positions), measure the binary KL of the rows before, :func:`fit` from
    each word's first subtoken's output row, measure after, writing each token's four measures into
    ``kl`` (None where NaN); with ``shift = (direction [hidden], shifts)`` also the held-out KL of the
    fitted rows moved by ``s * direction`` for each ``s`` of ``shifts`` (``kl["heldout_shift"]``). Returns ``(the group's loss curve, positions whose target took the
    teacher's own completion, all positions, background positions)``, training and held-out together."""
    ids = torch.tensor(group, device=rows.out_rows.device)
    bias = None if head_bias is None else head_bias[torch.tensor([rows.token_ids[t] for t in group],
                                                                device=head_bias.device)].float()
    pos = collect_positions(model, rows, *train, group, subtokens, background=pools[0], **collect_kw)
    held = collect_positions(model, rows, *heldout, group, subtokens, background=pools[1], **collect_kw)
    init = rows.out_rows.detach()[ids].float()
    weight = model.get_output_embeddings().weight
    first = weight.detach()[torch.tensor([subtokens[t][0] for t in group], device=weight.device)].float()
    with torch.no_grad():
        before = (per_token_kl(model, init, pos, bias, len(group)), per_token_kl(model, init, held, bias, len(group)))
    fitted, curve = fit(model, first.to(init.device), pos, bias, lr, steps, anchor_weight=ANCHOR, rms=rms)
    with torch.no_grad():
        rows.out_rows[ids] = fitted.to(rows.out_rows.dtype)
        after = (per_token_kl(model, fitted, pos, bias, len(group)), per_token_kl(model, fitted, held, bias, len(group)))
        moved = None if shift is None else torch.stack(
            [per_token_kl(model, fitted + s * shift[0].to(fitted.device), held, bias, len(group)) for s in shift[1]], 1)
    for g, t in enumerate(group):
        for name, vals in zip(("train_before", "heldout_before", "train_after", "heldout_after"), (*before, *after)):
            v = float(vals[g])
            kl[name][t] = None if math.isnan(v) else v
        if moved is not None:
            kl["heldout_shift"][t] = None if bool(torch.isnan(moved[g]).any()) else moved[g].tolist()
    n_bg = sum(int(p.background.sum()) for p in (pos, held) if p.background is not None)
    return curve, pos.completions + held.completions, len(pos.target) + len(held.target), n_bg


def distill_output_rows(model, rows: NewRows, train: tuple[list[MergedSequence], list[int]],
                        heldout: tuple[list[MergedSequence], list[int]], tokens: list[int],
                        subtokens: list[tuple[int, ...]], *, lr: float, rms: float = 1.0,
                        batch_size: int, device, pad_id: int, autocast_dtype=None,
                        steps: int | None = None, show_progress: bool = True,
                        progress=None, background_heldout=None, shift: tuple | None = None) -> tuple[TrainResult, dict]:
    """Fit the output rows ``rows.out_rows`` of ``tokens`` (indices into the new-token list) on their
    training snippets, in place, and measure the binary KL on training and held-out snippets.

    Args:
        train, heldout: ``(merged snippets, token index of each)``.
        subtokens: every new token's original subtoken ids (indexed like the new-token list).
        lr: Adam step size.
        rms: RMS of the original output rows' entries (the scale of the penalty, see the module docstring).
        show_progress: show a progress bar over the snippets read (the forwards are most of the time).
        background_heldout: ``(merged snippets, token index of each)`` to draw the held-out background
            positions from (default ``heldout``; a token-sharded process passes every held-out snippet,
            so that the measure does not depend on the number of processes). The training background
            positions are drawn from ``train``.
        progress: an :class:`~token_distillation.checkpoint.OutputFitProgress` (or None): the fitted
            groups are saved after each group, and a resumed run starts after the last one saved
            (its rows, measures and loss curve are taken from the file; the result is the same).
        shift: ``(direction [hidden], shifts)``: also measure each token's held-out KL with its fitted
            row moved by ``s * direction`` for every ``s`` of ``shifts`` (nats;
            :func:`shift_direction`), for :func:`choose_shift`; the rows are not moved here.

    Returns:
        ``(TrainResult: loss curve summed over token groups, seconds; per-token KL dict with lists
        "train_before", "train_after", "heldout_before", "heldout_after" over all new tokens, None
        for tokens not fitted here or without held-out snippets, and with ``shift`` "heldout_shift":
        per token a list over ``shifts`` or None)``.

    Raises:
        ValueError: ``rows`` is tied (no separate output rows).
        Interrupted: a stop signal was received (checked between batches of snippets; the groups
            fitted so far are kept in ``progress``).
    """
    if rows.tied:
        raise ValueError("distill_output_rows needs untied output rows")
    t0, steps = time.perf_counter(), steps or STEPS
    n_all = rows.out_rows.shape[0]
    kl = {k: [None] * n_all for k in ("train_before", "train_after", "heldout_before", "heldout_after")
          + (("heldout_shift",) if shift is not None else ())}
    head_bias = getattr(model.get_output_embeddings(), "bias", None)
    seq_len = max((len(s.student_ids) for s in train[0]), default=1)
    curve: list[float] = []
    mine = set(tokens)
    bg_held = heldout if background_heldout is None else background_heldout
    pools = ((*train, background_pool(train[1])), (*bg_held, background_pool(bg_held[1])))
    groups = _groups(train[1], tokens, seq_len, rows.out_rows.shape[1])
    pool_size = len(pools[0][2]) + len(pools[1][2])  # pool snippets every group reads (or counts as read)
    # closed when the fit ends or a stop leaves it (the bar is not redrawn after the stop line)
    total = sum(t in mine for t in train[1]) + sum(t in mine for t in heldout[1]) + len(groups) * pool_size
    with tqdm(total=total, desc="output rows (distill)", unit="snippet", disable=not show_progress) as bar:
        kw = dict(batch_size=batch_size, device=device, pad_id=pad_id, autocast_dtype=autocast_dtype, bar=bar,
                  pools=pools)
        key = fit_key(rows, groups, lr, steps, rms, None if shift is None else shift[1]) if progress is not None else ""
        saved = progress.load(key) if progress is not None else None
        done, earlier_s, read = 0, 0.0, [0, 0, 0]
        if saved is not None:  # a resumed run: the groups fitted before the stop
            done, kl, curve, earlier_s = _restore_groups(rows, saved, train[1] + heldout[1], bar, len(groups),
                                                         pool_size)
        for gi, group in enumerate(groups):
            if gi < done:
                continue
            c, n_read, n_pos, n_bg = _fit_group(model, rows, group, train, heldout, subtokens, kl, head_bias=head_bias,
                                                lr=lr, steps=steps, rms=rms, shift=shift, **kw)
            read[0] += n_read
            read[1] += n_pos
            read[2] += n_bg
            curve = [a + b for a, b in zip(curve, c)] if curve else c
            if progress is not None:  # the last group too: a stop after the fit (held-out pass) then keeps it
                fitted = [t for grp in groups[: gi + 1] for t in grp]
                progress.save(key, {"groups_done": gi + 1, "tokens": fitted, "kl": kl, "curve": curve,
                                    "rows": rows.out_rows.detach()[fitted].float().cpu(),
                                    "seconds": earlier_s + time.perf_counter() - t0})
    seconds = earlier_s + time.perf_counter() - t0
    _log_fit(read, [len(p[2]) for p in pools], done, len(groups), len(tokens), steps, lr, kl, seconds)
    return TrainResult(loss_curve=curve, steps=steps, seconds=seconds), kl


def _log_fit(read: list[int], pool_sizes: list[int], done: int, n_groups: int, n_tokens: int, steps: int, lr: float,
             kl: dict, seconds: float) -> None:
    """The fit's two log lines: its positions (``read``: completions, all, background; ``pool_sizes``:
    training and held-out background snippets) and its result (groups ``done`` before a resume)."""
    if read[1]:
        logger.info("output rows (distill): %d of %d positions took the teacher's own completion of the word as target "
                    "(away from its uses, where the teacher's p(first subtoken) >= %g); %d of the positions are "
                    "background positions from %d + %d snippets of other tokens (%.0f%% of each token's objective)%s",
                    read[0], read[1], COMPLETION_MIN_P1, read[2], *pool_sizes,
                    100 * BACKGROUND_SHARE if read[2] else 0, f", groups {done + 1}-{n_groups}" if done else "")
    held_before, held_after = mean(kl["heldout_before"]), mean(kl["heldout_after"])
    logger.info("output rows (distill): %d tokens, %d Adam steps, step size %.3g; mean binary KL on held-out "
                "snippets %s -> %s nats in %.1f s%s", n_tokens, steps, lr,
                "n/a" if held_before is None else f"{held_before:.4g}",
                "n/a" if held_after is None else f"{held_after:.4g}", seconds,
                " (every group restored from the interrupted run's checkpoint)" if done and done == n_groups else
                f" ({done} of {n_groups} groups restored)" if done else "")


#: a token's held-out binary KL must rise by more than this share to be reported by :func:`log_worse`
WORSE_SHARE = 0.10


def log_worse(kl: dict, names: list[str], show: int = 5) -> list[int]:
    """Log the tokens whose held-out binary KL is higher after the fit than with the rows it replaced,
    by more than :data:`WORSE_SHARE` (smaller changes are within the noise of a few snippets): the
    mean can fall while a few tokens, often those with few snippets, get worse.

    Args:
        kl: the per-token dict of :func:`distill_output_rows` (lists over the new tokens, None = not measured).
        names: every new token's text (indexed like the lists in ``kl``).
        show: how many tokens to name.

    Returns:
        The indices of those tokens, largest increase first.
    """
    before, after = kl["heldout_before"], kl["heldout_after"]
    worse = [t for t in range(len(names))
             if before[t] is not None and after[t] is not None and after[t] > (1 + WORSE_SHARE) * before[t]]
    worse.sort(key=lambda t: before[t] - after[t])
    measured = sum(b is not None and a is not None for b, a in zip(before, after))
    if worse:
        logger.warning("output rows (distill): %d of %d token(s) have a held-out binary KL over %.0f%% higher after "
                       "the fit than with their rows before it (largest increases: %s); per token in report.json: "
                       "output_kl_heldout_init / _final", len(worse), measured, 100 * WORSE_SHARE,
                       ", ".join(f"{names[t]!r} {before[t]:.3g} -> {after[t]:.3g}" for t in worse[:show]))
    return worse
