#!/usr/bin/env python
"""Benchmark: the product's distillation step against a straightforward comparator, and mining.

A benchmark, not a test. Prints a JSON summary (and writes it with ``--out``).

Step mode (default), on snippets mined from a real corpus (``--dataset_path``, the first
``--num_words`` words of ``--words``, 25 training snippets each, every new token merged, so the
first-new-token positions and the co-occurring new tokens are those of a real run; ``--alignment``
as in a run, default ``chars``), in one process:
  (a) comparator written here: the product's loss (per-token sum of per-token means, gradient only
      to each snippet's own token, row-wise Adam) computed the straightforward way: the whole
      input-embedding matrix as the parameter, full forwards with logits and all hidden states;
  (b) the product: ``[num_new, hidden]`` rows (train.NewRows), its per-token recipe and objective
      (recipes.PerTokenRecipe / DistillObjective): early stop at the target layer, a shared-prefix
      key/value cache, batches grouped by first-new-token position as the product schedules them;
  (b') the product on the same snippets in random batches (what grouping buys);
  (b'') the product on the grouped batches with the shared prefix switched the other way than the
      product runs it on this device (``product_no_prefix`` on CPU, ``product_with_prefix`` on a
      GPU, where the product does not share it: fastpath.SHARED_PREFIX_DEVICES);
  (c) the product's step in epochs after the first: teacher states from fastpath.TeacherCache.
The timed batches are ``--steps`` batches sampled evenly from the product's epoch schedule (plus
one warm-up; ``--warmup all`` runs every timed batch once untimed first, as a GPU needs); all variants train fresh rows on the same snippets, at every layer of
``--target_layers`` (default: the last, and one third deep). Reported per layer: snippets/s, the
speed-up over the comparator beside the FLOP ratio of the same batches (comparator FLOPs /
variant FLOPs: the speed-up at equal MFU) and their quotient, MFU against a matmul peak measured in
the same run, held-out loss (8 batches of held-out snippets drawn at random) of the comparator's and
the product's rows after the same steps, and
seconds per 1,000 new tokens at 25 snippets; plus what the snippets look like (mean position of the
first new token, share with another new token, mean shared prefix grouped / at random).

Examples:
  python scripts/benchmark.py                                  # bundled model, CPU, layers -1 and L/3
  python scripts/benchmark.py --shape llama8b --device cuda --dtype bf16 --steps 20 --warmup all
  python scripts/benchmark.py --target_layers=-1,10             # a list starting with "-": use "="
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


def load(args, device, dtype, min_vocab: int = 0):
    """The bundled model, or a random Llama of ``--shape`` (vocabulary at least ``min_vocab``, so
    that the bundled tokenizer's ids fit)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    if args.shape:
        shape = dict(SHAPES[args.shape])
        shape["vocab_size"] = max(shape["vocab_size"], min_vocab)
        cfg = LlamaConfig(max_position_embeddings=2048, **shape)
        torch.manual_seed(0)
        with torch.device(device):
            model = LlamaForCausalLM(cfg).to(dtype)
    else:
        from token_distillation.models import default_cache_root, load_model, resolve_model_source

        model = load_model(resolve_model_source(args.model_path), default_cache_root(), device, dtype)
    model.eval().requires_grad_(False)
    return model


def read_words(path: str) -> list[str]:
    """Words of a word list (one per line) or of a counts file (``.jsonl``, a ``"token"`` per line)."""
    from token_distillation.targets import read_wordlist

    p = Path(path).expanduser()
    if p.suffix == ".jsonl":
        return [json.loads(line)["token"] for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]
    return read_wordlist(p)


def mined_snippets(args, tok, vocab: int):
    """Real snippets: the first ``--num_words`` words of ``--words`` that the tokenizer splits, 25
    training and 5 held-out snippets each mined from ``--dataset_path`` (the product's corpus scan,
    miner and held-out split), paired as ``--alignment`` pairs them in a run: ``chars`` (default) adds
    the snippets inside longer words in the corpus share and reads each snippet's text through the
    extended tokenizer (every new token it uses, so co-occurring new tokens are there too); ``ids``
    merges every new token's exact subtoken phrases.

    The new tokens get ids ``vocab + k`` (after the benchmark model's vocabulary, which may be larger
    than the tokenizer's); the extended tokenizer's ids are shifted to them.

    Returns:
        (tokens, train seqs, train token index, held-out seqs, held-out token index)
    """
    import copy
    from types import SimpleNamespace

    from token_distillation.config import Alignment, CorpusConfig
    from token_distillation.corpus import scan_corpus
    from token_distillation.paths import default_cache_root
    from token_distillation.pipeline import pair_snippets
    from token_distillation.snippets import SnippetMiner, add_inexact_snippets
    from token_distillation.tokenization import add_new_tokens, bos_prefix, in_vocabulary, subtoken_ids

    toks: list[NewToken] = []
    for w in read_words(args.words):
        ids = subtoken_ids(tok, w)
        if len(ids) > 1 and not in_vocabulary(tok, w) and w not in {t.text for t in toks}:
            toks.append(NewToken(w, tuple(ids), vocab + len(toks)))
        if len(toks) == args.num_words:
            break
    ccfg = CorpusConfig(dataset_path=args.dataset_path)
    bos = bos_prefix(tok)
    miner = SnippetMiner(toks, args.snippet_len, 25, 5, ccfg.heldout_fraction, bos, 0)
    scan = scan_corpus(ccfg, tok, default_cache_root(), consumer=miner)  # the product's corpus stage
    snips = miner.result()
    if args.alignment == "ids":
        m = PhraseMatcher([t.subtoken_ids for t in toks])
        new_ids = [t.token_id for t in toks]
        train = [merge(s.ids, m, new_ids) for s in snips.train]
        held = [merge(s.ids, m, new_ids) for s in snips.heldout]
    else:
        add_inexact_snippets(snips, scan.corpus.iter_docs(), tok, toks, args.snippet_len, bos, ccfg.heldout_fraction,
                             0, want=(25, 5))
        ext = copy.deepcopy(tok)
        ext_ids = add_new_tokens(ext, [t.text for t in toks])
        n_tok = ext_ids[0]
        assert ext_ids == list(range(n_tok, n_tok + len(toks))), "new tokens were not appended in order"
        run = SimpleNamespace(tokens=toks, original_tokenizer=tok, tokenizer=ext, n_orig=n_tok)
        train, held = (pair_snippets(pool, run, Alignment.CHARS)[0] for pool in (snips.train, snips.heldout))
        for q in train + held:
            q.student_ids[q.student_ids >= n_tok] += vocab - n_tok
    return (toks, train, [s.token_index for s in snips.train], held, [s.token_index for s in snips.heldout])


def comparator_loss(model, weight, batch, layer, first_new_id: int, num_tokens: int):
    """The product's loss written the straightforward way: full forwards (logits computed, all
    hidden states returned), the whole input-embedding matrix as the parameter (gradient blocked
    for every position but the snippet's own new token), the per-token sum of per-token means
    (:func:`token_distillation.regime.per_token_loss`) over the same aligned positions."""
    from token_distillation.regime import per_token_loss

    with torch.no_grad():
        t = model(input_ids=batch.teacher_ids, attention_mask=batch.teacher_attention.long(),
                  output_hidden_states=True, use_cache=False)
    emb = torch.nn.functional.embedding(batch.student_ids, weight) * _scale(model)
    own = batch.student_ids == (first_new_id + batch.token_index)[:, None]
    emb = torch.where(own[..., None], emb, emb.detach())
    s = model(inputs_embeds=emb, attention_mask=batch.student_attention.long(), output_hidden_states=True,
              use_cache=False)
    _ = s.logits  # computed by the full forward, as a naive loop does
    diff = s.hidden_states[layer][batch.student_loss_mask].float() - t.hidden_states[layer][batch.teacher_loss_mask].float()
    per_pos = diff.pow(2).mean(-1)
    return per_token_loss(per_pos, batch.student_loss_mask.nonzero()[:, 0], batch.token_index, num_tokens)


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


def time_interleaved(variants: dict, device, warmup: str = "first") -> dict[str, float]:
    """Seconds each variant spends on its timed batches. ``variants``: name -> (``step(ids, batch)``,
    ``[(snippet ids, AlignedBatch)]``). Warm-up (``--warmup``): one untimed step each on the first
    batch (``first``), or on every batch (``all``: each batch shape has been run once before it is
    timed, as in a long run where the shapes recur; on a GPU a shape's first call pays for kernel
    selection). Then the variants take turns batch by batch, so that a change in the machine's load
    during the run (other jobs) falls on all of them alike."""
    for step, batches in variants.values():
        for b in batches if warmup == "all" else batches[:1]:
            step(*b)
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    seconds = dict.fromkeys(variants, 0.0)
    for i in range(1, min(len(b) for _, b in variants.values())):
        for name, (step, batches) in variants.items():
            t = time.perf_counter()
            step(*batches[i])
            _sync(device)
            seconds[name] += time.perf_counter() - t
    return seconds


def parse_layers(spec: str, n_layers: int) -> list[int]:
    """``--target_layers``: comma-separated layers; ``L/3`` is one third of the depth (rounded)."""
    out = []
    for part in spec.split(","):
        part = part.strip()
        out.append(max(1, round(n_layers / 3)) if part.upper() == "L/3" else int(part))
    return out


def batch_flops(b, p: int, n_all: int, n_run: int, vocab_hidden: int) -> tuple[int, int, int]:
    """Model FLOPs of one step on batch ``b`` with shared prefix ``p``: (comparator, product, product
    with the teacher cached). Frozen weights: a backward pass computes activation gradients only,
    ~2N per token; N = non-embedding parameters of the layers run (``n_run``; ``n_all`` for the whole
    model); attention scores are left out (small at 50 tokens).

    - comparator: forwards of all layers over teacher and student tokens, logits (2 V H per token),
      backward from the target layer over the student tokens;
    - product: teacher tokens once (the prefix shared with the student), student tokens after the
      prefix forward and backward, up to the target layer;
    - cached: the prefix tokens (the student needs their key/value cache) and the student after it.
    """
    t_all, s_all = int(b.teacher_attention.sum()), int(b.student_attention.sum())
    s_tok = int(b.student_attention[:, p:].sum())
    pre_tok = int(b.teacher_attention[:, :p].sum())
    comparator = 2 * n_all * (t_all + s_all) + 2 * vocab_hidden * (t_all + s_all) + 2 * n_run * s_all
    product = 2 * n_run * (t_all + s_tok) + 2 * n_run * s_tok
    cached = 2 * n_run * (pre_tok + s_tok) + 2 * n_run * s_tok
    return comparator, product, cached


def step_mode(args):
    """Time the comparator and the product on the same mined snippets at each target layer."""
    from token_distillation.models import default_cache_root, load_tokenizer, resolve_model_source
    from token_distillation.recipes import PerTokenRecipe
    from token_distillation.regime import RowAdam

    device = torch.device(args.device)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    tok = load_tokenizer(resolve_model_source(args.model_path), default_cache_root())
    model = load(args, device, dtype, min_vocab=len(tok))
    vocab = model.get_input_embeddings().weight.shape[0]
    n_layers = model.config.num_hidden_layers
    toks, train, t_idx, held, h_idx = mined_snippets(args, tok, vocab)
    num_new = len(toks)
    model.resize_token_embeddings(vocab + num_new, mean_resizing=False)
    base_w = model.get_input_embeddings().weight
    init = torch.stack([base_w[list(t.subtoken_ids)].float().mean(0) for t in toks])
    scale = _scale(model)

    # The product's schedule (per-token batches grouped by first-new-token position), sampled
    # evenly over the epoch; the same snippets regrouped at random show what grouping buys.
    recipe = PerTokenRecipe(t_idx, [t.text for t in toks], num_rows=num_new, batch_size=args.batch_size,
                            snippets_per_update=1, epochs=1, lr=args.lr, seed=0, positions=[s.first_new for s in train])
    sched = recipe.schedule
    n = min(args.steps + 1, len(sched))
    picked = [sched[round(k * (len(sched) - 1) / max(1, n - 1))] for k in range(n)]
    flat = [i for b in picked for i in b]
    perm = torch.randperm(len(flat), generator=torch.Generator().manual_seed(0)).tolist()
    shuffled, k = [], 0
    for b in picked:
        shuffled.append([flat[j] for j in perm[k: k + len(b)]])
        k += len(b)

    grouped = _batches(picked, train, t_idx, device)
    ungrouped = _batches(shuffled, train, t_idx, device)
    n_held = min(len(held), 8 * args.batch_size)  # held-out loss on the first 8 batches (spread over the tokens)
    held_order = torch.randperm(len(held), generator=torch.Generator().manual_seed(1)).tolist()[:n_held]
    held_b = [b for _, b in _batches([held_order[i: i + args.batch_size] for i in range(0, n_held, args.batch_size)],
                                     held, h_idx, device)]
    res = {"device": str(device), "dtype": args.dtype, "model": args.shape or args.model_path, "layers": n_layers,
           "batch_size": args.batch_size, "snippet_len": args.snippet_len, "steps_timed": n - 1,
           "alignment": args.alignment,
           "snippets": _snippet_stats(args, toks, train, t_idx, sched, grouped, ungrouped)}
    n_all = sum(p.numel() for name, p in model.named_parameters() if "embed" not in name and "lm_head" not in name)
    peak = matmul_peak(device, dtype)
    res["matmul_peak_tflops"] = peak / 1e12
    ctx = dict(model=model, grouped=grouped, ungrouped=ungrouped, held=held_b, init=init, toks=toks, vocab=vocab,
               scale=scale, recipe=recipe, dtype=dtype, device=device, n_all=n_all, peak=peak, lr=args.lr,
               bf16=args.dtype == "bf16", warmup=args.warmup, profile=args.profile)
    res["by_layer"] = [_one_layer(ctx, target) for target in parse_layers(args.target_layers, n_layers)]
    steps_per_1000 = math.ceil(1000 * 25 / args.batch_size)
    for r in res["by_layer"]:
        r["product"]["seconds_per_1000_tokens"] = steps_per_1000 / r["product"]["steps_per_s"]
    res["peak_mem_mib"] = peak_mem(device)
    # optimizer state for 1,000 new tokens at an 8B-class shape (Adam: exp_avg + exp_avg_sq, fp32)
    p = torch.nn.Parameter(torch.zeros(1000, 4096))
    o = RowAdam([p], lr=1e-4)
    p.grad = torch.ones_like(p)
    o.step()
    res["optimizer_state_bytes_1000_tokens_hidden4096"] = {
        "product_measured": opt_state_bytes(o), "comparator_formula": 2 * 4 * 128256 * 4096}
    res["trainable_params"] = {"comparator": (vocab + num_new) * base_w.shape[1], "product": num_new * base_w.shape[1]}
    return res


def _batches(groups: list[list[int]], seqs, token_index, device) -> list[tuple[list[int], object]]:
    """``(snippet ids, AlignedBatch)`` for each group of snippet indices."""
    return [(ids, collate([seqs[i] for i in ids], [token_index[i] for i in ids], pad_id=0).to(device))
            for ids in groups]


def _snippet_stats(args, toks, train, t_idx, sched, grouped, ungrouped) -> dict:
    """What the mined snippets look like: positions, co-occurring new tokens, shared prefixes."""
    from token_distillation.fastpath import _prefix_len

    first_id = toks[0].token_id
    other = sum(bool(((s.student_ids >= first_id) & (s.student_ids != first_id + t)).any()) for s, t in zip(train, t_idx))
    return {"corpus": Path(args.dataset_path).name, "words": len(toks), "train_snippets": len(train),
            "batches_per_epoch": len(sched),
            "first_new_token_position_mean": sum(s.first_new for s in train) / len(train),
            "with_another_new_token": other / len(train),
            "shared_prefix_mean": {"grouped": sum(_prefix_len(b) for _, b in grouped[1:]) / max(1, len(grouped) - 1),
                                   "ungrouped": sum(_prefix_len(b) for _, b in ungrouped[1:]) / max(1, len(ungrouped) - 1)}}


def _one_layer(ctx: dict, target_layer: int) -> dict:
    """Comparator, product (grouped and ungrouped batches) and product with the teacher cached, at
    one target layer; each trains fresh rows over the same timed snippets."""
    from token_distillation.config import LossMethod
    from token_distillation.fastpath import SHARED_PREFIX_DEVICES, shared_prefix_len
    from token_distillation.recipes import DistillObjective
    from token_distillation.regime import RowAdam

    model, device, recipe, toks, vocab = ctx["model"], ctx["device"], ctx["recipe"], ctx["toks"], ctx["vocab"]
    layer = resolve_layer(model, target_layer)
    n_layers = model.config.num_hidden_layers
    n_run = ctx["n_all"] * min(layer, n_layers) / n_layers
    num_new, new_ids = len(toks), [t.token_id for t in toks]
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if ctx["bf16"] else _null()
    vh = (vocab + num_new) * ctx["init"].shape[1]

    full = torch.nn.Parameter(model.get_input_embeddings().weight.detach().float().clone())
    with torch.no_grad():
        full[vocab:] = ctx["init"]
    opt_a = RowAdam([full], lr=ctx["lr"])

    def step_a(_ids, b):
        with autocast:
            loss = comparator_loss(model, full.to(ctx["dtype"]), b, layer, vocab, num_new)
        opt_a.zero_grad(set_to_none=True)
        loss.backward()
        opt_a.step()

    def product(tcache=None):
        """A fresh copy of the product's trainable rows and its step function."""
        rows = NewRows(ctx["init"].clone(), new_ids, vocab + num_new, ctx["scale"]).to(device)
        opt = RowAdam([rows.rows], lr=ctx["lr"])
        obj = DistillObjective(model, rows, layer, (LossMethod.MSE_ON_HIDDENS,),
                               torch.bfloat16 if ctx["bf16"] else None, teacher_cache=tcache)

        def step(ids, b):
            loss = recipe.loss(obj, b, ids)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        return step, rows

    out = {"target_layer": target_layer, "layer": layer}
    timed = ctx["grouped"][1:]
    snippets = sum(len(ids) for ids, _ in timed)
    # the product with the shared prefix switched the other way than on this device (fastpath.SHARED_PREFIX_DEVICES)
    shares = device.type in SHARED_PREFIX_DEVICES
    toggled, other = ("product_no_prefix", "no-such-device") if shares else ("product_with_prefix", "cpu")
    flops = {"comparator": [], "product": [], "product_teacher_cached": [], "product_ungrouped": [], toggled: []}
    for (_, b), (_, u) in zip(timed, ctx["ungrouped"][1:]):
        a, pr, c = batch_flops(b, shared_prefix_len(b), ctx["n_all"], n_run, vh)
        flops["comparator"].append(a)
        flops["product"].append(pr)
        flops["product_teacher_cached"].append(c)
        flops[toggled].append(batch_flops(b, shared_prefix_len(b, device_type=other), ctx["n_all"], n_run, vh)[1])
        flops["product_ungrouped"].append(batch_flops(u, shared_prefix_len(u), ctx["n_all"], n_run, vh)[1])

    cache = TeacherCache(1 << 40)  # filled the way the first epoch fills it
    step_b, rows = product()
    with torch.no_grad(), autocast:
        for ids, b in ctx["grouped"]:
            cache.put(ids, teacher_student_hiddens(model, rows, b, layer)[1], b.teacher_loss_mask.sum(1))
    variants = {"comparator": (step_a, ctx["grouped"]), "product": (step_b, ctx["grouped"]),
                "product_ungrouped": (product()[0], ctx["ungrouped"]),
                toggled: (_prefix_toggled(product()[0], device.type, not shares), ctx["grouped"]),
                "product_teacher_cached": (product(cache)[0], ctx["grouped"])}
    if ctx["profile"]:
        _profile({k: variants[k] for k in ("product", toggled)}, device)
    for name, sec in time_interleaved(variants, device, ctx["warmup"]).items():
        f = sum(flops[name]) / len(timed)
        out[name] = {"steps_per_s": len(timed) / sec, "snippets_per_s": snippets / sec,
                     "mfu": f / (sec / len(timed)) / ctx["peak"], "flops_per_step": f}
    out["teacher_cache_mib"] = cache.bytes / 2**20
    for name in ("product", "product_ungrouped", toggled, "product_teacher_cached"):
        speedup = out[name]["snippets_per_s"] / out["comparator"]["snippets_per_s"]
        ratio = sum(flops["comparator"]) / sum(flops[name])
        out[name].update(speedup=speedup, flop_ratio=ratio, speedup_over_flop_ratio=speedup / ratio)
    rows_a = NewRows(full[vocab:].detach(), new_ids, vocab + num_new, ctx["scale"]).to(device)
    with torch.no_grad(), autocast:
        ha = sum(float(mse_on_hiddens(*teacher_student_hiddens(model, rows_a, b, layer))) for b in ctx["held"])
        hb = sum(float(mse_on_hiddens(*teacher_student_hiddens(model, rows, b, layer))) for b in ctx["held"])
    out["heldout_loss"] = {"comparator": ha / len(ctx["held"]), "product": hb / len(ctx["held"])}
    return out


def _prefix_toggled(step, device_type: str, share: bool):
    """``step`` with the shared prefix on (``share``) or off on ``device_type`` whatever
    ``fastpath.SHARED_PREFIX_DEVICES`` says: the ``product_no_prefix`` variant on a device where the
    product shares it (what the prefix saves), ``product_with_prefix`` where it does not."""
    from token_distillation import fastpath

    def run(ids, b):
        saved = fastpath.SHARED_PREFIX_DEVICES
        others = tuple(d for d in saved if d != device_type)
        fastpath.SHARED_PREFIX_DEVICES = others + (device_type,) if share else others
        try:
            step(ids, b)
        finally:
            fastpath.SHARED_PREFIX_DEVICES = saved

    return run


def _profile(variants: dict, device, steps: int = 4) -> None:
    """``--profile``: print torch.profiler's table (top operators by device time, or CPU time on a
    CPU) for ``steps`` batches of each variant, after the timing's warm-up."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    for name, (step, batches) in variants.items():
        with profile(activities=acts) as prof:
            for ids, b in batches[1: 1 + steps]:
                step(ids, b)
            _sync(device)
        key = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
        print(f"--- profile: {name}, {min(steps, len(batches) - 1)} steps", flush=True)
        print(prof.key_averages().table(sort_by=key, row_limit=18, max_name_column_width=60), flush=True)


def mining_mode(args):
    """The product's corpus stage on ``--dataset_path``: tokenization (a scan into a fresh cache, no
    miner) and mining alone (a second scan that reads the cached token ids and feeds every document
    to a :class:`~token_distillation.snippets.SnippetMiner` that never stops early)."""
    import tempfile

    from token_distillation.config import CorpusConfig
    from token_distillation.corpus import scan_corpus
    from token_distillation.models import default_cache_root, load_tokenizer, resolve_model_source
    from token_distillation.snippets import SnippetMiner
    from token_distillation.tokenization import bos_prefix, subtoken_ids

    tok = load_tokenizer(resolve_model_source(args.model_path), default_cache_root())
    cfg = CorpusConfig(dataset_path=args.dataset_path, num_proc=args.num_proc)
    toks = [NewToken(w, tuple(subtoken_ids(tok, w))) for w in read_words(args.words)
            if len(subtoken_ids(tok, w)) > 1]
    with tempfile.TemporaryDirectory() as cache:
        t = time.perf_counter()
        scan = scan_corpus(cfg, tok, Path(cache))
        tok_s = time.perf_counter() - t
        miner = SnippetMiner(toks, 50, 10**9, 0, 0.0, bos_prefix(tok), 0)  # never done: a full scan
        t = time.perf_counter()
        scan_corpus(cfg, tok, Path(cache), consumer=miner)
        mine_s = time.perf_counter() - t
    n = int(scan.corpus.num_tokens)
    return {"corpus_tokens": n, "docs": scan.docs_read, "tokenize_seconds": tok_s, "tokenize_tokens_per_s": n / tok_s,
            "mining_seconds": mine_s, "mining_tokens_per_s": n / mine_s, "patterns": len(toks),
            "matches": int(sum(miner.occurrences))}


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
                             ("num_words", args.num_words, 1), ("snippet_len", args.snippet_len, 8),
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
    if args.mode == "step":
        if args.shape:
            _check_layers(args.target_layers, SHAPES[args.shape]["num_hidden_layers"], f"--shape {args.shape}")
        else:
            try:
                parse_layers(args.target_layers, 3)
            except ValueError:
                raise ConfigError(f"--target_layers {args.target_layers!r}: give comma-separated layers "
                                  "(integers, or L/3 for one third deep), e.g. -1,L/3") from None
        if not Path(args.dataset_path).expanduser().is_file():
            raise ConfigError(f"--dataset_path {args.dataset_path}: file not found")
        if not Path(args.words).expanduser().is_file():
            raise ConfigError(f"--words {args.words}: file not found")
    if args.mode == "mining":
        if not Path(args.dataset_path).expanduser().is_file():
            raise ConfigError(f"--dataset_path {args.dataset_path}: file not found")
        if args.words and not Path(args.words).expanduser().is_file():
            raise ConfigError(f"--words {args.words}: file not found")
    resolve_model_source(args.model_path)  # the model, or the tokenizer of a --shape run


def _check_layers(spec: str, n: int, what: str) -> None:
    try:
        layers = parse_layers(spec, n)
    except ValueError:
        raise ConfigError(f"--target_layers {spec!r}: give comma-separated layers (integers, or L/3 for one "
                          "third deep), e.g. -1,L/3") from None
    for layer in layers:
        if not (1 <= layer <= n or -n <= layer <= -1):
            raise ConfigError(f"--target_layers: {layer} out of range for {what} ({n} layers); use 1..{n} or -1..-{n}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mode", choices=["step", "mining"], default="step")
    ap.add_argument("--model_path", default="smollm2-135m")
    ap.add_argument("--shape", choices=sorted(SHAPES), default=None, help="random-init Llama shape instead of --model_path")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    ap.add_argument("--target_layers", default="-1,L/3", help="comma-separated target layers; L/3 = one third deep")
    ap.add_argument("--batch_size", type=int, default=16)
    ap.add_argument("--alignment", choices=["chars", "ids"], default="chars",
                    help="how snippets are paired, as --alignment in a run (chars: the extended tokenizer's own encoding)")
    ap.add_argument("--snippet_len", type=int, default=50)
    ap.add_argument("--steps", type=int, default=12, help="timed batches, sampled evenly from the epoch")
    ap.add_argument("--num_words", type=int, default=500, help="new tokens (the first words of --words that split)")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--dataset_path", default=str(Path(__file__).resolve().parents[2] / "shared/data/pubmed_abstracts/abstracts.jsonl"))
    ap.add_argument("--words", default=str(Path(__file__).resolve().parents[1] / "new_tokens/pubmed_frequency_smollm2_top500.jsonl"),
                    help="word list (.txt) or counts file (.jsonl)")
    ap.add_argument("--num_proc", type=int, default=1)
    ap.add_argument("--warmup", choices=["first", "all"], default="first",
                    help="untimed steps before timing: the first batch, or every timed batch once (each shape seen)")
    ap.add_argument("--profile", action="store_true", help="print torch.profiler tables for the product and for "
                                                            "the product with the shared prefix switched the other way (off on CPU, on on a GPU)")
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
