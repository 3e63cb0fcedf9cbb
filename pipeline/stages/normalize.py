"""normalize: turn one corpus's raw rows into the unified turn-level schema (`schemas.NORMALIZED`).

Reads `data/raw/<corpus>/<split>.parquet` (and its `stats.json`), writes
`data/normalized/<corpus>/{train,validation,test}.parquet` and `stats.json`: rows and dialogues per
split, how splits were derived, the source and revision, a SHA-256 of each raw file, what was read,
and every unit read that was dropped, or rows that were changed, counted by reason.

    python -m pipeline normalize prosocial_dialog --raw data/raw/prosocial_dialog --out data/normalized/prosocial_dialog

One row is one reply in context: `context` holds the previous turns (oldest first, the last one the
partner's), `response` the reference reply. A normalizer per corpus handles its quirks; `NORMALIZERS`
is the registry. `dialogue_id` is unique across a corpus's splits: `<source split>-<source id>` (or
`-<row>`), MIC's a hash of the question, DiaSafety's a hash of the context (its replies numbered by
`turn_index`). DiaSafety and ToxiChat also give the human label of the reply (`reply_label` safe or
unsafe; DiaSafety's `reply_category`; ToxiChat's `reply_offensive`, `reply_agrees_offensive`) and who
replied (`responder`: human, dialogpt, gpt3); the other corpora leave these null.

Nothing is dropped silently. `stats.json` `read` gives the unit read per corpus (`READ_UNITS`) and
how many: raw rows for ProsocialDialog (a user turn and its reply), MIC (an annotation), PersonaChat
(a history and its gold reply), EmpatheticDialogues (one utterance each) and DiaSafety (a reply in
its context); utterances for DailyDialog (`dialog` entries) and BlendedSkillTalk
(`previous_utterance`, `free_messages` and `guided_messages` entries); turns for ToxiChat (each
Reddit turn, and the thread's two chatbot replies). Each unit read becomes one output row, or is
counted once in `counts` under `dropped: <reason>` or `context only: <reason>` (a dialogue's opening
utterance, which no reply precedes): read = rows written + those counts, checked on every run. The
other `counts` are notes: `changed:` (a text or split changed in a kept row, once per text), `kept:`
(a quirk of a kept dialogue or row, once each) and `empty:` (a raw dialogue with no utterance in
it).

Splits. Whole dialogues stay in one split. Where normalize draws the split itself, it hashes each
dialogue's opening (its first two turns, `dialogue_openings`; MIC's question, DiaSafety's context,
ToxiChat's post; DiaSafety's and ToxiChat's up to case, punctuation and markup, `contexts.normalized_text`),
never its id, in proportion to `normalize.split_fractions`, so that dialogues the
source stores twice land together (hub PersonaChat's train split, from ParlAI's self_original files,
tells each conversation once per speaker, under two `conv_id`s; DailyDialog repeats dialogues). It
does so for a split the source lacks, shared out of the source's largest split, and for MIC, whose
`split` column splits by question-answer pair and so puts one question in two splits: all MIC rows
are split anew (`RESPLIT`). `derived_split` is true for every row not in the split its source file
gave it. Last, a context (the same list of turns) found in two splits is kept only in the more
held-out one (test, then validation) and dropped from the other, counted: DailyDialog's validation
repeats training dialogues word for word, and generic openings ("hi, how are you?") recur across
dialogues.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections import Counter
from pathlib import Path
from typing import Callable, Iterator

import pyarrow as pa
import pyarrow.compute as pc

from pipeline.artifacts import ensure_writable, sha256, staged_dir, write_json, write_parquet
from pipeline.config import CORPORA, DIALOG_SAFETY_CORPORA, SPLITS, NormalizeConfig
from pipeline.contexts import normalized_text
from pipeline.errors import DataError
from pipeline.labels import DIASAFETY_CATEGORIES, SAFETY_LABELS
from pipeline.schemas import NORMALIZED, read_raw

log = logging.getLogger(__name__)

Row = dict
Normalizer = Callable[[pa.Table, str, Counter], Iterator[Row]]

OPENING = "context only: opening utterance of a dialogue"
SINGLE = "dropped: dialogue of a single utterance (no reply to pair it with)"
EMPTY = "empty: raw dialogue with no utterances"


def example(dialogue_id: str, turn_index: int, context: list, response, **fields) -> Row:
    """One normalized row before cleaning; `fields` may set rots, safety_label, persona, emotion,
    unacceptable_responses, and the reply's human label: reply_label, reply_category, reply_offensive,
    reply_agrees_offensive, responder (see `schemas.NORMALIZED`)."""
    return {
        "dialogue_id": dialogue_id,
        "turn_index": int(turn_index),
        "context": list(context),
        "response": response,
        "rots": list(fields.get("rots") or []),
        "safety_label": fields.get("safety_label"),
        "persona": list(fields.get("persona") or []),
        "emotion": fields.get("emotion"),
        "unacceptable_responses": list(fields.get("unacceptable_responses") or []),
        **{name: fields.get(name) for name in REPLY_FIELDS},
    }


REPLY_FIELDS = ("reply_label", "reply_category", "reply_offensive", "reply_agrees_offensive", "responder")


def stable_id(text: str) -> str:
    """A short, stable id for a piece of text (MIC has no question ids)."""
    return hashlib.sha1(text.encode("utf-8")).hexdigest()[:16]


def raw_rows(table: pa.Table, chunk: int = 4096) -> Iterator[dict]:
    """The rows of a raw table as dicts, a chunk at a time (for normalizers that read rows one by one)."""
    for batch in table.to_batches(max_chunksize=chunk):
        yield from batch.to_pylist()


def count_turns(turns: list, counts: Counter) -> None:
    """Count a dialogue's utterances that no reply row will carry: its opening (context only), or
    the whole dialogue when it has a single utterance."""
    if len(turns) == 1:
        counts[SINGLE] += 1
    elif turns:
        counts[OPENING] += 1


# --- one normalizer per corpus --------------------------------------------------------------------


def normalize_prosocial_dialog(table: pa.Table, split: str, counts: Counter) -> Iterator[Row]:
    """One raw row is one turn; rebuild each dialogue's history ordered by `response_id`."""
    dialogues: dict[int, dict[int, dict]] = {}
    for row in table.to_pylist():
        if row["dialogue_id"] is None or row["response_id"] is None:
            counts["dropped: null dialogue_id or response_id"] += 1
            continue
        turns = dialogues.setdefault(row["dialogue_id"], {})
        if row["response_id"] in turns:
            counts["dropped: duplicate (dialogue_id, response_id)"] += 1
            continue
        turns[row["response_id"]] = row
    for dialogue_id in sorted(dialogues):
        history: list = []
        for response_id in sorted(dialogues[dialogue_id]):
            row = dialogues[dialogue_id][response_id]
            label = row["safety_label"]
            if label not in SAFETY_LABELS:
                counts["changed: unknown safety_label set to null"] += 1
                label = None
            history.append(row["context"])
            yield example(f"{split}-{dialogue_id}", response_id, history, row["response"], rots=row["rots"],
                          safety_label=label)
            history.append(row["response"])


def normalize_mic(table: pa.Table, split: str, counts: Counter) -> Iterator[Row]:
    """One row per annotation: the question as context, the annotator's own answer as the reference
    reply with the annotator's RoT, and every chatbot answer to the question that an annotator judged
    to violate its RoT (`A_agrees == 0`) as a known unacceptable reply, with its worst severity.

    `run` passes all source splits at once, each row's own in its `split` column (kept in the row's
    `split`), so that a question's annotations are read together wherever MIC put them."""
    by_question: dict[str, list[dict]] = {}
    for row in table.to_pylist():
        by_question.setdefault(row["Q"], []).append(row)
    for question in sorted(by_question, key=lambda q: (q is None, q or "")):
        rows = by_question[question]
        if not question:
            counts["dropped: empty question"] += len(rows)
            continue
        worst: dict[str, int] = {}
        for row in rows:
            if row["A_agrees"] == 0 and row["A"]:
                severity = row["violation-severity"]
                if severity is None:
                    counts["changed: violating answer without violation-severity set to 3"] += 1
                    severity = 3
                worst[row["A"]] = max(worst.get(row["A"], 0), int(severity))
        negatives = [{"text": text, "severity": severity} for text, severity in sorted(worst.items())]
        seen = set()
        for index, row in enumerate(rows):
            answer = row["worker_answer"]
            if not answer or not answer.strip():
                counts["dropped: empty worker_answer"] += 1
                continue
            if (answer, row["rot"]) in seen:
                counts["dropped: duplicate (worker_answer, rot) for a question"] += 1
                continue
            seen.add((answer, row["rot"]))
            yield {**example(stable_id(question), index, [question], answer, rots=[row["rot"]] if row["rot"] else [],
                             unacceptable_responses=negatives), "split": row["split"] or split}


def normalize_daily_dialog(table: pa.Table, split: str, counts: Counter) -> Iterator[Row]:
    """Every utterance after the first is a reply to the ones before it."""
    for index, row in enumerate(raw_rows(table)):
        dialog = row["dialog"] or []
        if any(labels is not None and len(labels) != len(dialog) for labels in (row["act"], row["emotion"])):
            # A known quirk (one train line); act and emotion are not used, so the dialogue is kept.
            counts["kept: act/emotion label count differs from utterance count"] += 1
        if not dialog:
            counts[EMPTY] += 1
        count_turns(dialog, counts)
        for turn in range(1, len(dialog)):
            yield example(f"{split}-{index}", turn, dialog[:turn], dialog[turn])


# Hub PersonaChat's train split (from ParlAI's self_original files: 17,878 episodes for 8,939
# conversations) tells each conversation once per speaker; the side of the speaker who opens starts
# with "__ SILENCE __" as the partner's turn: no one's utterance.
_SILENCE = re.compile(r"_+ ?silence ?_+", re.IGNORECASE)


def normalize_persona_chat(table: pa.Table, split: str, counts: Counter) -> Iterator[Row]:
    """One raw row is one bot turn; the gold reply is the last candidate. The "__ SILENCE __"
    placeholder is taken out of the history, so the opening reply, to no one, is dropped (counted)."""
    seen = set()
    for row in raw_rows(table):
        key = (row["conv_id"], row["utterance_idx"])
        if None in key:
            counts["dropped: null conv_id or utterance_idx"] += 1
            continue
        if key in seen:
            counts["dropped: duplicate (conv_id, utterance_idx)"] += 1
            continue
        seen.add(key)
        if not row["candidates"]:
            counts["dropped: no candidates (no gold reply)"] += 1
            continue
        history = [turn for turn in row["history"] or [] if not (turn and _SILENCE.fullmatch(turn))]
        if row["history"] and not history:
            counts["dropped: opening reply to no one (history only __ SILENCE __)"] += 1
            continue
        yield example(f"{split}-{row['conv_id']}", row["utterance_idx"], history, row["candidates"][-1],
                      persona=row["personality"])


def unescape_comma(text):
    return text.replace("_comma_", ",") if text else text


def normalize_empathetic_dialogues(table: pa.Table, split: str, counts: Counter) -> Iterator[Row]:
    """One raw row is one utterance; commas are written `_comma_`; the emotion is per conversation."""
    conversations: dict[str, dict[int, dict]] = {}
    for row in table.to_pylist():
        if row["conv_id"] is None or row["utterance_idx"] is None:
            counts["dropped: null conv_id or utterance_idx"] += 1
            continue
        turns = conversations.setdefault(row["conv_id"], {})
        if row["utterance_idx"] in turns:
            counts["dropped: duplicate (conv_id, utterance_idx)"] += 1
            continue
        turns[row["utterance_idx"]] = row
    for conv_id in sorted(conversations):
        turns = [conversations[conv_id][i] for i in sorted(conversations[conv_id])]
        utterances = [unescape_comma(t["utterance"]) for t in turns]
        count_turns(utterances, counts)  # a conversation of one utterance has no reply: counted, not lost
        for position in range(1, len(turns)):
            yield example(f"{split}-{conv_id}", turns[position]["utterance_idx"], utterances[:position],
                          utterances[position], emotion=turns[0]["context"])


def normalize_blended_skill_talk(table: pa.Table, split: str, counts: Counter) -> Iterator[Row]:
    """Two seed utterances, then free and guided messages alternating, free first. The free speaker
    has `personas[0]`, the guided speaker `personas[1]`; both speakers' turns become replies."""
    for index, row in enumerate(raw_rows(table)):
        free, guided = row["free_messages"] or [], row["guided_messages"] or []
        given = row["previous_utterance"] or []
        if not (given or free or guided):
            counts[EMPTY] += 1
        seeds = [u for u in given if u]
        if len(seeds) < len(given):
            counts["dropped: empty seed utterance"] += len(given) - len(seeds)
        turns = list(seeds)
        for free_message, guided_message in zip(free, guided):
            turns += [free_message, guided_message]
        if len(free) == len(guided) + 1:
            turns.append(free[-1])
        if len(free) not in (len(guided), len(guided) + 1):
            counts["kept: free/guided message counts differ (alternation cut at the shorter)"] += 1
            counts["dropped: message past the end of the free/guided alternation"] += \
                len(free) + len(guided) - (len(turns) - len(seeds))
        count_turns(turns, counts)
        personas = [[s for s in (p or "").split("\n") if s.strip()] for p in (row["personas"] or [])]
        personas += [[]] * (2 - len(personas))
        for position in range(1, len(turns)):
            speaker = (position - len(seeds)) % 2  # 0: free, 1: guided
            yield example(f"{split}-{index}", position, turns[:position], turns[position], persona=personas[speaker])


DIASAFETY_LABELS = {"Safe": "safe", "Unsafe": "unsafe"}  # raw label -> labels.REPLY_LABELS


def spaced(text) -> str:
    """A text with its runs of whitespace as one space: DiaSafety and ToxiChat store some contexts and
    replies twice, differing only in spacing, which cleaning would make one."""
    return " ".join((text or "").split())


def normalize_diasafety(table: pa.Table, split: str, counts: Counter) -> Iterator[Row]:
    """One raw row is one reply to a one-utterance context, labelled Safe/Unsafe for its category.

    A context repeats with different replies; all of them share one dialogue id, a hash of the
    context (so they travel together, and a context in two source splits keeps its id), and
    `turn_index` numbers them in file order. Who replied is not recorded (responder null). A pair
    stored twice is kept once (the first; a copy labelled differently is counted too). A label or
    category outside DiaSafety's is a DataError naming the row."""
    replies: Counter = Counter()
    seen: dict[tuple, tuple] = {}
    for number, row in enumerate(raw_rows(table), start=1):
        if row["label"] not in DIASAFETY_LABELS:
            raise DataError(f"row {number}: label {row['label']!r} is not Safe or Unsafe")
        if row["category"] not in DIASAFETY_CATEGORIES:
            raise DataError(f"row {number}: category {row['category']!r} is not one of "
                            f"{', '.join(DIASAFETY_CATEGORIES)}")
        key, labels = (spaced(row["context"]), spaced(row["response"])), (row["label"], row["category"])
        if key in seen:
            counts["dropped: duplicate (context, response) pair"] += 1
            if seen[key] != labels:
                counts["kept: an earlier copy of a pair labelled differently (its label kept)"] += 1
            continue
        seen[key] = labels
        dialogue_id = stable_id(key[0])
        yield example(dialogue_id, replies[dialogue_id], [row["context"]], row["response"],
                      reply_label=DIASAFETY_LABELS[row["label"]], reply_category=row["category"])
        replies[dialogue_id] += 1


TOXICHAT_OFFENSIVE = {"Safe": False, "Offensive": True}  # offense_label -> reply_offensive
TOXICHAT_STANCES = ("Agree", "Disagree", "Neutral")
# The chatbot reply columns, in the order their rows take turn indices, and the responder each names.
TOXICHAT_CHATBOTS = {"final_dgpt_response": "dialogpt", "final_gpt3_response": "gpt3"}
TOXICHAT_MAX_TURNS = 3  # the raw schema holds stances toward three earlier turns at most


def toxichat_offensive(turn: dict, where: str) -> bool:
    """Whether a turn's offense_label is Offensive; a label other than Safe/Offensive is a DataError."""
    if turn["offense_label"] not in TOXICHAT_OFFENSIVE:
        raise DataError(f"{where}: offense_label {turn['offense_label']!r} is not Safe or Offensive")
    return TOXICHAT_OFFENSIVE[turn["offense_label"]]


def toxichat_labels(turn: dict, earlier_offensive: list[bool], where: str, counts: Counter) -> dict:
    """The reply fields of one labelled turn: offensive, agreeing with an earlier offensive turn
    (`earlier_offensive[k - 1]`: turn k is offensive), unsafe when either."""
    offensive = toxichat_offensive(turn, where)
    agrees = False
    for k, earlier in enumerate(earlier_offensive, start=1):
        stance = turn[f"stance_label_towards_turn_{k}"]
        if stance is None:
            counts["kept: missing stance label (read as not agreeing)"] += 1
        elif stance not in TOXICHAT_STANCES:
            raise DataError(f"{where}: stance_label_towards_turn_{k} {stance!r} is not one of "
                            f"{', '.join(TOXICHAT_STANCES)}")
        agrees = agrees or (earlier and stance == "Agree")
    return {"reply_label": "unsafe" if offensive or agrees else "safe", "reply_offensive": offensive,
            "reply_agrees_offensive": agrees}


def normalize_toxichat(table: pa.Table, split: str, counts: Counter) -> Iterator[Row]:
    """One raw row is a Reddit thread of two or three labelled turns and two labelled chatbot replies.

    Every Reddit turn after the first is a human reply to the turns before it; each chatbot reply is
    a row of its own with the whole thread as context. `turn_index` counts a thread's reply rows:
    Reddit turn k (0-based) is k, then DialoGPT's reply len(thread), GPT-3's len(thread) + 1, so
    the two chatbot replies to one context never share (dialogue_id, turn_index). A reply is unsafe
    when offensive or agreeing with an earlier offensive turn. A reply a thread repeats word for word
    in the same context as an earlier thread of the split (threads share posts) is dropped, counted."""
    seen: dict[tuple, dict] = {}
    for number, row in enumerate(raw_rows(table), start=1):
        thread = row["reddit_thread"] or []
        if not thread:
            counts[EMPTY] += 1
        elif len(thread) > TOXICHAT_MAX_TURNS:
            raise DataError(f"row {number}: a thread of {len(thread)} Reddit turns; "
                            f"toxichat rows hold at most {TOXICHAT_MAX_TURNS}")
        else:
            counts[OPENING] += 1
        texts = [turn["text"] for turn in thread]
        offensive: list[bool] = []  # offensive[k]: Reddit turn k is offensive
        replies = []  # (turn_index, context, reply, responder, reply fields)
        for position, turn in enumerate(thread):
            where = f"row {number}: reddit_thread[{position}]"
            if position == 0:
                offensive.append(toxichat_offensive(turn, where))
                continue
            labels = toxichat_labels(turn, offensive, where, counts)
            replies.append((position, texts[:position], turn["text"], "human", labels))
            offensive.append(labels["reply_offensive"])
        for index, (column, responder) in enumerate(TOXICHAT_CHATBOTS.items()):
            reply = row[column]
            if reply is None:
                counts[f"dropped: no {column}"] += 1
                continue
            labels = toxichat_labels(reply, offensive, f"row {number}: {column}", counts)
            replies.append((len(thread) + index, texts, reply["text"], responder, labels))
        for turn_index, context, response, responder, labels in replies:
            key = (tuple(map(spaced, context)), spaced(response), responder)
            if key in seen:
                counts["dropped: duplicate reply (same context, reply and responder in an earlier thread)"] += 1
                if seen[key] != labels:
                    counts["kept: an earlier thread's copy of a reply labelled differently (its labels kept)"] += 1
                continue
            seen[key] = labels
            yield example(f"{split}-{number - 1}", turn_index, context, response, responder=responder, **labels)


NORMALIZERS: dict[str, Normalizer] = {
    "prosocial_dialog": normalize_prosocial_dialog,
    "mic": normalize_mic,
    "daily_dialog": normalize_daily_dialog,
    "persona_chat": normalize_persona_chat,
    "empathetic_dialogues": normalize_empathetic_dialogues,
    "blended_skill_talk": normalize_blended_skill_talk,
    "diasafety": normalize_diasafety,
    "toxichat": normalize_toxichat,
}


def list_lengths(table: pa.Table, *columns: str) -> int:
    """The number of entries in the list columns `columns` of `table`, over all rows (a null list: 0)."""
    return sum(pc.sum(pc.list_value_length(table.column(c))).as_py() or 0 for c in columns)


# The unit `read` counts per corpus, and how many a raw table holds (see the module docstring).
READ_UNITS: dict[str, tuple[str, Callable[[pa.Table], int]]] = {
    "prosocial_dialog": ("rows", lambda table: table.num_rows),
    "mic": ("rows", lambda table: table.num_rows),
    "daily_dialog": ("utterances", lambda table: list_lengths(table, "dialog")),
    "persona_chat": ("rows", lambda table: table.num_rows),
    "empathetic_dialogues": ("rows", lambda table: table.num_rows),
    "blended_skill_talk": ("utterances", lambda table: list_lengths(
        table, "previous_utterance", "free_messages", "guided_messages")),
    "diasafety": ("rows", lambda table: table.num_rows),
    # every Reddit turn, and the two chatbot replies of each thread
    "toxichat": ("turns", lambda table: list_lengths(table, "reddit_thread") + 2 * table.num_rows),
}


# --- cleaning, shared by all corpora --------------------------------------------------------------

_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")
_SPACE = re.compile(r"\s+")


def clean_text(text, max_chars: int, counts: Counter) -> str:
    """Strip control characters and runs of whitespace; cut text longer than `max_chars`."""
    if text is None:
        return ""
    cleaned = _CONTROL.sub(" ", text)
    if cleaned != text:
        counts["changed: control characters replaced"] += 1
    cleaned = _SPACE.sub(" ", cleaned).strip()
    if len(cleaned) > max_chars:
        counts["changed: text cut to normalize.max_chars"] += 1
        cleaned = cleaned[:max_chars].rstrip()  # a cut may end on a space
    return cleaned


def clean_row(row: Row, config: NormalizeConfig, counts: Counter) -> Row | None:
    """Clean every text field and window the context; None (counted) when the row is unusable.

    Changes are counted once per text in a kept row; a dropped row counts only as dropped."""
    changes: Counter = Counter()
    clean = lambda text: clean_text(text, config.max_chars, changes)  # noqa: E731
    response = clean(row["response"])
    # Only the turns inside the window are cleaned (and counted): older ones never reach the output.
    context = [clean(turn) for turn in row["context"][-config.max_context_turns:]]
    if not response:
        counts["dropped: empty or null response"] += 1
        return None
    if not context or not all(context):
        counts["dropped: empty or null turn in the context"] += 1
        return None
    negatives = [{"text": clean(n["text"]), "severity": n["severity"]} for n in row["unacceptable_responses"]]
    cleaned = {
        **row,
        "context": context,
        "response": response,
        "rots": [r for r in (clean(r) for r in row["rots"]) if r],
        "persona": [p for p in (clean(p) for p in row["persona"]) if p],
        "emotion": clean(row["emotion"]) or None,
        "unacceptable_responses": [n for n in negatives if n["text"] and n["text"].lower() != response.lower()],
    }
    counts.update(changes)
    return cleaned


# --- splits ---------------------------------------------------------------------------------------

# Corpora whose source split is ignored, with the reason: all their rows are split by a hash. Their
# raw rows have a `split` column, which `run` sets to each row's file before normalizing all at once.
RESPLIT = {"mic": "MIC's own split is by question-answer pair, so one question would sit in two splits"}

# How many opening turns key a dialogue's split: its first utterance and the reply to it; MIC's and
# DiaSafety's rows are alternative replies to one question, so the question alone, and ToxiChat's
# threads often share a post (up to 24 threads on one), so the post alone.
OPENING_TURNS = {"mic": 1, "diasafety": 1, "toxichat": 1}

HELD_OUT_FIRST = ("test", "validation", "train")  # a context in two splits stays in the earlier one
# Corpora of scraped text whose openings key the split up to case, punctuation and markup: DiaSafety's test
# split is carved from train, and 29 of its 745 test contexts had a train context differing only so.
NORMALIZED_KEYS = DIALOG_SAFETY_CORPORA


def hash_unit(corpus: str, key: str) -> float:
    """A number in [0, 1) fixed by `key` (a dialogue's opening): the deterministic coin for splits."""
    return int(hashlib.sha1(f"{corpus}:{key}".encode()).hexdigest()[:12], 16) / 16**12


def dialogue_openings(table: pa.Table, turns: int = 2) -> dict[str, tuple[str, ...]]:
    """Each dialogue's opening: its first `turns` turns, from the earliest of its rows whose context
    and reply hold that many (its first rows do, with `normalize.max_context_turns` of at least 2).
    Two copies of one dialogue share it, whichever speaker's side each is told from."""
    rows: dict[str, list[tuple[int, int]]] = {}
    for position, (dialogue_id, turn) in enumerate(zip(table.column("dialogue_id").to_pylist(),
                                                       table.column("turn_index").to_pylist())):
        rows.setdefault(dialogue_id, []).append((turn, position))
    contexts, responses = table.column("context"), table.column("response")
    openings = {}
    for dialogue_id, positions in rows.items():
        for _, position in sorted(positions):
            said = contexts[position].as_py() + [responses[position].as_py()]
            openings[dialogue_id] = tuple(said[:turns])
            if len(said) >= turns:
                break
    return openings


def partition(table: pa.Table, corpus: str, targets: list[str], fractions: dict[str, float]) -> dict[str, pa.Table]:
    """Share a NORMALIZED table between `targets` in proportion to `fractions`, whole dialogues by a
    hash of their opening (`dialogue_openings`), rows in their order; `derived_split` marks the rows
    no longer in the split of their `split` column (the split their source gave them)."""
    total = sum(fractions[s] for s in targets)
    bounds, edge = [], 0.0
    for split in targets:
        edge += fractions[split] / total
        bounds.append((edge, split))
    openings = dialogue_openings(table, OPENING_TURNS.get(corpus, 2))
    # The scraped corpora's openings are keyed up to case, punctuation and markup, so near-duplicates land
    # together (the same key as the judge's halves); the others' exact openings stay the keys.
    normal = normalized_text if corpus in NORMALIZED_KEYS else (lambda turn: turn)
    keys = {dialogue_id: "\n".join(normal(turn) for turn in opening) for dialogue_id, opening in openings.items()}
    split_of = {dialogue_id: next((s for bound, s in bounds if hash_unit(corpus, key) < bound), targets[-1])
                for dialogue_id, key in keys.items()}
    assigned = [split_of[dialogue_id] for dialogue_id in table.column("dialogue_id").to_pylist()]
    moved = pa.array([a != s for a, s in zip(assigned, table.column("split").to_pylist())], pa.bool_())
    table = table.set_column(table.schema.get_field_index("derived_split"), "derived_split", moved)
    return {split: table.filter(pa.array([a == split for a in assigned], pa.bool_())) for split in targets}


def derive_splits(rows_by_split: dict[str, pa.Table], corpus: str, fractions: dict[str, float]) -> dict[str, str]:
    """Fill the splits a source lacks from its largest split (the donor), shared between the donor and
    the missing splits in proportion to `fractions` by `partition`. Mutates `rows_by_split` and returns
    a description of each derived split for stats.json."""
    missing = [s for s in SPLITS if s not in rows_by_split]
    if not missing:
        return {}
    donor = max(rows_by_split, key=lambda s: (rows_by_split[s].num_rows, s))
    targets = [s for s in SPLITS if s in missing or s == donor]
    rows_by_split.update(partition(rows_by_split[donor], corpus, targets, fractions))
    total = sum(fractions[s] for s in targets)
    return {s: f"from {donor} by a hash of each dialogue's opening (share {fractions[s] / total:.3f})"
            for s in missing}


def resplit(table: pa.Table, corpus: str, fractions: dict[str, float],
            counts: Counter) -> tuple[dict[str, pa.Table], dict[str, str]]:
    """Split all of a `RESPLIT` corpus's rows anew by `partition`, whatever split their source gave
    them (their `split` column); rows that move are counted. Returns the splits and a description of
    each for stats.json."""
    rows_by_split = partition(table, corpus, list(SPLITS), fractions)
    moved = sum(pc.sum(part.column("derived_split")).as_py() or 0 for part in rows_by_split.values())
    if moved:
        counts["changed: moved to another split (the source's split is ignored)"] += moved
    described = {s: f"all rows by a hash of each dialogue's opening, the source's split ignored: "
                    f"{RESPLIT[corpus]} (share {fractions[s]:.3f})" for s in SPLITS}
    return rows_by_split, described


def context_digest(turns: list[str]) -> bytes:
    """A fixed-size key for a context (cleaned turns hold no control characters, so \\x1f separates)."""
    return hashlib.sha1("\x1f".join(turns).encode("utf-8")).digest()


def drop_shared_contexts(rows_by_split: dict[str, pa.Table], counts: Counter) -> None:
    """Keep a context (the same list of turns) that several splits hold only in the most held-out of
    them (`HELD_OUT_FIRST`); drop, and count, its rows in the others. Mutates `rows_by_split`."""
    owner: dict[bytes, str] = {}
    for split in HELD_OUT_FIRST:
        table = rows_by_split[split]
        digests = [context_digest(turns) for turns in table.column("context").to_pylist()]
        held = [owner.get(digest) for digest in digests]
        for other, n in sorted(Counter(h for h in held if h is not None).items()):
            counts[f"dropped: context also in the {other} split (kept there)"] += n
        rows_by_split[split] = table.filter(pa.array([h is None for h in held], pa.bool_()))
        for digest, h in zip(digests, held):
            if h is None:
                owner[digest] = split


# --- run ------------------------------------------------------------------------------------------


ARROW_CHUNK = 4096  # rows turned into Arrow at a time, so the Python row dicts never pile up


def normalized_rows(table: pa.Table, corpus: str, split: str, config: NormalizeConfig,
                    counts: Counter) -> Iterator[Row]:
    """Normalize and clean one raw split of one corpus, one output row at a time (the pure worker);
    a row is in `split` unless its normalizer gives its own (MIC's rows: their annotation's)."""
    for row in NORMALIZERS[corpus](table, split, counts):
        cleaned = clean_row(row, config, counts)
        if cleaned is not None:
            yield {"corpus": corpus, "split": split, **cleaned, "derived_split": False}


def normalize_split(table: pa.Table, corpus: str, split: str, config: NormalizeConfig, counts: Counter) -> list[Row]:
    """`normalized_rows` as a list."""
    return list(normalized_rows(table, corpus, split, config, counts))


def normalize_split_table(table: pa.Table, corpus: str, split: str, config: NormalizeConfig,
                          counts: Counter) -> pa.Table:
    """`normalized_rows` as a NORMALIZED table, converted `ARROW_CHUNK` rows at a time: an output row
    repeats its context, so a corpus's rows as Python dicts take many times its Arrow size."""
    batches, chunk = [], []
    for row in normalized_rows(table, corpus, split, config, counts):
        chunk.append(row)
        if len(chunk) == ARROW_CHUNK:
            batches.append(pa.RecordBatch.from_pylist(chunk, schema=NORMALIZED))
            chunk = []
    batches.append(pa.RecordBatch.from_pylist(chunk, schema=NORMALIZED))
    return pa.Table.from_batches(batches, schema=NORMALIZED).combine_chunks()


def unaccounted(read: int, rows_by_split: dict[str, pa.Table], counts: Counter) -> int:
    """Units read that are neither a row written nor counted as dropped or context only (0 when none)."""
    used = sum(n for reason, n in counts.items() if reason.startswith(("dropped:", "context only:")))
    return read - used - sum(table.num_rows for table in rows_by_split.values())


def read_provenance(path: Path) -> dict:
    """The download stage's stats.json (source, revision, commit); {} when there is none."""
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise DataError(f"{path}: not valid JSON ({error}); run the download stage again") from None


def run(config: NormalizeConfig, corpus: str, raw: Path, out: Path) -> dict:
    """Normalize every raw split of `corpus` in `raw` and write the three splits to `out`."""
    if corpus not in CORPORA:
        raise DataError(f"unknown corpus {corpus!r} (known: {', '.join(CORPORA)})")
    ensure_writable(out)
    files = {split: raw / f"{split}.parquet" for split in SPLITS if (raw / f"{split}.parquet").is_file()}
    if not files:
        raise DataError(f"{raw}: no raw split files for {corpus} (run the download stage first)")
    provenance = read_provenance(raw / "stats.json")
    unit, units_in = READ_UNITS[corpus]
    counts: Counter = Counter()
    rows_by_split, raw_files, read, pooled = {}, {}, 0, []
    for split, path in files.items():  # one raw split in memory at a time (MIC: all); the output kept as Arrow
        table = read_raw(path, corpus)
        if table.num_rows == 0:
            raise DataError(f"{path}: file has no rows")
        raw_files[split] = {"sha256": sha256(path), "rows": table.num_rows}
        read += units_in(table)
        if corpus in RESPLIT:  # read together below, each row marked with its file's split
            pooled.append(table.set_column(table.schema.get_field_index("split"), "split",
                                           pa.array([split] * table.num_rows, pa.string())))
        else:
            try:
                rows_by_split[split] = normalize_split_table(table, corpus, split, config, counts)
            except DataError as error:  # a malformed row: the normalizer names the row, this the file
                raise DataError(f"{path}: {error}") from None
        del table
    if pooled:
        table = normalize_split_table(pa.concat_tables(pooled), corpus, "train", config, counts)
        del pooled
        rows_by_split, derived = resplit(table, corpus, config.split_fractions, counts)
    else:
        derived = derive_splits(rows_by_split, corpus, config.split_fractions)
    drop_shared_contexts(rows_by_split, counts)
    lost = unaccounted(read, rows_by_split, counts)
    if lost:  # a normalizer that drops without counting is a bug, not bad data
        raise RuntimeError(f"normalize {corpus}: {lost} of {read} {unit} read are not accounted for")
    stats = {
        "corpus": corpus,
        "source": provenance.get("source", "unknown"),
        "revision": provenance.get("revision"),
        "commit": provenance.get("commit"),
        "raw_files": raw_files,
        "read": {"unit": unit, "count": read},
        "rows": {}, "dialogues": {},
        "derived_splits": derived,
        "counts": dict(sorted(counts.items())),
    }
    with staged_dir(out) as folder:
        for split in SPLITS:
            rows = rows_by_split.pop(split)
            rows = rows.set_column(rows.schema.get_field_index("split"), "split",
                                   pa.array([split] * rows.num_rows, pa.string()))
            write_parquet(rows, folder / f"{split}.parquet")
            stats["rows"][split] = rows.num_rows
            stats["dialogues"][split] = len(set(rows.column("dialogue_id").to_pylist()))
        write_json(stats, folder / "stats.json")
    log.info("normalize %s: %s -> %s", corpus, stats["rows"], out)
    return stats
