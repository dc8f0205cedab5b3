"""Word -> subtokens and added-token firing on the real bundled tokenizers (both families)."""

import logging

import pytest

from token_distillation.targets import filter_candidates, read_wordlist
from token_distillation.tokenization import (
    BYTE_LEVEL_SPACE,
    SENTENCEPIECE_SPACE,
    add_new_tokens,
    marker_to_surface,
    subtoken_ids,
    whitespace_marker,
)

CONTEXTS = ["{w} is rare.", "The {w} was seen.", "Results:\n{w} again", "x ({w}) y", "A.{w}"]


@pytest.fixture(params=["smollm", "gemma"])
def real_tokenizer(request, smollm_tokenizer, gemma_tokenizer):
    import copy

    return copy.deepcopy(smollm_tokenizer if request.param == "smollm" else gemma_tokenizer)


def test_whitespace_markers(smollm_tokenizer, gemma_tokenizer):
    assert whitespace_marker(smollm_tokenizer) == BYTE_LEVEL_SPACE
    assert whitespace_marker(gemma_tokenizer) == SENTENCEPIECE_SPACE
    assert marker_to_surface("Ġhepatotoxicity") == " hepatotoxicity"
    assert marker_to_surface("▁hepatotoxicity") == " hepatotoxicity"


def test_subtokens_match_running_text(real_tokenizer):
    """The subtoken ids of " word" / "word" are exactly what the tokenizer produces in running text."""
    tok = real_tokenizer
    for word in (" hepatotoxicity", "hepatotoxicity"):
        ids = subtoken_ids(tok, word)
        assert len(ids) >= 2
        text_ids = tok.encode("Severe" + word + " was seen", add_special_tokens=False)
        s = "".join(map(chr, (i + 0xE000 for i in text_ids)))
        assert "".join(chr(i + 0xE000) for i in ids) in s
    assert subtoken_ids(tok, " hepatotoxicity") != subtoken_ids(tok, "hepatotoxicity")


def test_added_tokens_fire_in_raw_text(real_tokenizer):
    tok = real_tokenizer
    words = [" hepatotoxicity", " nephrotoxicity", "hepatotoxicity"]
    ids = add_new_tokens(tok, words)
    assert len(set(ids)) == 3
    enc = tok.encode("The hepatotoxicity and nephrotoxicity were severe.", add_special_tokens=False)
    assert ids[0] in enc and ids[1] in enc
    enc = tok.encode("hepatotoxicity is rare", add_special_tokens=False)
    assert ids[2] in enc
    # decoding gives back the raw text
    assert tok.decode(tok.encode("The hepatotoxicity of x", add_special_tokens=False)) == "The hepatotoxicity of x"


def test_filter_candidates_drops_with_reasons(real_tokenizer, tmp_path, caplog):
    """Repeated entries are added once, with one warning that counts them (helper-48 missed the INFO line)."""
    p = tmp_path / "words.txt"
    p.write_text(" hepatotoxicity\n hepatotoxicity\n\n   \n the\nĠnephrotoxicity\n hepatotoxicity\n")
    with caplog.at_level(logging.WARNING, logger="token_distillation.targets"):
        res = filter_candidates(real_tokenizer, read_wordlist(p))
    assert [t.text for t in res.tokens] == [" hepatotoxicity", " nephrotoxicity"]
    reasons = set(res.skipped.values())
    assert {"duplicate", "empty", "already a single token in the vocabulary"} <= reasons
    warned = [r.getMessage() for r in caplog.records if "repeat an earlier one" in r.getMessage()]
    assert warned == ["2 candidate(s) repeat an earlier one and are added once: ' hepatotoxicity'"]


def test_json_concept_list(tmp_path):
    p = tmp_path / "concepts.json"
    p.write_text('{"disease": [" hepatotoxicity", " glioblastoma"], "drug": [" cisplatin"]}')
    assert read_wordlist(p) == [" hepatotoxicity", " glioblastoma", " cisplatin"]
