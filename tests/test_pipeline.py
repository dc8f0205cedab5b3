"""End-to-end runs of the pipeline on a tiny random model (fast) and on the bundled model (real)."""

import json

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import require_shared
from token_distillation.config import ConfigError, RunConfig
from token_distillation.pipeline import run


def _words(tmp_path, words):
    p = tmp_path / f"words{len(list(tmp_path.glob('words*.txt')))}.txt"
    p.write_text("".join(w + "\n" for w in words))
    return str(p)


def _toy_cfg(tmp_path, toy_model_dir, toy_corpus, cache_dir, **kw):
    flags = dict(model_path=str(toy_model_dir), dataset_path=str(toy_corpus), cache_dir=str(cache_dir),
                 new_tokens_source=_words(tmp_path, [" hepatotoxicity", " nephrotoxicity", " angiogenesis", " zzqqxx"]),
                 out_path=str(tmp_path / "out"), snippet_num=8, min_snippets=2, heldout_snippet_num=2,
                 heldout_fraction=0.25, token_distillation_batch_size=4, token_distillation_lr=1e-2,
                 snippet_len=12)
    flags.update(kw)
    return RunConfig.from_flags(**flags)


def test_toy_run_saves_loadable_model_and_report(tmp_path, toy_model_dir, toy_corpus, cache_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    res = run(_toy_cfg(tmp_path, toy_model_dir, toy_corpus, cache_dir))
    out = res.out_path
    rep = json.loads((out / "report.json").read_text())
    kept = [t["token"] for t in rep["tokens"]]
    assert kept == [" hepatotoxicity", " nephrotoxicity", " angiogenesis"]
    assert " zzqqxx" in rep["skipped_tokens"]  # never occurs in the corpus
    recs = {r["token"]: r for r in map(json.loads, (out / "new_tokens.jsonl").read_text().splitlines())}
    assert len(recs) == 4 and all(recs[t]["added"] and "skipped" not in recs[t] for t in kept)
    assert recs[" zzqqxx"]["added"] is False and recs[" zzqqxx"]["skipped"] == rep["skipped_tokens"][" zzqqxx"]
    assert rep["loss_curve"] and rep["config"]["init_method"] == "token_distillation"
    assert rep["snippets"]["train_doc_ids"] and not set(rep["snippets"]["train_doc_ids"]) & set(rep["snippets"]["heldout_doc_ids"])
    assert rep["mean_heldout_loss_final"] < rep["mean_heldout_loss_init"]

    tok = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out)
    enc = tok.encode("The hepatotoxicity and nephrotoxicity.", add_special_tokens=False)
    ids = [t["id"] for t in rep["tokens"]]
    assert ids[0] in enc and ids[1] in enc
    # original rows bit-identical, new rows equal the trained rows in the report's order
    orig = load_file(str(toy_model_dir / "model.safetensors"))["model.embed_tokens.weight"]
    new = model.get_input_embeddings().weight.detach()
    assert torch.equal(new[: orig.shape[0]], orig)
    assert new.shape[0] == len(tok) and model.config.vocab_size == new.shape[0]
    for t in rep["tokens"]:
        assert abs(new[t["id"]].norm().item() - t["row_norm"]) < 1e-4


def test_out_path_not_clobbered(tmp_path, toy_model_dir, toy_corpus, cache_dir, caplog):
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("user data")
    with pytest.raises(ConfigError, match="--out_path .* not empty"):
        run(_toy_cfg(tmp_path, toy_model_dir, toy_corpus, cache_dir))
    # --overwrite replaces only an earlier output of this tool, not a directory of user files
    with pytest.raises(ConfigError, match="not an earlier output of this tool"):
        run(_toy_cfg(tmp_path, toy_model_dir, toy_corpus, cache_dir, overwrite=True))
    assert (out / "precious.txt").read_text() == "user data"
    (out / "precious.txt").unlink()
    run(_toy_cfg(tmp_path, toy_model_dir, toy_corpus, cache_dir))
    first = (out / "report.json").read_text()
    with caplog.at_level("INFO", logger="token_distillation.pipeline"):
        run(_toy_cfg(tmp_path, toy_model_dir, toy_corpus, cache_dir, overwrite=True))
    assert (out / "report.json").read_text() != first  # replaced (a new report: other timings)
    assert "--overwrite: " in caplog.text and "holds an earlier output of this tool" in caplog.text
    (out / "notes.txt").write_text("the user's notes beside an output")  # an output with a foreign entry
    with pytest.raises(ConfigError, match="is an earlier output of this tool, but it also holds .*notes.txt"):
        run(_toy_cfg(tmp_path, toy_model_dir, toy_corpus, cache_dir, overwrite=True))
    assert (out / "notes.txt").exists() and (out / "report.json").exists()


def test_overwrite_refuses_the_current_directory_and_git_trees(tmp_path, monkeypatch):
    from token_distillation.paths import prepare_out_path

    work = tmp_path / "project" / "sub"
    work.mkdir(parents=True)
    (work / "report.json").write_text("{}")  # looks like an output, but it is where the user stands
    monkeypatch.chdir(work)
    for out in (".", "..", str(work)):
        with pytest.raises(ConfigError, match="current, a parent or the home directory"):
            prepare_out_path(out, overwrite=True)
    repo = tmp_path / "repo"
    (repo / ".git").mkdir(parents=True)
    (repo / "report.json").write_text("{}")
    with pytest.raises(ConfigError, match="git working tree"):
        prepare_out_path(str(repo), overwrite=True)
    assert (repo / ".git").is_dir() and (work / "report.json").is_file()
    ckpt_only = tmp_path / "interrupted" / "checkpoints"
    ckpt_only.mkdir(parents=True)
    assert prepare_out_path(str(ckpt_only.parent), overwrite=True) == ckpt_only.parent


def test_out_path_inside_model_dir_refused(tmp_path, toy_model_dir, toy_corpus, cache_dir):
    with pytest.raises(ConfigError, match="inside the input model directory"):
        run(_toy_cfg(tmp_path, toy_model_dir, toy_corpus, cache_dir, out_path=str(toy_model_dir / "sub")))


def test_missing_text_column_and_empty_list(tmp_path, toy_model_dir, toy_corpus, cache_dir):
    with pytest.raises(ConfigError, match="--text_column"):
        run(_toy_cfg(tmp_path, toy_model_dir, toy_corpus, cache_dir, text_column="body"))
    with pytest.raises(ConfigError, match="no usable new tokens"):
        run(_toy_cfg(tmp_path, toy_model_dir, toy_corpus, cache_dir, new_tokens_source=_words(tmp_path, ["", "   ", " ", "a"])))


def test_subtoken_mean_and_random_need_no_training(tmp_path, toy_model_dir, toy_corpus, cache_dir, monkeypatch):
    from token_distillation import pipeline

    calls = []
    real = pipeline.heldout_eval

    def spy(*a, loss=True, argmax=True, **k):
        if loss or argmax:
            calls.append((loss, argmax))
        return real(*a, loss=loss, argmax=argmax, **k)

    monkeypatch.setattr(pipeline, "heldout_eval", spy)
    a = run(_toy_cfg(tmp_path, toy_model_dir, toy_corpus, cache_dir, init_method="subtoken-mean", out_path=str(tmp_path / "a")))
    b = run(_toy_cfg(tmp_path, toy_model_dir, toy_corpus, cache_dir, init_method="random", out_path=str(tmp_path / "b")))
    assert a.report["loss_curve"] == [] and b.report["loss_curve"] == []
    assert a.report["mean_heldout_loss_init"] == a.report["mean_heldout_loss_final"]
    assert a.report["new_token_argmax_rate_init"] == a.report["new_token_argmax_rate_final"]
    assert calls == [(True, True)] * 2  # one held-out pass per run (before training): nothing trained
    calls.clear()
    c = run(_toy_cfg(tmp_path, toy_model_dir, toy_corpus, cache_dir, init_method="subtoken-mean",
                     output_embeddings="ntp", out_path=str(tmp_path / "c")))
    assert calls == [(True, True), (False, True)]  # only the output rows trained: the argmax is measured again
    assert c.report["mean_heldout_loss_init"] == c.report["mean_heldout_loss_final"]


def test_teacher_cache_budget_shared_by_heldout_and_training(tmp_path, toy_model_dir, toy_corpus, cache_dir,
                                                            monkeypatch):
    """The held-out teacher states kept between the evaluations before and after training and the
    training's teacher cache together stay within --teacher_cache_gib."""
    from token_distillation import pipeline

    seen = {}
    real_train, real_held = pipeline.train, pipeline.heldout_eval

    def train(*a, teacher_cache_bytes=0, **k):
        seen["train_budget"] = teacher_cache_bytes
        return real_train(*a, teacher_cache_bytes=teacher_cache_bytes, **k)

    def held(*a, teacher_cache=None, **k):
        out = real_held(*a, teacher_cache=teacher_cache, **k)
        seen.setdefault("held", []).append((teacher_cache.bytes, teacher_cache.hits))
        return out

    monkeypatch.setattr(pipeline, "train", train)
    monkeypatch.setattr(pipeline, "heldout_eval", held)
    budget_gib = 1e-3
    run(_toy_cfg(tmp_path, toy_model_dir, toy_corpus, cache_dir, teacher_cache_gib=budget_gib))
    (held_bytes, hits_before), (_, hits_after) = seen["held"]
    assert held_bytes > 0 and hits_before == 0 and hits_after > 0  # "after" reused the teacher states
    assert seen["train_budget"] == int(budget_gib * 2**30) - held_bytes


def test_generated_snippets(tmp_path, toy_model_dir, cache_dir):
    cfg = RunConfig.from_flags(model_path=str(toy_model_dir), cache_dir=str(cache_dir),
                               new_tokens_source=_words(tmp_path, [" hepatotoxicity"]), out_path=str(tmp_path / "g"),
                               snippet_num=4, heldout_snippet_num=2, min_snippets=2, snippet_len=10,
                               token_distillation_batch_size=2)
    res = run(cfg)
    assert res.report["snippets"]["source"] == "generated"
    # per-token recipe (default, 2 epochs): one token, one snippet per update -> 2 x 4 updates
    assert res.report["tokens"][0]["train_snippets"] == 4 and res.report["train_steps"] == 8


@pytest.mark.integration
def test_bundled_model_on_pubmed(tmp_path):
    """Real model, real corpus: distillation lowers the held-out hidden-state MSE at the target layer.
    Output rows: subtoken-mean (the default's output-row fit on the bundled model is run by the
    README's API example test, test_api.py; here it would double the time)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    data = require_shared() / "abstracts_small.jsonl"
    words = [" missense", " homozygous", " heterozygous", " ataxia", " haplotype", " polyposis", " thrombocytopenia"]
    cfg = RunConfig.from_flags(new_tokens_source=_words(tmp_path, words), dataset_path=str(data),
                               out_path=str(tmp_path / "out"), snippet_num=12, heldout_snippet_num=4,
                               min_snippets=3, token_distillation_batch_size=8, heldout_fraction=0.2,
                               token_distillation_lr=1e-3, token_distillation_epochs=2,
                               output_embeddings="subtoken-mean")
    res = run(cfg)
    rep = res.report
    assert rep["model"]["tied_embeddings_source"] is True and rep["model"]["untied_by_run"] is True
    assert len(rep["tokens"]) == len(words)
    assert rep["mean_heldout_loss_final"] < rep["mean_heldout_loss_init"]
    tok = AutoTokenizer.from_pretrained(res.out_path)
    AutoModelForCausalLM.from_pretrained(res.out_path)
    for t in rep["tokens"]:
        assert tok.encode("Severe" + t["token"] + " was seen", add_special_tokens=False)[1] == t["id"]


def test_not_improved_tokens_are_named(caplog):
    """The report lists trained tokens whose held-out distillation loss fell by less than 10%."""
    import logging
    from types import SimpleNamespace

    from token_distillation.pipeline import _not_improved

    toks = [SimpleNamespace(text=t) for t in (" good", " flat", " worse", " unseen")]
    with caplog.at_level(logging.WARNING, logger="token_distillation.pipeline"):
        bad = _not_improved(toks, [1.0, 1.0, 1.0, None], [0.5, 0.95, 1.2, None])
    assert bad == [" flat", " worse"]
    assert "' flat'" in caplog.text and "' good'" not in caplog.text


def test_new_tokens_file_marks_added_tokens_by_the_tokens_added(tmp_path):
    """new_tokens.jsonl's ``added`` comes from the tokens the run added, not from the skipped list: a
    word listed twice has a "duplicate" entry under the same text there, yet it was added (helper-21)."""
    from types import SimpleNamespace

    from token_distillation.report import write_target_files

    recs = [{"token": " haplotype"}, {"token": " xylophonist"}]
    write_target_files(tmp_path, SimpleNamespace(files={}), recs, added={" haplotype"},
                       skipped={" haplotype": "duplicate", " xylophonist": "0 training snippets"})
    out = [json.loads(x) for x in (tmp_path / "new_tokens.jsonl").read_text().splitlines()]
    assert out == [{"token": " haplotype", "added": True},
                   {"token": " xylophonist", "added": False, "skipped": "0 training snippets"}]


def test_tokens_without_heldout_snippets_are_named(caplog):
    import logging
    from types import SimpleNamespace

    from token_distillation.pipeline import _warn_missing_heldout

    toks = [SimpleNamespace(text=t) for t in (" seen", " unseen")]
    with caplog.at_level(logging.INFO, logger="token_distillation.pipeline"):
        assert _warn_missing_heldout(toks, [3, 0], wanted=5) == [" unseen"]
        assert _warn_missing_heldout(toks, [3, 0], wanted=0) == []  # no held-out snippets asked for
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 1 and "' unseen'" in warned[0] and "' seen'" not in warned[0]
    infos = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]  # fewer than asked: noisier
    assert len(infos) == 1 and "1 of 2 token(s) have fewer held-out snippets than --heldout_snippet_num 5" in infos[0]
    assert "' seen' (3)" in infos[0] and "unseen" not in infos[0]


def test_tokens_with_fewer_training_snippets_than_asked_are_named_fewest_first(caplog):
    """A corpus that falls short of --snippet_num for some tokens says which (it said nothing: the
    pre-flight line gave only the total; helper-34)."""
    import logging
    from types import SimpleNamespace

    from token_distillation.pipeline import _log_few_train

    toks = [SimpleNamespace(text=t) for t in (" full", " some", " few")]
    with caplog.at_level(logging.INFO, logger="token_distillation.pipeline"):
        _log_few_train(toks, [25, 12, 3], wanted=25)
        _log_few_train(toks, [25, 25, 25], wanted=25)  # all full: nothing to say
    infos = [r.getMessage() for r in caplog.records]
    assert len(infos) == 1 and "2 of 3 token(s) have fewer training snippets than --snippet_num 25" in infos[0]
    assert infos[0].endswith("' few' (3), ' some' (12)") and "full" not in infos[0], infos


def test_training_teacher_cache_is_sized_first(tmp_path, toy_model_dir, toy_corpus, cache_dir, monkeypatch):
    """With a budget that fits exactly the training snippets' teacher states, training gets all of it
    and the held-out pass keeps none (it saves one forward per held-out snippet, training one per
    snippet and epoch)."""
    from token_distillation import pipeline

    seen = {}
    real_train, real_need = pipeline.train, pipeline.teacher_state_bytes

    def need(*a, **k):
        seen["need"] = real_need(*a, **k)
        return seen["need"]

    def train(*a, teacher_cache_bytes=0, **k):
        seen["train_budget"] = teacher_cache_bytes
        return real_train(*a, teacher_cache_bytes=teacher_cache_bytes, **k)

    monkeypatch.setattr(pipeline, "teacher_state_bytes", need)
    probe = run(_toy_cfg(tmp_path, toy_model_dir, toy_corpus, cache_dir, out_path=str(tmp_path / "probe")))
    assert seen["need"] > 0 and probe.report["train_steps"] > 0
    monkeypatch.setattr(pipeline, "train", train)
    run(_toy_cfg(tmp_path, toy_model_dir, toy_corpus, cache_dir, teacher_cache_gib=seen["need"] / 2**30))
    assert abs(seen["train_budget"] - seen["need"]) <= 1  # nothing went to the held-out cache


@pytest.mark.parametrize("flag", [{"token_distillation_batch_size": "auto"}, {"token_distillation_batch_size": 0}])
def test_auto_batch_size_is_resolved_and_reported(tmp_path, toy_model_dir, toy_corpus, cache_dir, caplog, flag):
    """``--token_distillation_batch_size auto`` (given, or the default for this recipe) on CPU: 16,
    capped at what the run's tokens fill (3 tokens x 1 snippet per update), logged, used and written
    to report.json beside the config's "auto" and the memory plan."""
    import logging

    with caplog.at_level(logging.INFO):
        rep = run(_toy_cfg(tmp_path, toy_model_dir, toy_corpus, cache_dir, **flag)).report
    assert rep["config"]["token_distillation_batch_size"] == "auto" and rep["train_batch_size"] == 3
    assert "--token_distillation_batch_size auto: 3 on cpu" in caplog.text
    assert rep["train_steps"] == 2 * 8  # per-token, 2 epochs of 8 snippets per token, one of each token per step
    plan = rep["memory_plan_gib"]
    assert plan["memory"] == "host" and plan["total"] >= plan["baseline"] > 0
    assert rep["model"]["output_embeddings"] == "distill" and "output_fit" in plan
    assert "output fit" in caplog.text  # the default output fit is planned (the plan line names it)
