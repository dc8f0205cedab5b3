"""Held-out evaluation: how close does a model with new tokens come to the original tokenization?

``python -m token_distillation.evaluate --model_path ORIGINAL --extended_paths DIR1,DIR2,...
--dataset_path HELDOUT.jsonl --out_path eval/`` compares each extended model (an output directory
of ``apply_embedding_init.py``: model, tokenizer and ``report.json``) with the original model on the
same held-out windows and writes ``evaluation.json``, ``evaluation.md`` and ``evaluation.png``.

Held-out windows. Documents whose id is listed as a training document in any extended model's
``report.json`` (``report["snippets"]["train_doc_ids"]``) are excluded; if none is left, or a report
of a corpus run does not list its training documents, evaluation stops with a :class:`ConfigError`.
In the remaining documents, every occurrence of a word's original subtokens ``[t1..tk]`` gives a
window of ``--window_len`` original tokens (BOS first, up to a quarter left context). The teacher
reads the window; the student (an extended model) reads the same window with *only this occurrence*
replaced by the new token, so every other token, in particular the continuation after the word, is
the same original token in both sequences. Student position ``q`` maps to teacher position
``s2t[q]`` (the new token to ``tk``, see :mod:`token_distillation.alignment`).

Metrics (per new token, pooled over its windows; aggregated as the mean over tokens that every
evaluated model has):

1. ``excess_nll_orig`` / ``excess_nll_full`` (nats per token): mean NLL of the continuation tokens
   ``w[end:]`` (each predicted from the aligned position before it, the first one from the new token
   vs. ``tk``) under the extended model minus the same under the original model. ``orig``: softmax over
   the original vocabulary (new ids masked out, for the original model too); ``full``: softmax over
   the whole extended vocabulary. The gap ``full - orig`` is the probability mass new tokens take.
2. ``new_token_argmax_rate``: over all predicting positions where the original model's argmax is not
   the focal word's first subtoken ``t1``, the share where the extended model's argmax (full
   vocabulary) is a new token ``n`` whose first subtoken is not the original argmax (the tied-embedding
   failure mode of Dobler et al., arXiv 2505.20133, Sec. 5).
3. ``mse_target`` / ``cos_target`` and ``mse_last`` / ``cos_last``: MSE (mean over hidden dimensions)
   and cosine similarity between student and teacher hidden states at the model's ``--target_layer``
   and at the last layer, at the aligned positions from the new token on.
4. ``definition_nll`` (nats per token): for the prompt ``Question: What does the word <w> mean?
   Answer: The word <w> means``, the NLL under the extended model (new token in the prompt, full
   vocabulary) of the greedy definition the original model generates from the original tokenization;
   ``definition_excess_nll`` subtracts the original model's NLL of its own definition.
5. compression: tokens per held-out document with the original and with the extended tokenizer.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import sys
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from .alignment import MergedSequence, PhraseMatcher, collate, ids_to_str
from .config import ConfigError, CorpusConfig, _coerce, _flag
from .corpus import TokenizedCorpus, tokenize_corpus
from .snippets import window
from .tokenization import NewToken, bos_prefix, subtoken_ids
from .train import resolve_layer

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

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


@dataclass(frozen=True)
class EvalConfig:
    """Flags of ``python -m token_distillation.evaluate`` (defaults and help text live here)."""

    model_path: str = _flag("smollm2-135m", "The original model: hub id, local directory, .gguf file or "
                            "bundled alias (as for apply_embedding_init.py).")
    extended_paths: str = _flag("", "Comma-separated output directories of apply_embedding_init.py "
                                "(each with report.json) to evaluate against --model_path.")
    labels: str = _flag("", "Comma-separated display names, one per --extended_paths entry "
                        "(default: each report's init_method, made unique with the directory name).")
    dataset_path: str = _flag("", "Held-out corpus (jsonl, json, txt, csv, parquet, or hub id). Documents "
                              "listed as training documents in any report.json are excluded.")
    dataset_name: str = _flag("", "Dataset configuration name (hub datasets).")
    dataset_split: str = _flag("train", "Dataset split to read.")
    text_column: str = _flag("text", "Column that holds the document text.")
    max_docs: int = _flag(0, "Read at most this many documents (0: all).")
    window_len: int = _flag(50, "Held-out window length in original tokens (BOS not counted).")
    windows_per_token: int = _flag(10, "Held-out windows per new token (fewer when the corpus has fewer "
                                   "occurrences).")
    definition_tokens: int = _flag(24, "Length of the greedy definition the original model generates "
                                   "(0: skip the definition metric).")
    target_layer: int = _flag(0, "Layer for the hidden-state metrics besides the last: 0 uses each "
                              "model's --target_layer from its report.json.")
    batch_size: int = _flag(16, "Windows per forward pass.")
    device: str = _flag("auto", "Torch device: auto, cpu, cuda, cuda:1, mps.")
    dtype: str = _flag("float32", "Weights dtype for evaluation: float32, bfloat16, float16.")
    cache_dir: str = _flag("", "Cache root (converted GGUF checkpoints, tokenized corpora).")
    seed: int = _flag(42, "Seed for the order in which held-out documents are scanned.")
    out_path: str = _flag("outputs/evaluation", "Directory for evaluation.json, evaluation.md and "
                          "evaluation.png (created; existing files with these names are replaced).")

    def __post_init__(self) -> None:
        problems: list[str] = []
        if not self.paths:
            problems.append("--extended_paths is required: comma-separated output directories of "
                            "apply_embedding_init.py")
        for p in self.paths:
            d = Path(p).expanduser()
            if not (d / "report.json").is_file() or not (d / "config.json").is_file():
                problems.append(f"--extended_paths: {d} is not an output directory of apply_embedding_init.py "
                                "(needs config.json and report.json)")
        if self.labels and len(self.label_list) != len(self.paths):
            problems.append(f"--labels: {len(self.label_list)} labels for {len(self.paths)} --extended_paths")
        if not self.dataset_path:
            problems.append("--dataset_path is required: a held-out corpus")
        elif self.dataset_path.startswith((".", "/", "~")) and not Path(self.dataset_path).expanduser().exists():
            problems.append(f"--dataset_path: file or directory not found: {self.dataset_path}")
        if self.window_len < 4:
            problems.append("--window_len must be >= 4")
        if self.windows_per_token < 1:
            problems.append("--windows_per_token must be >= 1")
        if self.definition_tokens < 0:
            problems.append("--definition_tokens must be >= 0")
        if self.batch_size < 1:
            problems.append("--batch_size must be >= 1")
        if self.max_docs < 0:
            problems.append("--max_docs must be >= 0")
        if self.dtype not in DTYPES:
            problems.append(f"--dtype: unknown value {self.dtype!r}; choose one of: {', '.join(DTYPES)}")
        if problems:
            raise ConfigError(problems)

    @property
    def paths(self) -> list[str]:
        return _split_list(self.extended_paths)

    @property
    def label_list(self) -> list[str]:
        return _split_list(self.labels)

    @property
    def corpus(self) -> CorpusConfig:
        return CorpusConfig(dataset_path=self.dataset_path, dataset_name=self.dataset_name,
                            dataset_split=self.dataset_split, text_column=self.text_column, max_docs=self.max_docs)

    @classmethod
    def from_flags(cls, **flags: Any) -> "EvalConfig":
        """Validated config from flat flags (Fire passes lists/tuples for comma lists).

        Raises:
            ConfigError: unknown flags, wrong types, or invalid values (all at once).
        """
        problems: list[str] = []
        by_name = {f.name: f for f in fields(cls)}
        kw: dict[str, Any] = {}
        for name, value in flags.items():
            if name not in by_name:
                problems.append(f"unknown flag --{name}; see --help for the list of flags")
                continue
            if isinstance(value, (list, tuple)):
                value = ",".join(str(v) for v in value)
            kw[name] = _coerce(by_name[name], value, problems)
        if problems:
            raise ConfigError(problems)
        return cls(**kw)


def _split_list(value: str) -> list[str]:
    return [s.strip() for s in str(value).split(",") if s.strip()]


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
    elif "train_doc_ids" in snip:
        train_docs = {str(x) for x in snip["train_doc_ids"]}
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
    """

    ids: np.ndarray
    start: int
    end: int
    word: int
    doc: int

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
            out.append(Window(ids, nb + s - a, nb + e - a, pat, d))
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
    """Greedy definitions (original ids, cut after the first EOS) from the original tokenization."""
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    out = []
    for w in tqdm(words, desc="definitions", unit="word", leave=False):
        prompt = torch.tensor([definition_prompt(tokenizer, w.text, list(w.subtoken_ids))], device=device)
        gen = model.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                             max_new_tokens=max_new, pad_token_id=pad, eos_token_id=eos)
        ids = gen[0, prompt.shape[1]:].tolist()
        if eos is not None and eos in ids:
            ids = ids[: ids.index(eos) + 1]
        out.append(ids)
    return out


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


def evaluate(cfg: EvalConfig) -> dict[str, Any]:
    """Run the evaluation and write ``evaluation.{json,md,png}`` into ``cfg.out_path``.

    Returns:
        the result dictionary written to evaluation.json.

    Raises:
        ConfigError: bad flags, extended models not made from ``--model_path``, no held-out document
            left after excluding training documents, no window found.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .models import load_model, load_tokenizer, resolve_model_source
    from .pipeline import resolve_device

    t0 = time.perf_counter()
    device = resolve_device(cfg.device)
    dtype = DTYPES[cfg.dtype]
    cache_root = Path(cfg.cache_dir).expanduser() if cfg.cache_dir else None
    if cache_root is None:
        from .models import default_cache_root
        cache_root = default_cache_root()
    labels = cfg.label_list or [""] * len(cfg.paths)
    exts = [read_extended(p, lab) for p, lab in zip(cfg.paths, labels)]
    if not cfg.labels:
        _unique_labels(exts)
    source = resolve_model_source(cfg.model_path)
    tokenizer = load_tokenizer(source, cache_root)

    # the evaluated words: union over models, keyed by surface text; subtokens must match --model_path
    words: list[NewToken] = []
    index: dict[str, int] = {}
    problems = []
    for e in exts:
        for t in e.tokens:
            expect = tuple(subtoken_ids(tokenizer, t.text))
            if expect != t.subtoken_ids:
                problems.append(f"--extended_paths {e.path}: token {t.text!r} has subtokens {list(t.subtoken_ids)} "
                                f"in report.json but {list(expect)} with --model_path {cfg.model_path}; was it made "
                                "from another model?")
            if t.text not in index:
                index[t.text] = len(words)
                words.append(NewToken(t.text, t.subtoken_ids))
    if problems:
        raise ConfigError(problems[:5])
    excluded_docs = set().union(*(e.train_doc_ids for e in exts))

    corpus = tokenize_corpus(cfg.corpus, tokenizer, cache_root)
    docs = heldout_documents(corpus, excluded_docs)
    assert not {corpus.doc_ids[d] for d in docs.tolist()} & excluded_docs
    bos = bos_prefix(tokenizer)
    windows = mine_windows(corpus, [w.subtoken_ids for w in words], docs, cfg.window_len, cfg.windows_per_token,
                           bos, cfg.seed)
    if not windows:
        raise ConfigError(f"--dataset_path {cfg.dataset_path}: none of the {len(words)} words occurs in the "
                          f"{len(docs)} held-out documents; pass a larger held-out corpus")
    win_counts = [0] * len(words)
    for w in windows:
        win_counts[w.word] += 1
    logger.info("held-out: %d documents, %d windows for %d of %d words", len(docs), len(windows),
                sum(c > 0 for c in win_counts), len(words))

    model = load_model(source, cache_root, device, dtype)
    num_layers = resolve_layer(model, -1)
    num_original = model.get_output_embeddings().weight.shape[0]
    targets = {e.label: resolve_layer(model, cfg.target_layer or e.target_layer) for e in exts}
    layers = sorted(set(targets.values()) | {num_layers})
    all_new = sorted({i for e in exts for i in e.new_ids if i < num_original})
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    t_start = time.perf_counter()
    teacher = teacher_pass(model, windows, layers, num_original, all_new, cfg.batch_size, device, pad_id)
    definitions: list[list[int]] = []
    def_orig: list[float | None] = [None] * len(words)
    if cfg.definition_tokens:
        definitions = generate_definitions(model, tokenizer, words, cfg.definition_tokens, device)
        prompts = [definition_prompt(tokenizer, w.text, list(w.subtoken_ids)) for w in words]
        def_orig = continuation_nll(model, prompts, definitions, num_original, all_new, device, pad_id, cfg.batch_size)
    teacher_seconds = time.perf_counter() - t_start
    del model

    doc_lens = (corpus.offsets[docs + 1] - corpus.offsets[docs]).astype(np.float64)
    tokens_per_doc_before = float(doc_lens.mean())
    results: dict[str, Any] = {"methods": {}, "per_token": {}}
    for e in exts:
        t_start = time.perf_counter()
        ext_model = AutoModelForCausalLM.from_pretrained(e.path, dtype=dtype).to(device).eval()
        ext_tok = AutoTokenizer.from_pretrained(e.path)
        for t in e.tokens:
            got = ext_tok.convert_tokens_to_ids(t.text)
            if got != t.token_id:
                raise ConfigError(f"--extended_paths {e.path}: tokenizer maps {t.text!r} to {got}, report.json "
                                  f"says {t.token_id}; the directory is inconsistent")
        w2t = {index[t.text]: k for k, t in enumerate(e.tokens)}
        acc = student_pass(ext_model, e, w2t, windows, teacher, {"target": targets[e.label], "last": num_layers},
                           num_original, all_new, len(words), cfg.batch_size, device, pad_id)
        def_ext: list[float | None] = [None] * len(words)
        if cfg.definition_tokens:
            ws = sorted(w2t)
            prompts = [definition_prompt(tokenizer, words[i].text, [e.tokens[w2t[i]].token_id]) for i in ws]
            vals = continuation_nll(ext_model, prompts, [definitions[i] for i in ws], None, [], device, pad_id,
                                    cfg.batch_size)
            for i, v in zip(ws, vals):
                def_ext[i] = v
        ext_corpus = tokenize_corpus(cfg.corpus, ext_tok, cache_root)
        assert ext_corpus.doc_ids == corpus.doc_ids
        after = (ext_corpus.offsets[docs + 1] - ext_corpus.offsets[docs]).astype(np.float64)
        rows = {}
        for i in sorted(w2t):
            tnll, so, sf = acc["t_nll"].mean(i), acc["s_nll_orig"].mean(i), acc["s_nll_full"].mean(i)
            den = acc["argmax_den"].sum[i]
            tok = e.tokens[w2t[i]]
            rows[words[i].text] = {
                "token_id": tok.token_id,
                "subtokens": tokenizer.convert_ids_to_tokens(list(tok.subtoken_ids)),
                "windows": win_counts[i], "positions": acc["t_nll"].count[i],
                "nll_original": tnll, "nll_orig_vocab": so, "nll_full_vocab": sf,
                "excess_nll_orig": None if tnll is None else so - tnll,
                "excess_nll_full": None if tnll is None else sf - tnll,
                "new_token_argmax_rate": acc["argmax_hits"].sum[i] / den if den else None,
                "mse_target": acc["mse_target"].mean(i), "cos_target": acc["cos_target"].mean(i),
                "mse_last": acc["mse_last"].mean(i), "cos_last": acc["cos_last"].mean(i),
                "definition_nll": def_ext[i], "definition_nll_original": def_orig[i],
                "definition_excess_nll": None if def_ext[i] is None or def_orig[i] is None else def_ext[i] - def_orig[i],
                "row_norm": float(ext_model.get_input_embeddings().weight[tok.token_id].detach().float().norm()),
            }
        results["per_token"][e.label] = rows
        results["methods"][e.label] = {
            "path": str(e.path), "init_method": e.report.get("config", {}).get("init_method"),
            "target_layer": targets[e.label], "num_tokens": len(e.tokens),
            "tokens_per_doc_before": tokens_per_doc_before, "tokens_per_doc_after": float(after.mean()),
            "compression_ratio": float(after.sum() / doc_lens.sum()),
            "train_seconds": e.report.get("train_seconds"),
            "train_seconds_from_step": e.report.get("train_seconds_from_step", 0),
            "eval_seconds": time.perf_counter() - t_start,
        }
        del ext_model

    # aggregate over the words every model has and that have windows
    common = [w.text for i, w in enumerate(words) if win_counts[i] > 0
              and all(w.text in results["per_token"][e.label] for e in exts)]
    for e in exts:
        m = results["methods"][e.label]
        m["aggregated_over_tokens"] = len(common)
        for key, _, _ in METRICS:
            m[key] = _mean([results["per_token"][e.label][t][key] for t in common])
        m["mean_new_row_norm"] = _mean([results["per_token"][e.label][t]["row_norm"] for t in common])
    results["definitions"] = {w.text: tokenizer.decode(definitions[i]) for i, w in enumerate(words)} if definitions else {}
    results["setup"] = {
        "model_path": cfg.model_path, "model_identity": source.identity, "dataset_path": cfg.dataset_path,
        "heldout_docs": int(len(docs)), "excluded_training_docs": int(corpus.num_docs - len(docs)),
        "windows": len(windows), "window_len": cfg.window_len, "windows_per_token": cfg.windows_per_token,
        "words": len(words), "words_with_windows": int(sum(c > 0 for c in win_counts)),
        "definition_tokens": cfg.definition_tokens, "device": str(device), "dtype": cfg.dtype,
        "original_vocab_rows": num_original, "num_layers": num_layers, "seed": cfg.seed,
        "original_model_seconds": teacher_seconds, "total_seconds": time.perf_counter() - t0,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "config": dataclasses.asdict(cfg),
    }
    write_outputs(results, Path(cfg.out_path).expanduser())
    return results


# --------------------------------------------------------------------------------------------
# Outputs


def _fmt(v, digits: int = 4) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def markdown_tables(results: dict[str, Any], per_token_rows: int = 0) -> str:
    """The method table and the per-token table (sorted by the first method's excess NLL, worst first).

    Args:
        per_token_rows: show at most this many per-token rows (0: all).
    """
    methods = results["methods"]
    labels = list(methods)
    lines = ["| method | " + " | ".join(t for _, t, _ in METRICS) + " | tokens/doc before -> after | new-row norm |",
             "|---|" + "---|" * (len(METRICS) + 2)]
    for lab in labels:
        m = methods[lab]
        lines.append(f"| {lab} | " + " | ".join(_fmt(m[k]) for k, _, _ in METRICS)
                     + f" | {m['tokens_per_doc_before']:.1f} -> {m['tokens_per_doc_after']:.1f} "
                       f"({100 * (1 - m['compression_ratio']):.2f}% fewer) | {_fmt(m['mean_new_row_norm'], 3)} |")
    lines.append("")
    first = labels[0]
    per = results["per_token"]
    toks = sorted(per[first], key=lambda t: -(per[first][t]["excess_nll_full"] if per[first][t]["excess_nll_full"] is not None else -1e9))
    if per_token_rows:
        toks = toks[:per_token_rows]
    lines.append("| token | subtokens | windows | " + " | ".join(f"excess NLL full: {lab}" for lab in labels)
                 + " | " + " | ".join(f"excess NLL orig: {lab}" for lab in labels) + " |")
    lines.append("|---|---|---|" + "---|" * (2 * len(labels)))
    for t in toks:
        row = per[first][t]
        cells = [_fmt(per[lab].get(t, {}).get("excess_nll_full")) for lab in labels]
        cells += [_fmt(per[lab].get(t, {}).get("excess_nll_orig")) for lab in labels]
        lines.append(f"| `{t!r}` | {' '.join(row['subtokens'])} | {row['windows']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(results: dict[str, Any], path: Path) -> None:
    """Bar charts of the aggregated metrics, one bar per method (matplotlib, Agg backend)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(results["methods"])
    keys = [(k, t, b) for k, t, b in METRICS if any(results["methods"][lab][k] is not None for lab in labels)]
    cols = 3
    rowsn = math.ceil(len(keys) / cols)
    fig, axes = plt.subplots(rowsn, cols, figsize=(4.2 * cols, 3.2 * rowsn), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, (k, title, better) in zip(axes.flat, keys):
        vals = [results["methods"][lab][k] or 0.0 for lab in labels]
        ax.bar(range(len(labels)), vals, color=[colors[i % len(colors)] for i in range(len(labels))])
        ax.set_title(f"{title}\n({better} is better)", fontsize=9)
        ax.set_xticks(range(len(labels)))
        ax.set_xticklabels(labels, rotation=20, ha="right", fontsize=8)
        ax.axhline(0, color="black", linewidth=0.6)
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    s = results["setup"]
    fig.suptitle(f"{s['model_path']}: {s['words_with_windows']} new tokens, {s['windows']} held-out windows", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_outputs(results: dict[str, Any], out: Path) -> None:
    """Write evaluation.json, evaluation.md and evaluation.png into ``out`` (created if needed)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "evaluation.json").write_text(json.dumps(results, indent=2, ensure_ascii=False), encoding="utf-8")
    s = results["setup"]
    md = (f"# Evaluation of new tokens\n\nModel `{s['model_path']}`; held-out corpus `{s['dataset_path']}` "
          f"({s['heldout_docs']} documents, {s['excluded_training_docs']} training documents excluded); "
          f"{s['windows']} windows of {s['window_len']} tokens for {s['words_with_windows']} words; "
          f"created {s['created']}.\n\n" + markdown_tables(results) + "\n![metrics](evaluation.png)\n")
    (out / "evaluation.md").write_text(md, encoding="utf-8")
    plot(results, out / "evaluation.png")
    logger.info("wrote %s/evaluation.{json,md,png}", out)


# --------------------------------------------------------------------------------------------
# CLI


def main(**flags):
    """Evaluate extended models against the original on held-out text (see the module docstring)."""
    from .cli import configure_logging

    configure_logging()
    try:
        cfg = EvalConfig.from_flags(**flags)
        res = evaluate(cfg)
    except ConfigError as e:
        sys.stderr.write(f"error: {e}\n")
        sys.exit(2)
    return str(Path(cfg.out_path) / "evaluation.json") if res else None


def _install_signature() -> None:
    import inspect

    params, doc = [], [main.__doc__ or "", "", "Args:"]
    for f in fields(EvalConfig):
        params.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=f.default))
        doc.append(f"    {f.name}: {f.metadata['help'].replace(': ', ' - ')}")
    main.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    main.__doc__ = "\n".join(doc)


_install_signature()


def fire_main(argv: list[str] | None = None) -> None:
    """``python -m token_distillation.evaluate``: unknown flags end with exit code 2."""
    from .cli import run_fire

    run_fire(main, {f.name for f in fields(EvalConfig)}, argv, "python -m token_distillation.evaluate")


if __name__ == "__main__":
    fire_main()
