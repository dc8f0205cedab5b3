"""Held-out metrics of extended models (see :mod:`token_distillation.evaluate` for their definitions):
reading extended model directories, held-out documents and windows, the teacher and student passes,
definitions and their NLL. No command line and no rendering here."""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from .alignment import MergedSequence, PhraseMatcher, collate, ids_to_str
from .config import ConfigError
from .corpus import TokenizedCorpus
from .snippets import window
from .tokenization import NewToken, bos_prefix, subtoken_ids

logger = logging.getLogger(__name__)

#: metric keys, in table order: (key, column title, better)
METRICS: list[tuple[str, str, str]] = [
    ("excess_nll_orig", "excess NLL, orig. vocab (nats/tok)", "lower"),
    ("excess_nll_full", "excess NLL, full vocab (nats/tok)", "lower"),
    ("new_token_argmax_rate", "new-token argmax rate", "lower"),
    ("mse_target", "hidden MSE @target", "lower"),
    ("cos_target", "hidden cos @target", "higher"),
    ("mse_last", "hidden MSE @last", "lower"),
    ("cos_last", "hidden cos @last", "higher"),
    ("definition_nll", "definition NLL (nats/tok)", "lower"),
    ("definition_excess_nll", "definition excess NLL", "lower"),
]


# --------------------------------------------------------------------------------------------
# Inputs: extended models and held-out documents


@dataclass
class ExtendedModel:
    """One extended model directory and what its report says.

    Attributes:
        path: the directory.
        label: display name.
        tokens: new tokens (text, original subtoken ids, new id).
        train_doc_ids: ids of documents its training snippets came from (empty for generated snippets).
        target_layer: the ``--target_layer`` flag of its run.
        report: the parsed report.json.
    """

    path: Path
    label: str
    tokens: list[NewToken]
    train_doc_ids: set[str]
    target_layer: int
    report: dict[str, Any] = field(default_factory=dict)

    @property
    def new_ids(self) -> list[int]:
        return [t.token_id for t in self.tokens]


def read_extended(path: str | Path, label: str = "") -> ExtendedModel:
    """Parse an output directory's report.json (the model itself is loaded later).

    Raises:
        ConfigError: missing or malformed report, or a corpus run whose report does not list its
            training documents (then they cannot be excluded from the held-out corpus).
    """
    d = Path(path).expanduser()
    try:
        rep = json.loads((d / "report.json").read_text(encoding="utf-8"))
        tokens = [NewToken(t["token"], tuple(int(i) for i in t["subtoken_ids"]), int(t["id"])) for t in rep["tokens"]]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"--extended_paths: {d}/report.json is unreadable or lacks the token list ({e})") from None
    if not tokens:
        raise ConfigError(f"--extended_paths: {d}/report.json lists no new tokens")
    snip = rep.get("snippets", {})
    if snip.get("source", "corpus") == "generated":
        train_docs: set[str] = set()
    elif "train_doc_ids" in snip:  # and the documents the output rows' shift was chosen on
        train_docs = {str(x) for x in snip["train_doc_ids"] + snip.get("shift_doc_ids", [])}
    else:
        raise ConfigError(f"--extended_paths: {d}/report.json does not list its training documents "
                          "(snippets.train_doc_ids); they cannot be excluded from the held-out corpus")
    cfg = rep.get("config", {})
    label = label or str(cfg.get("init_method") or d.name)
    return ExtendedModel(d, label, tokens, train_docs, int(cfg.get("target_layer", -1)), rep)


def heldout_documents(corpus: TokenizedCorpus, excluded_doc_ids: set[str]) -> np.ndarray:
    """Indices ``[num_heldout]`` of the documents whose id is not a training document id.

    Raises:
        ConfigError: every document of the corpus is a training document.
    """
    keep = np.asarray([i for i, d in enumerate(corpus.doc_ids) if d not in excluded_doc_ids], dtype=np.int64)
    if len(keep) == 0:
        raise ConfigError(f"--dataset_path: all {corpus.num_docs} documents were used to train the extended "
                          "models (report.json train_doc_ids); pass a held-out corpus disjoint from the "
                          "training documents")
    overlap = corpus.num_docs - len(keep)
    if overlap:
        logger.info("held-out corpus: %d of %d documents excluded as training documents", overlap, corpus.num_docs)
    return keep


@dataclass
class Window:
    """A held-out window around one occurrence of a word.

    Attributes:
        ids: ``[len]`` original token ids, BOS first when the tokenizer has one.
        start, end: the word's subtokens are ``ids[start:end]``.
        word: index into the evaluated word list.
        doc: corpus document index.
        doc_start: position of the word's first subtoken in the document (-1: unknown).
    """

    ids: np.ndarray
    start: int
    end: int
    word: int
    doc: int
    doc_start: int = -1

    def merged(self, new_id: int) -> MergedSequence:
        """The student sequence with only this occurrence replaced by ``new_id``."""
        student = np.concatenate([self.ids[: self.start], [new_id], self.ids[self.end:]]).astype(np.int64)
        s2t = np.concatenate([np.arange(self.start), [self.end - 1], np.arange(self.end, len(self.ids))])
        return MergedSequence(self.ids, student, s2t.astype(np.int64), self.start)


def mine_windows(corpus: TokenizedCorpus, phrases: list[tuple[int, ...]], docs: np.ndarray, window_len: int,
                 per_word: int, bos: list[int], seed: int) -> list[Window]:
    """Up to ``per_word`` windows per phrase from documents ``docs`` (visited in a seeded order).

    Each window has at least one token after the phrase (windows without a continuation are
    skipped). Matches are leftmost-longest over all phrases (as the extended tokenizer merges).
    """
    matcher = PhraseMatcher(phrases)
    order = np.random.default_rng(seed).permutation(docs)
    counts = [0] * len(phrases)
    out: list[Window] = []
    nb = len(bos)
    for d in order.tolist():
        doc = corpus.doc(d)
        for pat, s, e in matcher.find_in_str(ids_to_str(doc)):
            if counts[pat] >= per_word:
                continue
            a, b = window(len(doc), s, e, window_len)
            if b <= e:
                continue
            ids = np.concatenate([np.asarray(bos, dtype=np.int64), doc[a:b].astype(np.int64)])
            out.append(Window(ids, nb + s - a, nb + e - a, pat, d, s))
            counts[pat] += 1
        if min(counts) >= per_word:
            break
    return out


# --------------------------------------------------------------------------------------------
# Forward passes


def _vocab_mask(num_cols: int, num_original: int, excluded: list[int], device) -> torch.Tensor:
    """``[num_cols]`` bool: True for original-vocabulary columns (below ``num_original``, not excluded)."""
    mask = torch.zeros(num_cols, dtype=torch.bool, device=device)
    mask[:num_original] = True
    if excluded:
        mask[torch.tensor(excluded, device=device)] = False
    return mask


@torch.no_grad()
def _forward(model, ids: torch.Tensor, attention: torch.Tensor):
    out = model(input_ids=ids, attention_mask=attention.long(), output_hidden_states=True, use_cache=False,
                return_dict=True)
    return out.logits.float(), out.hidden_states


@dataclass
class _TeacherWindow:
    nll: torch.Tensor            # [m-1] continuation NLL, original vocabulary
    argmax: torch.Tensor         # [teacher_len] argmax at every teacher position
    hidden: dict[int, torch.Tensor]  # layer -> [m, hidden] at aligned positions


def teacher_pass(model, windows: list[Window], layers: list[int], num_original: int, excluded: list[int],
                 batch_size: int, device, pad_id: int) -> list[_TeacherWindow]:
    """Original model on the windows: continuation NLL, argmax, hidden states at aligned positions."""
    res: list[_TeacherWindow] = []
    for b in tqdm(range(0, len(windows), batch_size), desc="original model", unit="batch", leave=False):
        chunk = windows[b: b + batch_size]
        seqs = [w.merged(-1) for w in chunk]  # student ids unused here; only the alignment
        batch = collate(seqs, [0] * len(seqs), pad_id).to(device)
        logits, hs = _forward(model, batch.teacher_ids, batch.teacher_attention)
        mask = _vocab_mask(logits.shape[-1], num_original, excluded, logits.device)
        logp = torch.log_softmax(logits.masked_fill(~mask, float("-inf")), dim=-1)
        amax = logp.argmax(-1)
        for r, (w, s) in enumerate(zip(chunk, seqs)):
            pos = torch.from_numpy(s.student_to_teacher[w.start:]).to(device)
            tgt = batch.teacher_ids[r, pos[:-1] + 1]
            nll = -logp[r, pos[:-1]].gather(-1, tgt[:, None])[:, 0]
            res.append(_TeacherWindow(nll.cpu(), amax[r, : len(w.ids)].cpu(),
                                      {layer: hs[layer][r, pos].float().cpu() for layer in layers}))
    return res


class _Acc:
    """Per-word sums of a metric (pooled over positions)."""

    def __init__(self, n: int):
        self.sum = [0.0] * n
        self.count = [0] * n

    def add(self, i: int, values: torch.Tensor) -> None:
        self.sum[i] += float(values.double().sum())
        self.count[i] += int(values.numel())

    def mean(self, i: int) -> float | None:
        return self.sum[i] / self.count[i] if self.count[i] else None


@torch.no_grad()
def student_pass(model, ext: ExtendedModel, word_to_token: dict[int, int], windows: list[Window],
                 teacher: list[_TeacherWindow], layers: dict[str, int], num_original: int,
                 excluded: list[int], num_words: int, batch_size: int, device, pad_id: int) -> dict[str, _Acc]:
    """Extended model on the merged windows; returns per-word accumulators of every window metric.

    Args:
        word_to_token: evaluated word index -> index into ``ext.tokens`` (words it lacks are skipped).
        layers: ``{"target": hidden_states index, "last": hidden_states index}``.
    """
    acc = {k: _Acc(num_words) for k in ("t_nll", "s_nll_orig", "s_nll_full", "argmax_hits", "argmax_den",
                                           "mse_target", "cos_target", "mse_last", "cos_last")}
    new_ids = torch.tensor(ext.new_ids, device=device)
    id_to_first = {t.token_id: t.subtoken_ids[0] for t in ext.tokens}
    first_of_new = torch.full((int(new_ids.max()) + 1,), -1, dtype=torch.long, device=device)
    for t in ext.tokens:
        first_of_new[t.token_id] = id_to_first[t.token_id]
    idx = [i for i, w in enumerate(windows) if w.word in word_to_token]
    for b in tqdm(range(0, len(idx), batch_size), desc=f"extended model {ext.label}", unit="batch", leave=False):
        chunk = idx[b: b + batch_size]
        seqs = [windows[i].merged(ext.tokens[word_to_token[windows[i].word]].token_id) for i in chunk]
        batch = collate(seqs, [0] * len(seqs), pad_id).to(device)
        logits, hs = _forward(model, batch.student_ids, batch.student_attention)
        mask = _vocab_mask(logits.shape[-1], num_original, excluded, logits.device)
        logp_full = torch.log_softmax(logits, dim=-1)
        logp_orig = torch.log_softmax(logits.masked_fill(~mask, float("-inf")), dim=-1)
        amax = logits.argmax(-1)
        for r, (i, s) in enumerate(zip(chunk, seqs)):
            w, t = windows[i], teacher[i]
            n = len(s.student_ids)
            q = torch.arange(w.start, n, device=device)
            tgt = batch.student_ids[r, q[:-1] + 1]
            assert torch.equal(tgt.cpu(), batch.teacher_ids[r, torch.from_numpy(s.student_to_teacher[w.start:-1]).to(device) + 1].cpu())
            acc["t_nll"].add(w.word, t.nll)
            acc["s_nll_orig"].add(w.word, -logp_orig[r, q[:-1]].gather(-1, tgt[:, None]))
            acc["s_nll_full"].add(w.word, -logp_full[r, q[:-1]].gather(-1, tgt[:, None]))
            # argmax: every predicting position, aligned to the teacher's
            t_arg = t.argmax[torch.from_numpy(s.student_to_teacher[: n - 1])].to(device)
            s_arg = amax[r, : n - 1]
            focal_first = windows[i].ids[w.start]
            considered = t_arg != int(focal_first)
            s_first = torch.where(s_arg <= new_ids.max(), first_of_new[s_arg.clamp(max=int(new_ids.max()))],
                                  torch.full_like(s_arg, -1))
            spurious = torch.isin(s_arg, new_ids) & (s_first != t_arg) & considered
            acc["argmax_hits"].add(w.word, spurious.float())
            acc["argmax_den"].add(w.word, considered.float())
            for name, layer in layers.items():
                sh = hs[layer][r, q].float().cpu()
                th = t.hidden[layer]
                acc[f"mse_{name}"].add(w.word, ((sh - th) ** 2).mean(-1))
                acc[f"cos_{name}"].add(w.word, torch.nn.functional.cosine_similarity(sh, th, dim=-1))
    return acc


# --------------------------------------------------------------------------------------------
# Definitions


def definition_prompt(tokenizer, word: str, word_ids: list[int]) -> list[int]:
    """Prompt ids ``BOS + "Question: What does the word<w> mean?\\nAnswer: The word<w> means"``.

    ``word_ids`` are placed where ``<w>`` stands (the original subtokens, or the new id), so the two
    prompts differ only there. Words without a leading space are quoted.
    """
    q = "" if word[:1].isspace() else ' "'
    e = "" if word[:1].isspace() else '"'
    pieces = [subtoken_ids(tokenizer, "Question: What does the word" + q), list(word_ids),
              subtoken_ids(tokenizer, e + " mean?\nAnswer: The word" + q), list(word_ids),
              subtoken_ids(tokenizer, e + " means")]
    return bos_prefix(tokenizer) + [i for p in pieces for i in p]


@torch.no_grad()
def generate_definitions(model, tokenizer, words: list[NewToken], max_new: int, device) -> list[list[int]]:
    """Greedy definitions (original ids, cut after the first EOS) from the original tokenization,
    one prompt at a time (no padding)."""
    from .generation import generate_ids, pad_and_eos

    pad, eos = pad_and_eos(tokenizer)
    return [generate_ids(model, [definition_prompt(tokenizer, w.text, list(w.subtoken_ids))], max_new=max_new,
                         pad_id=pad, eos_id=eos, batch_size=1, device=device)[0]
            for w in tqdm(words, desc="definitions", unit="word", leave=False)]


@torch.no_grad()
def continuation_nll(model, prompts: list[list[int]], conts: list[list[int]], num_original: int | None,
                     excluded: list[int], device, pad_id: int, batch_size: int = 16) -> list[float | None]:
    """Mean NLL (nats/token) of each ``conts[i]`` after ``prompts[i]``.

    ``num_original`` None: softmax over all columns; else over the original vocabulary.
    """
    res: list[float | None] = []
    for b in range(0, len(prompts), batch_size):
        ps, cs = prompts[b: b + batch_size], conts[b: b + batch_size]
        seqs = [p + c for p, c in zip(ps, cs)]
        length = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), length), pad_id, dtype=torch.long)
        att = torch.zeros((len(seqs), length), dtype=torch.bool)
        for r, s in enumerate(seqs):
            ids[r, : len(s)] = torch.tensor(s)
            att[r, : len(s)] = True
        logits, _ = _forward(model, ids.to(device), att.to(device))
        if num_original is not None:
            logits = logits.masked_fill(~_vocab_mask(logits.shape[-1], num_original, excluded, logits.device),
                                        float("-inf"))
        logp = torch.log_softmax(logits, dim=-1)
        for r, (p, c) in enumerate(zip(ps, cs)):
            if not c:
                res.append(None)
                continue
            pos = torch.arange(len(p) - 1, len(p) + len(c) - 1, device=logp.device)
            tgt = torch.tensor(c, device=logp.device)
            res.append(float(-logp[r, pos].gather(-1, tgt[:, None]).mean()))
    return res


# --------------------------------------------------------------------------------------------
# Orchestration


def _mean(xs) -> float | None:
    vals = [x for x in xs if x is not None and not (isinstance(x, float) and math.isnan(x))]
    return sum(vals) / len(vals) if vals else None


def _unique_labels(exts: list[ExtendedModel]) -> None:
    seen: dict[str, int] = {}
    for e in exts:
        seen[e.label] = seen.get(e.label, 0) + 1
    for e in exts:
        if seen[e.label] > 1:
            e.label = f"{e.label} ({e.path.name})"


