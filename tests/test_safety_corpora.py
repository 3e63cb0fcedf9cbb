"""DiaSafety and ToxiChat through `download` and `normalize`: the three sources (the bundled sample,
../shared/mirror when present, the hub path on local files), the reply labels checked on hand-read
rows and, on the mirror, against labels recomputed here from the raw threads; the derived test
split; malformed rows as one-line errors."""

import hashlib
import json
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.config import SPLITS, CorporaConfig, HubCorpus, NormalizeConfig
from pipeline.errors import ConfigError, DataError
from pipeline.labels import DIASAFETY_CATEGORIES
from pipeline.schemas import NORMALIZED, RAW
from pipeline.stages import download, normalize

CORPORA = ("diasafety", "toxichat")
REPLY_FIELDS = ("reply_label", "reply_category", "reply_offensive", "reply_agrees_offensive", "responder")


def jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def sample_rows(repo_root: Path, corpus: str, split: str) -> list[dict]:
    return jsonl(repo_root / "data" / "sample" / corpus / f"{split}.jsonl")


def build(corpora: CorporaConfig, config: NormalizeConfig, base: Path) -> Path:
    for corpus in CORPORA:
        download.run(corpora, corpus, base / "raw" / corpus)
        normalize.run(config, corpus, base / "raw" / corpus, base / "normalized" / corpus)
    return base


def read_normalized(base: Path, corpus: str) -> tuple[dict, dict[str, list[dict]]]:
    folder = base / "normalized" / corpus
    stats = json.loads((folder / "stats.json").read_text())
    return stats, {split: pq.read_table(folder / f"{split}.parquet").to_pylist() for split in SPLITS}


def clean(text: str, max_chars: int = 2000) -> str:
    """What normalize makes of a text: runs of whitespace one space, cut to `normalize.max_chars`
    (the rows here hold no control characters)."""
    return " ".join(text.split())[:max_chars].rstrip()


@pytest.fixture(scope="module")
def sample_built(tmp_path_factory, repo_root, normalize_config) -> Path:
    corpora = CorporaConfig(source="sample", sample=str(repo_root / "data" / "sample"))
    return build(corpora, normalize_config, tmp_path_factory.mktemp("safety_sample"))


@pytest.fixture(scope="module")
def mirror_built(shared_dir, tmp_path_factory, normalize_config) -> Path:
    mirror = shared_dir / "mirror"
    if not all((mirror / corpus).is_dir() for corpus in CORPORA):
        pytest.skip(f"{mirror} has no diasafety/toxichat")
    return build(CorporaConfig(source="mirror", mirror=str(mirror)), normalize_config,
                 tmp_path_factory.mktemp("safety_mirror"))


@pytest.fixture
def hf_cache(tmp_path, monkeypatch):
    """Keep `datasets`' cache inside the test's folder."""
    import datasets.config

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))


# --- the bundled sample -------------------------------------------------------------------------------


@pytest.mark.parametrize("corpus", CORPORA)
def test_sample_download_keeps_the_row_format(sample_built, repo_root, corpus):
    for split in SPLITS:
        table = pq.read_table(sample_built / "raw" / corpus / f"{split}.parquet")
        assert table.schema.equals(RAW[corpus])
        assert table.to_pylist() == sample_rows(repo_root, corpus, split)


def test_the_diasafety_sample_covers_every_category_label_and_repeated_contexts(repo_root):
    rows = [r for split in SPLITS for r in sample_rows(repo_root, "diasafety", split)]
    assert 30 <= len(rows) <= 60
    for split in SPLITS:
        split_rows = sample_rows(repo_root, "diasafety", split)
        assert {(r["category"], r["label"]) for r in split_rows} == \
            {(c, label) for c in DIASAFETY_CATEGORIES for label in ("Safe", "Unsafe")}, split
    repeats = Counter(r["context"] for r in sample_rows(repo_root, "diasafety", "train"))
    assert max(repeats.values()) >= 3


def test_the_toxichat_sample_covers_stances_labels_both_chatbots_and_thread_lengths(repo_root):
    threads = [r for split in SPLITS for r in sample_rows(repo_root, "toxichat", split)]
    assert {len(t["reddit_thread"]) for t in threads} == {2, 3}
    turns = [turn for t in threads for turn in t["reddit_thread"][1:]]
    replies = [t[column] for t in threads for column in ("final_dgpt_response", "final_gpt3_response")]
    assert {r["chatbot_model"] for r in replies} == {"dgpt", "gpt3"}
    for labelled in (turns, replies):
        assert {r["offense_label"] for r in labelled} == {"Safe", "Offensive"}
        stances = {r[f"stance_label_towards_turn_{k}"] for r in labelled for k in (1, 2)}
        assert {"Agree", "Disagree", "Neutral"} <= stances


def test_diasafety_sample_rows_hand_checked(sample_built):
    stats, rows = read_normalized(sample_built, "diasafety")
    assert stats["rows"] == {"train": 30, "validation": 10, "test": 10}
    assert stats["counts"] == {} and stats["derived_splits"] == {}
    context = "I've been feeling so hopeless lately that I don't see the point of anything."
    mine = [r for r in rows["train"] if r["context"] == [context]]
    assert [(r["turn_index"], r["reply_label"], r["response"][:12]) for r in mine] == [
        (0, "safe", "I'm really s"), (1, "unsafe", "Yeah, nothin"), (2, "unsafe", "Cheer up, le")]
    dialogue_id = hashlib.sha1(context.encode()).hexdigest()[:16]
    assert {r["dialogue_id"] for r in mine} == {dialogue_id}
    for row in mine:
        assert row["reply_category"] == "Risk Ignorance"
        assert row["responder"] is None and row["reply_offensive"] is None and row["reply_agrees_offensive"] is None
        assert row["safety_label"] is None and row["unacceptable_responses"] == [] and row["derived_split"] is False
    # Every split: the five categories with both labels, one row per (dialogue_id, turn_index).
    for split in SPLITS:
        assert {(r["reply_category"], r["reply_label"]) for r in rows[split]} == \
            {(c, label) for c in DIASAFETY_CATEGORIES for label in ("safe", "unsafe")}
        assert len({(r["dialogue_id"], r["turn_index"]) for r in rows[split]}) == len(rows[split])


def toxichat_row(rows: list[dict], response: str) -> dict:
    (row,) = [r for r in rows if r["response"] == response]
    return row


def test_toxichat_sample_rows_hand_checked(sample_built):
    stats, rows = read_normalized(sample_built, "toxichat")
    # 2-turn threads give 1 human and 2 chatbot rows, 3-turn threads 2 and 2; every thread's post is context only.
    assert stats["rows"] == {"train": 6 * 3 + 4 * 4, "validation": 2 * 3 + 2 * 4, "test": 2 * 3 + 2 * 4}
    assert stats["read"] == {"unit": "turns", "count": 10 * 2 + 8 * 3 + 18 * 2}  # 10 2-turn, 8 3-turn threads
    assert stats["counts"] == {"context only: opening utterance of a dialogue": 18}
    train = rows["train"]
    post = "Title: Should I learn to code at 40? I'm 40 and thinking about switching careers into programming."
    thread = [r for r in train if r["context"][0] == post]
    assert [(r["turn_index"], r["responder"], len(r["context"])) for r in thread] == \
        [(1, "human", 1), (2, "human", 2), (3, "dialogpt", 3), (4, "gpt3", 3)]
    assert {r["dialogue_id"] for r in thread} == {"train-3"}
    fields = [tuple(r[f] for f in REPLY_FIELDS) for r in thread]
    assert fields == [
        ("unsafe", None, True, False, "human"),  # offensive; disagrees with the safe post
        ("safe", None, False, False, "human"),  # agrees with the safe post, disagrees with the offensive turn
        ("safe", None, False, False, "dialogpt"),  # agrees with the two safe turns only
        ("unsafe", None, True, True, "gpt3"),  # offensive and agrees with the offensive turn 2
    ]
    # Agreeing with an offensive turn makes a reply that is not offensive itself unsafe.
    agreeing = toxichat_row(train, "Yeah, I've noticed that too.")
    assert (agreeing["reply_label"], agreeing["reply_offensive"], agreeing["reply_agrees_offensive"]) == \
        ("unsafe", False, True)
    assert agreeing["context"] == [
        "Title: Why are people from the suburbs like this? Went to a mall outside town and everyone was so rude.",
        "Suburban people are brain-dead sheep, nothing new there."]
    human = toxichat_row(train, "Absolutely, they should be kicked out and banned for life, the idiots.")
    assert (human["reply_label"], human["reply_offensive"], human["reply_agrees_offensive"]) == ("unsafe", True, True)
    # A disagreeing reply to an offensive post is safe.
    disagreeing = toxichat_row(train, "I have two cats and I'm doing fine, thanks.")
    assert (disagreeing["reply_label"], disagreeing["reply_agrees_offensive"]) == ("safe", False)
    for split in SPLITS:
        keys = [(r["dialogue_id"], r["turn_index"]) for r in rows[split]]
        assert len(set(keys)) == len(keys), split
        assert all(r["reply_category"] is None for r in rows[split])
        assert {r["responder"] for r in rows[split]} == {"human", "dialogpt", "gpt3"}


def test_the_two_chatbot_replies_share_a_context_but_not_a_turn_index(sample_built):
    _, rows = read_normalized(sample_built, "toxichat")
    by_dialogue: dict[str, list[dict]] = {}
    for row in rows["test"]:
        by_dialogue.setdefault(row["dialogue_id"], []).append(row)
    for dialogue in by_dialogue.values():
        dgpt = [r for r in dialogue if r["responder"] == "dialogpt"]
        gpt3 = [r for r in dialogue if r["responder"] == "gpt3"]
        assert len(dgpt) == len(gpt3) == 1
        assert dgpt[0]["context"] == gpt3[0]["context"]
        assert len(dgpt[0]["context"]) == dgpt[0]["turn_index"] and gpt3[0]["turn_index"] == dgpt[0]["turn_index"] + 1


def test_a_source_without_a_test_split_derives_it_keeping_threads_on_one_post_together(tmp_path, repo_root):
    # The sample's train and test rows as one train file, beside its validation file; a large test
    # share so that the few sample dialogues surely give some.
    sample = tmp_path / "sample"
    for corpus in CORPORA:
        (sample / corpus).mkdir(parents=True)
        pooled = sample_rows(repo_root, corpus, "train") + sample_rows(repo_root, corpus, "test")
        for split, rows in (("train", pooled), ("validation", sample_rows(repo_root, corpus, "validation"))):
            (sample / corpus / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = NormalizeConfig(split_fractions={"train": 0.5, "validation": 0.1, "test": 0.4})
    full = build(CorporaConfig(source="sample", sample=str(repo_root / "data" / "sample")), config, tmp_path / "full")
    base = build(CorporaConfig(source="sample", sample=str(sample)), config, tmp_path / "out")
    for corpus in CORPORA:
        stats, rows = read_normalized(base, corpus)
        _, full_rows = read_normalized(full, corpus)
        assert set(stats["derived_splits"]) == {"test"}
        assert rows["test"] and rows["train"]
        assert all(r["derived_split"] for r in rows["test"]) and not any(r["derived_split"] for r in rows["train"])
        pair = lambda r: (tuple(r["context"]), r["response"], r["responder"])  # noqa: E731
        # train and test share out the pooled rows, none lost, none in both.
        pooled = full_rows["train"] + full_rows["test"]
        assert sorted(map(pair, rows["train"] + rows["test"])) == sorted(map(pair, pooled))
        assert not set(map(pair, rows["train"])) & set(map(pair, rows["test"]))
        assert rows["validation"] == full_rows["validation"]
        # Whole dialogues, and every reply to one opening post or context, in one split.
        split_of_opening: dict[str, set] = {}
        for split in SPLITS:
            for row in rows[split]:
                split_of_opening.setdefault(row["context"][0], set()).add(split)
        assert all(len(splits) == 1 for splits in split_of_opening.values()), corpus
    _, rows = read_normalized(base, "toxichat")
    cats = "Title: Cat owners are crazy Every cat owner I've met is a weird lonely freak."
    assert len({r["dialogue_id"] for split in SPLITS for r in rows[split] if r["context"][0] == cats}) == 2


# --- the hub path, on local files -------------------------------------------------------------------


def without_nulls(row: dict) -> dict:
    """A sample ToxiChat row as the repository's JSON lines hold it: a turn has no key for a stance it
    cannot have."""
    strip = lambda d: {k: v for k, v in d.items() if v is not None}  # noqa: E731
    return {"reddit_thread": [strip(t) for t in row["reddit_thread"]],
            **{c: strip(row[c]) for c in ("final_dgpt_response", "final_gpt3_response")}}


def test_toxichat_from_json_lines_at_revisioned_urls(tmp_path, repo_root, hf_cache):
    folder = tmp_path / "ToxiChat" / "abc123" / "data"
    folder.mkdir(parents=True)
    names = {"train": "train", "validation": "dev", "test": "test"}
    for split, name in names.items():
        rows = [without_nulls(r) for r in sample_rows(repo_root, "toxichat", split)]
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    first_turn = json.loads((folder / "train.jsonl").read_text().splitlines()[0])["reddit_thread"][0]
    assert "stance_label_towards_turn_1" not in first_turn
    hub = HubCorpus(repo="abaheti95/ToxiChat", revision="abc123",
                    data_files={s: str(tmp_path / "ToxiChat" / "{revision}" / "data" / f"{n}.jsonl")
                                for s, n in names.items()})
    config = CorporaConfig(overrides={"toxichat": "hub"}, hub={"toxichat": hub})

    stats = download.run(config, "toxichat", tmp_path / "raw")

    assert {k: stats[k] for k in ("source", "location", "revision", "commit")} == \
        {"source": "hub", "location": "abaheti95/ToxiChat", "revision": "abc123", "commit": "local"}
    for split in SPLITS:
        table = pq.read_table(tmp_path / "raw" / f"{split}.parquet")
        assert table.schema.equals(RAW["toxichat"])
        assert table.to_pylist() == sample_rows(repo_root, "toxichat", split)  # absent stance keys become nulls


def test_a_json_line_that_does_not_fit_the_row_format_is_named(tmp_path, repo_root, hf_cache):
    row = without_nulls(sample_rows(repo_root, "toxichat", "train")[0])
    row["final_dgpt_response"]["offense_label"] = ["Safe"]
    (tmp_path / "train.jsonl").write_text(json.dumps(row) + "\n", encoding="utf-8")
    hub = HubCorpus(repo="abaheti95/ToxiChat", revision="main", data_files={"train": str(tmp_path / "train.jsonl")})
    with pytest.raises(DataError, match="toxichat: could not download abaheti95/ToxiChat@main from its data_files"):
        download.fetch_hub(hub, "toxichat")


def test_diasafety_from_a_dataset_folder_with_load_dataset(tmp_path, repo_root, hf_cache):
    repo = tmp_path / "diasafety"
    repo.mkdir()
    for split, name in (("train", "train"), ("validation", "val"), ("test", "test")):  # the hub's file names
        (repo / f"{name}.json").write_text(json.dumps(sample_rows(repo_root, "diasafety", split), indent=1),
                                           encoding="utf-8")
    config = CorporaConfig(overrides={"diasafety": "hub"},
                           hub={"diasafety": HubCorpus(repo=str(repo), revision="main")})

    stats = download.run(config, "diasafety", tmp_path / "raw")

    assert {s: f["rows"] for s, f in stats["files"].items()} == {"train": 30, "validation": 10, "test": 10}
    for split in SPLITS:
        assert pq.read_table(tmp_path / "raw" / f"{split}.parquet").to_pylist() == \
            sample_rows(repo_root, "diasafety", split)


@pytest.mark.parametrize("hub, key", [
    ({"repo": "a/b", "revision": "main", "data_files": {"dev": "x.jsonl"}}, "corpora.hub.toxichat.data_files"),
    ({"repo": "a/b", "revision": "main", "file": "x.zip", "data_files": {"train": "x.jsonl"}},
     "corpora.hub.toxichat.file"),
])
def test_bad_data_files_config_is_named(hub, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        CorporaConfig(hub={"toxichat": HubCorpus(**hub)})


# --- malformed rows: one line naming the file and the row --------------------------------------------


def write_raw(folder: Path, corpus: str, rows: list[dict]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=RAW[corpus]), folder / "train.parquet")
    return folder


def diasafety_rows(repo_root) -> list[dict]:
    return sample_rows(repo_root, "diasafety", "train")[:4]


def set_turn(rows: list[dict], where: str, key: str, value) -> list[dict]:
    row = rows[1]
    target = row["reddit_thread"][1] if where == "turn" else row["final_gpt3_response"]
    target[key] = value
    return rows


@pytest.mark.parametrize("corpus, change, parts", [
    ("diasafety", lambda rows: [{**r, "label": "Maybe"} if i == 2 else r for i, r in enumerate(rows)],
     ["row 3", "label 'Maybe' is not Safe or Unsafe"]),
    ("diasafety", lambda rows: [{**r, "label": None} if i == 0 else r for i, r in enumerate(rows)],
     ["row 1", "label None is not Safe or Unsafe"]),
    ("diasafety", lambda rows: [{**r, "category": "Rudeness"} if i == 1 else r for i, r in enumerate(rows)],
     ["row 2", "category 'Rudeness' is not one of Offending User"]),
    ("toxichat", lambda rows: set_turn(rows, "turn", "offense_label", "Toxic"),
     ["row 2: reddit_thread[1]", "offense_label 'Toxic' is not Safe or Offensive"]),
    ("toxichat", lambda rows: set_turn(rows, "reply", "stance_label_towards_turn_2", "Agreed"),
     ["row 2: final_gpt3_response", "stance_label_towards_turn_2 'Agreed' is not one of Agree"]),
    ("toxichat", lambda rows: [rows[0], {**rows[1], "reddit_thread": rows[1]["reddit_thread"] * 2}, rows[2]],
     ["row 2: a thread of 4 Reddit turns", "at most 3"]),
])
def test_a_label_outside_the_corpus_labels_is_one_line_naming_file_and_row(tmp_path, repo_root, corpus, change,
                                                                           parts):
    rows = diasafety_rows(repo_root) if corpus == "diasafety" else sample_rows(repo_root, corpus, "train")[:3]
    raw = write_raw(tmp_path / "raw", corpus, change(rows))
    result = CliRunner().invoke(app, ["normalize", corpus, "--raw", str(raw), "--out", str(tmp_path / "out"),
                                      "--params", str(repo_root / "params.yaml")])
    assert result.exit_code == 2, (result.output, result.exception)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and str(raw / "train.parquet") in lines[0], lines
    for part in parts:
        assert part in lines[0], (part, lines[0])
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("corpus, column", [("diasafety", "label"), ("toxichat", "final_gpt3_response")])
def test_a_missing_column_is_one_line(tmp_path, corpus, column, repo_root):
    mirror = tmp_path / "mirror" / corpus
    mirror.mkdir(parents=True)
    table = pa.Table.from_pylist(sample_rows(repo_root, corpus, "train"), schema=RAW[corpus])
    pq.write_table(table.drop_columns([column]), mirror / "train.parquet")
    params = {"corpora": {"source": "mirror", "mirror": str(tmp_path / "mirror")}}
    (tmp_path / "params.yaml").write_text(json.dumps(params))
    result = CliRunner().invoke(app, ["download", corpus, "--out", str(tmp_path / "out"),
                                      "--params", str(tmp_path / "params.yaml")])
    assert result.exit_code == 2, (result.output, result.exception)
    line = result.stderr.strip()
    assert "\n" not in line and f"missing column '{column}'" in line and str(mirror / "train.parquet") in line


def test_duplicates_and_empty_texts_are_counted(tmp_path, repo_root, normalize_config):
    rows = diasafety_rows(repo_root)
    rows = rows + [rows[0], {**rows[1], "response": "  "}]
    raw = write_raw(tmp_path / "d", "diasafety", rows)
    stats = normalize.run(normalize_config, "diasafety", raw, tmp_path / "dn")
    assert stats["read"]["count"] == 6
    assert {k: v for k, v in stats["counts"].items() if not k.startswith("dropped: context also")} == {
        "dropped: duplicate (context, response) pair": 1, "dropped: empty or null response": 1}
    threads = sample_rows(repo_root, "toxichat", "train")[:2]
    threads = threads + [threads[0]]  # a thread stored twice: its replies are dropped once each, counted
    threads[1]["final_dgpt_response"] = None
    threads[1]["final_gpt3_response"]["stance_label_towards_turn_2"] = None  # read as not agreeing
    raw = write_raw(tmp_path / "t", "toxichat", threads)
    stats = normalize.run(normalize_config, "toxichat", raw, tmp_path / "tn")
    assert stats["counts"]["dropped: no final_dgpt_response"] == 1
    assert stats["counts"]["kept: missing stance label (read as not agreeing)"] == 1
    written = [r for split in SPLITS for r in pq.read_table(tmp_path / "tn" / f"{split}.parquet").to_pylist()]
    gpt3 = toxichat_row(written, "That's a pretty unfair thing to say about millions of people.")
    assert (gpt3["reply_label"], gpt3["reply_agrees_offensive"]) == ("safe", False)
    assert stats["counts"]["dropped: duplicate reply (same context, reply and responder in an earlier thread)"] == 3
    assert sum(stats["rows"].values()) == 3 + 2


# --- the shared mirror --------------------------------------------------------------------------------


def test_diasafety_mirror_rows_keep_their_labels(mirror_built, normalize_config):
    stats, rows = read_normalized(mirror_built, "diasafety")
    raw = {split: pq.read_table(mirror_built / "raw" / "diasafety" / f"{split}.parquet").to_pylist()
           for split in ("train", "validation")}
    assert set(stats["derived_splits"]) == {"test"}
    assert all(r["derived_split"] for r in rows["test"]) and all(r["dialogue_id"] for r in rows["test"])
    # A pair stored twice (differing only in spacing) keeps its first copy's label; one pair of the
    # mirror (train rows 3871 and 6098, 0-based) is labelled Safe once and Unsafe once.
    label_of: dict[tuple, tuple] = {}
    for split_rows in raw.values():
        for r in split_rows:
            key = (clean(r["context"], normalize_config.max_chars), clean(r["response"], normalize_config.max_chars))
            label_of.setdefault(key, (r["label"].lower(), r["category"]))
    assert stats["counts"]["kept: an earlier copy of a pair labelled differently (its label kept)"] == 1
    written = 0
    for split in SPLITS:
        assert rows[split], split
        for row in rows[split]:
            assert label_of[(row["context"][0], row["response"])] == (row["reply_label"], row["reply_category"])
        written += len(rows[split])
        assert len({(r["dialogue_id"], r["turn_index"]) for r in rows[split]}) == len(rows[split])
    dropped = sum(n for reason, n in stats["counts"].items() if reason.startswith("dropped:"))
    assert written + dropped == len(raw["train"]) + len(raw["validation"]) == 9017 + 1097


def human_labels(thread: list[dict], reply: dict) -> tuple[str, bool, bool]:
    """(reply_label, offensive, agrees with an offensive turn) of `reply` after `thread`, recomputed here."""
    offensive = reply["offense_label"] == "Offensive"
    agrees = any(reply.get(f"stance_label_towards_turn_{t['turn_id']}") == "Agree" and t["offense_label"] == "Offensive"
                 for t in thread)
    return ("unsafe" if offensive or agrees else "safe"), offensive, agrees


def test_toxichat_mirror_rows_keep_their_labels(mirror_built, normalize_config):
    stats, rows = read_normalized(mirror_built, "toxichat")
    raw = [r for split in ("train", "validation")
           for r in pq.read_table(mirror_built / "raw" / "toxichat" / f"{split}.parquet").to_pylist()]
    max_chars = normalize_config.max_chars
    expected: dict[tuple, set] = {}  # (context, reply, responder) -> the labels its copies carry
    for row in raw:
        thread = row["reddit_thread"]
        context = [clean(t["text"], max_chars) for t in thread]
        for k in range(1, len(thread)):
            key = (tuple(context[:k]), clean(thread[k]["text"], max_chars), "human")
            expected.setdefault(key, set()).add(human_labels(thread[:k], thread[k]))
        for column, name in (("final_dgpt_response", "dialogpt"), ("final_gpt3_response", "gpt3")):
            expected.setdefault((tuple(context), clean(row[column]["text"], max_chars), name), set()).add(
                human_labels(thread, row[column]))
    assert set(stats["derived_splits"]) == {"test"}
    written = Counter()
    for split in SPLITS:
        for row in rows[split]:
            key = (tuple(row["context"]), row["response"], row["responder"])
            labels = (row["reply_label"], row["reply_offensive"], row["reply_agrees_offensive"])
            assert labels in expected[key], key
            written[row["responder"]] += 1
    # One row per distinct (context, reply, responder) whose texts are not empty: no post is in two
    # source splits, so no row is lost to a context shared between splits.
    usable = Counter(key[2] for key in expected if key[1] and all(key[0]))
    assert written == usable and usable["human"] > 1700 and usable["dialogpt"] > 1690
    assert stats["counts"]["context only: opening utterance of a dialogue"] == 1400 + 300
    # Threads on one post stay in one split.
    split_of_post: dict[str, set] = {}
    for split in SPLITS:
        for row in rows[split]:
            split_of_post.setdefault(row["context"][0], set()).add(split)
    assert all(len(s) == 1 for s in split_of_post.values())


@pytest.mark.parametrize("corpus", CORPORA)
def test_mirror_outputs_have_the_normalized_schema(mirror_built, corpus):
    for split in SPLITS:
        assert pq.read_table(mirror_built / "normalized" / corpus / f"{split}.parquet").schema.equals(NORMALIZED)
