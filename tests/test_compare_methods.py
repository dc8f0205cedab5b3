"""scripts/compare_methods.py end to end on the tiny model (two methods, toy corpus)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def test_compare_methods_toy(tmp_path, toy_model_dir, toy_corpus, cache_dir):
    words = tmp_path / "words.txt"
    words.write_text(" hepatotoxicity\n nephrotoxicity\n")
    common = {"snippet_num": 4, "min_snippets": 2, "heldout_snippet_num": 1, "snippet_len": 12,
              "cache_dir": str(cache_dir), "token_distillation_batch_size": 4}
    cmd = [sys.executable, str(ROOT / "scripts" / "compare_methods.py"), "--model_path", str(toy_model_dir),
           "--new_tokens_source", str(words), "--dataset_path", str(toy_corpus),
           "--methods", "mean=subtoken-mean,random,td=token_distillation,td1=token_distillation",
           "--method_flags", json.dumps({"td": {"token_distillation_lr": 0.01},
                                         "td1": {"token_distillation_epochs": 1}}),
           "--common_flags", json.dumps(common), "--heldout_fraction", "0.3", "--window_len", "12",
           "--windows_per_token", "3", "--definition_tokens", "3", "--device", "cpu",
           "--out_dir", str(tmp_path / "cmp"), "--docs_md", str(tmp_path / "docs" / "evaluation.md")]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads((tmp_path / "cmp" / "eval" / "evaluation.json").read_text())
    assert list(res["methods"]) == ["mean", "random", "td", "td1"]
    assert res["setup"]["excluded_training_docs"] == 0  # the split is disjoint
    rep = json.loads((tmp_path / "cmp" / "runs" / "td" / "report.json").read_text())
    assert rep["config"]["token_distillation_lr"] == 0.01 and rep["config"]["snippet_num"] == 4
    # td and td1 start from mean's rows: they read its held-out pass before training (--heldout_cache_dir)
    # instead of their own; random's rows are others
    rep0, rep1 = (json.loads((tmp_path / "cmp" / "runs" / lab / "report.json").read_text()) for lab in ("mean", "td1"))
    assert r.stderr.count("(--heldout_cache_dir: an earlier run") == 2
    assert rep0["mean_heldout_loss_init"] == rep["mean_heldout_loss_init"] == rep1["mean_heldout_loss_init"]
    assert rep1["mean_heldout_loss_final"] != rep["mean_heldout_loss_final"]
    page = (tmp_path / "docs" / "evaluation.md").read_text()
    assert "| mean |" in page and "| td |" in page and (tmp_path / "docs" / "evaluation.png").is_file()
    assert "compare_methods.py" in page


def test_compare_methods_bad_label(tmp_path, toy_corpus):
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "compare_methods.py"), "--dataset_path", str(toy_corpus),
                        "--methods", "random", "--method_flags", '{"nope": {}}', "--out_dir", str(tmp_path)],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "--method_flags" in r.stderr


def test_reuse_runs_resumes_an_interrupted_run(tmp_path, toy_model_dir, toy_corpus, cache_dir, monkeypatch):
    """``--reuse_runs`` continues a run that was stopped mid-training from its checkpoint (a long sweep
    cut by a SLURM time limit loses only the steps after the last checkpoint), keeps a finished run,
    and the resumed run ends with the same rows as one that was never stopped."""
    from safetensors.torch import load_file

    from tests.test_checkpoint import Interrupted, _interrupt_after
    from token_distillation import checkpoint as ckpt_mod
    from token_distillation.paths import only_checkpoints

    sys.path.insert(0, str(ROOT / "scripts"))
    import compare_methods

    words = tmp_path / "words.txt"
    words.write_text(" hepatotoxicity\n nephrotoxicity\n")
    common = {"snippet_num": 4, "min_snippets": 2, "heldout_snippet_num": 1, "snippet_len": 12,
              "cache_dir": str(cache_dir), "token_distillation_batch_size": 2, "checkpoint_every": 1,
              "teacher_cache_gib": 0, "output_embeddings": "subtoken-mean"}
    kw = dict(model_path=str(toy_model_dir), new_tokens_source=str(words), dataset_path=str(toy_corpus),
              methods="mean=subtoken-mean,td=token_distillation", common_flags=json.dumps(common),
              heldout_fraction=0.3, window_len=12, windows_per_token=2, definition_tokens=0, device="cpu",
              train_only=True)
    compare_methods.main(out_dir=str(tmp_path / "ref"), **kw)
    ref = json.loads((tmp_path / "ref" / "runs" / "td" / "report.json").read_text())
    assert ref["train_steps"] >= 3

    out = tmp_path / "cmp"
    with monkeypatch.context() as m:
        _interrupt_after(m, 2)
        with pytest.raises(Interrupted):
            compare_methods.main(out_dir=str(out), **kw)
    assert (out / "runs" / "mean" / "report.json").is_file() and only_checkpoints(out / "runs" / "td")
    mean_before = (out / "runs" / "mean" / "report.json").read_bytes()

    resumed = []
    real_restore = ckpt_mod.Checkpointer.restore
    monkeypatch.setattr(ckpt_mod.Checkpointer, "restore",
                        lambda self, *a: resumed.append(r := real_restore(self, *a)) or r)
    compare_methods.main(out_dir=str(out), reuse_runs=True, **kw)
    assert [r[0] for r in resumed] == [2]  # continued from the checkpoint of step 2, not from step 0
    assert (out / "runs" / "mean" / "report.json").read_bytes() == mean_before  # the finished run was kept
    rep = json.loads((out / "runs" / "td" / "report.json").read_text())
    assert rep["loss_curve"] == ref["loss_curve"] and rep["train_seconds_from_step"] == 0
    # its compare_seconds is the part after the resume, and the report says so (the docs page too)
    assert rep["compare_resumed"] is True and "compare_resumed" not in ref
    assert "compare_resumed" not in json.loads(mean_before)
    a = load_file(str(tmp_path / "ref" / "runs" / "td" / "model.safetensors"))["model.embed_tokens.weight"]
    b = load_file(str(out / "runs" / "td" / "model.safetensors"))["model.embed_tokens.weight"]
    assert torch.equal(a, b)
