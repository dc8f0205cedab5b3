"""Training losses, in a registry keyed by :class:`~token_distillation.config.LossMethod`.

Each entry is a :class:`LossSpec`: a pure function plus what it needs, so that the training loop
computes logits only when a selected loss asks for them (the hidden-only path runs no output
layer at all). Inputs are already gathered at the aligned loss positions:

- hidden states ``[num_positions, hidden]`` at ``--target_layer``;
- logits ``[num_positions, num_original_vocab]`` over the *original* vocabulary (new tokens
  excluded, so teacher and student distributions live on the same support);
- for CE, student logits ``[num_ce_positions, num_original_vocab + num_new]`` and targets
  ``[num_ce_positions]`` (indices into that concatenated vocabulary).

Combination (:func:`combine`): the distillation terms are summed; ``CE`` is added as is;
``CE-auto-weighted`` is added as ``alpha * CE`` with ``alpha = D / CE`` computed each step from the
detached values (``D`` = the summed distillation terms), so the CE term has the magnitude of the
distillation loss but still gives CE's gradient direction (the "+alpha NTP" variant of Dobler et
al., arXiv 2505.20133). At any step the combined value is therefore exactly ``2 * D``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from .config import DISTILLATION_LOSSES, LossMethod


def mse_on_hiddens(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Mean squared error over positions and hidden dimensions (computed in float32).

    Token Distillation's objective (Dobler et al., arXiv 2505.20133, Sec. 3):
    ``L = 1/(N*H) * sum_n ||h_student[n] - h_teacher[n]||^2`` at the target layer.

    Args:
        student: ``[num_positions, hidden]`` student hidden states (with grad).
        teacher: ``[num_positions, hidden]`` teacher hidden states (no grad).

    Returns:
        scalar tensor; 0 when there are no positions.

    Raises:
        ValueError: shapes differ.
    """
    empty = _empty_or_mismatch(student, teacher)
    if empty is not None:
        return empty
    return torch.mean((student.float() - teacher.float()) ** 2)


def _empty_or_mismatch(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor | None:
    """Shared check of the paired losses: ValueError on a shape mismatch, a zero (keeping the graph)
    when there are no positions, else None."""
    if student.shape != teacher.shape:
        raise ValueError(f"shape mismatch: student {tuple(student.shape)} vs teacher {tuple(teacher.shape)}")
    if student.numel() == 0:
        return student.sum() * 0.0
    return None


def mse_per_position(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Per-position MSE ``[num_positions]`` (mean over hidden), for per-token reporting."""
    return torch.mean((student.float() - teacher.float()) ** 2, dim=-1)


def mse_on_logits(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """MSE between student and teacher logits over the original vocabulary (float32).

    ``L = 1/(N*V) * sum_n ||z_student[n] - z_teacher[n]||^2``.

    Args:
        student, teacher: ``[num_positions, num_original_vocab]`` logits.

    Returns:
        scalar; 0 when there are no positions.
    """
    return mse_on_hiddens(student, teacher)


def kl_on_logits(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """KL(teacher || student) of the next-token distributions over the original vocabulary.

    ``L = 1/N * sum_n sum_v p_t[n,v] (log p_t[n,v] - log p_s[n,v])`` with ``p = softmax(z)``
    (temperature 1), in nats per position; computed in float32.

    Args:
        student, teacher: ``[num_positions, num_original_vocab]`` logits.

    Returns:
        scalar; 0 when there are no positions.

    Raises:
        ValueError: shapes differ.
    """
    empty = _empty_or_mismatch(student, teacher)
    if empty is not None:
        return empty
    log_s = F.log_softmax(student.float(), dim=-1)
    log_t = F.log_softmax(teacher.float(), dim=-1)
    return F.kl_div(log_s, log_t, log_target=True, reduction="batchmean")


def next_token_ce(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy (nats per position), float32.

    Args:
        logits: ``[num_positions, vocab]`` student logits (original vocabulary + new tokens).
        targets: ``[num_positions]`` long, index of the true next token in that vocabulary.

    Returns:
        scalar; 0 when there are no positions.
    """
    if logits.shape[0] == 0:
        return logits.sum() * 0.0
    return F.cross_entropy(logits.float(), targets)


@dataclass(frozen=True)
class LossSpec:
    """A registered loss.

    Attributes:
        fn: ``fn(student, teacher) -> scalar`` for distillation losses, ``fn(logits, targets)`` for CE.
        needs_hiddens: needs hidden states at ``--target_layer`` (teacher and student).
        needs_logits: needs teacher and student logits over the original vocabulary at the
            aligned positions.
        needs_ce: needs the student's next-token logits over original + new vocabulary.
    """

    fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    needs_hiddens: bool = False
    needs_logits: bool = False
    needs_ce: bool = False


LOSSES: dict[LossMethod, LossSpec] = {
    LossMethod.MSE_ON_HIDDENS: LossSpec(mse_on_hiddens, needs_hiddens=True),
    LossMethod.MSE_ON_LOGITS: LossSpec(mse_on_logits, needs_logits=True),
    LossMethod.KL_ON_LOGITS: LossSpec(kl_on_logits, needs_logits=True),
    LossMethod.CE: LossSpec(next_token_ce, needs_ce=True),
    LossMethod.CE_AUTO_WEIGHTED: LossSpec(next_token_ce, needs_ce=True),
}


@dataclass(frozen=True)
class LossPlan:
    """What a list of losses needs from the forward passes (computed once per run).

    Attributes:
        methods: the selected losses, in the order given.
        needs_teacher: any distillation loss (the teacher forward can be skipped otherwise).
        needs_hiddens / needs_logits / needs_ce: union over ``methods`` (see :class:`LossSpec`).
    """

    methods: tuple[LossMethod, ...]

    @property
    def needs_teacher(self) -> bool:
        return any(m in DISTILLATION_LOSSES for m in self.methods)

    @property
    def needs_hiddens(self) -> bool:
        return any(LOSSES[m].needs_hiddens for m in self.methods)

    @property
    def needs_logits(self) -> bool:
        return any(LOSSES[m].needs_logits for m in self.methods)

    @property
    def needs_ce(self) -> bool:
        return any(LOSSES[m].needs_ce for m in self.methods)


def combine(terms: dict[LossMethod, torch.Tensor]) -> torch.Tensor:
    """Total loss from the individual terms (see the module docstring).

    ``CE-auto-weighted``: ``alpha * CE`` with ``alpha = (D / CE).detach()``, ``D`` the sum of the
    distillation terms; alpha receives no gradient. Without a distillation term it is plain CE.

    Args:
        terms: scalar tensor per selected loss.

    Returns:
        scalar total loss.
    """
    distill = [v for k, v in terms.items() if k in DISTILLATION_LOSSES]
    total = torch.stack(distill).sum() if distill else None
    if LossMethod.CE in terms:
        total = terms[LossMethod.CE] if total is None else total + terms[LossMethod.CE]
    if LossMethod.CE_AUTO_WEIGHTED in terms:
        ce = terms[LossMethod.CE_AUTO_WEIGHTED]
        if total is None:
            total = ce
        else:
            alpha = (total.detach() / ce.detach().clamp_min(1e-12))
            total = total + alpha * ce
    assert total is not None, "no loss terms"
    return total
