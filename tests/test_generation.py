"""Sampled generation with the extended tokenizer (token_distillation.generation) and its place in
the held-out evaluation."""

import math

import torch

from tests.test_evaluate import _cfg, make_extended
from token_distillation.evaluate import evaluate
from token_distillation.generation import Generated, continuation_bits, sample, word_stats


def test_word_stats_counts_words_and_new_token_use():
    gen = Generated([" hepatotoxicity was", "no word here", "Hepat", " hepatotoxicity again"],
                    [[50, 7], [8, 9], [10], [11, 12, 13]])
    s = word_stats(gen, [" hepatotoxicity"], [50])
    assert s["with_word"] == 2 and s["written_as_new_token"] == 1 and s["word_share"] == 0.5
    assert s["word_rate"] == 0.5 and s["tokens"] == 8
    assert s["tokens_per_byte"] == 8 / sum(len(t.encode()) for t in gen.texts)
    assert word_stats(gen, [" hepatotoxicity"], [None])["word_share"] == 0.0  # a model without the token


def test_sample_is_seeded_and_continuation_bits_match_a_direct_sum(toy_model_dir, toy_tokenizer):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(toy_model_dir).eval()
    prompts = ["The patient developed", "Cisplatin causes"]
    n = model.get_output_embeddings().weight.shape[0]
    a = sample(model, toy_tokenizer, prompts, 5, 3, "cpu", n)
    assert a.ids == sample(model, toy_tokenizer, prompts, 5, 3, "cpu", n).ids and all(len(x) <= 5 for x in a.ids)
    # paired: a model with two extra vocabulary rows that are never likely draws the same tokens
    from token_distillation.models import extend_embeddings
    big = AutoModelForCausalLM.from_pretrained(toy_model_dir).eval()
    extend_embeddings(big, n + 2)
    with torch.no_grad():
        big.get_output_embeddings().weight[n:] = -5 * big.get_output_embeddings().weight[:n].mean(0)
    assert sample(big, toy_tokenizer, prompts, 5, 3, "cpu", n).ids == a.ids
    bits, nbytes = continuation_bits(model, toy_tokenizer, prompts[:1], [" severe hepatotoxicity"], "cpu")
    head = [toy_tokenizer.bos_token_id] + toy_tokenizer("The patient developed", add_special_tokens=False)["input_ids"]
    full = [toy_tokenizer.bos_token_id] + toy_tokenizer("The patient developed severe hepatotoxicity",
                                                        add_special_tokens=False)["input_ids"]
    assert full[: len(head)] == head
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([full])).logits[0, :-1], -1)
    want = -sum(float(logp[i - 1, full[i]]) for i in range(len(head), len(full))) / math.log(2)
    assert abs(bits - want) < 1e-4 and nbytes == len(" severe hepatotoxicity")


def test_evaluation_reports_generation(tmp_path, toy_model_dir, toy_corpus, cache_dir, toy_tokenizer):
    """A new token whose row points along the mean last hidden state is sampled everywhere: every
    continuation that contains the word writes it as the new token; the original never does."""
    from transformers import AutoModelForCausalLM

    from tests.conftest import TOY_TEXT

    model = AutoModelForCausalLM.from_pretrained(toy_model_dir)
    with torch.no_grad():
        h = model.model(torch.tensor([toy_tokenizer.encode(TOY_TEXT[0])])).last_hidden_state[0].mean(0)
    bad = make_extended(tmp_path / "bad", toy_model_dir, [" hepatotoxicity"], lambda w, s: 50 * h / h.norm(), [])
    res = evaluate(_cfg(tmp_path, toy_model_dir, toy_corpus, cache_dir, [bad], labels="bad", definition_tokens=0,
                        bpb_docs=0, gen_prompts=4, gen_tokens=6))
    g, o = res["methods"]["bad"]["generation"], res["generation_original"]
    assert g["prompts"] == o["prompts"] == 4 and g["with_word"] >= 3
    assert g["written_as_new_token"] == g["with_word"] and o["written_as_new_token"] == 0
    assert g["original_bpb"] > 0 and o["original_bpb"] > 0 and len(res["samples"]) == 4
    md = (tmp_path / "eval" / "evaluation.md").read_text()
    assert "Sampled generation" in md and "| bad |" in md
