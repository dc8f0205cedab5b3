"""Data safety (issue 8): kill -9 while saving, corrupt caches rebuilt, concurrent cache users."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from token_distillation.config import CorpusConfig
from token_distillation.corpus import tokenize_corpus
from token_distillation.models import (
    atomic_write_dir,
    cache_problem,
    load_tokenizer,
    prepare_out_path,
    resolve_model_source,
    write_manifest,
)
from token_distillation.paths import OUTPUT_MANIFEST, write_output_dir

ROOT = Path(__file__).resolve().parents[1]

_KILLED_WRITER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from token_distillation.paths import write_output_dir

    def slow(tmp):
        (tmp / "model.safetensors").write_bytes(b"x" * 1_000_000)
        Path(sys.argv[2]).write_text("writing")  # tell the test we are mid-save
        time.sleep(60)
        (tmp / "report.json").write_text("{}")

    write_output_dir(Path(sys.argv[1]), slow, kind="model")
""")


def _kill_mid_save(out: Path, tmp_path: Path) -> None:
    marker = tmp_path / f"marker-{time.monotonic_ns()}"
    p = subprocess.Popen([sys.executable, "-c", _KILLED_WRITER, str(out), str(marker)], cwd=ROOT,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    deadline = time.time() + 120
    while not marker.exists():
        assert p.poll() is None and time.time() < deadline, "writer did not start"
        time.sleep(0.05)
    p.send_signal(signal.SIGKILL)
    p.wait()


def test_kill_during_save_leaves_nothing_or_previous_output(tmp_path):
    out = tmp_path / "out"
    _kill_mid_save(out, tmp_path)
    assert not out.exists()  # no half-written output

    def complete(tmp):
        (tmp / "model.safetensors").write_bytes(b"old")
        (tmp / "report.json").write_text('{"v": 1}')

    write_output_dir(out, complete, kind="model")
    _kill_mid_save(out, tmp_path)
    assert sorted(p.name for p in out.iterdir()) == ["model.safetensors", "report.json", OUTPUT_MANIFEST]
    assert (out / "model.safetensors").read_bytes() == b"old"
    # the dead writer's temporary sibling is cleaned up by the next check of the same path
    assert any(p.name.startswith(".out.tmp-") for p in tmp_path.iterdir())
    prepare_out_path(str(out), overwrite=True)
    assert not any(p.name.startswith(".out.") for p in tmp_path.iterdir())


def test_kill_between_renames_restores_previous_output(tmp_path):
    """A writer killed after moving the old output aside but before renaming the new one in."""
    out = tmp_path / "out"
    old = tmp_path / ".out.old-999999999-abc"  # pid that cannot be alive
    old.mkdir()
    (old / "report.json").write_text('{"v": 1}')
    (old / OUTPUT_MANIFEST).write_text(json.dumps({"tool": "token-distillation", "files": ["report.json"]}))
    prepare_out_path(str(out), overwrite=True)
    assert json.loads((out / "report.json").read_text()) == {"v": 1} and not old.exists()


def test_corrupt_corpus_cache_is_rebuilt(tmp_path, toy_corpus, toy_tokenizer):
    cfg = CorpusConfig(dataset_path=str(toy_corpus))
    first = tokenize_corpus(cfg, toy_tokenizer, tmp_path)
    (seg,) = (tmp_path / "corpus").glob("*/seg-*")
    cache = seg / "ids.npy"
    good = cache.read_bytes()
    for damage in (b"garbage", good[:200]):
        cache.write_bytes(damage)
        again = tokenize_corpus(cfg, toy_tokenizer, tmp_path)
        assert np.array_equal(again.ids, first.ids) and np.array_equal(again.offsets, first.offsets)
        assert np.array_equal(np.load(cache), first.ids)  # rebuilt on disk too


def test_cache_problem_detects_truncated_checkpoint(tmp_path, toy_model_dir):
    import shutil

    d = tmp_path / "ckpt"
    shutil.copytree(toy_model_dir, d)
    assert cache_problem(d, "config.json") is None  # no manifest: structural checks only
    write_manifest(d)
    assert cache_problem(d, "config.json") is None
    st = d / "model.safetensors"
    data = st.read_bytes()
    st.write_bytes(data[: len(data) // 2])
    assert "model.safetensors" in cache_problem(d, "config.json")
    (d / MANIFEST()).unlink()
    assert "model.safetensors" in cache_problem(d, "config.json")  # size != declared tensors
    st.write_bytes(data)
    (d / "tokenizer.json").write_text('{"trunc')
    assert "tokenizer.json" in cache_problem(d, "config.json")


def MANIFEST():
    from token_distillation.models import MANIFEST as name

    return name


def test_corrupt_gguf_tokenizer_cache_is_rebuilt(tmp_path, smollm_tokenizer):
    """The tokenizer converted from the bundled GGUF file is cached; a truncated cache is detected,
    removed and rebuilt, and the rebuilt tokenizer equals the original."""
    src = resolve_model_source("smollm2-135m")
    tok = load_tokenizer(src, tmp_path)
    (cache,) = [p for p in (tmp_path / "gguf").iterdir() if p.name.endswith("-tokenizer")]
    tj = cache / "tokenizer.json"
    tj.write_bytes(tj.read_bytes()[:1000])
    again = load_tokenizer(src, tmp_path)
    text = "Severe hepatotoxicity was seen."
    assert again.encode(text) == tok.encode(text) == smollm_tokenizer.encode(text)
    assert cache_problem(cache, "tokenizer_config.json") is None


_TOKENIZE = textwrap.dedent("""
    import hashlib, sys
    from pathlib import Path
    from transformers import AutoTokenizer
    from token_distillation.config import CorpusConfig
    from token_distillation.corpus import tokenize_corpus

    tok = AutoTokenizer.from_pretrained(sys.argv[1])
    c = tokenize_corpus(CorpusConfig(dataset_path=sys.argv[2]), tok, Path(sys.argv[3]))
    print(hashlib.sha256(c.ids.tobytes() + c.offsets.tobytes()).hexdigest())
""")


def test_two_processes_share_a_cache_directory(tmp_path, toy_model_dir):
    """Two runs tokenizing the same corpus into the same cache at the same time both succeed with
    identical results, and the cache they leave is valid."""
    corpus = tmp_path / "docs.jsonl"
    with open(corpus, "w") as f:
        for i in range(3000):
            f.write(json.dumps({"text": f"Document {i}: hepatotoxicity and nephrotoxicity were observed."}) + "\n")
    cache = tmp_path / "cache"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    procs = [subprocess.Popen([sys.executable, "-c", _TOKENIZE, str(toy_model_dir), str(corpus), str(cache)],
                              cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-2000:] for o in outs]
    digests = {o[0].strip().splitlines()[-1] for o in outs}
    assert len(digests) == 1
    (key,) = list((cache / "corpus").iterdir())
    assert all(p.name.startswith(("seg-", "complete-")) for p in key.iterdir())  # no temporary leftovers
    from transformers import AutoTokenizer
    import hashlib

    c = tokenize_corpus(CorpusConfig(dataset_path=str(corpus)), AutoTokenizer.from_pretrained(toy_model_dir), cache)
    assert hashlib.sha256(c.ids.tobytes() + c.offsets.tobytes()).hexdigest() in digests


def test_concurrent_cache_writers_keep_one_complete_copy(tmp_path):
    """atomic_write_dir(replace=False): a cache that appeared meanwhile is kept, never mixed."""
    out = tmp_path / "gguf" / "key"

    def writer(tag):
        def w(tmp):
            (tmp / "config.json").write_text(json.dumps({"tag": tag}))
            if tag == "first":  # a second writer finishes while the first is still writing
                atomic_write_dir(out, writer("second"), replace=False)
        return w

    atomic_write_dir(out, writer("first"), replace=False)
    assert json.loads((out / "config.json").read_text()) == {"tag": "second"}
    assert [p.name for p in out.parent.iterdir()] == ["key"]


def test_concurrent_cache_writer_that_renames_first_wins_without_an_error(tmp_path, monkeypatch):
    """The other writer's rename can land between the existence check and ours: our rename then fails
    (a non-empty directory is in the way) and the other copy is kept, without an error. CI hit it once
    in test_two_processes_share_a_cache_directory (OSError on a corpus segment)."""
    from token_distillation import paths

    out = tmp_path / "corpus" / "seg-0-10"
    real = os.replace

    def other_writer_first(src, dst):
        if Path(dst) == out and not out.exists():
            out.mkdir()
            (out / "config.json").write_text(json.dumps({"tag": "other"}))
        return real(src, dst)

    monkeypatch.setattr(paths.os, "replace", other_writer_first)
    atomic_write_dir(out, lambda tmp: (tmp / "config.json").write_text(json.dumps({"tag": "ours"})), replace=False)
    assert json.loads((out / "config.json").read_text()) == {"tag": "other"}
    assert [p.name for p in out.parent.iterdir()] == ["seg-0-10"]  # our temporary copy is gone


def test_bundled_model_is_named_by_alias_or_package_name():
    from token_distillation.config import ConfigError
    from token_distillation.models import BUNDLED_MODELS

    checked = 0
    for alias, (dist, _, _) in BUNDLED_MODELS.items():
        try:
            a = resolve_model_source(alias)
        except ConfigError:  # the extra that ships this model is not installed
            continue
        b = resolve_model_source(dist)
        assert (a.path, a.gguf_file, a.identity) == (b.path, b.gguf_file, b.identity)
        checked += 1
    assert checked >= 1  # the demo extra (the default model) is part of the test install


def test_atomic_outputs_get_default_permissions(tmp_path):
    """Outputs are readable like any file the user creates: not the 0700/0600 of temporary files."""
    import os

    from token_distillation.paths import _current_umask, atomic_write_dir

    def write(d):
        (d / "sub").mkdir()
        f = d / "sub" / "model.safetensors"
        f.write_bytes(b"x")
        f.chmod(0o600)

    out = tmp_path / "out"
    atomic_write_dir(out, write)
    umask = _current_umask()
    assert umask == os.umask(umask)  # read without changing it
    assert (out.stat().st_mode & 0o777) == 0o777 & ~umask
    assert (out / "sub").stat().st_mode & 0o777 == 0o777 & ~umask
    assert (out / "sub" / "model.safetensors").stat().st_mode & 0o777 == 0o666 & ~umask


def test_file_identity_follows_content_not_location(tmp_path):
    """Copies of the same weights (e.g. one per virtual environment) share a cache key; any changed
    byte gives a new key."""
    import os

    from token_distillation.paths import file_identity

    data = bytearray(os.urandom(3 << 20))
    a, b = tmp_path / "a" / "m.gguf", tmp_path / "b" / "m.gguf"
    for p in (a, b):
        p.parent.mkdir()
        p.write_bytes(data)
    os.utime(b, (1_000_000, 1_000_000))
    assert file_identity(a) == file_identity(b)
    data[(3 << 20) // 2] ^= 1  # one byte in the middle
    b.write_bytes(data)
    os.utime(b, (2_000_000, 2_000_000))
    assert file_identity(a) != file_identity(b)


def test_directory_identity_follows_weight_files(tmp_path):
    """A model saved again into the same directory (same config) gets a new identity, so that a
    checkpoint made against the old weights is not resumed against the new ones."""
    import os

    from token_distillation.paths import resolve_model_source

    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    w = tmp_path / "model.safetensors"
    w.write_bytes(b"x" * 64)
    a = resolve_model_source(str(tmp_path)).identity
    assert resolve_model_source(str(tmp_path)).identity == a
    w.write_bytes(b"y" * 64)
    os.utime(w, ns=(w.stat().st_mtime_ns + 10**9,) * 2)
    assert resolve_model_source(str(tmp_path)).identity != a


def test_gguf_cache_shared_by_alias_and_path():
    """The bundled model named by its alias or by its file path converts into the same cache entry."""
    from token_distillation.models import _gguf_cache_dir
    from token_distillation.paths import resolve_model_source

    by_alias = resolve_model_source("smollm2-135m")
    by_path = resolve_model_source(str(Path(by_alias.path) / by_alias.gguf_file))
    assert by_alias.identity != by_path.identity  # the report says how the model was named
    assert _gguf_cache_dir(by_alias, Path("/c")) == _gguf_cache_dir(by_path, Path("/c"))


def test_target_layer_checked_before_torch_from_the_files_header(tmp_path):
    """--target_layer is checked in the torch-free preflight: from config.json (also a multimodal
    config's text_config) and from a GGUF header read only up to its block count, which equals
    what gguf's own reader gives for both bundled models."""
    import pytest
    from gguf import GGUFReader

    from token_distillation.config import ConfigError
    from token_distillation.paths import gguf_block_count, local_layer_count, preflight, resolve_model_source

    for alias in ("smollm2-135m", "gemma3-270m"):
        src = resolve_model_source(alias)
        fields = GGUFReader(str(Path(src.path) / src.gguf_file)).fields
        key = next(k for k in fields if k.endswith(".block_count"))
        assert gguf_block_count(Path(src.path) / src.gguf_file) == fields[key].contents() > 0
        assert local_layer_count(src, read_gguf=False) is None
    for i, cfg in enumerate(({"model_type": "llama", "num_hidden_layers": 4},
                             {"model_type": "gemma3", "text_config": {"num_hidden_layers": 4}},
                             {"model_type": "gpt2", "n_layer": 4})):  # helper-36: GPT-2's key was not read
        d = tmp_path / f"m{i}"
        d.mkdir()
        (d / "config.json").write_text(json.dumps(cfg))
        preflight(str(d), str(tmp_path / "o1"), False, False, target_layer=-4)
        preflight(str(d), str(tmp_path / "o2"), False, False, target_layer=4)
        for bad in (5, -5):
            with pytest.raises(ConfigError, match=f"--target_layer {bad} out of range for a model with 4 layers"):
                preflight(str(d), str(tmp_path / "o3"), False, False, target_layer=bad)
    (tmp_path / "bad.gguf").write_bytes(b"GGUF\x03\x00\x00\x00" + b"\x00" * 8)  # truncated
    with pytest.raises(ValueError, match="truncated"):
        gguf_block_count(tmp_path / "bad.gguf")
    code = ("import sys; from token_distillation.cli import main\n"
            "try:\n    main(target_layer=99, out_path=sys.argv[1])\n"
            "except SystemExit as e:\n    print('torch' in sys.modules, e.code)")
    r = subprocess.run([sys.executable, "-c", code, str(tmp_path / "o4")], capture_output=True, text=True, timeout=120)
    assert r.stdout.split() == ["False", "2"], r.stdout + r.stderr
    assert "--target_layer 99 out of range for a model with 30 layers" in r.stderr


def test_out_path_current_directory_unwritable_and_bad_local_config_fail_at_start(tmp_path, monkeypatch):
    """helper-36: --out_path . from an empty directory replaced the shell's directory (the output is
    written by swapping the directory); an unwritable place (/proc) failed with a traceback after the
    run; a local model directory whose config.json has no model_type, or is not JSON, ended in a
    transformers traceback. Each is now one ConfigError before any work."""
    import pytest

    from token_distillation.config import ConfigError
    from token_distillation.paths import prepare_out_path, resolve_model_source

    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.chdir(empty)
    with pytest.raises(ConfigError, match="is the current, a parent or the home directory"):
        prepare_out_path(".", overwrite=False)
    assert prepare_out_path("sub", overwrite=False) == empty / "sub"  # a new directory below it is fine
    if Path("/proc/self").exists():
        with pytest.raises(ConfigError, match="cannot write in /proc"):
            prepare_out_path("/proc/nope/x", overwrite=False)
    assert not list(empty.iterdir())  # the probe leaves nothing
    model = tmp_path / "m"
    model.mkdir()
    (model / "config.json").write_text('{"num_hidden_layers": 4}')
    with pytest.raises(ConfigError, match="has no model_type"):
        resolve_model_source(str(model))
    (model / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="cannot be read as JSON"):
        resolve_model_source(str(model))


def test_gguf_file_folder_may_hold_the_output_but_not_be_replaced(tmp_path):
    """helper-36: with --model_path model.gguf in the current folder the default --out_path
    (./outputs/...) was refused as "inside the input model directory"; a new subfolder beside a GGUF
    file is harmless. The folder that holds the file (or one above it) stays refused."""
    import pytest

    from token_distillation.config import ConfigError
    from token_distillation.paths import ModelSource, prepare_out_path

    (tmp_path / "model.gguf").write_bytes(b"GGUF")
    src = ModelSource(str(tmp_path / "model.gguf"), str(tmp_path), "model.gguf", "gguf:x")
    assert prepare_out_path(str(tmp_path / "outputs" / "run"), False, src) == tmp_path / "outputs" / "run"
    for out in (tmp_path, tmp_path.parent):
        with pytest.raises(ConfigError, match="holds the input model file"):
            prepare_out_path(str(out), True, src)


def test_corpus_not_utf8_or_with_mixed_fields_is_one_clear_error(tmp_path):
    """A Latin-1 JSON Lines or CSV corpus fails in the text-field check with the file and the fix (it
    was a UnicodeDecodeError traceback); a folder whose files have different fields names two of them
    (it was the reader's schema dump, naming no file); a Latin-1 text file says how to convert it."""
    from token_distillation.config import ConfigError, CorpusConfig
    from token_distillation.corpus import check_text_column, iter_texts

    for name, data in (("c.jsonl", b'{"text": "caf\xe9 hepatotoxicity"}\n'), ("c.csv", b"text\ncaf\xe9 x\n")):
        f = tmp_path / name
        f.write_bytes(data)
        with pytest.raises(ConfigError, match=rf"{name} is not UTF-8 text .*iconv"):
            check_text_column(CorpusConfig(dataset_path=str(f)))
    txt = tmp_path / "c.txt"
    txt.write_bytes(b"caf\xe9 hepatotoxicity\n")
    with pytest.raises(ConfigError, match="not UTF-8 text .*iconv -f latin1"):
        list(iter_texts(CorpusConfig(dataset_path=str(txt))))
    # a UTF-16 export (Windows tools) fails at the text-field check, before any model loads, with its own
    # fix (helper-50: after 10.8 s, with the latin1 hint)
    u16 = tmp_path / "u16.txt"
    u16.write_bytes("caf\u00e9 hepatotoxicity\n".encode("utf-16"))
    with pytest.raises(ConfigError, match="u16.txt is not UTF-8 text .*it is UTF-16 .*iconv -f UTF-16 -t UTF-8"):
        check_text_column(CorpusConfig(dataset_path=str(u16)))
    shards = tmp_path / "shards"
    shards.mkdir()
    (shards / "a.jsonl").write_text('{"text": "a hepatotoxicity b", "id": 1}\n' * 3, encoding="utf-8")
    (shards / "b.jsonl").write_text('{"abstract": "c", "pmid": 2}\n', encoding="utf-8")
    with pytest.raises(ConfigError, match=r"different fields \(a.jsonl: id, text; b.jsonl: abstract, pmid\)"):
        list(iter_texts(CorpusConfig(dataset_path=str(shards))))
    # a bad byte past the first record (pyarrow does not check UTF-8 when it parses): the file is named
    late = tmp_path / "late"
    late.mkdir()
    (late / "a.jsonl").write_text('{"text": "a hepatotoxicity b"}\n', encoding="utf-8")
    (late / "b.jsonl").write_bytes(b'{"text": "b"}\n{"text": "caf\xe9 hepatotoxicity"}\n')
    with pytest.raises(ConfigError, match=r"b\.jsonl is not UTF-8 text \(invalid continuation byte at byte 27\)"):
        list(iter_texts(CorpusConfig(dataset_path=str(late))))
    # a pretty-printed .json beside JSON lines: its first line is no record, the files are still named
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    (mixed / "a.jsonl").write_text('{"text": "a hepatotoxicity b"}\n', encoding="utf-8")
    (mixed / "meta.json").write_text('{\n "name": "x",\n "v": 2\n}\n', encoding="utf-8")
    with pytest.raises(ConfigError, match=r"do not all have the same fields \(a.jsonl, meta.json\)"):
        list(iter_texts(CorpusConfig(dataset_path=str(mixed))))
