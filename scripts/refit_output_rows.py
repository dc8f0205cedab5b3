#!/usr/bin/env python
"""Fit the new tokens' output rows of a finished run again (``--output_embeddings distill``), without training.

For measurements of the output-row fit: the pipeline runs again with the finished run's flags (its
``report.json`` ``config``), but the new input rows are read from its ``model.safetensors`` instead of
trained; the output rows are then fitted with today's code and a new run directory is written. The
snippets are mined again with the same flags, so the fit reads the same snippets as long as the corpus
files are the same at the same paths (relative paths are read from the current directory, as in the
run). The held-out passes run as in a normal run; ``train_seconds`` in the new report is 0 and
``input_rows_from`` names ``--run_dir``. The input rows are read as saved: a run saved in bf16 or fp16
gives its rounded rows (training kept them in float32), so the refit is then close to, not exactly,
a fit after that run's training.

    python scripts/refit_output_rows.py --run_dir runs/td --out_dir runs/td_refit

Any other ``--flag value`` overrides the run's flag (e.g. ``--token_distillation_batch_size 8``,
``--token_distillation_lr_relative``); a flag that picks the new tokens or the snippets (those of the
target, corpus and snippet stages, ``--seed``, ``--alignment``, ``--init_method``) is refused: the input
rows were trained on the run's own snippets. Paths (``--dataset_path``, ``--new_tokens_source``,
``--model_path``) may be given for moved files; a file whose contents changed is caught only where the
new tokens or their ids differ. ``--out_dir`` must not exist. Bad input: one ``error:`` line, exit code 2.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from token_distillation.config import ConfigError  # noqa: E402

logger = logging.getLogger("refit_output_rows")

#: names of the input embedding matrix in a saved checkpoint (Llama/Gemma/Qwen/..., GPT-2, GPT-NeoX)
EMBED_KEYS = ("model.embed_tokens.weight", "model.language_model.embed_tokens.weight", "transformer.wte.weight",
              "gpt_neox.embed_in.weight")


def _saved_rows(run: Path):
    """``(new token texts in the run's order, their ids, the saved input embedding matrix)``."""
    from safetensors.torch import load_file

    from swap_output_rows import _new_ids  # the tokens the run kept, with their ids in its tokenizer.json

    if not (run / "tokenizer.json").is_file():
        raise ConfigError(f"--run_dir {run}: no tokenizer.json; pass the output directory of a finished run")
    kept = _new_ids(run)
    weights = run / "model.safetensors"
    if not weights.is_file():
        raise ConfigError(f"--run_dir {run}: no model.safetensors (a sharded or exported-only run): refit needs "
                          "the run's single-file checkpoint")
    state = load_file(str(weights))
    key = next((k for k in EMBED_KEYS if k in state), None)
    if key is None:
        raise ConfigError(f"--run_dir {run}: model.safetensors has none of {', '.join(EMBED_KEYS)}")
    return list(kept), list(kept.values()), state[key]


def main(run_dir: str, out_dir: str, **flags) -> Path:
    """Fit a finished run's new output rows again (--output_embeddings distill) with today's code, keeping its input rows.

    The run's flags (its report.json) are used again and its snippets mined again; the input rows are
    read from its model.safetensors instead of trained. Any other flag of apply_embedding_init.py overrides
    the run's (e.g. --token_distillation_batch_size 8), except those that pick the new tokens or the
    snippets (refused). Returns ``out_dir``.

    Args:
        run_dir: output directory of a finished, untied token_distillation or ntp run.
        out_dir: new directory for the refitted run (must not exist).

    Raises:
        ConfigError: ``run_dir`` lacks report.json / new_tokens.jsonl / tokenizer.json / model.safetensors,
            ``out_dir`` exists, the run was tied, trained the original rows too or trained no input rows,
            or the rerun's new tokens or ids differ from the run's, or a flag that picks the new tokens
            or the snippets is given (:func:`_snippet_flags`).
    """
    import torch

    import token_distillation.pipeline as pipeline
    from token_distillation.config import RunConfig
    from token_distillation.train import TrainResult

    run, out = Path(run_dir), Path(out_dir)
    for name in ("report.json", "new_tokens.jsonl"):
        if not (run / name).is_file():
            raise ConfigError(f"--run_dir {run}: no {name}; pass the output directory of a finished run")
    if out.exists():
        raise ConfigError(f"--out_dir {out} exists; pass a new path")
    report = json.loads((run / "report.json").read_text(encoding="utf-8"))
    if report.get("dry_run"):
        raise ConfigError(f"--run_dir {run} is the output of a --dry_run (no model was written); pass the output "
                          "directory of a finished run")
    if report.get("model", {}).get("tied_embeddings"):
        raise ConfigError(f"--run_dir {run}: the run kept its embeddings tied, so it has no output rows of its own to "
                          "refit; refit an untied run")
    if report["config"].get("train_original_embeddings"):
        raise ConfigError(f"--run_dir {run}: the run trained the original embedding rows too "
                          "(--train_original_embeddings), which the refit does not restore; refit a run without it")
    if report["config"].get("init_method") not in ("token_distillation", "token_distillation-randinit", "ntp"):
        raise ConfigError(f"--run_dir {run}: --init_method {report['config'].get('init_method')} trains no input rows; "
                          "refit a token_distillation (or ntp) run")
    if "out_path" in flags:
        raise ConfigError("--out_path: the refit writes to --out_dir; pass --out_dir instead")
    if str(flags.get("output_embeddings", "distill")) != "distill":
        raise ConfigError(f"--output_embeddings {flags['output_embeddings']}: the refit fits distilled output rows; "
                          "drop the flag (scripts/swap_output_rows.py gives a run other output rows)")
    fixed = _snippet_flags() & set(flags)
    if fixed:
        raise ConfigError(f"--{sorted(fixed)[0]}: a flag that picks the new tokens or the snippets cannot change in a "
                          f"refit (the input rows of --run_dir {run} were trained on its own snippets); drop it, or "
                          "train a new run with it")
    texts, ids, emb = _saved_rows(run)
    cfg = {**report["config"], **flags, "out_path": str(out), "overwrite": False, "resume": False,
           "output_embeddings": "distill", "set_output_to_zero_if_untied": True, "dry_run": False}

    def given_rows(setup, ext, fp, seqs, tix, loop_kw, cache_bytes, owned=None, attach=None):
        have = [t.text for t in ext.tokens]
        if have != texts or list(ext.rows.token_ids) != ids:
            raise ConfigError(f"the rerun's new tokens differ from --run_dir {run}'s ({len(have)} vs {len(texts)}; "
                              "the corpus or a flag that picks tokens changed)")
        with torch.no_grad():
            ext.rows.rows.copy_(emb[ids].to(ext.rows.rows.device, ext.rows.rows.dtype))
        logger.info("input rows of %d new tokens read from %s (not trained)", len(ids), run / "model.safetensors")
        return TrainResult(loss_curve=list(report.get("loss_curve") or []), steps=int(report.get("train_steps") or 0))

    finish = pipeline.finish

    def finish_noted(*args, **kw):
        rep = finish(*args, **kw)
        rep["input_rows_from"] = str(run)
        return rep

    train_rows = pipeline._train_input_rows
    pipeline._train_input_rows, pipeline.finish = given_rows, finish_noted
    try:
        result = pipeline.run(RunConfig.from_flags(**cfg))
    finally:  # a caller in the same process (tests) gets the pipeline back unchanged
        pipeline._train_input_rows, pipeline.finish = train_rows, finish
    return Path(result.out_path)


def _snippet_flags() -> set[str]:
    """Flags that pick the new tokens or the snippets (not paths: a moved file may be named anew)."""
    from dataclasses import fields

    from token_distillation.checkpoint import RESUME_FREE_FLAGS
    from token_distillation.config import CorpusConfig, SnippetConfig, TargetConfig

    staged = {f.name for stage in (TargetConfig, CorpusConfig, SnippetConfig) for f in fields(stage)}
    return (staged | {"seed", "alignment", "init_method"}) - RESUME_FREE_FLAGS


if __name__ == "__main__":
    from token_distillation.cli import all_flags, exit_on_user_error, run_fire

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    # a missing --run_dir / --out_dir or an unknown flag: one error: line, exit code 2 (not Fire's usage)
    run_fire(exit_on_user_error(main), {"run_dir", "out_dir"} | {name for name, _, _ in all_flags()}, None,
             "refit_output_rows.py",
             "it takes --run_dir, --out_dir and the flags of apply_embedding_init.py (see its --help)")
