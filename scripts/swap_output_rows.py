#!/usr/bin/env python
"""Copy a run's output directory with the new tokens' output rows taken from another run.

Used for measurements: a Token Distillation run with ``--output_embeddings distill`` and a
``subtoken-mean`` run of the same tokens give, without a second training, the Token Distillation
model with subtoken-mean output rows (the input rows do not depend on ``--output_embeddings``, since
the output fit runs after training; ``tests/test_scripts.py`` checks that the result is
bit-identical to a run with ``--output_embeddings subtoken-mean``).

    python scripts/swap_output_rows.py --rows_from runs/td --output_rows_from runs/subtoken-mean --out_dir runs/td_sm

Both runs must be untied (an ``lm_head.weight`` tensor in ``model.safetensors``), with the same new
tokens at the same ids. ``--out_dir`` must not exist. Bad input: one ``error:`` line, exit code 2.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from token_distillation.config import ConfigError  # noqa: E402


def _new_ids(run: Path) -> tuple[list[str], list[int]]:
    """The new tokens of a run (new_tokens.jsonl) and their ids in its tokenizer.json."""
    from tokenizers import Tokenizer

    words = [json.loads(line)["token"] for line in (run / "new_tokens.jsonl").read_text(encoding="utf-8").splitlines()
             if line.strip()]
    tok = Tokenizer.from_file(str(run / "tokenizer.json"))
    return words, [tok.token_to_id(w) for w in words]


def main(rows_from: str, output_rows_from: str, out_dir: str) -> Path:
    """Write ``out_dir``: ``rows_from`` with the new tokens' output rows of ``output_rows_from``.

    Raises:
        ConfigError: a run directory lacks its files, the runs' new tokens or ids differ, a run is
            tied (no ``lm_head.weight``), or ``out_dir`` exists.
    """
    from safetensors.torch import load_file, save_file

    from token_distillation.paths import OUTPUT_MANIFEST, write_output_dir

    src, other, out = Path(rows_from), Path(output_rows_from), Path(out_dir)
    for flag, run in (("--rows_from", src), ("--output_rows_from", other)):
        missing = [f for f in ("model.safetensors", "new_tokens.jsonl", "tokenizer.json") if not (run / f).is_file()]
        if missing:
            raise ConfigError(f"{flag} {run}: not an output directory of apply_embedding_init.py (missing {missing})")
    if out.exists():
        raise ConfigError(f"--out_dir {out} exists; give a new directory")
    words, ids = _new_ids(src)
    if (words, ids) != _new_ids(other) or None in ids:
        raise ConfigError("--rows_from and --output_rows_from hold different new tokens or ids; use runs of the same "
                          "token list and model")
    a, b = load_file(src / "model.safetensors"), load_file(other / "model.safetensors")
    key = "lm_head.weight"
    if key not in a or key not in b:
        raise ConfigError("a run is tied (no separate lm_head.weight): its output rows are its input rows; "
                          "use untied runs (any --output_embeddings other than tied)")
    a[key][ids] = b[key][ids].to(a[key].dtype)

    def write(tmp: Path) -> None:
        for f in src.iterdir():
            if f.is_file() and f.name not in ("model.safetensors", "report.json", OUTPUT_MANIFEST):
                shutil.copy2(f, tmp / f.name)
        save_file(a, tmp / "model.safetensors", metadata={"format": "pt"})
        if (src / "report.json").is_file():  # the report of --rows_from, saying where the output rows came from
            rep = json.loads((src / "report.json").read_text(encoding="utf-8"))
            rep["output_rows_swapped_from"] = {"run": str(other), "output_embeddings": json.loads(
                (other / "report.json").read_text(encoding="utf-8")).get("model", {}).get("output_embeddings")
                if (other / "report.json").is_file() else None}
            (tmp / "report.json").write_text(json.dumps(rep, indent=1), encoding="utf-8")

    write_output_dir(out, write, kind="swap_output_rows")
    return out


if __name__ == "__main__":
    import inspect

    from token_distillation.cli import exit_on_user_error, run_fire

    run_fire(exit_on_user_error(main), set(inspect.signature(main).parameters), None, "swap_output_rows.py")
