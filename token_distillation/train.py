"""The Token Distillation training loop.

Only a ``[num_new_tokens, hidden]`` parameter is trained. It is spliced into the input-embedding
lookup (:class:`NewRows`), so the model's own embedding matrix and all other weights stay frozen
and bit-identical; optimizer state is proportional to the new rows only.

Teacher: the frozen model on the original snippet (no grad). Student: the same model on the merged
snippet with the new rows. Loss: :mod:`token_distillation.losses` at ``target_layer`` over the
aligned positions (Dobler et al., "Token Distillation", arXiv 2505.20133).
"""

from __future__ import annotations

import collections
import contextlib
import logging
import time
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from .alignment import AlignedBatch, MergedSequence, collate
from .config import LossMethod, LrSchedule, Recipe, StoppingCondition, layer_index
from .interrupts import check_stop
from .fastpath import TeacherCache, num_layers, teacher_hiddens, teacher_student_hiddens
from .recipes import BatchState, DistillObjective, FnObjective, PaperRecipe, PerTokenRecipe
from .losses import LOSSES, LossPlan, combine, mse_per_position
from .memory import HELDOUT_BATCH_SIZE
from .models import text_config

logger = logging.getLogger(__name__)


class NewRows(torch.nn.Module):
    """Trainable input-embedding rows for the new tokens, spliced into the model's lookup.

    Also answers "which output rows does the model use" for the logits the losses need: the
    model's own output matrix for the original vocabulary, and for the new tokens either the new
    input rows themselves (tied models: the output row *is* the input row) or ``out_rows``
    (untied models, or a tied model being untied).

    Args:
        init: ``[num_new, hidden]`` initial rows (stored as float32).
        token_ids: ``[num_new]`` vocabulary id of each row.
        vocab_rows: number of rows of the model's embedding matrix.
        scale: factor the embedding module applies to its rows (Gemma: sqrt(hidden); else 1.0).
        num_original: size of the original vocabulary (ids below it are original tokens; used
            for logits). Default: the smallest new id.
        out_rows: ``[num_new, hidden]`` output rows of the new tokens for untied output layers;
            None means tied (the output rows are ``rows``).
        train_original: also make a trainable float32 copy ``original`` of the whole embedding
            matrix (``--train_original_embeddings``); original ids are then looked up there, and
            a tied model's output layer uses it as well.
        weight: ``[vocab_rows, hidden]`` the model's embedding matrix (needed with ``train_original``).
    """

    def __init__(self, init: torch.Tensor, token_ids: list[int], vocab_rows: int, scale: float = 1.0,
                 num_original: int | None = None, out_rows: torch.Tensor | None = None,
                 train_original: bool = False, weight: torch.Tensor | None = None):
        super().__init__()
        self.rows = torch.nn.Parameter(init.detach().float().clone())
        # the rows other new tokens are read with where they occur in a snippet (see gradient_only_to)
        self.register_buffer("fixed_rows", init.detach().float().clone(), persistent=False)
        table = torch.full((vocab_rows,), -1, dtype=torch.long)
        table[torch.tensor(token_ids, dtype=torch.long)] = torch.arange(len(token_ids))
        self.register_buffer("id_to_row", table, persistent=False)
        self.scale = float(scale)
        self.token_ids = list(token_ids)
        self.num_original = int(num_original if num_original is not None else min(token_ids))
        self.tied = out_rows is None
        self.out_rows = (torch.nn.Parameter(out_rows.detach().float().clone(), requires_grad=False)
                         if out_rows is not None else None)
        self.original = None
        self.grad_owner: torch.Tensor | None = None  # see gradient_only_to
        if train_original:
            assert weight is not None, "train_original needs the embedding matrix"
            self.original = torch.nn.Parameter(weight.detach().float().clone())

    def embed(self, model, ids: torch.Tensor) -> torch.Tensor:
        """Input embeddings ``[batch, seq, hidden]`` for ``ids [batch, seq]``: the model's own
        lookup for original ids, ``rows * scale`` for new ids."""
        row = self.id_to_row[ids]
        is_new = row >= 0
        safe = torch.where(is_new, torch.zeros_like(ids), ids)
        if self.original is not None:
            base = torch.nn.functional.embedding(safe, self.original) * self.scale
        else:
            base = model.get_input_embeddings()(safe)
        new = self.rows[row.clamp(min=0)] * self.scale
        if self.grad_owner is not None:  # other new tokens in a snippet: their initial rows, fixed
            own = row == self.grad_owner.to(row.device).unsqueeze(1)
            fixed = self.fixed_rows[row.clamp(min=0)] * self.scale
            new = torch.where(own.unsqueeze(-1), new, fixed)
        return torch.where(is_new.unsqueeze(-1), new.to(base.dtype), base)

    @contextlib.contextmanager
    def gradient_only_to(self, owner: torch.Tensor):
        """Within the block, a snippet's loss reaches only the row of the token it was mined for:
        ``owner [batch]`` is that token's row index per batch row. Other new tokens occurring in the
        snippet are embedded with their *initial* rows (fixed, no gradient), so that a token's trained
        row depends on its own snippets and the initial rows only: not on the other tokens' training,
        their order, the batch size or how the tokens are split over processes (the per-token recipe's
        independence, exact under co-occurrence)."""
        previous, self.grad_owner = self.grad_owner, owner
        try:
            yield
        finally:
            self.grad_owner = previous

    def output_original(self, model) -> torch.Tensor:
        """``[num_original, hidden]`` output rows of the original vocabulary."""
        if self.original is not None and self.tied:
            return self.original[: self.num_original]
        return model.get_output_embeddings().weight[: self.num_original]

    def output_new(self) -> torch.Tensor:
        """``[num_new, hidden]`` output rows of the new tokens (``rows`` when tied)."""
        return self.rows if self.tied else self.out_rows

    def trainable(self) -> list[torch.nn.Parameter]:
        """Parameters the distillation / NTP optimizer updates (new rows, plus ``original``)."""
        return [self.rows] + ([self.original] if self.original is not None else [])

    @property
    def trains_original(self) -> bool:
        """True when the original rows train too: the student's positions before the new token
        then differ from the teacher's, so they are loss positions and no prefix is shared."""
        return self.original is not None

    def collate(self, seqs: list[MergedSequence], token_index: list[int], pad_id: int) -> AlignedBatch:
        """:func:`~token_distillation.alignment.collate` with the loss positions these rows need
        (from the sequence start when :attr:`trains_original`)."""
        return collate(seqs, token_index, pad_id, from_start=self.trains_original)


def output_logits(model, rows: NewRows, h: torch.Tensor, include_new: bool, frozen: bool = False) -> torch.Tensor:
    """Logits ``[n, num_original (+ num_new)]`` for final hidden states ``h [n, hidden]``.

    Only the given positions go through the output layer (never the whole sequence). Columns
    ``0..num_original-1`` are the original vocabulary; with ``include_new`` column
    ``num_original + j`` is new token ``j``. Applies the output bias and final logit soft-capping
    (Gemma 2) when the model has them. ``frozen``: use the model's own output matrix (the
    teacher), even when ``--train_original_embeddings`` trains a tied copy.
    """
    w = model.get_output_embeddings().weight[: rows.num_original] if frozen else rows.output_original(model)
    logits = h @ w.to(h.dtype).T
    head = model.get_output_embeddings()
    bias = getattr(head, "bias", None)
    if include_new:
        new = h @ rows.output_new().to(h.dtype).T
        if bias is not None:
            new = new + bias[torch.tensor(rows.token_ids, device=h.device)]
        logits = torch.cat([logits + (bias[: rows.num_original] if bias is not None else 0), new], dim=-1)
    elif bias is not None:
        logits = logits + bias[: rows.num_original]
    return soft_cap(model, logits)


def soft_cap(model, logits: torch.Tensor) -> torch.Tensor:
    """``logits`` (any shape) through the model's final logit soft-capping ``cap * tanh(z / cap)``
    (Gemma 2/3's ``final_logit_softcapping``); unchanged for a model without it."""
    cap = getattr(text_config(model.config), "final_logit_softcapping", None)
    return torch.tanh(logits / cap) * cap if cap else logits


def ce_targets(rows: NewRows, batch: AlignedBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token positions and targets on the student sequence.

    Positions: from the one *before* the first new token (it predicts the new token) to the
    second-to-last real token; earlier positions do not depend on the new rows.

    Returns:
        ``mask [batch, student_len]`` bool (positions whose next token is predicted) and
        ``targets [num_positions]`` long: original ids as is, new token ``j`` as ``num_original + j``.
    """
    mask = torch.zeros_like(batch.student_loss_mask)
    mask[:, :-1] = batch.student_loss_mask[:, 1:]
    nxt = torch.zeros_like(batch.student_ids)
    nxt[:, :-1] = batch.student_ids[:, 1:]
    tgt = nxt[mask]
    row = rows.id_to_row[tgt]
    return mask, torch.where(row >= 0, rows.num_original + row, tgt)


def resolve_layer(model_or_config, target_layer: int) -> int:
    """Index into ``hidden_states`` (0 = embeddings, N = last layer) for ``--target_layer``.

    Raises:
        ConfigError: layer outside ``1..N`` / ``-N..-1``.
    """
    return layer_index(num_layers(model_or_config), target_layer)


def hidden_at(model, layer: int, attention_mask: torch.Tensor, input_ids=None, inputs_embeds=None) -> torch.Tensor:
    """Hidden states ``[batch, seq, hidden]`` after layer ``layer`` (no logits are computed)."""
    return hidden_states(model, layer, attention_mask, input_ids, inputs_embeds)[0]


def hidden_states(model, layer: int | None, attention_mask: torch.Tensor, input_ids=None, inputs_embeds=None,
                  need_last: bool = False) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """``(hidden at layer, final hidden state)``, each ``[batch, seq, hidden]`` or None.

    The final hidden state (after the model's final norm) is what the output layer reads; it is
    returned only with ``need_last``. No logits are computed here.
    """
    last_layer = layer is not None and layer == num_layers(model)  # hidden_states[N] is the final (normed) state
    out = model.base_model(input_ids=input_ids, inputs_embeds=inputs_embeds, attention_mask=attention_mask.long(),
                           output_hidden_states=layer is not None and not last_layer, use_cache=False,
                           return_dict=True)
    h = out.last_hidden_state if last_layer else (out.hidden_states[layer] if layer is not None else None)
    return h, (out.last_hidden_state if need_last else None)


def autocast_context(device: torch.device, dtype: torch.dtype | None):
    """``torch.autocast`` for ``dtype`` on ``device``, or a no-op when ``dtype`` is None."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def distill_loss(model, rows: NewRows, batch: AlignedBatch, layer: int,
                 loss_method: LossMethod | tuple[LossMethod, ...] = LossMethod.MSE_ON_HIDDENS, autocast_dtype=None,
                 per_position: bool = False, teacher_cache: TeacherCache | None = None,
                 snippet_ids: list[int] | None = None):
    """Training loss of one batch (scalar), or the hidden-state MSE ``[num_positions]`` with ``per_position``.

    ``loss_method``: one loss or a list (see :mod:`token_distillation.losses`). The teacher runs
    under ``no_grad`` on the original ids, and only when a distillation loss is selected; the
    student on the merged ids. Logits are computed only when a selected loss needs them, and only
    at the positions it uses. ``teacher_cache`` with ``snippet_ids`` (the batch's snippet indices):
    reuse / store the teacher states (hidden-state-only losses).
    """
    methods = (loss_method,) if isinstance(loss_method, LossMethod) else tuple(loss_method)
    if per_position:
        methods = (LossMethod.MSE_ON_HIDDENS,)
    terms = loss_terms(model, rows, batch, layer, LossPlan(methods), autocast_dtype, per_position=per_position,
                       teacher_cache=teacher_cache, snippet_ids=snippet_ids)
    if per_position:
        return terms[LossMethod.MSE_ON_HIDDENS]
    return combine(terms)


def loss_terms(model, rows: NewRows, batch: AlignedBatch, layer: int, plan: LossPlan, autocast_dtype=None,
               per_position: bool = False, teacher_cache: TeacherCache | None = None,
               snippet_ids: list[int] | None = None) -> dict[LossMethod, torch.Tensor]:
    """Each selected loss of one batch, as a scalar tensor (the hidden MSE per position with ``per_position``)."""
    device = batch.teacher_ids.device
    if plan.needs_hiddens and not plan.needs_logits and not plan.needs_ce:
        # hidden states only: shared-prefix KV cache, early stop at the target layer, teacher cache
        use_cache = teacher_cache is not None and snippet_ids is not None
        known = teacher_cache.lookup(snippet_ids) if use_cache else None
        with autocast_context(device, autocast_dtype):
            s_h, t_h = teacher_student_hiddens(model, rows, batch, layer, teacher=known)
        if use_cache:
            teacher_cache.put(snippet_ids, t_h, batch.teacher_loss_mask.sum(1))  # skips those already kept
        return {m: (mse_per_position(s_h, t_h) if per_position and m == LossMethod.MSE_ON_HIDDENS
                    else LOSSES[m].fn(s_h, t_h)) for m in plan.methods}
    t_layer = layer if plan.needs_hiddens else None
    with autocast_context(device, autocast_dtype):
        teacher_h = teacher_z = None
        if plan.needs_teacher:
            with torch.no_grad():
                th, tl = hidden_states(model, t_layer, batch.teacher_attention, input_ids=batch.teacher_ids,
                                       need_last=plan.needs_logits)
                if th is not None:
                    teacher_h = th[batch.teacher_loss_mask]
                if tl is not None:
                    teacher_z = output_logits(model, rows, tl[batch.teacher_loss_mask], include_new=False, frozen=True)
        embeds = rows.embed(model, batch.student_ids)
        sh, sl = hidden_states(model, t_layer, batch.student_attention, inputs_embeds=embeds,
                               need_last=plan.needs_logits or plan.needs_ce)
        terms: dict[LossMethod, torch.Tensor] = {}
        student_z = None
        if plan.needs_logits:
            student_z = output_logits(model, rows, sl[batch.student_loss_mask], include_new=False)
        if plan.needs_ce:
            ce_mask, ce_tgt = ce_targets(rows, batch)
            ce_z = output_logits(model, rows, sl[ce_mask], include_new=True)
    for m in plan.methods:
        spec = LOSSES[m]
        if per_position and m == LossMethod.MSE_ON_HIDDENS:
            terms[m] = mse_per_position(sh[batch.student_loss_mask], teacher_h)
        elif spec.needs_hiddens:
            terms[m] = spec.fn(sh[batch.student_loss_mask], teacher_h)
        elif spec.needs_logits:
            terms[m] = spec.fn(student_z, teacher_z)
        else:
            terms[m] = spec.fn(ce_z, ce_tgt)
    return terms


@dataclass
class TrainResult:
    """What the loop did: ``loss_curve`` (one value per optimizer step), steps, seconds.

    A ``loss_curve`` value is the loss the step minimised: with the per-token recipe (the default)
    the **sum** over the batch's new tokens of each token's mean loss over its positions (so about
    ``batch_size`` / ``snippets_per_update`` times a per-token value); with the paper's recipe the mean
    over the batch's positions. The progress bar and the log show the per-token mean in both cases.

    ``seconds`` is the training time of the whole run, including the processes that ran before a
    resume; ``seconds_from_step`` is 0 then. A run resumed (at any point) from a checkpoint that did
    not record its time (older format) counts from the step of that checkpoint, given by
    ``seconds_from_step``. Not counted: model loading and snippet mining, and the steps after the
    last checkpoint that a resumed run does again. A resumed multi-epoch run starts with an empty
    teacher cache, so it can take longer than an uninterrupted one.
    """

    loss_curve: list[float] = field(default_factory=list)
    steps: int = 0
    seconds: float = 0.0
    seconds_from_step: int = 0


def train(model, rows: NewRows, seqs: list[MergedSequence], token_index: list[int], *, layer: int,
          lr: float, batch_size: int, epochs: int, seed: int, device: torch.device,
          stopping_condition: StoppingCondition = StoppingCondition.EPOCHS, max_steps: int = 0,
          loss_method: LossMethod | tuple[LossMethod, ...] = LossMethod.MSE_ON_HIDDENS, autocast_dtype=None,
          log_every: int = 10, pad_id: int = 0, objective=None, params=None,
          desc: str = "token distillation", recipe: Recipe = Recipe.PAPER, snippets_per_update: int = 1,
          lr_schedule: LrSchedule = LrSchedule.CONSTANT, token_texts: list[str] | None = None, dist=None, checkpointer=None,
          teacher_cache_bytes: int = 0) -> TrainResult:
    """Train ``rows`` with AdamW (no weight decay) on shuffled batches of snippets.

    Args:
        seqs: merged teacher/student pairs, one per snippet.
        token_index: ``[len(seqs)]`` new-token index of each snippet.
        layer: resolved ``hidden_states`` index (see :func:`resolve_layer`).
        loss_method: one loss or a list (see :func:`distill_loss`).
        objective: optional ``objective(batch) -> scalar`` replacing :func:`distill_loss`.
        params: parameters to optimise (default: ``rows.trainable()``).
        recipe: ``Recipe.PER_TOKEN`` uses :mod:`token_distillation.regime` (per-token batches of
            ``snippets_per_update`` snippets, per-token hidden-state loss, :class:`RowAdam`) when only the
            new input rows are trained; otherwise the paper's loop (AdamW, shuffled batches).
        lr_schedule: per-token recipe only: ``LrSchedule.LINEAR`` decays each row's step size
            linearly over the updates that row receives in this run (:class:`RowAdam`).
        token_texts: token texts (seed the per-token shuffles); default ``str(index)``.
        batch_size: the global batch (snippets per optimizer step, summed over processes).
        dist: a :class:`~token_distillation.distributed.DistContext` for data-parallel training
            (each process computes its share of every batch; gradients are all-reduced), or None.
            With the per-token recipe the per-token loss is a sum over tokens, so the shards' losses
            are summed (exact when a token's group is not split over processes, e.g. one snippet per
            update); otherwise losses are weighted by their share of loss positions.
        checkpointer: a :class:`~token_distillation.checkpoint.Checkpointer` (restores the newest
            checkpoint at the start when resuming; saves every N steps), or None.
        teacher_cache_bytes: budget of a :class:`~token_distillation.fastpath.TeacherCache` used when
            snippets are revisited (more than one epoch) and the loss uses hidden states only; 0: off.
    """
    params = list(params) if params is not None else rows.trainable()
    methods = (loss_method,) if isinstance(loss_method, LossMethod) else tuple(loss_method)
    only_new_rows = len(params) == 1 and params[0] is rows.rows
    if recipe == Recipe.PER_TOKEN and objective is None and only_new_rows:
        texts = token_texts or [str(i) for i in range(max(token_index, default=-1) + 1)]
        plan = PerTokenRecipe(token_index, texts, num_rows=rows.rows.shape[0], batch_size=batch_size,
                              snippets_per_update=snippets_per_update, epochs=epochs, lr=lr, seed=seed,
                              lr_schedule=lr_schedule, stopping=stopping_condition, max_steps=max_steps,
                              sum_over_tokens=methods == (LossMethod.MSE_ON_HIDDENS,),
                              positions=[s.first_new for s in seqs])
    else:
        plan = PaperRecipe(len(seqs), batch_size=batch_size, epochs=epochs, lr=lr, stopping=stopping_condition,
                           max_steps=max_steps)
    if objective is not None:
        obj = FnObjective(objective, rows)
    else:
        cache = TeacherCache(teacher_cache_bytes) if teacher_cache_bytes > 0 and plan.revisits else None
        obj = DistillObjective(model, rows, layer, methods, autocast_dtype, teacher_cache=cache)
    data = SnippetData(seqs, token_index, pad_id)
    return train_loop(rows, params, data, plan, obj, seed=seed, device=device, dist=dist, checkpointer=checkpointer,
                      log_every=log_every, desc=desc)


@dataclass
class SnippetData:
    """The training snippets: merged teacher/student pairs, the token of each, the pad id."""

    seqs: list[MergedSequence]
    token_index: list[int]
    pad_id: int = 0


def train_loop(rows: NewRows, params: list[torch.nn.Parameter], data: SnippetData, recipe, objective, *, seed: int,
               device: torch.device, dist=None, checkpointer=None, log_every: int = 10,
               desc: str = "token distillation") -> TrainResult:
    """The training loop: ``recipe`` (:mod:`token_distillation.recipes`) gives each step's batch, the
    optimizer and the loss reduction; ``objective`` the batch loss. Resumes from ``checkpointer``
    and saves into it (a stop signal saves the current step and raises ``Interrupted``); with
    ``dist``, each process back-propagates its share of every batch and gradients are summed.
    """
    opt = recipe.optimizer(params)
    state = BatchState(torch.Generator().manual_seed(seed))
    result, earlier, start = TrainResult(), 0.0, time.perf_counter()
    resumed = checkpointer.restore(rows, opt, state.generator) if checkpointer is not None else None
    if resumed is not None:
        result.steps, state.order, result.loss_curve, (earlier, result.seconds_from_step) = resumed

    def local_loss(part: list[int]):
        batch = rows.collate([data.seqs[i] for i in part], [data.token_index[i] for i in part], data.pad_id)
        batch = batch.to(device)
        return recipe.loss(objective, batch, list(part)), int(batch.student_loss_mask.sum())

    total = recipe.total_steps
    recent_shown: collections.deque = collections.deque(maxlen=log_every)  # the losses the bar showed
    with tqdm(total=total, initial=result.steps, desc=desc, unit="step",
              disable=dist is not None and not dist.is_main) as bar:
        while result.steps < total:
            idx = recipe.batch(result.steps, state)
            opt.zero_grad(set_to_none=True)
            step_loss = _backward(idx, local_loss, params, dist, mean=not recipe.sums_over_tokens)
            opt.step()
            result.steps += 1
            result.loss_curve.append(step_loss)
            # a summed loss (per-token recipe) is shown as the mean per token of the batch
            shown = step_loss / len({data.token_index[i] for i in idx}) if recipe.sums_over_tokens else step_loss
            bar.update(1)  # before a stop: the bar's last count is the step the stop line names
            bar.set_postfix(loss=f"{shown:.4f}")
            if checkpointer is not None:
                checkpointer.step_done(result.steps, rows, opt, state.generator, state.order, result.loss_curve,
                                       (earlier + time.perf_counter() - start, result.seconds_from_step),
                                       final=result.steps >= total)
            else:
                check_stop(step=result.steps)
            recent_shown.append(shown)
            if result.steps % log_every == 0 or result.steps == total:
                logger.info("%s step %d/%d loss %.5f (mean of the last %d steps%s)", desc, result.steps, total,
                            sum(recent_shown) / len(recent_shown), len(recent_shown),
                            "; per token of a batch" if recipe.sums_over_tokens else "")
    _log_cache(objective.teacher_cache)
    result.seconds = earlier + time.perf_counter() - start
    return result


def _backward(idx: list[int], local_loss, params, dist, mean: bool) -> float:
    """Backward pass of one batch (split over the processes with ``dist``); returns its loss."""
    if dist is not None and dist.distributed:
        return dist.shard_backward(idx, local_loss, params, mean=mean)
    loss, _ = local_loss(idx)
    loss.backward()
    return float(loss.detach())


def _log_cache(tcache: TeacherCache | None) -> None:
    if tcache is not None:
        logger.info("teacher cache: %d batches reused whole, %d not; %d snippets reused, %d computed; %.1f MiB",
                    tcache.hits, tcache.misses, tcache.snippet_hits, tcache.snippet_misses, tcache.bytes / 2**20)


def train_output_rows(model, rows: NewRows, seqs: list[MergedSequence], token_index: list[int], *,
                      autocast_dtype=None, **kw) -> TrainResult:
    """Train the new tokens' *output* rows ``rows.out_rows`` with next-token cross-entropy
    (``--output_embeddings ntp``), everything else frozen.

    The student forward runs without gradient (the input rows are fixed here); only the product
    of the final hidden states with ``out_rows`` carries gradient, so a step costs one forward.
    ``kw``: the loop settings of :func:`train` (lr, batch_size, epochs, seed, device, ...).

    Raises:
        ValueError: ``rows`` is tied (no separate output rows).
    """
    if rows.tied:
        raise ValueError("train_output_rows needs untied output rows")

    def objective(batch: AlignedBatch) -> torch.Tensor:
        with autocast_context(batch.student_ids.device, autocast_dtype):
            with torch.no_grad():
                _, last = hidden_states(model, None, batch.student_attention,
                                        inputs_embeds=rows.embed(model, batch.student_ids), need_last=True)
                mask, tgt = ce_targets(rows, batch)
                h = last[mask]
            logits = output_logits(model, rows, h, include_new=True)
        return LOSSES[LossMethod.CE].fn(logits, tgt)

    rows.out_rows.requires_grad_(True)
    try:
        return train(model, rows, seqs, token_index, objective=objective, params=[rows.out_rows],
                     desc="output rows (ntp)", autocast_dtype=autocast_dtype, **kw)
    finally:
        rows.out_rows.requires_grad_(False)


@dataclass
class HeldoutResult:
    """What :func:`heldout_eval` measured on the held-out snippets.

    Attributes:
        loss_per_token: ``[num_new]`` mean distillation MSE per new token (None: no held-out
            snippet), or None when the loss was not asked for.
        argmax: how often a new token is the model's top prediction, or None when not asked for:
            ``rate`` (share of predicting positions whose argmax is a new token), ``expected_rate``
            (share whose true next token is a new token: what a perfect model would show),
            ``correct`` (positions where the argmax new token is the true next token),
            ``positions``, and ``per_token`` (``[num_new]`` positions where each new token is the argmax).
    """

    loss_per_token: list[float | None] | None
    argmax: dict | None


@torch.no_grad()
def heldout_eval(model, rows: NewRows, seqs: list[MergedSequence], token_index: list[int], num_tokens: int, *,
                 layer: int, device: torch.device, batch_size: int = HELDOUT_BATCH_SIZE, autocast_dtype=None,
                 pad_id: int = 0, teacher_cache: TeacherCache | None = None, loss: bool = True, argmax: bool = True,
                 desc: str = "held-out evaluation", show_progress: bool = True) -> HeldoutResult:
    """Held-out distillation loss per token and new-token argmax rate, with one student forward per batch.

    Per batch of ``batch_size`` snippets the student runs once over its whole merged sequence
    (``[batch, student_len]``), giving both its hidden states at ``layer`` (the loss) and its final
    hidden state (the argmax); the teacher runs only up to ``layer`` and only for snippets whose
    states are not in ``teacher_cache`` (pass the same cache to the evaluations before and after
    training: the teacher, which training does not change, is then computed once within its budget).

    Loss: hidden-state MSE at the aligned positions (as in training), averaged over each snippet's
    positions, then over each token's snippets. Argmax: every real student position except the last
    predicts the next token over the full extended vocabulary (new tokens' output rows included, as
    the saved model has them).
    """
    if not (loss or argmax):
        return HeldoutResult(None, None)
    sums = [0.0] * num_tokens
    counts = [0] * num_tokens
    hits = correct = expected = positions = 0
    per_token = [0] * len(rows.token_ids)
    for b in tqdm(range(0, len(seqs), batch_size), desc=desc, unit="batch", disable=not show_progress):
        check_stop(desc)
        chunk = seqs[b: b + batch_size]
        tix = token_index[b: b + batch_size]
        batch = rows.collate(chunk, tix, pad_id).to(device)
        ids = list(range(b, b + len(chunk)))
        with autocast_context(device, autocast_dtype):
            s_h, last = hidden_states(model, layer if loss else None, batch.student_attention,
                                      inputs_embeds=rows.embed(model, batch.student_ids), need_last=argmax)
            if loss:
                known = teacher_cache.lookup(ids) if teacher_cache is not None else None
                teacher = teacher_hiddens(model, batch, layer, known)
                if teacher_cache is not None:
                    teacher_cache.put(ids, teacher, batch.teacher_loss_mask.sum(1))  # skips those already kept
                per_pos = mse_per_position(s_h[batch.student_loss_mask], teacher)
            if argmax:
                mask = torch.zeros_like(batch.student_attention)
                mask[:, :-1] = batch.student_attention[:, 1:]
                pred = output_logits(model, rows, last[mask], include_new=True).argmax(dim=-1)
        if loss:
            pos = 0
            for r, n in enumerate(batch.student_loss_mask.sum(dim=1).tolist()):
                if n:
                    sums[tix[r]] += float(per_pos[pos: pos + n].mean())
                    counts[tix[r]] += 1
                pos += n
        if argmax:
            nxt = torch.zeros_like(batch.student_ids)
            nxt[:, :-1] = batch.student_ids[:, 1:]
            true_row = rows.id_to_row[nxt[mask]]
            is_new = pred >= rows.num_original
            positions += int(mask.sum())
            hits += int(is_new.sum())
            expected += int((true_row >= 0).sum())
            correct += int((is_new & (pred - rows.num_original == true_row)).sum())
            for j in (pred[is_new] - rows.num_original).tolist():
                per_token[j] += 1
    return HeldoutResult(
        loss_per_token=[s / c if c else None for s, c in zip(sums, counts)] if loss else None,
        argmax={"rate": hits / positions if positions else None,
                "expected_rate": expected / positions if positions else None,
                "correct": correct, "positions": positions, "per_token": per_token} if argmax else None)


def heldout_loss_per_token(model, rows: NewRows, seqs: list[MergedSequence], token_index: list[int],
                           num_tokens: int, *, layer: int, device: torch.device, batch_size: int = HELDOUT_BATCH_SIZE,
                           autocast_dtype=None, pad_id: int = 0,
                           teacher_cache: TeacherCache | None = None) -> list[float | None]:
    """Mean distillation MSE per new token over its held-out snippets (None: no held-out snippet).

    Each snippet's positions are averaged first, then snippets are averaged per token.
    ``teacher_cache``: pass the same cache to the evaluations before and after training; the
    teacher's states (which training does not change) are then computed once (within its budget).
    """
    return heldout_eval(model, rows, seqs, token_index, num_tokens, layer=layer, device=device, batch_size=batch_size,
                        autocast_dtype=autocast_dtype, pad_id=pad_id, teacher_cache=teacher_cache,
                        argmax=False).loss_per_token
