"""Measurement only (see ../output_fit_calibration.md): a copy of a run's output directory whose new
tokens' output rows are moved by SHIFT nats along the direction d with h @ d ~ 1 (least squares on the
first half of the positions in STATES.pt, as uniform_shift.py), i.e. what `--output_rows_shift SHIFT`
does after the fit, applied without refitting; or, with SHIFT `subtoken-mean`, the mean of each word's
subtokens' output rows (what `--output_embeddings subtoken-mean` writes for an untied model).

    python shifted_copy.py RUN_DIR STATES.pt SHIFT OUT_DIR
"""
import json, shutil, sys
from pathlib import Path
import torch
from safetensors.torch import load_file, save_file
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import direction  # noqa: E402
run, states, shift, out = Path(sys.argv[1]), sys.argv[2], sys.argv[3], Path(sys.argv[4])
if out.exists():
    sys.exit(f"error: {out} exists")
st = load_file(str(run / "model.safetensors"))
W = st["lm_head.weight"]
words = [json.loads(line) for line in (run / "new_tokens.jsonl").read_text().splitlines() if line.strip()]
words = [w for w in words if w.get("added", True)]
vocab = json.loads((run / "tokenizer.json").read_text())
ids = {a["content"]: a["id"] for a in vocab["added_tokens"]}
new_ids = torch.tensor([ids[w["token"]] for w in words])
if shift == "subtoken-mean":
    W[new_ids] = torch.stack([W[torch.tensor(w["subtoken_ids"])].float().mean(0) for w in words]).to(W.dtype)
else:
    D = torch.load(states)
    H = torch.cat(D["H"])
    d = direction(H)
    print(f"h @ d: mean {float((H @ d).mean()):.3f}, sd {float((H @ d).std()):.3f}")
    W[new_ids] = (W[new_ids].float() + float(shift) * d).to(W.dtype)
shutil.copytree(run, out)
save_file(st, str(out / "model.safetensors"), metadata={"format": "pt"})
print(f"{len(words)} output rows ({shift}) -> {out}")
