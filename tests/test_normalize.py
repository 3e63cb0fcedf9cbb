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
from pipeline.config import CORPORA, SPLITS, NormalizeConfig
from pipeline.schemas import NORMALIZED, RAW
from pipeline.stages import normalize
from pipeline.labels import SAFETY_LABELS
from pipeline.stages.normalize import derive_splits, normalize_split

# Control characters (Unicode category Cc) become spaces; runs of whitespace one space.
_CONTROL_TO_SPACE = {code: " " for code in [*range(0x00, 0x20), *range(0x7F, 0xA0)]}


def clean(text, max_chars: int) -> str:
    """What the normalizer should make of a raw text, written independently of its regexes."""
    if text is None:
        return ""
    return " ".join(text.translate(_CONTROL_TO_SPACE).split())[:max_chars].rstrip()


@cache
def _read(path: str) -> list[dict]:
    return pq.read_table(path).to_pylist()


def raw_rows(base: Path, corpus: str) -> dict[str, list[dict]]:
    """The raw rows `download` wrote, per split the source has."""
    return {p.stem: _read(str(p)) for p in sorted((base / "raw" / corpus).glob("*.parquet"))}


def normalized(base: Path, corpus: str) -> tuple[dict, dict[str, list[dict]]]:
    folder = base / "normalized" / corpus
    stats = json.loads((folder / "stats.json").read_text())
    return stats, {split: _read(str(folder / f"{split}.parquet")) for split in SPLITS}


def dialogues(rows_by_split: dict[str, list[dict]]) -> dict[str, list[dict]]:
    """Rows grouped by dialogue id (over all splits), each group in turn order."""
    groups = defaultdict(list)
    for rows in rows_by_split.values():
        for row in rows:
            groups[row["dialogue_id"]].append(row)
    return {key: sorted(group, key=lambda r: r["turn_index"]) for key, group in groups.items()}


def rebuilt_turns(group: list[dict]) -> list[str]:
    """A dialogue's utterances from its rows: the first row's context, then every reply in order."""
    return group[0]["context"] + [row["response"] for row in group]


def windows_match(group: list[dict], turns: list[str], window: int, first: int) -> bool:
    """Every row's context is the `window` turns before its reply (the reply at `turns[first + i]`)."""
    return all(row["context"] == turns[max(0, first + i - window): first + i] for i, row in enumerate(group))


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
        table = pq.read_table(built / "normalized" / corpus / f"{split}.parquet")
        assert table.schema.equals(NORMALIZED)
        assert stats["rows"][split] == table.num_rows
        ids = {row["dialogue_id"] for row in rows[split]}
        assert stats["dialogues"][split] == len(ids)
        for dialogue_id in ids:  # whole dialogues stay in one split
            assert split_of_dialogue.setdefault(dialogue_id, split) == split
        derived = split in stats["derived_splits"]
        for row in rows[split]:
            assert row["corpus"] == corpus and row["split"] == split and row["derived_split"] is derived
            assert 1 <= len(row["context"]) <= window
            texts.update([row["response"], *row["context"], *row["rots"], *row["persona"],
                          *(n["text"] for n in row["unacceptable_responses"]), *([row["emotion"]] if row["emotion"] else [])])
            assert (row["safety_label"] in SAFETY_LABELS) if corpus == "prosocial_dialog" else row["safety_label"] is None
            assert (row["emotion"] is not None) == (corpus == "empathetic_dialogues")
            assert bool(row["persona"]) == (corpus in ("persona_chat", "blended_skill_talk"))
            assert not row["unacceptable_responses"] or corpus == "mic"
    for text in texts:  # no empty texts; all cleaned (no control characters, single spaces, cut)
        assert text and text == clean(text, max_chars), text
    keys = [(row["dialogue_id"], row["turn_index"]) for split in SPLITS for row in rows[split]]
    assert len(keys) == len(set(keys))
    assert all(key.split(":")[0] in ("dropped", "changed", "kept") for key in stats["counts"])


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
    assert sorted(stats["derived_splits"]) == missing


def test_the_sample_has_every_split_and_enough_dialogues(sample_data_dir):
    for corpus in CORPORA:
        stats, _ = normalized(sample_data_dir, corpus)
        assert stats["derived_splits"] == {}
        assert all(stats["rows"][split] > 0 for split in SPLITS), corpus
        assert sum(stats["dialogues"].values()) >= 40, corpus


# --- DailyDialog ------------------------------------------------------------------------------------


def test_daily_dialog_keeps_every_utterance_after_the_first_as_a_reply(built, normalize_config):
    raw = raw_rows(built, "daily_dialog")
    stats, rows = normalized(built, "daily_dialog")
    dialogs = [row["dialog"] for split_rows in raw.values() for row in split_rows]
    quirks = sum(len(row["act"]) != len(row["dialog"]) or len(row["emotion"]) != len(row["dialog"])
                 for split_rows in raw.values() for row in split_rows)
    assert quirks == 1  # the one known line (train) whose label count differs; the sample has one too
    assert stats["counts"].get("kept: act/emotion label count differs from utterance count") == quirks
    assert not [key for key in stats["counts"] if key.startswith("dropped")]
    assert sum(stats["rows"].values()) == sum(len(dialog) - 1 for dialog in dialogs)

    rebuilt = Counter()
    for group in dialogues(rows).values():
        assert [row["turn_index"] for row in group] == list(range(1, len(group) + 1))
        turns = rebuilt_turns(group)
        assert windows_match(group, turns, normalize_config.max_context_turns, first=1)
        rebuilt[tuple(turns)] += 1
    # Each raw dialogue comes back whole, every utterance after the first once as a reply.
    assert rebuilt == Counter(tuple(clean(u, normalize_config.max_chars) for u in dialog) for dialog in dialogs)


# --- EmpatheticDialogues ----------------------------------------------------------------------------


def test_empathetic_dialogues_unescapes_commas_and_keeps_the_emotion(built, normalize_config):
    raw = [row for split_rows in raw_rows(built, "empathetic_dialogues").values() for row in split_rows]
    stats, rows = normalized(built, "empathetic_dialogues")
    assert any("_comma_" in row["utterance"] for row in raw)  # the quirk is really there
    conversations = defaultdict(list)
    for row in raw:
        conversations[row["conv_id"]].append(row)

    assert sum(stats["rows"].values()) == len(raw) - len(conversations)
    all_rows = [row for split_rows in rows.values() for row in split_rows]
    assert not [row for row in all_rows if "_comma_" in json.dumps(row)]
    assert {row["emotion"] for row in all_rows} == {row["context"] for row in raw}
    assert any("," in row["response"] for row in all_rows)
    for conv_id, group in dialogues(rows).items():
        utterances = [clean(r["utterance"].replace("_comma_", ","), normalize_config.max_chars)
                      for r in sorted(conversations[conv_id], key=lambda r: r["utterance_idx"])]
        assert rebuilt_turns(group) == utterances
        assert windows_match(group, utterances, normalize_config.max_context_turns, first=1)
        assert {row["emotion"] for row in group} == {conversations[conv_id][0]["context"]}


# --- PersonaChat ------------------------------------------------------------------------------------


def test_persona_chat_replies_with_the_last_candidate(built, normalize_config):
    raw = [row for split_rows in raw_rows(built, "persona_chat").values() for row in split_rows]
    stats, rows = normalized(built, "persona_chat")
    by_key = {(row["dialogue_id"], row["turn_index"]): row for split_rows in rows.values() for row in split_rows}
    assert len(by_key) == len(raw)
    max_chars = normalize_config.max_chars
    for row in raw:
        out = by_key[(str(row["conv_id"]), row["utterance_idx"])]
        assert out["response"] == clean(row["candidates"][-1], max_chars)
        assert out["persona"] == [clean(p, max_chars) for p in row["personality"]] and out["persona"]
        assert out["context"] == [clean(h, max_chars) for h in row["history"]][-normalize_config.max_context_turns:]
    if built.name.startswith("sample"):  # the sample has distractors first, so first != last
        assert any(len(row["candidates"]) > 1 and row["candidates"][0] != row["candidates"][-1] for row in raw)


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
    assert counts == Counter()


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
    assert counts == Counter({"kept: free/guided message counts differ (alternation cut at the shorter)": 1})


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
    assert Counter(row["response"] for split_rows in rows.values() for row in split_rows) == expected
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
        ("3", 0, ["Other"], "Reply", ["r"], "__casual__"),
        ("7", 0, ["U0"], "R0", ["rot0"], "__needs_caution__"),
        ("7", 1, ["U0", "R0", "U1"], "R1", ["rot1a", "rot1b"], "__possibly_needs_caution__"),
        ("7", 2, ["U0", "R0", "U1", "R1", "U2"], "R2", [], "__needs_intervention__"),
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
    raw = sorted((row for split_rows in raw_rows(built, "prosocial_dialog").values() for row in split_rows),
                 key=lambda r: (r["dialogue_id"], r["response_id"]))
    stats, rows = normalized(built, "prosocial_dialog")
    by_key = {(row["dialogue_id"], row["turn_index"]): row for split_rows in rows.values() for row in split_rows}
    assert len(by_key) == len(raw) == sum(stats["rows"].values())
    max_chars, history, previous = normalize_config.max_chars, [], None
    for row in raw:
        if row["dialogue_id"] != previous:
            history, previous = [], row["dialogue_id"]
        history.append(clean(row["context"], max_chars))
        out = by_key[(str(row["dialogue_id"]), row["response_id"])]
        assert out["context"] == history[-normalize_config.max_context_turns:]
        assert out["response"] == clean(row["response"], max_chars)
        assert out["rots"] == [clean(r, max_chars) for r in row["rots"]]
        assert out["safety_label"] == row["safety_label"]
        history.append(out["response"])
    if built.name.startswith("sample"):
        assert {row["safety_label"] for row in raw} == set(SAFETY_LABELS)


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


def test_derived_splits_are_deterministic_and_keep_dialogues_whole():
    rows = [{"dialogue_id": f"d{i}", "turn_index": t, "derived_split": False} for i in range(2000) for t in range(3)]
    fractions = {"train": 0.5, "validation": 0.25, "test": 0.25}
    first = {"validation": list(rows)}
    described = derive_splits(first, "daily_dialog", fractions)
    shuffled = list(rows)
    random.Random(0).shuffle(shuffled)
    second = {"validation": shuffled}
    derive_splits(second, "daily_dialog", fractions)

    assert sorted(described) == ["test", "train"] and "from validation" in described["train"]
    split_of = {}
    for split in SPLITS:
        assert {r["dialogue_id"] for r in first[split]} == {r["dialogue_id"] for r in second[split]}
        assert all(r["derived_split"] is (split != "validation") for r in first[split])
        for row in first[split]:
            assert split_of.setdefault(row["dialogue_id"], split) == split
        assert len(first[split]) / len(rows) == pytest.approx(fractions[split], abs=0.04)
    # Present splits are left alone.
    assert derive_splits({s: [] for s in SPLITS}, "daily_dialog", fractions) == {}


def test_derived_splits_on_the_mirror(mirror_data_dir):
    raw = raw_rows(mirror_data_dir, "daily_dialog")
    stats, _ = normalized(mirror_data_dir, "daily_dialog")
    assert sorted(stats["derived_splits"]) == ["test"] and "from train" in stats["derived_splits"]["test"]
    assert stats["dialogues"]["validation"] == len(raw["validation"])  # untouched
    assert stats["dialogues"]["train"] + stats["dialogues"]["test"] == len(raw["train"])
    assert stats["dialogues"]["test"] / len(raw["train"]) == pytest.approx(0.1 / 0.9, abs=0.015)

    raw = raw_rows(mirror_data_dir, "persona_chat")
    stats, _ = normalized(mirror_data_dir, "persona_chat")
    assert list(raw) == ["validation"] and sorted(stats["derived_splits"]) == ["test", "train"]
    conversations = len({row["conv_id"] for row in raw["validation"]})
    assert sum(stats["dialogues"].values()) == conversations
    for split, share in (("train", 0.8), ("validation", 0.1), ("test", 0.1)):
        assert stats["dialogues"][split] / conversations == pytest.approx(share, abs=0.04), split


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
                              "dropped: empty or null turn in the context": 1})


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
