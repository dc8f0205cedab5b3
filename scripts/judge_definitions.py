#!/usr/bin/env python
"""Definitions of the new words, judged by a model (the paper's second kind of table; Dobler et
al., arXiv 2505.20133).

1. Every model writes a definition of every new word (the union of the extended models' words;
   ``--max_words`` keeps the first N): the original model from the word's original subtokens, each
   extended model from its new token, with the same prompt
   ``Question: What does the word <w> mean?\\nAnswer: The word <w> means`` (the prompt of the
   ``definition`` metrics of ``token_distillation.evaluate``), greedy unless ``--temperature`` > 0
   (seeded), at most ``--definition_tokens`` new tokens, cut at the first line break.
2. A judge model (``--judge_model``: any causal LM the tool loads, hub id, directory, .gguf file or
   bundled alias, through transformers; through vLLM when it is installed and the judge runs on
   CUDA, or with ``--judge_backend vllm``) answers two yes/no questions per definition of an
   extended model, :data:`SIMILAR_PROMPT` (does it convey a similar meaning to the original
   model's definition of the word under its original tokenization?) and :data:`CORRECT_PROMPT`
   (is it correct, specific and on topic?); the original model's definitions get the second
   question only. The question goes through the judge's chat template when it has one, else it is
   followed by ``\\nAnswer:``; the judge answers greedily in at most ``--judge_tokens`` tokens.
3. Parsing: the first word of the answer (letters only, case-insensitive) ``yes`` or ``no``;
   anything else is *undecided*, counted and reported, never guessed. A score is the share of
   ``yes`` among all judged definitions of a model (undecided answers count as not ``yes``).

Writes into ``--out_dir`` (new, empty or an earlier output of this script): ``judgements.md`` (the
table: % similar and % correct per model, with undecided counts and each extended model's method and
settings from its report.json), ``judgements.json`` (the table, the judge, the backend, every
generation setting and both prompt templates, so that the table can be reproduced, and the per-word
records) and ``records.jsonl`` (one line per word: every model's definition, the judge's raw answers
and verdicts). Bad flags end with one ``error:`` line and exit code 2 before any model is loaded.
The judge's verdicts are only as good as the judge: those of a 135M model (the offline example) are
not meaningful.
"""

from __future__ import annotations

import gc
import json
import logging
import re
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from token_distillation.cli import configure_logging  # noqa: E402
from token_distillation.config import ConfigError  # noqa: E402
from token_distillation.generation import generate_ids, pad_and_eos  # noqa: E402
from token_distillation.paper_tables import (  # noqa: E402
    Entry, load_entry, markdown_table, read_entries, resolve_dtype, settings_text, write_json, write_text)
from token_distillation.paths import claim_script_dir  # noqa: E402

logger = logging.getLogger("judge_definitions")

#: what this script writes at the top level of --out_dir
OUT_ENTRIES = ("judgements.json", "judgements.md", "records.jsonl")
#: question 1, for each extended model's definition (reference: the original model's definition)
SIMILAR_PROMPT = ('Two language models were asked what the word "{word}" means.\n'
                  'Reference definition: "{word}" means {reference}\n'
                  'Candidate definition: "{word}" means {candidate}\n'
                  'Does the candidate definition convey a similar meaning to the reference definition? '
                  'Answer with one word: yes or no.')
#: question 2, for every model's definition
CORRECT_PROMPT = ('A language model was asked what the word "{word}" means. Its definition:\n'
                  '"{word}" means {definition}\n'
                  'Is this definition correct, specific and on topic for the word "{word}"? '
                  'Answer with one word: yes or no.')
QUESTIONS = ("similar", "correct")
BACKENDS = ("auto", "transformers", "vllm")


def parse_verdict(answer: str) -> str:
    """``"yes"``, ``"no"`` or ``"undecided"`` from the first word (letters only, any case) of ``answer``."""
    m = re.match(r"[^A-Za-z]*([A-Za-z]+)", answer or "")
    word = m.group(1).lower() if m else ""
    return word if word in ("yes", "no") else "undecided"


def check_inputs(*, model_path, extended_paths, labels, judge_model, judge_backend, max_words, definition_tokens,
                 judge_tokens, batch_size, temperature, dtype, device, out_dir) -> tuple[list[Entry], object, str]:
    """Check every flag without loading a model.

    Returns:
        ``(entries (the original model first), the judge's model source, the backend)``.

    Raises:
        ConfigError: the first problem found, naming its flag.
    """
    from token_distillation.paths import resolve_model_source

    for flag, value, low in (("max_words", max_words, 0), ("definition_tokens", definition_tokens, 1),
                             ("judge_tokens", judge_tokens, 1), ("batch_size", batch_size, 1)):
        if value < low:
            raise ConfigError(f"--{flag} must be >= {low}, not {value}")
    if temperature < 0:
        raise ConfigError(f"--temperature must be >= 0 (0: greedy), not {temperature}")
    if not str(out_dir).strip():
        raise ConfigError("--out_dir is empty; pass an output directory")
    if judge_backend not in BACKENDS:
        raise ConfigError(f"--judge_backend: unknown value {judge_backend!r}; choose one of: {', '.join(BACKENDS)}")
    resolve_dtype(dtype)
    if not str(judge_model).strip():
        raise ConfigError("--judge_model is required: an instruction-tuned causal LM (hub id, directory, .gguf file "
                          "or bundled alias), e.g. meta-llama/Llama-3.1-70B-Instruct, or smollm2-135m offline (its "
                          "verdicts are not meaningful)")
    entries = read_entries(model_path, extended_paths, labels, with_original=True)
    judge = resolve_model_source(str(judge_model))
    return entries, judge, _backend(judge_backend, judge, device)


def _backend(choice: str, judge, device: str) -> str:
    """The judge's backend: vLLM when asked, or with ``auto`` when installed and on CUDA (not for .gguf).

    Raises:
        ConfigError: ``vllm`` asked but not installed, or for a .gguf judge.
    """
    import importlib.util

    has_vllm = importlib.util.find_spec("vllm") is not None
    if choice == "vllm" and (not has_vllm or judge.gguf_file):
        why = "vLLM is not installed" if not has_vllm else "a .gguf judge is read through transformers only"
        raise ConfigError(f"--judge_backend vllm: {why}; install vllm or pass --judge_backend transformers")
    if choice == "auto":
        import torch

        cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
        return "vllm" if has_vllm and cuda and not judge.gguf_file else "transformers"
    return choice


def write_definitions(model, tokenizer, words: list, word_ids: list[list[int]], gen: dict) -> list[str]:
    """One definition per word from ``word_ids`` (the word's subtokens or its new token) in the
    definition prompt; decoded without special tokens, cut at the first line break, stripped."""
    from token_distillation.metrics import definition_prompt

    prompts = [definition_prompt(tokenizer, w.text, ids) for w, ids in zip(words, word_ids)]
    pad, eos = pad_and_eos(tokenizer)
    outs = generate_ids(model, prompts, max_new=gen["definition_tokens"], pad_id=pad, eos_id=eos,
                    batch_size=gen["batch_size"], device=gen["device"], temperature=gen["temperature"])
    return [tokenizer.decode(o, skip_special_tokens=True).split("\n", 1)[0].strip() for o in outs]


def all_definitions(entries: list[Entry], model_path: str, max_words: int, gen: dict, cache_root: Path):
    """Every model's definitions of the words.

    Returns:
        ``(words, {label: {word text: definition}})``: the evaluated words (the extended models'
        union, the first ``max_words`` when > 0) and each model's definitions (an extended model
        that lacks a word has none for it).
    """
    from token_distillation.evaluate import evaluated_words

    defs: dict[str, dict[str, str]] = {}
    words: list = []
    for e in entries:
        model, tok = load_entry(e, model_path, gen["device"], gen["dtype"], cache_root)
        if e.extended is None:
            words = evaluated_words(model_path, [x.extended for x in entries if x.extended], tok)[0]
            words = words[:max_words] if max_words else words
            ids = {w.text: list(w.subtoken_ids) for w in words}
        else:
            wanted = {w.text for w in words}
            ids = {t.text: [t.token_id] for t in e.extended.tokens if t.text in wanted}
        mine = [w for w in words if w.text in ids]
        defs[e.label] = dict(zip([w.text for w in mine], write_definitions(model, tok, mine, [ids[w.text] for w in mine],
                                                                             gen)))
        logger.info("%s: %d definitions", e.label, len(mine))
        del model
        gc.collect()
    return words, defs


def judge_questions(words: list, defs: dict, entries: list[Entry]) -> list[tuple[str, str, str, str]]:
    """The judge's questions as ``(word, label, question kind, prompt text)``."""
    ref = defs[entries[0].label]
    qs = []
    for w in words:
        shown = w.text.strip()
        for e in entries:
            d = defs[e.label].get(w.text)
            if d is None:
                continue
            if e.extended is not None:
                qs.append((w.text, e.label, "similar",
                           SIMILAR_PROMPT.format(word=shown, reference=ref[w.text], candidate=d)))
            qs.append((w.text, e.label, "correct", CORRECT_PROMPT.format(word=shown, definition=d)))
    return qs


def judge_prompt_ids(tokenizer, text: str) -> list[int]:
    """Token ids of one question: through the judge's chat template (a user turn, then the
    assistant's turn opened) when it has one, else BOS + ``text + "\\nAnswer:"``."""
    from token_distillation.tokenization import bos_prefix

    if getattr(tokenizer, "chat_template", None):
        rendered = tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                                 add_generation_prompt=True)
        return tokenizer(rendered, add_special_tokens=False).input_ids
    return bos_prefix(tokenizer) + tokenizer(text + "\nAnswer:", add_special_tokens=False).input_ids


def ask_judge(judge, backend: str, texts: list[str], gen: dict, cache_root: Path) -> tuple[list[str], bool]:
    """The judge's raw answers to ``texts`` (greedy), and whether its chat template was used."""
    from token_distillation.models import load_tokenizer

    tok = load_tokenizer(judge, cache_root)
    prompts = [judge_prompt_ids(tok, t) for t in texts]
    chat = bool(getattr(tok, "chat_template", None))
    if backend == "vllm":
        return _vllm_answers(judge, prompts, gen), chat
    model = _load_judge(judge, gen, cache_root)
    pad, eos = pad_and_eos(tok)
    outs = generate_ids(model, prompts, max_new=gen["judge_tokens"], pad_id=pad, eos_id=eos, batch_size=gen["batch_size"],
                    device=gen["device"])
    return [tok.decode(o, skip_special_tokens=True).strip() for o in outs], chat


def _load_judge(judge, gen: dict, cache_root: Path):
    """The judge through transformers: spread over every GPU (``device_map="auto"``) when several
    are visible and the judge is not a .gguf file, else as the tool loads models."""
    import torch

    from token_distillation.models import load_model

    if gen["device"].type == "cuda" and torch.cuda.device_count() > 1 and not judge.gguf_file:
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(judge.path, dtype=gen["dtype"], device_map="auto").eval()
    return load_model(judge, cache_root, gen["device"], gen["dtype"])


def _vllm_answers(judge, prompts: list[list[int]], gen: dict) -> list[str]:
    """The judge's greedy answers through vLLM (tensor-parallel over the visible GPUs)."""
    import torch
    from vllm import LLM, SamplingParams

    llm = LLM(model=judge.path, tensor_parallel_size=max(1, torch.cuda.device_count()), seed=gen["seed"],
              dtype=str(gen["dtype"]).replace("torch.", ""))
    params = SamplingParams(temperature=0.0, max_tokens=gen["judge_tokens"], seed=gen["seed"])
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params)
    return [o.outputs[0].text.strip() for o in outs]


def score(entries: list[Entry], records: dict[str, dict]) -> list[dict]:
    """Per model: definitions judged, % yes and undecided count per question (None where not asked)."""
    table = []
    for e in entries:
        row = {"label": e.label, "method": e.method, "settings": e.settings, "definitions": 0}
        for q in QUESTIONS:
            verdicts = [r["judge"][e.label][q]["verdict"] for r in records.values()
                        if q in r["judge"].get(e.label, {})]
            row[f"{q}_pct"] = 100.0 * verdicts.count("yes") / len(verdicts) if verdicts else None
            row[f"{q}_undecided"] = verdicts.count("undecided") if verdicts else None
            row["definitions"] = max(row["definitions"], len(verdicts))
        table.append(row)
    return table


def build_records(words: list, defs: dict, questions: list, answers: list[str]) -> dict[str, dict]:
    """Per word: every model's definition and the judge's raw answer and verdict per question."""
    records = {w.text: {"word": w.text, "definitions": {lab: d[w.text] for lab, d in defs.items() if w.text in d},
                        "judge": {}} for w in words}
    for (word, label, kind, _), ans in zip(questions, answers):
        records[word]["judge"].setdefault(label, {})[kind] = {"answer": ans, "verdict": parse_verdict(ans)}
    return records


def render(entries: list[Entry], table: list[dict], setup: dict) -> str:
    """``judgements.md``: the table and how it was made."""
    by = {r["label"]: r for r in table}
    rows = [[e.label, e.method, settings_text(e), by[e.label]["definitions"], by[e.label]["similar_pct"],
             by[e.label]["similar_undecided"], by[e.label]["correct_pct"], by[e.label]["correct_undecided"]]
            for e in entries]
    t = markdown_table(["model", "method", "settings", "definitions", "% similar", "undecided (similar)",
                        "% correct", "undecided (correct)"], rows)
    return (f"# Definitions judged by a model\n\nWritten by `scripts/judge_definitions.py` on {setup['created']}. "
            f"Original model `{setup['model_path']}`; judge `{setup['judge_model']}` ({setup['judge_backend']}, chat "
            f"template {'used' if setup['judge_chat_template'] else 'absent'}); {setup['words']} words; definitions "
            f"of at most {setup['definition_tokens']} tokens, "
            f"{'greedy' if not setup['temperature'] else 'temperature ' + str(setup['temperature'])}, seed "
            f"{setup['seed']}. % = share of `yes` among the judged definitions (undecided answers count as not yes); "
            f"the original model's definition is the reference of '% similar'. Prompts: judgements.json. The "
            f"verdicts are only as good as the judge.\n\n{t}")


def main(model_path: str = "smollm2-135m", extended_paths: str = "", labels: str = "", judge_model: str = "",
         judge_backend: str = "auto", max_words: int = 0, definition_tokens: int = 32, judge_tokens: int = 4,
         temperature: float = 0.0, batch_size: int = 8, device: str = "auto", dtype: str = "float32",
         seed: int = 42, cache_dir: str = "", out_dir: str = "outputs/judge_definitions") -> str:
    """Generate definitions with every model, judge them, write the table; returns judgements.md's path.

    Args:
        model_path: the original model (hub id, directory, .gguf file or bundled alias).
        extended_paths: comma-separated output directories of apply_embedding_init.py.
        labels: comma-separated row names, one per extended directory (default: each run's init_method).
        judge_model: the judge (an instruction-tuned causal LM; any source the tool loads).
        judge_backend: auto (vLLM when installed and on CUDA), transformers or vllm.
        max_words: judge only the first N words (0: all).
        definition_tokens: most new tokens of a definition.
        judge_tokens: most new tokens of a judge's answer (only its first word counts).
        temperature: 0: greedy definitions; > 0: sampled (seeded by --seed). The judge is always greedy.
        batch_size: prompts per generation batch (transformers).
        dtype: weights dtype of every model (float32, bfloat16, float16).
        out_dir: new, empty, or an earlier output of this script.

    Raises:
        ConfigError: bad flags (before any model is loaded).
    """
    entries, judge, backend = check_inputs(
        model_path=model_path, extended_paths=extended_paths, labels=labels, judge_model=judge_model,
        judge_backend=judge_backend, max_words=max_words, definition_tokens=definition_tokens, judge_tokens=judge_tokens,
        batch_size=batch_size, temperature=temperature, dtype=dtype, device=device, out_dir=out_dir)
    out = claim_script_dir(out_dir, "judge_definitions.py", OUT_ENTRIES)
    import torch

    from token_distillation.models import default_cache_root
    from token_distillation.pipeline import resolve_device

    t0 = time.perf_counter()
    torch.manual_seed(seed)
    cache_root = Path(cache_dir).expanduser() if cache_dir else default_cache_root()
    gen = {"device": resolve_device(device), "dtype": resolve_dtype(dtype), "definition_tokens": definition_tokens,
           "judge_tokens": judge_tokens, "temperature": temperature, "batch_size": batch_size, "seed": seed}
    words, defs = all_definitions(entries, model_path, max_words, gen, cache_root)
    questions = judge_questions(words, defs, entries)
    answers, chat = ask_judge(judge, backend, [q[3] for q in questions], gen, cache_root)
    records = build_records(words, defs, questions, answers)
    table = score(entries, records)
    setup = dict({k: v for k, v in gen.items() if k not in ("device", "dtype")}, model_path=model_path,
                 judge_model=judge_model, judge_identity=judge.identity, judge_backend=backend, judge_chat_template=chat,
                 device=str(gen["device"]), dtype=dtype, words=len(words), max_words=max_words,
                 prompts={"definition": "Question: What does the word <w> mean?\nAnswer: The word <w> means",
                          "similar": SIMILAR_PROMPT, "correct": CORRECT_PROMPT,
                          "judge_without_chat_template": "<BOS> + question + '\\nAnswer:'"},
                 parsing="first word of the answer, letters only, case-insensitive: yes / no, else undecided",
                 created=time.strftime("%Y-%m-%d %H:%M %Z"), command=" ".join(sys.argv),
                 seconds=time.perf_counter() - t0)
    write_text(out / "records.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records.values()))
    write_json(out / "judgements.json", {"setup": setup, "table": table, "records": list(records.values())})
    write_text(out / "judgements.md", render(entries, table, setup))
    logger.info("wrote %s", out / "judgements.md")
    return str(out / "judgements.md")


if __name__ == "__main__":
    import inspect

    from token_distillation.cli import exit_on_user_error, run_fire

    configure_logging()
    run_fire(exit_on_user_error(main), set(inspect.signature(main).parameters), None, "judge_definitions.py")
