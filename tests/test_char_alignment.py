"""Character alignment (``--alignment chars``): the student reads the extended tokenizer's own
encoding, aligned with the teacher where tokens end at the same character."""

from __future__ import annotations

import copy

import numpy as np
import pytest

from token_distillation.alignment import PhraseMatcher, align_by_offsets, collate, merge, pair_texts
from token_distillation.fastpath import _prefix_len
from token_distillation.tokenization import add_new_tokens, bos_prefix, subtoken_ids

WORDS = [" dyskinesia", " agonist", " heparin"]
EXACT = [
    "Levodopa-induced dyskinesia is common. An agonist was given, and heparin was stopped.",
    "The dopamine agonist reduced dyskinesia in 12 of 20 patients (p < 0.05).",
    "We report a case of heparin resistance.",
]


def _extend(tokenizer, words):
    original = copy.deepcopy(tokenizer)
    extended = copy.deepcopy(tokenizer)
    subs = [tuple(subtoken_ids(original, w)) for w in words]
    ids = add_new_tokens(extended, words)
    return original, extended, subs, ids


@pytest.mark.parametrize("which", ["smollm_tokenizer", "gemma_tokenizer"])
def test_chars_equal_id_merge_where_segmentations_coincide(which, request):
    """Byte-level BPE and SentencePiece: on text where every occurrence is a whole word, the
    character-aligned pair is the id-level merge (ids, alignment, first new position)."""
    tok = request.getfixturevalue(which)
    original, extended, subs, ids = _extend(tok, WORDS)
    bos = bos_prefix(original)
    pairs = pair_texts(EXACT, original, extended, len(original), bos)
    matcher = PhraseMatcher(subs)
    for text, pair in zip(EXACT, pairs):
        teacher = bos + original(text, add_special_tokens=False)["input_ids"]
        ref = merge(teacher, matcher, ids)
        assert pair.teacher_ids.tolist() == ref.teacher_ids.tolist()
        assert pair.student_ids.tolist() == ref.student_ids.tolist()
        assert pair.student_to_teacher.tolist() == ref.student_to_teacher.tolist()
        assert pair.first_new == ref.first_new >= 0


@pytest.mark.parametrize("which", ["smollm_tokenizer", "gemma_tokenizer"])
def test_plural_context_is_aligned_after_the_stem(which, request):
    """" dyskinesias": the extended tokenizer writes [new token, "s"]; the new token's position has
    no teacher token ending with it (-1, no loss there), the "s" is aligned with the teacher's last
    token of the word, and every later position is aligned and in the loss."""
    tok = request.getfixturevalue(which)
    original, extended, subs, ids = _extend(tok, WORDS[:1])
    text = "Peak-dose dyskinesias were rated in all patients."
    (pair,) = pair_texts([text], original, extended, len(original), [])
    new_pos = pair.first_new
    assert pair.student_ids[new_pos] == ids[0]
    assert extended.convert_ids_to_tokens([int(pair.student_ids[new_pos + 1])]) == ["s"]
    # id-level merge finds nothing: the word's subtokens do not occur in the plural's tokenization
    assert merge(pair.teacher_ids, PhraseMatcher(subs), ids).first_new == -1
    s2t = pair.student_to_teacher
    assert s2t[new_pos] == -1
    word_end = text.index("dyskinesias") + len("dyskinesias")
    enc = original(text, add_special_tokens=False, return_offsets_mapping=True)
    last = max(i for i, (_, e) in enumerate(enc["offset_mapping"]) if e == word_end)
    assert s2t[new_pos + 1] == last
    assert (s2t[new_pos + 1:] >= 0).all()
    assert pair.student_ids[new_pos + 2:].tolist() == pair.teacher_ids[last + 1:].tolist()
    batch = collate([pair], [0])
    assert not batch.student_loss_mask[0, new_pos]
    assert batch.student_loss_mask[0].nonzero().flatten().tolist() == list(range(new_pos + 1, len(pair.student_ids)))
    assert batch.teacher_loss_mask[0].nonzero().flatten().tolist() == list(range(last, len(pair.teacher_ids)))


def test_align_by_offsets_groups_tokens_ending_at_one_character():
    """Byte-fallback tokens of one character share its offsets: only the last of the group is
    aligned (it completes the character)."""
    teacher = [(0, 3), (3, 5), (5, 6), (5, 6), (6, 7)]
    student = [(0, 3), (3, 6), (6, 7)]
    assert align_by_offsets(teacher, student).tolist() == [0, 3, 4]
    assert align_by_offsets(student, teacher).tolist() == [0, -1, -1, 1, 2]


def test_prefix_stops_where_the_student_splits_differently(smollm_tokenizer):
    """A new token without a leading space fires inside a word ("toxicity" in "hepatotoxicity"): the
    student's tokens before it differ from the teacher's, so the shared prefix ends there."""
    original, extended, _, ids = _extend(smollm_tokenizer, ["toxicity"])
    text = "The drug caused severe hepatotoxicity in rats and mice."
    (pair,) = pair_texts([text], original, extended, len(original), [])
    diff = next(i for i, (a, b) in enumerate(zip(pair.teacher_ids, pair.student_ids)) if a != b)
    assert diff <= pair.first_new
    batch = collate([pair, pair], [0, 0])
    assert _prefix_len(batch) == diff


def test_pair_texts_needs_fast_tokenizers(smollm_tokenizer):
    class Slow:
        is_fast = False

    with pytest.raises(ValueError, match="fast tokenizer"):
        pair_texts(["x"], Slow(), smollm_tokenizer, 10, [])


def test_inexact_snippets_in_the_corpus_share(smollm_tokenizer):
    """" agonist" occurs as a whole word in 3 documents and inside " agonists" in 1: a quarter of the
    token's snippets (rounded) are replaced by windows around the plural, the count is unchanged,
    and the new windows contain the plural."""
    from token_distillation.snippets import SnippetMiner, add_inexact_snippets
    from token_distillation.tokenization import NewToken

    tok = smollm_tokenizer
    texts = ["The agonist was given.", "An agonist helps.", "Two agonists were compared here.",
             "A full agonist binds."] * 4
    docs = [np.asarray(tok(t, add_special_tokens=False)["input_ids"]) for t in texts]
    word = NewToken(" agonist", tuple(subtoken_ids(tok, " agonist")))
    miner = SnippetMiner([word], 16, 8, 0, 0.0, [], seed=0)
    flat = np.concatenate(docs)
    offsets = np.concatenate([[0], np.cumsum([len(d) for d in docs])])
    miner.feed(0, flat, offsets)
    snips = miner.result()
    assert len(snips.train) == 8 and all(" agonists" not in tok.decode(s.ids) for s in snips.train)
    info = add_inexact_snippets(snips, docs, tok, [word], 16, [], 0.0, seed=0)
    assert info == {"train": 2, "heldout": 0, "inexact_share": 0.25}
    assert len(snips.train) == 8
    plural = [s for s in snips.train if " agonists" in tok.decode(s.ids)]
    assert len(plural) == 2 and all(s.doc % 4 == 2 for s in plural)
    assert set(snips.train_docs) >= {s.doc for s in plural}


def test_inexact_snippets_top_up_a_token_used_mostly_inside_longer_words(smollm_tokenizer):
    """" hepato" occurs once as a whole word and 6 times inside longer words: with 5 snippets wanted it
    gets 5: the exact one and 4 inside longer words (round(5 x 6/7) = 4, the corpus share), and the counts
    say so."""
    from token_distillation.snippets import SnippetMiner, add_inexact_snippets
    from token_distillation.tokenization import NewToken

    tok = smollm_tokenizer
    texts = ["The hepato score was high.", "Two hepatocytes died.", "Many hepatocellular tumours grew.",
             "All hepatocytes lived.", "Some hepatocytes moved.", "hepatocytes? The hepatocytes grew.", "A hepatoma."]
    docs = [np.asarray(tok(t, add_special_tokens=False)["input_ids"]) for t in texts]
    word = NewToken(" hepato", tuple(subtoken_ids(tok, " hepato")))
    miner = SnippetMiner([word], 16, 5, 0, 0.0, [], seed=0)
    miner.feed(0, np.concatenate(docs), np.concatenate([[0], np.cumsum([len(d) for d in docs])]))
    snips = miner.result()
    assert snips.train_counts == [1]
    info = add_inexact_snippets(snips, docs, tok, [word], 16, [], 0.0, seed=0, want=(5, 0))
    assert info["train"] == 4 and len(snips.train) == 5 and snips.train_counts == [5]
    assert sorted(s.doc for s in snips.train)[0] == 0 and sum(s.doc == 0 for s in snips.train) == 1


HEPATO_TEXTS = ["The hepato score was high.", "Two hepatocytes died.", "Many hepatocellular tumours grew.",
                "All hepatocytes lived.", "Some hepatocytes moved.", "hepatocytes? The hepatocytes grew.", "A hepato."]


def test_inexact_pass_counts_the_words_the_firing_report_would_find(smollm_tokenizer):
    """The over-firing words counted in the inexact-snippet pass are those a separate scan of the
    decoded documents finds (the pipeline decodes the corpus once)."""
    from token_distillation.firing import find_overfiring, overfiring_words
    from token_distillation.snippets import Firings, SnippetMiner, add_inexact_snippets
    from token_distillation.tokenization import NewToken

    tok = smollm_tokenizer
    docs = [np.asarray(tok(t, add_special_tokens=False)["input_ids"]) for t in HEPATO_TEXTS + EXACT]
    words = [NewToken(w, tuple(subtoken_ids(tok, w))) for w in (" hepato", " agonist", " dyskinesia")]
    miner = SnippetMiner(words, 16, 5, 0, 0.0, [], seed=0)
    miner.feed(0, np.concatenate(docs), np.concatenate([[0], np.cumsum([len(d) for d in docs])]))
    firings = Firings(np.zeros((3, 2), dtype=np.int64))
    add_inexact_snippets(miner.result(), docs, tok, words, 16, [], 0.0, seed=0, want=(5, 0), firings=firings)
    texts = [w.text for w in words]
    expected = find_overfiring([tok.decode(d) for d in docs], texts)
    assert expected == {" hepato": {"hepatocytes": 4, "hepatocellular": 1}}  # the first "hepatocytes?": no space
    assert overfiring_words(firings.words, texts) == expected
    assert firings.counts.tolist() == [[2, 5], [2, 0], [2, 0]]
    # the pipeline's log line names the run's own commonest case (it named ' agonist' whatever the words)
    from token_distillation.pipeline import _most_common_inexact

    assert _most_common_inexact(firings.words, words) == " (most often ' hepato' in 'hepatocytes', 4 times)"
    assert _most_common_inexact({}, words) == ""
    # a word-list entry without its leading space: its inexact uses are the word itself after a space
    bare = [NewToken("haplotype", (1, 2))]
    assert _most_common_inexact({0: {"haplotype": 7}}, bare) == " (most often 'haplotype' in ' haplotype', 7 times)"


def test_dry_run_counts_uses_inside_longer_words(tmp_path, cache_dir, caplog):
    """--dry_run with chars: a token the tokenizer uses mostly inside longer words is not listed as
    skipped (a real run tops it up), and coverage.tsv counts those uses; the logged table says what
    its columns count (a token with 0 occurrences and training snippets puzzled helper-35)."""
    import json
    import logging

    from token_distillation.config import ConfigError, RunConfig
    from token_distillation.pipeline import run

    corpus = tmp_path / "c.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in HEPATO_TEXTS * 3), encoding="utf-8")
    words = tmp_path / "w.txt"
    words.write_text(" hepato\n", encoding="utf-8")
    common = dict(model_path="smollm2-135m", dataset_path=str(corpus), cache_dir=str(cache_dir),
                  new_tokens_source=str(words), build_target_method="wordlist", dry_run=True, snippet_num=8,
                  min_snippets=7, heldout_snippet_num=0, snippet_len=12)
    rows = {}
    with caplog.at_level(logging.INFO, logger="token_distillation.pipeline"):
        res = run(RunConfig.from_flags(**common, alignment="chars", out_path=str(tmp_path / "chars")))
    table_line = next(r.getMessage() for r in caplog.records if "dry run: coverage of" in r.getMessage())
    assert "occurrences: uses as the word's own subtokens; count: the corpus count the list was ranked by" in table_line
    assert "inexact_firings: uses inside longer words" in table_line
    rows["chars"], rows["chars_report"] = (res.out_path / "coverage.tsv").read_text().splitlines(), res.report
    # ids: the only token has too few snippets, so the dry run fails as the real run would, after writing its files
    with pytest.raises(ConfigError, match="a real run would stop: no new token has enough snippets"):
        run(RunConfig.from_flags(**common, alignment="ids", out_path=str(tmp_path / "ids")))
    rows["ids"] = (tmp_path / "ids" / "coverage.tsv").read_text().splitlines()
    rows["ids_report"] = json.loads((tmp_path / "ids" / "report.json").read_text())
    head, line = rows["chars"][0].split("\t"), rows["chars"][1].split("\t")
    assert head[-1] == "inexact_firings" and line[head.index("inexact_firings")] == "15"
    assert line[head.index("train_snippets")] == "8" and line[head.index("occurrences")] == "6"
    ids_head, ids_line = rows["ids"][0].split("\t"), rows["ids"][1].split("\t")
    assert "inexact_firings" not in ids_head and ids_line[ids_head.index("train_snippets")] == "6"
    assert rows["chars_report"]["skipped_tokens"] == {} and rows["chars_report"]["tokens_with_enough_snippets"] == 1
    assert list(rows["ids_report"]["skipped_tokens"]) == [" hepato"]


def test_firing_report_rescans_when_a_longer_token_was_skipped(tmp_path, toy_model_dir, cache_dir):
    """" agonists" is skipped (too few snippets) while " agonist" is kept: the words counted while
    mining matched " agonists" whole, so the report scans again and shows " agonist" firing inside
    " agonists", as the final tokenizer (without " agonists") does."""
    import json

    from token_distillation.config import RunConfig
    from token_distillation.pipeline import run

    corpus = tmp_path / "c.jsonl"
    texts = ["An agonist was given to the patients today."] * 8 + ["Two agonists were compared in the trial."] * 2
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")
    words = tmp_path / "w.txt"
    words.write_text(" agonist\n agonists\n", encoding="utf-8")
    rep = run(RunConfig.from_flags(model_path=str(toy_model_dir), dataset_path=str(corpus), cache_dir=str(cache_dir),
                                   new_tokens_source=str(words), snippet_num=4, min_snippets=3, heldout_snippet_num=0,
                                   snippet_len=12, token_distillation_batch_size=4, token_distillation_epochs=1,
                                   out_path=str(tmp_path / "out"))).report
    assert list(rep["skipped_tokens"]) == [" agonists"]
    assert rep["firing"]["overfiring"] == {" agonist": {"agonists": 2}}
