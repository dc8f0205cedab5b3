#!/usr/bin/env python
"""Copy a run's output directory with the new tokens' output rows taken from another run.

Used for measurements: a Token Distillation run with ``--output_embeddings distill`` and a
``subtoken-mean`` run of the same tokens give, without a second training, the Token Distillation
model with subtoken-mean output rows (the input rows do not depend on ``--output_embeddings``, since
the output fit runs after training; ``tests/test_scripts.py`` checks that the result is
bit-identical to a run with ``--output_embeddings subtoken-mean``).

    python scripts/swap_output_rows.py --rows_from runs/td --output_rows_from runs/subtoken-mean --out_dir runs/td_sm

Both runs must be untied (a separate output matrix in one ``model.safetensors``); every new token
``--rows_from`` kept must be in ``--output_rows_from`` (matched by text: a Token Distillation run may
skip tokens a subtoken-mean run keeps). ``--out_dir`` must not exist. Bad input: one ``error:`` line,
exit code 2.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from token_distillation.config import ConfigError  # noqa: E402


#: names of a separate output matrix in a saved checkpoint (Llama/Gemma/Qwen/..., GPT-NeoX)
HEAD_KEYS = ("lm_head.weight", "embed_out.weight")


def _new_ids(run: Path) -> dict[str, int]:
    """The new tokens the run kept (listed in new_tokens.jsonl and added to its tokenizer.json), by text."""
    from tokenizers import Tokenizer

    words = [json.loads(line)["token"] for line in (run / "new_tokens.jsonl").read_text(encoding="utf-8").splitlines()
             if line.strip()]
    tok = Tokenizer.from_file(str(run / "tokenizer.json"))
    added = {t.content for t in tok.get_added_tokens_decoder().values()}
    return {w: tok.token_to_id(w) for w in words if w in added}


def main(rows_from: str, output_rows_from: str, out_dir: str) -> Path:
    """Write ``out_dir``: ``rows_from`` with the new tokens' output rows of ``output_rows_from``
    (matched by token text; every token ``rows_from`` kept must be in ``output_rows_from``). Exports
    (``*.gguf``) are not copied: they hold the old rows. ``report.json`` says where the rows came
    from; its output-row figures are dropped.

    Raises:
        ConfigError: a run directory lacks its files or is sharded, a token of ``rows_from`` is not in
            ``output_rows_from``, a run has no separate output matrix (tied), or ``out_dir`` exists.
    """
    from safetensors.torch import load_file, save_file

    from token_distillation.paths import OUTPUT_MANIFEST, write_output_dir

    src, other, out = Path(rows_from), Path(output_rows_from), Path(out_dir)
    for flag, run in (("--rows_from", src), ("--output_rows_from", other)):
        if (run / "model.safetensors.index.json").is_file():
            raise ConfigError(f"{flag} {run}: a sharded checkpoint is not supported; use runs saved in one file")
        missing = [f for f in ("model.safetensors", "new_tokens.jsonl", "tokenizer.json") if not (run / f).is_file()]
        if missing:
            raise ConfigError(f"{flag} {run}: not an output directory of apply_embedding_init.py (missing {missing})")
    if out.exists():
        raise ConfigError(f"--out_dir {out} exists; give a new directory")
    mine, theirs = _new_ids(src), _new_ids(other)
    absent = [w for w in mine if w not in theirs]
    if not mine or absent:
        raise ConfigError(f"--output_rows_from {other} lacks new tokens of --rows_from: {absent[:5] or 'none kept'}; "
                          "use runs of the same token list and model")
    a, b = load_file(src / "model.safetensors"), load_file(other / "model.safetensors")
    key = next((k for k in HEAD_KEYS if k in a and k in b), None)
    if key is None:
        raise ConfigError(f"no separate output matrix ({' or '.join(HEAD_KEYS)}) in both runs: a tied run's output "
                          "rows are its input rows; use untied runs (any --output_embeddings other than tied)")
    a[key][list(mine.values())] = b[key][[theirs[w] for w in mine]].to(a[key].dtype)

    def write(tmp: Path) -> None:
        for f in src.iterdir():
            if f.is_file() and f.suffix != ".gguf" and f.name not in ("model.safetensors", "report.json", OUTPUT_MANIFEST):
                shutil.copy2(f, tmp / f.name)
        save_file(a, tmp / "model.safetensors", metadata={"format": "pt"})
        if (src / "report.json").is_file():  # the report of --rows_from, saying where the output rows came from
            rep = json.loads((src / "report.json").read_text(encoding="utf-8"))
            theirs_rep = (json.loads((other / "report.json").read_text(encoding="utf-8"))
                          if (other / "report.json").is_file() else {})
            policy = theirs_rep.get("model", {}).get("output_embeddings")
            rep["output_rows_swapped_from"] = {"run": str(other), "output_embeddings": policy}
            rep.setdefault("model", {})["output_embeddings"] = policy
            for k in ("output_rows_train_seconds", "output_rows_loss_curve", "output_rows_kl", "output_rows_shift"):
                rep.pop(k, None)
            for t in rep.get("tokens", []):
                t.pop("output_kl_heldout_init", None)
                t.pop("output_kl_heldout_final", None)
            (tmp / "report.json").write_text(json.dumps(rep, indent=1), encoding="utf-8")

    write_output_dir(out, write, kind="swap_output_rows")
    return out


if __name__ == "__main__":
    import inspect

    from token_distillation.cli import exit_on_user_error, run_fire

    run_fire(exit_on_user_error(main), set(inspect.signature(main).parameters), None, "swap_output_rows.py")
