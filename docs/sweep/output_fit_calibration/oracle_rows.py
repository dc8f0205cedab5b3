"""Measurement only (see ../output_fit_calibration.md, section 7): how far could output rows alone go?
The new tokens' output rows are fitted directly to the extended model's total NLL of documents (every
token a target, the full extended softmax, the quantity bits per byte measures; the hidden states of
hidden_states.py, i.e. the run's trained input rows), starting from the run's rows. Convex in the rows.
Two fits: on every document (in-sample: a bound no fit of the output rows can beat on these documents
with these input rows), and on the even-numbered documents, scored on the odd-numbered ones (what that
much text of the same kind would give), each beside the run's rows and the run's rows moved by -1 nat.

    python oracle_rows.py RUN_DIR STATES.pt [STEPS]
    python oracle_rows.py RUN_DIR STATES.pt STEPS RIDGES    # shifts only (one, and per token for each ridge weight)
"""
import sys
import torch
from safetensors.torch import load_file
sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parent))
from common import direction, original_logits  # noqa: E402

run = sys.argv[1]
D = torch.load(sys.argv[2])
steps = int(sys.argv[3]) if len(sys.argv) > 3 else 300
H_docs = D["H"]; nxt_docs = D["nxt"]; new_ids = D["new_ids"]; norig = D["norig"]
W = load_file(f"{run}/model.safetensors")["lm_head.weight"].float()


def prepare(idx):
    H = torch.cat([H_docs[i] for i in idx]); nxt = torch.cat([nxt_docs[i] for i in idx])
    return (H, nxt, *original_logits(H, nxt, W, norig))


def nll(O, data):
    H, nxt, logz, orig_lp = data
    ln = H @ O.T
    lz = torch.logaddexp(logz, torch.logsumexp(ln, -1))
    is_new = nxt >= norig
    tgt = torch.where(is_new, ln.gather(1, (nxt - norig).clamp(min=0)[:, None])[:, 0], orig_lp)
    return -(tgt - lz).sum()


def fit(data, O0, per_token_shift=False, one_shift=False, ridge=0.0):
    """Rows fitted from O0: every entry (default), or only a shift along d per token / one for all
    (``ridge``: weight of sum(shift^2) in nats^2, the shifts' pull towards 0)."""
    if per_token_shift or one_shift:
        sh = torch.zeros(1 if one_shift else len(O0), requires_grad=True)
        opt, rows = torch.optim.Adam([sh], lr=0.05), lambda: O0 + sh[:, None] * d
    else:
        O = O0.clone().requires_grad_(True)
        opt, rows = torch.optim.Adam([O], lr=0.01 * float(W[:norig].pow(2).mean().sqrt())), lambda: O
    for s in range(steps):
        opt.zero_grad()
        loss = nll(rows(), data) + (ridge * sh.pow(2).sum() if per_token_shift or one_shift else 0)
        loss.backward()
        opt.step()
        if s % 100 == 0:
            print(f"  step {s}: {float(loss.detach()):.0f}", flush=True)
    return rows().detach()


d = direction(torch.cat(H_docs))
O_run = W[new_ids]
even, odd = prepare(range(0, len(H_docs), 2)), prepare(range(1, len(H_docs), 2))
every = tuple(torch.cat([a, b]) for a, b in zip(even, odd))  # all documents (the NLL is a sum over positions)
with torch.no_grad():
    base_all, base_odd = float(nll(O_run, every)), float(nll(O_run, odd))
    print(f"run's rows: all documents {base_all:.0f}, odd documents {base_odd:.0f}")
    print(f"run's rows -1 nat: all {float(nll(O_run - d, every)):.0f}, odd {float(nll(O_run - d, odd)):.0f}")
if len(sys.argv) > 4:  # shifts only: one for all tokens, and one per token with ridge weights
    for name, kw in [("one shift", dict(one_shift=True))] + [
            (f"per-token shifts, ridge {r}", dict(per_token_shift=True, ridge=r)) for r in map(float, sys.argv[4].split(","))]:
        O_even = fit(even, O_run, **kw)
        with torch.no_grad():
            v = float(nll(O_even, odd))
        print(f"{name} fitted on even documents, scored on odd: {v:.0f} ({100 * (v / base_odd - 1):+.2f}% vs the run's rows)")
    sys.exit()
O_all = fit(every, O_run)
with torch.no_grad():
    v = float(nll(O_all, every))
    print(f"fitted on all documents, in-sample: {v:.0f} ({100 * (v / base_all - 1):+.2f}% vs the run's rows)")
O_even = fit(even, O_run)
with torch.no_grad():
    v = float(nll(O_even, odd))
    print(f"fitted on even documents, scored on odd: {v:.0f} ({100 * (v / base_odd - 1):+.2f}% vs the run's rows)")
