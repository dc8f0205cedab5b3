#!/usr/bin/env python
"""Run every initialisation method on the same tokens and snippets, then write the comparison table.

    python scripts/methods_table.py run   --out_dir runs/methods [--words 20] [--snippet_num 25]
    python scripts/methods_table.py table --out_dir runs/methods [--markdown docs/methods_table.md]

``run`` runs each variant of VARIANTS in-process with the same seed, corpus, word list and snippet
settings (so every method sees the same snippets) and writes ``<out_dir>/<variant>/report.json``
(the models are saved too). ``table`` reads those report.json files and prints / writes the
markdown table: nothing in it is typed by hand.

Every flag is checked before anything is written or loaded (bad input: one ``error:`` line, exit
code 2; argparse reports its own errors with a usage line). ``run``'s ``--out_dir`` must be new,
empty or an earlier output of this script (recognised by the marker file
``token_distillation_script.json`` it writes there); a directory holding other files is refused.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from token_distillation.config import ConfigError  # noqa: E402
from token_distillation.paths import claim_script_dir, replace_file  # noqa: E402

#: the words trained (the first --words of them)
WORDS_FILE = ROOT / "new_tokens" / "biomedical_demo.txt"

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


def check_run(args) -> tuple[list[str], dict]:
    """Check ``run``'s flags without writing or loading anything.

    Returns:
        ``(words, run_flags)``: the words to train and each selected variant's flags (checked).

    Raises:
        ConfigError: unknown ``--only`` names, ``--words`` outside 1..the words available, a flag
            the pipeline refuses, a model that cannot be found, a bad ``--markdown`` path.
    """
    from token_distillation.config import RunConfig
    from token_distillation.paths import resolve_model_source

    names = [name for name, _ in VARIANTS]
    unknown = [n for n in (args.only or []) if n not in names]
    if unknown:
        raise ConfigError(f"--only: unknown variant(s) {unknown}; choose from {names}")
    words = [w for w in WORDS_FILE.read_text(encoding="utf-8").splitlines() if w.strip()]
    if not 1 <= args.words <= len(words):
        raise ConfigError(f"--words must be between 1 and {len(words)} (the words in {WORDS_FILE.name}), "
                          f"not {args.words}")
    if args.markdown:
        replace_file(args.markdown, flag="--markdown")
    out_dir = Path(args.out_dir).expanduser()
    common = dict(model_path=args.model_path, dataset_path=args.dataset_path,
                  new_tokens_source=str(out_dir / "words.txt"),
                  snippet_num=args.snippet_num, heldout_snippet_num=args.heldout_snippet_num,
                  token_distillation_batch_size=16, token_distillation_lr=args.lr,
                  seed=42, overwrite=True, log_every=100)
    if args.lr_relative is not None:
        common["token_distillation_lr_relative"] = args.lr_relative
    # the word list does not exist yet: check the flags against the file it is cut from
    RunConfig.from_flags(**dict(common, new_tokens_source=str(WORDS_FILE)), out_path="unused")  # shared flags
    run_flags = {}
    for name, flags in VARIANTS:
        if args.only and name not in args.only:
            continue
        try:
            RunConfig.from_flags(**dict(common, new_tokens_source=str(WORDS_FILE)), **flags, out_path="unused")
        except ConfigError as e:
            raise ConfigError(f"variant {name!r}: {e}") from None
        run_flags[name] = dict(common, **flags, out_path=str(out_dir / _slug(name)))
    resolve_model_source(args.model_path)
    return words[: args.words], run_flags


def run_all(args) -> None:
    from token_distillation.cli import configure_logging

    words, run_flags = check_run(args)
    out_dir = claim_script_dir(args.out_dir, "methods_table.py",
                               ["words.txt"] + [_slug(name) + "/" for name, _ in VARIANTS])
    from token_distillation.config import RunConfig
    from token_distillation.pipeline import run

    configure_logging(logging.WARNING)
    wl = out_dir / "words.txt"
    replace_file(wl, lambda tmp: tmp.write_text("".join(w + "\n" for w in words), encoding="utf-8"))
    for name, flags in run_flags.items():
        cfg = RunConfig.from_flags(**flags)
        res = run(cfg)
        print(f"{name}: {res.report['train_seconds']:.1f}s, held-out {res.report['mean_heldout_loss_final']:.4f}, "
              f"argmax rate {res.report['new_token_argmax_rate_final']:.3f}", flush=True)


def table(args) -> str:
    """The markdown table of every variant with a report.json under ``--out_dir`` (also written to
    ``--markdown``).

    Raises:
        ConfigError: no report found, or one that is unreadable or lacks a field the table shows.
    """
    if args.markdown:
        replace_file(args.markdown, flag="--markdown")
    reports = {}
    for name, _ in VARIANTS:
        p = Path(args.out_dir).expanduser() / _slug(name) / "report.json"
        if p.is_file():
            try:
                reports[name] = (p, json.loads(p.read_text(encoding="utf-8")))
            except (OSError, ValueError) as e:
                raise ConfigError(f"--out_dir: cannot read {p} ({e})") from None
    if not reports:
        raise ConfigError(f"--out_dir {args.out_dir} holds no variant's report.json; run "
                          "`python scripts/methods_table.py run` with the same --out_dir first")
    try:
        return _table(args, reports)
    except (KeyError, TypeError, IndexError) as e:
        raise ConfigError(f"--out_dir {args.out_dir}: a report.json lacks a field the table shows ({e!r}); rerun "
                          "`python scripts/methods_table.py run` with this version") from None


def _table(args, reports: dict) -> str:
    rows = []
    for name, (_, r) in reports.items():
        am = r["new_token_argmax"]["final"]
        rows.append(
            f"| {name} | {r['train_steps']} | {r['train_seconds'] + r.get('output_rows_train_seconds', 0.0):.1f} | "
            f"{r['mean_new_row_norm']:.2f} | {r['mean_heldout_loss_final']:.4f} | "
            f"{100 * am['rate']:.1f}% | {am['correct']} |"
        )
    r0 = next(iter(reports.values()))[1]  # the first variant that has run
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
        replace_file(args.markdown, lambda tmp: tmp.write_text(md, encoding="utf-8"), flag="--markdown")
    return md


def main(argv: list[str] | None = None) -> None:
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
    args = ap.parse_args(argv)
    if args.mode == "run":
        run_all(args)
    print(table(args))


if __name__ == "__main__":
    from token_distillation.cli import exit_on_user_error

    exit_on_user_error(main)()
