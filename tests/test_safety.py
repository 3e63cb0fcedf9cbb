"""The safety stage: examples, metrics against hand-computed values, the three model kinds and their
pickle-free round trip, the command, bad input, and a check on real ProsocialDialog utterances."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from pipeline.artifacts import sha256
from pipeline.cli import app
from pipeline.config import SafetyConfig, SafetyHfConfig, SafetyScratchConfig, section_from_dict
from pipeline.errors import ConfigError, DataError
from pipeline.labels import SAFETY_LABELS as LABELS5
from pipeline.labels import THREE_WAY
from pipeline.metrics import accuracy, macro_f1
from pipeline.safety_models import SCORER_FILE, SafetyScorer, collapse_proba, context_texts, load_scorer, train_wordpiece
from pipeline.stages import safety

CASUAL, POSSIBLY, PROBABLY, CAUTION, INTERVENTION = LABELS5

# An obviously separable toy set: each class has its own words.
TOY = [
    ("what a lovely sunny day for a picnic", CASUAL),
    ("i baked a lovely cake for my friends", CASUAL),
    ("the picnic in the park was lovely", CASUAL),
    ("my friends and i baked bread today", CASUAL),
    ("i will steal money from my boss", CAUTION),
    ("stealing from the shop is easy money", CAUTION),
    ("i want to steal my neighbour's money", CAUTION),
    ("i lied and cheated to steal his money", CAUTION),
    ("i want to end my life tonight with pills", INTERVENTION),
    ("i have the pills ready to end it tonight", INTERVENTION),
    ("tonight i will end my life", INTERVENTION),
    ("the pills will end my pain tonight", INTERVENTION),
]


def toy_data():
    texts = [text for text, _ in TOY]
    labels = np.array([LABELS5.index(label) for _, label in TOY])
    return texts, [[] for _ in texts], labels, np.ones(len(texts))


def train_scorer(config: SafetyConfig, texts, contexts, labels, weights) -> SafetyScorer:
    return SafetyScorer.fit(config, [texts], contexts, labels, weights)


def save(scorer, config: SafetyConfig, folder: Path) -> Path:
    scorer.write(folder, config, {})
    return folder


@pytest.fixture(scope="module")
def toy_tfidf():
    config = SafetyConfig(context_turns=0)
    return config, train_scorer(config, *toy_data())


# --- metrics --------------------------------------------------------------------------------------


def test_accuracy_and_macro_f1_by_hand():
    actual = ["a", "a", "b", "c"]
    predicted = ["a", "b", "b", "a"]
    assert accuracy(actual, predicted) == 0.5
    # F1 per class: a: tp 1, 2 actual, 2 predicted -> 2/4; b: tp 1, 1 actual, 2 predicted -> 2/3; c: 0
    assert macro_f1(actual, predicted) == pytest.approx((0.5 + 2 / 3 + 0) / 3)
    assert accuracy([], []) is None and macro_f1([], []) is None


def test_macro_f1_agrees_with_scikit_learn():
    from sklearn.metrics import f1_score

    rng = np.random.default_rng(0)
    actual, predicted = rng.choice(list("abcde"), 200), rng.choice(list("abcd"), 200)
    assert macro_f1(actual, predicted) == pytest.approx(f1_score(actual, predicted, average="macro"))


def test_collapse_sums_the_three_caution_labels():
    probs5 = np.array([[0.1, 0.2, 0.3, 0.15, 0.25], [1, 0, 0, 0, 0]])
    np.testing.assert_allclose(collapse_proba(probs5), [[0.1, 0.65, 0.25], [1, 0, 0]])
    assert THREE_WAY == ("casual", "needs_caution", "needs_intervention")


def test_label_metrics_five_and_three_way_by_hand():
    actual5 = [CASUAL, POSSIBLY, INTERVENTION, CAUTION]
    probs5 = np.array([
        [0.4, 0.2, 0.2, 0.2, 0.0],  # five-way casual (right); three-way caution 0.6 (wrong: casual)
        [0.1, 0.2, 0.5, 0.2, 0.0],  # five-way probably (wrong); three-way caution (right)
        [0.0, 0.1, 0.1, 0.5, 0.3],  # five-way caution (wrong); three-way caution (wrong)
        [0.0, 0.0, 0.0, 0.9, 0.1],  # right both ways
    ])
    metrics = safety.label_metrics(actual5, probs5, majority5=CAUTION)
    assert metrics["n"] == 4
    assert metrics["accuracy5"] == 0.5
    # five-way F1: casual 1, possibly 0, probably 0, caution 2*1/(1+2) = 2/3, intervention 0 (5 classes)
    assert metrics["macro_f1_5"] == pytest.approx((1 + 0 + 0 + 2 / 3 + 0) / 5)
    assert metrics["accuracy3"] == 0.5
    # three-way: actual [casual, caution, intervention, caution], predicted [caution x4]
    # F1: casual 0, caution 2*2/(2+4) = 2/3, intervention 0
    assert metrics["macro_f1_3"] == pytest.approx((0 + 2 / 3 + 0) / 3)
    assert metrics["majority_accuracy5"] == 0.25
    assert metrics["majority_accuracy3"] == 0.5


# --- examples -------------------------------------------------------------------------------------


def test_build_examples_sources_labels_and_weights():
    prosocial = {"train": [
        {"context": ["hi", "hello", "i will hit him"], "response": "please don't.", "safety_label": CAUTION},
        {"context": ["nice day"], "response": "it is!", "safety_label": CASUAL},
    ], "validation": [], "test": []}
    bad = [{"text": "sure, go ahead", "severity": 4}, {"text": "meh", "severity": 1}]
    mic = {"train": [
        {"context": ["should i lie?"], "response": "no, honesty is better.", "unacceptable_responses": bad},
        {"context": ["should i lie?"], "response": "be honest.", "unacceptable_responses": bad},  # bad answers repeat
    ], "validation": [], "test": []}
    config = SafetyConfig(response_examples=["pd_responses", "mic_violations"], response_share=0.5)
    examples = safety.build_examples(prosocial, mic, config)
    rows = {(r.source, r.text): r for r in examples.itertuples()}
    assert Counter(examples["source"]) == {"pd_user": 2, "pd_responses": 2, "mic_answers": 2, "mic_violations": 2}
    user = rows[("pd_user", "i will hit him")]
    assert (user.context, user.label5, user.weight) == (["hi", "hello"], CAUTION, 1.0)
    assert rows[("pd_user", "nice day")].context == []
    assert rows[("pd_responses", "please don't.")].context == ["hi", "hello", "i will hit him"]
    assert rows[("pd_responses", "please don't.")].label5 == CASUAL
    # severity 4 -> the 4th label, severity 1 -> the 1st (defaults)
    assert rows[("mic_violations", "sure, go ahead")].label5 == CAUTION
    assert rows[("mic_violations", "meh")].label5 == CASUAL
    # 4 trained response examples share 0.5 x 2 user turns of weight; mic_answers are not trained on
    assert rows[("mic_violations", "meh")].weight == pytest.approx(0.25)
    assert rows[("pd_responses", "it is!")].weight == pytest.approx(0.25)
    assert rows[("mic_answers", "be honest.")].weight == 0.0


def test_build_examples_without_user_turns_is_an_error():
    empty = {"train": [], "validation": [], "test": []}
    with pytest.raises(DataError, match="no labelled user turns"):
        safety.build_examples(empty, empty, SafetyConfig())


def test_context_texts_keeps_the_last_turns():
    assert context_texts([["a", "b", "c"], [], None], 3, turns=2) == ["b\nc", "", ""]
    assert context_texts(None, 2, turns=1) == ["", ""]
    assert context_texts([["a"]], 1, turns=0) is None


# --- the tfidf kind -------------------------------------------------------------------------------


def test_tfidf_learns_a_separable_toy_set(toy_tfidf):
    _, scorer = toy_tfidf
    probs = scorer.predict_proba(["a lovely picnic with friends", "i will steal the money",
                                  "pills tonight to end my life"])
    assert probs.argmax(axis=1).tolist() == [0, 1, 2]


def test_predict_proba_shape_sum_and_column_order(toy_tfidf):
    _, scorer = toy_tfidf
    texts = ["lovely cake", "steal money", "end my life", "unrelated words"]
    probs5, probs = scorer.predict_proba5(texts), scorer.predict_proba(texts)
    assert probs5.shape == (4, 5) and probs.shape == (4, 3)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0)
    np.testing.assert_allclose(probs[:, 0], probs5[:, 0])  # casual
    np.testing.assert_allclose(probs[:, 1], probs5[:, 1:4].sum(axis=1))  # the three caution labels
    np.testing.assert_allclose(probs[:, 2], probs5[:, 4])  # intervention
    assert scorer.predict_proba([]).shape == (0, 3)
    with pytest.raises(ValueError, match="got 1 responses and 2 contexts"):
        scorer.predict_proba(["a"], [["x"], ["y"]])
    with pytest.raises(TypeError, match="responses must be a list of strings"):
        scorer.predict_proba(["a", None])


def test_tfidf_context_block_is_used_only_when_configured():
    texts, _, labels, weights = toy_data()
    # The utterance is neutral; only the context tells the classes apart.
    contexts = [[text] for text in texts]
    neutral = ["ok"] * len(texts)
    with_context = train_scorer(SafetyConfig(context_turns=1), neutral, contexts, labels, weights)
    probs = with_context.predict_proba(["ok", "ok"], [["lovely picnic"], ["end my life tonight"]])
    assert probs.argmax(axis=1).tolist() == [0, 2]
    alone = train_scorer(SafetyConfig(context_turns=0), neutral, contexts, labels, weights)
    np.testing.assert_array_equal(alone.predict_proba(["ok"], [["end my life"]]), alone.predict_proba(["ok"]))


def test_tfidf_round_trip_gives_identical_probabilities_without_pickle(toy_tfidf, tmp_path):
    config, scorer = toy_tfidf
    folder = save(scorer, config, tmp_path / "safety")
    with np.load(folder / "tfidf.npz", allow_pickle=False) as arrays:
        assert set(arrays.files) == {"terms", "idf", "char_terms", "char_idf", "coef", "intercept", "pair",
                                     "pair_buckets"}
        assert arrays["pair"].size == 0 and int(arrays["pair_buckets"]) == 0  # one text field: no pairwise view
        assert arrays["char_terms"].size == 0  # safety.tfidf.char_ngram = []: word n-grams only
    loaded = load_scorer(folder)
    texts = ["lovely cake", "steal money tonight", "never seen words"]
    np.testing.assert_array_equal(loaded.predict_proba5(texts), scorer.predict_proba5(texts))


def test_tfidf_is_deterministic(tmp_path):
    first = save(train_scorer(SafetyConfig(), *toy_data()), SafetyConfig(), tmp_path / "a")
    second = save(train_scorer(SafetyConfig(), *toy_data()), SafetyConfig(), tmp_path / "b")
    assert (first / "tfidf.npz").read_bytes() == (second / "tfidf.npz").read_bytes()


def test_tfidf_with_two_training_classes_still_gives_five_columns():
    texts, contexts, labels, weights = toy_data()
    keep = labels != LABELS5.index(INTERVENTION)
    scorer = train_scorer(SafetyConfig(), [t for t, k in zip(texts, keep) if k], [[]] * int(keep.sum()),
                          labels[keep], weights[keep])
    probs5 = scorer.predict_proba5(["lovely picnic", "steal money"])
    assert probs5.shape == (2, 5)
    assert probs5[:, 4].max() < 1e-6 and probs5.argmax(axis=1).tolist() == [0, 3]


# --- the transformer kinds ------------------------------------------------------------------------

TINY = dict(max_length=32, epochs=1, batch_size=4, lr=1e-3)


def test_scratch_trains_and_round_trips(tmp_path):
    config = SafetyConfig(model="scratch", scratch=SafetyScratchConfig(vocab_size=120, hidden_size=16, layers=1,
                                                                        heads=2, **TINY))
    texts, contexts, labels, weights = toy_data()
    scorer = train_scorer(config, texts, contexts, labels, weights)  # 3 steps
    folder = save(scorer, config, tmp_path / "safety")
    assert (folder / "encoder" / "model.safetensors").is_file()
    assert not list(folder.rglob("*.bin")) and not list(folder.rglob("*.pt"))
    loaded = load_scorer(folder)
    contexts = [["hello there"], [], ["lovely"]]
    texts = ["lovely cake", "steal money tonight", "pills"]
    expected = scorer.predict_proba(texts, contexts)
    assert expected.shape == (3, 3)
    np.testing.assert_allclose(expected.sum(axis=1), 1.0, rtol=1e-6)  # float32 probabilities
    np.testing.assert_allclose(loaded.predict_proba(texts, contexts), expected, rtol=0, atol=1e-6)


def test_hf_kind_fine_tunes_a_local_checkpoint_and_round_trips(tmp_path):
    from transformers import BertConfig, BertModel

    texts, contexts, labels, weights = toy_data()
    # A tiny encoder saved the way a hub checkpoint is: weights without a classification head.
    checkpoint = tmp_path / "tiny-encoder"
    tokenizer = train_wordpiece(texts, vocab_size=120, max_length=32)
    BertModel(BertConfig(vocab_size=len(tokenizer), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=32, max_position_embeddings=32)).save_pretrained(checkpoint)
    tokenizer.save_pretrained(checkpoint)
    config = SafetyConfig(model="hf", hf=SafetyHfConfig(name=str(checkpoint), **TINY))
    scorer = train_scorer(config, texts, contexts, labels, weights)
    loaded = load_scorer(save(scorer, config, tmp_path / "safety"))
    np.testing.assert_allclose(loaded.predict_proba5(texts[:3]), scorer.predict_proba5(texts[:3]), rtol=0, atol=1e-6)


def test_hf_kind_with_an_unloadable_name_is_a_one_line_error(tmp_path):
    config = SafetyConfig(model="hf", hf=SafetyHfConfig(name=str(tmp_path / "no-such-model"), **TINY))
    with pytest.raises(DataError, match="safety.hf.name"):
        train_scorer(config, *toy_data())


# --- config and bad input -------------------------------------------------------------------------


@pytest.mark.parametrize("section, key", [
    ({"model": "bert"}, "safety.model"),
    ({"response_examples": ["pd_responses", "reddit"]}, "safety.response_examples"),
    ({"mic_severity_labels": ["__casual__"]}, "safety.mic_severity_labels"),
    ({"context_turns": -1}, "safety.context_turns"),
    ({"scratch": {"hidden_size": 30, "heads": 4}}, "safety.scratch.heads"),
    ({"tfidf": {"C": 0}}, "safety.tfidf.C"),
])
def test_bad_safety_params_name_the_key(section, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        section_from_dict(section, "safety", SafetyConfig)


def test_load_scorer_without_scorer_json_is_an_error(tmp_path):
    (tmp_path / "tfidf.npz").write_bytes(b"")
    with pytest.raises(DataError, match="no scorer.json"):
        load_scorer(tmp_path)


def test_load_scorer_with_an_unknown_kind_is_an_error(tmp_path):
    (tmp_path / SCORER_FILE).write_text(json.dumps({"kind": "svm", "config": {}}))
    with pytest.raises(DataError, match="kind = 'svm'"):
        load_scorer(tmp_path)


# --- the command ----------------------------------------------------------------------------------

runner = CliRunner()


def params_file(repo_root: Path, folder: Path, **safety_section) -> Path:
    params = yaml.safe_load((repo_root / "params.yaml").read_text())
    params["safety"].update(safety_section)
    path = folder / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    return path


def test_safety_help():
    result = runner.invoke(app, ["safety", "--help"])
    assert result.exit_code == 0
    assert "--normalized" in result.output and "--reports" in result.output


@pytest.fixture(scope="module")
def sample_run(normalized_sample_dir, repo_root, tmp_path_factory):
    """The command run once on the bundled sample with the repository's params: (folder, result)."""
    folder = tmp_path_factory.mktemp("safety")
    params = params_file(repo_root, folder)
    result = runner.invoke(app, ["safety", "--normalized", str(normalized_sample_dir), "--out",
                                 str(folder / "models"), "--reports", str(folder / "reports"), "--params", str(params)])
    return folder, result


def test_command_writes_model_metrics_and_confusion(sample_run, normalized_sample_dir):
    import pyarrow.parquet as pq

    folder, result = sample_run
    assert result.exit_code == 0, result.output
    record = json.loads((folder / "models" / SCORER_FILE).read_text())
    assert record["kind"] == "tfidf" and record["labels5"] == list(LABELS5)
    assert "scikit-learn" in record["library_versions"]
    metrics = json.loads((folder / "reports" / "metrics.json").read_text())
    for split in ("train", "validation", "test"):
        block = metrics["prosocial_dialog"][split]
        labelled = pq.read_table(normalized_sample_dir / "prosocial_dialog" / f"{split}.parquet")["safety_label"]
        assert block["n"] == labelled.length() - labelled.null_count  # PD user turns only
        assert 0 <= block["accuracy5"] <= block["accuracy3"] <= 1
    assert set(metrics["responses"]["test"]) >= {"pd_responses", "mic_answers", "mic_violations", "accuracy3"}
    confusion = json.loads((folder / "reports" / "confusion.json").read_text())
    assert len(confusion) == metrics["prosocial_dialog"]["test"]["n"]
    assert {row["actual"] for row in confusion} <= {label.strip("_") for label in LABELS5}


def test_command_output_loads_and_matches_the_reported_accuracy(sample_run, normalized_sample_dir):
    import pyarrow.parquet as pq

    folder, _ = sample_run
    scorer = load_scorer(folder / "models")
    rows = pq.read_table(normalized_sample_dir / "prosocial_dialog" / "test.parquet").to_pylist()
    rows = [row for row in rows if row["safety_label"]]
    probs5 = scorer.predict_proba5([r["context"][-1] for r in rows], [r["context"][:-1] for r in rows])
    accuracy = np.mean([LABELS5[i] == r["safety_label"] for i, r in zip(probs5.argmax(axis=1), rows)])
    metrics = json.loads((folder / "reports" / "metrics.json").read_text())
    assert metrics["prosocial_dialog"]["test"]["accuracy5"] == pytest.approx(accuracy)


def test_command_with_a_missing_corpus_fails_in_one_line(normalized_sample_dir, repo_root, tmp_path):
    import shutil

    shutil.copytree(normalized_sample_dir / "prosocial_dialog", tmp_path / "normalized" / "prosocial_dialog")
    result = runner.invoke(app, ["safety", "--normalized", str(tmp_path / "normalized"), "--out", str(tmp_path / "m"),
                                 "--reports", str(tmp_path / "r"), "--params", str(params_file(repo_root, tmp_path))])
    assert result.exit_code == 2
    assert "mic/train.parquet" in result.output and "file not found (run `dvc repro normalize@mic` first)" in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "m").exists()


def test_command_with_an_unknown_model_fails_in_one_line(normalized_sample_dir, repo_root, tmp_path):
    params = params_file(repo_root, tmp_path, model="svm")
    result = runner.invoke(app, ["safety", "--normalized", str(normalized_sample_dir), "--out", str(tmp_path / "m"),
                                 "--reports", str(tmp_path / "r"), "--params", str(params)])
    assert result.exit_code == 2
    assert "safety.model = 'svm'" in result.output and "'tfidf'" in result.output


# --- real ProsocialDialog utterances --------------------------------------------------------------


def test_sample_model_beats_chance_on_real_prosocial_dialog_utterances(sample_run, shared_dir):
    """Train on the bundled sample (written for this project), evaluate on 1,024 real first user turns."""
    import pandas as pd

    path = shared_dir / "corpora" / "prosocialdialog" / "valid_first_turn_safety.csv"
    if not path.is_file():
        pytest.skip(f"{path} is absent")
    real = pd.read_csv(path)
    folder, _ = sample_run
    probs5 = load_scorer(folder / "models").predict_proba5(real["context"].tolist())  # first turns: no context
    predicted = [LABELS5[i] for i in probs5.argmax(axis=1)]
    accuracy5 = accuracy(real["safety_label"].tolist(), predicted)
    print(f"bundled-sample tfidf on valid_first_turn_safety.csv: 5-way accuracy {accuracy5:.3f} (n={len(real)})")
    assert accuracy5 > 0.2


# --- labelled utterance files (safety.utterance_files) --------------------------------------------


def write_utterances(path: Path, rows: list[tuple[str, str]], header=("context", "safety_label")) -> Path:
    import csv

    with open(path, "w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
    return path


UTTERANCES = [(f"utterance number {i} about {'stealing' if i % 3 else 'the weather'}",
               "__needs_caution__" if i % 3 else "__casual__") for i in range(60)]


def test_an_utterance_files_row_goes_to_the_split_its_normalized_text_picks(tmp_path):
    examples, record = safety.read_utterances(write_utterances(tmp_path / "u.csv", UTTERANCES))
    assert len(examples) == 60 and {e["source"] for e in examples} == {"pd_user"}
    assert all(e["context"] == [] and e["origin"] == str(tmp_path / "u.csv") for e in examples)
    # the split follows the text up to case and punctuation, so near-duplicates share it
    assert safety.utterance_split("Utterance number 7 about STEALING!") == examples[7]["split"]
    assert sum(record["rows"].values()) == 60 and record["rows"]["train"] > record["rows"]["test"] > 0
    assert record["sha256"] == sha256(tmp_path / "u.csv")


@pytest.mark.parametrize("rows, header, message", [
    ([("a", "__bad__")], ("context", "safety_label"), "line 2: unknown safety_label '__bad__'"),
    ([("a", "__casual__")], ("text", "safety_label"), "no column 'context'"),
    ([("", "__casual__")], ("context", "safety_label"), "no labelled utterance"),
])
def test_a_bad_utterance_file_is_a_one_line_error(tmp_path, rows, header, message):
    with pytest.raises(DataError, match=message):
        safety.read_utterances(write_utterances(tmp_path / "u.csv", rows, header))
    with pytest.raises(DataError, match="does not exist"):
        safety.read_utterances(tmp_path / "absent.csv")


def test_the_command_trains_on_utterance_files_and_records_the_majority_check(normalized_sample_dir, repo_root,
                                                                               tmp_path):
    path = write_utterances(tmp_path / "u.csv", UTTERANCES)
    params = params_file(repo_root, tmp_path, utterance_files=[str(path)])
    result = runner.invoke(app, ["safety", "--normalized", str(normalized_sample_dir), "--out", str(tmp_path / "m"),
                                 "--reports", str(tmp_path / "r"), "--params", str(params)])
    assert result.exit_code == 0, result.output
    record = json.loads((tmp_path / "m" / SCORER_FILE).read_text())
    metrics = json.loads((tmp_path / "r" / "metrics.json").read_text())
    files = metrics["utterance_files"]
    assert {split: files[split]["n"] for split in ("train", "validation", "test")} == record["utterance_files"][0]["rows"]
    # the files' rows join the user turns: trained on, and counted in the ProsocialDialog figures
    assert record["training_examples"]["pd_user"] == metrics["prosocial_dialog"]["train"]["n"]
    assert metrics["prosocial_dialog"]["train"]["n"] >= files["train"]["n"] > 0
    test = metrics["prosocial_dialog"]["test"]
    assert record["test"] == {"n": test["n"], "accuracy3": test["accuracy3"],
                              "majority_accuracy3": test["majority_accuracy3"],
                              "beats_majority": test["accuracy3"] > test["majority_accuracy3"]}


def test_the_real_utterances_with_the_sample_against_the_majority_label(normalized_sample_dir, repo_root, tmp_path,
                                                                        shared_dir):
    """The re-ranker's classifier as params.real.yaml trains it (tfidf here; the preset's kind may differ):
    ProsocialDialog's 1,024 real labelled first turns beside the sample, measured on their held-out tenth."""
    path = shared_dir / "corpora" / "prosocialdialog" / "valid_first_turn_safety.csv"
    if not path.is_file():
        pytest.skip(f"{path} is absent")
    params = params_file(repo_root, tmp_path, utterance_files=[str(path)])
    result = runner.invoke(app, ["safety", "--normalized", str(normalized_sample_dir), "--out", str(tmp_path / "m"),
                                 "--reports", str(tmp_path / "r"), "--params", str(params)])
    assert result.exit_code == 0, result.output
    test = json.loads((tmp_path / "r" / "metrics.json").read_text())["utterance_files"]["test"]
    print(f"tfidf, sample + real utterances: three-way accuracy {test['accuracy3']:.3f} against the majority "
          f"label's {test['majority_accuracy3']:.3f} on {test['n']} held-out real utterances")
    assert test["n"] > 60 and test["accuracy3"] > 0.4
