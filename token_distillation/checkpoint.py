"""Resumable training: periodic checkpoints inside the output directory.

Layout: ``<out_path>/checkpoints/step-00000010.pt`` (one file per checkpoint, the newest two are
kept). A token-sharded run (several processes, per-token recipe; see
:mod:`token_distillation.distributed`) writes one series per process,
``shard-001-of-004-step-00000010.pt``: each process saves and restores its own state (all rows,
of which it trains its own tokens', and its optimizer), with no communication, and a resume needs
the same number of processes. Each file holds the new rows ``[num_new_tokens, hidden]``, the AdamW state, the step, the
loss curve so far, the training seconds so far (summed over the processes that ran in turn) with
the step from which they count, the shuffling generator's state and the not-yet-used part of the
current epoch's order, the global python/numpy/torch RNG states and a fingerprint of everything that
determines the result (training flags, model, tokens, snippets). A file is written under a
temporary name and renamed into place, so a checkpoint is either complete or absent. When the model
wrote the snippets (``--snippet_source generated``, or a top-up), they are kept beside the first
checkpoint as ``generated-snippets.pt`` (:class:`GeneratedSnippetCache`), so that ``--resume`` reads
them instead of sampling them again (minutes on a CPU; and sampling on a GPU need not repeat bit for
bit, which would make the snippets, and so the checkpoint's fingerprint, differ).

The final output is written at the end by :func:`token_distillation.paths.atomic_write_dir`,
which replaces ``<out_path>`` as a whole: a finished run therefore leaves no checkpoints behind.
An interrupted run leaves ``<out_path>`` holding only ``checkpoints/``; rerunning with
``--resume`` continues from the newest checkpoint and reaches the same rows as an uninterrupted run
(same flags; for data-parallel runs the number of processes may change as long as it divides the
global batch; a token-sharded run resumes with the same number of processes).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .config import ConfigError
from .interrupts import STOP, Interrupted
from .paths import (CHECKPOINT_DIRNAME, CHECKPOINT_MARKER, GENERATED_SNIPPETS_FILE, HELDOUT_BEFORE_FILE,  # noqa: F401
                    OUTPUT_FIT_FILE, TOOL_ID, prepare_output, replace_file)

logger = logging.getLogger(__name__)

_NAME = re.compile(r"^(?:shard-(\d{3})-of-(\d{3})-)?step-(\d{8})\.pt$")
#: with several processes, time-based saves and stop signals are agreed on every this many steps
DIST_SYNC_EVERY = 10

#: Flags that may differ between an interrupted run and its resumption without changing the result.
#: Paths of inputs are exempt too: their content is fingerprinted instead (model identity, token list,
#: snippet digest), so a moved word list or corpus still resumes and a changed one does not.
RESUME_FREE_FLAGS = {"resume", "overwrite", "checkpoint_every", "checkpoint_minutes", "log_every", "device",
                     "cache_dir", "num_proc", "teacher_cache_gib", "heldout_cache_dir",
                     "out_path", "model_path", "new_tokens_source", "dataset_path"}


def fingerprint(config: dict[str, Any], **extra: Any) -> dict[str, Any]:
    """What a checkpoint must match to be resumed: the flags (except those in
    ``RESUME_FREE_FLAGS``) plus ``extra`` items (e.g. model identity, token ids, a snippet hash);
    an optional item (``_OPTIONAL_KEYS``, e.g. ``words_digest`` without a word list) given as None
    is left out."""
    fp = {k: v for k, v in config.items() if k not in RESUME_FREE_FLAGS}
    fp.update({k: v for k, v in extra.items() if v is not None or k not in _OPTIONAL_KEYS})
    return json.loads(json.dumps(fp, default=str))


def snippet_digest(seqs) -> str:
    """SHA-256 over the teacher ids of merged snippets (``MergedSequence``), in order."""
    h = hashlib.sha256()
    for s in seqs:
        h.update(np.asarray(s.teacher_ids, dtype=np.int64).tobytes())
        h.update(b"|")
    return h.hexdigest()


def list_digest(words: list[str]) -> str:
    """SHA-256 of a word list (``--new_tokens_source``) as read, in order: a ``--resume`` with a list
    whose contents changed is refused at start-up, before minutes of mining or sampling."""
    return hashlib.sha256(json.dumps(words, ensure_ascii=False).encode("utf-8")).hexdigest()


# fingerprint items older checkpoints lack: compared only when the checkpoint holds them
_OPTIONAL_KEYS = frozenset({"words_digest"})


def _refuse_other_run(path: Path, saved: dict[str, Any], now: dict[str, Any], keys) -> None:
    """Raise ConfigError naming up to five of ``keys`` whose values differ between the checkpoint
    ``path``'s fingerprint ``saved`` and this run's ``now``."""
    diff = sorted(k for k in keys if saved.get(k) != now.get(k) and (k in saved or k not in _OPTIONAL_KEYS))
    if diff:
        shown = ", ".join(_difference(k, saved.get(k), now.get(k)) for k in diff[:5])
        raise ConfigError(f"--resume: the checkpoint {path} belongs to a different run ({shown}); rerun with "
                          "the same flags, or pass --overwrite without --resume to start over")


def _difference(key: str, then: Any, now: Any) -> str:
    """One fingerprint item that differs, in words (long lists by their length and first difference)."""
    if key == "words_digest":
        return "the --new_tokens_source word list's contents changed"
    if key == "snippets":
        return ("the training snippets differ (the corpus, its files or their order changed since the interrupted "
                "run)")
    if isinstance(then, list) and isinstance(now, list) and max(len(then), len(now)) > 5:
        first = next((i for i, (a, b) in enumerate(zip(then, now)) if a != b), min(len(then), len(now)))
        at = (f"first difference at entry {first}: {then[first]!r} then, {now[first]!r} now"
              if first < min(len(then), len(now)) else f"the same first {first} entries")
        return f"{key}: {len(then)} entries then, {len(now)} now ({at})"
    return f"{key}: {then!r} then, {now!r} now"


#: fingerprint items known only once the snippets are paired (:func:`check_training_inputs`)
TRAINING_INPUT_KEYS = ("tokens", "new_ids", "rows_shape", "snippets")


def check_training_inputs(directory: Path, now: dict[str, Any]) -> None:
    """``--resume``: refuse checkpoints whose new tokens or training snippets differ from this run's
    (:data:`TRAINING_INPUT_KEYS` of the newest checkpoint's fingerprint), before the held-out pass
    that precedes training; the flags were compared at start-up (:func:`check_resumable`).

    Raises:
        ConfigError: an item differs (named, as :func:`check_resumable` does), or the newest
            checkpoint cannot be read.
    """
    newest = _newest(directory)
    if newest is None:
        return
    saved = _load(newest, mmap=True)["fingerprint"]
    _refuse_other_run(newest, saved, now, [k for k in TRAINING_INPUT_KEYS if k in saved])


def _rng_state() -> dict[str, Any]:
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {"python": random.getstate(), "torch": torch.get_rng_state(),
            "numpy": (name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached))}


def _set_rng_state(st: dict[str, Any]) -> None:
    v, internal, gauss = st["python"]
    random.setstate((v, tuple(internal), gauss))
    torch.set_rng_state(st["torch"])
    name, keys, pos, has_gauss, cached = st["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))


def _newest(directory: Path) -> Path | None:
    """The newest checkpoint file in ``directory`` (plain or of any shard), or None."""
    d = Path(directory)
    found = [p for p in (d.iterdir() if d.is_dir() else []) if _NAME.match(p.name)]
    return max(found, key=lambda p: (_NAME.match(p.name).group(3), p.name)) if found else None


def _load(path: Path, mmap: bool = False) -> dict[str, Any]:
    """A step checkpoint's contents; with ``mmap`` its tensors are mapped from the file, not read (for
    the start-up checks, which read only the fingerprint: with ``--train_original_embeddings`` on an
    8B model a checkpoint holds ~6 GB of rows and Adam state).

    Raises:
        ConfigError: the file cannot be read (cut short by a full disk or a partial copy, or not a
            checkpoint); the message names it and how to go on.
    """
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
        if not isinstance(state, dict) or "fingerprint" not in state:
            raise ValueError("no fingerprint in it")
        return state
    except Exception as exc:  # noqa: BLE001 - any unreadable file gets the same advice
        raise ConfigError(f"--resume: the checkpoint {path} cannot be read ({type(exc).__name__}: "
                          f"{str(exc).splitlines()[0] if str(exc) else 'damaged'}); delete it to resume from the "
                          "checkpoint before it, or pass --overwrite without --resume to start over") from exc


def _saved_batch(saved_fingerprint: dict[str, Any], batch_size: int | str) -> int | str:
    """The batch stored in a checkpoint's fingerprint (logged), or ``batch_size`` when it predates auto."""
    saved = saved_fingerprint.get("token_distillation_batch_size")
    if isinstance(saved, int) and saved >= 1:
        logger.info("--resume: --token_distillation_batch_size auto keeps the interrupted run's batch of %d", saved)
        return saved
    return batch_size


def shard_prefix(rank: int, world_size: int) -> str:
    """File-name prefix of the checkpoints of process ``rank`` of a token-sharded run of ``world_size``."""
    return f"shard-{rank:03d}-of-{world_size:03d}-"


def check_resumable(directory: Path, config: dict[str, Any], model_identity: str, shards: int = 0,
                    words_digest: str | None = None) -> int | str:
    """Before anything heavy: with ``--resume``, compare the newest checkpoint's flags, model and word
    list with this run's (tokens and snippets are compared when training starts); warn when there is nothing
    to resume. The checkpoint is read once here.

    Returns:
        the run's ``--token_distillation_batch_size``: with ``auto``, the batch the interrupted run
        resolved it to (stored in the checkpoint's fingerprint), so that the remaining steps follow the same
        batches whatever memory this machine has; otherwise the flag's value.

    Args:
        shards: the number of processes when this run shards the tokens, else 0.
        words_digest: :func:`list_digest` of the ``--new_tokens_source`` word list, when one is used
            (a list whose contents changed under the same path is refused here).
    Raises:
        ConfigError: the checkpoint was made with other flags or another model, or by a token-sharded
            run of another number of processes (or by a run without sharding when this one shards,
            or the other way round); or the newest checkpoint cannot be read.
    """
    d = Path(directory)
    matches = [(p, _NAME.match(p.name)) for p in (d.iterdir() if d.is_dir() else [])]
    found = sorted((p for p, m in matches if m), key=lambda p: (_NAME.match(p.name).group(3), p.name))
    batch = config.get("token_distillation_batch_size")
    if not found:
        logger.warning("--resume: no checkpoint in %s; starting a new run from step 0", directory)
        return batch
    worlds = {int(m.group(2)) for _, m in matches if m and m.group(2)}
    plain = any(m and not m.group(2) for _, m in matches)
    if shards and (plain or worlds != {shards}) or not shards and worlds and not plain:
        then = (f"{', '.join(map(str, sorted(worlds)))} processes sharding the tokens" if worlds
                else "a run without token sharding (one process, or data-parallel)")
        now = f"{shards} processes sharding the tokens" if shards else "this launch (no token sharding)"
        raise ConfigError(f"--resume: the checkpoints in {directory} were written by {then}, not by {now}; launch "
                          "the same number of processes as the interrupted run (torchrun --nproc_per_node N), "
                          "or pass --overwrite without --resume to start over")
    newest = found[-1]
    saved = _load(newest, mmap=True)["fingerprint"]
    if batch == "auto":
        batch = _saved_batch(saved, batch)
    now = fingerprint({**config, "token_distillation_batch_size": batch}, model_identity=model_identity,
                      words_digest=words_digest)
    _refuse_other_run(newest, saved, now, now)
    return batch


class Checkpointer:
    """Saves and restores the training loop's state (see the module docstring).

    Args:
        directory: where checkpoint files go (``<out_path>/checkpoints``).
        every: save after every ``every`` optimizer steps (0: not by step count).
        fingerprint: see :func:`fingerprint`; a checkpoint with a different one is refused.
        resume: load the newest checkpoint (if any) at the start. Without it, old checkpoints in
            ``directory`` are deleted at the start (they belong to a run being started over).
        dist: a :class:`~token_distillation.distributed.DistContext` (only its main process
            writes); None for one process.
        keep: how many of the newest checkpoint files to keep.
        prefix: file-name prefix of this process's checkpoints in a token-sharded run
            (:func:`shard_prefix`; ``dist`` is then None: no communication). Without ``resume`` only
            files with this prefix are removed at the start (the main process clears the directory
            before the shards start).
        always_final: save when training ends even without periodic saving (a token-sharded
            process keeps its finished rows until they are gathered).
        minutes: also save when this many minutes of training passed since the last save (0: not
            by time), and once when training ends, so that a kill (``kill -9``, a preemption) loses
            at most that much training. With several processes the main process's clock decides,
            checked every :data:`DIST_SYNC_EVERY` steps.
        attachments: ``{file name: object}`` written (``torch.save``, atomically) beside the first
            checkpoint this instance saves, e.g. :meth:`GeneratedSnippetCache.attachment`.

    A stop signal (see :mod:`token_distillation.interrupts`) always saves the current step and
    raises :class:`~token_distillation.interrupts.Interrupted`.
    """

    def __init__(self, directory: Path, every: int, fingerprint: dict[str, Any], resume: bool = False,
                 dist=None, keep: int = 2, minutes: float = 0.0, prefix: str = "", always_final: bool = False,
                 attachments: dict[str, Any] | None = None):
        self.directory = Path(directory)
        self.attachments = dict(attachments or {})
        self.every = int(every)
        self.minutes = float(minutes)
        self.fingerprint = fingerprint
        self.resume = resume
        self.dist = dist
        self.keep = max(1, keep)
        self.saved: list[Path] = []
        self.prefix = prefix
        self.always_final = always_final
        self._last_time = time.monotonic()
        self._last_step = -1

    @property
    def _main(self) -> bool:
        return self.dist is None or self.dist.is_main

    def checkpoints(self) -> list[Path]:
        """Complete checkpoint files, oldest first."""
        if not self.directory.is_dir():
            return []
        return sorted((p for p in self.directory.iterdir()
                       if _NAME.match(p.name) and p.name.startswith(self.prefix)
                       and (self.prefix or not _NAME.match(p.name).group(2))), key=lambda p: p.name)

    def restore(self, rows, optimizer, generator: torch.Generator
                ) -> tuple[int, list[int], list[float], tuple[float, int]] | None:
        """Load the newest checkpoint into ``rows`` (a ``NewRows``), ``optimizer`` and ``generator``.

        Returns:
            ``(step, remaining order of the current epoch, loss curve so far, timing)``, or None
            when not resuming or no checkpoint exists (then a fresh start: stale checkpoints are
            removed). ``timing`` is ``(training seconds so far, step from which they count)``; a
            checkpoint written before the time was recorded gives ``(0.0, step)``.

        Raises:
            ConfigError: the checkpoint was made with different flags, model, tokens or snippets, or
                cannot be read.
        """
        def _pick() -> str:
            if not self.resume and self.prefix:
                for old in self.checkpoints():
                    old.unlink()
                return ""
            if not self.resume:
                if self.directory.is_dir():
                    logger.info("starting over: removing old checkpoints in %s", self.directory)
                    shutil.rmtree(self.directory)
                return ""
            found = self.checkpoints()
            return str(found[-1]) if found else ""

        path = self.dist.broadcast_from_main(_pick) if self.dist is not None else _pick()
        if not path:
            if self.resume:  # the run's start-up check (check_resumable) has warned already
                logger.debug("--resume: no checkpoint in %s; starting from step 0", self.directory)
            return None
        state = _load(Path(path))
        _refuse_other_run(Path(path), state["fingerprint"], self.fingerprint,
                          set(state["fingerprint"]) | set(self.fingerprint))
        with torch.no_grad():
            rows.rows.copy_(state["rows"].to(rows.rows.device))
        optimizer.load_state_dict(state["optimizer"])
        generator.set_state(state["generator"])
        _set_rng_state(state["rng"])
        logger.info("resumed from %s (step %d)", path, state["step"])
        step = int(state["step"])
        self._last_time, self._last_step = time.monotonic(), step
        timing = (float(state["seconds"]), int(state.get("seconds_from_step", 0))) if "seconds" in state else (0.0, step)
        return step, list(state["order"]), list(state["loss_curve"]), timing

    def step_done(self, step: int, rows, optimizer, generator: torch.Generator, order: list[int],
                  loss_curve: list[float], timing: tuple[float, int], final: bool = False) -> Path | None:
        """Save a checkpoint when one is due after ``step``: every ``every`` steps, after ``minutes``
        of training, at the ``final`` step (when periodic saving is on), or on a stop signal.
        ``timing``: (training seconds so far, step from which they count), restored on resume.

        Returns:
            the checkpoint's path (main process) or None.

        Raises:
            Interrupted: a stop signal was received (after the checkpoint is written).
        """
        by_steps = self.every > 0 and step % self.every == 0
        by_time = self.minutes > 0 and time.monotonic() - self._last_time >= 60.0 * self.minutes
        stop = STOP.signum
        if self.dist is not None and self.dist.distributed:  # every process must take the same decision
            if step % DIST_SYNC_EVERY == 0 or final or by_steps:
                by_time, stop = self.dist.broadcast_from_main(lambda: (by_time, stop))
            else:
                by_time, stop = False, None
        periodic = self.every > 0 or self.minutes > 0
        due = by_steps or by_time or stop is not None or (final and (periodic or self.always_final))
        path = None
        if due and step != self._last_step:
            path = self.save(step, rows, optimizer, generator, order, loss_curve, timing) if self._main else None
            if self.dist is not None:
                self.dist.wait()
            self._last_time, self._last_step = time.monotonic(), step
        elif due and self._main and self.checkpoints():
            path = self.checkpoints()[-1]
        if stop is not None:
            raise Interrupted(stop, step=step, checkpoint=path)
        return path

    def save(self, step: int, rows, optimizer, generator: torch.Generator, order: list[int],
             loss_curve: list[float], timing: tuple[float, int]) -> Path:
        """Write ``step-NNNNNNNN.pt`` atomically (temporary file, fsync, rename); prune old ones."""
        _mark(self.directory)  # marks the directory as this tool's (what --overwrite may replace)
        for name in list(self.attachments):  # once, with the first checkpoint of this run
            _save_synced(self.attachments.pop(name), self.directory / name)
        state = {"step": int(step), "rows": rows.rows.detach().cpu().clone(), "optimizer": optimizer.state_dict(),
                 "generator": generator.get_state(), "order": [int(i) for i in order],
                 "loss_curve": [float(x) for x in loss_curve], "seconds": float(timing[0]),
                 "seconds_from_step": int(timing[1]), "rng": _rng_state(),
                 "fingerprint": self.fingerprint}
        final = self.directory / f"{self.prefix}step-{step:08d}.pt"
        _save_synced(state, final)
        for old in self.checkpoints()[: -self.keep]:
            old.unlink()
        logger.info("checkpoint: step %d -> %s", step, final)
        return final


def _load_keyed(path: Path | None, key: Any, resume: bool, redo: str) -> dict[str, Any] | None:
    """A state file kept beside the checkpoints for ``--resume``, when resuming and its ``"key"`` is
    ``key``; else None. A damaged file (full disk, copy cut short) or one made for other inputs is
    logged with ``redo`` (what the run does instead) and costs that work, not the run."""
    if not (resume and path is not None and path.is_file()):
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file gets the same treatment
        logger.warning("--resume: %s is unreadable (%s: %s); %s", path, type(e).__name__, e, redo)
        return None
    if not isinstance(state, dict) or state.get("key") != key:
        logger.info("--resume: %s was made for other inputs; %s", path, redo)
        return None
    return state


def _mark(directory: Path) -> None:
    """Create ``directory`` with the marker that makes it this tool's checkpoint directory."""
    directory.mkdir(parents=True, exist_ok=True)
    marker = directory / CHECKPOINT_MARKER
    if not marker.is_file():
        replace_file(marker, lambda tmp: tmp.write_text(json.dumps({"tool": TOOL_ID}), encoding="utf-8"))


class OutputFitProgress:
    """The output-row fit's finished token groups (``--output_embeddings distill``), kept beside the
    checkpoints as :data:`OUTPUT_FIT_FILE` (with the shard prefix in a token-sharded run).

    The fit reads every snippet once more and fits the rows group by group (an hour or more at 500
    words on a CPU); after each group the fitted rows so far are written atomically, and a
    ``--resume`` starts after the last group written instead of at the first. The file is used only
    when its key (:func:`token_distillation.output_rows.fit_key`: trained input rows, output rows
    before the fit, token groups, step size, steps) matches, and it goes with the checkpoint
    directory when the run finishes.

    Args:
        directory: the checkpoint directory, or None (nothing kept: the Python API).
        prefix: file-name prefix (:func:`shard_prefix` in a token-sharded run).
        resume: read the file (``--resume``); otherwise an old one is ignored and replaced.
    """

    def __init__(self, directory: Path | None, prefix: str = "", resume: bool = False):
        self.path = None if directory is None else Path(directory) / f"{prefix}{OUTPUT_FIT_FILE}"
        self.resume = resume

    def load(self, key: str) -> dict[str, Any] | None:
        """The saved state (``groups_done``, ``tokens``, ``rows`` ``[n, hidden]`` float32, ``kl``,
        ``curve``, ``seconds``) when resuming and its key is ``key``; else None (logged)."""
        return _load_keyed(self.path, key, self.resume, "fitting the output rows from the first group")

    def save(self, key: str, state: dict[str, Any]) -> None:
        """Write ``state`` with ``key`` atomically (complete or absent)."""
        if self.path is None:
            return
        _mark(self.path.parent)
        _save_synced({**state, "key": key}, self.path)


def _save_synced(obj: Any, final: Path) -> None:
    """``torch.save`` to ``final`` through :func:`~token_distillation.paths.replace_file` (complete
    or absent), the temporary file fsynced before the rename."""
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())

    replace_file(final, write)


class GeneratedSnippetCache:
    """Snippets the model generated, kept beside the checkpoints for ``--resume``.

    Sampling snippets costs minutes on a CPU (the model writes ``--snippet_num`` +
    ``--heldout_snippet_num`` snippets per token). An interrupted run's :class:`Checkpointer` writes
    them as :data:`GENERATED_SNIPPETS_FILE` with its first checkpoint (:meth:`attachment`); the
    resumed run reads them (:meth:`get`) instead of sampling again. They are used only when their
    key (model, tokens, per-token numbers, snippet length, seed and sampling flags) matches this run's.

    Args:
        directory: ``<out_path>/checkpoints``, or None (nothing is saved: the Python API).
        resume: read an earlier run's file (``--resume``).
        key: what determines the snippets apart from the per-token numbers (JSON-able).
    """

    def __init__(self, directory: Path | None, resume: bool, key: dict[str, Any]):
        self.directory, self.resume = directory, resume
        self.key = json.loads(json.dumps(key, default=str))
        self.made: dict[str, Any] | None = None

    def _key(self, counts: list[tuple[int, int]]) -> dict[str, Any]:
        return {**self.key, "counts": [[int(a), int(b)] for a, b in counts]}

    def get(self, counts: list[tuple[int, int]]):
        """The saved :class:`~token_distillation.snippets.SnippetSet` for per-token ``(train,
        held-out)`` ``counts``, or None (not resuming, no file, or one made for other inputs)."""
        from .snippets import snippet_set_from_state

        path = self.directory / GENERATED_SNIPPETS_FILE if self.directory is not None else None
        state = _load_keyed(path, self._key(counts), self.resume, "generating the snippets again")
        if state is None:
            return None
        try:
            snips = snippet_set_from_state(state["snippets"])
        except Exception as e:  # a damaged file (a full disk, a copy cut short) costs a new sampling, not the run
            logger.warning("--resume: %s is unreadable (%s: %s); generating the snippets again", path,
                           type(e).__name__, e)
            return None
        logger.info("--resume: %d training / %d held-out generated snippets read from %s (not generated again)",
                    len(snips.train), len(snips.heldout), path)
        return snips  # the file stays where it is: a resumed run does not clear the checkpoints

    def put(self, counts: list[tuple[int, int]], snips) -> None:
        """Remember freshly generated ``snips`` for the next checkpoint (see :meth:`attachment`);
        nothing when no directory is kept."""
        from .snippets import snippet_set_state

        if self.directory is not None:
            self.made = {"key": self._key(counts), "snippets": snippet_set_state(snips)}

    def attachment(self) -> dict[str, Any]:
        """``{file name: state}`` for :class:`Checkpointer`'s ``attachments`` (empty: nothing generated)."""
        return {GENERATED_SNIPPETS_FILE: self.made} if self.made is not None else {}


def heldout_before_key(rows, seqs, **extra: Any) -> str:
    """SHA-256 of what the held-out measures before training depend on besides the frozen model:
    the new rows before training (``rows``: a ``NewRows``; their token ids, input rows, and output
    rows when untied), every held-out snippet (``seqs``, all of them, also in a token-sharded run:
    teacher ids, student ids and the student-to-teacher alignment) and ``extra`` items (JSON-able:
    target layer, dtypes, device type, model identity). Keys :class:`HeldoutBefore`."""
    h = hashlib.sha256()
    h.update(np.asarray(list(rows.token_ids), dtype=np.int64).tobytes())
    for t in (rows.rows, rows.out_rows):
        if t is not None:
            h.update(t.detach().float().cpu().contiguous().numpy().tobytes())
        h.update(b"|")
    h.update(snippet_digest(seqs).encode())
    for s in seqs:
        h.update(np.asarray(s.student_ids, dtype=np.int64).tobytes())
        h.update(np.asarray(s.student_to_teacher, dtype=np.int64).tobytes())
        h.update(b"|")
    h.update(json.dumps(extra, sort_keys=True, default=str).encode())
    return h.hexdigest()


class HeldoutBefore:
    """The held-out measures before training (per-token loss and argmax rate), kept so that they are
    not evaluated again (a full pass over every held-out snippet: 6-7 minutes at 500 words on a
    2-core CPU, one teacher and one student forward per snippet on a GPU):

    - beside the checkpoints as :data:`HELDOUT_BEFORE_FILE`, for ``--resume``: written with the first
      checkpoint (:meth:`attachment`, like :class:`GeneratedSnippetCache`), so that a fresh start's
      clearing of old checkpoints does not remove it;
    - in ``--heldout_cache_dir`` as ``<key>.pt`` (:meth:`remember`), for any later run with the same
      key: the runs of a sweep or a method comparison (``scripts/sweep_lr.py``,
      ``scripts/compare_methods.py``, which set the flag) share one corpus split, snippets and initial
      rows, and only their training differs.

    Either is read (:meth:`get`) only when its key (:func:`heldout_before_key`: the initial rows, every
    held-out snippet, the target layer, dtype, device type and model weights) matches this run's.

    Args:
        directory: ``<out_path>/checkpoints``, or None (nothing is kept beside the checkpoints).
        resume: read an earlier run's file beside the checkpoints (``--resume``).
        key: :func:`heldout_before_key` of this run.
        shared: ``--heldout_cache_dir``, or None (not shared: the flag empty, the Python API, a
            multi-process run).
    """

    def __init__(self, directory: Path | None, resume: bool, key: str, shared: Path | None = None):
        self.path = None if directory is None else Path(directory) / HELDOUT_BEFORE_FILE
        self.resume, self.key = resume, key
        self.shared = None if shared is None or not key else Path(shared) / f"{key[:40]}.pt"

    def get(self):
        """The :class:`~token_distillation.train.HeldoutResult` saved by the interrupted run (with
        ``--resume``) or by an earlier run with the same inputs (the cache), or None (none, a damaged
        file, or one made for other inputs: logged)."""
        from .train import HeldoutResult

        state = _load_keyed(self.path, self.key, self.resume, "evaluating the held-out snippets before training again")
        if state is not None:
            logger.info("--resume: held-out measures before training read from %s (not evaluated again)", self.path)
        else:  # None when there is no such file
            state = _load_keyed(self.shared, self.key, True, "evaluating the held-out snippets before training again")
            if state is not None:
                logger.info("held-out measures before training read from %s (--heldout_cache_dir: an earlier run "
                            "with the same model, initial rows and held-out snippets; not evaluated again)",
                            self.shared)
        if state is None:
            return None
        return HeldoutResult(state["before"]["loss_per_token"], state["before"]["argmax"])

    def remember(self, before) -> None:
        """Write ``before`` (a ``HeldoutResult``) to the cache for later runs with the same key (atomic;
        an unwritable cache is a logged warning, not an error)."""
        if self.shared is None or self.shared.is_file():
            return
        state = self._state(before)
        try:
            replace_file(self.shared, lambda tmp: torch.save(state, tmp), flag="--heldout_cache_dir")
        except (OSError, RuntimeError, ConfigError) as e:  # a full or read-only cache costs the next run a pass
            logger.warning("held-out measures before training not cached (%s: %s)", type(e).__name__, e)

    def _state(self, before) -> dict[str, Any]:
        return {"key": self.key, "before": {"loss_per_token": before.loss_per_token, "argmax": before.argmax}}

    def attachment(self, before) -> dict[str, Any]:
        """``{file name: state}`` of ``before`` (a ``HeldoutResult``) for :class:`Checkpointer`'s
        ``attachments`` (empty: nothing kept)."""
        if self.path is None:
            return {}
        return {HELDOUT_BEFORE_FILE: self._state(before)}
