"""Build the list of new tokens.

Word lists: a plain text file (one token per line; a leading space is kept and meaningful) or a
JSON object mapping categories to lists of words (the paper's concept-list format).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

from .config import ConfigError, TargetConfig
from .tokenization import NewToken, marker_to_surface, subtoken_ids

logger = logging.getLogger(__name__)


@dataclass
class TargetList:
    """Result of target building.

    Attributes:
        tokens: kept tokens (surface form + original subtoken ids), in input order.
        skipped: ``{token text: reason}`` for every dropped candidate.
    """

    tokens: list[NewToken] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)


def read_wordlist(path: str | Path) -> list[str]:
    """Read candidate tokens from a text file or a JSON object of category -> list of words.

    Lines are kept verbatim except for the trailing newline (a leading space is meaningful).

    Raises:
        ConfigError: unreadable file or JSON of the wrong shape.
    """
    p = Path(path).expanduser()
    try:
        raw = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"--new_tokens_source: cannot read {p}: {e}") from None
    if p.suffix.lower() == ".json" or raw.lstrip().startswith(("{", "[")):
        try:
            data = json.loads(raw)
        except json.JSONDecodeError as e:
            raise ConfigError(f"--new_tokens_source: {p} is not valid JSON ({e}); use one token per line "
                              "or a JSON object of categories -> lists of words") from None
        if isinstance(data, dict):
            words: list[str] = []
            for cat, items in data.items():
                if not isinstance(items, list) or not all(isinstance(w, str) for w in items):
                    raise ConfigError(f"--new_tokens_source: category {cat!r} in {p} must be a list of strings")
                words.extend(items)
            return words
        if isinstance(data, list) and all(isinstance(w, str) for w in data):
            return list(data)
        raise ConfigError(f"--new_tokens_source: {p} must hold a JSON object of categories -> lists of words")
    lines = [line.rstrip("\r") for line in raw.split("\n")]
    if lines and lines[-1] == "":
        lines.pop()  # the file's final newline ends the last line; it is not an empty candidate
    return lines


def filter_candidates(tokenizer, candidates: list[str], add_leading_space: bool = False) -> TargetList:
    """Turn candidate strings into :class:`NewToken` records, dropping unusable ones with a reason.

    Dropped: empty or whitespace-only strings, duplicates, strings that are already one token of the
    vocabulary. Marker forms ("Ġword", "▁word") are converted to surface form first.
    """
    result = TargetList()
    seen: set[str] = set()
    for raw in candidates:
        text = marker_to_surface(raw)
        if add_leading_space and text and not text.startswith(" "):
            text = " " + text
        if not text.strip():
            result.skipped[repr(raw)] = "empty"
            continue
        if text in seen:
            result.skipped.setdefault(text, "duplicate")
            continue
        seen.add(text)
        ids = subtoken_ids(tokenizer, text)
        if len(ids) < 2:
            result.skipped[text] = "already a single token in the vocabulary"
            continue
        result.tokens.append(NewToken(text=text, subtoken_ids=tuple(ids)))
    for text, reason in result.skipped.items():
        logger.info("skipping candidate %r: %s", text, reason)
    return result


def build_targets(cfg: TargetConfig, tokenizer) -> TargetList:
    """Build the new-token list according to ``--build_target_method``.

    Raises:
        ConfigError: the list is empty after filtering.
    """
    candidates = read_wordlist(cfg.new_tokens_source)
    targets = filter_candidates(tokenizer, candidates, cfg.add_leading_space)
    if not targets.tokens:
        raise ConfigError(
            f"--new_tokens_source {cfg.new_tokens_source}: no usable new tokens "
            f"({len(targets.skipped)} candidates skipped: {_summarise(targets.skipped)}); "
            "add words that the tokenizer splits into several subtokens"
        )
    logger.info("new tokens: %d kept, %d skipped", len(targets.tokens), len(targets.skipped))
    return targets


def _summarise(skipped: dict[str, str]) -> str:
    counts: dict[str, int] = {}
    for reason in skipped.values():
        counts[reason] = counts.get(reason, 0) + 1
    return ", ".join(f"{n} {r}" for r, n in counts.items()) or "none"
