"""The `normalize` stage: every normalizer on hand-made rows, on the bundled sample and on the real rows
in ../shared/mirror, checked against invariants recomputed here from the raw files."""

import hashlib
import json
import random
from collections import Counter, defaultdict
from functools import cache
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.config import CORPORA, DIALOG_SAFETY_CORPORA, SPLITS, NormalizeConfig
from pipeline.labels import DIASAFETY_CATEGORIES, REPLY_LABELS, SAFETY_LABELS
from pipeline.schemas import NORMALIZED, RAW, read_table
from pipeline.stages import normalize
from pipeline.stages.normalize import derive_splits, normalize_split

OPENING = "context only: opening utterance of a dialogue"
SINGLE = "dropped: dialogue of a single utterance (no reply to pair it with)"
SHARED = {f"dropped: context also in the {split} split (kept there)" for split in ("test", "validation")}

# Control characters (Unicode category Cc) become spaces; runs of whitespace one space.
_CONTROL_TO_SPACE = {code: " " for code in [*range(0x00, 0x20), *range(0x7F, 0xA0)]}


def clean(text, max_chars: int) -> str:
    """What the normalizer should make of a raw text, written independently of its regexes."""
    if text is None:
        return ""
    return " ".join(text.translate(_CONTROL_TO_SPACE).split())[:max_chars].rstrip()


@cache
def _read(path: str) -> list[dict]:
    return read_table(Path(path)).to_pylist()


def raw_rows(base: Path, corpus: str) -> dict[str, list[dict]]:
    """The raw rows `download` wrote, per split the source has."""
    return {p.stem: _read(str(p)) for p in sorted((base / "raw" / corpus).glob("*.parquet"))}


def normalized(base: Path, corpus: str) -> tuple[dict, dict[str, list[dict]]]:
    folder = base / "normalized" / corpus
    stats = json.loads((folder / "stats.json").read_text())
    return stats, {split: _read(str(folder / f"{split}.parquet")) for split in SPLITS}


def shared_drops(stats: dict) -> int:
    """Rows dropped because another split holds the same context (see tests/test_splits.py)."""
    return sum(n for key, n in stats["counts"].items() if key in SHARED)


def source_of(dialogue_id: str) -> tuple[str, str]:
    """(source split, source id or row) of a `<source split>-<id>` dialogue id."""
    split, _, source_id = dialogue_id.partition("-")
    return split, source_id


@pytest.fixture(params=["sample", "mirror"])
def built(request) -> Path:
    """The bundled sample or the shared mirror (skipped when absent), after download and normalize."""
    return request.getfixturevalue(f"{request.param}_data_dir")


# --- every corpus -----------------------------------------------------------------------------------


@pytest.mark.parametrize("corpus", CORPORA)
def test_outputs_share_one_schema_and_invariants(built, corpus, normalize_config):
    stats, rows = normalized(built, corpus)
    max_chars, window = normalize_config.max_chars, normalize_config.max_context_turns
    split_of_dialogue, texts = {}, set()
    for split in SPLITS:
        table = read_table(built / "normalized" / corpus / f"{split}.parquet")
        assert table.schema.equals(NORMALIZED)
        assert stats["rows"][split] == table.num_rows
        ids = {row["dialogue_id"] for row in rows[split]}
        assert stats["dialogues"][split] == len(ids)
        for dialogue_id in ids:  # whole dialogues stay in one split
            assert split_of_dialogue.setdefault(dialogue_id, split) == split
        derived = split in stats["derived_splits"]
        for row in rows[split]:
            assert row["corpus"] == corpus and row["split"] == split
            if corpus != "mic":  # MIC is split anew: only the rows that moved are derived (test_splits.py)
                assert row["derived_split"] is derived
            if corpus not in ("mic", "diasafety"):  # their ids hash the question / the context
                assert source_of(row["dialogue_id"])[0] in stats["raw_files"]
            assert 1 <= len(row["context"]) <= window
            texts.update([row["response"], *row["context"], *row["rots"], *row["persona"],
                          *(n["text"] for n in row["unacceptable_responses"]), *([row["emotion"]] if row["emotion"] else [])])
            assert (row["safety_label"] in SAFETY_LABELS) if corpus == "prosocial_dialog" else row["safety_label"] is None
            assert (row["emotion"] is not None) == (corpus == "empathetic_dialogues")
            assert bool(row["persona"]) == (corpus in ("persona_chat", "blended_skill_talk"))
            assert not row["unacceptable_responses"] or corpus == "mic"
            # the reply's human label: DiaSafety (with its category) and ToxiChat (with who replied) only
            assert (row["reply_label"] in REPLY_LABELS) if corpus in DIALOG_SAFETY_CORPORA else row["reply_label"] is None
            assert (row["reply_category"] in DIASAFETY_CATEGORIES) if corpus == "diasafety" else row["reply_category"] is None
            assert (row["responder"] in ("human", "dialogpt", "gpt3")) if corpus == "toxichat" else row["responder"] is None
    for text in texts:  # no empty texts; all cleaned (no control characters, single spaces, cut)
        assert text and text == clean(text, max_chars), text
    keys = [(row["dialogue_id"], row["turn_index"]) for split in SPLITS for row in rows[split]]
    assert len(keys) == len(set(keys))
    assert all(key.split(":")[0] in ("dropped", "context only", "changed", "kept", "empty") for key in stats["counts"])


@pytest.mark.parametrize("corpus", CORPORA)
def test_stats_record_provenance_and_raw_checksums(built, corpus):
    stats, _ = normalized(built, corpus)
    raw_folder = built / "raw" / corpus
    download_stats = json.loads((raw_folder / "stats.json").read_text())
    assert stats["corpus"] == corpus
    assert stats["source"] == download_stats["source"] and stats["revision"] == download_stats.get("revision")
    assert stats["raw_files"] == {
        p.stem: {"rows": pq.read_metadata(p).num_rows, "sha256": hashlib.sha256(p.read_bytes()).hexdigest()}
        for p in raw_folder.glob("*.parquet")}
    missing = sorted(set(SPLITS) - set(stats["raw_files"]))
    assert sorted(stats["derived_splits"]) == (sorted(SPLITS) if corpus == "mic" else missing)


def test_the_sample_has_every_split_and_enough_dialogues(sample_data_dir):
    for corpus in CORPORA:
        stats, _ = normalized(sample_data_dir, corpus)
        assert (stats["derived_splits"] == {}) is (corpus != "mic")  # MIC is split anew by question
        assert all(stats["rows"][split] > 0 for split in SPLITS), corpus
        # DiaSafety's and ToxiChat's samples are fewer contexts and threads, with several replies each
        assert sum(stats["dialogues"].values()) >= (15 if corpus in DIALOG_SAFETY_CORPORA else 40), corpus


# --- DailyDialog ------------------------------------------------------------------------------------


def test_daily_dialog_keeps_every_utterance_after_the_first_as_a_reply(built, normalize_config):
    raw = raw_rows(built, "daily_dialog")
    stats, rows = normalized(built, "daily_dialog")
    max_chars, window = normalize_config.max_chars, normalize_config.max_context_turns
    dialogs = [row["dialog"] for split_rows in raw.values() for row in split_rows]
    quirks = sum(len(row["act"]) != len(row["dialog"]) or len(row["emotion"]) != len(row["dialog"])
                 for split_rows in raw.values() for row in split_rows)
    assert quirks == 1  # the one known line (train) whose label count differs; the sample has one too
    assert stats["counts"].get("kept: act/emotion label count differs from utterance count") == quirks
    # Nothing is dropped but contexts that another split also holds (none in the sample; on the
    # mirror, validation repeats training dialogues).
    assert {key for key in stats["counts"] if key.startswith("dropped")} <= SHARED
    assert (shared_drops(stats) == 0) is built.name.startswith("sample")
    assert sum(stats["rows"].values()) + shared_drops(stats) == sum(len(dialog) - 1 for dialog in dialogs)
    assert stats["counts"][OPENING] == len(dialogs)

    # Every row is the utterance at its turn index, in the window of the ones before it; with the
    # count above and unique (dialogue_id, turn_index), each utterance after the first is one reply.
    for split_rows in rows.values():
        for row in split_rows:
            source, index = source_of(row["dialogue_id"])
            dialog = [clean(u, max_chars) for u in raw[source][int(index)]["dialog"]]
            turn = row["turn_index"]
            assert 1 <= turn and row["response"] == dialog[turn] and row["context"] == dialog[:turn][-window:]


# --- EmpatheticDialogues ----------------------------------------------------------------------------


def test_empathetic_dialogues_unescapes_commas_and_keeps_the_emotion(built, normalize_config):
    raw = raw_rows(built, "empathetic_dialogues")
    stats, rows = normalized(built, "empathetic_dialogues")
    max_chars, window = normalize_config.max_chars, normalize_config.max_context_turns
    assert any("_comma_" in row["utterance"] for split_rows in raw.values() for row in split_rows)  # the quirk
    conversations = defaultdict(list)
    for split, split_rows in raw.items():
        for row in split_rows:
            conversations[f"{split}-{row['conv_id']}"].append(row)
    singles = sum(len(turns) == 1 for turns in conversations.values())
    if built.name.startswith("sample"):
        assert singles == 1  # a conversation of one utterance, as real rows have
    assert stats["counts"].get(SINGLE, 0) == singles
    assert stats["counts"][OPENING] == len(conversations) - singles

    read = sum(len(turns) for turns in conversations.values())
    assert sum(stats["rows"].values()) + shared_drops(stats) == read - len(conversations)
    all_rows = [row for split_rows in rows.values() for row in split_rows]
    assert not [row for row in all_rows if "_comma_" in json.dumps(row)]
    assert {row["emotion"] for row in all_rows} == {turns[0]["context"] for turns in conversations.values()}
    assert any("," in row["response"] for row in all_rows)
    for row in all_rows:
        turns = sorted(conversations[row["dialogue_id"]], key=lambda r: r["utterance_idx"])
        utterances = [clean(r["utterance"].replace("_comma_", ","), max_chars) for r in turns]
        position = [r["utterance_idx"] for r in turns].index(row["turn_index"])
        assert position >= 1 and row["response"] == utterances[position]
        assert row["context"] == utterances[:position][-window:]
        assert row["emotion"] == turns[0]["context"]


def test_a_conversation_of_one_utterance_is_counted():
    rows = [{"conv_id": "a", "utterance_idx": 1, "utterance": "Alone here.", "context": "lonely"},
            {"conv_id": "b", "utterance_idx": 1, "utterance": "I won!", "context": "proud"},
            {"conv_id": "b", "utterance_idx": 2, "utterance": "Great!", "context": "proud"},
            {"conv_id": "b", "utterance_idx": 3, "utterance": "Thanks.", "context": "proud"}]
    table = pa.Table.from_pylist([{name: row.get(name) for name in RAW["empathetic_dialogues"].names} for row in rows],
                                 schema=RAW["empathetic_dialogues"])
    counts = Counter()
    out = normalize_split(table, "empathetic_dialogues", "test", NormalizeConfig(), counts)
    assert [(r["dialogue_id"], r["context"], r["response"]) for r in out] == [
        ("test-b", ["I won!"], "Great!"), ("test-b", ["I won!", "Great!"], "Thanks.")]
    # 4 utterances read: 2 replies, conversation b's opening (context only), conversation a (dropped).
    assert counts == Counter({SINGLE: 1, OPENING: 1})


# --- PersonaChat ------------------------------------------------------------------------------------


def test_persona_chat_replies_with_the_last_candidate(built, normalize_config):
    raw = [(split, row) for split, split_rows in raw_rows(built, "persona_chat").items() for row in split_rows]
    stats, rows = normalized(built, "persona_chat")
    by_key = {(row["dialogue_id"], row["turn_index"]): row for split_rows in rows.values() for row in split_rows}
    assert {key for key in stats["counts"] if key.startswith("dropped")} <= SHARED
    assert len(by_key) + shared_drops(stats) == len(raw)
    max_chars = normalize_config.max_chars
    for split, row in raw:
        out = by_key.get((f"{split}-{row['conv_id']}", row["utterance_idx"]))
        if out is None:  # dropped: another split holds its context
            continue
        assert out["response"] == clean(row["candidates"][-1], max_chars)
        assert out["persona"] == [clean(p, max_chars) for p in row["personality"]] and out["persona"]
        assert out["context"] == [clean(h, max_chars) for h in row["history"]][-normalize_config.max_context_turns:]
    if built.name.startswith("sample"):  # the sample has distractors first, so first != last
        assert any(len(row["candidates"]) > 1 and row["candidates"][0] != row["candidates"][-1] for _, row in raw)


# --- BlendedSkillTalk -------------------------------------------------------------------------------


def bst_row(seeds, free, guided, personas=("i like cats.\ni am a nurse.", "i drive a truck.")):
    return {"personas": list(personas), "additional_context": "", "previous_utterance": seeds, "context": "convai2",
            "free_messages": free, "guided_messages": guided, "suggestions": None,
            "guided_chosen_suggestions": [], "label_candidates": []}


def test_blended_skill_talk_interleaves_after_the_seeds():
    table = pa.Table.from_pylist([bst_row(["Seed A", "Seed B"], ["F1", "F2", "F3"], ["G1", "G2"])],
                                 schema=RAW["blended_skill_talk"])
    counts = Counter()
    rows = normalize_split(table, "blended_skill_talk", "validation", NormalizeConfig(max_context_turns=3), counts)
    free, guided = ["i like cats.", "i am a nurse."], ["i drive a truck."]
    assert [(r["turn_index"], r["context"], r["response"], r["persona"]) for r in rows] == [
        (1, ["Seed A"], "Seed B", guided),  # the seed before the free speaker's first message is the guided one's
        (2, ["Seed A", "Seed B"], "F1", free),
        (3, ["Seed A", "Seed B", "F1"], "G1", guided),
        (4, ["Seed B", "F1", "G1"], "F2", free),
        (5, ["F1", "G1", "F2"], "G2", guided),
        (6, ["G1", "F2", "G2"], "F3", free),
    ]
    assert counts == Counter({OPENING: 1})


def test_blended_skill_talk_without_seeds_and_with_uneven_messages():
    table = pa.Table.from_pylist([bst_row([], ["F1", "F2"], ["G1", "G2"]), bst_row(["", ""], ["F1"], ["G1", "G2", "G3"])],
                                 schema=RAW["blended_skill_talk"])
    counts = Counter()
    rows = normalize_split(table, "blended_skill_talk", "train", NormalizeConfig(), counts)
    assert [(r["dialogue_id"], r["context"], r["response"], r["persona"][0]) for r in rows] == [
        ("train-0", ["F1"], "G1", "i drive a truck."),
        ("train-0", ["F1", "G1"], "F2", "i like cats."),
        ("train-0", ["F1", "G1", "F2"], "G2", "i drive a truck."),
        ("train-1", ["F1"], "G1", "i drive a truck."),  # cut at the shorter side, and counted
    ]
    # 10 utterances read: 4 replies, 2 openings, the 2 empty seeds and G2, G3 past the alternation.
    assert counts == Counter({"kept: free/guided message counts differ (alternation cut at the shorter)": 1,
                              "dropped: message past the end of the free/guided alternation": 2,
                              "dropped: empty seed utterance": 2, OPENING: 2})


def test_blended_skill_talk_keeps_every_message(built, normalize_config):
    raw = [row for split_rows in raw_rows(built, "blended_skill_talk").values() for row in split_rows]
    stats, rows = normalized(built, "blended_skill_talk")
    max_chars = normalize_config.max_chars
    expected, uneven = Counter(), 0
    for row in raw:
        seeds, free, guided = [s for s in row["previous_utterance"] if s], row["free_messages"], row["guided_messages"]
        if len(free) not in (len(guided), len(guided) + 1):
            uneven += 1
            free, guided = free[:min(len(free), len(guided))], guided[:min(len(free), len(guided))]
        turns = seeds + free + guided
        expected.update(clean(t, max_chars) for t in turns[1:])  # every turn but the opening one is a reply
    assert stats["counts"].get("kept: free/guided message counts differ (alternation cut at the shorter)", 0) == uneven
    replies = Counter(row["response"] for split_rows in rows.values() for row in split_rows)
    assert not replies - expected and sum((expected - replies).values()) == shared_drops(stats)
    assert sum(stats["dialogues"].values()) == len(raw)


# --- ProsocialDialog --------------------------------------------------------------------------------


def prosocial_row(dialogue_id, response_id, context, response, label, rots):
    return {"context": context, "response": response, "rots": rots, "safety_label": label,
            "safety_annotations": [], "safety_annotation_reasons": [], "source": "sbic", "etc": "",
            "dialogue_id": dialogue_id, "response_id": response_id, "episode_done": False}


PROSOCIAL_ROWS = [  # dialogue 7 given out of order, and a one-turn dialogue 3
    prosocial_row(7, 2, "U2", "R2", "__needs_intervention__", []),
    prosocial_row(3, 0, "Other", "Reply", "__casual__", ["r"]),
    prosocial_row(7, 0, "U0", "R0", "__needs_caution__", ["rot0"]),
    prosocial_row(7, 1, "U1", "R1", "__possibly_needs_caution__", ["rot1a", "rot1b"]),
]


def test_prosocial_dialog_rebuilds_the_history_in_response_id_order():
    table = pa.Table.from_pylist(PROSOCIAL_ROWS, schema=RAW["prosocial_dialog"])
    counts = Counter()
    rows = normalize_split(table, "prosocial_dialog", "train", NormalizeConfig(), counts)
    assert [(r["dialogue_id"], r["turn_index"], r["context"], r["response"], r["rots"], r["safety_label"])
            for r in rows] == [
        ("train-3", 0, ["Other"], "Reply", ["r"], "__casual__"),
        ("train-7", 0, ["U0"], "R0", ["rot0"], "__needs_caution__"),
        ("train-7", 1, ["U0", "R0", "U1"], "R1", ["rot1a", "rot1b"], "__possibly_needs_caution__"),
        ("train-7", 2, ["U0", "R0", "U1", "R1", "U2"], "R2", [], "__needs_intervention__"),
    ]
    assert counts == Counter()
    # The window keeps the newest turns.
    rows = normalize_split(table, "prosocial_dialog", "train", NormalizeConfig(max_context_turns=2), Counter())
    assert rows[-1]["context"] == ["R1", "U2"]


def test_prosocial_dialog_counts_duplicates_and_unknown_labels():
    table = pa.Table.from_pylist(PROSOCIAL_ROWS + [prosocial_row(7, 1, "again", "again", "__casual__", []),
                                                   prosocial_row(9, 0, "U", "R", "__unsafe__", [])],
                                 schema=RAW["prosocial_dialog"])
    counts = Counter()
    rows = normalize_split(table, "prosocial_dialog", "train", NormalizeConfig(), counts)
    assert len(rows) == 5 and rows[-1]["safety_label"] is None
    assert counts == Counter({"dropped: duplicate (dialogue_id, response_id)": 1,
                              "changed: unknown safety_label set to null": 1})


def test_prosocial_dialog_on_real_and_sample_rows(built, normalize_config):
    raw = sorted(((f"{split}-{row['dialogue_id']}", row)
                  for split, split_rows in raw_rows(built, "prosocial_dialog").items() for row in split_rows),
                 key=lambda item: (item[0], item[1]["response_id"]))
    stats, rows = normalized(built, "prosocial_dialog")
    by_key = {(row["dialogue_id"], row["turn_index"]): row for split_rows in rows.values() for row in split_rows}
    assert len(by_key) == len(raw) == sum(stats["rows"].values())
    max_chars, history, previous = normalize_config.max_chars, [], None
    for dialogue_id, row in raw:
        if dialogue_id != previous:
            history, previous = [], dialogue_id
        history.append(clean(row["context"], max_chars))
        out = by_key[(dialogue_id, row["response_id"])]
        assert out["context"] == history[-normalize_config.max_context_turns:]
        assert out["response"] == clean(row["response"], max_chars)
        assert out["rots"] == [clean(r, max_chars) for r in row["rots"]]
        assert out["safety_label"] == row["safety_label"]
        history.append(out["response"])
    if built.name.startswith("sample"):
        assert {row["safety_label"] for _, row in raw} == set(SAFETY_LABELS)


# --- MIC --------------------------------------------------------------------------------------------


def mic_row(question, answer, a_agrees, severity, worker_answer, rot):
    return {"chatbot": "bot", "Q": question, "A": answer, "rot": rot, "moral": "care", "rot-agree": 4,
            "violation-severity": severity, "worker_answer": worker_answer, "A_agrees": a_agrees,
            "QA": f"{question} {answer}", "split": "train"}


def test_mic_collects_violating_answers_with_their_worst_severity():
    rows = [
        mic_row("Q?", "Bad one.", 0, 2, "Kind reply.", "Be kind."),
        mic_row("Q?", "Bad one.", 0, 4, "", "Be fair."),  # same answer, worse severity; no worker answer
        mic_row("Q?", "Fine one.", 2, 1, "Another reply.", "Be calm."),
        mic_row("Q?", "Meh one.", 1, 5, "Kind reply.", "Be kind."),  # duplicate (worker_answer, rot)
        mic_row("Q?", "Also bad.", 0, None, "Third reply.", None),
        mic_row("Other?", "Rude.", 0, 3, "Polite.", "Be polite."),
    ]
    counts = Counter()
    out = normalize_split(pa.Table.from_pylist(rows, schema=RAW["mic"]), "mic", "train", NormalizeConfig(), counts)
    bad = [{"text": "Also bad.", "severity": 3}, {"text": "Bad one.", "severity": 4}]
    assert [(r["turn_index"], r["context"], r["response"], r["rots"], r["unacceptable_responses"]) for r in out] == [
        (0, ["Other?"], "Polite.", ["Be polite."], [{"text": "Rude.", "severity": 3}]),
        (0, ["Q?"], "Kind reply.", ["Be kind."], bad),
        (2, ["Q?"], "Another reply.", ["Be calm."], bad),
        (4, ["Q?"], "Third reply.", [], bad),
    ]
    assert counts == Counter({"dropped: empty worker_answer": 1,
                              "dropped: duplicate (worker_answer, rot) for a question": 1,
                              "changed: violating answer without violation-severity set to 3": 1})


def test_mic_sample(sample_data_dir, normalize_config):
    raw = [row for split_rows in raw_rows(sample_data_dir, "mic").values() for row in split_rows]
    stats, rows = normalized(sample_data_dir, "mic")
    max_chars = normalize_config.max_chars
    assert {row["A_agrees"] for row in raw} == {0, 1, 2}
    assert len({row["violation-severity"] for row in raw if row["A_agrees"] == 0}) >= 3

    empty = sum(not (row["worker_answer"] or "").strip() for row in raw)
    assert empty > 0 and stats["counts"]["dropped: empty worker_answer"] == empty
    by_question = defaultdict(list)
    for row in raw:
        by_question[clean(row["Q"], max_chars)].append(row)
    kept = sum(len({(r["worker_answer"], r["rot"]) for r in group if (r["worker_answer"] or "").strip()})
               for group in by_question.values())
    assert sum(stats["rows"].values()) == kept
    for split_rows in rows.values():
        for out in split_rows:
            worst = {}
            for row in by_question[out["context"][0]]:
                if row["A_agrees"] == 0:
                    text = clean(row["A"], max_chars)
                    worst[text] = max(worst.get(text, 0), row["violation-severity"])
            expected = {(text, sev) for text, sev in worst.items() if text.lower() != out["response"].lower()}
            assert {(n["text"], n["severity"]) for n in out["unacceptable_responses"]} == expected


# --- derived splits ---------------------------------------------------------------------------------


def normalized_table(rows: list[dict]) -> pa.Table:
    """A NORMALIZED table of `rows` (dialogue_id, turn_index, context, response; the rest filled in)."""
    filled = {"corpus": "daily_dialog", "split": "validation", "rots": [], "safety_label": None, "persona": [],
              "emotion": None, "unacceptable_responses": [], "derived_split": False}
    return pa.Table.from_pylist([{**filled, **row} for row in rows], schema=NORMALIZED)


def test_derived_splits_are_deterministic_and_keep_dialogues_whole():
    turns = lambda i: [f"hi {i}", f"yo {i}", f"bye {i}"]  # noqa: E731
    rows = [{"dialogue_id": f"d{i}", "turn_index": t, "context": turns(i)[:t], "response": turns(i)[t]}
            for i in range(2000) for t in (1, 2)]
    fractions = {"train": 0.5, "validation": 0.25, "test": 0.25}
    first = {"validation": normalized_table(rows)}
    described = derive_splits(first, "daily_dialog", fractions)
    shuffled = list(rows)
    random.Random(0).shuffle(shuffled)
    second = {"validation": normalized_table(shuffled)}
    derive_splits(second, "daily_dialog", fractions)

    assert sorted(described) == ["test", "train"] and "from validation" in described["train"]
    split_of = {}
    for split in SPLITS:
        ids = first[split].column("dialogue_id").to_pylist()
        assert set(ids) == set(second[split].column("dialogue_id").to_pylist())
        assert first[split].column("derived_split").to_pylist() == [split != "validation"] * len(ids)
        for dialogue_id in ids:
            assert split_of.setdefault(dialogue_id, split) == split
        assert len(ids) / len(rows) == pytest.approx(fractions[split], abs=0.04)
    # The split is a hash of the opening (first utterance and its reply): the sha1 of
    # "daily_dialog:hi <i>\nyo <i>", its first 12 hex digits as a fraction, against the bounds 0.5, 0.75.
    for i in (0, 1, 2, 3):
        unit = int(hashlib.sha1(f"daily_dialog:hi {i}\nyo {i}".encode()).hexdigest()[:12], 16) / 16**12
        assert split_of[f"d{i}"] == ("train" if unit < 0.5 else "validation" if unit < 0.75 else "test")
    # Present splits are left alone.
    assert derive_splits({s: normalized_table([]) for s in SPLITS}, "daily_dialog", fractions) == {}


def test_derived_splits_on_the_mirror(mirror_data_dir):
    raw = raw_rows(mirror_data_dir, "daily_dialog")
    stats, rows = normalized(mirror_data_dir, "daily_dialog")
    assert sorted(stats["derived_splits"]) == ["test"] and "from train" in stats["derived_splits"]["test"]
    # Validation keeps its own dialogues (less the few whose every context the derived test holds),
    # train and test share train's; the derived test holds about 0.1 / 0.9 of train's dialogues.
    ids = {split: {row["dialogue_id"] for row in rows[split]} for split in SPLITS}
    assert {source_of(i)[0] for i in ids["validation"]} == {"validation"}
    assert {source_of(i)[0] for i in ids["train"] | ids["test"]} == {"train"}
    assert len(raw["validation"]) - 15 <= stats["dialogues"]["validation"] <= len(raw["validation"])
    assert len(raw["train"]) - 100 <= stats["dialogues"]["train"] + stats["dialogues"]["test"] <= len(raw["train"])
    assert stats["dialogues"]["test"] / len(raw["train"]) == pytest.approx(0.1 / 0.9, abs=0.015)

    raw = raw_rows(mirror_data_dir, "persona_chat")
    stats, _ = normalized(mirror_data_dir, "persona_chat")
    assert list(raw) == ["validation"] and sorted(stats["derived_splits"]) == ["test", "train"]
    conversations = len({row["conv_id"] for row in raw["validation"]})
    assert sum(stats["dialogues"].values()) == conversations
    for split, share in (("train", 0.8), ("validation", 0.1), ("test", 0.1)):
        assert stats["dialogues"][split] / conversations == pytest.approx(share, abs=0.04), split


# --- nothing dropped silently -----------------------------------------------------------------------

# What `read` counts per corpus, recomputed from one raw row.
UNITS_IN_ROW = {
    "prosocial_dialog": ("rows", lambda row: 1),
    "mic": ("rows", lambda row: 1),
    "daily_dialog": ("utterances", lambda row: len(row["dialog"] or [])),
    "persona_chat": ("rows", lambda row: 1),
    "empathetic_dialogues": ("rows", lambda row: 1),
    "blended_skill_talk": ("utterances", lambda row: sum(len(row[c] or []) for c in (
        "previous_utterance", "free_messages", "guided_messages"))),
    "diasafety": ("rows", lambda row: 1),
    "toxichat": ("turns", lambda row: len(row["reddit_thread"] or []) + 2),  # its Reddit turns, two chatbot replies
}


@pytest.mark.parametrize("corpus", CORPORA)
def test_every_unit_read_is_a_row_or_counted(built, corpus):
    unit, units_in = UNITS_IN_ROW[corpus]
    read = sum(units_in(row) for split_rows in raw_rows(built, corpus).values() for row in split_rows)
    stats, _ = normalized(built, corpus)
    assert stats["read"] == {"unit": unit, "count": read}
    unused = sum(n for key, n in stats["counts"].items() if key.startswith(("dropped:", "context only:")))
    assert sum(stats["rows"].values()) + unused == read


def test_a_normalizer_that_loses_rows_silently_stops_the_run(raw_sample_dir, tmp_path, monkeypatch):
    real = normalize.NORMALIZERS["daily_dialog"]

    def losing_turn_2(table, split, counts):
        return (row for row in real(table, split, counts) if row["turn_index"] != 2)

    monkeypatch.setitem(normalize.NORMALIZERS, "daily_dialog", losing_turn_2)
    with pytest.raises(RuntimeError, match=r"normalize daily_dialog: 40 of \d+ utterances read are not accounted for"):
        normalize.run(NormalizeConfig(), "daily_dialog", raw_sample_dir / "daily_dialog", tmp_path / "out")
    assert not (tmp_path / "out").exists()


# --- cleaning ---------------------------------------------------------------------------------------


def test_control_characters_and_long_text_are_cleaned_and_counted():
    dialog = ["Hi\x07 there", "Fine\u0085 thanks\t!", "abcdefghijklmno pqrstuvwxyz", "   ", "ok"]
    table = pa.Table.from_pylist([{"dialog": dialog, "act": [1] * 5, "emotion": [0] * 5}], schema=RAW["daily_dialog"])
    counts = Counter()
    rows = normalize_split(table, "daily_dialog", "train", NormalizeConfig(max_chars=16), counts)
    assert [(r["context"], r["response"]) for r in rows] == [
        (["Hi there"], "Fine thanks !"),
        (["Hi there", "Fine thanks !"], "abcdefghijklmno"),  # cut at 16 characters, trailing space gone
    ]
    # Changes count once per text in a kept row ("Hi\x07" and "Fine\u0085" are in both kept rows);
    # the two dropped rows count only as dropped.
    assert counts == Counter({"changed: control characters replaced": 4,
                              "changed: text cut to normalize.max_chars": 1,
                              "dropped: empty or null response": 1,
                              "dropped: empty or null turn in the context": 1, OPENING: 1})


# --- run and CLI ------------------------------------------------------------------------------------


def test_outputs_are_byte_identical_across_runs(raw_sample_dir, tmp_path, normalize_config):
    for corpus in CORPORA:
        for name in ("a", "b"):
            normalize.run(normalize_config, corpus, raw_sample_dir / corpus, tmp_path / name / corpus)
        for path in sorted((tmp_path / "a" / corpus).iterdir()):
            assert path.read_bytes() == (tmp_path / "b" / corpus / path.name).read_bytes(), path


def test_normalize_through_the_cli(raw_sample_dir, tmp_path, repo_root):
    out = tmp_path / "normalized" / "mic"
    result = CliRunner().invoke(app, ["normalize", "mic", "--raw", str(raw_sample_dir / "mic"), "--out", str(out),
                                      "--params", str(repo_root / "params.yaml")])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == ["stats.json", "test.parquet", "train.parquet",
                                                     "validation.parquet"]


def good_daily_dialog(path: Path, rows=1):
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist([{"dialog": ["a", "b"], "act": [1, 1], "emotion": [0, 0]}] * rows,
                                        schema=RAW["daily_dialog"]), path)


@pytest.mark.parametrize("case, parts", [
    ("no files", ["no raw split files for daily_dialog"]),
    ("truncated", ["validation.parquet", "not a readable Parquet file"]),
    ("no rows", ["validation.parquet", "no rows"]),
    ("wrong type", ["validation.parquet", "column 'dialog'"]),
    ("unknown corpus", ["unknown corpus 'dailydialog'"]),
])
def test_bad_raw_input_is_one_line_and_leaves_no_output(tmp_path, repo_root, case, parts):
    raw = tmp_path / "raw"
    raw.mkdir()
    if case != "no files":
        good_daily_dialog(raw / "train.parquet")
    if case == "truncated":
        good_daily_dialog(raw / "validation.parquet")
        data = (raw / "validation.parquet").read_bytes()
        (raw / "validation.parquet").write_bytes(data[: len(data) // 2])
    elif case == "no rows":
        good_daily_dialog(raw / "validation.parquet", rows=0)
    elif case == "wrong type":
        pq.write_table(pa.table({"dialog": ["a b"]}), raw / "validation.parquet")
    corpus = "dailydialog" if case == "unknown corpus" else "daily_dialog"
    result = CliRunner().invoke(app, ["normalize", corpus, "--raw", str(raw), "--out", str(tmp_path / "out" / "x"),
                                      "--params", str(repo_root / "params.yaml")])
    assert result.exit_code == 2, (result.output, result.exception)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ")
    for part in parts:
        assert part in lines[0]
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").rglob("*"))
