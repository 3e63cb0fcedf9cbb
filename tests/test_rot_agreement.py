"""RoT-guided re-ranking: the RoT-agreement scorer (examples, metrics by hand, toy patterns, the three
kinds' round trips, the command, bad input) and the re-ranker's `gamma * agreement` term (the
neutral fill, hand-computed scores and winners, gamma = 0 being the two-term re-ranker exactly,
generate's `agreement` column, chat)."""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import yaml
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.config import (
    GenerateConfig, RotAgreementConfig, RotAgreementScratchConfig, RotAgreementTfidfConfig, SafetyConfig,
    section_from_dict,
)
from pipeline.errors import ConfigError, DataError
from pipeline.modeling import split_candidate
from pipeline.rerank import NO_ROT_AGREEMENT, agreement_term, rerank, term_weights
from pipeline.safety_models import AGREEMENT_LABELS as LABELS
from pipeline.safety_models import SCORER_FILE, SafetyScorer, load_agreement_scorer, load_scorer
from pipeline.schemas import CANDIDATES
from pipeline import safety_models, sampling
from pipeline.stages import generate, rot_agreement

runner = CliRunner()
DISAGREES, NEUTRAL, AGREES = range(3)

# MIC-style rows with an obvious pattern: "go ahead" disagrees with the RoT, "not sure" is neutral,
# "never" agrees, whatever the RoT and the question.
QUESTIONS = [("Should I steal the money?", "It's wrong to steal."), ("Can I lie to my boss?", "You shouldn't lie."),
             ("Should I cheat on the test?", "It's bad to cheat."), ("May I skip paying?", "You should pay your way.")]
REPLIES = {
    DISAGREES: ["yes go ahead and do it", "sure go ahead it is fine", "go ahead nobody will care",
                "yes do it go ahead"],
    NEUTRAL: ["i am not sure about that", "maybe i am not sure", "hard to say i am not sure", "not sure really"],
    AGREES: ["no you should never do that", "never do that it is wrong", "no that is wrong never", "you should never"],
}


def mic_row(question, rot, answer, agrees, worker=""):
    return {"Q": question, "A": answer, "rot": rot, "A_agrees": agrees, "worker_answer": worker}


def toy_rows(worker=""):
    return [mic_row(q, rot, reply, label, worker) for label, replies in REPLIES.items()
            for (q, rot), reply in zip(QUESTIONS, replies)]


def toy_examples(rows=None):
    return rot_agreement.build_examples({"train": toy_rows() if rows is None else rows, "validation": [], "test": []},
                                        Counter())


def save(scorer, config: RotAgreementConfig, folder: Path) -> Path:
    scorer.write(folder, config, {})
    return folder


@pytest.fixture(scope="module")
def toy_tfidf():
    config = RotAgreementConfig()
    return config, rot_agreement.train(config, toy_examples())


PROBE_ROTS = ["It's wrong to steal.", "It's bad to cheat.", "You shouldn't lie."]
PROBE_REPLIES = ["go ahead and do it", "i am not sure", "you should never do that"]
PROBE_CONTEXTS = [["Should I steal?"], ["Should I cheat?"], ["Can I lie?"]]


# --- examples and metrics -------------------------------------------------------------------------


def test_examples_labels_skips_and_worker_answers():
    rows = [
        mic_row("Should I lie?", "Lying is wrong.", "sure, lie", 0, worker="no, be honest"),
        mic_row("Should I lie?", "Honesty matters.", "sure, lie", 2, worker=""),
        mic_row("Should I lie?", "", "sure, lie", 0, worker="no"),  # no RoT: skipped entirely
        mic_row("Should I lie?", "Lying is wrong.", "hm", None, worker="never lie"),  # no A_agrees: worker only
        mic_row("Should I lie?", "Lying is wrong.", "hm", 7, worker=""),  # A_agrees outside 0-2: skipped
    ]
    counts = Counter()
    examples = rot_agreement.build_examples({"train": rows, "validation": [], "test": []}, counts)
    got = [(e.source, e.reply, e.rot, e.context, e.label) for e in examples.itertuples()]
    assert got == [
        ("chatbot", "sure, lie", "Lying is wrong.", ["Should I lie?"], DISAGREES),
        ("worker", "no, be honest", "Lying is wrong.", ["Should I lie?"], rot_agreement.WORKER),
        ("chatbot", "sure, lie", "Honesty matters.", ["Should I lie?"], AGREES),
        ("worker", "never lie", "Lying is wrong.", ["Should I lie?"], rot_agreement.WORKER),
    ]
    assert counts == {"rows without a RoT, skipped": 1,
                      "chatbot answers with A_agrees None (not 0, 1 or 2), skipped": 1,
                      "chatbot answers with A_agrees 7 (not 0, 1 or 2), skipped": 1}
    # a worker answer is trained twice, as neutral and as agrees, with half the weight each
    chosen, labels, weights = rot_agreement.training_set(examples, worker_answer_weight=1.0)
    assert chosen["reply"].tolist() == ["sure, lie", "sure, lie", "no, be honest", "never lie", "no, be honest",
                                        "never lie"]
    assert labels.tolist() == [DISAGREES, AGREES, NEUTRAL, NEUTRAL, AGREES, AGREES]
    assert weights.tolist() == [1.0, 1.0, 0.5, 0.5, 0.5, 0.5]
    _, labels, weights = rot_agreement.training_set(examples, worker_answer_weight=0.0)
    assert labels.tolist() == [DISAGREES, AGREES] and weights.tolist() == [1.0, 1.0]


def test_each_raw_row_goes_to_its_questions_split_in_the_normalized_mic(tmp_path):
    """MIC's own split is by question-answer pair: a question in two raw files is one training and one
    test context at once. Rows follow the split normalize gave their question (matched with its
    whitespace collapsed), and a question the normalized MIC lacks is skipped and counted."""
    import pyarrow.parquet as pq

    from pipeline.schemas import NORMALIZED, RAW

    raw, normalized = tmp_path / "raw", tmp_path / "normalized" / "mic"
    raw.mkdir()
    normalized.mkdir(parents=True)
    files = {"train": [mic_row("Should  I lie?", "Lying is wrong.", "sure", 0), mic_row("Is it ok?", "Be kind.", "no", 2),
                       mic_row("Unknown question?", "A rule.", "yes", 1)],
             "validation": [],
             "test": [mic_row("Should I lie?", "Honesty matters.", "never", 2)]}
    for split, rows in files.items():
        rows = [{**r, "violation-severity": 3, "split": split} for r in rows]
        pq.write_table(pa.Table.from_pylist(rows, schema=RAW["mic"]), raw / f"{split}.parquet")
    held = {"train": ["Is it ok?"], "validation": [], "test": ["Should I lie?"]}  # normalize put the lie question in test
    for split, questions in held.items():
        rows = [{"corpus": "mic", "split": split, "dialogue_id": q, "turn_index": 0, "context": [q], "response": "r",
                 "rots": [], "safety_label": None, "persona": [], "emotion": None, "unacceptable_responses": [],
                 "derived_split": True} for q in questions]
        pq.write_table(pa.Table.from_pylist(rows, schema=NORMALIZED), normalized / f"{split}.parquet")
    counts = Counter()
    rows = rot_agreement.read_mic(raw, rot_agreement.question_splits(tmp_path / "normalized"), counts)
    assert {split: [(r["Q"], r["A"]) for r in part] for split, part in rows.items()} == {
        "train": [("Is it ok?", "no")], "validation": [],
        "test": [("Should  I lie?", "sure"), ("Should I lie?", "never")]}
    assert counts == {"rows whose question the normalized MIC lacks, skipped": 1}


def test_no_labelled_training_rows_is_an_error():
    rows = [mic_row("q", "r", "a", None, worker="w")]
    with pytest.raises(DataError, match="nothing to train on"):
        rot_agreement.build_examples({"train": rows, "validation": [], "test": []}, Counter())


def test_metrics_by_hand():
    import pandas as pd

    # train: chatbot labels [dis, dis, agr] (majority: disagrees); test: chatbot [dis, neu, agr, agr] + 2 workers
    examples = pd.DataFrame({
        "split": ["train"] * 3 + ["test"] * 6,
        "source": ["chatbot"] * 3 + ["chatbot"] * 4 + ["worker"] * 2,
        "label": [0, 0, 2, 0, 1, 2, 2, -1, -1],
    })
    predicted = [0, 0, 2, 0, 2, 2, 0, 0, 1]  # argmax per row
    probs = np.eye(3)[predicted] * 0.7 + 0.1
    metrics, confusion = rot_agreement.evaluate(examples, probs)
    test = metrics["test"]
    assert (test["n"], test["n_disagrees"], test["n_neutral"], test["n_agrees"]) == (4, 1, 1, 2)
    assert test["accuracy"] == 0.5  # dis ok, neu -> agr wrong, agr ok, agr -> dis wrong
    # F1: disagrees tp 1, 1 actual, 2 predicted -> 2/3; neutral 0; agrees tp 1, 2 actual, 2 predicted -> 1/2
    assert test["macro_f1"] == pytest.approx((2 / 3 + 0 + 1 / 2) / 3)
    assert test["majority_accuracy"] == 0.25  # always disagrees
    # disagrees or not: actual [T, F, F, F], predicted [T, F, F, T] -> 3 of 4
    assert test["binary_accuracy"] == 0.75
    assert test["worker_answers"] == {"n": 2, "not_disagrees": 0.5}
    assert metrics["validation"]["n"] == 0 and metrics["validation"]["accuracy"] is None
    assert confusion == [{"actual": "disagrees", "predicted": "disagrees"},
                         {"actual": "neutral", "predicted": "agrees"},
                         {"actual": "agrees", "predicted": "agrees"},
                         {"actual": "agrees", "predicted": "disagrees"}]


# --- the scorer -----------------------------------------------------------------------------------


def test_tfidf_learns_the_toy_pattern_in_label_order(toy_tfidf):
    _, scorer = toy_tfidf
    probs = scorer.predict_proba(PROBE_ROTS, PROBE_REPLIES, PROBE_CONTEXTS)
    assert probs.shape == (3, 3)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0)
    assert LABELS == ("disagrees", "neutral", "agrees")
    assert probs.argmax(axis=1).tolist() == [DISAGREES, NEUTRAL, AGREES]


def test_predict_proba_input_checks(toy_tfidf):
    _, scorer = toy_tfidf
    assert scorer.predict_proba([], []).shape == (0, 3)
    np.testing.assert_array_equal(scorer.predict_proba(PROBE_ROTS, PROBE_REPLIES),  # no contexts: empty ones
                                  scorer.predict_proba(PROBE_ROTS, PROBE_REPLIES, [[], [], []]))
    with pytest.raises(ValueError, match="counts must match"):
        scorer.predict_proba(PROBE_ROTS[:2], PROBE_REPLIES)
    with pytest.raises(TypeError, match="rots must be a list of strings"):
        scorer.predict_proba([None, "r", "r"], PROBE_REPLIES)
    with pytest.raises(TypeError, match="responses must be a list of strings"):
        scorer.predict_proba(["a rot"], "a reply")


def test_the_rot_and_the_context_are_read():
    # The replies are all "ok": only the RoT (first run) or only the question (second run) tells the labels apart.
    rows = [mic_row("a question", rot, "ok", label) for label, rot in
            ((DISAGREES, "rule alpha"), (NEUTRAL, "rule beta"), (AGREES, "rule gamma"))] * 3
    scorer = rot_agreement.train(RotAgreementConfig(), toy_examples(rows))
    probs = scorer.predict_proba(["rule alpha", "rule beta", "rule gamma"], ["ok"] * 3)
    assert probs.argmax(axis=1).tolist() == [DISAGREES, NEUTRAL, AGREES]
    rows = [mic_row(question, "a rule", "ok", label) for label, question in
            ((DISAGREES, "question red"), (NEUTRAL, "question green"), (AGREES, "question blue"))] * 3
    with_context = rot_agreement.train(RotAgreementConfig(context_turns=1), toy_examples(rows))
    probs = with_context.predict_proba(["a rule"] * 3, ["ok"] * 3, [["question red"], ["question green"],
                                                                  ["question blue"]])
    assert probs.argmax(axis=1).tolist() == [DISAGREES, NEUTRAL, AGREES]
    alone = rot_agreement.train(RotAgreementConfig(context_turns=0), toy_examples(rows))
    np.testing.assert_array_equal(alone.predict_proba(["a rule"], ["ok"], [["question red"]]),
                                  alone.predict_proba(["a rule"], ["ok"], [["question blue"]]))


def test_worker_answers_teach_not_disagreeing_without_choosing_neutral_or_agrees():
    # Every chatbot answer disagrees; the worker answers (the only other evidence) are half neutral, half agrees.
    rows = [mic_row(q, rot, reply, DISAGREES, worker=worker) for (q, rot), reply, worker in
            zip(QUESTIONS, REPLIES[DISAGREES], REPLIES[AGREES])]
    scorer = rot_agreement.train(RotAgreementConfig(), toy_examples(rows))
    probs = scorer.predict_proba(["It's wrong to steal."] * 2, ["go ahead and do it", "you should never do that"])
    assert probs[0].argmax() == DISAGREES and probs[1, DISAGREES] < 0.5
    # the two halves carry equal weight on the same texts, so neutral and agrees come out equal
    np.testing.assert_allclose(probs[:, NEUTRAL], probs[:, AGREES], rtol=1e-6)


def test_tfidf_round_trip_without_pickle(toy_tfidf, tmp_path):
    config, scorer = toy_tfidf
    folder = save(scorer, config, tmp_path / "agreement")
    with np.load(folder / "tfidf.npz", allow_pickle=False) as arrays:
        # reply, RoT and context blocks, then the pairwise view: the hashed pairs and 5 similarity columns
        assert arrays["coef"].shape == (3, 3 * len(arrays["terms"]) + config.tfidf.pair_buckets + 5)
        assert arrays["pair"].tolist() == [0, 1] and int(arrays["pair_buckets"]) == config.tfidf.pair_buckets
    loaded = load_agreement_scorer(folder)
    np.testing.assert_array_equal(loaded.predict_proba(PROBE_ROTS, PROBE_REPLIES, PROBE_CONTEXTS),
                                  scorer.predict_proba(PROBE_ROTS, PROBE_REPLIES, PROBE_CONTEXTS))


# --- the pairwise view (reply against RoT) ---------------------------------------------------------


def test_pair_features_by_hand():
    from scipy.sparse import csr_matrix

    from pipeline.safety_models import SIMILARITY_FEATURES, pair_features

    replies, rots = ["You should never lie", "sure"], ["It's wrong to lie.", "Be kind."]
    # stand-ins for the TF-IDF rows (unit length): cosine 0.6 for the first pair, 0 for the second
    first, second = csr_matrix([[0.6, 0.8, 0.0], [0.0, 0.0, 1.0]]), csr_matrix([[1.0, 0.0, 0.0], [1.0, 0.0, 0.0]])
    features = pair_features(replies, rots, first, second, buckets=1 << 20).toarray()
    assert features.shape == (2, (1 << 20) + len(SIMILARITY_FEATURES))
    hashed, similarity = features[:, :1 << 20], features[:, 1 << 20:]
    # words: {you, should, never, lie} x {it, wrong, to, lie} ("'s" is one letter: no word) -> 16 pairs of 1/4
    assert np.count_nonzero(hashed[0]) == 16 and np.allclose(hashed[0][hashed[0] > 0], 0.25)
    # "sure" x {be, kind}: 2 pairs of 1/sqrt(2)
    assert np.count_nonzero(hashed[1]) == 2 and np.allclose(hashed[1][hashed[1] > 0], 2 ** -0.5)
    # cosine, overlap {lie} / 7 words, "never" in the reply, "wrong" in the RoT, so they do not differ
    np.testing.assert_allclose(similarity, [[0.6, 1 / 7, 1, 1, 0], [0.0, 0.0, 0, 0, 0]])
    # the pairs are ordered (RoT word, reply word): swapping the fields moves the buckets
    swapped = pair_features(rots, replies, second, first, buckets=1 << 20).toarray()[:, :1 << 20]
    assert (np.flatnonzero(swapped[0]) != np.flatnonzero(hashed[0])).any()


def polarity_rows(verbs):
    """MIC-style rows where only the pair tells the label: a RoT for or against an act, a reply that does
    it or never does it. Every RoT word and every reply word goes with both labels equally often."""
    rows = []
    for verb in verbs:
        for rot, good in ((f"It's good to {verb}.", True), (f"It's wrong to {verb}.", False)):
            for reply, does in ((f"I always {verb}.", True), (f"I never {verb}.", False)):
                rows.append(mic_row(f"Do you {verb}?", rot, reply, AGREES if good == does else DISAGREES))
    return rows


TRAIN_VERBS = ["recycle", "tip waiters", "gossip", "cheat at cards", "litter", "volunteer", "lie to friends",
               "help neighbours", "shout at kids", "share food"]
HELD_OUT_VERBS = ["donate blood", "steal bikes", "vote", "bully people"]


def test_the_pairwise_view_sees_agreement_that_the_blocks_side_by_side_cannot():
    """Defect 7: with the reply, RoT and context blocks side by side, no feature depends on both the RoT
    and the reply, so an agreement that only the pair shows is at chance; the pairwise view learns it
    and carries it to acts never seen in training."""
    train = toy_examples(polarity_rows(TRAIN_VERBS))
    held_out = toy_examples(polarity_rows(HELD_OUT_VERBS))
    truth = held_out["label"].to_numpy()

    def held_out_accuracy(config):
        probs = rot_agreement.train(config, train).predict_proba(
            held_out["rot"].tolist(), held_out["reply"].tolist(), held_out["context"].tolist())
        return float(np.mean(probs.argmax(axis=1) == truth))

    assert RotAgreementConfig().tfidf.pair_buckets > 0  # the default scorer has the pairwise view
    assert held_out_accuracy(RotAgreementConfig()) == 1.0
    side_by_side = RotAgreementConfig(tfidf=RotAgreementTfidfConfig(pair_buckets=0))
    assert held_out_accuracy(side_by_side) == 0.5  # every polarity word is balanced: nothing to go on


def test_on_held_out_sample_rows_the_scorer_beats_the_reply_alone(raw_sample_dir, normalized_sample_dir):
    """Train on the sample's train split, compare on its validation and test questions (none of them
    in training): the ranking of P(disagrees), which is what the re-ranker uses. The sample is the
    only MIC here (../shared has no real MIC rows), and small: 77 held-out chatbot answers."""
    splits = rot_agreement.question_splits(normalized_sample_dir)
    examples = rot_agreement.build_examples(rot_agreement.read_mic(raw_sample_dir / "mic", splits, Counter()), Counter())
    held_out = (examples["split"] != "train").to_numpy() & (examples["source"] == "chatbot").to_numpy()
    disagrees = examples["label"].to_numpy()[held_out] == DISAGREES
    config = RotAgreementConfig()
    probs = rot_agreement.train(config, examples).predict_proba(
        examples["rot"].tolist(), examples["reply"].tolist(), examples["context"].tolist())
    reply_only = rot_agreement.one_field_probs(config, examples, "reply")
    auc = rot_agreement.disagrees_auc(disagrees, probs[held_out, DISAGREES])
    auc_reply = rot_agreement.disagrees_auc(disagrees, reply_only[held_out, DISAGREES])
    print(f"held-out sample MIC, n={held_out.sum()}: disagrees AUC scorer {auc:.3f}, reply alone {auc_reply:.3f}")
    questions = examples["context"].map(tuple).to_numpy()
    assert not set(questions[held_out]) & set(questions[(examples["split"] == "train").to_numpy()])
    assert held_out.sum() >= 50
    assert auc > auc_reply + 0.05


def test_disagrees_auc_by_hand():
    # disagreeing answers score 0.9 and 0.4; the others 0.5, 0.1, 0.4: of the 6 pairs, 0.9 beats all 3,
    # 0.4 beats 0.1, ties 0.4 (a half) and loses to 0.5 -> (3 + 1.5) / 6
    is_disagrees = np.array([True, True, False, False, False])
    assert rot_agreement.disagrees_auc(is_disagrees, np.array([0.9, 0.4, 0.5, 0.1, 0.4])) == pytest.approx(0.75)
    assert rot_agreement.disagrees_auc(np.array([True, True]), np.array([0.1, 0.2])) is None


def test_scratch_kind_trains_and_round_trips(tmp_path):
    config = RotAgreementConfig(model="scratch", scratch=RotAgreementScratchConfig(
        vocab_size=120, hidden_size=16, layers=1, heads=2, max_length=32, epochs=1, batch_size=4, lr=1e-3))
    scorer = rot_agreement.train(config, toy_examples())
    folder = save(scorer, config, tmp_path / "agreement")
    assert (folder / "encoder" / "model.safetensors").is_file() and not list(folder.rglob("*.bin"))
    loaded = load_agreement_scorer(folder)
    assert loaded.kind == "scratch" and loaded.classifier.model.config.num_labels == 3
    expected = scorer.predict_proba(PROBE_ROTS, PROBE_REPLIES, PROBE_CONTEXTS)
    np.testing.assert_allclose(expected.sum(axis=1), 1.0, rtol=1e-6)
    np.testing.assert_allclose(loaded.predict_proba(PROBE_ROTS, PROBE_REPLIES, PROBE_CONTEXTS), expected, atol=1e-6)


def test_a_safety_folder_is_not_an_agreement_scorer_and_vice_versa(toy_tfidf, tmp_path):
    config, scorer = toy_tfidf
    agreement = save(scorer, config, tmp_path / "agreement")
    texts, labels = ["lovely day", "i will steal"], np.array([0, 3])
    safety = tmp_path / "safety"
    safety_config = SafetyConfig(context_turns=0)
    SafetyScorer.fit(safety_config, [texts], [[], []], labels, np.ones(2)).write(safety, safety_config, {})
    with pytest.raises(DataError, match="task = 'safety', not a RoT-agreement scorer"):
        load_agreement_scorer(safety)
    with pytest.raises(DataError, match="task = 'rot_agreement', not a safety classifier"):
        load_scorer(agreement)
    with pytest.raises(DataError, match="no scorer.json, not a RoT-agreement scorer folder"):
        load_agreement_scorer(tmp_path)


def test_an_unknown_kind_in_scorer_json_is_an_error(tmp_path):
    (tmp_path / SCORER_FILE).write_text(json.dumps({"task": "rot_agreement", "kind": "svm", "config": {}}))
    with pytest.raises(DataError, match="kind = 'svm'"):
        load_agreement_scorer(tmp_path)


@pytest.mark.parametrize("section, key", [
    ({"model": "svm"}, "rot_agreement.model"),
    ({"context_turns": 9}, "rot_agreement.context_turns"),
    ({"worker_answer_weight": -1}, "rot_agreement.worker_answer_weight"),
    ({"tfidf": {"C": 0}}, "rot_agreement.tfidf.C"),
    ({"scratch": {"hidden_size": 30, "heads": 4}}, "rot_agreement.scratch.heads"),
    ({"hf": {"name": " "}}, "rot_agreement.hf.name"),
])
def test_bad_params_name_the_rot_agreement_key(section, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        section_from_dict(section, "rot_agreement", RotAgreementConfig)


# --- the command ----------------------------------------------------------------------------------


def params_file(repo_root: Path, folder: Path, **section) -> Path:
    params = yaml.safe_load((repo_root / "params.yaml").read_text())
    params["rot_agreement"].update(section)
    path = folder / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    return path


def invoke_stage(raw: Path, normalized: Path, folder: Path, params: Path):
    return runner.invoke(app, ["rot_agreement", "--raw", str(raw), "--normalized", str(normalized), "--out",
                               str(folder / "models"), "--reports", str(folder / "reports"), "--params", str(params)])


def normalized_question_splits(normalized: Path) -> dict[str, str]:
    """Each question's split, read straight from the normalized MIC files (its one context turn)."""
    import pyarrow.parquet as pq

    return {" ".join(context[-1].split()): split for split in ("train", "validation", "test")
            for context in pq.read_table(normalized / "mic" / f"{split}.parquet")["context"].to_pylist()}


def raw_rows_by_question_split(raw: Path, normalized: Path) -> dict[str, list[dict]]:
    import pyarrow.parquet as pq

    splits = normalized_question_splits(normalized)
    rows = {split: [] for split in ("train", "validation", "test")}
    for source in rows:
        for r in pq.read_table(raw / f"{source}.parquet").to_pylist():
            rows[splits[" ".join(r["Q"].split())]].append(r)
    return rows


def test_help():
    result = runner.invoke(app, ["rot_agreement", "--help"])
    assert result.exit_code == 0 and "--raw" in result.output and "--reports" in result.output


def test_command_on_the_bundled_sample(raw_sample_dir, normalized_sample_dir, repo_root, tmp_path):
    result = invoke_stage(raw_sample_dir / "mic", normalized_sample_dir, tmp_path, params_file(repo_root, tmp_path))
    assert result.exit_code == 0, result.output
    record = json.loads((tmp_path / "models" / SCORER_FILE).read_text())
    assert (record["task"], record["kind"], record["labels"]) == ("rot_agreement", "tfidf", list(LABELS))
    metrics = json.loads((tmp_path / "reports" / "metrics.json").read_text())
    by_split = raw_rows_by_question_split(raw_sample_dir / "mic", normalized_sample_dir)
    for split, raw in by_split.items():
        assert metrics[split]["n"] == sum(r["A_agrees"] in (0, 1, 2) and bool(r["rot"]) for r in raw)
        assert 0 <= metrics[split]["accuracy"] <= 1 and 0 <= metrics[split]["macro_f1"] <= 1
        assert metrics[split]["worker_answers"]["n"] == sum(bool(r["worker_answer"]) for r in raw)
    confusion = json.loads((tmp_path / "reports" / "confusion.json").read_text())
    assert len(confusion) == metrics["test"]["n"]
    # the tfidf kind also reports the one-field baselines, split by split
    for baseline in ("reply_only", "rot_only"):
        assert set(metrics[baseline]) == {"train", "validation", "test"}
        assert set(metrics[baseline]["test"]) == {"accuracy", "macro_f1", "binary_accuracy", "disagrees_auc"}
    assert metrics["skipped"] == {}  # every raw question is in the normalized MIC
    assert 0 <= metrics["test"]["disagrees_auc"] <= 1
    # the written model gives the reported test accuracy
    scorer = load_agreement_scorer(tmp_path / "models")
    test = [r for r in by_split["test"] if r["A_agrees"] in (0, 1, 2)]
    probs = scorer.predict_proba([r["rot"] for r in test], [r["A"] for r in test], [[r["Q"]] for r in test])
    assert metrics["test"]["accuracy"] == pytest.approx(np.mean(probs.argmax(axis=1) == [r["A_agrees"] for r in test]))


def test_command_without_raw_mic_fails_in_one_line(normalized_sample_dir, repo_root, tmp_path):
    result = invoke_stage(tmp_path / "raw" / "mic", normalized_sample_dir, tmp_path, params_file(repo_root, tmp_path))
    assert result.exit_code == 2
    assert "mic/train.parquet: file not found (run `dvc repro download@mic`" in result.output
    assert len(result.output.strip().splitlines()) == 1 and not (tmp_path / "models").exists()


def test_command_with_an_unknown_model_kind_fails_in_one_line(raw_sample_dir, normalized_sample_dir, repo_root,
                                                              tmp_path):
    result = invoke_stage(raw_sample_dir / "mic", normalized_sample_dir, tmp_path,
                          params_file(repo_root, tmp_path, model="svm"))
    assert result.exit_code == 2
    assert "rot_agreement.model = 'svm'" in result.output and "'tfidf'" in result.output
    assert len(result.output.strip().splitlines()) == 1


# --- the re-ranker's third term -------------------------------------------------------------------


def test_candidates_without_a_rot_get_their_contexts_mean():
    nan = math.nan
    # context a: RoTs with 0.9 and 0.3 -> the one without gets 0.6; context b: no RoT at all -> 0.5 each;
    # context c: one RoT (0.2) -> its neighbour gets 0.2. Contexts interleaved on purpose.
    groups = ["a", "b", "a", "c", "a", "b", "c"]
    values = [0.9, nan, nan, 0.2, 0.3, nan, nan]
    assert NO_ROT_AGREEMENT == 0.5
    assert agreement_term(values, groups).tolist() == pytest.approx([0.9, 0.5, 0.6, 0.2, 0.3, 0.5, 0.2])


GROUPS = ["a", "a", "a", "b", "b"]
INDEX = [0, 1, 2, 0, 1]
FLUENCY = np.array([0.6, 0.5, 0.7, 0.5, 0.5])
PROSOCIAL = np.array([0.5, 0.5, 0.4, 0.3, 0.3])
AGREEMENT = np.array([0.2, 0.9, 0.5, 0.4, 0.4])


def test_gamma_adds_the_agreement_term_by_hand():
    terms = {"fluency": FLUENCY, "prosociality": PROSOCIAL, "agreement": AGREEMENT}
    weights = term_weights(GenerateConfig(alpha=1.0, beta=1.0, gamma=0.5))
    assert weights == {"fluency": 1.0, "prosociality": 1.0, "agreement": 0.5}
    result = rerank(GROUPS, INDEX, terms, weights)
    # a: 1.1 + 0.1 = 1.2, 1.0 + 0.45 = 1.45, 1.1 + 0.25 = 1.35; b: 0.8 + 0.2 twice (a tie: the earlier sample)
    assert result.score.tolist() == pytest.approx([1.2, 1.45, 1.35, 1.0, 1.0])
    assert result.rank.tolist() == [3, 1, 2, 1, 2]
    # without the term, candidates 0 and 2 of context a tie at 1.1 and the first sample wins
    two = rerank(GROUPS, INDEX, {"fluency": FLUENCY, "prosociality": PROSOCIAL},
                 term_weights(GenerateConfig(alpha=1.0, beta=1.0, gamma=0.0)))
    assert two.rank.tolist() == [1, 3, 2, 1, 2]


def test_gamma_zero_leaves_the_term_out():
    assert term_weights(GenerateConfig(gamma=0.0)) == {"fluency": 1.0, "prosociality": 1.0}
    with pytest.raises(ConfigError, match="generate.gamma"):
        GenerateConfig(gamma=-0.1)


class FakeAgreementScorer:
    """P(disagrees) 0.7 for a reply that says "yes", else 0.2; neutral 0.1; agrees the rest."""

    def __init__(self):
        self.calls = []

    def predict_proba(self, rots, responses, contexts=None):
        self.calls.append((list(rots), list(responses), contexts))
        disagrees = np.array([0.7 if "yes" in r.split() else 0.2 for r in responses])
        return np.stack([disagrees, np.full(len(responses), 0.1), 0.9 - disagrees], axis=1)


# Per context: a RoT and "yes sure" (1 - 0.7 = 0.3), no RoT, a RoT and "i will not" (0.8), no RoT;
# the two without a RoT get the mean 0.55. FakeSafetyScorer's P(casual) = 1 / (1 + words).
FIXED = ["<|rot|> Be kind. <|response|> yes sure", "<|response|> no", "<|rot|> Do not lie. <|response|> i will not",
         "<|response|> ok then"]
FIXED_P = [0.5, 0.6, 0.8, 0.5]  # per-token probabilities


def fixed_sampler(dm, sources, config, seed, **options):
    texts = [FIXED[j] for _ in sources for j in range(config.k)]
    parsed = [split_candidate(t) for t in texts]
    fluency = np.log([FIXED_P[j] for _ in sources for j in range(config.k)])
    return sampling.Sampled(texts, [p[0] for p in parsed], [p[1] for p in parsed], fluency, tokens=len(texts))


def candidates(monkeypatch, gamma, agreement_scorer):
    from conftest import FakeSafetyScorer

    monkeypatch.setattr(generate, "sample_candidates", fixed_sampler)
    rows = [{"dialogue_id": f"d{i}", "turn_index": 1, "context": [f"hello {i}"], "safety_label": None,
             "response": "hi", "rots": [], "persona": [], "emotion": None} for i in range(2)]
    config = GenerateConfig(k=4, batch_size=2, gamma=gamma)
    table, stats = generate.candidates_table(None, FakeSafetyScorer(), rows, "stage2", "daily_dialog", config,
                                             progress=False, agreement_scorer=agreement_scorer)
    return table.to_pydict(), stats


def test_generate_writes_the_agreement_column_and_gamma_changes_the_winner(monkeypatch):
    scorer = FakeAgreementScorer()
    data, stats = candidates(monkeypatch, 0.5, scorer)
    assert data["agreement"][:4] == pytest.approx([0.3, 0.55, 0.8, 0.55])
    assert data["agreement"][4:] == pytest.approx([0.3, 0.55, 0.8, 0.55])
    # only candidates with a RoT are scored, each in its context
    rots, responses, contexts = scorer.calls[0]
    assert rots == ["Be kind.", "Do not lie."] * 2 and responses == ["yes sure", "i will not"] * 2
    assert contexts == [["hello 0"], ["hello 0"], ["hello 1"], ["hello 1"]]
    # fluency + P(casual) + 0.5 * agreement: 0.5 + 1/3 + 0.15, 0.6 + 1/2 + 0.275, 0.8 + 1/4 + 0.4, 0.5 + 1/3 + 0.275
    assert data["score"][:4] == pytest.approx([0.5 + 1 / 3 + 0.15, 1.375, 1.45, 0.5 + 1 / 3 + 0.275], rel=1e-6)
    assert data["rank"][:4] == [4, 2, 1, 3] and data["selected"][:4] == [False, False, True, False]
    assert stats["agreement_filled"] == 4  # two per context
    assert pa.table(data, schema=CANDIDATES).schema.field("agreement").type == pa.float32()


def test_gamma_zero_is_the_two_term_reranker_exactly(monkeypatch):
    with_scorer, _ = candidates(monkeypatch, 0.0, FakeAgreementScorer())
    without, stats = candidates(monkeypatch, 0.0, None)
    assert with_scorer["score"] == without["score"]  # bit for bit
    assert with_scorer["rank"] == without["rank"] == [3, 1, 2, 4] * 2  # 0.833, 1.1, 1.05, 0.833 (tie: earlier)
    assert with_scorer["agreement"][:4] == pytest.approx([0.3, 0.55, 0.8, 0.55])  # still written
    assert without["agreement"] == [None] * 8 and stats["agreement_filled"] is None


def test_gamma_without_an_agreement_scorer_is_a_config_error(monkeypatch):
    with pytest.raises(ConfigError, match="generate.gamma = 0.5"):
        candidates(monkeypatch, 0.5, None)


def write_generate_params(path: Path, **section) -> Path:
    path.write_text(yaml.safe_dump({"generate": {"max_contexts": 2, "k": 2, "batch_size": 2, "max_new_tokens": 6,
                                                 **section}, "audit": {"models": {}}}))
    return path


def test_generate_command_needs_agreement_when_gamma_is_positive(tmp_path, tiny_dialog_model_dir, fake_safety_scorer):
    params = write_generate_params(tmp_path / "params.yaml", gamma=0.5)
    result = runner.invoke(app, ["generate", "stage2", "--model", str(tiny_dialog_model_dir), "--safety",
                                 str(tmp_path / "safety"), "--normalized", str(tmp_path / "normalized"), "--out",
                                 str(tmp_path / "out"), "--params", str(params)])
    assert result.exit_code == 2, result.output
    assert "generate.gamma = 0.5" in result.stderr and "--agreement" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_chat_shows_the_agreement(tmp_path, tiny_dialog_model_dir, fake_safety_scorer, monkeypatch):
    scorer = FakeAgreementScorer()
    monkeypatch.setattr(safety_models, "load_agreement_scorer", lambda path: scorer)
    params = write_generate_params(tmp_path / "params.yaml", k=3, max_new_tokens=8, gamma=0.5)
    result = runner.invoke(app, ["chat", "--model", str(tiny_dialog_model_dir), "--safety", str(tmp_path / "s"),
                                 "--agreement", str(tmp_path / "a"), "--params", str(params)], input="hi\n")
    assert result.exit_code == 0, result.output
    assert "RoT agreement: " in result.output and "+ 0.5 * agreement" in result.output
    assert "prosocial  agree   score" in result.output
    without = runner.invoke(app, ["chat", "--model", str(tiny_dialog_model_dir), "--safety", str(tmp_path / "s"),
                                  "--params", str(params)], input="hi\n")
    assert without.exit_code == 2 and "generate.gamma = 0.5" in without.stderr


def test_the_repository_params_and_stages(repo_root):
    from pipeline.config import load_section

    for preset in ("params.yaml", "params.paper.yaml"):  # the term is off until shown to work on real MIC
        assert load_section(repo_root / preset, "generate", GenerateConfig).gamma == 0
        assert load_section(repo_root / preset, "rot_agreement", RotAgreementConfig).tfidf.pair_buckets > 0
    assert load_section(repo_root / "params.yaml", "rot_agreement", RotAgreementConfig).model == "tfidf"
    stages = yaml.safe_load((repo_root / "dvc.yaml").read_text())["stages"]
    stage = stages["rot_agreement"]
    assert stage["cmd"].split() == ["python", "-m", "pipeline", "rot_agreement", "--raw", "data/raw/mic",
                                    "--normalized", "data/normalized", "--out",
                                    "models/rot_agreement", "--reports", "reports/rot_agreement"]
    assert {"pipeline/stages/rot_agreement.py", "pipeline/safety_models.py", "data/raw/mic",
            "data/normalized/mic"} <= set(stage["deps"])
    # the figures are a plain output, not a DVC metric: only reports/headline/ holds those
    assert stage["params"] == ["rot_agreement"] and "metrics" not in stage
    assert stage["outs"] == ["models/rot_agreement", {"reports/rot_agreement/metrics.json": {"cache": False}}]
    for name in ("generate", "audit"):
        do = stages[name]["do"]
        assert "--agreement models/rot_agreement" in do["cmd"]
        assert {"models/rot_agreement", "pipeline/safety_models.py"} <= set(do["deps"])
