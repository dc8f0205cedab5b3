"""No user data lost (issue 20): the --overwrite guard, saves that cannot lose training, stop
signals, and bad input refused before anything heavy loads."""

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.test_pipeline import _toy_cfg, _words
from token_distillation import cli
from token_distillation.config import ConfigError, RunConfig
from token_distillation.paths import (
    CHECKPOINT_MARKER,
    OUTPUT_MANIFEST,
    foreign_entries,
    prepare_out_path,
    write_output_dir,
)
from token_distillation.pipeline import run

ROOT = Path(__file__).resolve().parents[1]


def _no_heavy_loads(monkeypatch):
    """Make every heavy stage fail loudly: a refusal must come before any of them."""
    import token_distillation.corpus as corpus
    import token_distillation.models as models
    import token_distillation.pipeline as pipeline

    def boom(*a, **k):
        raise AssertionError("a heavy stage ran before the refusal")

    for mod, names in ((models, ("load_model", "load_tokenizer")),
                       (corpus, ("tokenize_corpus", "load_texts", "scan_corpus")),
                       (pipeline, ("load_model", "load_tokenizer", "scan_corpus"))):
        for n in names:
            monkeypatch.setattr(mod, n, boom)


def _cli(capsys, *args) -> tuple[int, list[str], float]:
    """Run the CLI in-process; returns (exit code, error lines, seconds)."""
    t0 = time.perf_counter()
    with pytest.raises(SystemExit) as e:
        cli.fire_main(list(args))
    err = capsys.readouterr().err
    return e.value.code, [ln for ln in err.splitlines() if ln.startswith("error:")], time.perf_counter() - t0


def _earlier_output(out: Path, kind: str = "model") -> None:
    def write(tmp):
        (tmp / "report.json").write_text('{"tool": "token-distillation"}')
        (tmp / "model.safetensors").write_bytes(b"weights")

    write_output_dir(out, write, kind=kind)


# ----------------------------------------------------------------------------- the --overwrite guard


@pytest.mark.parametrize("case", ["own_report_json", "foreign_checkpoints", "user_file_in_earlier_output",
                                  "foreign_file_in_checkpoints"])
def test_overwrite_dry_run_keeps_user_files(case, tmp_path, capsys, monkeypatch, toy_corpus):
    """The three directories that `--overwrite --dry_run` used to wipe (and a fourth) are refused in
    one line naming what is unexpected, within 5 s and before anything loads."""
    _no_heavy_loads(monkeypatch)
    out = tmp_path / "out"
    if case == "own_report_json":
        out.mkdir()
        keep = out / "report.json"
        keep.write_text('{"my": "experiment"}')
    elif case == "foreign_checkpoints":
        (out / "checkpoints").mkdir(parents=True)
        keep = out / "checkpoints" / "epoch_3.ckpt"
        keep.write_bytes(b"another tool's weights")
    elif case == "user_file_in_earlier_output":
        _earlier_output(out)
        keep = out / "notes.md"
        keep.write_text("my notes")
    else:  # our checkpoint directory, with a user's file inside
        (out / "checkpoints").mkdir(parents=True)
        (out / "checkpoints" / CHECKPOINT_MARKER).write_text('{"tool": "token-distillation"}')
        (out / "checkpoints" / "step-00000002.pt").write_bytes(b"ckpt")
        keep = out / "checkpoints" / "mine.txt"
        keep.write_text("mine")
    before = keep.read_bytes()
    code, errs, secs = _cli(capsys, "--overwrite", "--dry_run", "--out_path", str(out), "--dataset_path",
                            str(toy_corpus), "--model_path", str(tmp_path))
    assert code == 2 and len(errs) == 1, errs
    assert keep.relative_to(out).as_posix().split("/")[-1] in errs[0] and "did not write" in errs[0]
    assert keep.read_bytes() == before and secs < 5
    # without --overwrite the first error must not suggest a flag that would then be refused
    code, errs, _ = _cli(capsys, "--dry_run", "--out_path", str(out), "--model_path", str(tmp_path))
    assert code == 2 and "--overwrite" not in errs[0] and "new directory" in errs[0]


def test_earlier_output_is_replaced_and_suggested(tmp_path, toy_model_dir, toy_corpus, cache_dir, capsys):
    out = tmp_path / "out"
    _earlier_output(out, kind="dry-run")
    code, errs, _ = _cli(capsys, "--dry_run", "--out_path", str(out), "--model_path", str(toy_model_dir))
    assert code == 2 and "(a dry run's output); choose a new directory or pass --overwrite" in errs[0]
    cfg = _toy_cfg(tmp_path, toy_model_dir, toy_corpus, cache_dir, dry_run=True, overwrite=True)
    run(cfg)
    assert json.loads((out / "report.json").read_text())["dry_run"] is True
    assert foreign_entries(out) == []  # the new output lists every file it wrote


def test_dry_run_never_replaces_a_trained_model(tmp_path):
    """--dry_run --overwrite on a trained model used to only warn, then delete the model."""
    _refused_and_untouched(tmp_path / "out", "holds a trained model, which --overwrite with --dry_run would replace",
                           lambda out: prepare_out_path(str(out), overwrite=True, dry_run=True))


def _refused_and_untouched(out: Path, match: str, call) -> None:
    """An earlier trained output at ``out``: ``call(out)`` raises ConfigError matching ``match`` and
    leaves every file in place."""
    _earlier_output(out, kind="model")
    before = sorted(p.name for p in out.iterdir())
    with pytest.raises(ConfigError, match=match):
        call(out)
    assert sorted(p.name for p in out.iterdir()) == before


def test_resume_of_a_finished_run_says_it_is_finished(tmp_path):
    """--resume where the run had finished (model saved, checkpoints gone): the error says there is
    nothing to resume instead of the generic advice for an earlier output; nothing is touched."""
    from token_distillation.paths import prepare_output

    _refused_and_untouched(tmp_path / "out", "--resume: .* holds a finished run .*nothing is left to resume",
                           lambda out: prepare_output(str(out), overwrite=False, resume=True))
    dry = tmp_path / "dry"
    _earlier_output(dry, kind="dry-run")  # not a training run: says so
    with pytest.raises(ConfigError, match=r"--resume: .* holds a dry run's output \(no training to resume\)"):
        prepare_output(str(dry), overwrite=False, resume=True)


def test_foreign_entries_lists_unlisted_files_and_dirs(tmp_path):
    out = tmp_path / "out"
    _earlier_output(out)
    assert foreign_entries(out) == []
    (out / "sub").mkdir()
    (out / "sub" / "x").write_text("x")
    (out / "extra.txt").write_text("x")
    assert foreign_entries(out) == ["extra.txt", "sub/"]
    (out / OUTPUT_MANIFEST).write_text("not json")  # a damaged manifest vouches for nothing
    assert "report.json" in foreign_entries(out)


def test_output_changed_during_the_run_goes_to_a_new_directory(tmp_path, toy_model_dir, toy_corpus, cache_dir,
                                                                monkeypatch):
    """A user file put into --out_path while the run trained is neither deleted nor overwritten."""
    import token_distillation.pipeline as pipeline

    out = tmp_path / "out"
    real = pipeline.heldout_eval

    def eval_and_meddle(*a, **k):
        out.mkdir(exist_ok=True)
        (out / "meanwhile.txt").write_text("mine")
        return real(*a, **k)

    monkeypatch.setattr(pipeline, "heldout_eval", eval_and_meddle)
    res = run(_toy_cfg(tmp_path, toy_model_dir, toy_corpus, cache_dir, max_steps=2, stopping_condition="max_steps"))
    assert (out / "meanwhile.txt").read_text() == "mine"
    assert res.out_path != out and (res.out_path / "report.json").is_file()


# ----------------------------------------------------------------------------- saves never lose training


def test_gguf_converted_directory_trains_and_saves(tmp_path, toy_model_dir, toy_corpus, cache_dir, caplog):
    """A checkpoint saved from a GGUF-loaded model keeps `quantization_config: {quant_method: gguf}` over
    plain weights; it used to train and then fail in save_pretrained."""
    import shutil

    src = tmp_path / "converted"
    shutil.copytree(toy_model_dir, src)
    conf = json.loads((src / "config.json").read_text())
    conf["quantization_config"] = {"quant_method": "gguf"}
    (src / "config.json").write_text(json.dumps(conf))
    with caplog.at_level(logging.INFO):
        res = run(_toy_cfg(tmp_path, src, toy_corpus, cache_dir, max_steps=2, stopping_condition="max_steps"))
    assert "quantization_config" not in json.loads((res.out_path / "config.json").read_text())
    assert any("quant_method gguf" in r.message for r in caplog.records)


def test_failed_save_keeps_the_trained_rows(tmp_path, toy_model_dir, toy_corpus, cache_dir, monkeypatch):
    """save_pretrained failing after training: the rows, tokenizer and report are written, the error
    names the recovery command, and that command rebuilds the same model as an uninterrupted run."""
    from safetensors.torch import load_file
    from transformers import PreTrainedModel

    from token_distillation import rescue

    flags = dict(max_steps=3, stopping_condition="max_steps")
    ref = run(_toy_cfg(tmp_path, toy_model_dir, toy_corpus, cache_dir, out_path=str(tmp_path / "ref"), **flags))
    real_save = PreTrainedModel.save_pretrained

    def failing_save(self, *a, **k):
        raise OSError("No space left on device (simulated)")

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", failing_save)
    with pytest.raises(ConfigError) as e:
        run(_toy_cfg(tmp_path, toy_model_dir, toy_corpus, cache_dir, **flags))
    out = tmp_path / "out"
    msg = str(e.value)
    assert "No space left" in msg and "token_distillation.rescue" in msg and str(out) in msg
    assert (out / rescue.ROWS_FILE).is_file() and (out / "report.json").is_file() and foreign_entries(out) == []
    monkeypatch.setattr(PreTrainedModel, "save_pretrained", real_save)
    import shlex

    command = shlex.split(msg.split("build the model from them with: ", 1)[1])  # the command the error names
    r = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    rebuilt = Path(str(out) + "-model")
    a, b = load_file(str(ref.out_path / "model.safetensors")), load_file(str(rebuilt / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_unsaveable_model_refused_before_training():
    from token_distillation.models import check_saveable

    class Quantizer:
        quantization_config = type("C", (), {"quant_method": "fancy"})()

        def is_serializable(self, safe_serialization=None):
            return False

    model = torch.nn.Linear(1, 1)
    check_saveable(model)  # no quantizer: fine
    model.hf_quantizer = Quantizer()
    with pytest.raises(ConfigError, match="cannot save"):
        check_saveable(model)


# ----------------------------------------------------------------------------- stop signals


def _toy_cli_args(tmp_path, toy_model_dir, toy_corpus, cache_dir, out, *extra):
    words = _words(tmp_path, [" hepatotoxicity", " nephrotoxicity", " angiogenesis"])
    return [sys.executable, str(ROOT / "apply_embedding_init.py"), "--model_path", str(toy_model_dir),
            "--dataset_path", str(toy_corpus), "--cache_dir", str(cache_dir), "--new_tokens_source", words,
            "--out_path", str(out), "--snippet_num", "8", "--min_snippets", "2", "--heldout_snippet_num", "2",
            "--heldout_fraction", "0.25", "--token_distillation_batch_size", "4", "--snippet_len", "12",
            "--log_every", "1", *extra]


# subprocess waits: generous, because a loaded 2-core machine (CI beside other work) took over 120 s
# to start a run; a passing test does not wait for them
WAIT_S = 600


def _wait_for(proc, pattern: str, timeout: float = WAIT_S) -> str:
    """Read the process's stderr until ``pattern`` appears (returns what was read)."""
    import selectors

    sel = selectors.DefaultSelector()
    sel.register(proc.stderr, selectors.EVENT_READ)
    seen, deadline = "", time.time() + timeout
    while pattern not in seen:
        assert time.time() < deadline and proc.poll() is None, seen[-3000:]
        if sel.select(timeout=1):
            chunk = os.read(proc.stderr.fileno(), 65536).decode(errors="replace")
            seen += chunk
    return seen


def _interrupt(args, sig, after: str = "step 3/") -> tuple[int, str]:
    proc = subprocess.Popen(args, cwd=ROOT, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL)
    seen = _wait_for(proc, after)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=WAIT_S)
    return proc.returncode, seen + err.decode(errors="replace")


def test_signal_during_training_checkpoints_and_resumes(tmp_path, toy_model_dir, toy_corpus, cache_dir):
    """Ctrl-C, then SIGTERM in the resumed run, with checkpoints off: each time the current step is
    saved and one line says how to go on (exit codes 130, 143), and --resume continues from exactly
    that step."""
    out = tmp_path / "out"
    args = _toy_cli_args(tmp_path, toy_model_dir, toy_corpus, cache_dir, out, "--token_distillation_epochs", "5000",
                         "--checkpoint_minutes", "0")
    rc, err = _interrupt(args, signal.SIGINT)
    assert rc == 130, err[-2000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith("interrupted") and "--resume" in last and "Traceback" not in err
    step = int(last.split("at step ")[1].split(";")[0])
    ckpts = sorted((out / "checkpoints").glob("step-*.pt"))
    assert [p.name for p in ckpts] == [f"step-{step:08d}.pt"]
    rc, err = _interrupt(args + ["--resume"], signal.SIGTERM, after=f"step {step + 2}/")
    assert f"(step {step})" in err and rc == 143  # resumed from the saved step, then stopped again
    last = err.strip().splitlines()[-1]
    assert last.startswith("interrupted (SIGTERM)") and "--resume" in last and "Traceback" not in err
    step2 = int(last.split("at step ")[1].split(";")[0])
    assert step2 >= step + 2 and (out / "checkpoints" / f"step-{step2:08d}.pt").is_file()


def test_signal_warning_names_where_the_run_stops_and_a_save_in_progress_completes(
        tmp_path, toy_model_dir, toy_corpus, cache_dir, monkeypatch, caplog):
    """The warning on a stop signal says what the run will do at that point (not always "a
    checkpoint is written"); a signal while the output is saved lets the save finish, exit normally
    and say so, instead of finishing silently (helper-20's trial)."""
    from token_distillation import pipeline
    from token_distillation.interrupts import Interrupted

    real_finish, real_held = pipeline.finish, pipeline.heldout_eval

    def finish_with_signal(*a, **k):
        os.kill(os.getpid(), signal.SIGTERM)  # deferred: recorded, the save goes on
        return real_finish(*a, **k)

    monkeypatch.setattr(pipeline, "finish", finish_with_signal)
    with caplog.at_level(logging.WARNING):
        res = run(_toy_cfg(tmp_path, toy_model_dir, toy_corpus, cache_dir))
    assert (res.out_path / "model.safetensors").is_file() and res.report["train_steps"] > 0
    assert "received SIGTERM: stopping once the output is saved" in caplog.text
    assert f"SIGTERM arrived while the output was being finished: the run completed and {res.out_path} is complete" \
        in caplog.text
    monkeypatch.setattr(pipeline, "finish", real_finish)

    def held_with_signal(*a, **k):
        if k.get("desc", "").endswith("before training"):
            os.kill(os.getpid(), signal.SIGTERM)
        return real_held(*a, **k)

    monkeypatch.setattr(pipeline, "heldout_eval", held_with_signal)
    caplog.clear()
    with caplog.at_level(logging.WARNING), pytest.raises(Interrupted):
        run(_toy_cfg(tmp_path, toy_model_dir, toy_corpus, cache_dir, out_path=str(tmp_path / "o2")))
    assert "stopping after the held-out batch in progress, before training (nothing is written)" in caplog.text
    assert "a checkpoint is written" not in caplog.text


def test_interrupt_before_training_is_one_line(tmp_path, toy_model_dir, toy_corpus, cache_dir):
    out = tmp_path / "out"
    args = _toy_cli_args(tmp_path, toy_model_dir, toy_corpus, cache_dir, out)
    proc = subprocess.Popen(args, cwd=ROOT, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL)
    _wait_for(proc, "model ")  # the first log line: start-up done, nothing written yet
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=WAIT_S)
    err = err.decode()
    assert proc.returncode == 143 and "Traceback" not in err, err[-2000:]
    assert err.strip().splitlines()[-1].startswith("interrupted (SIGTERM)")
    assert not out.exists() or not any(p.name != "checkpoints" for p in out.iterdir())


# ----------------------------------------------------------------------------- refused at once


def test_refusals_before_anything_heavy(tmp_path, capsys, monkeypatch, toy_model_dir, toy_corpus):
    _no_heavy_loads(monkeypatch)
    base = ["--model_path", str(toy_model_dir), "--dataset_path", str(toy_corpus), "--out_path", str(tmp_path / "o")]
    cases = [
        (["--snippet_num", "4"], "--min_snippets 4"),
        (["--text_column", "body"], "--text_column"),
        (["--snipet_num", "4"], "did you mean --snippet_num"),
        (["--epochs", "2"], "--epochs (did you mean --token_distillation_epochs?)"),  # a short name for a long flag
    ]
    for extra, needle in cases:
        code, errs, secs = _cli(capsys, *base, *extra)
        assert code == 2 and len(errs) == 1 and needle in errs[0], (extra, errs)
        assert secs < 5, (extra, secs)
    assert not (tmp_path / "o").exists()


def test_target_layer_refused_from_the_config(tmp_path, monkeypatch, toy_model_dir, toy_corpus, cache_dir):
    _no_heavy_loads(monkeypatch)
    t0 = time.perf_counter()
    with pytest.raises(ConfigError, match="--target_layer 999"):
        run(_toy_cfg(tmp_path, toy_model_dir, toy_corpus, cache_dir, target_layer=999))
    assert time.perf_counter() - t0 < 5
    with pytest.raises(ConfigError, match="--snippet_len 100000 .* exceeds the model's context"):
        run(_toy_cfg(tmp_path, toy_model_dir, toy_corpus, cache_dir, snippet_len=100000))


def test_offline_hub_id_fails_fast_with_nearest_alias(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    code, errs, secs = _cli(capsys, "--model_path", "smolm2-135m", "--out_path", str(tmp_path / "o"))
    assert code == 2 and len(errs) == 1 and "did you mean 'smollm2-135m'" in errs[0] and secs < 5


def test_wordlist_trailing_whitespace_is_stripped(tmp_path, caplog):
    from token_distillation.targets import read_wordlist

    p = tmp_path / "w.txt"
    p.write_text(" hepatotoxicity \n angiogenesis\t\n  \n nephrotoxicity\n")
    with caplog.at_level(logging.INFO):
        words = read_wordlist(p)
    assert words == [" hepatotoxicity", " angiogenesis", "", " nephrotoxicity"]  # the leading space stays
    assert any("line(s) (line 1, 2)" in r.message for r in caplog.records)


def test_wordlist_lines_that_look_like_comments_are_kept_with_a_warning(tmp_path, caplog):
    """A word list has no comment syntax: '# header' stays a candidate, and the log says so by line
    number; a token that merely starts with '#' (no space) is not flagged."""
    from token_distillation.targets import read_wordlist

    p = tmp_path / "w.txt"
    p.write_text("# my words\n hepatotoxicity\n#define\n")
    with caplog.at_level(logging.WARNING):
        words = read_wordlist(p)
    assert words == ["# my words", " hepatotoxicity", "#define"]
    msgs = [r.message for r in caplog.records if "no comments" in r.message]
    assert len(msgs) == 1 and "line(s) 1 start with '# '" in msgs[0]
    assert str(p) in msgs[0]  # the whole path: two lists of the same name in different folders are told apart


def test_wordlist_entries_led_by_a_tab_or_several_spaces_are_kept_with_a_warning(tmp_path, caplog):
    """helper-36: "\tword" was kept without a word; running text puts one space before a word."""
    from token_distillation.targets import read_wordlist

    p = tmp_path / "w.txt"
    p.write_text("\thepatotoxicity\n angiogenesis\n  nephrotoxicity\nplain\n")
    with caplog.at_level(logging.WARNING):
        words = read_wordlist(p)
    assert words == ["\thepatotoxicity", " angiogenesis", "  nephrotoxicity", "plain"]
    msgs = [r.getMessage() for r in caplog.records if "other than one space" in r.getMessage()]
    assert len(msgs) == 1 and "2 line(s) (line 1, 3" in msgs[0], msgs
    caplog.clear()
    (tmp_path / "w.json").write_text('{"a": [" fine", " also fine"]}')
    with caplog.at_level(logging.WARNING):
        read_wordlist(tmp_path / "w.json")
    assert not any("other than one space" in r.getMessage() for r in caplog.records)


def test_a_runs_word_list_is_read_and_warned_about_once(tmp_path, toy_model_dir, cache_dir, caplog):
    """helper-36: a dry run (and a real run) logged the word list's warnings twice: the list was read
    at start-up and again when the targets were built."""
    from token_distillation.config import RunConfig
    from token_distillation.pipeline import run

    p = tmp_path / "w.txt"
    p.write_text("# my words\n hepatotoxicity \n angiogenesis\n")
    with caplog.at_level(logging.INFO):
        run(RunConfig.from_flags(model_path=str(toy_model_dir), new_tokens_source=str(p), build_target_method="wordlist",
                                 dry_run=True, snippet_source="generated", cache_dir=str(cache_dir),
                                 out_path=str(tmp_path / "o")))
    assert sum("no comments" in r.getMessage() for r in caplog.records) == 1
    assert sum("stripped trailing whitespace" in r.getMessage() for r in caplog.records) == 1


def test_dry_run_reports_tokens_a_real_run_would_skip(tmp_path, toy_model_dir, toy_corpus, cache_dir, caplog):
    with caplog.at_level(logging.INFO):
        res = run(_toy_cfg(tmp_path, toy_model_dir, toy_corpus, cache_dir, dry_run=True, min_snippets=6))
    rep = json.loads((res.out_path / "report.json").read_text())
    skipped = {k for k, v in rep["skipped_tokens"].items() if "--min_snippets 6" in v}
    assert " zzqqxx" in skipped and len(skipped) < 4
    assert any("a real run would skip" in r.message for r in caplog.records)
    wrote = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("dry run: wrote "))
    assert wrote.startswith("dry run: wrote " + ", ".join(sorted(p.name for p in res.out_path.iterdir())) + " to ")
    assert "token_distillation_output.json" in wrote and "coverage.tsv" in wrote, wrote
    # the tokens a real run trains on fewer snippets than --snippet_num are named as in a real run (helper-36)
    kept = rep["tokens_with_enough_snippets"]
    few = [r.getMessage() for r in caplog.records if "fewer training snippets than --snippet_num" in r.getMessage()]
    assert len(few) == 1 and few[0].split(" token(s)")[0].endswith(f" of {kept}"), few
    # when a real run would stop for lack of snippets, the dry run fails the same way, after writing its files
    with pytest.raises(ConfigError, match=r"dry run: a real run would stop: no new token has enough snippets "
                                          r"\(--min_snippets 500\)"):
        run(_toy_cfg(tmp_path, toy_model_dir, toy_corpus, cache_dir, dry_run=True, min_snippets=500,
                     snippet_num=500, out_path=str(tmp_path / "none")))
    assert json.loads((tmp_path / "none" / "report.json").read_text())["tokens_with_enough_snippets"] == 0
    # with --snippet_source corpus-then-generated a real run tops those tokens up: the dry run does not stop
    caplog.clear()
    with caplog.at_level(logging.INFO):
        res = run(_toy_cfg(tmp_path, toy_model_dir, toy_corpus, cache_dir, dry_run=True, min_snippets=500,
                           snippet_num=500, snippet_source="corpus-then-generated", out_path=str(tmp_path / "top")))
    assert res.report["tokens_with_enough_snippets"] == 4 and not res.report["skipped_tokens"]
    assert "a real run would top up 4 token(s)" in caplog.text and "would skip" not in caplog.text
    # words that never occur: the real run's reason, not "lower --min_snippets"
    with pytest.raises(ConfigError, match="a real run would stop: --dataset_path .*: none of the 2 new tokens occurs in it"):
        run(_toy_cfg(tmp_path, toy_model_dir, toy_corpus, cache_dir, dry_run=True, out_path=str(tmp_path / "absent"),
                     new_tokens_source=_words(tmp_path, [" zzqqxx", " wwvvyy"])))


def test_snippet_num_below_min_snippets_is_a_flag_error():
    with pytest.raises(ConfigError, match="--snippet_num 4 is below --min_snippets 5"):
        RunConfig.from_flags(snippet_num=4)
    RunConfig.from_flags(snippet_num=4, min_snippets=4)


def test_dry_run_never_deletes_checkpoints(tmp_path):
    out = tmp_path / "out"
    (out / "checkpoints").mkdir(parents=True)
    (out / "checkpoints" / CHECKPOINT_MARKER).write_text('{"tool": "token-distillation"}')
    (out / "checkpoints" / "step-00000004.pt").write_bytes(b"ckpt")
    with pytest.raises(ConfigError, match="a dry run would delete"):
        prepare_out_path(str(out), overwrite=True, dry_run=True)
    assert (out / "checkpoints" / "step-00000004.pt").is_file()


def test_resume_with_other_flags_fails_before_the_model_loads(tmp_path, toy_model_dir, toy_corpus, cache_dir,
                                                             monkeypatch, caplog):
    """A changed training flag under --resume is refused at start-up (it used to load the model and run
    the held-out pass first); no checkpoint at all gives a warning and a fresh start."""
    import token_distillation.pipeline as pipeline

    first = _toy_cfg(tmp_path, toy_model_dir, toy_corpus, cache_dir, checkpoint_every=1, max_steps=2,
                     stopping_condition="max_steps")
    monkeypatch.setattr(pipeline, "save_output", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):  # stop after training: the checkpoints stay
        run(first)
    monkeypatch.undo()
    _no_heavy_loads(monkeypatch)
    with pytest.raises(ConfigError, match="different run.*token_distillation_lr"):
        run(_toy_cfg(tmp_path, toy_model_dir, toy_corpus, cache_dir, checkpoint_every=1, max_steps=2,
                     stopping_condition="max_steps", resume=True, token_distillation_lr=0.5))
    from token_distillation.checkpoint import check_resumable

    with caplog.at_level(logging.WARNING):
        check_resumable(tmp_path / "nothing", {}, "x")
    assert any("no checkpoint" in r.message for r in caplog.records)


def test_corpus_without_the_words_and_empty_word_list_fail_before_loading(tmp_path, monkeypatch, toy_model_dir,
                                                                         toy_corpus, cache_dir):
    _no_heavy_loads(monkeypatch)
    for words, needle in (([" zzqqxx", " wwvvyy"], "none of the 2 new tokens occurs"), (["", "  "], r"no words in it \(only empty lines\)")):
        t0 = time.perf_counter()
        with pytest.raises(ConfigError, match=needle):
            run(_toy_cfg(tmp_path, toy_model_dir, toy_corpus, cache_dir, new_tokens_source=_words(tmp_path, words)))
        assert time.perf_counter() - t0 < 5
    empty = tmp_path / "empty.txt"
    empty.write_bytes(b"")
    with pytest.raises(ConfigError, match=r"no words in it \(the file is empty\)"):
        run(_toy_cfg(tmp_path, toy_model_dir, toy_corpus, cache_dir, new_tokens_source=str(empty)))


def test_word_scan_finds_a_word_split_across_read_blocks(tmp_path, monkeypatch):
    from token_distillation import corpus
    from token_distillation.config import CorpusConfig

    p = tmp_path / "c.jsonl"
    p.write_text('{"text": "' + "x" * 100 + ' hepatotoxicity"}\n')
    monkeypatch.setattr(corpus, "_SCAN_BLOCK", 105)  # the word straddles the first block's end
    corpus.check_words_occur(CorpusConfig(dataset_path=str(p)), [" hepatotoxicity", " absent"])  # no error
    with pytest.raises(ConfigError):
        corpus.check_words_occur(CorpusConfig(dataset_path=str(p)), [" absent"])


def test_nearest_alias_suggests_the_alias_not_the_package():
    from token_distillation.paths import nearest_alias

    assert nearest_alias("smollm2") == " (did you mean 'smollm2-135m'?)"
    assert nearest_alias("llm-smolm2") == " (did you mean 'smollm2-135m'?)"
    assert nearest_alias("Gemma3") == " (did you mean 'gemma3-270m'?)"
    assert nearest_alias("meta-llama/Llama-3.1-8B") == ""


def test_out_path_under_a_file_is_refused_at_start(tmp_path):
    """A file where a parent folder of --out_path should be is refused up front (it crashed at the
    first checkpoint or the save, after the work), with rc 2 from the CLI's path check."""
    (tmp_path / "w.txt").write_text("words")
    for sub in ("sub", "a/b"):
        with pytest.raises(ConfigError, match=r"w\.txt is a file, so the directory cannot be made"):
            prepare_out_path(str(tmp_path / "w.txt" / sub), overwrite=False)
    assert (tmp_path / "w.txt").read_text() == "words"


def test_mount_point_cache_dir_and_output_inside_the_corpus_are_refused_at_start(tmp_path, capsys, monkeypatch,
                                                                                 toy_model_dir, toy_corpus):
    """Found by a trial (2026-12-06): an empty mount point as --out_path failed only when the finished
    output was renamed into place (EBUSY; the Docker pattern -v host:/out --out_path /out); a --cache_dir
    that is a file or unwritable failed with a traceback ~20 s in; an --out_path inside a --dataset_path
    folder was accepted (the next run read the output's files as corpus). Each is one error line
    before anything heavy; the mount point names a subfolder to use instead."""
    import token_distillation.paths as paths

    mount = tmp_path / "mnt"
    mount.mkdir()
    real_ismount = os.path.ismount
    monkeypatch.setattr(paths.os.path, "ismount", lambda p: Path(p) == mount or real_ismount(p))
    with pytest.raises(ConfigError, match=rf"is a mount point.*pass a folder inside it, e.g. {mount}/run"):
        prepare_out_path(str(mount), overwrite=False)
    prepare_out_path(str(mount / "run"), overwrite=False)  # inside it is fine

    _no_heavy_loads(monkeypatch)
    base = ["--model_path", str(toy_model_dir), "--dataset_path", str(toy_corpus), "--dry_run", "True"]
    (tmp_path / "file").write_text("x")
    corpus_dir = tmp_path / "corpus"
    corpus_dir.mkdir()
    (corpus_dir / "docs.jsonl").write_text(Path(toy_corpus).read_text())
    cases = [
        (["--out_path", str(tmp_path / "o1"), "--cache_dir", str(tmp_path / "file")], "--cache_dir", "is a file"),
        (["--out_path", str(tmp_path / "o2"), "--cache_dir", "/proc/x/cache"], "--cache_dir /proc/x/cache",
         "cannot write the cache there"),
        (["--out_path", str(corpus_dir / "out"), "--dataset_path", str(corpus_dir)], "is inside --dataset_path",
         "choose a directory outside it"),
        (["--out_path", str(tmp_path / "o3"), "--cache_dir", str(corpus_dir / "cache"), "--dataset_path",
          str(corpus_dir)], "--cache_dir", "is inside --dataset_path"),
    ]
    for extra, *needles in cases:
        args = base + extra
        if "--dataset_path" in extra:  # the case's own corpus folder
            i = args.index("--dataset_path")
            del args[i: i + 2]
        code, errs, _ = _cli(capsys, *args)
        assert code == 2 and len(errs) == 1 and all(n in errs[0] for n in needles), (extra, errs)
    assert not (tmp_path / "o1").exists() and not (corpus_dir / "out").exists() and not (corpus_dir / "cache").exists()


def test_broken_model_checkpoints_are_one_error_line(tmp_path, capsys, toy_model_dir, toy_corpus, cache_dir):
    """Found by a trial (2026-12-06): a checkpoint directory without tokenizer files, with an unknown
    model_type, without weights, with truncated weights, and a corrupt .gguf each gave a traceback
    (no weights: only after the corpus stage). Each is now one ``error:`` line naming --model_path;
    missing weights fail at start-up."""
    import shutil

    def copy(name):
        d = tmp_path / name
        shutil.copytree(toy_model_dir, d)
        return d

    notok = copy("notok")
    for f in notok.glob("tokenizer*"):
        f.unlink()
    for f in notok.glob("special_tokens_map.json"):
        f.unlink()
    badtype = copy("badtype")
    cfg = json.loads((badtype / "config.json").read_text())
    (badtype / "config.json").write_text(json.dumps({**cfg, "model_type": "nosuchmodel"}))
    noweights = copy("noweights")
    (noweights / "model.safetensors").unlink()
    trunc = copy("trunc")
    data = (trunc / "model.safetensors").read_bytes()
    (trunc / "model.safetensors").write_bytes(data[: len(data) // 2])
    gguf = tmp_path / "bad.gguf"
    gguf.write_bytes(b"GGUF\x03\x00\x00\x00\xff\xff")
    base = ["--dataset_path", str(toy_corpus), "--cache_dir", str(cache_dir), "--new_tokens_source",
            _words(tmp_path, [" hepatotoxicity"]), "--snippet_num", "4", "--min_snippets", "2", "--heldout_snippet_num", "1",
            "--snippet_len", "12", "--stopping_condition", "max_steps:1", "--output_embeddings", "subtoken-mean"]
    cases = [(notok, ["--dry_run", "True"], "cannot load its tokenizer"),
             (badtype, ["--dry_run", "True"], "cannot load its config (ValueError"),
             (gguf, ["--dry_run", "True"], "cannot load its config"),
             (noweights, [], "no weights in it"),
             (trunc, [], "cannot load its weights")]
    for i, (model, extra, needle) in enumerate(cases):
        t0 = time.perf_counter()
        code, errs, _ = _cli(capsys, "--model_path", str(model), "--out_path", str(tmp_path / f"o{i}"), *base, *extra)
        assert code == 2 and len(errs) == 1 and f"--model_path {model}" in errs[0] and needle in errs[0], (model, errs)
        if model == noweights:
            assert time.perf_counter() - t0 < 5


def test_seed_out_of_range_and_a_non_gguf_file_as_model_path(tmp_path, capsys, monkeypatch, toy_corpus):
    """A trial (2026-12-06): --seed 99999999999999999999 ended in numpy's overflow traceback, and an
    existing file that is not a .gguf as --model_path was called "not found"."""
    _no_heavy_loads(monkeypatch)
    code, errs, _ = _cli(capsys, "--seed", "99999999999999999999", "--dry_run", "True", "--out_path",
                         str(tmp_path / "o"))
    assert code == 2 and len(errs) == 1 and "--seed 99999999999999999999: pass an integer from 0 to" in errs[0], errs
    readme = tmp_path / "README.md"
    readme.write_text("x")
    code, errs, _ = _cli(capsys, "--model_path", str(readme), "--dry_run", "True", "--out_path", str(tmp_path / "o"))
    assert code == 2 and len(errs) == 1 and "is a file but not a .gguf checkpoint" in errs[0], errs
