"""The corpus stage at scale: nested (ncbi/pubmed) records, streamed shards, the num_docs stop,
the progressive scan with early stop, and its bad-input refusals (before any model loads)."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from token_distillation.config import ConfigError, CorpusConfig, RunConfig
from token_distillation.corpus import (
    PUBMED_TEXT,
    STOP_END,
    STOP_ENOUGH,
    STOP_LIMIT,
    check_text_column,
    iter_texts,
    scan_corpus,
)
from token_distillation.snippets import SnippetMiner
import token_distillation.corpus as corpus_mod
from token_distillation.tokenization import NewToken, subtoken_ids

from .conftest import TOY_TEXT
from .test_data_safety import _cli, _no_heavy_loads


def pubmed_rows(texts, start=0, title=True):
    """Records in ncbi/pubmed's nested schema (a subset of its fields)."""
    return [{"MedlineCitation": {"PMID": start + i, "Article": {
                "ArticleTitle": f"Title {start + i}" if title else None, "Abstract": {"AbstractText": t}}},
             "PubmedData": {"PublicationStatus": "ppublish"}} for i, t in enumerate(texts)]


def write_shards(d, texts, per_shard):
    d.mkdir(parents=True, exist_ok=True)
    for s in range(0, len(texts), per_shard):
        pq.write_table(pa.Table.from_pylist(pubmed_rows(texts[s: s + per_shard], s)), d / f"part-{s // per_shard:03d}.parquet")
    return d


@pytest.fixture
def pubmed_dir(tmp_path):
    return write_shards(tmp_path / "pubmed", TOY_TEXT * 2, per_shard=20)


def test_pubmed_schema_read_without_flags_and_with_dotted_path(pubmed_dir):
    auto = check_text_column(CorpusConfig(dataset_path=str(pubmed_dir)))
    assert auto.text == (PUBMED_TEXT,) and auto.doc_id == "MedlineCitation.PMID" and "pubmed" in auto.note
    texts = list(iter_texts(CorpusConfig(dataset_path=str(pubmed_dir))))
    assert texts == TOY_TEXT * 2
    dotted = list(iter_texts(CorpusConfig(dataset_path=str(pubmed_dir), text_column=PUBMED_TEXT)))
    assert dotted == texts
    titled = list(iter_texts(CorpusConfig(dataset_path=str(pubmed_dir), prepend_title=True)))
    assert titled[3] == f"Title 3 {TOY_TEXT[3]}"


def test_list_of_strings_is_joined_with_a_space(tmp_path):
    p = tmp_path / "docs.jsonl"
    p.write_text("\n".join(json.dumps({"doc": {"sections": ["Background: a.", "Results: b."]}}) for _ in range(3)))
    cfg = CorpusConfig(dataset_path=str(p), text_column="doc.sections")
    assert check_text_column(cfg).text == ("doc.sections",)
    assert list(iter_texts(cfg)) == ["Background: a. Results: b."] * 3


def test_num_docs_stop_counts_documents_read(pubmed_dir, toy_tokenizer, tmp_path):
    cfg = RunConfig.from_flags(dataset_path=str(pubmed_dir), stopping_condition="num_docs:25").corpus
    assert cfg.max_docs == 25
    res = scan_corpus(cfg, toy_tokenizer, tmp_path / "cache")
    assert res.docs_read == res.corpus.num_docs == 25 and res.stop_reason == STOP_LIMIT
    assert "read 25 documents" in res.describe() and "num_docs:25" in res.describe()
    full = scan_corpus(CorpusConfig(dataset_path=str(pubmed_dir)), toy_tokenizer, tmp_path / "cache")
    assert full.docs_read == len(TOY_TEXT) * 2 and full.stop_reason == STOP_END
    assert full.docs_from_cache == 25  # the longer scan extends the earlier one
    assert np.array_equal(full.corpus.doc(3), res.corpus.doc(3))
    again = scan_corpus(CorpusConfig(dataset_path=str(pubmed_dir)), toy_tokenizer, tmp_path / "cache")
    assert again.docs_from_cache == again.docs_read and again.stop_reason == STOP_END


def _miner(tok, heldout_fraction=0.3):
    words = [" hepatotoxicity", " nephrotoxicity"]
    toks = [NewToken(w, tuple(subtoken_ids(tok, w))) for w in words]
    return SnippetMiner(toks, 8, 3, 1, heldout_fraction, [1], seed=7)


def test_shards_are_read_lazily_and_the_scan_stops_early(tmp_path, toy_tokenizer):
    d = write_shards(tmp_path / "shards", TOY_TEXT * 150, per_shard=1200)  # 4800 documents, 4 shards
    for bad in sorted(d.glob("*.parquet"))[2:]:
        bad.write_bytes(b"not a parquet file")  # unreadable later shards
    cfg = CorpusConfig(dataset_path=str(d))
    miner = _miner(toy_tokenizer)
    res = scan_corpus(cfg, toy_tokenizer, tmp_path / "cache", consumer=miner)
    assert res.stop_reason == STOP_ENOUGH and miner.done and res.docs_read < 2400
    limited = scan_corpus(CorpusConfig(dataset_path=str(d), max_docs=2400), toy_tokenizer, tmp_path / "c2")
    assert limited.docs_read == 2400 and limited.stop_reason == STOP_LIMIT
    with pytest.raises(ConfigError, match="--dataset_path"):
        scan_corpus(cfg, toy_tokenizer, tmp_path / "c3")  # reading on into a bad shard is one clear error


def test_heldout_split_same_for_any_num_proc(tmp_path, toy_tokenizer):
    p = tmp_path / "docs.jsonl"
    p.write_text("".join(json.dumps({"id": f"d{i}", "text": t}) + "\n" for i, t in enumerate(TOY_TEXT * 30)))
    got = []
    for n in (1, 2):
        miner = _miner(toy_tokenizer)
        res = scan_corpus(CorpusConfig(dataset_path=str(p), num_proc=n), toy_tokenizer, tmp_path / f"c{n}",
                          consumer=miner)
        r = miner.result()
        got.append((r.heldout_docs, r.train_docs, [(s.doc, s.token_index, s.ids.tolist()) for s in r.train + r.heldout],
                    res.corpus.ids.tolist()))
    assert got[0] == got[1] and got[0][0]


@pytest.mark.parametrize("extra, needle", [
    (["--text_column", "MedlineCitation.Article.Abstract.Text"],
     "no field 'Text' under 'MedlineCitation.Article.Abstract'"),
    (["--text_column", "MedlineCitation.PMID"], "not text"),
    (["--stopping_condition", "num_docs:lots"], "num_docs:N with N >= 1"),
    (["--stopping_condition", "num_docs:0"], "num_docs:N with N >= 1"),
])
def test_bad_corpus_input_is_one_line_before_any_model(extra, needle, pubmed_dir, tmp_path, capsys, monkeypatch,
                                                        toy_model_dir):
    _no_heavy_loads(monkeypatch)
    code, errs, secs = _cli(capsys, "--model_path", str(toy_model_dir), "--dataset_path", str(pubmed_dir),
                            "--out_path", str(tmp_path / "o"), *extra)
    assert code == 2 and len(errs) == 1 and needle in errs[0], errs
    assert errs[0].split()[1].startswith("--"), errs  # names the flag
    if "Text" in extra[-1]:
        assert "MedlineCitation.Article.Abstract.AbstractText" in errs[0]  # lists the nested fields


def test_empty_corpus_is_refused_before_any_model(tmp_path, capsys, monkeypatch, toy_model_dir):
    _no_heavy_loads(monkeypatch)
    d = tmp_path / "empty"
    d.mkdir()
    pq.write_table(pa.Table.from_pylist(pubmed_rows(["x"]))[:0], d / "part-000.parquet")
    code, errs, _ = _cli(capsys, "--model_path", str(toy_model_dir), "--dataset_path", str(d),
                         "--out_path", str(tmp_path / "o"))
    assert code == 2 and len(errs) == 1 and "--dataset_path" in errs[0] and "empty" in errs[0], errs


def test_hub_ids_are_streamed(tmp_path, monkeypatch, pubmed_dir):
    """A hub id goes to datasets.load_dataset with streaming=True (served here from local shards)."""
    import datasets

    real = datasets.load_dataset
    calls = []

    def fake(path, *args, **kw):
        calls.append((path, kw))
        if path == "ncbi/pubmed":
            assert kw.get("streaming") is True
            return real("parquet", data_files=sorted(map(str, pubmed_dir.glob("*.parquet"))), split="train",
                        streaming=True)
        return real(path, *args, **kw)

    monkeypatch.setattr(datasets, "load_dataset", fake)
    monkeypatch.setattr(corpus_mod, "hub_unreachable", lambda *a: None)  # as on a machine with network
    cfg = CorpusConfig(dataset_path="ncbi/pubmed", max_docs=5)
    assert check_text_column(cfg).text == (PUBMED_TEXT,)  # the schema is known before anything loads
    assert list(iter_texts(cfg)) == TOY_TEXT[:5]
    assert calls and all(kw.get("streaming") for p, kw in calls if p == "ncbi/pubmed")


def test_an_unreachable_hub_dataset_is_a_one_line_error(monkeypatch):
    """Offline, a hub dataset id fails at once with what to pass instead (datasets would retry for
    about half a minute)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ConfigError, match=r"--dataset_path nosuchorg/nosuchdata: not a local file or folder, and "
                                          r"HF_HUB_OFFLINE is set, .*pass a local \.jsonl"):
        check_text_column(CorpusConfig(dataset_path="nosuchorg/nosuchdata"))


def test_benchmark_corpus_writes_the_pubmed_schema(tmp_path):
    import importlib.util
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("benchmark_corpus", root / "scripts" / "benchmark_corpus.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    src = tmp_path / "src.jsonl"
    src.write_text("".join(json.dumps({"text": t + " " + t}) + "\n" for t in TOY_TEXT))
    shards = mod.write_corpus(tmp_path / "bench", 120, src, seed=1)
    assert len(shards) == 1 and mod.write_corpus(tmp_path / "bench", 120, src, seed=1) == shards
    cfg = CorpusConfig(dataset_path=str(tmp_path / "bench"))
    assert check_text_column(cfg).text == (PUBMED_TEXT,)
    texts = list(iter_texts(cfg))
    assert len(texts) == 120 and all(t.endswith(".") for t in texts)


def test_early_stop_reports_what_the_rarest_token_needed(tmp_path, toy_tokenizer):
    texts = ["plain words only here."] * 2500 + TOY_TEXT * 40
    p = tmp_path / "docs.jsonl"
    p.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    miner = _miner(toy_tokenizer, heldout_fraction=0.0)
    res = scan_corpus(CorpusConfig(dataset_path=str(p)), toy_tokenizer, tmp_path / "c", consumer=miner)
    assert res.stop_reason == STOP_ENOUGH and 2500 < res.docs_needed <= 2500 + len(TOY_TEXT)
    assert res.docs_needed <= res.docs_read < len(texts) and f"after document {res.docs_needed}" in res.describe()


def test_stopping_condition_forms():
    base = dict(dataset_path=str(__import__("pathlib").Path(__file__)))  # any existing path
    old = RunConfig.from_flags(stopping_condition="max_steps", max_steps=7, **base).train
    assert old.stopping_condition.value == "max_steps" and old.max_steps == 7
    assert RunConfig.from_flags(**base).train.stopping_condition.value == "epochs"
    new = RunConfig.from_flags(stopping_condition="num_docs:760_000,max_steps:500", **base)
    assert (new.corpus.max_docs, new.train.max_steps, new.train.stopping_condition.value) == (760_000, 500, "max_steps")
    assert RunConfig.from_flags(stopping_condition="epochs:3", **base).train.token_distillation_epochs == 3
    for bad, needle in (("num_docs:5,num_docs:6", "given twice"), ("max_steps:5,epochs:2", "alternatives"),
                        ("steps:5", "unknown kind"), ("num_docs", "unknown value 'num_docs'")):
        with pytest.raises(ConfigError, match=needle) as e:
            RunConfig.from_flags(stopping_condition=bad, **base)
        assert "num_docs:N" in str(e.value) or "given twice" in needle or "alternatives" in needle
    with pytest.raises(ConfigError, match="conflicts with --max_docs 10"):
        RunConfig.from_flags(stopping_condition="num_docs:20", max_docs=10, **base)


def test_dry_run_reports_documents_read_and_why(tmp_path, toy_model_dir, cache_dir):
    from token_distillation.pipeline import run

    d = write_shards(tmp_path / "pubmed", TOY_TEXT * 2, per_shard=20)
    words = tmp_path / "w.txt"
    words.write_text(" hepatotoxicity\n nephrotoxicity\n")
    cfg = RunConfig.from_flags(model_path=str(toy_model_dir), dataset_path=str(d), cache_dir=str(cache_dir),
                               new_tokens_source=str(words), out_path=str(tmp_path / "out"), dry_run=True,
                               snippet_num=10, min_snippets=1, heldout_snippet_num=1, snippet_len=12,
                               stopping_condition="num_docs:40")
    rep = json.loads((run(cfg).out_path / "report.json").read_text())
    assert rep["targets"]["docs_read"] == 40 and rep["targets"]["scan_stop_reason"] == STOP_LIMIT


def test_prepend_title_without_a_title_field_is_refused(tmp_path):
    p = tmp_path / "docs.jsonl"
    p.write_text(json.dumps({"text": "a b c"}) + "\n")
    with pytest.raises(ConfigError, match="--prepend_title"):
        check_text_column(CorpusConfig(dataset_path=str(p), prepend_title=True))


def _jsonl(path, rows, bad_line=None):
    with open(path, "w", encoding="utf-8") as f:
        for i, r in enumerate(rows):
            if i == bad_line:
                f.write('{"text": "an unterminated\n')  # raw newline inside a string: invalid JSON
            f.write(json.dumps(r) + "\n")
    return path


def test_bad_records_late_in_a_jsonl_corpus_are_named_once(tmp_path, toy_tokenizer, caplog):
    """Past the first batch read: a corrupt line is named by its 1-based line and column, with no second
    (0-based, Arrow-worded) report from the datasets library; a record whose text is an object says so."""
    rows = [{"text": TOY_TEXT[i % len(TOY_TEXT)]} for i in range(3000)]
    bad = _jsonl(tmp_path / "bad.jsonl", rows, bad_line=2500)
    with pytest.raises(ConfigError, match=r"invalid JSON in .*bad\.jsonl line 2501: Invalid control character at "
                                          r"column \d+; fix or remove that line"):
        scan_corpus(CorpusConfig(dataset_path=str(bad)), toy_tokenizer, tmp_path / "c1")
    assert not [r for r in caplog.records if r.name.startswith("datasets")]
    obj = _jsonl(tmp_path / "obj.jsonl", rows + [{"text": {"body": "nested"}}])
    with pytest.raises(ConfigError, match="--text_column 'text' holds JSON objects .*dotted path"):
        scan_corpus(CorpusConfig(dataset_path=str(obj)), toy_tokenizer, tmp_path / "c2")


def test_documents_without_text_are_counted_in_the_scan_line(tmp_path, toy_tokenizer):
    rows = [{"text": t} for t in TOY_TEXT[:6]] + [{"text": None}, {"text": ""}]
    res = scan_corpus(CorpusConfig(dataset_path=str(_jsonl(tmp_path / "n.jsonl", rows))), toy_tokenizer, tmp_path / "c")
    assert res.docs_read == 8 and "2 of them without text (empty or null" in res.describe()


def test_max_steps_without_a_step_stop_is_refused():
    """--max_steps alone used to be ignored silently (training ran its epochs)."""
    with pytest.raises(ConfigError, match="--max_steps 3 counts only when training stops by steps"):
        RunConfig.from_flags(max_steps=3)
    assert RunConfig.from_flags(max_steps=3, stopping_condition="max_steps").train.max_steps == 3


def test_a_folder_with_a_copy_or_subset_is_warned_about(tmp_path, caplog):
    """Two files of a corpus folder that start with the same document (a file and a subset of it)
    get one warning naming them; distinct files get none."""
    from token_distillation.corpus import check_text_column

    d = tmp_path / "corpus"
    d.mkdir()
    lines = [json.dumps({"text": t}) + "\n" for t in TOY_TEXT]
    (d / "all.jsonl").write_text("".join(lines))
    (d / "small.jsonl").write_text("".join(lines[:2]))
    (d / "other.jsonl").write_text("".join(lines[2:]))
    with caplog.at_level("WARNING", logger="token_distillation.corpus"):
        check_text_column(CorpusConfig(dataset_path=str(d)))
        check_text_column(CorpusConfig(dataset_path=str(d)))  # checked again by later stages: warned once
    msgs = [r.message for r in caplog.records]
    assert len(msgs) == 1 and "all.jsonl and small.jsonl begin with the same document" in msgs[0]
    caplog.clear()
    d2 = tmp_path / "distinct"
    d2.mkdir()
    (d2 / "a.jsonl").write_text("".join(lines[:2]))
    (d2 / "b.jsonl").write_text("".join(lines[2:]))
    with caplog.at_level("WARNING", logger="token_distillation.corpus"):
        check_text_column(CorpusConfig(dataset_path=str(d2)))
    assert not caplog.records
