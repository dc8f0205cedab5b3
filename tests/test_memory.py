"""The memory plan (issue 18): estimated from the config alone, refused with the flag to change."""

import pytest
import torch

from tests.conftest import make_llama
from token_distillation.config import ConfigError
from token_distillation.memory import GIB, check_fits, count_parameters, plan_memory


@pytest.mark.parametrize("tied", [True, False])
def test_parameter_count_from_config_equals_the_model(tied):
    model = make_llama(300, tied=tied)
    real = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    assert count_parameters(model.config) == real


def test_llama_8b_shape_plan_from_config_only():
    """Llama-3.1-8B's shape (built on the meta device: no memory, no download): 8.03B parameters,
    16.1 GB of bf16 weights; the plan at the default batch fits an 80 GB GPU, not a 24 GB one at batch 64."""
    from transformers import LlamaConfig

    cfg = LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=False)
    assert abs(count_parameters(cfg) - 8.03e9) < 0.01e9
    kw = dict(weights_dtype=torch.bfloat16, autocast_dtype=torch.bfloat16, seq_len=51, layers_to_target=32,
              num_new=2500, untie=False)
    plan = plan_memory(cfg, batch_size=16, **kw)
    assert 16.0 * 1e9 < plan.weights < 16.2 * 1e9 and plan.trainable == 16 * 2500 * 4096
    assert plan.total < 24 * GIB < plan_memory(cfg, batch_size=256, **kw).total


def test_plan_that_does_not_fit_is_refused_with_the_flag(monkeypatch):
    from token_distillation.memory import MemoryPlan

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (20 * GIB, 24 * GIB))
    big = MemoryPlan(weights=16 * GIB, trainable=0, activations=8 * GIB, logits=GIB)
    with pytest.raises(ConfigError, match=r"--token_distillation_batch_size \(now 16"):
        check_fits(big, torch.device("cuda"), 16)
    check_fits(MemoryPlan(8 * GIB, 0, GIB, GIB), torch.device("cuda"), 16)  # fits: no error
    check_fits(big, torch.device("cpu"), 16)  # CPU: logged only
