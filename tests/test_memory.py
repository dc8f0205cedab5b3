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


def _llama(layers=2, tied=False):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=layers,
                       num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=tied)


def test_host_plan_of_a_16bit_checkpoint_peaks_while_loading():
    """CPU runs compute in fp32: loading a bf16 checkpoint holds the fp32 weights and the mapped
    bf16 file at once (measured: tests/test_scale_shape.py); the baseline is added to every phase."""
    cfg = _llama()
    n = count_parameters(cfg)
    kw = dict(weights_dtype=torch.float32, autocast_dtype=None, batch_size=4, seq_len=17, layers_to_target=2,
              num_new=3, untie=False, added_rows=0)
    plan = plan_memory(cfg, host=True, stored_dtype=torch.bfloat16, baseline=GIB // 2, **kw)
    assert plan.loading == n * 4 + n * 2 and plan.peak_phase == "loading"
    assert plan.total == GIB // 2 + n * 6
    assert plan.transient == 128256 * 4096 * 2  # saving casts the embedding matrix back to bf16
    assert "host memory at peak, while loading" in plan.describe()
    fp32 = plan_memory(cfg, host=True, stored_dtype=torch.float32, baseline=GIB // 2, **kw)
    assert fp32.loading == n * 4 and fp32.transient == 0 and fp32.peak_phase == "training"
    # on the host the held-out logits come on top of training's activations (memory kept by the allocator)
    assert fp32.training == fp32.weights + fp32.trainable + fp32.activations + fp32.logits
    device = plan_memory(cfg, **kw)  # a device plan: training only, no baseline
    assert device.total == device.weights + device.trainable + max(device.activations, device.logits)


def test_plan_counts_the_rows_the_matrices_grow_by():
    """A pre-padded vocabulary that holds the new ids grows by nothing; otherwise each untied matrix
    grows (a tied one once, before it is untied), and growing it copies the matrix once."""
    kw = dict(weights_dtype=torch.float32, autocast_dtype=None, batch_size=4, seq_len=17, layers_to_target=1,
              num_new=10, host=True)
    untied, tied = _llama(1), _llama(1, tied=True)
    base = plan_memory(untied, untie=False, added_rows=0, **kw)
    assert plan_memory(untied, untie=False, added_rows=10, **kw).weights - base.weights == 2 * 10 * 4096 * 4
    assert plan_memory(untied, untie=False, added_rows=10, **kw).transient == (128256 + 10) * 4096 * 4
    t0 = plan_memory(tied, untie=False, added_rows=0, **kw)
    assert plan_memory(tied, untie=False, added_rows=10, **kw).weights - t0.weights == 10 * 4096 * 4
    assert plan_memory(tied, untie=True, added_rows=10, **kw).weights - t0.weights == (10 + 128266) * 4096 * 4


def _fake_cuda(monkeypatch, gib: float):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (int(gib * GIB), int(gib * GIB)))


def _plan_8b(cfg, n_params):
    kw = dict(weights_dtype=torch.bfloat16, autocast_dtype=torch.bfloat16, seq_len=51, layers_to_target=32,
              num_new=1000, untie=False, num_params=n_params)
    return lambda b: plan_memory(cfg, batch_size=b, **kw)


@pytest.mark.parametrize("gib", [24, 48, 141])
def test_auto_batch_is_the_largest_that_fits_the_device(monkeypatch, gib):
    """Llama-3.1-8B's shape with the CUDA query mocked: the pick fits 90% of the device and one more
    would not (or it is the cap); larger devices get larger batches."""
    from token_distillation.memory import AUTO_BATCH_CAP, choose_batch_size

    cfg = _llama(32)
    plan_at = _plan_8b(cfg, count_parameters(cfg))
    _fake_cuda(monkeypatch, gib)
    b = choose_batch_size(plan_at, torch.device("cuda"))
    assert 1 <= b <= AUTO_BATCH_CAP and plan_at(b).total <= 0.9 * gib * GIB
    assert b == AUTO_BATCH_CAP or plan_at(b + 1).total > 0.9 * gib * GIB
    check_fits(plan_at(b), torch.device("cuda"), b)  # the run then passes the refusal check
    if gib == 24:
        assert 16 < b < 256  # the 16 GB of weights leave room for some batch, not for 256 (test above)


def test_auto_batch_respects_multiple_cap_and_processes(monkeypatch):
    from token_distillation.memory import choose_batch_size

    cfg = _llama(32)
    plan_at = _plan_8b(cfg, count_parameters(cfg))
    _fake_cuda(monkeypatch, 141)
    assert choose_batch_size(plan_at, torch.device("cuda"), cap=40) == 40  # e.g. 40 tokens x 1 snippet per update
    assert choose_batch_size(plan_at, torch.device("cuda"), cap=41, multiple=4) == 40
    seen = []
    choose_batch_size(lambda b: seen.append(b) or plan_at(b), torch.device("cuda"), cap=64, multiple=2, world_size=2)
    assert seen and max(seen) <= 32  # each of two processes plans its half of the global batch
    _fake_cuda(monkeypatch, 8)  # not even the weights fit: the smallest batch, which check_fits refuses
    assert choose_batch_size(plan_at, torch.device("cuda"), multiple=2) == 2
    with pytest.raises(ConfigError, match="--token_distillation_batch_size"):
        check_fits(plan_at(2), torch.device("cuda"), 2)


def test_auto_batch_on_cpu_is_at_most_16_and_says_so(caplog):
    import logging

    from token_distillation.memory import choose_batch_size

    def no_plan(_b):
        raise AssertionError("no plan needed on CPU")

    with caplog.at_level(logging.INFO, logger="token_distillation.memory"):
        assert choose_batch_size(no_plan, torch.device("cpu")) == 16
        assert choose_batch_size(no_plan, torch.device("cpu"), cap=5) == 5
        assert choose_batch_size(no_plan, torch.device("cpu"), cap=40, multiple=3) == 15
    assert "--token_distillation_batch_size auto: 16 on cpu" in caplog.text


@pytest.mark.parametrize("value, ok", [("auto", "auto"), ("AUTO", "auto"), (32, 32), ("32", 32), ("big", None),
                                       (0, "auto"), ("0", "auto"), (-1, None), (2.5, None), ("", None)])
def test_batch_size_flag_is_an_integer_or_auto(value, ok):
    from token_distillation.config import RunConfig

    if ok is None:
        with pytest.raises(ConfigError, match="--token_distillation_batch_size"):
            RunConfig.from_flags(token_distillation_batch_size=value)
    else:
        assert RunConfig.from_flags(token_distillation_batch_size=value).train.token_distillation_batch_size == ok


@pytest.mark.parametrize("flags, needle", [({"recipe": "paper"}, "--recipe paper"),
                                           ({"init_method": "ntp"}, "--init_method ntp"),
                                           ({"loss_method": "MSE-on-hiddens,KL-on-logits"}, "KL-on-logits"),
                                           ({"train_original_embeddings": True}, "--train_original_embeddings"),
                                           ({"output_embeddings": "ntp"}, "--output_embeddings ntp")])
def test_auto_batch_is_refused_where_the_batch_changes_the_result(flags, needle):
    """Only the per-token recipe's rows do not depend on the batch size (tests/test_regime.py); elsewhere
    auto would make the result depend on the machine's memory."""
    from token_distillation.config import RunConfig

    with pytest.raises(ConfigError, match=f"--token_distillation_batch_size auto: .*{needle}"):
        RunConfig.from_flags(token_distillation_batch_size="auto", **flags)
    RunConfig.from_flags(token_distillation_batch_size="auto", init_method="subtoken-mean")  # nothing trained: fine


@pytest.mark.parametrize("flags, resolved", [({}, "auto"),
                                             ({"init_method": "subtoken-mean"}, "auto"),  # nothing trained
                                             ({"recipe": "paper"}, 16), ({"init_method": "ntp"}, 16),
                                             ({"loss_method": "MSE-on-hiddens,KL-on-logits"}, 16),
                                             ({"train_original_embeddings": True}, 16),
                                             ({"output_embeddings": "ntp"}, 16),
                                             ({"token_distillation_batch_size": 8}, 8)])
def test_default_batch_is_auto_where_the_rows_do_not_depend_on_it(flags, resolved):
    """Without the flag the batch is auto (on CUDA the largest that fits; elsewhere 16) where the
    batch size does not change the trained rows, and the paper's 16 everywhere else, without the
    refusal an explicit auto gets there."""
    from token_distillation.config import TrainConfig, RunConfig

    assert TrainConfig().token_distillation_batch_size == 0
    assert RunConfig.from_flags(**flags).train.token_distillation_batch_size == resolved


def test_resume_with_auto_keeps_the_interrupted_runs_batch(tmp_path, monkeypatch):
    """check_resumable returns the batch to train with: under auto the interrupted run's, read with
    the one load of the newest checkpoint; an explicit batch is compared with it instead."""
    from token_distillation import checkpoint
    from token_distillation.checkpoint import check_resumable, fingerprint

    assert check_resumable(tmp_path, {"token_distillation_batch_size": "auto"}, "m") == "auto"  # chosen afresh
    torch.save({"fingerprint": fingerprint({"token_distillation_batch_size": 48}, model_identity="m")},
               tmp_path / "step-00000003.pt")
    loads = []
    real = checkpoint._load
    monkeypatch.setattr(checkpoint, "_load", lambda p, **kw: loads.append(p) or real(p, **kw))
    assert check_resumable(tmp_path, {"token_distillation_batch_size": "auto"}, "m") == 48
    assert len(loads) == 1
    with pytest.raises(ConfigError, match="token_distillation_batch_size: 48 then, 16 now"):
        check_resumable(tmp_path, {"token_distillation_batch_size": 16}, "m")


def test_held_out_logits_take_at_most_the_held_out_batch():
    from token_distillation.memory import HELDOUT_BATCH_SIZE

    kw = dict(weights_dtype=torch.float32, autocast_dtype=None, batch_size=4, seq_len=17, layers_to_target=1,
              num_new=3, untie=False, added_rows=0)
    full = plan_memory(_llama(1), **kw)
    assert full.logits == 3 * HELDOUT_BATCH_SIZE * 17 * (128256 + 3) * 4  # three [positions, vocab] fp32 copies
    assert plan_memory(_llama(1), heldout_snippets=5, **kw).logits * HELDOUT_BATCH_SIZE == full.logits * 5
    assert plan_memory(_llama(1), heldout_snippets=100, **kw).logits == full.logits


def test_output_fit_term_is_bounded_by_the_chunk_and_takes_turns():
    """--output_embeddings distill: the fit's float32 final states of one group of tokens (training x3:
    states, gathered rows, their gradient; held-out once, in the run's ratio), capped by
    output_rows.CHUNK_ENTRIES unless one token alone exceeds it (its snippets' positions and
    BACKGROUND_POSITIONS), one snippet's logits three times, and
    the teacher's key/value cache of the batch twice and of COMPLETION_ROWS snippets (completions away
    from the word); on a device it takes turns with the activations and held-out logits, on the host
    with their sum."""
    from token_distillation.memory import MemoryPlan
    from token_distillation.output_rows import BACKGROUND_POSITIONS, CHUNK_ENTRIES, COMPLETION_ROWS

    kw = dict(weights_dtype=torch.float32, autocast_dtype=None, batch_size=4, seq_len=17, layers_to_target=1,
              num_new=3, untie=False, added_rows=0)
    none = plan_memory(_llama(1), **kw)
    few = plan_memory(_llama(1), output_fit_snippets=10, output_fit_per_token=5, heldout_snippets=4, **kw)
    many = plan_memory(_llama(1), output_fit_snippets=10**6, output_fit_per_token=25, heldout_snippets=2 * 10**5, **kw)
    huge = plan_memory(_llama(1), output_fit_snippets=10**6, output_fit_per_token=10**4, heldout_snippets=0, **kw)
    logits = 3 * max(17, COMPLETION_ROWS) * (128256 + 3) * 4
    logits += (2 * 4 + COMPLETION_ROWS) * 17 * 2 * 1 * 8 * 128 * 4  # cache: 1 layer, 8 KV heads of 128, fp32
    per = 17 * 4096
    assert none.output_fit == 0
    bg = BACKGROUND_POSITIONS * 4096  # each token's background positions
    few_train = 10 * per + 3 * bg
    assert few.output_fit == 4 * (3 * few_train + few_train * 4 // 10 + 3 * bg) + logits  # held-out: background too
    assert many.output_fit == 4 * (3 * CHUNK_ENTRIES + CHUNK_ENTRIES // 5 + 3 * bg) + logits
    assert huge.output_fit == 4 * 3 * (10**4 * per + bg) + logits  # one token's positions exceed the chunk
    assert "output fit" in many.describe() and "output fit" not in none.describe()
    dev = MemoryPlan(weights=10, trainable=1, activations=5, logits=3, output_fit=7)
    assert dev.training == 10 + 1 + 7
    host = MemoryPlan(weights=10, trainable=1, activations=5, logits=3, output_fit=7, host=True)
    assert host.training == 10 + 1 + 5 + 3  # the fit (7) fits in what activations + logits (8) left
    host.output_fit = 20
    assert host.training == 10 + 1 + 20


@pytest.mark.parametrize("device, flags, batch, hinted", [
    ("cuda", {}, 16, True),                               # the default recipe at the default batch: hint
    ("cuda", {}, 64, False),                              # already large
    ("cuda", {"recipe": "paper"}, 16, False),             # auto would change the result: no hint
    ("cpu", {}, 16, False),                               # auto means 16 on CPU anyway
])
def test_small_fixed_batch_on_cuda_gets_a_hint_to_use_auto(caplog, device, flags, batch, hinted):
    """A run on CUDA with a small fixed batch, where auto trains the same rows, is told that auto is
    faster (measured 2x on an H200 at the 8B shape); never where auto would change the result."""
    import logging
    from types import SimpleNamespace

    from token_distillation.config import RunConfig
    from token_distillation.pipeline import _hint_auto_batch

    cfg = RunConfig.from_flags(token_distillation_batch_size=batch, **flags)
    setup = SimpleNamespace(cfg=cfg, device=torch.device(device), batch_size=batch,
                            dist=SimpleNamespace(is_main=True))
    with caplog.at_level(logging.INFO, logger="token_distillation.pipeline"):
        _hint_auto_batch(setup, fill=500)
    assert ("auto (the largest batch whose memory plan fits the device)" in caplog.text) == hinted
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="token_distillation.pipeline"):
        _hint_auto_batch(setup, fill=batch)  # every batch already holds all the tokens: nothing to gain
    assert "auto (the largest" not in caplog.text
