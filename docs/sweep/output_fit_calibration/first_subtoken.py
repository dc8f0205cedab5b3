"""Measurement only (see ../output_fit_calibration.md, section 8): what the expected cost that no output rows
avoid is worth, by taking it away exactly. With the original rows frozen, the word's first subtoken t1 keeps
the probability it had under the original model, which included the word's; the extended tokenizer never
writes t1 followed by the rest of the word, so that share is wasted and every other token pays for it in the
normaliser. Here, on the saved hidden states of hidden_states.py, t1's probability mass is lowered by the
new tokens' masses of the words it starts (never below KAPPA times its own), so that
p'(x) = exp(z_x) / Z_orig for every other original token wherever nothing is clamped:
    a'_t1 = max(a_t1 - sum_{w: t1(w) = t1} b_w, KAPPA * a_t1),   a = exp(z - logZ_orig), b = exp(z_new - logZ_orig)
This is not something a linear output layer can write (log(a - b) is not linear in the hidden state): it is
the bound for what refitting t1's output row could give. Printed: the total NLL of the documents (nats, every
token a target) for the run's rows and the rows moved by SHIFTS along d, with and without the correction,
split by target (a new token / a first subtoken of a new word / any other token).

    python first_subtoken.py RUN_DIR STATES.pt [SHIFTS] [KAPPAS]
"""
import json
import sys
import torch
from safetensors.torch import load_file
sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parent))
from common import direction  # noqa: E402

torch.set_num_threads(int(__import__("os").environ.get("THREADS", "2")))
run = sys.argv[1]
D = torch.load(sys.argv[2])
shifts = [float(s) for s in (sys.argv[3] if len(sys.argv) > 3 else "0,-1").split(",")]
kappas = [float(k) for k in (sys.argv[4] if len(sys.argv) > 4 else "0.01,0.1,0.3").split(",")]
H = torch.cat(D["H"]).double(); nxt = torch.cat(D["nxt"]); new_ids = D["new_ids"]; norig = D["norig"]
W = load_file(f"{run}/model.safetensors")["lm_head.weight"].double()
tokens = json.load(open(f"{run}/report.json"))["tokens"]
assert [t["id"] for t in tokens] == new_ids.tolist()
first = torch.tensor([t["subtoken_ids"][0] for t in tokens])          # [new] t1 of each word
firsts = torch.unique(first)                                           # [F] distinct first subtokens
slot = torch.searchsorted(firsts, first)                               # [new] index into firsts
d = direction(H.float()).double()
is_new = nxt >= norig
is_first = torch.isin(nxt, firsts) & ~is_new
print(f"positions {len(H)}, new-token targets {int(is_new.sum())}, first-subtoken targets {int(is_first.sum())},"
      f" {len(firsts)} distinct first subtokens of {len(first)} words")


def nlls(O, kappa=None, chunk=1024):
    """[positions] NLL of the next token under the extended model (rows O), corrected when kappa is given."""
    out = torch.empty(len(H), dtype=torch.float64)
    for i in range(0, len(H), chunk):
        h, n = H[i:i+chunk], nxt[i:i+chunk]
        lo = h @ W[:norig].T
        logz = torch.logsumexp(lo, -1, keepdim=True)
        la = lo - logz                                                 # log a, original tokens
        lb = h @ O.T - logz                                            # log b, new tokens
        b = lb.exp()
        la_f = la[:, firsts]                                           # [chunk, F]
        if kappa is None:
            la_f_new = la_f
        else:
            S = torch.zeros(len(h), len(firsts), dtype=torch.float64).index_add_(1, slot, b)
            a_f = la_f.exp()
            la_f_new = torch.maximum(a_f - S, kappa * a_f).clamp_min(1e-300).log()
        # Z' = 1 + sum b - sum_f (a_f - a'_f)
        logZ = torch.log1p(b.sum(-1) - (la_f.exp() - la_f_new.exp()).sum(-1))
        la = la.clone(); la[:, firsts] = la_f_new
        tgt = torch.where(n >= norig, lb.gather(1, (n - norig).clamp(min=0)[:, None])[:, 0],
                          la.gather(1, n.clamp(max=norig - 1)[:, None])[:, 0])
        out[i:i+chunk] = logZ - tgt
    return out


def show(name, v, base):
    parts = [float(v[m].sum()) for m in (is_new, is_first, ~is_new & ~is_first)]
    print(f"{name:38s} total {float(v.sum()):9.0f} ({100 * (float(v.sum()) / base - 1):+.2f}% vs the run's rows)"
          f"  new {parts[0]:7.0f}  first {parts[1]:7.0f}  other {parts[2]:8.0f}", flush=True)


O_run = W[new_ids]
with torch.no_grad():
    base = float(nlls(O_run).sum())
    for s in shifts:
        O = O_run + s * d
        show(f"shift {s:+g}", nlls(O), base)
        for k in kappas:
            show(f"shift {s:+g}, t1 corrected (kappa {k:g})", nlls(O, k), base)
