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
    """Repeated entries are added once, with one warning that counts them (helper-48 missed the INFO line),
    and are not listed as skipped: the token is added (helper-50: report.json's skipped_tokens said
    "duplicate" for a trained token). Every dropped line is counted (three blank lines were one)."""
    p = tmp_path / "words.txt"
    p.write_text(" hepatotoxicity\n hepatotoxicity\n\n   \n\n the\nĠnephrotoxicity\n hepatotoxicity\n")
    with caplog.at_level(logging.WARNING, logger="token_distillation.targets"):
        res = filter_candidates(real_tokenizer, read_wordlist(p))
    assert [t.text for t in res.tokens] == [" hepatotoxicity", " nephrotoxicity"]
    assert set(res.skipped.values()) == {"empty", "already a single token in the vocabulary"}
    assert " hepatotoxicity" not in res.skipped
    assert res.seen == 8
    assert res.dropped == {"duplicate": 2, "empty": 3, "already a single token in the vocabulary": 1}
    warned = [r.getMessage() for r in caplog.records if "repeat an earlier one" in r.getMessage()]
    assert warned == ["2 candidate(s) repeat an earlier one and are added once: ' hepatotoxicity'"]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="token_distillation.targets"):
        res = filter_candidates(real_tokenizer, ["hepatotoxicity", " hepatotoxicity"], add_leading_space=True)
    assert [t.text for t in res.tokens] == [" hepatotoxicity"] and res.dropped == {"duplicate": 1}
    assert "'word' and ' word' are the same token" in caplog.text


def test_word_list_table_and_utf16_are_told(tmp_path, caplog):
    """A pasted word<TAB>count table is kept as written but warned about (the count would be part of the
    token); a UTF-16 file is refused with the iconv command for UTF-16 (helper-50)."""
    from token_distillation.config import ConfigError

    p = tmp_path / "table.txt"
    p.write_text(" haplotype\t12\n hepatotoxicity\n")
    with caplog.at_level(logging.WARNING, logger="token_distillation.targets"):
        assert read_wordlist(p) == [" haplotype\t12", " hepatotoxicity"]
    warned = [r.getMessage() for r in caplog.records if "tab or line break inside" in r.getMessage()]
    assert len(warned) == 1 and "1 line(s) (line 1," in warned[0] and "cut -f1" in warned[0]
    u16 = tmp_path / "u16.txt"
    u16.write_bytes(" hepatotoxicity\n".encode("utf-16"))
    with pytest.raises(ConfigError, match=r"u16.txt is not UTF-8 text .*it is UTF-16 .*iconv -f UTF-16 -t UTF-8"):
        read_wordlist(u16)


def test_json_concept_list(tmp_path):
    p = tmp_path / "concepts.json"
    p.write_text('{"disease": [" hepatotoxicity", " glioblastoma"], "drug": [" cisplatin"]}')
    assert read_wordlist(p) == [" hepatotoxicity", " glioblastoma", " cisplatin"]
