"""Measurement only: refit a run's output rows with other background settings (see ../README.md).

    python refit_variant.py SHARE POSITIONS RUN_DIR OUT_DIR
"""
import logging
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[4]  # the repository
sys.path.insert(0, str(ROOT / "scripts"))
sys.path.insert(0, str(ROOT))
import token_distillation.output_rows as o  # noqa: E402

o.BACKGROUND_SHARE, o.BACKGROUND_POSITIONS = float(sys.argv[1]), int(sys.argv[2])
import refit_output_rows  # noqa: E402

logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
refit_output_rows.main(sys.argv[3], sys.argv[4])
