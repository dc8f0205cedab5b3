"""Measurement only (see ../output_fit_calibration.md): refit a run's output rows once
(scripts/refit_output_rows.py) and fit several variants of the objective on the same collected positions:
the share of each token's objective on its own snippets (the rest on background positions). The run
continues with the default; the variants' rows are saved to VARIANTS.pt ({variant: {token index: row}}).

    VARIANTS=default,bg97,bg99 python fit_variants.py RUN_DIR OUT_DIR VARIANTS.pt
"""
import json, logging, sys, math
ROOT = __import__("pathlib").Path(__file__).resolve().parents[3]  # the repository
sys.path.insert(0, str(ROOT / "scripts")); sys.path.insert(0, str(ROOT))
import torch
import token_distillation.output_rows as o
run, out, vout = sys.argv[1], sys.argv[2], sys.argv[3]
rep = json.load(open(f"{run}/report.json"))
L, T = rep["config"]["snippet_len"], rep["snippets"]["num_tokens"]
occ = [json.loads(l)["occurrences"] or 0 for l in open(f"{run}/new_tokens.jsonl")]
orig_fit, orig_group, orig_weights = o.fit, o._fit_group, o.position_weights
CUR = {}
def mixture(lo=1e-4, hi=0.1):
    return lambda g: [min(hi, max(lo, occ[t] * L / T)) for t in g]
VARIANTS = {  # name: own share per token of the group, or None: 1 - BACKGROUND_SHARE (the default)
    "default": None,
    "bg97": lambda g: [0.03] * len(g),
    "bg99": lambda g: [0.01] * len(g),
    "bg995": lambda g: [0.005] * len(g),
    "bg999": lambda g: [0.001] * len(g),
    "mix": mixture(),
}
import os
if os.environ.get("VARIANTS"):
    VARIANTS = {k: VARIANTS[k] for k in os.environ["VARIANTS"].split(",")}
STORE = {k: {} for k in VARIANTS}
def weights_with(own_share):
    def pw(pos, n):
        bg = pos.background
        ones = torch.ones_like(pos.target)
        n_own = torch.zeros(n).index_add_(0, pos.owner[~bg], ones[~bg])
        n_bg = torch.zeros(n).index_add_(0, pos.owner[bg], ones[bg])
        share = torch.where(n_bg > 0, 1 - torch.tensor(own_share), torch.tensor(0.0)) * (n_own > 0)
        return torch.where(bg, (share / n_bg.clamp(min=1))[pos.owner], ((n_own > 0) * (1 - share) / n_own.clamp(min=1))[pos.owner])
    return pw
def group_wrapper(model, rows, group, *a, **k):
    CUR["group"] = group
    return orig_group(model, rows, group, *a, **k)
def fit_wrapper(model, init, pos, bias, lr, steps=None, **kw):
    group = CUR["group"]
    logging.info("group of %d", len(group))
    result = None
    for name, share in VARIANTS.items():
        o.position_weights = weights_with(share(group)) if share else orig_weights
        r = orig_fit(model, init, pos, bias, lr, steps, **kw)
        o.position_weights = orig_weights
        for gi, t in enumerate(group):
            STORE[name][t] = r[0][gi].clone()
        if name == "default":
            result = r
    torch.save(STORE, vout)
    return result
o.fit, o._fit_group = fit_wrapper, group_wrapper
import refit_output_rows
logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
refit_output_rows.main(run, out)
