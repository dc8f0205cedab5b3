"""A memory plan: the peak memory of a run, estimated from the model's config alone (no weights
downloaded or loaded), logged before the model loads, a refusal naming the flag to change when it
will not fit a CUDA device, and the batch that ``--token_distillation_batch_size auto`` picks.

Two kinds of plan, by where the weights live:

**Device plan** (CUDA): the accelerator memory of the training phase. Terms (bytes):

- ``weights``: every parameter of the model built on the meta device from its config
  (``accelerate.init_empty_weights``), at the dtype the weights are loaded in, plus the rows the
  embedding matrices grow by (``added_rows``, in each matrix that grows) and, when a tied model is
  untied, a copy of the embedding matrix (``untie``). On CUDA the checkpoint is read into host
  memory and moved, so loading adds nothing on the device.
- ``trainable``: the new rows in fp32, their gradient and two Adam moments: ``4 x 4 x new x hidden``.
- ``activations``: what the student keeps for its backward pass through the layers up to the target
  layer, at the chosen batch: per layer ``tokens x hidden x (34 + 5 x heads x seq / hidden)`` bytes
  at 16-bit (Korthikanti et al., "Reducing Activation Recomputation in Large Transformer Models",
  2022, Sec. 4.1; doubled for fp32), plus the teacher's transient forward of one layer. The batch is
  what a step really holds: the per-token recipe puts at most one group of ``--snippets_per_update``
  snippets of each token in a batch, so 5 tokens make batches of 5 whatever the flag says.
- ``logits``: the held-out pass's new-token argmax (:data:`HELDOUT_BATCH_SIZE` snippets per forward,
  or fewer when the run has fewer held-out snippets, whatever the training batch) holds ``[positions, vocab]`` logits three times at its peak
  (the product, the product plus the output bias, their concatenation with the new tokens' columns),
  in the autocast dtype (else the weights' dtype).

- ``output_fit`` (``--output_embeddings distill``, after training): the float32 final hidden states
  of the training positions of one group of tokens, their snippets' and
  :data:`token_distillation.output_rows.BACKGROUND_POSITIONS` each (:data:`token_distillation.output_rows.CHUNK_ENTRIES`
  entries, or one token's positions when they alone exceed it: a token is never split) three times
  (the states, the rows gathered per position, the gradient of that gather), the held-out positions of
  the group once (its snippets in the run's held-out : training ratio, and the background positions
  again), plus one snippet's ``[positions, vocab]``
  logits three times (logits, their float32 copy, the log-softmax; or those of
  :data:`token_distillation.output_rows.COMPLETION_ROWS` positions, if more), plus the teacher's
  key/value cache of a batch of snippets twice (the cache and the copy made for each forward of
  the teacher's completions away from the word) and of ``COMPLETION_ROWS`` snippets (the rows
  those forwards continue). Its forwards run without gradients (one layer's transients, counted in
  ``activations``).

Device total = weights + trainable + activations + the part of the logits and of the output fit above
the activations (the three are not alive at the same time).

**Host plan** (CPU, MPS): the resident set size (RSS) of the process at its peak. Measured on CPU
(``tests/test_scale_shape.py``: a 2-layer model of Llama-3-8B's width from a bf16 checkpoint; and
the bundled SmolLM2-135M from its fp32 conversion), the device terms alone missed the peak by a
third: CPU runs compute in fp32 whatever the checkpoint's dtype, and for a 16-bit checkpoint the
peak is not training but loading. The host plan therefore adds:

- ``baseline``: the process's resident memory when the plan is made, just before the model loads
  (interpreter, torch, transformers, the tokenizer, the corpus index): measured (``/proc/self/statm``),
  not a constant, because it varies with the tokenizer and corpus (0.4-0.5 GiB in the runs above).
  When the model was loaded earlier (to generate snippets), its weights are subtracted from it.
- ``loading``: transformers maps the checkpoint file (safetensors, mmap) and, when the stored dtype
  differs from the fp32 the CPU run computes in, casts every tensor into new fp32 memory while
  the whole mapped file stays resident until the last tensor is read: peak ``params x 4 + params x
  stored bytes``. Mapped file pages count in RSS (the kernel could drop them under pressure, so this
  is what RSS reports, an upper bound of what must be resident). When the dtypes agree (an fp32
  checkpoint), the parameters *are* the mapped pages: ``params x 4`` once.
- ``transient``: one-off copies beyond the final weights: growing the embedding matrix allocates the
  grown matrix while the old one is alive (``resize_token_embeddings``), and saving a 16-bit source
  casts the model back parameter by parameter, so the largest parameter (the embedding matrix) briefly
  exists in both dtypes. The larger of the two is counted.
- ``teacher_cache``: teacher hidden states kept in host memory (``--teacher_cache_gib``), bounded by
  the snippets that would be cached (every position, an upper bound) and the budget.
- ``logits`` on top of ``activations``: on the host the held-out pass after training runs in memory
  the allocator kept from training (glibc does not hand freed heap back), so the two are added,
  not taken in turn. Measured (SmolLM2, 5 PubMed words, batch 16, 50-token snippets; growth of the
  process's anonymous memory over the weights): training +0.34 GiB (activations planned 0.32), the
  held-out pass before training +0.44 (logits planned 0.45), the one after training +0.60.

Host total = baseline + the largest of: loading; weights + transient; the training phase (the
device total with activations and logits added, plus the teacher cache). Measured peak RSS of whole
CLI runs (``/usr/bin/time``, 2-core machine) against the plan they logged: the 2-layer 8B-width
model, 3 words, batch 4, 16-token snippets: 8.69 GiB measured, 8.68 planned (the plan before
these terms said 5.59: it missed the loading phase, fp32 weights beside the mapped bf16 file);
SmolLM2-135M (fp32 conversion, tied, untied by the run), same words and settings: 1.17 measured,
1.09 planned (training sets its peak; the 0.08 GiB between them is not accounted for); SmolLM2 with
the 5 PubMed words above: 1.78 measured, 1.76 planned.

The output fit is planned as taking turns with the activations on the host too (it runs after
training, in the memory the allocator kept); it was not measured on its own, only inside whole runs
(the 8B-width scale test runs it).

Not modelled: the one-off GGUF conversion of a ``.gguf`` source (cached after the first run; it
holds the dequantized model about three times), logits of the logit-based losses and of
``--output_embeddings ntp`` during training (``batch x seq x vocab`` more), and the optimizer state
over the whole matrix with ``--train_original_embeddings``. The estimate is a plan, not a
measurement: apart from the held-out logits above, it ignores allocator fragmentation and library
workspaces (a margin of 10% is kept when comparing with a device).
"""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass
from typing import Callable

import torch

from .config import ConfigError
from .models import text_config

logger = logging.getLogger(__name__)

GIB = 2**30
#: snippets per forward of the held-out pass (the default of train.heldout_eval, which the pipeline uses)
HELDOUT_BATCH_SIZE = 16
#: the largest batch ``--token_distillation_batch_size auto`` picks
AUTO_BATCH_CAP = 256
#: what ``auto`` means where no device memory is planned against (CPU, MPS)
AUTO_BATCH_HOST = 16


@dataclass
class MemoryPlan:
    """Estimated peak memory of a run, in bytes, by term (see the module docstring).

    ``host`` plans (CPU runs) also have ``baseline``, ``loading``, ``transient`` and
    ``teacher_cache``; device plans leave them 0.
    """

    weights: int
    trainable: int
    activations: int
    logits: int
    host: bool = False
    baseline: int = 0
    loading: int = 0
    transient: int = 0
    teacher_cache: int = 0
    output_fit: int = 0

    @property
    def training(self) -> int:
        """Bytes of the training phase with the held-out passes and the output fit around it (without
        the host baseline): on a device the activations, the held-out logits and the output fit take
        turns; on the host the first two add up and the output fit reuses them (see the module
        docstring)."""
        if self.host:
            working = max(self.activations + self.logits, self.output_fit)
        else:
            working = max(self.activations, self.logits, self.output_fit)
        return self.weights + self.trainable + working + self.teacher_cache

    @property
    def phases(self) -> dict[str, int]:
        """Bytes per phase (host plans: loading, training, saving; device plans: training only)."""
        if not self.host:
            return {"training": self.training}
        return {"loading": self.loading, "training": self.training, "resizing/saving": self.weights + self.transient}

    @property
    def peak_phase(self) -> str:
        """The phase that sets the peak."""
        return max(self.phases.items(), key=lambda kv: kv[1])[0]

    @property
    def total(self) -> int:
        """Peak bytes: the largest phase, plus the baseline for host plans."""
        return self.baseline + max(self.phases.values())

    def describe(self) -> str:
        """One line for the log: the total first (GiB), then the terms."""
        terms = (f"weights {self.weights / GIB:.2f}, trainable rows + Adam {self.trainable / GIB:.3f}, activations "
                 f"{self.activations / GIB:.2f}, held-out logits {self.logits / GIB:.2f}"
                 + (f", output fit {self.output_fit / GIB:.2f}" if self.output_fit else ""))
        if not self.host:
            return f"{self.total / GIB:.2f} GiB ({terms})"
        return (f"{self.total / GIB:.2f} GiB of host memory at peak, while {self.peak_phase} (process before "
                f"loading {self.baseline / GIB:.2f}; loading {self.loading / GIB:.2f}; {terms}, teacher cache "
                f"{self.teacher_cache / GIB:.2f}; resize/save copies {self.transient / GIB:.2f})")


def count_parameters(model_config) -> int:
    """Parameters of the causal LM built from ``model_config`` on the meta device (no memory used)."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(model_config)
    seen, total = set(), 0
    for p in model.parameters():
        if id(p) not in seen:  # tied weights count once
            seen.add(id(p))
            total += p.numel()
    text = text_config(model_config)
    out, inp = model.get_output_embeddings(), model.get_input_embeddings()
    if getattr(text, "tie_word_embeddings", False) and out is not None and out.weight is not inp.weight:
        total -= out.weight.numel()  # tied in the real model (tying is skipped on the meta device)
    return total


def _item(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def resident_bytes() -> int:
    """This process's resident set size now, in bytes (Linux: ``/proc/self/statm``; elsewhere the
    peak so far from ``getrusage``, an upper bound; 0 where neither exists)."""
    try:
        with open("/proc/self/statm", encoding="ascii") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError, AttributeError):
        pass
    try:
        import resource
    except ImportError:  # Windows
        return 0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)  # bytes on macOS, KiB on Linux


def plan_memory(model_config, *, weights_dtype: torch.dtype, autocast_dtype: torch.dtype | None, batch_size: int,
                seq_len: int, layers_to_target: int, num_new: int, untie: bool, added_rows: int | None = None,
                host: bool = False, stored_dtype: torch.dtype | None = None, baseline: int = 0,
                teacher_cache: int = 0, num_params: int | None = None,
                heldout_snippets: int | None = None, output_fit_snippets: int = 0,
                output_fit_per_token: int = 0) -> MemoryPlan:
    """Estimate the peak memory of training ``num_new`` rows (see the module docstring).

    Args:
        weights_dtype: the dtype the weights are loaded and run in (fp32 on CPU).
        autocast_dtype: the autocast dtype (activations, logits), or None.
        batch_size: snippets per forward on this process (activations scale with it).
        seq_len: snippet length in tokens, BOS included.
        layers_to_target: decoder layers the student runs (and back-propagates through).
        num_new: new tokens trained (rows of the ``[num_new, hidden]`` parameter).
        untie: a tied model will be untied (one more ``[vocab, hidden]`` matrix).
        added_rows: rows each embedding matrix grows by (0 for a pre-padded vocabulary that holds the
            new ids); default ``num_new``.
        host: plan host memory (CPU run): adds ``baseline``, the loading and resize/save phases and
            the teacher cache.
        stored_dtype: the checkpoint's dtype (host plans: whether loading casts); default
            ``weights_dtype``.
        baseline: host plans: bytes the process holds before the model loads (:func:`resident_bytes`).
        teacher_cache: host plans: bytes of teacher hidden states kept in host memory.
        num_params: the model's parameter count, when already known (:func:`count_parameters`).
        heldout_snippets: held-out snippets of the run (a held-out forward takes at most
            :data:`HELDOUT_BATCH_SIZE` of them); default: a full held-out batch.
        output_fit_snippets: training snippets whose positions the output fit reads
            (``--output_embeddings distill``); 0: no output fit.
        output_fit_per_token: the most training snippets one token has (a token's positions are
            never split across groups); default 0.

    Returns:
        a :class:`MemoryPlan` (bytes per term; ``.total`` is the estimated peak).
    """
    text = text_config(model_config)
    hidden, vocab = int(text.hidden_size), int(text.vocab_size)
    heads = int(getattr(text, "num_attention_heads", 1) or 1)
    tied = bool(getattr(text, "tie_word_embeddings", False))
    added = num_new if added_rows is None else max(0, int(added_rows))
    params = count_parameters(model_config) if num_params is None else int(num_params)
    item = _item(weights_dtype)
    grown_matrices = 1 if tied else 2  # a tied matrix grows once, before it is untied
    rows_after = vocab + added
    weights = (params + added * hidden * grown_matrices + (rows_after * hidden if untie else 0)) * item
    act_item = _item(autocast_dtype or weights_dtype)
    tokens = batch_size * seq_len
    per_layer = tokens * hidden * (34 + 5 * heads * seq_len / hidden) * act_item / 2
    activations = int(per_layer * (layers_to_target + 1))  # + the teacher's transient layer
    held = HELDOUT_BATCH_SIZE if heldout_snippets is None else min(HELDOUT_BATCH_SIZE, max(0, heldout_snippets))
    logits = 3 * held * seq_len * (rows_after + num_new) * act_item
    plan = MemoryPlan(weights, 16 * num_new * hidden, activations, logits)
    if output_fit_snippets:
        from .output_rows import BACKGROUND_POSITIONS, CHUNK_ENTRIES, COMPLETION_ROWS

        per_snippet = seq_len * hidden
        bg = BACKGROUND_POSITIONS * hidden  # a token's background positions
        train = min(output_fit_snippets * per_snippet + num_new * bg,
                    max(CHUNK_ENTRIES, output_fit_per_token * per_snippet + bg))
        # held-out: the group's snippets in the held-out : training ratio, and the same background positions
        held = train * (heldout_snippets or 0) // output_fit_snippets + (min(num_new * bg, train) if heldout_snippets
                                                                         else 0)
        layers = int(getattr(text, "num_hidden_layers", 1) or 1)
        kv_heads = int(getattr(text, "num_key_value_heads", None) or heads)
        head_dim = int(getattr(text, "head_dim", None) or hidden // heads)
        kv = 2 * layers * kv_heads * head_dim * act_item  # key/value cache bytes per position
        cache = (2 * batch_size + COMPLETION_ROWS) * seq_len * kv  # the batch's, its copy, the rows selected
        plan.output_fit = int(4 * (3 * train + held) + 3 * max(seq_len, COMPLETION_ROWS) * (rows_after + num_new) * 4
                              + cache)
    if not host:
        return plan
    stored = stored_dtype or weights_dtype
    plan.host, plan.baseline, plan.teacher_cache = True, int(baseline), int(teacher_cache)
    plan.loading = params * item + (params * _item(stored) if stored != weights_dtype else 0)
    resize = rows_after * hidden * item if added else 0
    cast = rows_after * hidden * _item(stored) if stored != weights_dtype else 0
    plan.transient = max(resize, cast)
    return plan


def check_fits(plan: MemoryPlan, device: torch.device, batch_size: int | str, margin: float = 0.9) -> None:
    """Log the plan; on CUDA refuse a run whose plan exceeds ``margin`` of the device's memory.

    Host plans (CPU) are logged only: host memory is shared with other processes and the kernel
    can page, so no refusal is made from it.

    Raises:
        ConfigError: the plan does not fit; the message says which flags lower it.
    """
    logger.info("memory plan: %s", plan.describe())
    if device.type != "cuda" or not torch.cuda.is_available():
        return
    free, total = torch.cuda.mem_get_info(device)
    if plan.total <= margin * total:
        return
    over = plan.total - margin * total
    raise ConfigError(
        f"the run needs about {plan.total / GIB:.1f} GiB of GPU memory ({plan.describe()}), more than "
        f"{margin:.0%} of this device's {total / GIB:.1f} GiB; lower --token_distillation_batch_size (now "
        f"{batch_size}: activations scale with it), use an earlier --target_layer (fewer layers to back-propagate), "
        f"or --output_embeddings tied (no untied copy); about {over / GIB:.1f} GiB must go")


def choose_batch_size(plan_at: Callable[[int], MemoryPlan], device: torch.device, *, cap: int = AUTO_BATCH_CAP,
                      multiple: int = 1, world_size: int = 1, margin: float = 0.9) -> int:
    """The batch ``--token_distillation_batch_size auto`` picks: on CUDA the largest multiple of
    ``multiple`` up to ``cap`` whose plan fits ``margin`` of the device's total memory; elsewhere
    :data:`AUTO_BATCH_HOST` (capped), with a log line.

    Args:
        plan_at: the plan of one process at a per-process batch (activations grow with it).
        device: this process's device.
        cap: the largest global batch worth having (e.g. what the run's tokens can fill).
        multiple: the global batch is a multiple of this (the number of processes, snippets per update).
        world_size: processes sharing the global batch (each plans ``batch / world_size``).
        margin: the share of the device's memory the plan may take (as :func:`check_fits`).

    Returns:
        the global batch (>= ``multiple``). When not even the smallest fits, the smallest is returned
        and :func:`check_fits` refuses it with the flags to change.
    """
    multiple = max(1, int(multiple))
    cap = max(multiple, int(cap))
    if device.type != "cuda" or not torch.cuda.is_available():
        batch = max(multiple, min(AUTO_BATCH_HOST, cap) // multiple * multiple)
        logger.info("--token_distillation_batch_size auto: %d on %s (memory is planned against a CUDA device only; "
                    "host memory is shared, so at most %d)", batch, device.type, AUTO_BATCH_HOST)
        return batch
    _, total = torch.cuda.mem_get_info(device)
    budget = margin * total

    def fits(k: int) -> bool:
        return plan_at(-(-k * multiple // world_size)).total <= budget

    lo, hi = 1, cap // multiple  # the plan grows with the batch: bisect on the multiplier
    if not fits(lo):
        logger.warning("--token_distillation_batch_size auto: even %d does not fit %.1f GiB", multiple, total / GIB)
        return multiple
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid - 1)
    batch = lo * multiple
    logger.info("--token_distillation_batch_size auto: %d (the largest up to %d whose plan, %.2f GiB, fits %.0f%% "
                "of the device's %.1f GiB)", batch, cap, plan_at(-(-batch // world_size)).total / GIB, 100 * margin,
                total / GIB)
    return batch
