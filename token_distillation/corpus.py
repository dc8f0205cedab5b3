"""Load a text corpus with ``datasets`` and tokenize it once (cached, keyed by content).

The tokenized corpus is stored as two arrays: ``ids`` (all documents' token ids concatenated,
int32) and ``offsets`` (``[num_docs + 1]``, document ``d`` is ``ids[offsets[d]:offsets[d+1]]``),
plus the document ids when the corpus has an ``id`` column.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .config import ConfigError, CorpusConfig

logger = logging.getLogger(__name__)

_LOCAL_BUILDERS = {".jsonl": "json", ".json": "json", ".txt": "text", ".csv": "csv", ".parquet": "parquet"}


@dataclass
class TokenizedCorpus:
    """A tokenized corpus.

    Attributes:
        ids: ``[total_tokens]`` int32 token ids of all documents, concatenated.
        offsets: ``[num_docs + 1]`` int64 start offsets into ``ids``.
        doc_ids: ``[num_docs]`` document identifiers (the ``id`` column, else the row index).
    """

    ids: np.ndarray
    offsets: np.ndarray
    doc_ids: list[str]

    @property
    def num_docs(self) -> int:
        return len(self.offsets) - 1

    def doc(self, d: int) -> np.ndarray:
        """Token ids of document ``d``, shape ``[doc_len]``."""
        return self.ids[self.offsets[d]: self.offsets[d + 1]]


def _local_files(path: Path) -> tuple[str, list[str]]:
    if path.is_file():
        suffixes = [s.lower() for s in path.suffixes]
        ext = suffixes[-2] if suffixes and suffixes[-1] == ".gz" and len(suffixes) > 1 else (suffixes[-1] if suffixes else "")
        if ext not in _LOCAL_BUILDERS:
            raise ConfigError(f"--dataset_path {path}: unsupported file type {ext!r}; use jsonl, json, txt, csv or parquet")
        return _LOCAL_BUILDERS[ext], [str(path)]
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in _LOCAL_BUILDERS)
    if not files:
        raise ConfigError(f"--dataset_path {path}: no jsonl, json, txt, csv or parquet files in the directory")
    builders = {_LOCAL_BUILDERS[p.suffix.lower()] for p in files}
    if len(builders) > 1:
        raise ConfigError(f"--dataset_path {path}: mixed file types {sorted(builders)}; keep one type per directory")
    return builders.pop(), [str(p) for p in files]


def corpus_identity(cfg: CorpusConfig) -> str:
    """A string identifying the corpus content and the reading options (for cache keys)."""
    path = Path(cfg.dataset_path).expanduser()
    parts = [f"split={cfg.dataset_split}", f"name={cfg.dataset_name}", f"col={cfg.text_column}",
             f"max_docs={cfg.max_docs}"]
    if path.exists():
        _, files = _local_files(path)
        for f in files:
            st = os.stat(f)
            parts.append(f"{Path(f).resolve()}:{st.st_size}:{st.st_mtime_ns}")
    else:
        parts.append(f"hub:{cfg.dataset_path}")
    return "|".join(parts)


def load_texts(cfg: CorpusConfig):
    """Load the corpus as a ``datasets.Dataset`` with the text column checked.

    Raises:
        ConfigError: missing file, unsupported type, missing text column, unreadable line.
    """
    import datasets

    path = Path(cfg.dataset_path).expanduser()
    try:
        if path.exists():
            builder, files = _local_files(path)
            _check_json_lines(builder, files)
            ds = datasets.load_dataset(builder, data_files=files, split="train")
        else:
            ds = datasets.load_dataset(cfg.dataset_path, cfg.dataset_name or None, split=cfg.dataset_split)
    except ConfigError:
        raise
    except Exception as e:  # datasets raises many types; report them as a flag problem
        raise ConfigError(f"--dataset_path {cfg.dataset_path}: could not load the dataset: {e}") from None
    if cfg.text_column not in ds.column_names:
        raise ConfigError(f"--text_column {cfg.text_column!r} not found in {cfg.dataset_path}; "
                          f"available columns: {ds.column_names}")
    if cfg.max_docs:
        ds = ds.select(range(min(cfg.max_docs, len(ds))))
    return ds


def iter_jsonl(path: str | Path, flag: str = "--dataset_path"):
    """``(line number, record)`` for every non-empty line of a JSON Lines file (1-based numbers).

    Raises:
        ConfigError: a line that is not valid JSON or not a JSON object (named with its number).
    """
    with open(Path(path).expanduser(), encoding="utf-8") as f:
        for n, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError as e:
                raise ConfigError(f"{flag} {path}: line {n} is not valid JSON ({e})") from None
            if not isinstance(record, dict):
                raise ConfigError(f"{flag} {path}: line {n} is not a JSON object")
            yield n, record


#: local corpora up to this size are scanned for the words before anything loads
WORD_SCAN_MAX_BYTES = 2 << 30
_SCAN_BLOCK = 16 << 20  # bytes read at a time


def check_words_occur(cfg: CorpusConfig, words: list[str]) -> None:
    """Refuse, before the tokenizer and the corpus load, a local corpus in which none of ``words``
    occurs: a raw byte search of the files (no parsing; words with non-ASCII characters, which JSON
    may store escaped, and corpora over :data:`WORD_SCAN_MAX_BYTES` are not checked). The search
    stops at the first word found, so a corpus that has the words costs only the bytes read until then.

    Raises:
        ConfigError: no word occurs anywhere in the files.
    """
    path = Path(cfg.dataset_path).expanduser()
    needles = sorted({w.strip().encode() for w in words if w.strip() and w.strip().isascii()})
    if not cfg.dataset_path or not path.exists() or not needles or len(needles) < len([w for w in words if w.strip()]):
        return
    builder, files = _local_files(path)
    if any(f.endswith((".gz", ".parquet")) for f in files) or sum(os.path.getsize(f) for f in files) > WORD_SCAN_MAX_BYTES:
        return
    longest = max(map(len, needles))
    for f in files:
        with open(f, "rb") as fh:
            tail = b""
            while chunk := fh.read(_SCAN_BLOCK):
                block = tail + chunk
                if any(n in block for n in needles):
                    return
                tail = block[-longest:]
    _check_json_lines(builder, files)  # a malformed line is the more useful error
    raise ConfigError(f"--dataset_path {cfg.dataset_path}: none of the {len(needles)} new tokens occurs in it, so no "
                      "snippet can be mined; pass a corpus that contains them, or --use_generated_snippets")


def check_text_column(cfg: CorpusConfig) -> None:
    """Check that a local corpus has ``--text_column`` by reading its first record only (the first
    line of a JSON Lines file, a CSV header, a Parquet schema), so that a wrong column fails in a
    fraction of a second instead of after the tokenizer and the whole corpus are loaded. Hub
    datasets and other formats are checked when loaded (:func:`load_texts`).

    Raises:
        ConfigError: the column is missing (the message lists the columns found).
    """
    import csv

    path = Path(cfg.dataset_path).expanduser()
    if not cfg.dataset_path or not path.exists():
        return
    builder, files = _local_files(path)
    first = files[0]
    columns: list[str] | None = None
    if builder == "text":
        columns = ["text"]
    elif builder == "json" and first.endswith(".jsonl"):
        with open(first, encoding="utf-8") as fh:
            line = next((ln for ln in fh if ln.strip()), None)
        try:
            record = json.loads(line) if line else None
        except ValueError:
            return  # reported with its line number by _check_json_lines
        columns = list(record) if isinstance(record, dict) else None
    elif builder == "csv" and not first.endswith(".gz"):
        with open(first, encoding="utf-8", newline="") as fh:
            columns = next(csv.reader(fh), None)
    elif builder == "parquet":
        import pyarrow.parquet as pq

        columns = list(pq.read_schema(first).names)
    if columns is not None and cfg.text_column not in columns:
        raise ConfigError(f"--text_column {cfg.text_column!r} not found in {cfg.dataset_path} (first file {first}); "
                          f"available columns: {columns}")


def _check_json_lines(builder: str, files: list[str]) -> None:
    """Validate JSON Lines files up front so a bad line is reported with file and line number."""
    if builder != "json":
        return
    for f in files:
        if not f.endswith(".jsonl"):
            continue
        with open(f, encoding="utf-8") as fh:
            for lineno, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ConfigError(f"--dataset_path: invalid JSON in {f} line {lineno}: {e.msg}; "
                                      "fix or remove that line") from None
                if not isinstance(obj, dict):
                    raise ConfigError(f"--dataset_path: {f} line {lineno} is not a JSON object")


def _tokenizer_identity(tokenizer) -> str:
    h = hashlib.sha256()
    h.update(type(tokenizer).__name__.encode())
    vocab = tokenizer.get_vocab()
    h.update(json.dumps(sorted(vocab.items()), ensure_ascii=False).encode())
    h.update(str(getattr(tokenizer, "name_or_path", "")).encode())
    return h.hexdigest()[:20]


def tokenize_corpus(cfg: CorpusConfig, tokenizer, cache_root: Path) -> TokenizedCorpus:
    """Tokenize the corpus with the source tokenizer (no special tokens), cached on disk.

    The cache key covers the corpus files (path, size, mtime), split, config name, text column,
    ``max_docs`` and the tokenizer's vocabulary. Cache files are written atomically and verified
    on load; a corrupt cache is rebuilt.
    """
    key = hashlib.sha256(f"{corpus_identity(cfg)}|tok={_tokenizer_identity(tokenizer)}".encode()).hexdigest()[:24]
    cache = cache_root / "corpus" / f"{key}.npz"
    if cache.is_file():
        try:
            with np.load(cache, allow_pickle=False) as z:
                ids, offsets, doc_ids = z["ids"], z["offsets"], z["doc_ids"]
                if offsets[-1] == len(ids) and len(doc_ids) == len(offsets) - 1:
                    logger.info("tokenized corpus loaded from cache %s", cache)
                    return TokenizedCorpus(ids, offsets, [str(x) for x in doc_ids])
        except Exception as e:  # corrupt or truncated file: rebuild
            logger.warning("ignoring corrupt corpus cache %s (%s); rebuilding", cache, e)
    ds = load_texts(cfg)
    col = cfg.text_column

    def _tok(batch):
        texts = [t if isinstance(t, str) else "" for t in batch[col]]
        return {"_ids": tokenizer(texts, add_special_tokens=False)["input_ids"]}

    tokenized = ds.map(_tok, batched=True, batch_size=1000, num_proc=cfg.num_proc if cfg.num_proc > 1 else None,
                       remove_columns=[c for c in ds.column_names if c not in ("id",)],
                       desc="tokenizing corpus", load_from_cache_file=False)
    lists = tokenized["_ids"]
    lengths = np.fromiter((len(x) for x in lists), dtype=np.int64, count=len(lists))
    offsets = np.zeros(len(lists) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    ids = np.fromiter((t for x in lists for t in x), dtype=np.int32, count=int(offsets[-1]))
    doc_ids = [str(x) for x in tokenized["id"]] if "id" in tokenized.column_names else [str(i) for i in range(len(lists))]
    cache.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=cache.parent, suffix=".npz.tmp")
    with os.fdopen(fd, "wb") as fh:
        np.savez(fh, ids=ids, offsets=offsets, doc_ids=np.array(doc_ids, dtype=str))
    os.replace(tmp, cache)
    logger.info("tokenized %d documents, %d tokens (cached at %s)", len(lists), len(ids), cache)
    return TokenizedCorpus(ids, offsets, doc_ids)
