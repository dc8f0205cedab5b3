"""Runs with 2 CPU processes (gloo) give the same rows as one process: data-parallel (paper recipe, same
global batch) and token-sharded (per-token recipe; more in test_sharding.py)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.test_pipeline import _toy_cfg
from token_distillation.config import ConfigError
from token_distillation.distributed import check_batch_divisible
from token_distillation.pipeline import run

ROOT = Path(__file__).resolve().parents[1]


def test_global_batch_must_split_over_processes(tmp_path, toy_model_dir, toy_corpus, cache_dir, monkeypatch):
    check_batch_divisible(16, 4)
    check_batch_divisible(5, 1)
    with pytest.raises(ConfigError, match="--token_distillation_batch_size 6 .* 4 processes; use a multiple of 4"):
        check_batch_divisible(6, 4)
    monkeypatch.setenv("WORLD_SIZE", "2")  # as torchrun sets it; refused before anything is loaded
    with pytest.raises(ConfigError, match="--token_distillation_batch_size 5"):  # the paper recipe is data-parallel
        run(_toy_cfg(tmp_path, toy_model_dir, toy_corpus, cache_dir, token_distillation_batch_size=5, recipe="paper"))


@pytest.mark.parametrize("recipe, steps", [("paper", 6), ("per-token", 14)])
def test_two_cpu_processes_match_one(tmp_path, toy_model_dir, toy_corpus, cache_dir, recipe, steps):
    # paper: 3 tokens x 7 snippets = 21 training snippets, global batch 10: batches of 10, 10, 1 per
    # epoch, so shards differ in length and in positions, and in the last batch process 1 has nothing.
    # per-token: one snippet of each of the 3 tokens per batch (7 batches per epoch), shards of 2 and 1.
    kw = dict(snippet_num=7, token_distillation_batch_size=10, token_distillation_epochs=2, device="cpu",
              recipe=recipe)
    single = run(_toy_cfg(tmp_path, toy_model_dir, toy_corpus, cache_dir, out_path=str(tmp_path / "one"), **kw))
    assert [t["train_snippets"] for t in single.report["tokens"]] == [7, 7, 7]
    assert single.report["train_steps"] == steps

    cfg = _toy_cfg(tmp_path, toy_model_dir, toy_corpus, cache_dir, out_path=str(tmp_path / "two"),
                   checkpoint_every=2, **kw)
    flags = [f"--{k}={v}" for k, v in cfg.to_dict().items() if v != ""]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    env.pop("WORLD_SIZE", None)
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        str(ROOT / "apply_embedding_init.py"), *flags],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stderr.count("saved extended model") == 1  # main process only
    two = tmp_path / "two"
    rep = json.loads((two / "report.json").read_text())
    assert rep["processes"] == 2 and rep["train_steps"] == steps
    # the per-token recipe shards the tokens (one token's 14 updates on one process, two on the other)
    assert rep["distributed"]["mode"] == ("token-sharded" if recipe == "per-token" else "data-parallel")
    assert sorted(p.name for p in two.iterdir()) == sorted(p.name for p in single.out_path.iterdir())
    a = load_file(str(single.out_path / "model.safetensors"))["model.embed_tokens.weight"]
    b = load_file(str(two / "model.safetensors"))["model.embed_tokens.weight"]
    n_orig = a.shape[0] - 3
    assert torch.equal(a[:n_orig], b[:n_orig])
    assert single.report["mean_heldout_loss_final"] < single.report["mean_heldout_loss_init"]  # rows did train
    torch.testing.assert_close(b[n_orig:], a[n_orig:], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(torch.tensor(rep["loss_curve"]), torch.tensor(single.report["loss_curve"]),
                               rtol=1e-4, atol=1e-6)
