import torch

from token_distillation.regime import RowAdam, entry_rms, per_token_batches, per_token_loss, relative_lr


def test_rowadam_equals_adam_when_all_rows_active():
    torch.manual_seed(0)
    a = torch.nn.Parameter(torch.randn(4, 8))
    b = torch.nn.Parameter(a.detach().clone())
    oa = torch.optim.Adam([a], lr=1e-2)
    ob = RowAdam([b], lr=1e-2)
    for _ in range(5):
        g = torch.randn(4, 8)
        a.grad, b.grad = g.clone(), g.clone()
        oa.step()
        ob.step()
    torch.testing.assert_close(a, b)


def test_rowadam_leaves_rows_without_gradient_untouched():
    p = torch.nn.Parameter(torch.zeros(3, 4))
    opt = RowAdam([p], lr=0.1)
    p.grad = torch.tensor([[1.0] * 4, [0.0] * 4, [2.0] * 4])
    opt.step()
    moved = p.detach().clone()
    p.grad = torch.tensor([[0.0] * 4, [0.0] * 4, [1.0] * 4])
    opt.step()
    assert torch.equal(p[0], moved[0]) and torch.equal(p[1], torch.zeros(4))  # no momentum carry-over
    assert opt.state[p]["step"].tolist() == [1.0, 0.0, 2.0]


def test_rowadam_linear_decay_is_per_row():
    """With a constant gradient Adam's normalised update is 1 per coordinate, so each step moves a
    row by its scheduled step size: lr * (1 - (t - 1) / T_r), counted over that row's own updates."""
    p = torch.nn.Parameter(torch.zeros(2, 3))
    opt = RowAdam([p], lr=1.0, eps=0.0, row_total_steps=torch.tensor([4.0, 2.0]))
    moves = []
    for step in range(5):
        before = p.detach().clone()
        p.grad = torch.tensor([[-1.0] * 3, [-1.0 if step % 2 == 0 else 0.0] * 3])  # row 1: every other step
        opt.step()
        moves.append((p.detach() - before)[:, 0].tolist())
    torch.testing.assert_close(torch.tensor([m[0] for m in moves]), torch.tensor([1.0, 0.75, 0.5, 0.25, 0.25]))
    torch.testing.assert_close(torch.tensor([m[1] for m in moves]), torch.tensor([1.0, 0.0, 0.5, 0.0, 0.5]))


def test_row_update_counts_and_bad_totals():
    from token_distillation.regime import row_update_counts

    batches = [[0, 1, 2], [3], [0, 4]]
    assert row_update_counts(batches, [0, 0, 1, 1, 2], 4).tolist() == [2.0, 2.0, 1.0, 1.0]  # token 3: no snippet
    import pytest

    with pytest.raises(ValueError, match="positive"):
        RowAdam([torch.nn.Parameter(torch.zeros(2, 2))], row_total_steps=torch.tensor([1.0, 0.0]))


def test_per_token_batches_do_not_depend_on_other_tokens():
    alone = per_token_batches([0] * 7, [" alpha"], snippets_per_update=2, groups_per_batch=4, epochs=2, seed=3)
    mixed_index = [0] * 5 + [1] * 7 + [2] * 3
    mixed = per_token_batches(mixed_index, [" beta", " alpha", " gamma"], snippets_per_update=2, groups_per_batch=4,
                              epochs=2, seed=3)
    a_groups_alone = [b for b in alone]
    # alpha's snippets are indices 5..11 in the mixed run: map them back to 0..6
    a_groups_mixed = [[i - 5 for i in b if mixed_index[i] == 1] for b in mixed]
    a_groups_mixed = [g for g in a_groups_mixed if g]
    assert a_groups_alone == a_groups_mixed
    assert all(len(g) in (1, 2) for g in a_groups_mixed) and len(a_groups_mixed) == 8  # 4 updates x 2 epochs
    for b in mixed:  # one group per token per batch
        toks = [mixed_index[i] for i in b]
        assert len(b) <= 8
        assert all(toks.count(t) <= 2 for t in set(toks))
    assert sorted(i for b in mixed for i in b) == sorted(list(range(15)) * 2)


def test_per_token_batches_are_full():
    """Batches are packed across rounds: 50 tokens x 25 snippets at 16 per batch -> ceil(1250/16)
    = 79 batches per epoch, every batch but the last full, no token twice in a batch."""
    index = [t for t in range(50) for _ in range(25)]
    batches = per_token_batches(index, [f" w{t}" for t in range(50)], snippets_per_update=1, groups_per_batch=16,
                                epochs=2, seed=0)
    assert len(batches) == 2 * 79
    assert sorted(i for b in batches for i in b) == sorted(list(range(1250)) * 2)
    for b in batches:
        toks = [index[i] for i in b]
        assert len(set(toks)) == len(toks)
    assert sum(len(b) < 16 for b in batches) == 2  # the last batch of each epoch
    few = per_token_batches([0] * 5 + [1] * 3, [" a", " b"], snippets_per_update=1, groups_per_batch=16, epochs=1,
                            seed=0)
    assert [len(b) for b in few] == [2, 2, 2, 1, 1]  # two tokens: at most two groups per batch


def test_per_token_batches_grouped_by_position_keep_each_tokens_order():
    """With first-new-token positions, a batch holds snippets at similar positions (its minimum, the
    prefix the batch shares, is close to its mean), while every token keeps the same groups in the
    same order (its updates do not change) and each snippet still comes once per epoch."""
    gen = torch.Generator().manual_seed(0)
    index = [t for t in range(300) for _ in range(25)]
    positions = torch.randint(1, 40, (len(index),), generator=gen).tolist()
    texts = [f" w{t}" for t in range(300)]
    kw = dict(snippets_per_update=1, groups_per_batch=16, epochs=2, seed=0)
    plain = per_token_batches(index, texts, **kw)
    grouped = per_token_batches(index, texts, positions=positions, **kw)
    assert sorted(i for b in grouped for i in b) == sorted(i for b in plain for i in b)
    assert len(grouped) == len(plain)
    for t in (0, 17, 299):
        assert [i for b in grouped for i in b if index[i] == t] == [i for b in plain for i in b if index[i] == t]
    for b in grouped:
        assert len({index[i] for i in b}) == len(b)

    def mean_shared(batches):
        return sum(min(positions[i] for i in b) for b in batches) / len(batches)

    mean_pos = sum(positions) / len(positions)
    assert mean_shared(plain) < 0.25 * mean_pos  # the minimum of 16 random positions is near the start
    assert mean_shared(grouped) > 0.85 * mean_pos


def test_per_token_loss_is_sum_of_token_means():
    per_pos = torch.tensor([1.0, 3.0, 10.0, 2.0])
    row = torch.tensor([0, 0, 1, 2])
    tok_of_row = torch.tensor([0, 1, 0])
    # token 0: positions of rows 0 and 2 -> (1 + 3 + 2) / 3 ; token 1: 10
    assert torch.isclose(per_token_loss(per_pos, row, tok_of_row, 2), torch.tensor(2.0 + 10.0))


def test_relative_lr_scales_with_embedding_rms():
    w = torch.full((10, 4), 2.0)
    assert relative_lr(0.5, w, 10) == 1.0


def _rows_after_training(token_ids, seed=0, recipe=None, lr_schedule=None, batch_size=4):
    """Train on snippets of the given tokens (each snippet has one token); return the trained rows."""
    from tests.conftest import make_llama
    from token_distillation.alignment import PhraseMatcher, merge
    from token_distillation.config import LrSchedule, Recipe
    from token_distillation.init_methods import subtoken_mean
    from token_distillation.models import extend_embeddings
    from token_distillation.tokenization import NewToken
    from token_distillation.train import NewRows, resolve_layer, train

    model = make_llama(64, seed=0)
    model.requires_grad_(False)
    all_toks = [NewToken(f" t{k}", (10 + 2 * k, 11 + 2 * k), 64 + k) for k in range(4)]
    extend_embeddings(model, 68)
    m = PhraseMatcher([t.subtoken_ids for t in all_toks])
    seqs, tix = [], []
    for pos, k in enumerate(token_ids):
        gen = torch.Generator().manual_seed(1000 * k + 7)
        for j in range(6):
            body = torch.randint(30, 60, (10,), generator=gen).tolist()
            ids = [1] + body[:3] + list(all_toks[k].subtoken_ids) + body[3:]
            seqs.append(merge(ids, m, [t.token_id for t in all_toks]))
            tix.append(pos)
    toks = [all_toks[k] for k in token_ids]
    emb = model.get_input_embeddings().weight
    rows = NewRows(subtoken_mean(emb, toks), [t.token_id for t in toks], emb.shape[0])
    train(model, rows, seqs, tix, layer=resolve_layer(model, -1), lr=1e-2, batch_size=batch_size, epochs=2, seed=seed,
          device=torch.device("cpu"), recipe=recipe or Recipe.PER_TOKEN, snippets_per_update=1,
          lr_schedule=lr_schedule or LrSchedule.LINEAR, token_texts=[t.text for t in toks])
    return {k: rows.rows[i].detach().clone() for i, k in enumerate(token_ids)}


def test_per_token_result_independent_of_other_tokens():
    """The defining property of the per-token recipe: a token trained alone or with three others
    (in different snippets) ends with the same row, with either schedule; the paper recipe does not."""
    from token_distillation.config import LrSchedule, Recipe

    alone = _rows_after_training([0])[0]
    together = _rows_after_training([2, 0, 3, 1])[0]
    torch.testing.assert_close(alone, together, rtol=1e-4, atol=1e-6)
    const_alone = _rows_after_training([0], lr_schedule=LrSchedule.CONSTANT)[0]
    torch.testing.assert_close(const_alone, _rows_after_training([2, 0, 3, 1], lr_schedule=LrSchedule.CONSTANT)[0],
                               rtol=1e-4, atol=1e-6)
    assert not torch.allclose(const_alone, alone)  # the schedule is applied
    paper_alone = _rows_after_training([0], recipe=Recipe.PAPER)[0]
    paper_together = _rows_after_training([2, 0, 3, 1], recipe=Recipe.PAPER)[0]
    assert not torch.allclose(paper_alone, paper_together, rtol=1e-4, atol=1e-6)


def _cooccurrence_rows(a_snippets_contain_b: bool, b_trained: bool = True, which: int = 1):
    """Tokens A and B, per-token recipe; B occurs in A's snippets or not; B has snippets of its own
    (is trained) or not. Returns the trained row of A (``which=0``) or B (``which=1``)."""
    from tests.conftest import make_llama
    from token_distillation.alignment import PhraseMatcher, merge
    from token_distillation.config import Recipe
    from token_distillation.init_methods import subtoken_mean
    from token_distillation.models import extend_embeddings
    from token_distillation.tokenization import NewToken
    from token_distillation.train import NewRows, resolve_layer, train

    model = make_llama(64, seed=0)
    model.requires_grad_(False)
    extend_embeddings(model, 66)
    a, b = NewToken(" a", (10, 11), 64), NewToken(" b", (12, 13), 65)
    m = PhraseMatcher([a.subtoken_ids, b.subtoken_ids])
    seqs, tix = [], []
    gen = torch.Generator().manual_seed(5)
    for k, tok in enumerate((a, b) if b_trained else (a,)):
        for _ in range(6):
            body = torch.randint(30, 60, (10,), generator=gen).tolist()
            other = list(b.subtoken_ids) if (k == 0 and a_snippets_contain_b) else body[8:10]
            ids = [1] + body[:3] + list(tok.subtoken_ids) + body[3:5] + other + body[5:8]
            seqs.append(merge(ids, m, [64, 65]))
            tix.append(k)
    emb = model.get_input_embeddings().weight
    rows = NewRows(subtoken_mean(emb, [a, b]), [64, 65], emb.shape[0])
    train(model, rows, seqs, tix, layer=resolve_layer(model, -1), lr=1e-2, batch_size=4, epochs=2, seed=0,
          device=torch.device("cpu"), recipe=Recipe.PER_TOKEN, token_texts=[" a", " b"])
    return rows.rows[which].detach().clone()


def test_cooccurring_tokens_are_read_with_their_initial_rows():
    """A's snippets contain B: A's trained row is the same whether B is trained in the same run or
    not (B is read with its initial row), so a token's result does not depend on the others'
    training, their order or how tokens are split over processes."""
    with_b = _cooccurrence_rows(True, b_trained=True, which=0)
    without_b = _cooccurrence_rows(True, b_trained=False, which=0)
    torch.testing.assert_close(with_b, without_b, rtol=0, atol=1e-6)
    assert not torch.allclose(with_b, _cooccurrence_rows(False, which=0))  # B's presence does change the context


def test_per_token_rows_exact_when_new_tokens_cooccur():
    """B's row is trained by B's own snippets only: whether B also occurs in A's snippets (where it is
    embedded with its current row, without gradient) does not change B's trained row."""
    torch.testing.assert_close(_cooccurrence_rows(True), _cooccurrence_rows(False), rtol=0, atol=1e-6)


def test_embedding_statistics_in_blocks_equal_the_whole_matrix():
    """relative_lr and random init read the matrix in row blocks (no float copy of a vocab x hidden
    matrix); the statistics equal those of the whole matrix."""
    from token_distillation.init_methods import random_init
    from token_distillation.tokenization import NewToken

    w = torch.randn(1000, 16, dtype=torch.bfloat16)
    whole = float(0.1 * w[:900].float().pow(2).mean().sqrt())
    assert abs(relative_lr(0.1, w, 900, chunk_rows=7) - whole) < 1e-6 * whole
    assert abs(entry_rms(w, 900, chunk_rows=7) - 10 * whole) < 1e-5 * whole
    toks = [NewToken(f"t{i}", (1, 2), 1000 + i) for i in range(20000)]
    rows = random_init(w, toks, seed=0, num_original=900)
    ref = w[:900].float()
    assert torch.allclose(rows.mean(0), ref.mean(0), atol=0.05) and torch.allclose(rows.std(0), ref.std(0), atol=0.05)


def test_per_token_rows_do_not_depend_on_the_batch_size():
    """Per-token recipe: a token's updates come from its own snippet groups whatever the batch size, so
    the trained rows are the same at batch 2, 4 and 8 (the batch size only sets how many tokens share
    a forward pass)."""
    from token_distillation.config import LrSchedule

    rows = {bs: torch.stack(list(_rows_after_training([0, 1, 2, 3], lr_schedule=LrSchedule.CONSTANT,
                                                      batch_size=bs).values())) for bs in (2, 4, 8)}
    torch.testing.assert_close(rows[2], rows[4], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(rows[4], rows[8], rtol=1e-4, atol=1e-6)
