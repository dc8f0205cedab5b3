"""``run(config)``: the stages of a run, in README order.

1. resolve device, dtype and seed; check the output path (nothing is loaded yet)
2. load the tokenizer; build the new-token list
3. snippets: mine the corpus, or generate them with the model
4. load the model; extend tokenizer and embedding matrix
5. initialise the new rows; train them (Token Distillation)
6. write the rows, set untied output rows, save model + tokenizer + report.json atomically
"""

from __future__ import annotations

import json
import logging
import platform
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import __version__
from .alignment import PhraseMatcher, merge
from .checkpoint import CHECKPOINT_DIRNAME, Checkpointer, fingerprint, prepare_output, snippet_digest
from .config import ConfigError, InitMethod, MixedPrecision, RunConfig
from .corpus import tokenize_corpus
from .distributed import DistContext, check_batch_divisible, launched_world_size
from .init_methods import INITIALISERS, TRAINED
from .models import (
    atomic_write_dir,
    embedding_scale,
    extend_embeddings,
    is_tied,
    load_config,
    load_model,
    load_tokenizer,
    resolve_model_source,
)
from .snippets import SnippetSet, generate_snippets, mine_snippets
from .targets import build_targets
from .tokenization import NewToken, add_new_tokens, bos_prefix
from .train import NewRows, heldout_loss_per_token, resolve_layer, train

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

    Raises:
        ConfigError: bad input found after start-up checks (e.g. no usable tokens, no snippets).
    """
    t0 = time.perf_counter()
    seed_everything(cfg.train.seed)
    if cfg.train.init_method in TRAINED:
        check_batch_divisible(cfg.train.token_distillation_batch_size, launched_world_size())
    cache_root = cfg.model.resolved_cache_dir
    source = resolve_model_source(cfg.model.model_path)
    out = prepare_output(cfg.output.out_path, cfg.output.overwrite, cfg.output.resume, source)
    dist = DistContext.create(cfg.model.device, resolve_device)
    device = dist.device
    weights_dtype, autocast_dtype = resolve_precision(cfg.model.mixed_precision, device)
    logger.info("model %s | device %s | weights %s | autocast %s | seed %d | processes %d", source.spec, device,
                weights_dtype, autocast_dtype, cfg.train.seed, dist.world_size)

    with dist.main_process_first():  # the main process fills the model cache (GGUF conversion) first
        resolve_layer(load_config(source, cache_root), cfg.train.target_layer)
        tokenizer = load_tokenizer(source, cache_root)
    targets = build_targets(cfg.targets, tokenizer)
    tokens = targets.tokens
    bos = bos_prefix(tokenizer)

    model = None
    sc = cfg.snippets
    if cfg.generated_snippets:
        model = load_model(source, cache_root, device, weights_dtype)

    def _snippets() -> tuple[SnippetSet, dict[str, Any]]:
        if cfg.generated_snippets:
            gen = generate_snippets(model, tokenizer, tokens, sc.snippet_len, sc.snippet_num, sc.heldout_snippet_num,
                                    cfg.train.seed, sc.generation_temperature, sc.generation_top_p, device)
            return gen, {"source": "generated"}
        corpus = tokenize_corpus(cfg.corpus, tokenizer, cache_root)
        mined = mine_snippets(corpus, tokens, sc.snippet_len, sc.snippet_num, sc.heldout_snippet_num,
                              cfg.corpus.heldout_fraction, bos, cfg.train.seed)
        return mined, {"source": "corpus", "dataset_path": cfg.corpus.dataset_path, "num_docs": corpus.num_docs,
                       "num_tokens": int(len(corpus.ids)),
                       "train_doc_ids": [corpus.doc_ids[d] for d in mined.train_docs],
                       "heldout_doc_ids": [corpus.doc_ids[d] for d in mined.heldout_docs]}

    # Snippets are mined (or generated) once, by the main process, and sent to the others.
    snips, corpus_info = dist.broadcast_from_main(_snippets)

    needs_snippets = cfg.train.init_method in TRAINED
    keep = [i for i, c in enumerate(snips.train_counts) if c >= sc.min_snippets or not needs_snippets]
    skipped = dict(targets.skipped)
    for i, c in enumerate(snips.train_counts):
        if i not in keep:
            skipped[tokens[i].text] = (f"only {c} training snippets (< --min_snippets {sc.min_snippets}); "
                                       "use a larger corpus, lower --min_snippets, or --use_generated_snippets")
            logger.warning("skipping %r: %s", tokens[i].text, skipped[tokens[i].text])
    if not keep:
        raise ConfigError("no new token has enough snippets (--min_snippets "
                          f"{sc.min_snippets}); pass a larger --dataset_path, lower --min_snippets, "
                          "or use --use_generated_snippets")
    snips = _reindex(snips, keep)
    tokens = [tokens[i] for i in keep]

    logger.info("pre-flight: %d new tokens, %d skipped, %d training / %d held-out snippets, method %s",
                len(tokens), len(skipped), len(snips.train), len(snips.heldout), cfg.train.init_method.value)

    if model is None:
        model = load_model(source, cache_root, device, weights_dtype)
    layer = resolve_layer(model, cfg.train.target_layer)
    num_original = model.get_input_embeddings().weight.shape[0]
    new_ids = add_new_tokens(tokenizer, [t.text for t in tokens])
    tokens = [NewToken(t.text, t.subtoken_ids, i) for t, i in zip(tokens, new_ids)]
    extend_embeddings(model, len(tokenizer))
    tied = is_tied(model)
    scale = embedding_scale(model)
    emb = model.get_input_embeddings().weight
    init = INITIALISERS[cfg.train.init_method](emb.detach(), tokens, seed=cfg.train.seed,
                                               num_original=min(num_original, new_ids[0]))
    rows = NewRows(init.to(device), new_ids, emb.shape[0], scale).to(device)
    dist.broadcast_tensor_(rows.rows)

    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    train_seqs, train_tix = _merge_all(snips.train, tokens)
    held_seqs, held_tix = _merge_all(snips.heldout, tokens)
    eval_kw = dict(layer=layer, device=device, autocast_dtype=autocast_dtype, pad_id=pad_id)
    held_before = (heldout_loss_per_token(model, rows, held_seqs, held_tix, len(tokens), **eval_kw)
                   if dist.is_main else [])
    result = None
    if cfg.train.init_method in TRAINED:
        tc = cfg.train
        fp = fingerprint(cfg.to_dict(), model_identity=source.identity, tokens=[t.text for t in tokens],
                         new_ids=new_ids, rows_shape=list(rows.rows.shape), snippets=snippet_digest(train_seqs))
        ckpt = Checkpointer(out / CHECKPOINT_DIRNAME, cfg.output.checkpoint_every, fp, resume=cfg.output.resume,
                            dist=dist if dist.distributed else None)
        result = train(model, rows, train_seqs, train_tix, layer=layer, lr=tc.token_distillation_lr,
                       batch_size=tc.token_distillation_batch_size, epochs=tc.token_distillation_epochs,
                       seed=tc.seed, device=device, stopping_condition=tc.stopping_condition,
                       max_steps=tc.max_steps, loss_method=tc.loss_method, autocast_dtype=autocast_dtype,
                       log_every=tc.log_every, pad_id=pad_id, dist=dist if dist.distributed else None,
                       checkpointer=ckpt)
    if not dist.is_main:  # the rows are identical on every process; the main process evaluates and saves
        return RunResult(out, {})
    held_after = heldout_loss_per_token(model, rows, held_seqs, held_tix, len(tokens), **eval_kw)

    with torch.no_grad():
        ids_t = torch.tensor(new_ids, device=emb.device)
        emb[ids_t] = rows.rows.detach().to(emb.dtype)
        if not tied and model.get_output_embeddings() is not None:
            out_w = model.get_output_embeddings().weight
            if cfg.output.set_output_to_zero_if_untied:
                out_w[ids_t] = 0
            else:
                out_w[ids_t] = torch.stack([out_w[list(t.subtoken_ids)].float().mean(0) for t in tokens]).to(out_w.dtype)

    norms = rows.rows.detach().float().norm(dim=-1).cpu()
    orig_norm = emb[: min(num_original, new_ids[0])].detach().float().norm(dim=-1).mean().item()
    report = {
        "tool": "token-distillation", "version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "config": cfg.to_dict(),
        "model": {"source": source.spec, "identity": source.identity, "tied_embeddings": tied,
                  "embedding_scale": scale, "num_layers_target_index": layer,
                  "vocab_rows_before": num_original, "vocab_rows_after": int(emb.shape[0])},
        "versions": _versions(),
        "device": str(device), "weights_dtype": str(weights_dtype), "autocast_dtype": str(autocast_dtype),
        "seed": cfg.train.seed, "processes": dist.world_size,
        "snippets": corpus_info,
        "tokens": [
            {"token": t.text, "id": t.token_id, "subtoken_ids": list(t.subtoken_ids),
             "subtokens": tokenizer.convert_ids_to_tokens(list(t.subtoken_ids)),
             "train_snippets": snips.train_counts[i], "heldout_snippets": snips.heldout_counts[i],
             "heldout_loss_init": held_before[i], "heldout_loss_final": held_after[i],
             "row_norm": float(norms[i])}
            for i, t in enumerate(tokens)
        ],
        "skipped_tokens": skipped,
        "mean_heldout_loss_init": _mean(held_before),
        "mean_heldout_loss_final": _mean(held_after),
        "mean_new_row_norm": float(norms.mean()), "mean_original_row_norm": orig_norm,
        "loss_curve": result.loss_curve if result else [],
        "train_steps": result.steps if result else 0,
        "train_seconds": result.seconds if result else 0.0,
    }

    def _write(tmp: Path) -> None:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / "report.json").write_text(json.dumps(report, indent=2, ensure_ascii=False), encoding="utf-8")

    atomic_write_dir(out, _write)
    report["total_seconds"] = time.perf_counter() - t0
    logger.info("saved extended model to %s (held-out loss %.5f -> %.5f) in %.1fs", out,
                report["mean_heldout_loss_init"] or float("nan"), report["mean_heldout_loss_final"] or float("nan"),
                report["total_seconds"])
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
