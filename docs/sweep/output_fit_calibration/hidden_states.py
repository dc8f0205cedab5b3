"""Measurement only (see ../output_fit_calibration.md): the final hidden states of an extended model on the
documents an evaluation scored in bits per byte (the held-out documents with the words), or with --first N
on the first N documents of a corpus (generic held-out text, first 512 tokens each).

    python hidden_states.py EVAL_DIR RUN_DIR OUT.pt          # from the directory the evaluation ran in
    python hidden_states.py --first 60 HELDOUT.jsonl RUN_DIR OUT.pt
"""
import json, sys, torch
from pathlib import Path
ROOT = __import__("pathlib").Path(__file__).resolve().parents[3]  # the repository
sys.path.insert(0, str(ROOT))
from transformers import AutoModelForCausalLM, AutoTokenizer
from token_distillation.evaluate import EvalConfig, evaluated_words
from token_distillation.metrics import read_extended, heldout_documents, mine_windows
from token_distillation.models import resolve_model_source, load_tokenizer, default_cache_root
from token_distillation.corpus import tokenize_corpus, iter_texts
from token_distillation.bpb import documents_for_bpb
from token_distillation.tokenization import bos_prefix
torch.set_num_threads(2)
def eval_texts(ev):
    setup = json.load(open(f"{ev}/evaluation.json"))["setup"]
    cfg = EvalConfig.from_flags(**{**setup["config"], "out_path": "/tmp/unused_eval"})
    tok0 = load_tokenizer(resolve_model_source(cfg.model_path), default_cache_root())
    exts = [read_extended(p, lab) for p, lab in zip(cfg.paths, cfg.label_list)]
    words, _ = evaluated_words(cfg.model_path, exts, tok0)
    corpus = tokenize_corpus(cfg.corpus, tok0, default_cache_root())
    docs = heldout_documents(corpus, set().union(*(e.train_doc_ids for e in exts)))
    windows = mine_windows(corpus, [w.subtoken_ids for w in words], docs, cfg.window_len, cfg.windows_per_token,
                           bos_prefix(tok0), cfg.seed)
    return documents_for_bpb([w.doc for w in windows], cfg.bpb_docs, iter_texts(cfg.corpus), cfg.bpb_max_chars)[1]


if sys.argv[1] == "--first":
    n, heldout, run, out = int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5]
    texts, max_len = [json.loads(line)["text"] for line in open(heldout)][:n], 512
else:
    texts, max_len = eval_texts(sys.argv[1]), None
    run, out = sys.argv[2], sys.argv[3]
print("docs", len(texts), "chars", sum(map(len, texts)))
tok = AutoTokenizer.from_pretrained(run)
model = AutoModelForCausalLM.from_pretrained(run, dtype=torch.float32).eval()
tokens = json.load(open(f"{run}/report.json"))["tokens"]
new_ids = torch.tensor([t["id"] for t in tokens])
Hs, nxts = [], []
with torch.no_grad():
    for d in texts:
        enc = tok(d, return_tensors="pt", truncation=max_len is not None, max_length=max_len)
        Hs.append(model.model(**enc).last_hidden_state[0, :-1]); nxts.append(enc["input_ids"][0, 1:])
torch.save({"H": Hs, "nxt": nxts, "new_ids": new_ids, "norig": int(new_ids.min())}, out)
print("positions", sum(len(h) for h in Hs))
