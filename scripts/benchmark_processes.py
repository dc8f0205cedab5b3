#!/usr/bin/env python
"""Benchmark: the same run with 1, 2, ... processes (torchrun), each process limited to the same
number of threads, to measure what token sharding buys. A benchmark, not a test.

For each entry of ``--processes`` the whole tool (``apply_embedding_init.py``) runs under
``torchrun --standalone --nproc_per_node P`` with ``OMP_NUM_THREADS=--threads``, on the same model,
corpus and tokens, into a temporary output directory (removed afterwards). Reported per run: wall
seconds of the whole run, training seconds (the longest shard's, from report.json), steps per
process; and for every run after the first, its speed-up over the first (training and whole run)
and the largest difference of its trained rows from the first run's. Prints a JSON summary (also
written with ``--out``, replaced whole).

Examples:
  python scripts/benchmark_processes.py                       # 1 vs 2 CPU processes, 1 thread each
  python scripts/benchmark_processes.py --processes 1,2,4,8 --device cuda --threads 4 --num_words 64

On a CPU the processes share the machine's cores: with ``--threads 1`` and as many processes as
free cores the comparison is fair; other jobs on the same cores make the numbers noisy (run it on
a quiet machine, or say so beside the numbers). Bad input: one ``error:`` line, exit code 2.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data" / "pubmed_abstracts"


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--processes", default="1,2", help="comma-separated process counts; the first is the reference")
    ap.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of every process")
    ap.add_argument("--model_path", default="smollm2-135m")
    ap.add_argument("--dataset_path", default=str(SHARED / "abstracts.jsonl"))
    ap.add_argument("--words", default=str(ROOT / "new_tokens" / "biomedical_demo.txt"))
    ap.add_argument("--num_words", type=int, default=16, help="new tokens (the first of --words)")
    ap.add_argument("--snippet_num", type=int, default=8, help="training snippets per token")
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--batch_size", type=int, default=16)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--extra", default="", help="further flags for apply_embedding_init.py, space-separated")
    ap.add_argument("--out", default=None, help="also write the JSON result here")
    a = ap.parse_args(argv)
    try:
        a.process_list = [int(p) for p in a.processes.split(",") if p.strip()]
    except ValueError:
        a.process_list = []
    problems = []
    if not a.process_list or min(a.process_list) < 1:
        problems.append(f"--processes {a.processes!r}: give process counts >= 1, e.g. 1,2")
    if a.threads < 1:
        problems.append("--threads must be >= 1")
    for flag in ("dataset_path", "words"):
        if not Path(getattr(a, flag)).exists():
            problems.append(f"--{flag} {getattr(a, flag)}: no such file; pass an existing one")
    if problems:
        print("error: " + "; ".join(problems), file=sys.stderr)
        sys.exit(2)
    return a


def one_run(a: argparse.Namespace, nproc: int, work: Path) -> dict:
    """Run the tool with ``nproc`` processes into ``work/p<nproc>``; returns its measurements."""
    out = work / f"p{nproc}"
    words = work / "words.txt"
    flags = ["--model_path", a.model_path, "--dataset_path", a.dataset_path, "--new_tokens_source", str(words),
             "--num_new_tokens", str(a.num_words), "--snippet_num", str(a.snippet_num), "--min_snippets", "1",
             "--token_distillation_epochs", str(a.epochs), "--token_distillation_batch_size", str(a.batch_size),
             "--device", a.device, "--checkpoint_minutes", "0", "--out_path", str(out), *a.extra.split()]
    env = {**os.environ, "OMP_NUM_THREADS": str(a.threads), "MKL_NUM_THREADS": str(a.threads),
           "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           str(ROOT / "apply_embedding_init.py"), *flags]
    t0 = time.perf_counter()
    r = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        raise SystemExit(f"error: the run with {nproc} process(es) failed (exit {r.returncode}):\n{r.stderr[-3000:]}")
    rep = json.loads((out / "report.json").read_text())
    per = (rep.get("distributed") or {}).get("per_process") or [{"steps": rep["train_steps"],
                                                               "seconds": rep["train_seconds"]}]
    return {"processes": nproc, "wall_seconds": round(wall, 2), "train_seconds": round(rep["train_seconds"], 2),
            "steps_per_process": [p["steps"] for p in per], "mode": (rep.get("distributed") or {}).get("mode"),
            "tokens": len(rep["tokens"]), "train_snippets": sum(t["train_snippets"] for t in rep["tokens"]),
            "heldout_loss_final": rep["mean_heldout_loss_final"], "out": out}


def main(argv=None) -> dict:
    a = parse_args(argv)
    import torch
    from safetensors.torch import load_file

    with tempfile.TemporaryDirectory(prefix="td-bench-processes-") as tmp:
        work = Path(tmp)
        (work / "words.txt").write_text(Path(a.words).read_text(encoding="utf-8"), encoding="utf-8")
        runs = []
        for p in a.process_list:
            runs.append(one_run(a, p, work))
            print(f"{p} process(es): {runs[-1]['wall_seconds']:.1f} s wall, {runs[-1]['train_seconds']:.1f} s training",
                  file=sys.stderr)
        ref = runs[0]
        ref_rows = load_file(str(ref["out"] / "model.safetensors"))["model.embed_tokens.weight"]
        for r in runs:
            rows = load_file(str(r.pop("out") / "model.safetensors"))["model.embed_tokens.weight"]
            r["max_row_difference"] = float((rows.float() - ref_rows.float()).abs().max())
            if r is not ref:
                r["speedup_training"] = round(ref["train_seconds"] / max(r["train_seconds"], 1e-9), 2)
                r["speedup_wall"] = round(ref["wall_seconds"] / max(r["wall_seconds"], 1e-9), 2)
    result = {"date": time.strftime("%Y-%m-%d"), "threads_per_process": a.threads, "device": a.device,
              "model_path": a.model_path, "dataset_path": a.dataset_path, "num_words": a.num_words,
              "snippet_num": a.snippet_num, "epochs": a.epochs, "batch_size": a.batch_size,
              "cpu_count": os.cpu_count(), "load_average_at_end": list(os.getloadavg()) if hasattr(os, "getloadavg")
              else None, "torch": torch.__version__, "runs": runs}
    text = json.dumps(result, indent=1)
    print(text)
    for r in runs[1:]:
        print(f"speed-up of {r['processes']} over {ref['processes']} process(es): training {r['speedup_training']}x, "
              f"whole run {r['speedup_wall']}x (rows differ by at most {r['max_row_difference']:.2g})",
              file=sys.stderr)
    if a.out:
        tmp_out = Path(a.out).with_name(f".{Path(a.out).name}.tmp-{os.getpid()}")
        tmp_out.write_text(text + "\n", encoding="utf-8")
        os.replace(tmp_out, a.out)
    return result


if __name__ == "__main__":
    main()
