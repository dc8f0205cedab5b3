"""Sampled generation with the extended tokenizer: does the model write the new token?

A new token saves decoding steps only if the model *writes* it. For prompts cut from held-out text
right before a new word, every model (the original one and each extended one, each through its own
tokenizer) samples a continuation (seeded, temperature 1, the whole vocabulary). Measured:

- ``word_share``: of the continuations that contain a new word, the share in which the model wrote it
  as the new token (0 for the original model, which has none);
- ``word_rate``: the share of continuations that contain a new word at all (the teacher's rate is
  the original model's);
- ``tokens_per_byte``: generated tokens per UTF-8 byte of the generated text (fewer is faster);
- ``original_bpb``: bits per byte of the generated text under the *original* model (given the same
  prompt), a check that the extended model's text stays as plausible as the original model's own.

The samples are paired across models (the same random draws for the original tokens, see
:func:`sample`), so the continuations differ only where the models' distributions do.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .bpb import context_ids


@dataclass
class Generated:
    """One model's continuations: ``texts`` (decoded), ``ids`` (the generated token ids)."""

    texts: list[str]
    ids: list[list[int]]


def pad_and_eos(tokenizer) -> tuple[int, int | None]:
    """``(pad id, EOS id)`` for generation: the tokenizer's pad token, else EOS, else 0."""
    eos = tokenizer.eos_token_id
    return (tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos or 0)), eos


@torch.no_grad()
def generate_ids(model, prompts: list[list[int]], *, max_new: int, pad_id: int, eos_id, batch_size: int, device,
                 temperature: float = 0.0, logits_processor=None) -> list[list[int]]:
    """Continuations of ``prompts`` (token ids) with ``model.generate`` (KV cache), batched with left
    padding; greedy unless ``temperature > 0``. The model's own generation settings are not used
    (an explicit :class:`transformers.GenerationConfig`), so results do not depend on them.

    Returns:
        the new token ids of each prompt, cut after the first ``eos_id`` (included).
    """
    from transformers import GenerationConfig, LogitsProcessorList

    sample = dict(do_sample=True, temperature=temperature, top_k=0, top_p=1.0) if temperature > 0 else \
        dict(do_sample=False)
    config = GenerationConfig(max_new_tokens=max_new, pad_token_id=pad_id, eos_token_id=eos_id, **sample)
    out: list[list[int]] = []
    for b in range(0, len(prompts), batch_size):
        chunk = prompts[b: b + batch_size]
        width = max(len(p) for p in chunk)
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        att = torch.zeros((len(chunk), width), dtype=torch.long)
        for r, p in enumerate(chunk):
            ids[r, width - len(p):], att[r, width - len(p):] = torch.tensor(p), 1
        gen = model.generate(ids.to(device), attention_mask=att.to(device), generation_config=config,
                             logits_processor=LogitsProcessorList(logits_processor or []))
        for row in gen[:, width:].tolist():
            out.append(row[: row.index(eos_id) + 1] if eos_id in row else row)
    return out


def _gumbel(n: int, seed: int) -> torch.Tensor:
    """``[n]`` standard Gumbel noise from a generator seeded with ``seed``."""
    u = torch.rand(n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return -torch.log(-torch.log(u.clamp(1e-300, 1.0 - 1e-16)))


class _GumbelMax:
    """Logits processor for greedy decoding that turns it into paired sampling at temperature 1:
    the scores become ``log_softmax(scores) + g`` with ``g`` seeded by ``(seed, prompt, step)`` for
    the original ids ``< num_original`` and by a separate stream for the new ids (one prompt per call)."""

    def __init__(self, seed: int, prompt_index: int, prompt_len: int, num_original: int):
        self.base = (seed * 1_000_003 + prompt_index) * 1_009
        self.prompt_len, self.num_original = prompt_len, num_original

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        n, base = scores.shape[-1], self.base + input_ids.shape[1] - self.prompt_len
        g = _gumbel(min(self.num_original, n), base)
        if n > self.num_original:
            g = torch.cat([g, _gumbel(n - self.num_original, base + 2**40)])
        logp = torch.log_softmax(scores.double(), -1)
        return (logp + g.to(scores.device)).to(scores.dtype)


def sample(model, tokenizer, prompts: list[str], max_new: int, seed: int, device, num_original: int) -> Generated:
    """Seeded sampling (temperature 1, the whole vocabulary) of up to ``max_new`` tokens after every
    prompt; stops at EOS (not included).

    Paired across models: a token is drawn as ``argmax(log p + g)`` (Gumbel-max), where the noise
    ``g`` of original ids ``< num_original`` depends only on ``(seed, prompt, step)`` and that of the
    new ids comes from a separate stream. So the original model and an extended model whose
    probabilities of the original tokens agree draw the same tokens, and differences between their
    continuations come from the models, not from the random stream (a plain sampler's stream shifts
    with the vocabulary size).
    """
    pad, eos = pad_and_eos(tokenizer)
    texts, ids = [], []
    for k, prompt in enumerate(prompts):
        seq = context_ids(tokenizer) + tokenizer(prompt, add_special_tokens=False)["input_ids"]
        out = generate_ids(model, [seq], max_new=max_new, pad_id=pad, eos_id=eos, batch_size=1, device=device,
                           logits_processor=[_GumbelMax(seed, k, len(seq), num_original)])[0]
        out = out[:-1] if out and out[-1] == eos else out
        ids.append(out)
        texts.append(tokenizer.decode(out))
    return Generated(texts, ids)


@torch.no_grad()
def continuation_bits(model, tokenizer, prompts: list[str], texts: list[str], device) -> tuple[float, int]:
    """``(bits, bytes)`` of ``texts`` after their prompts under ``model`` (read through ``tokenizer``).

    The boundary is taken in characters: the prompt's tokens are context, the tokens of the whole
    string ``prompt + text`` after the prompt's tokens are scored (a continuation that merges with
    the prompt's last token is scored from that token on).
    """
    bits, nbytes = 0.0, 0
    for prompt, text in zip(prompts, texts):
        if not text:
            continue
        head = context_ids(tokenizer) + tokenizer(prompt, add_special_tokens=False)["input_ids"]
        full = context_ids(tokenizer) + tokenizer(prompt + text, add_special_tokens=False)["input_ids"]
        keep = next((i for i, (a, b) in enumerate(zip(head, full)) if a != b), min(len(head), len(full)))
        keep = max(1, keep)
        ids = torch.tensor([full], device=device)
        logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), -1)
        tgt = ids[0, 1:]
        bits += float(-logp[keep - 1:].gather(-1, tgt[keep - 1:, None]).sum()) / math.log(2)
        nbytes += len(text.encode("utf-8"))
    return bits, nbytes


def word_stats(gen: Generated, words: list[str], new_ids: list[int | None]) -> dict:
    """Counts over the continuations (see the module docstring for the rates).

    Args:
        words: the new words' texts; new_ids: each word's new id in this model (None: the model has
            none, as the original model).
    """
    def found(t: str) -> list[int]:
        return [k for k, w in enumerate(words) if w in t or w.strip() in t]

    hits = {i: found(t) for i, t in enumerate(gen.texts)}
    with_word = [i for i, ks in hits.items() if ks]
    as_new = [i for i in with_word if any(new_ids[k] is not None and new_ids[k] in gen.ids[i] for k in hits[i])]
    tokens = sum(len(x) for x in gen.ids)
    nbytes = sum(len(t.encode("utf-8")) for t in gen.texts)
    return {"prompts": len(gen.texts), "with_word": len(with_word), "written_as_new_token": len(as_new),
            "word_rate": len(with_word) / len(gen.texts) if gen.texts else None,
            "word_share": len(as_new) / len(with_word) if with_word else None,
            "tokens": tokens, "bytes": nbytes, "tokens_per_byte": tokens / nbytes if nbytes else None}


def prompts_before_words(windows, corpus, tokenizer, n: int, context: int = 48, min_context: int = 4) -> list[str]:
    """Up to ``n`` prompts: the text of up to ``context`` original tokens of a held-out document right
    before an occurrence of a word, one per window in mining order (a seeded order); occurrences with
    fewer than ``min_context`` tokens before them are skipped.

    Args:
        windows: :class:`~token_distillation.metrics.Window` list (with ``doc`` and ``doc_start``).
        corpus: the tokenized corpus they were mined from.
    """
    out = []
    for w in windows:
        if w.doc_start < min_context:
            continue
        ids = corpus.doc(w.doc)[max(0, w.doc_start - context): w.doc_start]
        out.append(tokenizer.decode([int(i) for i in ids]))
        if len(out) >= n:
            break
    return out
