"""The per-token training regime: each new token's result does not depend on how many other tokens
are trained in the same run.

Why: the paper's recipe (AdamW, lr 1e-4, batch 16, 1 epoch, 25 snippets per token) was run with
~2,500 tokens, where the snippet budget gives ~3,900 optimizer steps and each row receives about 25
sparse updates of one snippet each. With 20 tokens the same recipe gives ~30 steps in which every
row is updated (by momentum) at every step with a tiny step size, and the rows barely move. Three
pieces make every run behave like the large-run regime, for any number of tokens:

1. **Per-token batches** (:func:`per_token_batches`): each token's snippets are shuffled with a
   generator seeded by the token's text and split into groups of ``snippets_per_update``; a batch
   is a set of groups of different tokens (batches are filled across rounds over the tokens: 50
   tokens with 25 snippets in batches of 16 take 79 steps per epoch instead of 100). Every token
   therefore receives the same number of
   updates, each from the same snippets, whatever the other tokens are.
2. **Per-token loss** (:func:`per_token_loss`): the batch loss is the *sum over tokens* of each
   token's mean position loss, so a row's gradient is that of its own snippets only (it is not
   diluted by the number of other tokens in the batch).
3. **Row-wise Adam** (:class:`RowAdam`): Adam moments and the bias-correction step count are kept
   per row, and rows without gradient in a step are left untouched (no momentum carry-over), so a
   row's trajectory depends only on the gradients it receives.

4. **Optional per-row linear decay** (``--lr_schedule linear``; default ``constant``): row ``r``'s
   step size at its ``t``-th update is ``lr * (1 - (t - 1) / T_r)``, ``T_r`` being the number of
   updates that row receives in the run (per row, so it does not depend on the other tokens
   either). Measured on 24 PubMed words with SmolLM2 it closed less of the held-out gap than a
   constant step size (72% vs 76% at lr_relative 0.1; docs/sweep/), so it is not the default.

Adam's step size is in embedding units per coordinate, and embedding scales differ between models
(e.g. Gemma multiplies its rows by sqrt(hidden)); the learning rate is therefore given relative to
the RMS of the original embedding entries (:func:`relative_lr`).
"""

from __future__ import annotations

import collections
import hashlib
import math

import torch


class RowAdam(torch.optim.Optimizer):
    """Adam (no weight decay) for one ``[rows, hidden]`` parameter with per-row state.

    Only rows whose gradient is non-zero in a step are updated; each row has its own step count
    for bias correction (Kingma & Ba 2015, Alg. 1, applied row by row). Optimizer state:
    ``2 * rows * hidden`` floats plus ``rows`` step counters.

    Args:
        lr: step size (embedding units per coordinate).
        row_total_steps: optional ``[rows]`` number of updates each row will receive; when given,
            row ``r``'s step size at its ``t``-th update is ``lr * (1 - (t - 1) / T_r)`` (linear decay,
            per row). Rows updated more often than planned keep the last planned factor ``1 / T_r``.
    Raises:
        ValueError: ``row_total_steps`` has a non-positive entry, or a parameter is not 2-D (at step).
    """

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 row_total_steps: torch.Tensor | None = None):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps))
        if row_total_steps is not None:
            row_total_steps = torch.as_tensor(row_total_steps, dtype=torch.float32)
            if row_total_steps.numel() and bool((row_total_steps <= 0).any()):
                raise ValueError("row_total_steps must be positive")
            row_total_steps = row_total_steps.to(self.param_groups[0]["params"][0].device)  # once, not per step
        self.row_total_steps = row_total_steps

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            b1, b2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.dim() != 2:
                    raise ValueError("RowAdam expects [rows, hidden] parameters")
                g = p.grad.float()
                st = self.state[p]
                if not st:
                    st["exp_avg"] = torch.zeros_like(p, dtype=torch.float32)
                    st["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.float32)
                    st["step"] = torch.zeros(p.shape[0], dtype=torch.float32, device=p.device)
                active = g.abs().amax(dim=1) > 0
                if not bool(active.any()):
                    continue
                idx = active.nonzero().squeeze(1)
                ga = g[idx]
                m = st["exp_avg"][idx].mul_(b1).add_(ga, alpha=1 - b1)
                v = st["exp_avg_sq"][idx].mul_(b2).addcmul_(ga, ga, value=1 - b2)
                t = st["step"][idx] + 1
                st["exp_avg"][idx] = m
                st["exp_avg_sq"][idx] = v
                st["step"][idx] = t
                bc1 = (1 - b1 ** t).unsqueeze(1)
                bc2 = (1 - b2 ** t).unsqueeze(1)
                update = (m / bc1) / ((v / bc2).sqrt() + group["eps"])
                lr = group["lr"]
                if self.row_total_steps is not None:
                    total = self.row_total_steps[idx]
                    lr = lr * (1 - (t - 1) / total).clamp_min(1 / total).unsqueeze(1)
                p[idx] = (p[idx].float() - lr * update).to(p.dtype)
        return loss


def _token_seed(seed: int, text: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}|{text}".encode()).digest()[:8], "little") & ((1 << 63) - 1)


def per_token_batches(token_index: list[int], texts: list[str], *, snippets_per_update: int, groups_per_batch: int,
                      epochs: int, seed: int, positions: list[int] | None = None) -> list[list[int]]:
    """Batches of snippet indices in which every token's snippets come in fixed per-token groups.

    Args:
        token_index: ``[num_snippets]`` token of each snippet.
        texts: token texts (seed each token's shuffle, so it does not depend on the other tokens).
        snippets_per_update: snippets of one token per group (one update of that row).
        groups_per_batch: groups (of different tokens) per batch.
        positions: optional ``[num_snippets]`` student position of each snippet's first new token.
            When given, the groups of each round (one group of every token with groups left) are
            ordered by their smallest position (ascending and descending in turn; stable, so ties
            keep the seeded order), so that a
            batch holds snippets whose first new token sits at about the same position and the
            prefix they share before it (computed once, :mod:`token_distillation.fastpath`) is
            long. A token's own groups keep their order, so its updates are unchanged.
    Returns:
        list of batches (lists of snippet indices); each token appears at most once per batch.
    """
    by_token: dict[int, list[int]] = {}
    for i, t in enumerate(token_index):
        by_token.setdefault(t, []).append(i)
    order_gen = torch.Generator().manual_seed(seed)
    batches: list[list[int]] = []
    for epoch in range(epochs):
        queues: list[list[list[int]]] = []
        for t in sorted(by_token):
            g = torch.Generator().manual_seed(_token_seed(seed + epoch, texts[t]))
            snips = [by_token[t][j] for j in torch.randperm(len(by_token[t]), generator=g).tolist()]
            n_groups = math.ceil(len(snips) / snippets_per_update)
            queues.append([snips[k::n_groups] for k in range(n_groups)])  # near-equal groups
        # rounds over the tokens in a seeded order (one group of every token with groups left per
        # round), packed into full batches across rounds; a token never has two groups in a batch
        stream: list[tuple[int, list[int]]] = []
        descending = False
        while any(queues):
            live = [k for k, q in enumerate(queues) if q]
            one_round = [(live[j], queues[live[j]].pop(0)) for j in torch.randperm(len(live), generator=order_gen).tolist()]
            if positions is not None:  # alternate up and down, so a batch spanning two rounds is grouped too
                one_round.sort(key=lambda entry: min(positions[i] for i in entry[1]), reverse=descending)
                descending = not descending
            stream.extend(one_round)
        batches.extend(_pack(stream, groups_per_batch))
    return batches


def _pack(stream: list[tuple[int, list[int]]], groups_per_batch: int) -> list[list[int]]:
    """Greedy packing of ``(token, group)`` entries into batches of up to ``groups_per_batch``
    groups of distinct tokens, keeping each token's groups in stream order."""
    remaining = collections.Counter(t for t, _ in stream)
    live = len(remaining)  # tokens with groups left
    pending = collections.deque(stream)
    out: list[list[int]] = []
    while pending:
        want = min(groups_per_batch, live)
        seen: set[int] = set()
        batch: list[int] = []
        skipped: list[tuple[int, list[int]]] = []
        while pending and len(seen) < want:
            t, group = pending.popleft()
            if t in seen:
                skipped.append((t, group))
                continue
            seen.add(t)
            batch.extend(group)
            remaining[t] -= 1
            live -= remaining[t] == 0
        pending.extendleft(reversed(skipped))
        out.append(batch)
    return out


def row_update_counts(batches: list[list[int]], token_index: list[int], num_tokens: int) -> torch.Tensor:
    """``[num_tokens]`` number of batches in which each token has a snippet (its planned updates).

    Tokens without any snippet get 1 (they are never updated; the value only keeps the schedule
    defined).
    """
    counts = torch.zeros(num_tokens, dtype=torch.float32)
    for b in batches:
        for t in {token_index[i] for i in b}:
            counts[t] += 1
    return counts.clamp_min(1)


def per_token_loss(per_position: torch.Tensor, row_of_position: torch.Tensor, token_of_row: torch.Tensor,
                   num_tokens: int) -> torch.Tensor:
    """Sum over tokens of each token's mean per-position loss.

    Args:
        per_position: ``[num_positions]`` loss per aligned position.
        row_of_position: ``[num_positions]`` batch row of each position.
        token_of_row: ``[batch]`` token index each snippet was mined for.
    Returns:
        scalar tensor.
    """
    tok = token_of_row[row_of_position]
    sums = torch.zeros(num_tokens, dtype=per_position.dtype, device=per_position.device).index_add(0, tok, per_position)
    counts = torch.zeros(num_tokens, dtype=per_position.dtype, device=per_position.device).index_add(
        0, tok, torch.ones_like(per_position))
    present = counts > 0
    return (sums[present] / counts[present]).sum()


def entry_rms(weight: torch.Tensor, num_original: int, chunk_rows: int = 8192) -> float:
    """RMS of the entries of the first ``num_original`` rows of ``weight`` (``[vocab, hidden]``).

    Computed over blocks of ``chunk_rows`` rows, so that no float32 copy of the whole
    ``[vocab, hidden]`` matrix is made (4.2 GB for a 128k x 4096 bf16 matrix on the GPU).
    """
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, num_original, chunk_rows):
            block = weight[start: min(start + chunk_rows, num_original)].detach().float()
            total += float(block.pow(2).sum(dtype=torch.float64))
            count += block.numel()
    return float((total / max(count, 1)) ** 0.5)


def relative_lr(lr_relative: float, weight: torch.Tensor, num_original: int, chunk_rows: int = 8192) -> float:
    """Absolute Adam step size: ``lr_relative * RMS(original embedding entries)`` (:func:`entry_rms`)."""
    return float(lr_relative * entry_rms(weight, num_original, chunk_rows))
