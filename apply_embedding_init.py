#!/usr/bin/env python
"""Add new tokens to a Hugging Face causal LM and initialise their input embeddings.

Examples:
    python apply_embedding_init.py                      # bundled model, demo word list, generated snippets
    python apply_embedding_init.py --help               # every flag
    python apply_embedding_init.py --build_target_method wordlist --new_tokens_source words.txt \\
        --dataset_path abstracts.jsonl --out_path out/
"""

from token_distillation.cli import fire_main

if __name__ == "__main__":
    fire_main()
