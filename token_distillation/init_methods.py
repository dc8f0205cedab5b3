"""Initialisation methods for new input-embedding rows, in a registry keyed by ``InitMethod``.

Each function returns ``[num_new, hidden]`` float32 rows computed from the model's *original*
rows (ids of the source vocabulary), never from other new rows. Trained methods
(``token_distillation``, ``token_distillation-randinit``, ``ntp``) use these as their starting point.
"""

from __future__ import annotations

from typing import Callable

import torch

from .config import TRAINED_METHODS, InitMethod
from .tokenization import NewToken


def subtoken_mean(weight: torch.Tensor, tokens: list[NewToken], seed: int = 0, num_original: int | None = None) -> torch.Tensor:
    """Mean of each token's subtoken rows (FVT; Gee et al. 2022): ``e* = 1/k * sum_i E[t_i]``.

    Args:
        weight: ``[vocab_rows, hidden]`` embedding matrix (input or output).
    Returns:
        ``[num_new, hidden]`` float32.
    """
    return torch.stack([weight[list(t.subtoken_ids)].float().mean(dim=0) for t in tokens])


def adaptivocab_weights(k: int, output: bool = False) -> torch.Tensor:
    """Position weights ``[k]`` of AdaptiVocab's exponential initialisation (sum to 1).

    AdaptiVocab (Nakash et al., arXiv 2503.19693, Sec. 3, "exponential initialization"), as we
    read it: an input row is ``e* = sum_{i=1..k} w_i E_in[t_i]`` with
    ``w_i = exp(2 i) / sum_{j=1..k} exp(2 j)`` (later subtokens weigh more: the last subtoken's
    position is where the original model has read the whole word), and an output row uses the
    mirrored weights ``w_i = exp(-2 i) / sum_j exp(-2 j)`` (the first subtoken is what the model
    predicts when it is about to produce the word). Positions are 1-based (the normalisation makes
    the offset irrelevant). The paper's text was not reachable from the development machine; the
    formula agrees with the paper's summaries ("exponentially weighted combination") and with an
    independent public implementation of AdaptiVocab's initialisation (exponents ``+2i`` for input
    and ``-2i`` for output rows, normalised to sum to 1).
    """
    i = torch.arange(1, k + 1, dtype=torch.float64)
    logits = (-2.0 if output else 2.0) * i
    return torch.softmax(logits, dim=0).float()


def weighted_mean(weight: torch.Tensor, tokens: list[NewToken], seed: int = 0, num_original: int | None = None,
                  output: bool = False) -> torch.Tensor:
    """Position-weighted subtoken mean (AdaptiVocab; weights from :func:`adaptivocab_weights`).

    Args:
        weight: ``[vocab_rows, hidden]`` embedding matrix.
        output: use the output-row weighting (first subtoken weighs most).
    Returns:
        ``[num_new, hidden]`` float32.
    """
    rows = []
    for t in tokens:
        w = adaptivocab_weights(len(t.subtoken_ids), output).to(weight.device)
        rows.append((w.unsqueeze(1) * weight[list(t.subtoken_ids)].float()).sum(dim=0))
    return torch.stack(rows)


def random_init(weight: torch.Tensor, tokens: list[NewToken], seed: int = 0, num_original: int | None = None) -> torch.Tensor:
    """Rows drawn per dimension from a normal with the original rows' mean and std (seeded).

    Args:
        weight: ``[vocab_rows, hidden]``; only the first ``num_original`` rows are used.
    Returns:
        ``[num_new, hidden]`` float32.
    """
    n = num_original or weight.shape[0]
    total = torch.zeros(weight.shape[1], dtype=torch.float64, device=weight.device)
    squares = torch.zeros_like(total)
    for start in range(0, n, 8192):  # in blocks: no float copy of the whole matrix
        block = weight[start: min(start + 8192, n)].detach().double()
        total += block.sum(dim=0)
        squares += block.pow(2).sum(dim=0)
    mean = total / n
    std = ((squares - n * mean.pow(2)) / max(n - 1, 1)).clamp_min(0).sqrt()
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn((len(tokens), weight.shape[1]), generator=gen).to(weight.device)
    return (mean + noise * std).float()


INITIALISERS: dict[InitMethod, Callable[..., torch.Tensor]] = {
    InitMethod.TOKEN_DISTILLATION: subtoken_mean,
    InitMethod.TOKEN_DISTILLATION_RANDINIT: random_init,
    InitMethod.NTP: subtoken_mean,
    InitMethod.SUBTOKEN_MEAN: subtoken_mean,
    InitMethod.WEIGHTED_MEAN: weighted_mean,
    InitMethod.RANDOM: random_init,
}

#: methods that run the training loop after initialisation
TRAINED = TRAINED_METHODS
