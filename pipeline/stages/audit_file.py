"""audit_file: one model's replies, generated elsewhere, read into the table the audit scores.

Reads the file of an `audit.files` entry (`config.AuditFile`: JSON, JSON lines or Parquet) and the
normalized DiaSafety splits (`data/normalized/diasafety/<split>.parquet`, for each context's category);
writes `data/audit/<name>/replies.parquet` (schema `schemas.AUDIT_REPLIES`: one row per reply) and
`stats.json` (what was read: entries, contexts, replies, empty replies, human labels, how many contexts
found a DiaSafety category and in which split, the file's SHA-256).

    python -m pipeline audit_file --name toxichat_dialogpt --normalized data/normalized --audit data/audit

Under `dvc repro` the entry's name comes from the stage's name, `audit_file@<name>` (DVC_STAGE), and its
path from params.yaml, so that no parameter value reaches a shell.

An entry is DiaSafety's generations form `{"context": ..., "gen_response": [reply, ...]}` or the plain
`{"context": ..., "response": reply}`. `context` is one utterance or a list of turns, oldest first.
Optional keys: `label` (beside `response`) or `labels` (one per reply of `gen_response`), the human
label of a reply, safe or unsafe in any case (DiaSafety writes Safe/Unsafe); `category`, a DiaSafety
category. Nothing else is accepted, so a misspelt key is an error rather than a silently missing label.
With `responder`, `path` is a normalized corpus split instead, and its rows by that responder are the
entries (ToxiChat's DialoGPT and GPT-3 replies, with `reply_label` as their human label).

Every problem is a one-line DataError naming the file and the entry: a missing or unknown key, a
context that is not a string or a list of strings, an empty context or turn, an empty reply list, a
reply that is not a string, a label other than safe/unsafe, text that is not UTF-8; an empty file (or
one with no entries) is refused. A reply may be an empty string (a model can answer with nothing; they
are counted).

Contexts and replies are kept with runs of whitespace as one space, as normalize cleans them. A context
is identified (`context_id`) by a hash of those turns, so the same context has the same id in every
file and the audit can cluster replies by context and pair models on it. Its category is the entry's
own, else the one DiaSafety gives that context (matched on the same turns; about 200 contexts of
DiaSafety's released generations are in no released split and get none), and `diasafety_split` says
which normalized DiaSafety split holds it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections import Counter
from pathlib import Path
from typing import Any, NamedTuple

import pyarrow as pa

from pipeline.artifacts import ensure_writable, sha256, staged_dir, write_json, write_parquet
from pipeline.config import AUDIT_FILE_FORMATS, SPLITS, AuditFile
from pipeline.errors import DataError
from pipeline.labels import DIASAFETY_CATEGORIES, REPLY_LABELS
from pipeline.schemas import AUDIT_REPLIES, read_table

log = logging.getLogger(__name__)

ENTRY_KEYS = ("context", "response", "gen_response", "label", "labels", "category")
RESPONDER_COLUMNS = ("context", "response", "reply_label", "reply_category", "responder")


class Entry(NamedTuple):
    """One entry of a file, checked: its turns, its replies, a human label per reply (None: none)."""

    index: int
    context: list[str]
    replies: list[str]
    labels: list[str | None]
    category: str | None


# --- reading a file ---------------------------------------------------------------------------------


def spaced(text: str) -> str:
    """A text with its runs of whitespace as one space (normalize's cleaning, for matching contexts)."""
    return " ".join(text.split())


def context_id(turns: list[str]) -> str:
    """A short, stable id of a context's (spaced) turns."""
    return hashlib.sha1("\x1f".join(turns).encode("utf-8")).hexdigest()[:16]


def _kind(value: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(value), "a number")


def _text(value: Any, where: str, what: str) -> str:
    """`value` as a string; a DataError naming `where` and `what` when it is not one, or not UTF-8 (the
    file was decoded with surrogateescape, so a byte that is not UTF-8 is a lone surrogate here)."""
    if not isinstance(value, str):
        raise DataError(f"{where}: {what} must be a string, found {_kind(value)}")
    bad = next((c for c in value if "\udc80" <= c <= "\udcff"), None)
    if bad is not None:
        raise DataError(f"{where}: {what} is not valid UTF-8 (byte 0x{ord(bad) - 0xdc00:02x})")
    return value


def _label(value: Any, where: str, what: str) -> str | None:
    if value is None:
        return None
    label = _text(value, where, what).lower()
    if label not in REPLY_LABELS:
        raise DataError(f"{where}: {what} = {value!r:.40} is not one of {', '.join(REPLY_LABELS)}")
    return label


def parse_entry(entry: Any, index: int, where: str) -> Entry:
    """Check one entry of a file (see the module docstring) and return it; `where` names it in errors.

    A key whose value is null counts as absent (a Parquet file has every column in every row)."""
    if not isinstance(entry, dict):
        raise DataError(f"{where}: expected an object with `context` and `response` or `gen_response`, "
                        f"found {_kind(entry)}")
    unknown = sorted(set(entry) - set(ENTRY_KEYS))
    if unknown:
        raise DataError(f"{where}: unknown key {unknown[0]!r:.40} (allowed: {', '.join(ENTRY_KEYS)})")
    present = {key for key, value in entry.items() if value is not None}
    if "context" not in entry:
        raise DataError(f"{where}: missing key 'context'")
    raw_context = entry["context"]
    if isinstance(raw_context, str):
        turns = [_text(raw_context, where, "context")]
    elif isinstance(raw_context, list):
        turns = [_text(turn, where, f"context[{i}]") for i, turn in enumerate(raw_context)]
    else:
        raise DataError(f"{where}: context must be a string or a list of strings, found {_kind(raw_context)}")
    context = [spaced(turn) for turn in turns]
    if not context:
        raise DataError(f"{where}: context is an empty list")
    blank = next((i for i, turn in enumerate(context) if not turn), None)
    if blank is not None:
        raise DataError(f"{where}: context is empty" if isinstance(raw_context, str)
                        else f"{where}: context[{blank}] is empty")
    if ("response" in present) == ("gen_response" in present):
        problem = "has both" if "response" in present else "needs one of"
        raise DataError(f"{where}: {problem} 'response' (a reply) and 'gen_response' (a list of replies)")
    if "response" in present:
        if "labels" in present:
            raise DataError(f"{where}: 'labels' goes with 'gen_response'; beside 'response' give 'label'")
        replies = [spaced(_text(entry["response"], where, "response"))]
        labels = [_label(entry.get("label"), where, "label")]
    else:
        if "label" in present:
            raise DataError(f"{where}: 'label' goes with 'response'; beside 'gen_response' give 'labels' "
                            "(one per reply)")
        generated = entry["gen_response"]
        if not isinstance(generated, list):
            raise DataError(f"{where}: gen_response must be a list of strings, found {_kind(generated)}")
        if not generated:
            raise DataError(f"{where}: gen_response is an empty list (no replies)")
        replies = [spaced(_text(reply, where, f"gen_response[{i}]")) for i, reply in enumerate(generated)]
        given = entry.get("labels")
        if given is None:
            labels = [None] * len(replies)
        elif not isinstance(given, list) or len(given) != len(replies):
            raise DataError(f"{where}: labels must be a list of {len(replies)} labels, one per reply in gen_response")
        else:
            labels = [_label(label, where, f"labels[{i}]") for i, label in enumerate(given)]
    category = entry.get("category")
    if category is not None and category not in DIASAFETY_CATEGORIES:
        raise DataError(f"{where}: category {category!r:.40} is not one of {', '.join(DIASAFETY_CATEGORIES)}")
    return Entry(index, context, replies, labels, category)


def read_text(path: Path) -> str:
    """A JSON or JSON-lines file's text; bytes that are not UTF-8 are kept as lone surrogates, so the
    entry holding one is named when it is checked (`_text`). An empty file is a DataError."""
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    text = path.read_bytes().decode("utf-8", "surrogateescape")
    if not text.strip():
        raise DataError(f"{path}: empty file (no entries)")
    return text.removeprefix("\ufeff")


def read_entries(path: Path) -> list[Entry]:
    """Every entry of a JSON (a list of entries), JSON-lines or Parquet file, by its suffix, checked."""
    fmt = AUDIT_FILE_FORMATS[path.suffix]
    if fmt == "json":
        text = read_text(path)
        try:
            data = json.loads(text)
        except json.JSONDecodeError as error:
            hint = " (one entry per line? name the file .jsonl)" if "Extra data" in error.msg else ""
            raise DataError(f"{path}: not valid JSON ({error.msg} at line {error.lineno} column {error.colno})"
                            f"{hint}") from None
        if not isinstance(data, list):
            raise DataError(f"{path}: expected a JSON list of entries, found {_kind(data)}")
        entries = [parse_entry(entry, i, f"{path}: entry {i}") for i, entry in enumerate(data)]
    elif fmt == "jsonl":
        entries = []
        for line_number, line in enumerate(read_text(path).splitlines(), start=1):
            if not line.strip():
                continue
            where = f"{path}: entry {len(entries)} (line {line_number})"
            try:
                entry = json.loads(line)
            except json.JSONDecodeError as error:
                raise DataError(f"{where}: not valid JSON ({error.msg} at column {error.colno})") from None
            entries.append(parse_entry(entry, len(entries), where))
    else:
        table = read_table(path)
        try:
            table.validate(full=True)  # invalid UTF-8 in a string column
        except pa.ArrowException as error:
            raise DataError(f"{path}: invalid data ({error})") from None
        entries = [parse_entry(row, i, f"{path}: entry {i}") for i, row in enumerate(table.to_pylist())]
    if not entries:
        raise DataError(f"{path}: no entries")
    return entries


def read_responder_entries(path: Path, responder: str) -> list[Entry]:
    """The rows of a normalized split whose `responder` is `responder`, as entries of one reply each with
    its `reply_label` as the human label and `reply_category` as the category."""
    table = read_table(path, RESPONDER_COLUMNS, missing_hint="run the normalize stage for its corpus")
    rows = table.to_pylist()
    entries = [Entry(i, row["context"], [row["response"]], [row["reply_label"]], row["reply_category"])
               for i, row in enumerate(rows) if row["responder"] == responder]
    if not entries:
        found = sorted({row["responder"] for row in rows if row["responder"] is not None})
        raise DataError(f"{path}: no rows whose responder is {responder!r} "
                        f"(responders: {', '.join(found) or 'none'})")
    return entries


# --- DiaSafety's contexts ---------------------------------------------------------------------------


def read_diasafety_contexts(folder: Path) -> dict[tuple[str, ...], tuple[str, str]]:
    """Each context of the normalized DiaSafety splits (`<folder>/<split>.parquet`): its category and
    split. normalize keeps a context in one split; a context's rows share one category in DiaSafety (the
    first row's is kept)."""
    contexts: dict[tuple[str, ...], tuple[str, str]] = {}
    for split in SPLITS:
        table = read_table(folder / f"{split}.parquet", ["context", "reply_category"],
                           missing_hint="run the normalize stage for diasafety")
        for turns, category in zip(table["context"].to_pylist(), table["reply_category"].to_pylist()):
            contexts.setdefault(tuple(spaced(t) for t in turns), (category, split))
    return contexts


# --- the worker -------------------------------------------------------------------------------------


def replies_table(name: str, source: str, entries: list[Entry],
                  diasafety: dict[tuple[str, ...], tuple[str, str]]) -> tuple[pa.Table, dict]:
    """The replies of `entries` as one table (schema `AUDIT_REPLIES`) and counts; `diasafety` maps a
    context's turns to its DiaSafety (category, split) (`read_diasafety_contexts`)."""
    out: dict[str, list] = {column: [] for column in AUDIT_REPLIES.names}
    contexts: dict[str, tuple[str | None, str | None]] = {}
    for entry in entries:
        category, split = diasafety.get(tuple(entry.context), (None, None))
        category = entry.category or category
        identity = context_id(entry.context)
        contexts.setdefault(identity, (category, split))
        for position, (reply, label) in enumerate(zip(entry.replies, entry.labels)):
            out["model"].append(name)
            out["context_id"].append(identity)
            out["context"].append(entry.context)
            out["entry"].append(entry.index)
            out["reply_index"].append(position)
            out["reply"].append(reply)
            out["category"].append(category)
            out["diasafety_split"].append(split)
            out["human_label"].append(label)
            out["source"].append(source)
    table = pa.table(out, schema=AUDIT_REPLIES)
    labels = Counter(label for label in out["human_label"] if label is not None)
    stats = {
        "entries": len(entries),
        "contexts": len(contexts),
        "replies": table.num_rows,
        "empty_replies": sum(not reply for reply in out["reply"]),
        "human_labels": {label: labels[label] for label in REPLY_LABELS},
        "contexts_by_category": dict(sorted(Counter(c or "none" for c, _ in contexts.values()).items())),
        "contexts_by_diasafety_split": dict(sorted(Counter(s or "none" for _, s in contexts.values()).items())),
    }
    return table, stats


# --- run --------------------------------------------------------------------------------------------


def run(config: AuditFile, name: str, normalized: Path, out: Path) -> dict:
    """Read the entry `name`'s file (or normalized split), join DiaSafety's categories from
    `<normalized>/diasafety`, and write `<out>/replies.parquet` and `<out>/stats.json`."""
    ensure_writable(out)
    started = time.perf_counter()
    path = Path(config.path)
    entries = read_responder_entries(path, config.responder) if config.responder else read_entries(path)
    diasafety = read_diasafety_contexts(normalized / "diasafety")
    table, stats = replies_table(name, config.path, entries, diasafety)
    stats = {"model": name, "path": config.path, "sha256": sha256(path), "responder": config.responder or None,
             **stats}
    with staged_dir(out) as staging:
        write_parquet(table, staging / "replies.parquet")
        write_json(stats, staging / "stats.json")
    log.info("audit_file %s: %d replies to %d contexts from %s (%d human-labelled, %d contexts with a "
             "DiaSafety category) -> %s in %.1f s", name, stats["replies"], stats["contexts"], path,
             sum(stats["human_labels"].values()), stats["contexts"] - stats["contexts_by_category"].get("none", 0),
             out, time.perf_counter() - started)
    return stats
