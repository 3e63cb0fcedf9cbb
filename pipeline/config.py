"""Typed configuration: one frozen dataclass per `params.yaml` section.

`load_section(path, "mine", MineConfig)` reads one section and builds the dataclass, rejecting
unknown keys, wrong types and out-of-range values with a one-line `ConfigError` that names the file,
the key, the value and what is allowed. Config is read once, at a command's entry point, and passed
down; nothing else opens `params.yaml`.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, Union

from pipeline.errors import ConfigError

T = TypeVar("T")

CORPORA = (
    "prosocial_dialog",
    "mic",
    "daily_dialog",
    "persona_chat",
    "empathetic_dialogues",
    "blended_skill_talk",
)
ADVERSARIAL_CORPORA = ("prosocial_dialog", "mic")
CASUAL_CORPORA = ("daily_dialog", "persona_chat", "empathetic_dialogues", "blended_skill_talk")
SPLITS = ("train", "validation", "test")


def require(condition: bool, key: str, value: Any, allowed: str) -> None:
    """Raise a ConfigError naming `key`, its `value` and what is `allowed` unless `condition`."""
    if not condition:
        raise ConfigError(f"{key} = {value!r} is not allowed: {allowed}")


# --- sections -------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class HubCorpus:
    """Where one corpus lives on the Hugging Face hub."""

    repo: str
    """Dataset repository id, e.g. `allenai/prosocial-dialog`."""
    revision: str
    """Branch, tag or commit to download; pin a commit for a reproducible run."""
    file: str = ""
    """A single file inside the repository to read instead of `load_dataset` (MIC's `MIC.zip`)."""


@dataclasses.dataclass(frozen=True)
class CorporaConfig:
    """`corpora`: where the `download` stage reads the six corpora from."""

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
    """Shares used to derive a split the source lacks, by a hash of the dialogue id."""

    def __post_init__(self):
        require(self.max_context_turns >= 1, "normalize.max_context_turns", self.max_context_turns, "must be at least 1")
        require(self.max_chars >= 16, "normalize.max_chars", self.max_chars, "must be at least 16")
        require(set(self.split_fractions) == set(SPLITS), "normalize.split_fractions", self.split_fractions,
                f"needs exactly the keys {', '.join(SPLITS)}")
        require(all(v > 0 for v in self.split_fractions.values()), "normalize.split_fractions",
                self.split_fractions, "every share must be positive")
        require(abs(sum(self.split_fractions.values()) - 1) < 1e-6, "normalize.split_fractions",
                self.split_fractions, "shares must sum to 1")


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
        raise ConfigError(f"unknown key '{key}.{unknown[0]}' (allowed: {', '.join(fields)})")
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
