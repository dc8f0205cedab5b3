"""--export peft: a trainable-tokens adapter that, applied to the source model, gives the logits of
the full extended checkpoint; bad --export input refused before any model loads."""

import json
from pathlib import Path

import pytest
import torch

from tests.conftest import make_llama, require_shared
from token_distillation.config import ConfigError, RunConfig
from token_distillation.export import ADAPTER_DIRNAME, ADAPTER_INFO, load_adapter
from token_distillation.pipeline import run

pytest.importorskip("peft")

SENTENCE = "The hepatotoxicity and nephrotoxicity of angiogenesis inhibitors."


def _cfg(tmp_path, model_dir, corpus, cache_dir, **kw):
    words = tmp_path / "words.txt"
    words.write_text(" hepatotoxicity\n nephrotoxicity\n angiogenesis\n")
    flags = dict(model_path=str(model_dir), dataset_path=str(corpus), cache_dir=str(cache_dir),
                 new_tokens_source=str(words), out_path=str(tmp_path / "out"), snippet_num=6, min_snippets=2,
                 heldout_snippet_num=2, heldout_fraction=0.25, token_distillation_batch_size=4,
                 token_distillation_lr=1e-2, snippet_len=12, export="hf,peft")
    flags.update(kw)
    return RunConfig.from_flags(**flags)


def _logits(model, tok, text=SENTENCE):
    ids = torch.tensor([tok.encode(text, add_special_tokens=False)])
    with torch.no_grad():
        return model(ids).logits, ids


@pytest.mark.parametrize("source,output_embeddings", [("tied", "auto"), ("tied", "tied"), ("untied", "auto")])
def test_adapter_on_the_source_gives_the_full_checkpoints_logits(tmp_path, toy_model_dir, untied_model_dir, toy_corpus,
                                                                 cache_dir, source, output_embeddings):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = toy_model_dir if source == "tied" else untied_model_dir
    res = run(_cfg(tmp_path, model_dir, toy_corpus, cache_dir, output_embeddings=output_embeddings))
    out = res.out_path
    adapter = out / ADAPTER_DIRNAME
    info = json.loads((adapter / ADAPTER_INFO).read_text())
    assert info["untie_output_embeddings"] == (source == "tied" and output_embeddings == "auto")
    assert len(info["targets"]) == (1 if output_embeddings == "tied" else 2)
    assert info["new_token_ids"] == [t["id"] for t in res.report["tokens"]]
    # the report says what the adapter holds, as the dry run did
    holds = res.report["peft_adapter"]
    assert ("input rows only" in holds) == (output_embeddings == "tied")
    assert ("base must be untied" in holds) == info["untie_output_embeddings"]
    assert json.loads((out / "report.json").read_text())["peft_adapter"] == holds

    full = AutoModelForCausalLM.from_pretrained(out).eval()
    tok = AutoTokenizer.from_pretrained(out)
    want, ids = _logits(full, tok)
    assert set(info["new_token_ids"]) & set(ids[0].tolist())  # the sentence uses new tokens
    base = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    peft_model, tok2 = load_adapter(base, adapter)
    got, ids2 = _logits(peft_model.eval(), tok2)
    assert torch.equal(ids, ids2)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    from safetensors.torch import load_file

    stored = load_file(str(adapter / "adapter_model.safetensors"))  # the new rows only, no whole matrix
    assert stored and all(v.shape == (3, 32) for v in stored.values())
    manifest = json.loads((out / "token_distillation_output.json").read_text())
    assert f"{ADAPTER_DIRNAME}/adapter_model.safetensors" in manifest["files"]


def test_adapter_only_writes_no_full_checkpoint(tmp_path, toy_model_dir, toy_corpus, cache_dir):
    import warnings

    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        res = run(_cfg(tmp_path, toy_model_dir, toy_corpus, cache_dir, export="peft", init_method="subtoken-mean"))
    # peft's call of a deprecated transformers method is not shown to the user
    assert not [w for w in seen if "is_gradient_checkpointing" in str(w.message)]
    out = res.out_path
    assert not list(out.glob("*.safetensors")) and (out / "report.json").is_file()
    assert (out / ADAPTER_DIRNAME / "adapter_model.safetensors").is_file()


def test_bad_export_refused_before_loading(tmp_path, toy_model_dir, toy_corpus, cache_dir, monkeypatch):
    import token_distillation.pipeline as pipeline

    monkeypatch.setattr(pipeline, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    with pytest.raises(ConfigError, match="--export 'zip'"):
        _cfg(tmp_path, toy_model_dir, toy_corpus, cache_dir, export="zip")
    with pytest.raises(ConfigError, match="--export"):
        _cfg(tmp_path, toy_model_dir, toy_corpus, cache_dir, export=",")
    with pytest.raises(ConfigError, match="--train_original_embeddings"):
        run(_cfg(tmp_path, toy_model_dir, toy_corpus, cache_dir, export="peft", train_original_embeddings=True))


def test_load_adapter_refuses_other_directories(tmp_path):
    with pytest.raises(ValueError, match="not an adapter"):
        load_adapter(make_llama(64), tmp_path)


def test_bundled_model_adapter_is_small_and_exact(tmp_path):
    """SmolLM2 (tied source, untied by the run): the adapter is under 1% of the full checkpoint and
    reproduces its logits on the source model."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from token_distillation.models import load_model
    from token_distillation.paths import default_cache_root, resolve_model_source

    data = require_shared() / "abstracts_small.jsonl"
    words = tmp_path / "words.txt"
    words.write_text(" hepatotoxicity\n haplotype\n thrombocytopenia\n")
    res = run(RunConfig.from_flags(new_tokens_source=str(words), dataset_path=str(data), out_path=str(tmp_path / "out"),
                                   init_method="subtoken-mean", export="hf,peft", snippet_num=4, heldout_snippet_num=2,
                                   min_snippets=1))
    out = res.out_path
    full_bytes = sum(p.stat().st_size for p in out.glob("*.safetensors"))
    adapter_bytes = (out / ADAPTER_DIRNAME / "adapter_model.safetensors").stat().st_size
    assert adapter_bytes < 0.01 * full_bytes
    full = AutoModelForCausalLM.from_pretrained(out).eval()
    tok = AutoTokenizer.from_pretrained(out)
    text = "Severe hepatotoxicity and thrombocytopenia were linked to one haplotype."
    want, ids = _logits(full, tok, text)
    base = load_model(resolve_model_source("smollm2-135m"), default_cache_root(), torch.device("cpu"), torch.float32)
    peft_model, tok2 = load_adapter(base, out / ADAPTER_DIRNAME)
    got, _ = _logits(peft_model.eval(), tok2, text)
    torch.testing.assert_close(got, want.to(got.dtype), rtol=0, atol=1e-4)
    # PEFT's own loaders find the base: the bundled alias's converted checkpoint, not the alias (helper-28)
    base_path = json.loads((out / ADAPTER_DIRNAME / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert Path(base_path, "config.json").is_file()
    n_base = AutoModelForCausalLM.from_pretrained(base_path).get_input_embeddings().weight.shape[0]
    assert n_base == full.get_input_embeddings().weight.shape[0] - len(res.report["tokens"])
    assert json.loads((out / ADAPTER_DIRNAME / ADAPTER_INFO).read_text())["base_model"] == "smollm2-135m"


TEXT = "Severe hepatotoxicity and thrombocytopenia were linked to one haplotype."


def _gguf_run(tmp_path, alias):
    data = require_shared() / "abstracts_small.jsonl"
    words = tmp_path / "words.txt"
    words.write_text(" hepatotoxicity\n haplotype\n thrombocytopenia\n")
    return run(RunConfig.from_flags(model_path=alias, new_tokens_source=str(words), dataset_path=str(data),
                                    out_path=str(tmp_path / "out"), init_method="subtoken-mean", export="hf,gguf",
                                    snippet_num=4, heldout_snippet_num=2, min_snippets=1))


@pytest.fixture(scope="module")
def smollm_gguf(tmp_path_factory):
    return _gguf_run(tmp_path_factory.mktemp("gguf_smollm"), "smollm2-135m")


@pytest.mark.parametrize("alias", ["smollm2-135m", "gemma3-270m"])
def test_gguf_export_patches_the_source_file(request, tmp_path, alias):
    """--export gguf on a bundled (GGUF) model: the vocabulary gains the new tokens as user-defined
    tokens, token_embd (and the output matrix a tied source gets when untied) gain the new rows in
    the tensor's type, every other tensor and the original rows keep their exact bytes; transformers
    reads the file back, tokenizes the new words into the new ids, and gives the full checkpoint's
    logits up to the new rows' quantisation (the original tokens' logits before the first new token
    exactly)."""
    import numpy as np
    from gguf import GGUFReader
    from gguf.quants import dequantize
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from token_distillation.paths import resolve_model_source

    res = request.getfixturevalue("smollm_gguf") if alias == "smollm2-135m" else _gguf_run(tmp_path, alias)
    out = res.out_path
    src = resolve_model_source(alias)
    before, after = GGUFReader(str(Path(src.path) / src.gguf_file)), GGUFReader(str(out / "model.gguf"))
    n = len(before.fields["tokenizer.ggml.tokens"].contents())
    new_ids = [t["id"] for t in res.report["tokens"]]
    assert new_ids == list(range(n, n + len(new_ids))) and new_ids
    assert after.fields["tokenizer.ggml.tokens"].contents()[n:] == [t["token"] for t in res.report["tokens"]]
    assert list(after.fields["tokenizer.ggml.token_type"].contents()[n:]) == [4] * len(new_ids)
    old = {t.name: t for t in before.tensors}
    full = AutoModelForCausalLM.from_pretrained(out).eval()
    for t in after.tensors:
        if t.name not in ("token_embd.weight", "output.weight"):
            assert t.tensor_type == old[t.name].tensor_type and np.array_equal(t.data, old[t.name].data), t.name
            continue
        src_t = old["token_embd.weight" if t.name not in old else t.name]
        rows = dequantize(t.data, t.tensor_type).reshape(n + len(new_ids), -1)
        if t.tensor_type == src_t.tensor_type:  # original rows: the source's bytes
            assert np.array_equal(np.asarray(t.data)[:n], np.asarray(src_t.data).reshape(n, -1))
        module = full.get_input_embeddings() if t.name == "token_embd.weight" else full.get_output_embeddings()
        want = module.weight.detach()[new_ids].float().numpy()
        assert np.abs(rows[n:] - want).max() <= 0.02 * np.abs(want).max()  # Q8_0 / F16 rounding of the new rows
    gguf_model = AutoModelForCausalLM.from_pretrained(out, gguf_file="model.gguf").eval()
    gguf_tok = AutoTokenizer.from_pretrained(out, gguf_file="model.gguf")
    tok = AutoTokenizer.from_pretrained(out)
    ids = tok.encode(TEXT, add_special_tokens=False)
    assert gguf_tok.encode(TEXT, add_special_tokens=False) == ids and set(new_ids) <= set(ids)
    with torch.no_grad():
        a, b = full(torch.tensor([ids])).logits, gguf_model(torch.tensor([ids])).logits
    first = ids.index(new_ids[0])
    torch.testing.assert_close(b[:, :first, :n], a[:, :first, :n], rtol=1e-4, atol=1e-4)  # original tokens
    assert (a - b).abs().max() < 0.15 * a.std()


def test_gguf_export_needs_a_gguf_source(tmp_path, toy_model_dir, toy_corpus, cache_dir, monkeypatch):
    import token_distillation.pipeline as pipeline

    monkeypatch.setattr(pipeline, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    with pytest.raises(ConfigError, match="convert_hf_to_gguf"):
        run(_cfg(tmp_path, toy_model_dir, toy_corpus, cache_dir, export="hf,gguf"))


def test_llama_cpp_reads_the_export(smollm_gguf):
    """llama.cpp's own loader reads the exported vocabulary and splits the new words into the new ids."""
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed here (it builds "
                                                        "llama.cpp from source); the file is checked with gguf and "
                                                        "transformers in test_gguf_export_patches_the_source_file")
    from transformers import AutoTokenizer

    out = smollm_gguf.out_path
    ids = AutoTokenizer.from_pretrained(out).encode(TEXT, add_special_tokens=False)
    llm = llama_cpp.Llama(str(out / "model.gguf"), vocab_only=True, verbose=False)
    assert llm.tokenize(TEXT.encode(), add_bos=False) == ids
