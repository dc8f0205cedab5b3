"""Measurement only (see ../output_fit_calibration.md): the extended model's total NLL (nats) on the
positions of hidden_states.py for the run's own output rows and for each variant of fit_variants.py.
Only the new tokens' output rows differ between variants, so the original-vocabulary logits are
computed once; the relative change of the total is the relative change of bits per byte on that text.

    python score_variants.py RUN_DIR STATES.pt VARIANTS.pt
"""
import torch, sys
from safetensors.torch import load_file
run = sys.argv[1]
D = torch.load(sys.argv[2]); V = torch.load(sys.argv[3])
H = torch.cat(D["H"]); nxt = torch.cat(D["nxt"]); new_ids = D["new_ids"]; norig = D["norig"]
st = load_file(f"{run}/model.safetensors")
W = st["lm_head.weight"].float()
is_new = nxt >= norig
logz = torch.empty(len(H)); orig_lp = torch.zeros(len(H))
with torch.no_grad():
    for i in range(0, len(H), 512):
        lo = H[i:i+512] @ W[:norig].T
        logz[i:i+512] = torch.logsumexp(lo, -1)
        n = nxt[i:i+512]
        orig_lp[i:i+512] = torch.where(n >= norig, torch.zeros(()), lo.gather(1, n.clamp(max=norig-1)[:, None])[:, 0])
def score(O):
    ln = H @ O.T
    lz = torch.logaddexp(logz, torch.logsumexp(ln, -1))
    tgt = torch.where(is_new, ln.gather(1, (nxt - norig).clamp(min=0)[:, None])[:, 0], orig_lp)
    p = (ln - lz[:, None]).exp()
    mis = float((p * (nxt[:, None] != new_ids[None, :])).sum() / len(H))
    return float(-(tgt - lz).sum()), float(-(tgt - lz)[is_new].sum()), mis
ref = score(W[new_ids])
print(f"positions {len(H)}, new-token targets {int(is_new.sum())}; run's own rows: total {ref[0]:.0f} words {ref[1]:.0f} misplaced {ref[2]:.4f}")
for name, rows in V.items():
    if len(rows) < len(new_ids):
        print(name, "incomplete", len(rows)); continue
    O = torch.stack([rows[t] for t in range(len(new_ids))])
    s = score(O)
    print(f"{name:10} total {s[0]:.0f} ({100*(s[0]/ref[0]-1):+.3f}%) words {s[1]:.0f} misplaced {s[2]:.4f}")
