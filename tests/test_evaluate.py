"""Held-out evaluation on a tiny model with hand-checkable cases."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import TOY_TEXT
from token_distillation.config import ConfigError, CorpusConfig
from token_distillation.corpus import tokenize_corpus
from token_distillation.evaluate import EvalConfig, evaluate, heldout_documents, mine_windows, read_extended
from token_distillation.tokenization import bos_prefix, subtoken_ids

ROOT = Path(__file__).resolve().parents[1]
DOCS = [f"doc{i}" for i in range(len(TOY_TEXT) * 3)]  # ids of the toy_corpus fixture, in order


def make_extended(out: Path, model_dir: Path, words: list[str], row_fn, train_doc_ids: list[str]) -> Path:
    """Save ``model_dir`` extended by ``words`` with rows ``row_fn(weight, subtoken_ids)`` + a report."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from token_distillation.models import extend_embeddings
    from token_distillation.tokenization import add_new_tokens

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    subs = [subtoken_ids(tok, w) for w in words]
    ids = add_new_tokens(tok, words)
    extend_embeddings(model, len(tok))
    emb = model.get_input_embeddings().weight
    with torch.no_grad():
        for i, s in zip(ids, subs):
            emb[i] = row_fn(emb[: ids[0]].detach(), s)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    report = {"config": {"init_method": "handmade", "target_layer": 1},
              "snippets": {"source": "corpus", "train_doc_ids": train_doc_ids},
              "tokens": [{"token": w, "id": i, "subtoken_ids": s} for w, i, s in zip(words, ids, subs)]}
    (out / "report.json").write_text(json.dumps(report))
    return out


def _cfg(tmp_path, toy_model_dir, toy_corpus, cache_dir, paths, **kw):
    flags = dict(model_path=str(toy_model_dir), extended_paths=",".join(str(p) for p in paths),
                 dataset_path=str(toy_corpus), cache_dir=str(cache_dir), window_len=12, windows_per_token=6,
                 definition_tokens=4, batch_size=4, out_path=str(tmp_path / "eval"))
    flags.update(kw)
    return EvalConfig.from_flags(**flags)


def test_duplicated_single_subtoken_word_is_exact(tmp_path, toy_model_dir, toy_corpus, cache_dir, toy_tokenizer):
    """A new token " the" whose row copies the row of the existing single token "Ġthe": the student
    sequence computes exactly what the teacher computes, so excess NLL (original vocabulary) is 0,
    hidden states match (MSE 0, cosine 1) and it is never a spurious argmax (ties go to the lower,
    original id). Over the full vocabulary the tied duplicate output row takes p(the) of the mass at
    every position: the excess NLL is exactly mean(log(1 + p_the))."""
    from transformers import AutoModelForCausalLM

    ext = make_extended(tmp_path / "dup", toy_model_dir, [" the"], lambda w, s: w[s[0]], DOCS[:10])
    res = evaluate(_cfg(tmp_path, toy_model_dir, toy_corpus, cache_dir, [ext]))
    row = res["per_token"]["handmade"][" the"]
    assert row["windows"] == 6 and row["positions"] > 20
    assert abs(row["excess_nll_orig"]) < 1e-5
    assert row["mse_target"] < 1e-10 and row["mse_last"] < 1e-10
    assert abs(row["cos_target"] - 1) < 1e-5 and abs(row["cos_last"] - 1) < 1e-5
    assert row["new_token_argmax_rate"] == 0.0
    assert row["definition_nll"] > row["definition_nll_original"]  # full vocabulary: the duplicate takes mass

    # independent check of the full-vocabulary excess on the same windows
    corpus = tokenize_corpus(CorpusConfig(dataset_path=str(toy_corpus)), toy_tokenizer, cache_dir)
    docs = heldout_documents(corpus, set(DOCS[:10]))
    the = subtoken_ids(toy_tokenizer, " the")
    wins = mine_windows(corpus, [tuple(the)], docs, 12, 6, bos_prefix(toy_tokenizer), 42)
    model = AutoModelForCausalLM.from_pretrained(toy_model_dir)
    terms = []
    with torch.no_grad():
        for w in wins:
            p = torch.softmax(model(torch.from_numpy(w.ids)[None]).logits[0].float(), -1)
            terms += torch.log1p(p[w.start: len(w.ids) - 1, the[0]]).tolist()
    assert len(terms) == row["positions"]
    assert row["excess_nll_full"] == pytest.approx(float(np.mean(terms)), abs=1e-5)

    out = tmp_path / "eval"
    assert {"evaluation.json", "evaluation.md", "evaluation.png"} <= {p.name for p in out.iterdir()}
    assert "| handmade |" in (out / "evaluation.md").read_text()


def test_metrics_separate_good_and_bad_rows(tmp_path, toy_model_dir, toy_corpus, cache_dir, toy_tokenizer):
    """Subtoken-mean vs. a row with a huge norm along the mean last hidden state: the latter becomes the
    argmax at many positions (the tied failure mode) and has a much larger excess NLL."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(toy_model_dir)
    with torch.no_grad():
        ids = torch.tensor([toy_tokenizer.encode(TOY_TEXT[0])])
        h = model.model(ids).last_hidden_state[0].mean(0)
    words = [" hepatotoxicity", " nephrotoxicity"]
    good = make_extended(tmp_path / "good", toy_model_dir, words, lambda w, s: w[s].mean(0), [])
    bad = make_extended(tmp_path / "bad", toy_model_dir, words, lambda w, s: 1e3 * h / h.norm(), [])
    res = evaluate(_cfg(tmp_path, toy_model_dir, toy_corpus, cache_dir, [good, bad], labels="mean,bad",
                        definition_tokens=0))
    m = res["methods"]
    assert m["bad"]["new_token_argmax_rate"] > 0.3 and m["mean"]["new_token_argmax_rate"] < 0.05
    assert m["bad"]["excess_nll_full"] > m["mean"]["excess_nll_full"] + 1.0
    assert m["bad"]["excess_nll_full"] > m["bad"]["excess_nll_orig"]
    assert m["mean"]["aggregated_over_tokens"] == 2 and m["bad"]["definition_nll"] is None


def test_compression_counts_on_toy_corpus(tmp_path, toy_model_dir, toy_corpus, cache_dir, toy_tokenizer):
    """Adding " hepatotoxicity" (k subtokens) saves k - 1 tokens per occurrence in held-out documents."""
    word = " hepatotoxicity"
    k = len(subtoken_ids(toy_tokenizer, word))
    assert k >= 2
    train = DOCS[:8]
    ext = make_extended(tmp_path / "c", toy_model_dir, [word], lambda w, s: w[s].mean(0), train)
    res = evaluate(_cfg(tmp_path, toy_model_dir, toy_corpus, cache_dir, [ext], definition_tokens=0))
    texts = (TOY_TEXT * 3)[8:]
    before = sum(len(toy_tokenizer.encode(t, add_special_tokens=False)) for t in texts)
    occurrences = sum(t.count(word) for t in texts)
    m = res["methods"]["handmade"]
    assert res["setup"]["heldout_docs"] == len(texts) and res["setup"]["excluded_training_docs"] == 8
    assert m["tokens_per_doc_before"] == pytest.approx(before / len(texts))
    assert m["tokens_per_doc_after"] == pytest.approx((before - (k - 1) * occurrences) / len(texts))


def test_heldout_documents_exclude_training_documents(tmp_path, toy_model_dir, toy_corpus, cache_dir, toy_tokenizer):
    corpus = tokenize_corpus(CorpusConfig(dataset_path=str(toy_corpus)), toy_tokenizer, cache_dir)
    train = set(DOCS[::3])
    docs = heldout_documents(corpus, train)
    assert len(docs) == len(DOCS) - len(train) and not {corpus.doc_ids[d] for d in docs} & train
    wins = mine_windows(corpus, [tuple(subtoken_ids(toy_tokenizer, " the"))], docs, 12, 1000,
                        bos_prefix(toy_tokenizer), 0)
    assert wins and not {corpus.doc_ids[w.doc] for w in wins} & train
    with pytest.raises(ConfigError, match="all .* documents were used to train"):
        heldout_documents(corpus, set(DOCS))
    # end to end: a held-out corpus made only of training documents is refused
    ext = make_extended(tmp_path / "all", toy_model_dir, [" the"], lambda w, s: w[s[0]], DOCS)
    with pytest.raises(ConfigError, match="held-out corpus disjoint"):
        evaluate(_cfg(tmp_path, toy_model_dir, toy_corpus, cache_dir, [ext]))


def test_report_without_training_documents_is_refused(tmp_path, toy_model_dir):
    ext = make_extended(tmp_path / "x", toy_model_dir, [" the"], lambda w, s: w[s[0]], [])
    rep = json.loads((ext / "report.json").read_text())
    del rep["snippets"]["train_doc_ids"]
    (ext / "report.json").write_text(json.dumps(rep))
    with pytest.raises(ConfigError, match="does not list its training documents"):
        read_extended(ext)
    rep["snippets"] = {"source": "generated"}
    (ext / "report.json").write_text(json.dumps(rep))
    assert read_extended(ext).train_doc_ids == set()


def test_cli_errors_exit_2(tmp_path):
    for args, needle in ((["--extended_paths", str(tmp_path)], "--extended_paths"),
                         (["--bogus", "1"], "--bogus")):
        r = subprocess.run([sys.executable, "-m", "token_distillation.evaluate", *args,
                            "--dataset_path", str(tmp_path / "none.jsonl")], cwd=ROOT, capture_output=True,
                           text=True, timeout=120)
        assert r.returncode == 2 and needle in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_docs_document_every_evaluate_flag():
    from dataclasses import fields

    readme = (ROOT / "docs" / "flags.md").read_text()
    for f in fields(EvalConfig):
        assert f"`--{f.name}`" in readme, f.name


def test_out_path_with_a_users_files_is_refused_before_any_work(tmp_path, toy_model_dir, toy_corpus, cache_dir,
                                                                 monkeypatch):
    import token_distillation.evaluate as ev

    out = tmp_path / "eval"
    out.mkdir()
    (out / "evaluation.md").write_text("my notes")
    ext = make_extended(tmp_path / "e", toy_model_dir, [" hepatotoxicity"], lambda w, s: w[s].mean(0), DOCS[:8])
    monkeypatch.setattr(ev, "_original_pass", lambda *a, **k: (_ for _ in ()).throw(AssertionError("work began")))
    with pytest.raises(ConfigError, match="--out_path .*evaluation.md"):
        evaluate(_cfg(tmp_path, toy_model_dir, toy_corpus, cache_dir, [ext]))
    assert (out / "evaluation.md").read_text() == "my notes"
    monkeypatch.undo()
    (out / "evaluation.md").unlink()
    cfg = _cfg(tmp_path, toy_model_dir, toy_corpus, cache_dir, [ext], definition_tokens=0, bpb_docs=0, gen_prompts=0)
    evaluate(cfg)
    evaluate(cfg)  # an earlier evaluation is replaced
    assert {p.name for p in out.iterdir()} >= {"evaluation.json", "evaluation.md", "evaluation.png"}


def test_models_with_different_token_sets_are_flagged(tmp_path, toy_model_dir, toy_corpus, cache_dir, caplog):
    """One run kept a word another skipped: evaluation.json and evaluation.md say the token sets differ."""
    a = make_extended(tmp_path / "a", toy_model_dir, [" hepatotoxicity", " nephrotoxicity"],
                      lambda w, s: w[s].mean(0), DOCS[:10])
    b = make_extended(tmp_path / "b", toy_model_dir, [" hepatotoxicity"], lambda w, s: w[s].mean(0), DOCS[:10])
    res = evaluate(_cfg(tmp_path, toy_model_dir, toy_corpus, cache_dir, [a, b], labels="two,one",
                        definition_tokens=0, gen_prompts=0, bpb_docs=2))
    assert res["token_sets_differ"] == {"two": 2, "one": 1}
    assert "different new tokens" in (tmp_path / "eval" / "evaluation.md").read_text()


def test_a_dry_run_output_is_named_as_such(tmp_path, toy_corpus):
    """--extended_paths of a dry run (report.json, no model): the error says it is a dry run's output."""
    import json as _json

    from token_distillation.evaluate import EvalConfig

    from token_distillation.paths import write_output_dir

    dry, other = tmp_path / "dry", tmp_path / "other"
    other.mkdir()
    write_output_dir(dry, lambda tmp: (tmp / "report.json").write_text(_json.dumps({"dry_run": True})), kind="dry-run")
    with pytest.raises(ConfigError, match=r"dry is the output of a --dry_run \(no model in it\)") as e:
        EvalConfig.from_flags(extended_paths=f"{dry},{other}", dataset_path=str(toy_corpus))
    assert "other is not an output directory of apply_embedding_init.py" in str(e.value)


def test_extended_models_of_another_original_are_warned_about(tmp_path, caplog):
    """A report whose model identity differs from --model_path's is named in a warning; a report with
    the same identity, or none (older outputs), is not."""
    from token_distillation.evaluate import other_source
    from token_distillation.metrics import ExtendedModel
    from token_distillation.paths import ModelSource

    src = ModelSource("smollm2-135m", "/m", None, "dir:/m:abc")
    mk = lambda lab, model: ExtendedModel(tmp_path / lab, lab, [], [], 1, {"model": model} if model else {})  # noqa
    exts = [mk("same", {"identity": "dir:/m:abc", "source": "smollm2-135m"}),
            mk("other", {"identity": "dir:/u:def", "source": "/u"}), mk("old", None)]
    with caplog.at_level("WARNING", logger="token_distillation.evaluate"):
        assert other_source(exts, src) == ["other"]
    assert "other was made from /u, not from --model_path smollm2-135m" in caplog.text
