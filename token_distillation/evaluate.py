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
6. ``bpb`` (bits per byte of raw text, :mod:`token_distillation.bpb`): up to ``--bpb_docs`` held-out
   documents that contain the words, each model reading the text through its own tokenizer, every
   token a target (the new tokens too), softmax over the model's whole vocabulary; with tokens per
   byte, the bits spent on new-token targets, and ``bpb_gap_closed`` against the subtoken-mean model
   when one is evaluated (0% = subtoken mean, 100% = the original model's BPB); ``excess_split``
   (fast tokenizers) says where the extra bits go: at the words, in the probability the new tokens
   take from the original ones elsewhere, and the rest (:func:`token_distillation.bpb.excess_split`,
   beside an estimate of the expected cost any method that keeps the original rows pays, up to
   1.44 bits per use of a new token).
7. ``generation`` (:mod:`token_distillation.generation`): up to ``--gen_prompts`` prompts cut from
   held-out windows right before a word; every model samples ``--gen_tokens`` tokens (seeded,
   temperature 1); the share of continuations containing a word that write it as the new token,
   tokens per byte of the generated text, and its bits per byte under the original model.
8. ``inflected`` (bits per byte, :func:`token_distillation.bpb.inflected_contexts`): up to
   ``--inflected_per_token`` held-out windows per word where the extended tokenizer uses the new
   token *inside a longer word* (" agonist" in " agonists", which metric 1 never sees); every model
   reads the window through its own tokenizer and the text after that word is scored, with the gap
   closed against the subtoken-mean model as for 6.
"""

from __future__ import annotations

import dataclasses
import logging
import sys
import time
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .bpb import documents_for_bpb, excess_split, gap_closed, inflected_contexts, score_bytes
from .generation import continuation_bits, prompts_before_words, sample, word_stats
from .config import ConfigError, CorpusConfig, _coerce, _flag, flag_hint, hub_only_flags
from .corpus import iter_texts, tokenize_corpus
from .eval_render import markdown_tables, plot, write_outputs  # noqa: F401  (re-exported)
from .metrics import (  # noqa: F401  (re-exported: these lived here before)
    METRICS,
    ExtendedModel,
    Window,
    continuation_nll,
    definition_prompt,
    generate_definitions,
    heldout_documents,
    mine_windows,
    read_extended,
    student_pass,
    teacher_pass,
    _mean,
    _unique_labels,
)
from .paper_tables import split_list
from .models import context_length
from .paths import claim_script_dir, read_manifest
from .tokenization import NewToken, bos_prefix, subtoken_ids
from .train import resolve_layer

logger = logging.getLogger(__name__)

#: what the evaluation writes into --out_path
OUT_FILES = ("evaluation.json", "evaluation.md", "evaluation.png")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}



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
    dataset_name: str = _flag("", "Dataset configuration name (hub datasets; refused with a local --dataset_path).")
    dataset_split: str = _flag("train", "Dataset split to read (hub datasets; a local --dataset_path is read whole, so "
                                        "another split is refused there).")
    text_column: str = _flag("text", "Column that holds the document text.")
    max_docs: int = _flag(0, "Read at most this many documents (0: all).")
    window_len: int = _flag(50, "Held-out window length in original tokens (BOS not counted).")
    windows_per_token: int = _flag(10, "Held-out windows per new token (fewer when the corpus has fewer "
                                   "occurrences).")
    definition_tokens: int = _flag(24, "Length of the greedy definition the original model generates "
                                   "(0: skip the definition metric).")
    target_layer: int = _flag(0, "Layer for the hidden-state metrics besides the last: 0 uses each "
                              "model's --target_layer from its report.json.")
    bpb_docs: int = _flag(100, "Held-out documents that contain the words, scored in bits per byte of raw "
                          "text (each model through its own tokenizer; 0: skip).")
    bpb_max_chars: int = _flag(4000, "Characters of each document read for bits per byte (cut at a "
                               "whitespace; 0: whole documents).")
    inflected_per_token: int = _flag(10, "Held-out windows per new token where the extended tokenizer uses it inside "
                                     "a longer word (' agonist' in ' agonists'); the text after that word is "
                                     "scored in bits per byte by every model (0: skip).")
    gen_prompts: int = _flag(50, "Prompts (held-out text right before a word) for sampled generation: does "
                             "each model write the new token? (0: skip).")
    gen_tokens: int = _flag(16, "Tokens sampled after each generation prompt.")
    batch_size: int = _flag(16, "Windows per forward pass.")
    device: str = _flag("auto", "Torch device: auto, cpu, cuda, cuda:1, mps.")
    dtype: str = _flag("float32", "Weights dtype for evaluation: float32, bfloat16, float16.")
    cache_dir: str = _flag("", "Cache root (converted GGUF checkpoints, tokenized corpora).")
    seed: int = _flag(42, "Seed for the order in which held-out documents are scanned.")
    out_path: str = _flag("outputs/evaluation", "Directory for evaluation.json, evaluation.md and "
                          "evaluation.png: new, empty or an earlier evaluation's (whose files are replaced); a "
                          "directory holding other files is refused.")

    def __post_init__(self) -> None:
        problems: list[str] = []
        if not self.paths:
            problems.append("--extended_paths is required: comma-separated output directories of "
                            "apply_embedding_init.py")
        for p in self.paths:
            d = Path(p).expanduser()
            if (read_manifest(d) or {}).get("kind") == "dry-run":
                problems.append(f"--extended_paths: {d} is the output of a --dry_run (no model in it); pass the "
                                "output directory of a real run")
            elif not (d / "report.json").is_file() or not (d / "config.json").is_file():
                problems.append(f"--extended_paths: {d} is not an output directory of apply_embedding_init.py "
                                "(needs config.json and report.json)")
        if self.labels and len(self.label_list) != len(self.paths):
            problems.append(f"--labels: {len(self.label_list)} labels for {len(self.paths)} --extended_paths")
        if not self.dataset_path:
            problems.append("--dataset_path is required: a held-out corpus")
        elif self.dataset_path.startswith((".", "/", "~")) and not Path(self.dataset_path).expanduser().exists():
            problems.append(f"--dataset_path: file or directory not found: {self.dataset_path}")
        else:
            hub_only_flags(self.dataset_path, self.dataset_split, self.dataset_name, problems)
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
        if self.inflected_per_token < 0:
            problems.append("--inflected_per_token must be >= 0")
        if self.bpb_docs < 0 or self.bpb_max_chars < 0:
            problems.append("--bpb_docs and --bpb_max_chars must be >= 0")
        if self.gen_prompts < 0 or self.gen_tokens < 1:
            problems.append("--gen_prompts must be >= 0 and --gen_tokens >= 1")
        if self.dtype not in DTYPES:
            problems.append(f"--dtype: unknown value {self.dtype!r}; choose one of: {', '.join(DTYPES)}")
        if problems:
            raise ConfigError(problems)

    @property
    def paths(self) -> list[str]:
        return split_list(self.extended_paths)

    @property
    def label_list(self) -> list[str]:
        return split_list(self.labels)

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
                problems.append(f"unknown flag --{name}{flag_hint(name, by_name)}; see --help for the list of flags")
                continue
            if isinstance(value, (list, tuple)):
                value = ",".join(str(v) for v in value)
            kw[name] = _coerce(by_name[name], value, problems)
        if problems:
            raise ConfigError(problems)
        return cls(**kw)


@dataclass
class _Original:
    """What the original model gives every extended model: held-out windows and their teacher pass."""

    tokenizer: Any
    words: list[NewToken]
    index: dict[str, int]
    corpus: Any
    docs: np.ndarray
    windows: list
    win_counts: list[int]
    teacher: Any
    num_layers: int
    num_original: int
    targets: dict[str, int]
    all_new: list[int]
    pad_id: int
    definitions: list[list[int]]
    def_orig: list[float | None]
    seconds: float
    bpb_texts: list[str]
    bpb_score: Any  # the original's ByteScore (per-token bits kept for excess_split), None when not measured
    prompts: list[str]
    generated: Any
    inflected: list = dataclasses.field(default_factory=list)  # InflectedContext windows
    inflected_score: dict | None = None

    @property
    def bpb(self) -> dict | None:
        """The original model's bits-per-byte totals (JSON-ready), None when not measured."""
        return self.bpb_score.as_dict() if self.bpb_score else None


def evaluate(cfg: EvalConfig) -> dict[str, Any]:
    """Run the evaluation and write ``evaluation.{json,md,png}`` into ``cfg.out_path``.

    Returns:
        the result dictionary written to evaluation.json.

    Raises:
        ConfigError: bad flags, extended models not made from ``--model_path``, no held-out document
            left after excluding training documents, no window found.
    """
    from .models import default_cache_root, resolve_model_source
    from .pipeline import resolve_device

    t0 = time.perf_counter()
    # before any work: --out_path is new, empty or an earlier evaluation (a user's files are never replaced)
    claim_script_dir(cfg.out_path, "token_distillation.evaluate", list(OUT_FILES), flag="--out_path")
    device = resolve_device(cfg.device)
    cache_root = Path(cfg.cache_dir).expanduser() if cfg.cache_dir else default_cache_root()
    labels = cfg.label_list or [""] * len(cfg.paths)
    exts = [read_extended(p, lab) for p, lab in zip(cfg.paths, labels)]
    if not cfg.labels:
        _unique_labels(exts)
    source = resolve_model_source(cfg.model_path)
    other_source(exts, source)
    sets = {e.label: frozenset(t.text for t in e.tokens) for e in exts}
    differ = {lab: len(v) for lab, v in sets.items()} if len(set(sets.values())) > 1 else None
    if differ:
        logger.warning("the extended models have different new tokens (%s); per-token means use the common ones, "
                       "bits per byte, inflected forms and generation compare different token sets (e.g. a token "
                       "skipped by one run for too few snippets)", ", ".join(f"{k}: {v}" for k, v in differ.items()))
    orig = _original_pass(cfg, source, exts, cache_root, device)
    results: dict[str, Any] = {"methods": {}, "per_token": {}, "token_sets_differ": differ}
    for e in exts:
        results["per_token"][e.label], results["methods"][e.label] = _score_extended(cfg, e, orig, cache_root, device)
    _aggregate(results, orig, exts)
    _generation_quality(cfg, results, orig, source, cache_root, device)
    docs, corpus, words = orig.docs, orig.corpus, orig.words
    results["definitions"] = ({w.text: orig.tokenizer.decode(orig.definitions[i]) for i, w in enumerate(words)}
                              if orig.definitions else {})
    results["setup"] = {
        "model_path": cfg.model_path, "model_identity": source.identity, "dataset_path": cfg.dataset_path,
        "heldout_docs": int(len(docs)), "excluded_training_docs": int(corpus.num_docs - len(docs)),
        "windows": len(orig.windows), "window_len": cfg.window_len, "windows_per_token": cfg.windows_per_token,
        "words": len(words), "words_with_windows": int(sum(c > 0 for c in orig.win_counts)),
        "definition_tokens": cfg.definition_tokens, "device": str(device), "dtype": cfg.dtype,
        "original_vocab_rows": orig.num_original, "num_layers": orig.num_layers, "seed": cfg.seed,
        "original_model_seconds": orig.seconds, "total_seconds": time.perf_counter() - t0,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "config": dataclasses.asdict(cfg),
    }
    write_outputs(results, Path(cfg.out_path).expanduser())
    return results


def evaluated_words(model_path: str, exts: list[ExtendedModel], tokenizer) -> tuple[list[NewToken], dict[str, int]]:
    """The union of the models' words in first-seen order, and each word's index in it (keyed by
    surface text); their subtokens must be what ``tokenizer`` (of ``model_path``) gives.

    Raises:
        ConfigError: a word whose report.json subtokens differ (the model was made from another model).
    """
    words: list[NewToken] = []
    index: dict[str, int] = {}
    problems = []
    for e in exts:
        for t in e.tokens:
            expect = tuple(subtoken_ids(tokenizer, t.text))
            if expect != t.subtoken_ids:
                problems.append(f"--extended_paths {e.path}: token {t.text!r} has subtokens {list(t.subtoken_ids)} "
                                f"in report.json but {list(expect)} with --model_path {model_path}; was it made "
                                "from another model?")
            if t.text not in index:
                index[t.text] = len(words)
                words.append(NewToken(t.text, t.subtoken_ids))
    if problems:
        raise ConfigError(problems[:5])
    return words, index


def _original_pass(cfg: EvalConfig, source, exts: list[ExtendedModel], cache_root: Path, device) -> _Original:
    """Held-out windows (training documents excluded), the original model's teacher pass over them
    and, when asked, its definitions of the words and their NLL."""
    from .models import load_model, load_tokenizer

    tokenizer = load_tokenizer(source, cache_root)
    words, index = evaluated_words(cfg.model_path, exts, tokenizer)
    excluded_docs = set().union(*(e.train_doc_ids for e in exts))
    corpus = tokenize_corpus(cfg.corpus, tokenizer, cache_root)
    docs = heldout_documents(corpus, excluded_docs)
    assert not {corpus.doc_ids[d] for d in docs.tolist()} & excluded_docs
    windows = mine_windows(corpus, [w.subtoken_ids for w in words], docs, cfg.window_len, cfg.windows_per_token,
                           bos_prefix(tokenizer), cfg.seed)
    if not windows:
        raise ConfigError(f"--dataset_path {cfg.dataset_path}: none of the {len(words)} words occurs in the "
                          f"{len(docs)} held-out documents; pass a larger held-out corpus")
    win_counts = [0] * len(words)
    for w in windows:
        win_counts[w.word] += 1
    logger.info("held-out: %d documents, %d windows for %d of %d words", len(docs), len(windows),
                sum(c > 0 for c in win_counts), len(words))
    model = load_model(source, cache_root, device, DTYPES[cfg.dtype])
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
    bpb_texts, bpb_score = _original_bpb(cfg, model, tokenizer, windows, device)
    prompts = prompts_before_words(windows, corpus, tokenizer, cfg.gen_prompts) if cfg.gen_prompts else []
    generated = sample(model, tokenizer, prompts, cfg.gen_tokens, cfg.seed, device, num_original) if prompts else None
    inflected = (inflected_contexts(iter_texts(cfg.corpus), set(docs.tolist()), [w.text for w in words],
                                    cfg.inflected_per_token) if cfg.inflected_per_token else [])
    inflected_score = _inflected_score(model, tokenizer, inflected, device, ())
    if inflected:
        logger.info("inflected forms: %d held-out window(s) for %d word(s); original %.4f bits per byte after the word",
                    len(inflected), len({c.word for c in inflected}), inflected_score["bpb"])
    return _Original(tokenizer, words, index, corpus, docs, windows, win_counts, teacher, num_layers, num_original,
                     targets, all_new, pad_id, definitions, def_orig, time.perf_counter() - t_start, bpb_texts,
                     bpb_score, prompts, generated, inflected, inflected_score)


def _inflected_score(model, tokenizer, contexts: list, device, new_ids) -> dict | None:
    """Bits per byte of the text after each inflected form (:func:`~token_distillation.bpb.inflected_contexts`),
    the model reading the window through its own tokenizer; None without windows."""
    if not contexts:
        return None
    return score_bytes(model, tokenizer, [c.text for c in contexts], device, new_ids=new_ids, max_len=_max_len(model),
                       starts=[c.start for c in contexts]).as_dict()


def other_source(exts: list[ExtendedModel], source) -> list[str]:
    """Warn about extended models whose report names another original model than ``--model_path``
    (their ``model.identity`` differs from ``source.identity``: other weights, or the same weights
    at another path); returns their labels. Every comparison here assumes one original model."""
    odd = []
    for e in exts:
        made = e.report.get("model") or {}
        if made.get("identity") and made["identity"] != source.identity:
            odd.append(e.label)
            logger.warning("--extended_paths %s was made from %s, not from --model_path %s; the comparison holds only "
                           "if both are the same weights (pass the run's --model_path)", e.path,
                           made.get("source", "another model"), source.spec)
    return odd


def _max_len(model) -> int:
    return int(context_length(model.config) or 0)


def _original_bpb(cfg: EvalConfig, model, tokenizer, windows: list[Window], device) -> tuple[list[str], Any]:
    """The documents scored in bits per byte (held-out, containing words) and the original model's
    :class:`~token_distillation.bpb.ByteScore` (per-token bits kept when the tokenizer is fast)."""
    if not cfg.bpb_docs:
        return [], None
    _, texts = documents_for_bpb([w.doc for w in windows], cfg.bpb_docs, iter_texts(cfg.corpus), cfg.bpb_max_chars)
    score = score_bytes(model, tokenizer, texts, device, max_len=_max_len(model), keep_tokens=tokenizer.is_fast)
    logger.info("bits per byte on %d held-out document(s) with the words: original %.4f%s", len(texts), score.bpb,
                f" (--bpb_docs {cfg.bpb_docs}: only {len(texts)} held-out document(s) contain the words)"
                if len(texts) < cfg.bpb_docs else "")
    return texts, score


def _score_extended(cfg: EvalConfig, e: ExtendedModel, o: _Original, cache_root: Path, device) -> tuple[dict, dict]:
    """Per-token metrics and the method's summary for one extended model."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t_start = time.perf_counter()
    ext_model = AutoModelForCausalLM.from_pretrained(e.path, dtype=DTYPES[cfg.dtype]).to(device).eval()
    ext_tok = AutoTokenizer.from_pretrained(e.path)
    for t in e.tokens:
        got = ext_tok.convert_tokens_to_ids(t.text)
        if got != t.token_id:
            raise ConfigError(f"--extended_paths {e.path}: tokenizer maps {t.text!r} to {got}, report.json "
                              f"says {t.token_id}; the directory is inconsistent")
    w2t = {o.index[t.text]: k for k, t in enumerate(e.tokens)}
    acc = student_pass(ext_model, e, w2t, o.windows, o.teacher, {"target": o.targets[e.label], "last": o.num_layers},
                       o.num_original, o.all_new, len(o.words), cfg.batch_size, device, o.pad_id)
    def_ext: list[float | None] = [None] * len(o.words)
    if cfg.definition_tokens:
        ws = sorted(w2t)
        prompts = [definition_prompt(o.tokenizer, o.words[i].text, [e.tokens[w2t[i]].token_id]) for i in ws]
        vals = continuation_nll(ext_model, prompts, [o.definitions[i] for i in ws], None, [], device, o.pad_id,
                                cfg.batch_size)
        for i, v in zip(ws, vals):
            def_ext[i] = v
    bpb = None
    if o.bpb_texts:
        keep = o.bpb_score.per_doc is not None and ext_tok.is_fast
        score = score_bytes(ext_model, ext_tok, o.bpb_texts, device, new_ids=e.new_ids, max_len=_max_len(ext_model),
                            keep_tokens=keep)
        bpb = score.as_dict()
        if keep:
            bpb["excess_split"] = excess_split(o.bpb_score, score)
    inflected = _inflected_score(ext_model, ext_tok, o.inflected, device, e.new_ids)
    gen = sample(ext_model, ext_tok, o.prompts, cfg.gen_tokens, cfg.seed, device, o.num_original) if o.prompts else None
    ext_corpus = tokenize_corpus(cfg.corpus, ext_tok, cache_root)
    assert ext_corpus.doc_ids == o.corpus.doc_ids
    doc_lens = (o.corpus.offsets[o.docs + 1] - o.corpus.offsets[o.docs]).astype(np.float64)
    after = (ext_corpus.offsets[o.docs + 1] - ext_corpus.offsets[o.docs]).astype(np.float64)
    rows = {}
    for i in sorted(w2t):
        tnll, so, sf = acc["t_nll"].mean(i), acc["s_nll_orig"].mean(i), acc["s_nll_full"].mean(i)
        den = acc["argmax_den"].sum[i]
        tok = e.tokens[w2t[i]]
        d_orig = o.def_orig[i]
        rows[o.words[i].text] = {
            "token_id": tok.token_id,
            "subtokens": o.tokenizer.convert_ids_to_tokens(list(tok.subtoken_ids)),
            "windows": o.win_counts[i], "positions": acc["t_nll"].count[i],
            "nll_original": tnll, "nll_orig_vocab": so, "nll_full_vocab": sf,
            "excess_nll_orig": None if tnll is None else so - tnll,
            "excess_nll_full": None if tnll is None else sf - tnll,
            "new_token_argmax_rate": acc["argmax_hits"].sum[i] / den if den else None,
            "mse_target": acc["mse_target"].mean(i), "cos_target": acc["cos_target"].mean(i),
            "mse_last": acc["mse_last"].mean(i), "cos_last": acc["cos_last"].mean(i),
            "definition_nll": def_ext[i], "definition_nll_original": d_orig,
            "definition_excess_nll": None if def_ext[i] is None or d_orig is None else def_ext[i] - d_orig,
            "row_norm": float(ext_model.get_input_embeddings().weight[tok.token_id].detach().float().norm()),
        }
    method = {
        "path": str(e.path), "init_method": e.report.get("config", {}).get("init_method"),
        "target_layer": o.targets[e.label], "num_tokens": len(e.tokens),
        "tokens_per_doc_before": float(doc_lens.mean()), "tokens_per_doc_after": float(after.mean()),
        "compression_ratio": float(after.sum() / doc_lens.sum()),
        "train_seconds": e.report.get("train_seconds"),
        "train_seconds_from_step": e.report.get("train_seconds_from_step", 0),
        "eval_seconds": time.perf_counter() - t_start, "bpb": bpb, "inflected": inflected,
        "generation": word_stats(gen, [w.text for w in o.words], [_id_of(e, w.text) for w in o.words]) if gen else None,
        "generated": gen,
    }
    return rows, method


def _id_of(e: ExtendedModel, text: str) -> int | None:
    return next((t.token_id for t in e.tokens if t.text == text), None)


def _generation_quality(cfg: EvalConfig, results: dict[str, Any], o: _Original, source, cache_root: Path,
                        device) -> None:
    """Bits per byte of every model's generated text under the original model (reloaded once), and
    the original model's own generation statistics; the generated texts go to ``results["samples"]``."""
    from .models import load_model

    gens = {lab: m.pop("generated") for lab, m in results["methods"].items()}
    if o.generated is None:
        return
    model = load_model(source, cache_root, device, DTYPES[cfg.dtype])
    gens = {"original": o.generated, **gens}
    orig_stats = word_stats(o.generated, [w.text for w in o.words], [None] * len(o.words))
    for lab, gen in gens.items():
        bits, nbytes = continuation_bits(model, o.tokenizer, o.prompts, gen.texts, device)
        stats = orig_stats if lab == "original" else results["methods"][lab]["generation"]
        stats["original_bpb"] = bits / nbytes if nbytes else None
    results["generation_original"] = orig_stats
    results["samples"] = [{"prompt": p, **{lab: g.texts[k] for lab, g in gens.items()}}
                          for k, p in enumerate(o.prompts)]


def _aggregate(results: dict[str, Any], o: _Original, exts: list[ExtendedModel]) -> None:
    """Method means over the words every model has and that have windows."""
    common = [w.text for i, w in enumerate(o.words) if o.win_counts[i] > 0
              and all(w.text in results["per_token"][e.label] for e in exts)]
    for e in exts:
        m = results["methods"][e.label]
        m["aggregated_over_tokens"] = len(common)
        for key, _, _ in METRICS:
            m[key] = _mean([results["per_token"][e.label][t][key] for t in common])
        m["mean_new_row_norm"] = _mean([results["per_token"][e.label][t]["row_norm"] for t in common])
    _bpb_gap(results, o, exts)


def _bpb_gap(results: dict[str, Any], o: _Original, exts: list[ExtendedModel]) -> None:
    """``bpb_original`` and each method's ``bpb_gap_closed`` against the first subtoken-mean model."""
    results["bpb_original"] = o.bpb
    results["inflected_original"] = o.inflected_score
    ref = next((e.label for e in exts if e.report.get("config", {}).get("init_method") == "subtoken-mean"), None)
    results["bpb_reference"] = ref
    for e in exts:
        m = results["methods"][e.label]
        for key, orig in (("bpb", o.bpb), ("inflected", o.inflected_score)):
            if m.get(key) and orig and ref:
                m[key]["gap_closed"] = gap_closed(m[key]["bpb"], orig["bpb"], results["methods"][ref][key]["bpb"])


# --------------------------------------------------------------------------------------------
# Outputs



# --------------------------------------------------------------------------------------------
# The command


def main(**flags):
    """Evaluate extended models against the original on held-out text: the held-out distillation loss
    and next-token metrics on windows before the words, bits per byte of raw documents that contain
    them, text after inflected forms, sampled generation and definitions. Writes evaluation.json,
    evaluation.md and evaluation.png to --out_path. Every metric: docs/usage.md, section "Evaluation"."""
    from .cli import configure_logging, error_text

    configure_logging()
    try:
        cfg = EvalConfig.from_flags(**flags)
        res = evaluate(cfg)
    except ConfigError as e:
        sys.stderr.write(error_text(e))
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
