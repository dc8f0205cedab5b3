"""Resumable runs: an interrupted run resumed from its checkpoint ends with the same rows."""

import logging
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.test_pipeline import _toy_cfg
from tests.test_train import _setup
from token_distillation import checkpoint as ckpt_mod
from token_distillation.checkpoint import CHECKPOINT_DIRNAME, CHECKPOINT_MARKER, Checkpointer
from token_distillation.config import ConfigError
from token_distillation.pipeline import run
from token_distillation.train import resolve_layer, train

CPU = torch.device("cpu")


class Interrupted(Exception):
    """Stands in for a pre-emption (SIGTERM/kill) right after a checkpoint was written."""


def _interrupt_after(monkeypatch, step):
    real = Checkpointer.save

    def save(self, s, *a, **kw):
        path = real(self, s, *a, **kw)
        if s == step:
            raise Interrupted(f"killed after step {s}")
        return path

    monkeypatch.setattr(Checkpointer, "save", save)


def _train(rows, seqs, tix, model, ckpt=None):
    # 24 snippets, batch 5 -> 5 steps per epoch with a short last batch; 3 epochs = 15 steps
    return train(model, rows, seqs, tix, layer=resolve_layer(model, -1), lr=1e-2, batch_size=5, epochs=3, seed=3,
                 device=CPU, checkpointer=ckpt)


def test_train_interrupted_and_resumed_equals_uninterrupted(tmp_path, monkeypatch):
    model, _, seqs, tix, rows_ref = _setup()
    ref = _train(rows_ref, seqs, tix, model)

    _, _, _, _, rows = _setup()
    fp = {"run": "x"}
    _interrupt_after(monkeypatch, 7)  # mid-epoch: the remaining order of epoch 2 must be restored
    with pytest.raises(Interrupted):
        _train(rows, seqs, tix, model, Checkpointer(tmp_path / "ck", 7, fp))
    assert [p.name for p in (tmp_path / "ck").iterdir() if p.name != CHECKPOINT_MARKER] == ["step-00000007.pt"]
    assert not torch.equal(rows.rows, rows_ref.rows)
    monkeypatch.undo()

    # a fresh process would start from the initial rows and unrelated global RNG state
    _, _, _, _, rows2 = _setup()
    random.seed(123), np.random.seed(123), torch.manual_seed(123)
    res = _train(rows2, seqs, tix, model, Checkpointer(tmp_path / "ck", 7, fp, resume=True))
    assert res.steps == ref.steps == 15
    assert torch.equal(rows2.rows, rows_ref.rows)
    assert res.loss_curve == ref.loss_curve


def test_resumed_run_counts_the_training_time_before_the_resume(tmp_path, monkeypatch):
    model, _, seqs, tix, rows = _setup()
    fp = {"run": "x"}
    _interrupt_after(monkeypatch, 7)
    with pytest.raises(Interrupted):
        _train(rows, seqs, tix, model, Checkpointer(tmp_path / "ck", 7, fp))
    monkeypatch.undo()
    path = tmp_path / "ck" / "step-00000007.pt"
    state = torch.load(path, weights_only=True)
    assert 0 < state["seconds"] < 600
    state["seconds"] = 1000.0  # as if the first process had trained for 1000 s
    torch.save(state, path)
    res = _train(_setup()[4], seqs, tix, model, Checkpointer(tmp_path / "ck", 0, fp, resume=True))
    assert 1000.0 < res.seconds < 1600.0 and res.seconds_from_step == 0

    del state["seconds_from_step"]  # an earlier format: the seconds count from the start
    torch.save(state, path)
    res = _train(_setup()[4], seqs, tix, model, Checkpointer(tmp_path / "ck", 0, fp, resume=True))
    assert 1000.0 < res.seconds < 1600.0 and res.seconds_from_step == 0

    del state["seconds"]  # a checkpoint written before the time was recorded
    torch.save(state, path)
    res = _train(_setup()[4], seqs, tix, model, Checkpointer(tmp_path / "ck", 0, fp, resume=True))
    assert 0 < res.seconds < 600 and res.seconds_from_step == 7

    # resumed from it, interrupted again and resumed from a newer checkpoint: still counted from step 7
    torch.save(state, path)
    _interrupt_after(monkeypatch, 10)
    with pytest.raises(Interrupted):
        _train(_setup()[4], seqs, tix, model, Checkpointer(tmp_path / "ck", 10, fp, resume=True))
    monkeypatch.undo()
    assert torch.load(tmp_path / "ck" / "step-00000010.pt", weights_only=True)["seconds_from_step"] == 7
    res = _train(_setup()[4], seqs, tix, model, Checkpointer(tmp_path / "ck", 0, fp, resume=True))
    assert res.steps == 15 and res.seconds_from_step == 7


def test_checkpoints_keep_newest_and_refuse_other_runs(tmp_path):
    model, _, seqs, tix, rows = _setup()
    _train(rows, seqs, tix, model, Checkpointer(tmp_path / "ck", 2, {"lr": 1}))
    # every 2 steps, and the last step (15) when training ends; the newest two are kept
    assert [p.name for p in Checkpointer(tmp_path / "ck", 2, {}).checkpoints()] == ["step-00000014.pt",
                                                                                    "step-00000015.pt"]
    _, _, _, _, rows2 = _setup()
    with pytest.raises(ConfigError, match="different run.*lr"):
        _train(rows2, seqs, tix, model, Checkpointer(tmp_path / "ck", 2, {"lr": 2}, resume=True))
    # without --resume, stale checkpoints are discarded and training starts over
    res = _train(rows2, seqs, tix, model, Checkpointer(tmp_path / "ck", 0, {"lr": 2}))
    assert res.steps == 15 and not (tmp_path / "ck").exists()


def test_start_up_checks_map_the_checkpoint_instead_of_reading_it(tmp_path, monkeypatch):
    """--resume's two start-up checks need only the newest checkpoint's fingerprint: they map the file
    (torch.load mmap) instead of reading its rows and Adam state (~6 GB with
    --train_original_embeddings on an 8B model); the restore reads it."""
    model, _, seqs, tix, rows = _setup()
    ck = tmp_path / "ck"
    ckpt = Checkpointer(ck, 2, {"lr": 1})
    _train(rows, seqs, tix, model, ckpt)
    calls, real = [], torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **kw: calls.append(kw.get("mmap", False)) or real(*a, **kw))
    ckpt_mod.check_resumable(ck, {"lr": 1}, None)
    ckpt_mod.check_training_inputs(ck, ckpt.fingerprint)
    assert calls == [True, True]
    _, _, _, _, rows2 = _setup()
    _train(rows2, seqs, tix, model, Checkpointer(ck, 2, {"lr": 1}, resume=True))
    assert calls == [True, True, False]


def test_damaged_checkpoint_is_refused_with_the_file_and_the_way_on(tmp_path):
    """A step checkpoint cut short (full disk, partial copy) fails --resume with one clear error that
    names the file and says how to go on; deleting it resumes from the checkpoint before it."""
    model, _, seqs, tix, rows = _setup()
    ck = tmp_path / "ck"
    _train(rows, seqs, tix, model, Checkpointer(ck, 2, {"lr": 1}))
    newest = ck / "step-00000015.pt"
    newest.write_bytes(newest.read_bytes()[:100])
    for call in (lambda: ckpt_mod.check_resumable(ck, {"lr": 1, "token_distillation_batch_size": "auto"}, "toy"),
                 lambda: ckpt_mod.check_resumable(ck, {"lr": 1}, "toy"),
                 lambda: Checkpointer(ck, 2, {"lr": 1}, resume=True).restore(rows, None, None)):
        with pytest.raises(ConfigError, match=r"step-00000015\.pt cannot be read.*delete it.*--overwrite"):
            call()
    newest.unlink()
    _, _, _, _, rows2 = _setup()
    got = []
    real = Checkpointer.restore
    ckpt = Checkpointer(ck, 2, {"lr": 1}, resume=True)
    ckpt.restore = lambda *a: got.append(real(ckpt, *a)) or got[-1]
    assert _train(rows2, seqs, tix, model, ckpt).steps == 15 and got[0][0] == 14


def test_pipeline_resume(tmp_path, toy_model_dir, toy_corpus, cache_dir, monkeypatch, caplog):
    from safetensors.torch import load_file

    # teacher cache off: a resumed process recomputes teacher states the uninterrupted run took from
    # its cache, in other batches (other padding), which is equal only up to float rounding; the
    # cache itself is checked in tests/test_fastpath.py. Resuming is bit-exact without it.
    kw = dict(token_distillation_epochs=3, checkpoint_every=2, teacher_cache_gib=0)
    ref = run(_toy_cfg(tmp_path, toy_model_dir, toy_corpus, cache_dir, out_path=str(tmp_path / "ref"), **kw))
    assert not (ref.out_path / CHECKPOINT_DIRNAME).exists()  # a finished run leaves no checkpoints
    steps = ref.report["train_steps"]
    assert steps >= 5

    out = tmp_path / "out"
    _interrupt_after(monkeypatch, 4)
    with pytest.raises(Interrupted):
        run(_toy_cfg(tmp_path, toy_model_dir, toy_corpus, cache_dir, out_path=str(out), **kw))
    monkeypatch.undo()
    assert [p.name for p in out.iterdir()] == [CHECKPOINT_DIRNAME]

    with pytest.raises(ConfigError, match="--resume"):
        run(_toy_cfg(tmp_path, toy_model_dir, toy_corpus, cache_dir, out_path=str(out), **kw))
    with pytest.raises(ConfigError, match="different run"):
        run(_toy_cfg(tmp_path, toy_model_dir, toy_corpus, cache_dir, out_path=str(out), resume=True,
                     token_distillation_lr=5e-3, **kw))
    # a word list whose contents changed is refused at start-up, before the tokenizer and the corpus load
    from tests.test_pipeline import _words
    from token_distillation import pipeline

    with monkeypatch.context() as m, pytest.raises(ConfigError, match="word list's contents changed"):
        m.setattr(pipeline, "load_inputs", lambda *a, **k: pytest.fail("loaded the tokenizer before refusing"))
        run(_toy_cfg(tmp_path, toy_model_dir, toy_corpus, cache_dir, out_path=str(out), resume=True,
                     new_tokens_source=_words(tmp_path, [" hepatotoxicity", " angiogenesis"]), **kw))

    # a corpus changed since the interruption is refused before the held-out pass that precedes training
    # (helper-28: it was refused only at the checkpoint's restore, after that pass, showing two hashes)
    import json

    changed = tmp_path / "changed.jsonl"
    changed.write_text("".join(json.dumps({**d, "text": d["text"].replace(" the ", " a ")}) + "\n"
                               for d in map(json.loads, Path(toy_corpus).read_text().splitlines())))
    with monkeypatch.context() as m, pytest.raises(ConfigError, match=r"the training snippets differ \(the corpus"):
        m.setattr(pipeline, "heldout_eval", lambda *a, **k: pytest.fail("ran the held-out pass before refusing"))
        run(_toy_cfg(tmp_path, toy_model_dir, toy_corpus, cache_dir, out_path=str(out), resume=True,
                     dataset_path=str(changed), **kw))

    resumed_steps = []
    real_restore = ckpt_mod.Checkpointer.restore

    earlier = []

    def restore(self, *a):
        r = real_restore(self, *a)
        resumed_steps.append(r[0] if r else 0)
        earlier.append(r[3] if r else None)
        return r

    monkeypatch.setattr(ckpt_mod.Checkpointer, "restore", restore)
    caplog.set_level(logging.INFO, logger="token_distillation")
    # --overwrite beside --resume does not discard the checkpoints; the log says so
    res = run(_toy_cfg(tmp_path, toy_model_dir, toy_corpus, cache_dir, out_path=str(out), resume=True, overwrite=True,
                       **kw))
    assert "--resume with --overwrite: the interrupted run" in caplog.text and "without --resume" in caplog.text
    assert resumed_steps == [4]
    # the time before the interruption is counted
    assert earlier[0][1] == 0 and 0 < earlier[0][0] < res.report["train_seconds"]
    assert res.report["train_seconds_from_step"] == 0
    assert res.report["loss_curve"] == ref.report["loss_curve"]
    assert not (out / CHECKPOINT_DIRNAME).exists()
    assert f"removed the run's checkpoints ({out / CHECKPOINT_DIRNAME}): the saved output replaces them" in caplog.text
    a = load_file(str(ref.out_path / "model.safetensors"))["model.embed_tokens.weight"]
    b = load_file(str(out / "model.safetensors"))["model.embed_tokens.weight"]
    assert torch.equal(a, b)


def _count_heldout_passes(monkeypatch) -> list[str]:
    """Record the description of every held-out pass the pipeline runs (the returned list fills)."""
    from token_distillation import pipeline

    passes: list[str] = []
    real = pipeline.heldout_eval

    def counting(*a, **k):
        passes.append(k.get("desc"))
        return real(*a, **k)

    monkeypatch.setattr(pipeline, "heldout_eval", counting)
    return passes


def test_resume_reads_the_held_out_measures_before_training_instead_of_evaluating_again(
        tmp_path, toy_model_dir, toy_corpus, cache_dir, monkeypatch, caplog):
    """The held-out pass before training (minutes at 500 words on a CPU) is written with the first
    checkpoint and read back by --resume; the report's measures before training are the same. A
    file made for other inputs (other rows before training) is not used."""
    from token_distillation.paths import HELDOUT_BEFORE_FILE

    kw = dict(token_distillation_epochs=3, checkpoint_every=2, teacher_cache_gib=0)
    ref = run(_toy_cfg(tmp_path, toy_model_dir, toy_corpus, cache_dir, out_path=str(tmp_path / "ref"), **kw))
    out = tmp_path / "out"
    _interrupt_after(monkeypatch, 2)
    with pytest.raises(Interrupted):
        run(_toy_cfg(tmp_path, toy_model_dir, toy_corpus, cache_dir, out_path=str(out), **kw))
    monkeypatch.undo()
    saved = out / CHECKPOINT_DIRNAME / HELDOUT_BEFORE_FILE
    assert saved.is_file()
    from token_distillation.paths import foreign_entries

    assert foreign_entries(out) == []  # this tool's file: --overwrite may replace it

    passes = _count_heldout_passes(monkeypatch)
    with caplog.at_level("INFO", logger="token_distillation"):
        res = run(_toy_cfg(tmp_path, toy_model_dir, toy_corpus, cache_dir, out_path=str(out), resume=True, **kw))
    assert passes == ["held-out evaluation after training"]
    assert "held-out measures before training read from" in caplog.text
    for key in ("mean_heldout_loss_init", "new_token_argmax_rate_init", "mean_heldout_loss_final"):
        assert res.report[key] == pytest.approx(ref.report[key], rel=1e-5), key
    assert [t["heldout_loss_init"] for t in res.report["tokens"]] == \
        pytest.approx([t["heldout_loss_init"] for t in ref.report["tokens"]], rel=1e-5)

    # a file whose key does not match (here: written for other inputs) is logged and evaluated again
    ckpt_mod.HeldoutBefore(saved.parent, True, "other").get()  # nothing to read: a missing file is None
    saved.parent.mkdir(parents=True)
    torch.save({"key": "made for other rows", "before": {"loss_per_token": [0.0], "argmax": None}}, saved)
    caplog.clear()
    with caplog.at_level("INFO", logger="token_distillation"):
        assert ckpt_mod.HeldoutBefore(saved.parent, True, "this run's key").get() is None
    assert "made for other inputs; evaluating the held-out snippets before training again" in caplog.text


def test_heldout_cache_dir_serves_later_runs_with_the_same_inputs(tmp_path, toy_model_dir, toy_corpus, cache_dir,
                                                                  monkeypatch, caplog):
    """--heldout_cache_dir (set by compare_methods.py / sweep_lr.py): a second run that differs only in
    training reads the held-out measures before training instead of a full pass, with the same
    report; other inputs (another target layer) are evaluated again; without the flag nothing is kept."""
    passes = _count_heldout_passes(monkeypatch)
    shared = tmp_path / "heldout-before"
    kw = dict(token_distillation_epochs=1, teacher_cache_gib=0, heldout_cache_dir=str(shared))
    before = "held-out evaluation before training"
    a = run(_toy_cfg(tmp_path, toy_model_dir, toy_corpus, cache_dir, out_path=str(tmp_path / "a"), **kw))
    assert passes.count(before) == 1 and len(list(shared.glob("*.pt"))) == 1
    passes.clear()
    with caplog.at_level("INFO", logger="token_distillation"):
        b = run(_toy_cfg(tmp_path, toy_model_dir, toy_corpus, cache_dir, out_path=str(tmp_path / "b"),
                         token_distillation_lr_relative=0.1, **kw))
    assert before not in passes and "(--heldout_cache_dir: an earlier run" in caplog.text
    for key in ("mean_heldout_loss_init", "new_token_argmax_rate_init"):
        assert b.report[key] == a.report[key], key
    assert [t["heldout_loss_init"] for t in b.report["tokens"]] == [t["heldout_loss_init"] for t in a.report["tokens"]]
    assert b.report["mean_heldout_loss_final"] != a.report["mean_heldout_loss_final"]  # trained otherwise
    passes.clear()
    run(_toy_cfg(tmp_path, toy_model_dir, toy_corpus, cache_dir, out_path=str(tmp_path / "c"), target_layer=1, **kw))
    assert passes.count(before) == 1 and len(list(shared.glob("*.pt"))) == 2  # another layer: another key
    kw.pop("heldout_cache_dir")
    run(_toy_cfg(tmp_path, toy_model_dir, toy_corpus, cache_dir, out_path=str(tmp_path / "d"), **kw))
    assert len(list(shared.glob("*.pt"))) == 2
    # an untrained run with the same initial rows would share the key: its own pass gives the same measures
    # (here it also keeps ' zzqqxx', which has no snippet to train on, so its rows and key differ)
    e = run(_toy_cfg(tmp_path, toy_model_dir, toy_corpus, cache_dir, out_path=str(tmp_path / "e"),
                     init_method="subtoken-mean", **kw))
    untrained = {t["token"]: t["heldout_loss_init"] for t in e.report["tokens"]}
    assert {t["token"]: t["heldout_loss_init"] for t in a.report["tokens"]}.items() <= untrained.items()


def test_resume_into_a_new_folder_says_once_that_there_is_nothing_to_resume(tmp_path, toy_model_dir, toy_corpus,
                                                                            cache_dir, caplog):
    """helper-27's trial: the start-up warning and the training loop both said 'no checkpoint'."""
    with caplog.at_level("INFO", logger="token_distillation"):
        res = run(_toy_cfg(tmp_path, toy_model_dir, toy_corpus, cache_dir, out_path=str(tmp_path / "new"),
                           resume=True, token_distillation_epochs=1))
    assert res.report["train_steps"] > 0
    said = [r for r in caplog.records if "no checkpoint in" in r.getMessage()]
    assert len(said) == 1 and said[0].levelname == "WARNING", [r.getMessage() for r in said]


def _signal_in_last_heldout_batch(monkeypatch, when: str):
    """Make the held-out evaluation whose description ends with ``when`` ("before training", "after
    training") receive SIGTERM in its last batch (after its last check); returns the real function."""
    import signal

    from token_distillation import interrupts, pipeline

    real = pipeline.heldout_eval

    def signal_in_last_batch(*a, **k):
        res = real(*a, **k)
        if k.get("desc", "").endswith(when):
            interrupts.STOP.signum = signal.SIGTERM
        return res

    monkeypatch.setattr(pipeline, "heldout_eval", signal_in_last_batch)
    return real


def test_stop_before_training_leaves_an_earlier_runs_checkpoints(tmp_path, toy_model_dir, toy_corpus, cache_dir,
                                                                 monkeypatch):
    """A stop signal that arrives during the held-out evaluation before training (its last batch:
    no later check inside it) ends the run there, with nothing written: an --overwrite run into the
    checkpoints of an interrupted one does not clear them first (found by a new-user trial)."""
    from token_distillation import interrupts

    kw = dict(token_distillation_epochs=2, checkpoint_every=2, teacher_cache_gib=0)
    out = tmp_path / "out"
    _interrupt_after(monkeypatch, 2)
    with pytest.raises(Interrupted):
        run(_toy_cfg(tmp_path, toy_model_dir, toy_corpus, cache_dir, out_path=str(out), **kw))
    monkeypatch.undo()
    before = sorted(p.name for p in (out / CHECKPOINT_DIRNAME).iterdir())
    assert "step-00000002.pt" in before
    _signal_in_last_heldout_batch(monkeypatch, "before training")
    with pytest.raises(interrupts.Interrupted) as info:
        run(_toy_cfg(tmp_path, toy_model_dir, toy_corpus, cache_dir, out_path=str(out), overwrite=True, **kw))
    assert info.value.step is None and "nothing was written" in info.value.message()
    # helper-28: "rerun to start again" was wrong under --resume (the rerun continues from the checkpoints)
    assert "checkpoints of an earlier run stay" in info.value.message() and "start again" not in info.value.message()
    assert sorted(p.name for p in (out / CHECKPOINT_DIRNAME).iterdir()) == before


def test_stop_in_the_last_held_out_batch_after_training_stops_and_keeps_the_fit(tmp_path, toy_model_dir, toy_corpus,
                                                                                cache_dir, monkeypatch, caplog):
    """A stop signal during the held-out evaluation after training (its last batch has no later check)
    stops there with the --resume line instead of saving and exiting 0 (helper-21); the output fit,
    whose last group is saved too, is not repeated by --resume."""
    import logging

    from token_distillation import interrupts, output_rows, pipeline
    from token_distillation.paths import OUTPUT_FIT_FILE

    kw = dict(token_distillation_epochs=1, teacher_cache_gib=0)
    real = _signal_in_last_heldout_batch(monkeypatch, "after training")
    out = tmp_path / "out"
    with pytest.raises(interrupts.Interrupted) as info:
        run(_toy_cfg(tmp_path, toy_model_dir, toy_corpus, cache_dir, out_path=str(out), **kw))
    assert info.value.step is not None and "--resume" in info.value.message()
    assert (out / CHECKPOINT_DIRNAME / OUTPUT_FIT_FILE).is_file()  # one group: saved all the same
    monkeypatch.setattr(pipeline, "heldout_eval", real)
    fits = []
    real_fit = output_rows.fit
    monkeypatch.setattr(output_rows, "fit", lambda *a, **k: fits.append(1) or real_fit(*a, **k))
    with caplog.at_level(logging.INFO, logger="token_distillation.output_rows"):
        res = run(_toy_cfg(tmp_path, toy_model_dir, toy_corpus, cache_dir, out_path=str(out), resume=True, **kw))
    assert not fits and res.report["model"]["output_embeddings"] == "distill"
    assert "(every group restored from the interrupted run's checkpoint)" in caplog.text
    assert (out / "model.safetensors").is_file()


def test_stop_during_output_row_fit_resumes_from_trained_input_rows(tmp_path, untied_model_dir, toy_corpus, cache_dir,
                                                                     monkeypatch):
    """A stop signal while --output_embeddings distill fits the output rows (tens of minutes at scale)
    stops between batches with the --resume line; the resumed run skips training and ends with the
    rows of an uninterrupted run."""
    import signal

    from safetensors.torch import load_file

    from token_distillation import interrupts, output_rows

    kw = dict(token_distillation_epochs=2, checkpoint_every=2, teacher_cache_gib=0, output_embeddings="distill")
    ref = run(_toy_cfg(tmp_path, untied_model_dir, toy_corpus, cache_dir, out_path=str(tmp_path / "ref"), **kw))
    assert ref.report["model"]["output_embeddings"] == "distill"
    real = output_rows.collect_positions

    def stop_then_collect(*a, **k):  # the signal arrives while the fit reads its first snippets
        interrupts.STOP.signum = signal.SIGTERM
        return real(*a, **k)

    out, fits = tmp_path / "out", []
    monkeypatch.setattr(output_rows, "collect_positions", stop_then_collect)
    real_fit = output_rows.fit
    monkeypatch.setattr(output_rows, "fit", lambda *a, **k: fits.append(1) or real_fit(*a, **k))
    with pytest.raises(interrupts.Interrupted) as info:
        run(_toy_cfg(tmp_path, untied_model_dir, toy_corpus, cache_dir, out_path=str(out), **kw))
    monkeypatch.undo()
    assert not fits  # stopped while reading snippets, not after the fit
    assert info.value.step == ref.report["train_steps"] and "--resume" in info.value.message()
    assert info.value.exit_code == 143 and [p.name for p in out.iterdir()] == [CHECKPOINT_DIRNAME]

    resumed_steps = []
    real_restore = ckpt_mod.Checkpointer.restore
    monkeypatch.setattr(ckpt_mod.Checkpointer, "restore",
                        lambda self, *a: resumed_steps.append((r := real_restore(self, *a)) and r[0]) or r)
    res = run(_toy_cfg(tmp_path, untied_model_dir, toy_corpus, cache_dir, out_path=str(out), resume=True, **kw))
    assert resumed_steps == [ref.report["train_steps"]]  # training was not repeated
    a, b = load_file(str(ref.out_path / "model.safetensors")), load_file(str(out / "model.safetensors"))
    n = len(res.report["tokens"])
    assert n and torch.equal(a["lm_head.weight"][-n:], b["lm_head.weight"][-n:])
    assert torch.equal(a["model.embed_tokens.weight"], b["model.embed_tokens.weight"])


def test_stop_during_output_row_fit_keeps_the_token_groups_already_fitted(tmp_path, untied_model_dir, toy_corpus,
                                                                          cache_dir, monkeypatch):
    """The output-row fit saves its finished token groups (checkpoints/output-fit.pt): a stop in the
    second group, then --resume, fits only the groups not saved and ends with the rows and measures
    of an uninterrupted run (at 500 words on a CPU the fit takes an hour or more)."""
    import signal

    from safetensors.torch import load_file

    from token_distillation import interrupts, output_rows
    from token_distillation.paths import OUTPUT_FIT_FILE, checkpoint_dir_problems

    monkeypatch.setattr(output_rows, "CHUNK_ENTRIES", 1)  # one token per group
    kw = dict(token_distillation_epochs=2, checkpoint_every=2, teacher_cache_gib=0, output_embeddings="distill")
    ref = run(_toy_cfg(tmp_path, untied_model_dir, toy_corpus, cache_dir, out_path=str(tmp_path / "ref"), **kw))
    n = len(ref.report["tokens"])
    assert n >= 2
    real, calls = output_rows.collect_positions, []

    def stop_in_second_group(*a, **k):  # calls 1-2: group 1's training and held-out snippets
        calls.append(1)
        if len(calls) == 3:
            interrupts.STOP.signum = signal.SIGTERM
        return real(*a, **k)

    out = tmp_path / "out"
    monkeypatch.setattr(output_rows, "collect_positions", stop_in_second_group)
    with pytest.raises(interrupts.Interrupted):
        run(_toy_cfg(tmp_path, untied_model_dir, toy_corpus, cache_dir, out_path=str(out), **kw))
    monkeypatch.setattr(output_rows, "collect_positions", real)
    saved = out / CHECKPOINT_DIRNAME / OUTPUT_FIT_FILE
    assert saved.is_file() and torch.load(saved, weights_only=True)["groups_done"] == 1
    assert checkpoint_dir_problems(out / CHECKPOINT_DIRNAME) == []  # the tool's own file: --overwrite may replace it

    fits = []
    real_fit = output_rows.fit
    monkeypatch.setattr(output_rows, "fit", lambda *a, **k: fits.append(1) or real_fit(*a, **k))
    res = run(_toy_cfg(tmp_path, untied_model_dir, toy_corpus, cache_dir, out_path=str(out), resume=True, **kw))
    assert len(fits) == n - 1  # the first group came from the file
    a, b = load_file(str(ref.out_path / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert torch.equal(a["lm_head.weight"], b["lm_head.weight"])
    assert torch.equal(a["model.embed_tokens.weight"], b["model.embed_tokens.weight"])
    assert res.report["tokens"] == ref.report["tokens"]  # per-token measures, the fit's KL among them
    assert not (out / CHECKPOINT_DIRNAME).exists()

    # a resume whose trained rows differ (another key) fits every group again
    from token_distillation.checkpoint import OutputFitProgress

    p = OutputFitProgress(tmp_path / "ck", resume=True)
    p.save("key-a", {"groups_done": 1})
    assert p.load("key-b") is None and p.load("key-a")["groups_done"] == 1
    assert OutputFitProgress(tmp_path / "ck", resume=False).load("key-a") is None  # a fresh run ignores it


def test_resume_reads_generated_snippets_instead_of_sampling_again(tmp_path, toy_model_dir, cache_dir, monkeypatch):
    """--snippet_source generated: the snippets are kept beside the first checkpoint; --resume reads
    them (no sampling: minutes per resume on a CPU) and ends with the rows of an uninterrupted run.
    Snippets kept for other inputs are not used."""
    from safetensors.torch import load_file

    from token_distillation import pipeline
    from token_distillation.checkpoint import GENERATED_SNIPPETS_FILE
    from token_distillation.config import RunConfig
    from token_distillation.paths import checkpoint_dir_problems

    words = tmp_path / "w.txt"
    words.write_text(" hepatotoxicity\n nephrotoxicity\n")
    kw = dict(model_path=str(toy_model_dir), cache_dir=str(cache_dir), new_tokens_source=str(words), snippet_num=4,
              heldout_snippet_num=1, min_snippets=2, snippet_len=10, token_distillation_batch_size=2,
              token_distillation_epochs=2, checkpoint_every=2, teacher_cache_gib=0, use_generated_snippets=True)
    ref = run(RunConfig.from_flags(out_path=str(tmp_path / "ref"), **kw))
    assert ref.report["train_steps"] >= 4

    out = tmp_path / "out"
    _interrupt_after(monkeypatch, 2)
    with pytest.raises(Interrupted):
        run(RunConfig.from_flags(out_path=str(out), **kw))
    monkeypatch.undo()
    kept = out / CHECKPOINT_DIRNAME / GENERATED_SNIPPETS_FILE
    assert kept.is_file() and not checkpoint_dir_problems(out / CHECKPOINT_DIRNAME)

    def no_sampling(*a, **k):
        raise AssertionError("snippets sampled again on --resume")

    monkeypatch.setattr(pipeline, "generate_snippets", no_sampling)
    res = run(RunConfig.from_flags(out_path=str(out), resume=True, **kw))
    assert res.report["loss_curve"] == ref.report["loss_curve"]
    a = load_file(str(ref.out_path / "model.safetensors"))["model.embed_tokens.weight"]
    b = load_file(str(out / "model.safetensors"))["model.embed_tokens.weight"]
    assert torch.equal(a, b)

    # kept snippets of other inputs (here: another snippet length) are not read; the run samples anew
    monkeypatch.undo()
    _interrupt_after(monkeypatch, 2)
    with pytest.raises(Interrupted):
        run(RunConfig.from_flags(out_path=str(out), overwrite=True, **kw))
    monkeypatch.undo()
    state = torch.load(kept, weights_only=True)
    state["key"]["snippet_len"] = 99
    torch.save(state, kept)
    sampled = []
    real = pipeline.generate_snippets
    monkeypatch.setattr(pipeline, "generate_snippets", lambda *a, **k: sampled.append(1) or real(*a, **k))
    res = run(RunConfig.from_flags(out_path=str(out), resume=True, **kw))
    assert sampled and res.report["loss_curve"] == ref.report["loss_curve"]


def test_generated_snippet_cache_reads_only_its_own_intact_file(tmp_path, caplog):
    """The kept snippets round-trip exactly; another key, no --resume, or a damaged file give None
    (the run samples again) instead of wrong snippets or a traceback."""
    from token_distillation.checkpoint import GENERATED_SNIPPETS_FILE, GeneratedSnippetCache
    from token_distillation.snippets import Snippet, SnippetSet

    snips = SnippetSet(train=[Snippet(np.array([1, 5, 6, 7]), 0, -1, "generated"), Snippet(np.array([1, 9]), 1)],
                       heldout=[Snippet(np.array([1, 2, 3]), 1, 4, "corpus")], train_counts=[1, 1],
                       heldout_counts=[0, 1], train_docs=[3], heldout_docs=[4])
    counts = [(1, 0), (1, 1)]
    key = dict(model="m", tokens=[" a", " b"], snippet_len=3, seed=1, temperature=1.0)
    writer = GeneratedSnippetCache(tmp_path, resume=False, key=key)
    assert writer.attachment() == {} and writer.get(counts) is None
    writer.put(counts, snips)
    torch.save(writer.attachment()[GENERATED_SNIPPETS_FILE], tmp_path / GENERATED_SNIPPETS_FILE)

    back = GeneratedSnippetCache(tmp_path, resume=True, key=key).get(counts)
    assert [(s.ids.tolist(), s.token_index, s.doc, s.source) for s in back.train + back.heldout] == \
        [(s.ids.tolist(), s.token_index, s.doc, s.source) for s in snips.train + snips.heldout]
    assert (back.train_counts, back.heldout_counts, back.train_docs, back.heldout_docs) == ([1, 1], [0, 1], [3], [4])
    assert GeneratedSnippetCache(tmp_path, resume=False, key=key).get(counts) is None
    assert GeneratedSnippetCache(tmp_path, resume=True, key={**key, "seed": 2}).get(counts) is None
    assert GeneratedSnippetCache(tmp_path, resume=True, key=key).get([(2, 0), (1, 1)]) is None
    data = (tmp_path / GENERATED_SNIPPETS_FILE).read_bytes()
    (tmp_path / GENERATED_SNIPPETS_FILE).write_bytes(data[: len(data) // 2])  # cut short
    assert GeneratedSnippetCache(tmp_path, resume=True, key=key).get(counts) is None
    assert "unreadable" in caplog.text


def test_fingerprint_leaves_out_an_optional_item_given_as_none():
    """A run without a word list has no ``words_digest`` in its fingerprint (as checkpoints written
    before it existed), one with a list has it; other items keep a None value."""
    from token_distillation.checkpoint import fingerprint

    assert fingerprint({"seed": 0}, words_digest=None) == {"seed": 0}
    assert fingerprint({"seed": 0}, words_digest="abc") == {"seed": 0, "words_digest": "abc"}
    assert fingerprint({"seed": 0}, snippets=None) == {"seed": 0, "snippets": None}
    assert fingerprint({"seed": 0, "resume": True}) == {"seed": 0}  # resume-free flags are not compared


def test_resume_with_overwrite_on_a_folder_without_checkpoints_says_so(tmp_path, toy_model_dir, toy_corpus, cache_dir,
                                                                      caplog):
    """--resume --overwrite on an earlier output without checkpoints (a dry run's): --overwrite replaces it,
    and the log says that there was nothing to resume (helper-29: it was replaced without a word), and
    that a method that trains nothing never has checkpoints."""
    out = tmp_path / "out"
    run(_toy_cfg(tmp_path, toy_model_dir, toy_corpus, cache_dir, out_path=str(out), dry_run=True))
    assert (out / "coverage.tsv").is_file()
    caplog.set_level(logging.WARNING, logger="token_distillation")
    run(_toy_cfg(tmp_path, toy_model_dir, toy_corpus, cache_dir, out_path=str(out), resume=True, overwrite=True,
                 init_method="subtoken-mean"))
    assert "holds no checkpoints, so there is nothing to resume" in caplog.text
    assert "--init_method subtoken-mean trains no input rows, so this run writes no checkpoints" in caplog.text
    from token_distillation.pipeline import start

    for out_emb, warned in (("ntp", True), ("distill", False)):  # a distill fit checkpoints its token groups
        caplog.clear()
        start(_toy_cfg(tmp_path, toy_model_dir, toy_corpus, cache_dir, out_path=str(tmp_path / out_emb), resume=True,
                       init_method="subtoken-mean", output_embeddings=out_emb))
        assert ("trains no input rows (--output_embeddings ntp trains the output rows again)" in caplog.text) == warned
        assert ("trains no input rows" in caplog.text) == warned
    assert (out / "report.json").is_file() and not (out / "coverage.tsv").exists()


def test_stop_after_training_keeps_the_trained_rows_without_periodic_checkpoints(tmp_path, untied_model_dir, toy_corpus,
                                                                                 cache_dir, monkeypatch):
    """With --checkpoint_minutes 0 and --checkpoint_every 0 a checkpoint is still written when training
    ends, so a stop in the output-row fit keeps the trained input rows as its warning says; the final
    line says where the stop came; --resume does not train again and ends with an uninterrupted run's rows."""
    import signal

    from safetensors.torch import load_file

    from token_distillation import interrupts, output_rows

    kw = dict(token_distillation_epochs=1, checkpoint_every=0, checkpoint_minutes=0, teacher_cache_gib=0,
              output_embeddings="distill")
    ref = run(_toy_cfg(tmp_path, untied_model_dir, toy_corpus, cache_dir, out_path=str(tmp_path / "ref"), **kw))
    real = output_rows.collect_positions

    def stop_at_once(*a, **k):
        interrupts.STOP.signum = signal.SIGINT
        return real(*a, **k)

    out = tmp_path / "out"
    monkeypatch.setattr(output_rows, "collect_positions", stop_at_once)
    with pytest.raises(interrupts.Interrupted) as e:
        run(_toy_cfg(tmp_path, untied_model_dir, toy_corpus, cache_dir, out_path=str(out), **kw))
    monkeypatch.setattr(output_rows, "collect_positions", real)
    assert f"at step {ref.report['train_steps']}; the stop came while training the output rows; rerun" in e.value.message()
    assert list((out / CHECKPOINT_DIRNAME).glob("step-*.pt"))
    steps, real_step = [], Checkpointer.step_done

    def count_steps(self, step, *a, **k):
        steps.append(step)
        return real_step(self, step, *a, **k)

    monkeypatch.setattr(Checkpointer, "step_done", count_steps)
    run(_toy_cfg(tmp_path, untied_model_dir, toy_corpus, cache_dir, out_path=str(out), resume=True, **kw))
    assert steps == []  # no training step again
    a, b = load_file(str(ref.out_path / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in ("lm_head.weight", "model.embed_tokens.weight"))


def test_a_stop_leaves_the_progress_bar_at_the_step_the_stop_line_names(monkeypatch, capsys):
    """Stopped after step 3, the training bar's last count is 3/15, the step the stop line names
    (it showed 2/15: the bar was updated after the stop check)."""
    import signal

    from token_distillation import interrupts
    from token_distillation import train as train_mod

    real = train_mod.check_stop

    def stop_at_3(where="", step=None):
        if step == 3:
            interrupts.STOP.signum = signal.SIGTERM
        try:
            real(where, step)
        finally:
            interrupts.STOP.signum = None

    monkeypatch.setattr(train_mod, "check_stop", stop_at_3)
    model, _, seqs, tix, rows = _setup()
    with pytest.raises(interrupts.Interrupted) as stop:
        _train(rows, seqs, tix, model)
    assert stop.value.step == 3
    bar = capsys.readouterr().err.replace("\r", "\n").strip().splitlines()[-1]
    assert " 3/15 " in bar, bar
