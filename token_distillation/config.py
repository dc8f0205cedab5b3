"""Run configuration: one frozen dataclass per pipeline stage, validated in ``__post_init__``.

Every command-line flag of ``apply_embedding_init.py`` is a field of exactly one of these
dataclasses; its default and its help text live here and nowhere else (the CLI signature and
``--help`` are generated from the fields). Validation never loads a model: all problems found in
the flags are collected and raised together as one :class:`ConfigError`.
"""

from __future__ import annotations

import dataclasses
import enum
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

BUNDLED_MODEL_ALIAS = "smollm2-135m"
GEMMA_MODEL_ALIAS = "gemma3-270m"
DEFAULT_WORDLIST = str(Path(__file__).resolve().parent.parent / "new_tokens" / "biomedical_demo.txt")


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


class InitMethod(str, enum.Enum):
    """How the new input-embedding rows are initialised (``--init_method``)."""

    TOKEN_DISTILLATION = "token_distillation"
    SUBTOKEN_MEAN = "subtoken-mean"
    RANDOM = "random"


class LossMethod(str, enum.Enum):
    """Distillation objectives (``--loss_method``)."""

    MSE_ON_HIDDENS = "MSE-on-hiddens"


class StoppingCondition(str, enum.Enum):
    """When the training loop stops (``--stopping_condition``).

    ``epochs``: after ``--token_distillation_epochs`` passes over the snippets.
    ``max_steps``: after ``--max_steps`` optimizer steps (epochs repeat as needed).
    """

    EPOCHS = "epochs"
    MAX_STEPS = "max_steps"


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


def _enum_value(enum_cls: type[enum.Enum], value: Any, flag: str, problems: list[str]) -> Any:
    if isinstance(value, enum_cls):
        return value
    try:
        return enum_cls(str(value))
    except ValueError:
        choices = ", ".join(m.value for m in enum_cls)
        problems.append(f"--{flag}: unknown value {value!r}; choose one of: {choices}")
        return None


@dataclass(frozen=True)
class ModelConfig:
    """Which model to extend and where it runs."""

    model_path: str = _flag(
        BUNDLED_MODEL_ALIAS,
        "Hugging Face hub id, local checkpoint directory, .gguf file, or a bundled alias "
        f"({BUNDLED_MODEL_ALIAS!r}: SmolLM2-135M-Instruct from the `demo` extra; "
        f"{GEMMA_MODEL_ALIAS!r}: Gemma-3-270M from the `gemma` extra).",
    )
    device: str = _flag("auto", "Torch device: auto (cuda if available, else cpu), cpu, cuda, cuda:1, mps.")
    mixed_precision: MixedPrecision = _flag(
        MixedPrecision.AUTO, "Autocast dtype: auto (bf16 on CUDA, fp32 on CPU), bf16, fp16, no."
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
        dev = str(self.device)
        if dev != "auto" and dev.split(":")[0] not in {"cpu", "cuda", "mps", "xpu"}:
            problems.append(f"--device: unknown device {dev!r}; use auto, cpu, cuda, cuda:N or mps")

    @property
    def resolved_cache_dir(self) -> Path:
        """The cache root: ``--cache_dir``, else ``$TOKEN_DISTILLATION_CACHE``, else ~/.cache."""
        if self.cache_dir:
            return Path(self.cache_dir).expanduser()
        env = os.environ.get("TOKEN_DISTILLATION_CACHE")
        if env:
            return Path(env).expanduser()
        return Path.home() / ".cache" / "token_distillation"


@dataclass(frozen=True)
class TargetConfig:
    """How the new-token list is built."""

    build_target_method: BuildTargetMethod = _flag(
        BuildTargetMethod.WORDLIST,
        "How to build the new-token list: wordlist (a text file, one token per line, or a JSON "
        "object of categories -> lists of words).",
    )
    new_tokens_source: str = _flag(
        DEFAULT_WORDLIST,
        "File with the new tokens (for wordlist). Default: the short biomedical demo list in new_tokens/.",
    )
    add_leading_space: bool = _flag(
        False,
        "Prefix every word-list entry that lacks one with a space (\" word\"). Off by default: a "
        "leading space in the file is kept and meaningful (\" word\" and \"word\" are different tokens).",
    )

    def validate(self, problems: list[str]) -> None:
        object.__setattr__(
            self,
            "build_target_method",
            _enum_value(BuildTargetMethod, self.build_target_method, "build_target_method", problems),
        )
        if self.build_target_method == BuildTargetMethod.WORDLIST:
            p = Path(str(self.new_tokens_source)).expanduser()
            if not str(self.new_tokens_source):
                problems.append("--new_tokens_source is required with --build_target_method wordlist")
            elif not p.is_file():
                problems.append(f"--new_tokens_source: file not found: {p}; pass a text file with one "
                                "token per line or a JSON object of categories -> word lists")


@dataclass(frozen=True)
class CorpusConfig:
    """Where snippets come from."""

    dataset_path: str = _flag(
        "",
        "Corpus: a local file or directory (jsonl, json, txt, csv, parquet) or a Hugging Face hub "
        "dataset id. Empty: use generated snippets.",
    )
    dataset_name: str = _flag("", "Dataset configuration name (hub datasets with several configs).")
    dataset_split: str = _flag("train", "Dataset split to read.")
    text_column: str = _flag("text", "Column that holds the document text.")
    max_docs: int = _flag(0, "Read at most this many documents (0: all).")
    num_proc: int = _flag(1, "Processes for corpus tokenization (datasets.map num_proc).")
    heldout_fraction: float = _flag(
        0.1,
        "Share of documents held out from training snippets (used for the held-out distillation "
        "loss in the report; the report lists the training documents).",
    )

    def validate(self, problems: list[str]) -> None:
        if self.max_docs < 0:
            problems.append("--max_docs must be >= 0 (0 means all documents)")
        if self.num_proc < 1:
            problems.append("--num_proc must be >= 1")
        if not 0.0 <= self.heldout_fraction < 1.0:
            problems.append("--heldout_fraction must be in [0, 1)")
        path = str(self.dataset_path)
        if path and _looks_local(path) and not Path(path).expanduser().exists():
            problems.append(f"--dataset_path: file or directory not found: {path}")


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
        "Skip new tokens with fewer training snippets than this (listed in the report with counts).",
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

    def validate(self, problems: list[str]) -> None:
        if self.snippet_len < 2:
            problems.append("--snippet_len must be >= 2 tokens")
        if self.snippet_num < 1:
            problems.append("--snippet_num must be >= 1")
        if self.min_snippets < 1:
            problems.append("--min_snippets must be >= 1")
        if self.heldout_snippet_num < 0:
            problems.append("--heldout_snippet_num must be >= 0")
        if self.generation_temperature <= 0:
            problems.append("--generation_temperature must be > 0")
        if not 0 < self.generation_top_p <= 1:
            problems.append("--generation_top_p must be in (0, 1]")


@dataclass(frozen=True)
class TrainConfig:
    """The initialisation method and its training loop."""

    init_method: InitMethod = _flag(
        InitMethod.TOKEN_DISTILLATION,
        "token_distillation (default), subtoken-mean (FVT, no training) or random.",
    )
    loss_method: LossMethod = _flag(
        LossMethod.MSE_ON_HIDDENS,
        "Distillation loss: MSE-on-hiddens (MSE between student and teacher hidden states at "
        "--target_layer over aligned positions).",
    )
    target_layer: int = _flag(
        -1, "Layer whose hidden states are matched: 1..num_layers, or negative from the end (-1: last)."
    )
    token_distillation_lr: float = _flag(1e-4, "AdamW learning rate (no weight decay).")
    token_distillation_epochs: int = _flag(1, "Passes over the training snippets.")
    token_distillation_batch_size: int = _flag(16, "Snippets per optimizer step.")
    stopping_condition: StoppingCondition = _flag(
        StoppingCondition.EPOCHS, "epochs (stop after --token_distillation_epochs) or max_steps."
    )
    max_steps: int = _flag(0, "Optimizer steps when --stopping_condition max_steps.")
    log_every: int = _flag(10, "Log the running loss every N optimizer steps.")
    seed: int = _flag(42, "Seed for snippet sampling, generation, shuffling and random init.")

    def validate(self, problems: list[str]) -> None:
        object.__setattr__(self, "init_method", _enum_value(InitMethod, self.init_method, "init_method", problems))
        object.__setattr__(self, "loss_method", _enum_value(LossMethod, self.loss_method, "loss_method", problems))
        object.__setattr__(
            self,
            "stopping_condition",
            _enum_value(StoppingCondition, self.stopping_condition, "stopping_condition", problems),
        )
        if self.target_layer == 0:
            problems.append("--target_layer 0 is the embedding output (nothing to distil); use 1..N or -1..-N")
        if not self.token_distillation_lr > 0:
            problems.append("--token_distillation_lr must be > 0")
        if self.token_distillation_epochs < 1:
            problems.append("--token_distillation_epochs must be >= 1")
        if self.token_distillation_batch_size < 1:
            problems.append("--token_distillation_batch_size must be >= 1")
        if self.stopping_condition == StoppingCondition.MAX_STEPS and self.max_steps < 1:
            problems.append("--stopping_condition max_steps needs --max_steps >= 1")
        if self.log_every < 1:
            problems.append("--log_every must be >= 1")


@dataclass(frozen=True)
class OutputConfig:
    """Where and how results are written."""

    out_path: str = _flag("outputs/token_distillation_demo", "Output directory for the extended model, "
                          "tokenizer and report.json. Must be empty or absent unless --overwrite.")
    overwrite: bool = _flag(False, "Replace a non-empty --out_path (the old content is replaced atomically).")
    set_output_to_zero_if_untied: bool = _flag(
        True,
        "For models with untied output embeddings: set the new tokens' output rows to zero (True) "
        "or to the mean of their subtokens' output rows (False). Ignored for tied models.",
    )
    checkpoint_every: int = _flag(
        0,
        "Save a training checkpoint (new rows, optimizer, step, RNG state) every N optimizer steps "
        "into <out_path>/checkpoints/ (0: never). A finished run replaces <out_path> and leaves none.",
    )
    resume: bool = _flag(
        False,
        "Continue an interrupted run from the newest checkpoint in <out_path>/checkpoints/ (same "
        "flags; starts from step 0 when there is none). Without it, old checkpoints are discarded.",
    )

    def validate(self, problems: list[str]) -> None:
        if not str(self.out_path).strip():
            problems.append("--out_path is empty; pass an output directory")
        if self.checkpoint_every < 0:
            problems.append("--checkpoint_every must be >= 0 (0 turns checkpoints off)")


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
        if problems:
            raise ConfigError(problems)

    @property
    def generated_snippets(self) -> bool:
        """True when snippets are generated by the model rather than mined from a corpus."""
        return self.snippets.use_generated_snippets or not self.corpus.dataset_path

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
                problems.append(f"unknown flag --{name}; see --help for the list of flags")
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
                out[f.name] = v.value if isinstance(v, enum.Enum) else v
        return out


def _coerce(f: dataclasses.Field, value: Any, problems: list[str]) -> Any:
    """Convert a value from Fire (which guesses types) to the field's type."""
    default = f.default if f.default is not dataclasses.MISSING else None
    if isinstance(default, bool):
        if isinstance(value, bool):
            return value
        if str(value).lower() in {"true", "1", "yes"}:
            return True
        if str(value).lower() in {"false", "0", "no"}:
            return False
        problems.append(f"--{f.name}: expected true/false, got {value!r}")
        return default
    if isinstance(default, enum.Enum):
        return value
    if isinstance(default, int):
        try:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(value)
        except (TypeError, ValueError):
            problems.append(f"--{f.name}: expected an integer, got {value!r}")
            return default
    if isinstance(default, float):
        try:
            return float(value)
        except (TypeError, ValueError):
            problems.append(f"--{f.name}: expected a number, got {value!r}")
            return default
    if isinstance(default, str):
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
