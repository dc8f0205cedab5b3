"""Load, extend and save causal LMs and their tokenizers.

``--model_path`` may be a Hugging Face hub id, a local checkpoint directory, a ``.gguf`` file, or
the alias of a bundled model. GGUF checkpoints are dequantized by transformers once and the
converted safetensors checkpoint is cached under ``<cache_dir>/gguf/<key>``, where the key is a
hash of the file's content (:func:`~token_distillation.paths.file_identity`): every installation
of the same GGUF file shares one converted copy.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import struct
from pathlib import Path

import torch
from safetensors import SafetensorError

from .config import ConfigError
from .paths import (  # noqa: F401  (re-exported: the path helpers lived here before)
    BUNDLED_MODELS,
    ModelSource,
    atomic_write_dir,
    default_cache_root,
    file_identity,
    nearest_alias,
    prepare_out_path,
    recover_interrupted,
    resolve_model_source,
)

logger = logging.getLogger(__name__)


def _gguf_cache_dir(source: ModelSource, cache_root: Path) -> Path:
    """``<cache_root>/gguf/<key>``; the key is the GGUF file's content hash (the end of a GGUF
    source's identity), so an alias and a path to the same file share one converted copy."""
    key = hashlib.sha256(source.identity.rsplit(":", 1)[-1].encode()).hexdigest()[:20]
    return cache_root / "gguf" / key


MANIFEST = "cache_manifest.json"


def write_manifest(directory: Path) -> None:
    """Record the size of every file of a cache directory (checked by :func:`cache_problem`)."""
    sizes = {str(p.relative_to(directory)): p.stat().st_size for p in sorted(directory.rglob("*")) if p.is_file()}
    (directory / MANIFEST).write_text(json.dumps(sizes, indent=0), encoding="utf-8")


def _safetensors_problem(path: Path) -> str | None:
    """Check a safetensors file's header and that its size matches the tensors it declares."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            return f"{path.name}: truncated header"
        n = int.from_bytes(head, "little")
        if n <= 0 or 8 + n > size:
            return f"{path.name}: bad header length"
        try:
            header = json.loads(f.read(n))
        except (ValueError, UnicodeDecodeError):
            return f"{path.name}: unreadable header"
    ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"]
    if 8 + n + max(ends, default=0) != size:
        return f"{path.name}: size {size} does not match its tensors ({8 + n + max(ends, default=0)})"
    return None


def cache_problem(directory: Path, required: str) -> str | None:
    """Why a cache directory cannot be used (None: it is complete).

    Checked: ``required`` exists; the sizes in :data:`MANIFEST` (when present: caches written
    before the manifest existed have none); every JSON file parses; every safetensors file's size
    matches its header. Cheap: no tensor data is read.
    """
    if not (directory / required).is_file():
        return f"{required} missing"
    manifest = directory / MANIFEST
    if manifest.is_file():
        try:
            sizes = json.loads(manifest.read_text(encoding="utf-8"))
        except ValueError:
            return "unreadable manifest"
        for name, size in sizes.items():
            p = directory / name
            if not p.is_file() or p.stat().st_size != size:
                return f"{name}: missing or wrong size"
    for p in directory.glob("*.json"):
        try:
            json.loads(p.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError):
            return f"{p.name}: invalid JSON"
    for p in directory.glob("*.safetensors"):
        problem = _safetensors_problem(p)
        if problem:
            return problem
    return None


def _usable_cache(directory: Path, required: str) -> bool:
    """True if ``directory`` is a complete cache; a corrupt one is removed (it is ours) and False."""
    if not directory.exists():
        return False
    problem = cache_problem(directory, required)
    if problem is None:
        return True
    logger.warning("cache %s is corrupt (%s); rebuilding it", directory, problem)
    trash = directory.with_name(f".{directory.name}.corrupt-{os.getpid()}")
    try:
        os.replace(directory, trash)  # another process may have moved it already
    except OSError:
        return False
    shutil.rmtree(trash, ignore_errors=True)
    return False


@contextlib.contextmanager
def hub_errors(source: ModelSource):
    """Turn a failed hub download into a ConfigError naming ``--model_path``.

    Only for hub ids (local directories and GGUF files keep their own errors). transformers raises
    ``OSError`` for an unknown or gated repository and for an unreachable hub (after its retries).

    Raises:
        ConfigError: the hub id could not be loaded; the message says what to check.
    """
    if not source.identity.startswith("hub:"):
        yield
        return
    try:
        yield
    except OSError as e:
        if e.errno is not None:  # a local file-system error (e.g. disk full while downloading): not the hub's
            raise
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ConfigError(
            f"--model_path {source.spec}: could not load it from the Hugging Face Hub ({first[:300]}); "
            "check the id, the network (or HF_HUB_OFFLINE), and HF_TOKEN for gated models, or pass a local "
            f"checkpoint directory, a .gguf file or a bundled model name{nearest_alias(source.spec)}"
        ) from e


@contextlib.contextmanager
def local_errors(source: ModelSource, what: str):
    """Turn a failed load of a local checkpoint's ``what`` (its config, tokenizer or weights) into a
    ConfigError naming ``--model_path`` (a directory without tokenizer files, an unknown model_type,
    a corrupt .gguf, truncated weights gave tracebacks). Hub ids go through :func:`hub_errors`; a
    file-system error with an errno (disk full, permissions) and out-of-memory errors pass unchanged.

    Raises:
        ConfigError: the part could not be loaded; the message says what a checkpoint needs.
    """
    if source.identity.startswith("hub:"):
        yield
        return
    try:
        yield
    except ConfigError:
        raise
    except SafetensorError as e:
        raise ConfigError(f"--model_path {source.spec}: cannot load its {what} (SafetensorError: "
                          f"{str(e)[:300]}); the weights file is damaged or incomplete: copy it again") from e
    except (OSError, ValueError, KeyError, EOFError, struct.error) as e:
        if isinstance(e, OSError) and e.errno is not None:
            raise
        first = (str(e).strip().splitlines() or [""])[0]
        raise ConfigError(f"--model_path {source.spec}: cannot load its {what} ({type(e).__name__}: {first[:300]}); "
                          "pass a complete checkpoint directory (config.json, the tokenizer's files, the weights) "
                          "or a .gguf file") from e


def load_tokenizer(source: ModelSource, cache_root: Path):
    """Load the tokenizer (from the converted GGUF cache when present; caches are verified).

    Raises:
        ConfigError: it could not be loaded (:func:`hub_errors`, :func:`local_errors`).
    """
    with local_errors(source, "tokenizer"):
        return _load_tokenizer(source, cache_root)


def _load_tokenizer(source: ModelSource, cache_root: Path):
    from transformers import AutoTokenizer

    if source.gguf_file:
        cached = _gguf_cache_dir(source, cache_root)
        if _usable_cache(cached, "config.json"):
            return AutoTokenizer.from_pretrained(cached)
        tok_cache = cached.with_name(cached.name + "-tokenizer")
        if _usable_cache(tok_cache, "tokenizer_config.json"):
            return AutoTokenizer.from_pretrained(tok_cache)
        tok = AutoTokenizer.from_pretrained(source.path, gguf_file=source.gguf_file)

        def _write(tmp: Path) -> None:
            tok.save_pretrained(tmp)
            write_manifest(tmp)

        atomic_write_dir(tok_cache, _write, replace=False)
        return tok
    with hub_errors(source):
        return AutoTokenizer.from_pretrained(source.path)


def load_config(source: ModelSource, cache_root: Path):
    """Load only the model config (cheap; used to check flags before loading weights).

    Raises:
        ConfigError: it could not be loaded (:func:`hub_errors`, :func:`local_errors`).
    """
    with local_errors(source, "config"):
        return _load_config(source, cache_root)


def _load_config(source: ModelSource, cache_root: Path):
    from transformers import AutoConfig

    if source.gguf_file:
        cached = _gguf_cache_dir(source, cache_root)
        if _usable_cache(cached, "config.json"):
            return AutoConfig.from_pretrained(cached)
        return AutoConfig.from_pretrained(source.path, gguf_file=source.gguf_file)
    with hub_errors(source):
        config = AutoConfig.from_pretrained(source.path)
    _drop_stale_gguf_quantization(config, source)
    return config


def _drop_stale_gguf_quantization(config, source: ModelSource) -> bool:
    """Remove ``quantization_config: {quant_method: gguf}`` from a checkpoint's config.

    transformers keeps that entry when a GGUF-loaded model is rebuilt and saved, although the saved
    weights are plain (dequantized) tensors; loading such a directory then attaches a GGUF
    quantizer that refuses ``save_pretrained`` (after training). Returns True when it was removed.
    """
    q = getattr(config, "quantization_config", None)
    method = q.get("quant_method") if isinstance(q, dict) else getattr(q, "quant_method", None)
    if q is None or str(getattr(method, "value", method)).lower() != "gguf":
        return False
    del config.quantization_config
    logger.info("%s: its config.json says quant_method gguf over plain weights (a checkpoint converted from GGUF); "
                "ignoring that entry so that the extended model can be saved", source.spec)
    return True


def _has_stale_gguf_entry(directory: Path) -> bool:
    """A local checkpoint whose config.json declares GGUF quantization (see :func:`_drop_stale_gguf_quantization`)."""
    try:
        q = json.loads((directory / "config.json").read_text(encoding="utf-8")).get("quantization_config")
    except (OSError, ValueError, AttributeError):
        return False
    return isinstance(q, dict) and str(q.get("quant_method", "")).lower() == "gguf"


def check_saveable(model) -> None:
    """Refuse, before any training, a model that ``save_pretrained`` would refuse after it.

    Raises:
        ConfigError: the model carries a quantizer whose weights cannot be serialized.
    """
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is None:
        return
    try:
        ok = quantizer.is_serializable(safe_serialization=True)
    except TypeError:
        ok = quantizer.is_serializable()
    if not ok:
        method = getattr(getattr(quantizer, "quantization_config", None), "quant_method", "?")
        raise ConfigError(f"--model_path: the model is quantized ({getattr(method, 'value', method)}) in a form "
                          "transformers cannot save, so the extended model could not be written; pass an "
                          "unquantized checkpoint (or the .gguf file itself)")


def _convert_gguf(source: ModelSource, target: Path, cache_root: Path) -> None:
    """Dequantize a GGUF checkpoint once and store it as a regular safetensors checkpoint.

    A GGUF-loaded model refuses ``save_pretrained``; it is rebuilt from its config and state dict.
    """
    from transformers import AutoModelForCausalLM

    logger.info("Converting GGUF checkpoint %s (once; cached at %s)", source.gguf_file, target)
    loaded = AutoModelForCausalLM.from_pretrained(source.path, gguf_file=source.gguf_file)
    tok = load_tokenizer(source, cache_root)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # weights are dequantized: save a plain checkpoint
    rebuilt = AutoModelForCausalLM.from_config(config)
    rebuilt.load_state_dict(loaded.state_dict())

    def _write(tmp: Path) -> None:
        rebuilt.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        write_manifest(tmp)

    atomic_write_dir(target, _write, replace=False)


def weights_path(source: ModelSource, cache_root: Path) -> str:
    """What ``from_pretrained`` loads the weights from: ``source.path`` (a hub id or a local
    directory), or for a GGUF source (a bundled alias too) its converted checkpoint in the cache
    (converted by :func:`load_model` on first use)."""
    return str(_gguf_cache_dir(source, cache_root)) if source.gguf_file else source.path


def load_model(source: ModelSource, cache_root: Path, device: torch.device, dtype: torch.dtype):
    """Load the causal LM, frozen (``requires_grad=False``) and in eval mode, on ``device``."""
    from transformers import AutoModelForCausalLM

    path = weights_path(source, cache_root)
    if source.gguf_file and not _usable_cache(Path(path), "config.json"):
        with local_errors(source, "weights"):
            _convert_gguf(source, Path(path), cache_root)
    kw = {}
    if not source.gguf_file and _has_stale_gguf_entry(Path(path)):
        kw["config"] = load_config(source, cache_root)  # without the stale entry
    with hub_errors(source), local_errors(source, "weights"):
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **kw)
    model.to(device)
    model.eval()
    model.requires_grad_(False)
    return model


def embedding_scale(model) -> float:
    """Constant factor the input-embedding module applies to its rows (Gemma: sqrt(hidden)).

    Probed by running the module on one id and comparing with the weight row.

    Raises:
        NotImplementedError: the module's output is not a scalar multiple of its weight row.
    """
    emb = model.get_input_embeddings()
    w = emb.weight.detach()
    idx = torch.tensor([[min(5, w.shape[0] - 1)]], device=w.device)
    with torch.no_grad():
        out = emb(idx)[0, 0].float()
    row = w[idx[0, 0]].float()
    denom = float(row.dot(row))
    if denom == 0.0:
        return 1.0
    scale = float(out.dot(row)) / denom
    if not torch.allclose(out, row * scale, rtol=1e-2, atol=1e-3 * float(row.abs().max())):
        raise NotImplementedError(
            f"input embedding module {type(emb).__name__} is not a scaled lookup; not supported"
        )
    return scale


def is_tied(model) -> bool:
    """True when input and output embeddings share storage."""
    out = model.get_output_embeddings()
    return out is not None and out.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()


def extend_embeddings(model, num_tokens: int) -> None:
    """Grow the embedding matrices to at least ``num_tokens`` rows (never shrinks them).

    Pre-padded vocabularies (more rows than tokenizer entries) keep their size when the new ids fit.
    New rows are left for the caller to fill.
    """
    rows = model.get_input_embeddings().weight.shape[0]
    if num_tokens > rows:
        model.resize_token_embeddings(num_tokens, mean_resizing=False)
    model.config.vocab_size = model.get_input_embeddings().weight.shape[0]
    text_config(model.config).vocab_size = model.config.vocab_size


def text_config(model_config):
    """The text model's part of a config (a multimodal model's ``get_text_config()``), else the config."""
    return model_config.get_text_config() if hasattr(model_config, "get_text_config") else model_config


def context_length(model_config) -> int | None:
    """The model's context in tokens (``max_position_embeddings``), or None when the config does not say."""
    return getattr(text_config(model_config), "max_position_embeddings", None) or None


def check_context_length(model_config, snippet_len: int, bos_len: int = 1) -> None:
    """Refuse snippets longer than the model's context (``max_position_embeddings``).

    Documents longer than the context are fine: snippets are windows of ``snippet_len`` tokens.

    Raises:
        ConfigError: ``snippet_len + bos_len`` exceeds the model's context.
    """
    ctx = context_length(model_config)
    if ctx and snippet_len + bos_len > ctx:
        raise ConfigError(f"--snippet_len {snippet_len} (+{bos_len} BOS) exceeds the model's context of {ctx} "
                          f"tokens; use --snippet_len {ctx - bos_len} or less")


def set_new_output_bias(model, token_ids: list[int], subtoken_ids: list[tuple[int, ...]]) -> bool:
    """Give the new tokens the mean of their subtokens' output bias, for models whose output layer
    has a bias (after :func:`extend_embeddings`, the new entries hold whatever the resize left).
    Returns False when the output layer has no bias.
    """
    out = model.get_output_embeddings()
    bias = getattr(out, "bias", None) if out is not None else None
    if bias is None:
        return False
    with torch.no_grad():
        for new_id, subs in zip(token_ids, subtoken_ids):
            bias[new_id] = bias[torch.tensor(list(subs), device=bias.device)].float().mean().to(bias.dtype)
    return True


def untie_embeddings(model) -> None:
    """Give a tied model its own output layer: a frozen copy of the shared matrix.

    Afterwards ``is_tied(model)`` is False and the config says ``tie_word_embeddings=False``, so
    the saved checkpoint stores both matrices (one more ``[vocab, hidden]`` matrix on disk).
    """
    inp = model.get_input_embeddings().weight
    out = model.get_output_embeddings()
    out.weight = torch.nn.Parameter(inp.detach().clone(), requires_grad=False)
    model.config.tie_word_embeddings = False
    text_config(model.config).tie_word_embeddings = False
    assert not is_tied(model)
