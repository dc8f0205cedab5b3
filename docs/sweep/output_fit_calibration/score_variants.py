"""Measurement only (see ../output_fit_calibration.md): the extended model's total NLL (nats) on the
positions of hidden_states.py for the run's own output rows and for each variant of fit_variants.py.
Only the new tokens' output rows differ between variants, so the original-vocabulary logits are
computed once; the relative change of the total is the relative change of bits per byte on that text.

    python score_variants.py RUN_DIR STATES.pt VARIANTS.pt
    SHIFTS=-0.5,-1 python score_variants.py ...   # also each variant moved by those shifts (as uniform_shift.py)
    PARTIAL=1 python score_variants.py ...        # a variant run still going: unfitted tokens keep the run's rows
"""
import torch, sys, os
sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parent))
from common import direction, original_logits  # noqa: E402
from safetensors.torch import load_file
run = sys.argv[1]
D = torch.load(sys.argv[2]); V = torch.load(sys.argv[3])
H = torch.cat(D["H"]); nxt = torch.cat(D["nxt"]); new_ids = D["new_ids"]; norig = D["norig"]
st = load_file(f"{run}/model.safetensors")
W = st["lm_head.weight"].float()
is_new = nxt >= norig
logz, orig_lp = original_logits(H, nxt, W, norig)
def score(O):
    ln = H @ O.T
    lz = torch.logaddexp(logz, torch.logsumexp(ln, -1))
    tgt = torch.where(is_new, ln.gather(1, (nxt - norig).clamp(min=0)[:, None])[:, 0], orig_lp)
    p = (ln - lz[:, None]).exp()
    mis = float((p * (nxt[:, None] != new_ids[None, :])).sum() / len(H))
    return float(-(tgt - lz).sum()), float(-(tgt - lz)[is_new].sum()), mis
ref = score(W[new_ids])
CACHE = {}
print(f"positions {len(H)}, new-token targets {int(is_new.sum())}; run's own rows: total {ref[0]:.0f} words {ref[1]:.0f} misplaced {ref[2]:.4f}")
for name, rows in V.items():
    if len(rows) < len(new_ids) and not os.environ.get("PARTIAL"):
        print(name, "incomplete", len(rows)); continue
    # PARTIAL=1: tokens not fitted yet (a variant run still going) keep the run's own rows
    O = torch.stack([rows[t] if t in rows else W[new_ids[t]] for t in range(len(new_ids))])
    s = score(O)
    print(f"{name:10} total {s[0]:.0f} ({100*(s[0]/ref[0]-1):+.3f}%) words {s[1]:.0f} misplaced {s[2]:.4f}")
    for b in [float(x) for x in os.environ.get("SHIFTS", "").split(",") if x]:
        if "d" not in CACHE:  # the same direction for every variant and shift
            CACHE["d"] = direction(H)
        s = score(O + b * CACHE["d"])
        print(f"{'':10} shift {b:+.2f}: total {s[0]:.0f} ({100*(s[0]/ref[0]-1):+.3f}%) words {s[1]:.0f} misplaced {s[2]:.4f}")
