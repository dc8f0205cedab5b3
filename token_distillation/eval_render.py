"""Rendering of evaluation results (:func:`token_distillation.evaluate.evaluate`): markdown tables,
the figure, and the output files ``evaluation.{json,md,png}``."""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

from .metrics import METRICS

logger = logging.getLogger(__name__)


def _fmt(v, digits: int = 4) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def markdown_tables(results: dict[str, Any], per_token_rows: int = 0) -> str:
    """The method table and the per-token table (sorted by the first method's excess NLL, worst first).

    Args:
        per_token_rows: show at most this many per-token rows (0: all).
    """
    methods = results["methods"]
    labels = list(methods)
    lines = ["| method | " + " | ".join(t for _, t, _ in METRICS) + " | tokens/doc before -> after | new-row norm |",
             "|---|" + "---|" * (len(METRICS) + 2)]
    for lab in labels:
        m = methods[lab]
        lines.append(f"| {lab} | " + " | ".join(_fmt(m[k]) for k, _, _ in METRICS)
                     + f" | {m['tokens_per_doc_before']:.1f} -> {m['tokens_per_doc_after']:.1f} "
                       f"({100 * (1 - m['compression_ratio']):.2f}% fewer) | {_fmt(m['mean_new_row_norm'], 3)} |")
    lines.append("")
    differ = results.get("token_sets_differ")
    if differ:
        lines += ["**The models have different new tokens** (" + ", ".join(f"{k}: {v}" for k, v in differ.items())
                  + " tokens): the per-token means above use the tokens every model has, but bits per byte, inflected "
                    "forms and generation compare models with different token sets.", ""]
    lines += _bpb_table(results)
    lines += _excess_table(results)
    lines += _inflected_table(results)
    lines += _generation_table(results)
    first = labels[0]
    per = results["per_token"]
    toks = sorted(per[first], key=lambda t: -(per[first][t]["excess_nll_full"] if per[first][t]["excess_nll_full"] is not None else -1e9))
    if per_token_rows:
        toks = toks[:per_token_rows]
    lines.append("| token | subtokens | windows | " + " | ".join(f"excess NLL full: {lab}" for lab in labels)
                 + " | " + " | ".join(f"excess NLL orig: {lab}" for lab in labels) + " |")
    lines.append("|---|---|---|" + "---|" * (2 * len(labels)))
    for t in toks:
        row = per[first][t]
        cells = [_fmt(per[lab].get(t, {}).get("excess_nll_full")) for lab in labels]
        cells += [_fmt(per[lab].get(t, {}).get("excess_nll_orig")) for lab in labels]
        lines.append(f"| `{t!r}` | {' '.join(row['subtokens'])} | {row['windows']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _pct(v) -> str:
    return "-" if v is None else f"{100 * v:.0f}%"


def _bpb_table(results: dict[str, Any]) -> list[str]:
    """Bits per byte of raw held-out text, original model first (empty when not measured)."""
    orig = results.get("bpb_original")
    if not orig:
        return []
    ref = results.get("bpb_reference")
    lines = [f"Raw text: {orig['docs']} held-out documents that contain the words ({orig['bytes']:,} bytes), each model "
             "through its own tokenizer, every token a target" + (f"; gap closed against `{ref}`" if ref else
                                                                "; no gap closed (no subtoken-mean model evaluated)") + ".",
             "", "| model | bits per byte | vs original | tokens per byte | new-token targets | bits per new-token "
             "target | bits per other target | BPB gap closed |", "|---|---|---|---|---|---|---|---|"]
    rows = [("original", orig)] + [(lab, m["bpb"]) for lab, m in results["methods"].items() if m.get("bpb")]
    for lab, b in rows:
        rel = f"{100 * (b['bpb'] / orig['bpb'] - 1):+.2f}%"
        lines.append(f"| {lab} | {b['bpb']:.4f} | {rel} | {b['tokens_per_byte']:.4f} | {b['new_token_targets']} | "
                     f"{_fmt(b['bits_per_new_token_target'], 2)} | {_fmt(b['bits_per_other_target'], 3)} | "
                     f"{_pct(b.get('gap_closed'))} |")
    return lines + [""]


def _excess_table(results: dict[str, Any]) -> list[str]:
    """Where each extended model's extra bits on raw text go (empty when not measured)."""
    rows = [(lab, m["bpb"]["excess_split"]) for lab, m in results["methods"].items()
            if (m.get("bpb") or {}).get("excess_split")]
    orig = results.get("bpb_original")
    if not rows or not orig:
        return []
    lines = ["Where the extra bits go, in bits per use of a new token (text cut where both tokenizations end a "
             "token): at the words (segments holding a new token, against the original's bits for the same "
             "characters), the probability the new tokens take from the original tokens elsewhere, and the rest "
             "(mostly the text read after a new token). Floor (estimated, compare it with at the words + elsewhere): on "
             "average over text drawn from the original model, output rows that match its word probability "
             "everywhere, with the original rows kept, still pay log2(e) x (1 - the original's probability of "
             "the word there) per use, up to 1.44 bits (derived in `token_distillation/bpb.py`; documents chosen "
             "for the words can pay less); in parentheses, the share of the original's bits.", "",
             "| model | uses | extra bits per use (total) | at the words | new tokens' probability elsewhere | rest | "
             "floor |", "|---|---|---|---|---|---|---|"]
    for lab, x in rows:
        n = x["uses"] or 1
        share = lambda v: f"{v / n:+.2f} ({100 * v / orig['bits']:+.2f}%)"  # noqa: E731
        lines.append(f"| {lab} | {x['uses']} | {share(x['total'])} | {share(x['at_words'])} | {share(x['new_mass'])} | "
                     f"{share(x['rest'])} | {share(x['floor_bits'])} |")
    return lines + [""]


def _inflected_table(results: dict[str, Any]) -> list[str]:
    """Bits per byte after inflected forms (a new token used inside a longer word; empty when not measured)."""
    orig = results.get("inflected_original")
    if not orig:
        return []
    lines = [f"Inflected forms: {orig['docs']} held-out window{'s' * (orig['docs'] != 1)} where the extended tokenizer uses a new token inside "
             "a longer word (' agonist' in ' agonists'); bits per byte of the text after that word "
             f"({orig['bytes']:,} bytes), each model through its own tokenizer"
             + ("" if results.get("bpb_reference") else "; no gap closed (no subtoken-mean model evaluated)") + ".", "",
             "| model | bits per byte after the word | vs original | gap closed |", "|---|---|---|---|"]
    rows = [("original", orig)] + [(lab, m["inflected"]) for lab, m in results["methods"].items() if m.get("inflected")]
    for lab, b in rows:
        lines.append(f"| {lab} | {b['bpb']:.4f} | {100 * (b['bpb'] / orig['bpb'] - 1):+.2f}% | "
                     f"{_pct(b.get('gap_closed'))} |")
    return lines + [""]


def _generation_table(results: dict[str, Any]) -> list[str]:
    """Sampled generation after prompts that end before a word (empty when not measured)."""
    orig = results.get("generation_original")
    if not orig:
        return []
    lines = [f"Sampled generation: {orig['prompts']} prompts cut from held-out text right before a word, "
             "seeded sampling at temperature 1.", "",
             "| model | continuations with a word | written as the new token | tokens per byte | bits per byte "
             "under the original model |", "|---|---|---|---|---|"]
    rows = [("original", orig)] + [(lab, m["generation"]) for lab, m in results["methods"].items()
                                   if m.get("generation")]
    for lab, g in rows:
        lines.append(f"| {lab} | {g['with_word']} of {g['prompts']} | {_pct(g['word_share'])} | "
                     f"{_fmt(g['tokens_per_byte'], 4)} | {_fmt(g.get('original_bpb'), 4)} |")
    return lines + [""]


def plot(results: dict[str, Any], path: Path) -> None:
    """Bar charts of the aggregated metrics, one bar per method (matplotlib, Agg backend)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(results["methods"])
    keys = [(k, t, b) for k, t, b in METRICS if any(results["methods"][lab][k] is not None for lab in labels)]
    cols = 3
    rowsn = math.ceil(len(keys) / cols)
    fig, axes = plt.subplots(rowsn, cols, figsize=(4.2 * cols, 3.2 * rowsn), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, (k, title, better) in zip(axes.flat, keys):
        vals = [results["methods"][lab][k] or 0.0 for lab in labels]
        ax.bar(range(len(labels)), vals, color=[colors[i % len(colors)] for i in range(len(labels))])
        ax.set_title(f"{title}\n({better} is better)", fontsize=9)
        ax.set_xticks(range(len(labels)))
        ax.set_xticklabels(labels, rotation=20, ha="right", fontsize=8)
        ax.axhline(0, color="black", linewidth=0.6)
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    s = results["setup"]
    fig.suptitle(f"{s['model_path']}: {s['words_with_windows']} new tokens, {s['windows']} held-out windows", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110, format="png")
    plt.close(fig)


def write_outputs(results: dict[str, Any], out: Path) -> None:
    """Write evaluation.json, evaluation.md and evaluation.png into ``out`` (created if needed), each
    file replaced whole (never seen half-written); ``out`` was claimed by
    :func:`token_distillation.evaluate.evaluate` before any work."""
    from .paper_tables import write_json, write_text
    from .paths import replace_file

    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "evaluation.json", results)
    s = results["setup"]
    md = (f"# Evaluation of new tokens\n\nModel `{s['model_path']}`; held-out corpus `{s['dataset_path']}` "
          f"({s['heldout_docs']} documents, {s['excluded_training_docs']} training documents excluded); "
          f"{s['windows']} windows of {s['window_len']} tokens for {s['words_with_windows']} words; "
          f"created {s['created']}.\n\n" + markdown_tables(results) + "\n![metrics](evaluation.png)\n")
    write_text(out / "evaluation.md", md)
    replace_file(out / "evaluation.png", lambda tmp: plot(results, Path(tmp)), flag="--out_path")
    logger.info("wrote %s/evaluation.{json,md,png}", out)
