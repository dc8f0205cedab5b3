"""The SLURM batch scripts run unchanged without SLURM when started with bash."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def _bash(script, *args, env=None, timeout=600):
    e = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    e.update(PYTHON=sys.executable, **(env or {}))
    return subprocess.run(["bash", str(ROOT / "scripts" / script), *args], cwd=ROOT, env=e, capture_output=True,
                          text=True, timeout=timeout)


def test_scripts_are_valid_bash():
    for s in ("slurm_single_gpu.sh", "slurm_multi_gpu.sh", "slurm_multi_node.sh", "slurm_grid.sh"):
        r = subprocess.run(["bash", "-n", str(ROOT / "scripts" / s)], capture_output=True, text=True)
        assert r.returncode == 0, (s, r.stderr)


def test_grid_list_skips_lr_for_untrained_methods():
    r = _bash("slurm_grid.sh", "list", env=dict(MODELS="m1 org/m2", INIT_METHODS="random token_distillation",
                                                LRS="1e-4 1e-3", RESULTS_DIR="R"))
    assert r.returncode == 0, r.stderr
    lines = [ln.split("\t") for ln in r.stdout.strip().splitlines()]
    assert [ln[:4] for ln in lines] == [
        ["0", "m1", "random", "-"], ["1", "m1", "token_distillation", "1e-4"], ["2", "m1", "token_distillation", "1e-3"],
        ["3", "org/m2", "random", "-"], ["4", "org/m2", "token_distillation", "1e-4"],
        ["5", "org/m2", "token_distillation", "1e-3"]]
    assert lines[5][4] == "R/runs/m2/token_distillation_lr1e-3"
    assert _bash("slurm_grid.sh", "nonsense").returncode == 2


def test_grid_runs_tasks_then_evaluation_without_slurm(tmp_path, toy_model_dir, toy_corpus, cache_dir):
    words = tmp_path / "words.txt"
    words.write_text(" hepatotoxicity\n nephrotoxicity\n zzqqxx\n")  # zzqqxx: no snippet, skipped by training
    env = dict(MODELS=str(toy_model_dir), INIT_METHODS="subtoken-mean token_distillation", LRS="1e-2",
               NEW_TOKENS=str(words), DATASET_PATH=str(toy_corpus), RESULTS_DIR=str(tmp_path / "grid"),
               SNIPPET_NUM="4", SNIPPET_LEN="12", BATCH_SIZE="4", CHECKPOINT_EVERY="1",
               EXTRA_ARGS=f"--min_snippets 2 --heldout_snippet_num 2 --device cpu --cache_dir {cache_dir}")
    one = _bash("slurm_grid.sh", env={**env, "SLURM_ARRAY_TASK_ID": "1"})  # as one array task would
    assert one.returncode == 0, one.stderr[-3000:]
    r = _bash("slurm_grid.sh", env=env)  # no task id: all tasks in turn (task 1 is done), then evaluate
    assert r.returncode == 0, r.stderr[-3000:]
    assert "task 1: already done" in r.stdout
    assert ("evaluation skipped" in r.stdout) or ("evaluate " in r.stdout)
    runs = tmp_path / "grid" / "runs" / toy_model_dir.name
    rep = json.loads((runs / "token_distillation_lr1e-2" / "report.json").read_text())
    assert rep["train_steps"] == 2 and rep["config"]["token_distillation_lr"] == 1e-2
    assert not (runs / "token_distillation_lr1e-2" / "checkpoints").exists()
    summary = (tmp_path / "grid" / "summary.tsv").read_text().strip().splitlines()
    assert len(summary) == 3 and summary[0].startswith("model\tinit_method\tlr")


def test_readme_results_match_the_generated_files():
    """The README's results block is what scripts/update_readme_results.py renders from the
    committed benchmark and sweep files (no number typed by hand, none stale)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("update_readme_results", ROOT / "scripts" / "update_readme_results.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    readme = (ROOT / "README.md").read_text()
    assert mod.START in readme and mod.END in readme
    assert mod.render(readme) == readme, "run: python scripts/update_readme_results.py"


def test_generated_docs_are_fresh():
    """docs/results.md and docs/flags.md are what scripts/update_readme_results.py renders from the
    committed results files and the flag definitions (a new or changed flag makes this fail)."""
    mod = _readme_script()
    assert (ROOT / "docs" / "results.md").read_text() == mod.results_page(), "run: python scripts/update_readme_results.py"
    assert (ROOT / "docs" / "flags.md").read_text() == mod.flags_page(), "run: python scripts/update_readme_results.py"


def test_readme_is_short_and_links_resolve():
    """The README stays under 200 lines, and every relative link in it and in docs/ points at a file."""
    import re

    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) < 200
    for page in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text()):
            if "://" in target:
                continue
            assert (page.parent / target).exists(), f"{page.name}: broken link {target}"


def _readme_script():
    import importlib.util

    spec = importlib.util.spec_from_file_location("update_readme_results", ROOT / "scripts" / "update_readme_results.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_summary_keeps_the_newest_sweep_per_model_and_word_count():
    mod = _readme_script()

    def sweep(created, gap, source, words=24, model="m"):
        rows = [{"words": words, "method": "d", "gap_closed_orig": gap},
                {"words": words, "method": "paper", "gap_closed_orig": gap / 2}]
        return {"model_path": model, "created": created, "rows": rows, "source": source}

    rows = mod.summary_rows([sweep("2026-11-29 20:00 UTC", 0.9, "new"), sweep("2026-11-29 10:00 UTC", 0.5, "old"),
                             sweep("2026-11-29 09:00 UTC", 0.7, "other", words=500)], "d")
    assert [(r[0], r[1], r[4]) for r in rows] == [("m", 24, "new"), ("m", 500, "other")]
    assert rows[0][2]["gap_closed_orig"] == 0.9 and rows[0][3]["gap_closed_orig"] == 0.45
    assert mod.summary_rows([sweep("x", 0.9, "new")], "other-label") == []
    # a newer sweep without the paper recipe borrows the paper row of an older sweep of the same words;
    # the one-epoch row comes from the default's own sweep
    newer = {"model_path": "m", "created": "2026-12-03 05:00 UTC", "source": "newest",
             "rows": [{"words": 24, "method": "per-token-0.05-e2", "gap_closed_orig": 0.8},
                      {"words": 24, "method": "per-token-0.05-e1", "gap_closed_orig": 0.7}]}
    older = dict(sweep("2026-11-29 20:00 UTC", 0.9, "new"))
    older["rows"] = older["rows"] + [{"words": 24, "method": "per-token-0.05-e2", "gap_closed_orig": 0.6}]
    (row,) = mod.summary_rows([older, newer], "per-token-0.05-e2")
    assert row[4] == "newest" and row[2]["gap_closed_orig"] == 0.8 and row[3]["gap_closed_orig"] == 0.45
    assert row[6]["gap_closed_orig"] == 0.7
    # the borrowed paper row keeps its own sweep's date, so a pre-fix paper figure is marked in the table
    assert row[3]["created"] == "2026-11-29 20:00 UTC"


@pytest.mark.parametrize("alignment", ["chars", "ids"])
def test_benchmark_step_mode_smoke(tmp_path, alignment):
    """The benchmark runs end to end on mined snippets with a tiny random shape and reports
    consistent figures: the comparator and the product train the same rows (equal held-out loss),
    grouping by position lengthens the shared prefix, the FLOP ratios order as the work does; with
    either alignment of a run."""
    from tests.conftest import require_shared

    corpus = require_shared() / "abstracts_small.jsonl"
    sys.path.insert(0, str(ROOT / "scripts"))
    import benchmark

    out = tmp_path / "bench.json"
    benchmark.main(["--shape", "tiny", "--steps", "2", "--num_words", "12", "--batch_size", "4",
                    "--target_layers=-1,2", "--dataset_path", str(corpus), "--out", str(out),
                    "--alignment", alignment])
    res = json.loads(out.read_text())
    sn = res["snippets"]
    assert res["alignment"] == alignment
    assert sn["words"] == 12 and sn["train_snippets"] > 12 and sn["first_new_token_position_mean"] > 1
    assert sn["shared_prefix_mean"]["grouped"] >= sn["shared_prefix_mean"]["ungrouped"]
    assert [r["layer"] for r in res["by_layer"]] == [3, 2]
    assert res["trainable_params"]["product"] == 12 * 64
    for r in res["by_layer"]:
        held = r["heldout_loss"]
        assert abs(held["product"] - held["comparator"]) <= 1e-4 * held["comparator"]
        assert 1 < r["product"]["flop_ratio"] < r["product_teacher_cached"]["flop_ratio"]
        for key in ("comparator", "product", "product_ungrouped", "product_no_prefix", "product_teacher_cached"):
            assert r[key]["snippets_per_s"] > 0 and r[key]["mfu"] > 0
        assert r["product"]["seconds_per_1000_tokens"] > 0


def test_sweep_render_draws_the_paper_recipe_on_both_panels(tmp_path):
    """sweep.md marks a run whose time counts only the steps after a resume; sweep.png has one
    dashed paper-recipe line per word count on each panel, in that word count's colour."""
    sys.path.insert(0, str(ROOT / "scripts"))
    import sweep_lr

    def row(words, method, lr, ep, gap, seconds=10.0, from_step=0):
        return {"words": words, "method": method, "lr_relative": lr, "epochs": ep, "excess_nll_orig": 1 - gap,
                "excess_nll_full": 1 - gap, "gap_closed_orig": gap, "gap_closed_full": gap - 0.01,
                "new_token_argmax_rate": 0.0, "train_seconds": seconds, "train_seconds_from_step": from_step}

    rows = [row(n, m, lr, ep, g) for n in (10, 50) for m, lr, ep, g in
            (("subtoken-mean", None, None, 0.0), ("per-token-0.05-e1", 0.05, 1, 0.7),
             ("per-token-0.1-e1", 0.1, 1, 0.8), ("per-token-0.05-e2", 0.05, 2, 0.85))]
    rows.append(row(10, "paper", None, None, 0.3, seconds=412.4, from_step=650))
    rows.append(row(50, "paper", None, None, 0.4))
    (tmp_path / "sweep.json").write_text(json.dumps({"command": "c", "created": "t", "model_path": "m",
                                                     "dataset_path": "d", "rows": rows}))
    assert sweep_lr.main(out_dir=str(tmp_path), render_only=True) == str(tmp_path / "sweep.json")
    fig = sweep_lr.render(tmp_path)
    md = (tmp_path / "sweep.md").read_text()
    assert "| 10 | paper |" in md and "| 412 (from step 650) |" in md and "| 10.0000 |" not in md
    assert (tmp_path / "sweep.png").stat().st_size > 0
    for ax, key in zip(fig.axes, ("gap_closed_orig", "gap_closed_full")):
        dashed = [ln for ln in ax.lines if ln.get_linestyle() == "--"]
        assert sorted(round(ln.get_ydata()[0], 6) for ln in dashed) == sorted(
            round(100 * r[key], 6) for r in rows if r["method"] == "paper")
        for n in (10, 50):
            solid = {ln.get_color() for ln in ax.lines if ln.get_label().startswith(f"{n} words, ") and ln.get_linestyle() != "--"}
            paper = {ln.get_color() for ln in dashed if ln.get_label() == f"{n} words, paper recipe"}
            assert len(solid) == 1 and paper == solid
    from token_distillation.config import ConfigError

    with pytest.raises(ConfigError, match="--dataset_path"):
        sweep_lr.main(out_dir=str(tmp_path / "new"))
    assert not (tmp_path / "new").exists()


# ---------------------------------------------------------------------------------------------
# Bad input to the scripts ends like the main tool: exit code 2 and one "error:" line on stderr,
# before any model is loaded or any output directory is created.


def _py(script, *args, timeout=300):
    return subprocess.run([sys.executable, str(ROOT / "scripts" / script), *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)


def _one_error(r, *needles):
    """Exit code 2, stderr exactly one line starting with "error:" (which contains ``needles``)."""
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and "Traceback" not in r.stderr, (r.returncode, r.stderr[-3000:])
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr[-3000:]
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


def _argparse_error(r):
    """argparse's own errors: exit code 2, a usage line and one "error:" line, no traceback."""
    assert r.returncode == 2 and "Traceback" not in r.stderr, (r.returncode, r.stderr[-3000:])
    assert r.stderr.startswith("usage:") and sum("error:" in ln for ln in r.stderr.splitlines()) == 1, r.stderr


@pytest.fixture
def fake_model(tmp_path):
    """A directory that passes the --model_path check (config.json) but holds no weights: a test that
    got past the input checks would fail loading it."""
    d = tmp_path / "fake_model"
    d.mkdir()
    (d / "config.json").write_text('{"model_type": "llama"}')
    return d


@pytest.fixture
def words(tmp_path):
    p = tmp_path / "words.txt"
    p.write_text(" hepatotoxicity\n nephrotoxicity\n angiogenesis\n")
    return p


@pytest.fixture
def user_dir(tmp_path):
    """A non-empty directory of a user's files."""
    d = tmp_path / "mine"
    (d / "sub").mkdir(parents=True)
    (d / "notes.txt").write_text("keep me")
    (d / "sub" / "data.csv").write_text("1,2")
    return d


def _unchanged(user_dir):
    assert sorted(p.relative_to(user_dir).as_posix() for p in user_dir.rglob("*")) == ["notes.txt", "sub",
                                                                                     "sub/data.csv"]
    assert (user_dir / "notes.txt").read_text() == "keep me"


def test_sweep_lr_bad_input(tmp_path, toy_corpus, words, fake_model, user_dir):
    base = {"--dataset_path": toy_corpus, "--token_list": words, "--model_path": fake_model, "--word_counts": "2"}

    def with_(**kw):  # the base flags, some replaced (a flag given twice is refused)
        return [x for kv in {**base, **{f"--{k}": v for k, v in kw.items()}}.items() for x in kv]

    ok = with_()
    _one_error(_py("sweep_lr.py", "--out_dir"), "--out_dir", "needs a value")
    _one_error(_py("sweep_lr.py", *with_(word_counts="abc"), "--out_dir", tmp_path / "a"), "--word_counts", "'abc'")
    _one_error(_py("sweep_lr.py", *with_(word_counts="0"), "--out_dir", tmp_path / "a"), "--word_counts")
    _one_error(_py("sweep_lr.py", *with_(word_counts="10"), "--out_dir", tmp_path / "a"), "--token_list", "fewer")
    _one_error(_py("sweep_lr.py", *ok, "--lr_relative", "0.1,fast", "--out_dir", tmp_path / "a"), "--lr_relative")
    _one_error(_py("sweep_lr.py", *ok, "--windows_per_token", "1.5", "--out_dir", tmp_path / "a"),
               "--windows_per_token", "integer")
    _one_error(_py("sweep_lr.py", *ok, "--common_flags", "{nope", "--out_dir", tmp_path / "a"), "--common_flags")
    _one_error(_py("sweep_lr.py", *ok, "--common_flags", '{"snipet_num": 3}', "--out_dir", tmp_path / "a"),
               "--snipet_num")
    _one_error(_py("sweep_lr.py", *ok, "--out_dri", tmp_path / "a"), "--out_dri", "did you mean --out_dir")
    _one_error(_py("sweep_lr.py", *with_(model_path=tmp_path / "no_model"), "--out_dir", tmp_path / "a"),
               "--model_path")
    _one_error(_py("sweep_lr.py", "--dataset_path", tmp_path / "missing.jsonl", "--token_list", words,
                   "--out_dir", tmp_path / "a"), "--dataset_path", "missing.jsonl")
    _one_error(_py("sweep_lr.py", "--render_only", "--out_dir", tmp_path / "a"), "sweep.json")
    assert not (tmp_path / "a").exists()  # no input error creates the output directory
    _one_error(_py("sweep_lr.py", *ok, "--out_dir", user_dir), "notes.txt", "sub/")
    _unchanged(user_dir)
    assert "--overwrite" not in _py("sweep_lr.py", *ok, "--out_dir", user_dir).stderr


def test_compare_methods_bad_input(tmp_path, toy_corpus, words, fake_model, user_dir):
    ok = ["--dataset_path", toy_corpus, "--new_tokens_source", words, "--model_path", fake_model]
    _one_error(_py("compare_methods.py"), "--dataset_path", "required")
    _one_error(_py("compare_methods.py", "--dataset_path"), "--dataset_path", "needs a value")
    _one_error(_py("compare_methods.py", *ok, "--out_dir"), "--out_dir", "needs a value")
    _one_error(_py("compare_methods.py", *ok, "--heldout_fraction", "abc", "--out_dir", tmp_path / "a"),
               "--heldout_fraction")
    _one_error(_py("compare_methods.py", *ok, "--heldout_fraction", "1.5", "--out_dir", tmp_path / "a"),
               "--heldout_fraction")
    _one_error(_py("compare_methods.py", *ok, "--windows_per_token", "0", "--out_dir", tmp_path / "a"),
               "--windows_per_token")
    _one_error(_py("compare_methods.py", *ok, "--methods", "../up=random", "--out_dir", tmp_path / "a"), "label")
    _one_error(_py("compare_methods.py", *ok, "--common_flags", '{"out_path": "x"}', "--out_dir", tmp_path / "a"),
               "--common_flags", "--out_path")
    _one_error(_py("compare_methods.py", *ok, "--text_column", "body", "--out_dir", tmp_path / "a"), "--text_column")
    _one_error(_py("compare_methods.py", *ok, "--docs_md", tmp_path, "--out_dir", tmp_path / "a"), "--docs_md")
    # a user's page, a file of another kind, or a figure beside a new page are never replaced
    notes = tmp_path / "notes.md"
    notes.write_text("my notes\n")
    (tmp_path / "fig.png").write_bytes(b"png")
    _one_error(_py("compare_methods.py", *ok, "--docs_md", notes, "--out_dir", tmp_path / "a"), "--docs_md",
               "not a page of this script")
    _one_error(_py("compare_methods.py", *ok, "--docs_md", tmp_path / "script.py", "--out_dir", tmp_path / "a"),
               "--docs_md", "pass a .md file")
    _one_error(_py("compare_methods.py", *ok, "--docs_md", tmp_path / "fig.md", "--out_dir", tmp_path / "a"),
               "--docs_md", "fig.png exists beside it")
    assert notes.read_text() == "my notes\n" and (tmp_path / "fig.png").read_bytes() == b"png"
    _one_error(_py("compare_methods.py", *ok, "--docs_md", "/proc/page.md", "--out_dir", tmp_path / "a"),
               "--docs_md", "cannot write in /proc")
    _one_error(_py("compare_methods.py", *ok, "--mehtods", "random"), "--mehtods", "did you mean --methods")
    _one_error(_py("compare_methods.py", *ok, "--reuse_runs", "maybe", "--out_dir", tmp_path / "a"), "--reuse_runs")
    _one_error(_py("compare_methods.py", "--dataset_path", tmp_path / "missing.jsonl", "--out_dir", tmp_path / "a"),
               "--dataset_path", "missing.jsonl")
    assert not (tmp_path / "a").exists()
    r = _py("compare_methods.py", *ok, "--out_dir", user_dir)
    _one_error(r, "--out_dir", "notes.txt", "sub/")
    assert "--overwrite" not in r.stderr
    _unchanged(user_dir)


def test_methods_table_bad_input(tmp_path, toy_corpus, fake_model, user_dir):
    ok = ["run", "--dataset_path", toy_corpus, "--model_path", fake_model]
    _argparse_error(_py("methods_table.py", "run", "--out_dir"))
    _argparse_error(_py("methods_table.py", "run", "--words", "abc"))
    _argparse_error(_py("methods_table.py", "run", "--wrods", "3"))
    _one_error(_py("methods_table.py", *ok, "--words", "0", "--out_dir", tmp_path / "a"), "--words")
    _one_error(_py("methods_table.py", *ok, "--words", "1000", "--out_dir", tmp_path / "a"), "--words")
    _one_error(_py("methods_table.py", *ok, "--snippet_num", "0", "--out_dir", tmp_path / "a"), "--snippet_num")
    _one_error(_py("methods_table.py", *ok, "--only", "nope", "--out_dir", tmp_path / "a"), "--only", "nope")
    _one_error(_py("methods_table.py", *ok, "--markdown", tmp_path, "--out_dir", tmp_path / "a"), "--markdown")
    _one_error(_py("methods_table.py", "run", "--dataset_path", tmp_path / "missing.jsonl", "--model_path", fake_model,
                   "--out_dir", tmp_path / "a"), "--dataset_path", "missing.jsonl")
    _one_error(_py("methods_table.py", *ok, "--model_path", tmp_path / "no_model", "--out_dir", tmp_path / "a"),
               "--model_path")
    assert not (tmp_path / "a").exists()
    r = _py("methods_table.py", *ok, "--out_dir", user_dir)
    _one_error(r, "--out_dir", "notes.txt", "sub/")
    assert "--overwrite" not in r.stderr
    _unchanged(user_dir)
    _one_error(_py("methods_table.py", "table", "--out_dir", tmp_path / "a"), "report.json")
    (user_dir / "random").mkdir()
    (user_dir / "random" / "report.json").write_text("{broken")
    _one_error(_py("methods_table.py", "table", "--out_dir", user_dir), "report.json")


def test_other_scripts_bad_input(tmp_path, toy_corpus, fake_model):
    _one_error(_py("mine_wordlist.py", "--out", tmp_path / "w.txt"), "--dataset_path")
    _one_error(_py("mine_wordlist.py", "--dataset_path", tmp_path / "missing.jsonl", "--out", tmp_path / "w.txt"),
               "missing.jsonl")
    _one_error(_py("mine_wordlist.py", "--dataset_path", toy_corpus, "--out"), "--out", "needs a value")
    _one_error(_py("mine_wordlist.py", "--dataset_path", toy_corpus, "--out", tmp_path), "--out", "directory")
    _one_error(_py("mine_wordlist.py", "--dataset_path", toy_corpus, "--out", tmp_path / "w.txt", "--num_words", "x"),
               "--num_words")
    _one_error(_py("mine_wordlist.py", "--dataset_pth", toy_corpus), "did you mean --dataset_path")
    assert not (tmp_path / "w.txt").exists()
    _one_error(_py("benchmark.py", "--shape", "tiny", "--steps", "0"), "--steps")
    _one_error(_py("benchmark.py", "--shape", "tiny", "--out", tmp_path), "--out")  # (each run imports torch)
    _one_error(_py("benchmark.py", "--mode", "mining", "--dataset_path", tmp_path / "missing.jsonl"), "missing.jsonl")
    _one_error(_py("draw_method_figure.py", "--out_dir", toy_corpus), "--out_dir", "is a file")
    _argparse_error(_py("draw_method_figure.py", "--out_dir"))
    _argparse_error(_py("update_readme_results.py", "--out", "x"))  # takes no flags; README.md untouched


def test_claim_script_dir(tmp_path):
    """A script's output directory: new, empty or its own earlier output (marker); nothing else."""
    from token_distillation.config import ConfigError
    from token_distillation.paths import SCRIPT_MARKER, claim_script_dir

    out = tmp_path / "out"
    assert claim_script_dir(out, "a.py", ["runs/", "x.json"]) == out.resolve()
    marker = json.loads((out / SCRIPT_MARKER).read_text())
    assert marker["script"] == "a.py" and marker["entries"] == ["runs/", "x.json"]
    (out / "runs").mkdir()
    (out / "x.json").write_text("{}")
    (out / ".x.json.tmp-123").write_text("")  # left by an interrupted write
    claim_script_dir(out, "a.py", ["y.txt"])  # a rerun with other entries keeps the earlier ones
    assert json.loads((out / SCRIPT_MARKER).read_text())["entries"] == ["runs/", "x.json", "y.txt"]
    with pytest.raises(ConfigError, match="b.py"):
        claim_script_dir(out, "b.py", ["runs/"])
    (out / "x.json").unlink()
    (out / "x.json").mkdir()  # a directory where the script writes a file is not its own
    with pytest.raises(ConfigError, match=r"x\.json/"):
        claim_script_dir(out, "a.py", ["runs/", "x.json"])
    (out / "x.json").rmdir()
    (out / "z.txt").write_text("u")  # a user's file where a rerun would write: not the script's
    with pytest.raises(ConfigError, match="z.txt"):
        claim_script_dir(out, "a.py", ["z.txt"])
    (out / "z.txt").unlink()
    (out / "user.txt").write_text("u")
    with pytest.raises(ConfigError, match="user.txt") as e:
        claim_script_dir(out, "a.py", ["runs/"])
    assert "--overwrite" not in str(e.value)
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "runs").mkdir()  # same names, but no marker: a user's directory
    with pytest.raises(ConfigError, match="runs/"):
        claim_script_dir(tmp_path / "plain", "a.py", ["runs/"])
    assert not (tmp_path / "plain" / SCRIPT_MARKER).exists()
    with pytest.raises(ConfigError, match="is a file"):
        claim_script_dir(out / "user.txt", "a.py", [])
    with pytest.raises(ConfigError, match="empty"):
        claim_script_dir("", "a.py", [])
    empty = tmp_path / "empty"
    empty.mkdir()
    claim_script_dir(empty, "a.py", ["runs/"])
    assert (empty / SCRIPT_MARKER).is_file()


def test_replace_file_leaves_no_partial_file(tmp_path):
    from token_distillation.config import ConfigError
    from token_distillation.paths import replace_file

    p = tmp_path / "README.md"
    p.write_text("old")

    def fail(tmp):
        tmp.write_text("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        replace_file(p, fail)
    assert p.read_text() == "old" and sorted(x.name for x in tmp_path.iterdir()) == ["README.md"]
    replace_file(p, lambda tmp: tmp.write_text("new"))
    assert p.read_text() == "new" and sorted(x.name for x in tmp_path.iterdir()) == ["README.md"]
    with pytest.raises(ConfigError, match="--markdown"):
        replace_file(tmp_path, flag="--markdown")
    with pytest.raises(ConfigError, match="is a file"):
        replace_file(p / "x.md")


@pytest.mark.parametrize("sig, forward, code", [("USR1", "", 138), ("TERM", "", 143), ("USR1", "TERM", 143)])
def test_slurm_shell_forwards_stop_signals(sig, forward, code, tmp_path):
    """scripts/common.sh run_with_signals: SLURM's --signal=B:USR1@60 reaches only the batch shell;
    the shell passes it (or SIGTERM) on to the tool, whose exit code it returns."""
    import signal as sg
    import time

    child = tmp_path / "child.py"
    child.write_text(
        "import signal, sys, time, pathlib\n"
        "def stop(signum, frame):\n"
        "    pathlib.Path(sys.argv[1]).write_text(signal.Signals(signum).name)\n"
        "    sys.exit(128 + signum)\n"
        "signal.signal(signal.SIGUSR1, stop); signal.signal(signal.SIGTERM, stop)\n"
        "pathlib.Path(sys.argv[1] + '.ready').write_text('ready')\n"
        "time.sleep(60)\n")
    got = tmp_path / "got"
    env = {k: v for k, v in os.environ.items() if k != "SLURM_JOB_ID"}
    env.update(REPO_DIR=str(ROOT), FORWARD_AS=forward) if forward else env.update(REPO_DIR=str(ROOT))
    script = f'source scripts/common.sh; run_with_signals {sys.executable} {child} {got}; echo "rc=$?"'
    p = subprocess.Popen(["bash", "-c", script], cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True)
    deadline = time.time() + 30
    while not Path(str(got) + ".ready").exists():
        assert time.time() < deadline and p.poll() is None
        time.sleep(0.05)
    p.send_signal(getattr(sg, "SIG" + sig))
    out, _ = p.communicate(timeout=30)
    assert f"rc={code}" in out and got.read_text() == "SIG" + (forward or sig)


def test_gpu_check_cpu_smoke_reports_speed_and_memory_beside_the_plan(tmp_path, smollm_tokenizer):
    """scripts/gpu_check.py's code path on a tiny shape on CPU (--cpu_smoke): random bf16 checkpoint
    with the real SmolLM2 tokenizer, made-up words in a synthetic corpus, the whole pipeline; the
    result names the extrapolation and puts the measured peak beside the plan; the work directory
    is emptied."""
    out, work = tmp_path / "gpu_check.json", tmp_path / "work"
    work.mkdir()  # an empty directory of the user's: kept, emptied of what the check wrote
    r = _py("gpu_check.py", "--cpu_smoke", "--work_dir", work, "--out", out, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["tokens_trained"] == 3 and res["train_snippets_per_token"] == 4 and res["train_steps"] > 0
    assert res["train_seconds_per_1000_tokens_extrapolated"] == pytest.approx(res["train_seconds"] * 1000 / 3)
    assert res["plan"]["memory"] == "host" and res["plan_gib"] > 0 and res["peak_rss_gib"] > 0
    assert "extrapolated linearly from 3 tokens" in r.stdout and "memory plan" in r.stdout
    # a bf16 source comes back bf16 from a run that computed in fp32 (read from the saved headers)
    assert set(res["tensor_dtypes"]["source"]) == {"BF16"} and set(res["tensor_dtypes"]["saved"]) == {"BF16"}
    # the tiny shape is tied: one matrix in the source; the run unties it (distilled output rows), so one more
    assert res["tensor_dtypes"]["saved"]["BF16"] == res["tensor_dtypes"]["source"]["BF16"] + 1
    assert work.is_dir() and not any(work.iterdir())


def test_gpu_check_without_cuda_stops_before_building(tmp_path):
    """No CUDA device (this machine) and no --cpu_smoke: one error line and exit code 2 through the
    bash wrapper, before anything is built or written. Bad flags are refused the same way."""
    import torch

    from token_distillation.config import ConfigError

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    r = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh")], cwd=ROOT, capture_output=True, text=True,
                       timeout=300, env=dict(os.environ, PYTHON=sys.executable, OUT=str(tmp_path / "o.json"),
                                             WORK_DIR=str(tmp_path / "w")))
    _one_error(r, "no CUDA device", "--cpu_smoke")
    assert not (tmp_path / "w").exists() and not (tmp_path / "o.json").exists()
    sys.path.insert(0, str(ROOT / "scripts"))
    import gpu_check

    for args, needle in ((["--cpu_smoke", "--batch_size", "big"], "--batch_size"),
                         (["--cpu_smoke", "--snippets", "0"], "--snippets"),
                         (["--cpu_smoke", "--target_layer", "9"], "--target_layer")):
        with pytest.raises(ConfigError, match=needle):
            gpu_check.main(args)


def test_multi_node_script_runs_token_sharded_without_slurm(tmp_path, toy_model_dir, toy_corpus, cache_dir):
    # no SLURM: one node, 2 CPU processes; BATCH_SIZE=5 need not divide over them (tokens are sharded)
    words = tmp_path / "words.txt"
    words.write_text(" hepatotoxicity\n nephrotoxicity\n angiogenesis\n")
    out = tmp_path / "mn"
    env = dict(MODEL_PATH=str(toy_model_dir), NEW_TOKENS=str(words), DATASET_PATH=str(toy_corpus), OUT_PATH=str(out),
               NPROC="2", SNIPPET_NUM="4", SNIPPET_LEN="12", BATCH_SIZE="5", EPOCHS="1", OMP_NUM_THREADS="1",
               EXTRA_ARGS=f"--min_snippets 2 --heldout_snippet_num 2 --device cpu --cache_dir {cache_dir}")
    r = _bash("slurm_multi_node.sh", env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    rep = json.loads((out / "report.json").read_text())
    assert rep["processes"] == 2 and rep["distributed"]["mode"] == "token-sharded"
    assert rep["config"]["process_group_timeout_minutes"] == 60


def test_raw_text_rows_from_an_evaluation(tmp_path, monkeypatch):
    """The raw-text table's numbers are computed from evaluation.json (BPB relative to the original,
    token saving, gaps closed), one row per method."""
    mod = _readme_script()
    d = tmp_path / "m"
    d.mkdir()
    orig = {"bpb": 1.0, "tokens_per_byte": 0.25, "docs": 3, "tokens": 100, "bits": 400.0}
    res = {"setup": {"model_path": "m", "words": 2}, "bpb_original": orig, "inflected_original": {"bpb": 2.0, "docs": 4},
           "bpb_reference": "mean",
           "methods": {"mean": {"bpb": {"bpb": 1.1, "tokens_per_byte": 0.24, "gap_closed": 0.0},
                                "inflected": {"bpb": 2.2, "gap_closed": 0.0}, "excess_nll_orig": 0.2, "generation": None},
                       "td_chars": {"bpb": {"bpb": 1.05, "tokens_per_byte": 0.24, "gap_closed": 0.5},
                                    "inflected": {"bpb": 2.1, "gap_closed": 0.5}, "excess_nll_orig": 0.05,
                                    "generation": {"word_share": 0.0}},
                       "td_chars_outdistill": {"bpb": {"bpb": 1.01, "tokens_per_byte": 0.24, "gap_closed": 0.9,
                                                       "excess_split": {"at_words": 10.0, "new_mass": 4.0, "rest": 6.0,
                                                                        "floor_bits": 5.0, "uses": 5}},
                                               "inflected": {"bpb": 2.02, "gap_closed": 0.9}, "excess_nll_orig": 0.05,
                                               "generation": {"word_share": 0.75}}}}
    (d / "evaluation.json").write_text(json.dumps(res))
    monkeypatch.setattr(mod, "RAW_TEXT", tmp_path)
    monkeypatch.setattr(mod, "ROOT", tmp_path)
    rows = {label: r for _, _, label, r in mod._raw_text_rows()}
    assert rows["td_chars"]["bpb_rel"] == pytest.approx(0.05) and rows["td_chars"]["continuation_gap"] == pytest.approx(0.75)
    assert rows["mean"]["fewer_tokens"] == pytest.approx(0.04) and rows["td_chars"]["inflected_rel"] == pytest.approx(0.05)
    text = "\n".join(mod.raw_text_readme())
    assert "+5.00%" in text and "+1.00%" in text and "(4 windows, small) 50% -> 90%" in text and "0% -> 75%" in text
    # 0.04 x 100 / 5 = 0.8 tokens saved per use, 4 bits per token: 5% fewer tokens costs 5% x 1.0 / 3.2 at the floor
    assert "+2.00 bits per use of a new token at the words" in text and "against 2.80 paid by the output rows" in text
    assert "(0.8 tokens saved per use)" in text and "about 1.56% in bits per byte" in text
    table = "\n".join(mod.raw_text_section())
    assert "| +2.00 / +0.80 / +1.20 (1.00) |" in table and table.count("| - |") >= 2  # per use; no split: -


def test_swap_output_rows_equals_a_run_with_those_output_rows(tmp_path, toy_model_dir, toy_corpus, cache_dir):
    """A distill run with the subtoken-mean run's new output rows is bit-identical to the Token
    Distillation run with --output_embeddings subtoken-mean (input rows do not depend on the output
    policy); the copy says where its rows came from; an existing --out_dir is refused. The other way,
    refit_output_rows.py on the subtoken-mean-output run gives the distill run bit for bit."""
    from safetensors.torch import load_file

    from token_distillation.config import RunConfig
    from token_distillation.pipeline import run

    words = tmp_path / "w.txt"
    words.write_text(" hepatotoxicity\n nephrotoxicity\n zzqqxx\n")  # zzqqxx: no snippet, skipped by training
    flags = dict(model_path=str(toy_model_dir), dataset_path=str(toy_corpus), cache_dir=str(cache_dir),
                 new_tokens_source=str(words), snippet_num=6, min_snippets=2, heldout_snippet_num=2,
                 heldout_fraction=0.25, token_distillation_batch_size=4, token_distillation_lr=1e-2, snippet_len=12)
    outs = {}
    for label, init, out_emb in (("td", "token_distillation", "distill"), ("td_sm", "token_distillation", "subtoken-mean"),
                                 ("sm", "subtoken-mean", "subtoken-mean")):
        outs[label] = run(RunConfig.from_flags(**flags, init_method=init, output_embeddings=out_emb,
                                               out_path=str(tmp_path / label))).out_path
    sys.path.insert(0, str(ROOT / "scripts"))
    import swap_output_rows

    got = swap_output_rows.main(str(outs["td"]), str(outs["sm"]), str(tmp_path / "swapped"))
    a, b, d = (load_file(p / "model.safetensors") for p in (got, outs["td_sm"], outs["td"]))
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["lm_head.weight"], d["lm_head.weight"])  # the distilled rows were replaced
    rep = json.loads((got / "report.json").read_text())
    assert rep["output_rows_swapped_from"] == {"run": str(outs["sm"]), "output_embeddings": "subtoken-mean"}
    assert rep["model"]["output_embeddings"] == "subtoken-mean" and "output_rows_kl" not in rep
    assert " zzqqxx" in json.loads((outs["td"] / "report.json").read_text())["skipped_tokens"]
    _one_error(_py("swap_output_rows.py", "--rows_from", outs["td"], "--output_rows_from", outs["sm"],
                   "--out_dir", got), "--out_dir")

    # refit_output_rows: the run with subtoken-mean output rows, refitted, is the distill run
    import refit_output_rows

    refit = refit_output_rows.main(str(outs["td_sm"]), str(tmp_path / "refit"))
    a, d = (load_file(p / "model.safetensors") for p in (refit, outs["td"]))
    assert set(a) == set(d) and all(torch.equal(a[k], d[k]) for k in a)
    rep = json.loads((refit / "report.json").read_text())
    assert rep["input_rows_from"] == str(outs["td_sm"]) and rep["model"]["output_embeddings"] == "distill"
    assert rep["output_rows_kl"] == json.loads((outs["td"] / "report.json").read_text())["output_rows_kl"]
    _one_error(_py("refit_output_rows.py", "--run_dir", outs["td_sm"], "--out_dir", refit), "--out_dir")
    _one_error(_py("refit_output_rows.py", "--run_dir", tmp_path, "--out_dir", tmp_path / "x"), "--run_dir")
    _one_error(_py("refit_output_rows.py", "--run_dir", outs["sm"], "--out_dir", tmp_path / "x"), "trains no input rows")
    # its --help lists only --run_dir / --out_dir: an unknown flag points to the flags it takes (helper-36)
    _one_error(_py("refit_output_rows.py", "--run_dir", outs["sm"], "--out_dir", tmp_path / "x", "--batchsize", "4"),
               "flags of apply_embedding_init.py (see its --help)")
    from token_distillation.config import ConfigError

    dry = tmp_path / "dry"  # a --dry_run's output has report.json and new_tokens.jsonl but no model (helper-36)
    dry.mkdir()
    (dry / "report.json").write_text(json.dumps({"dry_run": True, "config": {}}))
    (dry / "new_tokens.jsonl").write_text("")
    with pytest.raises(ConfigError, match="output of a --dry_run"):
        refit_output_rows.main(str(dry), str(tmp_path / "y"))
    for flag, value in (("snippet_num", 6), ("seed", 1), ("alignment", "ids")):  # the snippets the rows were trained on
        with pytest.raises(ConfigError, match=f"--{flag}: a flag that picks"):
            refit_output_rows.main(str(outs["td_sm"]), str(tmp_path / "y"), **{flag: value})
    # flags it would ignore (a trial, 2026-12-06): --out_path (it writes --out_dir), other output rows
    with pytest.raises(ConfigError, match="--out_path: the refit writes to --out_dir"):
        refit_output_rows.main(str(outs["td_sm"]), str(tmp_path / "y"), out_path=str(tmp_path / "z"))
    with pytest.raises(ConfigError, match="--output_embeddings tied: the refit fits distilled output rows"):
        refit_output_rows.main(str(outs["td_sm"]), str(tmp_path / "y"), output_embeddings="tied")
    assert not (tmp_path / "y").exists() and not (tmp_path / "z").exists()
