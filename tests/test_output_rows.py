"""Output rows by distillation (--output_embeddings distill, token_distillation.output_rows)."""

import logging
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from tests.conftest import TOY_TEXT, make_llama
from tests.test_methods import _cfg, _weights
from token_distillation.alignment import MergedSequence
from token_distillation.output_rows import binary_kl, fit, Positions, word_targets
from token_distillation.pipeline import run


def test_word_targets_by_hand():
    """Teacher [BOS, a, t1, t2, b], student [BOS, a, N, b]: before N the target is the teacher's word
    probability p(t1 | 1) p(t2 | 2); elsewhere p(t1 | aligned position) times the same completion."""
    vocab, t1, t2 = 6, 3, 4
    lp = torch.log_softmax(torch.randn(5, vocab, generator=torch.Generator().manual_seed(0)), -1)
    seq = MergedSequence(np.array([1, 2, t1, t2, 5]), np.array([1, 2, 9, 5]), np.array([0, 1, 3, 4]), 2)
    got = word_targets(lp, seq, 9, (t1, t2))
    c = lp[2, t2].exp()
    want = torch.stack([lp[0, t1].exp() * c, lp[1, t1].exp() * c, lp[3, t1].exp() * c])
    assert torch.allclose(got, want, atol=1e-6)
    # a one-subtoken word has completion 1; a snippet without an exact occurrence is left out (NaN)
    one = MergedSequence(np.array([1, t1, 5]), np.array([1, 9, 5]), np.array([0, 1, 2]), 1)
    assert torch.allclose(word_targets(lp, one, 9, (t1,)), lp[[0, 1], t1].exp(), atol=1e-6)
    none = MergedSequence(np.array([1, 2, 5]), np.array([1, 2, 5]), np.array([0, 1, 2]), -1)
    assert torch.isnan(word_targets(lp, none, 9, (t1, t2))).all()


def test_word_targets_leave_out_uses_inside_longer_words():
    """Character alignment: teacher [BOS, a, t1, t2, b, t1, u, c], student [BOS, a, N, b, N, s, c] where
    the second N is the word inside a longer word (teacher t1 u, student N s). The position before it
    has no known target (NaN, left out); the unaligned N position too; the rest use the exact
    occurrence's completion."""
    vocab, t1, t2, u, s = 8, 3, 4, 6, 7
    lp = torch.log_softmax(torch.randn(8, vocab, generator=torch.Generator().manual_seed(1)), -1)
    seq = MergedSequence(np.array([1, 2, t1, t2, 5, t1, u, 2]), np.array([1, 2, 9, 5, 9, s, 2]),
                         np.array([0, 1, 3, 4, -1, 6, 7]), 2)
    got = word_targets(lp, seq, 9, (t1, t2))
    c = lp[2, t2].exp()
    assert torch.allclose(got[[0, 1, 2, 5]], torch.stack([lp[0, t1].exp() * c, lp[1, t1].exp() * c,
                                                           lp[3, t1].exp() * c, lp[6, t1].exp() * c]), atol=1e-6)
    assert torch.isnan(got[3]) and torch.isnan(got[4])
    only_inside = MergedSequence(np.array([1, 2, t1, u, 2]), np.array([1, 2, 9, s, 2]), np.array([0, 1, -1, 3, 4]), 2)
    assert torch.isnan(word_targets(lp, only_inside, 9, (t1, t2))).all()


def test_binary_kl_is_zero_at_the_target_and_convex_fit_reaches_it():
    """On separable-enough random data the full-batch fit drives the KL to ~0 and p to the targets;
    each row depends only on its own positions (a second token's data does not change the first row)."""
    g = torch.Generator().manual_seed(1)
    h = torch.randn(12, 16, generator=g)
    log_z = torch.randn(12, generator=g)
    target = torch.rand(12, generator=g) * 0.3
    assert torch.allclose(binary_kl(torch.logit(target) + log_z, log_z, target), torch.zeros(12), atol=1e-5)

    class _M:  # what fit() reads from a model: its config (no soft-capping here)
        config = type("C", (), {"final_logit_softcapping": None})()

    owner = torch.zeros(12, dtype=torch.long)
    one, _ = fit(_M(), torch.zeros(1, 16), Positions(h, log_z, target, owner), None, lr=0.05, steps=6000)
    p = torch.sigmoid(h @ one[0] - log_z)
    assert torch.allclose(p, target, atol=2e-3)
    h2 = torch.cat([h, torch.randn(5, 16, generator=g)])
    pos2 = Positions(h2, torch.cat([log_z, torch.zeros(5)]), torch.cat([target, torch.full((5,), 0.9)]),
                     torch.cat([owner, torch.ones(5, dtype=torch.long)]))
    two, _ = fit(_M(), torch.zeros(2, 16), pos2, None, lr=0.05, steps=6000)
    assert torch.allclose(two[0], one[0], atol=1e-5)
    # the penalty towards the start keeps the row nearer to it, and still per token
    start = torch.randn(2, 16, generator=g)
    free, _ = fit(_M(), start, pos2, None, lr=0.05, steps=3000)
    pulled, _ = fit(_M(), start, pos2, None, lr=0.05, steps=3000, anchor_weight=1.0, rms=0.5)
    assert ((pulled - start).norm(dim=-1) < 0.8 * (free - start).norm(dim=-1)).all()
    alone, _ = fit(_M(), start[:1], Positions(h, log_z, target, owner), None, lr=0.05, steps=3000, anchor_weight=1.0,
                   rms=0.5)
    assert torch.allclose(alone[0], pulled[0], atol=1e-5)
    # at the penalised optimum the gradient of KL mean + anchor_weight * mean(((o - start) / rms)^2) vanishes
    o = pulled[:1].clone().requires_grad_(True)
    obj = binary_kl(h @ o[0], log_z, target).mean() + ((o - start[:1]) / 0.5).pow(2).mean()
    obj.backward()
    assert o.grad.abs().max() < 1e-3


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_distill_raises_the_word_probability_to_the_teachers(tmp_path, toy_model_dir, untied_model_dir, toy_corpus,
                                                             cache_dir, toy_tokenizer, tied, monkeypatch):
    """The whole run with --output_embeddings distill: original rows unchanged, the input rows the same
    as with subtoken-mean output rows (the output stage comes after), only the new output rows differ;
    the held-out binary KL falls; on the training snippets the new token's probability before each
    occurrence (contexts of the toy corpus) comes closer to the teacher's word probability (in
    probability: on a random tiny model the word probabilities are ~exp(-20), which the expected-bits
    objective has no reason to match in log space)."""
    from transformers import AutoModelForCausalLM

    import token_distillation.output_rows as output_rows

    src = toy_model_dir if tied else untied_model_dir
    base = run(_cfg(tmp_path, src, toy_corpus, cache_dir, output_embeddings="subtoken-mean",
                    out_path=str(tmp_path / "mean")))
    # the fit's own behaviour, without the pull towards the first subtoken's row (a prior that means
    # nothing on a random model; tested in test_the_fit_starts_from_the_first_subtokens_output_row)
    monkeypatch.setattr(output_rows, "ANCHOR", 0.0)
    # and the fit at the word's own positions alone: the background positions (other words' snippets,
    # where a random model's targets are ~0) are weighed against them on purpose; their effect is tested
    # in test_background_positions_hold_the_row_down_away_from_its_contexts
    monkeypatch.setattr(output_rows, "BACKGROUND_SHARE", 0.0)
    res = run(_cfg(tmp_path, src, toy_corpus, cache_dir, output_embeddings="distill", out_path=str(tmp_path / "d")))
    emb0, out0 = _weights(src)
    emb_b, out_b = _weights(base.out_path)
    emb1, out1 = _weights(res.out_path)
    n = emb0.shape[0]
    out0 = emb0 if out0 is None else out0
    assert torch.equal(emb1[:n], emb0) and torch.equal(out1[:n], out0) and torch.equal(emb1, emb_b)
    assert not torch.allclose(out1[n:], out_b[n:])
    rep = res.report
    assert rep["model"]["output_embeddings"] == "distill" and not rep["model"]["tied_embeddings"]
    kl = rep["output_rows_kl"]
    assert kl["train_after"] < 0.5 * kl["train_before"] and kl["heldout_after"] < kl["heldout_before"]
    assert rep["output_rows_loss_curve"][-1] < rep["output_rows_loss_curve"][0]

    # teacher word probability vs the extended model's new-token probability before each occurrence
    teacher = AutoModelForCausalLM.from_pretrained(src).eval()
    errs = {"mean": [], "distill": []}
    for label, d in (("mean", base.out_path), ("distill", res.out_path)):
        m = AutoModelForCausalLM.from_pretrained(d).eval()
        for t, text in ((t, x) for t in rep["tokens"] for x in set(TOY_TEXT) if t["token"] in x):
            subs = t["subtoken_ids"]
            prefix = text[: text.index(t["token"])]
            ctx = [toy_tokenizer.bos_token_id] + toy_tokenizer(prefix, add_special_tokens=False)["input_ids"]
            with torch.no_grad():
                lp_t = torch.log_softmax(teacher(torch.tensor([ctx + subs])).logits[0], -1)
                word = sum(float(lp_t[len(ctx) - 1 + i, s]) for i, s in enumerate(subs))
                lp_s = torch.log_softmax(m(torch.tensor([ctx])).logits[0, -1], -1)
            errs[label].append(abs(math.exp(float(lp_s[t["id"]])) - math.exp(word)))
    assert len(errs["mean"]) >= 3 and sum(errs["distill"]) < 0.7 * sum(errs["mean"]), errs


def test_the_fit_starts_from_the_first_subtokens_output_row(tmp_path, untied_model_dir, toy_corpus, cache_dir,
                                                           monkeypatch):
    """The pipeline's fit starts each token from the output row of its word's first subtoken, with the
    penalty ANCHOR towards it on the scale of the RMS of the original output rows' entries."""
    import token_distillation.output_rows as output_rows

    seen = []
    real_fit = output_rows.fit

    def spy(model, init, pos, bias, lr, steps=None, **kw):
        seen.append((init.clone(), kw))
        return real_fit(model, init, pos, bias, lr, steps, **kw)

    monkeypatch.setattr(output_rows, "fit", spy)
    res = run(_cfg(tmp_path, untied_model_dir, toy_corpus, cache_dir, output_embeddings="distill",
                   out_path=str(tmp_path / "d")))
    _, out0 = _weights(untied_model_dir)
    firsts = torch.stack([out0[t["subtoken_ids"][0]] for t in res.report["tokens"]])
    assert len(seen) == 1
    init, kw = seen[0]
    assert torch.equal(init, firsts.float())
    assert kw["anchor_weight"] == output_rows.ANCHOR > 0
    assert kw["rms"] == pytest.approx(float(out0.float().pow(2).mean().sqrt()), rel=1e-4)


def test_tokens_whose_heldout_kl_rose_are_named(caplog):
    """The fit can lower the mean held-out KL while some tokens get worse: those are warned about by
    name, largest increase first; unmeasured tokens (None) and improved ones are not."""
    from token_distillation.output_rows import log_worse

    kl = {"heldout_before": [0.01, 0.02, None, 0.003, 0.004, 0.01], "heldout_after": [0.001, 0.05, 0.1, 0.004, None,
                                                                                      0.0105],
          "train_before": [None] * 6, "train_after": [None] * 6}
    names = [" alpha", " beta", " gamma", " delta", " eps", " zeta"]  # zeta: +5%, within the noise
    with caplog.at_level("WARNING", logger="token_distillation.output_rows"):
        assert log_worse(kl, names) == [1, 3]
    msg = caplog.text
    assert "2 of 4 token(s)" in msg and "zeta" not in msg and msg.index("' beta' 0.02 -> 0.05") < msg.index("' delta' 0.003 -> 0.004")
    assert "alpha" not in msg and "gamma" not in msg
    caplog.clear()
    with caplog.at_level("WARNING", logger="token_distillation.output_rows"):
        assert log_worse({**kl, "heldout_after": [0.0] * 6}, names) == []
    assert caplog.text == ""


def _completion_model(arch: str, window: int = 4):
    from tests.test_fastpath import _gemma

    if arch == "llama":
        return make_llama(64, layers=3)
    model = _gemma(64)
    model.config.sliding_window = window
    return model


def _brute_completion(model, prefix: list[int], subtokens: tuple[int, ...], vocab: int = 64) -> float:
    """log prod_i p(t_i | prefix, t1 .. t_{i-1}) by one plain forward of prefix + t1 .. t(k-1), over
    the first ``vocab`` (original) tokens."""
    ids = torch.tensor([list(prefix) + list(subtokens[:-1])])
    with torch.no_grad():
        lp = torch.log_softmax(model(input_ids=ids).logits[0, :, :vocab].float(), -1)
    return sum(float(lp[len(prefix) - 1 + i, subtokens[i]]) for i in range(1, len(subtokens)))


@pytest.mark.parametrize("arch,window", [("llama", 0), ("gemma", 4), ("gemma", 128)],
                         ids=["llama-cache", "gemma-window-shorter-whole", "gemma-window-longer-cache"])
def test_teacher_completions_equal_a_plain_forward(arch, window, monkeypatch):
    """The completion after position a of a padded batch row, with the batch's key/value cache (or whole
    sequences where a sliding window is shorter than the snippet), equals a plain forward of the row's
    prefix and the word's subtokens; words of different lengths share a forward (COMPLETION_ROWS = 3)."""
    from token_distillation.fastpath import forward_to_layer, num_layers
    from token_distillation.output_rows import _new_cache, teacher_completions

    monkeypatch.setattr("token_distillation.output_rows.COMPLETION_ROWS", 3)
    model = _completion_model(arch, window)
    model.requires_grad_(False)
    gen = torch.Generator().manual_seed(4)
    lens = [12, 7, 10]
    ids = torch.full((3, 12), 2, dtype=torch.long)
    for r, n in enumerate(lens):
        ids[r, :n] = torch.cat([torch.tensor([1]), torch.randint(3, 60, (n - 1,), generator=gen)])
    att = (torch.arange(12)[None, :] < torch.tensor(lens)[:, None]).long()
    cache = _new_cache(model)
    with torch.no_grad():
        forward_to_layer(model, num_layers(model), att, input_ids=ids, cache=cache,
                         position_ids=torch.arange(12).expand(3, -1))
    words = [(10, 11, 12), (20, 21), (30, 31, 32, 33)]
    wanted = [(0, 0, words[0]), (0, 5, words[1]), (0, 11, words[2]), (1, 3, words[2]), (1, 6, words[0]),
              (2, 9, words[1]), (2, 2, words[0])]
    rows = SimpleNamespace(num_original=64)  # what the frozen output layer reads of the new rows
    got = teacher_completions(model, rows, ids, att, cache, wanted, pad_id=2)
    for (r, a, w), g in zip(wanted, got):
        assert g == pytest.approx(_brute_completion(model, ids[r, : a + 1].tolist(), w), abs=1e-4), (r, a, w)
    # the cache is not changed: the same call again gives the same values
    assert teacher_completions(model, rows, ids, att, cache, wanted, pad_id=2) == pytest.approx(got, abs=1e-6)
    assert teacher_completions(model, rows, ids, att, None, wanted, pad_id=2) == pytest.approx(got, abs=1e-4)


def test_targets_away_from_the_word_use_the_teachers_own_completion(monkeypatch):
    """collect_positions: before the word's occurrence P* is the teacher's word probability; away from
    it, where p_T(t1) >= COMPLETION_MIN_P1, it is p_T(t1) times the teacher's completion read there
    (a plain forward of prefix + t1 .. t(k-1)), not the occurrence's completion; elsewhere the
    estimate of word_targets."""
    from token_distillation.alignment import PhraseMatcher, merge
    from token_distillation.init_methods import subtoken_mean
    from token_distillation.models import embedding_scale, extend_embeddings
    from token_distillation.output_rows import collect_positions
    from token_distillation.tokenization import NewToken
    from token_distillation.train import NewRows

    model = make_llama(64, layers=3, tied=False)
    model.requires_grad_(False)
    extend_embeddings(model, 65)
    tok = NewToken("w", (10, 11, 12), 64)
    gen = torch.Generator().manual_seed(5)
    body = torch.randint(13, 60, (14,), generator=gen).tolist()
    teacher = [1] + body[:6] + [10, 11, 12] + body[6:]
    seq = merge(teacher, PhraseMatcher([tok.subtoken_ids]), [64])
    emb = model.get_input_embeddings().weight
    rows = NewRows(subtoken_mean(emb, [tok]), [64], emb.shape[0], embedding_scale(model), num_original=64,
                   out_rows=subtoken_mean(model.get_output_embeddings().weight, [tok]))
    with torch.no_grad():
        lp = torch.log_softmax(model(input_ids=torch.tensor([teacher])).logits[0, :, :64].float(), -1)
    monkeypatch.setattr("token_distillation.output_rows.COMPLETION_MIN_P1", float(lp[:, 10].exp().median()))
    threshold = float(lp[:, 10].exp().median())
    pos = collect_positions(model, rows, [seq], [0], [0], [tok.subtoken_ids], batch_size=4, device=torch.device("cpu"),
                            pad_id=2)
    s2t = seq.student_to_teacher
    occurrence = list(seq.student_ids).index(64) - 1
    est = word_targets(lp, seq, 64, tok.subtoken_ids)
    exact_here = 0
    for q in range(len(seq.student_ids) - 1):
        a = int(s2t[q])
        p1 = float(lp[a, 10].exp())
        if q == occurrence:
            want = float((lp[a, 10] + lp[a + 1, 11] + lp[a + 2, 12]).exp())
        elif p1 >= threshold:
            want = p1 * math.exp(_brute_completion(model, teacher[: a + 1], tok.subtoken_ids))
            exact_here += 1
            assert abs(want - float(est[q])) > 1e-3 * want  # the occurrence's completion differs
        else:
            want = float(est[q])
        assert float(pos.target[q]) == pytest.approx(want, rel=1e-3), q
    assert exact_here >= 3


def test_background_pool_and_sample():
    """The pool is evenly spaced over the snippet list (all of it when short); a token's sample
    leaves out its own snippets and those that use its new id, draws at most n aligned predicting
    positions, and is the same on every call."""
    from token_distillation.output_rows import background_pool, background_sample

    assert background_pool([0, 0, 1], n=8) == [0, 1, 2]
    pool = background_pool([t for t in range(10) for _ in range(5)], n=5)
    assert pool == [5, 15, 25, 35, 45] and len({i // 5 for i in pool}) == 5
    mk = lambda student, s2t: MergedSequence(np.array([1, 2, 3, 4, 5]), np.array(student), np.array(s2t), 1)  # noqa: E731
    seqs = [mk([1, 9, 4, 5], [0, 2, 3, 4]),      # token 0's own (uses id 9)
            mk([1, 2, 3, 4, 5], [0, 1, 2, 3, 4]),  # token 1's: 4 predicting positions
            mk([1, 8, 9, 5], [0, 1, 3, 4]),      # token 1's, but uses token 0's id 9
            mk([1, 2, 8, 5], [0, 1, -1, 4])]     # token 1's: position 2 not aligned
    tix = [0, 1, 1, 1]
    got = background_sample(seqs, tix, [0, 1, 2, 3], token=0, new_id=9, n=100)
    assert got == [(1, 0), (1, 1), (1, 2), (1, 3), (3, 0), (3, 1)]
    few = background_sample(seqs, tix, [0, 1, 2, 3], token=0, new_id=9, n=3)
    assert len(few) == 3 and set(few) <= set(got) and few == background_sample(seqs, tix, [0, 1, 2, 3], 0, 9, 3)


def test_position_weights_share_the_objective():
    """Own positions share 1 - BACKGROUND_SHARE of a token's weight, background ones the rest; a token
    without background keeps all on its own; one without own positions gets none."""
    from token_distillation.output_rows import BACKGROUND_SHARE, position_weights

    owner = torch.tensor([0, 0, 0, 0, 1, 1, 2])
    bg = torch.tensor([False, False, True, True, False, False, True])
    pos = Positions(torch.zeros(7, 2), torch.zeros(7), torch.zeros(7), owner, background=bg)
    w = position_weights(pos, 3)
    s = BACKGROUND_SHARE
    assert torch.allclose(w, torch.tensor([(1 - s) / 2, (1 - s) / 2, s / 2, s / 2, 0.5, 0.5, 0.0]))
    assert torch.allclose(position_weights(Positions(pos.h, pos.log_z, pos.target, owner), 3),
                          torch.tensor([0.25] * 4 + [0.5] * 2 + [1.0]))


def test_background_positions_hold_the_row_down_away_from_its_contexts():
    """Own positions (the word's topic, feature a) want the word at 0.3; background positions share
    feature a plus b and want ~0. Fitted on its own positions only the row gives the word about 0.3 at
    the background positions; with them (BACKGROUND_SHARE of the objective), far less, while at its own positions
    it stays near the target."""
    class _M:
        config = SimpleNamespace()
    a, b = torch.zeros(8), torch.zeros(8)
    a[0], b[1] = 2.0, 2.0
    h_own, h_bg = a.expand(20, 8), (a + b).expand(20, 8)
    own = Positions(h_own.clone(), torch.zeros(20), torch.full((20,), 0.3), torch.zeros(20, dtype=torch.long))
    bg = Positions(h_bg.clone(), torch.zeros(20), torch.full((20,), 1e-6), torch.zeros(20, dtype=torch.long))
    alone, _ = fit(_M(), torch.zeros(1, 8), own, None, lr=0.05, steps=3000)
    both, _ = fit(_M(), torch.zeros(1, 8), Positions.cat(own, bg), None, lr=0.05, steps=3000)
    p = lambda o, h: torch.sigmoid(h[0] @ o[0])  # noqa: E731  (log_z = 0)
    assert p(alone, h_bg) > 0.2 and p(both, h_bg) < 0.01
    assert p(both, h_own) == pytest.approx(0.3, abs=0.02)


def test_background_targets_use_the_teachers_completion(monkeypatch):
    """collect_positions with a background snippet of another token: each background position is
    flagged and owned by the word; where p_T(t1) >= COMPLETION_MIN_P1 its target is p_T(t1) times the
    teacher's completion read there (a plain forward), elsewhere p_T(t1) times the p_T(t1)-weighted
    mean of those completions."""
    from token_distillation.alignment import PhraseMatcher, merge
    from token_distillation.init_methods import subtoken_mean
    from token_distillation.models import embedding_scale, extend_embeddings
    from token_distillation.output_rows import background_sample, collect_positions
    from token_distillation.tokenization import NewToken
    from token_distillation.train import NewRows

    model = make_llama(64, layers=3, tied=False)
    model.requires_grad_(False)
    extend_embeddings(model, 66)
    toks = [NewToken("w", (10, 11, 12), 64), NewToken("v", (40, 41), 65)]
    gen = torch.Generator().manual_seed(6)
    body = torch.randint(13, 39, (30,), generator=gen).tolist()
    own_t = [1] + body[:6] + [10, 11, 12] + body[6:12]
    other_t = [1] + body[12:20] + [40, 41] + body[20:]
    matcher = PhraseMatcher([t.subtoken_ids for t in toks])
    seqs = [merge(own_t, matcher, [64, 65]), merge(other_t, matcher, [64, 65])]
    emb = model.get_input_embeddings().weight
    rows = NewRows(subtoken_mean(emb, toks), [64, 65], emb.shape[0], embedding_scale(model), num_original=64,
                   out_rows=subtoken_mean(model.get_output_embeddings().weight, toks))
    with torch.no_grad():
        lp = torch.log_softmax(model(input_ids=torch.tensor([other_t])).logits[0, :, :64].float(), -1)
    threshold = float(lp[:, 10].exp().median())
    monkeypatch.setattr("token_distillation.output_rows.COMPLETION_MIN_P1", threshold)
    pos = collect_positions(model, rows, seqs, [0, 1], [0], [t.subtoken_ids for t in toks], batch_size=4,
                            device=torch.device("cpu"), pad_id=2, background=(seqs, [0, 1], [0, 1]))
    n_own = len(seqs[0].student_ids) - 1
    assert not pos.background[:n_own].any() and pos.background[n_own:].all() and (pos.owner == 0).all()
    drawn = background_sample(seqs, [0, 1], [0, 1], 0, 64, 10**6)
    assert [i for i, _ in drawn] == [1] * (len(seqs[1].student_ids) - 1)  # the own snippet is not drawn
    s2t = seqs[1].student_to_teacher
    p1 = [float(lp[int(s2t[q]), 10].exp()) for _, q in drawn]
    full = [p * math.exp(_brute_completion(model, other_t[: int(s2t[q]) + 1], (10, 11, 12)))
            for p, (_, q) in zip(p1, drawn)]
    high = [p >= threshold for p in p1]
    assert 2 <= sum(high) < len(high)
    rate = sum(f for f, h in zip(full, high) if h) / sum(p for p, h in zip(p1, high) if h)
    want = [f if h else p * rate for f, p, h in zip(full, p1, high)]
    assert pos.target[n_own:].tolist() == pytest.approx(want, rel=1e-3)


def test_heldout_background_is_drawn_from_every_heldout_snippet(monkeypatch):
    """A token-sharded process holds only its own tokens' held-out snippets; with every held-out snippet
    passed as background_heldout its held-out KL equals that of a run holding them all (the measure
    does not depend on the number of processes); without it the held-out background is missing."""
    from token_distillation.alignment import PhraseMatcher, merge
    from token_distillation.init_methods import subtoken_mean
    from token_distillation.models import embedding_scale, extend_embeddings
    from token_distillation.output_rows import distill_output_rows
    from token_distillation.tokenization import NewToken
    from token_distillation.train import NewRows

    model = make_llama(64, layers=2, tied=False)
    model.requires_grad_(False)
    extend_embeddings(model, 66)
    toks = [NewToken("w", (10, 11), 64), NewToken("v", (40, 41), 65)]
    body = torch.randint(13, 39, (24,), generator=torch.Generator().manual_seed(7)).tolist()
    matcher = PhraseMatcher([t.subtoken_ids for t in toks])
    seqs = [merge([1] + body[:5] + [10, 11] + body[5:12], matcher, [64, 65]),
            merge([1] + body[12:16] + [40, 41] + body[16:], matcher, [64, 65])]
    emb = model.get_input_embeddings().weight

    def held_kl(heldout, background_heldout):
        rows = NewRows(subtoken_mean(emb, toks), [64, 65], emb.shape[0], embedding_scale(model), num_original=64,
                       out_rows=subtoken_mean(model.get_output_embeddings().weight, toks))
        _, kl = distill_output_rows(model, rows, (seqs, [0, 1]), heldout, [0], [t.subtoken_ids for t in toks], lr=0.01,
                                    batch_size=4, device=torch.device("cpu"), pad_id=2, steps=3, show_progress=False,
                                    background_heldout=background_heldout)
        return kl["heldout_after"][0]

    every = held_kl((seqs, [0, 1]), None)
    assert held_kl(([seqs[0]], [0]), (seqs, [0, 1])) == pytest.approx(every, rel=1e-6)
    assert held_kl(([seqs[0]], [0]), None) != pytest.approx(every, rel=1e-3)


def test_progress_bar_ends_at_its_total_fresh_and_resumed(monkeypatch):
    """The fit's progress bar counts every group's background pool in full (a pool snippet no token of
    the group draws counts as read), so it ends at its total; a resumed fit skips the finished groups'
    own and pool snippets and ends there too."""
    from token_distillation import output_rows
    from token_distillation.alignment import PhraseMatcher, merge
    from token_distillation.init_methods import subtoken_mean
    from token_distillation.models import embedding_scale, extend_embeddings
    from token_distillation.tokenization import NewToken
    from token_distillation.train import NewRows

    bars = []

    class Bar:
        def __init__(self, total, **_):
            self.total, self.n = total, 0
            bars.append(self)

        def update(self, k):
            self.n += k

        def close(self):
            pass

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.close()

    class Progress:
        def __init__(self, saved=None):
            self.saved, self.stored = saved, []

        def load(self, key):
            return self.saved

        def save(self, key, state):
            self.stored.append(state)

    monkeypatch.setattr(output_rows, "tqdm", Bar)
    monkeypatch.setattr(output_rows, "CHUNK_ENTRIES", 1)  # one token per group
    model = make_llama(64, layers=2, tied=False)
    model.requires_grad_(False)
    extend_embeddings(model, 67)
    toks = [NewToken("w", (10, 11), 64), NewToken("v", (40, 41), 65), NewToken("u", (50, 51), 66)]
    g = torch.Generator().manual_seed(3)
    matcher = PhraseMatcher([t.subtoken_ids for t in toks])
    seqs, tix = [], []
    for k, t in enumerate(toks):
        for _ in range(3):
            body = torch.randint(13, 39, (14,), generator=g).tolist()
            seqs.append(merge([1] + body[:6] + list(t.subtoken_ids) + body[6:], matcher, [64, 65, 66]))
            tix.append(k)
    emb = model.get_input_embeddings().weight

    def fit_rows(progress):
        rows = NewRows(subtoken_mean(emb, toks), [64, 65, 66], emb.shape[0], embedding_scale(model), num_original=64,
                       out_rows=subtoken_mean(model.get_output_embeddings().weight, toks))
        output_rows.distill_output_rows(model, rows, (seqs, tix), (seqs[::3], [0, 1, 2]), [0, 1, 2],
                                        [t.subtoken_ids for t in toks], lr=0.01, batch_size=4,
                                        device=torch.device("cpu"), pad_id=2, steps=2, progress=progress)
        return rows.out_rows.detach().clone()

    fresh = Progress()
    whole = fit_rows(fresh)
    assert len(fresh.stored) == 3 and bars[-1].total > 0 and bars[-1].n == bars[-1].total
    resumed = fit_rows(Progress(saved=fresh.stored[0]))  # stopped after the first group
    assert bars[-1].n == bars[-1].total
    assert torch.equal(resumed, whole)


def test_shared_shift_moves_every_new_row_by_one_direction(tmp_path, untied_model_dir, toy_corpus, cache_dir):
    """--output_rows_shift: a number moves every new output row by that many times one direction
    ``d`` (the input rows and the original rows unchanged), which lowers each new token's logit by
    about that many nats (``h @ d ~ 1``); ``heldout`` applies the shift with the lowest summed held-out
    KL of those measured, and the report says which; 0 measures the same and moves nothing."""
    from transformers import AutoModelForCausalLM

    runs = {s: run(_cfg(tmp_path, untied_model_dir, toy_corpus, cache_dir, output_embeddings="distill",
                        output_rows_shift=s, out_path=str(tmp_path / f"s{s}")))
            for s in (0, -1, "heldout", "auto")}
    (emb0, out0), (emb1, out1) = _weights(runs[0].out_path), _weights(runs[-1].out_path)
    n = _weights(untied_model_dir)[0].shape[0]
    assert torch.equal(emb0, emb1) and torch.equal(out0[:n], out1[:n])
    diff = out1[n:] - out0[n:]
    assert diff.norm(dim=-1).min() > 0 and torch.allclose(diff, diff[:1].expand_as(diff), atol=1e-5)
    rep0, rep1, rep_h = (runs[s].report["output_rows_shift"] for s in (0, -1, "heldout"))
    assert rep0["applied"] == 0.0 and rep1["applied"] == -1.0
    assert rep0["heldout_kl_sum"] == rep1["heldout_kl_sum"] and len(rep0["heldout_kl_sum"]) == 17
    assert rep0["heldout_text_nll"] == rep1["heldout_text_nll"] and len(rep0["heldout_text_nll"]) == 17
    assert rep0["heldout_text_positions"] > 0 and rep0["heldout_text_documents"] > 0
    sums, text = rep0["heldout_kl_sum"], rep0["heldout_text_nll"]
    assert rep0["best_heldout_kl"] == float(min(sums, key=lambda k: sums[k]))
    # heldout applies the shift with the lowest text NLL of the held-out documents
    assert rep_h["applied"] == rep_h["best_heldout"] == float(min(text, key=lambda k: text[k]))
    # auto (the default) applies that shift only where it beats none by 2 standard errors over the documents
    rep_a = runs["auto"].report["output_rows_shift"]
    assert rep_a["requested"] == "auto" and rep_a["best_heldout"] == rep_h["best_heldout"]
    assert rep_a["best_heldout_gain_se"] == rep_h["best_heldout_gain_se"] is not None
    want = (rep_h["best_heldout"] if rep_a["best_heldout_gain_se"] >= 2.0
            and rep_a["heldout_text_documents"] >= 20 else 0.0)
    assert rep_a["applied"] == want
    assert rep_a["reason"].startswith("auto: ") and rep0["reason"].startswith("--output_rows_shift 0; heldout would")
    assert torch.equal(_weights(runs["auto"].out_path)[1], _weights(runs["heldout" if want else 0].out_path)[1])
    # those documents are left out of the evaluation's held-out corpus, as the training documents are
    from token_distillation.metrics import read_extended

    snip = runs[0].report["snippets"]
    assert len(snip["shift_doc_ids"]) == rep0["heldout_text_documents"]
    assert set(snip["shift_doc_ids"]) <= set(snip["heldout_doc_ids"])
    assert read_extended(runs[0].out_path).train_doc_ids == {str(d) for d in snip["train_doc_ids"]
                                                              + snip["shift_doc_ids"]}
    # the moved rows' held-out KL is the one measured at that shift
    assert math.isclose(runs[-1].report["output_rows_kl"]["heldout_after"] * sum(
        t["output_kl_heldout_final"] is not None for t in runs[-1].report["tokens"]), sums["-1"], rel_tol=1e-4)
    # every new token's logit moves by the same amount at a position, the original ones not at all
    ids = torch.tensor([list(range(1, 40))])
    with torch.no_grad():
        z0, z1 = (AutoModelForCausalLM.from_pretrained(runs[s].out_path).eval()(ids).logits[0] for s in (0, -1))
    assert torch.allclose(z0[:, :n], z1[:, :n], atol=1e-5)
    moved = z1[:, n:] - z0[:, n:]
    assert torch.allclose(moved, moved[:, :1].expand_as(moved), atol=1e-4)


def test_shift_direction_finds_the_constant_direction(monkeypatch):
    """Final hidden states with one entry constant (as the bundled models' have nearly): ``h @ d`` is 1
    at every aligned position, also at positions not fitted; unaligned positions (-1) and the last
    position of a snippet are left out."""
    import token_distillation.output_rows as output_rows

    g = torch.Generator().manual_seed(0)
    hidden, length = 8, 30

    def states(n):
        h = torch.randn(n, length, hidden, generator=g)
        h[..., 3] = 2.5  # the constant entry: d = e_3 / 2.5
        return h

    seqs = [MergedSequence(np.arange(length), np.arange(length), np.r_[np.arange(length - 5), [-1] * 5], 0)
            for _ in range(6)]
    seen = []

    def fake_batches(model, rows, seqs_, token_index, indices, **kw):
        for b in range(0, len(indices), 4):
            idx = indices[b: b + 4]
            s_last = states(len(idx))
            s_last[:, length - 5:] = 1e6  # unaligned positions and the last one: must not be used
            seen.append(s_last)
            yield idx, None, None, None, s_last

    monkeypatch.setattr(output_rows, "_batches", fake_batches)
    rows = SimpleNamespace(rows=torch.zeros(2, hidden))
    d, sd = output_rows.shift_direction(None, rows, seqs, [0] * 6, list(range(6)), batch_size=4, device="cpu", pad_id=0)
    assert d.shape == (hidden,) and sd < 1e-3
    fresh = states(3).reshape(-1, hidden)
    assert torch.allclose(fresh @ d, torch.ones(len(fresh)), atol=1e-3)
    empty = [MergedSequence(np.arange(3), np.arange(3), np.array([-1, -1, -1]), 0)]
    d0, sd0 = output_rows.shift_direction(None, rows, empty, [0], [0], batch_size=4, device="cpu", pad_id=0)
    assert not d0.any() and math.isnan(sd0)


@pytest.mark.parametrize("arch", ["llama", "gemma3-softcap"])
def test_text_nll_by_shift_is_the_extended_models_cross_entropy(arch):
    """The held-out text NLL at each shift equals the summed next-token cross-entropy of a plain forward
    of the extended model (its full extended vocabulary, the new output rows moved by ``s * d``) over
    the student sequences, every token after the first a target: new tokens as inputs and as targets,
    padding in a batch, output soft-capping."""
    from token_distillation.alignment import PhraseMatcher, merge
    from token_distillation.init_methods import subtoken_mean
    from token_distillation.models import embedding_scale, extend_embeddings
    from token_distillation.output_rows import text_nll_by_shift
    from token_distillation.tokenization import NewToken
    from token_distillation.train import NewRows

    if arch == "llama":
        model = make_llama(64, layers=2, tied=False)
    else:
        from transformers import Gemma3ForCausalLM, Gemma3TextConfig

        torch.manual_seed(0)
        model = Gemma3ForCausalLM(Gemma3TextConfig(
            vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=8, max_position_embeddings=128, sliding_window=4,
            final_logit_softcapping=3.0, tie_word_embeddings=False)).eval()
    model.requires_grad_(False)
    extend_embeddings(model, 66)
    toks = [NewToken("w", (10, 11, 12), 64), NewToken("v", (40, 41), 65)]
    gen = torch.Generator().manual_seed(2)
    body = torch.randint(13, 39, (40,), generator=gen).tolist()
    texts = [[1] + body[:5] + [10, 11, 12] + body[5:15] + [40, 41] + body[15:20],
             [1] + body[20:24] + [40, 41] + body[24:30]]
    matcher = PhraseMatcher([t.subtoken_ids for t in toks])
    seqs = [merge(t, matcher, [64, 65]) for t in texts]
    emb = model.get_input_embeddings().weight
    out = model.get_output_embeddings().weight
    rows = NewRows(subtoken_mean(emb, toks) + 0.1 * torch.randn(2, emb.shape[1], generator=gen), [64, 65],
                   emb.shape[0], embedding_scale(model), num_original=64,
                   out_rows=subtoken_mean(out, toks) + 0.2 * torch.randn(2, emb.shape[1], generator=gen))
    d = torch.randn(emb.shape[1], generator=gen) * 0.3
    shifts = (-1.0, 0.0, 0.75)
    sums, n, per_doc = text_nll_by_shift(model, rows, seqs, [1, 0], d, shifts, batch_size=2,
                                         device=torch.device("cpu"), pad_id=0)
    assert n == sum(len(s.student_ids) - 1 for s in seqs)
    assert len(per_doc) == 2 and all(len(r) == 3 for r in per_doc)
    assert all(math.isclose(per_doc[0][j] + per_doc[1][j], sums[j], rel_tol=1e-9) for j in range(3))
    # per document, in the order of the indices asked for: one at a time gives the same
    alone = text_nll_by_shift(model, rows, seqs, [0], d, shifts, batch_size=1, device=torch.device("cpu"), pad_id=0)
    assert all(math.isclose(a, b, rel_tol=1e-5) for a, b in zip(alone[2][0], per_doc[1]))
    with torch.no_grad():
        emb[64:66] = rows.rows
    for s, got in zip(shifts, sums):
        with torch.no_grad():
            out[64:66] = rows.out_rows + s * d
        want = 0.0
        for seq in seqs:
            ids = torch.tensor([seq.student_ids.tolist()])
            logits = model(input_ids=ids).logits[0, :-1].float()
            want += float(torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum"))
        assert math.isclose(got, want, rel_tol=1e-4), (s, got, want)
    assert len(set(sums)) == 3  # the shift changes the text's NLL


def test_shift_documents_are_the_heldout_snippets_documents():
    """--output_rows_shift's documents: each corpus document a held-out snippet came from, once (with the
    token of its first snippet), BOS first, cut to the length cap; generated snippets (doc -1) have none;
    more documents than the cap are spread evenly over the list; no corpus gives none."""
    from token_distillation.corpus import TokenizedCorpus
    from token_distillation.output_rows import shift_documents
    from token_distillation.snippets import Snippet

    lens = [5, 12, 3, 8, 7]
    ids = np.arange(sum(lens), dtype=np.int32) + 10
    corpus = TokenizedCorpus(ids=ids, offsets=np.concatenate([[0], np.cumsum(lens)]).astype(np.int64),
                             doc_ids=[str(i) for i in range(len(lens))])
    held = [Snippet(np.array([1, 2]), 0, 3), Snippet(np.array([1, 2]), 0, 1), Snippet(np.array([1, 2]), 1, 3),
            Snippet(np.array([1, 2]), 1, -1, "generated"), Snippet(np.array([1, 2]), 2, 4)]
    docs = shift_documents(corpus, held, [1], max_tokens=6)
    assert [(d.doc, d.token_index) for d in docs] == [(3, 0), (1, 0), (4, 2)]
    for d in docs:
        assert d.ids.tolist() == [1] + corpus.doc(d.doc)[:6].tolist()
    assert len(docs[1].ids) == 7 and len(docs[0].ids) == 7 and len(docs[2].ids) == 7
    assert [d.doc for d in shift_documents(corpus, held, [], max_tokens=2, n=2)] == [3, 4]
    assert shift_documents(None, held, [1], 6) == [] and shift_documents(corpus, held[3:4], [1], 6) == []


def test_choose_shift_sums_over_measured_tokens():
    """The lowest summed held-out KL wins (tokens without a measure left out); ties go to the shift
    nearest 0; no measure gives 0."""
    from token_distillation.output_rows import choose_shift

    shifts = (-1.0, -0.5, 0.0, 0.5)
    kl = {"heldout_shift": [[3.0, 1.0, 2.0, 4.0], None, [1.0, 1.0, 0.5, 1.0]]}
    assert choose_shift(kl, shifts) == (-0.5, [4.0, 2.0, 2.5, 5.0])
    assert choose_shift({"heldout_shift": [[1.0, 0.5, 0.5, 0.5]]}, shifts)[0] == 0.0
    assert choose_shift({"heldout_shift": [None]}, shifts) == (0.0, [])
    assert choose_shift({}, shifts) == (0.0, [])


def test_shift_gain_is_paired_over_documents():
    """shift_gain: the summed per-document gain of one shift over another and that sum in standard errors
    (sqrt(n) * sample sd of the differences); a gain that varies across documents counts for less."""
    from token_distillation.output_rows import shift_gain

    per_doc = [[10.0, 9.0], [20.0, 18.0], [30.0, 27.0]]  # gains 1, 2, 3: sd 1, se of the sum sqrt(3)
    gain, se = shift_gain(per_doc, 0, 1)
    assert gain == 6.0 and math.isclose(se, 6.0 / math.sqrt(3))
    assert shift_gain(per_doc, 1, 0) == (-6.0, -6.0 / math.sqrt(3))
    noisy = [[10.0, 4.0], [20.0, 21.0], [30.0, 29.0]]  # the same total, one document carries it
    assert shift_gain(noisy, 0, 1)[0] == 6.0 and shift_gain(noisy, 0, 1)[1] < 1.0
    assert shift_gain([[5.0, 4.0]], 0, 1) == (1.0, 0.0)  # one document: no spread to judge by
    assert shift_gain([[5.0, 4.0], [6.0, 5.0]], 0, 1) == (2.0, math.inf)


def test_auto_shift_needs_nothing_a_corpus_run_lacks(tmp_path, untied_model_dir, toy_corpus, cache_dir, caplog):
    """The default --output_rows_shift auto is accepted where heldout is refused (no corpus, no held-out
    snippets, output rows not distilled) and then applies no shift, saying why."""
    from token_distillation.config import RunConfig

    assert RunConfig.from_flags().output.output_rows_shift == "auto"
    assert RunConfig.from_flags(output_rows_shift="AUTO").output.output_rows_shift == "auto"
    for flags in (dict(dataset_path=""), dict(heldout_snippet_num=0), dict(output_embeddings="zero"),
                  dict(init_method="subtoken-mean"), dict(heldout_fraction=0.0)):
        _cfg(tmp_path, untied_model_dir, toy_corpus, cache_dir, **flags)  # no ConfigError
    with caplog.at_level(logging.INFO):
        res = run(_cfg(tmp_path, untied_model_dir, toy_corpus, cache_dir, dataset_path="", output_embeddings="distill",
                       snippet_num=4, heldout_snippet_num=2,
                       out_path=str(tmp_path / "gen")))
    rep = res.report["output_rows_shift"]
    assert rep["requested"] == "auto" and rep["applied"] == 0.0 and rep["heldout_text_documents"] == 0
    assert "auto: no held-out corpus documents" in caplog.text and rep["reason"].startswith("auto: no held-out")
    assert "summed held-out binary KL (the fit's objective) with every new token's logit shifted by (nats) " in caplog.text


def test_heldout_shift_without_a_corpus_is_refused(tmp_path, untied_model_dir, toy_corpus, cache_dir, toy_tokenizer):
    """--output_rows_shift heldout needs held-out corpus documents: without --dataset_path (the command
    line generates snippets) and with texts=None in the Python API it is refused before any model runs."""
    from transformers import AutoModelForCausalLM

    from token_distillation.api import distill
    from token_distillation.config import ConfigError

    with pytest.raises(ConfigError, match="without --dataset_path the snippets are generated"):
        run(_cfg(tmp_path, untied_model_dir, toy_corpus, cache_dir, dataset_path="", output_embeddings="distill",
                 output_rows_shift="heldout"))
    model = AutoModelForCausalLM.from_pretrained(untied_model_dir)
    with pytest.raises(ConfigError, match="texts=None generates the snippets"):
        distill(model, toy_tokenizer, [" hepatotoxicity"], None, output_embeddings="distill", output_rows_shift="heldout")


@pytest.mark.parametrize("flags, words", [
    (dict(output_rows_shift="abc"), "expected a number of nats"),
    (dict(output_rows_shift="nan"), "expected a number of nats"),
    (dict(output_rows_shift=True), "needs a value"),
    (dict(output_rows_shift=1e6), "at most 10 nats"),
    (dict(output_rows_shift="-10.5"), "at most 10 nats"),
    (dict(output_rows_shift=-1, output_embeddings="zero"), "--output_embeddings distill"),
    (dict(output_rows_shift="heldout", init_method="subtoken-mean"), "does not distill them"),
    (dict(output_rows_shift=-1, set_output_to_zero_if_untied=False), "--set_output_to_zero_if_untied false"),
    (dict(output_rows_shift=-1, heldout_snippet_num=0), "needs held-out snippets"),
    (dict(output_rows_shift="heldout", heldout_fraction=0.0), "--heldout_fraction 0 gives none"),
    (dict(output_rows_shift="heldout", use_generated_snippets=True), "held-out corpus documents"),
    (dict(output_rows_shift="heldout", snippet_source="generated"), "held-out corpus documents"),
])
def test_output_rows_shift_flag_errors(tmp_path, untied_model_dir, toy_corpus, cache_dir, flags, words):
    """Bad --output_rows_shift values and combinations are refused before any model is loaded."""
    from token_distillation.config import ConfigError

    with pytest.raises(ConfigError, match="output_rows_shift") as err:
        _cfg(tmp_path, untied_model_dir, toy_corpus, cache_dir, **flags)
    assert words in str(err.value)
    assert _cfg(tmp_path, untied_model_dir, toy_corpus, cache_dir, output_rows_shift="HeldOut").output.output_rows_shift \
        == "heldout"
    assert _cfg(tmp_path, untied_model_dir, toy_corpus, cache_dir, output_rows_shift="-0.5").output.output_rows_shift \
        == -0.5


def test_auto_shift_needs_twenty_documents_and_two_standard_errors():
    """``--output_rows_shift auto`` applies the held-out documents' lowest shift only where it beats no
    shift by 2 standard errors over at least 20 documents: a run on 4 documents applied +1 (the end of
    the range) at "2.8 standard errors", the standard deviation of 4 differences being itself a guess.
    The rows move by shift x direction exactly when applied; the reason says which rule decided."""
    from token_distillation.pipeline import _shared_shift

    shifts = tuple(s / 4 for s in range(-12, 5))

    def case(n_docs, noise):
        g = torch.Generator().manual_seed(n_docs)
        per_doc = []
        for _ in range(n_docs):  # each document about 0.5 nats better at -1 than at 0 (sd: noise)
            c = 0.5 + noise * float(torch.randn((), generator=g))
            per_doc.append([10.0 + c * abs(s + 1.0) for s in shifts])
        text = [sum(d[j] for d in per_doc) for j in range(len(shifts))]
        kl = {"heldout_shift": [[1.0] * len(shifts)], "text": (text, 10 * n_docs, per_doc, n_docs)}
        rows = SimpleNamespace(out_rows=torch.zeros(2, 3))
        rep = _shared_shift(rows, kl, (torch.tensor([1.0, 2.0, 3.0]), shifts), 0.01, "auto", log=False)
        return rep, rows.out_rows

    rep, moved = case(4, 0.1)
    assert rep["best_heldout"] == -1.0 and rep["best_heldout_gain_se"] > 2.0
    assert rep["applied"] == 0.0 and not moved.any()
    assert rep["reason"] == ("auto: 4 held-out documents are too few to judge a shift by (fewer than 20); the "
                             "lowest, -1, is applied by --output_rows_shift heldout")
    rep, moved = case(25, 0.1)
    assert rep["applied"] == -1.0 and rep["reason"].startswith("auto: -1 beats none by ")
    assert torch.equal(moved, torch.tensor([[-1.0, -2.0, -3.0]] * 2))
    rep, moved = case(25, 20.0)  # noise far above the gain: fewer than 2 standard errors
    assert rep["applied"] == 0.0 and not moved.any(), rep
    assert "standard errors over 25 documents (< 2)" in rep["reason"], rep["reason"]
