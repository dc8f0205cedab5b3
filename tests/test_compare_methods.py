"""scripts/compare_methods.py end to end on the tiny model (two methods, toy corpus)."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_compare_methods_toy(tmp_path, toy_model_dir, toy_corpus, cache_dir):
    words = tmp_path / "words.txt"
    words.write_text(" hepatotoxicity\n nephrotoxicity\n")
    common = {"snippet_num": 4, "min_snippets": 2, "heldout_snippet_num": 1, "snippet_len": 12,
              "cache_dir": str(cache_dir), "token_distillation_batch_size": 4}
    cmd = [sys.executable, str(ROOT / "scripts" / "compare_methods.py"), "--model_path", str(toy_model_dir),
           "--new_tokens_source", str(words), "--dataset_path", str(toy_corpus),
           "--methods", "mean=subtoken-mean,random,td=token_distillation",
           "--method_flags", json.dumps({"td": {"token_distillation_lr": 0.01}}),
           "--common_flags", json.dumps(common), "--heldout_fraction", "0.3", "--window_len", "12",
           "--windows_per_token", "3", "--definition_tokens", "3", "--device", "cpu",
           "--out_dir", str(tmp_path / "cmp"), "--docs_md", str(tmp_path / "docs" / "evaluation.md")]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads((tmp_path / "cmp" / "eval" / "evaluation.json").read_text())
    assert list(res["methods"]) == ["mean", "random", "td"]
    assert res["setup"]["excluded_training_docs"] == 0  # the split is disjoint
    rep = json.loads((tmp_path / "cmp" / "runs" / "td" / "report.json").read_text())
    assert rep["config"]["token_distillation_lr"] == 0.01 and rep["config"]["snippet_num"] == 4
    page = (tmp_path / "docs" / "evaluation.md").read_text()
    assert "| mean |" in page and "| td |" in page and (tmp_path / "docs" / "evaluation.png").is_file()
    assert "compare_methods.py" in page


def test_compare_methods_bad_label(tmp_path, toy_corpus):
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "compare_methods.py"), "--dataset_path", str(toy_corpus),
                        "--methods", "random", "--method_flags", '{"nope": {}}', "--out_dir", str(tmp_path)],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "--method_flags" in r.stderr
