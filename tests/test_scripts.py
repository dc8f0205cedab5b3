"""The SLURM batch scripts run unchanged without SLURM when started with bash."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _bash(script, *args, env=None, timeout=600):
    e = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    e.update(PYTHON=sys.executable, **(env or {}))
    return subprocess.run(["bash", str(ROOT / "scripts" / script), *args], cwd=ROOT, env=e, capture_output=True,
                          text=True, timeout=timeout)


def test_scripts_are_valid_bash():
    for s in ("slurm_single_gpu.sh", "slurm_multi_gpu.sh", "slurm_grid.sh"):
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
    words.write_text(" hepatotoxicity\n nephrotoxicity\n")
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


def test_benchmark_step_mode_smoke(tmp_path):
    """The benchmark runs end to end on a tiny random shape and reports consistent figures."""
    sys.path.insert(0, str(ROOT / "scripts"))
    import benchmark

    out = tmp_path / "bench.json"
    benchmark.main(["--shape", "tiny", "--steps", "2", "--num_new", "8", "--batch_size", "4", "--target_layer", "2",
                    "--out", str(out)])
    res = json.loads(out.read_text())
    assert res["flop_ratio"] > 1 and res["flop_ratio_teacher_cached"] > res["flop_ratio"]
    assert res["product"]["trainable_params"] == 8 * 64
    assert res["comparator"]["trainable_params"] == (2048 + 8) * 64
    assert res["product"]["optimizer_state_bytes"] < res["comparator"]["optimizer_state_bytes"]
    held = res["heldout_loss"]
    assert abs(held["product"] - held["comparator"]) <= 0.05 * held["comparator"]
    for key in ("comparator", "product", "product_teacher_cached"):
        assert res[key]["snippets_per_s"] > 0 and res[key]["mfu"] > 0
    assert res["product_half_cached"]["snippets_per_s"] > 0 and res["speedup_half_cached"] > 0


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
    with pytest.raises(SystemExit, match="--dataset_path"):
        sweep_lr.main(out_dir=str(tmp_path / "new"))
