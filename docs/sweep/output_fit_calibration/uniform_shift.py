"""Measurement only (see ../output_fit_calibration.md): the extended model's total NLL (nats) on the
positions of hidden_states.py when every new token's output row moves along the direction d with
h @ d ~ 1 (least squares on the first half of the positions), i.e. every new token's logit is lowered
by the same amount at every position. Prints the NLL at the words, elsewhere, and the probability the
new tokens take where they do not come next, and each shift's gain over none in standard errors paired over
the documents (se: as `--output_rows_shift auto` judges it, token_distillation.output_rows.shift_gain).

    python uniform_shift.py RUN_DIR STATES.pt [SHIFTS]    # SHIFTS: comma-separated nats, default 0,-0.5,-1,-1.5,-2,-3
"""
import torch, json, sys
from safetensors.torch import load_file
sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[3]))  # the repository
from token_distillation.output_rows import shift_gain
sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parent))
from common import direction, original_logits  # noqa: E402
run = sys.argv[1]
D = torch.load(sys.argv[2])
H = torch.cat(D["H"]); nxt = torch.cat(D["nxt"]); new_ids = D["new_ids"]; norig = D["norig"]
st = load_file(f"{run}/model.safetensors"); W = st["lm_head.weight"].float()
is_new = nxt >= norig
logz, orig_lp = original_logits(H, nxt, W, norig)
d = direction(H)
def nll(O):
    ln = H @ O.T
    lz = torch.logaddexp(logz, torch.logsumexp(ln, -1))
    idx = (nxt - norig).clamp(min=0)
    tgt = torch.where(is_new, ln.gather(1, idx[:, None])[:, 0], orig_lp)
    p = (ln - lz[:, None]).exp()
    mis = float((p * (nxt[:, None] != new_ids[None, :])).sum() / len(H))
    words = float(-(tgt - lz)[is_new].sum()); rest = float(-(tgt - lz)[~is_new].sum())
    per_doc = [float(x.sum()) for x in torch.split(-(tgt - lz).double(), [len(h) for h in D["H"]])]
    return words + rest, words, rest, mis, per_doc
O = W[new_ids]
base = nll(O)
print("positions", len(H), "new-token targets", int(is_new.sum()))
shifts = [float(x) for x in sys.argv[3].split(",")] if len(sys.argv) > 3 else (0, -0.5, -1, -1.5, -2, -3)
for b in shifts:
    r = nll(O + b * d)
    gain, se = shift_gain([list(x) for x in zip(base[4], r[4])], 0, 1)
    print(f"shift {b:5}: total {r[0]:.0f} ({100*(r[0]/base[0]-1):+.2f}%) words {r[1]:.0f} rest {r[2]:.0f} misplaced {r[3]:.4f}"
          f" se {se:+.1f} over {len(r[4])} documents")
