"""A memory plan: the peak accelerator memory of a run, estimated from the model's config alone
(no weights downloaded or loaded), logged before the model loads, and a refusal naming the flag to
change when it will not fit the device.

Terms (bytes):

- ``weights``: every parameter of the model built on the meta device from its config
  (``accelerate.init_empty_weights``), at the dtype the weights are loaded in, plus the new rows
  (``extend``) and, when a tied model is untied, a copy of the embedding matrix (``untie``).
- ``trainable``: the new rows in fp32, their gradient and two Adam moments: ``4 x 4 x new x hidden``.
- ``activations``: what the student keeps for its backward pass through the layers up to the target
  layer, at the chosen batch: per layer ``tokens x hidden x (34 + 5 x heads x seq / hidden)`` bytes
  at 16-bit (Korthikanti et al., "Reducing Activation Recomputation in Large Transformer Models",
  2022, Sec. 4.1; doubled for fp32), plus the teacher's transient forward of one layer.
- ``logits``: the held-out pass's new-token argmax takes ``batch x seq x vocab`` fp32 logits.

The estimate is a plan, not a measurement: it ignores allocator fragmentation and library
workspaces (a margin of 10% is kept when comparing with the device).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from .config import ConfigError

logger = logging.getLogger(__name__)

GIB = 2**30


@dataclass
class MemoryPlan:
    """Estimated peak memory of a run, in bytes, by term (see the module docstring)."""

    weights: int
    trainable: int
    activations: int
    logits: int

    @property
    def total(self) -> int:
        return self.weights + self.trainable + self.activations + max(0, self.logits - self.activations)

    def describe(self) -> str:
        return (f"{self.total / GIB:.2f} GiB (weights {self.weights / GIB:.2f}, trainable rows + Adam "
                f"{self.trainable / GIB:.3f}, activations {self.activations / GIB:.2f}, held-out logits "
                f"{self.logits / GIB:.2f})")


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
    text = model_config.get_text_config() if hasattr(model_config, "get_text_config") else model_config
    out, inp = model.get_output_embeddings(), model.get_input_embeddings()
    if getattr(text, "tie_word_embeddings", False) and out is not None and out.weight is not inp.weight:
        total -= out.weight.numel()  # tied in the real model (tying is skipped on the meta device)
    return total


def plan_memory(model_config, *, weights_dtype: torch.dtype, autocast_dtype: torch.dtype | None, batch_size: int,
                seq_len: int, layers_to_target: int, num_new: int, untie: bool) -> MemoryPlan:
    """Estimate the peak memory of training ``num_new`` rows (see the module docstring).

    Args:
        seq_len: snippet length in tokens, BOS included.
        layers_to_target: decoder layers the student runs (and back-propagates through).
        untie: a tied model will be untied (one more ``[vocab, hidden]`` matrix).
    """
    text = model_config.get_text_config() if hasattr(model_config, "get_text_config") else model_config
    hidden, vocab = int(text.hidden_size), int(text.vocab_size)
    heads = int(getattr(text, "num_attention_heads", 1) or 1)
    item = torch.empty((), dtype=weights_dtype).element_size()
    weights = (count_parameters(model_config) + num_new * hidden * (1 if not untie else 2)) * item
    if untie:
        weights += vocab * hidden * item
    act_item = torch.empty((), dtype=autocast_dtype or weights_dtype).element_size()
    tokens = batch_size * seq_len
    per_layer = tokens * hidden * (34 + 5 * heads * seq_len / hidden) * act_item / 2
    activations = int(per_layer * (layers_to_target + 1))  # + the teacher's transient layer
    logits = batch_size * seq_len * (vocab + num_new) * 4
    return MemoryPlan(weights, 16 * num_new * hidden, activations, logits)


def check_fits(plan: MemoryPlan, device: torch.device, batch_size: int, margin: float = 0.9) -> None:
    """Log the plan; on CUDA refuse a run whose plan exceeds ``margin`` of the device's memory.

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
