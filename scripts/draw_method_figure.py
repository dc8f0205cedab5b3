#!/usr/bin/env python
"""Draw the method figure: ``assets/token-distillation.png`` and ``.svg`` (plus a ``.json`` record).

The figure shows Token Distillation (Dobler et al., arXiv 2505.20133) on one real example: the
teacher reads the original subtokens of " hepatotoxicity", the student reads the single new
token, student positions are aligned with teacher positions (the new token with the last
subtoken), hidden states are compared at the target layer (MSE), and only the new row of the
input-embedding matrix is trainable.

The tokens come from the bundled SmolLM2-135M tokenizer, and the alignment from the project's own
``token_distillation.alignment.merge``. If the tokenizer is not installed, a tokenization recorded
from it (``RECORDED`` below) is used instead, and the figure's caption and the log say so.

Regenerate (byte-for-byte identical for the same matplotlib/FreeType versions and inputs)::

    python scripts/draw_method_figure.py            # writes assets/token-distillation.{png,svg,json}

Sources of nondeterminism that are pinned: matplotlib's rcParams are reset to the library defaults
and then fixed (DejaVu Sans bundled with matplotlib, text drawn as paths in the SVG,
``svg.hashsalt``), the SVG/PNG metadata carry no date, the figure size and dpi are constants, the
illustrative hidden-state colours come from a fixed-seed generator, and the PNG is written by the
Agg backend directly (no pyplot state, no interactive backend).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

logger = logging.getLogger("draw_method_figure")

MODEL_ALIAS = "smollm2-135m"
MODEL_NAME = "SmolLM2-135M"
SENTENCE = "The drug caused severe hepatotoxicity in two patients."
WORD = " hepatotoxicity"
STEM = "token-distillation"
DPI = 150
FIGSIZE = (13.4, 7.3)  # inches
SVG_HASHSALT = "token-distillation-figure"

# The SmolLM2-135M tokenizer's output for SENTENCE (BOS + text) and WORD, recorded with
# ``python scripts/draw_method_figure.py`` (tests/test_figure.py checks it against the live tokenizer).
RECORDED = {
    "teacher_ids": [1, 504, 2547, 2952, 3523, 13430, 48952, 281, 827, 2200, 30],
    "teacher_tokens": ["<|im_start|>", "The", "Ġdrug", "Ġcaused", "Ġsevere", "Ġhepat", "otoxicity",
                       "Ġin", "Ġtwo", "Ġpatients", "."],
    "word_ids": [13430, 48952],
    "new_id": 49152,
    "new_token": "Ġhepatotoxicity",
    "num_layers": 30,
    "hidden_size": 576,
}

# Colours (colour-blind safe: Okabe-Ito based).
C_TEACHER = "#0072B2"
C_TEACHER_BG = "#E3EEF7"
C_STUDENT = "#009E73"
C_STUDENT_BG = "#E0F3EC"
C_WORD = "#E69F00"
C_WORD_BG = "#FCEFD2"
C_LOSS = "#D55E00"
C_GREY = "#7F7F7F"
C_LIGHT = "#F2F2F2"
C_TEXT = "#222222"


@dataclass(frozen=True)
class Example:
    """One teacher/student pair, as the pipeline builds it.

    Attributes:
        sentence: the example text.
        word: the new token's surface form (leading space included).
        teacher_ids / teacher_tokens: ``[teacher_len]`` BOS + original token ids and their strings.
        student_ids / student_tokens: ``[student_len]`` the same with the word's subtokens merged
            into the new id.
        student_to_teacher: ``[student_len]`` aligned teacher position of each student position.
        first_new: student position of the new token.
        word_span: ``(start, end)`` teacher positions of the word's subtokens (end exclusive).
        new_id: the new token's id (the first free id of the tokenizer).
        num_layers, hidden_size: of the model (for the labels).
        source: "tokenizer" (live bundled tokenizer) or "recorded" (``RECORDED`` fallback).
    """

    sentence: str
    word: str
    teacher_ids: tuple[int, ...]
    teacher_tokens: tuple[str, ...]
    student_ids: tuple[int, ...]
    student_tokens: tuple[str, ...]
    student_to_teacher: tuple[int, ...]
    first_new: int
    word_span: tuple[int, int]
    new_id: int
    num_layers: int
    hidden_size: int
    source: str


def _live_tokenization() -> dict:
    """Tokenize SENTENCE and WORD with the bundled tokenizer; raise if it is unavailable."""
    from token_distillation.models import default_cache_root, load_config, load_tokenizer, resolve_model_source
    from token_distillation.tokenization import bos_prefix, subtoken_ids

    src = resolve_model_source(MODEL_ALIAS)
    tok = load_tokenizer(src, default_cache_root())
    cfg = load_config(src, default_cache_root())
    teacher_ids = bos_prefix(tok) + list(tok.encode(SENTENCE, add_special_tokens=False))
    word_ids = subtoken_ids(tok, WORD)
    return {
        "teacher_ids": [int(i) for i in teacher_ids],
        "teacher_tokens": list(tok.convert_ids_to_tokens(teacher_ids)),
        "word_ids": [int(i) for i in word_ids],
        "new_id": len(tok),
        "new_token": "".join(tok.convert_ids_to_tokens(word_ids)),
        "num_layers": int(cfg.num_hidden_layers),
        "hidden_size": int(cfg.hidden_size),
    }


def build_example(use_tokenizer: bool = True) -> Example:
    """Tokenize the example and align it with the project's own ``merge``.

    Args:
        use_tokenizer: try the bundled tokenizer first; False forces the recorded tokenization.

    Returns:
        the :class:`Example`; ``source`` says which tokenization was used.
    """
    from token_distillation.alignment import PhraseMatcher, merge

    rec, source = RECORDED, "recorded"
    if use_tokenizer:
        try:
            rec, source = _live_tokenization(), "tokenizer"
        except Exception as e:  # noqa: BLE001 - any failure to load means: use the recorded tokens
            logger.warning("bundled %s tokenizer unavailable (%s: %s); using the recorded tokenization",
                           MODEL_ALIAS, type(e).__name__, e)
    merged = merge(rec["teacher_ids"], PhraseMatcher([tuple(rec["word_ids"])]), [rec["new_id"]])
    t_tokens = list(rec["teacher_tokens"])
    s_tokens: list[str] = []
    for sid, tpos in zip(merged.student_ids.tolist(), merged.student_to_teacher.tolist()):
        s_tokens.append(rec["new_token"] if sid == rec["new_id"] else t_tokens[tpos])
    end = int(merged.student_to_teacher[merged.first_new]) + 1
    ex = Example(
        sentence=SENTENCE, word=WORD,
        teacher_ids=tuple(rec["teacher_ids"]), teacher_tokens=tuple(t_tokens),
        student_ids=tuple(merged.student_ids.tolist()), student_tokens=tuple(s_tokens),
        student_to_teacher=tuple(merged.student_to_teacher.tolist()), first_new=int(merged.first_new),
        word_span=(end - len(rec["word_ids"]), end), new_id=int(rec["new_id"]),
        num_layers=int(rec["num_layers"]), hidden_size=int(rec["hidden_size"]), source=source,
    )
    assert ex.first_new >= 0, "the word must occur in the sentence"
    logger.info("tokens from the %s: teacher %s | student %s", "bundled tokenizer" if source == "tokenizer"
                else "recorded tokenization (tokenizer unavailable)", ex.teacher_tokens, ex.student_tokens)
    return ex


# --------------------------------------------------------------------------------------------- drawing

def _rc() -> dict:
    """The rcParams every render uses (on top of matplotlib's defaults)."""
    return {
        "font.family": "sans-serif",
        "font.sans-serif": ["DejaVu Sans"],
        "mathtext.fontset": "dejavusans",
        "svg.fonttype": "path",
        "svg.hashsalt": SVG_HASHSALT,
        "svg.image_inline": True,
        "path.simplify": True,
        "text.usetex": False,
        "text.antialiased": True,
        "lines.antialiased": True,
        "patch.antialiased": True,
        "axes.unicode_minus": True,
        "savefig.dpi": DPI,
        "savefig.facecolor": "white",
        "savefig.edgecolor": "white",
        "savefig.bbox": None,
        "savefig.pad_inches": 0.0,
    }


def _box(ax, x, y, w, h, *, fc, ec, lw=1.0, r=0.06, z=2, ls="-", alpha=1.0):
    from matplotlib.patches import FancyBboxPatch

    p = FancyBboxPatch((x - w / 2, y - h / 2), w, h, boxstyle=f"round,pad=0,rounding_size={r}",
                       fc=fc, ec=ec, lw=lw, zorder=z, ls=ls, alpha=alpha)
    ax.add_patch(p)
    return p


def _arrow(ax, xy_from, xy_to, *, color=C_GREY, lw=1.0, style="-|>", ms=8, ls="-", z=1, path=None, shrink=0.0):
    from matplotlib.patches import FancyArrowPatch

    kw = dict(arrowstyle=style, mutation_scale=ms, color=color, lw=lw, linestyle=ls, zorder=z,
              shrinkA=shrink, shrinkB=shrink)
    a = FancyArrowPatch(path=path, **kw) if path is not None else FancyArrowPatch(xy_from, xy_to, **kw)
    ax.add_patch(a)
    return a


def _strip(ax, x, y_top, values, *, cmap, w=0.36, cell=0.105, alpha=1.0, ec=C_TEXT):
    """A hidden-state vector drawn as a column of coloured cells; returns (y_top, y_bottom)."""
    from matplotlib.patches import Rectangle

    for k, v in enumerate(values):
        ax.add_patch(Rectangle((x - w / 2, y_top - (k + 1) * cell), w, cell, fc=cmap(0.5 + 0.45 * v),
                               ec="white", lw=0.6, zorder=3, alpha=alpha))
    ax.add_patch(Rectangle((x - w / 2, y_top - len(values) * cell), w, len(values) * cell, fc="none",
                           ec=ec, lw=0.8, zorder=4, alpha=alpha))
    return y_top, y_top - len(values) * cell


def draw(ex: Example):
    """Draw the figure for ``ex`` and return the matplotlib ``Figure`` (Agg canvas attached)."""
    import matplotlib
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.path import Path as MPath

    fig = Figure(figsize=FIGSIZE, dpi=DPI, facecolor="white")
    FigureCanvasAgg(fig)
    ax = fig.add_axes((0, 0, 1, 1))
    W, H = FIGSIZE
    ax.set_xlim(0, W)
    ax.set_ylim(0, H)
    ax.set_aspect("equal")
    ax.axis("off")
    cmap = matplotlib.colormaps["PuOr_r"]

    dx, x0 = 0.78, 1.35
    col = lambda i: x0 + i * dx  # noqa: E731 - teacher position i -> x
    n_t, n_s = len(ex.teacher_tokens), len(ex.student_tokens)
    ws, we = ex.word_span
    s2t = ex.student_to_teacher
    x_right = col(n_t - 1) + dx / 2
    px0, px1 = x_right + 0.4, W - 0.2  # right panel
    pxc = (px0 + px1) / 2
    fs, fs_small = 9.2, 8

    # Illustrative hidden states (fixed seed): identical before the word, different from it on.
    rng = np.random.RandomState(20250526)
    h_t = rng.uniform(-1, 1, size=(n_t, 6))
    h_s = np.array([h_t[s2t[j]] if j < ex.first_new else np.clip(h_t[s2t[j]] + rng.normal(0, 0.55, 6), -1, 1)
                    for j in range(n_s)])

    # y layout (inches from the bottom)
    y_tidx, y_ttok, y_tmod = 6.78, 6.2, 5.5
    y_tstrip = 4.95
    y_sstrip = 3.38
    y_smod, y_stok, y_sidx = 2.38, 1.62, 1.26
    tok_h, mod_h = 0.38, 0.46
    cells = 6
    strip_h = cells * 0.105

    def tok_label(t: str) -> tuple[str, float]:
        return t, (6.3 if len(t) > 10 else fs)

    # ---------------------------------------------------------------- row labels (left margin)
    lab = dict(ha="right", va="center", fontsize=fs_small, color=C_GREY, linespacing=1.25)
    ax.text(x0 - dx / 2 - 0.12, y_tidx, "position", **lab)
    ax.text(x0 - dx / 2 - 0.12, y_ttok, "teacher\ninput", **lab)
    ax.text(x0 - dx / 2 - 0.12, y_tstrip - strip_h / 2, "teacher\nhidden\nstates", **lab)
    ax.text(x0 - dx / 2 - 0.12, y_sstrip - strip_h / 2, "student\nhidden\nstates", **lab)
    ax.text(x0 - dx / 2 - 0.12, y_stok, "student\ninput", **lab)
    ax.text(x0 - dx / 2 - 0.12, y_sidx, "position", **lab)

    # ---------------------------------------------------------------- teacher
    for i, t in enumerate(ex.teacher_tokens):
        in_word = ws <= i < we
        label, size = tok_label(t)
        _box(ax, col(i), y_ttok, dx - 0.08, tok_h, fc=C_WORD_BG if in_word else C_TEACHER_BG,
             ec=C_WORD if in_word else C_TEACHER, lw=1.4 if in_word else 0.9)
        ax.text(col(i), y_ttok, label, ha="center", va="center", fontsize=size, color=C_TEXT, zorder=5)
        ax.text(col(i), y_tidx, str(i), ha="center", va="center", fontsize=fs_small, color=C_GREY)
        _arrow(ax, (col(i), y_ttok - tok_h / 2), (col(i), y_tmod + mod_h / 2), ms=6, lw=0.7)
    ax.annotate("", xy=(col(ws) - dx / 2 + 0.02, y_ttok + tok_h / 2 + 0.06),
                xytext=(col(we - 1) + dx / 2 - 0.02, y_ttok + tok_h / 2 + 0.06),
                arrowprops=dict(arrowstyle="-", color=C_WORD, lw=1.6))
    ax.text((col(ws) + col(we - 1)) / 2, y_ttok + tok_h / 2 + 0.19,
            f"original subtokens of \u201c{ex.word.strip()}\u201d", ha="center", va="center", fontsize=fs_small,
            color="#9A6700", zorder=5)
    _box(ax, (col(0) + col(n_t - 1)) / 2, y_tmod, x_right - col(0) + dx / 2 - 0.04, mod_h, fc=C_LIGHT, ec=C_GREY,
         lw=1.0, r=0.08)
    ax.text((col(0) + col(n_t - 1)) / 2, y_tmod,
            f"Teacher: {MODEL_NAME} ({ex.num_layers} layers), frozen \u2744", ha="center", va="center",
            fontsize=fs + 0.5, color=C_TEACHER, weight="bold", zorder=5)
    for i in range(n_t):
        aligned = i in s2t[ex.first_new:] or i < s2t[ex.first_new]
        _arrow(ax, (col(i), y_tmod - mod_h / 2), (col(i), y_tstrip), ms=6, lw=0.7)
        _strip(ax, col(i), y_tstrip, h_t[i], cmap=cmap, alpha=1.0 if aligned else 0.22,
               ec=C_TEACHER if aligned else C_GREY)

    # ---------------------------------------------------------------- student
    s_x = []
    for j, t in enumerate(ex.student_tokens):
        if j == ex.first_new:
            xb, wb = (col(ws) + col(we - 1)) / 2, (we - ws) * dx - 0.08
        else:
            xb, wb = col(s2t[j]), dx - 0.08
        s_x.append(col(s2t[j]))
        new = j == ex.first_new
        label, size = tok_label(t) if not new else (t, fs)
        _box(ax, xb, y_stok, wb, tok_h, fc=C_STUDENT if new else C_STUDENT_BG, ec=C_STUDENT, lw=1.4 if new else 0.9)
        ax.text(xb, y_stok, label, ha="center", va="center", fontsize=size, color="white" if new else C_TEXT,
                weight="bold" if new else "normal", zorder=5)
        ax.text(xb, y_sidx, str(j), ha="center", va="center", fontsize=fs_small, color=C_GREY)
        _arrow(ax, (xb, y_stok + tok_h / 2), (xb, y_smod - mod_h / 2), ms=6, lw=0.7)
    _box(ax, (col(0) + col(n_t - 1)) / 2, y_smod, x_right - col(0) + dx / 2 - 0.04, mod_h, fc=C_LIGHT, ec=C_GREY,
         lw=1.0, r=0.08)
    ax.text((col(0) + col(n_t - 1)) / 2, y_smod,
            f"Student: the same {MODEL_NAME}, same frozen weights \u2744", ha="center", va="center",
            fontsize=fs + 0.5, color=C_STUDENT, weight="bold", zorder=5)
    for j in range(n_s):
        _arrow(ax, (s_x[j], y_smod + mod_h / 2), (s_x[j], y_sstrip - strip_h), ms=6, lw=0.7)
        _strip(ax, s_x[j], y_sstrip, h_s[j], cmap=cmap, ec=C_STUDENT)

    # ---------------------------------------------------------------- comparison at the target layer
    gap_top, gap_bot = y_tstrip - strip_h, y_sstrip
    gap_mid = (gap_top + gap_bot) / 2
    for j in range(n_s):
        x = s_x[j]
        if j < ex.first_new:
            ax.text(x, gap_mid + 0.12, "=", ha="center", va="center", fontsize=15, color=C_GREY)
        else:
            _arrow(ax, (x, gap_top - 0.03), (x, gap_bot + 0.03), color=C_LOSS, lw=1.5, style="<|-|>", ms=8, z=3)
    x_pre = (s_x[0] + s_x[ex.first_new - 1]) / 2
    ax.text(x_pre, gap_mid - 0.22, "identical under causal attention:\nzero loss, left out", ha="center",
            va="center", fontsize=fs_small, color=C_GREY, linespacing=1.2)
    unaligned = [i for i in range(n_t) if i not in s2t]
    for i in unaligned:
        ax.text(col(i), gap_top - 0.2, "not\ncompared", ha="center", va="center", fontsize=6.8, color=C_GREY,
                linespacing=1.1)
    ax.text(x0 - dx / 2 - 0.12, gap_mid, "compared\nat layer \u2113", **lab)
    # the "bus" that collects the aligned pairs into the loss
    x_first = s_x[ex.first_new]
    ax.plot([x_first, px0], [gap_mid, gap_mid], color=C_LOSS, lw=1.2, zorder=2)
    ax.plot([s_x[j] for j in range(ex.first_new, n_s)], [gap_mid] * (n_s - ex.first_new), "o", color=C_LOSS,
            ms=4, zorder=4)
    ax.text(x_first - 0.1, gap_bot + 0.2, "new token\n\u2194 last subtoken", ha="right", va="center",
            fontsize=fs_small, color=C_LOSS, linespacing=1.15, zorder=5)

    # ---------------------------------------------------------------- right panel: loss and embeddings
    loss_w, loss_h = px1 - px0, 1.25
    _box(ax, pxc, gap_mid, loss_w, loss_h, fc="#FBEBE1", ec=C_LOSS, lw=1.3, r=0.1)
    ax.text(pxc, gap_mid + 0.4, "MSE at target layer \u2113", ha="center", va="center", fontsize=fs + 1,
            color=C_LOSS, weight="bold")
    ax.text(pxc, gap_mid + 0.02,
            r"$\mathcal{L} = \frac{1}{N\,H}\sum_{n=1}^{N} \Vert h^{S}_{n} - h^{T}_{a(n)} \Vert^{2}$",
            ha="center", va="center", fontsize=fs + 1.5, color=C_TEXT)
    ax.text(pxc, gap_mid - 0.42,
            f"n: student positions from the new token on\na(n): aligned teacher position; "
            f"H = {ex.hidden_size}\n\u2113 = --target_layer, default \u22121 (last of {ex.num_layers})",
            ha="center", va="center", fontsize=7, color=C_TEXT, linespacing=1.2)

    # embedding matrix: a few original rows (frozen) and the appended new row (trainable)
    from matplotlib.patches import Rectangle

    row_h, row_w = 0.17, 1.0
    ex_c = px0 + 1.2 + row_w / 2
    e_top = y_sstrip - strip_h - 0.3
    ax.text(pxc, e_top + 0.25, f"input embeddings E  ({ex.new_id + 1:,} \u00d7 {ex.hidden_size})", ha="center",
            va="center", fontsize=fs_small + 0.5, color=C_TEXT, weight="bold")
    word_rows = [ex.teacher_tokens[i] for i in range(ws, we)]
    new_name = ex.student_tokens[ex.first_new]
    rows = [ex.teacher_tokens[1], None, *word_rows, None, new_name]
    ry, row_y = e_top, {}
    for name in rows:
        if name is None:
            ax.text(ex_c, ry - row_h / 2 + 0.03, "\u22ee", ha="center", va="center", fontsize=9, color=C_GREY)
            ry -= row_h + 0.04
            continue
        new = name == new_name
        ax.add_patch(Rectangle((ex_c - row_w / 2, ry - row_h), row_w, row_h, fc=C_STUDENT if new else "#D9D9D9",
                               ec=C_STUDENT if new else C_GREY, lw=1.3 if new else 0.6, zorder=3))
        for k in range(1, 8):
            xk = ex_c - row_w / 2 + k * row_w / 8
            ax.plot([xk, xk], [ry - row_h, ry], color="white", lw=0.6, zorder=4)
        ax.text(ex_c - row_w / 2 - 0.1, ry - row_h / 2, name, ha="right", va="center", fontsize=7.8,
                color=C_STUDENT if new else (C_WORD if name in word_rows else C_TEXT),
                weight="bold" if new or name in word_rows else "normal")
        row_y[name] = ry - row_h / 2
        ry -= row_h + 0.06
    y_new = row_y[new_name]
    # frozen bracket over the original rows
    xb = ex_c + row_w / 2 + 0.08
    yb0, yb1 = e_top, row_y[word_rows[-1]] - row_h / 2 - 0.2
    ax.plot([xb - 0.05, xb, xb, xb - 0.05], [yb0, yb0, yb1, yb1], color=C_GREY, lw=1.0)
    ax.text(xb + 0.07, (yb0 + yb1) / 2, f"{ex.new_id:,} original\nrows: frozen \u2744", ha="left", va="center",
            fontsize=7.2, color=C_GREY, linespacing=1.2)
    ax.text(ex_c - 0.3, y_new - row_h / 2 - 0.2, "trainable: the only row\nupdated (AdamW)", ha="left",
            va="center", fontsize=7.2, color=C_STUDENT, weight="bold", linespacing=1.2)
    ax.text(ex_c - 0.3, y_new - row_h / 2 - 0.5, "init: mean of the\n" + ", ".join(word_rows) + " rows",
            ha="left", va="center", fontsize=7.2, color="#9A6700", linespacing=1.2)
    # gradient from the loss to the new row
    xg = px1 - 0.1
    _arrow(ax, None, None, color=C_LOSS, lw=1.4, ls=(0, (4, 2)), ms=10,
           path=MPath([(xg, gap_mid - loss_h / 2), (xg, y_new), (ex_c + row_w / 2 + 0.03, y_new)]))
    ax.text(xg - 0.06, (gap_mid - loss_h / 2 + e_top + 0.4) / 2, "\u2207\u2112", ha="right", va="center",
            fontsize=fs, color=C_LOSS)
    # the new row feeds the student's new token (routed below the student's input row)
    new_x = (col(ws) + col(we - 1)) / 2
    y_route = y_sidx - 0.3
    _arrow(ax, None, None, color=C_STUDENT, lw=1.4, ms=10,
           path=MPath([(ex_c - 0.4, y_new - row_h / 2), (ex_c - 0.4, y_route), (new_x + 0.15, y_route),
                       (new_x + 0.15, y_sidx - 0.12)]))
    ax.text((new_x + ex_c - 0.4) / 2, y_route - 0.14, f"lookup of the new token's row (id {ex.new_id})", ha="center",
            va="center", fontsize=7.5, color=C_STUDENT)

    # ---------------------------------------------------------------- caption
    if ex.source == "tokenizer":
        src = f"tokenized by the bundled {MODEL_NAME} tokenizer"
    else:
        src = f"tokenization recorded from the {MODEL_NAME} tokenizer (tokenizer unavailable at render time)"
    ax.text(0.25, 0.25, f"Example: \u201c{ex.sentence}\u201d, {src}; real snippets are 50 tokens long by default. "
            "Hidden-state colours are illustrative.", ha="left", va="center", fontsize=7.2, color=C_GREY)
    ax.text(0.25, H - 0.22, "Token Distillation: the frozen model is its own teacher", ha="left", va="center",
            fontsize=12, weight="bold", color=C_TEXT)
    return fig


def render(out_dir: Path, example: Example | None = None, stem: str = STEM) -> dict[str, Path]:
    """Render the figure into ``out_dir`` as ``{stem}.png``, ``{stem}.svg`` and ``{stem}.json``.

    The JSON records the example, the matplotlib and FreeType versions and the SHA-256 of the
    two images, so a later run can tell whether a byte-for-byte comparison is meaningful. Each file
    is written to a temporary file and renamed over the old one (never left half-written); other
    files in ``out_dir`` are left alone.

    Returns:
        ``{"png": path, "svg": path, "json": path}``.
    """
    import matplotlib
    from matplotlib import ft2font

    from token_distillation.paths import replace_file

    ex = example if example is not None else build_example()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {k: out_dir / f"{stem}.{k}" for k in ("png", "svg", "json")}
    software = f"scripts/draw_method_figure.py (matplotlib {matplotlib.__version__})"
    with matplotlib.rc_context():
        matplotlib.rcdefaults()
        matplotlib.rcParams.update(_rc())
        fig = draw(ex)
        replace_file(paths["png"], lambda tmp: fig.savefig(tmp, format="png", dpi=DPI,
                                                           metadata={"Software": software}))
        replace_file(paths["svg"], lambda tmp: fig.savefig(tmp, format="svg", dpi=DPI, metadata={
            "Date": None, "Creator": software, "Title": "Token Distillation"}))
    record = {
        "script": "scripts/draw_method_figure.py",
        "command": "python scripts/draw_method_figure.py",
        "matplotlib": matplotlib.__version__,
        "freetype": ft2font.__freetype_version__,
        "model": MODEL_ALIAS,
        "example": asdict(ex),
        "sha256": {k: hashlib.sha256(paths[k].read_bytes()).hexdigest() for k in ("png", "svg")},
    }
    replace_file(paths["json"], lambda tmp: tmp.write_text(json.dumps(record, indent=2, ensure_ascii=False) + "\n",
                                                           encoding="utf-8"))
    logger.info("wrote %s", ", ".join(str(p) for p in paths.values()))
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out_dir", default=str(ROOT / "assets"), help="output folder (default: assets/)")
    parser.add_argument("--recorded", action="store_true",
                        help="use the recorded tokenization even if the bundled tokenizer is installed")
    args = parser.parse_args(argv)
    from token_distillation.config import ConfigError

    out_dir = Path(args.out_dir).expanduser()
    if not str(args.out_dir).strip():
        raise ConfigError("--out_dir is empty; pass a folder")
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"--out_dir {out_dir} is a file; pass a folder")
    blocked = next((a for a in out_dir.parents if a.exists() and not a.is_dir()), None)
    if blocked is not None:
        raise ConfigError(f"--out_dir {out_dir}: {blocked} is a file, not a folder")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for name in ("transformers", "httpx", "urllib3"):
        logging.getLogger(name).setLevel(logging.WARNING)
    paths = render(out_dir, build_example(use_tokenizer=not args.recorded))
    for p in paths.values():
        print(p)
    return 0


if __name__ == "__main__":
    from token_distillation.cli import exit_on_user_error

    raise SystemExit(exit_on_user_error(main)())
