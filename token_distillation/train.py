"""The Token Distillation training loop.

Only a ``[num_new_tokens, hidden]`` parameter is trained. It is spliced into the input-embedding
lookup (:class:`NewRows`), so the model's own embedding matrix and all other weights stay frozen
and bit-identical; optimizer state is proportional to the new rows only.

Teacher: the frozen model on the original snippet (no grad). Student: the same model on the merged
snippet with the new rows. Loss: :mod:`token_distillation.losses` at ``target_layer`` over the
aligned positions (Dobler et al., "Token Distillation", arXiv 2505.20133).
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from .alignment import AlignedBatch, MergedSequence, collate
from .config import ConfigError, LossMethod, StoppingCondition
from .losses import LOSSES, mse_per_position

logger = logging.getLogger(__name__)


class NewRows(torch.nn.Module):
    """Trainable input-embedding rows for the new tokens, spliced into the model's lookup.

    Args:
        init: ``[num_new, hidden]`` initial rows (stored as float32).
        token_ids: ``[num_new]`` vocabulary id of each row.
        vocab_rows: number of rows of the model's embedding matrix.
        scale: factor the embedding module applies to its rows (Gemma: sqrt(hidden); else 1.0).
    """

    def __init__(self, init: torch.Tensor, token_ids: list[int], vocab_rows: int, scale: float = 1.0):
        super().__init__()
        self.rows = torch.nn.Parameter(init.detach().float().clone())
        table = torch.full((vocab_rows,), -1, dtype=torch.long)
        table[torch.tensor(token_ids, dtype=torch.long)] = torch.arange(len(token_ids))
        self.register_buffer("id_to_row", table, persistent=False)
        self.scale = float(scale)

    def embed(self, model, ids: torch.Tensor) -> torch.Tensor:
        """Input embeddings ``[batch, seq, hidden]`` for ``ids [batch, seq]``: the model's own
        lookup for original ids, ``rows * scale`` for new ids."""
        row = self.id_to_row[ids]
        is_new = row >= 0
        base = model.get_input_embeddings()(torch.where(is_new, torch.zeros_like(ids), ids))
        new = self.rows[row.clamp(min=0)] * self.scale
        return torch.where(is_new.unsqueeze(-1), new.to(base.dtype), base)


def num_layers(model_or_config) -> int:
    """Number of transformer layers of the (text) model; accepts a model or its config."""
    cfg = getattr(model_or_config, "config", model_or_config)
    cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    return int(cfg.num_hidden_layers)


def resolve_layer(model_or_config, target_layer: int) -> int:
    """Index into ``hidden_states`` (0 = embeddings, N = last layer) for ``--target_layer``.

    Raises:
        ConfigError: layer outside ``1..N`` / ``-N..-1``.
    """
    n = num_layers(model_or_config)
    idx = target_layer if target_layer > 0 else n + 1 + target_layer
    if not 1 <= idx <= n:
        raise ConfigError(f"--target_layer {target_layer} out of range for a model with {n} layers; "
                         f"use 1..{n} or -1..-{n}")
    return idx


def hidden_at(model, layer: int, attention_mask: torch.Tensor, input_ids=None, inputs_embeds=None) -> torch.Tensor:
    """Hidden states ``[batch, seq, hidden]`` after layer ``layer`` (no logits are computed)."""
    out = model.base_model(input_ids=input_ids, inputs_embeds=inputs_embeds, attention_mask=attention_mask.long(),
                           output_hidden_states=True, use_cache=False, return_dict=True)
    return out.hidden_states[layer]


def autocast_context(device: torch.device, dtype: torch.dtype | None):
    """``torch.autocast`` for ``dtype`` on ``device``, or a no-op when ``dtype`` is None."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def distill_loss(model, rows: NewRows, batch: AlignedBatch, layer: int,
                 loss_method: LossMethod = LossMethod.MSE_ON_HIDDENS, autocast_dtype=None,
                 per_position: bool = False):
    """Distillation loss of one batch (scalar), or ``[num_positions]`` with ``per_position``.

    The teacher runs under ``no_grad`` on the original ids; the student on the merged ids.
    """
    device = batch.teacher_ids.device
    with autocast_context(device, autocast_dtype):
        with torch.no_grad():
            t_h = hidden_at(model, layer, batch.teacher_attention, input_ids=batch.teacher_ids)
            teacher = t_h[batch.teacher_loss_mask]
        embeds = rows.embed(model, batch.student_ids)
        s_h = hidden_at(model, layer, batch.student_attention, inputs_embeds=embeds)
        student = s_h[batch.student_loss_mask]
    if per_position:
        return mse_per_position(student, teacher)
    return LOSSES[loss_method](student, teacher)


@dataclass
class TrainResult:
    """What the loop did: ``loss_curve`` (one value per optimizer step), steps, seconds."""

    loss_curve: list[float] = field(default_factory=list)
    steps: int = 0
    seconds: float = 0.0


def train(model, rows: NewRows, seqs: list[MergedSequence], token_index: list[int], *, layer: int,
          lr: float, batch_size: int, epochs: int, seed: int, device: torch.device,
          stopping_condition: StoppingCondition = StoppingCondition.EPOCHS, max_steps: int = 0,
          loss_method: LossMethod = LossMethod.MSE_ON_HIDDENS, autocast_dtype=None,
          log_every: int = 10, pad_id: int = 0, dist=None, checkpointer=None) -> TrainResult:
    """Train ``rows`` with AdamW (no weight decay) on shuffled batches of snippets.

    Args:
        seqs: merged teacher/student pairs, one per snippet.
        token_index: ``[len(seqs)]`` new-token index of each snippet.
        layer: resolved ``hidden_states`` index (see :func:`resolve_layer`).
        batch_size: the global batch (snippets per optimizer step, summed over processes).
        dist: a :class:`~token_distillation.distributed.DistContext` for data-parallel training
            (each process computes its share of every batch; gradients are all-reduced), or None.
        checkpointer: a :class:`~token_distillation.checkpoint.Checkpointer` (restores the newest
            checkpoint at the start when resuming; saves every N steps), or None.
    """
    opt = torch.optim.AdamW([rows.rows], lr=lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed)
    per_epoch = math.ceil(len(seqs) / batch_size)
    total = max_steps if stopping_condition == StoppingCondition.MAX_STEPS else per_epoch * epochs
    result = TrainResult()
    start = time.perf_counter()
    order: list[int] = []
    resumed = checkpointer.restore(rows, opt, gen) if checkpointer is not None else None
    if resumed is not None:
        result.steps, order, result.loss_curve = resumed
    bar = tqdm(total=total, initial=result.steps, desc="token distillation", unit="step",
               disable=dist is not None and not dist.is_main)

    def local_loss(part: list[int]):
        batch = collate([seqs[i] for i in part], [token_index[i] for i in part], pad_id).to(device)
        return distill_loss(model, rows, batch, layer, loss_method, autocast_dtype), int(batch.student_loss_mask.sum())

    while result.steps < total:
        if not order:
            order = torch.randperm(len(seqs), generator=gen).tolist()
        idx, order = order[:batch_size], order[batch_size:]
        opt.zero_grad(set_to_none=True)
        if dist is not None and dist.distributed:
            step_loss = dist.shard_backward(idx, local_loss, [rows.rows])
        else:
            loss, _ = local_loss(idx)
            loss.backward()
            step_loss = float(loss.detach())
        opt.step()
        result.steps += 1
        result.loss_curve.append(step_loss)
        if checkpointer is not None:
            checkpointer.step_done(result.steps, rows, opt, gen, order, result.loss_curve)
        bar.update(1)
        bar.set_postfix(loss=f"{result.loss_curve[-1]:.4f}")
        if result.steps % log_every == 0 or result.steps == total:
            recent = result.loss_curve[-log_every:]
            logger.info("step %d/%d loss %.5f (mean of last %d)", result.steps, total, sum(recent) / len(recent), len(recent))
    bar.close()
    result.seconds = time.perf_counter() - start
    return result


@torch.no_grad()
def heldout_loss_per_token(model, rows: NewRows, seqs: list[MergedSequence], token_index: list[int],
                           num_tokens: int, *, layer: int, device: torch.device, batch_size: int = 16,
                           autocast_dtype=None, pad_id: int = 0) -> list[float | None]:
    """Mean distillation MSE per new token over its held-out snippets (None: no held-out snippet).

    Each snippet's positions are averaged first, then snippets are averaged per token.
    """
    sums = [0.0] * num_tokens
    counts = [0] * num_tokens
    for b in range(0, len(seqs), batch_size):
        chunk = seqs[b: b + batch_size]
        tix = token_index[b: b + batch_size]
        batch = collate(chunk, tix, pad_id).to(device)
        per_pos = distill_loss(model, rows, batch, layer, autocast_dtype=autocast_dtype, per_position=True)
        n_pos = batch.student_loss_mask.sum(dim=1).tolist()
        pos = 0
        for r, n in enumerate(n_pos):
            if n:
                sums[tix[r]] += float(per_pos[pos: pos + n].mean())
                counts[tix[r]] += 1
            pos += n
    return [s / c if c else None for s, c in zip(sums, counts)]
