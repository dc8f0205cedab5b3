"""Shared fixtures: tiny random models with a tiny byte-level BPE tokenizer, real bundled tokenizers."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

#: the shared PubMed corpus: ../shared/data/pubmed_abstracts next to the clone, or the directory
#: named by TOKEN_DISTILLATION_SHARED_DATA (a folder holding pubmed_abstracts/)
SHARED = (Path(os.environ["TOKEN_DISTILLATION_SHARED_DATA"]) if os.environ.get("TOKEN_DISTILLATION_SHARED_DATA")
          else Path(__file__).resolve().parents[2] / "shared" / "data") / "pubmed_abstracts"
IN_CI = os.environ.get("CI", "").lower() in {"1", "true", "yes"}

TOY_TEXT = [
    "The patient developed hepatotoxicity after treatment with the drug.",
    "Severe hepatotoxicity was observed in two patients receiving high doses.",
    "Nephrotoxicity and hepatotoxicity are common adverse effects.",
    "We measured nephrotoxicity in rats given cisplatin for ten days.",
    "Cisplatin causes nephrotoxicity; the mechanism involves oxidative stress.",
    "Angiogenesis is required for tumour growth and metastasis.",
    "Inhibitors of angiogenesis slow tumour growth in mice.",
    "The study of the patient and the drug and the dose was long.",
] * 4


def require_shared() -> Path:
    """The shared PubMed corpus; skip when absent, unless running in CI (then fail)."""
    if not SHARED.is_dir():
        if IN_CI:
            pytest.fail(f"shared corpus missing in CI: {SHARED}")
        pytest.skip(f"shared corpus not available at {SHARED} (set TOKEN_DISTILLATION_SHARED_DATA to the folder "
                    "that holds pubmed_abstracts/)")
    return SHARED


def make_tokenizer(vocab_size: int = 300):
    """A byte-level BPE tokenizer trained on TOY_TEXT, wrapped as a fast HF tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "<bos>", "<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(TOY_TEXT, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>")


def make_llama(vocab_size: int, tied: bool = True, layers: int = 2, hidden: int = 32, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=64, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      tie_word_embeddings=tied, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    model = LlamaForCausalLM(cfg)
    model.eval()
    return model


@pytest.fixture(scope="session")
def toy_tokenizer():
    return make_tokenizer()


@pytest.fixture(scope="session")
def toy_model_dir(tmp_path_factory, toy_tokenizer):
    """A saved tiny random Llama checkpoint (tied) with the toy tokenizer."""
    d = tmp_path_factory.mktemp("tiny_llama")
    make_llama(len(toy_tokenizer)).save_pretrained(d)
    toy_tokenizer.save_pretrained(d)
    return d


@pytest.fixture(scope="session")
def untied_model_dir(tmp_path_factory, toy_tokenizer):
    """The tiny random Llama of :func:`toy_model_dir` with untied input/output embeddings."""
    d = tmp_path_factory.mktemp("tiny_llama_untied")
    make_llama(len(toy_tokenizer), tied=False).save_pretrained(d)
    toy_tokenizer.save_pretrained(d)
    return d


@pytest.fixture(scope="session")
def toy_corpus(tmp_path_factory):
    import json

    d = tmp_path_factory.mktemp("corpus")
    p = d / "docs.jsonl"
    with open(p, "w") as f:
        for i, t in enumerate(TOY_TEXT * 3):
            f.write(json.dumps({"id": f"doc{i}", "text": t}) + "\n")
    return p


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


def _bundled_tokenizer(alias: str):
    from token_distillation.config import ConfigError
    from token_distillation.models import default_cache_root, load_tokenizer, resolve_model_source

    try:
        src = resolve_model_source(alias)
    except ConfigError as e:
        if IN_CI:
            raise
        pytest.skip(str(e))
    return load_tokenizer(src, default_cache_root())


@pytest.fixture(scope="session")
def smollm_tokenizer():
    """The bundled SmolLM2 tokenizer (byte-level BPE, "Ġ")."""
    return _bundled_tokenizer("smollm2-135m")


@pytest.fixture(scope="session")
def gemma_tokenizer():
    """The Gemma 3 tokenizer (SentencePiece, "▁")."""
    return _bundled_tokenizer("gemma3-270m")
