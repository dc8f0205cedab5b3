"""Every init method, loss variant and output-embedding policy on tiny random models (tied and untied)."""

import json

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import make_llama
from tests.test_pipeline import _words
from token_distillation.alignment import PhraseMatcher, collate, merge
from token_distillation.config import ConfigError, InitMethod, LossMethod, RunConfig
from token_distillation.init_methods import adaptivocab_weights, subtoken_mean, weighted_mean
from token_distillation.losses import LossPlan
from token_distillation.models import embedding_scale, extend_embeddings
from token_distillation.pipeline import run
from token_distillation.tokenization import NewToken
from token_distillation import train as train_mod
from token_distillation.train import NewRows, ce_targets, distill_loss, output_logits, resolve_layer, train

WORDS = [" hepatotoxicity", " nephrotoxicity", " angiogenesis"]


def _cfg(tmp_path, model_dir, corpus, cache_dir, **kw):
    flags = dict(model_path=str(model_dir), dataset_path=str(corpus), cache_dir=str(cache_dir),
                 new_tokens_source=_words(tmp_path, WORDS), out_path=str(tmp_path / "out"), snippet_num=8,
                 min_snippets=2, heldout_snippet_num=2, heldout_fraction=0.25, token_distillation_batch_size=4,
                 token_distillation_lr=1e-2, snippet_len=12)
    flags.update(kw)
    return RunConfig.from_flags(**flags)


def _weights(d):
    w = load_file(str(d / "model.safetensors"))
    return w["model.embed_tokens.weight"], w.get("lm_head.weight")


CASES = [
    dict(init_method="random"),
    dict(init_method="subtoken-mean"),
    dict(init_method="weighted-mean"),
    dict(init_method="token_distillation"),
    dict(init_method="token_distillation-randinit"),
    dict(init_method="ntp"),
    dict(init_method="token_distillation", loss_method="[MSE-on-hiddens,MSE-on-logits,KL-on-logits,CE-auto-weighted]"),
    dict(init_method="token_distillation", loss_method="KL-on-logits,CE", target_layer=1),
]


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize("flags", CASES, ids=lambda f: "-".join(str(v) for v in f.values()))
def test_each_method_runs_and_keeps_original_rows(tmp_path, toy_model_dir, untied_model_dir, toy_corpus, cache_dir,
                                                  tied, flags):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = toy_model_dir if tied else untied_model_dir
    res = run(_cfg(tmp_path, src, toy_corpus, cache_dir, **flags))
    rep = json.loads((res.out_path / "report.json").read_text())
    ids = [t["id"] for t in rep["tokens"]]
    assert len(ids) == 3 and rep["model"]["tied_embeddings_source"] is tied and not rep["model"]["tied_embeddings"]
    emb0, out0 = _weights(src)
    emb1, out1 = _weights(res.out_path)
    n = emb0.shape[0]
    tok = AutoTokenizer.from_pretrained(res.out_path)
    assert emb1.shape == (len(tok), emb0.shape[1])
    assert torch.equal(emb1[:n], emb0)  # original input rows bit-identical
    distilled = flags["init_method"] in ("token_distillation", "token_distillation-randinit")
    assert rep["model"]["output_embeddings"] == ("distill" if distilled else "zero" if not tied else "subtoken-mean")
    if distilled:  # default for Token Distillation: output rows fitted to the teacher (untied either way)
        assert rep["output_rows_kl"] is not None
        out_ref = out0 if not tied else emb0
        assert torch.equal(out1[:n], out_ref)
        for t in rep["tokens"]:  # fitted, not left at their start (subtoken mean)
            assert not torch.allclose(out1[t["id"]], out_ref[t["subtoken_ids"]].mean(0), atol=1e-6)
    elif not tied:
        assert out1.shape == emb1.shape and torch.equal(out1[:n], out0)
        assert torch.count_nonzero(out1[ids]) == 0  # default for untied models: zero output rows
    else:  # default for tied models: untied, new output rows = subtoken mean of the shared rows
        assert rep["model"]["untied_by_run"] and torch.equal(out1[:n], emb0)
        for t in rep["tokens"]:
            assert torch.allclose(out1[t["id"]], emb0[t["subtoken_ids"]].mean(0), atol=1e-6)
    trained = flags["init_method"] in ("token_distillation", "token_distillation-randinit", "ntp")
    assert bool(rep["loss_curve"]) == trained
    assert rep["new_token_argmax_rate_final"] is not None and 0 <= rep["new_token_argmax_rate_final"] <= 1
    for i, t in enumerate(rep["tokens"]):
        assert abs(emb1[t["id"]].norm().item() - t["row_norm"]) < 1e-4
        assert t["snippet_source"] == "corpus"
    AutoModelForCausalLM.from_pretrained(res.out_path)


@pytest.mark.parametrize("method", ["ntp", "token_distillation"])
def test_train_original_embeddings_changes_original_rows(method, tmp_path, toy_model_dir, toy_corpus, cache_dir):
    from transformers import AutoTokenizer

    res = run(_cfg(tmp_path, toy_model_dir, toy_corpus, cache_dir, init_method=method, train_original_embeddings=True))
    emb0, _ = _weights(toy_model_dir)
    emb1, _ = _weights(res.out_path)
    changed = (emb1[: emb0.shape[0]] != emb0).any(dim=1)
    assert changed.sum() > 10  # the tokens of the snippets moved
    bos = AutoTokenizer.from_pretrained(toy_model_dir).bos_token_id
    assert bos is not None and bool(changed[bos])  # only ever before the new token: the prefix is trained too


def test_output_embeddings_tied_keeps_one_matrix(tmp_path, toy_model_dir, untied_model_dir, toy_corpus, cache_dir,
                                                monkeypatch):
    from token_distillation import pipeline

    res = run(_cfg(tmp_path, toy_model_dir, toy_corpus, cache_dir, output_embeddings="tied",
                   loss_method="MSE-on-hiddens,CE-auto-weighted"))
    emb1, out1 = _weights(res.out_path)
    assert out1 is None and res.report["model"]["tied_embeddings"]
    # on an untied model the flag fails from the config alone, before the tokenizer loads
    monkeypatch.setattr(pipeline, "load_tokenizer", lambda *a, **k: pytest.fail("tokenizer loaded before the check"))
    with pytest.raises(ConfigError, match="--output_embeddings tied"):
        run(_cfg(tmp_path, untied_model_dir, toy_corpus, cache_dir, output_embeddings="tied",
                 out_path=str(tmp_path / "o2")))


def test_output_embeddings_on_tied_model_unties(tmp_path, toy_model_dir, toy_corpus, cache_dir):
    from transformers import AutoModelForCausalLM

    res = run(_cfg(tmp_path, toy_model_dir, toy_corpus, cache_dir, output_embeddings="subtoken-mean"))
    rep = res.report
    assert rep["model"]["untied_by_run"] and not rep["model"]["tied_embeddings"]
    emb0, _ = _weights(toy_model_dir)
    emb1, out1 = _weights(res.out_path)
    n = emb0.shape[0]
    assert torch.equal(out1[:n], emb0) and torch.equal(emb1[:n], emb0)
    for t in rep["tokens"]:
        assert torch.allclose(out1[t["id"]], emb0[t["subtoken_ids"]].mean(0), atol=1e-6)
        assert not torch.allclose(out1[t["id"]], emb1[t["id"]])  # input row trained, output row not
    m = AutoModelForCausalLM.from_pretrained(res.out_path)
    assert m.get_output_embeddings().weight.data_ptr() != m.get_input_embeddings().weight.data_ptr()


def test_output_embeddings_ntp_trains_output_rows_only(tmp_path, untied_model_dir, toy_corpus, cache_dir):
    res = run(_cfg(tmp_path, untied_model_dir, toy_corpus, cache_dir, init_method="subtoken-mean",
                   output_embeddings="ntp"))
    emb0, out0 = _weights(untied_model_dir)
    emb1, out1 = _weights(res.out_path)
    n = emb0.shape[0]
    assert torch.equal(emb1[:n], emb0) and torch.equal(out1[:n], out0)
    assert res.report["output_rows_loss_curve"]
    for t in res.report["tokens"]:
        mean = out0[t["subtoken_ids"]].mean(0)
        assert not torch.allclose(out1[t["id"]], mean)  # trained away from its subtoken-mean start
        assert torch.allclose(emb1[t["id"]], emb0[t["subtoken_ids"]].mean(0), atol=1e-6)  # input: FVT


def test_corpus_then_generated_fallback(tmp_path, toy_model_dir, toy_corpus, cache_dir):
    # " cisplatin" occurs 3x per corpus copy, " zzqqxx" never: generated snippets fill it in
    res = run(_cfg(tmp_path, toy_model_dir, toy_corpus, cache_dir, snippet_source="corpus-then-generated",
                   new_tokens_source=_words(tmp_path, [" hepatotoxicity", " zzqqxx"]), snippet_num=4,
                   min_snippets=3, token_distillation_batch_size=4))
    src = {t["token"]: t["snippet_source"] for t in res.report["tokens"]}
    assert src == {" hepatotoxicity": "corpus", " zzqqxx": "generated"}
    z = [t for t in res.report["tokens"] if t["token"] == " zzqqxx"][0]
    assert z["train_snippets"] == 4 and z["heldout_snippets"] == 2


# --- unit tests on the loss plumbing --------------------------------------------------------------

def _setup(tied=True, seed=0, n_snip=16):
    model = make_llama(64, tied=tied, seed=seed)
    model.requires_grad_(False)
    extend_embeddings(model, 66)
    toks = [NewToken("a", (10, 11, 12), 64), NewToken("b", (20, 21), 65)]
    gen = torch.Generator().manual_seed(seed)
    m = PhraseMatcher([t.subtoken_ids for t in toks])
    seqs, tix = [], []
    for i in range(n_snip):
        k = i % 2
        body = torch.randint(3, 60, (12,), generator=gen).tolist()
        ids = [1] + body[:3] + list(toks[k].subtoken_ids) + body[3:6] + list(toks[k].subtoken_ids) + body[6:]
        seqs.append(merge(ids, m, [64, 65]))
        tix.append(k)
    emb = model.get_input_embeddings().weight
    out_rows = None if tied else torch.zeros(2, emb.shape[1])
    rows = NewRows(subtoken_mean(emb, toks), [64, 65], emb.shape[0], embedding_scale(model), out_rows=out_rows)
    return model, toks, seqs, tix, rows


@pytest.mark.parametrize("tied", [True, False])
def test_ce_auto_weighted_is_twice_the_distillation_loss_at_first_step(tied):
    model, toks, seqs, tix, rows = _setup(tied)
    layer = resolve_layer(model, -1)
    kw = dict(layer=layer, lr=1e-3, batch_size=8, epochs=1, seed=0, device=torch.device("cpu"))
    batch = collate(seqs[:8], tix[:8])
    d = distill_loss(model, rows, batch, layer, LossMethod.MSE_ON_HIDDENS)
    both = distill_loss(model, rows, batch, layer, (LossMethod.MSE_ON_HIDDENS, LossMethod.CE_AUTO_WEIGHTED))
    ce = distill_loss(model, rows, batch, layer, (LossMethod.CE,))
    assert torch.allclose(both, 2 * d, rtol=1e-6) and not torch.allclose(ce, d)
    # through the training loop, same batch order
    r0 = NewRows(rows.rows, [64, 65], rows.id_to_row.shape[0], rows.scale, out_rows=rows.out_rows)
    r1 = NewRows(rows.rows, [64, 65], rows.id_to_row.shape[0], rows.scale, out_rows=rows.out_rows)
    a = train(model, r0, seqs, tix, loss_method=LossMethod.MSE_ON_HIDDENS, **kw)
    b = train(model, r1, seqs, tix, loss_method=(LossMethod.MSE_ON_HIDDENS, LossMethod.CE_AUTO_WEIGHTED), **kw)
    assert abs(b.loss_curve[0] - 2 * a.loss_curve[0]) < 1e-5 * a.loss_curve[0]
    assert not torch.equal(r0.rows, r1.rows)  # the CE term changes the update direction


def test_ce_auto_weight_receives_no_gradient():
    """The gradient of D + alpha*CE equals grad D + (D/CE) * grad CE with alpha treated as a constant."""
    model, toks, seqs, tix, rows = _setup()
    layer = resolve_layer(model, -1)
    batch = collate(seqs[:6], tix[:6])

    def grad(methods):
        rows.rows.grad = None
        loss = distill_loss(model, rows, batch, layer, methods)
        loss.backward()
        return loss.detach(), rows.rows.grad.clone()

    d, gd = grad((LossMethod.MSE_ON_HIDDENS,))
    c, gc = grad((LossMethod.CE,))
    _, gb = grad((LossMethod.MSE_ON_HIDDENS, LossMethod.CE_AUTO_WEIGHTED))
    assert torch.allclose(gb, gd + (d / c) * gc, rtol=1e-4, atol=1e-7)


def test_hidden_only_path_computes_no_logits(monkeypatch):
    model, toks, seqs, tix, rows = _setup()

    def boom(*a, **k):
        raise AssertionError("logits computed")

    monkeypatch.setattr(train_mod, "output_logits", boom)
    batch = collate(seqs[:4], tix[:4])
    distill_loss(model, rows, batch, resolve_layer(model, -1), LossMethod.MSE_ON_HIDDENS).backward()
    assert not LossPlan((LossMethod.MSE_ON_HIDDENS,)).needs_logits
    assert LossPlan((LossMethod.KL_ON_LOGITS,)).needs_logits and not LossPlan((LossMethod.CE,)).needs_teacher
    with pytest.raises(AssertionError, match="logits computed"):
        distill_loss(model, rows, batch, resolve_layer(model, -1), LossMethod.KL_ON_LOGITS)


def test_logits_over_original_vocab_and_ce_targets():
    model, toks, seqs, tix, rows = _setup()
    h = torch.randn(5, 32)
    assert output_logits(model, rows, h, include_new=False).shape == (5, 64)
    z = output_logits(model, rows, h, include_new=True)
    assert z.shape == (5, 66)
    assert torch.allclose(z[:, 64:], h @ rows.rows.T)  # tied: the new output row is the new input row
    batch = collate(seqs[:2], tix[:2])
    mask, tgt = ce_targets(rows, batch)
    nxt = batch.student_ids[:, 1:][mask[:, :-1]]
    assert torch.equal(tgt >= 64, nxt >= 64) and set(tgt[tgt >= 64].tolist()) <= {64, 65}
    # the position before the first new token predicts it
    f = seqs[0].first_new
    assert mask[0, f - 1] and not mask[0, : f - 1].any()


def test_weighted_mean_formula():
    w = adaptivocab_weights(3)
    assert torch.allclose(w.sum(), torch.tensor(1.0)) and w[0] < w[1] < w[2]
    assert torch.allclose(adaptivocab_weights(3, output=True), w.flip(0))
    emb = torch.randn(30, 4)
    tok = NewToken("x", (3, 7, 9), 30)
    e = torch.exp(torch.tensor([2.0, 4.0, 6.0]))
    expect = (e[:, None] * emb[[3, 7, 9]]).sum(0) / e.sum()
    assert torch.allclose(weighted_mean(emb, [tok])[0], expect, atol=1e-6)


@pytest.mark.parametrize("flags, needles", [
    (dict(loss_method="CE-auto-weighted"), ["--loss_method", "distillation loss"]),
    (dict(loss_method="MSE-on-hiddens,CE,CE-auto-weighted"), ["CE and CE-auto-weighted"]),
    (dict(loss_method="MSE-on-hiddens,MSE-on-hiddens"), ["twice"]),
    (dict(init_method="ntp", loss_method="MSE-on-hiddens"), ["--init_method ntp", "--loss_method"]),
    (dict(init_method="subtoken-mean", loss_method="MSE-on-hiddens"), ["--init_method subtoken-mean"]),
    (dict(init_method="random", train_original_embeddings=True), ["--train_original_embeddings"]),
    (dict(set_output_to_zero_if_untied=False, output_embeddings="ntp"),
     ["--set_output_to_zero_if_untied", "--output_embeddings"]),
    (dict(output_embeddings="shared"), ["--output_embeddings"]),
    (dict(snippet_source="corpus-then-generated"), ["--snippet_source", "--dataset_path"]),
    (dict(loss_method="L1"), ["--loss_method", "L1"]),
])
def test_invalid_combinations_fail_fast(flags, needles):
    with pytest.raises(ConfigError) as e:
        RunConfig.from_flags(**flags)
    for n in needles:
        assert n in str(e.value)


def test_loss_method_list_forms():
    a = RunConfig.from_flags(loss_method=["MSE-on-hiddens", "CE-auto-weighted"]).train.loss_method
    b = RunConfig.from_flags(loss_method="[MSE-on-hiddens,CE-auto-weighted]").train.loss_method
    c = RunConfig.from_flags(loss_method="MSE-on-hiddens, CE-auto-weighted").train.loss_method
    assert a == b == c == (LossMethod.MSE_ON_HIDDENS, LossMethod.CE_AUTO_WEIGHTED)
    assert RunConfig.from_flags(init_method="ntp").train.loss_method == (LossMethod.CE,)
    assert RunConfig.from_flags(init_method=InitMethod.RANDOM).train.loss_method == ()
