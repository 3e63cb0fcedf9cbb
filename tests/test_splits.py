"""Splits do not leak: over every corpus, on the bundled sample and on the real rows in ../shared/mirror
(skipped when absent), no dialogue and no context (the same list of turns) is in two splits. MIC is
split by question, the two copies of a PersonaChat conversation (one per speaker) share a split, and
a dialogue stored twice lands in one split."""

import hashlib
import json
from collections import Counter, defaultdict
from pathlib import Path

import pyarrow as pa
import pytest

from pipeline.artifacts import write_parquet
from pipeline.contexts import normalized_text
from pipeline.config import CORPORA, SPLITS, NormalizeConfig
from pipeline.schemas import NORMALIZED, RAW, read_table
from pipeline.stages import normalize

SHARED = "dropped: context also in the {} split (kept there)"


@pytest.fixture(params=["sample", "mirror"])
def built(request) -> Path:
    """The bundled sample or the shared mirror (skipped when absent), after download and normalize."""
    return request.getfixturevalue(f"{request.param}_data_dir")


def output_rows(base: Path, corpus: str) -> dict[str, list[dict]]:
    folder = base / "normalized" / corpus
    return {split: read_table(folder / f"{split}.parquet").to_pylist() for split in SPLITS}


def splits_holding(rows_by_split: dict[str, list[dict]], key) -> dict:
    """For each value of `key(row)`, the set of splits that hold a row with it."""
    holding = defaultdict(set)
    for split, rows in rows_by_split.items():
        for row in rows:
            holding[key(row)].add(split)
    return holding


def in_two_splits(holding: dict) -> list:
    return sorted(key for key, splits in holding.items() if len(splits) > 1)


# --- every corpus -----------------------------------------------------------------------------------


@pytest.mark.parametrize("corpus", CORPORA)
def test_no_dialogue_is_in_two_splits(built, corpus):
    rows = output_rows(built, corpus)
    assert in_two_splits(splits_holding(rows, lambda row: row["dialogue_id"])) == []


@pytest.mark.parametrize("corpus", CORPORA)
def test_no_context_is_in_two_splits(built, corpus):
    rows = output_rows(built, corpus)
    assert in_two_splits(splits_holding(rows, lambda row: tuple(row["context"]))) == []


# --- MIC: split by question -------------------------------------------------------------------------


def test_mic_is_split_by_question(sample_data_dir, normalize_config):
    raw = {split: read_table(sample_data_dir / "raw" / "mic" / f"{split}.parquet").to_pylist() for split in SPLITS}
    # The quirk is in the sample: MIC splits by question-answer pair, so a question sits in two splits.
    assert in_two_splits(splits_holding(raw, lambda row: row["Q"]))
    stats = json.loads((sample_data_dir / "normalized" / "mic" / "stats.json").read_text())
    rows = output_rows(sample_data_dir, "mic")

    fractions = normalize_config.split_fractions
    bounds = [(fractions["train"], "train"), (fractions["train"] + fractions["validation"], "validation")]
    moved = 0
    for split, split_rows in rows.items():
        for row in split_rows:
            (question,) = row["context"]
            # The split is the hash of "mic:<question>": its sha1's first 12 hex digits as a fraction.
            unit = int(hashlib.sha1(f"mic:{question}".encode()).hexdigest()[:12], 16) / 16**12
            assert split == next((s for bound, s in bounds if unit < bound), "test"), question
            # Marked derived when its annotation's file was another split.
            source = {s for s, raw_rows in raw.items() for r in raw_rows
                      if r["Q"] == question and r["worker_answer"] == row["response"]}
            assert len(source) == 1 and row["derived_split"] is (source != {split})
            moved += row["derived_split"]
    assert moved > 0 and stats["counts"]["changed: moved to another split (the source's split is ignored)"] == moved
    assert sorted(stats["derived_splits"]) == sorted(SPLITS)

    # A question's unacceptable replies are gathered from all its annotations, whatever their file.
    for question in in_two_splits(splits_holding(raw, lambda row: row["Q"])):
        violating = {r["A"] for raw_rows in raw.values() for r in raw_rows if r["Q"] == question and r["A_agrees"] == 0}
        kept = [row for split_rows in rows.values() for row in split_rows if row["context"] == [question]]
        assert kept and all({n["text"] for n in row["unacceptable_responses"]} == violating for row in kept)


# --- PersonaChat: one conversation stored once per speaker ------------------------------------------


def persona_chat_views(conversation: int, turns: list[str]) -> list[dict]:
    """Both speakers' rows of one conversation as hub PersonaChat stores them (ParlAI's self_original
    files): the second speaker replies to the odd turns under one conv_id; the first speaker, who
    opens, under another conv_id, after a "__ SILENCE __" partner turn."""
    rows = []
    for view, offset, before in ((0, 1, []), (1, 0, ["__ SILENCE __"])):
        for index, position in enumerate(range(offset, len(turns), 2)):
            rows.append({"personality": [f"persona {view}."], "candidates": ["a distractor.", turns[position]],
                         "history": before + turns[:position], "conv_id": 2 * conversation + view,
                         "utterance_idx": index})
    return rows


def test_the_two_copies_of_a_persona_chat_conversation_share_a_split(tmp_path):
    rows = [row for k in range(60)
            for row in persona_chat_views(k, [f"hello {k} !", f"hi {k} , how are you ?", f"fine {k} .", f"good {k} ."])]
    (tmp_path / "raw").mkdir()
    write_parquet(pa.Table.from_pylist(rows, schema=RAW["persona_chat"]), tmp_path / "raw" / "validation.parquet")
    stats = normalize.run(NormalizeConfig(), "persona_chat", tmp_path / "raw", tmp_path / "out")

    split_of = {}  # conv_id -> split
    for split in SPLITS:
        for dialogue_id in read_table(tmp_path / "out" / f"{split}.parquet").column("dialogue_id").to_pylist():
            split_of[int(dialogue_id.rpartition("-")[2])] = split  # "<source split>-<conv_id>"
    assert len(split_of) == 120
    assert [k for k in range(60) if split_of[2 * k] != split_of[2 * k + 1]] == []
    assert len(set(split_of.values())) == 3  # not all in one split
    # The opener's first reply follows only the placeholder: no context, so dropped (and counted).
    assert stats["counts"] == {"dropped: opening reply to no one (history only __ SILENCE __)": 60}
    assert stats["rows"] == {split: 3 * Counter(split_of.values())[split] // 2 for split in SPLITS}


# --- a dialogue stored twice, and contexts two splits hold ------------------------------------------


def test_a_dialogue_stored_twice_lands_in_one_derived_split(tmp_path):
    dialogs = [[f"Hello {i} .", f"Hi {i} .", f"Bye {i} ."] for i in range(40)]
    (tmp_path / "raw").mkdir()
    train = [{"dialog": dialog, "act": [1] * 3, "emotion": [0] * 3} for dialog in dialogs + dialogs]  # each twice
    write_parquet(pa.Table.from_pylist(train, schema=RAW["daily_dialog"]), tmp_path / "raw" / "train.parquet")
    stats = normalize.run(NormalizeConfig(), "daily_dialog", tmp_path / "raw", tmp_path / "out")
    rows = {split: read_table(tmp_path / "out" / f"{split}.parquet").to_pylist() for split in SPLITS}
    holding = splits_holding(rows, lambda row: tuple(row["context"]))
    assert in_two_splits(holding) == []
    assert not [key for key in stats["counts"] if key.startswith("dropped")]  # kept together, nothing dropped
    assert sum(stats["rows"].values()) == 80 * 2 and stats["rows"]["test"] > 0


def test_near_duplicate_openings_land_in_one_derived_split(tmp_path):
    """DiaSafety's test split is carved from train by a hash of the context: contexts that differ only by
    a leading character, markup, case or punctuation (29 of 745 test contexts did) land together."""
    forms = lambda i: [f"Is it ok to lie to my friend {i}?", f"*is it OK to lie to my friend {i}*",  # noqa: E731
                       f"<b>Is it ok to lie to my friend {i}</b>", f"-Is it ok, to lie to my friend {i}??"]
    raw = [{"context": form, "response": f"reply {j}", "category": "Unauthorized Expertise", "label": "Safe"}
           for i in range(30) for j, form in enumerate(forms(i))]
    (tmp_path / "raw").mkdir()
    write_parquet(pa.Table.from_pylist(raw, schema=RAW["diasafety"]), tmp_path / "raw" / "train.parquet")
    normalize.run(NormalizeConfig(), "diasafety", tmp_path / "raw", tmp_path / "out")
    rows = {split: read_table(tmp_path / "out" / f"{split}.parquet").to_pylist() for split in SPLITS}
    holding = splits_holding(rows, lambda row: normalized_text(row["context"][0]))
    assert len(holding) == 30 and in_two_splits(holding) == []
    assert len({split for splits in holding.values() for split in splits}) > 1  # the draw still splits


def table_of(contexts: list[list[str]], dialogue: str) -> pa.Table:
    rows = [{"corpus": "daily_dialog", "split": "train", "dialogue_id": dialogue, "turn_index": i, "context": context,
             "response": "r", "rots": [], "safety_label": None, "persona": [], "emotion": None,
             "unacceptable_responses": [], "derived_split": False} for i, context in enumerate(contexts)]
    return pa.Table.from_pylist(rows, schema=NORMALIZED)


def test_a_context_in_two_splits_stays_in_the_more_held_out_one():
    rows_by_split = {
        "train": table_of([["Hi ."], ["Hi .", "Yo ."], ["Hi .", "Yo .", "So ?"], ["Hi ."]], "a"),
        "validation": table_of([["Hi ."], ["Hey ."]], "b"),
        "test": table_of([["Hi .", "Yo ."], ["Hey ."]], "c"),
    }
    counts = Counter()
    normalize.drop_shared_contexts(rows_by_split, counts)
    kept = {split: [tuple(c) for c in table.column("context").to_pylist()] for split, table in rows_by_split.items()}
    assert kept == {"test": [("Hi .", "Yo ."), ("Hey .",)], "validation": [("Hi .",)],
                    "train": [("Hi .", "Yo .", "So ?")]}
    # train: two "Hi ." (validation has it), one "Hi . Yo ." (test); validation: "Hey ." (test).
    assert counts == Counter({SHARED.format("validation"): 2, SHARED.format("test"): 2})
