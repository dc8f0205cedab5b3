#!/usr/bin/env python
"""Benchmark accuracy with the new tokens: lm-evaluation-harness on the original model and on each
extended model, one table (the paper's first kind of table; Dobler et al., arXiv 2505.20133).

Every model reads the benchmark through its own tokenizer, so an extended model reads the new tokens
wherever its words occur in a question. Tasks are lm-eval task names (``--tasks``; default: the
biomedical multiple-choice tasks among :data:`DEFAULT_TASKS` that the installed lm-eval provides),
task YAML files in folders given by ``--include_path`` (local data: ``dataset_path: json`` with
``dataset_kwargs: {data_files: ...}``), and, with ``--pubmedqa_dir``, the local task
``pubmedqa_local`` built from PubMedQA's expert-labelled questions (``ori_pqal.json`` and
``test_ground_truth.json``; the 500 test questions are evaluated, the other 500 serve few-shot
examples). Example (offline, bundled model)::

    python scripts/eval_benchmarks.py --model_path smollm2-135m --extended_paths out_td/,out_mean/ \\
        --pubmedqa_dir ../shared/data/pubmedqa --tasks pubmedqa_local --limit 50 --out_dir bench/

Writes into ``--out_dir`` (new, empty or an earlier output of this script): ``benchmarks.md`` (the
table: accuracy per task and the unweighted mean over tasks, per model, with each extended model's
method and settings from its report.json; then the share of benchmark inputs with a new token and
the tokens saved), ``benchmarks.json`` (everything, with lm-eval's per-task results and the
settings) and ``tasks/`` (the local PubMedQA task, when built).

Inputs with a new token: over the evaluated documents of every task, the prompt each document gives
(with its few-shot examples; the answer choices are not counted) is encoded with the original and
with the extended tokenizer (no special tokens); the share of prompts whose extended encoding holds
at least one of the model's new token ids, and the total tokens before and after.

Bad flags end with one ``error:`` line and exit code 2 before any model is loaded.
"""

from __future__ import annotations

import difflib
import json
import logging
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from token_distillation.cli import configure_logging  # noqa: E402
from token_distillation.config import ConfigError  # noqa: E402
from token_distillation.paper_tables import (  # noqa: E402
    Entry, load_entry, markdown_table, read_entries, resolve_dtype, settings_text, split_list,
    write_json, write_text)
from token_distillation.paths import claim_script_dir  # noqa: E402

logger = logging.getLogger("eval_benchmarks")

#: the biomedical multiple-choice tasks the paper's domain implies (those the installed lm-eval has are used)
DEFAULT_TASKS = ("pubmedqa", "medmcqa", "medqa_4options", "mmlu_anatomy", "mmlu_clinical_knowledge",
                 "mmlu_college_biology", "mmlu_college_medicine", "mmlu_medical_genetics",
                 "mmlu_professional_medicine")
#: the local PubMedQA task built by --pubmedqa_dir
LOCAL_PUBMEDQA = "pubmedqa_local"
#: what this script writes at the top level of --out_dir
OUT_ENTRIES = ("benchmarks.json", "benchmarks.md", "tasks/")
#: the prompt of the local PubMedQA task (the abstract without its conclusion, then the question)
PUBMEDQA_PROMPT = "Abstract: {{context}}\nQuestion: {{QUESTION}}\nAnswer:"


def pubmedqa_rows(src: Path) -> tuple[list[dict], list[dict]]:
    """PubMedQA's expert-labelled questions as ``(train, test)`` rows ``{pubid, QUESTION, context,
    final_decision}`` (``context``: the abstract's sections joined by newlines); test: the ids of
    ``test_ground_truth.json`` with its labels, train: the other questions.

    Raises:
        ConfigError: a missing or unreadable file (naming ``--pubmedqa_dir``).
    """
    try:
        questions = json.loads((src / "ori_pqal.json").read_text(encoding="utf-8"))
        truth = json.loads((src / "test_ground_truth.json").read_text(encoding="utf-8"))
        rows = {pid: {"pubid": pid, "QUESTION": q["QUESTION"], "context": "\n".join(q["CONTEXTS"]),
                      "final_decision": truth.get(pid, q["final_decision"])} for pid, q in questions.items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise ConfigError(f"--pubmedqa_dir {src}: needs PubMedQA's ori_pqal.json and test_ground_truth.json "
                          f"(see ../shared/data/pubmedqa/README.md); reading them failed ({e})") from None
    missing = sorted(set(truth) - set(rows))
    if missing:
        raise ConfigError(f"--pubmedqa_dir {src}: test_ground_truth.json names {len(missing)} ids that "
                          f"ori_pqal.json lacks (e.g. {missing[0]})")
    return [r for pid, r in rows.items() if pid not in truth], [rows[pid] for pid in truth]


def write_pubmedqa_task(rows: tuple[list[dict], list[dict]], task_dir: Path) -> Path:
    """Write the local task ``pubmedqa_local``: ``train.jsonl``, ``test.jsonl`` and
    ``pubmedqa_local.yaml`` (lm-eval task YAML over the two files, absolute paths) into ``task_dir``.

    Returns:
        ``task_dir`` (pass it to lm-eval's ``TaskManager(include_path=...)``).
    """
    import yaml

    files = {}
    for split, split_rows in zip(("train", "test"), rows):
        files[split] = str((task_dir / f"{split}.jsonl").resolve())
        write_text(Path(files[split]), "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in split_rows))
    task = {"task": LOCAL_PUBMEDQA, "dataset_path": "json", "dataset_kwargs": {"data_files": files},
            "output_type": "multiple_choice", "training_split": "train", "test_split": "test",
            "fewshot_split": "train", "doc_to_text": PUBMEDQA_PROMPT, "doc_to_target": "final_decision",
            "doc_to_choice": ["yes", "no", "maybe"],
            "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
            "metadata": {"version": 1.0, "source": "PubMedQA PQA-L (Jin et al., 2019), local files"}}
    write_text(task_dir / f"{LOCAL_PUBMEDQA}.yaml", yaml.safe_dump(task, sort_keys=False, allow_unicode=True))
    return task_dir


def _task_manager(include: list[str], defaults: bool = True):
    """lm-eval's task index over the ``include`` folders and, with ``defaults``, lm-eval's own tasks
    (indexing those takes tens of seconds).

    Raises:
        ConfigError: lm-eval is not installed.
    """
    try:
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise ConfigError("lm-eval is not installed; install the project's `eval` extra "
                          "(uv pip install -e '.[eval]')") from None
    return TaskManager(include_path=include or None, include_defaults=defaults)


def known_tasks(tasks, include: list[str], local: bool) -> tuple[set[str], bool]:
    """The task names to check ``--tasks`` against, and whether lm-eval's own tasks are needed
    (not when every named task is in the ``include`` folders or is the local PubMedQA task)."""
    given = set(split_list(tasks))
    names = set(_task_manager(include, defaults=False).all_tasks) if include else set()
    names |= {LOCAL_PUBMEDQA} if local else set()
    if given and given <= names:
        return names, False
    return names | set(_task_manager(include).all_tasks), True


def choose_tasks(tasks, known: set[str], local: bool) -> list[str]:
    """The tasks to run: ``--tasks`` (each must be in ``known``), or the :data:`DEFAULT_TASKS` lm-eval
    has (plus ``pubmedqa_local`` when ``local``).

    Raises:
        ConfigError: an unknown task (with the closest known names), or no task left.
    """
    given = split_list(tasks)
    unknown = [t for t in given if t not in known]
    if unknown:
        hints = [f"{t} (did you mean {', '.join(difflib.get_close_matches(t, sorted(known), n=2)) or '?'})"
                 for t in unknown]
        raise ConfigError(f"--tasks: unknown task(s) {'; '.join(hints)}; pass lm-eval task names, folders of task "
                          "YAML with --include_path, or --pubmedqa_dir for pubmedqa_local")
    chosen = given or [t for t in DEFAULT_TASKS if t in known] + ([LOCAL_PUBMEDQA] if local else [])
    if not chosen:
        raise ConfigError("--tasks: the installed lm-eval has none of the default tasks; pass --tasks")
    return chosen


def check_inputs(*, model_path, extended_paths, labels, tasks, include_path, pubmedqa_dir, num_fewshot, limit,
                 batch_size, metric, dtype, out_dir, original) -> tuple[list[Entry], list[str], list[str], tuple | None,
                                                                        bool]:
    """Check every flag without loading a model.

    Returns:
        ``(entries, tasks, include folders (resolved), PubMedQA rows or None, whether lm-eval's own
        tasks are needed)``.

    Raises:
        ConfigError: the first problem found, naming its flag.
    """
    for flag, value, low in (("num_fewshot", num_fewshot, 0), ("limit", limit, 0), ("batch_size", batch_size, 1)):
        if value < low:
            raise ConfigError(f"--{flag} must be >= {low}, not {value}")
    if not str(out_dir).strip():
        raise ConfigError("--out_dir is empty; pass an output directory")
    if metric not in ("acc", "acc_norm"):
        raise ConfigError(f"--metric: {metric!r} is not shown by this script; choose acc or acc_norm")
    resolve_dtype(dtype)
    include = [str(Path(p).expanduser().resolve()) for p in split_list(include_path)]
    bad = [p for p in include if not Path(p).is_dir()]
    if bad:
        raise ConfigError(f"--include_path: not a folder: {', '.join(bad)}; pass folders of lm-eval task YAML")
    rows = pubmedqa_rows(Path(pubmedqa_dir).expanduser()) if str(pubmedqa_dir).strip() else None
    entries = read_entries(model_path, extended_paths, labels, with_original=original)
    names, defaults = known_tasks(tasks, include, rows is not None)
    return entries, choose_tasks(tasks, names, rows is not None), include, rows, defaults


def run_tasks(model, tokenizer, tasks: list[str], task_manager, *, num_fewshot: int, limit: int, batch_size: int,
              seed: int) -> dict:
    """lm-eval's ``simple_evaluate`` on a loaded model (lm-eval's HF wrapper around the object).

    Returns:
        lm-eval's result dictionary (``results``, ``n-samples``, ``samples``, ...).
    """
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    return simple_evaluate(model=lm, tasks=tasks, num_fewshot=num_fewshot or None, limit=limit or None,
                           task_manager=task_manager, log_samples=True, bootstrap_iters=1000, random_seed=seed,
                           numpy_random_seed=seed, torch_random_seed=seed, fewshot_random_seed=seed)


def input_stats(samples: dict[str, list[dict]], orig_tok, ext_tok, new_ids: list[int]) -> dict:
    """How often the extended tokenizer uses a new token on the benchmark prompts, and the tokens saved.

    Args:
        samples: lm-eval's ``samples`` (task -> per-document records whose ``arguments`` are
            ``(context, continuation)`` pairs).
        new_ids: the extended model's new token ids.

    Returns:
        ``{"inputs", "inputs_with_new_token", "share_with_new_token", "tokens_original",
        "tokens_extended", "tokens_saved", "per_task": {task: the same counts}}``.
    """
    new = set(new_ids)
    per_task = {}
    for task, recs in samples.items():
        prompts = [r["arguments"][0][0] for r in recs]
        before = [len(orig_tok(p, add_special_tokens=False).input_ids) for p in prompts]
        after = [ext_tok(p, add_special_tokens=False).input_ids for p in prompts]
        per_task[task] = _counts(len(prompts), sum(bool(new & set(a)) for a in after), sum(before),
                                 sum(len(a) for a in after))
    total = _counts(*(sum(c[k] for c in per_task.values()) for k in ("inputs", "inputs_with_new_token",
                                                                     "tokens_original", "tokens_extended")))
    return dict(total, per_task=per_task)


def _counts(inputs: int, with_new: int, before: int, after: int) -> dict:
    return {"inputs": inputs, "inputs_with_new_token": with_new,
            "share_with_new_token": with_new / inputs if inputs else None, "tokens_original": before,
            "tokens_extended": after, "tokens_saved": before - after}


def accuracy_rows(entries: list[Entry], results: dict, tasks: list[str], metric: str) -> list[list]:
    """One row per model: label, method, settings, accuracy (%) per task, mean over tasks."""
    rows = []
    for e in entries:
        accs = [results[e.label]["results"].get(t, {}).get(f"{metric},none") for t in tasks]
        vals = [a for a in accs if a is not None]
        pct = [None if a is None else 100.0 * a for a in accs]
        rows.append([e.label, e.method, settings_text(e)] + pct + [100.0 * sum(vals) / len(vals) if vals else None])
    return rows


def render(entries: list[Entry], results: dict, stats: dict, tasks: list[str], setup: dict) -> str:
    """``benchmarks.md``: the accuracy table and the new-token table."""
    acc = markdown_table(["model", "method", "settings"] + tasks + ["mean"],
                         accuracy_rows(entries, results, tasks, setup["metric"]))
    new = markdown_table(["model", "inputs", "inputs with a new token", "share (%)", "tokens original",
                          "tokens extended", "tokens saved"],
                         [[lab, s["inputs"], s["inputs_with_new_token"],
                           None if s["share_with_new_token"] is None else 100.0 * s["share_with_new_token"],
                           s["tokens_original"], s["tokens_extended"], s["tokens_saved"]] for lab, s in stats.items()])
    limit = f"the first {setup['limit']} documents of each task" if setup["limit"] else "all test documents"
    return (f"# Benchmark accuracy with the new tokens\n\nWritten by `scripts/eval_benchmarks.py` on "
            f"{setup['created']}. Original model: `{setup['model_path']}`; lm-eval {setup['lm_eval_version']}, "
            f"{setup['num_fewshot']}-shot, {limit}, metric `{setup['metric']}` (%), mean: unweighted over tasks.\n\n"
            f"{acc}\n## Benchmark inputs with a new token\n\nPrompts of the evaluated documents (with few-shot "
            f"examples, without answer choices) encoded by the original and by each extended tokenizer.\n\n{new}")


def main(model_path: str = "smollm2-135m", extended_paths: str = "", labels: str = "", tasks: str = "",
         include_path: str = "", pubmedqa_dir: str = "", num_fewshot: int = 0, limit: int = 0, batch_size: int = 8,
         metric: str = "acc", device: str = "auto", dtype: str = "float32", seed: int = 1234, cache_dir: str = "",
         out_dir: str = "outputs/benchmarks", original: bool = True) -> str:
    """Run the benchmarks on every model and write the table; returns the path of benchmarks.md.

    Args:
        model_path: the original model (hub id, directory, .gguf file or bundled alias).
        extended_paths: comma-separated output directories of apply_embedding_init.py.
        labels: comma-separated row names, one per extended directory (default: each run's init_method).
        tasks: comma-separated lm-eval task names (default: the biomedical tasks lm-eval has).
        include_path: comma-separated folders of lm-eval task YAML (local tasks).
        pubmedqa_dir: folder with PubMedQA's ori_pqal.json and test_ground_truth.json: adds pubmedqa_local.
        num_fewshot: few-shot examples per question (0: lm-eval's task default, zero-shot for these tasks).
        limit: evaluate only the first N documents of each task (0: all).
        batch_size: lm-eval batch size.
        metric: the lm-eval metric shown in the table (acc or acc_norm).
        original: also evaluate the original model (``--nooriginal`` skips it).
        out_dir: new, empty, or an earlier output of this script.

    Raises:
        ConfigError: bad flags (before any model is loaded).
    """
    entries, chosen, folders, rows, defaults = check_inputs(
        model_path=model_path, extended_paths=extended_paths, labels=labels, tasks=tasks, include_path=include_path,
        pubmedqa_dir=pubmedqa_dir, num_fewshot=num_fewshot, limit=limit, batch_size=batch_size, dtype=dtype,
        metric=metric, out_dir=out_dir, original=original)
    out = claim_script_dir(out_dir, "eval_benchmarks.py", OUT_ENTRIES)
    if rows is not None:
        folders.append(str(write_pubmedqa_task(rows, out / "tasks" / LOCAL_PUBMEDQA)))
    t0 = time.perf_counter()
    setup = _setup(model_path, chosen, num_fewshot, limit, batch_size, metric, device, dtype, seed, folders)
    results, stats = evaluate_all(entries, chosen, _task_manager(folders, defaults), setup, cache_dir)
    setup["total_seconds"] = time.perf_counter() - t0
    write_json(out / "benchmarks.json", {"setup": setup, "models": [_entry_record(e) for e in entries],
                                         "results": {k: _json_safe(v) for k, v in results.items()},
                                         "new_token_inputs": stats})
    write_text(out / "benchmarks.md", render(entries, results, stats, chosen, setup))
    logger.info("wrote %s", out / "benchmarks.md")
    return str(out / "benchmarks.md")


def evaluate_all(entries: list[Entry], tasks: list[str], task_manager, setup: dict, cache_dir: str):
    """Run every model; returns ``(lm-eval results per label, new-token statistics per extended label)``."""
    import gc

    from token_distillation.models import default_cache_root, load_tokenizer, resolve_model_source
    from token_distillation.pipeline import resolve_device

    device, dtype = resolve_device(setup["device"]), resolve_dtype(setup["dtype"])
    cache_root = Path(cache_dir).expanduser() if cache_dir else default_cache_root()
    from token_distillation.evaluate import evaluated_words

    orig_tok = load_tokenizer(resolve_model_source(setup["model_path"]), cache_root)
    # every extended model must come from --model_path (its words' subtokens agree), before any model loads
    evaluated_words(setup["model_path"], [e.extended for e in entries if e.extended is not None], orig_tok)
    results, stats = {}, {}
    for e in entries:
        t = time.perf_counter()
        model, tok = load_entry(e, setup["model_path"], device, dtype, cache_root)
        res = run_tasks(model, tok, tasks, task_manager, num_fewshot=setup["num_fewshot"], limit=setup["limit"],
                        batch_size=setup["batch_size"], seed=setup["seed"])
        if e.extended is not None:
            stats[e.label] = input_stats(res["samples"], orig_tok, tok, e.extended.new_ids)
        results[e.label] = {"results": res["results"], "n-samples": res.get("n-samples", {}),
                            "seconds": time.perf_counter() - t}
        logger.info("%s: %s (%.0f s)", e.label, {k: v.get(f"{setup['metric']},none") for k, v in res["results"].items()},
                    results[e.label]["seconds"])
        del model, res
        gc.collect()
    return results, stats


def _setup(model_path, tasks, num_fewshot, limit, batch_size, metric, device, dtype, seed, folders) -> dict:
    import importlib.metadata

    return {"model_path": model_path, "tasks": tasks, "num_fewshot": num_fewshot, "limit": limit,
            "batch_size": batch_size, "metric": metric, "device": device, "dtype": dtype, "seed": seed,
            "include_path": folders, "lm_eval_version": importlib.metadata.version("lm-eval"),
            "created": time.strftime("%Y-%m-%d %H:%M %Z"), "command": " ".join(sys.argv)}


def _entry_record(e: Entry) -> dict:
    return {"label": e.label, "path": None if e.path is None else str(e.path), "method": e.method,
            "settings": e.settings}


def _json_safe(obj):
    """Round-trip through JSON with non-JSON values as text (lm-eval results may hold numpy values)."""
    return json.loads(json.dumps(obj, default=str))


if __name__ == "__main__":
    import inspect

    from token_distillation.cli import exit_on_user_error, run_fire

    configure_logging()
    run_fire(exit_on_user_error(main), set(inspect.signature(main).parameters), None, "eval_benchmarks.py")
