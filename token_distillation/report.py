"""What a run writes: ``report.json`` (built by one function from the stages' records), the output
directory (atomically; a failed save never loses a finished training), and a dry run's files."""

from __future__ import annotations

import json
import logging
import platform
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from . import __version__
from .config import ConfigError, Recipe, RunConfig
from .paths import foreign_entries, read_manifest, write_output_dir
from .rescue import recovery_command, write_rows
from .targets import write_new_tokens

logger = logging.getLogger(__name__)


def build_report(setup, targets, snippets, extended, trained) -> dict[str, Any]:
    """``report.json`` of a finished run, from the records of :mod:`token_distillation.pipeline`'s
    stages (``Setup``, ``Targets``, ``Snippets``, ``Extended``, ``Trained``): the resolved config,
    versions, seed, the final token list with per-token snippet counts, held-out losses and row
    norms, skipped tokens, firing check, loss curves and timings."""
    cfg, ext, tr, sn = setup.cfg, extended, trained, snippets
    result, out_result = tr.result, tr.out_result
    emb = ext.model.get_input_embeddings().weight
    norms = ext.rows.rows.detach().float().norm(dim=-1).cpu()
    tc = cfg.train
    return {
        "tool": "token-distillation", "version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "config": cfg.to_dict(),
        "model": {"source": setup.source.spec, "identity": setup.source.identity, "tied_embeddings": ext.tied,
                  "tied_embeddings_source": ext.tied_source, "untied_by_run": ext.tied_source and not ext.tied,
                  "output_embeddings": ext.out_policy.value if ext.out_policy else "tied",
                  "embedding_scale": ext.scale, "num_layers_target_index": ext.layer,
                  "vocab_rows_before": ext.num_original, "vocab_rows_after": int(emb.shape[0])},
        "versions": versions(),
        "device": str(setup.device), "weights_dtype": str(setup.weights_dtype), "saved_dtype": str(setup.save_dtype),
        "autocast_dtype": str(setup.autocast_dtype),
        "seed": tc.seed, "processes": setup.dist.world_size, "train_batch_size": setup.batch_size,
        "memory_plan_gib": memory_plan_gib(ext.plan), "distributed": setup.dist_info,
        "snippets": _snippets_info(targets, sn, tr),
        "tokens": [
            {"token": t.text, "id": t.token_id, "subtoken_ids": list(t.subtoken_ids),
             "subtokens": ext.tokenizer.convert_ids_to_tokens(list(t.subtoken_ids)),
             "snippet_source": sn.sources[i],
             "train_snippets": sn.snips.train_counts[i], "heldout_snippets": sn.snips.heldout_counts[i],
             "heldout_loss_init": tr.held_before[i], "heldout_loss_final": tr.held_after[i],
             "row_norm": float(norms[i]), "heldout_argmax_positions": tr.argmax_after["per_token"][i],
             **({"output_kl_heldout_init": tr.out_kl["heldout_before"][i],
                 "output_kl_heldout_final": tr.out_kl["heldout_after"][i]} if tr.out_kl else {})}
            for i, t in enumerate(ext.tokens)
        ],
        "skipped_tokens": sn.skipped,
        "firing": ext.firing,
        "targets": targets.summary,
        "mean_heldout_loss_init": mean(tr.held_before),
        "mean_heldout_loss_final": mean(tr.held_after),
        "not_improved_tokens": tr.not_improved,
        "mean_new_row_norm": float(norms.mean()),
        "mean_original_row_norm": emb[:ext.n_orig].detach().float().norm(dim=-1).mean().item(),
        "loss_curve": result.loss_curve if result else [],
        "train_steps": result.steps if result else 0,
        "train_lr": ((tr.lr if tc.recipe == Recipe.PER_TOKEN else tc.token_distillation_lr) if result else None),
        "train_seconds": result.seconds if result else 0.0,
        "train_seconds_from_step": result.seconds_from_step if result else 0,
        "output_rows_train_seconds": out_result.seconds if out_result else 0.0,
        "output_rows_loss_curve": out_result.loss_curve if out_result else [],
        "output_rows_kl": ({k: mean(tr.out_kl[k]) for k in ("train_before", "train_after", "heldout_before",
                                                            "heldout_after")} if tr.out_kl else None),
        "output_rows_shift": tr.out_kl.get("shift") if tr.out_kl else None,
        "new_token_argmax_rate_init": tr.argmax_before["rate"],
        "new_token_argmax_rate_final": tr.argmax_after["rate"],
        "new_token_argmax": {"init": tr.argmax_before, "final": tr.argmax_after},
    }


def memory_plan_gib(plan) -> dict[str, Any] | None:
    """The memory plan (:class:`token_distillation.memory.MemoryPlan`) in GiB, for report.json: the
    estimated peak, its phase, and every term (None when no plan was made)."""
    if plan is None:
        return None
    terms = ("weights", "trainable", "activations", "logits", "output_fit") + (
        ("baseline", "loading", "transient", "teacher_cache") if plan.host else ())
    return {"total": round(plan.total / 2**30, 3), "memory": "host" if plan.host else "device",
            "peak_phase": plan.peak_phase, **{t: round(getattr(plan, t) / 2**30, 3) for t in terms}}


def dry_run_report(cfg: RunConfig, target_summary: dict, skipped: dict, usable: int | None) -> dict[str, Any]:
    """``report.json`` of a ``--dry_run`` (no model loaded)."""
    return {"tool": "token-distillation", "version": __version__, "dry_run": True,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "config": cfg.to_dict(),
            "targets": target_summary, "skipped_tokens": skipped, "tokens_with_enough_snippets": usable,
            "versions": versions()}


def write_target_files(tmp: Path, targets, records: list[dict], added: set[str] | None = None,
                       skipped: dict[str, str] | None = None) -> None:
    """``new_tokens.jsonl`` (every token built, before the snippet filter) and the method's extra files.

    ``added``: a real run's new tokens (texts); each record then gets ``added`` (whether the token is
    in the saved tokenizer) and, when not, ``skipped``: its reason from ``skipped`` (``{token: reason}``;
    a duplicate of an added word has a reason there too, under the same text, so ``added`` decides)."""
    if added is not None:
        skipped = skipped or {}
        records = [{**r, "added": r["token"] in added,
                    **({"skipped": skipped.get(r["token"], "not added")} if r["token"] not in added else {})}
                   for r in records]
    write_new_tokens(tmp / "new_tokens.jsonl", records)
    for name, path in targets.files.items():
        shutil.copyfile(path, tmp / name)


def write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False), encoding="utf-8")


def final_destination(out: Path, replace_allowed: bool) -> Path:
    """Where the finished output goes: ``out``, unless entries appeared there during the run that
    the start-up check did not allow replacing (a user's files, or another run's output without
    ``--overwrite``); then a new sibling ``<out>-<date>-<time>``, with a warning."""
    if not out.is_dir() or not any(out.iterdir()):
        return out
    foreign = foreign_entries(out)
    if not foreign and (read_manifest(out) is None or replace_allowed):
        return out
    alt = out.with_name(f"{out.name}-{time.strftime('%Y%m%d-%H%M%S')}")
    logger.warning("%s changed during the run (%s); writing the output to %s instead", out,
                   ", ".join(foreign[:5]) or "another output of this tool appeared", alt)
    return alt


def save_output(out: Path, write, cfg: RunConfig, rows, tokenizer, report: dict, model_spec: str,
                untie: bool, save_dtype=None) -> Path:
    """Write the extended model atomically (``write(tmp_dir)``); returns the directory written.

    A finished training is never lost: if the save fails, the trained rows, tokenizer and report are
    written instead (:func:`token_distillation.rescue.write_rows`, into the output directory or,
    failing that, a new temporary directory).

    Raises:
        ConfigError: the save failed; the one-line message names the rows directory and the command
            that builds the model from it.
    """
    dest = final_destination(out, cfg.output.overwrite or cfg.output.resume)
    try:
        write_output_dir(dest, write, kind="model")
        return dest
    except Exception as e:  # noqa: BLE001 - any failure here must not lose the training
        reason = f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:300]}"
        logger.debug("save failed", exc_info=True)
    try:
        rows_dir = write_rows(dest, rows, tokenizer, report, model_spec, untie, save_dtype)
    except Exception:  # noqa: BLE001 - e.g. the output's disk is full: try the temporary directory
        rows_dir = write_rows(Path(tempfile.mkdtemp(prefix="token_distillation_rows-")) / "rows", rows, tokenizer,
                              report, model_spec, untie, save_dtype)
    raise ConfigError(f"saving the extended model to {dest} failed ({reason}); the trained rows were saved in "
                      f"{rows_dir}; build the model from them with: {recovery_command(rows_dir)}")


def gap_closed_estimate(before: float | None, after: float | None) -> float | None:
    """Share of the held-out distillation loss removed by training (0: the initial rows, 1: the
    student matches the teacher). A hidden-state estimate of the evaluation's "% of gap closed",
    which measures the same gap in next-token NLL (see docs/methods.md)."""
    if before is None or after is None or before <= 0:
        return None
    return 1.0 - after / before


def mean(xs: list[float | None]) -> float | None:
    vals = [x for x in xs if x is not None]
    return sum(vals) / len(vals) if vals else None


def versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for pkg in ("torch", "transformers", "datasets", "tokenizers", "ahocorasick-rs", "gguf", "accelerate"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out


def _snippets_info(tg, sn, tr) -> dict:
    """The report's ``snippets`` part: the corpus information of the snippet stage, and, when
    ``--output_rows_shift`` measured its text NLL on held-out documents, their ids (``shift_doc_ids``:
    ``token_distillation.evaluate`` leaves them out as it does the training documents, since one
    number of the run was chosen on them)."""
    info = dict(sn.corpus_info)
    shift = tr.out_kl.get("shift") if tr.out_kl else None
    if shift and shift.get("heldout_text_documents") and tg.corpus is not None:
        info["shift_doc_ids"] = [tg.corpus.doc_id(d.doc) for d in sn.shift_docs]
    return info
