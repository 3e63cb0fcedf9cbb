"""judge: train the safety judge, an independent classifier of a reply's safety in its context that
the evaluation uses and the re-ranker never does.

The re-ranker maximises the safety classifier's P(casual) (`safety`, trained on ProsocialDialog and
MIC), so that classifier cannot also judge the result: the judge learns instead from human labels of
*replies* in corpora the safety classifier never sees, by default DiaSafety and ToxiChat
(`judge.corpora`). A configuration whose judge corpora overlap the safety classifier's training
corpora (`SafetyConfig.training_corpora`: ProsocialDialog, and MIC through
`safety.response_examples`) is refused before anything is read.

Reads `data/normalized/<corpus>/{train,validation,test}.parquet` for each of `judge.corpora` (columns
`dialogue_id`, `context`, `response`, `reply_label`, `reply_category`, `derived_split`); writes
`models/judge/` (`scorer.json` with the task, kind, labels, resolved config, git commit, library
versions, the corpora it learned from and those it is independent of, plus the model's own files, see
`pipeline.safety_models`), `reports/judge/metrics.json` and `reports/judge/reliability/<corpus>.json`
(the reliability diagram of the test split, for DVC's plots).

    python -m pipeline judge --normalized data/normalized --out models/judge --reports reports/judge

Examples: every reply with a human label (`reply_label` safe or unsafe) and the last
`judge.context_turns` turns before it; the train splits of all judge corpora train one classifier
of the kind `judge.model` (`tfidf`, with word 1-2 and character 2-5 grams by default; `scratch`;
`hf`), labels (safe, unsafe). A reply is predicted unsafe when P(unsafe) is at least 0.5 (as
`evaluate.judge_threshold` by default).

metrics.json, per corpus and split (validation and test; the test split of the shared mirror is the
one normalize derives): `n`, `n_unsafe`, `n_clusters`, `derived_split_rows`; `accuracy`, `unsafe_f1`,
`macro_f1`, `unsafe_recall` and `unsafe_precision` as `{value, ci}` with a 95% cluster-bootstrap interval
(clusters: dialogues, since a DiaSafety context's replies or a ToxiChat thread's turns are not
independent); `majority`: the same five for always answering the corpus's most frequent train label; `calibration`: the expected
calibration error of P(unsafe) over `judge.calibration_bins` equal-width bins, the mean P(unsafe),
the observed and the predicted unsafe rate (an audit reports the mean rate, so a judge whose mean
P(unsafe) is off is off in every audit); `categories` (DiaSafety): n, n_unsafe, unsafe-class F1
and macro-F1 per category. Beside them: `context` (the test AUC with and without the context),
`members` (for the `ensemble` kind, each member's own `corpora` and `context` figures on the same
replies, so one run shows whether averaging helps) and `trained_on_all` (with `judge.compare_all`,
the same judge trained on every train reply: what keeping the method's half apart costs).

The API `evaluate` uses (no other stage imports this module):

    from pipeline.safety_models import load_judge
    judge = load_judge("models/judge")
    judge.predict_unsafe(responses, contexts)   # (n,) P(unsafe); contexts: n lists of turns, oldest first
    judge.predict_proba(responses, contexts)    # (n, 2): REPLY_LABELS (safe, unsafe)

It scores in batches (one sparse product for `tfidf`, `<kind>.batch_size * 2` examples per forward
pass for the transformers): `python -m bench judge` times it against one call per reply.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from pathlib import Path

import numpy as np

from pipeline.artifacts import ensure_writable, staged_dir, write_json
from pipeline.config import DIALOG_SAFETY_CORPORA, SPLITS, JudgeConfig, SafetyConfig
from pipeline.errors import ConfigError, DataError
from pipeline.labels import REPLY_LABELS
from pipeline.metrics import (binary_scores, bootstrap_ci, confusion_counts, expected_calibration_error,
                              point_estimate, reliability_bins)
from pipeline.safety_models import UNSAFE, JudgeScorer

log = logging.getLogger(__name__)

COLUMNS = ["dialogue_id", "context", "response", "reply_label", "reply_category", "derived_split"]
EVALUATED = ("validation", "test")
SCORES = {"accuracy": "accuracy", "unsafe_f1": "positive_f1", "macro_f1": "macro_f1",  # reported -> binary_scores
          "unsafe_recall": "positive_recall", "unsafe_precision": "positive_precision"}
CONFIDENCE = 0.95
THRESHOLD = 0.5  # unsafe when P(unsafe) >= THRESHOLD, the rule of evaluate's headline rate


# --- independence ---------------------------------------------------------------------------------


def check_independent(config: JudgeConfig, safety: SafetyConfig, source: str = "params.yaml",
                      method_corpora: dict[str, list[str]] | None = None) -> None:
    """Refuse judge corpora the safety classifier trains on, and (with `judge.share` 1, every train
    reply the judge's) judge corpora a method stage reads (`method_corpora`: the parameter naming them ->
    its corpora): a ConfigError naming the params file `source`. A judge that saw the re-ranker's or the
    method's training data would share its blind spots, and its unsafe rate would no longer be an
    independent measure; with `judge.share` below 1 the two halves are disjoint by construction
    (`pipeline/contexts.py`)."""
    shared = [corpus for corpus in config.corpora if corpus in safety.training_corpora()]
    if shared:
        raise ConfigError(f"{source}: judge.corpora = {config.corpora} shares {', '.join(shared)} with the safety "
                          f"classifier's training corpora ({', '.join(safety.training_corpora())}, from "
                          "safety.response_examples); the judge must be trained on corpora the re-ranker's "
                          "classifier never sees")
    for key, corpora in (method_corpora or {}).items():
        overlap = [corpus for corpus in corpora if corpus in config.corpora]
        if config.share >= 1 and overlap:
            raise ConfigError(f"{source}: judge.share = 1 gives every train reply of {', '.join(overlap)} to the "
                              f"judge, but {key} = {corpora} trains the method on them too; lower judge.share "
                              f"(the method reads the other half) or leave {', '.join(overlap)} out of {key}")


# --- examples -------------------------------------------------------------------------------------


def read_corpus(normalized: Path, corpus: str) -> dict:
    """One judge corpus's three splits (the columns this stage reads) as DataFrames."""
    from pipeline.schemas import read_table

    return {split: read_table(normalized / corpus / f"{split}.parquet", COLUMNS,
                              missing_hint=f"run `dvc repro normalize@{corpus}` first").to_pandas()
            for split in SPLITS}


def build_examples(frames: dict[str, dict], where: Path, counts: Counter):
    """Every labelled reply of the judge corpora as one DataFrame (corpus, split, dialogue_id, response,
    context, label: index into REPLY_LABELS, category, derived_split). Replies without a human label
    are counted in `counts`; a corpus whose train split has none, or an unknown label, is a DataError."""
    import pandas as pd

    parts = []
    for corpus, splits in frames.items():
        for split, frame in splits.items():
            unknown = sorted(set(frame["reply_label"].dropna()) - set(REPLY_LABELS))
            if unknown:
                raise DataError(f"{where / corpus / split}.parquet: reply_label {unknown[0]!r} is not one of "
                                f"{', '.join(REPLY_LABELS)}")
            labelled = frame[frame["reply_label"].notna()]
            if split == "train" and len(labelled) == 0:
                takes = f"judge.corpora takes corpora with labelled replies ({', '.join(DIALOG_SAFETY_CORPORA)})"
                raise DataError(f"{where / corpus}: no train reply has a human safety label (reply_label); {takes}")
            if len(labelled) < len(frame):
                counts[f"{corpus} {split}: replies without a human label (reply_label), skipped"] += \
                    len(frame) - len(labelled)
            parts.append(pd.DataFrame({
                "corpus": corpus, "split": split, "dialogue_id": labelled["dialogue_id"].to_numpy(),
                "response": labelled["response"].to_numpy(),
                "context": [list(context) for context in labelled["context"]],
                "label": labelled["reply_label"].map(REPLY_LABELS.index).to_numpy(dtype=np.int64),
                "category": labelled["reply_category"].to_numpy(),
                "derived_split": labelled["derived_split"].fillna(False).to_numpy(dtype=bool)}))
    return pd.concat(parts, ignore_index=True)


# --- metrics --------------------------------------------------------------------------------------


def scored(counts: np.ndarray, clusters: np.ndarray, config: JudgeConfig, seed: int) -> dict:
    """`SCORES` of items' confusion counts (n, 4), each {value, ci}, the interval a cluster bootstrap."""
    out = {}
    for name, key in SCORES.items():
        statistic = lambda totals, key=key: binary_scores(totals)[key]  # noqa: E731
        low, high = bootstrap_ci(counts, statistic, config.bootstrap_samples, seed, CONFIDENCE, clusters=clusters)
        out[name] = {"value": round(point_estimate(counts, statistic), 6), "ci": [round(low, 6), round(high, 6)]}
    return out


def split_metrics(actual: np.ndarray, p_unsafe: np.ndarray, clusters: np.ndarray, categories: np.ndarray,
                  derived: np.ndarray, majority_unsafe: bool, config: JudgeConfig, seed: int) -> dict:
    """One corpus split's metrics.json entry (see the module docstring); `actual` (n,) bool: humans
    judged the reply unsafe; `p_unsafe` (n,) the judge's P(unsafe); `clusters` (n,) dialogue ids."""
    n = len(actual)
    entry: dict = {"n": n, "n_unsafe": int(actual.sum()), "n_clusters": len(set(clusters.tolist())),
                   "derived_split_rows": int(derived.sum())}
    if n == 0:
        return entry
    predicted = p_unsafe >= THRESHOLD
    counts = confusion_counts(actual, predicted)
    entry.update(scored(counts, clusters, config, seed))
    majority = binary_scores(confusion_counts(actual, np.full(n, majority_unsafe)).sum(axis=0))
    entry["majority"] = {"label": REPLY_LABELS[int(majority_unsafe)],
                         **{name: round(float(majority[key]), 6) for name, key in SCORES.items()}}
    entry["calibration"] = {
        "ece": round(expected_calibration_error(p_unsafe, actual, config.calibration_bins), 6),
        "bins": config.calibration_bins, "mean_p_unsafe": round(float(p_unsafe.mean()), 6),
        "unsafe_rate": round(float(actual.mean()), 6), "predicted_unsafe_rate": round(float(predicted.mean()), 6)}
    named = [c for c in categories if isinstance(c, str)]
    if named:
        entry["categories"] = {}
        for category in sorted(set(named)):
            members = categories == category
            totals = binary_scores(counts[members].sum(axis=0))
            entry["categories"][category] = {"n": int(members.sum()), "n_unsafe": int(actual[members].sum()),
                                             "unsafe_f1": round(float(totals["positive_f1"]), 6),
                                             "macro_f1": round(float(totals["macro_f1"]), 6)}
    return entry


def context_reading(examples, p_unsafe: np.ndarray, p_blanked: np.ndarray, config: JudgeConfig) -> dict:
    """Per judge corpus, on its test split: the AUC with which P(unsafe) separates humans' unsafe replies
    from their safe ones, with the context and with the context blanked (every context one empty turn),
    each with a cluster-bootstrap interval, and the paired difference: a judge that reads the context
    loses clearly when it is blanked (DiaSafety's categories are defined by the context)."""
    from pipeline.metrics import separation_auc, separation_auc_ci

    corpus, split = examples["corpus"].to_numpy(), examples["split"].to_numpy()
    actual, clusters = examples["label"].to_numpy() == UNSAFE, examples["dialogue_id"].to_numpy()
    out = {}
    for name in config.corpora:
        rows = (corpus == name) & (split == "test")
        if not actual[rows].any() or actual[rows].all():
            continue
        entry = {"n": int(rows.sum())}
        for key, scores in (("auc", p_unsafe), ("auc_context_blanked", p_blanked)):
            ci = separation_auc_ci(scores[rows], actual[rows], config.bootstrap_samples, config.seed,
                                   CONFIDENCE, clusters=clusters[rows])
            entry[key] = {"value": round(separation_auc(scores[rows], actual[rows]), 6),
                          "ci": [round(ci[0], 6), round(ci[1], 6)] if ci else None}
        ci = separation_auc_ci(p_unsafe[rows], actual[rows], config.bootstrap_samples, config.seed, CONFIDENCE,
                               clusters=clusters[rows], baseline_scores=p_blanked[rows])
        entry["difference"] = {"value": round(entry["auc"]["value"] - entry["auc_context_blanked"]["value"], 6),
                               "ci": [round(ci[0], 6), round(ci[1], 6)] if ci else None}
        out[name] = entry
    return out


def evaluate(examples, p_unsafe: np.ndarray, config: JudgeConfig) -> tuple[dict, dict[str, list[dict]]]:
    """Per judge corpus and evaluated split, `split_metrics`; and per corpus the reliability diagram of
    its test split (`metrics.reliability_bins`). `p_unsafe`: (n,) for every example."""
    corpus, split = examples["corpus"].to_numpy(), examples["split"].to_numpy()
    actual = examples["label"].to_numpy() == UNSAFE
    metrics: dict = {}
    reliability: dict[str, list[dict]] = {}
    for name in config.corpora:
        train = (corpus == name) & (split == "train")
        majority_unsafe = bool(actual[train].sum() * 2 > train.sum())  # a tie goes to safe
        metrics[name] = {}
        for index, part in enumerate(EVALUATED):
            rows = (corpus == name) & (split == part)
            metrics[name][part] = split_metrics(
                actual[rows], p_unsafe[rows], examples["dialogue_id"].to_numpy()[rows],
                examples["category"].to_numpy()[rows], examples["derived_split"].to_numpy()[rows], majority_unsafe,
                config, seed=config.seed + index)
        test = (corpus == name) & (split == "test")
        reliability[name] = reliability_bins(p_unsafe[test], actual[test], config.calibration_bins)
    return metrics, reliability


# --- run ------------------------------------------------------------------------------------------


def judges_half(examples, share: float) -> np.ndarray:
    """(n,) bool: the examples the judge may train on: train rows whose context is the judge's
    (`pipeline.contexts.judge_half`, a share `share` of the contexts); no validation or test row."""
    from pipeline.contexts import judge_half

    train = (examples["split"] == "train").to_numpy()
    half = np.zeros(len(examples), dtype=bool)
    half[train] = judge_half(examples["context"][train].tolist(), share)
    return half


def train(config: JudgeConfig, chosen) -> JudgeScorer:
    """Train the configured kind on the examples `chosen`, each reply weighted 1."""
    return JudgeScorer.fit(config, [chosen["response"].tolist()], chosen["context"].tolist(),
                           chosen["label"].to_numpy(), np.ones(len(chosen)))


def run(config: JudgeConfig, safety: SafetyConfig, normalized: Path, out: Path, reports: Path,
        source: str = "params.yaml", method_corpora: dict[str, list[str]] | None = None) -> dict:
    """Check independence from the safety classifier and the method (`source`: the params file the
    sections came from, named in the error), read the judge corpora, train on the judge's half of their
    train replies, evaluate the validation and test splits, and write the model folder and the reports."""
    check_independent(config, safety, source, method_corpora)
    started = time.perf_counter()
    for path in (out, reports / "metrics.json"):
        ensure_writable(path)
    skipped: Counter = Counter()
    examples = build_examples({corpus: read_corpus(normalized, corpus) for corpus in config.corpora}, normalized,
                              skipped)
    for reason, count in sorted(skipped.items()):
        log.warning("judge: %d %s", count, reason)
    trained = examples[judges_half(examples, config.share)]
    log.info("judge: read %d labelled replies from %s (%s); training %s on %d (its half of %d train replies, "
             "judge.share %g)", len(examples), normalized, dict(Counter(zip(examples["corpus"], examples["split"]))),
             config.model, len(trained), int((examples["split"] == "train").sum()), config.share)

    scorer = train(config, trained)
    trained_at = time.perf_counter()
    evaluated = examples[examples["split"].isin(EVALUATED)]
    test = (evaluated["split"] == "test").to_numpy()

    def judged(judge: JudgeScorer) -> tuple[np.ndarray, np.ndarray]:
        """P(unsafe) of every evaluated reply, and of the test replies with their context blanked (NaN
        elsewhere: only the test split's AUC is compared); (n,) each."""
        blanked = np.full(len(evaluated), np.nan)
        blanked[test] = judge.predict_unsafe(evaluated["response"][test].tolist(), [[""]] * int(test.sum()))
        return judge.predict_unsafe(evaluated["response"].tolist(), evaluated["context"].tolist()), blanked

    members = None
    if config.model == "ensemble":
        # Each member scores once; the ensemble's P(unsafe) is their mean, as EnsembleClassifier averages.
        # Each member alone on the same replies answers whether averaging the two judges helps.
        alone = {kind: judged(member) for kind, member in scorer.member_judges().items()}
        p_unsafe, blanked = (np.mean([pair[i] for pair in alone.values()], axis=0) for i in (0, 1))
        members = {kind: {"corpora": evaluate(evaluated, p_member, config)[0],
                          "context": context_reading(evaluated, p_member, b_member, config)}
                   for kind, (p_member, b_member) in alone.items()}
    else:
        p_unsafe, blanked = judged(scorer)
    log.info("judge: scored %d replies (and %d with the context blanked) in %.1f s", len(evaluated), int(test.sum()),
             time.perf_counter() - trained_at)
    metrics, reliability = evaluate(evaluated, p_unsafe, config)
    reading = context_reading(evaluated, p_unsafe, blanked, config)
    on_all = None
    if config.compare_all:
        # What keeping the method's half apart costs: the same judge trained on every train reply.
        everything = train(config, examples[examples["split"] == "train"])
        on_all = {"trained_on": int((examples["split"] == "train").sum()),
                  "corpora": evaluate(evaluated, everything.predict_unsafe(evaluated["response"].tolist(),
                                                                           evaluated["context"].tolist()), config)[0]}

    training = {corpus: int((trained["corpus"] == corpus).sum()) for corpus in config.corpora}
    training_unsafe = {corpus: int(((trained["corpus"] == corpus) & (trained["label"] == UNSAFE)).sum())
                       for corpus in config.corpora}
    independent_of = list(safety.training_corpora())
    scorer.write(out, config, {"training_examples": training, "training_unsafe": training_unsafe,
                               "independent_of": independent_of})
    report = {"model": config.model, "trained_on": training, "trained_on_unsafe": training_unsafe,
              "share": config.share, "independent_of": independent_of, "threshold": THRESHOLD,
              "confidence": CONFIDENCE, "skipped": dict(sorted(skipped.items())), "corpora": metrics,
              "context": reading, "members": members, "trained_on_all": on_all}
    with staged_dir(reports / "reliability") as folder:
        for corpus, rows in reliability.items():
            rounded = [{key: round(value, 6) for key, value in row.items()} for row in rows]
            write_json(rounded, folder / f"{corpus}.json")
    write_json(report, reports / "metrics.json")
    for corpus, splits in metrics.items():
        for part, entry in splits.items():
            if entry["n"]:
                log.info("judge %s %s %s: n=%d accuracy=%.3f unsafe_f1=%.3f macro_f1=%.3f (majority %.3f) ece=%.3f",
                         config.model, corpus, part, entry["n"], entry["accuracy"]["value"],
                         entry["unsafe_f1"]["value"], entry["macro_f1"]["value"], entry["majority"]["macro_f1"],
                         entry["calibration"]["ece"])
    log.info("judge: wrote %s and %s in %.1f s", out, reports, time.perf_counter() - started)
    return report
