"""Measurement only (see ../README.md): the sampled continuations of an evaluation.json read by the
original model (bits per byte, as token_distillation.generation.continuation_bits), per model, and each
pair's difference with a 95% bootstrap interval over the prompts (2,000 resamples, seed 0).

    python generation_paired.py EVAL_DIR/evaluation.json > generation_paired.txt
"""
import json, sys, random, torch
from token_distillation.models import resolve_model_source, load_tokenizer, default_cache_root, load_model
from token_distillation.generation import continuation_bits
torch.set_num_threads(2)
e = json.load(open(sys.argv[1]))
S = e["samples"]
labels = [k for k in S[0] if k != "prompt"]
src = resolve_model_source("smollm2-135m")
tok = load_tokenizer(src, default_cache_root())
model = load_model(src, default_cache_root(), torch.device("cpu"), torch.float32).eval()
per = {l: [] for l in labels}
with torch.no_grad():
    for s in S:
        for l in labels:
            per[l].append(continuation_bits(model, tok, [s["prompt"]], [s[l]], torch.device("cpu")))
def bpb(l, idx):
    return sum(per[l][i][0] for i in idx) / sum(per[l][i][1] for i in idx)
n = len(S); rng = random.Random(0)
for l in labels:
    print(f"{l:28s} bpb {bpb(l, range(n)):.4f}")
boots = [[rng.randrange(n) for _ in range(n)] for _ in range(2000)]
for a in labels:
    for b in labels:
        if a < b:
            d = [bpb(a, ix) - bpb(b, ix) for ix in boots]
            d.sort()
            print(f"{a} - {b}: {bpb(a, range(n)) - bpb(b, range(n)):+.4f}  95% bootstrap over prompts [{d[50]:+.4f}, {d[1949]:+.4f}]")
