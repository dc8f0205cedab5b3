import numpy as np
import torch

from token_distillation.corpus import TokenizedCorpus
from token_distillation.snippets import mine_snippets, window
from token_distillation.tokenization import NewToken


def _corpus(docs):
    offsets = np.zeros(len(docs) + 1, dtype=np.int64)
    np.cumsum([len(d) for d in docs], out=offsets[1:])
    return TokenizedCorpus(np.concatenate([np.asarray(d, dtype=np.int32) for d in docs]), offsets,
                           [str(i) for i in range(len(docs))])


def _naive_count(docs, phrase):
    """Non-overlapping left-to-right occurrences (as the matcher reports for a single pattern)."""
    n = 0
    for d in docs:
        i = 0
        while i + len(phrase) <= len(d):
            if tuple(d[i:i + len(phrase)]) == phrase:
                n += 1
                i += len(phrase)
            else:
                i += 1
    return n


def test_miner_equals_naive_scan():
    rng = np.random.default_rng(1)
    docs = [rng.integers(3, 9, size=rng.integers(0, 60)).tolist() for _ in range(300)]
    toks = [NewToken("x", (3, 4)), NewToken("y", (5, 6, 7)), NewToken("z", (8, 8))]
    corpus = _corpus(docs)
    got = mine_snippets(corpus, toks, snippet_len=10, snippet_num=10**6, heldout_num=0, heldout_fraction=0.0,
                        bos=[1], seed=0, chunk_docs=37)
    for i, t in enumerate(toks):
        # a naive scan per pattern over-counts where patterns overlap; these patterns cannot overlap
        assert got.train_counts[i] == _naive_count(docs, t.subtoken_ids)
    for s in got.train:
        phrase = toks[s.token_index].subtoken_ids
        body = s.ids[1:].tolist()
        assert s.ids[0] == 1
        assert any(tuple(body[j:j + len(phrase)]) == phrase for j in range(len(body)))
        assert len(body) <= 10


def test_early_stop_and_heldout_documents_disjoint():
    docs = [[3, 4, 0, 0]] * 200
    corpus = _corpus(docs)
    got = mine_snippets(corpus, [NewToken("x", (3, 4))], snippet_len=4, snippet_num=5, heldout_num=3,
                        heldout_fraction=0.2, bos=[], seed=0)
    assert got.train_counts == [5] and got.heldout_counts == [3]
    train_docs = {s.doc for s in got.train}
    held_docs = {s.doc for s in got.heldout}
    assert not train_docs & held_docs
    assert set(got.train_docs) == train_docs
    assert held_docs <= set(got.heldout_docs)


def test_window_keeps_phrase_and_length():
    for doc_len in (3, 10, 100):
        for start in range(0, doc_len - 1):
            a, b = window(doc_len, start, start + 2, 8)
            assert a <= start and start + 2 <= b <= doc_len
            assert b - a == min(8, doc_len)


def test_word_continuation_mask_on_real_tokenizers(smollm_tokenizer, gemma_tokenizer):
    """Byte-level BPE (SmolLM2) and SentencePiece (Gemma 3): word pieces glue, spaces/punctuation do not."""
    from token_distillation.snippets import word_continuation_mask

    for tok in (smollm_tokenizer, gemma_tokenizer):
        mask = word_continuation_mask(tok)
        assert mask.shape == (len(tok),)
        for piece in ("ing", "en", "ity"):
            ids = tok.encode("nephrotox" + piece, add_special_tokens=False)
            assert bool(mask[ids[-1]]), (tok.name_or_path, piece, tok.convert_ids_to_tokens(ids))
        for text in (" the", ",", ".", "\n", " ("):
            first = tok.encode(text, add_special_tokens=False)[0]
            assert not bool(mask[first]), (tok.name_or_path, text)
        # a rare CJK character is split into byte pieces by both tokenizers; its first piece continues the word
        ids = tok.encode("nephrotoxicity龘", add_special_tokens=False)
        start = next(j for j in range(len(ids)) if tok.decode(ids[j:j + 1]) == "\ufffd")
        assert bool(mask[ids[start]]), (tok.name_or_path, tok.convert_ids_to_tokens(ids))


def test_generated_continuation_starts_a_new_word(toy_model_dir):
    """The first sampled token after a space-prefixed word never extends it (a random model would
    pick a word piece there about a third of the time)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from token_distillation.snippets import generate_snippets, word_continuation_mask

    tok = AutoTokenizer.from_pretrained(toy_model_dir)
    model = AutoModelForCausalLM.from_pretrained(toy_model_dir)
    mask = word_continuation_mask(tok)
    assert 0.1 < float(mask.float().mean()) < 0.9
    word = NewToken(" token", tuple(tok.encode(" token", add_special_tokens=False)))
    snips = generate_snippets(model, tok, [word], snippet_len=12, snippet_num=40, heldout_num=0, seed=0,
                              use_chat_template=False)
    k = len(word.subtoken_ids)
    left = 12 // 4
    assert len(snips.train) == 40
    for s in snips.train:
        body = s.ids[1:].tolist()
        assert tuple(body[left:left + k]) == word.subtoken_ids
        assert not bool(mask[body[left + k]]), tok.decode(body)


def test_word_boundary_mask_applies_before_top_p(toy_model_dir):
    """A model certain of a word piece after the word: top-p alone would keep only that piece, so
    the mask must come first (otherwise nothing is left to sample)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from token_distillation.snippets import generate_snippets, word_continuation_mask

    tok = AutoTokenizer.from_pretrained(toy_model_dir)
    model = AutoModelForCausalLM.from_pretrained(toy_model_dir)
    mask = word_continuation_mask(tok)
    piece = int(mask.nonzero()[0])

    class Certain(torch.nn.Module):  # logits: the word piece at +30, everything else at 0
        def forward(self, h):
            out = torch.zeros(*h.shape[:-1], len(tok))
            out[..., piece] = 30.0
            return out

    model.lm_head = Certain()
    word = NewToken(" token", tuple(tok.encode(" token", add_special_tokens=False)))
    snips = generate_snippets(model, tok, [word], snippet_len=8, snippet_num=6, heldout_num=0, seed=0,
                              top_p=0.95, use_chat_template=False)
    k, left = len(word.subtoken_ids), 8 // 4
    for s in snips.train:
        body = s.ids[1:].tolist()
        assert body[:left] == [piece] * left  # elsewhere the piece is sampled, as the model wants
        assert not bool(mask[body[left + k]])
