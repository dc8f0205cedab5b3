#!/usr/bin/env python
"""Mine a list of frequent corpus words that a model's tokenizer splits into several subtokens.

Used to make ``new_tokens/biomedical_pubmed60.txt`` (see new_tokens/README.md):

    python scripts/mine_wordlist.py --dataset_path ../shared/data/pubmed_abstracts/abstracts.jsonl \\
        --num_words 60 --out new_tokens/biomedical_pubmed60.txt

A candidate is a lower-case alphabetic word of at least ``min_chars`` letters, preceded by a space
in running text (the token is stored with its leading space), that the tokenizer splits into at
least ``min_subtokens`` subtokens. Candidates are ranked by the number of documents they occur in;
the ``num_words`` most widespread are written, one per line.

Every flag is checked before the tokenizer is loaded or the corpus read (bad input: one ``error:``
line, exit code 2); ``--out`` is replaced whole, never left half-written.
"""

from __future__ import annotations

import collections
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from token_distillation.config import ConfigError, CorpusConfig  # noqa: E402
from token_distillation.paths import default_cache_root, replace_file, resolve_model_source  # noqa: E402

_WORD = re.compile(r"(?<= )[a-z]+(?=[\s.,;:)])")


def main(dataset_path: str = "", out: str = "", model_path: str = "smollm2-135m", num_words: int = 60,
         min_chars: int = 8, min_subtokens: int = 2, text_column: str = "text") -> None:
    """Write the ``num_words`` most widespread multi-subtoken words of ``dataset_path`` to ``out``.

    Raises:
        ConfigError: bad input (checked before the tokenizer is loaded): a missing corpus or
            ``--out``, a count below 1, a missing text column, a model that cannot be found; a
            corpus line that is not a JSON object (found while reading).
    """
    from token_distillation.corpus import check_text_column

    if not str(dataset_path).strip():
        raise ConfigError("--dataset_path is required (a JSON Lines corpus)")
    if not Path(dataset_path).expanduser().is_file():
        raise ConfigError(f"--dataset_path {dataset_path}: file not found")
    if not str(out).strip():
        raise ConfigError("--out is required (the word-list file to write)")
    replace_file(out, flag="--out")
    for flag, value in (("num_words", num_words), ("min_chars", min_chars), ("min_subtokens", min_subtokens)):
        if value < 1:
            raise ConfigError(f"--{flag} must be >= 1, not {value}")
    check_text_column(CorpusConfig(dataset_path=str(Path(dataset_path).expanduser()), text_column=text_column))
    source = resolve_model_source(model_path)
    from token_distillation.corpus import iter_jsonl
    from token_distillation.models import load_tokenizer
    from token_distillation.tokenization import subtoken_ids

    tok = load_tokenizer(source, default_cache_root())
    df: collections.Counter[str] = collections.Counter()
    for _, record in iter_jsonl(dataset_path):
        text = record.get(text_column) or ""
        df.update({w for w in _WORD.findall(str(text)) if len(w) >= min_chars})
    chosen = []
    for word, n in df.most_common():
        if len(subtoken_ids(tok, " " + word)) >= min_subtokens:
            chosen.append((word, n))
        if len(chosen) == num_words:
            break
    replace_file(out, lambda tmp: tmp.write_text("".join(f" {w}\n" for w, _ in chosen), encoding="utf-8"),
                 flag="--out")
    for w, n in chosen:
        print(f"{n:6d} docs  {w!r}  {tok.convert_ids_to_tokens(subtoken_ids(tok, ' ' + w))}")


if __name__ == "__main__":
    import inspect

    from token_distillation.cli import exit_on_user_error, run_fire

    run_fire(exit_on_user_error(main), set(inspect.signature(main).parameters), None, "mine_wordlist.py")
