#!/usr/bin/env python
"""The Python API in notebook-style cells (``# %%``: run cell by cell in VS Code / Jupyter, or as a
script): load the bundled SmolLM2, add three words with ``token_distillation.distill`` trained on a
few hundred shared PubMed abstracts, and look at the tokenization and the report. Writes nothing.

Small settings for a quick run: ``API_EXAMPLE_DOCS`` (abstracts read, default 400) and
``API_EXAMPLE_SNIPPETS`` (training snippets per word, default 25). The corpus is
``../shared/data/pubmed_abstracts/abstracts.jsonl`` beside the clone, or under the folder named by
``TOKEN_DISTILLATION_SHARED_DATA`` (as for the tests).
"""

# %% Load the bundled model and its tokenizer (the converted GGUF checkpoint; ~20 s the first time)
import json
import os
from pathlib import Path

import torch

from token_distillation import distill
from token_distillation.models import default_cache_root, load_model, load_tokenizer
from token_distillation.paths import resolve_model_source

source = resolve_model_source("smollm2-135m")
model = load_model(source, default_cache_root(), torch.device("cpu"), torch.float32)
tokenizer = load_tokenizer(source, default_cache_root())

# %% A few hundred abstracts from the shared corpus (any list of strings, or a datasets.Dataset, works)
shared = os.environ.get("TOKEN_DISTILLATION_SHARED_DATA") or Path(__file__).resolve().parents[2] / "shared" / "data"
corpus = Path(shared) / "pubmed_abstracts" / "abstracts.jsonl"
n_docs = int(os.environ.get("API_EXAMPLE_DOCS", 400))
with open(corpus, encoding="utf-8") as f:
    texts = [json.loads(line)["text"] for _, line in zip(range(n_docs), f)]
words = [" hepatotoxicity", " thrombocytopenia", " haplotype"]
sentence = "Severe hepatotoxicity and thrombocytopenia were linked to one haplotype."
print("before:", tokenizer.tokenize(sentence))

# %% Add the words and train their input embeddings (model and tokenizer are extended in place)
result = distill(model, tokenizer, words, texts, snippet_num=int(os.environ.get("API_EXAMPLE_SNIPPETS", 25)),
                 min_snippets=1)
print("after: ", result.tokenizer.tokenize(sentence))

# %% The report: what report.json holds for a command-line run
report = result.report


def num(x):
    return "n/a" if x is None else f"{x:.4f}"  # n/a: no held-out snippet


for t in report["tokens"]:
    print(f"{t['token']!r}: id {t['id']}, subtokens {t['subtokens']}, {t['train_snippets']} training snippets, "
          f"held-out loss {num(t['heldout_loss_init'])} -> {num(t['heldout_loss_final'])}")
print(f"held-out distillation loss {num(report['mean_heldout_loss_init'])} -> {num(report['mean_heldout_loss_final'])}; "
      f"skipped: {report['skipped_tokens'] or 'none'}")

# %% Use the extended model like any transformers model (save it with result.model.save_pretrained(...))
ids = result.tokenizer(sentence, return_tensors="pt")
with torch.no_grad():
    logits = result.model(**ids).logits
print("next token after the sentence:", repr(result.tokenizer.decode(logits[0, -1].argmax())))
