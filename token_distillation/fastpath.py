"""Fast teacher/student forward for hidden-state distillation.

Two savings over running teacher and student over whole snippets (same results up to float
tolerance, checked in tests/test_fastpath.py):

1. **Shared prefix.** Under causal attention the positions before the first new token are
   identical for teacher and student. They are computed once, without grad, for the batch's
   common prefix (``P`` = the smallest first-new-token position in the batch), and their key/value
   cache is reused by both continuations.
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
    cfg = getattr(model_or_config, "config", model_or_config)
    cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    return int(cfg.num_hidden_layers)


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


def _prefix_len(batch: AlignedBatch) -> int:
    """Largest P such that positions < P are identical (and unpadded) in every teacher/student row."""
    rows = batch.student_loss_mask.any(dim=1)
    if not bool(rows.any()):
        return 0
    first = torch.where(batch.student_loss_mask[rows], 1, 0).argmax(dim=1)
    p = int(first.min())
    p = min(p, int(batch.student_attention.sum(1).min()), int(batch.teacher_attention.sum(1).min()))
    return max(p, 0)


class TeacherCache:
    """Teacher hidden states at the loss positions, kept per snippet for later epochs.

    Args:
        max_bytes: memory budget; snippets beyond it are not cached (their teacher is recomputed).
            Entries stay on the device they were computed on. 0 disables the cache.
    """

    def __init__(self, max_bytes: int):
        self.max_bytes = int(max_bytes)
        self.bytes = 0
        self._store: dict[int, torch.Tensor] = {}
        self.hits = 0
        self.misses = 0

    def get(self, snippet_ids: list[int]) -> torch.Tensor | None:
        """``[N, hidden]`` teacher states of these snippets in order, or None if any is missing."""
        if not snippet_ids or any(i not in self._store for i in snippet_ids):
            self.misses += 1
            return None
        self.hits += 1
        return torch.cat([self._store[i] for i in snippet_ids])

    def put(self, snippet_ids: list[int], teacher: torch.Tensor, counts: torch.Tensor) -> None:
        """Store ``teacher`` (``[N, hidden]``, rows of the snippets in order) split by ``counts`` ``[batch]``."""
        for i, part in zip(snippet_ids, torch.split(teacher.detach(), counts.tolist())):
            size = part.numel() * part.element_size()
            if i in self._store or self.bytes + size > self.max_bytes:
                continue
            self._store[i] = part.clone()
            self.bytes += size


def teacher_hiddens(model, batch: AlignedBatch, layer: int) -> torch.Tensor:
    """Teacher hidden states ``[N, hidden]`` at the batch's aligned loss positions (call under no_grad)."""
    return forward_to_layer(model, layer, batch.teacher_attention, input_ids=batch.teacher_ids)[batch.teacher_loss_mask]


def teacher_student_hiddens(model, rows, batch: AlignedBatch, layer: int,
                            teacher: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Student and teacher hidden states at the aligned loss positions, ``([N, hidden], [N, hidden])``.

    The teacher part carries no grad; the student part depends on ``rows`` (a ``NewRows``). When
    ``rows`` also trains the original embedding rows, the prefix is not shared (see above).
    ``teacher``: the teacher states ``[N, hidden]`` from a :class:`TeacherCache`; when given, only
    the shared prefix (for the student's key/value cache) and the student are run.
    """
    # With trained original rows (``--train_original_embeddings``) the student's prefix is no longer
    # the teacher's: no shared prefix then (full forwards, gradients reach the prefix rows).
    p = 0 if getattr(rows, "trains_original", False) else _prefix_len(batch)
    dev = batch.teacher_ids.device
    if p == 0:
        if teacher is None:
            with torch.no_grad():
                teacher = teacher_hiddens(model, batch, layer)
        s_h = forward_to_layer(model, layer, batch.student_attention,
                               inputs_embeds=rows.embed(model, batch.student_ids))
        return s_h[batch.student_loss_mask], teacher
    from transformers import DynamicCache

    with torch.no_grad():
        cache = DynamicCache(config=model.config)
        forward_to_layer(model, layer, batch.teacher_attention[:, :p], input_ids=batch.teacher_ids[:, :p],
                         cache=cache, position_ids=torch.arange(p, device=dev).expand(batch.teacher_ids.shape[0], -1))
        if teacher is None:
            student_cache = copy.deepcopy(cache)
            tl = batch.teacher_ids.shape[1]
            t_h = forward_to_layer(model, layer, batch.teacher_attention, input_ids=batch.teacher_ids[:, p:],
                                   cache=cache,
                                   position_ids=torch.arange(p, tl, device=dev).expand(batch.teacher_ids.shape[0], -1))
            teacher = t_h[batch.teacher_loss_mask[:, p:]]
        else:
            student_cache = cache
    sl = batch.student_ids.shape[1]
    s_h = forward_to_layer(model, layer, batch.student_attention,
                           inputs_embeds=rows.embed(model, batch.student_ids[:, p:]), cache=student_cache,
                           position_ids=torch.arange(p, sl, device=dev).expand(batch.student_ids.shape[0], -1))
    return s_h[batch.student_loss_mask[:, p:]], teacher
