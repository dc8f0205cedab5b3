"""Saved dtype follows the source checkpoint; fp16 autocast refused; output bias of new tokens (issue 18)."""

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import make_llama
from tests.test_pipeline import _toy_cfg
from token_distillation.config import ConfigError, MixedPrecision
from token_distillation.pipeline import resolve_precision, run, source_dtype


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_saved_dtype_is_the_source_dtype_and_originals_are_bit_identical(dtype, tmp_path, toy_tokenizer, toy_corpus,
                                                                       cache_dir):
    """A CPU run computes in fp32 but saves in the source's dtype; every original tensor (and the
    original rows of the grown embedding matrices) is bit-identical to the source file."""
    src = tmp_path / "src"
    make_llama(len(toy_tokenizer), tied=False).to(dtype).save_pretrained(src)
    toy_tokenizer.save_pretrained(src)
    res = run(_toy_cfg(tmp_path, src, toy_corpus, cache_dir, stopping_condition="max_steps", max_steps=2))
    before, after = load_file(str(src / "model.safetensors")), load_file(str(res.out_path / "model.safetensors"))
    assert {t.dtype for t in after.values()} == {dtype}
    assert res.report["saved_dtype"] == str(dtype) and res.report["weights_dtype"] == "torch.float32"
    for name, t in before.items():
        if name in ("model.embed_tokens.weight", "lm_head.weight"):
            assert after[name].shape[0] > t.shape[0] and torch.equal(after[name][: t.shape[0]], t)
        else:
            assert torch.equal(after[name], t), name


def test_weights_on_cuda_stay_in_the_source_dtype():
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert resolve_precision(MixedPrecision.AUTO, cuda, torch.bfloat16) == (torch.bfloat16, torch.bfloat16)
    assert resolve_precision(MixedPrecision.AUTO, cuda, torch.float16) == (torch.float16, torch.bfloat16)
    assert resolve_precision(MixedPrecision.NO, cuda, torch.float32) == (torch.float32, None)
    assert resolve_precision(MixedPrecision.AUTO, cpu, torch.bfloat16) == (torch.float32, None)
    with pytest.raises(ConfigError, match="--mixed_precision fp16.*gradient scaler"):
        resolve_precision(MixedPrecision.FP16, cuda, torch.float16)


def test_source_dtype_from_config():
    from transformers import LlamaConfig

    assert source_dtype(LlamaConfig(dtype="bfloat16")) == torch.bfloat16
    assert source_dtype(LlamaConfig()) == torch.float32


def test_new_tokens_get_their_subtokens_mean_output_bias():
    from token_distillation.models import extend_embeddings, set_new_output_bias

    model = make_llama(64, tied=False)
    assert not set_new_output_bias(model, [64], [(3, 4)])  # Llama's output layer has no bias
    head = torch.nn.Linear(32, 64, bias=True)
    with torch.no_grad():
        head.bias.copy_(torch.arange(64, dtype=torch.float32))
    model.lm_head = head
    extend_embeddings(model, 66)
    assert set_new_output_bias(model, [64, 65], [(3, 4), (10, 20, 30)])
    assert model.lm_head.bias[64].item() == 3.5 and model.lm_head.bias[65].item() == 20.0
