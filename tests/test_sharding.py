"""Token sharding (per-token recipe, several CPU processes with gloo): each process trains its own
tokens with no communication per step; the saved rows equal the one-process run's."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.test_pipeline import _toy_cfg
from token_distillation.checkpoint import check_resumable, shard_prefix
from token_distillation.config import ConfigError, LossMethod, Recipe, StoppingCondition
from token_distillation.distributed import assign_tokens, check_distributable
from token_distillation.paths import CHECKPOINT_MARKER
from token_distillation.pipeline import run

ROOT = Path(__file__).resolve().parents[1]
MSE = (LossMethod.MSE_ON_HIDDENS,)
# 3 tokens x 7 training snippets, batches of 10 (one snippet of each of the process's tokens), 2 epochs
KW = dict(snippet_num=7, token_distillation_batch_size=10, token_distillation_epochs=2, device="cpu")
# float rounding only: a process's batches hold other tokens than the one-process run's (other
# padding and shared-prefix lengths); measured differences on this model: <= 3e-9
ATOL, RTOL = 1e-6, 1e-5


def test_assign_tokens_balanced_and_deterministic():
    assert assign_tokens([25, 25, 25, 25], 2) == [[0, 2], [1, 3]]
    assert assign_tokens([5, 30, 10, 10, 5], 2) == [[1], [0, 2, 3, 4]]  # 30 vs 30
    assert assign_tokens([7, 7, 7], 4) == [[0], [1], [2], []]  # a process may get no token
    shards = assign_tokens(list(range(1, 101)), 8)
    assert sorted(t for s in shards for t in s) == list(range(100))
    loads = [sum(t + 1 for t in s) for s in shards]
    assert max(loads) - min(loads) <= 100  # within the largest token
    assert shards == assign_tokens(list(range(1, 101)), 8)
    with pytest.raises(ValueError):
        assign_tokens([1], 0)


def test_which_runs_are_sharded_and_which_are_refused():
    common = dict(trains_original=False, snippets_per_update=1, batch_size=16, world_size=2)
    assert check_distributable(Recipe.PER_TOKEN, MSE, StoppingCondition.EPOCHS, **common)
    assert not check_distributable(Recipe.PER_TOKEN, MSE, StoppingCondition.EPOCHS, **{**common, "world_size": 1})
    assert not check_distributable(Recipe.PAPER, MSE, StoppingCondition.EPOCHS, **common)
    assert not check_distributable(Recipe.PER_TOKEN, MSE, StoppingCondition.MAX_STEPS, **common)
    # sharding needs no divisible batch; data parallelism does
    assert check_distributable(Recipe.PER_TOKEN, MSE, StoppingCondition.EPOCHS, **{**common, "batch_size": 5})
    with pytest.raises(ConfigError, match="--token_distillation_batch_size 5"):
        check_distributable(Recipe.PAPER, MSE, StoppingCondition.EPOCHS, **{**common, "batch_size": 5})
    with pytest.raises(ConfigError, match="--snippets_per_update 4 with --stopping_condition max_steps .* use "
                                          "--stopping_condition epochs"):
        check_distributable(Recipe.PER_TOKEN, MSE, StoppingCondition.MAX_STEPS, **{**common, "snippets_per_update": 4})


def test_resume_refuses_another_number_of_shards(tmp_path):
    d = tmp_path / "checkpoints"
    d.mkdir()
    (d / CHECKPOINT_MARKER).write_text("{}")
    for r in range(2):
        torch.save({"fingerprint": {"model_identity": "m"}}, d / f"{shard_prefix(r, 2)}step-00000003.pt")
    check_resumable(d, {}, "m", shards=2)
    with pytest.raises(ConfigError, match="written by 2 processes sharding the tokens, not by 4 .* launch the same"):
        check_resumable(d, {}, "m", shards=4)
    with pytest.raises(ConfigError, match="written by 2 processes sharding the tokens, not by this launch"):
        check_resumable(d, {}, "m", shards=0)


def _launch(tmp_path, cfg, nproc: int, env_extra=None):
    flags = [f"--{k}={v}" for k, v in cfg.to_dict().items() if v != ""]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **(env_extra or {})}
    env.pop("WORLD_SIZE", None)
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                           str(nproc), str(ROOT / "apply_embedding_init.py"), *flags],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)


def _rows(out: Path) -> torch.Tensor:
    return load_file(str(out / "model.safetensors"))["model.embed_tokens.weight"]


@pytest.fixture(scope="module")
def single(tmp_path_factory, toy_model_dir, toy_corpus, cache_dir):
    tmp = tmp_path_factory.mktemp("single")
    return run(_toy_cfg(tmp, toy_model_dir, toy_corpus, cache_dir, out_path=str(tmp / "one"), **KW))


def _assert_same_rows(single, out: Path):
    a, b = _rows(single.out_path), _rows(out)
    n_orig = a.shape[0] - 3
    assert torch.equal(a[:n_orig], b[:n_orig])
    torch.testing.assert_close(b[n_orig:], a[n_orig:], rtol=RTOL, atol=ATOL)


def _assert_same_heldout(single, rep: dict) -> None:
    """Sharded held-out evaluation gives the one-process values (per token, same snippets)."""
    for t1, tn in zip(single.report["tokens"], rep["tokens"]):
        assert tn["heldout_loss_init"] == pytest.approx(t1["heldout_loss_init"], rel=1e-5)
        assert tn["heldout_loss_final"] == pytest.approx(t1["heldout_loss_final"], rel=1e-4)
        assert tn["heldout_argmax_positions"] == t1["heldout_argmax_positions"]
    assert rep["new_token_argmax"]["final"]["positions"] == single.report["new_token_argmax"]["final"]["positions"]


def test_sharded_rows_equal_single_process_with_no_communication_per_step(
        tmp_path, toy_model_dir, toy_corpus, cache_dir, single):
    """4 processes, 3 tokens (one has none); the 2-process split ([2, 1] tokens) is checked by the
    slow-process test below."""
    nproc = 4
    cfg = _toy_cfg(tmp_path, toy_model_dir, toy_corpus, cache_dir, out_path=str(tmp_path / "n"), **KW)
    r = _launch(tmp_path, cfg, nproc)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stderr.count("saved extended model") == 1  # the main process saves
    out = tmp_path / "n"
    rep = json.loads((out / "report.json").read_text())
    info = rep["distributed"]
    assert rep["processes"] == nproc and info["mode"] == "token-sharded"
    per = info["per_process"]
    # 3 tokens: one or two per process (the fourth process of 4 has none); every token's 14 updates
    assert [p["tokens"] for p in per] == [1, 1, 1, 0]
    assert [p["steps"] for p in per] == [14, 14, 14, 0]
    assert all(p["communication_during_training"] == 0 for p in per)  # no collective, no wait, per step
    _assert_same_rows(single, out)
    _assert_same_heldout(single, rep)


def test_a_slow_process_does_not_block_or_time_out_the_others(tmp_path, toy_model_dir, toy_corpus, cache_dir, single):
    # process 1 sleeps 0.7 s after each of its 14 steps (~10 s); process 0 finishes long before and
    # waits for the gather, which polls the store: a collective timeout of 6 s is never hit
    cfg = _toy_cfg(tmp_path, toy_model_dir, toy_corpus, cache_dir, out_path=str(tmp_path / "slow"),
                   process_group_timeout_minutes=0.1, **KW)
    r = _launch(tmp_path, cfg, 2, {"TOKEN_DISTILLATION_FAULT": "1:sleep=0.7"})
    assert r.returncode == 0, r.stderr[-3000:]
    rep = json.loads((tmp_path / "slow" / "report.json").read_text())
    per = rep["distributed"]["per_process"]
    assert per[1]["seconds"] > 6 > per[0]["seconds"]
    assert [p["tokens"] for p in per] == [2, 1] and [p["steps"] for p in per] == [14, 14]
    assert all(p["communication_during_training"] == 0 for p in per)
    _assert_same_rows(single, tmp_path / "slow")
    _assert_same_heldout(single, rep)


def test_a_killed_process_fails_the_run_clearly_and_resume_continues(tmp_path, toy_model_dir, toy_corpus, cache_dir,
                                                                     single):
    cfg = _toy_cfg(tmp_path, toy_model_dir, toy_corpus, cache_dir, out_path=str(tmp_path / "k"), checkpoint_every=2,
                   **KW)
    r = _launch(tmp_path, cfg, 2, {"TOKEN_DISTILLATION_FAULT": "1:kill@5"})
    assert r.returncode != 0
    assert "Signal 9 (SIGKILL)" in r.stderr  # the launcher names the process that died
    assert "rerun the same command with --resume to continue" in r.stderr  # the others checkpoint and stop
    ckpts = sorted(p.name for p in (tmp_path / "k" / "checkpoints").glob("shard-*.pt"))
    assert "shard-001-of-002-step-00000004.pt" in ckpts  # the killed process's last checkpoint
    assert not (tmp_path / "k" / "model.safetensors").exists()
    resume = _toy_cfg(tmp_path, toy_model_dir, toy_corpus, cache_dir, out_path=str(tmp_path / "k"), checkpoint_every=2,
                      resume=True, **KW)
    r = _launch(tmp_path, resume, 2)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed from" in r.stderr  # (the main process logs it; process 1 resumes from its step 4)
    assert "held-out measures before training read from" in r.stderr  # the main process wrote them, all read them
    _assert_same_rows(single, tmp_path / "k")
    rep = json.loads((tmp_path / "k" / "report.json").read_text())
    for t1, t2 in zip(single.report["tokens"], rep["tokens"]):
        assert t2["heldout_loss_init"] == pytest.approx(t1["heldout_loss_init"], rel=1e-5)
    assert not (tmp_path / "k" / "checkpoints").exists()


def test_generated_snippets_are_written_by_each_process_for_its_tokens(tmp_path, toy_model_dir, cache_dir):
    # no corpus: the model writes the snippets; each of 2 processes writes those of its tokens
    words = tmp_path / "w.txt"
    words.write_text(" hepatotoxicity\n nephrotoxicity\n angiogenesis\n")
    kw = dict(model_path=str(toy_model_dir), cache_dir=str(cache_dir), new_tokens_source=str(words), snippet_num=3,
              heldout_snippet_num=1, min_snippets=2, snippet_len=10, token_distillation_batch_size=4,
              token_distillation_epochs=1, device="cpu", use_generated_snippets=True)
    from token_distillation.config import RunConfig

    one = run(RunConfig.from_flags(out_path=str(tmp_path / "one"), **kw))
    r = _launch(tmp_path, RunConfig.from_flags(out_path=str(tmp_path / "two"), **kw), 2)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "generating snippets for 2 of 3 tokens on process 0 of 2" in r.stderr
    rep = json.loads((tmp_path / "two" / "report.json").read_text())
    assert [t["train_snippets"] for t in rep["tokens"]] == [3, 3, 3]
    for t1, t2 in zip(one.report["tokens"], rep["tokens"]):  # same snippets: same held-out loss before training
        assert t2["heldout_loss_init"] == pytest.approx(t1["heldout_loss_init"], rel=1e-5)
    a, b = _rows(one.out_path), _rows(tmp_path / "two")
    torch.testing.assert_close(b, a, rtol=RTOL, atol=ATOL)


@pytest.mark.integration
def test_bundled_model_two_processes_equal_one(tmp_path):
    """Real model (SmolLM2-135M), real corpus, 4 words on 2 CPU processes: the rows of one process."""
    from tests.conftest import require_shared
    from token_distillation.config import RunConfig

    data = require_shared() / "abstracts_small.jsonl"
    words = tmp_path / "w.txt"
    words.write_text(" missense\n homozygous\n heterozygous\n haplotype\n")
    kw = dict(new_tokens_source=str(words), dataset_path=str(data), snippet_num=4, heldout_snippet_num=2,
              min_snippets=3, snippet_len=24, token_distillation_batch_size=8, heldout_fraction=0.2,
              token_distillation_epochs=1, device="cpu")
    one = run(RunConfig.from_flags(out_path=str(tmp_path / "one"), **kw))
    r = _launch(tmp_path, RunConfig.from_flags(out_path=str(tmp_path / "two"), **kw), 2)
    assert r.returncode == 0, r.stderr[-3000:]
    rep = json.loads((tmp_path / "two" / "report.json").read_text())
    assert rep["distributed"]["mode"] == "token-sharded" and [p["tokens"] for p in rep["distributed"]["per_process"]] == [2, 2]
    a, b = _rows(one.out_path), _rows(tmp_path / "two")
    n = a.shape[0] - len(one.report["tokens"])
    assert torch.equal(a[:n], b[:n])
    # float rounding (other batches per process): measured up to 1.1e-6 here (4.5e-7 with 16 words)
    torch.testing.assert_close(b[n:], a[n:], rtol=1e-4, atol=5e-6)


def test_top_up_snippets_are_generated_by_each_process(tmp_path, toy_model_dir, toy_corpus, cache_dir):
    # " zzqqxx" never occurs in the corpus: generated snippets fill it in, on the process that owns it
    from token_distillation.config import RunConfig

    words = tmp_path / "w.txt"
    words.write_text(" hepatotoxicity\n nephrotoxicity\n zzqqxx\n")
    kw = dict(model_path=str(toy_model_dir), dataset_path=str(toy_corpus), cache_dir=str(cache_dir),
              new_tokens_source=str(words), snippet_num=4, heldout_snippet_num=2, min_snippets=3, snippet_len=12,
              heldout_fraction=0.25, token_distillation_batch_size=4, token_distillation_epochs=1, device="cpu",
              snippet_source="corpus-then-generated")
    one = run(RunConfig.from_flags(out_path=str(tmp_path / "one"), **kw))
    r = _launch(tmp_path, RunConfig.from_flags(out_path=str(tmp_path / "two"), **kw), 2)
    assert r.returncode == 0, r.stderr[-3000:]
    rep = json.loads((tmp_path / "two" / "report.json").read_text())
    assert rep["snippets"]["source"] == "corpus-then-generated"
    assert [t["snippet_source"] for t in rep["tokens"]] == [t["snippet_source"] for t in one.report["tokens"]] \
        == ["corpus", "corpus", "generated"]
    for t1, t2 in zip(one.report["tokens"], rep["tokens"]):
        assert t2["heldout_loss_init"] == pytest.approx(t1["heldout_loss_init"], rel=1e-5)
    torch.testing.assert_close(_rows(tmp_path / "two"), _rows(one.out_path), rtol=RTOL, atol=ATOL)


def test_distilled_output_rows_are_sharded_too(tmp_path, toy_model_dir, toy_corpus, cache_dir):
    """--output_embeddings distill under token sharding: each process fits its own tokens' output rows;
    the gathered rows and the per-token binary KL equal the one-process run's, and so do the held-out
    text NLL per shift (each process scores part of the snippets) and the shift heldout applies."""
    kw = {**KW, "output_embeddings": "distill", "token_distillation_epochs": 1, "output_rows_shift": "heldout"}
    one = run(_toy_cfg(tmp_path, toy_model_dir, toy_corpus, cache_dir, out_path=str(tmp_path / "one"), **kw))
    r = _launch(tmp_path, _toy_cfg(tmp_path, toy_model_dir, toy_corpus, cache_dir, out_path=str(tmp_path / "two"), **kw), 2)
    assert r.returncode == 0, r.stderr[-3000:]
    a = load_file(str(one.out_path / "model.safetensors"))["lm_head.weight"]
    b = load_file(str(tmp_path / "two" / "model.safetensors"))["lm_head.weight"]
    n_orig = a.shape[0] - 3
    assert torch.equal(a[:n_orig], b[:n_orig]) and not torch.equal(a[n_orig:], torch.zeros_like(a[n_orig:]))
    torch.testing.assert_close(b[n_orig:], a[n_orig:], rtol=1e-4, atol=1e-5)
    rep = json.loads((tmp_path / "two" / "report.json").read_text())
    for t1, t2 in zip(one.report["tokens"], rep["tokens"]):
        assert t2["output_kl_heldout_final"] == pytest.approx(t1["output_kl_heldout_final"], rel=1e-3)
    s1, s2 = one.report["output_rows_shift"], rep["output_rows_shift"]
    assert s2["heldout_text_positions"] == s1["heldout_text_positions"] > 0
    assert s2["applied"] == s1["applied"] == s1["best_heldout"]
    # each process's documents are gathered: the paired gain over them is the one-process run's
    assert s2["best_heldout_gain_se"] == pytest.approx(s1["best_heldout_gain_se"], rel=1e-3)
    for k, v in s1["heldout_text_nll"].items():
        assert s2["heldout_text_nll"][k] == pytest.approx(v, rel=1e-4)
