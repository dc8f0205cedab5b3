#!/usr/bin/env python
"""Render the generated documentation from files that scripts wrote (never typed by hand).

Reads ``docs/benchmarks/*.json`` (scripts/benchmark.py), ``docs/sweep/**/sweep.json``
(scripts/sweep_lr.py) and ``docs/evaluation.md`` (scripts/compare_methods.py), and writes
``docs/results.md`` (every table) and the README's short results summary (the text between
``<!-- results:start -->`` and ``<!-- results:end -->``); from the flag definitions in
``token_distillation/config.py`` and ``token_distillation/evaluate.py`` it writes ``docs/flags.md``.

    python scripts/update_readme_results.py

It takes no flags. A results file it cannot read, or a README whose results markers are broken,
ends with one ``error:`` line naming it and exit code 2, and README.md is left unchanged; README.md
is replaced whole (written to a temporary file first), never left half-written.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
START, END = "<!-- results:start -->", "<!-- results:end -->"


def _load(path: Path) -> dict:
    """A results file written by a script.

    Raises:
        ConfigError: unreadable, not valid JSON, or not a JSON object.
    """
    from token_distillation.config import ConfigError

    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot read {path} ({e}); regenerate it with the script that wrote it") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} is not a JSON object; regenerate it with the script that wrote it")
    return data


def _pct(v):
    return "-" if v is None else f"{100 * v:.0f}%"


def _num(v, d=4):
    return "-" if v is None else f"{v:.{d}f}"


def benchmark_section() -> list[str]:
    files = sorted((ROOT / "docs" / "benchmarks").glob("*.json"))
    if not files:
        return []
    out = ["### Speed on mined snippets (`scripts/benchmark.py`)", "",
           "| file | date | device | model | words (train snippets) | target layer | comparator snippets/s "
           "| product snippets/s | speed-up / FLOP ratio (quotient) | same snippets in random batches "
           "| later epochs, teacher cached | MFU comparator / product | held-out loss comparator / product "
           "| product s per 1,000 tokens (25 snippets, one epoch, full batches) |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    runs = [(f, _load(f)) for f in files]

    def ratio(v):
        return f"{v['speedup']:.2f}x / {v['flop_ratio']:.2f}x ({v['speedup_over_flop_ratio']:.2f})"

    for f, r in runs:
        sn = r["snippets"]
        for lay in r["by_layer"]:
            c, p = lay["comparator"], lay["product"]
            out.append(f"| `{f.relative_to(ROOT)}` | {r['date']} | {r['device']} {r['dtype']} | {r['model']} | "
                       f"{sn['words']} ({sn['train_snippets']:,}) | {lay['target_layer']} (= {lay['layer']} of "
                       f"{r['layers']}) | {c['snippets_per_s']:.2f} | {p['snippets_per_s']:.2f} | {ratio(p)} | "
                       f"{ratio(lay['product_ungrouped'])} | {ratio(lay['product_teacher_cached'])} | "
                       f"{c['mfu']:.2f} / {p['mfu']:.2f} | {lay['heldout_loss']['comparator']:.5f} / "
                       f"{lay['heldout_loss']['product']:.5f} | {p['seconds_per_1000_tokens']:,.0f} |")
    out.append("")
    for f, r in runs:
        sn = r["snippets"]
        pairing = {"chars": "paired by character alignment (`--alignment chars`)",
                   "ids": "paired by the id-level merge (`--alignment ids`)"}.get(
            r.get("alignment"), "paired by the id-level merge (measured before `--alignment chars` existed)")
        out.append(f"`{f.name}`: {sn['words']} words, {sn['train_snippets']:,} training snippets mined from "
                   f"`{sn['corpus']}` and {pairing}, {r['steps_timed']} timed batches of {r['batch_size']} sampled evenly from "
                   f"the product's epoch of {sn['batches_per_epoch']} batches; first new token at position "
                   f"{sn['first_new_token_position_mean']:.1f} on average (BOS = 0); "
                   f"{100 * sn['with_another_new_token']:.0f}% of the snippets hold another new token; mean prefix "
                   f"shared by a batch {sn['shared_prefix_mean']['grouped']:.1f} tokens grouped by position, "
                   f"{sn['shared_prefix_mean']['ungrouped']:.1f} in random batches.")
    o = runs[0][1]["optimizer_state_bytes_1000_tokens_hidden4096"]
    out += ["", f"Optimizer state for 1,000 new tokens at hidden 4096 (8B-class shape, vocabulary 128,256): "
            f"{o['product_measured'] / 1e6:.1f} MB measured for the product's row-wise Adam state; a "
            f"full-vocabulary Adam state is {o['comparator_formula'] / 1e9:.1f} GB (2 x 4 bytes x 128,256 x 4,096).",
            "The comparator computes the product's loss (per-token recipe) the straightforward way: full "
            "forwards with logits and all hidden states, the whole embedding matrix as the parameter. FLOP "
            "ratio: the comparator's model FLOPs divided by the variant's on the same batches, i.e. the speed-up "
            "at equal MFU; the quotient speed-up / FLOP ratio is 1 when the variant runs its FLOPs as efficiently "
            "as the comparator. The product saves FLOPs by skipping the logits, the layers above the target "
            "layer and, for the prefix a batch shares before its first new token, the student's forward and "
            "backward; the positions from the new token on still need a teacher forward, a student forward and "
            "a student backward. Grouping batches by first-new-token position (the per-token recipe allows any "
            "grouping: a token's updates do not change) makes the shared prefix close to the mean position "
            "instead of the batch minimum. Later epochs reuse the teacher's states (`--teacher_cache_gib`).",
            "Commands: " + "; ".join(f"`{r['command']}`" for _, r in runs), ""]
    return out


def gpu_summary() -> str:
    """One README sentence from docs/benchmarks/gpu/ (or what to run when it is empty)."""
    folder = ROOT / "docs" / "benchmarks" / "gpu"
    checks = {f.stem: _load(f) for f in sorted(folder.glob("gpu_check_*.json"))}
    small = [r for r in checks.values() if r["batch_size"] <= 16]
    if not small:
        return ("GPU speed and memory: not measured; `bash scripts/gpu_check.sh` prints them for a random "
                "Llama-3.1-8B-shaped model.")
    r = small[0]
    big = max(checks.values(), key=lambda x: x["batch_size"])
    saved = ", ".join(sorted(r.get("tensor_dtypes", {}).get("saved", {}))) or "?"
    return (f"On one {r['device']} with a random Llama-3.1-8B-shaped bf16 model (`scripts/gpu_check.py`): batch "
            f"{r['batch_size']} peaked at {r['peak_gpu_allocated_gib']:.1f} GiB allocated "
            f"({r['peak_gpu_reserved_gib']:.1f} reserved; plan {r['plan_gib']:.1f}), so it fits a 24 GB (22.4 GiB) GPU; "
            f"weights saved as {saved}; training took {r['train_seconds_per_1000_tokens_extrapolated']:,.0f} s per "
            f"1,000 tokens (extrapolated from {r['tokens_trained']}) at {r['train_snippets_per_token']:.0f} snippets and {r['epochs']} epochs, against "
            f"{big['train_seconds_per_1000_tokens_extrapolated'] * 25 / big['train_snippets_per_token']:,.0f} s "
            f"(extrapolated to 25 snippets) with `--token_distillation_batch_size auto`, now the default for this recipe (batch {big['batch_size']}: "
            f"every token of that run; {big['peak_gpu_allocated_gib']:.0f} GiB); both ran with the shared prefix, "
            "which GPU runs no longer use (steps at batch 16 were 1.3x faster without it); caveats in "
            "[GPU figures](docs/results.md#gpu-scriptsgpu_checkpy-scriptsbenchmarkpy).")


def gpu_section() -> list[str]:
    """``docs/benchmarks/gpu/``: runs of scripts/gpu_check.py (whole pipeline, random 8B-shaped
    checkpoint) and scripts/benchmark.py on a GPU."""
    folder = ROOT / "docs" / "benchmarks" / "gpu"
    files = sorted(folder.glob("*.json"))
    if not files:
        return []
    runs = [(f, _load(f)) for f in files]
    checks = [(f, r) for f, r in runs if "peak_over_plan" in r]
    benches = [(f, r) for f, r in runs if "by_layer" in r]
    out = ["### GPU (`scripts/gpu_check.py`, `scripts/benchmark.py`)", "",
           "Random Llama-3.1-8B-shaped models (32 layers, hidden 4,096, vocabulary 128,256, untied; bf16), so "
           "the figures are speed and memory, not quality. Tokenizer: the bundled SmolLM2's, saved to a "
           "directory. The benchmark's snippets are mined from the shared PubMed abstracts as in a run; "
           "gpu_check's corpus is synthetic (one made-up word per document).", ""]
    if checks:
        out += ["Whole runs (`scripts/gpu_check.py`: load, held-out passes, training with the default per-token "
                "recipe, output-row fit, save):", "",
                "| file | date | device, torch | new tokens x training snippets | batch | epochs, steps | training s "
                "| training s per 1,000 tokens at 25 snippets (extrapolated linearly) | whole run s "
                "| peak GPU memory allocated (reserved) "
                "| memory plan | peak / plan | tensors saved (source) |",
                "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for f, r in checks:
            dt = r.get("tensor_dtypes", {})
            fmt = lambda d: ", ".join(f"{k} {v}" for k, v in sorted(d.items())) or "-"  # noqa: E731
            out.append(f"| `{f.relative_to(ROOT)}` | {r['date']} | {r['device']}, {r['torch']} | "
                       f"{r['tokens_trained']} x {r['train_snippets_per_token']:.0f} | {r['batch_size']} | "
                       f"{r['epochs']}, {r['train_steps']} | {r['train_seconds']:.1f} | "
                       f"{r['train_seconds_per_1000_tokens_extrapolated'] * 25 / r['train_snippets_per_token']:,.0f} | "
                       f"{r['run_seconds']:.0f} | "
                       f"{r['peak_gpu_allocated_gib']:.2f} GiB ({r['peak_gpu_reserved_gib']:.2f}) | "
                       f"{r['plan_gib']:.2f} GiB | {r['peak_over_plan']:.2f} | {fmt(dt.get('saved', {}))} "
                       f"({fmt(dt.get('source', {}))}) |")
        out += ["", "`gpu_check_h200_llama8b_auto.json` ran with a change, since reverted, that kept PyTorch's cuDNN "
                "attention out of the training forwards (in the benchmark it changed batch 16 from 72.1 to 74.6 "
                "snippets/s with the shared prefix, about run-to-run noise; that run is not committed).",
                "Commands (the tokenizer directory stands for `--tokenizer smollm2-135m`, the default): "
                + "; ".join(f"`{r['command']}`" for _, r in checks), ""]
    if benches:
        out += ["Training steps on mined snippets (`scripts/benchmark.py`, snippets per second; the shared prefix "
                "is what the product did on GPUs before these runs; it now shares it on CPU only, "
                "`fastpath.SHARED_PREFIX_DEVICES`):", "",
                "| file | date | device | batch | warm-up | target layer | comparator | grouped, shared prefix "
                "| grouped, no shared prefix | random batches | teacher cached | MFU comparator / no prefix "
                "| peak GPU memory MiB |",
                "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for f, r in benches:
            warm = "every timed batch" if "--warmup all" in r["command"] else "first batch"
            for lay in r["by_layer"]:
                if "product_with_prefix" in lay:  # measured with the product not sharing the prefix
                    shared, plain = lay["product_with_prefix"], lay["product"]
                else:
                    shared, plain = lay["product"], lay.get("product_no_prefix")
                sps = lambda v: "-" if v is None else f"{v['snippets_per_s']:.1f}"  # noqa: E731
                mfu = "-" if plain is None else f"{plain['mfu']:.2f}"
                out.append(f"| `{f.relative_to(ROOT)}` | {r['date']} | {r['device']} {r['dtype']} | {r['batch_size']} | "
                           f"{warm} | {lay['target_layer']} | {lay['comparator']['snippets_per_s']:.1f} | {sps(shared)} | "
                           f"{sps(plain)} | {sps(lay['product_ungrouped'])} | {sps(lay['product_teacher_cached'])} | "
                           f"{lay['comparator']['mfu']:.2f} / {mfu} | "
                           f"{r['peak_mem_mib']:,.0f} |")
        sn = benches[0][1]["snippets"]
        out += ["", f"Snippets: {sn['words']} words, {sn['train_snippets']:,} training snippets; mean prefix shared by "
                f"a batch {sn['shared_prefix_mean']['grouped']:.1f} tokens grouped by position. MFU against a "
                "2048 x 2048 bf16 matmul measured in the same run (506-578 TFLOP/s in these runs; the device reaches "
                "~790 on large matmuls). At batch 16 a step on the 8B shape waits on kernel launches and per-call "
                "set-up: in the batch-16 run's profile (`bench_h200_llama8b_bs16_profile.log`, 4 steps each) the "
                "GPU kernels took 307 ms with the shared prefix and 319 ms without, against 888 and 661 ms for 4 "
                "timed steps, so the GPU was busy about 35% and 48% of the time. The peak GPU memory of a "
                "benchmark includes the comparator's (whole-vocabulary Adam state, logits). The larger batch that "
                "`--token_distillation_batch_size auto` picks is the main speed lever; the shared prefix's extra "
                "pass only added to that wait.",
                "Commands: " + "; ".join(f"`{r['command']}`" for _, r in benches), ""]
    return out


def default_label() -> str:
    """The sweep label of the product's default recipe (per-token, default step size and epochs)."""
    from token_distillation.config import RECIPE_EPOCHS, Recipe, TrainConfig

    return f"per-token-{TrainConfig().token_distillation_lr_relative:g}-e{RECIPE_EPOCHS[Recipe.PER_TOKEN]}"


def _sweeps() -> list[Path]:
    return sorted((ROOT / "docs" / "sweep").rglob("sweep.json"), key=lambda p: (len(p.parts), p))


#: the per-token recipe's handling of co-occurring new tokens and the corpus stage's document order
#: changed on this date; sweeps created before it are marked in the summary
COOCCURRENCE_FIX = "2026-12-03"


def summary_rows(sweeps: list[dict], label: str) -> list[tuple]:
    """``(model, words, default row, paper row or None, source, created, one-epoch row or None)`` per
    (model, words).

    ``sweeps``: parsed sweep.json files, each with a ``source`` key (its folder). When several sweeps
    measured the default ``label`` for the same model and number of words, the newest (``created``)
    is shown, so a rerun replaces an older measurement instead of adding a second row. The paper
    recipe's row comes from the same sweep, or else from the newest sweep of that model and number of
    words that ran it (the paper recipe did not change), with that sweep's ``created`` added to the
    row (a paper figure measured before ``COOCCURRENCE_FIX`` beside a row measured after it gets its
    own * mark); the one-epoch row (``label`` with ``-e1``) from the default's own sweep only.
    """
    best: dict[tuple, tuple] = {}
    papers: dict[tuple, tuple[str, dict]] = {}
    one_epoch = label.rsplit("-e", 1)[0] + "-e1"
    for s in sweeps:
        by: dict[int, dict] = {}
        for r in s["rows"]:
            by.setdefault(r["words"], {})[r["method"]] = r
        for words, methods in by.items():
            key = (s["model_path"], words)
            if "paper" in methods and (key not in papers or s["created"] > papers[key][0]):
                papers[key] = (s["created"], methods["paper"])
            if label not in methods:
                continue
            row = (s["model_path"], words, methods[label], methods.get("paper"), s["source"], s["created"],
                   methods.get(one_epoch) if one_epoch != label else None)
            if key not in best or row[5] > best[key][5]:
                best[key] = row
    out = []
    for k in sorted(best):
        row = best[k]
        if row[3] is None and k in papers:  # borrowed: it keeps its own sweep's date (its * mark)
            row = row[:3] + (dict(papers[k][1], created=papers[k][0]),) + row[4:]
        out.append(row)
    return out


def _minutes(r) -> str:
    return "-" if not r or r.get("train_seconds") is None else f"{r['train_seconds'] / 60:.1f} min"


def summary_section(where: str = "in [docs/results.md](docs/results.md)") -> list[str]:
    """One row per (model, number of words) measured: the default recipe beside the paper recipe
    and, where measured, the default's step size for one epoch (time to quality)."""
    label = default_label()
    sweeps = [dict(_load(f), source=f.parent.relative_to(ROOT)) for f in _sweeps()]
    if not sweeps:
        return []
    rows = summary_rows(sweeps, label)
    head = ["### Held-out gap closed at default settings, beside the paper recipe", ""]
    if not rows:
        return head + [f"No sweep under docs/sweep/ measured the current default recipe `{label}`: rerun "
                       "`scripts/sweep_lr.py` at the default settings and copy its sweep.json here.", ""]
    out = head + [
           f"From the sweeps {where} (same corpus split, snippets and evaluation per row). Gap closed: 0% = subtoken "
           f"mean, 100% = original tokenization; softmax over the original / the full extended vocabulary. "
           f"Default: `{label}` (per-token recipe); 1 epoch: the same step size for one epoch; paper: AdamW lr "
           f"1e-4, 1 epoch. Training time: wall time of the training stage on the 2-core CPU of the sweep (other "
           f"jobs may have shared it; compare times within a row). Rows (or paper figures) marked * were "
           f"measured before the changes of {COOCCURRENCE_FIX} (other new tokens in a token's snippets read with their initial rows, "
           f"without gradient; the corpus read in order and held out by hash, so other snippets) and may change "
           f"when re-measured. All rows were measured with subtoken-mean output rows, before `--output_embeddings "
           f"auto` became `distill` for token_distillation: the original-vocabulary figures do not depend on the "
           f"output rows, the full-vocabulary ones do a little (the raw-text table in docs/results.md has both).",
           "",
           "| model | words trained together | default: gap closed (orig. / full) | default: training time "
           "| 1 epoch: gap closed (orig.), training time | default: new-token argmax rate "
           "| paper: gap closed (orig. / full) | paper: training time | source |",
           "|---|---|---|---|---|---|---|---|---|"]
    notes: list[str] = []
    for model, words, d, p, src, created, e1 in rows:
        if p and p.get("train_seconds_note"):  # a time known to be disturbed, said beside it
            notes.append(f"{'†' * (len(notes) + 1)} `{model}`, {words} words, paper: {p['train_seconds_note']}.")
        # a borrowed paper figure older than its (re-measured) row says so itself
        pmark = "*" if p and p.get("created", created) < COOCCURRENCE_FIX <= created else ""
        paper = (f"{_pct(p['gap_closed_orig'])} / {_pct(p['gap_closed_full'])}{pmark} | {_minutes(p)}"
                 f"{'†' * len(notes) if p.get('train_seconds_note') else ''}" if p else "not measured | -")
        one = f"{_pct(e1['gap_closed_orig'])}, {_minutes(e1)}" if e1 else "not measured"
        mark = "*" if created < COOCCURRENCE_FIX else ""
        out.append(f"| `{model}` | {words}{mark} | {_pct(d['gap_closed_orig'])} / {_pct(d['gap_closed_full'])} | "
                   f"{_minutes(d)} | {one} | {_num(d['new_token_argmax_rate'])} | {paper} | `{src}/` |")
    return out + [""] + ([" ".join(notes), ""] if notes else [])


def sweep_section() -> list[str]:
    """One table per ``docs/sweep/**/sweep.json`` (one per model)."""
    out: list[str] = []
    for f in _sweeps():
        s = _load(f)
        rel = f.parent.relative_to(ROOT)
        out += [f"### Training recipe on `{s['model_path']}`: share of the held-out gap closed (`scripts/sweep_lr.py`)",
                "", f"{s['created']}, model `{s['model_path']}`, corpus `{s['dataset_path']}`, tokens: the first N of "
                f"`{s['token_list']}`. Command: `{s['command']}` (its sweep.json/md/png copied to {rel}/). Gap closed: "
                "0% = subtoken mean, 100% = original tokenization (excess NLL 0). `per-token-X-eN`: the per-token "
                "recipe at step size X x the embedding RMS for N epochs (the default is 0.05, 2 epochs); `paper`: "
                "the paper's recipe (AdamW lr 1e-4, 1 epoch).", "",
                "| words | method | excess NLL orig. vocab | excess NLL full vocab | gap closed (orig.) | gap closed (full) "
                "| new-token argmax rate |", "|---|---|---|---|---|---|---|"]
        for r in s["rows"]:
            out.append(f"| {r['words']} | {r['method']} | {_num(r['excess_nll_orig'])} | {_num(r['excess_nll_full'])} | "
                       f"{_pct(r['gap_closed_orig'])} | {_pct(r['gap_closed_full'])} | "
                       f"{_num(r['new_token_argmax_rate'])} |")
        out += ["", f"![sweep]({rel}/sweep.png)", ""]
    return out


#: folders under docs/sweep/raw_text/ with an evaluation.json of scripts/compare_methods.py runs (train-only)
#: evaluated by ``python -m token_distillation.evaluate``; their README.md holds the commands
RAW_TEXT = ROOT / "docs" / "sweep" / "raw_text"


def _raw_text_rows() -> list[tuple[str, int, str, dict]]:
    """``(model, words, label, row)`` per evaluated method of every raw-text evaluation; ``row`` has
    BPB vs the original, token saving, the three gaps closed and the generation share."""
    out = []
    for f in sorted(RAW_TEXT.glob("*/evaluation.json")) if RAW_TEXT.is_dir() else []:
        res = _load(f)
        setup, orig, inf0 = res["setup"], res.get("bpb_original"), res.get("inflected_original")
        ref = res["methods"].get(res.get("bpb_reference") or "", {})
        for label, m in res["methods"].items():
            b, inf, g = m.get("bpb") or {}, m.get("inflected") or {}, m.get("generation") or {}
            cont = (1 - m["excess_nll_orig"] / ref["excess_nll_orig"]) if ref and ref.get("excess_nll_orig") else None
            out.append((setup["model_path"], setup["words"], label, {
                "bpb_rel": b["bpb"] / orig["bpb"] - 1 if b and orig else None,
                "fewer_tokens": 1 - b["tokens_per_byte"] / orig["tokens_per_byte"] if b and orig else None,
                "bpb_gap": b.get("gap_closed"), "inflected_gap": inf.get("gap_closed"),
                "inflected_rel": inf["bpb"] / inf0["bpb"] - 1 if inf and inf0 else None,
                "continuation_gap": cont, "new_token_share": g.get("word_share"),
                "gen_with_word": g.get("with_word"), "gen_prompts": g.get("prompts"),
                "gen_bpb_orig": g.get("original_bpb"), "gen_original": res.get("generation_original") or {},
                "inflected_windows": (inf0 or {}).get("docs"), "split": b.get("excess_split"), "original": orig,
                "source": f.parent.relative_to(ROOT)}))
    return out


def _signed(v) -> str:
    return "-" if v is None else f"{100 * v:+.2f}%"


def _pct1(v) -> str:
    return "-" if v is None else f"{100 * v:.1f}%"


def raw_text_section() -> list[str]:
    """Bits per byte of raw held-out text and after inflected forms, per method (issue: train as you infer)."""
    rows = _raw_text_rows()
    if not rows:
        return []
    e1 = "; `_e1`: one training epoch instead of the default two." if any(
        label.endswith("_e1") for _, _, label, _ in rows) else "."
    out = ["### Raw text: bits per byte, inflected forms, the new token as a prediction", "",
           "Each model reads 100 held-out PubMed documents that contain the words through its own tokenizer (every "
           "token a target, bits per byte; the original model reads the original tokenization). Gap closed: 0% = "
           "subtoken mean, 100% = the original model. Inflected forms: the text after held-out words in which the "
           "extended tokenizer uses a new token inside a longer word (\" agonist\" in \" agonists\"). Continuation: "
           "the held-out gap closed of the table above (original vocabulary). Generation: share of sampled "
           "continuations with a word that write it as the new token. `td_ids`: `--alignment ids`; `td_chars`: "
           "`--alignment chars`; `outdistill`: with `--output_embeddings distill` (`_free`: the fit before "
           "2026-12-04, from the subtoken-mean row without the penalty, which is also what `outdistill` means in "
           + ", ".join(f"`{n}/`" for n, v in sorted(EARLIER_FIT.items()) if v == FIT_FREE) + "; in "
           + ", ".join(f"`{n}/`" for n, v in sorted(EARLIER_FIT.items()) if v == FIT_OCCURRENCES)
           + " the fit of 2026-12-04: from the first subtoken's row with the penalty, the completion away from the "
           "word estimated from the word's occurrences, which `_occ` also means; in "
           + ", ".join(f"`{n}/`" for n, v in sorted(EARLIER_FIT.items()) if v == FIT_OWN_COMPLETION)
           + " the fit of 2026-12-05, with the teacher's own completion; in "
           + ", ".join(f"`{n}/`" for n, v in sorted(EARLIER_FIT.items()) if v == FIT_HALF_SHARE)
           + " the fit of 2026-12-06, which adds background positions from other words' snippets, carrying half of "
           "each token's objective; `_bg90`: those positions carry 90% of it, the default since 2026-12-06)" + e1
           + " Extra bits per use of a new "
           "token (evaluations from 2026-12-04 on): at the words / the probability the new tokens take elsewhere / "
           "the rest (mostly text read after a new token), and the estimated floor for any method that keeps the "
           "original rows ([usage](usage.md#evaluation-are-the-new-tokens-as-good-as-the-original-subtokens)).", "",
           "| model | words | method | BPB vs original | fewer tokens | BPB gap closed | inflected (windows): BPB vs "
           "original, gap closed | continuation gap closed | generation: new token | extra bits per use: words / "
           "elsewhere / rest (floor) | source |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
    for model, words, label, r in rows:
        x = r["split"]
        split = "-" if not x else "{:+.2f} / {:+.2f} / {:+.2f} ({:.2f})".format(
            *(x[k] / max(x["uses"], 1) for k in ("at_words", "new_mass", "rest", "floor_bits")))
        out.append(f"| `{model}` | {words} | {label} | {_signed(r['bpb_rel'])} | {_pct1(r['fewer_tokens'])} | "
                   f"{_pct(r['bpb_gap'])} | ({r['inflected_windows'] or 0}) {_signed(r['inflected_rel'])}, "
                   f"{_pct(r['inflected_gap'])} | "
                   f"{_pct(r['continuation_gap'])} | {_pct(r['new_token_share'])} | {split} | `{r['source']}/` |")
    return out + [""]


FIT_FREE, FIT_OCCURRENCES = "the fit before 2026-12-04", "the fit of 2026-12-04"
FIT_OWN_COMPLETION = "the fit of 2026-12-05"
FIT_HALF_SHARE = "the fit of 2026-12-06 with background positions at half the objective"
#: raw-text folders whose distilled output rows come from an earlier fit than the default's: before
#: 2026-12-04 (from the subtoken-mean row, no penalty towards the first subtoken's row), of
#: 2026-12-04 (from the first subtoken's row with the penalty; away from the word, the completion
#: estimated by the word's occurrences instead of the teacher's own, output_rows.py), or of
#: 2026-12-05 (the teacher's own completion, without background positions), or of 2026-12-06 with the
#: background positions at half of each token's objective (the default has 90%: label ``_bg90``)
EARLIER_FIT = {"gemma3_n24": FIT_FREE, "smollm2_n24": FIT_FREE, "smollm2_n500": FIT_FREE,
               "gemma3_n24_r2": FIT_OCCURRENCES, "smollm2_n24_r2": FIT_OCCURRENCES, "smollm2_n500_r2": FIT_OCCURRENCES,
               "smollm2_n24_r3": FIT_OWN_COMPLETION, "smollm2_n100_r3": FIT_OWN_COMPLETION,
               "gemma3_n24_r3": FIT_HALF_SHARE, "smollm2_n24_r4": FIT_HALF_SHARE, "smollm2_n100_r4": FIT_HALF_SHARE}


def _floor_sentence(model: str, words: int, r: dict, fit: str = "default") -> str:
    """Where the default's extra bits go and what the floor implies for a 5% token saving (computed)."""
    x, orig = r["split"], r["original"]
    uses = max(x["uses"], 1)
    saved_per_use = r["fewer_tokens"] * orig["tokens"] / uses
    floor_at_5 = 0.05 * (x["floor_bits"] / uses) / (saved_per_use * orig["bits"] / orig["tokens"])
    return (f"Where the extra bits go (`{model}`, {words} words, {fit}): {x['at_words'] / uses:+.2f} bits per use of "
            f"a new token at the words, {x['new_mass'] / uses:+.2f} in the probability the new tokens take elsewhere, "
            f"{x['rest'] / uses:+.2f} the rest (mostly text read after a new token); the expected cost that any method "
            f"keeping the original rows pays is estimated at {x['floor_bits'] / uses:.2f} bits per use (high on documents "
            f"chosen for the words), against {(x['at_words'] + x['new_mass']) / uses:.2f} paid by the output rows (the "
            f"words and elsewhere). With these words ({saved_per_use:.1f} tokens saved per use) a list long enough for "
            f"5% fewer tokens would, by that estimate, pay about {100 * floor_at_5:.2f}% in bits per byte from it alone.")


def _sample_quality(a: dict, b: dict) -> str:
    """How the sampled text reads to the original model (bits per byte), and how many samples use a
    word, for the original model, then ``a`` -> ``b``; ``""`` for evaluations without these fields."""
    o = a["gen_original"]
    if not (o.get("original_bpb") and a.get("gen_bpb_orig") and b.get("gen_bpb_orig")):
        return ""
    return (f" (its bits per byte under the original model {o['original_bpb']:.2f} for the original's own samples, "
            f"{a['gen_bpb_orig']:.2f} -> {b['gen_bpb_orig']:.2f}; samples with a word {o['with_word']} -> "
            f"{a['gen_with_word']} -> {b['gen_with_word']} of {o['prompts']})")


def raw_text_readme() -> list[str]:
    """The README's lines on raw text: per model, Token Distillation with the output rows of
    ``--output_embeddings auto`` beside distilled ones (``td_chars`` / ``td_chars_outdistill``)."""
    by: dict[tuple, dict] = {}
    for model, words, label, r in _raw_text_rows():
        by.setdefault((model, words), {})[label] = r
    lines, floor = [], []
    for (model, words), m in sorted(by.items()):
        suffix = "" if "td_chars" in m else "_e1"  # 500 words: one epoch (two did not fit the session on CPU)
        # distilled output rows: the default fit (label _bg90) where it was measured, else the latest other fit
        a, b = m.get("td_chars" + suffix), m.get("td_chars_outdistill_bg90" + suffix) or m.get("td_chars_outdistill" + suffix)
        if not (a and b):
            continue
        old_fit = EARLIER_FIT.get(b["source"].name)
        if b["split"]:
            floor.append(_floor_sentence(model, words, b, old_fit or "default"))
        lines.append(f"`{model}`, {words} words{', 1 training epoch' if suffix else ''}: bits per byte {_signed(a['bpb_rel'])} vs the original model with "
                     f"subtoken-mean output rows (the earlier default; {_pct(a['bpb_gap'])} of the gap closed), "
                     f"{_signed(b['bpb_rel'])} with distilled ones (`--output_embeddings distill`"
                     f"{', ' + old_fit if old_fit else ', now the default'}; "
                     f"{_pct(b['bpb_gap'])}), {_pct1(b['fewer_tokens'])} fewer tokens; sampled text writes the new "
                     f"token {_pct(a['new_token_share'])} -> {_pct(b['new_token_share'])} of the time"
                     f"{_sample_quality(a, b)}; after "
                     f"inflected forms ({a['inflected_windows'] or 0} windows, small) {_pct(a['inflected_gap'])} -> "
                     f"{_pct(b['inflected_gap'])}.")
    if not lines:
        return []
    return ["### Raw text (bits per byte), details in [docs/results.md](docs/results.md)", ""] + \
        [" ".join(lines + floor), ""]


def _comparison_section() -> list[str]:
    if not (ROOT / "docs" / "evaluation.md").is_file():
        return []
    return ["### Method comparison (`scripts/compare_methods.py`)", "",
            "See [docs/evaluation.md](docs/evaluation.md) (generated, with its command and date), "
            "[docs/methods_table.md](docs/methods_table.md) (every method on the same snippets: training "
            "time, new-row norm, held-out distillation loss, new-token argmax rate) and "
            "[docs/methods.md](docs/methods.md).", ""]


def results_page() -> str:
    """``docs/results.md``: every generated table (links relative to docs/)."""
    parts = ["# Results", "", "Generated by `scripts/update_readme_results.py` from the files named below; rerun the "
             "named commands to reproduce them. Quality was measured on CPU (a 2-core machine) with the two "
             "small bundled models (SmolLM2-135M, Gemma-3-270M) and the shared PubMed abstracts; no trained 7B-8B "
             "model was measured. GPU speed and memory were measured once, on one H200 with random "
             "Llama-3.1-8B-shaped models (section GPU); `bash scripts/gpu_check.sh` measures them on your GPU.", ""]
    parts += (benchmark_section() + gpu_section() + summary_section("below") + raw_text_section() + sweep_section()
              + _comparison_section())
    return "\n".join(parts).replace("](docs/", "](").rstrip("\n") + "\n"


def flags_page() -> str:
    """``docs/flags.md``: every flag of apply_embedding_init.py (by stage) and of the evaluation."""
    import dataclasses

    from token_distillation.config import STAGES
    from token_distillation.evaluate import EvalConfig

    def table(cls) -> list[str]:
        rows = ["| flag | default | meaning |", "|---|---|---|"]
        for f in dataclasses.fields(cls):
            d = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
            d = getattr(d, "value", d)
            rows.append(f"| `--{f.name}` | `{d!r}` | {f.metadata.get('help', '').replace('|', '/')} |")
        return rows + [""]

    out = ["# Flags", "", "Generated from the config dataclasses (`token_distillation/config.py`, "
           "`token_distillation/evaluate.py`) by `scripts/update_readme_results.py`; `--help` prints the same text. "
           "A test fails when this page is stale.", "", "## apply_embedding_init.py", ""]
    for stage in STAGES:
        out += [f"### {stage.__doc__.strip().splitlines()[0]} (`{stage.__name__}`)", ""] + table(stage)
    out += ["## python -m token_distillation.evaluate", ""] + table(EvalConfig)
    return "\n".join(out).rstrip("\n") + "\n"


def render(readme: str) -> str:
    """``readme`` with its results block (the summary table and a link to docs/results.md) replaced
    (or appended) by the one built from the files."""
    parts = ["## Results", "", "Quality measured on CPU with the two small bundled models and the shared PubMed "
             "abstracts (no trained 7B-8B model yet). " + gpu_summary() + " Every table, the speed benchmarks and the "
             "sweeps: [docs/results.md](docs/results.md), generated by `scripts/update_readme_results.py`.", ""]
    parts += summary_section() + raw_text_readme()
    block = START + "\n" + "\n".join(parts) + "\n" + END
    if START in readme:
        pre, rest = readme.split(START, 1)
        if END not in rest:
            from token_distillation.config import ConfigError

            raise ConfigError(f"README.md has {START} but no {END} after it; add it where the results block ends")
        post = rest.split(END, 1)[1]
        return pre + block + post
    return readme.rstrip("\n") + "\n\n" + block + "\n"


def main(argv: list[str] | None = None) -> None:
    """Rewrite README.md's results block, docs/results.md and docs/flags.md (``argv``: no flags)."""
    import argparse

    from token_distillation.config import ConfigError
    from token_distillation.paths import replace_file

    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args(argv)
    path = ROOT / "README.md"
    if not path.is_file():
        raise ConfigError(f"{path} not found")
    try:
        text = render(path.read_text(encoding="utf-8"))
    except (KeyError, TypeError, IndexError, AttributeError) as e:
        raise ConfigError(f"a results file under docs/ lacks a field the README shows ({e!r}); regenerate it with "
                          "the script that wrote it") from None
    replace_file(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))
    for name, page in (("results.md", results_page), ("flags.md", flags_page)):
        body = page()
        replace_file(ROOT / "docs" / name, lambda tmp, body=body: tmp.write_text(body, encoding="utf-8"))


if __name__ == "__main__":
    from token_distillation.cli import exit_on_user_error

    exit_on_user_error(main)()
