#!/usr/bin/env python
"""Run every initialisation method on the same tokens and snippets, then write the comparison table.

    python scripts/methods_table.py run   --out_dir runs/methods [--words 20] [--snippet_num 25]
    python scripts/methods_table.py table --out_dir runs/methods [--markdown docs/methods_table.md]

``run`` runs each variant of VARIANTS in-process with the same seed, corpus, word list and snippet
settings (so every method sees the same snippets) and writes ``<out_dir>/<variant>/report.json``
(the models are saved too). ``table`` reads those report.json files and prints / writes the
markdown table: nothing in it is typed by hand.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

#: (variant name, extra flags)
VARIANTS: list[tuple[str, dict]] = [
    ("random", {"init_method": "random"}),
    ("subtoken-mean", {"init_method": "subtoken-mean"}),
    ("weighted-mean", {"init_method": "weighted-mean"}),
    ("ntp", {"init_method": "ntp"}),
    ("ntp --train_original_embeddings", {"init_method": "ntp", "train_original_embeddings": True}),
    ("token_distillation-randinit", {"init_method": "token_distillation-randinit"}),
    ("token_distillation (default: MSE-on-hiddens)", {"init_method": "token_distillation"}),
    ("token_distillation --recipe paper", {"init_method": "token_distillation", "recipe": "paper"}),
    ("token_distillation MSE-on-logits", {"init_method": "token_distillation", "loss_method": "MSE-on-logits"}),
    ("token_distillation KL-on-logits", {"init_method": "token_distillation", "loss_method": "KL-on-logits"}),
    ("token_distillation MSE-on-hiddens,CE", {"init_method": "token_distillation", "loss_method": "MSE-on-hiddens,CE"}),
    ("token_distillation MSE-on-hiddens,CE-auto-weighted",
     {"init_method": "token_distillation", "loss_method": "MSE-on-hiddens,CE-auto-weighted"}),
    ("token_distillation --output_embeddings tied", {"init_method": "token_distillation", "output_embeddings": "tied"}),
    ("token_distillation MSE-on-hiddens,CE-auto-weighted --output_embeddings tied",
     {"init_method": "token_distillation", "loss_method": "MSE-on-hiddens,CE-auto-weighted", "output_embeddings": "tied"}),
    ("token_distillation --output_embeddings zero", {"init_method": "token_distillation", "output_embeddings": "zero"}),
    ("token_distillation --output_embeddings ntp", {"init_method": "token_distillation", "output_embeddings": "ntp"}),
]


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name).strip("_")


def run_all(args) -> None:
    from token_distillation.cli import configure_logging
    from token_distillation.config import RunConfig
    from token_distillation.pipeline import run

    configure_logging(logging.WARNING)
    words = [w for w in (ROOT / "new_tokens" / "biomedical_demo.txt").read_text().splitlines() if w.strip()]
    words = words[: args.words]
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    wl = out_dir / "words.txt"
    wl.write_text("".join(w + "\n" for w in words))
    common = dict(model_path=args.model_path, dataset_path=args.dataset_path, new_tokens_source=str(wl),
                  snippet_num=args.snippet_num, heldout_snippet_num=args.heldout_snippet_num,
                  token_distillation_batch_size=16, token_distillation_lr=args.lr,
                  seed=42, overwrite=True, log_every=100)
    if args.lr_relative is not None:
        common["token_distillation_lr_relative"] = args.lr_relative
    for name, flags in VARIANTS:
        if args.only and name not in args.only:
            continue
        cfg = RunConfig.from_flags(**common, **flags, out_path=str(out_dir / _slug(name)))
        res = run(cfg)
        print(f"{name}: {res.report['train_seconds']:.1f}s, held-out {res.report['mean_heldout_loss_final']:.4f}, "
              f"argmax rate {res.report['new_token_argmax_rate_final']:.3f}", flush=True)


def table(args) -> str:
    rows = []
    for name, _ in VARIANTS:
        p = Path(args.out_dir) / _slug(name) / "report.json"
        if not p.is_file():
            continue
        r = json.loads(p.read_text())
        am = r["new_token_argmax"]["final"]
        rows.append(
            f"| {name} | {r['train_steps']} | {r['train_seconds'] + r.get('output_rows_train_seconds', 0.0):.1f} | "
            f"{r['mean_new_row_norm']:.2f} | {r['mean_heldout_loss_final']:.4f} | "
            f"{100 * am['rate']:.1f}% | {am['correct']} |"
        )
    r0 = json.loads((Path(args.out_dir) / _slug(VARIANTS[0][0]) / "report.json").read_text())
    n_tok = len(r0["tokens"])
    pos = r0["new_token_argmax"]["final"]["positions"]
    exp = r0["new_token_argmax"]["final"]["expected_rate"]
    head = (
        f"Model `{r0['config']['model_path']}` (tied: {r0['model']['tied_embeddings_source']}), corpus "
        f"`{Path(r0['config']['dataset_path']).name}`, {n_tok} tokens, {r0['config']['snippet_num']} training "
        f"snippets of {r0['config']['snippet_len']} tokens each, each recipe's default epochs (per-token 2, paper 1). "
        f"Trained rows: per-token recipe (the default) "
        f"with step size {r0['config']['token_distillation_lr_relative']} x the embedding RMS, "
        f"{r0['config'].get('lr_schedule', 'constant')} schedule; `--recipe paper` and the ntp output rows: AdamW lr "
        f"{r0['config']['token_distillation_lr']}; "
        f"batch {r0['config']['token_distillation_batch_size']}, seed {r0['seed']}, device {r0['device']}. "
        f"Held-out: {sum(t['heldout_snippets'] for t in r0['tokens'])} snippets from held-out documents, "
        f"{pos} predicted positions; the true next token is a new token at {100 * exp:.1f}% of them. "
        f"Mean original-row norm: {r0['mean_original_row_norm']:.2f}.\n\n"
        "| method | steps | train s | mean new-row norm | held-out MSE (last layer) | new-token argmax rate "
        "| argmax = true next |\n"
        "|---|---|---|---|---|---|---|\n"
    )
    md = head + "\n".join(rows) + "\n"
    if args.markdown:
        Path(args.markdown).write_text(md)
    return md


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("mode", choices=["run", "table"])
    ap.add_argument("--out_dir", default="runs/methods")
    ap.add_argument("--model_path", default="smollm2-135m")
    ap.add_argument("--dataset_path", default=str(ROOT.parent / "shared" / "data" / "pubmed_abstracts" / "abstracts.jsonl"))
    ap.add_argument("--words", type=int, default=20)
    ap.add_argument("--snippet_num", type=int, default=25)
    ap.add_argument("--heldout_snippet_num", type=int, default=5)
    ap.add_argument("--lr", type=float, default=1e-4, help="--token_distillation_lr (paper recipe, ntp output rows)")
    ap.add_argument("--lr_relative", type=float, default=None,
                    help="--token_distillation_lr_relative (per-token recipe); default: the product's default")
    ap.add_argument("--only", nargs="*", default=None, help="run only these variant names")
    ap.add_argument("--markdown", default="", help="also write the table to this file")
    args = ap.parse_args()
    if args.mode == "run":
        run_all(args)
    print(table(args))


if __name__ == "__main__":
    main()
