"""Shared parts of the two scripts that reproduce the paper's tables (Dobler et al., arXiv
2505.20133): ``scripts/eval_benchmarks.py`` (benchmark accuracy with the new tokens) and
``scripts/judge_definitions.py`` (definitions judged by a model). See docs/paper-tables.md.

Both compare the original model (original tokenization) with extended models (output directories
of ``apply_embedding_init.py``); each extended model's method and settings come from its
``report.json``, so a table row says what produced it.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config import ConfigError
from .paths import replace_file

logger = logging.getLogger(__name__)

#: label of the original model's row
ORIGINAL_LABEL = "original"
#: report.json config keys shown as a row's settings (when present)
SETTING_KEYS = ("recipe", "loss_method", "token_distillation_epochs", "snippet_num", "snippet_len", "target_layer",
                "output_embeddings", "seed")


@dataclass
class Entry:
    """One row of a table: the original model or one extended model.

    Attributes:
        label: display name (unique).
        path: the extended model's directory; None for the original model.
        method: ``"original tokenization"`` or the run's ``init_method``.
        settings: the run's settings from report.json (:data:`SETTING_KEYS`, the number of new
            tokens, training steps and seconds); empty for the original model.
        extended: the parsed extended model (:class:`~token_distillation.metrics.ExtendedModel`), or None.
    """

    label: str
    path: Path | None
    method: str
    settings: dict[str, Any] = field(default_factory=dict)
    extended: Any = None


def split_list(value) -> list[str]:
    """Comma-separated text (or a list, as Fire passes it) as a list of stripped, non-empty items."""
    if isinstance(value, (list, tuple)):
        value = ",".join(str(v) for v in value)
    return [s.strip() for s in str(value or "").split(",") if s.strip()]


def settings_of(report: dict) -> dict[str, Any]:
    """A run's settings for a table row: :data:`SETTING_KEYS` from its config, the learning rate it
    trained with (``lr``: report.json's ``train_lr``; absent for untrained methods), ``tokens``,
    ``train_steps`` and ``train_seconds``."""
    cfg = report.get("config", {})
    out = {k: cfg[k] for k in SETTING_KEYS if k in cfg}
    if report.get("train_lr") is not None:
        out["lr"] = float(f"{report['train_lr']:.3g}")
    out.update(tokens=len(report.get("tokens", [])), train_steps=report.get("train_steps"),
               train_seconds=report.get("train_seconds"))
    return out


def read_entries(model_path: str, extended_paths, labels, with_original: bool = True) -> list[Entry]:
    """Check the model flags and read every extended model's report.json (nothing is loaded).

    Args:
        model_path: ``--model_path`` (the original model).
        extended_paths: comma-separated output directories of apply_embedding_init.py.
        labels: comma-separated display names, one per directory ("" : each run's init_method,
            made unique with the directory name).
        with_original: put the original model first.

    Returns:
        the entries, the original model first when ``with_original``.

    Raises:
        ConfigError: no directory, a directory without config.json / report.json, a wrong number of
            labels, repeated labels, or an unusable ``--model_path``.
    """
    from .metrics import _unique_labels, read_extended
    from .paths import resolve_model_source

    paths, names = split_list(extended_paths), split_list(labels)
    problems = [] if paths else ["--extended_paths is required: comma-separated output directories of "
                                 "apply_embedding_init.py"]
    problems += [f"--extended_paths: {p} is not an output directory of apply_embedding_init.py (needs config.json "
                 "and report.json)" for p in paths
                 if not all((Path(p).expanduser() / f).is_file() for f in ("config.json", "report.json"))]
    if names and len(names) != len(paths):
        problems.append(f"--labels: {len(names)} labels for {len(paths)} --extended_paths; pass one per directory")
    if problems:
        raise ConfigError(problems)
    exts = [read_extended(p, lab) for p, lab in zip(paths, names or [""] * len(paths))]
    if not names:
        _unique_labels(exts)
    taken = [e.label for e in exts] + ([ORIGINAL_LABEL] if with_original else [])
    if len(set(taken)) != len(taken):
        raise ConfigError(f"--labels: labels must be unique and not {ORIGINAL_LABEL!r} (got {taken})")
    source = resolve_model_source(str(model_path))
    entries = [Entry(ORIGINAL_LABEL, None, "original tokenization")] if with_original else []
    for e in exts:
        _warn_other_source(e, source)
        entries.append(Entry(e.label, e.path, str(e.report.get("config", {}).get("init_method", "?")),
                             settings_of(e.report), e))
    return entries


def _warn_other_source(ext, source) -> None:
    """Log a warning when a run's report names other weights than ``--model_path``."""
    made_from = str(ext.report.get("model", {}).get("identity", ""))
    if made_from and made_from.rsplit(":", 1)[-1] != source.identity.rsplit(":", 1)[-1]:
        logger.warning("%s was made from %s, not from --model_path %s (%s)", ext.path, made_from, source.spec,
                       source.identity)


def load_entry(entry: Entry, model_path: str, device, dtype, cache_root: Path):
    """Load an entry's model (frozen, eval mode, on ``device``) and tokenizer.

    The original model is loaded like the main tool loads it (hub id, directory, .gguf file or
    bundled alias; a GGUF file is converted once and cached); an extended model from its directory.

    Returns:
        ``(model, tokenizer)``.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .models import load_model, load_tokenizer, resolve_model_source

    if entry.path is None:
        source = resolve_model_source(model_path)
        return load_model(source, cache_root, device, dtype), load_tokenizer(source, cache_root)
    model = AutoModelForCausalLM.from_pretrained(entry.path, dtype=dtype).to(device).eval()
    model.requires_grad_(False)
    return model, AutoTokenizer.from_pretrained(entry.path)


def markdown_table(header: list[str], rows: list[list[Any]]) -> str:
    """A markdown table; floats with 1 decimal place, None as ``-``."""
    def cell(v):
        if v is None:
            return "-"
        return f"{v:.1f}" if isinstance(v, float) else str(v).replace("|", "\\|")

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def settings_text(entry: Entry) -> str:
    """A row's settings in one cell: ``key=value`` pairs (lists joined by ``+``; empty values and the
    training seconds left out), ``-`` for the original model."""
    def text(v):
        return "+".join(map(str, v)) if isinstance(v, (list, tuple)) else str(v)

    return ", ".join(f"{k}={text(v)}" for k, v in entry.settings.items()
                     if k != "train_seconds" and v not in (None, [], "")) or "-"


def write_json(path: Path, data: dict) -> None:
    """Write ``data`` as indented UTF-8 JSON, atomically (non-JSON values as text)."""
    replace_file(path, lambda tmp: tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False, default=str) + "\n",
                                                  encoding="utf-8"))


def write_text(path: Path, text: str) -> None:
    """Write ``text`` atomically (UTF-8)."""
    replace_file(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def resolve_dtype(name: str):
    """``--dtype`` as a torch dtype.

    Raises:
        ConfigError: an unknown name.
    """
    from .evaluate import DTYPES

    if name not in DTYPES:
        raise ConfigError(f"--dtype: unknown value {name!r}; choose one of: {', '.join(DTYPES)}")
    return DTYPES[name]
