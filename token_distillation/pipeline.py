"""``run(config)``: the stages of a run, in README order.

1. resolve device, dtype and seed; check the output path (nothing is loaded yet)
2. load the tokenizer; build the new-token list
3. snippets: mine the corpus, or generate them with the model
4. load the model; extend tokenizer and embedding matrix
5. initialise the new rows; train them (Token Distillation)
6. write the rows, set untied output rows, save model + tokenizer + report.json atomically
"""

from __future__ import annotations

import contextlib
import json
import logging
import platform
import random
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import __version__
from .alignment import PhraseMatcher, merge
from .checkpoint import CHECKPOINT_DIRNAME, Checkpointer, fingerprint, prepare_output, snippet_digest
from .config import ConfigError, MixedPrecision, OutputEmbeddings, Recipe, RunConfig, SnippetSource
from .corpus import check_text_column, tokenize_corpus
from .distributed import DistContext, check_batch_divisible, launched_world_size
from .fastpath import TeacherCache
from .interrupts import Interrupted, deferred_signals
from .firing import encode_probes, firing_report
from .regime import relative_lr
from .init_methods import INITIALISERS, TRAINED, subtoken_mean
from .models import (
    check_saveable,
    check_context_length,
    embedding_scale,
    extend_embeddings,
    is_tied,
    load_config,
    load_model,
    load_tokenizer,
    resolve_model_source,
    untie_embeddings,
)
from .paths import foreign_entries, read_manifest, write_output_dir
from .rescue import recovery_command, write_rows
from .snippets import SnippetSet, generate_snippets, mine_snippets, top_up
from .targets import build_targets, corpus_occurrences, coverage_table, log_summary, new_token_records, write_new_tokens
from .tokenization import NewToken, add_new_tokens, bos_prefix
from .train import NewRows, heldout_eval, resolve_layer, train, train_output_rows

logger = logging.getLogger(__name__)


@dataclass
class RunResult:
    """What :func:`run` produced: the output directory and the report written into it."""

    out_path: Path
    report: dict[str, Any] = field(default_factory=dict)


def resolve_device(spec: str) -> torch.device:
    """``auto`` -> cuda if available, else mps if available, else cpu."""
    if spec == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    dev = torch.device(spec)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {spec}: CUDA is not available on this machine; use --device cpu or auto")
    return dev


def resolve_precision(mp: MixedPrecision, device: torch.device) -> tuple[torch.dtype, torch.dtype | None]:
    """(weights dtype, autocast dtype or None). bf16 autocast on CUDA by default, fp32 on CPU."""
    if mp == MixedPrecision.AUTO:
        mp = MixedPrecision.BF16 if device.type == "cuda" else MixedPrecision.NO
    if mp == MixedPrecision.NO:
        return torch.float32, None
    dt = torch.bfloat16 if mp == MixedPrecision.BF16 else torch.float16
    weights = dt if device.type == "cuda" else torch.float32
    return weights, dt


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def _merge_all(snips, tokens: list[NewToken]):
    matcher = PhraseMatcher([t.subtoken_ids for t in tokens])
    new_ids = [t.token_id for t in tokens]
    return [merge(s.ids, matcher, new_ids) for s in snips], [s.token_index for s in snips]


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


def run(cfg: RunConfig) -> RunResult:
    """Run the whole pipeline for a validated config.

    From the start of training until the output is saved, stop signals are deferred (see
    :mod:`token_distillation.interrupts`): the current step is checkpointed before stopping.

    Raises:
        ConfigError: bad input found after start-up checks (e.g. no usable tokens, no snippets),
            or a failed save (the trained rows are kept; the message says how to recover).
        Interrupted: a stop signal during training or after it (a checkpoint was written).
    """
    with contextlib.ExitStack() as stack:
        return _run(cfg, stack)


def _run(cfg: RunConfig, stack: contextlib.ExitStack) -> RunResult:
    t0 = time.perf_counter()
    seed_everything(cfg.train.seed)
    if cfg.train.init_method in TRAINED:
        check_batch_divisible(cfg.train.token_distillation_batch_size, launched_world_size())
    cache_root = cfg.model.resolved_cache_dir
    source = resolve_model_source(cfg.model.model_path)
    out = prepare_output(cfg.output.out_path, cfg.output.overwrite, cfg.output.resume, source,
                         dry_run=cfg.output.dry_run)
    if cfg.resolved_snippet_source != SnippetSource.GENERATED or cfg.corpus.dataset_path:
        check_text_column(cfg.corpus)  # before the tokenizer and the corpus load
    dist = DistContext.create(cfg.model.device, resolve_device)
    device = dist.device
    weights_dtype, autocast_dtype = resolve_precision(cfg.model.mixed_precision, device)
    logger.info("model %s | device %s | weights %s | autocast %s | seed %d | processes %d", source.spec, device,
                weights_dtype, autocast_dtype, cfg.train.seed, dist.world_size)

    with dist.main_process_first():  # the main process fills the model cache (GGUF conversion) first
        model_config = load_config(source, cache_root)
        resolve_layer(model_config, cfg.train.target_layer)
        tokenizer = load_tokenizer(source, cache_root)
    text_cfg = model_config.get_text_config() if hasattr(model_config, "get_text_config") else model_config
    if cfg.output.output_embeddings == OutputEmbeddings.TIED and not getattr(text_cfg, "tie_word_embeddings", True):
        raise ConfigError("--output_embeddings tied: this model's output embeddings are not tied; use auto, "
                          "zero, subtoken-mean or ntp")
    check_context_length(model_config, cfg.snippets.snippet_len, len(bos_prefix(tokenizer)))
    targets = build_targets(cfg.targets, tokenizer, cfg.corpus, cache_root)
    tokens = targets.tokens
    bos = bos_prefix(tokenizer)

    model = None
    sc = cfg.snippets
    src = cfg.resolved_snippet_source
    occurrences = None
    corpus = None
    if src != SnippetSource.GENERATED:
        with dist.main_process_first():  # tokenized once, shared through the cache
            corpus = tokenize_corpus(cfg.corpus, tokenizer, cache_root)
        occurrences, len_before, len_after = corpus_occurrences(corpus, tokens)
        target_summary = log_summary(targets, len_before, len_after)
    else:
        target_summary = log_summary(targets)
    records = new_token_records(targets, tokenizer, occurrences)
    if cfg.output.dry_run:
        return _dry_run(cfg, out, targets, records, corpus, tokenizer, target_summary, t0)

    def _snippets():
        nonlocal model
        snips, corpus_info, token_sources, model = collect_snippets(
            cfg, src, tokens, corpus, tokenizer, bos, lambda: load_model(source, cache_root, device, weights_dtype),
            device)
        return snips, corpus_info, token_sources

    # Snippets are mined (or generated) once, by the main process, and sent to the others.
    snips, corpus_info, token_sources = dist.broadcast_from_main(_snippets)
    if src == SnippetSource.GENERATED:
        scan_ids = [s.ids for s in snips.train + snips.heldout]
    else:
        scan_ids = (corpus.doc(d) for d in range(corpus.num_docs))

    snips, tokens, token_sources, skipped = keep_tokens_with_snippets(cfg, snips, tokens, token_sources,
                                                                      targets.skipped)
    _warn_missing_heldout(tokens, snips.heldout_counts, sc.heldout_snippet_num)

    logger.info("pre-flight: %d new tokens, %d skipped, %d training / %d held-out snippets, method %s",
                len(tokens), len(skipped), len(snips.train), len(snips.heldout), cfg.train.init_method.value)

    if model is None:
        model = load_model(source, cache_root, device, weights_dtype)
    check_saveable(model)
    layer = resolve_layer(model, cfg.train.target_layer)
    num_original = model.get_input_embeddings().weight.shape[0]
    probes = encode_probes(tokenizer, tokens)
    new_ids = add_new_tokens(tokenizer, [t.text for t in tokens])
    tokens = [NewToken(t.text, t.subtoken_ids, i) for t, i in zip(tokens, new_ids)]
    firing = firing_report(tokenizer, tokens, probes, scan_ids)
    extend_embeddings(model, len(tokenizer))
    n_orig = min(num_original, new_ids[0])
    tied_source = is_tied(model)
    out_policy = _output_policy(cfg, tied_source)
    if tied_source and out_policy is not None:
        logger.info("--output_embeddings %s on a tied model: untying (the output layer becomes a separate copy)",
                    out_policy.value)
        untie_embeddings(model)
    tied = is_tied(model)
    scale = embedding_scale(model)
    emb = model.get_input_embeddings().weight
    tc = cfg.train
    init = INITIALISERS[tc.init_method](emb.detach(), tokens, seed=tc.seed, num_original=n_orig)
    out_init = None
    if not tied:
        out_w = model.get_output_embeddings().weight.detach()
        out_init = (torch.zeros((len(tokens), out_w.shape[1])) if out_policy == OutputEmbeddings.ZERO
                    else subtoken_mean(out_w, tokens)).to(device)
    rows = NewRows(init.to(device), new_ids, emb.shape[0], scale, num_original=n_orig, out_rows=out_init,
                   train_original=tc.train_original_embeddings, weight=emb.detach()).to(device)
    dist.broadcast_tensor_(rows.rows)

    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    train_seqs, train_tix = _merge_all(snips.train, tokens)
    held_seqs, held_tix = _merge_all(snips.heldout, tokens)
    eval_kw = dict(device=device, autocast_dtype=autocast_dtype, pad_id=pad_id)
    # The input rows (held-out distillation loss) change only when trained, the argmax rate also when
    # the output rows are trained (ntp); otherwise "after" equals "before" and is not recomputed.
    # When "after" is computed (main process), the teacher states of "before" are kept for it, within
    # --teacher_cache_gib (training's own teacher cache gets the rest of the budget).
    input_trained = tc.init_method in TRAINED or tc.train_original_embeddings
    cache_budget = int(tc.teacher_cache_gib * 2**30)
    held_teacher = TeacherCache(cache_budget) if input_trained and dist.is_main else None
    before = heldout_eval(model, rows, held_seqs, held_tix, len(tokens), layer=layer, teacher_cache=held_teacher,
                          desc="held-out evaluation before training", **eval_kw)
    held_before, argmax_before = before.loss_per_token, before.argmax
    per_token_lr = relative_lr(tc.token_distillation_lr_relative, emb, n_orig)
    if tc.recipe == Recipe.PER_TOKEN and tc.init_method in TRAINED:
        logger.info("recipe per-token: step size %.3g (= %.3g x RMS of the original embedding entries, %s schedule), "
                    "%d snippet(s) per update", per_token_lr, tc.token_distillation_lr_relative, tc.lr_schedule.value,
                    tc.snippets_per_update)
    loop_kw = dict(lr=tc.token_distillation_lr, batch_size=tc.token_distillation_batch_size,
                   epochs=tc.token_distillation_epochs, seed=tc.seed, device=device,
                   stopping_condition=tc.stopping_condition, max_steps=tc.max_steps, log_every=tc.log_every,
                   pad_id=pad_id)
    result = out_result = None
    stack.enter_context(deferred_signals())  # from here on a stop signal checkpoints instead of losing work
    if tc.init_method in TRAINED:
        kw = dict(loop_kw)
        if tc.recipe == Recipe.PER_TOKEN:
            kw["lr"] = per_token_lr
        fp = fingerprint(cfg.to_dict(), model_identity=source.identity, tokens=[t.text for t in tokens],
                         new_ids=new_ids, rows_shape=list(rows.rows.shape), snippets=snippet_digest(train_seqs))
        ckpt = Checkpointer(out / CHECKPOINT_DIRNAME, cfg.output.checkpoint_every, fp, resume=cfg.output.resume,
                            dist=dist if dist.distributed else None, minutes=cfg.output.checkpoint_minutes)
        result = train(model, rows, train_seqs, train_tix, layer=layer, loss_method=tc.loss_method,
                       autocast_dtype=autocast_dtype, recipe=tc.recipe, snippets_per_update=tc.snippets_per_update,
                       lr_schedule=tc.lr_schedule,
                       teacher_cache_bytes=cache_budget - (held_teacher.bytes if held_teacher else 0),
                       token_texts=[t.text for t in tokens], dist=dist if dist.distributed else None,
                       checkpointer=ckpt, **kw)
    if out_policy == OutputEmbeddings.NTP:
        out_result = train_output_rows(model, rows, train_seqs, train_tix, layer=layer,
                                       autocast_dtype=autocast_dtype, **loop_kw)
    if not dist.is_main:  # the rows are identical on every process; the main process evaluates and saves
        dist.close()
        return RunResult(out, {})
    try:
        after = heldout_eval(model, rows, held_seqs, held_tix, len(tokens), layer=layer, teacher_cache=held_teacher,
                             loss=input_trained, argmax=input_trained or out_policy == OutputEmbeddings.NTP,
                             desc="held-out evaluation after training", **eval_kw)
    except Interrupted as e:  # training is done and checkpointed (when it trained): --resume skips to here
        raise Interrupted(e.signum, step=result.steps if result else None, where="after training") from None
    held_after = after.loss_per_token if after.loss_per_token is not None else held_before
    argmax_after = after.argmax if after.argmax is not None else argmax_before
    del held_teacher
    _warn_if_new_tokens_dominate(argmax_after, tied)

    with torch.no_grad():
        ids_t = torch.tensor(new_ids, device=emb.device)
        if rows.original is not None:
            emb.copy_(rows.original.detach().to(emb.dtype))
        emb[ids_t] = rows.rows.detach().to(emb.dtype)
        if not tied:
            model.get_output_embeddings().weight[ids_t] = rows.out_rows.detach().to(emb.dtype)

    norms = rows.rows.detach().float().norm(dim=-1).cpu()
    orig_norm = emb[:n_orig].detach().float().norm(dim=-1).mean().item()
    report = {
        "tool": "token-distillation", "version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "config": cfg.to_dict(),
        "model": {"source": source.spec, "identity": source.identity, "tied_embeddings": tied,
                  "tied_embeddings_source": tied_source, "untied_by_run": tied_source and not tied,
                  "output_embeddings": out_policy.value if out_policy else "tied",
                  "embedding_scale": scale, "num_layers_target_index": layer,
                  "vocab_rows_before": num_original, "vocab_rows_after": int(emb.shape[0])},
        "versions": _versions(),
        "device": str(device), "weights_dtype": str(weights_dtype), "autocast_dtype": str(autocast_dtype),
        "seed": cfg.train.seed, "processes": dist.world_size,
        "snippets": corpus_info,
        "tokens": [
            {"token": t.text, "id": t.token_id, "subtoken_ids": list(t.subtoken_ids),
             "subtokens": tokenizer.convert_ids_to_tokens(list(t.subtoken_ids)),
             "snippet_source": token_sources[i],
             "train_snippets": snips.train_counts[i], "heldout_snippets": snips.heldout_counts[i],
             "heldout_loss_init": held_before[i], "heldout_loss_final": held_after[i],
             "row_norm": float(norms[i]), "heldout_argmax_positions": argmax_after["per_token"][i]}
            for i, t in enumerate(tokens)
        ],
        "skipped_tokens": skipped,
        "firing": firing,
        "targets": target_summary,
        "mean_heldout_loss_init": _mean(held_before),
        "mean_heldout_loss_final": _mean(held_after),
        "not_improved_tokens": _not_improved(tokens, held_before, held_after) if result else [],
        "mean_new_row_norm": float(norms.mean()), "mean_original_row_norm": orig_norm,
        "loss_curve": result.loss_curve if result else [],
        "train_steps": result.steps if result else 0,
        "train_lr": ((per_token_lr if tc.recipe == Recipe.PER_TOKEN else tc.token_distillation_lr)
                     if result else None),
        "train_seconds": result.seconds if result else 0.0,
        "train_seconds_from_step": result.seconds_from_step if result else 0,
        "output_rows_train_seconds": out_result.seconds if out_result else 0.0,
        "output_rows_loss_curve": out_result.loss_curve if out_result else [],
        "new_token_argmax_rate_init": argmax_before["rate"],
        "new_token_argmax_rate_final": argmax_after["rate"],
        "new_token_argmax": {"init": argmax_before, "final": argmax_after},
    }

    def _write(tmp: Path) -> None:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / "report.json").write_text(json.dumps(report, indent=2, ensure_ascii=False), encoding="utf-8")
        _write_target_files(tmp, targets, records)

    out = save_output(out, _write, cfg, rows, tokenizer, report, source.spec, untie=tied_source and not tied)
    dist.close()
    report["total_seconds"] = time.perf_counter() - t0
    logger.info("saved extended model to %s (held-out loss %.5f -> %.5f) in %.1fs", out,
                report["mean_heldout_loss_init"] or float("nan"), report["mean_heldout_loss_final"] or float("nan"),
                report["total_seconds"])
    return RunResult(out, report)


def final_destination(out: Path, replace_allowed: bool) -> Path:
    """Where the finished output goes: ``out``, unless entries appeared there during the run that
    the start-up check did not allow replacing (a user's files, or another run's output without
    ``--overwrite``); then a new sibling ``<out>-<date>-<time>``, with a warning."""
    if not out.is_dir() or not any(out.iterdir()):
        return out
    foreign = foreign_entries(out)
    if not foreign and (read_manifest(out) is None or replace_allowed):
        return out
    alt = out.with_name(f"{out.name}-{time.strftime('%Y%m%d-%H%M%S')}")
    logger.warning("%s changed during the run (%s); writing the output to %s instead", out,
                   ", ".join(foreign[:5]) or "another output of this tool appeared", alt)
    return alt


def save_output(out: Path, write, cfg: RunConfig, rows: NewRows, tokenizer, report: dict, model_spec: str,
                untie: bool) -> Path:
    """Write the extended model atomically (``write(tmp_dir)``); returns the directory written.

    A finished training is never lost: if the save fails, the trained rows, tokenizer and report are
    written instead (:func:`token_distillation.rescue.write_rows`, into the output directory or,
    failing that, a new temporary directory).

    Raises:
        ConfigError: the save failed; the one-line message names the rows directory and the command
            that builds the model from it.
    """
    dest = final_destination(out, cfg.output.overwrite or cfg.output.resume)
    try:
        write_output_dir(dest, write, kind="model")
        return dest
    except Exception as e:  # noqa: BLE001 - any failure here must not lose the training
        reason = f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:300]}"
        logger.debug("save failed", exc_info=True)
    try:
        rows_dir = write_rows(dest, rows, tokenizer, report, model_spec, untie)
    except Exception:  # noqa: BLE001 - e.g. the output's disk is full: try the temporary directory
        rows_dir = write_rows(Path(tempfile.mkdtemp(prefix="token_distillation_rows-")) / "rows", rows, tokenizer,
                              report, model_spec, untie)
    raise ConfigError(f"saving the extended model to {dest} failed ({reason}); the trained rows were saved in "
                      f"{rows_dir}; build the model from them with: {recovery_command(rows_dir)}")


def collect_snippets(cfg: RunConfig, src: SnippetSource, tokens: list[NewToken], corpus, tokenizer, bos: list[int],
                     load, device: torch.device):
    """Training and held-out snippets for ``tokens``: mined from ``corpus``, generated by the model
    (``load()`` returns it; called only when snippets are generated), or mined then topped up.

    Returns:
        ``(snippets, corpus_info for the report, per-token snippet source, the loaded model or None)``.
    """
    sc = cfg.snippets
    gen_kw = dict(seed=cfg.train.seed, temperature=sc.generation_temperature, top_p=sc.generation_top_p,
                  use_chat_template=sc.generation_chat_template)
    model = None
    if src == SnippetSource.GENERATED:
        model = load()
        snips = generate_snippets(model, tokenizer, tokens, sc.snippet_len, sc.snippet_num, sc.heldout_snippet_num,
                                  device=device, **gen_kw)
        corpus_info: dict[str, Any] = {"source": "generated"}
        token_sources = ["generated"] * len(tokens)
    else:
        snips = mine_snippets(corpus, tokens, sc.snippet_len, sc.snippet_num, sc.heldout_snippet_num,
                              cfg.corpus.heldout_fraction, bos, cfg.train.seed)
        corpus_info = {"source": src.value, "dataset_path": cfg.corpus.dataset_path, "num_docs": corpus.num_docs,
                       "num_tokens": int(len(corpus.ids)),
                       "train_doc_ids": [corpus.doc_ids[d] for d in snips.train_docs],
                       "heldout_doc_ids": [corpus.doc_ids[d] for d in snips.heldout_docs]}
        token_sources = ["corpus"] * len(tokens)
        if src == SnippetSource.CORPUS_THEN_GENERATED:
            want = [(sc.snippet_num - c, max(0, sc.heldout_snippet_num - h)) if c < sc.min_snippets else (0, 0)
                    for c, h in zip(snips.train_counts, snips.heldout_counts)]
            if any(w != (0, 0) for w in want):
                logger.info("topping up %d token(s) with fewer than %d corpus snippets with generated ones",
                            sum(w != (0, 0) for w in want), sc.min_snippets)
                model = load()
                gen = generate_snippets(model, tokenizer, tokens, sc.snippet_len, sc.snippet_num,
                                        sc.heldout_snippet_num, device=device, counts=want, **gen_kw)
                token_sources = [("corpus+generated" if c else "generated") if w != (0, 0) else "corpus"
                                 for c, w in zip(snips.train_counts, want)]
                snips = top_up(snips, gen)
    return snips, corpus_info, token_sources, model


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
        raise ConfigError("no new token has enough snippets (--min_snippets "
                          f"{cfg.snippets.min_snippets}); pass a larger --dataset_path, lower --min_snippets, "
                          "or use --use_generated_snippets")
    return _reindex(snips, keep), [tokens[i] for i in keep], [token_sources[i] for i in keep], skipped


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


def _output_policy(cfg: RunConfig, tied: bool) -> OutputEmbeddings | None:
    """Resolved ``--output_embeddings``: None keeps a tied model tied (``tied``); any policy on a
    tied model unties it. ``auto``: subtoken-mean for tied models (safe default), else zero (or
    subtoken-mean with ``--set_output_to_zero_if_untied false``)."""
    pol = cfg.output.output_embeddings
    if pol == OutputEmbeddings.TIED:
        return None
    if pol != OutputEmbeddings.AUTO:
        return pol
    if tied:
        return OutputEmbeddings.SUBTOKEN_MEAN
    return OutputEmbeddings.ZERO if cfg.output.set_output_to_zero_if_untied else OutputEmbeddings.SUBTOKEN_MEAN


#: warn when new tokens are the argmax this much more often than they are the true next token
ARGMAX_WARN_MARGIN = 0.05


def _some(names: list[str], most: int = 10) -> str:
    """``'a', 'b', ...``: the first ``most`` names for a log line."""
    return ", ".join(repr(t) for t in names[:most]) + (" ..." if len(names) > most else "")


def _warn_missing_heldout(tokens, heldout_counts: list[int], wanted: int) -> list[str]:
    """Warn about tokens without held-out snippets (their held-out loss cannot be judged)."""
    missing = [t.text for t, n in zip(tokens, heldout_counts) if n == 0] if wanted > 0 else []
    if missing:
        logger.warning("%d token(s) have no held-out snippet, so their held-out loss cannot be judged: %s "
                       "(a larger corpus or --heldout_fraction gives them some)", len(missing), _some(missing))
    return missing


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


def _write_target_files(tmp: Path, targets, records: list[dict]) -> None:
    """``new_tokens.jsonl`` (every token built, before the snippet filter) and the method's extra files."""
    write_new_tokens(tmp / "new_tokens.jsonl", records)
    for name, path in targets.files.items():
        shutil.copyfile(path, tmp / name)


def _dry_run(cfg: RunConfig, out: Path, targets, records: list[dict], corpus, tokenizer,
             target_summary: dict, t0: float) -> RunResult:
    """``--dry_run``: mine snippets (corpus only), log the coverage table, write the files, no model."""
    sc = cfg.snippets
    train_counts = heldout_counts = None
    if corpus is not None:
        snips = mine_snippets(corpus, targets.tokens, sc.snippet_len, sc.snippet_num, sc.heldout_snippet_num,
                              cfg.corpus.heldout_fraction, bos_prefix(tokenizer), cfg.train.seed)
        train_counts, heldout_counts = snips.train_counts, snips.heldout_counts
        _warn_missing_heldout(targets.tokens, heldout_counts, sc.heldout_snippet_num)
    table = coverage_table(records, train_counts, heldout_counts)
    if corpus is None:
        logger.info("dry run: no corpus, so a real run would generate %d training and %d held-out snippets per token "
                    "with the model (not done in a dry run)", sc.snippet_num, sc.heldout_snippet_num)
    logger.info("dry run: coverage of %d new tokens (snippets capped at --snippet_num %d)\n%s",
                len(records), sc.snippet_num, table)
    usable = sum(1 for c in train_counts or [] if c >= sc.min_snippets)
    would_skip = (too_few_snippets(cfg, train_counts, targets.tokens, verb="a real run would skip")
                  if train_counts is not None else {})
    report = {"tool": "token-distillation", "version": __version__, "dry_run": True,
              "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "config": cfg.to_dict(),
              "targets": target_summary, "skipped_tokens": {**targets.skipped, **would_skip},
              "tokens_with_enough_snippets": usable if train_counts is not None else None,
              "versions": _versions()}

    def _write(tmp: Path) -> None:
        (tmp / "report.json").write_text(json.dumps(report, indent=2, ensure_ascii=False), encoding="utf-8")
        (tmp / "coverage.tsv").write_text(table, encoding="utf-8")
        _write_target_files(tmp, targets, records)

    write_output_dir(out, _write, kind="dry-run")
    report["total_seconds"] = time.perf_counter() - t0
    logger.info("dry run: wrote new_tokens.jsonl, coverage.tsv and report.json to %s; model not loaded", out)
    return RunResult(out, report)


def _mean(xs: list[float | None]) -> float | None:
    vals = [x for x in xs if x is not None]
    return sum(vals) / len(vals) if vals else None


def _versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for pkg in ("torch", "transformers", "datasets", "tokenizers", "ahocorasick-rs", "gguf", "accelerate"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out
