"""The `mine` stage: n-pair groups, the miner's rules (never the positive, no duplicates, no text
across splits, same seed same bytes, shortfalls filled and counted), severities, retrieval, replay,
the generated source, and the command with bad input."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.config import CASUAL_CORPORA, CORPORA, SPLITS, MineConfig, section_from_dict
from pipeline.contexts import judge_half
from pipeline.errors import ConfigError
from pipeline.schemas import GROUPS, NORMALIZED
from pipeline.stages import mine

REPO_ROOT = Path(__file__).resolve().parents[1]
F32 = lambda x: float(np.float32(x))  # noqa: E731  severities are stored as float32


# --- helpers --------------------------------------------------------------------------------------


def row(corpus, dialogue_id, context, response, split="train", turn=0, label=None, unacceptable=(), rots=(),
        reply=None, offensive=None, agrees=None, category=None):
    """A NORMALIZED row; `reply` is the human reply label (safe | unsafe) of DiaSafety / ToxiChat rows."""
    return {
        "corpus": corpus, "split": split, "dialogue_id": str(dialogue_id), "turn_index": turn,
        "context": list(context), "response": response, "rots": list(rots), "safety_label": label,
        "persona": [], "emotion": None,
        "unacceptable_responses": [{"text": t, "severity": s} for t, s in unacceptable],
        "derived_split": False, "reply_label": reply, "reply_category": category, "reply_offensive": offensive,
        "reply_agrees_offensive": agrees,
    }


def labelled_rows(split: str, i: int, tag: str = "") -> list[dict]:
    """A DiaSafety context and a ToxiChat thread, each with one reply humans judged safe and one unsafe."""
    return [
        row("diasafety", f"{split}d{i}", [f"{tag}Can pills cure my cold {i}?"], f"{tag}Ask a doctor first {i}.",
            split=split, reply="safe", category="Unauthorized Expertise"),
        row("diasafety", f"{split}d{i}", [f"{tag}Can pills cure my cold {i}?"], f"{tag}Take ten pills now {i}.",
            split=split, turn=1, reply="unsafe", category="Unauthorized Expertise"),
        row("toxichat", f"{split}t{i}", [f"{tag}My roommate is a pig {i}."], f"{tag}Talk it over calmly {i}.",
            split=split, turn=1, reply="safe", offensive=False, agrees=False),
        row("toxichat", f"{split}t{i}", [f"{tag}My roommate is a pig {i}."], f"{tag}Yes, a filthy pig {i}.",
            split=split, turn=2, reply="unsafe", offensive=True, agrees=True),
    ]


def table(rows) -> pa.Table:
    return pa.Table.from_pylist(list(rows), schema=NORMALIZED)


EMPTY = table([])


class FakeScorer:
    """P(casual) = 0.3 for text with 'awful' (1 - P = 0.7), 0.95 otherwise (1 - P = 0.05)."""

    def __init__(self):
        self.calls = []

    def predict_proba(self, responses, contexts=None):
        self.calls.append((list(responses), contexts))
        casual = np.array([0.3 if "awful" in text.lower() else 0.95 for text in responses])
        return np.stack([casual, (1 - casual) / 2, (1 - casual) / 2], axis=1)


def negatives(group: dict) -> list[tuple[str, str, float]]:
    return [(n["text"], n["source"], n["severity"]) for n in group["negatives"]]


def config(**kwargs) -> MineConfig:
    return MineConfig(**{"n": 4, "seed": 0, "replay": 0.0, **kwargs})


# --- config ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("section, message", [
    ({"n": 1}, "mine.n = 1"),
    ({"stage1_sources": {"context": 0.5, "hard": 0.3, "random": 0.1}}, "shares must sum to 1"),
    ({"stage1_sources": {"context": 1.2, "hard": -0.2}}, "every share must be 0 or more"),
    ({"stage1_sources": {"generated": 1.0}}, "sources are context, hard, random"),
    ({"stage2_sources": {"hard": 0.5, "generated": 0.5}}, "must be 0 while mine.generated is false"),
    ({"replay": 1.5}, "mine.replay"),
    ({"label_severity": {"__needs_caution__": 0.8}}, "mine.label_severity"),
    ({"generated_batch_size": 0}, "mine.generated_batch_size"),
    ({"generated_top_p": 0}, "mine.generated_top_p"),
    ({"generated_temperature": 0}, "mine.generated_temperature"),
    ({"precision": "fp8"}, "mine.precision"),
    ({"stage1_corpora": ["prosocial_dialog", "reddit"]}, "mine.stage1_corpora"),
    ({"stage2_corpora": []}, "mine.stage2_corpora"),
    ({"stage1_corpora": ["mic", "mic"]}, "mine.stage1_corpora"),
    ({"reply_severity": {"offensive": 0.8}}, "mine.reply_severity"),
    ({"stage1_max_groups": {"train": -1}}, "mine.stage1_max_groups"),
    ({"stage2_max_groups": {"dev": 10}}, "mine.stage2_max_groups"),
    ({"reply_severity": {"offensive_and_agrees": 1.5, "offensive": 0.8, "agrees_offensive": 0.7,
                         "unsafe_category": 0.6}}, "every weight between 0 and 1"),
])
def test_config_rejects_bad_values(section, message):
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        section_from_dict(section, "mine", MineConfig)


def test_config_shares_fill_missing_sources_with_zero():
    shares = MineConfig(stage2_sources={"hard": 0.5, "random": 0.5}).shares(2)
    assert shares == {"context": 0.0, "hard": 0.5, "random": 0.5, "generated": 0.0}


def test_repository_params_have_a_valid_mine_section():
    from pipeline.config import load_section

    assert load_section(REPO_ROOT / "params.yaml", "mine", MineConfig).n >= 2


@pytest.mark.parametrize("params", ["params.yaml", "params.paper.yaml"])
def test_stage_corpora_default_to_the_registered_corpora(params):
    """Stage 1 mines every adversarial corpus (DiaSafety and ToxiChat among them), stage 2 the casual ones,
    in the dataclass and in both parameter files."""
    from pipeline.config import ADVERSARIAL_CORPORA, load_section

    for mine_config in (MineConfig(), load_section(REPO_ROOT / params, "mine", MineConfig)):
        assert mine_config.stage1_corpora == list(ADVERSARIAL_CORPORA)
        assert {"diasafety", "toxichat"} <= set(mine_config.stage1_corpora)
        assert mine_config.stage2_corpora == list(CASUAL_CORPORA)


def test_reply_severity_orders_the_human_labels():
    """offensive and agreeing > offensive > agreeing only > unsafe for one DiaSafety category."""
    weights = MineConfig().reply_severity
    assert weights["offensive_and_agrees"] > weights["offensive"] > weights["agrees_offensive"] \
        > weights["unsafe_category"] > 0


# --- building blocks ------------------------------------------------------------------------------


def test_text_keys_ignore_case_and_whitespace():
    keys = mine.text_keys(pa.array(["  You  should\tbe KIND. ", "you should be kind.", "you should be kind"]))
    assert keys.to_pylist() == ["you should be kind.", "you should be kind.", "you should be kind"]


def test_top_k_sparse_matches_a_dense_sort():
    from scipy.sparse import csr_matrix

    rng = np.random.default_rng(1)
    dense = rng.integers(0, 4, size=(50, 30)).astype(np.float32) * (rng.random((50, 30)) < 0.3)  # many ties
    columns, values = mine.top_k_sparse(csr_matrix(dense), 5)
    for r in range(dense.shape[0]):
        # independent: order by value descending, then column ascending, positive entries only
        expected = sorted((c for c in range(dense.shape[1]) if dense[r, c] > 0), key=lambda c: (-dense[r, c], c))[:5]
        assert columns[r, :len(expected)].tolist() == expected
        assert (columns[r, len(expected):] == -1).all()
        assert values[r, :len(expected)].tolist() == [dense[r, c] for c in expected]


def test_tfidf_index_matches_scikit_learn():
    from sklearn.feature_extraction.text import TfidfVectorizer

    pool = ["I'd poison the dog that barks.", "Robbing the BANK, robbing banks!", "Café owners don't tip.", "a b c"]
    queries = ["The dog barks at the bank", "nothing known here", "café café dog", ""]
    index = mine.TfidfIndex(pa.array(pool))
    reference = TfidfVectorizer(stop_words="english", sublinear_tf=True).fit(pool)
    order = [index.vocabulary.to_pylist().index(word) for word in reference.get_feature_names_out()]
    assert sorted(index.vocabulary.to_pylist()) == list(reference.get_feature_names_out())
    np.testing.assert_allclose(index.matrix.toarray()[:, order], reference.transform(pool).toarray(), rtol=1e-6)
    np.testing.assert_allclose(index.transform(pa.array(queries)).toarray()[:, order],
                               reference.transform(queries).toarray(), rtol=1e-6)


def test_last_turns_takes_the_partners_utterance():
    context = pa.array([["a", "b", "c"], ["d"], []], pa.list_(pa.string()))
    assert mine.last_turns(context).to_pylist() == ["c", "d", ""]


def test_pad_ragged():
    padded = mine.pad_ragged(np.array([7, 8, 9]), np.array([0, 2, 2, 3]))
    assert padded.tolist() == [[7, 8], [-1, -1], [9, -1]]


def test_select_negatives_by_hand():
    # item ids 0..5 with text keys; item 5 repeats item 1's text; the positive of row 0 has key 40.
    key = np.array([10, 11, 12, 13, 40, 11])
    source_of = np.array([0, 0, 1, 1, 2, 2])  # two columns each for context, hard, random
    matrix = np.array([
        [0, 1, 5, 2, 4, 3],  # hard repeats context's item 1 (key 11); random offers the positive (key 40)
        [0, -1, -1, -1, 1, -1],  # three usable candidates in all, for three slots
        [-1, -1, -1, -1, 2, -1],  # one usable candidate for three slots: incomplete
    ])
    quotas = np.array([[1, 1, 1], [0, 0, 3], [0, 3, 0]])
    positive_key = np.array([40, 99, 99])
    # four sources in MINE_SOURCES; the fourth (generated) has no columns here
    take, complete, shortfall, filled = mine.select_negatives(
        matrix, source_of, np.pad(quotas, ((0, 0), (0, 1))), key, positive_key)
    assert complete.tolist() == [True, False, False]
    # Row 0: context gives item 0; hard skips item 5 (same text as item 1, offered first) and gives
    # item 2; random skips the positive and gives item 3.
    assert take[0].tolist() == [True, False, False, True, False, True]
    assert shortfall[0].tolist() == [0, 0, 0, 0] and filled[0].tolist() == [0, 0, 0, 0]
    # Row 1: random has one of three -> 2 pass to generated (none) -> wrap to context (one): still short.
    assert not take[1].any() and shortfall[1].tolist() == [0, 0, 2, 2]
    # Row 2: hard has nothing, 3 pass to random (one): short even after wrapping.
    assert not take[2].any() and shortfall[2].tolist() == [0, 3, 2, 2]


# --- the miner's rules ----------------------------------------------------------------------------


def test_negative_never_equals_the_positive_nor_another_negative():
    rows = table([
        row("mic", "q1", ["Should I be nice to my sister?"], "You should be kind.", unacceptable=[
            ("  you  SHOULD be kind. ", 5), ("Bad idea!", 4), ("bad   IDEA!", 4), ("Steal her sister money.", 2)]),
        row("mic", "q2", ["Is it okay to take my sister's money?"], "No, ask her first.",
            unacceptable=[("Take the sister money, she won't notice.", 3)]),
    ])
    groups, stats = mine.mine_split(rows, rows, config(stage1_sources={"context": 1.0}), 1, "train", FakeScorer())
    first = groups.to_pylist()[0]
    # context gives the two distinct non-positive texts (most severe first, the first spelling of a
    # duplicate wins); its third slot passes to `hard`, which retrieves q2's answer by 'sister money'.
    assert negatives(first) == [("Bad idea!", "context", F32(0.8)), ("Steal her sister money.", "context", F32(0.4)),
                                ("Take the sister money, she won't notice.", "hard", F32(0.6))]
    for group in groups.to_pylist():
        keys = [" ".join(n["text"].split()).lower() for n in group["negatives"]]
        assert " ".join(group["positive"].split()).lower() not in keys
        assert len(set(keys)) == len(keys) == 3


def test_shortfall_is_filled_from_the_next_source_and_counted():
    rows = table([
        row("mic", "q1", ["Would you lie to your boss?"], "No, honesty matters.",
            unacceptable=[("I lie to my boss daily.", 5)]),
        row("mic", "q2", ["Do you tell your boss everything?"], "Mostly, yes.",
            unacceptable=[("My boss deserves lies.", 4)]),
    ])
    groups, stats = mine.mine_split(rows, rows, config(stage1_sources={"context": 1.0}), 1, "train", FakeScorer())
    # Each group: context gives 1 of 3 -> 2 pass to hard, which has one text (the other question's)
    # -> 1 passes to random, which has one reply from another dialogue.
    assert [negatives(g) for g in groups.to_pylist()] == [
        [("I lie to my boss daily.", "context", F32(1.0)), ("My boss deserves lies.", "hard", F32(0.8)),
         ("Mostly, yes.", "random", F32(0.1))],
        [("My boss deserves lies.", "context", F32(0.8)), ("I lie to my boss daily.", "hard", F32(1.0)),
         ("No, honesty matters.", "random", F32(0.1))],
    ]
    assert stats["quota_per_source"] == {"context": 6, "hard": 0, "random": 0, "generated": 0}
    assert stats["negatives_per_source"] == {"context": 2, "hard": 2, "random": 2, "generated": 0}
    assert stats["shortfall_per_source"] == {"context": 4, "hard": 2, "random": 0, "generated": 0}
    assert stats["filled_beyond_quota_per_source"] == {"context": 0, "hard": 2, "random": 2, "generated": 0}
    assert stats["groups_with_shortfall"] == 2 and stats["skipped"] == {}


def test_shortfall_after_the_last_source_wraps_to_the_first():
    rows = table([row("mic", "q1", ["Hi?"], "Hello.", unacceptable=[("Go away.", 3), ("Get lost.", 2)])])
    groups, stats = mine.mine_split(rows, EMPTY, config(n=3, stage1_sources={"random": 1.0}), 1, "train", FakeScorer())
    # random has nothing (one dialogue), generated is off, so the two slots wrap around to context.
    assert negatives(groups.to_pylist()[0]) == [("Go away.", "context", F32(0.6)), ("Get lost.", "context", F32(0.4))]
    assert stats["filled_beyond_quota_per_source"]["context"] == 2
    assert stats["shortfall_per_source"] == {"context": 0, "hard": 0, "random": 2, "generated": 2}


def test_context_is_skipped_and_counted_when_all_sources_are_exhausted():
    rows = table([
        row("mic", "q1", ["Hi?"], "Hello.", unacceptable=[("Go away.", 3)]),
        row("mic", "q1", ["Hi?"], "Hey there.", turn=1, unacceptable=[("Go away.", 3)]),
    ])
    groups, stats = mine.mine_split(rows, rows, config(), 1, "train", FakeScorer())
    # One distinct negative for n - 1 = 3 slots: the other row is the same dialogue (no random reply).
    assert groups.num_rows == 0
    assert stats["skipped"] == {mine.SKIP_EXHAUSTED: 2} and stats["contexts"] == 2


def test_no_text_crosses_splits(tmp_path):
    """Every text of split s carries the tag [s]; no negative of a split may carry another tag."""
    rows = []
    for split in SPLITS:
        for i in range(6):
            rows.append(row("prosocial_dialog", f"{split}{i}", [f"[{split}] I want to hit my dog {i}"],
                            f"[{split}] Please don't hit your dog {i}.", split=split, label="__needs_caution__"))
            rows.append(row("mic", f"{split}q{i}", [f"[{split}] Is hitting a dog fine {i}?"], f"[{split}] No {i}.",
                            split=split, unacceptable=[(f"[{split}] Dogs need hitting {i}", 4)]))
            for corpus in CASUAL_CORPORA:
                rows.append(row(corpus, f"{split}{i}", [f"[{split}] My dog barks {i}"], f"[{split}] {corpus} dogs {i}",
                                split=split))
            rows += labelled_rows(split, i, tag=f"[{split}] ")
    normalized = write_corpora(tmp_path / "normalized", rows)
    for stage in (1, 2):
        mine.run(config(replay=0.5), stage, normalized, FakeScorer(), tmp_path / f"stage{stage}",
                 stage1_groups=tmp_path / "stage1", progress=False)
        for split in SPLITS:
            groups = pq.read_table(tmp_path / f"stage{stage}" / f"{split}.parquet").to_pylist()
            assert groups, (stage, split)
            for group in groups:
                assert group["split"] == split
                for negative in group["negatives"]:
                    assert negative["text"].startswith(f"[{split}]"), (stage, split, negative)


def test_same_seed_gives_identical_bytes_and_another_seed_does_not(tmp_path):
    rows = [row("mic", f"q{i}", [f"Question {i} about money?"], f"Answer {i}.",
                unacceptable=[(f"Steal money {i}", 1 + i % 5), (f"Cheat {i}", 2)]) for i in range(40)]
    rows += [row("prosocial_dialog", f"d{i}", [f"I took money {i}"], f"Give it back {i}.",
                 label="__needs_intervention__") for i in range(40)]
    rows += [r for i in range(10) for r in labelled_rows("train", i)]
    normalized = write_corpora(tmp_path / "normalized", rows)

    def mined(name, seed):
        mine.run(config(seed=seed), 1, normalized, FakeScorer(), tmp_path / name, progress=False)
        return {p.name: p.read_bytes() for p in sorted((tmp_path / name).iterdir())}

    first, again, other = mined("a", 0), mined("b", 0), mined("c", 1)
    assert first.keys() == {"train.parquet", "validation.parquet", "test.parquet", "stats.json"}
    assert first == again
    assert first["train.parquet"] != other["train.parquet"]


def test_capped_groups_keeps_at_most_the_cap_per_corpus_in_order():
    corpus = np.array(["mic"] * 5 + ["diasafety"] * 2 + ["mic"] * 2, dtype=object)
    keep, capped = mine.capped_groups(corpus, 3, [0, 1, 0, 4])
    assert capped == {"mic": 7}  # diasafety has 2 <= 3: untouched, not listed
    assert keep[5:7].all() and keep[corpus == "mic"].sum() == 3
    assert mine.capped_groups(corpus, 0, [0])[0].all() and mine.capped_groups(corpus, 0, [0])[1] == {}
    assert (mine.capped_groups(corpus, 3, [0, 1, 0, 4])[0] == keep).all()  # seeded


def test_max_groups_caps_each_corpus_and_changes_no_kept_group(tmp_path):
    rows = [row("mic", f"q{i}", [f"Question {i} about money?"], f"Answer {i}.",
                unacceptable=[(f"Steal money {i}", 1 + i % 5), (f"Cheat {i}", 2), (f"Lie {i}", 3)]) for i in range(12)]
    rows += [r for i in range(3) for r in labelled_rows("train", i)]
    normalized = write_corpora(tmp_path / "normalized", rows)
    stats = {}
    for name, caps in (("all", {}), ("capped", {"train": 2})):
        settings = config(stage1_max_groups=caps, stage1_corpora=["mic", "diasafety", "toxichat"])
        stats[name] = mine.run(settings, 1, normalized, FakeScorer(), tmp_path / name,
                               progress=False)
    every = {g["group_id"]: g for g in pq.read_table(tmp_path / "all" / "train.parquet").to_pylist()}
    kept = pq.read_table(tmp_path / "capped" / "train.parquet").to_pylist()
    # 12 MIC groups, 3 DiaSafety and 3 ToxiChat ones (the safe reply of each) before the cap; 2 of each after.
    assert Counter(g["corpus"] for g in every.values()) == {"mic": 12, "diasafety": 3, "toxichat": 3}
    assert Counter(g["corpus"] for g in kept) == {"mic": 2, "diasafety": 2, "toxichat": 2}
    assert all(every[g["group_id"]] == g for g in kept)  # the same negatives as without the cap
    ids = list(every)
    assert [ids.index(g["group_id"]) for g in kept] == sorted(ids.index(g["group_id"]) for g in kept)  # in order
    train = stats["capped"]["splits"]["train"]
    assert train["capped"] == {"diasafety": 3, "mic": 12, "toxichat": 3}
    assert train["groups"] == 6 and train["groups_per_corpus"] == {"diasafety": 2, "mic": 2, "toxichat": 2}
    assert sum(train["negatives_per_source"].values()) == 6 * 3
    assert "capped" not in stats["all"]["splits"]["train"]


# --- socially aware severities and retrieval ------------------------------------------------------


def test_severity_weights_follow_labels_mic_severity_and_the_classifier():
    pool = table([
        row("prosocial_dialog", "p1", ["I will punch the cat."], "Please don't.", label="__needs_intervention__"),
        row("prosocial_dialog", "p2", ["The cat is annoying, I might kick it."], "Don't.",
            label="__possibly_needs_caution__"),
        row("prosocial_dialog", "p3", ["Cats are cute, cat cat."], "They are.", label="__casual__"),
        row("mic", "m1", ["What about cats?"], "Cats are fine.", unacceptable=[("Kick every cat.", 4)]),
    ])
    rows = table([
        row("daily_dialog", "a", ["My cat keeps scratching, should I kick it?"], "No, trim its claws."),
        row("daily_dialog", "b", ["Hello"], "That is awful of you."),
        row("daily_dialog", "c", ["Hi"], "Nice to meet you."),
    ])
    groups, _ = mine.mine_split(rows, pool, config(n=5, stage2_sources={"hard": 1.0}), 2, "train", FakeScorer())
    # Row a: hard gives all three unsafe cat texts (the casual one is no negative), the fourth slot
    # passes to random, which takes the most unacceptable reply first. Rows b and c match no unsafe
    # text and have only two other replies: skipped.
    assert [g["group_id"] for g in groups.to_pylist()] == ["daily_dialog/a/0"]
    assert sorted(negatives(groups.to_pylist()[0])) == [
        ("I will punch the cat.", "hard", F32(1.0)),  # __needs_intervention__
        ("Kick every cat.", "hard", F32(4 / 5)),  # MIC violation-severity 4 of 5
        ("That is awful of you.", "random", F32(0.7)),  # random: 1 - P(casual) = 1 - 0.3
        ("The cat is annoying, I might kick it.", "hard", F32(0.4)),  # __possibly_needs_caution__
    ]
    rows = table([row("daily_dialog", "x", ["Hi"], "Nice to meet you."), row("daily_dialog", "y", ["Yo"], "Hey.")])
    groups, _ = mine.mine_split(rows, EMPTY, config(n=2, stage2_sources={"random": 1.0}), 2, "train", FakeScorer())
    # random: 1 - P(casual) = 0.05, floored at mine.random_severity = 0.1
    assert [negatives(g) for g in groups.to_pylist()] == [[("Hey.", "random", F32(0.1))],
                                                          [("Nice to meet you.", "random", F32(0.1))]]


def test_hard_negatives_are_retrieved_by_similarity_times_severity():
    pool = table([
        row("prosocial_dialog", "p1", ["The dog barks at night, I yell at the dog."], "No.",
            label="__possibly_needs_caution__"),
        row("prosocial_dialog", "p2", ["That dog barks, I will poison it."], "No.", label="__needs_intervention__"),
        row("prosocial_dialog", "p3", ["Robbing the bank is my plan."], "No.", label="__needs_intervention__"),
    ])
    rows = table([row("persona_chat", "x", ["My neighbour's dog barks all night."], "That sounds tiring.")])
    groups, _ = mine.mine_split(rows, pool, config(n=3, stage2_sources={"hard": 1.0}), 2, "train", FakeScorer())
    # TF-IDF cosine (checked by hand with sklearn): p1 0.846, p2 0.536, p3 0 (no shared word). Times
    # severity: p1 0.338 < p2 0.536, so p2 ranks first though p1 is more similar; p3 never appears.
    texts = [t for t, _, _ in negatives(groups.to_pylist()[0])]
    assert texts == ["That dog barks, I will poison it.", "The dog barks at night, I yell at the dog."]


def test_a_dialogues_own_turns_are_not_its_hard_negatives():
    rows = table([
        row("prosocial_dialog", "d1", ["I hate my lazy coworker."], "That sounds hard.", label="__needs_caution__"),
        row("prosocial_dialog", "d1", ["I hate my lazy coworker.", "That sounds hard.",
                                        "My coworker is lazy, I hate him."], "Try talking to them.", turn=1,
            label="__needs_caution__"),
        row("prosocial_dialog", "d2", ["My coworker is lazy and I will slap him."], "Please don't.",
            label="__needs_intervention__"),
    ])
    groups, _ = mine.mine_split(rows, rows, config(n=2, stage1_sources={"hard": 1.0}), 1, "train", FakeScorer())
    by_id = {g["group_id"]: negatives(g) for g in groups.to_pylist()}
    assert by_id["prosocial_dialog/d1/0"][0][0] == "My coworker is lazy and I will slap him."
    assert by_id["prosocial_dialog/d1/1"][0][0] == "My coworker is lazy and I will slap him."
    assert by_id["prosocial_dialog/d2/0"][0][1] == "hard"
    assert by_id["prosocial_dialog/d2/0"][0][0] in {"I hate my lazy coworker.", "My coworker is lazy, I hate him."}


# --- human-labelled replies (DiaSafety, ToxiChat) ------------------------------------------------


BLEACH = [
    row("diasafety", "d1", ["Is it fine to drink bleach to cure a cold?"], "No, bleach is poison; see a doctor.",
        reply="safe", category="Risk Ignorance"),
    row("diasafety", "d1", ["Is it fine to drink bleach to cure a cold?"], "Yes, bleach cures colds.", turn=1,
        reply="unsafe", category="Risk Ignorance"),
    row("diasafety", "d2", ["Should I drink bleach for my cold?"], "Go ahead and drink bleach.", reply="unsafe",
        category="Risk Ignorance"),
    row("toxichat", "t1", ["Bleach cures a cold, idiots."], "You are right, bleach works, idiots.", turn=1,
        reply="unsafe", offensive=True, agrees=True),
    row("toxichat", "t1", ["Bleach cures a cold, idiots."], "Bleach is dangerous; please don't drink it.", turn=2,
        reply="safe", offensive=False, agrees=False),
    row("prosocial_dialog", "p1", ["I will drink bleach for my cold."], "Please don't, it is poison.",
        label="__needs_intervention__"),
]
UNSAFE_REPLIES = {"Yes, bleach cures colds.", "Go ahead and drink bleach.", "You are right, bleach works, idiots."}


def test_labelled_replies_safe_positive_unsafe_negatives_same_context_first():
    rows = table(BLEACH)
    groups, stats = mine.mine_split(rows, rows, config(), 1, "train", FakeScorer())  # shares 0.4 / 0.4 / 0.2
    by_id = {g["group_id"]: g for g in groups.to_pylist()}
    # A reply humans judged unsafe is never a positive; d2 (only an unsafe reply) gives no group, counted.
    assert list(by_id) == ["diasafety/d1/0", "toxichat/t1/2", "prosocial_dialog/p1/0"]
    assert stats["skipped"] == {mine.SKIP_NO_SAFE_REPLY: 1}
    assert stats["contexts"] == 3 and stats["human_labelled"] == {"safe": 2, "unsafe": 3}
    # d1: its own context's unsafe reply first (DiaSafety's unsafe_category 0.6), then every slot left goes
    # to `hard`, from the other contexts' human-labelled unsafe replies only: not ProsocialDialog's unsafe
    # utterance "I will drink bleach for my cold.", though it is the most similar unsafe text, and no
    # random reply despite random's share.
    d1 = negatives(by_id["diasafety/d1/0"])
    assert d1[0] == ("Yes, bleach cures colds.", "context", F32(0.6))
    assert sorted(d1[1:]) == [("Go ahead and drink bleach.", "hard", F32(0.6)),
                              ("You are right, bleach works, idiots.", "hard", F32(1.0))]  # offensive and agreeing
    t1 = negatives(by_id["toxichat/t1/2"])
    assert t1[0] == ("You are right, bleach works, idiots.", "context", F32(1.0))
    assert sorted(t1[1:]) == [("Go ahead and drink bleach.", "hard", F32(0.6)),
                              ("Yes, bleach cures colds.", "hard", F32(0.6))]
    # ProsocialDialog's group keeps the shares; its hard negatives may be the labelled unsafe replies.
    p1 = negatives(by_id["prosocial_dialog/p1/0"])
    assert {text for text, source, _ in p1 if source == "hard"} <= UNSAFE_REPLIES
    assert {text for text, source, _ in p1 if source == "random"} <= {
        "No, bleach is poison; see a doctor.", "Bleach is dangerous; please don't drink it."}


def test_labelled_severities_come_from_the_labels_and_every_safe_reply_is_a_positive():
    vermin = ["Those people are vermin."]
    rows = table([
        row("toxichat", "t", vermin, "Let's not talk like that.", turn=1, reply="safe", offensive=False, agrees=False),
        row("toxichat", "t", vermin, "I disagree, everyone deserves respect.", turn=2, reply="safe", offensive=False,
            agrees=False),
        row("toxichat", "t", vermin, "Yeah, true.", turn=3, reply="unsafe", offensive=False, agrees=True),
        row("toxichat", "t", vermin, "Agreed, total vermin, losers.", turn=4, reply="unsafe", offensive=True,
            agrees=True),
        row("toxichat", "t", vermin, "You are a moron.", turn=5, reply="unsafe", offensive=True, agrees=False),
        # the same words in another corpus are another context: its reply is no `context` negative of ToxiChat's
        row("diasafety", "d", vermin, "Some groups are just worse.", reply="unsafe", category="Biased Opinion"),
    ])
    weights = {"offensive_and_agrees": 0.9, "offensive": 0.5, "agrees_offensive": 0.3, "unsafe_category": 0.2}
    groups, stats = mine.mine_split(rows, rows, config(n=5, reply_severity=weights), 1, "train", FakeScorer())
    expected = [("Agreed, total vermin, losers.", "context", F32(0.9)), ("You are a moron.", "context", F32(0.5)),
                ("Yeah, true.", "context", F32(0.3)), ("Some groups are just worse.", "hard", F32(0.2))]
    assert [g["positive"] for g in groups.to_pylist()] == ["Let's not talk like that.",
                                                          "I disagree, everyone deserves respect."]
    assert [negatives(g) for g in groups.to_pylist()] == [expected, expected]
    assert stats["skipped"] == {mine.SKIP_NO_SAFE_REPLY: 1}  # DiaSafety's context


def test_labelled_unsafe_replies_are_matched_by_the_turn_they_answered():
    """Stage 2's hard pool holds the human-labelled unsafe replies, retrieved by their own contexts: the
    reply 'Sure, go ahead.' shares no word with the casual context, its question does."""
    pool = table([
        row("diasafety", "d", ["Can I drink bleach for my cold?"], "Sure, go ahead.", reply="unsafe",
            category="Risk Ignorance"),
        row("diasafety", "e", ["What is your favourite film?"], "Films are for idiots.", reply="unsafe",
            category="Offending User"),
    ])
    rows = table([row("daily_dialog", "x", ["My cold is bad, maybe bleach would help?"], "Please see a doctor.")])
    groups, _ = mine.mine_split(rows, pool, config(n=2, stage2_sources={"hard": 1.0}), 2, "train", FakeScorer())
    assert [negatives(g) for g in groups.to_pylist()] == [[("Sure, go ahead.", "hard", F32(0.6))]]


# --- stage 2: generated source, replay ------------------------------------------------------------


def test_generated_source_keeps_only_flagged_samples():
    calls = []

    def generate(contexts, k):
        calls.append((contexts, k))
        return [["What an awful thing to say.", "Sounds fun!", "You are awful and dumb."][:k] for _ in contexts]

    rows = table([row("empathetic_dialogues", "e1", ["I got a puppy today!"], "How lovely!"),
                  row("empathetic_dialogues", "e2", ["I passed my exam."], "Congratulations!")])
    scorer = FakeScorer()
    cfg = config(n=3, generated=True, generated_k=3, stage2_sources={"generated": 1.0})
    groups, stats = mine.mine_split(rows, EMPTY, cfg, 2, "train", scorer, generate=generate)
    assert calls == [([["I got a puppy today!"], ["I passed my exam."]], 3)]
    for group in groups.to_pylist():
        assert negatives(group) == [("What an awful thing to say.", "generated", F32(0.7)),
                                    ("You are awful and dumb.", "generated", F32(0.7))]
    assert stats["generated"] == {"contexts": 2, "sampled": 6, "flagged": 4}
    # the classifier saw each sample with its own context
    assert [(c, ctx) for c, ctx in zip(*scorer.calls[0])][:2] == [
        ("What an awful thing to say.", ["I got a puppy today!"]), ("Sounds fun!", ["I got a puppy today!"])]


def test_generated_source_off_never_calls_the_generator(tmp_path):
    def generate(contexts, k):
        raise AssertionError("the generator must not be called while mine.generated is false")

    rows = table([row("daily_dialog", f"d{i}", [f"Hi {i}"], f"Hello {i}") for i in range(5)])
    groups, _ = mine.mine_split(rows, EMPTY, config(n=2, stage2_sources={"random": 1.0}), 2, "train", FakeScorer(),
                                generate=generate)
    assert groups.num_rows == 5
    assert [n["source"] for g in groups.to_pylist() for n in g["negatives"]] == ["random"] * 5


def test_the_generated_source_needs_a_loadable_stage1_model(tmp_path):
    from pipeline.errors import DataError

    with pytest.raises(DataError, match="not a model folder"):
        mine.load_stage1_generator(tmp_path, config())


# --- the stage-1 sampler: device, precision, batch size and decoding from `mine` (defect 3) --------


@pytest.fixture
def spied_sampling(monkeypatch):
    """Records each `generate_batch` call (prompts, decoding settings, seed, the targets' lengths) and
    each autocast context (device, precision) the stage-1 sampler opens."""
    from pipeline import devices, sampling

    calls, autocasts = [], []
    real_generate, real_autocast = sampling.generate_batch, devices.autocast

    def generate_batch(dm, prompts, decoding, seed, logprobs=True):
        targets, logps = real_generate(dm, prompts, decoding, seed, logprobs)
        calls.append({"prompts": len(prompts), "decoding": decoding, "seed": seed, "lengths": [len(t) for t in targets]})
        return targets, logps

    def autocast(device, precision):
        autocasts.append((device, precision))
        return real_autocast(device, precision)

    monkeypatch.setattr(sampling, "generate_batch", generate_batch)
    monkeypatch.setattr(devices, "autocast", autocast)
    return calls, autocasts


def test_the_stage1_sampler_decodes_as_the_mine_section_says(tiny_dialog_model_dir, spied_sampling):
    calls, autocasts = spied_sampling
    cfg = config(generated_batch_size=2, generated_max_new_tokens=3, generated_temperature=0.7, generated_top_p=0.5,
                 generated_top_k=5, precision="bf16")
    sampler = mine.load_stage1_generator(tiny_dialog_model_dir, cfg)
    contexts = [[f"hello number {i}"] for i in range(5)]
    replies = sampler(contexts, 3)
    assert [len(r) for r in replies] == [3] * 5
    # 5 contexts in batches of mine.generated_batch_size = 2, each at mine.precision on the model device
    assert [c["prompts"] for c in calls] == [2, 2, 1]
    assert autocasts == [("cpu", "bf16")] * 3
    for call in calls:
        decoding = call["decoding"]
        assert (decoding.k, decoding.max_new_tokens, decoding.temperature, decoding.top_p, decoding.top_k) == \
            (3, 3, 0.7, 0.5, 5)
        assert decoding.do_sample and max(call["lengths"]) <= 3
    assert len({c["seed"] for c in calls}) == 3  # each batch its own seed
    settings = sampler.settings  # what stats.json records
    assert (settings["device"], settings["precision"], settings["batch_size"]) == ("cpu", "bf16", 2)
    assert settings["decoding"]["top_p"] == 0.5 and settings["decoding"]["no_repeat_ngram_size"] == 0


def test_the_stage1_model_is_put_on_the_model_device(tiny_dialog_model_dir, monkeypatch):
    from pipeline import devices

    monkeypatch.setattr(devices, "model_device", lambda: "meta")  # where the CPU-only loader never puts a model
    sampler = mine.load_stage1_generator(tiny_dialog_model_dir, config())
    assert next(sampler.dm.model.parameters()).device.type == "meta" and sampler.device == "meta"


def test_fp16_without_a_gpu_is_a_config_error_naming_mine_precision(tiny_dialog_model_dir, monkeypatch):
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    with pytest.raises(ConfigError, match=r"mine\.precision = 'fp16'"):
        mine.load_stage1_generator(tiny_dialog_model_dir, config(precision="fp16"))


def test_stage2_records_how_the_stage1_model_was_sampled(tmp_path, tiny_dialog_model_dir):
    normalized = small_corpora(tmp_path / "normalized")
    cfg = config(generated=True, generated_k=2, generated_max_new_tokens=4, stage2_sources={"hard": 0.5, "generated": 0.5})
    sampler = mine.load_stage1_generator(tiny_dialog_model_dir, cfg)
    stats = mine.run(cfg, 2, normalized, FakeScorer(), tmp_path / "stage2", generate=sampler, progress=False)
    written = json.loads((tmp_path / "stage2" / "stats.json").read_text())
    assert written["stage1_sampler"] == json.loads(json.dumps(sampler.settings))
    assert written["stage1_sampler"]["decoding"]["max_new_tokens"] == 4
    assert stats["splits"]["train"]["generated"]["sampled"] == 2 * stats["splits"]["train"]["contexts"]


def test_stage2_replays_a_share_of_each_splits_stage1_groups(tmp_path):
    rows = []
    for split in SPLITS:
        rows += [row("mic", f"{split}q{i}", [f"Q {i}?"], f"A {i}.", split=split, unacceptable=[(f"Bad {i}", 3)])
                 for i in range(10)]
        rows.append(row("prosocial_dialog", f"{split}p", ["I yell at people."], "Please don't.", split=split,
                        label="__needs_caution__"))
        rows += [row(corpus, f"{split}-{i}", [f"Hi {i}"], f"Hello {i} from {corpus}", split=split)
                 for corpus in CASUAL_CORPORA for i in range(2)]
    normalized = write_corpora(tmp_path / "normalized", rows)
    cfg = config(replay=0.3, stage1_corpora=["prosocial_dialog", "mic"])
    mine.run(cfg, 1, normalized, FakeScorer(), tmp_path / "stage1", progress=False)
    mine.run(cfg, 2, normalized, FakeScorer(), tmp_path / "stage2", stage1_groups=tmp_path / "stage1", progress=False)
    stats = json.loads((tmp_path / "stage2" / "stats.json").read_text())
    for split in SPLITS:
        stage1 = {g["group_id"]: g for g in pq.read_table(tmp_path / "stage1" / f"{split}.parquet").to_pylist()}
        stage2 = pq.read_table(tmp_path / "stage2" / f"{split}.parquet").to_pylist()
        replayed = [g for g in stage2 if g["corpus"] in ("mic", "prosocial_dialog")]
        assert len(stage1) == 11 and len(replayed) == 3  # round(0.3 * 11)
        assert all(stage1[g["group_id"]] == g for g in replayed)  # copied as they are
        assert len(stage2) == 8 + 3 and stage2[-3:] == replayed  # the casual groups, then the replayed ones
        assert stats["splits"][split]["replayed"] == {"groups": 3, "of_stage1_groups": 11}


# --- the command ----------------------------------------------------------------------------------


def write_corpora(folder: Path, rows: list[dict], corpora=CORPORA) -> Path:
    """Write `<folder>/<corpus>/<split>.parquet` for every corpus, from the rows that belong there."""
    for corpus in corpora:
        (folder / corpus).mkdir(parents=True, exist_ok=True)
        for split in SPLITS:
            part = [r for r in rows if r["corpus"] == corpus and r["split"] == split]
            pq.write_table(table(part), folder / corpus / f"{split}.parquet")
    return folder


def small_corpora(folder: Path) -> Path:
    rows = []
    for split in SPLITS:
        for i in range(5):
            rows.append(row("prosocial_dialog", f"{split}{i}", [f"I want to yell at my kid {i}"], f"Stay calm {i}.",
                            split=split, label="__needs_caution__", rots=["It's wrong to yell at kids."]))
            rows.append(row("mic", f"{split}q{i}", [f"Do you yell at kids {i}?"], f"Never {i}.", split=split,
                            unacceptable=[(f"Yelling at kids works {i}", 3)]))
            for corpus in CASUAL_CORPORA:
                rows.append(row(corpus, f"{split}{i}", [f"How was your day {i}?"], f"{corpus} says great {i}.",
                                split=split))
            rows += labelled_rows(split, i)
    return write_corpora(folder, rows)


def write_params(path: Path, **mine_section) -> Path:
    import yaml

    path.write_text(yaml.safe_dump({"mine": {"replay": 0.5, **mine_section}, "judge": {"share": 0.5}}))
    return path


@pytest.fixture
def fake_safety(monkeypatch, tmp_path):
    monkeypatch.setattr(mine, "load_scorer", lambda path: FakeScorer())
    return tmp_path / "safety"


def invoke(*args):
    return CliRunner().invoke(app, ["mine", *map(str, args)])


def test_help():
    result = CliRunner().invoke(app, ["mine", "--help"])
    assert result.exit_code == 0 and "--stage" in result.output and "--stage1-groups" in result.output


def test_command_mines_both_stages(tmp_path, fake_safety):
    normalized = small_corpora(tmp_path / "normalized")
    params = write_params(tmp_path / "params.yaml")
    result = invoke("--stage", 1, "--normalized", normalized, "--safety", fake_safety, "--out", tmp_path / "g1",
                    "--params", params)
    assert result.exit_code == 0, result.output
    result = invoke("--stage", 2, "--normalized", normalized, "--safety", fake_safety, "--out", tmp_path / "g2",
                    "--stage1-groups", tmp_path / "g1", "--params", params)
    assert result.exit_code == 0, result.output
    # stage 1: five contexts of each adversarial corpus (a DiaSafety / ToxiChat context's safe reply), of
    # which only the method's half in the train split (the judge's half is the judge's: judge.share 0.5);
    # stage 2: five of each casual corpus + half of stage 1
    method = {corpus: int((~judge_half([[f"{prefix}{i}{end}"] for i in range(5)], 0.5)).sum())
              for corpus, prefix, end in (("diasafety", "Can pills cure my cold ", "?"),
                                          ("toxichat", "My roommate is a pig ", "."))}
    assert 0 < method["diasafety"] + method["toxichat"] < 10  # both halves are exercised
    stage1 = {"train": 10 + sum(method.values()), "validation": 20, "test": 20}
    for stage in (1, 2):
        for split in SPLITS:
            expected = stage1[split] if stage == 1 else 4 * 5 + round(0.5 * stage1[split])
            groups = pq.read_table(tmp_path / f"g{stage}" / f"{split}.parquet")
            assert groups.schema.equals(GROUPS) and groups.num_rows == expected
            for group in groups.to_pylist():
                assert len(group["negatives"]) == 3
                assert all(0 <= n["severity"] <= 1 and n["source"] in mine.MINE_SOURCES for n in group["negatives"])
    stats = json.loads((tmp_path / "g1" / "stats.json").read_text())
    assert stats["splits"]["train"]["groups_per_corpus"] == {"mic": 5, "prosocial_dialog": 5, **method}
    assert stats["halves"]["share"] == 0.5 and stats["halves"]["corpora_rows"]["diasafety"] == {
        "train_rows": 10, "method_rows": 2 * method["diasafety"]}
    # No judge-half reply is in any stage-1 train group, as a positive or as a negative.
    judge_texts = {f"{reply} {i}." for i in range(5) for reply in ("Ask a doctor first", "Take ten pills now",
                                                                     "Talk it over calmly", "Yes, a filthy pig")}
    judge_texts = {t for t in judge_texts if judge_half([[context_of(t)]], 0.5)[0]}
    train_groups = pq.read_table(tmp_path / "g1" / "train.parquet").to_pylist()
    used = {g["positive"] for g in train_groups} | {n["text"] for g in train_groups for n in g["negatives"]}
    assert judge_texts and not judge_texts & used


@pytest.mark.parametrize("case, message", [
    ("missing corpus", "mic/train.parquet: file not found (run `dvc repro normalize@mic` first)"),
    ("empty corpus", "has no rows in any split"),
    ("n < 2", "mine.n = 1 is not allowed"),
    ("shares", "shares must sum to 1"),
    ("no stage-1 groups", "needs --stage1-groups"),
    ("no safety model", "no scorer.json, not a safety classifier folder"),
    ("generated", "needs the stage-1 model: pass --stage1-model"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, monkeypatch, case, message):
    import shutil

    normalized = small_corpora(tmp_path / "normalized")
    params = write_params(tmp_path / "params.yaml")
    stage, extra = 1, []
    if case == "missing corpus":
        shutil.rmtree(normalized / "mic")
    elif case == "empty corpus":
        write_corpora(normalized, [], corpora=["mic"])
    elif case == "n < 2":
        write_params(params, n=1)
    elif case == "shares":
        write_params(params, stage1_sources={"context": 0.5, "hard": 0.4})
    elif case == "no stage-1 groups":
        stage = 2
    elif case == "generated":
        stage = 2
        write_params(params, generated=True, stage2_sources={"hard": 0.5, "generated": 0.5})
    if case != "no safety model":
        monkeypatch.setattr(mine, "load_scorer", lambda path: FakeScorer())
    result = invoke("--stage", stage, "--normalized", normalized, "--safety", tmp_path / "safety",
                    "--out", tmp_path / "out", "--params", params, *extra)
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], result.output
    assert not (tmp_path / "out").exists()


def test_stage_must_be_1_or_2(tmp_path):
    result = invoke("--stage", 3, "--normalized", tmp_path, "--safety", tmp_path, "--out", tmp_path / "out")
    assert result.exit_code == 2


# --- real rows ------------------------------------------------------------------------------------


def test_mines_the_bundled_sample(request, tmp_path):
    """Stage 1 on the bundled ProsocialDialog and MIC sample: every context becomes a group."""
    if not all((REPO_ROOT / "data" / "sample" / c).is_dir() for c in CORPORA):
        pytest.skip("the bundled sample is incomplete")
    normalized_sample_dir = request.getfixturevalue("normalized_sample_dir")
    stats = mine.run(config(), 1, normalized_sample_dir, FakeScorer(), tmp_path / "g1", progress=False)
    for split in SPLITS:
        groups = pq.read_table(tmp_path / "g1" / f"{split}.parquet").to_pylist()
        assert len(groups) == stats["splits"][split]["contexts"] > 0
        assert {n["source"] for g in groups for n in g["negatives"]} >= {"context", "hard"}


def context_of(reply: str) -> str:
    """The context `labelled_rows` gives a reply (its index is the number before the final full stop)."""
    i = reply.rstrip(".").split()[-1]
    return f"Can pills cure my cold {i}?" if reply.startswith(("Ask", "Take")) else f"My roommate is a pig {i}."
