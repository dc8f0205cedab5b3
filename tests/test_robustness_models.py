"""Models and inputs (issue 8): pre-padded vocabularies, special tokens, untied and scaled
embeddings, odd corpora, context length, bad corpus lines, --out_path checks."""

import copy
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import make_llama, make_tokenizer
from token_distillation.alignment import PhraseMatcher, collate, merge
from token_distillation.config import ConfigError, CorpusConfig, RunConfig
from token_distillation.corpus import tokenize_corpus
from token_distillation.models import embedding_scale, extend_embeddings
from token_distillation.pipeline import run
from token_distillation.snippets import mine_snippets
from token_distillation.targets import filter_candidates
from token_distillation.tokenization import NewToken, add_new_tokens, bos_prefix
from token_distillation.train import NewRows, distill_loss, hidden_at

WORDS = [" hepatotoxicity", " nephrotoxicity", " angiogenesis"]


def _write_words(tmp_path, words):
    p = tmp_path / "words.txt"
    p.write_text("".join(w + "\n" for w in words))
    return str(p)


def _write_corpus(tmp_path, texts, name="docs.jsonl"):
    p = tmp_path / name
    with open(p, "w") as f:
        for i, t in enumerate(texts):
            f.write(json.dumps({"id": f"d{i}", "text": t}) + "\n")
    return p


def _cfg(tmp_path, model_dir, corpus, **kw):
    flags = dict(model_path=str(model_dir), dataset_path=str(corpus), cache_dir=str(tmp_path / "cache"),
                 new_tokens_source=_write_words(tmp_path, WORDS), out_path=str(tmp_path / "out"), snippet_num=6,
                 min_snippets=2, heldout_snippet_num=2, heldout_fraction=0.25, token_distillation_batch_size=4,
                 token_distillation_lr=1e-2, snippet_len=12)
    flags.update(kw)
    return RunConfig.from_flags(**flags)


def test_prepadded_vocabulary_end_to_end(tmp_path, toy_tokenizer, toy_corpus):
    """Embedding rows > tokenizer entries (Qwen/OLMo style), untied: new ids come from the
    tokenizer, the matrix keeps its size, rows past the new ids stay untouched, and
    config.vocab_size matches the saved weights."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    pad_rows = 16
    model_dir = tmp_path / "padded"
    make_llama(len(toy_tokenizer) + pad_rows, tied=False).save_pretrained(model_dir)
    toy_tokenizer.save_pretrained(model_dir)
    res = run(_cfg(tmp_path, model_dir, toy_corpus))
    ids = [t["id"] for t in res.report["tokens"]]
    assert ids == list(range(len(toy_tokenizer), len(toy_tokenizer) + len(ids)))
    assert res.report["model"]["vocab_rows_before"] == res.report["model"]["vocab_rows_after"] == len(toy_tokenizer) + pad_rows
    before = load_file(str(model_dir / "model.safetensors"))
    after = load_file(str(res.out_path / "model.safetensors"))
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        assert after[name].shape == before[name].shape
        keep = torch.ones(before[name].shape[0], dtype=torch.bool)
        keep[ids] = False
        assert torch.equal(after[name][keep], before[name][keep]), name  # original and padding rows
        assert not torch.equal(after[name][ids], before[name][ids]), name
    model = AutoModelForCausalLM.from_pretrained(res.out_path)
    assert model.config.vocab_size == after["model.embed_tokens.weight"].shape[0]
    tok = AutoTokenizer.from_pretrained(res.out_path)
    assert ids[0] in tok.encode("The hepatotoxicity was", add_special_tokens=False)


def test_extend_embeddings_grows_past_padding_never_shrinks():
    model = make_llama(40, tied=False)
    extend_embeddings(model, 30)  # fits in the padding: unchanged
    assert model.get_input_embeddings().weight.shape[0] == 40 and model.config.vocab_size == 40
    extend_embeddings(model, 50)
    assert model.get_input_embeddings().weight.shape[0] == 50 == model.get_output_embeddings().weight.shape[0]
    assert model.config.vocab_size == 50


def _special_variant(kind):
    """The toy tokenizer with pad == EOS, pad == BOS, no pad, or no BOS (and no pad)."""
    from transformers import PreTrainedTokenizerFast

    base = make_tokenizer()
    kw = {"pad_eos": dict(bos_token="<bos>", eos_token="<eos>", pad_token="<eos>"),
          "pad_bos": dict(bos_token="<bos>", eos_token="<eos>", pad_token="<bos>"),
          "no_pad": dict(bos_token="<bos>", eos_token="<eos>"),
          "no_bos": dict(eos_token="<eos>")}[kind]
    return PreTrainedTokenizerFast(tokenizer_object=copy.deepcopy(base.backend_tokenizer), **kw)


@pytest.mark.parametrize("kind", ["pad_eos", "pad_bos", "no_pad", "no_bos"])
def test_special_tokens_snippets_and_masks(kind, toy_corpus, tmp_path):
    """Padding with an id that also occurs inside the text (EOS/BOS) changes nothing: each
    snippet's loss in a padded batch equals its loss alone; no-BOS models get no prefix."""
    tok = _special_variant(kind)
    bos = bos_prefix(tok)
    assert bos == ([] if kind == "no_bos" else [tok.convert_tokens_to_ids("<bos>")])
    corpus = tokenize_corpus(CorpusConfig(dataset_path=str(toy_corpus)), tok, tmp_path / "c")
    toks = filter_candidates(tok, WORDS).tokens
    snips = mine_snippets(corpus, toks, 12, 3, 0, 0.0, bos, seed=0)
    model = make_llama(len(tok) + len(toks))
    new_ids = add_new_tokens(tok, [t.text for t in toks])
    toks = [NewToken(t.text, t.subtoken_ids, i) for t, i in zip(toks, new_ids)]
    rows = NewRows(torch.randn(len(toks), 32), new_ids, len(tok))
    matcher = PhraseMatcher([t.subtoken_ids for t in toks])
    seqs = [merge(s.ids, matcher, new_ids) for s in snips.train]
    for s, m in zip(snips.train, seqs):
        assert list(s.ids[: len(bos)]) == bos and len(s.ids) <= 12 + len(bos)
        if kind == "no_bos":
            assert tok.convert_tokens_to_ids("<bos>") not in s.ids
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0
    # a sequence that itself contains the pad id (EOS/BOS in the text), padded in a batch
    seqs[0] = merge(np.concatenate([seqs[0].teacher_ids, [tok.eos_token_id], toks[0].subtoken_ids]), matcher, new_ids)
    batch = collate(seqs, list(range(len(seqs))), pad_id)
    assert batch.teacher_loss_mask.sum(1).tolist() == batch.student_loss_mask.sum(1).tolist()
    assert (batch.student_attention.sum(1) < batch.student_attention.shape[1]).any()  # padding present
    together = distill_loss(model, rows, batch, layer=2, per_position=True)
    alone = torch.cat([distill_loss(model, rows, collate([s], [0], pad_id), layer=2, per_position=True) for s in seqs])
    torch.testing.assert_close(together, alone, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("kind", ["pad_eos", "no_bos"])
def test_special_tokens_end_to_end(kind, tmp_path, toy_corpus):
    d = tmp_path / "m"
    tok = _special_variant(kind)
    make_llama(len(tok)).save_pretrained(d)
    tok.save_pretrained(d)
    res = run(_cfg(tmp_path, d, toy_corpus))
    assert len(res.report["tokens"]) == 3 and res.report["loss_curve"]


def _tiny_gemma(vocab):
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(0)
    cfg = Gemma3TextConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=256,
                           sliding_window=16, layer_types=["sliding_attention", "full_attention"])
    return Gemma3ForCausalLM(cfg).eval()


@pytest.mark.parametrize("arch", ["gemma_scaled_tied", "llama_untied"])
def test_new_rows_used_exactly_like_original_rows(arch):
    """Copy an original row into a new token: hidden states equal the original token's, both in
    training (NewRows, which applies the module's scale) and after writing the row into the matrix."""
    vocab = 300
    model = _tiny_gemma(vocab) if arch == "gemma_scaled_tied" else make_llama(vocab, tied=False)
    scale = embedding_scale(model)
    assert (scale > 5.0) if arch == "gemma_scaled_tied" else scale == 1.0
    extend_embeddings(model, vocab + 1)
    new_id, orig_id = vocab, 57
    emb = model.get_input_embeddings().weight
    ids = torch.tensor([[1, 20, orig_id, 31, 44]])
    new = ids.clone()
    new[0, 2] = new_id
    att = torch.ones_like(ids, dtype=torch.bool)
    with torch.no_grad():
        want = hidden_at(model, 2, att, input_ids=ids)
        rows = NewRows(emb[[orig_id]].detach(), [new_id], emb.shape[0], scale)
        got = hidden_at(model, 2, att, inputs_embeds=rows.embed(model, new))
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
        emb[new_id] = rows.rows[0]  # what the pipeline writes
        torch.testing.assert_close(hidden_at(model, 2, att, input_ids=new), want, rtol=0, atol=1e-6)


def test_empty_and_whitespace_documents_and_long_documents(tmp_path, toy_model_dir):
    """Empty, whitespace-only and null documents are harmless; a document far longer than the
    model's context (256 positions) yields snippets of snippet_len tokens."""
    long_doc = " ".join(["The patient developed hepatotoxicity after treatment with the drug."] * 200)
    texts = ["", "   ", "\n\n\t", long_doc] + ["Severe nephrotoxicity and hepatotoxicity were observed."] * 6
    corpus = _write_corpus(tmp_path, texts)
    with open(corpus, "a") as f:
        f.write(json.dumps({"id": "null", "text": None}) + "\n")
    tc = tokenize_corpus(CorpusConfig(dataset_path=str(corpus)), AutoTok(toy_model_dir), tmp_path / "c")
    assert tc.num_docs == 11 and len(tc.doc(0)) == len(tc.doc(10)) == 0  # whitespace docs keep their spaces
    assert len(tc.doc(3)) > 256
    res = run(_cfg(tmp_path, toy_model_dir, corpus, snippet_len=20, new_tokens_source=_write_words(tmp_path, WORDS[:2]),
                   heldout_snippet_num=0))
    assert [t["token"] for t in res.report["tokens"]] == WORDS[:2]
    with pytest.raises(ConfigError, match="--snippet_len 300"):
        run(_cfg(tmp_path, toy_model_dir, corpus, snippet_len=300, out_path=str(tmp_path / "o2")))


def AutoTok(d):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(d)


def test_invalid_corpus_line_cli(tmp_path, toy_model_dir):
    """A corpus line that is not JSON: one error line naming the file and line, exit code 2."""
    corpus = tmp_path / "bad.jsonl"
    corpus.write_text('{"text": "fine"}\n{"text": "also fine"}\n{"text": broken\n')
    r = subprocess.run([sys.executable, "apply_embedding_init.py", "--model_path", str(toy_model_dir),
                        "--dataset_path", str(corpus), "--cache_dir", str(tmp_path / "c"),
                        "--out_path", str(tmp_path / "o"), "--new_tokens_source", _write_words(tmp_path, WORDS)],
                       capture_output=True, text=True, timeout=300, cwd=str(__import__("pathlib").Path(__file__).parents[1]))
    assert r.returncode == 2, r.stderr[-2000:]
    err = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert len(err) == 1 and str(corpus) in err[0] and "line 3" in err[0] and "Traceback" not in r.stderr
    assert not (tmp_path / "o").exists()


def test_out_path_equal_to_or_inside_model_dir_refused(tmp_path, toy_model_dir, toy_corpus):
    before = sorted(p.name for p in toy_model_dir.iterdir())
    for out in (toy_model_dir, toy_model_dir / "a" / "b"):
        with pytest.raises(ConfigError, match="inside the input model directory"):
            run(_cfg(tmp_path, toy_model_dir, toy_corpus, out_path=str(out), overwrite=True))
    assert sorted(p.name for p in toy_model_dir.iterdir()) == before
