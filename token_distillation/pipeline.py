"""``run(config)``: the stages of a run, in README order.

1. resolve device, dtype and seed; check the output path (nothing is loaded yet)
2. load the tokenizer; build the new-token list
3. snippets: mine the corpus, or generate them with the model
4. load the model; extend tokenizer and embedding matrix
5. initialise the new rows; train them (Token Distillation)
6. write the rows, set untied output rows, save model + tokenizer + report.json atomically

Stages 2-6 on a tokenizer already loaded are :func:`distill_stages`, the core shared by the command
line (:func:`run`: loads from ``--model_path`` first, saves to ``--out_path``) and the Python API
(:func:`token_distillation.distill`: a model and tokenizer in memory, saved only when asked).
"""

from __future__ import annotations

import contextlib
import copy
import functools
import logging
import math
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .alignment import MergedSequence, PhraseMatcher, merge, pair_texts
from .checkpoint import (
    CHECKPOINT_DIRNAME,
    Checkpointer,
    GeneratedSnippetCache,
    HeldoutBefore,
    OutputFitProgress,
    check_resumable,
    check_training_inputs,
    list_digest,
    fingerprint,
    heldout_before_key,
    shard_prefix,
    prepare_output,
    snippet_digest,
)
from .config import (
    AUTO_SHIFT,
    AUTO_SHIFT_MIN_DOCS,
    AUTO_SHIFT_SE,
    HELDOUT,
    Alignment,
    ConfigError,
    explicit_shift,
    InitMethod,
    MixedPrecision,
    OutputEmbeddings,
    Recipe,
    RunConfig,
    SnippetSource,
    StoppingCondition,
)
from .corpus import (ScanResult, check_text_column, check_words_occur, resolved_num_proc, scan_corpus, scan_texts,
                     words_absent)
from .distributed import DistContext, assign_tokens, check_distributable, inject_faults, launched_world_size
from .fastpath import TeacherCache
from .firing import encode_probes, firing_report, overfiring_words
from .init_methods import INITIALISERS, TRAINED, subtoken_mean
from .export import (ADAPTER_DIRNAME, GGUF_NAME, check_adapter_possible, check_gguf_possible, check_peft_available,
                     write_gguf, write_peft_adapter)
from .interrupts import Interrupted, check_stop, deferred_signals, signal_name, stop_point
from .memory import (
    AUTO_BATCH_CAP,
    MemoryPlan,
    check_fits,
    choose_batch_size,
    count_parameters,
    plan_memory,
    resident_bytes,
)
from .models import (
    check_context_length,
    check_saveable,
    context_length,
    embedding_scale,
    extend_embeddings,
    is_tied,
    load_config,
    load_model,
    load_tokenizer,
    resolve_model_source,
    set_new_output_bias,
    text_config,
    untie_embeddings,
    weights_path,
)
from .paths import ModelSource, check_cache_dir, check_local_weights, write_output_dir
from .regime import entry_rms, relative_lr
from .report import (
    build_report,
    dry_run_report,
    gap_closed_estimate,
    save_output,
    write_json,
    write_target_files,
)
from .snippets import Firings, SnippetMiner, SnippetSet, add_inexact_snippets, generate_snippets, top_up
from .targets import (
    TargetList,
    build_targets,
    coverage_table,
    log_summary,
    new_token_records,
    read_target_wordlist,
)
from .tokenization import NewToken, add_new_tokens, bos_prefix
from .output_rows import (SHIFT_GRID, TEXT_DOC_TOKENS, background_pool, choose_shift, distill_output_rows,
                          log_worse, lowest, shift_direction, shift_documents, shift_gain, text_nll_by_shift)
from .train import NewRows, HeldoutResult, TrainResult, heldout_eval, resolve_layer, train, train_output_rows

logger = logging.getLogger(__name__)


@dataclass
class RunResult:
    """What :func:`run` produced: the output directory and the report written into it."""

    out_path: Path
    report: dict[str, Any] = field(default_factory=dict)


@dataclass
class Distilled:
    """What :func:`distill_stages` produced: the extended model and tokenizer, the report (the
    content of report.json) and the directory it was saved to (None: not saved)."""

    model: Any
    tokenizer: Any
    report: dict[str, Any]
    out_path: Path | None = None


def resolve_device(spec: str) -> torch.device:
    """``auto`` -> cuda if available, else mps if available, else cpu.

    Raises:
        ConfigError: a cuda, mps or xpu device this machine does not have (before any model is loaded).
    """
    if spec == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    dev = torch.device(spec)
    available = {"cuda": torch.cuda.is_available,
                 "mps": lambda: getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available(),
                 "xpu": lambda: hasattr(torch, "xpu") and torch.xpu.is_available()}.get(dev.type)
    if available is not None and not available():
        raise ConfigError(f"--device {spec}: {dev.type.upper()} is not available on this machine; use --device cpu or "
                          "auto")
    return dev


def resolve_precision(mp: MixedPrecision, device: torch.device,
                      source_dtype: torch.dtype = torch.float32) -> tuple[torch.dtype, torch.dtype | None]:
    """(weights dtype, autocast dtype or None).

    Weights: on CUDA in the source checkpoint's dtype (``source_dtype``: bf16/fp16 checkpoints stay
    16-bit, so an 8B model takes ~16 GB, and the originals are never re-rounded); on CPU in fp32
    (16-bit CPU kernels are slow), cast back to the source dtype when saved. Autocast: bf16 on CUDA
    by default, none on CPU. Only the trainable rows and their optimizer state are fp32 everywhere.

    Raises:
        ConfigError: ``--mixed_precision fp16`` (training the new rows under fp16 autocast would need a
            gradient scaler, which this tool does not use).
    """
    if mp == MixedPrecision.FP16:
        raise ConfigError("--mixed_precision fp16: training under fp16 autocast needs a gradient scaler, which this "
                          "tool does not use; pass bf16 (GPUs since Ampere) or no (fp32). An fp16 checkpoint is fine: "
                          "it is loaded and saved in fp16 either way")
    if mp == MixedPrecision.AUTO:
        mp = MixedPrecision.BF16 if device.type == "cuda" else MixedPrecision.NO
    weights = source_dtype if device.type == "cuda" else torch.float32
    return weights, (torch.bfloat16 if mp == MixedPrecision.BF16 else None)


def source_dtype(model_config) -> torch.dtype:
    """The dtype the checkpoint's weights are stored in (its config's ``dtype`` / ``torch_dtype``;
    float32 when the config does not say, as for a dequantized GGUF file)."""
    for cfg in (model_config, text_config(model_config)):
        value = getattr(cfg, "dtype", None) or getattr(cfg, "torch_dtype", None)
        if isinstance(value, str):
            value = getattr(torch, value.removeprefix("torch."), None)
        if isinstance(value, torch.dtype) and value.is_floating_point:
            return value
    return torch.float32


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def pair_snippets(snips, ext: "Extended", alignment: Alignment):
    """Teacher/student pairs of ``snips`` and the token index of each: ``([MergedSequence], [int])``.

    ``chars``: the snippet's text (its original ids decoded) read by the original and the extended
    tokenizer, aligned by character offsets (:func:`~token_distillation.alignment.pair_texts`);
    ``ids``: the id-level merge of exact subtoken phrases (:func:`~token_distillation.alignment.merge`).
    """
    tokens = ext.tokens
    if alignment == Alignment.IDS or ext.original_tokenizer is None:
        matcher = PhraseMatcher([t.subtoken_ids for t in tokens])
        new_ids = [t.token_id for t in tokens]
        return [merge(s.ids, matcher, new_ids) for s in snips], [s.token_index for s in snips]
    bos = bos_prefix(ext.original_tokenizer)
    nb = len(bos)
    texts = ext.original_tokenizer.batch_decode([s.ids[nb:].tolist() if list(s.ids[:nb]) == bos else s.ids.tolist()
                                                 for s in snips], skip_special_tokens=False,
                                                clean_up_tokenization_spaces=False)
    seqs = pair_texts(texts, ext.original_tokenizer, ext.tokenizer, ext.n_orig, bos)
    return seqs, [s.token_index for s in snips]


def _reindex(snips: SnippetSet, keep: list[int]) -> SnippetSet:
    """Keep only snippets of tokens in ``keep`` and renumber their token indices."""
    new_index = {old: new for new, old in enumerate(keep)}
    out = SnippetSet(train_docs=snips.train_docs, heldout_docs=snips.heldout_docs,
                     train_counts=[snips.train_counts[k] for k in keep],
                     heldout_counts=[snips.heldout_counts[k] for k in keep])
    for src, dst in ((snips.train, out.train), (snips.heldout, out.heldout)):
        for s in src:
            if s.token_index in new_index:
                s.token_index = new_index[s.token_index]
                dst.append(s)
    return out


@dataclass
class Setup:
    """Stage 1: what the run is and where it runs (nothing loaded yet)."""

    cfg: RunConfig
    source: ModelSource
    out: Path | None  # None: nothing is saved (the Python API without out_path)
    dist: DistContext
    device: torch.device
    weights_dtype: torch.dtype
    autocast_dtype: torch.dtype | None
    cache_root: Path
    started: float
    save_dtype: torch.dtype = torch.float32  # the source checkpoint's dtype (known once its config is read)
    batch_size: int | str = 16  # --token_distillation_batch_size; "auto" until the memory plan resolves it
    shard: bool = False  # several processes, each training its own tokens (distributed.shards_tokens)
    dist_info: dict | None = None  # for report.json: how the work was split over the processes
    snippet_source: SnippetSource = SnippetSource.GENERATED  # --snippet_source resolved (texts in memory: corpus)
    model: Any = None  # the model once loaded (the Python API passes it in)
    checkpoints: bool = True  # training writes checkpoints into <out>/checkpoints (not the Python API)
    generated: GeneratedSnippetCache | None = None  # snippets the model wrote, kept for --resume
    wordlist: list[str] | None = None  # --new_tokens_source word list, read once at start-up (warnings logged once)

    @property
    def words_digest(self) -> str | None:
        """:func:`~token_distillation.checkpoint.list_digest` of the word list (checkpoint fingerprint), or None."""
        return None if self.wordlist is None else list_digest(self.wordlist)

    def get_model(self):
        """The model: the one passed in or loaded earlier, else loaded from ``--model_path`` now."""
        if self.model is None:
            self.model = load_model(self.source, self.cache_root, self.device, self.weights_dtype)
        return self.model


@dataclass
class Targets:
    """Stage 2: the tokenizer, the new-token list (before the snippet filter) and the corpus."""

    tokenizer: Any
    targets: TargetList
    records: list[dict]
    summary: dict
    corpus: Any  # the documents read (ShardedCorpus), or None without a corpus
    model_config: Any = None
    mined: SnippetSet | None = None  # snippets mined while the corpus was scanned
    scan: ScanResult | None = None


@dataclass
class Snippets:
    """Stage 3: training / held-out snippets of the kept tokens (those with enough of them)."""

    snips: SnippetSet
    tokens: list[NewToken]
    sources: list[str]
    skipped: dict[str, str]
    corpus_info: dict
    scan_ids: Any
    model: Any = None  # loaded already when snippets were generated
    overfiring: dict | None = None  # over-firing words counted while snippets were collected (chars)
    shift_docs: list = field(default_factory=list)  # held-out documents for --output_rows_shift (shift_documents)


@dataclass
class Extended:
    """Stage 4: the model and tokenizer with the new tokens, and the new rows to train."""

    model: Any
    tokenizer: Any
    tokens: list[NewToken]
    rows: NewRows
    layer: int
    num_original: int
    n_orig: int
    tied_source: bool
    tied: bool
    out_policy: OutputEmbeddings | None
    scale: float
    firing: dict
    plan: MemoryPlan | None = None
    original_tokenizer: Any = None  # a copy made before the new tokens were added (character alignment)


@dataclass
class Trained:
    """Stage 5: training results and the held-out measures before and after."""

    result: TrainResult | None
    out_result: TrainResult | None
    lr: float | None
    held_before: list
    held_after: list
    argmax_before: dict
    argmax_after: dict
    not_improved: list[str]
    out_kl: dict | None = None


def run(cfg: RunConfig, wordlist: list[str] | None = None) -> RunResult:
    """Run the whole pipeline for a validated config: the six stages of the module docstring.
    ``wordlist``: the ``--new_tokens_source`` list when the caller has read it already
    (:func:`~token_distillation.targets.read_target_wordlist`; the command line does, before torch loads).

    From the new rows' creation until the output is saved, stop signals are deferred (see
    :mod:`token_distillation.interrupts`): training checkpoints the current step before stopping.

    Raises:
        ConfigError: bad input found after start-up checks (e.g. no usable tokens, no snippets),
            or a failed save (the trained rows are kept; the message says how to recover).
        Interrupted: a stop signal (a checkpoint was written when training had started).
    """
    setup = start(cfg, wordlist)
    tokenizer, model_config = load_inputs(setup)
    if cfg.output.dry_run:
        return dry_run(setup, build_target_list(setup, tokenizer, model_config))
    done = distill_stages(setup, tokenizer, model_config)
    if done is None:  # the rows are identical on every process; the main process saved them
        return RunResult(setup.out, {})
    return RunResult(done.out_path, done.report)


def distill_stages(setup: Setup, tokenizer, model_config, words: list[str] | None = None,
                   texts=None) -> Distilled | None:
    """Stages 2-6 on a loaded tokenizer: the core of :func:`run` and of the Python API.

    The model is ``setup.model`` or loaded when first needed (:meth:`Setup.get_model`); it and
    ``tokenizer`` are extended in place. The output is saved only when ``setup.out`` is set.

    Args:
        words: the new tokens (default: built by ``--build_target_method``).
        texts: documents in memory to mine (see :func:`token_distillation.corpus.scan_texts`);
            default: ``--dataset_path``.
    Returns:
        the result on the main process; None on the others.
    """
    targets = build_target_list(setup, tokenizer, model_config, words, texts)
    snippets = gather_snippets(setup, targets)
    extended = extend_model(setup, targets, snippets)
    with deferred_signals() as stop:
        trained = train_new_rows(setup, snippets, extended)
        if not setup.dist.is_main:
            setup.dist.close()
            return None
        with stop_point("once the output is saved (the save in progress is finished first)"):
            report = finish(setup, targets, snippets, extended, trained)
            out = write_output(setup, targets, extended, report) if setup.out is not None else None
        if stop.requested:
            logger.warning("%s arrived while the output was being finished: the run completed%s",
                           signal_name(stop.signum), f" and {out} is complete" if out else "")
    setup.dist.close()
    report["total_seconds"] = time.perf_counter() - setup.started
    closed = gap_closed_estimate(report["mean_heldout_loss_init"], report["mean_heldout_loss_final"])
    fmt = lambda v: "n/a" if v is None else f"{v:.5f}"  # noqa: E731 (no held-out snippets: None)
    logger.info("%s (held-out loss %s -> %s%s) in %.1fs",
                f"saved extended model to {out}" if out else "extended the model (not saved)",
                fmt(report["mean_heldout_loss_init"]), fmt(report["mean_heldout_loss_final"]),
                f", {100 * closed:.0f}% of the distillation gap closed" if closed is not None and trained.result
                else "", report["total_seconds"])
    return Distilled(extended.model, extended.tokenizer, report, out)


def start(cfg: RunConfig, words: list[str] | None = None) -> Setup:
    """Stage 1: seed, device and dtype; check the model source, the output path and the corpus's
    text column, read the word list unless ``words`` holds it already (nothing heavy is loaded)."""
    t0 = time.perf_counter()
    seed_everything(cfg.train.seed)
    tc, world = cfg.train, launched_world_size()
    batch = tc.token_distillation_batch_size
    shard = tc.init_method in TRAINED and check_distributable(
        tc.recipe, tc.loss_method, tc.stopping_condition, tc.train_original_embeddings, tc.snippets_per_update,
        batch, world)
    source = resolve_model_source(cfg.model.model_path)
    out = prepare_output(cfg.output.out_path, cfg.output.overwrite, cfg.output.resume, source,
                         dry_run=cfg.output.dry_run)
    if not cfg.output.dry_run:
        check_local_weights(source)
    check_cache_dir(cfg.model.resolved_cache_dir, cfg.model.cache_dir_origin)
    for note in cfg.unused_settings():
        logger.warning(note)
    if cfg.output.overwrite and cfg.output.resume and any((out / CHECKPOINT_DIRNAME).glob("*")):
        logger.warning("--resume with --overwrite: the interrupted run in %s continues from its checkpoints (they are "
                       "not discarded); to start over, pass --overwrite without --resume", out)
    elif cfg.output.overwrite and cfg.output.resume and out.is_dir() and any(out.iterdir()):
        logger.warning("--resume: %s holds no checkpoints, so there is nothing to resume; --overwrite replaces its "
                       "contents with this run's output", out)
    if (cfg.output.resume and cfg.train.init_method not in TRAINED
            and cfg.output.output_embeddings != OutputEmbeddings.DISTILL):  # ntp output rows: no checkpoints either
        logger.warning("--resume: --init_method %s trains no input rows%s, so this run writes no checkpoints and there "
                       "is nothing to resume; the run starts from the beginning", cfg.train.init_method.value,
                       " (--output_embeddings ntp trains the output rows again)"
                       if cfg.output.output_embeddings == OutputEmbeddings.NTP else "")
    if cfg.output.overwrite and not cfg.output.resume and out.is_dir() and any(out.iterdir()):
        logger.info("--overwrite: %s holds an earlier output of this tool; it stays until this run's output is "
                    "complete and then is replaced", out)
    if cfg.resolved_snippet_source != SnippetSource.GENERATED or cfg.corpus.dataset_path:
        check_text_column(cfg.corpus)  # before the tokenizer and the corpus load
    cfg.check_heldout_shift_has_corpus()
    words_digest = None
    if words is None:
        words = read_target_wordlist(cfg.targets)  # a malformed list fails before the tokenizer loads
    if words is not None:
        words_digest = list_digest(words)
        if cfg.resolved_snippet_source == SnippetSource.CORPUS and not cfg.output.dry_run:
            check_words_occur(cfg.corpus, words)
    check_exports(cfg, source)
    if cfg.output.resume and cfg.train.init_method in TRAINED:
        # one read of the newest checkpoint; auto: the interrupted run's batch
        batch = check_resumable(out / CHECKPOINT_DIRNAME, {**cfg.to_dict(), "token_distillation_batch_size": batch},
                                source.identity, shards=world if shard else 0, words_digest=words_digest)
    dist = DistContext.create(cfg.model.device, resolve_device, cfg.model.process_group_timeout_minutes)
    weights_dtype, autocast_dtype = resolve_precision(cfg.model.mixed_precision, dist.device)
    logger.info("model %s | device %s | autocast %s | seed %d | processes %d", source.spec, dist.device,
                autocast_dtype, cfg.train.seed, dist.world_size)
    if dist.distributed:
        logger.info("%d processes: %s", dist.world_size, "each trains its own tokens (token sharding)" if shard else
                    "each optimizer step's batch is split over them (data parallelism)")
    return Setup(cfg, source, out, dist, dist.device, weights_dtype, autocast_dtype, cfg.model.resolved_cache_dir, t0,
                 batch_size=batch, shard=shard and dist.distributed,
                 dist_info={"mode": "token-sharded" if shard else "data-parallel"} if dist.distributed else None,
                 snippet_source=cfg.resolved_snippet_source, wordlist=words)


def check_exports(cfg: RunConfig, source: ModelSource) -> None:
    """Before anything loads: ``--export`` is possible (peft installed; gguf from a .gguf source;
    peft not with ``--train_original_embeddings``).

    Raises:
        ConfigError: the first problem, naming the flag.
    """
    check_peft_available(cfg.output.exports)
    check_gguf_possible(source, cfg.output.exports)
    if "peft" in cfg.output.exports and cfg.train.train_original_embeddings:
        raise ConfigError("--export peft holds the new tokens' rows only, but --train_original_embeddings changes "
                          "the original rows too; use --export hf")


def check_model_config(cfg: RunConfig, model_config) -> None:
    """The flag checks that need the model's config only (no weights, no tokenizer).

    Raises:
        ConfigError: ``--target_layer`` is outside the model's layers, ``--snippet_len`` exceeds its
            context, or ``--output_embeddings tied`` on a model whose output embeddings are not tied.
    """
    resolve_layer(model_config, cfg.train.target_layer)
    check_context_length(model_config, cfg.snippets.snippet_len, 0)  # with the BOS again once the tokenizer is known
    text_cfg = text_config(model_config)
    if cfg.output.output_embeddings == OutputEmbeddings.TIED and not getattr(text_cfg, "tie_word_embeddings", True):
        raise ConfigError("--output_embeddings tied: this model's output embeddings are not tied; use auto, "
                          "distill, zero, subtoken-mean or ntp")


def load_inputs(setup: Setup):
    """The model config and the tokenizer from ``--model_path`` (the model's weights load later);
    sets the dtypes the weights are loaded and saved in. Returns ``(tokenizer, model_config)``."""
    cfg, dist = setup.cfg, setup.dist
    with dist.main_process_first():  # the main process fills the model cache (GGUF conversion) first
        model_config = load_config(setup.source, setup.cache_root)
        check_model_config(cfg, model_config)  # a bad --target_layer or tied stops before the tokenizer loads
        tokenizer = load_tokenizer(setup.source, setup.cache_root)
    setup.save_dtype = source_dtype(model_config)
    setup.weights_dtype, _ = resolve_precision(cfg.model.mixed_precision, setup.device, setup.save_dtype)
    if cfg.output.dry_run:
        logger.info("weights: stored in %s (dry run: the model is not loaded or saved)", setup.save_dtype)
    else:
        logger.info("weights: stored in %s, loaded in %s, saved in %s", setup.save_dtype, setup.weights_dtype,
                    setup.save_dtype)
    return tokenizer, model_config


def build_target_list(setup: Setup, tokenizer, model_config, words: list[str] | None = None,
                      texts=None) -> Targets:
    """Stage 2: model config checks (target layer, context, tied output), the new-token list
    (``words``, else built by ``--build_target_method``), and the tokenized corpus when snippets
    are mined (``texts`` in memory, else ``--dataset_path``)."""
    cfg, dist = setup.cfg, setup.dist
    check_model_config(cfg, model_config)
    check_context_length(model_config, cfg.snippets.snippet_len, len(bos_prefix(tokenizer)))
    targets = build_targets(cfg.targets, tokenizer, cfg.corpus, setup.cache_root, words=words,
                            wordlist_read=setup.wordlist)
    corpus = occurrences = mined = scan = None
    if setup.snippet_source != SnippetSource.GENERATED:
        sc = cfg.snippets
        miner = SnippetMiner(targets.tokens, sc.snippet_len, sc.snippet_num, sc.heldout_snippet_num,
                             cfg.corpus.heldout_fraction, bos_prefix(tokenizer), cfg.train.seed)
        if texts is not None:
            scan = scan_texts(texts, tokenizer, miner, text_column=cfg.corpus.text_column, limit=cfg.corpus.max_docs,
                              num_proc=resolved_num_proc(cfg.corpus.num_proc))
        else:
            with dist.main_process_first():  # tokenized once, shared through the cache
                scan = scan_corpus(cfg.corpus, tokenizer, setup.cache_root, consumer=miner)
        corpus, mined = scan.corpus, miner.result()
        occurrences = [int(o) for o in miner.occurrences]
        len_before = corpus.num_tokens
        len_after = len_before - sum(o * (len(t.subtoken_ids) - 1) for o, t in zip(occurrences, targets.tokens))
        if texts is not None and not any(occurrences):
            raise ConfigError(f"texts: none of the {len(targets.tokens)} new tokens occurs in the {corpus.num_docs} "
                              "documents read, so no snippet can be mined; pass texts that contain them, or texts=None "
                              "(the model writes snippets)")
        summary = log_summary(targets, len_before, len_after)
        summary.update(docs_read=scan.docs_read, scan_stop_reason=scan.stop_reason, docs_needed=scan.docs_needed)
    else:
        summary = log_summary(targets)
    records = new_token_records(targets, tokenizer, occurrences)
    return Targets(tokenizer, targets, records, summary, corpus, model_config, mined, scan)


def gather_snippets(setup: Setup, tg: Targets) -> Snippets:
    """Stage 3: mine (or generate) snippets once, on the main process, send them to the others,
    and keep the tokens with at least ``--min_snippets`` of them."""
    cfg, src, model = setup.cfg, setup.snippet_source, None
    setup.generated = _generated_cache(setup, tg.targets.tokens)

    def _collect():
        nonlocal model
        snips, info, sources, model = collect_snippets(cfg, src, tg.targets.tokens, tg.corpus, tg.tokenizer,
                                                       bos_prefix(tg.tokenizer), setup.get_model, setup.device,
                                                       mined=tg.mined, scan=tg.scan, cache=setup.generated)
        return snips, info, sources

    if src == SnippetSource.GENERATED and setup.dist.distributed:  # each process writes its tokens' snippets
        snips, model = _generate_sharded(setup, tg)
        corpus_info, sources = {"source": "generated"}, ["generated"] * len(tg.targets.tokens)
    elif src == SnippetSource.CORPUS_THEN_GENERATED and setup.dist.distributed:
        # the main process mines; the top-up snippets are generated by every process for its share
        snips, corpus_info, sources = setup.dist.broadcast_from_main(lambda: collect_snippets(
            cfg, SnippetSource.CORPUS, tg.targets.tokens, tg.corpus, tg.tokenizer, bos_prefix(tg.tokenizer),
            None, setup.device)[:3])
        corpus_info = {**corpus_info, "source": src.value}
        want = top_up_wanted(cfg, snips)
        if any(w != (0, 0) for w in want):
            logger.info("topping up %d token(s) with fewer than %d corpus snippets with generated ones",
                        sum(w != (0, 0) for w in want), cfg.snippets.min_snippets)
            gen, model = _generate_sharded(setup, tg, want)
            sources = _topped_up_sources(snips, want)
            snips = top_up(snips, gen)
    else:
        snips, corpus_info, sources = setup.dist.broadcast_from_main(_collect)
    overfiring = corpus_info.pop(OVERFIRING_KEY, None)
    snips, tokens, sources, skipped = keep_tokens_with_snippets(cfg, snips, tg.targets.tokens, sources,
                                                                tg.targets.skipped)
    if len(tokens) < len(tg.targets.tokens):
        # the words counted while mining were matched against every target (leftmost-longest): a
        # skipped longer token (" agonists") hid uses of a kept one (" agonist"); scan again with the kept ones
        overfiring = None
    if src == SnippetSource.GENERATED:
        scan_ids = [s.ids for s in snips.train + snips.heldout]
    else:
        scan_ids = None if overfiring is not None else tg.corpus.iter_docs()
    _warn_missing_heldout(tokens, snips.heldout_counts, cfg.snippets.heldout_snippet_num)
    _log_few_train(tokens, snips.train_counts, cfg.snippets.snippet_num)
    logger.info("pre-flight: %d new tokens, %d skipped, %d training / %d held-out snippets, method %s",
                len(tokens), len(skipped), len(snips.train), len(snips.heldout), cfg.train.init_method.value)
    shift_docs = shift_documents(tg.corpus, snips.heldout, bos_prefix(tg.tokenizer), _doc_tokens(tg))
    return Snippets(snips, tokens, sources, skipped, corpus_info, scan_ids, model, overfiring, shift_docs)


def _doc_tokens(tg: Targets) -> int:
    """Length cap (original tokens, BOS not counted) of a held-out document read for --output_rows_shift:
    :data:`~token_distillation.output_rows.TEXT_DOC_TOKENS`, or less where the model's context is shorter
    (with a margin: the extended tokenizer reads the decoded text again, and a cut inside a character
    can come back a token or two longer)."""
    ctx = context_length(tg.model_config) or TEXT_DOC_TOKENS + 64
    return max(1, min(TEXT_DOC_TOKENS, ctx - len(bos_prefix(tg.tokenizer)) - 16))


def _generated_cache(setup: Setup, tokens: list[NewToken]) -> GeneratedSnippetCache:
    """Where generated snippets are kept for ``--resume`` (see
    :class:`~token_distillation.checkpoint.GeneratedSnippetCache`): beside the checkpoints of a
    trained method's run that saves its output; otherwise nowhere."""
    cfg, sc = setup.cfg, setup.cfg.snippets
    keep = setup.out is not None and setup.checkpoints and cfg.train.init_method in TRAINED
    return GeneratedSnippetCache(setup.out / CHECKPOINT_DIRNAME if keep else None, cfg.output.resume,
                                 dict(model=setup.source.identity, tokens=[t.text for t in tokens],
                                      snippet_len=sc.snippet_len, **_generation_kw(cfg)))


def _generate_sharded(setup: Setup, tg: Targets, wanted: list[tuple[int, int]] | None = None):
    """Generated snippets with several processes: each loads the model and generates the snippets of
    its share of the tokens (balanced by the number wanted; a token's sampling is seeded by its
    index, so the snippets are those one process would write), then every process gets all of
    them, in the one-process order (by token).

    Args:
        wanted: per-token ``(train, heldout)`` numbers (a top-up); default: ``--snippet_num`` and
            ``--heldout_snippet_num`` for every token.
    Returns:
        ``(snippets, the loaded model)``.
    """
    dist, sc, tokens = setup.dist, setup.cfg.snippets, tg.targets.tokens
    wanted = wanted if wanted is not None else [(sc.snippet_num, sc.heldout_snippet_num)] * len(tokens)
    cache = setup.generated
    if cache is not None:
        kept = dist.broadcast_from_main(lambda: cache.get(wanted))
        if kept is not None:
            return kept, None
    owned = set(assign_tokens([a + b for a, b in wanted], dist.world_size)[dist.rank])
    mine = [w if i in owned else (0, 0) for i, w in enumerate(wanted)]
    logger.info("generating snippets for %d of %d tokens on process %d of %d",
                sum(w != (0, 0) for w in mine), sum(w != (0, 0) for w in wanted), dist.rank, dist.world_size)
    with dist.main_process_first():  # the main process fills the model cache (GGUF conversion) first
        model = setup.get_model()
    part = generate_snippets(model, tg.tokenizer, tokens, sc.snippet_len, sc.snippet_num, sc.heldout_snippet_num,
                             device=setup.device, counts=mine, **_generation_kw(setup.cfg))
    parts = dist.all_gather_objects(part, "generated-snippets")
    merged = SnippetSet(train=sorted((s for p in parts for s in p.train), key=lambda s: s.token_index),
                        heldout=sorted((s for p in parts for s in p.heldout), key=lambda s: s.token_index),
                        train_counts=[sum(c) for c in zip(*(p.train_counts for p in parts))],
                        heldout_counts=[sum(c) for c in zip(*(p.heldout_counts for p in parts))])
    if cache is not None:
        cache.put(wanted, merged)
    return merged, model


def extend_model(setup: Setup, tg: Targets, sn: Snippets) -> Extended:
    """Stage 4: load the model, add the new tokens to tokenizer and embedding matrices (untying a
    tied model when asked), and initialise the new input (and output) rows."""
    cfg, tc, device, tokenizer = setup.cfg, setup.cfg.train, setup.device, tg.tokenizer
    plan = plan_run_memory(setup, tg, sn)
    model = sn.model or setup.get_model()
    if setup.out is not None:
        check_saveable(model)
    check_adapter_possible(model, cfg.output.exports)
    layer = resolve_layer(model, tc.target_layer)
    num_original = model.get_input_embeddings().weight.shape[0]
    probes = encode_probes(tokenizer, sn.tokens)
    original_tokenizer = copy.deepcopy(tokenizer) if getattr(tokenizer, "is_fast", False) else None
    if original_tokenizer is None and tc.alignment == Alignment.CHARS:
        logger.warning("--alignment chars needs a fast tokenizer (character offsets); %s is not one: using the "
                       "id-level merge (--alignment ids)", type(tokenizer).__name__)
    new_ids = add_new_tokens(tokenizer, [t.text for t in sn.tokens])
    tokens = [NewToken(t.text, t.subtoken_ids, i) for t, i in zip(sn.tokens, new_ids)]
    chars = original_tokenizer is not None and tc.alignment == Alignment.CHARS
    firing = firing_report(tokenizer, tokens, probes, sn.scan_ids, overfiring=sn.overfiring, chars=chars,
                           trained=bool((sn.corpus_info.get("inexact_snippets") or {}).get("train")) and chars)
    extend_embeddings(model, len(tokenizer))
    n_orig = min(num_original, new_ids[0])
    tied_source = is_tied(model)
    out_policy = _output_policy(cfg, tied_source)
    if tied_source and out_policy is not None:
        logger.info("--output_embeddings %s on a tied model: untying (the output layer becomes a separate copy; "
                    "new output rows: %s)", cfg.output.output_embeddings.value, out_policy.value)
        untie_embeddings(model)
    tied = is_tied(model)
    if set_new_output_bias(model, new_ids, [t.subtoken_ids for t in tokens]):
        logger.info("output layer has a bias: new tokens get the mean of their subtokens' bias")
    scale = embedding_scale(model)
    emb = model.get_input_embeddings().weight
    init = INITIALISERS[tc.init_method](emb.detach(), tokens, seed=tc.seed, num_original=n_orig)
    out_init = None
    if not tied:
        out_w = model.get_output_embeddings().weight.detach()
        out_init = (torch.zeros((len(tokens), out_w.shape[1])) if out_policy == OutputEmbeddings.ZERO
                    else subtoken_mean(out_w, tokens)).to(device)
    rows = NewRows(init.to(device), new_ids, emb.shape[0], scale, num_original=n_orig, out_rows=out_init,
                   train_original=tc.train_original_embeddings, weight=emb.detach()).to(device)
    setup.dist.broadcast_tensor_(rows.rows)
    with torch.no_grad():
        rows.fixed_rows.copy_(rows.rows)  # co-occurring tokens are read with the (broadcast) initial rows
    return Extended(model, tokenizer, tokens, rows, layer, num_original, n_orig, tied_source, tied, out_policy, scale,
                    firing, plan, original_tokenizer)


def plan_run_memory(setup: Setup, tg: Targets, sn: Snippets) -> MemoryPlan:
    """The memory plan of the run (see :mod:`token_distillation.memory`): resolves
    ``--token_distillation_batch_size auto`` into ``setup.batch_size``, logs the plan, and on CUDA
    refuses a run that will not fit.

    Raises:
        ConfigError: the plan exceeds 90% of the CUDA device's memory.
    """
    cfg, tc, tokenizer = setup.cfg, setup.cfg.train, tg.tokenizer
    text_cfg = text_config(tg.model_config)
    hidden, vocab = int(text_cfg.hidden_size), int(text_cfg.vocab_size)
    seq_len = cfg.snippets.snippet_len + len(bos_prefix(tokenizer))
    host = setup.device.type != "cuda"
    params = count_parameters(tg.model_config)
    weight_bytes = params * torch.empty((), dtype=setup.weights_dtype).element_size()
    baseline = max(0, resident_bytes() - (weight_bytes if setup.model is not None else 0)) if host else 0
    kw = dict(weights_dtype=setup.weights_dtype, autocast_dtype=setup.autocast_dtype, seq_len=seq_len,
              layers_to_target=resolve_layer(tg.model_config, tc.target_layer), num_new=len(sn.tokens),
              untie=bool(getattr(text_cfg, "tie_word_embeddings", False)) and _output_policy(cfg, True) is not None,
              added_rows=max(0, len(tokenizer) + len(sn.tokens) - vocab), host=host, stored_dtype=setup.save_dtype,
              baseline=baseline, teacher_cache=_host_teacher_cache(setup, sn, seq_len, hidden) if host else 0,
              num_params=params, heldout_snippets=len(sn.snips.heldout),
              **(dict(output_fit_snippets=len(sn.snips.train), output_fit_per_token=max(sn.snips.train_counts, default=0))
                 if _output_policy(cfg, bool(getattr(text_cfg, "tie_word_embeddings", False))) == OutputEmbeddings.DISTILL
                 else {}))
    world = setup.dist.world_size

    # the per-token recipe puts at most one group of --snippets_per_update snippets per token in a batch;
    # untrained methods back-propagate nothing
    spu, per_token = tc.snippets_per_update, tc.recipe == Recipe.PER_TOKEN and not tc.train_original_embeddings
    fill = (max(1, len(sn.tokens)) * spu if per_token else None) if tc.init_method in TRAINED else 0

    def plan_at(per_process: int) -> MemoryPlan:
        batch = per_process if fill is None else min(per_process, -(-fill // world))
        return plan_memory(tg.model_config, batch_size=batch, **kw)

    if setup.batch_size == "auto":
        if tc.init_method in TRAINED:
            setup.batch_size = setup.dist.broadcast_from_main(lambda: choose_batch_size(
                plan_at, setup.device, cap=min(AUTO_BATCH_CAP, fill or AUTO_BATCH_CAP), multiple=math.lcm(world, spu),
                world_size=world))
        else:
            setup.batch_size = 16  # nothing is trained: the batch size is not used (the default, for the report)
    else:
        _hint_auto_batch(setup, fill)
    plan = plan_at(-(-setup.batch_size // world))
    check_fits(plan, setup.device, setup.batch_size)
    return plan


#: measured on one H200 (Llama-3.1-8B shape, bf16, 500 words' mined snippets, layer -1): snippets/s at
#: batch 64 over batch 16 (docs/benchmarks/gpu/bench_h200_llama8b_bs{16,64}.json)
GPU_BATCH_64_OVER_16 = 2.0


def _hint_auto_batch(setup: Setup, fill: int | None) -> None:
    """On CUDA, a small fixed batch where ``auto`` would train the same rows: say so (once, main
    process). At the 8B shape a batch of 16 leaves the GPU waiting on kernel launches."""
    from .config import _check_auto_batch

    why: list[str] = []
    _check_auto_batch(setup.cfg, why)
    if setup.device.type == "cuda" and not why and setup.batch_size < min(64, fill or 0) and setup.dist.is_main:
        logger.info("--token_distillation_batch_size %d on CUDA: auto (the largest batch whose memory plan fits the "
                    "device) trains the same rows with this recipe, and faster: batch 64 ran %.1fx the snippets/s of "
                    "batch 16 on an H200 at the Llama-3.1-8B shape", setup.batch_size, GPU_BATCH_64_OVER_16)


def _host_teacher_cache(setup: Setup, sn: Snippets, seq_len: int, hidden: int) -> int:
    """Upper bound of the teacher hidden states kept in host memory: every position of the snippets
    that would be cached (training's when they are revisited, the held-out ones), within the budget."""
    tc = setup.cfg.train
    if tc.init_method not in TRAINED and not tc.train_original_embeddings:
        return 0
    revisits = tc.token_distillation_epochs > 1 or tc.stopping_condition == StoppingCondition.MAX_STEPS
    snippets = len(sn.snips.heldout) + (len(sn.snips.train) if revisits else 0)
    item = torch.empty((), dtype=setup.autocast_dtype or setup.weights_dtype).element_size()
    return min(int(tc.teacher_cache_gib * 2**30), snippets * seq_len * hidden * item)


def _own_shard(setup: Setup, num_tokens: int, train_tix: list[int], held_seqs, held_tix: list[int]):
    """Token sharding: the tokens this process trains (balanced by training snippets) and the
    held-out snippets of those tokens. Returns ``(owned, held_seqs, held_tix)``."""
    counts = [0] * num_tokens
    for t in train_tix:
        counts[t] += 1
    owned = assign_tokens(counts, setup.dist.world_size)[setup.dist.rank]
    own = set(owned)
    keep = [i for i, t in enumerate(held_tix) if t in own]
    logger.info("token sharding: process %d of %d trains %d of %d tokens (%d of %d training snippets)",
                setup.dist.rank, setup.dist.world_size, len(owned), num_tokens,
                sum(counts[t] for t in owned), len(train_tix))
    return owned, [held_seqs[i] for i in keep], [held_tix[i] for i in keep]


@contextlib.contextmanager
def _resumable_after(result, where: str):
    """A stop signal after the input rows are trained (and checkpointed, when training ran) ends with
    the ``--resume`` line of training's last step (``result``: its TrainResult, None when nothing
    was trained)."""
    try:
        yield
    except Interrupted as e:
        raise Interrupted(e.signum, step=result.steps if result else None, where=where) from None


def train_new_rows(setup: Setup, sn: Snippets, ext: Extended) -> Trained:
    """Stage 5: held-out measures before training, training of the new rows (and of the output
    rows with ``--output_embeddings ntp`` or ``distill``), held-out measures after.

    The input rows (held-out distillation loss) change only when trained, the argmax rate also when
    the output rows are trained (ntp); otherwise "after" equals "before" and is not recomputed.
    ``--teacher_cache_gib`` is shared: training's teacher cache (used when snippets are seen again)
    is sized first, and the held-out teacher states of "before" are kept for "after" in what is left.
    """
    tc, model, rows, tokens = setup.cfg.train, ext.model, ext.rows, ext.tokens
    pad_id = ext.tokenizer.pad_token_id if ext.tokenizer.pad_token_id is not None else 0
    train_seqs, train_tix = pair_snippets(sn.snips.train, ext, tc.alignment)
    held_seqs, held_tix = pair_snippets(sn.snips.heldout, ext, tc.alignment)
    all_held = (held_seqs, held_tix)  # every process's output fit draws background positions from all of them
    input_trained = tc.init_method in TRAINED or tc.train_original_embeddings
    fp = _train_fingerprint(setup, ext, train_seqs) if tc.init_method in TRAINED else None
    if fp is not None and setup.cfg.output.resume and setup.checkpoints and setup.out is not None:
        check_training_inputs(setup.out / CHECKPOINT_DIRNAME, fp)  # a changed corpus: refused before the held-out pass
    kept_before = _kept_before(setup, ext, held_seqs)
    owned = None
    if setup.shard:  # this process's tokens: it trains and evaluates only these
        owned, held_seqs, held_tix = _own_shard(setup, len(tokens), train_tix, held_seqs, held_tix)
    held = functools.partial(_sharded_heldout if setup.shard else heldout_eval, model, rows, held_seqs, held_tix,
                             len(tokens), layer=ext.layer, device=setup.device, autocast_dtype=setup.autocast_dtype,
                             pad_id=pad_id, **({"dist": setup.dist} if setup.shard else {}))
    budget = int(tc.teacher_cache_gib * 2**30)
    # training's cache is sized first (it saves a teacher forward per snippet and epoch); the held-out
    # pass keeps what is left (it saves one forward per held-out snippet)
    revisits = tc.token_distillation_epochs > 1 or tc.stopping_condition == StoppingCondition.MAX_STEPS
    train_need = teacher_state_bytes(train_seqs, model, setup) if tc.init_method in TRAINED and revisits else 0
    held_budget = max(0, budget - train_need)
    held_teacher = TeacherCache(held_budget) if input_trained and (setup.dist.is_main or setup.shard) else None
    before = kept_before.get()
    if before is None:
        with stop_point("after the held-out batch in progress, before training (nothing is written)"):
            before = held(teacher_cache=held_teacher, desc="held-out evaluation before training")
        kept_before.remember(before)
    # a signal during the evaluation's last batch stops here, before training clears old checkpoints
    check_stop("before training")
    lr = relative_lr(tc.token_distillation_lr_relative, model.get_input_embeddings().weight, ext.n_orig)
    loop_kw = dict(lr=tc.token_distillation_lr, batch_size=setup.batch_size,
                   epochs=tc.token_distillation_epochs, seed=tc.seed, device=setup.device,
                   stopping_condition=tc.stopping_condition, max_steps=tc.max_steps, log_every=tc.log_every,
                   pad_id=pad_id)
    result = out_result = None
    if tc.init_method in TRAINED:
        if tc.recipe == Recipe.PER_TOKEN:
            loop_kw["lr"] = lr
        with stop_point("after the current step" + (" (a checkpoint is written)" if setup.checkpoints else "")):
            result = _train_input_rows(setup, ext, fp, train_seqs, train_tix, loop_kw,
                                       budget - (held_teacher.bytes if held_teacher else 0), owned,
                                       kept_before.attachment(before))
    docs = pair_snippets(sn.shift_docs, ext, tc.alignment)[0] if ext.out_policy == OutputEmbeddings.DISTILL else []
    out_result, out_kl, kept = _train_output_rows(setup, ext, result, (train_seqs, train_tix), (held_seqs, held_tix),
                                                  all_held, owned, pad_id, loop_kw, docs)
    outputs_trained = ext.out_policy in (OutputEmbeddings.NTP, OutputEmbeddings.DISTILL)
    if not setup.dist.is_main and not setup.shard:  # data-parallel: the main process evaluates alone
        return Trained(result, out_result, lr, before.loss_per_token, before.loss_per_token, before.argmax,
                       before.argmax, [])
    with _resumable_after(result, "after training"), stop_point(  # --resume skips to here
            "after the held-out batch in progress" + (f" ({kept})" if kept else "")):
        after = held(teacher_cache=held_teacher, loss=input_trained, argmax=input_trained or outputs_trained,
                     desc="held-out evaluation after training")
        check_stop("after training")  # a signal in the evaluation's last batch stops here, as its warning said
    if not setup.dist.is_main:  # token sharding: every process took part in the evaluation; the main one reports
        return Trained(result, out_result, lr, before.loss_per_token, after.loss_per_token, before.argmax,
                       after.argmax, [])
    if held_teacher is not None:
        logger.info("held-out teacher cache: %d of %d snippets kept for the second pass (%.1f MiB of %.1f MiB left "
                    "by training's cache)", len(held_teacher), len(held_seqs), held_teacher.bytes / 2**20,
                    held_budget / 2**20)
    held_after = after.loss_per_token if after.loss_per_token is not None else before.loss_per_token
    argmax_after = after.argmax if after.argmax is not None else before.argmax
    _warn_if_new_tokens_dominate(argmax_after, ext.tied)
    not_improved = _not_improved(tokens, before.loss_per_token, held_after) if result else []
    return Trained(result, out_result, lr, before.loss_per_token, held_after, before.argmax, argmax_after,
                   not_improved, out_kl)


def _train_output_rows(setup: Setup, ext: Extended, result, train, heldout, all_held, owned: list[int] | None,
                       pad_id: int, loop_kw: dict, docs: list[MergedSequence]):
    """The output-row phase of :func:`train_new_rows` (``--output_embeddings ntp`` or ``distill``; nothing
    for the other policies) after the input rows (``result``: their TrainResult, None when not trained);
    ``docs``: the held-out documents the distill fit's shift is measured on.

    Returns:
        ``(TrainResult of the output rows or None, the fit's per-token KL dict or None, the words a stop
        message adds about what is kept: "" when no checkpoints are written)``.

    Raises:
        Interrupted: a stop signal, with the ``--resume`` line of training's last step.
    """
    kept = "the trained input rows are checkpointed" if result is not None and setup.checkpoints else ""
    out_result = out_kl = None
    if ext.out_policy == OutputEmbeddings.DISTILL:
        out_phase = "after the output-row fit's current batch of snippets"
        if kept:
            out_phase += (f" ({kept}, and the token groups fitted so far; the group in progress is fitted again "
                          "on --resume)")
    else:  # ntp: --resume trains the output rows again
        out_phase = "after the output-row training's current step" + (f" ({kept})" if kept else "")
    with _resumable_after(result, "while training the output rows"), stop_point(out_phase):
        if ext.out_policy == OutputEmbeddings.NTP:
            out_result = train_output_rows(ext.model, ext.rows, *train, layer=ext.layer,
                                           autocast_dtype=setup.autocast_dtype,
                                           **{**loop_kw, "lr": setup.cfg.train.token_distillation_lr})
        elif ext.out_policy == OutputEmbeddings.DISTILL:
            out_result, out_kl = _distill_outputs(setup, ext, train, heldout, all_held, owned, pad_id, docs)
    return out_result, out_kl, kept


def _kept_before(setup: Setup, ext: Extended, held_seqs) -> HeldoutBefore:
    """The held-out measures before training, kept with the checkpoints when they are written for
    trained input rows (``--resume`` reads them) and in ``--heldout_cache_dir`` for later runs with
    the same inputs (a run with an output folder on one process: the Python API's model may have
    been changed in memory, and a multi-process run evaluates its shards apart)."""
    keep = setup.checkpoints and setup.out is not None and setup.cfg.train.init_method in TRAINED
    shared = str(setup.cfg.output.heldout_cache_dir).strip()
    share = bool(shared) and setup.out is not None and setup.dist.world_size == 1
    if not (keep or share):
        return HeldoutBefore(None, False, "")
    key = heldout_before_key(ext.rows, held_seqs, layer=ext.layer, autocast=setup.autocast_dtype,
                             model=setup.source.identity, device=setup.device.type,
                             # a float32 copy of the whole matrix reads the original tokens otherwise;
                             # untrained (subtoken-mean) and trained runs with the same rows share the pass
                             train_original=setup.cfg.train.train_original_embeddings,
                             weights=setup.weights_dtype)
    return HeldoutBefore(setup.out / CHECKPOINT_DIRNAME if keep else None, setup.cfg.output.resume, key,
                         shared=Path(shared).expanduser() if share else None)


def _distill_outputs(setup: Setup, ext: Extended, train, heldout, all_held, owned: list[int] | None, pad_id: int,
                     docs: list[MergedSequence]):
    """``--output_embeddings distill`` (:func:`~token_distillation.output_rows.distill_output_rows`)
    after the input rows are final. One process: every token. Token sharding: each process fits its
    own tokens and the rows and measures are gathered (``heldout``: this process's held-out snippets;
    ``all_held``: every held-out snippet, from which the held-out background positions are drawn, the
    same on every process). Data parallelism: the main process fits every token and sends the rows to
    the others. ``docs``: held-out documents (student/teacher pairs) for the shift's text NLL.

    Returns:
        ``(TrainResult, per-token binary KL dict)`` (the dict is complete on the main process).
    """
    tc, dist, rows = setup.cfg.train, setup.dist, ext.rows
    rms = entry_rms(ext.model.get_output_embeddings().weight, ext.n_orig)
    lr = tc.token_distillation_lr_relative * rms
    mine = owned if setup.shard else list(range(len(ext.tokens)))
    result, kl, shift = TrainResult(), None, None
    if setup.shard or dist.is_main:
        # the direction along which one shared logit shift moves every new row (the same on every process:
        # read from the held-out background pool, which every process draws from all held-out snippets)
        direction, spread = shift_direction(ext.model, rows, *all_held, background_pool(all_held[1]),
                                            batch_size=setup.batch_size, device=setup.device, pad_id=pad_id,
                                            autocast_dtype=setup.autocast_dtype)
        wanted = setup.cfg.output.output_rows_shift
        shifts = (SHIFT_GRID if wanted in (HELDOUT, AUTO_SHIFT) or wanted in SHIFT_GRID
                  else tuple(sorted((*SHIFT_GRID, wanted))))
        shift = (direction, shifts) if not math.isnan(spread) else None
        if shift is None and explicit_shift(wanted):
            logger.warning("--output_rows_shift %s not applied: the held-out snippets have no positions to measure "
                           "the shift on", wanted)
        keep = setup.checkpoints and setup.out is not None
        progress = OutputFitProgress(setup.out / CHECKPOINT_DIRNAME if keep else None,
                                     shard_prefix(dist.rank, dist.world_size) if setup.shard else "",
                                     resume=setup.cfg.output.resume)
        result, kl = distill_output_rows(ext.model, rows, train, heldout, mine, [t.subtoken_ids for t in ext.tokens],
                                         lr=lr, rms=rms, batch_size=setup.batch_size, device=setup.device, pad_id=pad_id,
                                         autocast_dtype=setup.autocast_dtype, show_progress=dist.is_main,
                                         progress=progress, background_heldout=all_held, shift=shift)
    if setup.shard:
        dist.gather_rows_(rows.out_rows, owned)
        parts = dist.all_gather_objects(kl, "output-rows-kl")
        kl = {k: [next((p[k][t] for p in parts if p[k][t] is not None), None) for t in range(len(ext.tokens))]
              for k in kl}
    if kl is not None and shift is not None:  # every process of a sharded run, the main one otherwise
        kl["text"] = (*_text_by_shift(setup, ext, docs, shift, pad_id), len(docs))
        kl["shift"] = _shared_shift(rows, kl, shift, spread, setup.cfg.output.output_rows_shift, dist.is_main)
    if not setup.shard and dist.distributed:
        dist.wait("output-rows")  # polls the store: the main process's fit may outlast the collective timeout
        dist.broadcast_tensor_(rows.out_rows)
    if kl is not None and dist.is_main:
        log_worse(kl, [t.text for t in ext.tokens])
    return result, kl


def _text_by_shift(setup: Setup, ext: Extended, docs: list[MergedSequence], shift: tuple,
                   pad_id: int) -> tuple[list[float], int, list[list[float]]]:
    """The held-out documents' text NLL at each shift (:func:`~token_distillation.output_rows.text_nll_by_shift`;
    ``docs`` from :func:`~token_distillation.output_rows.shift_documents`), once the output rows are final
    on this process. A token-sharded run splits the documents over its processes and sums their parts,
    so every process gets the same numbers (and applies the same shift).

    Returns:
        ``(total NLL in nats per shift, scored positions, per document: its NLL per shift)``;
        ``([], 0, [])`` without documents.
    """
    dist = setup.dist
    picked = list(range(len(docs)))
    if setup.shard:
        picked = picked[dist.rank:: dist.world_size]
    elif not docs:
        return [], 0, []
    # the batch was sized for snippets: as many tokens per forward, in documents
    longest = max((len(docs[i].student_ids) for i in picked), default=1)
    batch = max(1, setup.batch_size * (setup.cfg.snippets.snippet_len + 1) // longest)
    part = text_nll_by_shift(ext.model, ext.rows, docs, picked, shift[0], shift[1], batch_size=batch,
                             device=setup.device, pad_id=pad_id, autocast_dtype=setup.autocast_dtype)
    if not setup.shard:
        return part
    parts = dist.all_gather_objects(part, "output-rows-text")
    n = sum(p[1] for p in parts)
    return (([math.fsum(p[0][j] for p in parts) for j in range(len(shift[1]))] if n else []), n,
            [d for p in parts for d in p[2]])


def _shift_decision(wanted, best: float | None, gain_se: float | None, n_docs: int) -> tuple[float, str]:
    """The shift ``--output_rows_shift wanted`` applies (nats) and why, in words: ``best`` is the held-out
    documents' lowest (None without documents), ``gain_se`` its gain over none in standard errors over
    ``n_docs`` documents; ``auto`` applies it only with :data:`~token_distillation.config.AUTO_SHIFT_MIN_DOCS`
    documents and :data:`~token_distillation.config.AUTO_SHIFT_SE` standard errors."""
    if wanted != AUTO_SHIFT:
        applied = (best or 0.0) if wanted == HELDOUT else float(wanted)
        return applied, ("--output_rows_shift 0; heldout would apply the text NLL's lowest" if wanted == 0.0
                         else f"--output_rows_shift {wanted}")
    if best is None:
        return 0.0, "auto: no held-out corpus documents to choose it on; generated snippets have none"
    if not best:
        return 0.0, "auto: none is the lowest"
    if n_docs < AUTO_SHIFT_MIN_DOCS:
        return 0.0, (f"auto: {n_docs} held-out documents are too few to judge a shift by (fewer than "
                     f"{AUTO_SHIFT_MIN_DOCS}); the lowest, {best:+g}, is applied by --output_rows_shift heldout")
    if gain_se < AUTO_SHIFT_SE:
        return 0.0, (f"auto: the lowest, {best:+g}, beats none by only {gain_se:.1f} standard errors over {n_docs} "
                     f"documents (< {AUTO_SHIFT_SE:g}); pass --output_rows_shift heldout to apply it")
    return best, f"auto: {best:+g} beats none by {gain_se:.1f} standard errors over {n_docs} documents"


def _shared_shift(rows: NewRows, kl: dict, shift: tuple, spread: float, wanted, log: bool) -> dict:
    """``--output_rows_shift`` after the output-row fit: pick the shift (``wanted``: nats;
    :data:`~token_distillation.config.HELDOUT`: the one with the lowest text NLL of the held-out documents,
    ``kl["text"]`` from :func:`_text_by_shift`; :data:`~token_distillation.config.AUTO_SHIFT`: that one
    where it beats no shift by :data:`~token_distillation.config.AUTO_SHIFT_SE` standard errors paired over
    at least :data:`~token_distillation.config.AUTO_SHIFT_MIN_DOCS` documents
    (:func:`~token_distillation.output_rows.shift_gain`), else 0), move every new output row by it along ``shift[0]``
    (``shift = (direction, shifts measured)``), put the moved rows' held-out KL into
    ``kl["heldout_after"]`` and log both held-out measures at each shift (when ``log``).

    Returns:
        The report's summary: ``{"requested" (the flag's value), "applied", "reason" (why that shift, in
        words, as logged), "best_heldout" (the text NLL's
        lowest; None without documents), "best_heldout_gain_se" (its gain over no shift in standard errors;
        None without documents), "best_heldout_kl",
        "direction_sd", "heldout_text_nll": {shift: nats}, "heldout_text_documents", "heldout_text_positions",
        "heldout_kl_sum": {shift: nats}}``.
    """
    direction, shifts = shift
    best_kl, sums = choose_shift(kl, shifts)
    text, n_text, per_doc, n_docs = kl.get("text") or ([], 0, [], 0)
    best = lowest(text, shifts) if n_text else None
    gain_se = shift_gain(per_doc, shifts.index(0.0), shifts.index(best))[1] if n_text else None
    applied, how = _shift_decision(wanted, best, gain_se, n_docs)
    if wanted == HELDOUT and not n_text and log:
        logger.warning("--output_rows_shift heldout not applied: no held-out corpus document to measure it on "
                       "(generated snippets have none); pass a number of nats instead")
    if applied and sums:
        j = shifts.index(applied)
        with torch.no_grad():
            rows.out_rows += applied * direction.to(rows.out_rows.device, rows.out_rows.dtype)
        kl["heldout_after"] = [None if v is None else v[j] for v in kl["heldout_shift"]]
    if not sums:
        how = "no held-out snippet measured the fit's objective, so nothing is moved"
    if log and sums:
        near = [j for j, s in enumerate(shifts) if s in (-2.0, -1.0, -0.5, 0.0, 0.5) or s in (best, best_kl, applied)]
        if n_text:
            at0 = text[shifts.index(0.0)]
            moved = ", ".join(f"{shifts[j]:+g}: {100 * (text[j] / at0 - 1):+.3f}%" for j in near)
            edge = (" (the end of the measured range: a larger shift may be better still; pass one as a number)"
                    if best in (shifts[0], shifts[-1]) else "")
            logger.info("output rows (distill): held-out documents' text NLL (%d documents, %d positions) with "
                        "one shift of every new token's logit (nats; h @ direction = 1 +- %.3f on the held-out "
                        "snippets), relative to none: %s; lowest at %+g%s", n_docs, n_text, spread, moved, best, edge)
        logger.info("output rows (distill): summed held-out binary KL (the fit's objective) with every new token's "
                    "logit shifted by (nats) %s; lowest at %+g; %s", ", ".join(f"{shifts[j]:+g}: {sums[j]:.4g}" for j in near), best_kl,
                    f"applied {applied:+g} ({how})" if applied else f"not applied ({how})")
    return {"requested": wanted, "applied": applied if sums else 0.0, "reason": how, "best_heldout": best,
            "best_heldout_gain_se": gain_se, "best_heldout_kl": best_kl,
            "direction_sd": spread, "heldout_text_nll": {f"{s:g}": v for s, v in zip(shifts, text)},
            "heldout_text_documents": n_docs, "heldout_text_positions": n_text, "heldout_kl_sum": {f"{s:g}": v for s, v in zip(shifts, sums)}}


def _sharded_heldout(model, rows: NewRows, seqs, token_index: list[int], num_tokens: int, *, dist: DistContext,
                     **kw) -> HeldoutResult:
    """:func:`~token_distillation.train.heldout_eval` of a token-sharded run: each process evaluates
    the held-out snippets of its own tokens (``seqs``), and the results are combined on every
    process (a token's loss from the process that owns it; argmax counts summed). Needs every
    process's rows to be the trained ones when called after training (gathered first)."""
    part = heldout_eval(model, rows, seqs, token_index, num_tokens, **kw)
    parts = dist.all_gather_objects(part, "heldout")
    loss = None
    if part.loss_per_token is not None:
        loss = [next((p.loss_per_token[t] for p in parts if p.loss_per_token[t] is not None), None)
                for t in range(num_tokens)]
    argmax = None
    if part.argmax is not None:
        positions = sum(p.argmax["positions"] for p in parts)
        per_token = [sum(p.argmax["per_token"][j] for p in parts) for j in range(len(part.argmax["per_token"]))]
        expected = sum(round((p.argmax["expected_rate"] or 0.0) * p.argmax["positions"]) for p in parts)
        argmax = {"rate": sum(per_token) / positions if positions else None,
                  "expected_rate": expected / positions if positions else None,
                  "correct": sum(p.argmax["correct"] for p in parts), "positions": positions, "per_token": per_token}
    return HeldoutResult(loss, argmax)


def _train_input_rows(setup: Setup, ext: Extended, fp: dict, seqs, tix: list[int], loop_kw: dict, cache_bytes: int,
                      owned: list[int] | None = None, attach: dict | None = None):
    """Token Distillation of the new input rows, resumable from the output's checkpoints (``fp``:
    their fingerprint, :func:`_train_fingerprint` of ``seqs``).

    ``owned``: in a token-sharded run, the tokens this process trains (:func:`_train_shard`).
    ``attach``: more files written with the first checkpoint (the held-out measures before training)."""
    cfg, tc, rows = setup.cfg, setup.cfg.train, ext.rows
    attachments = {**(setup.generated.attachment() if setup.generated else {}), **(attach or {})}
    if tc.recipe == Recipe.PER_TOKEN:
        logger.info("recipe per-token: step size %.3g (= %.3g x RMS of the original embedding entries, %s "
                    "schedule), %d snippet(s) per update", loop_kw["lr"], tc.token_distillation_lr_relative,
                    tc.lr_schedule.value, tc.snippets_per_update)
    dist = setup.dist if setup.dist.distributed else None
    if owned is not None:
        return _train_shard(setup, ext, seqs, tix, loop_kw, cache_bytes, owned, fp, attachments)
    ckpt = Checkpointer(setup.out / CHECKPOINT_DIRNAME, cfg.output.checkpoint_every, fp, resume=cfg.output.resume,
                        dist=dist, minutes=cfg.output.checkpoint_minutes, always_final=True,  # a stop after training
                        attachments=attachments) if setup.checkpoints else None  # (held-out pass, output rows) keeps it
    return train(ext.model, rows, seqs, tix, layer=ext.layer, loss_method=tc.loss_method,
                 autocast_dtype=setup.autocast_dtype, recipe=tc.recipe, snippets_per_update=tc.snippets_per_update,
                 lr_schedule=tc.lr_schedule, teacher_cache_bytes=cache_bytes,
                 token_texts=[t.text for t in ext.tokens], dist=dist, checkpointer=ckpt, **loop_kw)


def _train_fingerprint(setup: Setup, ext: Extended, seqs) -> dict:
    """What the training checkpoints must match to be resumed (:func:`~token_distillation.checkpoint.fingerprint`):
    the flags, the model, the new tokens and rows, the training snippets (``seqs``), the batch."""
    return fingerprint(setup.cfg.to_dict(), model_identity=setup.source.identity, tokens=[t.text for t in ext.tokens],
                       new_ids=ext.rows.token_ids, rows_shape=list(ext.rows.rows.shape), snippets=snippet_digest(seqs),
                       token_distillation_batch_size=setup.batch_size,  # auto: the batch it resolved to
                       words_digest=setup.words_digest)


def _train_shard(setup: Setup, ext: Extended, seqs, tix: list[int], loop_kw: dict, cache_bytes: int,
                 owned: list[int], fp: dict, attachments: dict | None = None) -> TrainResult:
    """Token sharding: this process trains the rows of its own tokens ``owned`` on their snippets
    (its own per-token batches at the full batch size; no communication per step), checkpoints its
    own state (:func:`~token_distillation.checkpoint.shard_prefix`), then every process's rows are
    gathered on every process. ``attachments``: files the main process writes with its first checkpoint.

    Returns:
        the combined :class:`TrainResult`: ``steps`` and ``seconds`` of the longest shard; the loss
        curve summed step by step over the processes (each a sum over its batch's tokens).
    """
    cfg, tc, rows, dist = setup.cfg, setup.cfg.train, ext.rows, setup.dist
    ckpt_dir = setup.out / CHECKPOINT_DIRNAME
    if not cfg.output.resume and dist.is_main and ckpt_dir.is_dir():
        logger.info("starting over: removing old checkpoints in %s", ckpt_dir)
        shutil.rmtree(ckpt_dir)
    dist.wait("checkpoints-cleared")
    own = set(owned)
    local = [i for i, t in enumerate(tix) if t in own]
    ckpt = Checkpointer(ckpt_dir, cfg.output.checkpoint_every, {**fp, "shard": [dist.rank, dist.world_size],
                                                                 "shard_tokens": list(owned)},
                        resume=cfg.output.resume, dist=None, minutes=cfg.output.checkpoint_minutes,
                        prefix=shard_prefix(dist.rank, dist.world_size), always_final=True,
                        attachments=attachments if dist.is_main else None)
    inject_faults(ckpt, dist.rank)
    collectives, waits = dist.collectives, dist.waits
    result = TrainResult()
    if local:
        result = train(ext.model, rows, [seqs[i] for i in local], [tix[i] for i in local], layer=ext.layer,
                       loss_method=tc.loss_method, autocast_dtype=setup.autocast_dtype, recipe=tc.recipe,
                       snippets_per_update=tc.snippets_per_update, lr_schedule=tc.lr_schedule,
                       teacher_cache_bytes=cache_bytes, token_texts=[t.text for t in ext.tokens], dist=None,
                       checkpointer=ckpt, desc=f"token distillation [process {dist.rank}]", **loop_kw)
    during = dist.collectives - collectives + dist.waits - waits  # collectives and waits on the store
    logger.info("process %d: %d training steps on %d tokens in %.1fs, %d collective operations or waits during training",
                dist.rank, result.steps, len(owned), result.seconds, during)
    try:
        dist.gather_rows_(rows.rows, owned)
    except Interrupted as e:  # stopped while waiting for the other shards: this one's rows are checkpointed
        raise Interrupted(e.signum, step=result.steps, checkpoint=ckpt.checkpoints()[-1] if ckpt.checkpoints()
                          else None, where="while waiting for the other processes") from None
    parts = dist.all_gather_objects({"steps": result.steps, "loss_curve": result.loss_curve,
                                     "seconds": result.seconds, "tokens": len(owned), "snippets": len(local),
                                     "communication_during_training": during}, "train-results")
    longest = max(len(p["loss_curve"]) for p in parts)
    curve = [sum(p["loss_curve"][k] for p in parts if k < len(p["loss_curve"])) for k in range(longest)]
    setup.dist_info = {"mode": "token-sharded", "per_process": parts}
    return TrainResult(loss_curve=curve, steps=max(p["steps"] for p in parts),
                       seconds=max(p["seconds"] for p in parts))


def teacher_state_bytes(seqs, model, setup: Setup) -> int:
    """Bytes of the teacher hidden states of ``seqs`` at their loss positions (from the first new
    token on), as the teacher cache stores them (autocast dtype, else the weights' dtype)."""
    positions = sum(len(s.student_ids) - max(s.first_new, 0) for s in seqs)
    hidden = model.get_input_embeddings().weight.shape[1]
    item = torch.empty((), dtype=setup.autocast_dtype or setup.weights_dtype).element_size()
    return positions * hidden * item


def finish(setup: Setup, tg: Targets, sn: Snippets, ext: Extended, tr: Trained) -> dict[str, Any]:
    """Stage 6, in memory: write the trained rows into the embedding matrices (the model in the
    dtype it is saved in) and build the report (the content of report.json)."""
    model, rows, emb = ext.model, ext.rows, ext.model.get_input_embeddings().weight
    with torch.no_grad():
        ids_t = torch.tensor(rows.token_ids, device=emb.device)
        if rows.original is not None:
            emb.copy_(rows.original.detach().to(emb.dtype))
        emb[ids_t] = rows.rows.detach().to(emb.dtype)
        if not ext.tied:
            model.get_output_embeddings().weight[ids_t] = rows.out_rows.detach().to(emb.dtype)
    if emb.dtype != setup.save_dtype:  # saved as the source was stored (originals round-trip exactly)
        model.to(setup.save_dtype)
    return build_report(setup, tg, sn, ext, tr)


def write_output(setup: Setup, tg: Targets, ext: Extended, report: dict[str, Any]) -> Path:
    """Stage 6, on disk: save model, tokenizer, the exports, report.json and the token files
    atomically into ``setup.out`` (never losing the training, see
    :func:`token_distillation.report.save_output`); returns the directory written."""
    model, rows, exports = ext.model, ext.rows, setup.cfg.output.exports
    peft = peft_plan(setup.cfg, tg.model_config)
    if peft:  # the dry run's line, now for what is written
        logger.info("--export peft: %s (%s/)", peft, ADAPTER_DIRNAME)
        report["peft_adapter"] = peft

    def _write(tmp: Path) -> None:
        if "hf" in exports:
            model.save_pretrained(tmp, safe_serialization=True)
            ext.tokenizer.save_pretrained(tmp)
        if "peft" in exports:
            write_peft_adapter(model, ext.tokenizer, rows.token_ids, tmp / ADAPTER_DIRNAME, setup.source.spec,
                               untied_by_run=ext.tied_source and not ext.tied,
                               base_path=weights_path(setup.source, setup.cache_root))
        if "gguf" in exports:
            report["gguf_export"] = write_gguf(Path(setup.source.path) / setup.source.gguf_file, model, ext.tokenizer,
                                               rows.token_ids, tmp / GGUF_NAME,
                                               untied_by_run=ext.tied_source and not ext.tied)
        write_json(tmp / "report.json", report)
        write_target_files(tmp, tg.targets, tg.records, added={t.text for t in ext.tokens},
                           skipped=report.get("skipped_tokens") or {})

    ckpt_dir = setup.out / CHECKPOINT_DIRNAME
    had_checkpoints = ckpt_dir.is_dir()
    out = save_output(setup.out, _write, setup.cfg, rows, ext.tokenizer, report, setup.source.spec,
                      untie=ext.tied_source and not ext.tied, save_dtype=setup.save_dtype)
    if had_checkpoints and not ckpt_dir.exists():
        logger.info("removed the run's checkpoints (%s): the saved output replaces them", ckpt_dir)
    return out


def _generation_kw(cfg: RunConfig) -> dict:
    sc = cfg.snippets
    return dict(seed=cfg.train.seed, temperature=sc.generation_temperature, top_p=sc.generation_top_p,
                use_chat_template=sc.generation_chat_template)


def top_up_wanted(cfg: RunConfig, snips: SnippetSet) -> list[tuple[int, int]]:
    """Per token, the ``(train, heldout)`` snippets to generate on top of mined ones
    (``--snippet_source corpus-then-generated``): ``(0, 0)`` for tokens with at least
    ``--min_snippets`` mined training snippets, else what is missing to ``--snippet_num`` /
    ``--heldout_snippet_num``."""
    sc = cfg.snippets
    return [(sc.snippet_num - c, max(0, sc.heldout_snippet_num - h)) if c < sc.min_snippets else (0, 0)
            for c, h in zip(snips.train_counts, snips.heldout_counts)]


def _topped_up_sources(mined: SnippetSet, want: list[tuple[int, int]]) -> list[str]:
    return [("corpus+generated" if c else "generated") if w != (0, 0) else "corpus"
            for c, w in zip(mined.train_counts, want)]


#: corpus_info key that carries the over-firing words from snippet collection to the firing report
OVERFIRING_KEY = "_overfiring_words"


def _add_inexact(cfg: RunConfig, snips: SnippetSet, corpus, tokenizer, tokens: list[NewToken],
                 bos: list[int]) -> Firings | None:
    """``--alignment chars`` with a fast tokenizer: add the snippets inside longer words
    (:func:`~token_distillation.snippets.add_inexact_snippets`, ``snips`` changed in place) and return
    the firing counts of that pass (``.info``: the report's ``inexact_snippets``); otherwise None."""
    if cfg.train.alignment != Alignment.CHARS or not getattr(tokenizer, "is_fast", False) or not tokens:
        return None
    sc, t0 = cfg.snippets, time.time()
    firings = Firings(np.zeros((len(tokens), 2), dtype=np.int64))
    info = firings.info = add_inexact_snippets(snips, corpus.iter_docs(), tokenizer, tokens, sc.snippet_len, bos,
                                               cfg.corpus.heldout_fraction if sc.heldout_snippet_num else 0.0,
                                               cfg.train.seed, want=(sc.snippet_num, sc.heldout_snippet_num),
                                               firings=firings)
    if not info["train"] and not info["heldout"]:
        logger.info("--alignment chars: no new token is used inside a longer word in the documents read (%.1f s)",
                    time.time() - t0)
    else:
        logger.info("--alignment chars: %.1f%% of the new tokens' uses in the corpus are inside longer words%s, so "
                    "%d training / %d held-out snippets are windows around such uses (each token's share of its "
                    "snippets as in the corpus; more where it has too few other uses) (%.1f s)",
                    100 * info["inexact_share"], _most_common_inexact(firings.words or {}, tokens), info["train"],
                    info["heldout"], time.time() - t0)
    return firings


def _most_common_inexact(words: dict, tokens: list[NewToken]) -> str:
    """`` (most often ' agonist' in 'agonists', 13 times)``: the commonest (token, longer word) pair of
    a firing scan (``words``: token index -> Counter of the words it fired inside), or ``""``. (A
    word-list entry without its leading space fires in the word itself after a space: `` (most often
    'ischemia' in ' ischemia', ...)``; the list's reader already warned about such entries and named
    --add_leading_space.)"""
    pairs = [(n, t, w) for t, c in words.items() for w, n in c.items()]
    if not pairs:
        return ""
    n, t, w = max(pairs, key=lambda p: (p[0], -p[1]))
    if w == tokens[t].text:  # the same letters: the use differs by the space before it
        w = " " + w
    return f" (most often {tokens[t].text!r} in {w!r}, {n} time{'s' if n != 1 else ''})"


def collect_snippets(cfg: RunConfig, src: SnippetSource, tokens: list[NewToken], corpus, tokenizer, bos: list[int],
                     load, device: torch.device, mined: SnippetSet | None = None, scan: ScanResult | None = None,
                     cache: GeneratedSnippetCache | None = None):
    """Training and held-out snippets for ``tokens``: mined from ``corpus`` (``mined``: already
    mined while the corpus was scanned, see :class:`~token_distillation.snippets.SnippetMiner`),
    generated by the model (``load()`` returns it; called only when snippets are generated), or
    mined then topped up. ``cache``: generated snippets are read from it on ``--resume`` and
    remembered in it for the checkpoints.

    Returns:
        ``(snippets, corpus_info for the report, per-token snippet source, the loaded model or None)``.
    """
    sc = cfg.snippets
    model = None

    def _generate(counts: list[tuple[int, int]]) -> SnippetSet:
        nonlocal model
        snips = cache.get(counts) if cache is not None else None
        if snips is None:
            model = load()
            snips = generate_snippets(model, tokenizer, tokens, sc.snippet_len, sc.snippet_num,
                                      sc.heldout_snippet_num, device=device, counts=counts, **_generation_kw(cfg))
            if cache is not None:
                cache.put(counts, snips)
        return snips

    if src == SnippetSource.GENERATED:
        snips = _generate([(sc.snippet_num, sc.heldout_snippet_num)] * len(tokens))
        corpus_info: dict[str, Any] = {"source": "generated"}
        token_sources = ["generated"] * len(tokens)
    else:
        snips = mined if mined is not None else _mine(cfg, corpus, tokens, bos)
        firings = _add_inexact(cfg, snips, corpus, tokenizer, tokens, bos)
        inexact = firings.info if firings is not None else None
        corpus_info = {"source": src.value, "dataset_path": cfg.corpus.dataset_path or "texts (in memory)",
                       "num_docs": corpus.num_docs,
                       "num_tokens": int(corpus.num_tokens),
                       "docs_read": scan.docs_read if scan else corpus.num_docs,
                       "scan_stop_reason": scan.stop_reason if scan else None,
                       "docs_needed": scan.docs_needed if scan else None,
                       "train_doc_ids": [corpus.doc_id(d) for d in snips.train_docs],
                       "heldout_doc_ids": [corpus.doc_id(d) for d in snips.heldout_docs],
                       "inexact_snippets": inexact,
                       # popped by gather_snippets (not written): the over-firing words of this decoding pass
                       OVERFIRING_KEY: (overfiring_words(firings.words, [t.text for t in tokens])
                                        if firings is not None else None)}
        token_sources = ["corpus"] * len(tokens)
        if src == SnippetSource.CORPUS_THEN_GENERATED:
            want = top_up_wanted(cfg, snips)
            if any(w != (0, 0) for w in want):
                logger.info("topping up %d token(s) with fewer than %d corpus snippets with generated ones",
                            sum(w != (0, 0) for w in want), sc.min_snippets)
                gen = _generate(want)
                token_sources = _topped_up_sources(snips, want)
                snips = top_up(snips, gen)
    return snips, corpus_info, token_sources, model


def _mine(cfg: RunConfig, corpus, tokens: list[NewToken], bos: list[int]) -> SnippetSet:
    """Mine a tokenized corpus held in memory (:class:`~token_distillation.corpus.TokenizedCorpus`)
    with the same miner as the corpus scan, in one batch."""
    sc = cfg.snippets
    miner = SnippetMiner(tokens, sc.snippet_len, sc.snippet_num, sc.heldout_snippet_num, cfg.corpus.heldout_fraction,
                         bos, cfg.train.seed)
    miner.feed(0, corpus.ids, corpus.offsets - corpus.offsets[0])
    return miner.result()


def keep_tokens_with_snippets(cfg: RunConfig, snips: SnippetSet, tokens: list[NewToken], token_sources: list[str],
                              skipped: dict[str, str]):
    """Drop tokens with fewer than ``--min_snippets`` training snippets (when the method trains).

    Returns:
        ``(snippets, tokens, token_sources, skipped)`` for the kept tokens; ``skipped`` adds the
        dropped tokens with the reason.

    Raises:
        ConfigError: no token is left.
    """
    too_few = too_few_snippets(cfg, snips.train_counts, tokens)
    keep = [i for i, t in enumerate(tokens) if t.text not in too_few]
    skipped = {**skipped, **too_few}
    if not keep:
        raise ConfigError(_none_left(cfg))
    return _reindex(snips, keep), [tokens[i] for i in keep], [token_sources[i] for i in keep], skipped


def _none_left(cfg: RunConfig) -> str:
    """The error of a run in which no new token has ``--min_snippets`` training snippets."""
    return (f"no new token has enough snippets (--min_snippets {cfg.snippets.min_snippets}); pass a larger "
            "--dataset_path, lower --min_snippets, or use --use_generated_snippets")


def too_few_snippets(cfg: RunConfig, train_counts: list[int], tokens: list[NewToken],
                     verb: str = "skipping") -> dict[str, str]:
    """Tokens with fewer than ``--min_snippets`` training snippets (when the method trains), each
    with the reason, logged as warnings; a dry run reports them the same way ("a real run would skip")."""
    if cfg.train.init_method not in TRAINED:
        return {}
    out = {}
    for t, c in zip(tokens, train_counts):
        if c < cfg.snippets.min_snippets:
            out[t.text] = (f"only {c} training snippets (< --min_snippets {cfg.snippets.min_snippets}); "
                           "use a larger corpus, lower --min_snippets, or --use_generated_snippets")
            logger.warning("%s %r: %s", verb, t.text, out[t.text])
    return out


#: init methods whose output rows ``--output_embeddings auto`` fits by distillation
DISTILLED_METHODS = frozenset({InitMethod.TOKEN_DISTILLATION, InitMethod.TOKEN_DISTILLATION_RANDINIT})


def output_plan(cfg: RunConfig, model_config) -> str:
    """What a real run would do with the output embeddings of this model (from its config, without
    loading it), in words: keep them tied, untie them, and how the new output rows are set."""
    tied = _config_tied(model_config)
    pol = _output_policy(cfg, tied)
    if pol is None:
        return "tied: a real run keeps them tied (a new token's output row is its input row)"
    how = {OutputEmbeddings.DISTILL: "fits the new output rows by distillation",
           OutputEmbeddings.ZERO: "sets the new output rows to zero",
           OutputEmbeddings.SUBTOKEN_MEAN: "sets the new output rows to the mean of their subtokens' output rows",
           OutputEmbeddings.NTP: "trains the new output rows by next-token prediction"}[pol]
    if tied:
        return (f"tied: a real run unties them (the output layer becomes a separate copy, saved with the model) "
                f"and {how} ({pol.value})")
    return f"untied: a real run {how} ({pol.value})"


def _config_tied(model_config) -> bool:
    """Whether a model's config ties its output embeddings to the input ones (text config of multimodal models)."""
    text_cfg = text_config(model_config)
    return bool(getattr(text_cfg, "tie_word_embeddings", False))


def peft_plan(cfg: RunConfig, model_config) -> str | None:
    """With ``--export peft``: what the adapter will hold for this model and flags, in words (None
    without it). A tied model kept tied: the new input rows only (they are the output rows too); a
    tied model that the run unties: input and output rows, and the base must be untied before the
    adapter is applied (:func:`~token_distillation.export.load_adapter` does it); an untied model:
    input and output rows."""
    if "peft" not in cfg.output.exports:
        return None
    tied = _config_tied(model_config)
    if _output_policy(cfg, tied) is None:
        return ("the adapter holds the new tokens' input rows only (the model stays tied: they are its output "
                "rows too)")
    if tied:
        from .export import ADAPTER_INFO

        return ("the adapter holds the new tokens' input and output rows; the run unties the model, so the base "
                "must be untied before the adapter is applied (token_distillation.export.load_adapter does it; "
                f"peft/{ADAPTER_INFO} says so)")
    return "the adapter holds the new tokens' input and output rows"


def _output_policy(cfg: RunConfig, tied: bool) -> OutputEmbeddings | None:
    """Resolved ``--output_embeddings``: None keeps a tied model tied (``tied``); any policy on a
    tied model unties it. ``auto``: distill for the Token Distillation methods (measured better on
    raw text: docs/results.md), unless ``--set_output_to_zero_if_untied false`` asks for subtoken-mean;
    for the other methods (the paper's baselines) subtoken-mean for tied models, else zero (or
    subtoken-mean with ``--set_output_to_zero_if_untied false``)."""
    pol = cfg.output.output_embeddings
    if pol == OutputEmbeddings.TIED:
        return None
    if pol != OutputEmbeddings.AUTO:
        return pol
    if cfg.train.init_method in DISTILLED_METHODS and cfg.output.set_output_to_zero_if_untied:
        return OutputEmbeddings.DISTILL
    if tied:
        return OutputEmbeddings.SUBTOKEN_MEAN
    return OutputEmbeddings.ZERO if cfg.output.set_output_to_zero_if_untied else OutputEmbeddings.SUBTOKEN_MEAN


#: warn when new tokens are the argmax this much more often than they are the true next token
ARGMAX_WARN_MARGIN = 0.05


def _some(names: list, most: int = 10, fmt=repr) -> str:
    """``'a', 'b', ...``: the first ``most`` names for a log line (each written by ``fmt``)."""
    return ", ".join(fmt(t) for t in names[:most]) + (" ..." if len(names) > most else "")


def _warn_missing_heldout(tokens, heldout_counts: list[int], wanted: int) -> list[str]:
    """Warn about tokens without held-out snippets (their held-out loss cannot be judged); log those
    with fewer than ``wanted`` (their held-out loss rests on fewer snippets). Returns the former."""
    missing = [t.text for t, n in zip(tokens, heldout_counts) if n == 0] if wanted > 0 else []
    if missing:
        logger.warning("%d token(s) have no held-out snippet, so their held-out loss cannot be judged: %s "
                       "(a larger corpus or --heldout_fraction gives them some)", len(missing), _some(missing))
    _log_fewer(tokens, heldout_counts, wanted, "held-out", "--heldout_snippet_num", "so their held-out loss is noisier")
    return missing


def _log_few_train(tokens, train_counts: list[int], wanted: int) -> None:
    """Log the tokens with fewer training snippets than ``--snippet_num`` (the corpus has fewer
    uses of them; those below ``--min_snippets`` were dropped or topped up before), fewest first."""
    _log_fewer(tokens, train_counts, wanted, "training", "--snippet_num", "the corpus has fewer uses of them")


def _log_fewer(tokens, counts: list[int], wanted: int, kind: str, flag: str, why: str) -> None:
    """One info line naming the tokens with some but fewer than ``wanted`` snippets of ``kind``
    (``counts`` per token), fewest first."""
    few = sorted(((t.text, n) for t, n in zip(tokens, counts) if 0 < n < wanted), key=lambda tn: tn[1])
    if few:
        logger.info("%d of %d token(s) have fewer %s snippets than %s %d (%s): %s", len(few), len(tokens), kind,
                    flag, wanted, why, _some(few, fmt=lambda tn: f"{tn[0]!r} ({tn[1]})"))


#: a trained token whose held-out distillation loss fell by less than this share is reported
NOT_IMPROVED_SHARE = 0.10


def _not_improved(tokens, before: list, after: list) -> list[str]:
    """Tokens whose held-out loss fell by less than ``NOT_IMPROVED_SHARE`` of its initial value
    (tokens without held-out snippets are not judged); logged as a warning."""
    bad = [t.text for t, b, a in zip(tokens, before, after)
           if b is not None and a is not None and a > (1 - NOT_IMPROVED_SHARE) * b]
    if bad:
        logger.warning("%d of %d tokens improved their held-out distillation loss by less than %d%% (see "
                       "report.json tokens[].heldout_loss_init/final): %s", len(bad), len(tokens),
                       round(100 * NOT_IMPROVED_SHARE), _some(bad))
    return bad


def _warn_if_new_tokens_dominate(stats: dict, tied: bool) -> None:
    rate, expected = stats["rate"], stats["expected_rate"]
    if rate is None or rate <= (expected or 0.0) + ARGMAX_WARN_MARGIN:
        return
    logger.warning("new tokens are the top prediction at %.1f%% of held-out positions (true next token at "
                   "%.1f%%): the model will over-generate them. %s", 100 * rate, 100 * (expected or 0),
                   "Remedies: --output_embeddings auto / subtoken-mean (unties the output rows) or --loss_method "
                   "MSE-on-hiddens,CE-auto-weighted; see docs/methods.md" if tied else
                   "Check --output_embeddings.")




def dry_run(setup: Setup, tg: Targets) -> RunResult:
    """``--dry_run``: mine snippets (corpus only), log the coverage table and the tokens a real run
    would skip, write new_tokens.jsonl, coverage.tsv and report.json; no model is loaded. With
    ``--alignment chars`` (fast tokenizer) the snippet counts include those a real run takes from uses
    inside longer words, and the table counts those uses (``inexact_firings``)."""
    cfg, sc, targets = setup.cfg, setup.cfg.snippets, tg.targets
    train_counts = heldout_counts = inexact = None
    topped: set[int] = set()  # tokens a real run tops up with generated snippets (corpus-then-generated)
    if tg.corpus is not None:
        bos = bos_prefix(tg.tokenizer)
        snips = tg.mined if tg.mined is not None else _mine(cfg, tg.corpus, targets.tokens, bos)
        firings = _add_inexact(cfg, snips, tg.corpus, tg.tokenizer, targets.tokens, bos)
        inexact = firings.counts[:, 1].tolist() if firings is not None else None
        train_counts, heldout_counts = snips.train_counts, snips.heldout_counts
        if setup.snippet_source == SnippetSource.CORPUS_THEN_GENERATED:
            topped = {i for i, w in enumerate(top_up_wanted(cfg, snips)) if w != (0, 0)}
            if topped:
                logger.info("dry run: a real run would top up %d token(s) with fewer than %d corpus snippets with "
                            "generated ones (not generated in a dry run)", len(topped), sc.min_snippets)
        # the tokens a real run trains on mined snippets
        mined = [i for i, c in enumerate(train_counts) if c >= sc.min_snippets]
        _warn_missing_heldout([targets.tokens[i] for i in mined], [heldout_counts[i] for i in mined],
                              sc.heldout_snippet_num)
        _log_few_train([targets.tokens[i] for i in mined], [train_counts[i] for i in mined], sc.snippet_num)
    else:
        logger.info("dry run: no corpus, so a real run would generate %d training and %d held-out snippets per token "
                    "with the model (not done in a dry run)", sc.snippet_num, sc.heldout_snippet_num)
    table = coverage_table(tg.records, train_counts, heldout_counts, inexact)
    logger.info("dry run: coverage of %d new tokens (snippets capped at --snippet_num %d; occurrences: uses as the "
                "word's own subtokens; count: the corpus count the list was ranked by, empty for a word list%s)\n%s",
                len(tg.records), sc.snippet_num,
                "; inexact_firings: uses inside longer words, whose snippets the training counts include"
                if inexact is not None else "", table)
    plan = output_plan(cfg, tg.model_config)
    logger.info("dry run: output embeddings %s", plan)
    peft = peft_plan(cfg, tg.model_config)
    if peft:
        logger.info("dry run: --export peft: %s", peft)
    usable = would_skip = None
    if train_counts is not None:
        usable = sum(1 for i, c in enumerate(train_counts) if c >= sc.min_snippets or i in topped)
        rest = [i for i in range(len(train_counts)) if i not in topped]
        would_skip = too_few_snippets(cfg, [train_counts[i] for i in rest], [targets.tokens[i] for i in rest],
                                      verb="a real run would skip")
    report = {**dry_run_report(cfg, tg.summary, {**targets.skipped, **(would_skip or {})}, usable),
              "output_embeddings": plan, **({"peft_adapter": peft} if peft else {})}

    def _write(tmp: Path) -> None:
        write_json(tmp / "report.json", report)
        (tmp / "coverage.tsv").write_text(table, encoding="utf-8")
        write_target_files(tmp, targets, tg.records)

    write_output_dir(setup.out, _write, kind="dry-run")
    report["total_seconds"] = time.perf_counter() - setup.started
    logger.info("dry run: wrote %s to %s; model not loaded", ", ".join(sorted(p.name for p in setup.out.iterdir())),
                setup.out)
    if usable == 0 and cfg.train.init_method in TRAINED:  # the real run's error, after the files are written
        why = _none_left(cfg)
        if not any(train_counts) and not any(heldout_counts):
            why = words_absent(cfg.corpus.dataset_path, len(train_counts))
        raise ConfigError(f"dry run: a real run would stop: {why} (coverage.tsv in {setup.out})")
    return RunResult(setup.out, report)
