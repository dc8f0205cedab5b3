"""The Python API: :func:`distill` adds new tokens to a model and tokenizer already in memory.

::

    from token_distillation import distill
    result = distill(model, tokenizer, [" hepatotoxicity", " nephrotoxicity"], texts=abstracts)
    result.model, result.tokenizer, result.report   # extended in place; report = report.json's content

It runs the same stages as the command line (:func:`token_distillation.pipeline.distill_stages`),
with the model and tokenizer given instead of loaded from ``--model_path``, the new tokens given
as a list instead of ``--new_tokens_source``, and the documents given as ``texts`` (tokenized in
memory) instead of ``--dataset_path``. Nothing is written to disk unless ``out_path`` is passed.
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config import HELDOUT, ConfigError, RunConfig, SnippetSource, all_flags

#: flags that :func:`distill`'s arguments stand for
ARGUMENT_FLAGS = {"model_path": "model", "new_tokens_source": "new_tokens", "build_target_method": "new_tokens",
                  "dataset_path": "texts", "out_path": "out_path"}


@dataclass
class DistillResult:
    """What :func:`distill` returns.

    Attributes:
        model: the extended model: the model passed in, changed in place (embedding matrices grown
            by the new rows; a tied model untied unless ``output_embeddings="tied"``).
        tokenizer: the extended tokenizer: the tokenizer passed in, with the new tokens added.
        report: the run's report (what report.json holds: config, tokens with their ids, subtokens,
            snippet counts and held-out losses, skipped tokens, loss curve, timings).
        out_path: where the result was saved, or None (no ``out_path``: nothing written).
    """

    model: Any
    tokenizer: Any
    report: dict[str, Any]
    out_path: Path | None = None


def distill(model, tokenizer, new_tokens, texts=None, *, config: RunConfig | None = None,
            out_path: str | Path | None = None, **flags: Any) -> DistillResult:
    """Add ``new_tokens`` to ``model`` and ``tokenizer`` and train their input embeddings by Token
    Distillation on snippets of ``texts`` (the command line's run, on objects in memory).

    Args:
        model: a Hugging Face causal LM (``AutoModelForCausalLM``), on the device it is trained on
            and in its dtype (kept; 16-bit weights are slow on CPU). Frozen and in eval mode during
            the run; its training mode and ``requires_grad`` flags are restored afterwards.
        tokenizer: its (fast) tokenizer.
        new_tokens: the tokens to add, e.g. ``[" hepatotoxicity"]`` (a leading space is meaningful,
            as in a word list); tokens already in the vocabulary or not splittable are skipped
            (``report["skipped_tokens"]`` says why).
        texts: the documents to mine snippets from: an iterable of strings, or of records with the
            text under ``text_column`` (flag, default ``"text"``) and optionally an ``id`` (e.g. a
            ``datasets.Dataset``). Read in order until every token has its snippets (``max_docs``
            caps it); the token ids of the documents read are kept in memory. None: the model
            writes the snippets itself (slower).
        config: a :class:`~token_distillation.config.RunConfig` to start from (``flags`` override
            it); its ``model_path``, ``new_tokens_source``, ``build_target_method``, ``dataset_path``
            and ``out_path`` are not used (the arguments stand for them).
        out_path: also save the result there, as the command line does (``export``, ``overwrite``
            apply; ``export="gguf"`` needs a .gguf source, so is refused). None: nothing is written.
        **flags: command-line flags by name (docs/flags.md), e.g. ``snippet_num=25``, ``seed=1``,
            ``output_embeddings="tied"``; a flag given as None takes its default (also over ``config``).

    Returns:
        :class:`DistillResult` (model and tokenizer are the objects passed in, extended).

    Raises:
        ValueError: bad input, naming the argument or flag (a
            :class:`~token_distillation.config.ConfigError` for flags): ``new_tokens`` empty or not a
            list of strings, ``texts`` a single string or without any occurrence of the tokens, no
            token with ``min_snippets`` snippets, a flag that an argument stands for, ``resume``,
            ``dry_run``, ``export="gguf"``, ``snippet_source`` other than ``auto``.
        TypeError: ``model`` has no input embeddings, ``texts`` is not iterable.
        Interrupted: a stop signal (Ctrl-C, SIGTERM) during training or the output fit; nothing is
            kept, and the model and tokenizer may already hold the new tokens: reload them before
            calling again.
    """
    from .interrupts import Interrupted
    from .pipeline import check_exports, distill_stages, seed_everything

    words = _check_new_tokens(new_tokens)
    docs = _check_texts(texts)
    if not hasattr(model, "get_input_embeddings") or not hasattr(model, "config"):
        raise TypeError(f"model: expected a Hugging Face causal LM (e.g. AutoModelForCausalLM), not "
                        f"{type(model).__name__}")
    name = str(getattr(model.config, "_name_or_path", "") or type(model).__name__)
    cfg = _config(config, flags, name, docs is not None)
    setup = _setup(model, cfg, name, out_path, docs is not None)
    if out_path is not None:
        check_exports(cfg, setup.source)
    seed_everything(cfg.train.seed)
    with _frozen(model):
        try:
            done = distill_stages(setup, tokenizer, model.config, words, docs)
        except Interrupted as e:  # the API keeps no checkpoints: there is no --resume to offer
            raise Interrupted(e.signum, step=e.step, where=e.where, advice="the Python API keeps no checkpoints, "
                              "so the work is lost: reload the model and tokenizer (they may hold the new tokens "
                              "already) and call distill again") from None
    return DistillResult(done.model, done.tokenizer, done.report, done.out_path)


def _check_new_tokens(new_tokens) -> list[str]:
    """``new_tokens`` as a list of strings (trailing whitespace stripped, as in a word list).

    Raises:
        ValueError: one string instead of a list, a non-string entry, or no token.
    """
    if isinstance(new_tokens, (str, bytes)):
        raise ValueError(f"new_tokens: pass a list of tokens, not one string (e.g. [{new_tokens!r}])")
    try:
        words = list(new_tokens)
    except TypeError:
        raise ValueError(f"new_tokens: expected a list of strings, not {type(new_tokens).__name__}") from None
    bad = [i for i, w in enumerate(words) if not isinstance(w, str)]
    if bad:
        raise ValueError(f"new_tokens: entry {bad[0]} is {type(words[bad[0]]).__name__}, not a string")
    words = [w.rstrip() for w in words]
    if not any(w.strip() for w in words):
        raise ValueError('new_tokens is empty; pass at least one token, e.g. [" hepatotoxicity"]')
    return [w for w in words if w.strip()]


def _check_texts(texts):
    """``texts`` unchanged, or None.

    Raises:
        ValueError: one string instead of a list of documents.
        TypeError: not iterable.
    """
    if texts is None:
        return None
    if isinstance(texts, (str, bytes)):
        raise ValueError("texts: pass a list of documents, not one string (e.g. [text])")
    if not hasattr(texts, "__iter__"):
        raise TypeError(f"texts: expected an iterable of documents (strings or records), not {type(texts).__name__}")
    return texts


def _config(config: RunConfig | None, flags: dict[str, Any], name: str, has_texts: bool) -> RunConfig:
    """The run's config: ``config``'s flags (if any), then ``flags``; ``model_path`` records the
    model's name.

    Raises:
        ConfigError: every problem at once (flags that arguments stand for, options the API does not
            offer, and the config's own checks).
    """
    if config is not None and not isinstance(config, RunConfig):
        raise TypeError(f"config: expected a RunConfig, not {type(config).__name__}")
    problems = [f"{f}: pass it as distill()'s {ARGUMENT_FLAGS[f]} argument" for f in flags if f in ARGUMENT_FLAGS]
    for f, value, why in (("resume", flags.get("resume"), "the Python API does not checkpoint"),
                          ("dry_run", flags.get("dry_run"), "use the command line's --dry_run"),
                          ("snippet_source", flags.get("snippet_source", "auto"),
                           "pass texts (mined) or texts=None (generated by the model)")):
        if value not in (None, False, "auto") and str(getattr(value, "value", value)) != "auto":
            problems.append(f"{f}={value!r}: not available in the Python API; {why}")
    if problems:
        raise ConfigError(problems)
    merged = {k: v for k, v in (config.to_dict() if config is not None else {}).items() if k not in ARGUMENT_FLAGS}
    defaults = {flag: default for flag, default, _ in all_flags()}
    merged.update({f: defaults.get(f) if v is None else v for f, v in flags.items()}, model_path=name)
    cfg = RunConfig.from_flags(**merged)
    if has_texts and cfg.snippets.use_generated_snippets:
        raise ConfigError("use_generated_snippets=True contradicts texts; pass texts=None for generated snippets")
    if not has_texts and cfg.output.output_rows_shift == HELDOUT:
        raise ConfigError(f"output_rows_shift={HELDOUT!r} picks the shift on held-out documents of texts, but "
                          "texts=None generates the snippets; pass texts or a number of nats (e.g. -1)")
    if cfg.output.resume or cfg.output.dry_run:
        raise ConfigError("config: resume / dry_run are not available in the Python API")
    for note in cfg.unused_settings():
        logging.getLogger(__name__).warning(note.replace("--", ""))
    return cfg


def _setup(model, cfg: RunConfig, name: str, out_path, has_texts: bool):
    """The pipeline's stage-1 record for a model in memory: trained where it is, in its dtype, on
    one process, without checkpoints; an output directory only with ``out_path``."""
    from .distributed import DistContext
    from .paths import ModelSource, prepare_output
    from .pipeline import Setup, resolve_precision

    weight = model.get_input_embeddings().weight
    _, autocast = resolve_precision(cfg.model.mixed_precision, weight.device)
    source = ModelSource(spec=name, path=name, gguf_file=None, identity=f"in-memory:{name}")
    out = None
    if out_path is not None:
        out = prepare_output(str(out_path), cfg.output.overwrite, False, source)
    return Setup(cfg, source, out, DistContext(weight.device), weight.device, weight.dtype, autocast,
                 cfg.model.resolved_cache_dir, time.perf_counter(), save_dtype=weight.dtype,
                 batch_size=cfg.train.token_distillation_batch_size,
                 snippet_source=SnippetSource.CORPUS if has_texts else SnippetSource.GENERATED,
                 model=model, checkpoints=False)


@contextlib.contextmanager
def _frozen(model):
    """The model frozen and in eval mode for the run; its mode and ``requires_grad`` flags restored
    after (parameters that are new, e.g. an untied output layer, get the flag most parameters had)."""
    training = model.training
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    default = bool(flags) and all(flags.values())
    model.eval()
    model.requires_grad_(False)
    try:
        yield
    finally:
        model.train(training)
        for n, p in model.named_parameters():
            p.requires_grad_(flags.get(n, default))
