"""Llama-3-8B's width on CPU (issue "7-8B models on one GPU"): the whole command on a random model of
Llama-3-8B's shape cut to 2 layers (hidden 4096, vocab 128256, 32 / 8 heads, untied; 1.49B
parameters, a 2.8 GiB bf16 checkpoint), with the real SmolLM2 tokenizer. The saved checkpoint is
bf16, of the source's size, every original weight bit-identical; the process's peak RSS is within
20% of the memory plan the run logged.

The one slow test of the suite (about a minute and a half on an idle 2-core machine, 9 GiB of RAM).
"""

import os
import re
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))  # benchmark.SHAPES, gpu_check.save_random_checkpoint
WORDS = [" hepatotoxicity", " nephrotoxicity", " angiogenesis"]


def _llama8b_width(layers: int = 2) -> dict:
    """Llama-3-8B's shape (scripts/benchmark.py ``--shape llama8b``) with ``layers`` decoder layers."""
    from benchmark import SHAPES

    return dict(SHAPES["llama8b"], num_hidden_layers=layers)


def run_measured(args: list[str], cwd: Path, timeout: float = 600) -> tuple[int, str, int]:
    """Run ``args`` as a child process; (exit code, its stderr, its peak RSS in bytes).

    The peak comes from ``os.wait4`` on that child alone (Linux reports ``ru_maxrss`` in KiB), so
    no other process started by the test session is counted.
    """
    err_path = cwd / "stderr.txt"
    with open(err_path, "w") as err:
        p = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=err)
        timer = threading.Timer(timeout, p.kill)
        timer.start()
        try:
            _, status, usage = os.wait4(p.pid, 0)
        finally:
            timer.cancel()
    p.returncode = os.waitstatus_to_exitcode(status)
    return p.returncode, err_path.read_text(), usage.ru_maxrss * 1024


def _tensors(directory: Path) -> dict:
    """``{name: (file, dtype string)}`` over every safetensors file of a checkpoint directory."""
    from safetensors import safe_open

    out = {}
    for f in sorted(directory.glob("*.safetensors")):
        with safe_open(f, framework="pt") as st:
            for k in st.keys():
                out[k] = (f, st.get_slice(k).get_dtype())
    return out


def _load(f: Path, name: str) -> torch.Tensor:
    from safetensors import safe_open

    with safe_open(f, framework="pt") as st:
        return st.get_tensor(name)


@pytest.mark.skipif(sys.platform != "linux", reason="peak RSS of one child via os.wait4 (Linux units)")
def test_llama8b_width_cli_on_cpu(tmp_path, smollm_tokenizer, toy_corpus):
    import json

    from gpu_check import save_random_checkpoint

    src = tmp_path / "src"
    save_random_checkpoint(src, smollm_tokenizer, _llama8b_width(), dtype=torch.bfloat16)
    words = tmp_path / "words.txt"
    words.write_text("".join(w + "\n" for w in WORDS))
    out = tmp_path / "out"
    code, err, peak = run_measured(
        [sys.executable, str(ROOT / "apply_embedding_init.py"), "--model_path", str(src), "--new_tokens_source",
         str(words), "--dataset_path", str(toy_corpus), "--out_path", str(out), "--cache_dir", str(tmp_path / "cache"),
         "--device", "cpu", "--snippet_num", "4", "--min_snippets", "2", "--heldout_snippet_num", "2",
         "--heldout_fraction", "0.25", "--snippet_len", "16", "--token_distillation_epochs", "1",
         "--token_distillation_batch_size", "4"], tmp_path)
    assert code == 0, err[-3000:]
    plan = float(re.search(r"memory plan: ([0-9.]+) GiB", err).group(1)) * 2**30
    print(f"\npeak RSS {peak / 2**30:.2f} GiB, memory plan {plan / 2**30:.2f} GiB ({peak / plan - 1:+.1%})")
    assert abs(peak / plan - 1) <= 0.2, (peak / 2**30, plan / 2**30)

    rep = json.loads((out / "report.json").read_text())
    new_ids = [t["id"] for t in rep["tokens"]]
    assert len(new_ids) == len(WORDS) and rep["saved_dtype"] == "torch.bfloat16"
    before, after = _tensors(src), _tensors(out)
    assert set(after) == set(before) and {d for _, d in after.values()} == {"BF16"}
    rows_after = max(128256, len(smollm_tokenizer) + len(WORDS))  # the vocab grows by the new tokens only
    assert rep["model"]["vocab_rows_after"] == rows_after
    grown = (rows_after - 128256) * 4096 * 2 * 2  # input and output rows, bf16
    size = lambda d: sum(f.stat().st_size for f in d.glob("*.safetensors"))  # noqa: E731
    assert abs(size(out) - size(src) - grown) < 2**20  # headers aside

    keep = torch.ones(rows_after, dtype=torch.bool)
    keep[new_ids] = False
    for name, (f, _) in before.items():
        a, b = _load(f, name), _load(after[name][0], name)
        if name in ("model.embed_tokens.weight", "lm_head.weight"):
            assert b.shape == (rows_after, 4096)
            a, b = a[keep[: a.shape[0]]], b[: a.shape[0]][keep[: a.shape[0]]]
        assert torch.equal(a.view(torch.int16), b.view(torch.int16)), name  # bit for bit
    lm_new = _load(after["lm_head.weight"][0], "lm_head.weight")[new_ids]
    emb_new = _load(after["model.embed_tokens.weight"][0], "model.embed_tokens.weight")[new_ids]
    # the default for token_distillation: output rows fitted by distillation (from the subtoken mean), trained inputs
    assert rep["model"]["output_embeddings"] == "distill" and rep["output_rows_kl"] is not None
    assert lm_new.float().norm(dim=-1).min() > 0 and emb_new.float().norm(dim=-1).min() > 0
