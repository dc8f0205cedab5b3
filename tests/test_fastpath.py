"""The fast path (shared prefix + early stop) gives the same loss and gradients as full forwards."""

import re

import pytest
import torch

from tests.conftest import make_llama
from token_distillation.alignment import PhraseMatcher, collate, merge
from token_distillation.fastpath import teacher_student_hiddens
from token_distillation.init_methods import subtoken_mean
from token_distillation.losses import mse_on_hiddens
from token_distillation.models import embedding_scale, extend_embeddings
from token_distillation.tokenization import NewToken
from token_distillation.train import NewRows, hidden_at, resolve_layer


@pytest.fixture(autouse=True)
def _share_short_prefixes(monkeypatch):
    """The toy batches below have prefixes of 3-4 tokens: share them, so the prefix path is tested."""
    monkeypatch.setattr("token_distillation.fastpath.MIN_SHARED_PREFIX", 1)


def _gemma(vocab):
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(0)
    cfg = Gemma3TextConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                           num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=128,
                           sliding_window=4)
    return Gemma3ForCausalLM(cfg).eval()


def _batch(model):
    model.requires_grad_(False)
    extend_embeddings(model, 66)
    toks = [NewToken("a", (10, 11, 12), 64), NewToken("b", (20, 21), 65)]
    m = PhraseMatcher([t.subtoken_ids for t in toks])
    gen = torch.Generator().manual_seed(3)
    seqs = []
    for i, (left, right) in enumerate([(3, 9), (5, 4), (2, 12), (7, 0), (4, 6)]):
        body = torch.randint(3, 60, (left + right,), generator=gen).tolist()
        ids = [1] + body[:left] + list(toks[i % 2].subtoken_ids) + body[left:]
        if i == 2:
            ids += list(toks[0].subtoken_ids) + [5, 6]  # a second new token in one snippet
        seqs.append(merge(ids, m, [64, 65]))
    seqs.append(merge([1, 5, 6, 7], m, [64, 65]))  # a row without any new token
    emb = model.get_input_embeddings().weight
    rows = NewRows(subtoken_mean(emb, toks), [64, 65], emb.shape[0], embedding_scale(model))
    return rows, collate(seqs, [0] * len(seqs), pad_id=2)


@pytest.mark.parametrize("arch", ["llama", "gemma"])
@pytest.mark.parametrize("target_layer", [-1, 2, 1])
def test_fast_path_matches_full_forward(arch, target_layer):
    model = make_llama(64, layers=4) if arch == "llama" else _gemma(64)
    rows, batch = _batch(model)
    layer = resolve_layer(model, target_layer)

    with torch.no_grad():
        t_full = hidden_at(model, layer, batch.teacher_attention, input_ids=batch.teacher_ids)[batch.teacher_loss_mask]
    s_full = hidden_at(model, layer, batch.student_attention,
                       inputs_embeds=rows.embed(model, batch.student_ids))[batch.student_loss_mask]
    loss_full = mse_on_hiddens(s_full, t_full)
    (g_full,) = torch.autograd.grad(loss_full, rows.rows)

    s_fast, t_fast = teacher_student_hiddens(model, rows, batch, layer)
    loss_fast = mse_on_hiddens(s_fast, t_fast)
    (g_fast,) = torch.autograd.grad(loss_fast, rows.rows)

    assert s_fast.shape == s_full.shape and not t_fast.requires_grad
    torch.testing.assert_close(t_fast, t_full, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(loss_fast, loss_full, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(g_fast, g_full, rtol=1e-3, atol=1e-7)
    assert g_fast.abs().sum() > 0


@pytest.mark.parametrize("arch", ["llama", "gemma"])
def test_teacher_cache_gives_same_loss_and_gradient(arch):
    """A cached teacher (second epoch) gives the loss and gradient of a fresh teacher forward."""
    from token_distillation.fastpath import TeacherCache

    model = make_llama(64, layers=4) if arch == "llama" else _gemma(64)
    rows, batch = _batch(model)
    layer = resolve_layer(model, -1)
    ids = list(range(batch.teacher_ids.shape[0]))
    cache = TeacherCache(1 << 20)
    assert cache.get(ids) is None
    s1, t1 = teacher_student_hiddens(model, rows, batch, layer)
    cache.put(ids, t1, batch.teacher_loss_mask.sum(1))
    cached = cache.get(ids)
    torch.testing.assert_close(cached, t1, rtol=0, atol=0)
    s2, t2 = teacher_student_hiddens(model, rows, batch, layer, teacher=cache.lookup(ids))
    (g1,) = torch.autograd.grad(mse_on_hiddens(s1, t1), rows.rows)
    (g2,) = torch.autograd.grad(mse_on_hiddens(s2, t2), rows.rows)
    torch.testing.assert_close(g2, g1, rtol=1e-5, atol=1e-8)
    # a reordered subset comes back in the order asked for
    sub = cache.get([2, 0])
    counts = batch.teacher_loss_mask.sum(1).tolist()
    parts = torch.split(t1, counts)
    torch.testing.assert_close(sub, torch.cat([parts[2], parts[0]]), rtol=0, atol=0)


def test_teacher_cache_respects_budget():
    from token_distillation.fastpath import TeacherCache

    cache = TeacherCache(max_bytes=3 * 4 * 4)  # room for 3 rows of hidden 4 (float32)
    cache.put([0, 1], torch.ones(4, 4), torch.tensor([2, 2]))
    cache.put([2], torch.ones(1, 4), torch.tensor([1]))
    assert cache.get([0]) is not None and cache.get([1]) is None and cache.get([2]) is not None
    assert cache.bytes <= cache.max_bytes


def test_training_with_teacher_cache_matches_without(caplog):
    """Two epochs: rows trained with the teacher cache equal rows trained without it, and the
    second epoch reuses the cache (no teacher forward)."""
    from token_distillation.config import Recipe
    from token_distillation.train import train

    import logging

    caplog.set_level(logging.INFO, logger="token_distillation.train")
    results = {}
    for budget in (0, 1 << 24):
        model = make_llama(64, layers=4)
        rows, _ = _batch(model)
        toks_ids = [(10, 11, 12), (20, 21)]
        m = PhraseMatcher([list(t) for t in toks_ids])
        gen = torch.Generator().manual_seed(5)
        seqs, tix = [], []
        for k in range(8):
            body = torch.randint(3, 60, (10,), generator=gen).tolist()
            seqs.append(merge([1] + body[:3] + list(toks_ids[k % 2]) + body[3:], m, [64, 65]))
            tix.append(k % 2)
        res = train(model, rows, seqs, tix, layer=resolve_layer(model, -1), lr=1e-2, batch_size=4, epochs=2,
                    seed=0, device=torch.device("cpu"), recipe=Recipe.PER_TOKEN, teacher_cache_bytes=budget)
        results[budget] = (rows.rows.detach().clone(), res.loss_curve)
    torch.testing.assert_close(results[1 << 24][0], results[0][0], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(torch.tensor(results[1 << 24][1]), torch.tensor(results[0][1]), rtol=1e-5, atol=1e-7)
    used = [r.getMessage() for r in caplog.records if r.getMessage().startswith("teacher cache:")]
    assert len(used) == 1  # only the run with a budget has a cache
    reused, computed = (int(x) for x in re.findall(r"(\d+) batches reused whole, (\d+) not", used[0])[0])
    assert reused == computed > 0  # epoch 2 reuses every batch of epoch 1
    s_reused, s_computed = (int(x) for x in re.findall(r"(\d+) snippets reused, (\d+) computed", used[0])[0])
    assert s_reused == s_computed == 8


@pytest.mark.parametrize("arch", ["llama", "gemma"])
@pytest.mark.parametrize("shared_prefix", [True, False])
def test_partly_cached_teacher_gives_same_loss_and_gradient(arch, shared_prefix):
    """A batch with some snippets cached runs the teacher for the others only, and gives the
    teacher states, loss and gradient of an uncached batch (with and without a shared prefix)."""
    from token_distillation.fastpath import TeacherCache, _prefix_len

    model = make_llama(64, layers=4) if arch == "llama" else _gemma(64)
    rows, batch = _batch(model)
    if not shared_prefix:  # trained original rows: the path without a shared prefix (full forwards)
        emb = model.get_input_embeddings().weight
        rows = NewRows(rows.rows, [64, 65], emb.shape[0], embedding_scale(model), train_original=True, weight=emb)
    else:
        assert _prefix_len(batch) > 0
    layer = resolve_layer(model, -1)
    ids = list(range(batch.teacher_ids.shape[0]))
    s_ref, t_ref = teacher_student_hiddens(model, rows, batch, layer)
    (g_ref,) = torch.autograd.grad(mse_on_hiddens(s_ref, t_ref), rows.rows)

    cache = TeacherCache(1 << 20)
    cache.put([1, 4], torch.cat(torch.split(t_ref, batch.teacher_loss_mask.sum(1).tolist())[1:5:3]),
              batch.teacher_loss_mask.sum(1)[[1, 4]])
    known = cache.lookup(ids)
    assert [k is not None for k in known] == [False, True, False, False, True, False]
    assert (cache.snippet_hits, cache.snippet_misses, cache.hits, cache.misses) == (2, 4, 0, 1)
    calls = []
    hook = model.model.layers[0].register_forward_hook(lambda m, a, o: calls.append(a[0].shape[0]))
    try:
        s, t = teacher_student_hiddens(model, rows, batch, layer, teacher=known)
    finally:
        hook.remove()
    n = batch.teacher_ids.shape[0]
    # the teacher's continuation ran on the 4 rows not cached (plus the prefix / student on all rows)
    assert 4 in calls and calls.count(n) == (2 if shared_prefix else 1)
    torch.testing.assert_close(t, t_ref, rtol=1e-5, atol=1e-6)
    (g,) = torch.autograd.grad(mse_on_hiddens(s, t), rows.rows)
    torch.testing.assert_close(g, g_ref, rtol=1e-4, atol=1e-8)
    cache.put(ids, t, batch.teacher_loss_mask.sum(1))  # fills the others, keeps the two it had
    torch.testing.assert_close(cache.get(ids), t_ref, rtol=1e-5, atol=1e-6)


def test_training_with_a_partial_teacher_cache_matches_without(caplog):
    """A budget that holds only some snippets: every later batch is partly cached (batches are
    reshuffled per epoch), the kept snippets are reused, and the rows equal those trained without a cache."""
    from token_distillation.config import Recipe
    from token_distillation.train import train

    import logging

    caplog.set_level(logging.INFO, logger="token_distillation.train")
    results, rows_run = {}, {}
    for budget in (0, 4 * 12 * 64 * 4):  # room for ~4 snippets' states (<= 12 loss positions, hidden 64, float32)
        model = make_llama(64, layers=4)
        rows, _ = _batch(model)
        seen = rows_run.setdefault(budget, [])
        model.model.layers[0].register_forward_hook(lambda m, a, o, seen=seen: seen.append(a[0].shape[0]))
        m = PhraseMatcher([[10, 11, 12], [20, 21]])
        gen = torch.Generator().manual_seed(7)
        seqs, tix = [], []
        for k in range(16):
            body = torch.randint(3, 60, (10,), generator=gen).tolist()
            seqs.append(merge([1] + body[:3] + ([10, 11, 12] if k % 2 == 0 else [20, 21]) + body[3:], m, [64, 65]))
            tix.append(k % 2)
        train(model, rows, seqs, tix, layer=resolve_layer(model, -1), lr=1e-2, batch_size=4, epochs=3,
              seed=0, device=torch.device("cpu"), recipe=Recipe.PER_TOKEN, teacher_cache_bytes=budget)
        results[budget] = rows.rows.detach().clone()
    torch.testing.assert_close(results[4 * 12 * 64 * 4], results[0], rtol=1e-5, atol=1e-7)
    used = [r.getMessage() for r in caplog.records if r.getMessage().startswith("teacher cache:")]
    s_reused, s_computed = (int(x) for x in re.findall(r"(\d+) snippets reused, (\d+) computed", used[0])[0])
    assert s_reused + s_computed == 48 and 0 < s_reused < 32
    # the reused snippets really skip the teacher: fewer rows went through the model than without a cache
    assert sum(rows_run[0]) - sum(rows_run[4 * 12 * 64 * 4]) == s_reused


def test_trained_original_rows_are_not_shared_with_the_teacher():
    """With --train_original_embeddings the student's prefix reads the trained copy of the original
    rows: the fast path must then run the student over the whole snippet, and the prefix rows get a gradient."""
    model = make_llama(64, layers=4)
    rows, batch = _batch(model)
    emb = model.get_input_embeddings().weight
    rows = NewRows(rows.rows.detach().clone(), [64, 65], emb.shape[0], embedding_scale(model),
                   train_original=True, weight=emb)
    with torch.no_grad():
        rows.original.add_(0.5 * torch.randn(rows.original.shape, generator=torch.Generator().manual_seed(0)))
    layer = resolve_layer(model, -1)
    s_full = hidden_at(model, layer, batch.student_attention,
                       inputs_embeds=rows.embed(model, batch.student_ids))[batch.student_loss_mask]
    s_fast, _ = teacher_student_hiddens(model, rows, batch, layer)
    assert torch.allclose(s_fast, s_full, atol=1e-5)
    (g,) = torch.autograd.grad(s_fast.square().sum(), rows.original)
    prefix_ids = batch.student_ids[0, :2]  # tokens before the first new token of row 0
    assert bool((g[prefix_ids].abs().sum(dim=-1) > 0).all())


def _counting_first_layer_calls(model, rows, batch, layer):
    """``(sequence lengths the first decoder layer saw, teacher_student_hiddens' result)``: one entry
    per forward pass (prefix, teacher, student)."""
    calls = []
    hook = model.model.layers[0].register_forward_hook(lambda m, a, o: calls.append(a[0].shape[1]))
    try:
        return calls, teacher_student_hiddens(model, rows, batch, layer)
    finally:
        hook.remove()


def test_short_shared_prefix_runs_whole_sequences(monkeypatch):
    """A prefix shorter than MIN_SHARED_PREFIX gets no pass of its own: teacher and student run
    whole (two forwards, no prefix forward), with the same loss and gradient as the shared path."""
    from token_distillation import fastpath

    model = make_llama(64, layers=4)
    rows, batch = _batch(model)
    layer = resolve_layer(model, -1)
    p = fastpath._prefix_len(batch)
    assert p > 1
    results = {}
    for minimum in (1, p + 1):
        monkeypatch.setattr(fastpath, "MIN_SHARED_PREFIX", minimum)
        assert fastpath.shared_prefix_len(batch) == (p if minimum <= p else 0)
        calls, (s, t) = _counting_first_layer_calls(model, rows, batch, layer)
        assert len(calls) == (3 if minimum <= p else 2)  # prefix + teacher + student, or teacher + student
        loss = mse_on_hiddens(s, t)
        results[minimum] = (loss, torch.autograd.grad(loss, rows.rows)[0])
    (l1, g1), (l2, g2) = results.values()
    torch.testing.assert_close(l1, l2, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(g1, g2, rtol=1e-4, atol=1e-7)



def test_shared_prefix_only_on_the_devices_where_it_pays(monkeypatch):
    """The shared prefix is used on CPU and not on a GPU (measured slower there: fastpath's
    SHARED_PREFIX_DEVICES); on a GPU teacher and student run whole, with the same hidden states."""
    from token_distillation import fastpath

    monkeypatch.setattr(fastpath, "MIN_SHARED_PREFIX", 1)
    model = make_llama(64, layers=4)
    rows, batch = _batch(model)
    p = fastpath._prefix_len(batch)
    assert p > 1 and fastpath.shared_prefix_len(batch) == p == fastpath.shared_prefix_len(batch, device_type="cpu")
    assert fastpath.shared_prefix_len(batch, device_type="cuda") == 0
    assert fastpath.shared_prefix_len(batch, device_type="mps") == 0
    layer = resolve_layer(model, -1)
    s_cpu, t_cpu = teacher_student_hiddens(model, rows, batch, layer)
    monkeypatch.setattr(fastpath, "SHARED_PREFIX_DEVICES", ())  # what a CUDA batch gets
    calls, (s_gpu, t_gpu) = _counting_first_layer_calls(model, rows, batch, layer)
    assert len(calls) == 2  # teacher + student, no prefix pass
    assert torch.allclose(s_gpu, s_cpu, atol=1e-5) and torch.allclose(t_gpu, t_cpu, atol=1e-5)
