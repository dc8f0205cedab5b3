"""Measurement only (see ../output_fit_calibration.md): refit a run's output rows once
(scripts/refit_output_rows.py) and fit several variants of the objective on the same collected positions:
the share of each token's objective on its own snippets (the rest on background positions), and (section 7)
the start and penalty centre: ``cal*`` start from the first subtoken's output row moved by ``s * d`` (``d``:
the ridge direction with ``h @ d ~ 1`` on the group's training positions), ``s`` the token's best shift of that
row under its own weighted objective (a grid of 1/8 nat), so that the prior says "the first subtoken's
probability times a constant completion rate"; ``_aX``: penalty weight X instead of ANCHOR. The run
continues with the default; the variants' rows are saved to VARIANTS.pt ({variant: {token index: row}}).

    VARIANTS=default,bg97,bg99 python fit_variants.py RUN_DIR OUT_DIR VARIANTS.pt

SKIP_HELDOUT=1 skips the held-out distillation-loss passes before and after (not needed for the variants;
the run directory written then reports no held-out loss).
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
    "cal": "cal", "cal_a01": "cal", "cal_a03": "cal", "cal_a1": "cal",
}
ANCHORS = {"cal_a01": 0.1, "cal_a03": 0.3, "cal_a1": 1.0}
SHIFTS = torch.arange(-16, 4.001, 0.125)
def calibrated(model, first, pos, bias):
    """first + s * d per token, s the token's best uniform shift under its weighted objective."""
    h = pos.h.double()
    gram = h.T @ h
    ridge = o.SHIFT_RIDGE * float(gram.diagonal().mean()) + 1e-12
    d = torch.linalg.solve(gram + ridge * torch.eye(h.shape[1], dtype=h.dtype), h.sum(0)).float()
    n = first.shape[0]
    w = o.position_weights(pos, n)
    loss = torch.stack([torch.zeros(n).index_add_(0, pos.owner, o.binary_kl(o._logits(model, first + s * d, pos, bias),
                                                                          pos.log_z, pos.target) * w) for s in SHIFTS])
    best = SHIFTS[loss.argmin(0)]
    best = torch.where(torch.zeros(n).index_add_(0, pos.owner, w) > 0, best, torch.zeros(()))
    CUR.setdefault("shifts", []).extend(best.tolist())
    return first + best[:, None] * d
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
    cal = None
    for name, share in VARIANTS.items():
        if share == "cal":
            if cal is None:
                with torch.no_grad():
                    cal = calibrated(model, init.float(), pos, bias)
            r = orig_fit(model, cal, pos, bias, lr, steps, **{**kw, "anchor_weight": ANCHORS.get(name, o.ANCHOR)})
        else:
            o.position_weights = weights_with(share(group)) if share else orig_weights
            r = orig_fit(model, init, pos, bias, lr, steps, **kw)
        o.position_weights = orig_weights
        for gi, t in enumerate(group):
            STORE[name][t] = r[0][gi].clone()
        if name == "default":
            result = r
    if CUR.get("shifts"):
        sh = torch.tensor(CUR["shifts"])
        logging.info("calibrated start: shifts so far min %.2f median %.2f max %.2f", sh.min(), sh.median(), sh.max())
    torch.save(STORE, vout)
    return result
o.fit, o._fit_group = fit_wrapper, group_wrapper
if os.environ.get("SKIP_HELDOUT"):  # the variants need only the fit's positions: skip the held-out passes
    import token_distillation.pipeline as pl
    pl.heldout_eval = lambda model, rows, seqs, tix, n, **kw: pl.HeldoutResult([None] * n, None)
import refit_output_rows
logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
refit_output_rows.main(run, out)
