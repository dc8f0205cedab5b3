#!/usr/bin/env python
"""Benchmark: the product's distillation step against a straightforward comparator, and mining.

A benchmark, not a test. Prints a JSON summary (and writes it with ``--out``).

Step mode (default), on identical batches in one process:
  (a) comparator written here: the whole input-embedding matrix is an AdamW parameter (original
      rows' gradients zeroed after backward), full forwards with logits computed and all hidden
      states returned, loss over all aligned positions;
  (b) the product: a ``[num_new, hidden]`` parameter (train.NewRows), shared-prefix KV cache and
      early stop at the target layer (fastpath.teacher_student_hiddens), loss on aligned positions
      after the new token only;
  (c) the product's step in epochs after the first: teacher states from fastpath.TeacherCache;
  (d) the same with half of every batch's snippets cached (a cache over budget, a resumed run).
Reports snippets/s for each and the ratios to the comparator, peak memory, trainable parameters, optimizer-state
bytes, held-out loss after the same number of steps, model-FLOP utilisation against a matmul peak
measured in the same run, the FLOP ratio (comparator FLOPs / product FLOPs: the speedup at equal
MFU) and seconds per 1,000 new tokens at 25 snippets of 50 tokens.

Examples:
  python scripts/benchmark.py                                  # bundled model, CPU, layer -1
  python scripts/benchmark.py --target_layer 10                # one third deep
  python scripts/benchmark.py --shape llama8b --device cuda --dtype bf16 --steps 20
  python scripts/benchmark.py --mode mining                    # tokens/s over the shared corpus

Every flag is checked before a model is built or loaded (bad input: one ``error:`` line, exit code
2; argparse reports its own errors with a usage line). ``--out`` is replaced whole, never left
half-written.
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from token_distillation.alignment import PhraseMatcher, collate, merge  # noqa: E402
from token_distillation.config import ConfigError  # noqa: E402
from token_distillation.fastpath import TeacherCache, teacher_student_hiddens  # noqa: E402
from token_distillation.losses import mse_on_hiddens  # noqa: E402
from token_distillation.tokenization import NewToken  # noqa: E402
from token_distillation.train import NewRows, resolve_layer  # noqa: E402

SHAPES = {  # randomly initialised Llama shapes (no download)
    "llama8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                    num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=False),
    "llama1b": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                    num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=True),
    "tiny": dict(vocab_size=2048, hidden_size=64, intermediate_size=128, num_hidden_layers=3,  # smoke test
                 num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True),
}


def load(args, device, dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    if args.shape:
        cfg = LlamaConfig(max_position_embeddings=2048, **SHAPES[args.shape])
        torch.manual_seed(0)
        with torch.device(device):
            model = LlamaForCausalLM(cfg).to(dtype)
    else:
        from token_distillation.models import default_cache_root, load_model, resolve_model_source

        model = load_model(resolve_model_source(args.model_path), default_cache_root(), device, dtype)
    model.eval().requires_grad_(False)
    return model


def make_batches(vocab: int, num_new: int, n_batches: int, batch: int, snippet_len: int, seed: int):
    """Synthetic snippets shaped like mined ones: BOS, 12 tokens of left context, the phrase, the rest."""
    g = torch.Generator().manual_seed(seed)
    toks = []
    for j in range(num_new):
        k = int(torch.randint(2, 5, (1,), generator=g))
        toks.append(NewToken(f"w{j}", tuple(int(x) for x in torch.randint(1000, vocab - 1, (k,), generator=g)),
                             vocab + j))
    m = PhraseMatcher([t.subtoken_ids for t in toks])
    batches = []
    for _ in range(n_batches):
        seqs = []
        for _ in range(batch):
            j = int(torch.randint(0, num_new, (1,), generator=g))
            body = torch.randint(1000, vocab - 1, (snippet_len,), generator=g).tolist()
            left = min(12, snippet_len // 4)
            ids = [1] + body[:left] + list(toks[j].subtoken_ids) + body[left: snippet_len - len(toks[j].subtoken_ids)]
            seqs.append(merge(ids, m, [t.token_id for t in toks]))
        batches.append(collate(seqs, [0] * batch, pad_id=0))
    return toks, batches


def comparator_loss(model, weight, batch, layer):
    """Full forwards with logits and all hidden states; loss over every aligned position."""
    with torch.no_grad():
        t = model(input_ids=batch.teacher_ids, attention_mask=batch.teacher_attention.long(),
                  output_hidden_states=True, use_cache=False)
    s = model(inputs_embeds=torch.nn.functional.embedding(batch.student_ids, weight) * _scale(model),
              attention_mask=batch.student_attention.long(), output_hidden_states=True, use_cache=False)
    _ = s.logits  # computed by the full forward, as a naive loop does
    # all aligned positions: one-to-one before the word, then the product's aligned positions
    t_mask = batch.teacher_attention.clone()
    s_mask = batch.student_attention.clone()
    for r in range(batch.teacher_ids.shape[0]):
        sl = batch.student_loss_mask[r]
        if sl.any():
            first_s = int(sl.float().argmax())
            t_mask[r, first_s:] = batch.teacher_loss_mask[r, first_s:]
    return mse_on_hiddens(s.hidden_states[layer][s_mask], t.hidden_states[layer][t_mask])


def _scale(model):
    from token_distillation.models import embedding_scale

    return embedding_scale(model)


def opt_state_bytes(opt) -> int:
    return sum(v.numel() * v.element_size() for st in opt.state.values() for v in st.values() if torch.is_tensor(v))


def matmul_peak(device, dtype, n: int = 2048, reps: int = 10) -> float:
    """Measured dense matmul FLOP/s on this device (the MFU denominator)."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(2):
        a @ b
    _sync(device)
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    _sync(device)
    return 2 * n ** 3 * reps / (time.perf_counter() - t)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def peak_mem(device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # process peak RSS (MiB)


def run_steps(step_fn, batches, device):
    """Time ``step_fn(index, batch)`` over ``batches[1:]`` after one warm-up step on ``batches[0]``."""
    step_fn(0, batches[0])  # warm-up
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    for i, b in enumerate(batches[1:], start=1):
        step_fn(i, b)
    _sync(device)
    return time.perf_counter() - t


def step_mode(args):
    device = torch.device(args.device)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    model = load(args, device, dtype)
    vocab = model.get_input_embeddings().weight.shape[0]
    layer = resolve_layer(model, args.target_layer)
    n_layers = model.config.num_hidden_layers
    toks, batches = make_batches(vocab, args.num_new, args.steps + 1, args.batch_size, args.snippet_len, 0)
    _, held = make_batches(vocab, args.num_new, 2, args.batch_size, args.snippet_len, 0)
    batches = [b.to(device) for b in batches]
    held = [b.to(device) for b in held]
    model.resize_token_embeddings(vocab + args.num_new, mean_resizing=False)
    base_w = model.get_input_embeddings().weight
    init = torch.stack([base_w[list(t.subtoken_ids)].float().mean(0) for t in toks])
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if args.dtype == "bf16" else _null()
    res = {"device": str(device), "dtype": args.dtype, "model": args.shape or args.model_path,
           "target_layer": args.target_layer, "layers": n_layers, "batch_size": args.batch_size,
           "snippet_len": args.snippet_len, "steps_timed": args.steps, "num_new_tokens": args.num_new}

    # (a) comparator
    full = torch.nn.Parameter(base_w.detach().float().clone())
    with torch.no_grad():
        full[vocab:] = init
    opt_a = torch.optim.AdamW([full], lr=args.lr, weight_decay=0.0)

    def step_a(_i, b):
        with autocast:
            loss = comparator_loss(model, full.to(dtype), b, layer)
        opt_a.zero_grad(set_to_none=True)
        loss.backward()
        full.grad[:vocab] = 0
        opt_a.step()

    sec_a = run_steps(step_a, batches, device)
    res["comparator"] = {"snippets_per_s": args.steps * args.batch_size / sec_a, "peak_mem_mib": peak_mem(device),
                         "trainable_params": full.numel(), "optimizer_state_bytes": opt_state_bytes(opt_a)}
    del opt_a

    def time_product(tcache):
        """Time the product's steps on fresh new rows; teacher states from ``tcache`` (a
        TeacherCache; None: computed). Returns (seconds, rows, optimizer)."""
        r = NewRows(init.to(device), [t.token_id for t in toks], vocab + args.num_new, _scale(model)).to(device)
        o = torch.optim.AdamW([r.rows], lr=args.lr, weight_decay=0.0)

        def step(i, b):
            ids = list(range(i * args.batch_size, (i + 1) * args.batch_size))
            with autocast:
                s, t = teacher_student_hiddens(model, r, b, layer, teacher=tcache.lookup(ids) if tcache else None)
                loss = mse_on_hiddens(s, t)
            o.zero_grad(set_to_none=True)
            loss.backward()
            o.step()

        return run_steps(step, batches, device), r, o

    # (b) product
    sec_b, rows, opt_b = time_product(None)
    res["product"] = {"snippets_per_s": args.steps * args.batch_size / sec_b, "peak_mem_mib": peak_mem(device),
                      "trainable_params": rows.rows.numel(), "optimizer_state_bytes": opt_state_bytes(opt_b)}
    res["speedup"] = res["product"]["snippets_per_s"] / res["comparator"]["snippets_per_s"]

    # (c) the product's step in later epochs: teacher states from the TeacherCache (filled here
    # the way the first epoch fills it), only the shared prefix and the student are run
    cache = TeacherCache(1 << 40)
    with torch.no_grad(), autocast:
        for i, b in enumerate(batches):
            ids = list(range(i * args.batch_size, (i + 1) * args.batch_size))
            cache.put(ids, teacher_student_hiddens(model, rows, b, layer)[1], b.teacher_loss_mask.sum(1))
    sec_c = time_product(cache)[0]
    res["product_teacher_cached"] = {"snippets_per_s": args.steps * args.batch_size / sec_c,
                                     "teacher_cache_mib": cache.bytes / 2**20}
    res["speedup_teacher_cached"] = res["product_teacher_cached"]["snippets_per_s"] / res["comparator"]["snippets_per_s"]

    # (d) half of every batch cached (a cache over its budget, or a resumed run whose earlier
    # epochs this process did not see): the teacher's continuation runs for the other half only
    half = TeacherCache(1 << 40)
    for i in range(len(batches)):
        ids = list(range(i * args.batch_size, (i + 1) * args.batch_size))
        found = cache.lookup(ids)
        for r in range(0, len(ids), 2):
            half.put([ids[r]], found[r], torch.tensor([found[r].shape[0]]))
    del cache, found
    sec_d = time_product(half)[0]
    res["product_half_cached"] = {"snippets_per_s": args.steps * args.batch_size / sec_d,
                                  "cached_fraction": math.ceil(args.batch_size / 2) / args.batch_size}
    res["speedup_half_cached"] = res["product_half_cached"]["snippets_per_s"] / res["comparator"]["snippets_per_s"]

    # held-out loss after the same number of steps (both on the product's loss positions)
    with torch.no_grad(), autocast:
        ha = hb = 0.0
        rows_a = NewRows(full[vocab:].detach(), [t.token_id for t in toks], vocab + args.num_new, _scale(model)).to(device)
        for b in held:
            ha += float(mse_on_hiddens(*teacher_student_hiddens(model, rows_a, b, layer)))
            hb += float(mse_on_hiddens(*teacher_student_hiddens(model, rows, b, layer)))
    res["heldout_loss"] = {"comparator": ha / len(held), "product": hb / len(held)}

    # Model FLOPs per step (frozen weights: backward computes activation gradients only, ~2N per
    # token; N = non-embedding parameters of the layers run; attention scores are left out, small
    # at 50 tokens). Their ratio is the speedup the product would have at equal MFU: no exact
    # implementation of the same loss can beat it without doing fewer FLOPs.
    #   comparator: 2 N_all (teacher + student tokens) + logits 2 V H (teacher + student tokens)
    #               + backward 2 N_layer x student tokens
    #   product:    2 N_layer (teacher tokens + student tokens after the shared prefix) + backward 2 N_layer x those
    #   cached:     2 N_layer (shared-prefix tokens + student tokens after it) + backward 2 N_layer x the latter
    from token_distillation.fastpath import _prefix_len

    n_params = sum(p.numel() for n, p in model.named_parameters() if "embed" not in n and "lm_head" not in n)
    n_run = n_params * layer / n_layers
    hidden = base_w.shape[1]
    fa, fb, fc = [], [], []
    for b in batches[1:]:
        p = _prefix_len(b)
        t_all, s_all = int(b.teacher_attention.sum()), int(b.student_attention.sum())
        s_tok = int(b.student_attention[:, p:].sum())
        pre_tok = int(b.teacher_attention[:, :p].sum())
        fa.append(2 * n_params * (t_all + s_all) + 2 * (vocab + args.num_new) * hidden * (t_all + s_all)
                  + 2 * n_run * s_all)
        fb.append(2 * n_run * (t_all + s_tok) + 2 * n_run * s_tok)
        fc.append(2 * n_run * (pre_tok + s_tok) + 2 * n_run * s_tok)
    flops_a, flops_b, flops_c = (sum(f) / len(f) for f in (fa, fb, fc))
    peak = matmul_peak(device, dtype)
    res["matmul_peak_tflops"] = peak / 1e12
    res["comparator"]["mfu"] = flops_a / (sec_a / args.steps) / peak
    res["product"]["mfu"] = flops_b / (sec_b / args.steps) / peak
    res["product_teacher_cached"]["mfu"] = flops_c / (sec_c / args.steps) / peak
    res["flop_ratio"] = flops_a / flops_b
    res["flop_ratio_teacher_cached"] = flops_a / flops_c
    # 1,000 new tokens x 25 snippets / batch size steps
    steps_per_1000 = math.ceil(1000 * 25 / args.batch_size)
    res["product"]["seconds_per_1000_tokens"] = steps_per_1000 * sec_b / args.steps
    # optimizer state for 1,000 new tokens at an 8B-class shape (AdamW: exp_avg + exp_avg_sq, fp32)
    p = torch.nn.Parameter(torch.zeros(1000, 4096))
    o = torch.optim.AdamW([p], lr=1e-4)
    p.grad = torch.zeros_like(p)
    o.step()
    res["optimizer_state_bytes_1000_tokens_hidden4096"] = {
        "product_measured": opt_state_bytes(o), "comparator_formula": 2 * 4 * 128256 * 4096}
    return res


def mining_mode(args):
    from token_distillation.config import CorpusConfig
    from token_distillation.corpus import load_texts
    from token_distillation.models import default_cache_root, load_tokenizer, resolve_model_source
    from token_distillation.snippets import mine_snippets
    from token_distillation.corpus import TokenizedCorpus
    from token_distillation.tokenization import subtoken_ids
    import numpy as np

    tok = load_tokenizer(resolve_model_source(args.model_path), default_cache_root())
    ccfg = CorpusConfig(dataset_path=args.dataset_path)
    ds = load_texts(ccfg)
    t = time.perf_counter()
    enc = ds.map(lambda b: {"ids": tok(b["text"], add_special_tokens=False)["input_ids"]}, batched=True,
                 num_proc=args.num_proc if args.num_proc > 1 else None, remove_columns=ds.column_names,
                 load_from_cache_file=False)
    lists = enc["ids"]
    tok_s = time.perf_counter() - t
    offsets = np.zeros(len(lists) + 1, dtype=np.int64)
    np.cumsum([len(x) for x in lists], out=offsets[1:])
    ids = np.fromiter((i for x in lists for i in x), dtype=np.int32, count=int(offsets[-1]))
    corpus = TokenizedCorpus(ids, offsets, [str(i) for i in range(len(lists))])
    words = [w.rstrip("\n") for w in open(args.words)] if args.words else [" hepatotoxicity", " cisplatin"]
    toks = [NewToken(w, tuple(subtoken_ids(tok, w))) for w in words if len(subtoken_ids(tok, w)) > 1]
    t = time.perf_counter()
    snips = mine_snippets(corpus, toks, 50, 10**9, 0, 0.0, [1], 0)  # no early stop: full scan
    mine_s = time.perf_counter() - t
    return {"corpus_tokens": int(len(ids)), "docs": len(lists), "tokenize_seconds": tok_s,
            "tokenize_tokens_per_s": len(ids) / tok_s, "mining_seconds": mine_s,
            "mining_tokens_per_s": len(ids) / mine_s, "patterns": len(toks), "matches": len(snips.train)}


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def check_args(args) -> None:
    """Check the flags before any model is built or loaded.

    Raises:
        ConfigError: a count or size below its minimum, a device torch does not know or that is not
            available, missing input files, a model that cannot be found, a bad ``--out``.
    """
    from token_distillation.paths import replace_file, resolve_model_source

    for flag, value, low in (("steps", args.steps, 1), ("batch_size", args.batch_size, 1),
                             ("num_new", args.num_new, 1), ("snippet_len", args.snippet_len, 8),
                             ("num_proc", args.num_proc, 1)):
        if value < low:
            raise ConfigError(f"--{flag} must be >= {low}, not {value}")
    if not args.lr > 0:
        raise ConfigError(f"--lr must be > 0, not {args.lr}")
    try:
        device = torch.device(args.device)
    except (RuntimeError, ValueError) as e:
        raise ConfigError(f"--device {args.device!r}: {e}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {args.device}: CUDA is not available here; pass --device cpu")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"--device {args.device}: MPS is not available here; pass --device cpu")
    if args.out:
        replace_file(args.out, flag="--out")
    if args.mode == "step" and args.shape:
        n = SHAPES[args.shape]["num_hidden_layers"]
        if not (1 <= args.target_layer <= n or -n <= args.target_layer <= -1):
            raise ConfigError(f"--target_layer {args.target_layer} out of range for --shape {args.shape} ({n} "
                              f"layers); use 1..{n} or -1..-{n}")
    if args.mode == "mining":
        if not Path(args.dataset_path).expanduser().is_file():
            raise ConfigError(f"--dataset_path {args.dataset_path}: file not found")
        if args.words and not Path(args.words).expanduser().is_file():
            raise ConfigError(f"--words {args.words}: file not found")
    if args.mode == "mining" or not args.shape:
        resolve_model_source(args.model_path)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mode", choices=["step", "mining"], default="step")
    ap.add_argument("--model_path", default="smollm2-135m")
    ap.add_argument("--shape", choices=sorted(SHAPES), default=None, help="random-init Llama shape instead of --model_path")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    ap.add_argument("--target_layer", type=int, default=-1)
    ap.add_argument("--batch_size", type=int, default=16)
    ap.add_argument("--snippet_len", type=int, default=50)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--num_new", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--dataset_path", default=str(Path(__file__).resolve().parents[2] / "shared/data/pubmed_abstracts/abstracts.jsonl"))
    ap.add_argument("--words", default=None, help="word list for mining mode")
    ap.add_argument("--num_proc", type=int, default=1)
    ap.add_argument("--out", default=None, help="also write the JSON result here")
    args = ap.parse_args(argv)
    check_args(args)
    res = step_mode(args) if args.mode == "step" else mining_mode(args)
    res["date"] = time.strftime("%Y-%m-%d")
    res["command"] = "python scripts/benchmark.py " + " ".join(sys.argv[1:] if argv is None else argv)
    text = json.dumps(res, indent=2)
    print(text)
    if args.out:
        from token_distillation.paths import replace_file

        replace_file(args.out, lambda tmp: tmp.write_text(text + "\n", encoding="utf-8"), flag="--out")


if __name__ == "__main__":
    from token_distillation.cli import exit_on_user_error

    exit_on_user_error(main)()
