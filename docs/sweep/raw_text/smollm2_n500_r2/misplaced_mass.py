"""Where an extended model puts probability on new tokens that do not come next (a record of the
diagnosis in ../README.md, section smollm2_n500_r2; not part of the tool).

Usage: python misplaced_mass.py RUN_DIR HELDOUT_JSONL [N_DOCS]
Reads the first N_DOCS (default 60) documents of HELDOUT_JSONL (field "text"), runs RUN_DIR's model
over each (up to 512 tokens) and sums, per new token, its softmax probability at every position whose
next token is not that new token; prints the total per position and the 25 largest, with each
token's first subtoken.
"""
import json
import sys

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

run, heldout = sys.argv[1], sys.argv[2]
n_docs = int(sys.argv[3]) if len(sys.argv) > 3 else 60
torch.set_num_threads(2)
tok = AutoTokenizer.from_pretrained(run)
model = AutoModelForCausalLM.from_pretrained(run, torch_dtype=torch.float32).eval()
tokens = json.load(open(f"{run}/report.json"))["tokens"]
new_ids = torch.tensor([t["id"] for t in tokens])
docs = [json.loads(line)["text"] for line in open(heldout)][:n_docs]
mass, positions = torch.zeros(len(tokens)), 0
with torch.no_grad():
    for d in docs:
        enc = tok(d, return_tensors="pt", truncation=True, max_length=512)
        p = model(**enc).logits[0, :-1].float().softmax(-1)[:, new_ids]  # [positions, new tokens]
        nxt = enc["input_ids"][0, 1:]
        mass += (p * (nxt[:, None] != new_ids[None, :])).sum(0)
        positions += len(nxt)
print(f"positions {positions}; probability on new tokens that do not come next, per position: "
      f"{float(mass.sum() / positions):.4f}")
for j in mass.argsort(descending=True)[:25].tolist():
    first = tok.convert_ids_to_tokens([tokens[j]["subtoken_ids"][0]])[0]
    print(f"{tokens[j]['token']!r:24} {float(mass[j] / positions):.5f}  first subtoken {first!r}")
