"""Bits per byte of raw text (token_distillation.bpb) and its place in the held-out evaluation."""

import json
import math

import pytest
import torch

from tests.conftest import TOY_TEXT
from tests.test_evaluate import DOCS, _cfg, make_extended
from token_distillation.bpb import (ByteScore, TokenBits, _batches, clip_text, documents_for_bpb, excess_split, gap_closed,
                                    score_bytes, select_docs)
from token_distillation.config import CorpusConfig
from token_distillation.corpus import tokenize_corpus
from token_distillation.evaluate import evaluate, heldout_documents, mine_windows
from token_distillation.tokenization import bos_prefix, subtoken_ids


def _direct_bits(model, tokenizer, text: str) -> float:
    """-log2 p of every token of ``text`` after BOS, one unpadded forward pass."""
    ids = torch.tensor([[tokenizer.bos_token_id] + tokenizer(text, add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits[0, :-1].float(), -1)
    return float(-logp.gather(-1, ids[0, 1:, None]).sum() / math.log(2))


def test_score_bytes_equals_direct_sum_whatever_the_batching(toy_model_dir, toy_tokenizer):
    """Padded batches of documents of different lengths give the per-document sums of one unpadded
    pass each, for one document per pass and for all in one pass."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(toy_model_dir).eval()
    texts = TOY_TEXT[:5] + ["Short."]
    want = sum(_direct_bits(model, toy_tokenizer, t) for t in texts)
    n_tokens = sum(len(toy_tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts)
    for budget in (1, 10_000):
        s = score_bytes(model, toy_tokenizer, texts, "cpu", batch_tokens=budget)
        assert s.bits == pytest.approx(want, rel=1e-5)
        assert s.tokens == n_tokens and s.bytes == sum(len(t.encode()) for t in texts) and s.docs == 6
        assert s.bpb == pytest.approx(want / s.bytes, rel=1e-5) and s.new_targets == 0


def test_batches_respect_the_token_budget():
    lengths = [5, 50, 7, 30, 30, 2]
    groups = _batches(lengths, 60)
    assert sorted(i for g in groups for i in g) == list(range(6))
    assert all(len(g) * max(lengths[i] for i in g) <= 60 or len(g) == 1 for g in groups)


def test_clip_text_cuts_at_whitespace():
    assert clip_text("alpha beta gamma", 12) == "alpha beta"
    assert clip_text("alpha beta", 0) == "alpha beta" and clip_text("abc", 10) == "abc"
    assert clip_text("abcdefgh", 4) == "abcd"  # no whitespace: a hard cut


def test_gap_closed_scale():
    assert gap_closed(1.0, 1.0, 1.2) == pytest.approx(1.0)
    assert gap_closed(1.2, 1.0, 1.2) == pytest.approx(0.0)
    assert gap_closed(1.1, 1.0, 1.2) == pytest.approx(0.5)
    assert gap_closed(1.1, 1.0, 0.9) is None  # the reference is better than the original: no gap


def test_documents_for_bpb_keeps_mining_order_and_drops_empty_texts():
    texts = ["a b", "", "c d", "e f", "g h"]
    docs, got = documents_for_bpb([3, 1, 3, 0, 4], 3, iter(texts), 0)
    assert docs == [3, 0] and got == ["e f", "a b"]  # doc 1 is empty; three distinct docs were asked


def test_evaluation_reports_bpb_new_token_targets_and_gap(tmp_path, toy_model_dir, toy_corpus, cache_dir,
                                                          toy_tokenizer):
    """Two extended models of one word on the toy corpus: the original's BPB is the direct sum over
    the selected documents; each extended model has one new-token target per occurrence of the word,
    k - 1 fewer tokens per occurrence; the model marked subtoken-mean closes 0% of its own gap."""
    from transformers import AutoModelForCausalLM

    word = " hepatotoxicity"
    k = len(subtoken_ids(toy_tokenizer, word))
    mean = make_extended(tmp_path / "mean", toy_model_dir, [word], lambda w, s: w[s].mean(0), DOCS[:8])
    rep = json.loads((mean / "report.json").read_text())
    rep["config"]["init_method"] = "subtoken-mean"
    (mean / "report.json").write_text(json.dumps(rep))
    other = make_extended(tmp_path / "other", toy_model_dir, [word], lambda w, s: w[s[-1]], DOCS[:8])
    res = evaluate(_cfg(tmp_path, toy_model_dir, toy_corpus, cache_dir, [mean, other], labels="mean,last",
                        definition_tokens=0, bpb_docs=50))
    orig = res["bpb_original"]
    corpus = tokenize_corpus(CorpusConfig(dataset_path=str(toy_corpus)), toy_tokenizer, cache_dir)
    wins = mine_windows(corpus, [tuple(subtoken_ids(toy_tokenizer, word))], heldout_documents(corpus, set(DOCS[:8])),
                        12, 6, bos_prefix(toy_tokenizer), 42)
    texts = [(TOY_TEXT * 3)[d] for d in select_docs([w.doc for w in wins], 50)]
    assert texts and all(word in t for t in texts)
    model = AutoModelForCausalLM.from_pretrained(toy_model_dir).eval()
    assert orig["docs"] == len(texts) and orig["bytes"] == sum(len(t.encode()) for t in texts)
    assert orig["bits"] == pytest.approx(sum(_direct_bits(model, toy_tokenizer, t) for t in texts), rel=1e-5)
    occurrences = sum(t.count(word) for t in texts)
    for lab in ("mean", "last"):
        b = res["methods"][lab]["bpb"]
        assert b["docs"] == orig["docs"] and b["bytes"] == orig["bytes"]
        assert b["new_token_targets"] == occurrences
        assert orig["tokens"] - b["tokens"] == (k - 1) * occurrences
        x = b["excess_split"]  # the segments cover every token: the split adds up to the difference in bits
        assert x["total"] == pytest.approx(b["bits"] - orig["bits"], abs=1e-3)
        assert x["uses"] == x["word_segments"] == occurrences and x["new_mass"] > 0
        assert x["at_words"] + x["new_mass"] + x["rest"] == pytest.approx(x["total"])
    assert res["bpb_reference"] == "mean"
    assert res["methods"]["mean"]["bpb"]["gap_closed"] in (None, pytest.approx(0.0))
    assert res["methods"]["last"]["bpb"]["bpb"] != res["methods"]["mean"]["bpb"]["bpb"]
    md = (tmp_path / "eval" / "evaluation.md").read_text()
    assert "bits per byte" in md and "| original |" in md and "| last |" in md
    assert "Where the extra bits go" in md


def test_score_bytes_from_a_start_counts_only_the_tokens_after_it(toy_model_dir, toy_tokenizer):
    """With ``starts``, the bits are those of the tokens that start at or after the character (the
    earlier text is context) and the bytes those of ``text[start:]``."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(toy_model_dir).eval()
    texts = [TOY_TEXT[0], TOY_TEXT[1]]
    starts = [texts[0].index(" after"), texts[1].index(" in two")]
    want_bits = 0.0
    for text, st in zip(texts, starts):
        enc = toy_tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids = torch.tensor([[toy_tokenizer.bos_token_id] + enc["input_ids"]])
        with torch.no_grad():
            logp = torch.log_softmax(model(ids).logits[0, :-1].float(), -1)
        bits = -logp.gather(-1, ids[0, 1:, None])[:, 0] / math.log(2)
        want_bits += float(sum(b for b, (a, _) in zip(bits, enc["offset_mapping"]) if a >= st))
    s = score_bytes(model, toy_tokenizer, texts, "cpu", starts=starts, batch_tokens=10)
    assert s.bits == pytest.approx(want_bits, rel=1e-5)
    assert s.bytes == sum(len(t[st:].encode()) for t, st in zip(texts, starts))
    assert 0 < s.tokens < sum(len(toy_tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts)


def test_inflected_contexts_find_uses_inside_longer_words_only():
    """Windows only where the token fires inside a longer word, in the held-out documents; the scored
    part starts at the first whitespace after that word."""
    from token_distillation.bpb import inflected_contexts

    texts = ["An agonist was given.", "Two agonists were compared, and agonists, too, here.", "agonists in doc 2 x",
             "The agonists: first."]
    got = inflected_contexts(iter(texts), {0, 1, 3}, [" agonist"], per_word=5)
    assert [(c.doc, c.text[c.start:][:6]) for c in got] == [(1, " were "), (1, " too, "), (3, " first")]
    assert all(" agonists" in c.text[: c.start] for c in got)
    assert inflected_contexts(iter(texts), {0, 1, 3}, [" agonist"], per_word=1)[0].doc == 1


def test_inflected_contexts_stop_before_the_next_new_token():
    """The scored text holds no other use of a new token (only original tokens are scored)."""
    from token_distillation.bpb import inflected_contexts

    text = "Two agonists were compared with antagonist drugs in agonist trials and more text."
    (c,) = inflected_contexts(iter([text]), {0}, [" agonist", " antagonist"], per_word=1)
    assert c.text[c.start:] == " were compared with"


def test_excess_split_by_segments_both_tokenizations_end_a_token_at():
    """Hand-made documents: the original reads 'abc|def|ghij' (ends 3, 6, 10), the extended model
    'abcdef|ghij' with a new token for 'abcdef'; the cuts are 6 and 10. The first segment is at the
    words (2.5 - 3 bits), the second elsewhere: 0.2 bits of new-token probability, 0.3 the rest."""
    orig = ByteScore(bits=6.0, per_doc=[TokenBits([3, 6, 10], [1.0, 2.0, 3.0], [0, 0, 0],
                                                                             [False] * 3)])
    ext = ByteScore(bits=6.0, new_targets=1,
                                               per_doc=[TokenBits([6, 10], [2.5, 3.5], [0.0, 0.2], [True, False])])
    x = excess_split(orig, ext)
    assert x["at_words"] == pytest.approx(-0.5) and x["new_mass"] == pytest.approx(0.2)
    assert x["rest"] == pytest.approx(0.3) and x["total"] == pytest.approx(0.0)
    assert x["word_segments"] == 1 and x["floor_bits"] == pytest.approx((1 - 2 ** -3.0) / math.log(2))
    # a token of the extended model that ends after the last common end falls in the last segment
    ext2 = ByteScore(per_doc=[TokenBits([6, 10, 11], [2.5, 3.5, 1.0], [0.0, 0.2, 0.1],
                                                                   [True, False, False])])
    assert excess_split(orig, ext2)["rest"] == pytest.approx(0.3 + 0.9)
    with pytest.raises(ValueError, match="keep_tokens"):
        excess_split(orig, ByteScore())


def test_new_token_mass_is_what_the_other_targets_pay(tmp_path, toy_model_dir):
    """At every target that is not a new token, ``new_mass`` is -log2 of the original tokens' share of
    the extended model's probability (a direct forward pass); with the new rows removed from the softmax
    the other targets' bits drop by exactly that amount."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    word = " hepatotoxicity"
    ext_dir = make_extended(tmp_path / "ext", toy_model_dir, [word], lambda w, s: w[s].mean(0), [])
    model = AutoModelForCausalLM.from_pretrained(ext_dir).eval()
    tok = AutoTokenizer.from_pretrained(ext_dir)
    new_id = tok.convert_tokens_to_ids(tok.tokenize(word)[0])
    texts = [t for t in TOY_TEXT if word in t][:3] + [TOY_TEXT[0]]
    s = score_bytes(model, tok, texts, "cpu", new_ids=[new_id], keep_tokens=True, batch_tokens=40)
    want_mass, want_other = 0.0, 0.0
    for text, doc in zip(texts, s.per_doc):
        ids = torch.tensor([[tok.bos_token_id] + tok(text, add_special_tokens=False)["input_ids"]])
        with torch.no_grad():
            logits = model(ids).logits[0, :-1].float()
        p = torch.softmax(logits, -1)
        other = ids[0, 1:] != new_id
        mass = -torch.log2(1 - p[:, new_id])
        assert doc.new_mass == pytest.approx(torch.where(other, mass, 0).tolist(), abs=1e-4)
        assert doc.is_new == (~other).tolist() and len(doc.ends) == len(doc.bits) == len(ids[0]) - 1
        orig_only = torch.log_softmax(logits[:, :new_id], -1)  # the softmax without the new row
        want_other += float(-orig_only[other].gather(-1, ids[0, 1:][other, None]).sum() / math.log(2))
        want_mass += float(mass[other].sum())
    assert s.new_mass_bits == pytest.approx(want_mass, rel=1e-4) and s.new_mass_bits > 0
    other_bits = s.bits - s.new_target_bits
    assert other_bits - s.new_mass_bits == pytest.approx(want_other, rel=1e-4)


def test_tables_say_when_no_gap_closed_is_computed():
    """evaluation.md: with a subtoken-mean reference the raw-text table names it; without one the
    gap columns are '-' and the text says why; one inflected window is 'window', not 'windows'."""
    import json
    from pathlib import Path

    from token_distillation.eval_render import markdown_tables

    res = json.loads((Path(__file__).parent.parent / "docs/sweep/raw_text/smollm2_n24_r2/evaluation.json").read_text())
    md = markdown_tables(res)
    assert "gap closed against `subtoken-mean`" in md and "no gap closed" not in md
    for m in res["methods"].values():
        for part in ("bpb", "inflected"):
            if m.get(part):
                m[part]["gap_closed"] = None
    res["bpb_reference"] = None
    res["inflected_original"]["docs"] = 1
    md = markdown_tables(res)
    assert md.count("no gap closed (no subtoken-mean model evaluated)") == 2
    assert "Inflected forms: 1 held-out window where" in md
