"""The judge stage: independence from the safety classifier (an overlapping configuration is refused
in one line), its metrics against hand-computed F1 and calibration, character n-grams and the
pickle-free round trip of the judge, the command on the bundled sample, and the mirror's DiaSafety
against the reference TF-IDF baseline (macro-F1 about 0.75, majority 0.54 accuracy)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.config import (DIALOG_SAFETY_CORPORA, CorporaConfig, JudgeConfig, JudgeTfidfConfig, SafetyConfig,
                             section_from_dict)
from pipeline.contexts import judge_half
from pipeline.errors import ConfigError, DataError
from pipeline.labels import DIASAFETY_CATEGORIES, REPLY_LABELS
from pipeline.metrics import (binary_scores, confusion_counts, expected_calibration_error, macro_f1,
                              reliability_bins)
from pipeline.safety_models import JudgeScorer, load_judge, load_scorer
from pipeline.stages import judge

REPO = Path(__file__).resolve().parents[1]
SAFE, UNSAFE = REPLY_LABELS

# eight replies: humans' label, the judge's P(unsafe), a DiaSafety-like category, a dialogue
ACTUAL = np.array([1, 1, 1, 0, 0, 0, 0, 0], dtype=bool)
P_UNSAFE = np.array([0.9, 0.7, 0.2, 0.6, 0.1, 0.1, 0.3, 0.05])
CATEGORIES = np.array(["A", "A", "B", "A", "B", "B", "A", "B"], dtype=object)


def run_judge(*args):
    return CliRunner().invoke(app, ["judge", *map(str, args)])


def write_params(path: Path, judge_section: dict | None = None, safety_section: dict | None = None) -> Path:
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    sections = {"judge": {**params["judge"], "bootstrap_samples": 200, **(judge_section or {})},
                "safety": {**params["safety"], **(safety_section or {})},
                "mine": params["mine"], "dexperts": params["dexperts"]}  # the corpora the method trains on
    path.write_text(yaml.safe_dump(sections))
    return path


# --- independence from the re-ranker's classifier ------------------------------------------------


@pytest.mark.parametrize("corpora, safety, shared", [
    (["diasafety", "mic"], {}, "mic"),  # MIC trains the safety classifier through its response examples
    (["prosocial_dialog"], {"response_examples": []}, "prosocial_dialog"),  # its user turns, always
    (["toxichat", "mic"], {"response_examples": ["mic_violations"]}, "mic"),
])
def test_judge_corpora_that_train_the_safety_classifier_are_refused(corpora, safety, shared):
    with pytest.raises(ConfigError, match=rf"judge\.corpora = .* shares {shared} with the safety classifier"):
        judge.check_independent(JudgeConfig(corpora=corpora), SafetyConfig(**safety))


@pytest.mark.parametrize("safety", [{"response_examples": ["pd_responses"]}, {"response_share": 0.0}])
def test_mic_is_independent_when_the_safety_classifier_does_not_train_on_it(safety):
    assert SafetyConfig(**safety).training_corpora() == ("prosocial_dialog",)
    judge.check_independent(JudgeConfig(corpora=["diasafety", "mic"]), SafetyConfig(**safety))  # no error


def test_the_overlap_is_one_line_from_the_command_before_anything_is_read(tmp_path):
    params = write_params(tmp_path / "params.yaml", {"corpora": ["diasafety", "mic"]})
    result = run_judge("--normalized", tmp_path / "missing", "--out", tmp_path / "judge", "--reports",
                       tmp_path / "reports", "--params", params)
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 2 and len(lines) == 1, result.output
    assert lines[0].startswith("error:") and "shares mic with the safety classifier" in lines[0]
    assert not (tmp_path / "judge").exists()


@pytest.mark.parametrize("section, message", [
    ({"corpora": []}, "judge.corpora"),
    ({"corpora": ["diasafety", "reddit"]}, "judge.corpora"),
    ({"context_turns": 9}, "judge.context_turns"),
    ({"bootstrap_samples": 10}, "judge.bootstrap_samples"),
    ({"calibration_bins": 1}, "judge.calibration_bins"),
    ({"tfidf": {"char_ngram": [5, 2]}}, "judge.tfidf.char_ngram"),
    ({"tfidf": {"char_ngram": [3]}}, "judge.tfidf.char_ngram"),
    ({"model": "bert"}, "judge.model"),
])
def test_config_rejects_bad_values(section, message):
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        section_from_dict(section, "judge", JudgeConfig)


def test_defaults_train_on_the_dialog_safety_corpora_with_char_ngrams():
    config = JudgeConfig()
    assert config.corpora == list(DIALOG_SAFETY_CORPORA) == ["diasafety", "toxichat"]
    assert config.tfidf.char_ngram == [2, 5] and config.tfidf.ngram_max == 2
    judge.check_independent(config, SafetyConfig())  # the defaults are independent


# --- metrics, by hand -----------------------------------------------------------------------------


def test_binary_scores_by_hand():
    # predicted unsafe (P > 0.5): 1 1 0 1 0 0 0 0 -> TP 2, FP 1, FN 1, TN 4
    counts = confusion_counts(ACTUAL, P_UNSAFE > 0.5)
    assert counts.sum(axis=0).tolist() == [2, 1, 1, 4]
    scores = binary_scores(counts.sum(axis=0))
    assert scores["accuracy"] == pytest.approx(6 / 8)
    assert scores["positive_f1"] == pytest.approx(2 * 2 / (2 * 2 + 1 + 1))  # 2/3
    assert scores["negative_f1"] == pytest.approx(2 * 4 / (2 * 4 + 1 + 1))  # 0.8
    assert scores["macro_f1"] == pytest.approx((2 / 3 + 0.8) / 2)
    assert scores["positive_recall"] == pytest.approx(2 / 3) and scores["positive_precision"] == pytest.approx(2 / 3)
    # the same as the multi-class macro_f1 on the labels
    assert scores["macro_f1"] == pytest.approx(macro_f1(ACTUAL.tolist(), (P_UNSAFE > 0.5).tolist()))
    # always safe: the unsafe class is present, never predicted (F1 0), and still counts in the mean
    always_safe = binary_scores(confusion_counts(ACTUAL, np.zeros(8, bool)).sum(axis=0))
    assert always_safe["positive_f1"] == 0 and always_safe["macro_f1"] == pytest.approx((0 + 10 / 13) / 2)
    assert always_safe["positive_recall"] == 0 and always_safe["positive_precision"] == 0  # none predicted
    # a class neither present nor predicted is left out of the mean (as macro_f1 does)
    only_safe = binary_scores(confusion_counts(np.zeros(3, bool), np.zeros(3, bool)).sum(axis=0))
    assert only_safe["macro_f1"] == 1.0 and only_safe["positive_f1"] == 0.0


def test_calibration_by_hand():
    # ten bins: |observed - predicted| per reply, each reply alone in its bin except the two at 0.1:
    # 0.1 + 0.3 + 0.8 + 0.6 + 2 * 0.1 + 0.3 + 0.05 = 2.35 over 8 replies
    assert expected_calibration_error(P_UNSAFE, ACTUAL, 10) == pytest.approx(2.35 / 8)
    # two bins: [0, 0.5) holds 0.2, 0.1, 0.1, 0.3, 0.05 (one unsafe): mean 0.15, observed 0.2;
    # [0.5, 1] holds 0.9, 0.7, 0.6 (two unsafe): mean 0.7333, observed 0.6667
    rows = reliability_bins(P_UNSAFE, ACTUAL, 2)
    assert [(r["bin"], r["n"]) for r in rows] == [(0, 5), (1, 3)]
    assert rows[0]["predicted"] == pytest.approx(0.15) and rows[0]["observed"] == pytest.approx(0.2)
    assert rows[1]["predicted"] == pytest.approx(2.2 / 3) and rows[1]["observed"] == pytest.approx(2 / 3)
    assert expected_calibration_error(P_UNSAFE, ACTUAL, 2) == pytest.approx((5 * 0.05 + 3 * (0.2 / 3)) / 8)
    assert expected_calibration_error([1.0, 0.0], [True, False], 10) == 0.0  # P = 1 falls in the last bin
    assert expected_calibration_error([], [], 10) is None


def test_split_metrics_by_hand():
    config = JudgeConfig(bootstrap_samples=200, calibration_bins=2)
    clusters = np.array([f"d{i}" for i in range(8)])
    entry = judge.split_metrics(ACTUAL, P_UNSAFE, clusters, CATEGORIES, np.zeros(8, bool), False, config, seed=0)
    assert (entry["n"], entry["n_unsafe"], entry["n_clusters"]) == (8, 3, 8)
    assert entry["accuracy"]["value"] == pytest.approx(0.75)
    assert entry["unsafe_f1"]["value"] == pytest.approx(2 / 3, abs=1e-6)
    assert entry["macro_f1"]["value"] == pytest.approx((2 / 3 + 0.8) / 2, abs=1e-6)
    for name in ("accuracy", "unsafe_f1", "macro_f1"):
        low, high = entry[name]["ci"]
        assert low <= entry[name]["value"] <= high and low < high
    # the majority of train is safe: accuracy 5/8, unsafe F1 0, macro-F1 (0 + 10/13) / 2
    assert entry["majority"] == {"label": "safe", "accuracy": 0.625, "unsafe_f1": 0.0,
                                 "macro_f1": pytest.approx(5 / 13, abs=1e-6), "unsafe_recall": 0.0,
                                 "unsafe_precision": 0.0}
    assert entry["unsafe_recall"]["value"] == pytest.approx(2 / 3)  # TP 2 of the 3 unsafe replies
    assert entry["calibration"]["ece"] == pytest.approx((5 * 0.05 + 3 * (0.2 / 3)) / 8, abs=1e-6)
    assert entry["calibration"]["mean_p_unsafe"] == pytest.approx(P_UNSAFE.mean())
    assert entry["calibration"]["unsafe_rate"] == 3 / 8 and entry["calibration"]["predicted_unsafe_rate"] == 3 / 8
    # A: actual 1 1 0 0, predicted 1 1 1 0 -> unsafe F1 4/5, safe F1 2/3; B: actual 1 0 0 0, predicted 0 0 0 0
    assert entry["categories"] == {
        "A": {"n": 4, "n_unsafe": 2, "unsafe_f1": pytest.approx(0.8), "macro_f1": pytest.approx((0.8 + 2 / 3) / 2)},
        "B": {"n": 4, "n_unsafe": 1, "unsafe_f1": 0.0, "macro_f1": pytest.approx((0 + 6 / 7) / 2)}}


def test_intervals_resample_dialogues():
    """All eight replies in one dialogue: every resample draws that dialogue, so the interval is the point."""
    config = JudgeConfig(bootstrap_samples=200)
    entry = judge.split_metrics(ACTUAL, P_UNSAFE, np.array(["d"] * 8), CATEGORIES, np.zeros(8, bool), False, config,
                                seed=0)
    assert entry["n_clusters"] == 1
    for name in ("accuracy", "unsafe_f1", "macro_f1"):
        assert entry[name]["ci"] == [entry[name]["value"]] * 2


# --- the classifier: character n-grams, round trip, batches ---------------------------------------

TOY = [("you stupid idiot", UNSAFE), ("what an idiot you are", UNSAFE), ("idiot", UNSAFE),
       ("what a lovely day", SAFE), ("how lovely of you", SAFE), ("lovely", SAFE)]


def toy_judge(char_ngram: list[int]) -> JudgeScorer:
    config = JudgeConfig(context_turns=0, tfidf=JudgeTfidfConfig(char_ngram=char_ngram))
    texts = [text for text, _ in TOY]
    labels = np.array([REPLY_LABELS.index(label) for _, label in TOY])
    return JudgeScorer.fit(config, [texts], None, labels, np.ones(len(TOY)))


def test_character_ngrams_see_a_misspelt_insult_that_words_miss():
    words, chars = toy_judge([]), toy_judge([2, 5])
    # "idiiots" is no word of the training text: word n-grams give it the empty text's probability
    assert words.predict_unsafe(["idiiots"])[0] == pytest.approx(words.predict_unsafe([""])[0])
    # character n-grams share "idi", "iot", "ots" with "idiot": unsafe
    assert chars.predict_unsafe(["idiiots"])[0] > 0.5 > chars.predict_unsafe(["lovelyy"])[0]


def test_judge_round_trip_without_pickle_and_batched_equals_one_at_a_time(tmp_path):
    config = JudgeConfig(context_turns=0, tfidf=JudgeTfidfConfig(char_ngram=[2, 5]))
    scorer = toy_judge([2, 5])
    scorer.write(tmp_path / "judge", config, {})
    with np.load(tmp_path / "judge" / "tfidf.npz", allow_pickle=False) as arrays:
        assert arrays["char_terms"].size > 0 and arrays["char_idf"].shape == arrays["char_terms"].shape
    loaded = load_judge(tmp_path / "judge")
    texts = ["you idiot", "lovely day", "never seen", ""]
    batched = loaded.predict_unsafe(texts, [["hi"]] * 4)
    np.testing.assert_array_equal(batched, scorer.predict_unsafe(texts, [["hi"]] * 4))
    assert batched.shape == (4,)
    np.testing.assert_allclose(batched, [loaded.predict_unsafe([t], [["hi"]])[0] for t in texts], rtol=0, atol=1e-12)
    np.testing.assert_allclose(loaded.predict_proba(texts).sum(axis=1), 1.0)
    record = json.loads((tmp_path / "judge" / "scorer.json").read_text())
    assert record["task"] == "judge" and record["labels"] == ["safe", "unsafe"]
    with pytest.raises(DataError, match="task = 'judge', not a safety classifier"):
        load_scorer(tmp_path / "judge")


def test_the_scratch_kind_trains_a_two_label_judge(tmp_path):
    from pipeline.config import JudgeScratchConfig

    config = JudgeConfig(model="scratch", scratch=JudgeScratchConfig(vocab_size=120, hidden_size=16, layers=1, heads=2,
                                                                     max_length=32, epochs=1, batch_size=4))
    texts = [text for text, _ in TOY]
    scorer = JudgeScorer.fit(config, [texts], [["hi"]] * len(TOY),
                             np.array([REPLY_LABELS.index(label) for _, label in TOY]), np.ones(len(TOY)))
    scorer.write(tmp_path / "judge", config, {})
    loaded = load_judge(tmp_path / "judge")
    assert loaded.kind == "scratch"
    np.testing.assert_allclose(loaded.predict_unsafe(texts, [["hi"]] * len(TOY)),
                               scorer.predict_unsafe(texts, [["hi"]] * len(TOY)), rtol=0, atol=1e-6)


def test_the_ensemble_kind_averages_a_tfidf_and_a_fine_tuned_encoder_judge(tmp_path):
    """`ensemble`: the TF-IDF judge and the encoder fine-tuned on the (reply, context) pair, each trained
    as alone (same seed, same data), their P(unsafe) averaged; saved side by side and loaded back."""
    from transformers import BertConfig, BertModel

    from pipeline.config import JudgeHfConfig
    from pipeline.safety_models import train_wordpiece

    texts = [text for text, _ in TOY]
    labels = np.array([REPLY_LABELS.index(label) for _, label in TOY])
    contexts = [["hi"]] * len(TOY)
    checkpoint = tmp_path / "tiny-encoder"  # weights without a classification head, as a hub checkpoint
    tokenizer = train_wordpiece(texts + ["hi"], vocab_size=120, max_length=32)
    BertModel(BertConfig(vocab_size=len(tokenizer), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=32, max_position_embeddings=32)).save_pretrained(checkpoint)
    tokenizer.save_pretrained(checkpoint)
    hf = JudgeHfConfig(name=str(checkpoint), max_length=32, epochs=1, batch_size=4, lr=1e-3)
    fitted = {kind: JudgeScorer.fit(JudgeConfig(model=kind, hf=hf), [texts], contexts, labels, np.ones(len(TOY)))
              for kind in ("tfidf", "hf", "ensemble")}
    mean = (fitted["tfidf"].predict_unsafe(texts, contexts) + fitted["hf"].predict_unsafe(texts, contexts)) / 2
    np.testing.assert_allclose(fitted["ensemble"].predict_unsafe(texts, contexts), mean, rtol=0, atol=1e-6)
    config = JudgeConfig(model="ensemble", hf=hf)
    fitted["ensemble"].write(tmp_path / "judge", config, {})
    assert (tmp_path / "judge" / "tfidf.npz").is_file() and (tmp_path / "judge" / "encoder").is_dir()
    loaded = load_judge(tmp_path / "judge")
    assert loaded.kind == "ensemble"
    np.testing.assert_allclose(loaded.predict_unsafe(texts, contexts), mean, rtol=0, atol=1e-6)
    # its members as judges of their own (evaluate shows them side by side): the ensemble is their mean
    members = loaded.member_judges()
    assert list(members) == ["tfidf", "hf"]
    np.testing.assert_allclose(members["tfidf"].predict_unsafe(texts, contexts),
                               fitted["tfidf"].predict_unsafe(texts, contexts), rtol=0, atol=1e-6)
    np.testing.assert_allclose(members["hf"].predict_unsafe(texts, contexts),
                               fitted["hf"].predict_unsafe(texts, contexts), rtol=0, atol=1e-6)
    assert fitted["tfidf"].member_judges() == {}


# --- the command ----------------------------------------------------------------------------------


def test_help():
    result = CliRunner().invoke(app, ["judge", "--help"])
    assert result.exit_code == 0 and "--normalized" in result.output and "--reports" in result.output


@pytest.fixture(scope="module")
def sample_normalized(tmp_path_factory, repo_root, normalize_config) -> Path:
    """The bundled DiaSafety and ToxiChat samples, downloaded and normalized."""
    from pipeline.stages import download, normalize

    base = tmp_path_factory.mktemp("judge_sample")
    corpora = CorporaConfig(source="sample", sample=str(repo_root / "data" / "sample"))
    for corpus in DIALOG_SAFETY_CORPORA:
        download.run(corpora, corpus, base / "raw" / corpus)
        normalize.run(normalize_config, corpus, base / "raw" / corpus, base / "normalized" / corpus)
    return base / "normalized"


def judge_on_the_sample(tmp_path: Path, normalized: Path, judge_section: dict | None = None) -> dict:
    """Run the judge command on `normalized` with `judge_section` over params.yaml's; its metrics.json
    (the model in `tmp_path/models/judge`, the reports in `tmp_path/reports/judge`)."""
    params = write_params(tmp_path / "params.yaml", judge_section)
    reports = tmp_path / "reports" / "judge"
    result = run_judge("--normalized", normalized, "--out", tmp_path / "models" / "judge", "--reports", reports,
                       "--params", params)
    assert result.exit_code == 0, result.output
    return json.loads((reports / "metrics.json").read_text())


def test_command_on_the_sample(tmp_path, sample_normalized):
    metrics = judge_on_the_sample(tmp_path, sample_normalized)
    out, reports = tmp_path / "models" / "judge", tmp_path / "reports" / "judge"
    record = json.loads((out / "scorer.json").read_text())
    assert record["task"] == "judge" and record["kind"] == "tfidf"
    assert record["independent_of"] == ["prosocial_dialog", "mic"]
    assert set(record["training_examples"]) == {"diasafety", "toxichat"}
    assert metrics["trained_on"] == record["training_examples"] and metrics["independent_of"] == ["prosocial_dialog",
                                                                                                   "mic"]
    for corpus in DIALOG_SAFETY_CORPORA:
        for split in ("validation", "test"):
            entry = metrics["corpora"][corpus][split]
            assert entry["n"] > 0 and 0 < entry["n_unsafe"] < entry["n"]
            for name in ("accuracy", "unsafe_f1", "macro_f1"):
                low, high = entry[name]["ci"]
                assert 0 <= low <= entry[name]["value"] <= high <= 1
                assert 0 <= entry["majority"][name] <= 1
            assert 0 <= entry["calibration"]["ece"] <= 1
        rows = json.loads((reports / "reliability" / f"{corpus}.json").read_text())
        assert sum(row["n"] for row in rows) == metrics["corpora"][corpus]["test"]["n"]
    assert set(metrics["corpora"]["diasafety"]["test"]["categories"]) == set(DIASAFETY_CATEGORIES)
    assert "categories" not in metrics["corpora"]["toxichat"]["test"]
    scores = load_judge(out).predict_unsafe(["You are an idiot.", "That sounds lovely."], [["Hi"], ["Hi"]])
    assert scores.shape == (2,) and ((0 <= scores) & (scores <= 1)).all()
    # It trained on its half of the train replies only (judge.share 0.5): the contexts judge_half gives it.
    for corpus in DIALOG_SAFETY_CORPORA:
        train = pq.read_table(sample_normalized / corpus / "train.parquet").to_pylist()
        labelled = [r for r in train if r["reply_label"]]
        judges = judge_half([r["context"] for r in labelled], 0.5)
        assert record["training_examples"][corpus] == int(judges.sum()) < len(labelled)
    assert metrics["share"] == 0.5 and metrics["trained_on_all"] is None
    for corpus in DIALOG_SAFETY_CORPORA:  # with the context and with it blanked, on the test split
        reading = metrics["context"][corpus]
        assert reading["n"] == metrics["corpora"][corpus]["test"]["n"]
        assert reading["difference"]["value"] == pytest.approx(reading["auc"]["value"] - reading["auc_context_blanked"]["value"])


def test_compare_all_reports_the_judge_trained_on_every_train_reply(tmp_path, sample_normalized):
    metrics = judge_on_the_sample(tmp_path, sample_normalized, {"compare_all": True})
    on_all = metrics["trained_on_all"]
    assert on_all["trained_on"] > sum(metrics["trained_on"].values())
    assert set(on_all["corpora"]) == set(DIALOG_SAFETY_CORPORA)
    assert on_all["corpora"]["diasafety"]["test"]["n"] == metrics["corpora"]["diasafety"]["test"]["n"]


def test_an_ensemble_judge_reports_each_member_on_the_same_replies(tmp_path, sample_normalized):
    from transformers import BertConfig, BertModel

    from pipeline.safety_models import train_wordpiece

    checkpoint = tmp_path / "tiny-encoder"
    tokenizer = train_wordpiece([text for text, _ in TOY] + ["hi"], vocab_size=120, max_length=64)
    BertModel(BertConfig(vocab_size=len(tokenizer), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=32, max_position_embeddings=64)).save_pretrained(checkpoint)
    tokenizer.save_pretrained(checkpoint)
    hf = {"name": str(checkpoint), "max_length": 64, "epochs": 1, "batch_size": 8, "lr": 1e-3}
    metrics = judge_on_the_sample(tmp_path, sample_normalized, {"model": "ensemble", "hf": hf})
    members = metrics["members"]
    assert set(members) == {"tfidf", "hf"}
    for member in members.values():
        for corpus in DIALOG_SAFETY_CORPORA:
            assert member["corpora"][corpus]["test"]["n"] == metrics["corpora"][corpus]["test"]["n"]
            assert member["context"][corpus]["n"] == metrics["context"][corpus]["n"]
    # the ensemble's figures are its own, not a member's
    ensemble = metrics["corpora"]["diasafety"]["test"]["calibration"]["mean_p_unsafe"]
    means = [m["corpora"]["diasafety"]["test"]["calibration"]["mean_p_unsafe"] for m in members.values()]
    assert ensemble == pytest.approx(sum(means) / 2, abs=1e-6)


def test_a_judge_with_every_train_reply_and_a_method_on_them_is_refused(tmp_path):
    params = write_params(tmp_path / "params.yaml", {"share": 1.0})
    result = run_judge("--normalized", tmp_path / "missing", "--out", tmp_path / "judge", "--reports",
                       tmp_path / "reports", "--params", params)
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 2 and len(lines) == 1, result.output
    assert ("judge.share = 1 gives every train reply of diasafety, toxichat to the judge, but "
            "mine.stage1_corpora") in lines[0]
    assert not (tmp_path / "judge").exists()
    # With the method off those corpora, a judge may have every train reply.
    judge.check_independent(JudgeConfig(share=1.0), SafetyConfig(), "p", {"mine.stage1_corpora": ["mic"],
                                                                         "dexperts.corpora": ["mic"]})


def test_a_corpus_without_reply_labels_is_one_line(tmp_path, normalized_sample_dir):
    params = write_params(tmp_path / "params.yaml", {"corpora": ["daily_dialog"]})
    result = run_judge("--normalized", normalized_sample_dir, "--out", tmp_path / "judge", "--reports",
                       tmp_path / "reports", "--params", params)
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 2 and len(lines) == 1, result.output
    assert "daily_dialog: no train reply has a human safety label" in lines[0]


def test_a_missing_corpus_is_one_line(tmp_path):
    params = write_params(tmp_path / "params.yaml")
    result = run_judge("--normalized", tmp_path, "--out", tmp_path / "judge", "--reports", tmp_path / "reports",
                       "--params", params)
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 2 and len(lines) == 1 and "diasafety/train.parquet: file not found" in lines[0]


# --- real rows ------------------------------------------------------------------------------------


@pytest.mark.slow
def test_the_mirror_judge_matches_the_reference_tfidf_baseline(shared_dir, tmp_path, normalize_config):
    """On the shared mirror (DiaSafety's test split derived by normalize, its validation split as released):
    a plain TF-IDF (word 1-2, char 2-5) logistic regression on DiaSafety train reaches about 0.75 test
    macro-F1 on the released test split; the judge (both corpora, the default config: trained on its half of
    train, `judge.share` 0.5) is held to 0.72 on the derived one and 0.68 on validation (measured on its half:
    0.741 and 0.699; 0.754 and 0.713 on all of train), well above the majority baseline. About 30 s."""
    from pipeline.stages import download, normalize

    mirror = shared_dir / "mirror"
    if not all((mirror / corpus).is_dir() for corpus in DIALOG_SAFETY_CORPORA):
        pytest.skip(f"{mirror} has no diasafety/toxichat")
    corpora = CorporaConfig(source="mirror", mirror=str(mirror))
    for corpus in DIALOG_SAFETY_CORPORA:
        download.run(corpora, corpus, tmp_path / "raw" / corpus)
        normalize.run(normalize_config, corpus, tmp_path / "raw" / corpus, tmp_path / "normalized" / corpus)
    config = section_from_dict({**yaml.safe_load((REPO / "params.yaml").read_text())["judge"],
                                "bootstrap_samples": 200}, "judge", JudgeConfig)
    metrics = judge.run(config, SafetyConfig(), tmp_path / "normalized", tmp_path / "judge", tmp_path / "reports")
    diasafety = metrics["corpora"]["diasafety"]
    assert diasafety["test"]["derived_split_rows"] == diasafety["test"]["n"] > 900  # the mirror has no test split
    assert diasafety["test"]["macro_f1"]["value"] >= 0.72
    assert diasafety["validation"]["macro_f1"]["value"] >= 0.68
    for corpus in DIALOG_SAFETY_CORPORA:
        for split in ("validation", "test"):
            entry = metrics["corpora"][corpus][split]
            # ToxiChat's, on the judge's half, is the weakest: 0.591 [0.541, 0.637] against a majority 0.444
            assert entry["macro_f1"]["ci"][0] > entry["majority"]["macro_f1"] + 0.05
            assert entry["calibration"]["ece"] < 0.2  # ToxiChat test on the judge's half: 0.157


def test_context_reading_by_hand():
    """Four test replies in two dialogues: with the context P(unsafe) ranks both unsafe replies first
    (AUC 1); blanked, it gives every reply the same P(unsafe) (AUC 0.5, ties counting half)."""
    import pandas as pd

    examples = pd.DataFrame({"corpus": ["diasafety"] * 4 + ["toxichat"], "split": ["test"] * 4 + ["validation"],
                             "label": [1, 0, 1, 0, 1], "dialogue_id": ["a", "a", "b", "b", "c"]})
    with_context = np.array([0.9, 0.2, 0.8, 0.1, 0.5])
    blanked = np.array([0.4, 0.4, 0.4, 0.4, np.nan])
    found = judge.context_reading(examples, with_context, blanked, JudgeConfig(bootstrap_samples=200))
    assert set(found) == {"diasafety"}  # toxichat has no test rows here
    entry = found["diasafety"]
    assert entry["n"] == 4 and entry["auc"]["value"] == 1.0 and entry["auc_context_blanked"]["value"] == 0.5
    assert entry["difference"]["value"] == 0.5
    low, high = entry["difference"]["ci"]
    assert 0 <= low <= 0.5 <= high
