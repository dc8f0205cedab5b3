"""Initialisation methods for new input-embedding rows, in a registry keyed by ``InitMethod``.

Each function returns ``[num_new, hidden]`` float32 rows computed from the model's *original*
rows (ids of the source vocabulary), never from other new rows.
"""

from __future__ import annotations

from typing import Callable

import torch

from .config import InitMethod
from .tokenization import NewToken


def subtoken_mean(weight: torch.Tensor, tokens: list[NewToken], seed: int = 0, num_original: int | None = None) -> torch.Tensor:
    """Mean of each token's subtoken rows (FVT; Gee et al. 2022): ``e* = 1/k * sum_i E[t_i]``.

    Args:
        weight: ``[vocab_rows, hidden]`` input-embedding matrix.
    Returns:
        ``[num_new, hidden]`` float32.
    """
    return torch.stack([weight[list(t.subtoken_ids)].float().mean(dim=0) for t in tokens])


def random_init(weight: torch.Tensor, tokens: list[NewToken], seed: int = 0, num_original: int | None = None) -> torch.Tensor:
    """Rows drawn per dimension from a normal with the original rows' mean and std (seeded).

    Args:
        weight: ``[vocab_rows, hidden]``; only the first ``num_original`` rows are used.
    Returns:
        ``[num_new, hidden]`` float32.
    """
    w = weight[: num_original or weight.shape[0]].float()
    mean, std = w.mean(dim=0), w.std(dim=0)
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn((len(tokens), w.shape[1]), generator=gen).to(w.device)
    return mean + noise * std


INITIALISERS: dict[InitMethod, Callable[..., torch.Tensor]] = {
    InitMethod.TOKEN_DISTILLATION: subtoken_mean,
    InitMethod.SUBTOKEN_MEAN: subtoken_mean,
    InitMethod.RANDOM: random_init,
}

#: methods that run the training loop after initialisation
TRAINED = {InitMethod.TOKEN_DISTILLATION}
