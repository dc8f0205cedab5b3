#!/usr/bin/env python
"""GPU check of an 8B-shaped run: speed and peak GPU memory against the memory plan. No download.

Builds a random Llama of ``--shape`` (default ``llama8b``: Llama-3.1-8B's shape, 32 layers, from
scripts/benchmark.py's ``SHAPES``) on the device, saves it as a bf16 safetensors checkpoint with the
real tokenizer of the bundled SmolLM2 model, writes a synthetic corpus in which each of
``--num_tokens`` made-up words (e.g. " hepatomegaly") occurs in its own documents, and runs the
whole pipeline (``token_distillation.pipeline.run``, as ``apply_embedding_init.py`` does) in this
process on that checkpoint. Then prints:

- seconds of training per 1,000 new tokens at ``--snippets`` snippets per token, extrapolated
  linearly from the ``--num_tokens`` trained (training only: loading and saving the model happen
  once per run and are printed separately);
- the peak GPU memory of the run (``torch.cuda.max_memory_allocated``, from after the random model
  was saved) beside the memory plan the run logged.

``bash scripts/gpu_check.sh`` runs it with the defaults (40 tokens x 25 snippets; a few minutes on an
H200, two 15 GiB checkpoints on disk under ``--work_dir``). Without a CUDA device it exits with
code 2 and one ``error:`` line, unless ``--cpu_smoke`` is given: a tiny shape on CPU (seconds), for the
tests; the memory figure is then the process's peak RSS beside the host plan.

Examples:
  bash scripts/gpu_check.sh
  python scripts/gpu_check.py --batch_size auto --out gpu_check.json
  python scripts/gpu_check.py --cpu_smoke
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

if __name__ == "__main__":  # no download (set before transformers is imported; not when imported by the tests)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchmark import SHAPES  # noqa: E402
from token_distillation.config import ConfigError  # noqa: E402

GIB = 2**30
#: made-up words: a prefix and a suffix (the bundled tokenizer splits every one into 2+ subtokens)
PREFIXES = ["hepato", "nephro", "cardio", "neuro", "osteo", "myelo", "angio", "dermato", "gastro", "pneumo",
            "hemato", "lympho", "cysto", "arthro", "broncho", "chondro", "cranio", "cyto", "fibro", "glosso"]
SUFFIXES = ["megaly", "pathy", "genesis", "plasty", "sclerosis", "stasis", "lysis", "trophy", "malacia", "toxicity"]
#: the check's defaults on a GPU, and with --cpu_smoke
DEFAULTS = dict(shape="llama8b", num_tokens=40, snippets=25, heldout=5, snippet_len=50)
SMOKE = dict(shape="tiny", num_tokens=3, snippets=4, heldout=2, snippet_len=16)
FILLER = ("the of patients were and in with a was treated study results showed that to for after group "
          "compared dose levels clinical cells observed significant increase during analysis this these "
          "response risk data effect two years months we found higher lower among control trial mice").split()


def save_random_checkpoint(path: Path, tokenizer, shape: dict, *, device: str = "cpu",
                           dtype: torch.dtype = torch.bfloat16, seed: int = 0) -> int:
    """Save a random Llama of ``shape`` as a safetensors checkpoint in ``dtype`` with ``tokenizer``.

    The model is built on the meta device and filled in place on ``device`` in ``dtype`` (matrices
    N(0, 0.02), norms 1), so no fp32 copy is ever made. The vocabulary is at least the tokenizer's.

    Args:
        path: the checkpoint directory (created).
        tokenizer: saved beside the weights; its BOS/EOS/pad ids go into the config.
        shape: ``LlamaConfig`` keyword arguments (e.g. ``SHAPES["llama8b"]``).

    Returns:
        the number of parameters.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    shape = dict(shape, vocab_size=max(int(shape["vocab_size"]), len(tokenizer)))
    cfg = LlamaConfig(**shape, max_position_embeddings=2048, bos_token_id=tokenizer.bos_token_id,
                      eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg).to(dtype)
    model.to_empty(device=device)
    if cfg.tie_word_embeddings:  # to_empty gives the output layer its own storage: tie it again
        model.tie_weights()
    g = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(1.0) if p.ndim == 1 else p.normal_(0.0, 0.02, generator=g)
    n = sum(p.numel() for p in model.parameters())
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    del model
    return n


def made_up_words(tokenizer, n: int) -> list[str]:
    """``n`` space-prefixed made-up words that are not in the vocabulary and split into 2+ subtokens.

    Raises:
        ConfigError: fewer than ``n`` such words exist (at most 200).
    """
    from token_distillation.tokenization import subtoken_ids

    words = [f" {p}{s}" for s in SUFFIXES for p in PREFIXES]
    ok = [w for w in words if len(subtoken_ids(tokenizer, w)) >= 2][:n]
    if len(ok) < n:
        raise ConfigError(f"--num_tokens {n}: only {len(ok)} made-up words split into subtokens; use --num_tokens "
                          f"{len(ok)} or less")
    return ok


def write_corpus(path: Path, words: list[str], docs_per_word: int, seed: int = 0) -> None:
    """A JSON Lines corpus: each document holds one word with about 20 filler words before it and
    60 after (room for a 50-token snippet with a quarter of left context)."""
    import random

    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as f:
        for i in range(docs_per_word):
            for j, w in enumerate(words):
                text = " ".join(rng.choices(FILLER, k=20)) + w + " " + " ".join(rng.choices(FILLER, k=60)) + "."
                f.write(json.dumps({"id": f"d{i}-{j}", "text": text[0].upper() + text[1:]}) + "\n")


def run_flags(args, work: Path) -> dict:
    """The flags of the run (as ``apply_embedding_init.py`` takes them) on the files in ``work``."""
    return dict(model_path=str(work / "model"), new_tokens_source=str(work / "words.txt"),
                dataset_path=str(work / "corpus.jsonl"), out_path=str(work / "out"), cache_dir=str(work / "cache"),
                device="cpu" if args.cpu_smoke else "cuda", snippet_num=args.snippets,
                min_snippets=min(5, args.snippets),
                heldout_snippet_num=args.heldout, heldout_fraction=0.2, snippet_len=args.snippet_len,
                token_distillation_batch_size=args.batch_size, target_layer=args.target_layer, seed=args.seed,
                checkpoint_minutes=0)


def check_args(args) -> None:
    """Check the flags before anything is built or loaded.

    Raises:
        ConfigError: no CUDA device without ``--cpu_smoke``, a count below its minimum, a
            ``--batch_size`` that is neither an integer >= 1 nor auto, a bad ``--work_dir`` or ``--out``.
    """
    from token_distillation.paths import replace_file

    if not args.cpu_smoke and not torch.cuda.is_available():
        raise ConfigError("no CUDA device: this check needs an NVIDIA GPU (torch.cuda.is_available() is False with "
                          f"torch {torch.__version__}); pass --cpu_smoke for the tiny CPU run")
    for flag, low in (("num_tokens", 1), ("snippets", 1), ("heldout", 1), ("snippet_len", 8)):
        if getattr(args, flag) < low:
            raise ConfigError(f"--{flag} must be >= {low}, not {getattr(args, flag)}")
    if args.layers is not None and args.layers < 1:
        raise ConfigError(f"--layers must be >= 1, not {args.layers}")
    if args.batch_size != "auto" and not args.batch_size.isdigit():
        raise ConfigError(f"--batch_size {args.batch_size!r}: expected an integer >= 1, auto, or 0 (the tool's default)")
    from token_distillation.config import RunConfig

    paths = ("model_path", "new_tokens_source", "dataset_path", "out_path", "cache_dir")  # written later
    RunConfig.from_flags(**{k: v for k, v in run_flags(args, Path(".")).items() if k not in paths})
    layers = args.layers or SHAPES[args.shape]["num_hidden_layers"]
    if not (1 <= args.target_layer <= layers or -layers <= args.target_layer <= -1):
        raise ConfigError(f"--target_layer {args.target_layer} out of range for {layers} layers; use 1..{layers} or "
                          f"-1..-{layers}")
    if args.work_dir and Path(args.work_dir).expanduser().exists() and any(Path(args.work_dir).expanduser().iterdir()):
        raise ConfigError(f"--work_dir {args.work_dir} is not empty; pass a new or empty directory")
    if args.out:
        replace_file(args.out, flag="--out")


def _clean(work: Path, created: bool) -> None:
    """Remove what the check wrote into ``work`` (and ``work`` itself when the check created it);
    nothing else is touched."""
    for name in ("model", "out", "cache", "words.txt", "corpus.jsonl"):
        p = work / name
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        elif p.exists():
            p.unlink()
    if created:
        try:
            work.rmdir()  # only when empty
        except OSError:
            pass


def _gpu_setup(args) -> tuple[torch.device, str]:
    if args.cpu_smoke:
        return torch.device("cpu"), "cpu"
    dev = torch.device("cuda")
    return dev, torch.cuda.get_device_name(dev)


def saved_dtypes(model_dir: Path) -> dict[str, int]:
    """Tensors per dtype in the safetensors files of ``model_dir`` (headers only; nothing is loaded),
    e.g. ``{"BF16": 291}``: a bf16 source must come back all BF16 (issue 18, point 1)."""
    counts: dict[str, int] = {}
    for f in sorted(model_dir.glob("*.safetensors")):
        with open(f, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            header = json.loads(fh.read(n))
        for name, meta in header.items():
            if name != "__metadata__":
                counts[meta["dtype"]] = counts.get(meta["dtype"], 0) + 1
    return counts


def _peak(device: torch.device) -> dict:
    if device.type == "cuda":
        return {"peak_gpu_allocated_gib": torch.cuda.max_memory_allocated(device) / GIB,
                "peak_gpu_reserved_gib": torch.cuda.max_memory_reserved(device) / GIB}
    import resource

    return {"peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB}  # Linux: KiB


def run_check(args, work: Path) -> dict:
    """Build, save, run; the measured figures (see the module docstring)."""
    from transformers import LlamaConfig

    from token_distillation.cli import configure_logging
    from token_distillation.config import RunConfig
    from token_distillation.memory import count_parameters
    from token_distillation.models import default_cache_root, load_tokenizer, resolve_model_source
    from token_distillation.pipeline import run

    configure_logging()
    device, name = _gpu_setup(args)
    tokenizer = load_tokenizer(resolve_model_source(args.tokenizer), default_cache_root())
    shape = dict(SHAPES[args.shape])
    if args.layers:
        shape["num_hidden_layers"] = args.layers
    one = 2 * count_parameters(LlamaConfig(**dict(shape, vocab_size=max(shape["vocab_size"], len(tokenizer)))))
    free = shutil.disk_usage(work).free
    if free < 2.1 * one:  # the random checkpoint and the extended model, bf16
        raise ConfigError(f"--work_dir {work}: {free / GIB:.1f} GiB free, the check writes two bf16 checkpoints of "
                          f"{one / GIB:.1f} GiB; pass --work_dir on a larger disk")
    words = made_up_words(tokenizer, args.num_tokens)  # before the model is built: may refuse --num_tokens
    t = time.perf_counter()
    n_params = save_random_checkpoint(work / "model", tokenizer, shape, device=device.type, seed=args.seed)
    build_s = time.perf_counter() - t
    (work / "words.txt").write_text("".join(w + "\n" for w in words), encoding="utf-8")
    write_corpus(work / "corpus.jsonl", words, docs_per_word=2 * (args.snippets + args.heldout), seed=args.seed)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    cfg = RunConfig.from_flags(**run_flags(args, work))
    t = time.perf_counter()
    rep = run(cfg).report
    run_s = time.perf_counter() - t
    dtypes = {"source": saved_dtypes(work / "model"), "saved": saved_dtypes(work / "out")}
    trained = len(rep["tokens"])
    per_token = sum(x["train_snippets"] for x in rep["tokens"]) / max(1, trained)
    plan = rep["memory_plan_gib"]
    res = {"device": name, "torch": torch.__version__, "shape": args.shape, "layers": shape["num_hidden_layers"],
           "parameters": n_params, "tokens_trained": trained, "train_snippets_per_token": per_token,
           "snippet_len": args.snippet_len, "batch_size": rep["train_batch_size"],
           "epochs": rep["config"]["token_distillation_epochs"], "train_steps": rep["train_steps"],
           "train_seconds": rep["train_seconds"],
           "train_seconds_per_1000_tokens_extrapolated": rep["train_seconds"] * 1000 / max(1, trained),
           "run_seconds": run_s, "build_and_save_random_model_seconds": build_s,
           **_peak(device), "plan_gib": plan["total"], "plan": plan,
           "heldout_loss": [rep["mean_heldout_loss_init"], rep["mean_heldout_loss_final"]],
           "tensor_dtypes": dtypes}
    measured = res.get("peak_gpu_allocated_gib", res.get("peak_rss_gib"))
    res["peak_over_plan"] = measured / plan["total"] if plan["total"] else None
    return res


def summary(res: dict) -> str:
    """The lines printed at the end (labelled; per 1,000 tokens is an extrapolation)."""
    mem = ("peak GPU memory allocated (torch.cuda.max_memory_allocated) "
           f"{res['peak_gpu_allocated_gib']:.2f} GiB (reserved {res['peak_gpu_reserved_gib']:.2f})"
           if "peak_gpu_allocated_gib" in res else f"peak RSS of this process {res['peak_rss_gib']:.2f} GiB")
    return "\n".join([
        f"gpu_check on {res['device']} (torch {res['torch']}): random {res['shape']} shape, {res['layers']} layers, "
        f"{res['parameters'] / 1e9:.2f}B parameters, bf16",
        f"trained {res['tokens_trained']} new tokens x {res['train_snippets_per_token']:.1f} snippets of "
        f"{res['snippet_len']} tokens, batch {res['batch_size']}, {res['epochs']} epochs: {res['train_steps']} steps "
        f"in {res['train_seconds']:.1f} s",
        f"training seconds per 1,000 new tokens at batch {res['batch_size']} (extrapolated linearly from "
        f"{res['tokens_trained']} tokens): {res['train_seconds_per_1000_tokens_extrapolated']:.0f} s",
        f"whole run (load, held-out passes, training, save) {res['run_seconds']:.1f} s; building and saving the "
        f"random model {res['build_and_save_random_model_seconds']:.1f} s (not part of the run)",
        f"{mem}; memory plan {res['plan_gib']:.2f} GiB (peak / plan = {res['peak_over_plan']:.2f})",
        f"tensors per dtype: source checkpoint {res['tensor_dtypes']['source']}, saved model "
        f"{res['tensor_dtypes']['saved']}",
    ])


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=sorted(SHAPES), help="random Llama shape (benchmark.py; default llama8b)")
    ap.add_argument("--layers", type=int, default=None, help="decoder layers (default: the shape's)")
    ap.add_argument("--tokenizer", default="smollm2-135m", help="tokenizer source (default: the bundled SmolLM2)")
    ap.add_argument("--num_tokens", type=int, help="new tokens trained (default 40)")
    ap.add_argument("--snippets", type=int, help="training snippets per token (default 25)")
    ap.add_argument("--heldout", type=int, help="held-out snippets per token (default 5)")
    ap.add_argument("--snippet_len", type=int, help="tokens per snippet (default 50)")
    ap.add_argument("--batch_size", default="16", help="--token_distillation_batch_size: an integer, auto, or 0 (the "
                    "tool's default: auto for this recipe). 16 here, the batch whose fit on a 24 GB GPU is checked")
    ap.add_argument("--target_layer", type=int, default=-1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work_dir", default="", help="a new or empty directory for the checkpoints and the corpus "
                                                    "(default: a temporary directory); emptied at the end")
    ap.add_argument("--keep", action="store_true", help="keep what was written to the work directory")
    ap.add_argument("--out", default=None, help="also write the JSON result here")
    ap.add_argument("--cpu_smoke", action="store_true", help="the same code path on CPU in seconds: by default "
                                                                "the tiny shape, 3 tokens x 4 snippets of 16 tokens")
    args = ap.parse_args(argv)
    for name, value in (SMOKE if args.cpu_smoke else DEFAULTS).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    check_args(args)
    work = Path(args.work_dir).expanduser() if args.work_dir else Path(tempfile.mkdtemp(prefix="gpu_check-"))
    created = not work.exists() or not args.work_dir
    work.mkdir(parents=True, exist_ok=True)
    try:
        res = run_check(args, work)
    finally:
        if not args.keep:
            _clean(work, created)
    res["date"] = time.strftime("%Y-%m-%d")
    res["command"] = "python scripts/gpu_check.py " + " ".join(sys.argv[1:] if argv is None else argv)
    print(summary(res))
    print(json.dumps(res, indent=2))
    if args.out:
        from token_distillation.paths import replace_file

        text = json.dumps(res, indent=2) + "\n"
        replace_file(args.out, lambda tmp: tmp.write_text(text, encoding="utf-8"), flag="--out")
    return res


if __name__ == "__main__":
    from token_distillation.cli import exit_on_user_error

    exit_on_user_error(main)()
