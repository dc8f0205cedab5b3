#!/usr/bin/env python
"""Mine a list of frequent corpus words that a model's tokenizer splits into several subtokens.

Used to make ``new_tokens/biomedical_pubmed60.txt`` (see new_tokens/README.md):

    python scripts/mine_wordlist.py --dataset_path ../shared/data/pubmed_abstracts/abstracts.jsonl \\
        --num_words 60 --out new_tokens/biomedical_pubmed60.txt

A candidate is a lower-case alphabetic word of at least ``min_chars`` letters, preceded by a space
in running text (the token is stored with its leading space), that the tokenizer splits into at
least ``min_subtokens`` subtokens. Candidates are ranked by the number of documents they occur in;
the ``num_words`` most widespread are written, one per line.
"""

from __future__ import annotations

import collections
import json
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from token_distillation.models import default_cache_root, load_tokenizer, resolve_model_source  # noqa: E402
from token_distillation.tokenization import subtoken_ids  # noqa: E402

_WORD = re.compile(r"(?<= )[a-z]+(?=[\s.,;:)])")


def main(dataset_path: str, out: str, model_path: str = "smollm2-135m", num_words: int = 60,
         min_chars: int = 8, min_subtokens: int = 2, text_column: str = "text") -> None:
    tok = load_tokenizer(resolve_model_source(model_path), default_cache_root())
    df: collections.Counter[str] = collections.Counter()
    with open(dataset_path, encoding="utf-8") as f:
        for line in f:
            text = json.loads(line).get(text_column) or ""
            df.update({w for w in _WORD.findall(text) if len(w) >= min_chars})
    chosen = []
    for word, n in df.most_common():
        if len(subtoken_ids(tok, " " + word)) >= min_subtokens:
            chosen.append((word, n))
        if len(chosen) == num_words:
            break
    Path(out).write_text("".join(f" {w}\n" for w, _ in chosen), encoding="utf-8")
    for w, n in chosen:
        print(f"{n:6d} docs  {w!r}  {tok.convert_ids_to_tokens(subtoken_ids(tok, ' ' + w))}")


if __name__ == "__main__":
    import fire

    fire.Fire(main)
