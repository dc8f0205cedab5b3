"""The output-row fit's targets on real snippets of one word: the occurrences' mean completion (the fit of
2026-12-04) against the teacher's own completion (the default since 2026-12-05). A record of the diagnosis
in ../README.md, section smollm2_n100_r3; not part of the tool.

Usage: python targets_compare.py " LPS" CORPUS_JSONL   (12 snippets: 30 tokens before the first
occurrence in each of the first 12 documents with the word, 20 after; SmolLM2)
"""
import json, sys, math
import torch
torch.set_num_threads(1)
from token_distillation.paths import resolve_model_source, default_cache_root
from token_distillation.models import load_model, load_tokenizer
from token_distillation.alignment import PhraseMatcher, merge
from token_distillation import output_rows
from token_distillation.output_rows import collect_positions
from token_distillation.train import NewRows
from token_distillation.models import extend_embeddings, embedding_scale

word = sys.argv[1]
src = resolve_model_source("smollm2-135m")
tok = load_tokenizer(src, default_cache_root())
model = load_model(src, default_cache_root(), torch.device("cpu"), torch.float32)
subs = tuple(tok(word, add_special_tokens=False)["input_ids"])
n = model.get_input_embeddings().weight.shape[0]
extend_embeddings(model, n + 1)
new_id = n
m = PhraseMatcher([subs])
seqs = []
for line in open(sys.argv[2]):
    t = json.loads(line)["text"]
    if word not in t:
        continue
    ids = tok(t, add_special_tokens=False)["input_ids"]
    for i in range(len(ids) - len(subs)):
        if tuple(ids[i:i + len(subs)]) == subs:
            lo = max(0, i - 30)
            win = [tok.bos_token_id or 1] + ids[lo: i + len(subs) + 20]
            seqs.append(merge(win, m, [new_id]))
            break
    if len(seqs) >= 12:
        break
emb = model.get_input_embeddings().weight
W = model.get_output_embeddings().weight
rows = NewRows(emb[list(subs)].mean(0, keepdim=True), [new_id], emb.shape[0], embedding_scale(model), num_original=n,
               out_rows=W[list(subs)].mean(0, keepdim=True))
kw = dict(batch_size=4, device=torch.device("cpu"), pad_id=0)
new = collect_positions(model, rows, seqs, [0] * len(seqs), [0], [subs], **kw)
output_rows.COMPLETION_MIN_P1 = 2.0
old = collect_positions(model, rows, seqs, [0] * len(seqs), [0], [subs], **kw)
d = new.target - old.target
print(word, subs, "snippets", len(seqs), "positions", len(d))
print("sum targets old %.4f new %.4f" % (old.target.sum(), new.target.sum()))
print("positions where new > old: %d (sum excess %.4f); new < old: %d (sum deficit %.4f)" % (
    (d > 0).sum(), d.clamp(min=0).sum(), (d < 0).sum(), (-d).clamp(min=0).sum()))
top = d.abs().argsort(descending=True)[:8]
for j in top.tolist():
    print("  pos %d old %.5f new %.5f" % (j, old.target[j], new.target[j]))
