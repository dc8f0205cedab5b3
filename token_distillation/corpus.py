"""Read a text corpus with ``datasets`` (streamed), tokenize it in growing batches, cache the ids.

Reading: hub ids and local files (jsonl/json/txt/csv/parquet, a file or a directory of shards) are
opened with ``datasets.load_dataset(..., streaming=True)`` and read batch by batch, so nothing is
downloaded or loaded before it is needed. The document text is a dotted path into nested records
(``--text_column``; a list of strings is joined with a space); ``ncbi/pubmed``'s schema is
recognised without a flag (see :func:`resolve_text_spec`).

Tokenized documents are stored on disk in segments (``ids`` int32, ``offsets`` int64, document
ids), written atomically per batch and memory-mapped when read back (:class:`ShardedCorpus`); the
cache is keyed by the corpus files, the text fields and the tokenizer, and a segment's name says
which documents it holds, so a longer scan reuses the documents an earlier one read and continues
from there. :func:`scan_corpus` hands every batch to a consumer (the snippet miner) and stops when
the consumer has enough, at the document limit, or at the end of the corpus.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Protocol

import numpy as np

from .config import ConfigError, CorpusConfig
from .paths import hub_unreachable, not_utf8_error

logger = logging.getLogger(__name__)

_LOCAL_BUILDERS = {".jsonl": "json", ".json": "json", ".txt": "text", ".csv": "csv", ".parquet": "parquet"}

#: ``ncbi/pubmed``'s fields (nested structs): the abstract, the title, the PubMed id
PUBMED_TEXT = "MedlineCitation.Article.Abstract.AbstractText"
PUBMED_TITLE = "MedlineCitation.Article.ArticleTitle"
PUBMED_ID = "MedlineCitation.PMID"

#: documents in the first tokenized batch of a scan; the next ones grow with the documents read so far
#: (a quarter of them, so an early stop reads at most ~25% past the document it needed), up to the maximum
FIRST_BATCH_DOCS = 1_000
MAX_BATCH_DOCS = 16_384
#: rows asked from ``datasets`` at a time
READ_ROWS = 1_000


@dataclass
class TokenizedCorpus:
    """A tokenized corpus held in memory.

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

    @property
    def num_tokens(self) -> int:
        """Tokens in all documents."""
        return int(self.offsets[-1])

    def doc(self, d: int) -> np.ndarray:
        """Token ids of document ``d``, shape ``[doc_len]``."""
        return self.ids[self.offsets[d]: self.offsets[d + 1]]

    def doc_id(self, d: int) -> str:
        """Identifier of document ``d``."""
        return self.doc_ids[d]

    def iter_docs(self) -> Iterator[np.ndarray]:
        """Token ids of every document in order, each ``[doc_len]``."""
        return (self.doc(d) for d in range(self.num_docs))

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


_CHECKED_FOLDERS: set[str] = set()


def _warn_same_start(folder: Path, files: list[Path]) -> list[tuple[str, str]]:
    """Warn (once per folder and process: the CLI, the pipeline and the scan all check the corpus) about
    files of a corpus folder that begin with the same line: one is
    likely a copy or a subset of the other (``abstracts.jsonl`` beside ``abstracts_small.jsonl``), so
    its documents are read twice and a duplicate can be both trained on and held out. Reads the
    first line of each uncompressed text file (Parquet and .gz files are not checked). Returns the
    pairs (relative paths)."""
    if str(folder) in _CHECKED_FOLDERS:
        return []
    _CHECKED_FOLDERS.add(str(folder))
    first: dict[bytes, Path] = {}
    pairs = []
    for f in files:
        if f.suffix.lower() == ".parquet":
            continue
        try:
            with open(f, "rb") as fh:
                line = fh.readline(1 << 16).strip()
        except OSError:
            continue
        if not line:
            continue
        if line in first:
            pairs.append((str(first[line].relative_to(folder)), str(f.relative_to(folder))))
        else:
            first[line] = f
    if pairs:
        logger.warning("--dataset_path %s: %s begin with the same document, so one is likely a copy or a subset of the "
                       "other and its documents would be read twice (a duplicate can be trained on and held out); "
                       "pass one file, or a folder without the copy", folder,
                       "; ".join(f"{a} and {b}" for a, b in pairs[:3]))
    return pairs


def corpus_identity(cfg: CorpusConfig, with_limit: bool = True) -> str:
    """A string identifying the corpus content and the reading options (for cache keys); with
    ``with_limit``, also ``--max_docs`` (the stop point)."""
    path = Path(cfg.dataset_path).expanduser()
    parts = [f"split={cfg.dataset_split}", f"name={cfg.dataset_name}", f"col={cfg.text_column}",
             f"title={cfg.prepend_title}"]
    if with_limit:
        parts.append(f"max_docs={cfg.max_docs}")
    if path.exists():
        _, files = _local_files(path)
        for f in files:
            st = os.stat(f)
            parts.append(f"{Path(f).resolve()}:{st.st_size}:{st.st_mtime_ns}")
    else:
        parts.append(f"hub:{cfg.dataset_path}")
    return "|".join(parts)




# ----------------------------------------------------------------------------- text fields


@dataclass(frozen=True)
class TextSpec:
    """Which fields of a record make a document.

    Attributes:
        text: dotted paths whose values are joined with a space (title first when asked).
        doc_id: dotted path of the document id, or None (the row index is used).
        columns: the top-level columns read.
        note: how the fields were chosen, for the log (e.g. "ncbi/pubmed schema").
    """

    text: tuple[str, ...]
    doc_id: str | None
    columns: tuple[str, ...]
    note: str = ""


_TEXT_TYPES = {"string", "large_string", "list<string>", "null"}


def _arrow_tree(t) -> dict | str:
    """Field tree of an Arrow type: ``{name: subtree}`` for structs, else a type name."""
    import pyarrow as pa

    if pa.types.is_struct(t):
        return {t.field(i).name: _arrow_tree(t.field(i).type) for i in range(t.num_fields)}
    if pa.types.is_list(t) or pa.types.is_large_list(t):
        inner = t.value_type
        return "list<string>" if pa.types.is_string(inner) or pa.types.is_large_string(inner) else f"list<{inner}>"
    if pa.types.is_large_string(t):
        return "string"
    return str(t)


def _features_tree(f) -> dict | str:
    """Field tree of ``datasets`` features (dicts, ``Value``, ``List``/``Sequence``)."""
    if isinstance(f, dict):
        return {k: _features_tree(v) for k, v in f.items()}
    feature = getattr(f, "feature", None)
    if feature is not None:  # List / Sequence / LargeList
        inner = _features_tree(feature)
        return "list<string>" if inner == "string" else f"list<{inner}>"
    dtype = getattr(f, "dtype", None)
    return "string" if dtype in ("string", "large_string") else str(dtype or type(f).__name__)


def _value_tree(v) -> dict | str:
    """Field tree of a JSON value (the first record of a JSON Lines file)."""
    if isinstance(v, dict):
        return {k: _value_tree(x) for k, x in v.items()}
    if isinstance(v, str):
        return "string"
    if v is None:
        return "null"
    if isinstance(v, list):
        if all(isinstance(x, str) for x in v):
            return "list<string>"
        return "list<" + (type(v[0]).__name__ if v else "?") + ">"
    return {bool: "bool", int: "int", float: "float"}.get(type(v), type(v).__name__)


def leaf_paths(tree: dict) -> list[str]:
    """Dotted paths of every leaf field of a field tree, e.g. ``["id", "a.b.text"]``."""
    out = []
    for k, v in tree.items():
        if isinstance(v, dict):
            out.extend(f"{k}.{p}" for p in leaf_paths(v))
        else:
            out.append(k)
    return out


def _lookup(tree: dict, path: str):
    """The subtree or type at a dotted ``path``; ``(None, parent path)`` where the path breaks."""
    node: dict | str = tree
    seen: list[str] = []
    for part in path.split("."):
        if not isinstance(node, dict) or part not in node:
            return None, ".".join(seen)
        node = node[part]
        seen.append(part)
    return node, path


def is_pubmed_schema(tree: dict) -> bool:
    """True for records with ``ncbi/pubmed``'s nested abstract field."""
    node, _ = _lookup(tree, PUBMED_TEXT)
    return node is not None and not isinstance(node, dict)


def resolve_text_spec(tree: dict, cfg: CorpusConfig, where: str = "") -> TextSpec:
    """Choose the text, title and id fields of records with field tree ``tree``.

    ``--text_column`` is a column name or a dotted path into nested structs; when it is the default
    ``text`` and the records have no ``text`` but ``ncbi/pubmed``'s schema, the abstract
    (``MedlineCitation.Article.Abstract.AbstractText``) is used. ``--prepend_title`` puts the title
    (pubmed: ``MedlineCitation.Article.ArticleTitle``, else a top-level ``title``) before it. The
    document id is ``id`` when present, else pubmed's PMID, else the row index.

    Raises:
        ConfigError: the path does not exist (the message lists the fields available), the field is
            not text (a string or a list of strings), or no title field for ``--prepend_title``.
    """
    where = f" in {where}" if where else ""
    path = str(cfg.text_column).strip()
    pubmed = is_pubmed_schema(tree)
    note = ""
    if path == "text" and "text" not in tree and pubmed:
        path, note = PUBMED_TEXT, "ncbi/pubmed schema"
    node, found = _lookup(tree, path)
    fields_ = leaf_paths(tree)
    shown = ", ".join(fields_[:40]) + (" ..." if len(fields_) > 40 else "")
    if node is None:
        at = f"no field {path.split('.')[len(found.split('.')) if found else 0]!r}" + (f" under {found!r}" if found else "")
        raise ConfigError(f"--text_column {path!r} not found{where} ({at}); available columns (nested fields as "
                          f"dotted paths): {shown}; pass one of them as --text_column")
    texts = [x for x in fields_ if _lookup(tree, x)[0] in _TEXT_TYPES]
    if isinstance(node, dict) or node not in _TEXT_TYPES:
        kind = "a struct" if isinstance(node, dict) else f"of type {node}"
        raise ConfigError(f"--text_column {path!r}{where} is {kind}, not text (a string or a list of strings); "
                          f"text fields: {', '.join(texts[:40]) or 'none'}; pass one of them as --text_column")
    paths = [path]
    if cfg.prepend_title:
        title = PUBMED_TITLE if pubmed else "title"
        if _lookup(tree, title)[0] not in _TEXT_TYPES:
            raise ConfigError(f"--prepend_title: no title field{where} (looked for {title!r}); drop --prepend_title "
                              "or pass the title's field first in a corpus that has one")
        paths.insert(0, title)
    doc_id = "id" if "id" in tree and not isinstance(tree["id"], dict) else (PUBMED_ID if pubmed and _lookup(
        tree, PUBMED_ID)[0] is not None else None)
    cols = tuple(dict.fromkeys(p.split(".")[0] for p in paths + ([doc_id] if doc_id else [])))
    return TextSpec(tuple(paths), doc_id, cols, note)


def _local_tree(builder: str, files: list[str]) -> tuple[dict | None, bool]:
    """``(field tree or None when unknown, corpus known to be empty)`` of a local corpus, from its
    first non-empty file only (a JSON Lines line, a CSV header, a Parquet schema)."""
    if builder == "text":
        first = next((f for f in files if not f.endswith(".gz")), None)
        bad = first and _utf8_problem(first, limit=1 << 16)  # a UTF-16 export fails here, before torch loads
        if bad:
            raise bad
        empty = all(not _has_text_line(f) for f in files if not f.endswith(".gz"))
        return {"text": "string"}, empty and not any(f.endswith(".gz") for f in files)
    for f in files:
        if f.endswith(".gz"):
            return None, False
        try:
            tree = _file_tree(builder, f)
        except UnicodeDecodeError as e:
            raise not_utf8_error("--dataset_path", f, e.reason, e.start) from None
        if tree is not None:
            return tree
    return None, True


def _file_tree(builder: str, f: str) -> tuple[dict | None, bool] | None:
    """:func:`_local_tree` of one uncompressed file: None when the file holds no record.

    Raises:
        UnicodeDecodeError: a JSON Lines or CSV file that is not UTF-8 (the caller names the file).
    """
    import csv

    if builder == "parquet":
        import pyarrow.parquet as pq

        try:
            meta = pq.read_metadata(f)
        except Exception as e:  # not a parquet file
            raise ConfigError(f"--dataset_path: cannot read {f} as Parquet ({e})") from None
        if not meta.num_rows:
            return None
        schema = meta.schema.to_arrow_schema()
        return {n: _arrow_tree(schema.field(n).type) for n in schema.names}, False
    if builder == "json" and f.endswith(".jsonl"):
        with open(f, encoding="utf-8") as fh:
            line = next((ln for ln in fh if ln.strip()), None)
        if line is None:
            return None
        try:
            record = json.loads(line)
        except ValueError:
            _check_json_lines(builder, [f])  # reports the file and line
            return None, False
        if not isinstance(record, dict):
            raise ConfigError(f"--dataset_path: {f} holds JSON values that are not objects; write one JSON "
                              "object per line")
        return {k: _value_tree(v) for k, v in record.items()}, False
    if builder == "csv":
        with open(f, encoding="utf-8", newline="") as fh:
            reader = csv.reader(fh)
            header = next(reader, None)
            row = next(reader, None)
        return ({c: "string" for c in header}, False) if header and row is not None else None
    return None, False


def _utf8_problem(path: str, limit: int | None = None) -> ConfigError | None:
    """The not-UTF-8 :class:`ConfigError` (file, byte offset, fix) of a local corpus file, or None when
    its first ``limit`` bytes (all of it: None) decode as UTF-8 or it cannot be read; read in 16 MiB
    blocks with an incremental decoder (a character cut by ``limit`` is fine)."""
    import codecs

    dec, offset = codecs.getincrementaldecoder("utf-8")(), 0
    try:
        with open(path, "rb") as fh:
            while limit is None or offset < limit:
                block = fh.read(1 << 24 if limit is None else min(1 << 24, limit - offset))
                if not block:
                    dec.decode(b"", final=True)
                    break
                dec.decode(block)
                offset += len(block)
    except UnicodeDecodeError as bad:
        return not_utf8_error("--dataset_path", path, bad.reason, offset + bad.start)
    except OSError:
        return None
    return None


def _has_text_line(path: str) -> bool:
    with open(path, "rb") as fh:
        return any(line.strip() for line in fh)


def check_text_column(cfg: CorpusConfig) -> TextSpec | None:
    """Check the corpus's text field before any tokenizer or model loads, from the first record or
    schema only (a local file's first line, CSV header or Parquet schema; a hub dataset's streamed
    features), so a wrong ``--text_column`` fails in a fraction of a second.

    Returns:
        the resolved :class:`TextSpec`, or None when the fields cannot be known without reading
        (compressed files, a plain ``.json`` file): then they are checked on the first batch.

    Raises:
        ConfigError: a missing or non-text field (see :func:`resolve_text_spec`), an empty local
            corpus, an unreadable hub dataset.
    """
    if not cfg.dataset_path:
        return None
    path = Path(cfg.dataset_path).expanduser()
    if path.exists():
        builder, files = _local_files(path)
        if path.is_dir():
            _warn_same_start(path, [Path(f) for f in files])
        tree, empty = _local_tree(builder, files)
        if empty:
            raise ConfigError(f"--dataset_path {cfg.dataset_path}: the corpus is empty (no document in "
                              f"{len(files)} file(s)); pass a corpus with documents")
        return resolve_text_spec(tree, cfg, cfg.dataset_path) if tree is not None else None
    key = (cfg.dataset_path, cfg.dataset_name, cfg.dataset_split)
    if key not in _HUB_TREES and (why := hub_unreachable()) is not None:  # one line, not half a minute of retries
        raise ConfigError(f"--dataset_path {cfg.dataset_path}: not a local file or folder, and {why}, so the Hugging "
                          "Face Hub dataset cannot be streamed; pass a local .jsonl/.json/.txt/.csv/.parquet file or "
                          "a folder of them, or run where the Hub can be reached")
    if key not in _HUB_TREES:  # asked once per process: the CLI, the pipeline and the scan all check
        _HUB_TREES[key] = _stream_tree(open_stream(cfg, None), cfg)
    return resolve_text_spec(_HUB_TREES[key], cfg, cfg.dataset_path)


_HUB_TREES: dict[tuple[str, str, str], dict] = {}


def _stream_tree(ds, cfg: CorpusConfig) -> dict:
    """Field tree of a streamed dataset: its features, else those of its first record."""
    if ds.features is not None:
        return _features_tree(ds.features)
    try:
        first = next(iter(ds), None)
    except Exception as e:
        if isinstance(e, UnicodeDecodeError):
            _not_utf8(cfg, e)
        raise ConfigError(f"--dataset_path {cfg.dataset_path}: could not read the dataset: {e}") from None
    if first is None:
        raise ConfigError(f"--dataset_path {cfg.dataset_path}: the corpus is empty; pass a corpus with documents")
    return {k: _value_tree(v) for k, v in first.items()}


# ----------------------------------------------------------------------------- reading


def open_stream(cfg: CorpusConfig, spec: TextSpec | None):
    """The corpus as a streamed ``datasets.IterableDataset`` (only ``spec``'s columns when given).

    Raises:
        ConfigError: the dataset cannot be opened (missing hub dataset, no network, bad files).
    """
    import datasets

    path = Path(cfg.dataset_path).expanduser()
    try:
        if path.exists():
            builder, files = _local_files(path)
            # a bad JSON line is reported by this module with its file and line (1-based); the
            # builder's own log line (0-based row, Arrow's wording) would say it a second time, otherwise
            logging.getLogger(f"datasets.packaged_modules.{builder}.{builder}").setLevel(logging.CRITICAL)
            ds = datasets.load_dataset(builder, data_files=files, split="train", streaming=True)
        else:
            ds = datasets.load_dataset(cfg.dataset_path, cfg.dataset_name or None, split=cfg.dataset_split,
                                       streaming=True)
    except ConfigError:
        raise
    except Exception as e:  # datasets raises many types; report them as a flag problem
        raise ConfigError(f"--dataset_path {cfg.dataset_path}: could not open the dataset: {e}") from None
    if spec is not None and ds.features is not None:
        ds = ds.select_columns(list(spec.columns))
    return ds


def _column_text(table, path: str, flag: str = "--text_column") -> list[str]:
    """Values of dotted ``path`` in an Arrow table as strings ('' for nulls; lists joined with a space).

    Raises:
        ConfigError: the field is missing or not text.
    """
    import pyarrow as pa
    import pyarrow.compute as pc

    parts = path.split(".")
    if parts[0] not in table.column_names:
        raise ConfigError(f"{flag} {path!r}: column {parts[0]!r} not in this part of the corpus "
                          f"(columns: {table.column_names}); pass a field every record has")
    arr = table.column(parts[0])
    try:
        for p in parts[1:]:
            arr = pc.struct_field(arr, p)
    except (KeyError, pa.ArrowInvalid, pa.ArrowTypeError, NotImplementedError) as e:
        raise ConfigError(f"{flag} {path!r}: not found in this part of the corpus ({e}); pass a field every "
                          "record has") from None
    t = arr.type
    if pa.types.is_list(t) or pa.types.is_large_list(t):
        if not (pa.types.is_string(t.value_type) or pa.types.is_large_string(t.value_type)):
            raise ConfigError(f"{flag} {path!r} is a list of {t.value_type}, not text; pass a string field or a "
                              "list of strings")
        arr = pc.binary_join(arr, " ")
    elif pa.types.is_null(t):
        return [""] * len(arr)
    elif pa.types.is_struct(t) or "json" in str(t):
        raise ConfigError(f"{flag} {path!r} holds JSON objects (in some records at least), not text; pass a string "
                          "field (a dotted path such as text.body reaches inside objects)")
    elif not (pa.types.is_string(t) or pa.types.is_large_string(t)):
        raise ConfigError(f"{flag} {path!r} holds {t} values, not text; pass a string field or a list of strings")
    return arr.fill_null("").to_pylist()


def _column_ids(table, path: str) -> list[str]:
    import pyarrow.compute as pc

    parts = path.split(".")
    arr = table.column(parts[0])
    for p in parts[1:]:
        arr = pc.struct_field(arr, p)
    return [str(x) for x in arr.to_pylist()]


def iter_text_batches(cfg: CorpusConfig, spec: TextSpec | None, start: int = 0,
                      limit: int = 0) -> Iterator[tuple[list[str], list[str] | None]]:
    """Stream the corpus's documents from row ``start`` in batches of :data:`READ_ROWS`.

    Yields:
        ``(texts, doc ids or None)`` per batch, at most ``limit - start`` documents in all (0: all).

    Raises:
        ConfigError: unreadable files (a bad JSON line is named with its file and line), missing or
            non-text fields.
    """
    if spec is None:  # fields unknown until read (compressed files)
        spec = resolve_text_spec(_stream_tree(open_stream(cfg, None), cfg), cfg, cfg.dataset_path)
    ds = open_stream(cfg, spec).with_format("arrow")
    left = (limit - start) if limit else None
    pos = start

    def batches(rows: int):
        # ``datasets`` fills a batch before yielding it, so the last batch before the limit asks for
        # exactly the rows left: nothing past the limit is read
        return (ds.skip(pos) if pos else ds).iter(batch_size=rows)

    it, last = batches(READ_ROWS if left is None else min(READ_ROWS, left)), left is not None and left <= READ_ROWS
    while left is None or left > 0:
        if left is not None and left < READ_ROWS and not last:
            it, last = batches(left), True
        try:
            table = next(it, None)
        except ConfigError:
            raise
        except Exception as e:
            _reraise_read_error(cfg, e)
        if table is None:
            return
        pos += table.num_rows
        try:  # pyarrow's JSON reader does not check UTF-8: a bad byte past the first record shows up here
            texts = [_column_text(table, p) for p in spec.text]
        except UnicodeDecodeError as e:
            _not_utf8(cfg, e)
        joined = texts[0] if len(texts) == 1 else [" ".join(x for x in row if x) for row in zip(*texts)]
        ids = _column_ids(table, spec.doc_id) if spec.doc_id and spec.doc_id.split(".")[0] in table.column_names \
            else None
        if left is not None:
            left -= table.num_rows
        yield joined, ids


def _reraise_read_error(cfg: CorpusConfig, e: Exception):
    """A corpus read failure as one :class:`ConfigError`: a bad JSON line with its file and number,
    files of one folder with different fields named, a file that is not UTF-8 with the fix."""
    path = Path(cfg.dataset_path).expanduser()
    if path.exists():
        builder, files = _local_files(path)
        _check_json_lines(builder, files)  # a bad JSON line is named with its file and number
        _check_same_fields(cfg.dataset_path, builder, files)
        if "column names don't match" in str(e) and len(files) > 1:
            names = ", ".join(Path(f).name for f in files[:5]) + (", ..." if len(files) > 5 else "")
            raise ConfigError(f"--dataset_path {cfg.dataset_path}: its files do not all have the same fields ({names}); "
                              "give every file the same fields, or pass one file") from None
    if isinstance(e, UnicodeDecodeError):
        _not_utf8(cfg, e)
    raise ConfigError(f"--dataset_path {cfg.dataset_path}: could not read the corpus: {e}") from None


def _not_utf8(cfg: CorpusConfig, e: UnicodeDecodeError):
    """Raise the ConfigError of a corpus that is not UTF-8, naming the first local file that is not
    and the byte offset (:func:`_utf8_problem`; the whole files are read only on this error path)."""
    path = Path(cfg.dataset_path).expanduser()
    if path.exists():
        for f in _local_files(path)[1]:
            bad = None if f.endswith(".gz") else _utf8_problem(f)
            if bad:
                raise bad
    raise ConfigError(f"--dataset_path {cfg.dataset_path}: the corpus is not UTF-8 text ({e.reason}); convert it to "
                      "UTF-8 (e.g. iconv -f latin1 -t utf-8)") from None


def _check_same_fields(given: str, builder: str, files: list[str]) -> None:
    """Raise a :class:`ConfigError` naming two files of ``files`` whose first records have different
    top-level fields (the reader's own error dumps both schemas and names no file)."""
    first = None
    for f in files:
        if f.endswith(".gz"):
            continue
        try:
            tree = _file_tree(builder, f)
        except (UnicodeDecodeError, ConfigError, OSError):
            continue
        if not tree or tree[0] is None:
            continue
        fields = sorted(tree[0])
        if first is None:
            first = (f, fields)
        elif fields != first[1]:
            raise ConfigError(f"--dataset_path {given}: its files have different fields ({Path(first[0]).name}: "
                              f"{', '.join(first[1])}; {Path(f).name}: {', '.join(fields)}); give every file the "
                              "same fields, or pass one file")


def iter_texts(cfg: CorpusConfig, spec: TextSpec | None = None) -> Iterator[str]:
    """Every document's text in corpus order (at most ``--max_docs``), streamed."""
    for texts, _ in iter_text_batches(cfg, spec, 0, cfg.max_docs):
        yield from texts


def load_texts(cfg: CorpusConfig):
    """Load the whole corpus as a ``datasets.Dataset`` of one ``text`` column (in memory; used by
    scripts on small corpora; the pipeline streams, see :func:`iter_text_batches`).

    Raises:
        ConfigError: missing file, unsupported type, missing text column, unreadable line.
    """
    import datasets

    spec = check_text_column(cfg)
    rows = [t for t in iter_texts(cfg, spec)]
    return datasets.Dataset.from_dict({"text": rows})


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
    raise ConfigError(words_absent(cfg.dataset_path, len(needles)))


def words_absent(dataset_path: str, n: int) -> str:
    """The error of a corpus in which none of the ``n`` new tokens occurs."""
    return (f"--dataset_path {dataset_path}: none of the {n} new tokens occurs in it, so no snippet can be mined; "
            "pass a corpus that contains them, or --use_generated_snippets")


def _check_json_lines(builder: str, files: list[str]) -> None:
    """Validate JSON Lines files up front so a bad line is reported with file and line number."""
    if builder != "json":
        return
    for f in files:
        if not f.endswith(".jsonl"):
            continue
        with open(f, encoding="utf-8") as fh:
            for _ in json_objects(fh, f, "--dataset_path"):
                pass


def json_objects(lines, name, flag: str):
    """``(line number, object)`` of every non-blank JSON Lines line of ``lines`` (an open file or a
    list of strings; ``name``: the file, for errors).

    Raises:
        ConfigError: naming ``flag``, the file and the line: a line that is not JSON or not an object.
    """
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{flag}: invalid JSON in {name} line {lineno}: {e.msg} column {e.colno}; fix or "
                              "remove that line") from None
        if not isinstance(obj, dict):
            raise ConfigError(f"{flag}: {name} line {lineno} is not a JSON object")
        yield lineno, obj


def _tokenizer_identity(tokenizer) -> str:
    h = hashlib.sha256()
    h.update(type(tokenizer).__name__.encode())
    vocab = tokenizer.get_vocab()
    h.update(json.dumps(sorted(vocab.items()), ensure_ascii=False).encode())
    h.update(str(getattr(tokenizer, "name_or_path", "")).encode())
    return h.hexdigest()[:20]


# ----------------------------------------------------------------------------- tokenizing


def resolved_num_proc(num_proc: int) -> int:
    """``--num_proc`` with 0 resolved to the cores this process may use."""
    if num_proc > 0:
        return num_proc
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


#: documents encoded per tokenizer call: bounds the Python lists alive at a time, whatever the batch size
TOKENIZE_CHUNK = 2_048


def tokenize_batch(tokenizer, texts: list[str], num_proc: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Token ids of ``texts`` (no special tokens), flattened.

    The texts are encoded in chunks of :data:`TOKENIZE_CHUNK` by ``num_proc`` threads (the Rust
    tokenizer releases the GIL while it encodes); each chunk becomes numpy arrays at once, so the
    Python lists alive at a time do not grow with the batch, and the result is the same for any
    ``num_proc``.

    Returns:
        ``(ids [total] int32, offsets [len(texts) + 1] int64)``.
    """
    backend = getattr(tokenizer, "_tokenizer", None)
    encode_fast = getattr(backend, "encode_batch_fast", None)

    def enc(chunk: list[str]) -> tuple[np.ndarray, np.ndarray]:
        if encode_fast is not None:
            lists = [e.ids for e in encode_fast(chunk, add_special_tokens=False)]
        else:
            lists = tokenizer(chunk, add_special_tokens=False)["input_ids"]
        lengths = np.fromiter(map(len, lists), dtype=np.int64, count=len(lists))
        return np.fromiter((t for x in lists for t in x), dtype=np.int32, count=int(lengths.sum())), lengths

    chunks = [texts[i: i + TOKENIZE_CHUNK] for i in range(0, len(texts), TOKENIZE_CHUNK)]
    if num_proc <= 1 or len(chunks) <= 1:
        parts = [enc(c) for c in chunks]
    else:
        with ThreadPoolExecutor(min(num_proc, len(chunks))) as ex:
            parts = list(ex.map(enc, chunks))
    offsets = np.zeros(len(texts) + 1, dtype=np.int64)
    if parts:
        np.cumsum(np.concatenate([p[1] for p in parts]), out=offsets[1:])
    ids = np.concatenate([p[0] for p in parts]) if parts else np.zeros(0, dtype=np.int32)
    return ids, offsets


# ----------------------------------------------------------------------------- segments on disk


@dataclass
class Segment:
    """Documents ``[start, end)`` of a corpus as stored in one cache directory (memory-mapped)."""

    start: int
    end: int
    path: Path

    def arrays(self, mmap: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(ids [tokens] int32, offsets [docs + 1] int64, doc ids [docs] str)``."""
        mode = "r" if mmap else None
        return (np.load(self.path / "ids.npy", mmap_mode=mode), np.load(self.path / "offsets.npy", mmap_mode=mode),
                np.load(self.path / "doc_ids.npy", mmap_mode=mode))


def _segment_name(start: int, end: int) -> str:
    return f"seg-{start:012d}-{end:012d}"


def _read_segments(root: Path) -> tuple[list[Segment], int | None]:
    """Valid segments under ``root`` (corrupt ones removed) and the corpus size if a scan reached its end."""
    segs, complete = [], None
    if not root.is_dir():
        return segs, complete
    for p in root.iterdir():
        if p.name.startswith("complete-"):
            try:
                complete = int(p.name.split("-")[1])
            except ValueError:
                pass
        if not p.name.startswith("seg-"):
            continue
        try:
            _, a, b = p.name.split("-")
            seg = Segment(int(a), int(b), p)
            ids, offsets, doc_ids = seg.arrays()
            ok = (len(offsets) == seg.end - seg.start + 1 and len(doc_ids) == seg.end - seg.start
                  and int(offsets[-1]) == len(ids) and int(offsets[0]) == 0)
        except Exception:
            ok = False
        if ok:
            segs.append(seg)
        else:
            logger.warning("ignoring corrupt corpus cache segment %s; it is rebuilt", p)
            shutil.rmtree(p, ignore_errors=True)
    segs.sort(key=lambda s: (s.start, -s.end))
    return segs, complete


def _chain(segs: list[Segment], limit: int | None) -> list[tuple[Segment, int, int]]:
    """Pieces ``(segment, first doc, end doc)`` covering documents ``[0, n)`` contiguously (n as large
    as the segments allow, at most ``limit``)."""
    pos, out = 0, []
    while limit is None or pos < limit:
        best = max((s for s in segs if s.start <= pos < s.end), key=lambda s: s.end, default=None)
        if best is None:
            break
        end = best.end if limit is None else min(best.end, limit)
        out.append((best, pos, end))
        pos = end
    return out


def _write_segment(root: Path, start: int, ids: np.ndarray, offsets: np.ndarray, doc_ids: list[str]) -> Segment:
    """Write documents ``[start, start + len(doc_ids))`` as a segment, atomically (a concurrent
    writer's identical segment is kept)."""
    from .paths import atomic_write_dir

    end = start + len(doc_ids)
    path = root / _segment_name(start, end)

    def _write(tmp: Path) -> None:
        np.save(tmp / "ids.npy", ids)
        np.save(tmp / "offsets.npy", offsets)
        np.save(tmp / "doc_ids.npy", np.array(doc_ids, dtype=str))

    if not path.exists():
        atomic_write_dir(path, _write, replace=False)
    return Segment(start, end, path)


def _mark_complete(root: Path, n: int) -> None:
    marker = root / f"complete-{n}"
    if not marker.exists():
        tmp = root / f".complete-{n}.tmp-{os.getpid()}"
        tmp.write_text(str(n))
        os.replace(tmp, marker)


class ShardedCorpus:
    """Tokenized documents ``[0, num_docs)`` backed by memory-mapped cache segments.

    Same reading interface as :class:`TokenizedCorpus` (``num_docs``, ``num_tokens``, ``doc(d)``,
    ``doc_id(d)``, ``iter_docs()``); ``ids``, ``offsets`` and ``doc_ids`` materialise the whole
    corpus in memory and are meant for small corpora (evaluation).
    """

    def __init__(self, pieces: list[tuple[Segment, int, int]]):
        self._pieces = pieces
        self._starts = np.array([a for _, a, _ in pieces] + [pieces[-1][2] if pieces else 0], dtype=np.int64)
        self._arrays: dict[int, tuple] = {}
        self.num_tokens = 0
        for i, (seg, a, b) in enumerate(pieces):
            _, off, _ = self._piece(i)
            self.num_tokens += int(off[b - seg.start] - off[a - seg.start])

    def _piece(self, i: int):
        if i not in self._arrays:
            self._arrays[i] = self._pieces[i][0].arrays()
        return self._arrays[i]

    @property
    def num_docs(self) -> int:
        """Documents held (those the scan read)."""
        return int(self._starts[-1])

    def _locate(self, d: int) -> tuple[int, int]:
        if not 0 <= d < self.num_docs:
            raise IndexError(d)
        i = int(np.searchsorted(self._starts, d, side="right") - 1)
        return i, d - self._pieces[i][0].start

    def doc(self, d: int) -> np.ndarray:
        """Token ids of document ``d``, shape ``[doc_len]`` (a read-only memory map)."""
        i, k = self._locate(d)
        ids, off, _ = self._piece(i)
        return ids[off[k]: off[k + 1]]

    def doc_id(self, d: int) -> str:
        """Identifier of document ``d``."""
        i, k = self._locate(d)
        return str(self._piece(i)[2][k])

    def iter_batches(self) -> Iterator[tuple[int, np.ndarray, np.ndarray, np.ndarray]]:
        """``(first doc, ids, offsets from 0, doc ids)`` per stored piece, in order, read from disk
        one piece at a time (memory bounded by the largest segment)."""
        for seg, a, b in self._pieces:
            ids, off, dids = seg.arrays(mmap=False)
            lo, hi = a - seg.start, b - seg.start
            yield a, ids[off[lo]: off[hi]], off[lo: hi + 1] - off[lo], dids[lo:hi]

    def iter_docs(self) -> Iterator[np.ndarray]:
        """Token ids of every document in order, each ``[doc_len]``."""
        for _, ids, off, _ in self.iter_batches():
            for k in range(len(off) - 1):
                yield ids[off[k]: off[k + 1]]

    @functools.cached_property
    def offsets(self) -> np.ndarray:
        """``[num_docs + 1]`` int64 start offsets of the documents in :attr:`ids` (computed once)."""
        parts, base = [np.zeros(1, dtype=np.int64)], 0
        for _, _, off, _ in self.iter_batches():
            parts.append(off[1:] + base)
            base += int(off[-1])
        return np.concatenate(parts)

    @functools.cached_property
    def ids(self) -> np.ndarray:
        """``[num_tokens]`` int32: all documents' ids in memory (computed once; small corpora only)."""
        return np.concatenate([ids for _, ids, _, _ in self.iter_batches()] or [np.zeros(0, dtype=np.int32)])

    @functools.cached_property
    def doc_ids(self) -> list[str]:
        """Identifiers of all documents (computed once)."""
        return [str(x) for _, _, _, d in self.iter_batches() for x in d]


# ----------------------------------------------------------------------------- the scan


class BatchConsumer(Protocol):
    """What :func:`scan_corpus` feeds: ``feed(first doc, ids, offsets, doc ids)`` per batch; ``done``
    once it needs no more documents."""

    done: bool

    def feed(self, start: int, ids: np.ndarray, offsets: np.ndarray, doc_ids) -> None: ...


#: why a scan stopped
STOP_ENOUGH = "every token has enough training and held-out snippets"
STOP_LIMIT = "document limit reached"
STOP_END = "end of the corpus"


@dataclass
class ScanResult:
    """A finished scan.

    Attributes:
        corpus: the documents read, tokenized (memory-mapped from the cache; in memory for :func:`scan_texts`).
        docs_read: documents read (from the cache or the corpus).
        docs_from_cache: how many of them came from the cache.
        docs_needed: with an early stop, the documents the consumer needed (the rarest token's last
            snippet); the scan reads on to the end of that batch.
        stop_reason: one of :data:`STOP_ENOUGH`, :data:`STOP_LIMIT`, :data:`STOP_END`.
        seconds: wall time of the scan.
    """

    corpus: ShardedCorpus | TokenizedCorpus
    docs_read: int
    docs_from_cache: int
    stop_reason: str
    seconds: float
    limit: int = 0
    docs_needed: int | None = None

    def describe(self) -> str:
        """One line for the log: documents read and why the scan stopped."""
        why = self.stop_reason + (f" (--max_docs / --stopping_condition num_docs:{self.limit})"
                                  if self.stop_reason == STOP_LIMIT else "")
        if self.stop_reason == STOP_ENOUGH and self.docs_needed is not None:
            why += f" after document {self.docs_needed} (the rest of the last batch was read with it)"
        empty = int((np.diff(self.corpus.offsets) == 0).sum()) if self.corpus.num_docs else 0
        none = f"; {empty} of them without text (empty or null: nothing to mine)" if empty else ""
        return (f"read {self.docs_read} documents ({self.corpus.num_tokens} tokens; {self.docs_from_cache} from the "
                f"cache{none}) in {self.seconds:.1f}s; stopped: {why}")


def corpus_cache_dir(cfg: CorpusConfig, spec: TextSpec | None, tokenizer, cache_root: Path) -> Path:
    """Cache directory of the tokenized corpus: keyed by the corpus files, split, config name, text
    fields and the tokenizer's vocabulary (not by how many documents were read: segments say that)."""
    ident = f"{corpus_identity(cfg, with_limit=False)}|fields={spec}|tok={_tokenizer_identity(tokenizer)}"
    return cache_root / "corpus" / hashlib.sha256(ident.encode()).hexdigest()[:24]


def scan_corpus(cfg: CorpusConfig, tokenizer, cache_root: Path, consumer: BatchConsumer | None = None,
                early_stop: bool = True, spec: TextSpec | None = None) -> ScanResult:
    """Tokenize the corpus progressively and feed it to ``consumer``.

    Documents are read in corpus order, from the cache where an earlier scan stored them, then from
    the stream in growing batches (:data:`FIRST_BATCH_DOCS` documents, then a quarter of the
    documents read so far, up to :data:`MAX_BATCH_DOCS`); each batch is tokenized (``--num_proc`` threads), stored as a cache
    segment and fed to ``consumer``. The scan stops when ``consumer.done`` (with ``early_stop``),
    after ``--max_docs`` documents, or at the end of the corpus. Memory is bounded by one batch.

    Raises:
        ConfigError: unreadable corpus, missing or non-text field, or no document at all.
    """
    t0 = time.perf_counter()
    spec = spec or check_text_column(cfg)
    root = corpus_cache_dir(cfg, spec, tokenizer, cache_root)
    limit = cfg.max_docs or None
    segs, complete = _read_segments(root)
    pieces = _chain(segs, limit)
    pos, reason = 0, None
    for seg, a, b in pieces:  # what an earlier scan read
        if consumer is not None and consumer.done and early_stop:
            reason = STOP_ENOUGH
            break
        ids, off, dids = seg.arrays(mmap=False)
        lo, hi = a - seg.start, b - seg.start
        if consumer is not None:
            consumer.feed(a, ids[off[lo]: off[hi]], off[lo: hi + 1] - off[lo], dids[lo:hi])
        pos = b
    pieces = [p for p in pieces if p[2] <= pos]
    cached = pos
    if reason is None and consumer is not None and consumer.done and early_stop:
        reason = STOP_ENOUGH
    if reason is None and limit is not None and pos >= limit:
        reason = STOP_LIMIT
    if reason is None and complete is not None and pos >= complete:
        reason = STOP_END
    if reason is None:
        reason = _scan_stream(cfg, spec, tokenizer, root, pos, limit, consumer, early_stop, pieces)
    corpus = ShardedCorpus(pieces)
    if corpus.num_docs == 0:
        raise ConfigError(f"--dataset_path {cfg.dataset_path}: the corpus is empty (no document read); pass a "
                          "corpus with documents")
    if corpus.num_tokens == 0:
        raise ConfigError(f"--text_column {spec.text[-1] if spec else cfg.text_column!r}: the {corpus.num_docs} "
                          f"documents read have no text in that field; pass the field that holds the text")
    res = ScanResult(corpus, corpus.num_docs, cached, reason, time.perf_counter() - t0, cfg.max_docs,
                     getattr(consumer, "docs_needed", None))
    logger.info("corpus scan: %s", res.describe())
    return res


def _scan_stream(cfg, spec, tokenizer, root, pos, limit, consumer, early_stop, pieces) -> str:
    """Continue a scan from document ``pos`` with the stream; appends to ``pieces``; returns the stop reason."""

    def store(start: int, ids: np.ndarray, off: np.ndarray, dids: list[str]) -> None:
        seg = _write_segment(root, start, ids, off, dids)
        pieces.append((seg, start, seg.end))

    reason = scan_batches(iter_text_batches(cfg, spec, pos, limit or 0), tokenizer, store, consumer, pos=pos,
                          limit=limit, early_stop=early_stop, num_proc=resolved_num_proc(cfg.num_proc))
    if reason == STOP_END:
        _mark_complete(root, pieces[-1][2] if pieces else pos)
    return reason


def scan_batches(batches, tokenizer, store, consumer: BatchConsumer | None = None, *, pos: int = 0,
                 limit: int | None = None, early_stop: bool = True, num_proc: int = 1) -> str:
    """Tokenize ``batches`` (``(texts, doc ids or None)`` each, read after document ``pos``) in
    growing batches (:data:`FIRST_BATCH_DOCS` documents, then a quarter of those read so far, up to
    :data:`MAX_BATCH_DOCS`), hand each to ``store(first doc, ids, offsets, doc ids)`` and to
    ``consumer``, and stop when the consumer is done (with ``early_stop``). Shared by the scan of a
    corpus on disk (:func:`scan_corpus`) and of texts in memory (:func:`scan_texts`).

    Returns:
        the stop reason: :data:`STOP_ENOUGH`, :data:`STOP_LIMIT` or :data:`STOP_END`.
    """
    from tqdm.auto import tqdm

    size = FIRST_BATCH_DOCS
    texts: list[str] = []
    dids: list[str] = []
    bar = tqdm(desc="reading and tokenizing corpus", unit="doc", initial=pos, total=limit, leave=False)

    def flush() -> None:
        nonlocal pos, texts, dids, size
        if not texts:
            return
        ids, off = tokenize_batch(tokenizer, texts, num_proc)
        store(pos, ids, off, dids)
        if consumer is not None:
            consumer.feed(pos, ids, off, dids)
        bar.update(len(texts))
        pos, texts, dids = pos + len(texts), [], []
        size = min(MAX_BATCH_DOCS, max(FIRST_BATCH_DOCS, pos // 4))

    try:
        for batch, ids_ in batches:
            n0 = pos + len(texts)
            texts.extend(batch)
            dids.extend(ids_ if ids_ is not None else [str(i) for i in range(n0, n0 + len(batch))])
            if len(texts) >= size:
                flush()
                if consumer is not None and consumer.done and early_stop:
                    return STOP_ENOUGH
        flush()
    finally:
        bar.close()
    if consumer is not None and consumer.done and early_stop:
        return STOP_ENOUGH
    if limit is not None and pos >= limit:
        return STOP_LIMIT
    return STOP_END


def _text_batches(docs, text_column: str, limit: int) -> Iterator[tuple[list[str], list[str] | None]]:
    """``(texts, doc ids or None)`` per :data:`READ_ROWS` documents of ``docs``: strings, or mappings
    (rows of a ``datasets.Dataset``) holding the text under ``text_column`` and optionally an ``id``;
    at most ``limit`` documents (0: all).

    Raises:
        ValueError: a document that is neither a string nor a mapping with a string under ``text_column``.
    """
    texts: list[str] = []
    ids: list[str] = []
    for n, doc in enumerate(docs):
        if limit and n >= limit:
            break
        if isinstance(doc, str):
            text, did = doc, None
        elif hasattr(doc, "get") and isinstance(doc.get(text_column), str):
            text, did = doc[text_column], doc.get("id")
        else:
            raise ValueError(f"texts: document {n} is {type(doc).__name__}, not a string or a record with a string "
                             f"{text_column!r} field (text_column)")
        texts.append(text)
        ids.append(str(n) if did is None else str(did))
        if len(texts) == READ_ROWS:
            yield texts, ids
            texts, ids = [], []
    if texts:
        yield texts, ids


def scan_texts(docs, tokenizer, consumer: BatchConsumer | None = None, *, text_column: str = "text",
               limit: int = 0, num_proc: int = 1) -> ScanResult:
    """:func:`scan_corpus` for documents in memory (an iterable of strings or of records, e.g. a
    ``datasets.Dataset``; see :func:`_text_batches`): the same batches and early stop, the token
    ids kept in memory (nothing is written to disk).

    Raises:
        ValueError: a document of the wrong type; no document, or no text at all (``texts``).
    """
    t0 = time.perf_counter()
    parts: list[tuple[np.ndarray, np.ndarray, list[str]]] = []
    reason = scan_batches(_text_batches(docs, text_column, limit), tokenizer,
                          lambda _start, ids, off, dids: parts.append((ids, off, list(dids))), consumer,
                          limit=limit or None, num_proc=num_proc)
    offsets = np.zeros(1 + sum(len(o) - 1 for _, o, _ in parts), dtype=np.int64)
    np.cumsum(np.concatenate([np.diff(o) for _, o, _ in parts] or [np.zeros(0, dtype=np.int64)]), out=offsets[1:])
    corpus = TokenizedCorpus(np.concatenate([i for i, _, _ in parts] or [np.zeros(0, dtype=np.int32)]), offsets,
                             [d for _, _, ds in parts for d in ds])
    if corpus.num_docs == 0 or corpus.num_tokens == 0:
        raise ValueError("texts: no document" + (" has any text" if corpus.num_docs else "") + "; pass the documents "
                         "to mine snippets from (strings, or records with a text field)")
    res = ScanResult(corpus, corpus.num_docs, 0, reason, time.perf_counter() - t0, limit,
                     getattr(consumer, "docs_needed", None))
    logger.info("texts scan: %s", res.describe())
    return res


def tokenize_corpus(cfg: CorpusConfig, tokenizer, cache_root: Path) -> ShardedCorpus:
    """The whole corpus (at most ``--max_docs`` documents) tokenized with ``tokenizer`` (no special
    tokens), cached on disk (see :func:`scan_corpus`; corrupt cache segments are rebuilt)."""
    return scan_corpus(cfg, tokenizer, cache_root).corpus
