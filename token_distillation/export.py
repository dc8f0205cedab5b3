"""Exports beside (or instead of) the full Hugging Face checkpoint (``--export``).

**PEFT adapter** (``--export peft``): the new tokens' rows only, as a PEFT *trainable tokens* adapter
(``peft.TrainableTokensConfig``; the adapter stores the rows' values at the new ids and writes them
over the base model's rows in the forward pass). It targets the input embedding and, when the
extended model has its own output layer, the output embedding too, so untied output rows (an untied
source, or a tied source untied by ``--output_embeddings auto``) are kept. Written to
``<out_path>/peft/`` with the extended tokenizer and :data:`ADAPTER_INFO` (the base model, the new
ids, whether the base must be untied first). Its size is ``new tokens x hidden x (1 or 2)`` values:
megabytes, not the gigabytes of a full copy.

Use it with :func:`load_adapter`, which resizes the base model to the extended tokenizer, unties it
when the run untied it, and applies the adapter (``peft.PeftModel.from_pretrained``); the result gives
the logits of the full checkpoint (tested). With plain PEFT the same three steps are needed: a tied
base that the run untied must be untied first (PEFT would otherwise tie the adapter's output rows to
its input rows).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from .config import ConfigError

logger = logging.getLogger(__name__)

ADAPTER_DIRNAME = "peft"
ADAPTER_INFO = "token_distillation_adapter.json"


def check_peft_available(exports: tuple[str, ...]) -> None:
    """Before anything loads: ``--export peft`` needs the ``peft`` package.

    Raises:
        ConfigError: peft is asked for but not installed.
    """
    if "peft" not in exports:
        return
    try:
        import peft  # noqa: F401
    except ImportError:
        raise ConfigError("--export peft needs the peft package: install it (pip install peft, or the project's "
                          "[export] extra) or drop peft from --export") from None


def check_adapter_possible(model, exports: tuple[str, ...]) -> None:
    """After the model loads, before training: a trainable-tokens adapter replaces embedding rows and
    applies the output layer without a bias, so an output layer with a bias cannot be exported.

    Raises:
        ConfigError: ``--export peft`` with an output layer that has a bias.
    """
    out = model.get_output_embeddings()
    if "peft" in exports and out is not None and getattr(out, "bias", None) is not None:
        raise ConfigError("--export peft: this model's output layer has a bias, which a PEFT trainable-tokens "
                          "adapter cannot carry; use --export hf")


def _module_name(model, module) -> str:
    for name, m in model.named_modules():
        if m is module:
            return name
    raise ValueError("module not found in the model")  # internal: the embedding modules belong to the model


def write_peft_adapter(model, tokenizer, token_ids: list[int], dest: Path, base_model: str, untied_by_run: bool) -> None:
    """Write a PEFT trainable-tokens adapter holding ``model``'s rows at ``token_ids`` into ``dest``.

    Args:
        model: the extended model, new rows written in (its dtype is the adapter's dtype). It is
            wrapped by PEFT for the save and unwrapped afterwards (unchanged).
        token_ids: the new tokens' ids, ``[num_new]``.
        base_model: what the base model is loaded from (recorded in the adapter's config).
        untied_by_run: the source was tied and the run untied it (a user must untie the base too).
    """
    from peft import TrainableTokensConfig, get_peft_model

    from .models import is_tied

    targets = [_module_name(model, model.get_input_embeddings())]
    out = model.get_output_embeddings()
    if out is not None and not is_tied(model):
        targets.append(_module_name(model, out))
    peft_model = get_peft_model(model, TrainableTokensConfig(target_modules=targets, token_indices=list(token_ids)))
    try:
        peft_model.peft_config["default"].base_model_name_or_path = base_model
        # only the rows: PEFT would otherwise add the whole (resized) embedding matrices to the adapter
        peft_model.save_pretrained(dest, save_embedding_layers=False)
    finally:
        peft_model.unload()
    tokenizer.save_pretrained(dest)
    info = {"base_model": base_model, "new_token_ids": list(token_ids),
            "vocab_size": int(model.get_input_embeddings().weight.shape[0]),
            "untie_output_embeddings": bool(untied_by_run), "targets": targets}
    (dest / ADAPTER_INFO).write_text(json.dumps(info, indent=1) + "\n", encoding="utf-8")


def load_adapter(base_model, adapter_dir: str | Path):
    """Apply an adapter written by ``--export peft`` to the source model.

    Args:
        base_model: the source model the run started from, loaded (e.g. ``AutoModelForCausalLM.from_pretrained``).
        adapter_dir: ``<out_path>/peft``.
    Returns:
        ``(model, tokenizer)``: a ``peft.PeftModel`` whose logits equal the full extended checkpoint's,
        and the extended tokenizer.
    Raises:
        ValueError: ``adapter_dir`` is not an adapter written by this tool, or the base model's vocabulary
            is larger than the extended model's (not the source model).
    """
    from peft import PeftModel
    from transformers import AutoTokenizer

    from .models import is_tied, untie_embeddings

    adapter_dir = Path(adapter_dir)
    try:
        info = json.loads((adapter_dir / ADAPTER_INFO).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ValueError(f"{adapter_dir} is not an adapter written by --export peft (no readable {ADAPTER_INFO}: {e})") from None
    tokenizer = AutoTokenizer.from_pretrained(adapter_dir)
    vocab = base_model.get_input_embeddings().weight.shape[0]
    if vocab > info["vocab_size"]:
        raise ValueError(f"the base model has {vocab} embedding rows, more than the extended model's "
                         f"{info['vocab_size']}: load the source model {info['base_model']!r}")
    base_model.resize_token_embeddings(info["vocab_size"], mean_resizing=False)
    if info["untie_output_embeddings"] and is_tied(base_model):
        untie_embeddings(base_model)
    return PeftModel.from_pretrained(base_model, adapter_dir), tokenizer
