"""Where do the new tokens fire? Checks that the extended tokenizer uses them as training did.

Training merges subtoken phrases in *token space* (:func:`token_distillation.alignment.merge`,
leftmost-longest). At inference the extended Hugging Face tokenizer matches added tokens in the
*raw text* (character space), also leftmost-longest, before the model's own tokenization runs.
The two agree wherever a new token's text occurs as a whole word in its trained form; they can
disagree in two ways, both checked here:

* **over-firing**: the token text occurs inside a longer word (" hepato" in " hepatoma"), or a
  token without a leading space occurs after a space (where the word is tokenized as " word").
  The tokenizer then uses the new token in contexts it was not trained for.
  :func:`find_overfiring` scans corpus texts and reports the affected words; the choice of this
  project is to *report* (a warning and ``report.json``), not to prevent it: ``single_word=True``
  would also stop leading-space tokens from firing after other words, and leaving the token out
  would lose the intended uses.
* **context mismatch**: a tokenizer that re-adds a dummy prefix ("▁") after every added token, or
  that normalizes the text around it differently, tokenizes the neighbours of a new token
  differently from the original text. :func:`context_mismatches` compares the extended
  tokenizer's output with the merged original ids on short probe texts.
"""

from __future__ import annotations

import logging
import unicodedata
from collections import Counter
from collections.abc import Iterable

import ahocorasick_rs

from .alignment import PhraseMatcher, merge
from .tokenization import NewToken

logger = logging.getLogger(__name__)


def _is_word_char(ch: str) -> bool:
    """Letters, digits and combining marks continue a word; everything else ends it."""
    return unicodedata.category(ch)[0] in "LNM"


def _word_around(text: str, start: int, end: int) -> str:
    """The whitespace-delimited word that contains ``text[start:end]`` (its own leading space kept
    out; punctuation at the edges stripped)."""
    while start < end and text[start].isspace():
        start += 1
    a = start
    while a > 0 and not text[a - 1].isspace():
        a -= 1
    b = end
    while b < len(text) and not text[b].isspace():
        b += 1
    word = text[a:b].strip()
    while word and not _is_word_char(word[0]):
        word = word[1:]
    while word and not _is_word_char(word[-1]):
        word = word[:-1]
    return word


def fires_inexactly(text: str, start: int, end: int, token: str, spaced: set[str]) -> bool:
    """True when the added-token match ``text[start:end]`` of ``token`` is not a whole-word
    occurrence in its trained form (see :func:`find_overfiring`): the id-level merge of the word's
    subtokens would not find it, but the extended tokenizer uses the new token there.

    Args:
        spaced: the surface forms of all new tokens (a token without a leading space after a space
            is a whole-word occurrence when its spaced form is a new token too).
    """
    inside = (end < len(text) and _is_word_char(token[-1]) and _is_word_char(text[end])) or (
        start > 0 and _is_word_char(token[0]) and _is_word_char(text[start - 1]))
    after_space = not token[0].isspace() and start > 0 and text[start - 1] == " " and (" " + token) not in spaced
    return inside or after_space


def find_overfiring(texts: Iterable[str], token_texts: list[str], max_words: int = 10) -> dict[str, dict[str, int]]:
    """Corpus words in which a new token fires although the word is not the token.

    Simulates the extended tokenizer's added-token matching (leftmost-longest over the raw text,
    all new tokens at once) and keeps the firings that are not whole words:

    * the character after the match continues a word (" hepato" in " hepatoma"), or
    * the token starts with a word character and the character before continues a word
      ("toxicity" in "hepatotoxicity"), or
    * the token has no leading space and is preceded by a space (the word is then tokenized as
      " word", which is another token), unless the spaced form is a new token too.

    Args:
        texts: raw documents (for a tokenized corpus: the decoded documents).
        token_texts: surface forms of the new tokens.
        max_words: how many affected words to keep per token (the most frequent).

    Returns:
        ``{token text: {affected word: count}}`` for tokens that over-fire, most frequent first.
        Cost is linear in the total text length.
    """
    if not token_texts:
        return {}
    ac = ahocorasick_rs.AhoCorasick(token_texts, matchkind=ahocorasick_rs.MatchKind.LeftmostLongest)
    spaced = set(token_texts)
    hits: dict[int, Counter] = {}
    for text in texts:
        if not text:
            continue
        for pat, s, e in ac.find_matches_as_indexes(text):
            tok = token_texts[pat]
            if fires_inexactly(text, s, e, tok, spaced):
                word = _word_around(text, s, e) or tok.strip()
                hits.setdefault(pat, Counter())[word] += 1
    return overfiring_words(hits, token_texts, max_words)


def probe_texts(text: str) -> list[str]:
    """Short texts in which a new token with surface form ``text`` should fire.

    A token with a leading space (" word") is probed after a word, before a space, a full stop and
    a comma; a token without one ("word") at the start of a text, after a newline and after
    punctuation.
    """
    if text[:1].isspace():
        return [f"Severe{text} was seen.", f"Severe{text}.", f"The{text}, then"]
    return [f"{text} was seen.", f"Results:\n{text} again", f"x ({text}) y", f"A.{text}"]


def encode_probes(tokenizer, tokens: list[NewToken]) -> list[list[list[int]]]:
    """Original ids of every probe text, per token: call *before* the tokenizer is extended."""
    out = []
    for t in tokens:
        texts = probe_texts(t.text)
        out.append(tokenizer(texts, add_special_tokens=False)["input_ids"])
    return out


def context_mismatches(tokenizer, tokens: list[NewToken], original: list[list[list[int]]]) -> dict[str, str]:
    """Probe texts on which the extended tokenizer disagrees with training's merge.

    Args:
        tokenizer: the *extended* tokenizer.
        tokens: new tokens with their ids (``token_id >= 0``).
        original: :func:`encode_probes` of the same tokens, computed before the extension.

    Returns:
        ``{token text: description}`` for every token whose probes either do not contain the new
        id or whose neighbours are tokenized differently from the merged original ids.
    """
    return {text: why for text, (why, _) in _probe_mismatches(tokenizer, tokens, original).items()}


def _probe_mismatches(tokenizer, tokens: list[NewToken], original: list[list[list[int]]]) -> dict[str, tuple[str, bool]]:
    """:func:`context_mismatches` with, per token, whether the new id is used in every probe (the
    mismatch is then only in the neighbours' segmentation)."""
    matcher = PhraseMatcher([t.subtoken_ids for t in tokens])
    new_ids = [t.token_id for t in tokens]
    problems: dict[str, tuple[str, bool]] = {}
    for t, orig_ids in zip(tokens, original):
        texts = probe_texts(t.text)
        ext = tokenizer(texts, add_special_tokens=False)["input_ids"]
        for text, o, x in zip(texts, orig_ids, ext):
            expected = merge(o, matcher, new_ids).student_ids.tolist()
            if x != expected or t.token_id not in x:
                problems[t.text] = (f"in {text!r} the extended tokenizer gives "
                                    f"{tokenizer.convert_ids_to_tokens(x)}, the id-level merge expects "
                                    f"{tokenizer.convert_ids_to_tokens(expected)}",
                                    all(t.token_id in e for e in ext))
                break
    return problems


def overfiring_words(words: dict[int, Counter], token_texts: list[str], max_words: int = 10) -> dict[str, dict[str, int]]:
    """``{token text: {affected word: count}}`` (the ``max_words`` most frequent per token) from
    per-token counters of the words a token fires inside (token index -> Counter)."""
    return {token_texts[p]: dict(c.most_common(max_words)) for p, c in sorted(words.items()) if c}


def decode_all(tokenizer, id_seqs: Iterable, batch_size: int = 1000) -> Iterable[str]:
    """Decode token-id sequences back to raw text in batches (special tokens dropped, no clean-up)."""
    batch: list = []
    for ids in id_seqs:
        batch.append([int(i) for i in ids])
        if len(batch) == batch_size:
            yield from tokenizer.batch_decode(batch, skip_special_tokens=True, clean_up_tokenization_spaces=False)
            batch = []
    if batch:
        yield from tokenizer.batch_decode(batch, skip_special_tokens=True, clean_up_tokenization_spaces=False)


def firing_report(tokenizer, tokens: list[NewToken], probes: list[list[list[int]]], id_seqs: Iterable | None,
                  max_words: int = 10, trained: bool = False, chars: bool = False,
                  overfiring: dict[str, dict[str, int]] | None = None) -> dict[str, dict]:
    """Run both checks after the tokenizer was extended, log one line per problem, return them.

    Args:
        tokenizer: the extended tokenizer.
        tokens: the new tokens, with ids.
        probes: :func:`encode_probes` computed before the extension.
        id_seqs: original-id sequences of the texts to scan for over-firing (corpus documents or
            snippets), each ``[len]``; not read when ``overfiring`` is given.
        trained: these uses are trained (``--alignment chars`` with corpus snippets): logged as
            information, not as a warning.
        chars: training reads the extended tokenizer's own segmentation (``--alignment chars``): a
            context mismatch in which the new token still fires is then trained as inference reads
            it (information); one in which it does not fire stays a warning.
        overfiring: the over-firing words already counted while the same documents were decoded
            (:func:`token_distillation.snippets.add_inexact_snippets`), matched against exactly
            ``tokens`` (give None when the match ran over more tokens: a longer one hides uses of a
            shorter one); entries of other tokens are dropped.

    Returns:
        ``{"overfiring": {token: {word: count}}, "context_mismatch": {token: description}}``.
    """
    if overfiring is None:
        over = find_overfiring(decode_all(tokenizer, id_seqs), [t.text for t in tokens], max_words)
    else:
        kept = {t.text for t in tokens}
        over = {text: dict(list(words.items())[:max_words]) for text, words in overfiring.items() if text in kept}
    for text, words in over.items():
        logger.log(logging.INFO if trained else logging.WARNING, "new token %r also fires inside other words (%s): %s",
                   text, "trained in the share the corpus has" if trained else "not trained for",
                   ", ".join(f"{w!r} x{n}" for w, n in words.items()))
    mism = _probe_mismatches(tokenizer, tokens, probes)
    for text, (why, fires) in mism.items():
        if chars and fires:
            logger.info("new token %r: %s (--alignment chars trains on the extended tokenizer's own segmentation, "
                        "so training reads this as inference does)", text, why)
        else:
            logger.warning("new token %r: %s", text, why)
    return {"overfiring": over, "context_mismatch": {text: why for text, (why, _) in mism.items()}}
