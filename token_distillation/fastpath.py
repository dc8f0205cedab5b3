"""Fast teacher/student forward for hidden-state distillation.

Two savings over running teacher and student over whole snippets (same results up to float
tolerance, checked in tests/test_fastpath.py):

1. **Shared prefix.** Under causal attention the positions before the first new token are
   identical for teacher and student. They are computed once, without grad, for the batch's
   common prefix (``P`` = the smallest first-new-token position in the batch), and their key/value
   cache is reused by both continuations. The per-token recipe groups each batch by that position
   (:func:`token_distillation.regime.per_token_batches`), so that ``P`` is close to the batch's
   positions rather than their minimum; a prefix shorter than :data:`MIN_SHARED_PREFIX` is not
   worth its own pass and is not shared. Only on the devices in :data:`SHARED_PREFIX_DEVICES`
   (the CPU): on a GPU the extra passes cost more than the prefix saves (see there).
2. **Stop at the target layer.** When ``target_layer`` is not the last layer, the forward stops
   right after that layer (a forward hook on the layer raises a private exception); no later
   layer, final norm or logits are computed. For the last layer, the model's final (normed) hidden
   state is used, as in ``hidden_states[-1]``.
3. **Teacher cache** (:class:`TeacherCache`). The teacher's hidden states do not change during
   training; when snippets are seen again (several epochs), their teacher states at the loss
   positions are reused and the teacher's continuation after the shared prefix is not run again
   (the prefix itself is still computed: the student needs its key/value cache).
"""

from __future__ import annotations

import copy
import inspect

import torch

from .alignment import AlignedBatch
from .models import text_config


class _Stop(Exception):
    """Raised by a forward hook to end the forward pass after the target layer."""


def _decoder_layers(model):
    layers = getattr(model.base_model, "layers", None)
    return layers if isinstance(layers, torch.nn.ModuleList) else None


def _cache_kwarg(model) -> str:
    params = inspect.signature(model.base_model.forward).parameters
    return "cache" if "cache" in params and "past_key_values" not in params else "past_key_values"


def num_layers(model_or_config) -> int:
    """Number of transformer layers of the (text) model; accepts a model or its config."""
    return int(text_config(getattr(model_or_config, "config", model_or_config)).num_hidden_layers)


def forward_to_layer(model, layer: int, attention_mask: torch.Tensor, *, input_ids=None, inputs_embeds=None,
                     cache=None, position_ids=None) -> torch.Tensor:
    """Hidden states ``[batch, seq, hidden]`` equal to ``hidden_states[layer]`` of a full forward.

    Args:
        layer: 1..num_layers (``hidden_states`` index; the last one is after the final norm).
        attention_mask: ``[batch, past + seq]`` bool/int mask covering cached and new positions.
        cache: a transformers ``Cache`` holding the prefix (updated in place), or None.
        position_ids: ``[batch, seq]`` positions of the new tokens (needed with a cache).
    """
    n = num_layers(model)
    kwargs = dict(input_ids=input_ids, inputs_embeds=inputs_embeds, attention_mask=attention_mask.long(),
                  position_ids=position_ids, use_cache=cache is not None, return_dict=True)
    if cache is not None:
        kwargs[_cache_kwarg(model)] = cache
    layers = _decoder_layers(model)
    if layer == n or layers is None:
        if layers is None and layer != n:
            out = model.base_model(output_hidden_states=True, **kwargs)
            return out.hidden_states[layer]
        return model.base_model(**kwargs).last_hidden_state
    captured: dict[str, torch.Tensor] = {}

    def hook(_module, _args, output):
        captured["h"] = output[0] if isinstance(output, tuple) else output
        raise _Stop

    handle = layers[layer - 1].register_forward_hook(hook)
    try:
        model.base_model(**kwargs)
    except _Stop:
        pass
    finally:
        handle.remove()
    return captured["h"]


MIN_SHARED_PREFIX = 4
"""Shortest shared prefix (tokens, BOS included) worth its own forward pass. Below it the prefix pass,
the copy of its key/value cache and the extra kernel launches cost about what they save (the
student's forward and backward over ``P`` of ~51 positions), so both sequences run whole."""


SHARED_PREFIX_DEVICES = ("cpu",)
"""Device types on which the shared prefix is used. On CPU it pays a little: 6.0 snippets/s in batches
grouped by position with the prefix against 5.5 in random batches, whose shared prefix is mostly under
:data:`MIN_SHARED_PREFIX` (SmolLM2-135M, 500 words' mined PubMed snippets, layer -1;
docs/benchmarks/cpu_smollm2_mined500.json). On an H200 with a Llama-3.1-8B-shaped bf16 model and the
same snippets it does not: on the same grouped batches 72.1 against 96.8 snippets/s without it at
batch 16, 189.8 against 190.0 at batch 64 (docs/benchmarks/gpu/bench_h200_llama8b_bs{16,64}.json).
There a step waits on kernel launches and per-call set-up, which the prefix's extra forward, cache
copy and masked attention add to, while it saves only 15-16% of the FLOPs on mined snippets."""


def shared_prefix_len(batch: AlignedBatch, trains_original: bool = False, device_type: str | None = None) -> int:
    """The prefix length the fast path shares for ``batch``: :func:`_prefix_len`, or 0 when it is
    shorter than :data:`MIN_SHARED_PREFIX`, the original rows are trained (the student's prefix
    then differs from the teacher's) or the batch is on a device type (``device_type``, default the
    batch's) outside :data:`SHARED_PREFIX_DEVICES`."""
    device_type = device_type or batch.teacher_ids.device.type
    if trains_original or device_type not in SHARED_PREFIX_DEVICES:
        return 0
    p = _prefix_len(batch)
    return p if p >= MIN_SHARED_PREFIX else 0


def _prefix_len(batch: AlignedBatch) -> int:
    """Largest P such that positions < P are identical (and unpadded) in every teacher/student row."""
    rows = batch.student_loss_mask.any(dim=1)
    if not bool(rows.any()):
        return 0
    first = torch.where(batch.student_loss_mask[rows], 1, 0).argmax(dim=1)
    p = int(first.min())
    p = min(p, int(batch.student_attention.sum(1).min()), int(batch.teacher_attention.sum(1).min()))
    if p > 0:  # character alignment: the student may split the text before its first new token differently
        differs = torch.nonzero((batch.teacher_ids[:, :p] != batch.student_ids[:, :p]).any(0)).flatten()
        p = int(differs[0]) if len(differs) else p
    return max(p, 0)


class TeacherCache:
    """Teacher hidden states at the loss positions, kept per snippet for later epochs.

    A batch reuses the states of the snippets it finds and runs the teacher only for the others,
    so a cache that holds part of the training snippets (budget reached, or a resumed run whose
    earlier steps were not seen by this process) still saves their share, although batches are
    reshuffled every epoch.

    Args:
        max_bytes: memory budget; snippets beyond it are not cached (their teacher is recomputed).
            0 disables the cache. Entries are kept in host memory (pinned when computed on CUDA,
            so that they return to the device asynchronously) and handed back on the device they
            were computed on: the accelerator's memory holds the model and activations only.

    Counters: ``hits`` / ``misses`` count batches found whole / not whole; ``snippet_hits`` /
    ``snippet_misses`` count snippets.
    """

    def __init__(self, max_bytes: int):
        self.max_bytes = int(max_bytes)
        self.bytes = 0
        self._store: dict[int, torch.Tensor] = {}
        self._device: torch.device | None = None  # where the states were computed (and are returned)
        self.hits = 0
        self.misses = 0
        self.snippet_hits = 0
        self.snippet_misses = 0

    def __len__(self) -> int:
        """Number of snippets cached."""
        return len(self._store)

    def lookup(self, snippet_ids: list[int]) -> list[torch.Tensor | None]:
        """Per snippet, its ``[n_i, hidden]`` teacher states, or None when not cached."""
        parts = [self._store.get(i) for i in snippet_ids]
        if self._device is not None and self._device.type != "cpu":
            parts = [t.to(self._device, non_blocking=True) if t is not None else None for t in parts]
        found = sum(t is not None for t in parts)
        self.snippet_hits += found
        self.snippet_misses += len(parts) - found
        if parts and found == len(parts):
            self.hits += 1
        else:
            self.misses += 1
        return parts

    def get(self, snippet_ids: list[int]) -> torch.Tensor | None:
        """``[N, hidden]`` teacher states of these snippets in order, or None if any is missing."""
        parts = self.lookup(snippet_ids)
        if not parts or any(t is None for t in parts):
            return None
        return torch.cat(parts)

    def put(self, snippet_ids: list[int], teacher: torch.Tensor, counts: torch.Tensor) -> None:
        """Store ``teacher`` (``[N, hidden]``, rows of the snippets in order) split by ``counts`` ``[batch]``.

        Snippets already cached are skipped (so a batch can be put back whole after a partial hit).
        """
        for i, part in zip(snippet_ids, torch.split(teacher.detach(), counts.tolist())):
            size = part.numel() * part.element_size()
            if i in self._store or self.bytes + size > self.max_bytes:
                continue
            self._device = part.device
            if part.device.type == "cuda":
                host = torch.empty(part.shape, dtype=part.dtype, pin_memory=True)
                host.copy_(part, non_blocking=False)
            else:
                host = part.to("cpu", copy=True)
            self._store[i] = host
            self.bytes += size



def _missing(known) -> list[int] | None:
    """Rows whose teacher states must be computed (None: all of them, [] none)."""
    if known is None:
        return None
    miss = [r for r, t in enumerate(known) if t is None]
    return None if len(miss) == len(known) else miss


def _rows(miss: list[int] | None, batch: AlignedBatch):
    """Index of the batch rows to run the teacher on (all rows when ``miss`` is None)."""
    return slice(None) if miss is None else torch.tensor(miss, device=batch.teacher_ids.device)


def _fill(known: list[torch.Tensor | None], miss: list[int], computed: torch.Tensor,
          batch: AlignedBatch) -> torch.Tensor:
    """``[N, hidden]``: the cached rows of ``known`` with the ``miss`` rows taken from ``computed``."""
    counts = batch.teacher_loss_mask[miss].sum(1).tolist()
    parts = list(known)
    for r, t in zip(miss, torch.split(computed, counts)):
        parts[r] = t
    return torch.cat([t.to(computed.dtype) for t in parts])


def teacher_hiddens(model, batch: AlignedBatch, layer: int, known=None) -> torch.Tensor:
    """Teacher hidden states ``[N, hidden]`` at the batch's aligned loss positions (call under no_grad).

    ``known``: per batch row, cached states ``[n_i, hidden]`` or None (from
    :meth:`TeacherCache.lookup`); only the rows without states are run.
    """
    miss = _missing(known)
    if miss == []:
        return torch.cat(known)
    sel = _rows(miss, batch)
    computed = forward_to_layer(model, layer, batch.teacher_attention[sel],
                                input_ids=batch.teacher_ids[sel])[batch.teacher_loss_mask[sel]]
    return computed if miss is None else _fill(known, miss, computed, batch)


def teacher_student_hiddens(model, rows, batch: AlignedBatch, layer: int,
                            teacher=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Student and teacher hidden states at the aligned loss positions, ``([N, hidden], [N, hidden])``.

    The teacher part carries no grad; the student part depends on ``rows`` (a ``NewRows``). When
    ``rows`` also trains the original embedding rows, the prefix is not shared (see above).
    ``teacher``: cached teacher states per batch row, ``[n_i, hidden]`` or None for rows not cached
    (from :meth:`TeacherCache.lookup`). The teacher's continuation runs only for the rows without states;
    the shared prefix is still computed (the student needs its key/value cache).
    """
    p = shared_prefix_len(batch, getattr(rows, "trains_original", False))
    dev = batch.teacher_ids.device
    if p == 0:
        with torch.no_grad():
            teacher = teacher_hiddens(model, batch, layer, teacher)
        s_h = forward_to_layer(model, layer, batch.student_attention,
                               inputs_embeds=rows.embed(model, batch.student_ids))
        return s_h[batch.student_loss_mask], teacher
    from transformers import DynamicCache

    miss = _missing(teacher)
    with torch.no_grad():
        cache = DynamicCache(config=model.config)
        forward_to_layer(model, layer, batch.teacher_attention[:, :p], input_ids=batch.teacher_ids[:, :p],
                         cache=cache, position_ids=torch.arange(p, device=dev).expand(batch.teacher_ids.shape[0], -1))
        if miss == []:
            student_cache = cache
            teacher = torch.cat(teacher)
        else:
            student_cache = copy.deepcopy(cache)
            tl = batch.teacher_ids.shape[1]
            sel = _rows(miss, batch)
            if miss is not None:
                cache.batch_select_indices(sel)  # the teacher continues only the rows not cached
            t_ids = batch.teacher_ids[sel]
            t_h = forward_to_layer(model, layer, batch.teacher_attention[sel], input_ids=t_ids[:, p:], cache=cache,
                                   position_ids=torch.arange(p, tl, device=dev).expand(t_ids.shape[0], -1))
            computed = t_h[batch.teacher_loss_mask[sel][:, p:]]
            teacher = computed if miss is None else _fill(teacher, miss, computed, batch)
    sl = batch.student_ids.shape[1]
    s_h = forward_to_layer(model, layer, batch.student_attention,
                           inputs_embeds=rows.embed(model, batch.student_ids[:, p:]), cache=student_cache,
                           position_ids=torch.arange(p, sl, device=dev).expand(batch.student_ids.shape[0], -1))
    return s_h[batch.student_loss_mask[:, p:]], teacher
