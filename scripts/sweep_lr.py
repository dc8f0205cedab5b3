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

Writes ``<out_dir>/sweep.json``, ``<out_dir>/sweep.md`` and ``<out_dir>/sweep.png`` (and, per word
count N, ``words<N>.txt`` and compare_methods.py's output ``n<N>/``). Every flag is checked before
anything is written or loaded (bad input: one ``error:`` line, exit code 2). ``--out_dir`` must be
new, empty or an earlier output of this script (recognised by the marker file
``token_distillation_script.json`` it writes there; rerun on it with ``--reuse_runs`` to keep the
finished runs and continue interrupted ones from their checkpoints); a directory holding other files is refused.

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

from token_distillation.config import ConfigError  # noqa: E402
from token_distillation.paths import claim_script_dir, replace_file  # noqa: E402


def _tokens(token_list: Path, n: int) -> list[str]:
    """The first ``n`` tokens of ``--token_list`` (a .jsonl file of {"token": ...} records, or one
    token per line).

    Raises:
        ConfigError: the file is missing or unreadable, a record is not valid, or it holds fewer
            than ``n`` tokens.
    """
    if not token_list.is_file():
        raise ConfigError(f"--token_list {token_list}: file not found")
    try:
        text = token_list.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"--token_list {token_list}: cannot read it ({e})") from None
    if token_list.suffix == ".jsonl":
        toks = []
        for i, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except ValueError:
                rec = None
            if not isinstance(rec, dict) or not isinstance(rec.get("token"), str):
                raise ConfigError(f"--token_list {token_list}: line {i} is not a JSON object with a \"token\" string")
            toks.append(rec["token"])
    else:
        toks = [line for line in text.split("\n") if line.strip()]
    if len(toks) < n:
        raise ConfigError(f"--token_list {token_list} has only {len(toks)} tokens, fewer than {n} (--word_counts)")
    return toks[:n]


def _items(value) -> list[str]:
    """Fire passes "a,b" as a tuple and "a" as a scalar; accept both and plain strings."""
    if isinstance(value, (list, tuple)):
        return [str(v) for v in value]
    return [x.strip() for x in str(value).split(",") if x.strip()]


def _positive(value, flag: str, kind=int) -> list:
    """The comma-separated list ``value`` as positive numbers of type ``kind`` (int or float).

    Raises:
        ConfigError: an empty list, or an entry that is not a positive ``kind``.
    """
    items = _items(value)
    if not items:
        raise ConfigError(f"{flag} is empty; pass comma-separated positive numbers")
    out = []
    for x in items:
        try:
            v = kind(x)
        except ValueError:
            v = None
        if v is None or not v > 0 or v != v or v == float("inf"):
            what = "positive integers" if kind is int else "positive numbers"
            raise ConfigError(f"{flag}: {x!r} is not allowed; pass comma-separated {what}")
        out.append(v)
    return out


def gap_closed(excess: float | None, baseline: float | None) -> float | None:
    """1 - excess / baseline (None when undefined)."""
    if excess is None or not baseline:
        return None
    return 1.0 - excess / baseline


def _secs(r: dict) -> str:
    """Training seconds; a run resumed from a checkpoint without its time counts the later steps only."""
    s = "-" if r.get("train_seconds") is None else f"{r['train_seconds']:.0f}"
    return s + (f" (from step {r['train_seconds_from_step']})" if r.get("train_seconds_from_step") else "")


def render(out_dir):
    """Write ``sweep.md`` (table) and ``sweep.png`` (gap closed against the learning rate, one line
    per word count and number of passes; the paper recipe dashed, in the same colour, on both
    panels) from ``<out_dir>/sweep.json``; returns the matplotlib figure. Each file is replaced
    whole (written to a temporary file first).

    Raises:
        ConfigError: sweep.json is missing, not valid JSON, or lacks a field this needs.
    """
    out = Path(out_dir)
    try:
        summary = json.loads((out / "sweep.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ConfigError(f"--out_dir {out}: cannot read sweep.json ({e})") from None
    try:
        return _render(out, summary)
    except (KeyError, TypeError, AttributeError) as e:
        raise ConfigError(f"--out_dir {out}: sweep.json is not a sweep_lr.py summary (missing or wrong "
                          f"{e})") from None


def _render(out: Path, summary: dict):
    from matplotlib.figure import Figure
    from update_readme_results import _num, _pct

    rows = summary["rows"]
    lines = [f"Generated by `{summary['command']}` on {summary['created']}; model `{summary['model_path']}`, corpus "
             f"`{summary['dataset_path']}` (split by document by compare_methods.py).", "",
             "| words | method | excess NLL orig. vocab | excess NLL full vocab | gap closed (orig.) | gap closed (full) "
             "| new-token argmax rate | train s |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['words']} | {r['method']} | {_num(r['excess_nll_orig'])} | {_num(r['excess_nll_full'])} | "
                     f"{_pct(r['gap_closed_orig'])} | {_pct(r['gap_closed_full'])} | "
                     f"{_num(r['new_token_argmax_rate'])} | {_secs(r)} |")
    replace_file(out / "sweep.md", lambda tmp: tmp.write_text("\n".join(lines) + "\n", encoding="utf-8"))

    keys = ("gap_closed_orig", "gap_closed_full")
    fig = Figure(figsize=(10, 4))
    axes = fig.subplots(1, 2)
    for i, n in enumerate(sorted({r["words"] for r in rows})):
        colour = f"C{i % 10}"  # one colour per word count, the same on both panels
        for k, ep in enumerate(sorted({r["epochs"] for r in rows if r["words"] == n and r["epochs"] is not None})):
            pts = sorted((r["lr_relative"], r) for r in rows
                         if r["words"] == n and r["lr_relative"] is not None and r["epochs"] == ep)
            for ax, key in zip(axes, keys):
                ax.plot([p[0] for p in pts], [100 * (p[1][key] or 0) for p in pts], marker="os^Dv"[k % 5],
                        color=colour, label=f"{n} words, {ep} epoch{'s' if ep > 1 else ''}")
        for r in (r for r in rows if r["words"] == n and r["method"] == "paper"):
            for ax, key in zip(axes, keys):
                if r[key] is not None:
                    ax.axhline(100 * r[key], ls="--", lw=1, color=colour, label=f"{n} words, paper recipe")
    for ax, title in zip(axes, ("gap closed, original vocabulary", "gap closed, full vocabulary")):
        ax.set_xscale("log")
        ax.set_xlabel("--token_distillation_lr_relative (per-token recipe)")
        ax.set_ylabel("% of held-out excess NLL closed")
        ax.set_title(title + "\n(dashed: paper recipe)")
        ax.legend()
    fig.tight_layout()
    replace_file(out / "sweep.png", lambda tmp: fig.savefig(tmp, dpi=100, format="png"))
    return fig


def main(dataset_path: str = "", token_list: str = "new_tokens/pubmed_frequency_smollm2_top500.jsonl",
         word_counts: str = "10,50,500", lr_relative: str = "0.03,0.05,0.1", epochs: str = "1,2",
         model_path: str = "smollm2-135m",
         out_dir: str = "outputs/sweep", windows_per_token: int = 4, common_flags: str = "",
         definition_tokens: int = 0, reuse_runs: bool = False, paper: bool = True, render_only: bool = False) -> str:
    """Run the sweep (see the module docstring); ``--render_only``: only redraw sweep.md / sweep.png
    from an existing ``<out_dir>/sweep.json``.

    Raises:
        ConfigError: bad input, before anything is written or loaded: a missing ``--dataset_path``
            or ``--token_list``, word counts / step sizes / epochs that are not positive numbers,
            fewer tokens than the largest word count, invalid ``--common_flags``, an ``--out_dir``
            that holds files this script did not write (see
            :func:`token_distillation.paths.claim_script_dir`).
    """
    if not str(out_dir).strip():
        raise ConfigError("--out_dir is empty; pass an output directory")
    out = Path(out_dir).expanduser()
    if render_only:
        if not (out / "sweep.json").is_file():
            raise ConfigError(f"--render_only: no sweep.json in --out_dir {out}; run the sweep first")
        render(out)
        return str(out / "sweep.json")
    if not str(dataset_path).strip():
        raise ConfigError("--dataset_path is required (a JSONL corpus, e.g. ../shared/data/pubmed_abstracts/"
                          "abstracts.jsonl)")
    if not Path(dataset_path).expanduser().is_file():
        raise ConfigError(f"--dataset_path {dataset_path}: file not found; pass a JSON Lines corpus")
    import compare_methods

    counts = list(dict.fromkeys(_positive(word_counts, "--word_counts", int)))
    lrs = list(dict.fromkeys(_positive(lr_relative, "--lr_relative", float)))
    passes = list(dict.fromkeys(_positive(epochs, "--epochs", int)))
    common = compare_methods._parse_json(common_flags, "common_flags")
    words = _tokens(Path(token_list), max(counts))
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
    compare_args = dict(dataset_path=dataset_path, model_path=model_path, methods=",".join(methods),
                        method_flags=json.dumps(flags), common_flags=json.dumps(common),
                        windows_per_token=windows_per_token, definition_tokens=definition_tokens)
    # every compare_methods.py run's flags (the token list stands in for its first N words)
    compare_methods.check_inputs(**compare_args, new_tokens_source=token_list, out_dir=str(out / f"n{counts[0]}"),
                                 heldout_fraction=0.1, max_docs=0, text_column="text", seed=42, window_len=50,
                                 device="auto", docs_md="")
    claim_script_dir(out, "sweep_lr.py", [f"words{n}.txt" for n in counts] + [f"n{n}/" for n in counts]
                     + ["sweep.json", "sweep.md", "sweep.png"])
    rows = []
    t0 = time.time()
    for n in counts:
        wl = out / f"words{n}.txt"
        replace_file(wl, lambda tmp: tmp.write_text("".join(w + "\n" for w in words[:n]), encoding="utf-8"))
        res_path = compare_methods.main(**compare_args, new_tokens_source=str(wl), out_dir=str(out / f"n{n}"),
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
                "train_seconds_from_step": m.get("train_seconds_from_step") or 0,
                "tokens_evaluated": m.get("aggregated_over_tokens"),
            })
    summary = {"created": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "model_path": model_path,
               "dataset_path": dataset_path, "token_list": token_list, "common_flags": common,
               "command": "python scripts/sweep_lr.py " + " ".join(sys.argv[1:]), "seconds": time.time() - t0,
               "rows": rows}
    replace_file(out / "sweep.json", lambda tmp: tmp.write_text(json.dumps(summary, indent=2), encoding="utf-8"))
    render(out)
    return str(out / "sweep.json")


if __name__ == "__main__":
    import inspect

    from token_distillation.cli import configure_logging, exit_on_user_error, run_fire

    configure_logging()
    # unknown flags, bad values, missing inputs: one error line, exit code 2
    run_fire(exit_on_user_error(main), set(inspect.signature(main).parameters), None, "sweep_lr.py")
