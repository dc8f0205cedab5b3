"""Command-line front end (python-fire). Only this module configures logging.

The CLI function's signature and ``--help`` text are generated from the config dataclasses, so
every flag's default and documentation live in :mod:`token_distillation.config` only.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import logging
import os
import re
import sys
import time

from .config import ConfigError, RunConfig, all_flags, flag_hint, parse_switch

logger = logging.getLogger("token_distillation")


def _doc() -> str:
    lines = [
        "Add new tokens to a causal LM and initialise their input embeddings (Token Distillation,",
        "Dobler et al., arXiv 2505.20133). Writes the extended model, tokenizer and report.json.",
        "",
        "Args:",
    ]
    for name, default, help_text in all_flags():
        # one line per flag: Fire reads a continuation line with a colon in it ("KIND:N") as another
        # flag's entry or drops the text after the colon, and joins wrapped lines after hyphens
        # with a space ("KL- on-logits")
        lines.append(f"    {name}: {help_text}")
    return "\n".join(lines)


def configure_logging(level: int = logging.INFO) -> None:
    """Log to stderr with timestamps (the package itself never configures logging).

    Under a multi-process launch (torchrun / accelerate launch set ``RANK``) only the main process
    logs progress; the others log warnings and errors only.
    """
    if os.environ.get("RANK", "0") not in ("", "0"):
        level = max(level, logging.WARNING)
    if not isinstance(sys.stderr, ProgressLines) and not _is_terminal(sys.stderr):
        sys.stderr = ProgressLines(sys.stderr)
    handler = _BarSafeHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S"))
    logging.basicConfig(level=level, handlers=[handler])


def _is_terminal(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError, OSError):  # closed or file-less streams
        return False


class ProgressLines:
    """stderr for a log file (a SLURM job's, or ``2> run.log``): progress bars as whole lines, each
    bar at most once every ``interval`` seconds.

    tqdm redraws a bar by writing a carriage return and the new state; in a file nothing clears
    the line, so a long stage wrote one line of tens of thousands of characters. Here a write
    without a carriage return passes through unchanged; each carriage-return segment is a bar
    state, written as a line of its own when its bar (keyed by the text before the first ``:``,
    tqdm's description) last printed ``interval`` or more seconds ago, otherwise held back; a held
    state is written when the very next write is a lone newline (a bar closing with ``leave=True``),
    so the final count shows; any later write makes it stale (never written out of order).
    Blank segments (tqdm clearing a bar before a log line) are dropped. Every other attribute
    (``fileno``, ``encoding``, ``buffer``, ...) is the wrapped stream's. ``TQDM_DISABLE=1`` in the
    environment turns the bars off altogether (tqdm's own switch).

    Args:
        stream: the text stream written to (``sys.stderr``).
        interval: seconds between two lines of the same bar.
        clock: seconds, monotonic (a parameter for tests).
    """

    def __init__(self, stream, interval: float = 30.0, clock=time.monotonic):
        self._stream = stream
        self._interval = interval
        self._clock = clock
        self._last: dict[str, float] = {}
        self._held: str | None = None
        self._line_start = True
        self._after_bar = False
        self._just_held = False

    def __getattr__(self, name):
        return getattr(self._stream, name)

    def isatty(self) -> bool:
        return False

    def _put(self, text: str) -> None:
        if text:
            self._stream.write(text)
            self._line_start = text.endswith("\n")

    def _bar_line(self, state: str) -> None:
        if not self._line_start:
            self._put("\n")
        self._put(state + "\n")
        self._after_bar = True
        self._held = None

    def write(self, text: str) -> int:
        head, *states = text.split("\r")
        just_held, self._just_held = self._just_held and self._held is not None, False
        if head == "\n" and self._line_start and (self._after_bar or just_held):
            if just_held:  # a bar closing with leave=True: its final state
                self._bar_line(self._held)
        elif head:
            if not self._line_start and self._after_bar:
                self._put("\n")
            self._put(head)
            self._after_bar = False
        for state in states:
            state = state.rstrip()
            if not state.strip():
                continue
            key = state.split(":", 1)[0]
            now = self._clock()
            if now - self._last.get(key, -float("inf")) >= self._interval:
                self._last[key] = now
                self._bar_line(state)
            else:
                self._held, self._just_held = state, True
        return len(text)

    def flush(self) -> None:
        self._stream.flush()


class _BarSafeHandler(logging.StreamHandler):
    """Writes each record through ``tqdm.write``, which clears an open progress bar first: a log line
    starts a line of its own in a terminal and in a SLURM log file (it was glued to the end of the
    bar's text there)."""

    def emit(self, record: logging.LogRecord) -> None:
        from tqdm import tqdm

        try:
            tqdm.write(self.format(record), file=self.stream)
            self.flush()
        except Exception:  # logging's convention: report, never raise from a handler
            self.handleError(record)


def _raise_interrupted(signum, frame):
    from .interrupts import Interrupted

    raise Interrupted(signum)


def error_text(e: ConfigError) -> str:
    """The command line's rendering of a :class:`ConfigError`: one line starting ``error: ``, the
    other problems (if several) each on its own line aligned under the first."""
    return "error: " + "\n       ".join(e.problems or [str(e)]) + "\n"


@contextlib.contextmanager
def user_errors():
    """End the process the command-line way: a :class:`ConfigError` as one ``error:`` line and exit
    code 2; a stop signal (:class:`~token_distillation.interrupts.Interrupted`, Ctrl-C) as one line
    and exit code 128 + the signal number.

    Yields a dict the caller may fill: ``out_path`` (once the flags are read) lets a second Ctrl-C's
    line name the run's checkpoint folder."""
    import signal

    from .interrupts import Interrupted

    ctx: dict = {}
    try:
        yield ctx
    except ConfigError as e:
        sys.stderr.write(error_text(e))
        sys.exit(2)
    except Interrupted as e:
        sys.stderr.write(f"{e.message()}\n")
        sys.exit(e.exit_code)
    except KeyboardInterrupt as e:
        sys.stderr.write(f"{_stop_line(e, ctx.get('out_path'))}\n")
        sys.exit(128 + signal.SIGINT)
    except Exception as e:  # a library that wraps the stop (e.g. an import interrupted by Ctrl-C)
        stop = _stop_in_chain(e)
        if stop is None:
            raise
        sys.stderr.write(f"{_stop_line(stop, ctx.get('out_path'))}\n")
        sys.exit(stop.exit_code if isinstance(stop, Interrupted) else 128 + signal.SIGINT)


def _stop_line(stop: BaseException, out_path=None) -> str:
    """The one line a stop ends with: an ``Interrupted``'s message; a Ctrl-C outside the deferred
    window (nothing was written); a second Ctrl-C inside it (earlier checkpoints stay, in
    ``<out_path>/checkpoints``)."""
    import signal

    from .interrupts import ForcedStop, Interrupted

    if isinstance(stop, Interrupted):
        return stop.message()
    return ForcedStop.message(out_path) if isinstance(stop, ForcedStop) else Interrupted(signal.SIGINT).message()


def _stop_in_chain(e: BaseException) -> BaseException | None:
    """The stop signal (``Interrupted`` or ``KeyboardInterrupt``) that caused ``e``, if any: some
    libraries re-raise it wrapped in another exception (transformers' lazy imports as an ImportError)."""
    from .interrupts import Interrupted

    seen: set[int] = set()
    cur: BaseException | None = e
    while cur is not None and id(cur) not in seen:
        if isinstance(cur, (Interrupted, KeyboardInterrupt)):
            return cur
        seen.add(id(cur))
        cur = cur.__cause__ or cur.__context__
    return None


def main(**flags):
    """Run the pipeline; user errors end with one line on stderr and exit code 2, a stop signal
    with one line and exit code 128 + the signal number (see :mod:`token_distillation.interrupts`)."""
    import signal

    configure_logging()
    for name in ("SIGTERM", "SIGUSR1"):  # before training: stop with one line (training defers them)
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), _raise_interrupted)
    with user_errors() as ctx:
        cfg = RunConfig.from_flags(**flags)
        ctx["out_path"] = cfg.output.out_path
        from .paths import preflight

        preflight(cfg.model.model_path, cfg.output.out_path, cfg.output.overwrite, cfg.output.resume,
                  cfg.output.dry_run, cfg.train.target_layer)
        from .corpus import check_text_column

        check_text_column(cfg.corpus)  # a wrong --text_column fails before torch is imported
        cfg.check_heldout_shift_has_corpus()
        from .targets import read_target_wordlist

        words = read_target_wordlist(cfg.targets)  # so does an empty or malformed word list
        from .pipeline import run  # imports torch and transformers (seconds)

        result = run(cfg, words)
    return str(result.out_path)


main.__doc__ = _doc()
main.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
    [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default)
     for name, default, _ in all_flags()]
)


def _flags_only(fn):
    """``fn`` with its positional-or-keyword parameters shown as keyword-only, so Fire's help lists
    them as flags (``--run_dir``): the check in :func:`run_fire` refuses positional arguments, but
    Fire's help offered ``script.py RUN_DIR OUT_DIR``."""
    sig = inspect.signature(fn)
    kw = inspect.Parameter.KEYWORD_ONLY
    params = [p.replace(kind=kw) if p.kind == inspect.Parameter.POSITIONAL_OR_KEYWORD else p
              for p in sig.parameters.values()]

    @functools.wraps(fn)
    def view(*args, **kwargs):
        return fn(*args, **kwargs)

    view.__signature__ = sig.replace(parameters=params)
    return view


#: what Fire reads after a bare ``--`` (its own options)
FIRE_OPTIONS = frozenset({"--help", "-h", "--trace", "-t", "--verbose", "-v", "--interactive", "-i", "--completion",
                          "--separator"})


def run_fire(fn, known: set[str], argv: list[str] | None, name: str,
             flag_list: str = "see --help for the list of flags") -> None:
    """Run ``fn`` under python-fire: unknown flags end with one ``error:`` line and exit code 2;
    ``--help`` goes to stdout (pipeable) without Fire's "INFO: Showing help" line.

    ``flag_list`` ends the unknown-flag error: where the accepted flags are listed (a script that
    takes another script's flags names that script's ``--help``)."""
    import fire

    args = list(sys.argv[1:] if argv is None else argv)
    seen = _check_args(args, known, flag_list)
    wants_help = "--help" in args or "-h" in args
    missing = [f"--{p.name}" for p in inspect.signature(fn).parameters.values()
               if p.default is inspect.Parameter.empty and p.name not in seen
               and p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)]
    if missing and not wants_help:  # Fire would print its multi-line usage
        _fail(f"{', '.join(missing)} missing: pass {' and '.join(m + ' VALUE' for m in missing)} (see --help)")
    if wants_help:
        sys.stdout.write(_help_text(fn, name) + "\n")
        return
    fire.Fire(fn, command=args, name=name)


def _fail(message: str) -> None:
    """One ``error:`` line on stderr, exit code 2 (bad command-line input)."""
    sys.stderr.write(f"error: {message}\n")
    sys.exit(2)


def _check_args(args: list[str], known: set[str], flag_list: str) -> set[str]:
    """Check the command line before Fire reads it (:func:`run_fire`): short, unknown, repeated and
    stray arguments and flags after a bare ``--`` end with one ``error:`` line (:func:`_fail`). A
    ``True``/``False`` value is quoted in ``args`` so that Fire passes it as typed. Returns the flag
    names given (``--no<flag>`` as ``<flag>``)."""
    unknown, stray, wants_value, seen, repeated, short = [], [], False, set(), [], []
    for i, a in enumerate(args):
        if a == "--":  # Fire's own options follow; Fire ignores anything else there without a word
            after = [x for x in args[i + 1:] if x.split("=", 1)[0] not in FIRE_OPTIONS]
            if after:
                _fail(f"{' '.join(after)} after a bare --: Fire reads what follows -- as its own options "
                      f"({', '.join(sorted(FIRE_OPTIONS))}) and would ignore these; remove the --")
            break
        if a.startswith("--"):
            if re.fullmatch(r"--[^=]+=(True|False)", a):  # the value as typed (see below)
                args[i] = a.replace("=", '="', 1) + '"'
            wants_value = "=" not in a and a != "--help"
            flag = a[2:].split("=", 1)[0].replace("-", "_")
            base = flag[2:] if flag.startswith("no") and flag[2:] in known else flag
            if base in seen and base in known:
                repeated.append(f"--{base}")
            seen.add(base)
            if a != "--help" and flag not in known and not (flag.startswith("no") and flag[2:] in known):
                unknown.append(a.split("=", 1)[0])
        elif wants_value:  # the value of the flag before it
            wants_value = False
            if a in ("True", "False"):  # Fire would pass a boolean, the same as a flag without a value;
                args[i] = f'"{a}"'  # as text, a switch reads it and a number flag says True is not a number
        elif a == "-h":
            continue
        elif re.fullmatch(r"-[A-Za-z_]\w*(=.*)?", a):  # -b, -b=4: Fire's one-letter forms
            short.append(a.split("=", 1)[0])
            wants_value = "=" not in a
        else:
            stray.append(a)
    if short:
        _fail(f"short flag(s) {', '.join(f + flag_hint(f[1:], known) for f in short)} not accepted; pass the full "
              "name (--name VALUE), see --help")
    if unknown:
        _fail(f"unknown flag(s) {', '.join(u + flag_hint(u[2:], known) for u in unknown)}; {flag_list}")
    if repeated:  # Fire would silently keep the last value
        _fail(f"{', '.join(sorted(set(repeated)))} given more than once; pass each flag once")
    if stray:  # Fire would report them only after the run
        _fail(f"unexpected argument(s) {' '.join(stray)}; every input is a flag (--name VALUE), see --help")
    return seen


def _help_text(fn, name: str) -> str:
    """Fire's help of ``fn`` as flags only, without one-letter forms, with whole defaults."""
    from fire import helptext, trace

    text = helptext.HelpText(_flags_only(fn), trace=trace.FireTrace(fn, name=name))
    # Fire lists a one-letter form (-b) for flags with a unique first letter; the check above refuses
    # those (only --name is accepted), so the help does not offer them
    text = re.sub(r"^(\s+)-\w, (?=--)", r"\1", text, flags=re.M)
    for p in inspect.signature(fn).parameters.values():  # Fire cuts long defaults ('outputs/token_dis...)
        if p.default is not inspect.Parameter.empty:
            # (a "Type:" line comes between for an annotated parameter: the scripts' entry points)
            text = re.sub(rf"^(\s+--{p.name}=\S+\n(?:\s+Type: .*\n)?\s+Default: ).*$",
                          lambda m, d=p.default: m.group(1) + repr(d),
                          text, count=1, flags=re.M)
    return text


def fire_main(argv: list[str] | None = None) -> None:
    """Entry used by ``apply_embedding_init.py``."""
    run_fire(main, {name for name, _, _ in all_flags()}, argv, "apply_embedding_init.py")


def exit_on_user_error(fn):
    """Wrap a script's entry point so that bad input ends as in the main tool: one ``error:`` line
    on stderr and exit code 2 (no traceback), Ctrl-C one line and exit code 130.

    The wrapper turns a :class:`~token_distillation.config.ConfigError` (raised by the script's
    own checks) into that line. Before calling ``fn`` it checks every argument against the type of
    the parameter's default (or its annotation when it has none), which python-fire does not do:
    a flag given without a value (Fire passes ``True``), a word or a fraction for an integer flag,
    a word for a number flag and anything but true/false for a switch are refused; whatever else
    Fire made of a text flag's value is passed as text (a number as typed, a comma list as "a,b",
    a JSON object as JSON). Values of other parameters pass unchanged.

    Use: ``run_fire(exit_on_user_error(main), known_flags, None, name)`` for Fire scripts,
    ``exit_on_user_error(main)(argv)`` for argparse scripts (argparse reports its own errors).
    """
    import functools

    sig = inspect.signature(fn)
    by_name = {"str": str, "int": int, "float": float, "bool": bool}
    kinds = {}
    for p in sig.parameters.values():
        if p.default is not inspect.Parameter.empty and p.default is not None:
            kinds[p.name] = type(p.default)
        else:
            kinds[p.name] = by_name.get(p.annotation) if isinstance(p.annotation, str) else p.annotation

    def checked(name, value, problems):
        kind, flag = kinds.get(name), f"--{name}"
        if kind is bool:
            if isinstance(value, bool):
                return value
            word = parse_switch(value)
            if word is not None:
                return word
            problems.append(f"{flag} is a switch: pass {flag} or --no{name}, not {value!r}")
        elif kind in (int, float, str) and isinstance(value, bool):
            problems.append(f"{flag} needs a value ({flag} VALUE)")
        elif kind is int:
            if isinstance(value, int) or (isinstance(value, float) and value.is_integer()):
                return int(value)
            problems.append(f"{flag} expects an integer, not {value!r}")
        elif kind is float:
            if isinstance(value, (int, float)):
                return float(value)
            problems.append(f"{flag} expects a number, not {value!r}")
        elif kind is str and not isinstance(value, str):
            if isinstance(value, (list, tuple)):
                return ",".join(str(v) for v in value)
            if isinstance(value, dict):
                import json

                return json.dumps(value)
            return str(value)
        return value

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with user_errors():
            try:
                bound = sig.bind(*args, **kwargs)
            except TypeError as e:  # a missing required argument, one too many
                raise ConfigError(str(e)) from None
            problems: list[str] = []
            for name, value in list(bound.arguments.items()):
                bound.arguments[name] = checked(name, value, problems)
            if problems:
                raise ConfigError(problems)
            return fn(*bound.args, **bound.kwargs)

    return wrapper
