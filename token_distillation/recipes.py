"""Training recipes and objectives: what the training loop (:func:`token_distillation.train.train_loop`)
asks for, so that the loop itself never asks which recipe it runs.

A *recipe* supplies the batch order, the optimizer and the loss reduction:

- :class:`PaperRecipe`: the paper's loop (Dobler et al., arXiv 2505.20133, Sec. 4): AdamW without
  weight decay on shuffled global batches, the batch loss averaged over its aligned positions.
- :class:`PerTokenRecipe`: every token gets the same updates from its own snippets whatever the
  number of tokens in the run (per-token groups of snippets, the sum over tokens of each token's
  mean loss, row-wise Adam; see :mod:`token_distillation.regime`).

An *objective* computes a batch's loss: :class:`DistillObjective` (the distillation losses, with the
teacher cache), or :class:`FnObjective` (any ``fn(batch) -> scalar``, e.g. next-token CE of the
output rows).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch

from .alignment import AlignedBatch
from .config import LossMethod, LrSchedule, StoppingCondition
from .regime import RowAdam, per_token_batches, per_token_loss, row_update_counts


@dataclass
class BatchState:
    """Shuffling state of a run, saved in checkpoints: the generator and the rest of the current
    epoch's order (the paper recipe draws one permutation per epoch)."""

    generator: torch.Generator
    order: list[int] = field(default_factory=list)


class DistillObjective:
    """The distillation loss of a batch (:func:`token_distillation.train.distill_loss`).

    Args:
        methods: the selected losses; with hidden-state MSE alone the loss is also available per
            aligned position (``per_position_ok``), which the per-token recipe sums per token.
        teacher_cache: a :class:`~token_distillation.fastpath.TeacherCache` reused across epochs, or None.
    """

    def __init__(self, model, rows, layer: int, methods: tuple[LossMethod, ...], autocast_dtype=None,
                 teacher_cache=None):
        self.model, self.rows, self.layer, self.methods = model, rows, layer, tuple(methods)
        self.autocast_dtype, self.teacher_cache = autocast_dtype, teacher_cache
        self.per_position_ok = self.methods == (LossMethod.MSE_ON_HIDDENS,)

    def mean(self, batch: AlignedBatch, snippet_ids: list[int]) -> torch.Tensor:
        """Scalar loss averaged over the batch's aligned positions."""
        from .train import distill_loss

        return distill_loss(self.model, self.rows, batch, self.layer, self.methods, self.autocast_dtype,
                            teacher_cache=self.teacher_cache, snippet_ids=snippet_ids)

    def per_position(self, batch: AlignedBatch, snippet_ids: list[int]) -> torch.Tensor:
        """``[num_positions]`` hidden-state MSE at each aligned student position (row-major)."""
        from .train import distill_loss

        return distill_loss(self.model, self.rows, batch, self.layer, self.methods, self.autocast_dtype,
                            per_position=True, teacher_cache=self.teacher_cache, snippet_ids=snippet_ids)


class FnObjective:
    """Any scalar loss ``fn(batch)`` (no per-position form, no teacher cache)."""

    per_position_ok = False
    teacher_cache = None

    def __init__(self, fn: Callable[[AlignedBatch], torch.Tensor], rows=None):
        self.fn, self.rows = fn, rows

    def mean(self, batch: AlignedBatch, snippet_ids: list[int]) -> torch.Tensor:
        return self.fn(batch)


def _total(stopping: StoppingCondition, max_steps: int, per_epoch: int, epochs: int) -> int:
    return max_steps if stopping == StoppingCondition.MAX_STEPS else per_epoch * epochs


class PaperRecipe:
    """AdamW (no weight decay) on shuffled global batches of ``batch_size`` snippets; the loss is
    the objective's mean over the batch's aligned positions.

    Attributes:
        total_steps: optimizer steps of the run.
        revisits: snippets are seen more than once (a teacher cache pays off).
        sums_over_tokens: False (the loss is a mean; data-parallel shards are weighted by positions).
    """

    sums_over_tokens = False

    def __init__(self, num_snippets: int, *, batch_size: int, epochs: int, lr: float,
                 stopping: StoppingCondition = StoppingCondition.EPOCHS, max_steps: int = 0):
        self.num_snippets, self.batch_size, self.lr = num_snippets, batch_size, lr
        per_epoch = math.ceil(num_snippets / batch_size)
        self.total_steps = _total(stopping, max_steps, per_epoch, epochs)
        self.revisits = self.total_steps > per_epoch

    def optimizer(self, params) -> torch.optim.Optimizer:
        return torch.optim.AdamW(params, lr=self.lr, weight_decay=0.0)

    def batch(self, step: int, state: BatchState) -> list[int]:
        """The snippet indices of optimizer step ``step`` (a new permutation each epoch)."""
        if not state.order:
            state.order = torch.randperm(self.num_snippets, generator=state.generator).tolist()
        idx, state.order = state.order[: self.batch_size], state.order[self.batch_size:]
        return idx

    def loss(self, objective, batch: AlignedBatch, snippet_ids: list[int]) -> torch.Tensor:
        return objective.mean(batch, snippet_ids)


class PerTokenRecipe:
    """Per-token batches (each token's snippets in fixed groups of ``snippets_per_update``, at most
    one group per token per batch), row-wise Adam (:class:`~token_distillation.regime.RowAdam`,
    optionally with each row's step size decaying linearly over its own updates), and the loss
    summed over the batch's tokens of each token's mean (when the objective has a per-position
    form; else its mean).

    Args:
        token_index: ``[num_snippets]`` token of each snippet.
        texts: token texts (seed each token's shuffle, so that it does not depend on the others).
        num_rows: rows of the trained parameter (for the per-row schedule).
        sum_over_tokens: use the per-token sum (the objective must have ``per_position_ok``).
        positions: optional ``[num_snippets]`` student position of each snippet's first new token:
            batches are then grouped by it (see :func:`~token_distillation.regime.per_token_batches`),
            which lengthens the prefix a batch shares; a token's updates do not change.
    """

    def __init__(self, token_index: list[int], texts: list[str], *, num_rows: int, batch_size: int,
                 snippets_per_update: int, epochs: int, lr: float, seed: int,
                 lr_schedule: LrSchedule = LrSchedule.CONSTANT,
                 stopping: StoppingCondition = StoppingCondition.EPOCHS, max_steps: int = 0,
                 sum_over_tokens: bool = True, positions: list[int] | None = None):
        groups = max(1, batch_size // snippets_per_update)
        kw = dict(snippets_per_update=snippets_per_update, groups_per_batch=groups, seed=seed, positions=positions)
        per_epoch = len(per_token_batches(token_index, texts, epochs=1, **kw))
        n_epochs = epochs if stopping != StoppingCondition.MAX_STEPS else math.ceil(max_steps / max(1, per_epoch))
        self.schedule = per_token_batches(token_index, texts, epochs=n_epochs, **kw)
        self.total_steps = _total(stopping, max_steps, len(self.schedule), 1)
        self.revisits = n_epochs > 1
        self.sums_over_tokens = sum_over_tokens
        self.lr = lr
        self.planned = (row_update_counts(self.schedule[: self.total_steps], token_index, num_rows)
                        if lr_schedule == LrSchedule.LINEAR else None)

    def optimizer(self, params) -> torch.optim.Optimizer:
        return RowAdam(params, lr=self.lr, row_total_steps=self.planned)

    def batch(self, step: int, state: BatchState) -> list[int]:
        return self.schedule[step]

    def loss(self, objective, batch: AlignedBatch, snippet_ids: list[int]) -> torch.Tensor:
        """The batch loss; each snippet's loss reaches only its own token's row (other new tokens in
        it are read with their initial rows, fixed: :meth:`NewRows.gradient_only_to`)."""
        with objective.rows.gradient_only_to(batch.token_index):
            if not self.sums_over_tokens:
                return objective.mean(batch, snippet_ids)
            per_pos = objective.per_position(batch, snippet_ids)
        row_of_pos = batch.student_loss_mask.nonzero()[:, 0]
        return per_token_loss(per_pos, row_of_pos, batch.token_index, int(batch.token_index.max()) + 1)
