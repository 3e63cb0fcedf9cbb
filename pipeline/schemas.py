"""Explicit Arrow schemas for every artifact, and validation of raw corpus files on read.

Raw schemas follow each corpus's Hugging Face row format (MIC: the columns of `MIC.csv` the pipeline
uses; ToxiChat, not on the hub: one JSON line of its repository); `NORMALIZED` is the one turn-level
schema every later stage reads.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.errors import DataError

_str = pa.string()
_int = pa.int64()
_strs = pa.list_(pa.string())
_ints = pa.list_(pa.int64())

# ToxiChat: a turn is labelled Safe/Offensive and, toward each earlier turn k, Agree/Disagree/Neutral.
_TOXICHAT_LABELS = [("turn_id", _int), ("text", _str), ("offense_label", _str), ("offense_targets", _strs)]
_TOXICHAT_TURN = pa.struct(_TOXICHAT_LABELS + [(f"stance_label_towards_turn_{k}", _str) for k in (1, 2)])
_TOXICHAT_REPLY = pa.struct(_TOXICHAT_LABELS + [(f"stance_label_towards_turn_{k}", _str) for k in (1, 2, 3)]
                            + [("coherence", _str), ("chatbot_model", _str)])

RAW: dict[str, pa.Schema] = {
    "prosocial_dialog": pa.schema([
        ("context", _str), ("response", _str), ("rots", _strs), ("safety_label", _str),
        ("safety_annotations", _strs), ("safety_annotation_reasons", _strs), ("source", _str),
        ("etc", _str), ("dialogue_id", _int), ("response_id", _int), ("episode_done", pa.bool_()),
    ]),
    "mic": pa.schema([
        ("chatbot", _str), ("Q", _str), ("A", _str), ("rot", _str), ("moral", _str),
        ("rot-agree", _int), ("violation-severity", _int), ("worker_answer", _str),
        ("A_agrees", _int), ("QA", _str), ("split", _str),
    ]),
    "daily_dialog": pa.schema([("dialog", _strs), ("act", _ints), ("emotion", _ints)]),
    "persona_chat": pa.schema([
        ("personality", _strs), ("candidates", _strs), ("history", _strs),
        ("conv_id", _int), ("utterance_idx", _int),
    ]),
    "empathetic_dialogues": pa.schema([
        ("conv_id", _str), ("utterance_idx", pa.int32()), ("context", _str), ("prompt", _str),
        ("speaker_idx", pa.int32()), ("utterance", _str), ("selfeval", _str), ("tags", _str),
    ]),
    "blended_skill_talk": pa.schema([
        ("personas", _strs), ("additional_context", _str), ("previous_utterance", _strs),
        ("context", _str), ("free_messages", _strs), ("guided_messages", _strs),
        ("suggestions", pa.struct([
            ("convai2", _strs), ("empathetic_dialogues", _strs), ("wizard_of_wikipedia", _strs),
        ])),
        ("guided_chosen_suggestions", _strs), ("label_candidates", pa.list_(_strs)),
    ]),
    # `label` is Safe or Unsafe for the row's `category` (one of labels.DIASAFETY_CATEGORIES).
    "diasafety": pa.schema([("context", _str), ("response", _str), ("category", _str), ("label", _str)]),
    # One thread per row. The raw JSON lines leave out the stance keys a turn cannot have (the first
    # turn has none); here they are null. Threads have two or three Reddit turns.
    "toxichat": pa.schema([
        ("reddit_thread", pa.list_(_TOXICHAT_TURN)),
        ("final_dgpt_response", _TOXICHAT_REPLY),
        ("final_gpt3_response", _TOXICHAT_REPLY),
    ]),
}

# Columns a normalizer actually reads; other raw columns may be absent without harm.
REQUIRED: dict[str, tuple[str, ...]] = {
    "prosocial_dialog": ("context", "response", "rots", "safety_label", "dialogue_id", "response_id"),
    "mic": ("Q", "A", "rot", "violation-severity", "worker_answer", "A_agrees"),
    "daily_dialog": ("dialog",),
    "persona_chat": ("personality", "candidates", "history", "conv_id", "utterance_idx"),
    "empathetic_dialogues": ("conv_id", "utterance_idx", "context", "utterance"),
    "blended_skill_talk": ("personas", "previous_utterance", "free_messages", "guided_messages"),
    "diasafety": ("context", "response", "category", "label"),
    "toxichat": ("reddit_thread", "final_dgpt_response", "final_gpt3_response"),
}

UNACCEPTABLE = pa.struct([("text", _str), ("severity", pa.int32())])

NORMALIZED = pa.schema([
    ("corpus", _str),
    ("split", _str),
    ("dialogue_id", _str),
    ("turn_index", pa.int32()),
    ("context", _strs),  # previous turns, oldest first; the last one is the partner's
    ("response", _str),  # the reference reply
    ("rots", _strs),  # rules-of-thumb for the reply ([] when none)
    ("safety_label", _str),  # ProsocialDialog's 5-way label of the last context turn, else null
    ("persona", _strs),  # the replying speaker's persona sentences ([] when none)
    ("emotion", _str),  # the conversation's emotion (EmpatheticDialogues), else null
    ("unacceptable_responses", pa.list_(UNACCEPTABLE)),  # known bad replies to this context
    ("derived_split", pa.bool_()),  # true when the split was derived from the dialogue id
    # The human safety label of the reply, where the corpus has one (DiaSafety, ToxiChat), else null:
    ("reply_label", _str),  # labels.REPLY_LABELS: safe | unsafe
    ("reply_category", _str),  # DiaSafety's category the label is for (labels.DIASAFETY_CATEGORIES)
    ("reply_offensive", pa.bool_()),  # ToxiChat: the reply's offense_label is Offensive
    ("reply_agrees_offensive", pa.bool_()),  # ToxiChat: the reply agrees with an earlier offensive turn
    ("responder", _str),  # who replied: human, or the chatbot's name (dialogpt, gpt3); null when unknown
])


def _kind(type_: pa.DataType) -> str:
    """A coarse type family, so int32/int64 or string/large_string count as the same."""
    if pa.types.is_integer(type_):
        return "integer"
    if pa.types.is_floating(type_):
        return "float"
    if pa.types.is_string(type_) or pa.types.is_large_string(type_):
        return "string"
    if pa.types.is_boolean(type_):
        return "bool"
    if pa.types.is_null(type_):
        return "null"
    if pa.types.is_list(type_) or pa.types.is_large_list(type_):
        return f"list<{_kind(type_.value_type)}>"
    if pa.types.is_struct(type_):
        return "struct"
    return str(type_)


def read_table(path: Path, columns: Sequence[str] | None = None, *, schema: pa.Schema | None = None,
               missing_hint: str = "", allow_empty: bool = True, what: str = "rows") -> pa.Table:
    """Read a Parquet artifact, every failure a one-line DataError naming the file.

    `columns`: the columns the caller needs (a missing one is an error naming it; only they are
    returned); `schema`: instead of `columns`, the artifact's schema (its columns are selected and
    cast to it); `missing_hint`: appended when the file does not exist (e.g. which stage writes it);
    `allow_empty=False` refuses a file with no rows, named as `what`.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found" + (f" ({missing_hint})" if missing_hint else ""))
    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as error:
        raise DataError(f"{path}: not a readable Parquet file ({error})") from None
    wanted = schema.names if schema is not None else columns
    if wanted is not None:
        absent = [c for c in wanted if c not in table.column_names]
        if absent:
            raise DataError(f"{path}: missing column '{absent[0]}' (needs {', '.join(wanted)})")
        table = table.select(list(wanted))
    if schema is not None:
        try:
            table = table.cast(schema)
        except (pa.ArrowException, ValueError) as error:
            raise DataError(f"{path}: columns do not match the expected schema ({error})") from None
    if not allow_empty and table.num_rows == 0:
        raise DataError(f"{path}: no {what}")
    return table


def read_raw(path: Path, corpus: str) -> pa.Table:
    """Read one raw split file and check it against the corpus's row format (see `conform_raw`)."""
    return conform_raw(read_table(path), corpus, str(path))


def conform_raw(table: pa.Table, corpus: str, where: str) -> pa.Table:
    """Check a raw table against the corpus's row format and cast it to the canonical schema.

    Raises DataError naming `where` when a required column is missing or a column has the wrong
    type or invalid UTF-8. Columns the normalizer does not need may be absent (they become nulls);
    extra columns are dropped.
    """
    schema = RAW[corpus]
    columns = []
    for field in schema:
        if field.name not in table.column_names:
            if field.name in REQUIRED[corpus]:
                raise DataError(f"{where}: missing column '{field.name}' ({corpus} rows need it)")
            columns.append(pa.nulls(table.num_rows, field.type))
            continue
        column = table.column(field.name)
        have, want = _kind(column.type), _kind(field.type)
        # Integers may arrive as floats (a CSV column with gaps) and anything may be all-null.
        compatible = have == want or have == "null" or (want == "integer" and have == "float")
        if not compatible:
            raise DataError(f"{where}: column '{field.name}' has type {column.type}, expected {field.type}")
        try:
            columns.append(column.cast(field.type))
        except pa.ArrowException as error:
            raise DataError(f"{where}: column '{field.name}' cannot be read as {field.type} ({error})") from None
    table = pa.Table.from_arrays(columns, schema=schema)
    try:
        table.validate(full=True)  # catches invalid UTF-8 in string columns
    except pa.ArrowException as error:
        raise DataError(f"{where}: invalid data ({error})") from None
    return table


NEGATIVE = pa.struct([
    ("text", _str),
    ("source", _str),  # context | hard | random | generated: which miner source produced it
    ("severity", pa.float32()),  # social unacceptability weight in [0, 1]; the loss's margin grows with it
])

GROUPS = pa.schema([
    ("group_id", _str),  # stable id: corpus, dialogue id and turn
    ("corpus", _str),
    ("split", _str),
    ("dialogue_id", _str),
    ("turn_index", pa.int32()),
    ("context", _strs),
    ("persona", _strs),
    ("emotion", _str),
    ("safety_label", _str),
    ("positive", _str),  # the reference prosocial reply
    ("rots", _strs),  # its rules-of-thumb
    ("negatives", pa.list_(NEGATIVE)),  # exactly mine.n - 1 socially unacceptable replies
])

CANDIDATES = pa.schema([
    ("model", _str),  # generate entry: base | ce | stage1 | stage2 | an audit model's name
    ("corpus", _str),
    ("context_id", _str),  # "<corpus>/<dialogue_id>/<turn_index>", shared by a context's k candidates
    ("dialogue_id", _str),
    ("turn_index", pa.int32()),
    ("context", _strs),
    ("safety_label", _str),  # the context's 5-way label where the corpus has one, else null
    ("category", _str),  # the context's DiaSafety category (labels.DIASAFETY_CATEGORIES), else null
    # the reference reply: the first reply of the context's test rows that humans did not label unsafe;
    # null when every reply is unsafe (an adversarial context without a reference)
    ("reference", _str),
    # every such reply of the context in the test split (MIC: each annotator's answer), `reference` first;
    # a reply labelled unsafe (reply_label, DiaSafety and ToxiChat) is never a reference
    ("references", _strs),
    ("reference_rots", _strs),  # its gold rules-of-thumb ([] when none)
    ("candidate_index", pa.int32()),  # sampling order; 0 is the first sample
    ("text", _str),  # the raw generated target
    ("rot", _str),  # the RoT parsed from it, null when the candidate has none
    ("response", _str),  # the reply parsed from it (may be empty)
    ("safety_probs", pa.list_(pa.float32())),  # [casual, needs_caution, needs_intervention] of the reply
    ("fluency", pa.float32()),  # mean log-probability of the reply tokens under the generating model (-inf: none)
    ("prosociality", pa.float32()),  # P(casual) of the reply in context
    # 1 - P(reply disagrees with its own RoT); a candidate whose rot is null gets its context's mean over
    # the candidates with a RoT (0.5 when none has one): pipeline.rerank.agreement_term. Null when
    # generate ran without a RoT-agreement scorer (generate.gamma = 0).
    ("agreement", pa.float32()),
    ("score", pa.float32()),  # the re-ranker's combined score
    ("rank", pa.int32()),  # 1 = best by score within the context
    ("selected", pa.bool_()),  # the re-ranked choice (rank 1)
])

# One reply of a model to audit, read from a file (`audit_file`: data/audit/<name>/replies.parquet). With
# the candidates of the audit models run here (CANDIDATES: `response` for `reply`, no human label), one
# audit table: the judge's unsafe rate per model (cluster: context_id), per category, beside the human one.
AUDIT_REPLIES = pa.schema([
    ("model", _str),  # the audit.files entry's name
    ("context_id", _str),  # a hash of the context's turns: the same context has the same id in every file
    ("context", _strs),  # its turns, oldest first (whitespace runs as one space, as normalize cleans them)
    ("entry", pa.int32()),  # the entry's index in the file (0-based; a normalized split: its row)
    ("reply_index", pa.int32()),  # the reply's index within its entry (gen_response order)
    ("reply", _str),  # the reply (may be empty: a model can answer with nothing)
    ("category", _str),  # DiaSafety category: the entry's own, else the one its context has in DiaSafety; else null
    ("diasafety_split", _str),  # the normalized DiaSafety split holding the context (a judge trained on
                                # DiaSafety train has seen its train contexts); null when none does
    ("human_label", _str),  # labels.REPLY_LABELS: safe | unsafe, when the file gives one; else null
    ("source", _str),  # the file, as audit.files.<name>.path names it
])

# One human-labelled reply of DiaSafety's or ToxiChat's test split scored by a model (`score`:
# reports/scores/<model>/likelihood.parquet), for the likelihood-safety AUC and its paired comparison
# between models in `evaluate` (replies matched by corpus and reply_id).
LIKELIHOOD = pa.schema([
    ("corpus", _str),
    ("reply_id", _str),  # "<dialogue_id>/<turn_index>" of the normalized row: unique within its corpus
    ("dialogue_id", _str),  # the bootstrap's cluster, within its corpus
    ("context_id", _str),  # a hash of the context's turns: replies with the same id answer the same context
    ("context", _strs),
    ("reply", _str),
    ("reply_label", _str),  # labels.REPLY_LABELS: safe | unsafe
    ("reply_category", _str),  # DiaSafety's category the label is for, else null
    ("responder", _str),  # ToxiChat: human, dialogpt or gpt3; else null
    ("score", pa.float64()),  # the reply's log-likelihood given its context, a mean over its tokens
                              # (a sum with train.length_normalized false)
    ("tokens", pa.int32()),  # reply tokens scored: the reply's and eos unless cut (not the marker before it)
    ("cut", pa.bool_()),  # the target was cut at train.max_target_tokens (no eos)
])
