"""Bad input ends with a one-line error and exit code 2, before any model is loaded."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_cli(*args, cwd=ROOT, env=None):
    return subprocess.run([sys.executable, str(ROOT / "apply_embedding_init.py"), *args], cwd=cwd,
                          capture_output=True, text=True, timeout=300, env=env)


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--model_path", "/nonexistent/model"], "--model_path"),
        (["--init_method", "magic"], "--init_method"),
        (["--loss_method", "L1"], "--loss_method"),
        (["--dataset_path", "/nonexistent/corpus.jsonl"], "not found: /nonexistent/corpus.jsonl; pass an existing"),
        (["--new_tokens_source", "/nonexistent/words.txt"], "--new_tokens_source"),
        (["--new_tokens_source", "/"], "--new_tokens_source: is a directory: /; pass a text file"),
        (["--bogus_flag", "1"], "--bogus_flag"),
        (["--target_layer", "0"], "--target_layer"),
        (["--target_layer", "99"], "--target_layer"),
        (["--snippet_num", "0", "--token_distillation_lr", "-1"], "--snippet_num"),
        (["--dataset_path"], "--dataset_path needs a value"),  # Fire would pass True
        (["--token_distillation_epochs"], "--token_distillation_epochs needs a value"),
        (["--snippet_num", "True"], "--snippet_num: expected an integer"),  # Fire alone reads True as a boolean
        (["--snippet_num=False"], "--snippet_num: expected an integer"),
        (["--init_method", "True"], "--init_method"),
        (["stray_word", "--dry_run"], "unexpected argument(s) stray_word"),  # Fire would report it after the run
        (["--snippet_num", "4", "--snippet_num", "5"], "--snippet_num given more than once"),  # Fire keeps the last
        (["--token_distillation_batch_size", "big"], "--token_distillation_batch_size: expected an integer >= 1, auto, or 0"),
        (["--token_distillation_batch_size", "auto", "--recipe", "paper"], "auto: --recipe paper"),
        (["--heldout_cache_dir", __file__], "--heldout_cache_dir"),  # helper-54: it was a warning after the run's work
    ],
)
def test_bad_flags_exit_2_with_one_line(args, needle, tmp_path):
    r = run_cli(*args, "--out_path", str(tmp_path / "o"))
    assert r.returncode == 2, r.stderr
    err_lines = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert len(err_lines) == 1 and needle in err_lines[0], r.stderr
    assert "Traceback" not in r.stderr


def test_all_problems_reported_together(tmp_path):
    r = run_cli("--snippet_num", "0", "--token_distillation_lr", "-1", "--out_path", str(tmp_path / "o"))
    assert "--snippet_num" in r.stderr and "--token_distillation_lr" in r.stderr
    # a bound's message says what was passed and what to pass instead
    assert "--snippet_num must be >= 1, not 0; the default is 25" in r.stderr
    assert "--token_distillation_lr must be > 0, not -1.0; the default is 0.0001" in r.stderr
    # one problem per line: the first after "error: ", the next aligned under it (not joined by "; ")
    lines = r.stderr.splitlines()
    i = next(i for i, ln in enumerate(lines) if ln.startswith("error: "))
    assert lines[i].endswith("the default is 25") and lines[i].startswith("error: --snippet_num"), lines[i:]
    assert lines[i + 1] == "       --token_distillation_lr must be > 0, not -1.0; the default is 0.0001", lines[i:]


def test_stopping_condition_examples_fit_their_kind(tmp_path):
    r = run_cli("--stopping_condition", "epochs:0", "--out_path", str(tmp_path / "o"))
    assert r.returncode == 2 and "(e.g. epochs:1)" in r.stderr, r.stderr
    r = run_cli("--max_steps", "-1", "--out_path", str(tmp_path / "o"))
    assert r.returncode == 2 and "not -1; the default is 0" in r.stderr, r.stderr


def test_bound_checks_catch_nan_and_wrong_types():
    """NaN and infinity fail every bound (NaN compares False both ways; an infinite timeout overflowed
    datetime.timedelta under torchrun); a string from the Python API is named, not a TypeError."""
    from token_distillation.config import TrainConfig, _at_least

    for value, needle in [(float("nan"), "must be > 0, not nan; the default is 0.0001"),
                          ("0.1", "expected a number, got '0.1'"), (0.0, "must be > 0, not 0.0"), (1e-3, None),
                          (float("inf"), "must be finite and > 0, not inf")]:
        cfg = TrainConfig()
        object.__setattr__(cfg, "token_distillation_lr", value)  # frozen: past the constructor's own checks
        problems: list[str] = []
        _at_least(cfg, "token_distillation_lr", 0, problems, strict=True)
        assert problems == [] if needle is None else (len(problems) == 1 and needle in problems[0]), problems


@pytest.mark.parametrize("case", ["out_path", "model_path", "new_tokens_source", "output_rows_shift"])
def test_path_errors_come_before_torch_is_imported(case, tmp_path):
    """A non-empty --out_path, a missing --model_path, a word list with no words, or --output_rows_shift
    heldout without a corpus is refused before the heavy imports (instant; helper-49 waited 6-13 s for
    the empty word list)."""
    out = tmp_path / "o"
    args = ["--out_path", str(out)]
    if case == "out_path":
        out.mkdir()
        (out / "keep.txt").write_text("user data")
    elif case == "model_path":
        args += ["--model_path", str(tmp_path / "missing")]
    elif case == "new_tokens_source":
        (tmp_path / "words.txt").write_text("\n  \n")
        args += ["--new_tokens_source", str(tmp_path / "words.txt")]
    else:
        args += ["--output_rows_shift", "heldout"]
    code = ("import sys\nfrom token_distillation.cli import fire_main\n"
            "try:\n    fire_main(sys.argv[1:])\n"
            "except SystemExit as e:\n    print('torch' in sys.modules, e.code)\n")
    r = subprocess.run([sys.executable, "-c", code, *args], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.stdout.split() == ["False", "2"], (r.stdout, r.stderr)
    assert f"--{case}" in r.stderr
    if case == "out_path":
        assert (out / "keep.txt").read_text() == "user data"


def test_unreachable_hub_id_is_a_one_line_error(tmp_path):
    """A hub id that cannot be fetched (here: offline mode, as on a compute node without network)
    ends with one ``error:`` line naming --model_path, not a transformers traceback."""
    import os

    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"))
    r = run_cli("--model_path", "someorg/no-such-model", "--out_path", str(tmp_path / "o"), env=env)
    assert r.returncode == 2, r.stderr
    err_lines = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert len(err_lines) == 1 and "--model_path someorg/no-such-model" in err_lines[0], r.stderr
    assert "Hugging Face Hub" in err_lines[0] and "Traceback" not in r.stderr
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())


def test_help_lists_every_flag():
    from token_distillation.config import all_flags

    r = run_cli("--help")
    assert r.returncode == 0 and r.stderr == ""  # on stdout, so that `--help | grep lr` works
    assert r.stdout.startswith("NAME\n    apply_embedding_init.py")
    for name, _, _ in all_flags():
        assert f"--{name}" in r.stdout, name
    # no one-letter forms (Fire lists -b for --build_target_method; the flag check refuses them)
    assert not re.search(r"^\s+-\w, --", r.stdout, flags=re.M)
    # every flag's whole help text (Fire cut --stopping_condition's at a wrapped line with a colon and
    # gave the rest to --max_steps; wrapped hyphens read "KL- on-logits": helper-34)
    shown = " ".join(r.stdout.split())
    for name, _, help_text in all_flags():
        assert " ".join(help_text.split()) in shown, name
    # every default whole (Fire cut --out_path's to 'outputs/token_dis...: helper-35)
    for name, default, _ in all_flags():
        shown_default = re.search(rf"^\s+--{name}=\S+\n\s+Default: (.*)$", r.stdout, flags=re.M)
        assert shown_default and "..." not in shown_default.group(1), name
    assert "Default: 'outputs/token_distillation_demo'" in r.stdout


def test_a_scripts_help_shows_whole_defaults_of_annotated_flags(capsys):
    """Fire puts a "Type:" line before the default of an annotated parameter; the whole-default mend
    missed those (compare_methods.py --help showed 'new_tokens/bio...)."""
    from token_distillation.cli import exit_on_user_error, run_fire

    def main(words: str = "new_tokens/a_rather_long_default_file_name.txt", n: int = 3):
        return words, n

    run_fire(exit_on_user_error(main), {"words", "n"}, ["--help"], "script.py")
    shown = capsys.readouterr().out
    assert "Default: 'new_tokens/a_rather_long_default_file_name.txt'" in shown, shown
    assert "..." not in shown, shown


def test_docs_document_every_flag():
    """Every flag is in the flag reference (docs/flags.md, generated; the README links to it)."""
    flags = (ROOT / "docs" / "flags.md").read_text()
    from token_distillation.config import all_flags

    for name, _, _ in all_flags():
        assert f"`--{name}`" in flags, name
    assert "(docs/flags.md)" in (ROOT / "README.md").read_text()


def test_hub_errors_keeps_local_file_system_errors():
    """Only hub failures become a --model_path error; a local OSError with an errno (disk full while
    downloading) and any error for a local model stay as they are."""
    import errno

    from token_distillation.config import ConfigError
    from token_distillation.models import hub_errors
    from token_distillation.paths import ModelSource

    hub = ModelSource("org/model", "org/model", None, "hub:org/model")
    with pytest.raises(ConfigError, match="--model_path org/model"):
        with hub_errors(hub):
            raise OSError("org/model is not a local folder and is not a valid model identifier")
    with pytest.raises(OSError, match="No space") as e:
        with hub_errors(hub):
            raise OSError(errno.ENOSPC, "No space left on device")
    assert not isinstance(e.value, ConfigError)
    with pytest.raises(OSError) as e:
        with hub_errors(ModelSource("/m", "/m", None, "dir:/m:x")):
            raise OSError("broken local checkpoint")
    assert not isinstance(e.value, ConfigError)


def test_overwrite_of_the_current_directory_is_refused(tmp_path):
    """``--out_path . --overwrite`` from inside a project must not delete the project."""
    (tmp_path / "report.json").write_text("{}")
    (tmp_path / "mine.txt").write_text("user data")
    r = run_cli("--out_path", ".", "--overwrite", "--dry_run", cwd=tmp_path)
    assert r.returncode == 2 and "current, a parent or the home directory" in r.stderr, r.stderr
    assert (tmp_path / "mine.txt").read_text() == "user data"


def test_a_wrapped_ctrl_c_ends_with_the_stop_line(capsys):
    """Ctrl-C that a library re-raises wrapped in another exception (transformers' lazy import turns it
    into an ImportError) ends like a plain Ctrl-C: one line, exit code 130, no traceback; any other
    exception still propagates."""
    import pytest

    from token_distillation.cli import user_errors

    def wrapped():
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt as e:
            raise ModuleNotFoundError("Could not import module 'LlamaForCausalLM'") from e

    with pytest.raises(SystemExit) as exit_info:
        with user_errors():
            wrapped()
    assert exit_info.value.code == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "interrupted" in err[0].lower()
    with pytest.raises(ValueError):
        with user_errors():
            raise ValueError("a bug, not a stop")


def test_a_second_ctrl_c_says_earlier_checkpoints_stay(capsys):
    """A second Ctrl-C inside the deferred window stops at once: the line says the step in progress is
    lost and --resume continues from the checkpoints written before (it used to say "before training;
    nothing was written" while checkpoints existed: helper-21); a plain Ctrl-C keeps its line."""
    import pytest

    from token_distillation.cli import user_errors
    from token_distillation.interrupts import ForcedStop

    for exc, needle in ((ForcedStop, "at once by a second Ctrl-C: the step in progress is lost"),
                        (KeyboardInterrupt, "nothing was written")):
        with pytest.raises(SystemExit) as exit_info:
            with user_errors():
                raise exc
        assert exit_info.value.code == 130
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and needle in err[0], err
    assert "--resume" in ForcedStop.MESSAGE
    with pytest.raises(SystemExit):  # once the flags are read, the line names the run's checkpoint folder
        with user_errors() as ctx:
            ctx["out_path"] = "runs/my_run"
            raise ForcedStop
    err = capsys.readouterr().err
    assert "are in runs/my_run/checkpoints:" in err and "<out_path>" not in err, err


def test_output_flags_are_all_checked():
    """Every output flag is validated in one pass (one error naming each bad flag)."""
    import pytest

    from token_distillation.config import ConfigError, RunConfig

    with pytest.raises(ConfigError) as info:
        RunConfig.from_flags(export="zip", checkpoint_minutes=-1, checkpoint_every=-2)
    msg = str(info.value)
    assert "--export 'zip'" in msg and "--checkpoint_minutes" in msg and "--checkpoint_every" in msg
    # helper-28: it said "or --resume for a dry run", meaning "or drop --resume"
    with pytest.raises(ConfigError, match="--dry_run with --resume.*or drop --resume for a dry run"):
        RunConfig.from_flags(dry_run=True, resume=True)


def test_switches_take_on_off_as_well_as_yes_no():
    from token_distillation.config import ConfigError, RunConfig

    for word, want in (("off", False), ("On", True), ("no", False), ("YES", True), ("0", False)):
        assert RunConfig.from_flags(dry_run=word).output.dry_run is want
    with pytest.raises(ConfigError, match=r"--dry_run: expected true or false \(also yes/no, on/off, 1/0\)"):
        RunConfig.from_flags(dry_run="maybe")


def test_unknown_flags_name_the_flag_meant_in_the_api_and_evaluate():
    """The Python API and evaluate give the CLI's hint: a short name for a long flag names the flags
    that end with it (helper-27's trial: --epochs had no hint), a typo the closest spelling."""
    from token_distillation.config import ConfigError, RunConfig, flag_hint
    from token_distillation.evaluate import EvalConfig

    with pytest.raises(ConfigError, match=r"--epochs \(did you mean --token_distillation_epochs\?\)"):
        RunConfig.from_flags(epochs=2)
    with pytest.raises(ConfigError, match=r"--windows_per_tokn \(did you mean --windows_per_token\?\)"):
        EvalConfig.from_flags(windows_per_tokn=2)
    known = {"ner_batch_size", "token_distillation_batch_size", "snippet_num"}
    assert flag_hint("batch_size", known) == " (did you mean --token_distillation_batch_size or --ner_batch_size?)"
    assert flag_hint("snipet-num", known) == " (did you mean --snippet_num?)"
    assert flag_hint("zzz", known) == ""
    # helper-28: the start of a flag or of one of its words
    from token_distillation.config import all_flags

    flags = {n for n, _, _ in all_flags()}
    assert flag_hint("out", flags).startswith(" (did you mean --out_path")
    assert flag_hint("model", flags).startswith(" (did you mean --model_path")
    assert flag_hint("epoch", flags) == " (did you mean --token_distillation_epochs?)"
    assert flag_hint("new_tokens", flags).startswith(" (did you mean --new_tokens_source")
    # names from other training tools (helper-28: --learning_rate was offered --add_leading_space)
    assert flag_hint("learning_rate", flags) == " (did you mean --token_distillation_lr or --token_distillation_lr_relative?)"
    assert flag_hint("output_dir", flags) == " (did you mean --out_path?)"
    assert flag_hint("num_train_epochs", flags) == " (did you mean --token_distillation_epochs?)"


def test_a_script_missing_a_required_flag_says_which_in_one_line(capsys):
    """A Fire script run without a required flag ends with one ``error:`` line naming it and exit
    code 2 (Fire printed its multi-line usage: refit_output_rows.py without --out_dir)."""
    import pytest

    from token_distillation.cli import exit_on_user_error, run_fire

    def main(run_dir: str, out_dir: str, lr: float = 1.0):
        return run_dir, out_dir

    for argv, needle in ((["--run_dir", "a"], "error: --out_dir missing: pass --out_dir VALUE"),
                         (["--lr", "2"], "error: --run_dir, --out_dir missing")):
        with pytest.raises(SystemExit) as exit_info:
            run_fire(exit_on_user_error(main), {"run_dir", "out_dir", "lr"}, argv, "script.py")
        assert exit_info.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(needle), err
    # the help lists them as the flags they must be given as (it showed "script.py RUN_DIR OUT_DIR")
    run_fire(exit_on_user_error(main), {"run_dir", "out_dir", "lr"}, ["--help"], "script.py")
    shown = capsys.readouterr().out
    assert "--run_dir=RUN_DIR (required)" in shown and "--out_dir=OUT_DIR (required)" in shown, shown
    assert "POSITIONAL" not in shown and "script.py RUN_DIR" not in shown, shown


def test_a_short_flag_is_refused_with_the_long_names_it_may_mean(capsys):
    """``-b 4`` (Fire's one-letter form, which the help does not offer) ends with one line naming
    long flags it may stand for (it said "unexpected argument(s) -b 4" without a hint)."""
    import pytest

    from token_distillation.cli import run_fire

    def main(out_path: str = "", batch_size: int = 1):
        return out_path

    with pytest.raises(SystemExit) as exit_info:
        run_fire(main, {"out_path", "batch_size"}, ["-b", "4"], "script.py")
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: short flag(s) -b (did you mean --batch_size?)"), err


def test_a_log_line_during_a_progress_bar_starts_its_own_line_in_a_log_file(tmp_path):
    """With stderr a file (a SLURM log), a log line written while a progress bar is open starts
    after the bar is cleared (carriage return), not glued to the end of the bar's text."""
    code = (
        "import logging\n"
        "from tqdm.auto import tqdm\n"
        "from token_distillation.cli import configure_logging\n"
        "configure_logging()\n"
        "bar = tqdm(total=3, desc='steps', mininterval=0)\n"
        "bar.update(1)\n"
        "logging.getLogger('t').info('the log line')\n"
        "bar.update(2)\n"
        "bar.close()\n"
    )
    log = tmp_path / "slurm.err"
    with open(log, "w") as err:
        subprocess.run([sys.executable, "-c", code], cwd=ROOT, stderr=err, check=True, timeout=120)
    text = log.read_text()
    assert "\r" not in text, text  # a file gets whole lines (ProgressLines), not redraws
    lines = text.splitlines()
    assert any(re.fullmatch(r"\d\d:\d\d:\d\d INFO t: the log line", p) for p in lines), lines
    assert lines[-1].startswith("steps: 100%") and "3/3" in lines[-1], lines  # the final count shows
    assert all(line.strip() for line in lines), lines


def test_progress_bars_in_a_log_file_are_lines_at_most_every_interval():
    """A bar redrawn 1,000 times over 999 s in a log file (stderr not a terminal) gives one line per
    30 s plus its final state, no carriage returns; a log line in between stays on its own line; a
    bar closed with leave=False leaves no blank line; plain text passes through unchanged."""
    import io

    from tqdm import tqdm

    from token_distillation.cli import ProgressLines

    now = [0.0]
    buf = io.StringIO()
    err = ProgressLines(buf, interval=30, clock=lambda: now[0])
    bar = tqdm(total=1000, desc="training", file=err, mininterval=0, miniters=1)
    for i in range(1000):
        now[0] += 1
        bar.update(1)
        if i == 500:
            tqdm.write("12:00:00 INFO x: a log line", file=err)
    bar.close()
    quiet = tqdm(total=5, desc="mining", file=err, mininterval=0, miniters=1, leave=False)
    for _ in range(5):
        quiet.update(1)
    quiet.close()
    err.write("plain\ntext\n")
    err.write("\n")  # a lone newline long after the bar: not its (stale) held state
    lines = buf.getvalue().split("\n")
    assert "\r" not in buf.getvalue() and lines[-1] == "", lines
    bar_lines = [line for line in lines if line.startswith("training:")]
    assert 33 <= len(bar_lines) <= 36, len(bar_lines)  # 999 s / 30 s, the first and the final state
    assert "1000/1000" in bar_lines[-1] and "0/1000" in bar_lines[0], bar_lines
    assert "12:00:00 INFO x: a log line" in lines
    assert [line for line in lines if line.startswith("mining:")] == [lines[-5]], lines  # its first state
    assert lines[-4:] == ["plain", "text", "", ""], lines
    assert all(line for line in lines[:-2]), lines  # no blank lines but the one written
    assert err.isatty() is False and err.encoding == buf.encoding


def test_flags_after_a_bare_double_dash_are_refused(capsys):
    """Fire reads what follows a bare ``--`` as its own options and silently ignored flags there
    (``--out_path X -- --dry_run True`` ran a whole training run): one ``error:`` line naming them,
    exit code 2; Fire's own options after it still pass."""
    import pytest

    from token_distillation.cli import run_fire

    calls = []

    def main(out_path: str = "", dry_run: bool = False):
        calls.append((out_path, dry_run))
        return None

    with pytest.raises(SystemExit) as exit_info:
        run_fire(main, {"out_path", "dry_run"}, ["--out_path", "x", "--", "--dry_run", "True"], "script.py")
    assert exit_info.value.code == 2 and not calls
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --dry_run True after a bare --"), err
    run_fire(main, {"out_path", "dry_run"}, ["--out_path", "x", "--", "--verbose"], "script.py")
    assert calls == [("x", False)]


@pytest.mark.parametrize("args, needle", [
    (["--max_steps", "-1"], "--max_steps must be >= 1 (or 0: stop by epochs), not -1"),  # advised max_steps:-1
    (["--generation_top_p", "1.5"], "--generation_top_p must be in (0, 1], not 1.5; the default is 0.95"),
    (["--heldout_fraction", "1"], "--heldout_fraction must be in [0, 1), not 1.0; the default is 0.1"),
])
def test_range_errors_name_the_value(args, needle):
    """helper-43's new-user trial: these said only the range (or, for --max_steps -1, advised a value
    that is refused in turn)."""
    from token_distillation.config import ConfigError, RunConfig

    with pytest.raises(ConfigError) as e:
        RunConfig.from_flags(**{args[0].lstrip("-"): args[1]})  # coerced to the field's type, as from the shell
    assert needle in str(e.value), str(e.value)


def test_training_flags_this_run_does_not_read_are_named():
    """--token_distillation_lr (the paper recipe's AdamW rate) was accepted silently with the default
    per-token recipe, which reads --token_distillation_lr_relative instead; the same for the per-token
    recipe's flags under --recipe paper. Each such flag, when changed from its default, gets one
    sentence naming what does the job; used or default-valued flags get none."""
    from token_distillation.config import RunConfig

    notes = RunConfig.from_flags(token_distillation_lr=1e-3).unused_settings()
    assert len(notes) == 1 and notes[0].startswith("--token_distillation_lr 0.001 is not used"), notes
    assert "--token_distillation_lr_relative (now 0.05" in notes[0], notes
    assert RunConfig.from_flags(token_distillation_lr=1e-3, recipe="paper").unused_settings() == []
    assert RunConfig.from_flags(token_distillation_lr=1e-3, output_embeddings="ntp").unused_settings() == []
    assert RunConfig.from_flags(token_distillation_lr=1e-4).unused_settings() == []  # the default, as SLURM passes it
    untrained = RunConfig.from_flags(token_distillation_lr=1e-3, init_method="subtoken-mean").unused_settings()
    assert len(untrained) == 1 and "--init_method subtoken-mean trains nothing" in untrained[0], untrained
    paper = RunConfig.from_flags(recipe="paper", lr_schedule="linear", snippets_per_update=5).unused_settings()
    assert paper == ["--lr_schedule linear is not used: it applies to --recipe per-token only",
                     "--snippets_per_update 5 is not used: it applies to --recipe per-token only"], paper
    assert RunConfig.from_flags(lr_schedule="linear", snippets_per_update=5).unused_settings() == []


def test_an_unused_learning_rate_is_a_warning_in_the_log(tmp_path, caplog):
    """The pipeline's start (every run, the dry run included) logs the unused flag as a warning."""
    import logging

    from token_distillation.config import RunConfig
    from token_distillation.pipeline import start

    caplog.set_level(logging.WARNING, logger="token_distillation")
    start(RunConfig.from_flags(token_distillation_lr=1e-3, dry_run=True, out_path=str(tmp_path / "o")))
    assert [r.getMessage()[:45] for r in caplog.records if r.name == "token_distillation.pipeline"] == [
        "--token_distillation_lr 0.001 is not used: it"], caplog.text


def test_integer_flags_beyond_64_bit_counts_are_refused_before_any_work(tmp_path):
    """``--snippet_num 1e30`` was accepted and crashed in snippet mining with numpy's OverflowError
    (a traceback); ``inf`` raised OverflowError in the flag check itself. Both, and huge KIND:N items of
    --stopping_condition, are now one problem each; the largest allowed value and the seed's own range pass."""
    import pytest

    from token_distillation.config import MAX_INT_FLAG, ConfigError, RunConfig

    for value in (1e30, 10**30, -(10**12)):
        with pytest.raises(ConfigError, match=r"--snippet_num .* is out of range: integer flags take at most "
                                              r"2,147,483,647 in absolute value .*; the default is 25"):
            RunConfig.from_flags(snippet_num=value)
    with pytest.raises(ConfigError, match=r"--snippet_num: expected an integer, got inf"):
        RunConfig.from_flags(snippet_num=float("inf"))
    with pytest.raises(ConfigError, match=r"num_docs:N with N at most 2,147,483,647"):
        RunConfig.from_flags(stopping_condition="num_docs:" + "9" * 25, dataset_path=str(tmp_path))
    assert RunConfig.from_flags(snippet_num=MAX_INT_FLAG).snippets.snippet_num == MAX_INT_FLAG
    assert RunConfig.from_flags(seed=2**32 - 1).train.seed == 2**32 - 1
    r = run_cli("--snippet_num", "1e30", "--dry_run", "--out_path", str(tmp_path / "o"))
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.startswith("error: --snippet_num 1e+30 is out of range"), r.stderr


def test_hub_only_corpus_flags_with_a_local_corpus_are_refused(tmp_path):
    """``--dataset_split validation`` with a local file was ignored: the whole file was read as the
    corpus, without a word. It is now refused, for the run and for the evaluation, naming the fix;
    the defaults and hub ids pass."""
    import pytest

    from token_distillation.config import ConfigError, RunConfig
    from token_distillation.evaluate import EvalConfig

    corpus = tmp_path / "c.jsonl"
    corpus.write_text('{"text": "a"}\n')
    with pytest.raises(ConfigError) as e:
        RunConfig.from_flags(dataset_path=str(corpus), dataset_split="validation", dataset_name="abstracts")
    assert e.value.problems == [
        f"--dataset_split validation applies to Hugging Face Hub datasets, but --dataset_path {corpus} is local and is "
        "read whole; pass that part's own file or folder as --dataset_path, or drop --dataset_split",
        f"--dataset_name abstracts applies to Hugging Face Hub datasets, but --dataset_path {corpus} is local and is "
        "read whole; pass that part's own file or folder as --dataset_path, or drop --dataset_name"], e.value.problems
    with pytest.raises(ConfigError, match="--dataset_split test applies to Hugging Face Hub datasets"):
        EvalConfig.from_flags(model_path="smollm2-135m", extended_paths=str(tmp_path), dataset_path=str(corpus),
                              dataset_split="test", out_path=str(tmp_path / "ev"))
    assert RunConfig.from_flags(dataset_path=str(corpus)).corpus.dataset_split == "train"
    assert RunConfig.from_flags(dataset_path="ncbi/pubmed", dataset_split="validation").corpus.dataset_split == "validation"


def test_a_device_this_machine_lacks_is_refused_before_the_model_loads(tmp_path):
    """``--device mps`` / ``xpu`` on a machine without them passed the checks and crashed with a traceback
    after the model loaded (``cuda`` was refused); every such device is now one ``error:`` line, exit 2."""
    import pytest
    import torch

    from token_distillation.config import ConfigError
    from token_distillation.pipeline import resolve_device

    assert resolve_device("cpu") == torch.device("cpu")
    for spec, have in (("cuda", torch.cuda.is_available()), ("mps", torch.backends.mps.is_available()),
                       ("xpu", hasattr(torch, "xpu") and torch.xpu.is_available())):
        if not have:
            with pytest.raises(ConfigError, match=rf"--device {spec}: {spec.upper()} is not available on this "
                                                  r"machine; use --device cpu or auto"):
                resolve_device(spec)
    if not torch.backends.mps.is_available():
        r = run_cli("--device", "mps", "--out_path", str(tmp_path / "o"))
        assert r.returncode == 2 and "Traceback" not in r.stderr and not (tmp_path / "o").exists(), r.stderr
        assert r.stderr.endswith("error: --device mps: MPS is not available on this machine; use --device cpu or auto\n")
