"""Measurement only: what the scripts of this folder that score output rows on saved hidden states share."""
import torch


@torch.no_grad()
def original_logits(H, nxt, W, norig, chunk=512):
    """``(logz, orig_lp)``, both ``[positions]``: the logsumexp of the original vocabulary's logits
    ``H @ W[:norig].T`` at every position, and the logit of the next token where it is an original one
    (0 where it is a new token); ``chunk`` positions at a time (Gemma-3: 262k logits each)."""
    logz = torch.empty(len(H)); orig_lp = torch.zeros(len(H))
    for i in range(0, len(H), chunk):
        lo = H[i:i+chunk] @ W[:norig].T
        logz[i:i+chunk] = torch.logsumexp(lo, -1)
        n = nxt[i:i+chunk]
        orig_lp[i:i+chunk] = torch.where(n >= norig, torch.zeros(()), lo.gather(1, n.clamp(max=norig-1)[:, None])[:, 0])
    return logz, orig_lp


def direction(H):
    """``d [hidden]`` with ``H @ d ~ 1``: ridge least squares (weight 0.1) on the first half of the positions
    ``H [positions, hidden]``; moving a new token's output row by ``s * d`` moves its logit by about ``s``."""
    A = H[: len(H) // 2]
    return torch.linalg.solve(A.T @ A + 1e-1 * torch.eye(A.shape[1]), A.T @ torch.ones(len(A)))
