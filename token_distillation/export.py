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

import contextlib
import json
import logging
import warnings
from pathlib import Path

import torch

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


def write_peft_adapter(model, tokenizer, token_ids: list[int], dest: Path, base_model: str, untied_by_run: bool,
                       base_path: str | None = None) -> None:
    """Write a PEFT trainable-tokens adapter holding ``model``'s rows at ``token_ids`` into ``dest``.

    Args:
        model: the extended model, new rows written in (its dtype is the adapter's dtype). It is
            wrapped by PEFT for the save and unwrapped afterwards (unchanged).
        token_ids: the new tokens' ids, ``[num_new]``.
        base_model: the source as the user named it (``--model_path``; recorded in ``ADAPTER_INFO``).
        untied_by_run: the source was tied and the run untied it (a user must untie the base too).
        base_path: what ``from_pretrained`` loads the source from (a hub id or a local directory; a
            bundled alias's directory), recorded as the adapter config's ``base_model_name_or_path``
            so that PEFT's own loaders find the base; default ``base_model``.
    """
    from peft import TrainableTokensConfig, get_peft_model

    from .models import is_tied

    targets = [_module_name(model, model.get_input_embeddings())]
    out = model.get_output_embeddings()
    if out is not None and not is_tied(model):
        targets.append(_module_name(model, out))
    with _quiet_peft():
        peft_model = get_peft_model(model, TrainableTokensConfig(target_modules=targets,
                                                                 token_indices=list(token_ids)))
    try:
        peft_model.peft_config["default"].base_model_name_or_path = base_path or base_model
        # only the rows: PEFT would otherwise add the whole (resized) embedding matrices to the adapter
        peft_model.save_pretrained(dest, save_embedding_layers=False)
    finally:
        peft_model.unload()
    tokenizer.save_pretrained(dest)
    info = {"base_model": base_model, "base_model_path": base_path or base_model, "new_token_ids": list(token_ids),
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
    with _quiet_peft():
        return PeftModel.from_pretrained(base_model, adapter_dir), tokenizer


@contextlib.contextmanager
def _quiet_peft():
    """peft calls a transformers method deprecated in v5 (``is_gradient_checkpointing``): its
    FutureWarning is about peft's code, not the user's, so it is not shown."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        yield


GGUF_NAME = "model.gguf"
_USER_DEFINED = 4  # gguf TokenType.USER_DEFINED: matched as whole text before the BPE / SentencePiece model


def check_gguf_possible(source, exports: tuple[str, ...]) -> None:
    """Before anything loads: ``--export gguf`` patches the source ``.gguf`` file, so the source must
    be one (``--model_path`` a ``.gguf`` file or a bundled model).

    Raises:
        ConfigError: gguf export from a Hugging Face checkpoint (the message names the converter).
    """
    if "gguf" in exports and not source.gguf_file:
        raise ConfigError(f"--export gguf patches a .gguf source, but --model_path {source.spec} is a Hugging Face "
                          "checkpoint: drop gguf from --export and convert the saved checkpoint with llama.cpp's "
                          "convert_hf_to_gguf.py, or start from the model's .gguf file")


def _rows_in_type(rows, qtype):
    """``rows [n, hidden]`` (float32 numpy) encoded in GGML type ``qtype`` (bytes for quantized
    types, floats for F32/F16/BF16), and the type actually used (F16 when gguf cannot encode
    ``qtype``, in which case the whole tensor is re-encoded as F16)."""
    import numpy as np
    from gguf import GGMLQuantizationType as Q
    from gguf.quants import quantize

    if qtype == Q.F32:
        return rows.astype(np.float32), qtype
    if qtype == Q.F16:
        return rows.astype(np.float16), qtype
    try:
        return quantize(rows.astype(np.float32), qtype), qtype
    except NotImplementedError:
        return None, Q.F16


def _extended_tensor(tensor, new_rows):
    """The reader tensor ``tensor`` (``[vocab, hidden]`` in GGML order ``(hidden, vocab)``) with
    ``new_rows [n, hidden]`` appended, in its own type where gguf can encode it, else F16.
    Returns ``(array, raw_dtype or None)``."""
    import numpy as np
    from gguf import GGMLQuantizationType as Q
    from gguf.quants import dequantize

    encoded, qtype = _rows_in_type(new_rows, tensor.tensor_type)
    if encoded is None:  # re-encode the whole matrix as F16
        whole = dequantize(tensor.data, tensor.tensor_type).reshape(-1, new_rows.shape[1])
        return np.concatenate([whole.astype(np.float16), new_rows.astype(np.float16)]), None
    old = np.asarray(tensor.data)
    if qtype in (Q.F32, Q.F16):
        return np.concatenate([old.reshape(-1, new_rows.shape[1]), encoded]), None
    return np.concatenate([old.reshape(-1, encoded.shape[1]), encoded]), qtype


def _float_type(arr):
    from gguf import GGMLQuantizationType as Q

    return Q.F16 if arr.dtype.itemsize == 2 else Q.F32


def _type_name(arr, raw) -> str:
    return (raw or _float_type(arr)).name


def write_gguf(source_file: Path, model, tokenizer, token_ids: list[int], dest: Path, untied_by_run: bool) -> dict:
    """Write ``dest``: the source ``.gguf`` with the new tokens appended (llama.cpp reads it).

    What changes: ``token_embd.weight`` gets the new input rows and, when the extended model has its
    own output layer, ``output.weight`` gets the new output rows (a tied source untied by the run gets
    an ``output.weight``: the original rows' exact bytes plus the new rows). New rows are encoded in
    the tensor's own type where the ``gguf`` package can encode it (e.g. Q8_0, Q4_0/1, Q5_0/1, F16,
    F32); otherwise that one tensor is re-encoded as F16. The vocabulary gains the new tokens as
    user-defined tokens (type 4, their plain text: llama.cpp matches them before the BPE /
    SentencePiece model, as the extended Hugging Face tokenizer matches its added tokens), score 0
    where the vocabulary has scores; merges are unchanged. Every other key and tensor is copied byte
    for byte, so the original tensors keep their quantisation.

    Args:
        model: the extended model with the new rows written in, ``[vocab + n, hidden]`` embeddings.
        token_ids: ``[n]`` new ids, consecutive after the source vocabulary.
    Returns:
        a summary: tensors extended, their types, whether ``output.weight`` was added.
    Raises:
        ValueError: the new ids do not follow the source vocabulary, or a tensor is missing.
    """
    from gguf import GGUFReader, GGUFWriter

    reader = GGUFReader(str(source_file))
    arch = reader.fields["general.architecture"].contents()
    tokens = reader.fields["tokenizer.ggml.tokens"].contents()
    n_vocab = len(tokens)
    if list(token_ids) != list(range(n_vocab, n_vocab + len(token_ids))):
        raise ValueError(f"new ids {token_ids[:3]}... do not follow the source vocabulary of {n_vocab} tokens")
    texts = [tokenizer.convert_ids_to_tokens(i) for i in token_ids]
    idx = torch.tensor(token_ids)
    inp_new = model.get_input_embeddings().weight.detach()[idx].float().cpu().numpy()
    out_layer = model.get_output_embeddings()
    from .models import is_tied

    out_new = None if out_layer is None or is_tied(model) else out_layer.weight.detach()[idx].float().cpu().numpy()
    by_name = {t.name: t for t in reader.tensors}
    if "token_embd.weight" not in by_name:
        raise ValueError(f"{source_file} has no token_embd.weight")

    writer = GGUFWriter(str(dest), arch)
    _copy_metadata(reader, writer, arch, texts)
    summary = {"file": dest.name, "new_tokens": len(texts), "extended": {}, "output_added": False}
    arrays = _tensor_arrays(reader, inp_new, out_new, summary)
    for name, arr, raw in arrays:
        writer.add_tensor_info(name, arr.shape, arr.dtype, arr.nbytes, raw_dtype=raw or _float_type(arr))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for _, arr, _ in arrays:
        writer.write_tensor_data(arr)
    writer.close()
    if untied_by_run:
        summary["note"] = "the source was tied; the run untied it, so the file has its own output.weight"
    return summary


def _copy_metadata(reader, writer, arch: str, texts: list[str]) -> None:
    """Every key of ``reader`` into ``writer``, the vocabulary extended by ``texts`` (user-defined
    tokens, score 0 where the vocabulary has scores) and ``{arch}.vocab_size`` updated."""
    from gguf import GGUFValueType

    tokens = reader.fields["tokenizer.ggml.tokens"].contents()
    new_values = {"tokenizer.ggml.tokens": list(tokens) + texts, f"{arch}.vocab_size": len(tokens) + len(texts)}
    for key, extra in (("tokenizer.ggml.token_type", _USER_DEFINED), ("tokenizer.ggml.scores", 0.0)):
        if key in reader.fields:
            new_values[key] = list(reader.fields[key].contents()) + [extra] * len(texts)
    for field in reader.fields.values():
        if field.name == "general.architecture" or field.name.startswith("GGUF."):
            continue  # written by the writer itself
        main = field.types[0]
        sub = field.types[-1] if main == GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, new_values.get(field.name, field.contents()), main, sub_type=sub)


def _tensor_arrays(reader, inp_new, out_new, summary: dict) -> list:
    """``(name, array, GGML type or None)`` for every tensor of the output file: the reader's tensors
    as stored, ``token_embd.weight`` (and ``output.weight`` when ``out_new`` is given) with the new
    rows appended, and a new ``output.weight`` when the source had none (a tied source untied by the
    run). Records what was extended in ``summary``."""
    import numpy as np

    by_name = {t.name: t for t in reader.tensors}
    arrays = []
    for t in reader.tensors:
        if t.name == "token_embd.weight" or (t.name == "output.weight" and out_new is not None):
            arr, raw = _extended_tensor(t, inp_new if t.name == "token_embd.weight" else out_new)
            summary["extended"][t.name] = _type_name(arr, raw)
        else:
            arr, raw = np.asarray(t.data), t.tensor_type
        arrays.append((t.name, arr, raw))
    if out_new is not None and "output.weight" not in by_name:  # untied by the run: the output matrix is new
        arr, raw = _extended_tensor(by_name["token_embd.weight"], out_new)
        arrays.append(("output.weight", arr, raw))
        summary["output_added"] = True
        summary["extended"]["output.weight"] = _type_name(arr, raw)
    return arrays
