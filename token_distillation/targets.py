"""Build the list of new tokens (``--build_target_method``).

- ``wordlist``: a plain text file (one token per line; a leading space is kept and meaningful) or
  a JSON object mapping categories to lists of words (the paper's concept-list format).
- ``frequency``: whole words of the corpus (and, with ``--max_ngram``, runs of words) in their
  running-text form " word", kept when the source tokenizer splits them into >= 2 subtokens, ranked
  by the tokens they save on the corpus: count x (subtokens - 1).
- ``ner``: named entities (a counts file, or spaCy over the corpus, see :mod:`.ner`), filtered as
  in Dobler et al. (arXiv 2505.20133): count >= cutoff, no digits, no punctuation, most frequent
  first, written with a leading space, not already in the vocabulary.
- ``tokenizer``: the tokens of another tokenizer that the source vocabulary lacks.

Every method returns a :class:`TargetList` that records how many candidates it saw and how many
each filter dropped; :func:`log_summary` logs it and :func:`write_new_tokens` writes
``new_tokens.jsonl``.
"""

from __future__ import annotations

import json
import logging
import re
import string
import unicodedata
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .config import BuildTargetMethod, ConfigError, CorpusConfig, TargetConfig
from .paths import not_utf8_error
from .tokenization import BYTE_LEVEL_SPACE, SENTENCEPIECE_SPACE, NewToken, marker_to_surface, subtoken_ids, whitespace_marker

logger = logging.getLogger(__name__)

# Reasons a candidate is dropped (keys of TargetList.dropped).
BELOW_MIN_COUNT = "count below --min_count"
HAS_DIGIT = "contains a digit"
HAS_PUNCT = "contains punctuation or symbols (not a whole word)"
BAD_SPACE = "line break, tab or repeated space inside"
IN_VOCAB = "already a single token in the vocabulary"
NGRAM_EDGE = "n-gram starts or ends with a very frequent word"
SPECIAL = "special, added or byte token"
NOT_UTF8 = "not a whole UTF-8 character sequence"
EMPTY = "empty"
DUPLICATE = "duplicate"
CAPPED = "beyond --num_new_tokens"

# Characters that may follow a word without making it part of a longer token (closing punctuation).
_CLOSING = ".,;:!?)]}\"'\u2019\u201d"
_WS = re.compile(r"\s")
# Whitespace inside a word-list entry that is almost never meant (a pasted table's columns, a line break).
_INNER_BREAKS = "\t\r\n\v\f\x85\u2028\u2029"
# N-grams whose first or last word is among this many most frequent corpus words are dropped.
NGRAM_EDGE_TOP = 50


@dataclass
class TargetList:
    """Result of target building.

    Attributes:
        tokens: kept tokens (surface form + original subtoken ids), in ranked (or input) order.
        skipped: ``{token text: reason}`` for individually reported dropped candidates (word lists).
        counts: ``{token text: count}`` for kept tokens whose corpus/counts-file count is known.
        method: the ``--build_target_method`` value.
        source: what the list was built from (file, corpus path, tokenizer).
        seen: number of distinct candidates considered.
        dropped: ``{filter: number of candidates it dropped}``.
        files: extra files to copy into the output, ``{name in output: path}`` (e.g. NER counts).
    """

    tokens: list[NewToken] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)
    method: str = BuildTargetMethod.WORDLIST.value
    source: str = ""
    seen: int = 0
    dropped: dict[str, int] = field(default_factory=dict)
    files: dict[str, Path] = field(default_factory=dict)


def read_target_wordlist(targets: TargetConfig) -> list[str] | None:
    """The ``--new_tokens_source`` word list of ``--build_target_method wordlist``, read once (warnings
    logged once), or None for the other methods. Needs no torch: the command line calls it before the
    slow imports, so a bad list fails in a fraction of a second.

    Raises:
        ConfigError: unreadable or malformed file (:func:`read_wordlist`), or a file with no word in it.
    """
    if targets.build_target_method != BuildTargetMethod.WORDLIST:
        return None
    if not str(targets.new_tokens_source):
        logger.info("no --new_tokens_source given: the bundled demo word list %s (pass --new_tokens_source "
                    "with your own list)", targets.wordlist_path)
    words = read_wordlist(targets.wordlist_path)
    if not any(w.strip() for w in words):
        what = "the file is empty" if not words else "only empty lines"
        raise ConfigError(f"--new_tokens_source {targets.wordlist_path}: no words in it ({what}); "
                          "write one token per line")
    return words


def read_wordlist(path: str | Path) -> list[str]:
    """Read candidate tokens from a text file (one per line), a JSON object of category -> list of
    words, a JSON list of words, or JSON lines each an object with a ``"token"`` field (the tool's own
    ``new_tokens.jsonl`` and the lists in ``new_tokens/*.jsonl``). A UTF-8 byte-order mark is dropped.

    Lines are kept verbatim except for the trailing newline and trailing whitespace (a leading
    space is meaningful: " word" and "word" are different tokens; a trailing one would make a token
    whose last subtoken is a bare space marker, so it is stripped, with a logged note).

    Raises:
        ConfigError: unreadable file or JSON of the wrong shape.
    """
    p = Path(path).expanduser().absolute()  # messages name the whole path, also for a relative one
    try:
        raw = p.read_text(encoding="utf-8-sig")  # a byte-order mark would start the first word
    except UnicodeDecodeError as e:
        raise not_utf8_error("--new_tokens_source", p, e.reason, e.start) from None
    except OSError as e:
        raise ConfigError(f"--new_tokens_source: cannot read {p}: {e}") from None
    if p.suffix.lower() == ".jsonl":
        return _tidy_whitespace(_jsonl_tokens(raw, p), p, "line")
    data = None
    if p.suffix.lower() == ".json" or raw.lstrip().startswith(("{", "[")):
        try:
            data = json.loads(raw)
        except json.JSONDecodeError as e:
            if e.msg == "Extra data" and raw.lstrip().startswith("{"):  # JSON lines under another name
                return _tidy_whitespace(_jsonl_tokens(raw, p), p, "line")
            if p.suffix.lower() == ".json":
                raise ConfigError(f"--new_tokens_source: {p} is not valid JSON ({e}); use one token per line "
                                  "or a JSON object of categories -> lists of words") from None
            # a plain list whose first word starts with a bracket ("[MASK]"): one token per line
            logger.info("--new_tokens_source %s starts with %r but is not JSON (%s): read as one token per line",
                        p, raw.lstrip()[:1], e.msg)
    if data is not None:
        if isinstance(data, dict):
            words: list[str] = []
            for cat, items in data.items():
                if not isinstance(items, list) or not all(isinstance(w, str) for w in items):
                    raise ConfigError(f"--new_tokens_source: category {cat!r} in {p} must be a list of strings")
                words.extend(items)
            return _tidy_whitespace(words, p, "entry")
        if isinstance(data, list) and all(isinstance(w, str) for w in data):
            return _tidy_whitespace(list(data), p, "entry")
        raise ConfigError(f"--new_tokens_source: {p} must hold a JSON object of categories -> lists of words")
    lines = [line.rstrip("\r") for line in raw.split("\n")]
    if lines and lines[-1] == "":
        lines.pop()  # the file's final newline ends the last line; it is not an empty candidate
    hashed = [i + 1 for i, line in enumerate(lines) if line.lstrip().startswith("# ")]
    if hashed:
        logger.warning("--new_tokens_source %s: line(s) %s start with '# '; a word list has no comments, so they "
                       "become new tokens like any other line (delete them if they are comments)", p,
                       ", ".join(map(str, hashed[:10])) + (" ..." if len(hashed) > 10 else ""))
    return _tidy_whitespace(lines, p, "line")


def _jsonl_tokens(raw: str, path: Path) -> list[str]:
    """The ``"token"`` field of every line of a JSON-lines word list (blank lines skipped).

    Raises:
        ConfigError: a line that is not a JSON object (:func:`~token_distillation.corpus.json_objects`), or one
            without a string ``"token"``.
    """
    from .corpus import json_objects

    words = []
    for n, item in json_objects(raw.splitlines(), path, "--new_tokens_source"):
        if not isinstance(item.get("token"), str):
            raise ConfigError(f"--new_tokens_source: {path} line {n} has no string \"token\" field "
                              f"({', '.join(map(repr, item))}); a JSON-lines word list holds one object per line "
                              'like {"token": " word"}')
        words.append(item["token"])
    return words


def _tidy_whitespace(words: list[str], path: Path, unit: str) -> list[str]:
    """Strip trailing whitespace from every word, logging which ones (1-based ``unit`` numbers), and
    warn about words led by whitespace other than one space (a tab, two spaces: kept, as they may be
    meant, but running text puts one space before a word, so such a token is rarely used)."""
    out = [w.rstrip() for w in words]
    changed = [i + 1 for i, (a, b) in enumerate(zip(words, out)) if a != b and b.strip()]

    def _numbers(idx: list[int]) -> str:
        return ", ".join(map(str, idx[:10])) + (" ..." if len(idx) > 10 else "")

    if changed:
        logger.info("--new_tokens_source %s: stripped trailing whitespace from %d %s(s) (%s %s); a trailing space "
                    "would become a token of its own", path, len(changed), unit, unit, _numbers(changed))
    odd = [i + 1 for i, w in enumerate(out) if w.strip() and w[:1].isspace() and not re.match(r" \S", w)]
    if odd:
        logger.warning("--new_tokens_source %s: %d %s(s) (%s %s, e.g. %r) start with whitespace other than one "
                       "space (a tab, several spaces); they are kept as written, but a word in running text "
                       "follows one space (\" word\"): write them so if that is what you meant", path,
                       len(odd), unit, unit, _numbers(odd), out[odd[0] - 1])
    inner = [i + 1 for i, w in enumerate(out) if any(c in _INNER_BREAKS for c in w.strip())]
    if inner:  # a pasted "word<TAB>count" table: the count would become part of the token
        logger.warning("--new_tokens_source %s: %d %s(s) (%s %s, e.g. %r) hold a tab or line break inside; they "
                       "are kept as written, as one token each; if the file is a table (word<TAB>count), keep "
                       "only the word column (e.g. cut -f1)", path, len(inner), unit, unit, _numbers(inner),
                       out[inner[0] - 1])
    return out


def filter_candidates(tokenizer, candidates: list[str], add_leading_space: bool = False) -> TargetList:
    """Turn candidate strings into :class:`NewToken` records, dropping unusable ones with a reason.

    Dropped: empty or whitespace-only strings, repeats of an earlier candidate, strings that are
    already one token of the vocabulary. Marker forms ("Ġword", "▁word") are converted to surface
    form first. ``seen`` counts every candidate and ``dropped`` every dropped one by reason;
    ``skipped`` names the distinct texts not added, with the reason (a repeat is not there: its text
    is added once, and a warning counts the repeats).
    """
    result = TargetList(seen=len(candidates))
    seen: set[str] = set()
    repeats: list[str] = []
    for raw in candidates:
        text = marker_to_surface(raw)
        if add_leading_space and text and not text.startswith(" "):
            text = " " + text
        if not text.strip():
            result.skipped[repr(raw)] = EMPTY
            _drop(result, EMPTY)
            continue
        if text in seen:
            repeats.append(text)
            _drop(result, DUPLICATE)
            continue
        seen.add(text)
        ids = subtoken_ids(tokenizer, text)
        if len(ids) < 2:
            result.skipped[text] = IN_VOCAB
            _drop(result, IN_VOCAB)
            continue
        result.tokens.append(NewToken(text=text, subtoken_ids=tuple(ids)))
    for text, reason in result.skipped.items():
        logger.info("skipping candidate %r: %s", text, reason)
    if repeats:  # harmless, but often a sign of a list merged twice or of entries meant to differ
        shown = list(dict.fromkeys(repeats))
        logger.warning("%d candidate(s) repeat an earlier one and are added once: %s%s", len(repeats),
                       ", ".join(map(repr, shown[:5])) + (", ..." if len(shown) > 5 else ""),
                       " (with --add_leading_space true, 'word' and ' word' are the same token)"
                       if add_leading_space else "")
    return result


def _warn_bare_words(texts: list[str]) -> list[str]:
    """Warn once about word-list entries that start with a letter and have no leading space: in
    running text a word after a space is the token " word" (byte-level BPE and SentencePiece alike),
    a different token, so "word" is used only at the start of a text or inside longer words.
    Returns those entries."""
    bare = [t for t in texts if t[:1].isalpha()]
    if bare:
        logger.warning("%d of %d word(s) have no leading space (%s): \"word\" and \" word\" are different tokens, "
                       "and a word after a space in running text is \" word\"; pass --add_leading_space true if "
                       "you meant the words of running text", len(bare), len(texts),
                       ", ".join(map(repr, bare[:5])) + (", ..." if len(bare) > 5 else ""))
    return bare


# ----------------------------------------------------------------------------- shared helpers


def batch_subtoken_ids(tokenizer, texts: list[str], batch_size: int = 2048) -> list[list[int]]:
    """:func:`~token_distillation.tokenization.subtoken_ids` for many texts, in batches (same result)."""
    prefix = tokenizer.encode("\n", add_special_tokens=False)
    out: list[list[int]] = []
    for i in range(0, len(texts), batch_size):
        chunk = texts[i: i + batch_size]
        enc = tokenizer(["\n" + t for t in chunk], add_special_tokens=False)["input_ids"]
        for text, ids in zip(chunk, enc):
            if prefix and ids[: len(prefix)] == prefix:
                out.append(list(ids[len(prefix):]))
            else:
                out.append(subtoken_ids(tokenizer, text))
    return out


def _byte_level_table() -> dict[int, str]:
    """GPT-2 byte-level alphabet: byte value -> the printable character that stands for it."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAC + 1)) + list(range(0xAE, 0xFF + 1))
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


_BYTE_TO_CHAR = _byte_level_table()
_CHAR_TO_BYTE = {c: b for b, c in _BYTE_TO_CHAR.items()}


def vocab_entry_to_surface(entry: str, marker: str | None) -> str | None:
    """Surface text of a vocabulary entry: "Ġword"/"▁word" -> " word".

    For byte-level vocabularies the entry's characters are mapped back to bytes and decoded as
    UTF-8 (None when they are not a whole UTF-8 sequence, e.g. half of a multi-byte character).
    """
    if marker == BYTE_LEVEL_SPACE:
        try:
            return bytes(_CHAR_TO_BYTE[c] for c in entry).decode("utf-8")
        except (KeyError, UnicodeDecodeError):
            return None
    return marker_to_surface(entry)


def surface_to_vocab_entry(text: str, marker: str | None) -> str:
    """Inverse of :func:`vocab_entry_to_surface`: " word" -> "Ġword" (byte-level) or "▁word"."""
    if marker == BYTE_LEVEL_SPACE:
        return "".join(_BYTE_TO_CHAR[b] for b in text.encode("utf-8"))
    if marker == SENTENCEPIECE_SPACE:
        return text.replace(" ", SENTENCEPIECE_SPACE)
    return text


def _has_punct(text: str) -> bool:
    """True if ``text`` has an ASCII punctuation character or a Unicode punctuation/symbol."""
    return any(c in string.punctuation or unicodedata.category(c)[0] in "PS" for c in text)


def _finalise(tokenizer, cfg: TargetConfig, result: TargetList, candidates: list[str], rank_by_saved: bool) -> TargetList:
    """Tokenize surface-form candidates, drop those already in the vocabulary, rank and cap.

    Args:
        candidates: distinct surface forms (" word") that passed the method's own filters, in the
            method's order (used as is when ``rank_by_saved`` is False).
        rank_by_saved: sort by tokens saved = count x (subtokens - 1), then count, then text.
    """
    marker = whitespace_marker(tokenizer)
    vocab = tokenizer.get_vocab()
    kept: list[NewToken] = []
    for text, ids in zip(candidates, batch_subtoken_ids(tokenizer, candidates)):
        if len(ids) < 2 or surface_to_vocab_entry(text, marker) in vocab:
            result.dropped[IN_VOCAB] = result.dropped.get(IN_VOCAB, 0) + 1
            continue
        kept.append(NewToken(text=text, subtoken_ids=tuple(ids)))
    if rank_by_saved:
        kept.sort(key=lambda t: (-result.counts[t.text] * (len(t.subtoken_ids) - 1), -result.counts[t.text], t.text))
    if cfg.num_new_tokens and len(kept) > cfg.num_new_tokens:
        result.dropped[CAPPED] = len(kept) - cfg.num_new_tokens
        kept = kept[: cfg.num_new_tokens]
    result.tokens = kept
    result.counts = {t.text: result.counts[t.text] for t in kept if t.text in result.counts}
    return result


def _drop(result: TargetList, reason: str, n: int = 1) -> None:
    result.dropped[reason] = result.dropped.get(reason, 0) + n


# ----------------------------------------------------------------------------- frequency


def _classify_chunk(chunk: str) -> tuple[str | None, str | None, bool]:
    """Classify one space-delimited chunk of running text (the text after a single " ").

    Returns:
        ``(word, reason, joins)``: ``word`` is the whole word the chunk starts with (closing
        punctuation such as ".,;:)" removed), or None with the ``reason`` it is not a candidate
        (None reason: nothing to count, e.g. an empty chunk). ``joins`` is True when the word is
        followed directly by the next space, so that it can continue an n-gram.
    """
    m = _WS.search(chunk)
    head = chunk[: m.start()] if m else chunk
    core = head.rstrip(_CLOSING)
    if not core:
        return None, None, False
    if any(c.isdigit() for c in core):
        return None, HAS_DIGIT, False
    if not core.isalpha():
        return None, HAS_PUNCT, False
    return core, None, m is None and len(core) == len(head)


def count_words(texts, max_ngram: int = 1, edge_top: int = NGRAM_EDGE_TOP) -> tuple[Counter, dict[str, int], int]:
    """Count whole words (and runs of up to ``max_ngram`` words) as they occur after a space.

    A candidate occurrence is a maximal run of letters that follows a single space and is followed
    by whitespace, closing punctuation (``.,;:!?)]}"'``) or the end of the text, so that its
    surface form " word" really occurs in the text; chunks with digits or inner punctuation
    ("IL-6", "p53", "(word", "e.g.") are dropped, and the first word of a text (no space before it)
    is not counted. An n-gram is a run of such words separated by single spaces.

    Returns:
        ``(counts {" w1 w2": n}, dropped {reason: distinct chunks}, distinct chunks seen)``.
    """
    chunk_counts: Counter[str] = Counter()
    ngrams: Counter[str] = Counter()
    cache: dict[str, tuple[str | None, str | None, bool]] = {}
    for text in texts:
        if not isinstance(text, str):
            continue
        parts = text.split(" ")[1:]
        chunk_counts.update(parts)
        if max_ngram == 1:
            continue
        run: list[str] = []
        for part in parts:
            info = cache.get(part)
            if info is None:
                info = cache[part] = _classify_chunk(part)
            word, _, joins = info
            if word is None:
                run = []
                continue
            run.append(word)
            for n in range(2, min(max_ngram, len(run)) + 1):
                ngrams[" " + " ".join(run[-n:])] += 1
            if not joins:
                run = []
            elif len(run) >= max_ngram:
                run = run[1 - max_ngram:]
    counts: Counter[str] = Counter()
    dropped: dict[str, int] = {}
    for chunk, n in chunk_counts.items():
        word, reason, _ = cache.get(chunk) or _classify_chunk(chunk)
        if word is not None:
            counts[" " + word] += n
        elif reason is not None:
            dropped[reason] = dropped.get(reason, 0) + 1
    seen = len(counts) + sum(dropped.values())
    if ngrams:
        lower: Counter[str] = Counter()
        for w, n in counts.items():
            lower[w.strip().lower()] += n
        top = {w for w, _ in lower.most_common(edge_top)}
        for g, n in ngrams.items():
            words = g.strip().split(" ")
            seen += 1
            if words[0].lower() in top or words[-1].lower() in top:
                dropped[NGRAM_EDGE] = dropped.get(NGRAM_EDGE, 0) + 1
                continue
            counts[g] = n
    return counts, dropped, seen


def frequency_targets(cfg: TargetConfig, tokenizer, texts, source: str = "") -> TargetList:
    """``frequency``: the corpus words (n-grams) that save the most tokens when added.

    Kept: count >= ``--min_count``, split into >= 2 subtokens and not a vocabulary entry. Ranked by
    tokens saved on the corpus, count x (subtokens - 1), ties by count (descending) then text.
    """
    counts, dropped, seen = count_words(texts, cfg.max_ngram)
    result = TargetList(method=BuildTargetMethod.FREQUENCY.value, source=source, seen=seen, dropped=dropped)
    cands = []
    for text, n in counts.items():
        if n < cfg.min_count:
            _drop(result, BELOW_MIN_COUNT)
            continue
        cands.append(text)
        result.counts[text] = n
    return _finalise(tokenizer, cfg, result, sorted(cands), rank_by_saved=True)


# ----------------------------------------------------------------------------- NER


def ner_targets(cfg: TargetConfig, tokenizer, counts: dict[str, int], source: str = "") -> TargetList:
    """``ner``: filter entity counts as in Dobler et al. (arXiv 2505.20133).

    Kept: count >= ``--min_count``, no digit, no punctuation character (ASCII punctuation or a
    Unicode punctuation/symbol), no line break/tab/repeated space; written with a leading space
    (" Alzheimer disease"); not already a single token. Sorted by count (descending), then text.
    """
    result = TargetList(method=BuildTargetMethod.NER.value, source=source, seen=len(counts))
    merged: dict[str, int] = {}
    for ent, n in counts.items():
        ent = ent.strip(" ")
        if not ent:
            _drop(result, EMPTY)
        elif n < cfg.min_count:
            _drop(result, BELOW_MIN_COUNT)
        elif any(c.isdigit() for c in ent):
            _drop(result, HAS_DIGIT)
        elif _has_punct(ent):
            _drop(result, HAS_PUNCT)
        elif _WS.search(ent.replace(" ", "")) or "  " in ent:
            _drop(result, BAD_SPACE)
        else:
            merged[" " + ent] = merged.get(" " + ent, 0) + n
    result.counts = merged
    ranked = sorted(merged, key=lambda t: (-merged[t], t))
    return _finalise(tokenizer, cfg, result, ranked, rank_by_saved=False)


# ----------------------------------------------------------------------------- target tokenizer


def load_target_tokenizer(spec: str, cache_root: Path):
    """Load ``--target_tokenizer``: a bundled alias, a model/tokenizer directory, a .gguf file or a hub id.

    Raises:
        ConfigError: nothing loadable at ``spec``.
    """
    from transformers import AutoTokenizer

    from .models import BUNDLED_MODELS, load_tokenizer, resolve_model_source

    p = Path(spec).expanduser()
    try:
        if spec in BUNDLED_MODELS or p.suffix.lower() == ".gguf" or (p.is_dir() and (p / "config.json").is_file()):
            return load_tokenizer(resolve_model_source(spec), cache_root)
        return AutoTokenizer.from_pretrained(str(p) if p.exists() else spec)
    except ConfigError as e:
        raise ConfigError(str(e).replace("--model_path", "--target_tokenizer")) from None
    except Exception as e:  # transformers raises OSError, ValueError, ...
        raise ConfigError(f"--target_tokenizer {spec!r}: cannot load a tokenizer ({e}); pass a tokenizer "
                          "directory, a hub id or a bundled alias") from None


_BYTE_TOKEN = re.compile(r"^<0x[0-9A-Fa-f]{2}>$")


def tokenizer_targets(cfg: TargetConfig, tokenizer, target) -> TargetList:
    """``tokenizer``: entries of ``target``'s vocabulary that the source vocabulary lacks.

    Entries are converted from the target's whitespace marker to surface text ("Ġword"/"▁word" ->
    " word"), in target-id order. Special and other added tokens (e.g. Gemma's "<table>" markup
    tokens), byte tokens ("<0x0A>") and entries that are not whole UTF-8 text are skipped.
    """
    marker = whitespace_marker(target)
    special = set(target.all_special_tokens)
    special |= {str(t) for t in getattr(target, "added_tokens_decoder", {}).values()}
    vocab = sorted(target.get_vocab().items(), key=lambda kv: kv[1])
    result = TargetList(method=BuildTargetMethod.TOKENIZER.value, source=str(cfg.target_tokenizer), seen=len(vocab))
    seen_text: set[str] = set()
    cands: list[str] = []
    for entry, _ in vocab:
        if entry in special or _BYTE_TOKEN.match(entry):
            _drop(result, SPECIAL)
            continue
        text = vocab_entry_to_surface(entry, marker)
        if text is None:
            _drop(result, NOT_UTF8)
        elif not text.strip():
            _drop(result, EMPTY)
        elif text in seen_text:
            _drop(result, DUPLICATE)
        else:
            seen_text.add(text)
            cands.append(text)
    return _finalise(tokenizer, cfg, result, cands, rank_by_saved=False)


# ----------------------------------------------------------------------------- entry point


def build_targets(cfg: TargetConfig, tokenizer, corpus_cfg: CorpusConfig | None = None,
                  cache_root: Path | None = None, words: list[str] | None = None,
                  wordlist_read: list[str] | None = None) -> TargetList:
    """Build the new-token list according to ``--build_target_method``.

    Args:
        cfg: the target flags.
        tokenizer: the source tokenizer (subtokens and vocabulary checks).
        corpus_cfg: the corpus (needed by ``frequency``, and by ``ner`` without a counts file).
        cache_root: cache directory (NER counts, converted tokenizers).
        words: the candidate tokens themselves (the Python API's ``new_tokens``), filtered like a
            word list (``--build_target_method`` is then not used).
        wordlist_read: the lines of ``--new_tokens_source`` already read by :func:`read_wordlist` (its
            warnings logged), so that the file is not read and warned about twice.

    Raises:
        ConfigError: missing corpus, unreadable input, or an empty list after filtering.
    """
    from .models import default_cache_root

    cache_root = cache_root or default_cache_root()
    method = BuildTargetMethod.WORDLIST if words is not None else cfg.build_target_method
    needs_corpus = method == BuildTargetMethod.FREQUENCY or (method == BuildTargetMethod.NER and not cfg.new_tokens_source)
    if needs_corpus and (corpus_cfg is None or not corpus_cfg.dataset_path):
        raise ConfigError(f"--build_target_method {method.value} needs a corpus: pass --dataset_path")
    if method == BuildTargetMethod.WORDLIST:
        if words is not None:  # the Python API's list: no file is read
            listed, source = list(words), "new_tokens"
        else:
            listed = wordlist_read if wordlist_read is not None else read_wordlist(cfg.wordlist_path)
            source = cfg.wordlist_path
        targets = filter_candidates(tokenizer, listed, cfg.add_leading_space)
        targets.source = source
        if not cfg.add_leading_space:
            _warn_bare_words([t.text for t in targets.tokens])
        if cfg.num_new_tokens and len(targets.tokens) > cfg.num_new_tokens:
            _drop(targets, CAPPED, len(targets.tokens) - cfg.num_new_tokens)
            for t in targets.tokens[cfg.num_new_tokens:]:
                targets.skipped[t.text] = CAPPED
            targets.tokens = targets.tokens[: cfg.num_new_tokens]
        hint = "add words that the tokenizer splits into several subtokens"
    elif method == BuildTargetMethod.FREQUENCY:
        from .corpus import iter_texts

        # streamed: the counters grow with the vocabulary, not with the corpus
        targets = frequency_targets(cfg, tokenizer, iter_texts(corpus_cfg), source=corpus_cfg.dataset_path)
        hint = ("the corpus has no word that occurs --min_count times and is split into several subtokens; "
                "pass a larger --dataset_path or lower --min_count")
    elif method == BuildTargetMethod.NER:
        from . import ner

        if cfg.new_tokens_source:
            counts, path = ner.read_counts(cfg.new_tokens_source), Path(cfg.new_tokens_source).expanduser()
        else:
            counts, path = ner.ner_counts_for_corpus(corpus_cfg, cfg.ner_model, cfg.ner_n_process,
                                                     cfg.ner_batch_size, cache_root)
        targets = ner_targets(cfg, tokenizer, counts, source=str(path))
        targets.files["ner_counts.jsonl"] = path
        hint = ("no entity passes the filters (count >= --min_count, no digits or punctuation, not in the "
                "vocabulary); use a larger corpus or lower --min_count")
    else:
        target = load_target_tokenizer(cfg.target_tokenizer, cache_root)
        targets = tokenizer_targets(cfg, tokenizer, target)
        hint = "the source vocabulary already has every token of --target_tokenizer"
    if not targets.tokens:
        raise ConfigError(f"--build_target_method {method.value} ({targets.source}): no usable new tokens "
                          f"({targets.seen} candidate(s), dropped: {_summarise(targets.dropped)}); {hint}")
    logger.info("new tokens (%s from %s): %d candidate(s) seen, %d kept; dropped: %s", method.value,
                targets.source, targets.seen, len(targets.tokens), _summarise(targets.dropped))
    return targets


def _summarise(dropped: dict[str, int]) -> str:
    return ", ".join(f"{n} {r}" for r, n in dropped.items()) or "none"


# ----------------------------------------------------------------------------- corpus gain and outputs


def corpus_occurrences(corpus, tokens: list[NewToken], chunk_docs: int = 2000) -> tuple[list[int], int, int]:
    """Occurrences of each new token's subtoken sequence in a tokenized corpus and the length gain.

    Matches are leftmost-longest and non-overlapping, as the extended tokenizer merges them.

    Args:
        corpus: a :class:`~token_distillation.corpus.TokenizedCorpus`.

    Returns:
        ``(occurrences per token, corpus tokens before, corpus tokens after adding the tokens)``.
    """
    from .alignment import PhraseMatcher, ids_to_str

    matcher = PhraseMatcher([t.subtoken_ids for t in tokens])
    occ = np.zeros(len(tokens), dtype=np.int64)
    for c in range(0, corpus.num_docs, chunk_docs):
        hay = " ".join(ids_to_str(corpus.doc(d)) for d in range(c, min(c + chunk_docs, corpus.num_docs)))
        pats = [p for p, _, _ in matcher.find_in_str(hay)]
        if pats:
            occ += np.bincount(np.asarray(pats), minlength=len(tokens))
    before = int(len(corpus.ids))
    saved = int(sum(int(o) * (len(t.subtoken_ids) - 1) for o, t in zip(occ, tokens)))
    return [int(o) for o in occ], before, before - saved


def log_summary(targets: TargetList, before: int | None = None, after: int | None = None) -> dict:
    """Log the target-building summary; return it as a dict (for report.json)."""
    summary = {"method": targets.method, "source": targets.source, "candidates_seen": targets.seen,
               "kept": len(targets.tokens), "dropped": dict(targets.dropped),
               "corpus_tokens_before": before, "corpus_tokens_after": after}
    if before is not None and after is not None:
        logger.info("corpus length: %d tokens before, about %d after adding the %d new tokens (%.2f%% shorter; "
                    "counted where a word's exact subtokens occur, so uses inside longer words are not counted)",
                    before, after, len(targets.tokens), 100.0 * (before - after) / max(before, 1))
    return summary


def new_token_records(targets: TargetList, tokenizer, occurrences: list[int] | None = None) -> list[dict]:
    """One record per kept token for ``new_tokens.jsonl``.

    ``count``: the method's count (corpus words, entity counts) or null; ``occurrences``: matches
    of the subtoken sequence in the tokenized corpus, or null without a corpus; ``tokens_saved``:
    occurrences x (subtokens - 1) when measured, else count x (subtokens - 1), else null.
    """
    out = []
    for i, t in enumerate(targets.tokens):
        count = targets.counts.get(t.text)
        occ = occurrences[i] if occurrences is not None else None
        k = len(t.subtoken_ids) - 1
        saved = occ * k if occ is not None else (count * k if count is not None else None)
        out.append({"token": t.text, "count": count, "occurrences": occ,
                    "subtokens": tokenizer.convert_ids_to_tokens(list(t.subtoken_ids)),
                    "subtoken_ids": list(t.subtoken_ids), "tokens_saved": saved,
                    "source": f"{targets.method}:{targets.source}"})
    return out


def write_new_tokens(path: Path, records: list[dict]) -> None:
    """Write ``new_tokens.jsonl`` (one JSON object per token, in list order)."""
    with open(path, "w", encoding="utf-8") as fh:
        for r in records:
            fh.write(json.dumps(r, ensure_ascii=False) + "\n")


def coverage_table(records: list[dict], train_counts: list[int] | None, heldout_counts: list[int] | None,
                   inexact_firings: list[int] | None = None) -> str:
    """Tab-separated table: token, count, occurrences (exact), training and held-out snippets, and,
    when given, the uses the extended tokenizer makes of the token inside longer words
    (``inexact_firings``, :func:`token_distillation.firing.fires_inexactly`) in the documents read."""
    lines = ["token\tcount\toccurrences\ttrain_snippets\theldout_snippets"
             + ("\tinexact_firings" if inexact_firings is not None else "")]
    for i, r in enumerate(records):
        tr = train_counts[i] if train_counts is not None else ""
        he = heldout_counts[i] if heldout_counts is not None else ""
        cnt = "" if r["count"] is None else r["count"]
        occ = "" if r["occurrences"] is None else r["occurrences"]
        extra = f"\t{inexact_firings[i]}" if inexact_firings is not None else ""
        lines.append(f"{json.dumps(r['token'], ensure_ascii=False)}\t{cnt}\t{occ}\t{tr}\t{he}{extra}")
    return "\n".join(lines) + "\n"
