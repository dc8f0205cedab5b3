"""The Python API (token_distillation.distill): the command line's rows from a model in memory,
nothing written to disk unless asked, bad input named; the notebook-style example script runs."""

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

from tests.conftest import TOY_TEXT, require_shared
from token_distillation import ConfigError, DistillResult, RunConfig, distill
from token_distillation.pipeline import run

ROOT = Path(__file__).resolve().parents[1]
WORDS = [" hepatotoxicity", " nephrotoxicity", " angiogenesis"]
SMALL = dict(snippet_num=6, min_snippets=2, heldout_snippet_num=2, heldout_fraction=0.25,
             token_distillation_batch_size=4, snippet_len=12)
SENTENCE = "The hepatotoxicity and nephrotoxicity of angiogenesis inhibitors."
DOCS = [{"id": f"doc{i}", "text": t} for i, t in enumerate(TOY_TEXT * 3)]


def _load(path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


def _cli(tmp_path, model_path, words, docs, **flags):
    """The command line's run on the same words and documents (a JSON Lines file, or generated snippets)."""
    (tmp_path / "words.txt").write_text("".join(w + "\n" for w in words))
    corpus = ""
    if docs is not None:
        corpus = tmp_path / "docs.jsonl"
        corpus.write_text("".join(json.dumps(d) + "\n" for d in docs))
    return run(RunConfig.from_flags(model_path=str(model_path), new_tokens_source=str(tmp_path / "words.txt"),
                                    dataset_path=str(corpus), out_path=str(tmp_path / "cli"), **flags))


def _assert_same_result(res: DistillResult, cli):
    saved, saved_tok = _load(cli.out_path)
    assert [(t["token"], t["id"]) for t in res.report["tokens"]] == [(t["token"], t["id"]) for t in cli.report["tokens"]]
    assert res.report["loss_curve"] == cli.report["loss_curve"]
    for get in ("get_input_embeddings", "get_output_embeddings"):
        a, b = getattr(res.model, get)().weight, getattr(saved, get)().weight
        if get == "get_input_embeddings":
            assert torch.equal(a, b), get
        else:  # distilled output rows: float32 reductions over the vocabulary may differ in the last bits
            # (3e-7 seen on SmolLM2); the original rows are bit-identical
            n = a.shape[0] - len(res.report["tokens"])
            assert torch.equal(a[:n], b[:n]) and torch.allclose(a, b, rtol=0, atol=1e-5), get
    assert res.tokenizer.encode(SENTENCE) == saved_tok.encode(SENTENCE)


@pytest.mark.parametrize("model_fixture,mined", [("toy_model_dir", True), ("untied_model_dir", True),
                                                 ("toy_model_dir", False)])
def test_api_equals_the_command_line(request, tmp_path, cache_dir, model_fixture, mined):
    """Mined from texts (a datasets.Dataset) or generated snippets, tied or untied source: the API's
    extended model has the command line's rows, token ids, loss curve and tokenization."""
    import datasets

    model_dir = request.getfixturevalue(model_fixture)
    cli = _cli(tmp_path, model_dir, WORDS, DOCS if mined else None, cache_dir=str(cache_dir), **SMALL)
    model, tok = _load(model_dir)
    res = distill(model, tok, WORDS, datasets.Dataset.from_list(DOCS) if mined else None, **SMALL)
    assert res.model is model and res.tokenizer is tok and res.out_path is None  # extended in place
    _assert_same_result(res, cli)
    assert res.report["snippets"]["source"] == ("corpus" if mined else "generated")


def test_bundled_model_api_equals_the_command_line(tmp_path):
    """SmolLM2 with three words and the first 300 shared abstracts: the same rows as the command line."""
    from token_distillation.models import default_cache_root, load_model, load_tokenizer
    from token_distillation.paths import resolve_model_source

    lines = (require_shared() / "abstracts_small.jsonl").read_text().splitlines()[:300]
    docs = [json.loads(line) for line in lines]
    words = [" hepatotoxicity", " haplotype", " thrombocytopenia"]
    flags = dict(snippet_num=4, heldout_snippet_num=2, min_snippets=1, snippet_len=24, token_distillation_epochs=1)
    cli = _cli(tmp_path, "smollm2-135m", words, docs, **flags)
    model = load_model(resolve_model_source("smollm2-135m"), default_cache_root(), torch.device("cpu"), torch.float32)
    tok = load_tokenizer(resolve_model_source("smollm2-135m"), default_cache_root())
    res = distill(model, tok, words, [d["text"] for d in docs], **flags)
    _assert_same_result(res, cli)


def test_api_stop_offers_no_resume(monkeypatch, toy_model_dir):
    """A stop signal in the Python API (which writes no checkpoints) does not promise --resume."""
    from token_distillation import pipeline
    from token_distillation.interrupts import Interrupted

    def stopped(*a, **k):
        raise Interrupted(15, step=2)

    monkeypatch.setattr(pipeline, "distill_stages", stopped)
    model, tok = _load(toy_model_dir)
    with pytest.raises(Interrupted) as info:
        distill(model, tok, [" hepatotoxicity"], [TOY_TEXT])
    msg = info.value.message()
    assert "--resume" not in msg and "keeps no checkpoints" in msg and msg.startswith("interrupted (SIGTERM) at step 2")
    assert info.value.exit_code == 143


def test_api_writes_nothing_unless_asked(tmp_path, monkeypatch, toy_model_dir):
    """Without out_path nothing is written (home, temporary and cache directories, the working
    directory stay empty); with it, the command line's output directory, holding the same rows."""
    model, tok = _load(toy_model_dir)
    empty = tmp_path / "empty"
    empty.mkdir()
    for var in ("HOME", "TMPDIR", "TOKEN_DISTILLATION_CACHE", "XDG_CACHE_HOME"):
        monkeypatch.setenv(var, str(empty))
    monkeypatch.setattr(tempfile, "tempdir", None)  # read TMPDIR again
    monkeypatch.chdir(empty)
    before = model.get_input_embeddings().weight.shape[0]
    res = distill(model, tok, WORDS, TOY_TEXT * 3, **SMALL)
    assert sorted(empty.rglob("*")) == []
    assert res.model.get_input_embeddings().weight.shape[0] == before + 3
    assert not model.training and all(p.requires_grad for p in model.parameters())  # restored
    model2, tok2 = _load(toy_model_dir)
    saved = distill(model2, tok2, WORDS, TOY_TEXT * 3, out_path=tmp_path / "out", export="hf,peft", **SMALL)
    assert saved.out_path == (tmp_path / "out").resolve()
    assert sorted(empty.rglob("*")) == []
    on_disk, _ = _load(saved.out_path)
    assert torch.equal(on_disk.get_input_embeddings().weight, res.model.get_input_embeddings().weight)
    assert json.loads((saved.out_path / "report.json").read_text())["tokens"] == json.loads(json.dumps(res.report["tokens"]))
    assert (saved.out_path / "peft" / "adapter_model.safetensors").is_file()


@pytest.mark.parametrize("args,kwargs,error,match", [
    ([[]], {}, ValueError, "new_tokens is empty"),
    ([" hepatotoxicity"], {}, ValueError, "new_tokens: pass a list"),
    ([[1]], {}, ValueError, "new_tokens: entry 0 is int"),
    ([WORDS, "one text"], {}, ValueError, "texts: pass a list of documents"),
    ([WORDS, 3], {}, TypeError, "texts: expected an iterable"),
    ([WORDS, [3]], {}, ValueError, "texts: document 0 is int"),
    ([WORDS, ["nothing to see here"] * 5], {}, ConfigError, "texts: none of the 3 new tokens occurs"),
    ([WORDS, TOY_TEXT], {"model_path": "x"}, ConfigError, r"model_path: pass it as distill\(\)'s model argument"),
    ([WORDS, TOY_TEXT], {"dataset_path": "x"}, ConfigError, "dataset_path: pass it as distill\\(\\)'s texts"),
    ([WORDS, TOY_TEXT], {"resume": True}, ConfigError, "resume=True: not available in the Python API"),
    ([WORDS, TOY_TEXT], {"snippet_len": 0}, ConfigError, "snippet_len"),
    ([WORDS, TOY_TEXT], {"min_snippets": 1000}, ConfigError, "min_snippets 1000"),
    ([WORDS, TOY_TEXT], {"out_path": "OUT", "export": "hf,gguf"}, ConfigError, "--export gguf"),
])
def test_bad_input_is_named(tmp_path, toy_model_dir, args, kwargs, error, match):
    model, tok = _load(toy_model_dir)
    if kwargs.get("out_path") == "OUT":
        kwargs = {**kwargs, "out_path": tmp_path / "out"}
    with pytest.raises(error, match=match):
        distill(model, tok, *args, **{**SMALL, **kwargs})
    assert not (tmp_path / "out").exists()


def test_example_script_runs(tmp_path):
    """scripts/api_example.py (notebook-style cells) on the bundled model with small settings."""
    require_shared()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "API_EXAMPLE_DOCS": "300", "API_EXAMPLE_SNIPPETS": "3"}
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "api_example.py")], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "after:" in out.stdout and "held-out distillation loss" in out.stdout
    assert sorted(tmp_path.iterdir()) == []  # writes nothing


def test_tied_and_untied_runs_train_the_same_input_rows(toy_model_dir):
    """--output_embeddings tied and auto (untied) give the same trained input rows: the loss compares
    hidden states, which the output layer does not touch (scripts/tied_vs_untied.py relies on it)."""
    rows = {}
    for policy in ("auto", "tied"):
        model, tok = _load(toy_model_dir)
        res = distill(model, tok, WORDS, TOY_TEXT * 3, output_embeddings=policy, **SMALL)
        ids = [t["id"] for t in res.report["tokens"]]
        rows[policy] = res.model.get_input_embeddings().weight[ids]
        assert res.report["model"]["tied_embeddings"] == (policy == "tied")
    assert torch.equal(rows["auto"], rows["tied"])


def _readme_use_the_result_blocks() -> list[str]:
    import re

    text = (ROOT / "README.md").read_text(encoding="utf-8")
    part = text[text.index("### Use the result"):text.index("### What the run prints")]
    return re.findall(r"```python\n(.*?)```", part, re.S)


def test_readme_use_the_result_code_runs(tmp_path, monkeypatch, toy_model_dir, cache_dir):
    """The README's 'Use the result' code as written: the transformers block on a command-line output
    (tiny model) in ``out/``; the bundled model loaded with plain transformers, then the Python API
    on the shared small corpus (``../shared/...`` from the working directory, as in the README)."""
    first, second = _readme_use_the_result_blocks()
    work = tmp_path / "work"
    work.mkdir()
    (tmp_path / "shared" / "data").mkdir(parents=True)
    (tmp_path / "shared" / "data" / "pubmed_abstracts").symlink_to(require_shared())
    monkeypatch.chdir(work)
    _cli(tmp_path, toy_model_dir, WORDS, DOCS, cache_dir=str(cache_dir), **SMALL).out_path.rename(work / "out")
    scope: dict = {}
    exec(first, scope)
    assert len(scope["tok"]) == len(_load(toy_model_dir)[1]) + 3
    scope = {}
    exec(second, scope)
    res = scope["res"]
    tokens = res.tokenizer.tokenize("Severe thrombocytopenia was linked to one haplotype.")
    assert res.model is scope["model0"] and {" thrombocytopenia", " haplotype"} <= set(tokens)
    assert res.out_path is None and sorted(p.name for p in work.iterdir()) == ["out"]


def test_a_flag_given_as_none_takes_its_default():
    """``distill(..., output_rows_shift=None)`` ended with "expected a number of nats ..., got ''" (None
    became the empty string for string flags; for numbers it was an error). None now means the flag's
    default, also over a ``config`` that sets it."""
    from token_distillation.api import _config
    from token_distillation.config import RunConfig

    cfg = _config(None, {"output_rows_shift": None, "snippet_num": None, "output_embeddings": None}, "m", True)
    assert (cfg.output.output_rows_shift, cfg.snippets.snippet_num, cfg.output.output_embeddings.value) == (
        "auto", 25, "auto")
    base = RunConfig.from_flags(snippet_num=5, seed=7)
    cfg = _config(base, {"snippet_num": None}, "m", True)
    assert (cfg.snippets.snippet_num, cfg.train.seed) == (25, 7)
