"""Tokenizer families and odd words (issue 8): byte-level BPE, SentencePiece, byte fallback, where
new tokens fire, over-firing, overlapping tokens, unicode, 10,000 tokens."""

import copy
import random
import time

import pytest

from tests.conftest import TOY_TEXT, make_llama, make_tokenizer
from token_distillation.alignment import PhraseMatcher, merge
from token_distillation.firing import context_mismatches, encode_probes, find_overfiring, firing_report
from token_distillation.models import extend_embeddings
from token_distillation.targets import filter_candidates
from token_distillation.tokenization import (
    SENTENCEPIECE_SPACE,
    NewToken,
    add_new_tokens,
    subtoken_ids,
    whitespace_marker,
)
from token_distillation.train import NewRows


@pytest.fixture(params=["smollm", "gemma"])
def real_tok(request, smollm_tokenizer, gemma_tokenizer):
    """A private copy of a real bundled tokenizer (byte-level BPE or SentencePiece)."""
    base = smollm_tokenizer if request.param == "smollm" else gemma_tokenizer
    return copy.deepcopy(base), base


def _extend(tok, words):
    """Filter, add and return NewTokens with ids plus the probe encodings taken before extension."""
    kept = filter_candidates(tok, words).tokens
    probes = encode_probes(tok, kept)
    ids = add_new_tokens(tok, [t.text for t in kept])
    return [NewToken(t.text, t.subtoken_ids, i) for t, i in zip(kept, ids)], probes


def _enc(tok, text):
    return tok.encode(text, add_special_tokens=False)


def test_fires_in_every_context_both_forms(real_tok):
    """" word" fires after a space, "word" at the start, after a newline and after punctuation;
    marker forms ("Ġword"/"▁word") become the spaced surface form; both forms are distinct tokens."""
    tok, base = real_tok
    marker = whitespace_marker(base)
    toks, probes = _extend(tok, [marker + "hepatotoxicity", "hepatotoxicity"])
    spaced, bare = toks
    assert spaced.text == " hepatotoxicity" and bare.text == "hepatotoxicity"
    assert spaced.subtoken_ids != bare.subtoken_ids and spaced.token_id != bare.token_id
    assert _enc(tok, "hepatotoxicity is rare")[0] == bare.token_id                  # start of text
    assert spaced.token_id in _enc(tok, "Severe hepatotoxicity was seen.")         # after a space
    assert bare.token_id in _enc(tok, "Results:\nhepatotoxicity again")            # after a newline
    for text in ("x (hepatotoxicity) y", "x,hepatotoxicity.", "A.hepatotoxicity"):  # after punctuation
        assert bare.token_id in _enc(tok, text), text
    assert context_mismatches(tok, toks, probes) == {}
    text = "Severe hepatotoxicity.\nhepatotoxicity, (hepatotoxicity)"
    assert tok.decode(_enc(tok, text)) == text


def test_spaced_token_alone_does_not_fire_at_text_start(real_tok):
    """Documented limitation: with only " word" added, a sentence-initial "word" keeps its subtokens."""
    tok, base = real_tok
    (spaced,), _ = _extend(tok, [" hepatotoxicity"])
    assert spaced.token_id not in _enc(tok, "hepatotoxicity is rare")
    assert _enc(tok, "hepatotoxicity is rare") == _enc(base, "hepatotoxicity is rare")


def test_overfiring_is_reported_with_corpus_words(real_tok):
    """" hepato" fires inside " hepatoma" in the extended tokenizer; the scan names that word."""
    tok, base = real_tok
    toks, probes = _extend(tok, [" hepato", " hepatotoxicity"])
    assert toks[0].token_id in _enc(tok, "the hepatoma grew")  # the real tokenizer does over-fire
    docs = ["The hepato team saw hepatoma and hepatomas.", "Severe hepatotoxicity occurred.", "A hepato, again"]
    rep = firing_report(tok, toks, probes, [_enc(base, d) for d in docs])
    assert rep["overfiring"] == {" hepato": {"hepatoma": 1, "hepatomas": 1}}
    assert rep["context_mismatch"] == {}


def test_find_overfiring_rules():
    texts = ["antihepatotoxicity and hepatotoxicity; hepatotoxicity.", "(hepatotoxicity) x toxicity"]
    # "hepatotoxicity" without a space fires after a space where the spaced form is not a token
    assert find_overfiring(texts, ["hepatotoxicity"]) == {"hepatotoxicity": {"hepatotoxicity": 2,
                                                                             "antihepatotoxicity": 1}}
    # with the spaced form added too, leftmost-longest gives the spaced token those occurrences
    got = find_overfiring(texts, ["hepatotoxicity", " hepatotoxicity"])
    assert got == {"hepatotoxicity": {"antihepatotoxicity": 1}}
    # a token inside a longer word, after a space
    assert find_overfiring(texts, [" toxicity"]) == {}
    assert find_overfiring(["x toxicityes"], [" toxicity"]) == {" toxicity": {"toxicityes": 1}}
    assert find_overfiring(["", "   "], [" toxicity"]) == {}


def test_overlapping_tokens_longest_match_same_in_training_and_inference(real_tok):
    """Phrases that are prefixes of other phrases (in token space and in text) resolve to the
    longest match, identically in alignment.merge (training) and in the extended tokenizer."""
    tok, base = real_tok
    words = [" hepatotoxic", " hepatotoxic drug", " hepatotoxicity", "toxicity", " hepato"]
    toks, probes = _extend(tok, words)
    by_text = {t.text: t for t in toks}
    short, long_ = by_text[" hepatotoxic"], by_text[" hepatotoxic drug"]
    assert long_.subtoken_ids[: len(short.subtoken_ids)] == short.subtoken_ids  # a real token-space prefix
    matcher = PhraseMatcher([t.subtoken_ids for t in toks])
    new_ids = [t.token_id for t in toks]
    for text in ["the hepatotoxic drug was", "the hepatotoxic effect", "Severe hepatotoxicity (toxicity).",
                 "x\ntoxicity and hepatotoxic drug.", "hepato hepatotoxic"]:
        ext = _enc(tok, text)
        assert ext == merge(_enc(base, text), matcher, new_ids).student_ids.tolist(), text
    assert long_.token_id in _enc(tok, "the hepatotoxic drug was")
    assert short.token_id not in _enc(tok, "the hepatotoxic drug was")
    # where the two differ, the longer token fires inside a longer word: reported as over-firing
    assert find_overfiring(["the hepatotoxic drugs"], [t.text for t in toks]) == {
        " hepatotoxic drug": {"hepatotoxic drugs": 1}}
    assert context_mismatches(tok, toks, probes) == {}


UNICODE_WORDS = [" Ελληνικά", " 肝毒性", " 🧬gene", " Müllerianstraße", " ацетилцистеин", " naïveté-score", "肝毒性"]


def test_unicode_words(real_tok):
    """Accents, Greek, Cyrillic, CJK, emoji, mixed scripts: subtokens match running text, the new
    tokens fire and decode back to the same text."""
    tok, base = real_tok
    toks, probes = _extend(tok, UNICODE_WORDS)
    assert len(toks) >= 5
    for t in toks:
        text = f"Severe{t.text} was seen." if t.text.startswith(" ") else f"({t.text}) x"
        orig = "".join(chr(0xE000 + i) for i in _enc(base, text))
        assert "".join(chr(0xE000 + i) for i in t.subtoken_ids) in orig, t.text
        enc = _enc(tok, text)
        assert t.token_id in enc and tok.decode(enc) == text, t.text
    assert context_mismatches(tok, toks, probes) == {}


def _byte_fallback_sentencepiece(prepend_scheme: str = "first"):
    """A Llama-2/Mistral-style tokenizer: BPE with byte fallback (<0x..> tokens), Metaspace "▁"."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    trainer_tok = Tokenizer(models.BPE())
    trainer_tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme=prepend_scheme)
    trainer = trainers.BpeTrainer(vocab_size=64, special_tokens=["<unk>", "<s>", "</s>"])
    trainer_tok.train_from_iterator(TOY_TEXT, trainer)
    vocab = trainer_tok.get_vocab()
    for b in range(256):
        vocab.setdefault(f"<0x{b:02X}>", len(vocab))
    import json

    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m)
              for m in json.loads(trainer_tok.to_str())["model"]["merges"]]
    tok = Tokenizer(models.BPE(vocab, merges, unk_token="<unk>", byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme=prepend_scheme)
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def test_byte_fallback_sentencepiece():
    tok = _byte_fallback_sentencepiece()
    base = copy.deepcopy(tok)
    assert whitespace_marker(tok) == SENTENCEPIECE_SPACE
    # characters outside the vocabulary fall back to bytes: "é" -> <0xC3><0xA9>
    pieces = tok.convert_ids_to_tokens(subtoken_ids(tok, " hepatotoxicité"))
    assert "<0xC3>" in pieces and "<0xA9>" in pieces and pieces[0].startswith("▁")
    words = [" hepatotoxicity", "hepatotoxicity", " hepatotoxicité", " 🧬gene", "▁nephrotoxicity"]
    toks, probes = _extend(tok, words)
    assert [t.text for t in toks] == [" hepatotoxicity", "hepatotoxicity", " hepatotoxicité", " 🧬gene",
                                      " nephrotoxicity"]
    assert toks[0].subtoken_ids != toks[1].subtoken_ids
    for t in toks:  # the subtokens are what the tokenizer produces in running text
        text = f"Severe{t.text} was seen." if t.text.startswith(" ") else f"Results:\n{t.text} again"
        assert "".join(chr(0xE000 + i) for i in t.subtoken_ids) in "".join(chr(0xE000 + i) for i in _enc(base, text))
        assert t.token_id in _enc(tok, text)
    assert _enc(tok, "hepatotoxicity is rare")[0] == toks[1].token_id
    # Known limitation (README): a dummy-prefix tokenizer reads a text-initial "word" as "▁word"
    # (the spaced phrase), while the raw-text match fires the bare token there. Reported.
    mism = context_mismatches(tok, toks, probes)
    assert list(mism) == ["hepatotoxicity"] and "'hepatotoxicity was seen.'" in mism["hepatotoxicity"]


def test_context_mismatch_detected_for_dummy_prefix_after_every_token():
    """A tokenizer that re-adds the dummy "▁" after every added token (prepend_scheme "always")
    tokenizes a new token's neighbours differently from training: reported, not silent."""
    tok = _byte_fallback_sentencepiece("always")
    toks, probes = _extend(tok, [" hepatotoxicity"])
    mism = context_mismatches(tok, toks, probes)
    assert list(mism) == [" hepatotoxicity"] and "'Severe hepatotoxicity.'" in mism[" hepatotoxicity"]


def test_ten_thousand_new_tokens_linear():
    """Filtering, probing, adding, matching and the trainable rows scale linearly (tiny model)."""
    def one(n):
        tok = make_tokenizer()
        model = make_llama(len(tok))
        rng = random.Random(n)
        words = sorted({" " + "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(9)) for _ in range(n)})
        t0 = time.perf_counter()
        toks, probes = _extend(tok, words)
        extend_embeddings(model, len(tok))
        matcher = PhraseMatcher([t.subtoken_ids for t in toks])
        doc = [i for t in toks[:2000] for i in t.subtoken_ids]
        merged = merge(doc, matcher, [t.token_id for t in toks])
        rows = NewRows(model.get_input_embeddings().weight[[t.token_id for t in toks]], [t.token_id for t in toks],
                       model.get_input_embeddings().weight.shape[0])
        assert context_mismatches(tok, toks, probes) == {}
        return time.perf_counter() - t0, toks, merged, rows, model, tok

    small, *_ = one(1000)
    big, toks, merged, rows, model, tok = one(10000)
    assert len(toks) >= 9900 and rows.rows.shape == (len(toks), 32)
    assert model.get_input_embeddings().weight.shape[0] == len(tok)
    assert len(merged.student_ids) <= 2000 + 50  # every phrase merged (words may share phrases)
    assert big < 40 * small + 5, (small, big)   # linear: ~10x; quadratic would be ~100x


def test_context_mismatch_is_information_under_character_alignment(caplog):
    """With --alignment chars training reads the extended tokenizer's own segmentation, so a
    neighbour segmented differently (dummy prefix after every added token) is logged as information;
    without it, a warning."""
    import logging

    tok = _byte_fallback_sentencepiece("always")
    toks, probes = _extend(tok, [" hepatotoxicity"])
    for chars, level in ((True, logging.INFO), (False, logging.WARNING)):
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="token_distillation.firing"):
            rep = firing_report(tok, toks, probes, [], chars=chars)
        assert list(rep["context_mismatch"]) == [" hepatotoxicity"]
        got = [r for r in caplog.records if "hepatotoxicity" in r.getMessage()]
        assert [r.levelno for r in got] == [level]
    # precomputed over-firing words are used as given (no documents scanned) and kept for these tokens only
    rep = firing_report(tok, toks, probes, None, overfiring={" hepatotoxicity": {"hepatotoxicitys": 2}, " x": {"xy": 1}})
    assert rep["overfiring"] == {" hepatotoxicity": {"hepatotoxicitys": 2}}
