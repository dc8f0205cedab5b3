"""Trained rows that survive a failed save, and the command that applies them to the model.

When ``save_pretrained`` fails after training (a model transformers refuses to serialize, a full
disk, a permission error), :func:`write_rows` writes what training produced into the output
directory instead: ``new_rows.safetensors`` (the new input rows ``[num_new, hidden]``, and the
output rows of an untied model, and the whole input matrix when original rows were trained),
``rows.json`` (token ids and how to apply them), the extended tokenizer and ``report.json``.
Nothing of the model itself is written: kilobytes to megabytes.

``python -m token_distillation.rescue --rows_dir DIR --out_path NEW`` then loads the original
model (``--model_path``, default: the one recorded in ``rows.json``), extends it to the saved
tokenizer, writes the rows and saves the full extended model, exactly as the run would have.
"""

from __future__ import annotations

import json
import logging
import shlex
import sys
from pathlib import Path

import torch

from .config import ConfigError
from .paths import prepare_out_path, write_output_dir

logger = logging.getLogger(__name__)

ROWS_FILE = "new_rows.safetensors"
ROWS_META = "rows.json"


def write_rows(out: Path, rows, tokenizer, report: dict, model_spec: str, untie: bool, save_dtype=None) -> Path:
    """Write the trained rows of a run whose model could not be saved (see the module docstring).

    Args:
        rows: the run's :class:`~token_distillation.train.NewRows`.
        model_spec: ``--model_path`` of the run (recorded so that the rows can be applied).
        untie: the run untied a tied model (the output layer becomes a separate copy).
        save_dtype: the dtype the model is to be saved in (the source checkpoint's).

    Returns:
        The directory written (``out``).
    """
    from safetensors.torch import save_file

    tensors = {"input_rows": rows.rows.detach().float().cpu().contiguous()}
    if rows.out_rows is not None:
        tensors["output_rows"] = rows.out_rows.detach().float().cpu().contiguous()
    if rows.original is not None:
        tensors["input_matrix"] = rows.original.detach().float().cpu().contiguous()
    sub_ids = [list(t["subtoken_ids"]) for t in report.get("tokens", [])]
    meta = {"token_ids": list(rows.token_ids), "subtoken_ids": sub_ids, "model_path": model_spec,
            "untie": bool(untie),
            "save_dtype": str(save_dtype or torch.float32).removeprefix("torch.")}

    def _write(tmp: Path) -> None:
        save_file(tensors, str(tmp / ROWS_FILE))
        (tmp / ROWS_META).write_text(json.dumps(meta, indent=1), encoding="utf-8")
        try:
            tokenizer.save_pretrained(tmp)
        except Exception as e:  # the rows matter more; the tokenizer can be rebuilt from report.json
            logger.warning("could not save the tokenizer beside the rows (%s)", e)
        (tmp / "report.json").write_text(json.dumps(report, indent=2, ensure_ascii=False, default=str),
                                         encoding="utf-8")

    write_output_dir(out, _write, kind="rows")
    return out


def recovery_command(rows_dir: Path) -> str:
    """The shell command that turns a rows directory into the full extended model."""
    return (f"{shlex.quote(sys.executable)} -m token_distillation.rescue --rows_dir {shlex.quote(str(rows_dir))} "
            f"--out_path {shlex.quote(str(rows_dir) + '-model')}")


def apply_rows(model, tokenizer_len: int, rows_dir: Path) -> None:
    """Extend ``model`` to ``tokenizer_len`` rows and write the rows saved in ``rows_dir`` into it.

    Raises:
        ConfigError: the rows do not fit the model (another model than the run's).
    """
    from safetensors.torch import load_file

    from .models import extend_embeddings, is_tied, set_new_output_bias, untie_embeddings

    meta = json.loads((rows_dir / ROWS_META).read_text(encoding="utf-8"))
    tensors = load_file(str(rows_dir / ROWS_FILE))
    hidden = model.get_input_embeddings().weight.shape[1]
    if tensors["input_rows"].shape[1] != hidden:
        raise ConfigError(f"--model_path: the rows in {rows_dir} have width {tensors['input_rows'].shape[1]}, the "
                          f"model's embeddings {hidden}; pass the model of the run ({meta['model_path']})")
    extend_embeddings(model, tokenizer_len)
    if meta["untie"] and is_tied(model):
        untie_embeddings(model)
    if meta.get("subtoken_ids"):
        set_new_output_bias(model, meta["token_ids"], meta["subtoken_ids"])
    emb = model.get_input_embeddings().weight
    ids = torch.tensor(meta["token_ids"], device=emb.device)
    with torch.no_grad():
        if "input_matrix" in tensors:
            emb.copy_(tensors["input_matrix"].to(emb.dtype))
        emb[ids] = tensors["input_rows"].to(emb.device, emb.dtype)
        if "output_rows" in tensors:
            model.get_output_embeddings().weight[ids] = tensors["output_rows"].to(emb.device, emb.dtype)


def main(rows_dir: str = "", out_path: str = "", model_path: str = "", overwrite: bool = False) -> str:
    """Save the full extended model from the rows of a run whose save failed.

    Args:
        rows_dir: the run's output directory holding new_rows.safetensors and rows.json.
        out_path: where the extended model goes (a new directory).
        model_path: the run's model (default: the one recorded in rows.json).
        overwrite: replace an earlier output of this tool in out_path.
    """
    from .models import check_saveable, load_model
    from .paths import default_cache_root, resolve_model_source

    src = Path(str(rows_dir)).expanduser()
    if not rows_dir or not (src / ROWS_META).is_file():
        raise ConfigError(f"--rows_dir {rows_dir!r}: no {ROWS_META} there; pass the output directory of the run "
                          "whose save failed")
    if not out_path:
        raise ConfigError("--out_path is required: a new directory for the extended model")
    meta = json.loads((src / ROWS_META).read_text(encoding="utf-8"))
    out = prepare_out_path(str(out_path), bool(overwrite))
    source = resolve_model_source(str(model_path or meta["model_path"]))
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(src)
    model = load_model(source, default_cache_root(), torch.device("cpu"), torch.float32)
    check_saveable(model)
    apply_rows(model, len(tokenizer), src)
    model.to(getattr(torch, meta.get("save_dtype", "float32")))
    report = json.loads((src / "report.json").read_text(encoding="utf-8"))

    def _write(tmp: Path) -> None:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / "report.json").write_text(json.dumps(report, indent=2, ensure_ascii=False), encoding="utf-8")

    write_output_dir(out, _write, kind="model")
    logger.info("saved the extended model to %s", out)
    return str(out)


def cli(argv: list[str] | None = None) -> None:
    """``python -m token_distillation.rescue``: bad input ends with one ``error:`` line, exit code 2."""
    from .cli import configure_logging, exit_on_user_error, run_fire

    configure_logging()
    run_fire(exit_on_user_error(main), {"rows_dir", "out_path", "model_path", "overwrite"}, argv,
             "python -m token_distillation.rescue")


if __name__ == "__main__":
    cli()
