#!/usr/bin/env python
"""Learning-rate sweep: held-out excess NLL and gap closed against the step size, for several
numbers of words trained together.

For every word count N (the first N tokens of ``--token_list``) this runs, through
``scripts/compare_methods.py`` (same corpus split, same snippets, one evaluation): subtoken-mean,
the paper recipe (``--recipe paper``, AdamW lr 1e-4, 1 epoch), and the per-token recipe at every
``--lr_relative`` value and every number of passes in ``--epochs`` (the steps: each pass is 25
updates per row with 25 snippets). Gap closed = 1 - excess_NLL(method) / excess_NLL(subtoken-mean), where
the original tokenization has excess 0 (so 0% = subtoken mean, 100% = original tokenization);
computed with the softmax over the original vocabulary and over the full extended vocabulary.

Writes ``<out_dir>/sweep.json``, ``<out_dir>/sweep.md`` and ``<out_dir>/sweep.png``.

Example (CPU, ~40 min):
    python scripts/sweep_lr.py --dataset_path ../shared/data/pubmed_abstracts/abstracts.jsonl \\
        --word_counts 24 --lr_relative 0.03,0.05,0.1 --epochs 1,2 --out_dir outputs/sweep
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))


def _words(token_list: Path, n: int) -> list[str]:
    if token_list.suffix == ".jsonl":
        toks = [json.loads(line)["token"] for line in token_list.read_text().splitlines() if line.strip()]
    else:
        toks = [line for line in token_list.read_text().split("\n") if line.strip()]
    if len(toks) < n:
        raise SystemExit(f"--token_list {token_list} has only {len(toks)} tokens, fewer than {n}")
    return toks[:n]


def _items(value) -> list[str]:
    """Fire passes "a,b" as a tuple and "a" as a scalar; accept both and plain strings."""
    if isinstance(value, (list, tuple)):
        return [str(v) for v in value]
    return [x.strip() for x in str(value).split(",") if x.strip()]


def gap_closed(excess: float | None, baseline: float | None) -> float | None:
    """1 - excess / baseline (None when undefined)."""
    if excess is None or not baseline:
        return None
    return 1.0 - excess / baseline


def main(dataset_path: str, token_list: str = "new_tokens/pubmed_frequency_smollm2_top500.jsonl",
         word_counts: str = "10,50,500", lr_relative: str = "0.03,0.05,0.1", epochs: str = "1,2",
         model_path: str = "smollm2-135m",
         out_dir: str = "outputs/sweep", windows_per_token: int = 4, common_flags: str = "",
         definition_tokens: int = 0, reuse_runs: bool = False, paper: bool = True) -> str:
    import compare_methods

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    counts = [int(x) for x in _items(word_counts)]
    lrs = [float(x) for x in _items(lr_relative)]
    passes = [int(x) for x in _items(epochs)]
    common = json.loads(common_flags) if isinstance(common_flags, str) and common_flags else (common_flags or {})
    rows = []
    t0 = time.time()
    for n in counts:
        wl = out / f"words{n}.txt"
        wl.write_text("".join(w + "\n" for w in _words(Path(token_list), n)))
        methods = ["subtoken-mean=subtoken-mean"]
        flags: dict = {}
        if paper:
            methods.append("paper=token_distillation")
            flags["paper"] = {"recipe": "paper"}
        for ep in passes:
            for lr in lrs:
                methods.append(f"per-token-{lr:g}-e{ep}=token_distillation")
                flags[f"per-token-{lr:g}-e{ep}"] = {"recipe": "per-token", "token_distillation_lr_relative": lr,
                                                    "token_distillation_epochs": ep}
        res_path = compare_methods.main(dataset_path=dataset_path, new_tokens_source=str(wl), model_path=model_path,
                                        methods=",".join(methods), method_flags=json.dumps(flags),
                                        common_flags=json.dumps(common), out_dir=str(out / f"n{n}"),
                                        windows_per_token=windows_per_token, definition_tokens=definition_tokens,
                                        reuse_runs=reuse_runs)
        res = json.loads(Path(res_path).read_text())
        base = res["methods"]["subtoken-mean"]
        for label, m in res["methods"].items():
            rows.append({
                "words": n, "method": label,
                "lr_relative": flags.get(label, {}).get("token_distillation_lr_relative"),
                "epochs": flags.get(label, {}).get("token_distillation_epochs"),
                "excess_nll_orig": m["excess_nll_orig"], "excess_nll_full": m["excess_nll_full"],
                "gap_closed_orig": gap_closed(m["excess_nll_orig"], base["excess_nll_orig"]),
                "gap_closed_full": gap_closed(m["excess_nll_full"], base["excess_nll_full"]),
                "new_token_argmax_rate": m["new_token_argmax_rate"], "train_seconds": m.get("train_seconds"),
                "tokens_evaluated": m.get("aggregated_over_tokens"),
            })
    summary = {"created": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "model_path": model_path,
               "dataset_path": dataset_path, "token_list": token_list, "common_flags": common,
               "command": "python scripts/sweep_lr.py " + " ".join(sys.argv[1:]), "seconds": time.time() - t0,
               "rows": rows}
    (out / "sweep.json").write_text(json.dumps(summary, indent=2))

    def f(v, pct=False):
        return "-" if v is None else (f"{100 * v:.0f}%" if pct else f"{v:.4f}")

    lines = [f"Generated by `{summary['command']}` on {summary['created']}; model `{model_path}`, corpus "
             f"`{dataset_path}` (split by document by compare_methods.py).", "",
             "| words | method | excess NLL orig. vocab | excess NLL full vocab | gap closed (orig.) | gap closed (full) "
             "| new-token argmax rate | train s |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['words']} | {r['method']} | {f(r['excess_nll_orig'])} | {f(r['excess_nll_full'])} | "
                     f"{f(r['gap_closed_orig'], True)} | {f(r['gap_closed_full'], True)} | "
                     f"{f(r['new_token_argmax_rate'])} | {f(r['train_seconds'])} |")
    (out / "sweep.md").write_text("\n".join(lines) + "\n")

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for n in counts:
        for ep in passes:
            pts = sorted((r["lr_relative"], r) for r in rows
                         if r["words"] == n and r["lr_relative"] is not None and r["epochs"] == ep)
            for ax, key in zip(axes, ("gap_closed_orig", "gap_closed_full")):
                ax.plot([p[0] for p in pts], [100 * (p[1][key] or 0) for p in pts], marker="o",
                        label=f"{n} words, {ep} epoch{'s' if ep > 1 else ''}")
            paper_row = [r for r in rows if r["words"] == n and r["method"] == "paper"]
            if paper_row and paper_row[0][key] is not None:
                ax.axhline(100 * paper_row[0][key], ls="--", lw=1, color=ax.lines[-1].get_color())
    for ax, title in zip(axes, ("gap closed, original vocabulary", "gap closed, full vocabulary")):
        ax.set_xscale("log")
        ax.set_xlabel("--token_distillation_lr_relative (per-token recipe)")
        ax.set_ylabel("% of held-out excess NLL closed")
        ax.set_title(title + "\n(dashed: paper recipe)")
        ax.legend()
    fig.tight_layout()
    fig.savefig(out / "sweep.png", dpi=100)
    return str(out / "sweep.json")


if __name__ == "__main__":
    import fire

    from token_distillation.cli import configure_logging

    configure_logging()
    fire.Fire(main)
