"""The fast path (shared prefix + early stop) gives the same loss and gradients as full forwards."""

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
