"""Distillation losses, in a registry keyed by :class:`~token_distillation.config.LossMethod`.

Every loss takes the student's and teacher's hidden states at the aligned loss positions,
already gathered to ``[num_positions, hidden]``, and returns a scalar.
"""

from __future__ import annotations

from typing import Callable

import torch

from .config import LossMethod


def mse_on_hiddens(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Mean squared error over positions and hidden dimensions (computed in float32).

    Token Distillation's objective (Dobler et al., arXiv 2505.20133, Sec. 3):
    ``L = 1/(N*H) * sum_n ||h_student[n] - h_teacher[n]||^2`` at the target layer.

    Args:
        student: ``[num_positions, hidden]`` student hidden states (with grad).
        teacher: ``[num_positions, hidden]`` teacher hidden states (no grad).

    Returns:
        scalar tensor; 0 when there are no positions.
    """
    if student.shape != teacher.shape:
        raise ValueError(f"shape mismatch: student {tuple(student.shape)} vs teacher {tuple(teacher.shape)}")
    if student.numel() == 0:
        return student.sum() * 0.0
    return torch.mean((student.float() - teacher.float()) ** 2)


def mse_per_position(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Per-position MSE ``[num_positions]`` (mean over hidden), for per-token reporting."""
    return torch.mean((student.float() - teacher.float()) ** 2, dim=-1)


LOSSES: dict[LossMethod, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    LossMethod.MSE_ON_HIDDENS: mse_on_hiddens,
}
