"""--export peft: a trainable-tokens adapter that, applied to the source model, gives the logits of
the full extended checkpoint; bad --export input refused before any model loads."""

import json

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


@pytest.fixture(scope="module")
def untied_model_dir(tmp_path_factory, toy_tokenizer):
    d = tmp_path_factory.mktemp("tiny_llama_untied")
    make_llama(len(toy_tokenizer), tied=False).save_pretrained(d)
    toy_tokenizer.save_pretrained(d)
    return d


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
    res = run(_cfg(tmp_path, toy_model_dir, toy_corpus, cache_dir, export="peft", init_method="subtoken-mean"))
    out = res.out_path
    assert not list(out.glob("*.safetensors")) and (out / "report.json").is_file()
    assert (out / ADAPTER_DIRNAME / "adapter_model.safetensors").is_file()


def test_bad_export_refused_before_loading(tmp_path, toy_model_dir, toy_corpus, cache_dir, monkeypatch):
    import token_distillation.pipeline as pipeline

    monkeypatch.setattr(pipeline, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    with pytest.raises(ConfigError, match="--export 'gguf'"):
        _cfg(tmp_path, toy_model_dir, toy_corpus, cache_dir, export="gguf")
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
