"""Whole runs under hostile input and hostile timing (issue 20): random word lists either train or
end with one ``error:`` line; ``kill -9`` at random moments never loses data."""

import json
import random
import subprocess
import time
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.test_data_safety import _toy_cli_args
from tests.test_pipeline import _toy_cfg
from token_distillation.config import ConfigError
from token_distillation.paths import CHECKPOINT_DIRNAME, foreign_entries, read_manifest, recover_interrupted
from token_distillation.pipeline import run

ROOT = Path(__file__).resolve().parents[1]

_plain = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), min_size=0, max_size=12)
_word = st.one_of(
    _plain,
    _plain.map(lambda w: " " + w),                        # leading space: a word-initial token
    _plain.map(lambda w: w + st_choice_ws(w)),             # trailing whitespace
    st.sampled_from([" hepatotoxicity", " nephrotoxicity", "angiogenesis", " the"]),
    st.sampled_from(["Ġhepatotoxicity", "▁angiogenesis", "Ġ", "▁", "<bos>", "<pad>"]),  # marker and special forms
    _plain.map(lambda w: (w or "x") * 40),                 # very long
)


def st_choice_ws(w: str) -> str:
    return " \t "[len(w) % 3:][:1 + len(w) % 2]


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                  HealthCheck.too_slow])
@given(words=st.lists(_word, min_size=0, max_size=8), as_json=st.booleans())
def test_any_word_list_trains_or_gives_one_error_line(words, as_json, tmp_path_factory, toy_model_dir, toy_corpus,
                                                      cache_dir):
    tmp = tmp_path_factory.mktemp("wl")
    words = words + [" hepatotoxicity"] if len(words) % 2 else words  # about half the lists can train
    if as_json:
        path = tmp / "words.json"
        path.write_text(json.dumps({"words": words}), encoding="utf-8")
    else:
        words = [w for w in words if not set(w) & {"\n", "\r"} and "\x85" not in w
                 and "\u2028" not in w and "\u2029" not in w]
        path = tmp / "words.txt"
        path.write_text("".join(w + "\n" for w in words), encoding="utf-8")
    try:
        cfg = _toy_cfg(tmp, toy_model_dir, toy_corpus, cache_dir, new_tokens_source=str(path),
                       stopping_condition="max_steps", max_steps=2)
        res = run(cfg)
    except ConfigError as e:
        assert "\n" not in str(e) and str(e).strip(), repr(str(e))
        return
    report = json.loads((res.out_path / "report.json").read_text())
    assert report["tokens"] and report["train_steps"] == 2


def _complete(out: Path) -> bool:
    """``out`` is a complete output of this tool: its manifest lists every file, all present."""
    m = read_manifest(out)
    return m is not None and all((out / f).is_file() for f in m["files"]) and foreign_entries(out) == []


def test_kill_9_at_random_moments_loses_nothing(tmp_path, toy_model_dir, toy_corpus, cache_dir):
    """10 kills (-9) at random moments of a run (start-up, mining, training with checkpoints, saving),
    one in each tenth of 0.2-1.1 times an uninterrupted run's time (stratified: the phases are all hit
    with half the kills of 20 uniform draws): each leaves no output, the previous complete output, or
    this tool's checkpoints; the same command with --resume --overwrite then goes on, and a last
    uninterrupted run finishes."""
    out = tmp_path / "out"
    args = _toy_cli_args(tmp_path, toy_model_dir, toy_corpus, cache_dir, out, "--token_distillation_epochs", "30",
                         "--checkpoint_every", "5", "--resume", "--overwrite")
    t0 = time.time()
    first = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr[-3000:]
    full = time.time() - t0
    assert _complete(out)
    rng = random.Random(20)
    states = set()
    for k in range(10):
        proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep((0.2 + 0.09 * (k + rng.random())) * full)
        proc.kill()
        proc.wait()
        if not out.exists():  # killed between the two renames of the save: the next start restores it
            recover_interrupted(out)
        if not out.exists() or not any(out.iterdir()):
            states.add("nothing")
        elif read_manifest(out) is not None:
            assert _complete(out), sorted(p.name for p in out.iterdir())  # + this run's checkpoints, if any
            states.add("complete")
        else:  # only this tool's checkpoints of an interrupted run
            assert [p.name for p in out.iterdir()] == [CHECKPOINT_DIRNAME] and foreign_entries(out) == []
            states.add("checkpoints")
    last = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert last.returncode == 0, last.stderr[-3000:]
    assert _complete(out) and not (out / CHECKPOINT_DIRNAME).exists()
    assert json.loads((out / "report.json").read_text())["train_steps"] > 0
    assert "complete" in states  # the random moments covered at least the finished-output state
