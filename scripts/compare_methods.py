#!/usr/bin/env python
"""Run several init methods on one model, one token list and one corpus, then evaluate them together.

1. The corpus (a JSON Lines file) is split by document (seeded) into ``<out_dir>/data/train.jsonl``
   and ``<out_dir>/data/heldout.jsonl``; documents without an ``id`` get their line number as id.
2. ``apply_embedding_init.py``'s pipeline runs once per method on ``train.jsonl``
   (``<out_dir>/runs/<label>``), timed.
3. ``token_distillation.evaluate`` compares all runs with the original model on ``heldout.jsonl``
   (training documents listed in each report are excluded again) and writes
   ``<out_dir>/eval/evaluation.{json,md,png}``.
4. With ``--docs_md``, a page with the date, model, corpus, exact command, runtimes, the tables and
   the figure is written (the figure next to it as ``<stem>.png``).

Every flag is checked before anything is written or loaded (bad input: one ``error:`` line, exit
code 2). ``--out_dir`` must be new, empty or an earlier output of this script (recognised by the
marker file ``token_distillation_script.json`` it writes there); a directory holding other files is
refused.

Methods are ``[label=]init_method`` entries; ``--method_flags`` adds flags per label and
``--common_flags`` flags for every run, both as JSON objects, e.g.::

    python scripts/compare_methods.py --new_tokens_source new_tokens/biomedical_pubmed60.txt \\
        --dataset_path ../shared/data/pubmed_abstracts/abstracts.jsonl \\
        --methods token_distillation,subtoken-mean,random,td-lr0.1=token_distillation \\
        --method_flags '{"td-lr0.1": {"token_distillation_lr_relative": 0.1}}' \\
        --common_flags '{"snippet_num": 25}' --out_dir outputs/compare --docs_md docs/evaluation.md
"""

from __future__ import annotations

import json
import logging
import os
import platform
import random
import shlex
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from token_distillation.cli import configure_logging  # noqa: E402
from token_distillation.config import ConfigError, RunConfig  # noqa: E402
from token_distillation.paths import check_writable, claim_script_dir, only_checkpoints, replace_file  # noqa: E402

logger = logging.getLogger("compare_methods")

#: what this script writes at the top level of --out_dir
OUT_ENTRIES = ("data/", "runs/", "eval/")
#: run flags that this script sets itself (not allowed in --common_flags / --method_flags)
RESERVED_FLAGS = ("out_path", "dataset_path")


def split_corpus(src: Path, out: Path, heldout_fraction: float, seed: int, text_column: str,
                 max_docs: int = 0) -> tuple[Path, Path, int, int]:
    """Seeded document-level split of a JSON Lines corpus into train.jsonl and heldout.jsonl."""
    from token_distillation.corpus import iter_jsonl

    rows = []
    for n, obj in iter_jsonl(src):
        obj.setdefault("id", str(n - 1))  # 0-based line number, as before
        rows.append({"id": str(obj["id"]), text_column: obj.get(text_column) or ""})
        if max_docs and len(rows) >= max_docs:
            break
    if not rows:
        raise ConfigError(f"--dataset_path {src}: no documents")
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    n_held = int(round(len(rows) * heldout_fraction))
    if not 0 < n_held < len(rows):
        raise ConfigError(f"--heldout_fraction {heldout_fraction} of {len(rows)} documents leaves no "
                          f"{'held-out' if n_held == 0 else 'training'} document; pass a larger corpus or another "
                          "fraction")
    held, train = sorted(order[:n_held]), sorted(order[n_held:])
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, idx in (("train.jsonl", train), ("heldout.jsonl", held)):
        p = out / name
        tmp = p.with_suffix(".tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            for i in idx:
                f.write(json.dumps(rows[i], ensure_ascii=False) + "\n")
        if p.is_file() and p.read_bytes() == tmp.read_bytes():
            tmp.unlink()  # unchanged: keep the file (and its mtime, so the tokenized-corpus cache stays valid)
        else:
            os.replace(tmp, p)
        paths.append(p)
    assert not {rows[i]["id"] for i in train} & {rows[i]["id"] for i in held}
    return paths[0], paths[1], len(train), len(held)


def _parse_json(value, flag: str) -> dict:
    if isinstance(value, dict):
        return value
    if not value:
        return {}
    try:
        obj = json.loads(value)
    except json.JSONDecodeError as e:
        raise ConfigError(f"--{flag}: not valid JSON ({e})") from None
    if not isinstance(obj, dict):
        raise ConfigError(f"--{flag}: expected a JSON object")
    return obj


def parse_methods(methods) -> list[tuple[str, str]]:
    """``[label=]init_method`` entries as ``(label, method)`` pairs (Fire passes "a,b" as a tuple).

    Raises:
        ConfigError: no entry, an entry without a method, a label that is not a plain directory
            name (it names ``<out_dir>/runs/<label>``), or a repeated label.
    """
    if isinstance(methods, (list, tuple)):
        methods = ",".join(str(m) for m in methods)
    specs = []
    for entry in [m.strip() for m in str(methods).split(",") if m.strip()]:
        label, _, method = entry.rpartition("=")
        label, method = (label or method).strip(), method.strip()
        if not method:
            raise ConfigError(f"--methods: {entry!r} names no init method (use label=init_method)")
        if label in (".", "..") or label.startswith(".") or "/" in label or "\\" in label:
            raise ConfigError(f"--methods: label {label!r} is not a plain directory name (it names "
                              "<out_dir>/runs/<label>); use letters, digits, '-' and '_'")
        specs.append((label, method))
    if not specs:
        raise ConfigError("--methods is empty; pass comma-separated [label=]init_method entries")
    if len({lab for lab, _ in specs}) != len(specs):
        raise ConfigError("--methods: labels must be unique (use label=method)")
    return specs


def check_inputs(*, dataset_path, new_tokens_source, model_path, methods, method_flags, common_flags,
                 heldout_fraction, max_docs, text_column, seed, out_dir, windows_per_token, window_len,
                 definition_tokens, device, docs_md) -> tuple[list[tuple[str, str]], dict[str, dict], Path]:
    """Check every flag of :func:`main` without writing or loading anything (the model source is
    resolved, the corpus's first record read).

    Returns:
        ``(specs, run_flags, corpus)``: the ``(label, method)`` pairs, each label's
        apply_embedding_init.py flags (before ``dataset_path`` is set to the training split), and the
        corpus path.

    Raises:
        ConfigError: the first problem found, naming its flag.
    """
    from token_distillation.config import CorpusConfig
    from token_distillation.corpus import check_text_column
    from token_distillation.paths import resolve_model_source

    if not str(dataset_path).strip():
        raise ConfigError("--dataset_path is required (a JSON Lines corpus, e.g. "
                          "../shared/data/pubmed_abstracts/abstracts.jsonl)")
    specs = parse_methods(methods)
    per_method = _parse_json(method_flags, "method_flags")
    common = _parse_json(common_flags, "common_flags")
    unknown = set(per_method) - {lab for lab, _ in specs}
    if unknown:
        raise ConfigError(f"--method_flags: labels {sorted(unknown)} are not in --methods")
    for label, extra in per_method.items():
        if not isinstance(extra, dict):
            raise ConfigError(f"--method_flags: the value of {label!r} must be a JSON object of flags")
    for name, given in [("common_flags", common)] + [("method_flags", f) for f in per_method.values()]:
        reserved = sorted(set(given) & set(RESERVED_FLAGS))
        if reserved:
            raise ConfigError(f"--{name}: {', '.join('--' + r for r in reserved)} "
                              f"{'is' if len(reserved) == 1 else 'are'} set by compare_methods.py "
                              "(--dataset_path is split, each run writes <out_dir>/runs/<label>)")
    src = Path(str(dataset_path)).expanduser()
    if not src.is_file() or src.suffix.lower() != ".jsonl":
        raise ConfigError(f"--dataset_path {src}: pass an existing .jsonl file")
    if not 0.0 < heldout_fraction < 1.0:
        raise ConfigError(f"--heldout_fraction must be between 0 and 1 (exclusive), not {heldout_fraction}")
    for flag, value, low in (("max_docs", max_docs, 0), ("windows_per_token", windows_per_token, 1),
                             ("window_len", window_len, 4), ("definition_tokens", definition_tokens, 0)):
        if value < low:
            raise ConfigError(f"--{flag} must be >= {low}, not {value}")
    if docs_md:
        _check_docs_md(docs_md)
    out = Path(str(out_dir)).expanduser()
    if not str(out_dir).strip():
        raise ConfigError("--out_dir is empty; pass an output directory")
    check_text_column(CorpusConfig(dataset_path=str(src), text_column=text_column))
    # every run's flags, before any work
    run_flags = {}
    for label, method in specs:
        flags = dict(model_path=model_path, new_tokens_source=new_tokens_source, dataset_path=str(src),
                     text_column=text_column, seed=seed, init_method=method, device=device,
                     out_path=str(out / "runs" / label), overwrite=True,
                     # the runs share the held-out snippets and mostly the initial rows: one held-out pass
                     # before training serves every run with the same inputs
                     heldout_cache_dir=str(out / "data" / "heldout-before"))
        flags.update(common)
        flags.update(per_method.get(label, {}))
        try:
            RunConfig.from_flags(**flags)
        except ConfigError as e:  # name the run whose flags (common or its own) are wrong
            raise ConfigError(f"run {label!r}: {e}") from None
        run_flags[label] = flags
    resolve_model_source(str(model_path))  # a missing local model, an uncached hub id offline
    return specs, run_flags, src


def main(dataset_path: str = "", new_tokens_source: str = "new_tokens/biomedical_pubmed60.txt",
         model_path: str = "smollm2-135m", methods: str = "token_distillation,subtoken-mean,random",
         method_flags: str = "", common_flags: str = "", heldout_fraction: float = 0.1, max_docs: int = 0,
         text_column: str = "text", seed: int = 42, out_dir: str = "outputs/compare_methods",
         windows_per_token: int = 10, window_len: int = 50, definition_tokens: int = 24, device: str = "auto",
         docs_md: str = "", reuse_runs: bool = False, train_only: bool = False) -> str:
    """Run every method, evaluate them together; returns the path of evaluation.json.

    Args:
        dataset_path: JSON Lines corpus with a text column (split here into training/held-out documents).
        methods: comma-separated ``[label=]init_method`` entries (labels must be unique).
        method_flags: JSON object ``{label: {flag: value}}`` of extra apply_embedding_init.py flags.
        common_flags: JSON object ``{flag: value}`` passed to every run.
        heldout_fraction: share of documents written to heldout.jsonl.
        out_dir: new, empty, or an earlier output of this script (other files there are refused).
        reuse_runs: keep a run directory that already has report.json instead of retraining, and
            continue one that holds an interrupted run's checkpoints (``--resume``: a sweep stopped
            by Ctrl-C, SIGTERM or a SLURM time limit goes on from its last checkpoint; the training
            time in its report.json counts the steps before the stop too).
        train_only: stop after the runs (no evaluation; returns "").
        docs_md: also write this markdown page (and ``<stem>.png`` beside it).

    Raises:
        ConfigError: bad input (see :func:`check_inputs` and
            :func:`token_distillation.paths.claim_script_dir`), before anything is written.
    """
    specs, run_flags, src = check_inputs(
        dataset_path=dataset_path, new_tokens_source=new_tokens_source, model_path=model_path, methods=methods,
        method_flags=method_flags, common_flags=common_flags, heldout_fraction=heldout_fraction, max_docs=max_docs,
        text_column=text_column, seed=seed, out_dir=out_dir, windows_per_token=windows_per_token,
        window_len=window_len, definition_tokens=definition_tokens, device=device, docs_md=docs_md)
    out = Path(str(out_dir)).expanduser()
    claim_script_dir(out, "compare_methods.py", OUT_ENTRIES)

    t0 = time.perf_counter()
    train_path, held_path, n_train, n_held = split_corpus(src, out / "data", heldout_fraction, seed, text_column,
                                                         max_docs)
    logger.info("split %s: %d training / %d held-out documents", src, n_train, n_held)
    from token_distillation.evaluate import EvalConfig, evaluate
    from token_distillation.pipeline import run

    runtimes, resumed = {}, set()  # resumed: runs continued from checkpoints (their time counts the last part)
    for label, _ in specs:
        flags = dict(run_flags[label], dataset_path=str(train_path))
        run_dir = Path(flags["out_path"])
        if reuse_runs and (run_dir / "report.json").is_file():
            logger.info("reusing %s", run_dir)
            old = json.loads((run_dir / "report.json").read_text())
            runtimes[label] = old.get("compare_seconds")
            if old.get("compare_resumed"):
                resumed.add(label)
            continue
        if reuse_runs and only_checkpoints(run_dir):  # a stopped or killed run continues from its checkpoints
            logger.info("resuming %s from its checkpoints (--resume)", run_dir)
            flags["resume"] = True
            resumed.add(label)
        t = time.perf_counter()
        res = run(RunConfig.from_flags(**flags))
        runtimes[label] = time.perf_counter() - t
        rep_path = res.out_path / "report.json"
        rep = json.loads(rep_path.read_text())
        rep["compare_seconds"] = runtimes[label]
        if label in resumed:  # the wall time of the part after the resume; train_seconds counts the whole training
            rep["compare_resumed"] = True
        replace_file(rep_path, lambda tmp: tmp.write_text(json.dumps(rep, indent=2, ensure_ascii=False)))
        logger.info("%s: %.1f s", label, runtimes[label])

    if train_only:
        return ""
    t = time.perf_counter()
    ecfg = EvalConfig.from_flags(model_path=model_path, extended_paths=",".join(str(out / "runs" / lab) for lab, _ in specs),
                                 labels=",".join(lab for lab, _ in specs), dataset_path=str(held_path),
                                 text_column=text_column, windows_per_token=windows_per_token, window_len=window_len,
                                 definition_tokens=definition_tokens, device=device, seed=seed,
                                 out_path=str(out / "eval"))
    results = evaluate(ecfg)
    eval_seconds = time.perf_counter() - t
    if docs_md:
        write_docs(Path(docs_md), out, results, runtimes, eval_seconds, time.perf_counter() - t0,
                   dict(resumed=sorted(resumed), model_path=model_path, dataset_path=dataset_path,
                        new_tokens_source=new_tokens_source, n_train=n_train, n_held=n_held, run_flags=run_flags))
    return str(out / "eval" / "evaluation.json")


def verdict(results: dict, method: str = "token_distillation", baselines=("subtoken-mean", "random")) -> list[str]:
    """Sentences comparing ``method`` with each baseline on held-out excess NLL (computed, not typed)."""
    m = results["methods"]
    lines = []
    if method not in m:
        return lines
    for b in baselines:
        if b not in m:
            continue
        for key, name in (("excess_nll_full", "full vocabulary"), ("excess_nll_orig", "original vocabulary")):
            a, c = m[method][key], m[b][key]
            word = "beats" if a < c else "does **not** beat"
            lines.append(f"- `{method}` {word} `{b}` on held-out excess NLL ({name}): {a:.4f} vs {c:.4f} nats/token.")
    return lines


#: the line every page of --docs_md starts its second paragraph with (see :func:`write_docs`)
DOCS_MARK = "Generated by `scripts/compare_methods.py`"


def _check_docs_md(docs_md: str) -> None:
    """``--docs_md`` may be written: a ``.md`` path that is new or an earlier page of this script
    (:data:`DOCS_MARK`), whose ``<stem>.png`` is new or beside such a page (a user's notes.md and
    its sibling figure were replaced without a word).

    Raises:
        ConfigError: another suffix, or a file this script did not write.
    """
    md = replace_file(docs_md, flag="--docs_md")  # checks the place (a directory, a file under a file)
    if md.suffix.lower() != ".md":
        raise ConfigError(f"--docs_md {docs_md}: pass a .md file (the page; the figure is written beside it as "
                          "<stem>.png)")
    if md.is_file():
        try:
            ours = DOCS_MARK in md.read_text(encoding="utf-8", errors="replace")[:4000]
        except OSError:
            ours = False
        if not ours:
            raise ConfigError(f"--docs_md {md} exists and is not a page of this script; pass a new path (an earlier "
                              "page of compare_methods.py is replaced)")
    elif md.with_suffix(".png").exists():
        raise ConfigError(f"--docs_md {md}: {md.with_suffix('.png').name} exists beside it and would be replaced by "
                          "the figure; pass a new path")
    check_writable(md.resolve(), "--docs_md")  # written after every run and the evaluation: fail now


def _runtime(seconds, resumed: bool) -> str:
    """A run's cell in the page's runtime table (None: a reused run from before runtimes were kept)."""
    if not isinstance(seconds, (int, float)):
        return "(reused)"
    return f"{seconds:.0f} s" + (" after a resume (the part before the stop is not counted)" if resumed else "")


def write_docs(path: Path, out: Path, results: dict, runtimes: dict, eval_seconds: float, total: float,
               info: dict) -> None:
    """Write the comparison page with its figure (``<stem>.png`` beside it); each file is replaced
    whole (written to a temporary file first), never left half-written."""
    import torch

    from token_distillation.evaluate import markdown_tables

    fig = path.with_suffix(".png")
    replace_file(fig, lambda tmp: shutil.copyfile(out / "eval" / "evaluation.png", tmp))
    s = results["setup"]
    cmd = "python " + " ".join(shlex.quote(a) for a in sys.argv)
    first = next(iter(info["run_flags"].values()))
    rt = "\n".join(f"| {lab} | {_runtime(v, lab in info['resumed'])} |" for lab, v in runtimes.items())
    flags_table = "\n".join(f"| {lab} | `{json.dumps({k: v for k, v in f.items() if k not in first or first[k] != v or k == 'init_method'})}` |"
                            for lab, f in info["run_flags"].items())
    defs = "\n".join(f"- `{w!r}`: {d!r}" for w, d in list(results.get("definitions", {}).items())[:5])
    text = f"""# Comparison of init methods on held-out text

{DOCS_MARK} on {time.strftime('%Y-%m-%d %H:%M %Z')} (do not edit by hand; rerun the
command below).

- Model: `{info['model_path']}` ({s['num_layers']} layers, {s['original_vocab_rows']} vocabulary rows), evaluated in {s['dtype']} on {s['device']}.
- Tokens: `{info['new_tokens_source']}` ({s['words']} words; {s['words_with_windows']} with held-out windows).
- Corpus: `{info['dataset_path']}`, split by document (seed {s['seed']}) into {info['n_train']} training and
  {info['n_held']} held-out documents; the evaluator excluded {s['excluded_training_docs']} documents listed as
  training documents (expected 0: the split is disjoint) and mined {s['windows']} windows of {s['window_len']}
  tokens (at most {s['windows_per_token']} per word); definitions of {s['definition_tokens']} tokens.
- Machine: {platform.platform()}, {os.cpu_count()} CPU cores (torch threads {torch.get_num_threads()}), shared with other jobs.
- Command:

```bash
{cmd}
```

Common run flags: `{json.dumps({k: v for k, v in first.items() if k not in ('init_method', 'out_path')})}`

| method | flags that differ |
|---|---|
{flags_table}

## Result

{chr(10).join(verdict(results)) or '- (no token_distillation run to compare)'}

Metrics (defined in `token_distillation/evaluate.py`): excess NLL is the mean NLL of the original tokens after the
word with the new token minus that with the original subtokens (nats per token; per word pooled over its windows,
then averaged over the {next(iter(results['methods'].values()))['aggregated_over_tokens']} words every method has);
"full vocab" uses the softmax over the extended vocabulary, "orig. vocab" masks the new tokens out. Hidden-state
metrics compare the student with the teacher at the aligned positions from the new token on, at each run's target
layer and at the last layer. The definition NLL scores, under the extended model with the new token in the prompt,
the greedy definition the original model writes for the original tokenization.

{markdown_tables(results)}
![comparison]({fig.name})

## Runtimes (wall clock)

| method | training run (incl. model loading, snippet mining) |
|---|---|
{rt}

Evaluation of all methods: {eval_seconds:.0f} s (original model passes {s['original_model_seconds']:.0f} s). Total: {total:.0f} s.

## Definitions by the original model (first five)

{defs}
"""
    replace_file(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))
    logger.info("wrote %s and %s", path, fig)


if __name__ == "__main__":
    import inspect

    from token_distillation.cli import exit_on_user_error, run_fire

    configure_logging()
    run_fire(exit_on_user_error(main), set(inspect.signature(main).parameters), None, "compare_methods.py")
