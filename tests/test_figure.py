"""The method figure (scripts/draw_method_figure.py): reproducible bytes, committed assets, README."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "draw_method_figure.py"
ASSETS = ROOT / "assets"


@pytest.fixture(scope="module")
def fig_mod():
    """The drawing script, imported as a module (``scripts/`` is not a package)."""
    name = "draw_method_figure_under_test"
    spec = importlib.util.spec_from_file_location(name, SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod  # dataclasses look the module up while the class is created
    spec.loader.exec_module(mod)
    yield mod
    sys.modules.pop(name, None)


def _bytes(paths: dict) -> dict[str, bytes]:
    return {k: Path(p).read_bytes() for k, p in paths.items()}


def test_render_twice_is_byte_identical(fig_mod, tmp_path):
    ex = fig_mod.build_example(use_tokenizer=False)
    a = _bytes(fig_mod.render(tmp_path / "a", ex))
    b = _bytes(fig_mod.render(tmp_path / "b", ex))
    assert set(a) == {"png", "svg", "json"}
    for kind in a:
        assert a[kind] == b[kind], f"{kind} differs between two renders"
    # no timestamp in either image, and the PNG has the fixed size
    assert b"<dc:date>" not in a["svg"]
    assert a["png"][:8] == b"\x89PNG\r\n\x1a\n"
    width, height = int.from_bytes(a["png"][16:20], "big"), int.from_bytes(a["png"][20:24], "big")
    assert (width, height) == (round(fig_mod.FIGSIZE[0] * fig_mod.DPI), round(fig_mod.FIGSIZE[1] * fig_mod.DPI))
    # the recorded fallback is announced in the caption
    assert json.loads(a["json"])["example"]["source"] == "recorded"


def test_example_alignment(fig_mod):
    """The figure's alignment comes from the pipeline's merge: new token <-> last subtoken."""
    ex = fig_mod.build_example(use_tokenizer=False)
    ws, we = ex.word_span
    assert we - ws == len(fig_mod.RECORDED["word_ids"]) >= 2
    assert ex.student_ids[ex.first_new] == ex.new_id
    assert ex.student_to_teacher[ex.first_new] == we - 1
    assert len(ex.teacher_ids) - len(ex.student_ids) == we - ws - 1
    assert list(ex.student_to_teacher[: ex.first_new]) == list(range(ex.first_new))
    assert list(ex.student_to_teacher[ex.first_new + 1:]) == list(range(we, len(ex.teacher_ids)))


def test_recorded_tokenization_matches_bundled_tokenizer(fig_mod, smollm_tokenizer):
    """The fallback tokenization is what the bundled SmolLM2 tokenizer really produces."""
    assert fig_mod._live_tokenization() == fig_mod.RECORDED


def test_committed_assets_match_their_record_and_a_fresh_render(fig_mod, tmp_path):
    record_path = ASSETS / "token-distillation.json"
    record = json.loads(record_path.read_text(encoding="utf-8"))
    committed = {k: (ASSETS / f"token-distillation.{k}").read_bytes() for k in ("png", "svg", "json")}
    # the record describes the committed images (checked whatever the versions)
    for kind in ("png", "svg"):
        assert hashlib.sha256(committed[kind]).hexdigest() == record["sha256"][kind], f"{kind} != its record"

    import matplotlib
    from matplotlib import ft2font

    versions = {"matplotlib": matplotlib.__version__, "freetype": ft2font.__freetype_version__}
    for key, here in versions.items():
        if record[key] != here:
            pytest.skip(f"committed figure was rendered with {key} {record[key]}, this environment has {here}; "
                        "byte-for-byte comparison only holds for the same version")
    ex = fig_mod.build_example(use_tokenizer=record["example"]["source"] == "tokenizer")
    if ex.source != record["example"]["source"]:
        pytest.skip(f"committed figure used the {record['example']['source']} tokenization, which is not "
                    f"available here ({ex.source})")
    fresh = _bytes(fig_mod.render(tmp_path, ex))
    for kind in ("png", "svg", "json"):
        assert fresh[kind] == committed[kind], (f"assets/token-distillation.{kind} is stale: rerun "
                                                "`python scripts/draw_method_figure.py`")


def test_readme_embeds_the_figure():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    head = readme.split("\n## ", 1)[0]
    assert "![Token Distillation](assets/token-distillation.png)" in head
    assert "scripts/draw_method_figure.py" in readme
