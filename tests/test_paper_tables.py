"""scripts/eval_benchmarks.py and scripts/judge_definitions.py (the paper's two tables) offline:
a local lm-eval task over PubMedQA's expert-labelled questions on the bundled model and an extended
model, and definitions judged by the bundled instruct model (its verdicts are not meaningful; the
test checks the table and the records, not the numbers)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import IN_CI, SHARED

ROOT = Path(__file__).resolve().parents[1]
PUBMEDQA = SHARED.parent / "pubmedqa"
#: words split by SmolLM2's tokenizer that occur in the first PubMedQA test questions' abstracts
WORDS = [" anorectal", " sublingual", " hematocrit", " defecation", " pharmacokinetic"]


def _script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _require_pubmedqa() -> Path:
    if not (PUBMEDQA / "ori_pqal.json").is_file():
        if IN_CI:
            pytest.fail(f"PubMedQA missing in CI: {PUBMEDQA}")
        pytest.skip(f"PubMedQA not available at {PUBMEDQA}")
    return PUBMEDQA


@pytest.fixture(scope="module")
def extended_dir(tmp_path_factory):
    """The bundled SmolLM2 extended by the tool with the 5 words (subtoken mean: no training), its
    snippets mined from the PubMedQA abstracts that hold one of the words (fewer to tokenize)."""
    from token_distillation.config import RunConfig
    from token_distillation.pipeline import run

    src = _require_pubmedqa()
    d = tmp_path_factory.mktemp("paper_tables")
    questions = json.loads((src / "ori_pqal.json").read_text())
    with open(d / "corpus.jsonl", "w") as f:
        for pid, q in questions.items():
            text = "\n".join(q["CONTEXTS"]) + "\n" + q["LONG_ANSWER"]
            if any(w in text for w in WORDS):
                f.write(json.dumps({"id": pid, "text": text}) + "\n")
    (d / "words.txt").write_text("".join(w + "\n" for w in WORDS))
    res = run(RunConfig.from_flags(model_path="smollm2-135m", new_tokens_source=str(d / "words.txt"),
                                   dataset_path=str(d / "corpus.jsonl"), out_path=str(d / "ext"),
                                   init_method="subtoken-mean", snippet_num=2, heldout_snippet_num=1, min_snippets=1,
                                   device="cpu"))
    assert [t["token"] for t in res.report["tokens"]] == WORDS
    return res.out_path


def test_benchmarks_local_pubmedqa(tmp_path, extended_dir):
    """The local PubMedQA task on the original and the extended model: one table with both rows, the
    accuracy of each, and the share of inputs the extended tokenizer encodes with a new token."""
    mod = _script("eval_benchmarks")
    md = mod.main(model_path="smollm2-135m", extended_paths=str(extended_dir), labels="mean",
                  pubmedqa_dir=str(PUBMEDQA), tasks="pubmedqa_local", limit=3, batch_size=4, device="cpu",
                  out_dir=str(tmp_path / "bench"))
    res = json.loads((tmp_path / "bench" / "benchmarks.json").read_text())
    assert [m["label"] for m in res["models"]] == ["original", "mean"]
    assert res["models"][1]["method"] == "subtoken-mean" and res["models"][1]["settings"]["tokens"] == 5
    for label in ("original", "mean"):
        acc = res["results"][label]["results"]["pubmedqa_local"]["acc,none"]
        assert 0.0 <= acc <= 1.0 and res["results"][label]["n-samples"]["pubmedqa_local"]["effective"] == 3
    stats = res["new_token_inputs"]["mean"]
    assert stats["inputs"] == 3 and stats["inputs_with_new_token"] >= 2  # the first three abstracts hold 3 words
    assert stats["tokens_saved"] > 0 and stats["tokens_extended"] < stats["tokens_original"]
    table = Path(md).read_text()
    assert "| original | original tokenization |" in table and "| mean | subtoken-mean |" in table
    assert "pubmedqa_local" in table and "inputs with a new token" in table
    rows = [json.loads(x) for x in (tmp_path / "bench" / "tasks" / "pubmedqa_local" / "test.jsonl").open()]
    assert len(rows) == 500 and {r["final_decision"] for r in rows} == {"yes", "no", "maybe"}


def test_judge_bundled_instruct_model(tmp_path, extended_dir):
    """The bundled instruct model judges the definitions of 5 words: a table row per model and a
    record per word with every definition, the raw answers and the parsed verdicts."""
    mod = _script("judge_definitions")
    md = mod.main(model_path="smollm2-135m", extended_paths=str(extended_dir), labels="mean",
                  judge_model="smollm2-135m", max_words=5, definition_tokens=16, device="cpu",
                  out_dir=str(tmp_path / "judge"))
    res = json.loads((tmp_path / "judge" / "judgements.json").read_text())
    records = [json.loads(x) for x in (tmp_path / "judge" / "records.jsonl").open()]
    assert [r["word"] for r in records] == WORDS
    for r in records:
        assert set(r["definitions"]) == {"original", "mean"}
        assert set(r["judge"]["original"]) == {"correct"} and set(r["judge"]["mean"]) == {"similar", "correct"}
        for verdicts in r["judge"].values():
            for v in verdicts.values():
                assert v["verdict"] == mod.parse_verdict(v["answer"])
    table = {row["label"]: row for row in res["table"]}
    assert table["original"]["similar_pct"] is None and table["original"]["definitions"] == 5
    assert 0.0 <= table["mean"]["similar_pct"] <= 100.0 and 0.0 <= table["mean"]["correct_pct"] <= 100.0
    setup = res["setup"]
    assert setup["judge_model"] == "smollm2-135m" and setup["judge_backend"] == "transformers"
    assert setup["prompts"]["similar"] == mod.SIMILAR_PROMPT and setup["temperature"] == 0.0
    assert "| mean | subtoken-mean |" in Path(md).read_text()


@pytest.mark.parametrize("answer, verdict", [
    ("Yes.", "yes"), (" no, it is not", "no"), ("YES", "yes"), ("**No**", "no"), ("Yesterday", "undecided"),
    ("The answer is yes", "undecided"), ("", "undecided"), ("Noun", "undecided")])
def test_parse_verdict(answer, verdict):
    assert _script("judge_definitions").parse_verdict(answer) == verdict


@pytest.mark.parametrize("script, flags, named", [
    ("eval_benchmarks.py", ["--limit", "-1"], "--limit"),
    ("eval_benchmarks.py", ["--extended_paths", "/nonexistent/run"], "--extended_paths"),
    ("judge_definitions.py", ["--extended_paths", "/nonexistent/run"], "--judge_model"),
    ("judge_definitions.py", ["--judge_model", "smollm2-135m", "--judge_backend", "gpu"], "--judge_backend"),
])
def test_bad_flags_exit_2(tmp_path, script, flags, named):
    """Bad input: one error line naming the flag, exit code 2, nothing written."""
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / script), *flags, "--out_dir", str(tmp_path / "o")],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and r.stderr.startswith("error:") and named in r.stderr, r.stderr[-2000:]
    assert not (tmp_path / "o").exists()


def test_out_dir_of_another_kind_is_refused(tmp_path, extended_dir):
    """A non-empty --out_dir that is not this script's earlier output is refused before any model loads."""
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "notes.txt").write_text("mine")
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "judge_definitions.py"), "--extended_paths",
                        str(extended_dir), "--judge_model", "smollm2-135m", "--out_dir", str(tmp_path / "o")],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "notes.txt" in r.stderr and (tmp_path / "o" / "notes.txt").read_text() == "mine"


def test_slurm_paper_tables_passes_finished_runs(tmp_path):
    """scripts/slurm_paper_tables.sh tables: per model, both scripts on the original model and its
    finished grid runs, labelled by method (and learning rate); PYTHON=echo prints the commands."""
    import os

    for run in ("subtoken-mean", "token_distillation_lr1e-4"):
        (tmp_path / "runs" / "m1" / run).mkdir(parents=True)
        (tmp_path / "runs" / "m1" / run / "report.json").write_text("{}")
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(PYTHON="echo", MODELS="m1", INIT_METHODS="subtoken-mean token_distillation", LRS="1e-4 1e-3",
               RESULTS_DIR=str(tmp_path), TASKS="pubmedqa_local", PUBMEDQA_DIR="pqa", JUDGE_MODEL="judge/x")
    r = subprocess.run(["bash", str(ROOT / "scripts" / "slurm_paper_tables.sh"), "tables"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    runs = f"{tmp_path}/runs/m1/subtoken-mean,{tmp_path}/runs/m1/token_distillation_lr1e-4"
    bench, judge = [ln for ln in r.stdout.splitlines() if ln.startswith("scripts/")]
    assert bench.startswith("scripts/eval_benchmarks.py --model_path m1 --extended_paths " + runs)
    assert "--labels subtoken-mean,token_distillation_lr1e-4" in bench and "--pubmedqa_dir pqa" in bench
    assert judge.startswith("scripts/judge_definitions.py --model_path m1") and "--judge_model judge/x" in judge
    assert f"--out_dir {tmp_path}/tables/m1/judge" in judge
    assert subprocess.run(["bash", str(ROOT / "scripts" / "slurm_paper_tables.sh"), "nonsense"],
                          capture_output=True).returncode == 2


def test_include_path_finds_local_task_yaml(tmp_path):
    """A folder of the user's own lm-eval task YAML (local files) is searched for --tasks; lm-eval's own
    task library is not indexed when every named task is local, and an unknown task is refused."""
    import yaml

    from token_distillation.config import ConfigError

    mod = _script("eval_benchmarks")
    (tmp_path / "data.jsonl").write_text(json.dumps({"q": "Is it?", "a": "yes"}) + "\n")
    (tmp_path / "my_task.yaml").write_text(yaml.safe_dump({
        "task": "my_local_task", "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(tmp_path / "data.jsonl")}}, "test_split": "test",
        "output_type": "multiple_choice", "doc_to_text": "{{q}}", "doc_to_target": "a", "doc_to_choice": ["yes", "no"],
        "metric_list": [{"metric": "acc"}]}))
    names, defaults = mod.known_tasks("my_local_task", [str(tmp_path)], local=True)
    assert {"my_local_task", "pubmedqa_local"} <= names and defaults is False
    assert mod.choose_tasks("my_local_task,pubmedqa_local", names, True) == ["my_local_task", "pubmedqa_local"]
    with pytest.raises(ConfigError, match="my_local_tsk"):
        mod.choose_tasks("my_local_tsk", names, True)


def test_benchmarks_refuse_extended_models_of_another_model(tmp_path, extended_dir):
    """A SmolLM2 run benchmarked against --model_path gemma3-270m: one error line naming the mismatch,
    before lm-eval runs (the trial got a table pairing Gemma's original row with the SmolLM2 run)."""
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "eval_benchmarks.py"), "--model_path", "gemma3-270m",
                        "--extended_paths", str(extended_dir), "--pubmedqa_dir", str(PUBMEDQA),
                        "--tasks", "pubmedqa_local", "--limit", "2", "--out_dir", str(tmp_path / "o")],
                       cwd=ROOT, capture_output=True, text=True, timeout=600)
    lines = r.stderr.strip().splitlines()
    first = next((i for i, ln in enumerate(lines) if ln.startswith("error:")), None)
    assert r.returncode == 2 and first is not None and "made from another model" in lines[first], r.stderr[-2000:]
    # one problem per line, every one after the first aligned under it, and nothing after them
    assert all(ln.startswith("       --extended_paths") for ln in lines[first + 1:]), r.stderr[-2000:]
    assert not (tmp_path / "o" / "benchmarks.md").exists()
