import torch

from tests.conftest import make_llama
from token_distillation.alignment import PhraseMatcher, collate, merge
from token_distillation.init_methods import subtoken_mean
from token_distillation.models import embedding_scale, extend_embeddings
from token_distillation.tokenization import NewToken
from token_distillation.train import NewRows, distill_loss, heldout_loss_per_token, hidden_at, resolve_layer, train


def _setup(tied=True, seed=0, n_snip=24):
    model = make_llama(64, tied=tied, seed=seed)
    model.requires_grad_(False)
    extend_embeddings(model, 66)
    toks = [NewToken("a", (10, 11, 12), 64), NewToken("b", (20, 21), 65)]
    gen = torch.Generator().manual_seed(seed)
    seqs, tix = [], []
    m = PhraseMatcher([t.subtoken_ids for t in toks])
    for i in range(n_snip):
        k = i % 2
        body = torch.randint(3, 60, (12,), generator=gen).tolist()
        ids = [1] + body[:3] + list(toks[k].subtoken_ids) + body[3:]
        seqs.append(merge(ids, m, [64, 65]))
        tix.append(k)
    emb = model.get_input_embeddings().weight
    rows = NewRows(subtoken_mean(emb, toks), [64, 65], emb.shape[0], embedding_scale(model))
    return model, toks, seqs, tix, rows


def test_loss_decreases_and_original_rows_bit_identical():
    model, toks, seqs, tix, rows = _setup()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    layer = resolve_layer(model, -1)
    held0 = heldout_loss_per_token(model, rows, seqs, tix, 2, layer=layer, device=torch.device("cpu"))
    res = train(model, rows, seqs, tix, layer=layer, lr=1e-2, batch_size=8, epochs=10, seed=0,
                device=torch.device("cpu"), log_every=5)
    held1 = heldout_loss_per_token(model, rows, seqs, tix, 2, layer=layer, device=torch.device("cpu"))
    assert res.steps == 30 and len(res.loss_curve) == 30
    assert sum(res.loss_curve[-5:]) < sum(res.loss_curve[:5])
    assert all(b < a for a, b in zip(held0, held1))
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k  # the frozen model is untouched by training


def test_heldout_loss_with_teacher_cache_equals_without():
    """The held-out evaluation reuses the teacher's states after training: same numbers, no teacher rerun."""
    from token_distillation.fastpath import TeacherCache

    model, toks, seqs, tix, rows = _setup(n_snip=20)
    layer = resolve_layer(model, -1)
    cpu = torch.device("cpu")
    cache = TeacherCache(1 << 30)
    before = heldout_loss_per_token(model, rows, seqs, tix, 2, layer=layer, device=cpu, batch_size=8,
                                    teacher_cache=cache)
    assert before == heldout_loss_per_token(model, rows, seqs, tix, 2, layer=layer, device=cpu, batch_size=8)
    assert cache.misses == 3 and cache.hits == 0
    with torch.no_grad():
        rows.rows.add_(0.1)
    after = heldout_loss_per_token(model, rows, seqs, tix, 2, layer=layer, device=cpu, batch_size=8,
                                   teacher_cache=cache)
    assert cache.hits == 3
    ref = heldout_loss_per_token(model, rows, seqs, tix, 2, layer=layer, device=cpu, batch_size=8)
    assert after != before
    assert all(abs(a - r) <= 1e-6 * max(1.0, abs(r)) for a, r in zip(after, ref))


def test_only_new_rows_receive_gradient():
    model, toks, seqs, tix, rows = _setup()
    batch = collate(seqs[:4], tix[:4])
    loss = distill_loss(model, rows, batch, resolve_layer(model, -1))
    loss.backward()
    assert rows.rows.grad is not None and rows.rows.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.parameters())


def test_positions_before_new_token_contribute_zero():
    """Under causal attention the prefix is identical: per-position loss there is exactly 0."""
    model, toks, seqs, tix, rows = _setup()
    batch = collate(seqs[:4], tix[:4])
    from token_distillation.train import hidden_at
    layer = resolve_layer(model, -1)
    with torch.no_grad():
        t = hidden_at(model, layer, batch.teacher_attention, input_ids=batch.teacher_ids)
        s = hidden_at(model, layer, batch.student_attention, inputs_embeds=rows.embed(model, batch.student_ids))
    for r, seq in enumerate(seqs[:4]):
        p = seq.first_new
        assert torch.allclose(t[r, :p], s[r, :p], atol=1e-6)


def test_new_rows_used_like_original_rows_with_scaled_embeddings():
    """Gemma scales its embedding output by sqrt(hidden): a new row copied from an original row
    must give exactly the original row's embedding."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(0)
    cfg = Gemma3TextConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=128)
    model = Gemma3ForCausalLM(cfg).eval()
    scale = embedding_scale(model)
    assert abs(scale - 32 ** 0.5) < 1e-3
    extend_embeddings(model, 65)
    w = model.get_input_embeddings().weight
    rows = NewRows(w[7:8].detach(), [64], w.shape[0], scale)
    got = rows.embed(model, torch.tensor([[64, 7]]))
    assert torch.allclose(got[0, 0], got[0, 1])


def test_resolve_layer_range():
    model = make_llama(64, layers=3)
    assert resolve_layer(model, -1) == 3 and resolve_layer(model, 1) == 1 and resolve_layer(model, -3) == 1
    import pytest
    with pytest.raises(ValueError, match="target_layer"):
        resolve_layer(model, 4)
    with pytest.raises(ValueError, match="target_layer"):
        resolve_layer(model, -4)


def test_one_pass_heldout_eval_matches_separate_passes():
    """heldout_eval (one student forward for both numbers) gives the per-token loss of the training
    loss path (shared prefix, stop at the layer) and the argmax statistics of the extended model's own
    logits, at the last and at an inner layer, on padded snippets of different lengths."""
    from token_distillation.train import heldout_eval

    model, toks, seqs, tix, rows = _setup(n_snip=20)
    seqs = [merge(s.teacher_ids[: 8 + i % 7], PhraseMatcher([t.subtoken_ids for t in toks]), [64, 65])
            for i, s in enumerate(seqs)]  # lengths 8..14 (the word is kept): padding in every batch
    cpu = torch.device("cpu")
    with torch.no_grad():
        rows.rows.copy_(3 * torch.randn(rows.rows.shape, generator=torch.Generator().manual_seed(1)))
    # reference argmax: the extended model itself (tied, so the new rows are also its output rows)
    ref_model, *_ = _setup(n_snip=0)
    with torch.no_grad():
        ref_model.get_input_embeddings().weight[64:66] = rows.rows
    hits = positions = 0
    per_token = [0, 0]
    with torch.no_grad():
        for s in seqs:
            pred = ref_model(input_ids=torch.as_tensor(s.student_ids)[None]).logits[0, :-1].argmax(-1)
            positions += len(pred)
            hits += int((pred >= 64).sum())
            for j in (pred[pred >= 64] - 64).tolist():
                per_token[j] += 1
    assert hits > 0  # the check below is not vacuous
    for target in (-1, 1):
        layer = resolve_layer(model, target)
        res = heldout_eval(model, rows, seqs, tix, 2, layer=layer, device=cpu, batch_size=8)
        loss_only = heldout_eval(model, rows, seqs, tix, 2, layer=layer, device=cpu, batch_size=8, argmax=False)
        sums, counts = [0.0, 0.0], [0, 0]
        with torch.no_grad():
            for b in range(0, len(seqs), 8):
                batch = collate(seqs[b:b + 8], tix[b:b + 8])
                per_pos = distill_loss(model, rows, batch, layer, per_position=True)
                pos = 0
                for r, n in enumerate(batch.student_loss_mask.sum(1).tolist()):
                    sums[tix[b + r]] += float(per_pos[pos:pos + n].mean())
                    counts[tix[b + r]] += 1
                    pos += n
        ref = [s / c for s, c in zip(sums, counts)]
        for got in (res.loss_per_token, loss_only.loss_per_token):
            assert all(abs(a - r) <= 1e-5 * max(1.0, abs(r)) for a, r in zip(got, ref)), (got, ref)
        assert loss_only.argmax is None
        assert res.argmax["positions"] == positions and res.argmax["per_token"] == per_token
        assert res.argmax["rate"] == hits / positions
    assert heldout_eval(model, rows, seqs, tix, 2, layer=layer, device=cpu, loss=False, argmax=False).argmax is None


def test_trained_original_rows_put_the_prefix_into_the_loss():
    """With trained original rows the positions before the new token differ from the teacher's, so the
    held-out (and training) loss covers every student position of a snippet."""
    from token_distillation.train import heldout_eval

    model, toks, seqs, tix, rows = _setup(n_snip=4)
    emb = model.get_input_embeddings().weight
    rows = NewRows(rows.rows.detach().clone(), [64, 65], emb.shape[0], embedding_scale(model), train_original=True,
                   weight=emb)
    with torch.no_grad():
        rows.original.add_(0.3 * torch.randn(rows.original.shape, generator=torch.Generator().manual_seed(2)))
    layer = resolve_layer(model, -1)
    got = heldout_eval(model, rows, seqs, tix, 2, layer=layer, device=torch.device("cpu"), argmax=False).loss_per_token
    ref = [[], []]
    with torch.no_grad():
        for s, k in zip(seqs, tix):
            t = hidden_at(model, layer, torch.ones(1, len(s.teacher_ids)), input_ids=torch.as_tensor(s.teacher_ids)[None])[0]
            st = hidden_at(model, layer, torch.ones(1, len(s.student_ids)),
                           inputs_embeds=rows.embed(model, torch.as_tensor(s.student_ids)[None]))[0]
            t = t[torch.as_tensor(s.student_to_teacher)]  # every student position, paired with its teacher position
            ref[k].append(float(((st - t) ** 2).mean(dim=-1).mean()))
    assert all(abs(g - sum(r) / len(r)) < 1e-5 for g, r in zip(got, ref)), (got, ref)
    loss = distill_loss(model, rows, collate(seqs, tix, from_start=True), layer)
    loss.backward()
    assert rows.original.grad[1].abs().sum() > 0  # the first token (always before the new one) is trained
