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
    out = ["### Speed and memory (`scripts/benchmark.py`)", "",
           "| file | date | device | model | target layer | comparator snippets/s | product snippets/s | speed-up "
           "| speed-up, later epochs (teacher cached) | speed-up, half of each batch cached "
           "| FLOP ratio (first / later epochs) | MFU comparator / product "
           "| held-out loss comparator / product | optimizer state comparator / product | trainable params comparator / product |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    runs = [(f, _load(f)) for f in files]
    for f, r in runs:
        c, p = r["comparator"], r["product"]
        out.append(f"| `{f.relative_to(ROOT)}` | {r['date']} | {r['device']} {r['dtype']} | {r['model']} | "
                   f"{r['target_layer']} of {r['layers']} | {c['snippets_per_s']:.2f} | {p['snippets_per_s']:.2f} | "
                   f"{r['speedup']:.2f}x | "
                   + (f"{r['speedup_teacher_cached']:.2f}x" if "speedup_teacher_cached" in r else "-")
                   + (f" | {r['speedup_half_cached']:.2f}x" if "speedup_half_cached" in r else " | -")
                   + (f" | {r['flop_ratio']:.2f}x / {r['flop_ratio_teacher_cached']:.2f}x" if "flop_ratio" in r else " | -")
                   + (f" | {c['mfu']:.2f} / {p['mfu']:.2f}" if "mfu" in c else " | -")
                   + f" | {r['heldout_loss']['comparator']:.5f} / {r['heldout_loss']['product']:.5f} | "
                   f"{c['optimizer_state_bytes'] / 2**20:.1f} MiB / {p['optimizer_state_bytes'] / 2**20:.2f} MiB | "
                   f"{c['trainable_params']:,} / {p['trainable_params']:,} |")
    o = runs[0][1]["optimizer_state_bytes_1000_tokens_hidden4096"]
    out += ["", f"Optimizer state for 1,000 new tokens at hidden 4096 (8B-class shape, vocabulary 128,256): "
            f"{o['product_measured'] / 1e6:.1f} MB measured for the product's AdamW state; the comparator's "
            f"full-vocabulary AdamW state is {o['comparator_formula'] / 1e9:.1f} GB (2 x 4 bytes x 128,256 x 4,096).",
            "FLOP ratio: the comparator's model FLOPs per step divided by the product's; speed-up = FLOP ratio x "
            "(product MFU / comparator MFU). The product saves FLOPs by skipping the logits, the layers above the "
            "target layer and, for the positions before the word (the shared prefix, about a quarter of a 50-token "
            "snippet), the second forward and the backward; the positions after the word, where the loss is "
            "non-zero, still need a teacher forward, a student forward and a student backward (about one forward "
            "each). At about equal MFU a first-epoch speed-up above the FLOP ratio needs fewer FLOPs, which "
            "exact distillation on the same snippets does not allow.",
            "Half of each batch cached: the epochs after the first when the teacher cache holds only part of the "
            "snippets (over its budget, `--teacher_cache_gib`, or after a resume); the teacher then runs for the "
            "snippets it lacks only.",
            "Commands: " + "; ".join(f"`{r['command']}`" for _, r in runs), ""]
    return out


def default_label() -> str:
    """The sweep label of the product's default recipe (per-token, default step size and epochs)."""
    from token_distillation.config import RECIPE_EPOCHS, Recipe, TrainConfig

    return f"per-token-{TrainConfig().token_distillation_lr_relative:g}-e{RECIPE_EPOCHS[Recipe.PER_TOKEN]}"


def _sweeps() -> list[Path]:
    return sorted((ROOT / "docs" / "sweep").rglob("sweep.json"), key=lambda p: (len(p.parts), p))


def summary_rows(sweeps: list[dict], label: str) -> list[tuple]:
    """``(model, words, default row, paper row or None, source, created)`` per (model, words).

    ``sweeps``: parsed sweep.json files, each with a ``source`` key (its folder). When several sweeps
    measured the default ``label`` for the same model and number of words, the newest (``created``)
    is shown, so a rerun replaces an older measurement instead of adding a second row.
    """
    best: dict[tuple, tuple] = {}
    for s in sweeps:
        by: dict[int, dict] = {}
        for r in s["rows"]:
            by.setdefault(r["words"], {})[r["method"]] = r
        for words, methods in by.items():
            if label not in methods:
                continue
            key = (s["model_path"], words)
            row = (s["model_path"], words, methods[label], methods.get("paper"), s["source"], s["created"])
            if key not in best or row[5] > best[key][5]:
                best[key] = row
    return [best[k] for k in sorted(best)]


def summary_section(where: str = "in [docs/results.md](docs/results.md)") -> list[str]:
    """One row per (model, number of words) measured: the default recipe beside the paper recipe."""
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
           f"Default: `{label}` (per-token recipe); paper: AdamW lr 1e-4, 1 epoch. Measured (dates in the sweeps) "
           f"before the per-token recipe stopped passing gradient to other new tokens that occur in a token's "
           f"snippets (2026-12-03); runs where new tokens co-occur (more so at 500 words) may change when re-measured.", "",
           "| model | words trained together | default: gap closed (orig. / full) | default: new-token argmax rate "
           "| paper: gap closed (orig. / full) | paper: new-token argmax rate | source |",
           "|---|---|---|---|---|---|---|"]
    for model, words, d, p, src, _ in rows:
        paper = (f"{_pct(p['gap_closed_orig'])} / {_pct(p['gap_closed_full'])} | {_num(p['new_token_argmax_rate'])}"
                 if p else "not measured | -")
        out.append(f"| `{model}` | {words} | {_pct(d['gap_closed_orig'])} / {_pct(d['gap_closed_full'])} | "
                   f"{_num(d['new_token_argmax_rate'])} | {paper} | `{src}/` |")
    return out + [""]


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
             "named commands to reproduce them. Everything here was measured on CPU (a 2-core machine) with the two "
             "small bundled models (SmolLM2-135M, Gemma-3-270M) and the shared PubMed abstracts; no trained 7B-8B "
             "model was measured. GPU: not measured on GPU; `bash scripts/gpu_check.sh` prints training seconds per "
             "1,000 new tokens and the peak GPU memory beside the memory plan for a random Llama-3.1-8B-shaped "
             "model.", ""]
    parts += benchmark_section() + summary_section("below") + sweep_section() + _comparison_section()
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
    parts = ["## Results", "", "Measured on CPU with the two small bundled models and the shared PubMed abstracts "
             "(no trained 7B-8B model yet). GPU speed and memory: not measured on GPU; `bash scripts/gpu_check.sh` "
             "prints them for a random Llama-3.1-8B-shaped model. Every table, the speed benchmarks and the sweeps: "
             "[docs/results.md](docs/results.md), generated by `scripts/update_readme_results.py`.", ""]
    parts += summary_section()
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
