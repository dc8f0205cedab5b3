"""Stop requests (Ctrl-C, ``kill``, SLURM's pre-termination signal) that lose no training.

While :func:`deferred_signals` is active (from the start of training until the output is saved),
SIGINT, SIGTERM and SIGUSR1 only record a request; the training loop checks it after every step,
writes a checkpoint of that step and raises :class:`Interrupted`, which the command line turns
into one line ("interrupted at step N; rerun the same command with --resume to continue") and exit
code 128 + the signal number (130 for Ctrl-C, 143 for SIGTERM, 138 for SIGUSR1). A second Ctrl-C
stops at once (:class:`ForcedStop`). A signal while the output is being saved lets the save finish
(the run ends normally and says so). Outside that window the signals keep their usual meaning.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
from pathlib import Path
from typing import Iterator

logger = logging.getLogger(__name__)

#: signals that request a stop (SIGUSR1: SLURM's ``--signal=USR1@60`` before the time limit)
STOP_SIGNALS = tuple(s for s in (getattr(signal, n, None) for n in ("SIGINT", "SIGTERM", "SIGUSR1")) if s)


class Interrupted(BaseException):
    """The run stopped on a signal. A ``BaseException`` (like ``KeyboardInterrupt``), so that
    libraries' ``except Exception`` fallbacks cannot swallow it.

    Attributes:
        signum: the signal number (exit code ``128 + signum``).
        step: the last optimizer step done (None before training).
        checkpoint: the checkpoint written for it, or None.
    """

    def __init__(self, signum: int, step: int | None = None, checkpoint: Path | None = None, where: str = "",
                 advice: str = ""):
        self.signum, self.step, self.checkpoint, self.where, self.advice = int(signum), step, checkpoint, where, advice
        super().__init__(self.message())

    @property
    def exit_code(self) -> int:
        return 128 + self.signum

    def message(self) -> str:
        name = signal_name(self.signum)
        at = f"at step {self.step}" if self.step is not None else (self.where or "before training")
        if self.step is not None and self.where:  # a stop after the steps (a training step's stop has no where)
            at += f"; the stop came {self.where}"
        if self.advice:  # e.g. the Python API, which keeps no checkpoints
            return f"interrupted ({name}) {at}; {self.advice}"
        if self.checkpoint is not None or self.step is not None:
            return f"interrupted ({name}) {at}; rerun the same command with --resume to continue"
        return f"interrupted ({name}) {at}; nothing was written (checkpoints of an earlier run stay), rerun the same command"


class ForcedStop(KeyboardInterrupt):
    """A second Ctrl-C while stops are deferred: the run stops at once, without checkpointing the
    step in progress (the checkpoints written before it stay)."""

    MESSAGE = ("interrupted (SIGINT) at once by a second Ctrl-C: the step in progress is lost; checkpoints written "
               "before it, if any, are in {checkpoints}: rerun the same command with --resume to continue "
               "from the last one")

    @classmethod
    def message(cls, out_path: Path | str | None = None) -> str:
        """The stop's line, naming ``<out_path>/checkpoints`` (the placeholder when unknown)."""
        where = str(Path(out_path) / "checkpoints") if out_path else "<out_path>/checkpoints"
        return cls.MESSAGE.format(checkpoints=where)


class StopRequest:
    """The first stop signal received while deferred (None: none), and ``phase``: where the run
    would stop and what it keeps, as the warning on the signal says it (see :func:`stop_point`)."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self.phase: str = "after the current step (a checkpoint is written)"

    @property
    def requested(self) -> bool:
        return self.signum is not None


STOP = StopRequest()


@contextlib.contextmanager
def deferred_signals() -> Iterator[StopRequest]:
    """Record stop signals in :data:`STOP` instead of acting on them (see the module docstring).

    A no-op outside the main thread (Python delivers signals to the main thread only). Nested use
    keeps the outer handlers. Yields :data:`STOP`.
    """
    if threading.current_thread() is not threading.main_thread():
        yield STOP
        return
    previous = {s: signal.getsignal(s) for s in STOP_SIGNALS}
    if any(getattr(h, "_td_deferred", False) for h in previous.values()):
        yield STOP  # already deferred by an outer block
        return

    def handler(signum, frame):
        if STOP.requested and signum == signal.SIGINT:
            raise ForcedStop  # a second Ctrl-C: stop now
        if not STOP.requested:
            logger.warning("received %s: stopping %s; %s", signal_name(signum), STOP.phase,
                           "press Ctrl-C again to stop at once" if signum == signal.SIGINT
                           else "a second signal changes nothing (SIGKILL stops at once, losing the step in progress)")
        STOP.signum = STOP.signum or signum

    handler._td_deferred = True  # type: ignore[attr-defined]
    STOP.signum = None
    for s in STOP_SIGNALS:
        signal.signal(s, handler)
    try:
        yield STOP
    finally:
        for s, h in previous.items():
            signal.signal(s, h if h is not None else signal.SIG_DFL)
        STOP.signum = None


@contextlib.contextmanager
def stop_point(phase: str) -> Iterator[None]:
    """Within the block, a stop signal's warning says it stops ``phase`` (e.g. "after the current
    step (a checkpoint is written)"); the previous text is restored after it."""
    previous, STOP.phase = STOP.phase, phase
    try:
        yield
    finally:
        STOP.phase = previous


def signal_name(signum: int) -> str:
    """``SIGTERM`` for 15 (the number as text when it names no signal)."""
    return signal.Signals(signum).name if signum in set(signal.Signals) else str(signum)


def check_stop(where: str = "", step: int | None = None) -> None:
    """Raise :class:`Interrupted` if a stop was requested (called between units of work). ``where``:
    e.g. "during the output-row fit" (said after "at step N" when ``step`` is given; "" for a stop
    after a training step, which the step names)."""
    if STOP.requested:
        raise Interrupted(STOP.signum, step=step, where=where)
