"""safety: train the safety classifier on ProsocialDialog (plus response-level MIC and PD examples).

Reads `data/normalized/prosocial_dialog/{train,validation,test}.parquet` and
`data/normalized/mic/{train,validation,test}.parquet`; writes `models/safety/` (`scorer.json` with
the kind, labels, resolved config, git commit and library versions, plus the model's own files, see
`pipeline.safety_models`), `reports/safety/metrics.json` (accuracy and macro-F1, five- and three-way,
per split) and `reports/safety/confusion.json` (one `{actual, predicted}` row per ProsocialDialog
test example, five-way, for DVC's confusion plot).

    python -m pipeline safety --normalized data/normalized --out models/safety --reports reports/safety

Training examples, one utterance with the turns before it:
- `pd_user`: ProsocialDialog's labelled user turns (the last context turn of a normalized row and
  its `safety_label`). The reported ProsocialDialog metrics use these only, so they stay comparable
  with the paper (test accuracy, five labels: BERT 72.8, Canary 77.1).
- labelled user utterances from `safety.utterance_files` (CSV: `context`, `safety_label`), such as
  ProsocialDialog's real first turns in `../shared`: `pd_user` examples without earlier turns, put in
  train, validation or test by a hash of their normalized text (`UTTERANCE_SPLITS`); `utterance_files`
  in metrics.json reports them apart.
- response-level examples (`safety.response_examples`, weighted together to `safety.response_share`
  of the user turns): PD's prosocial bot replies and MIC annotators' own answers as casual, and MIC
  chatbot answers that violate their RoT labelled by `safety.mic_severity_labels`. They are always
  evaluated (three-way, per source) under `responses`, whether or not they were trained on.

scorer.json also records, as `test`, the three-way accuracy on the labelled user turns of the test split
beside the majority label's (`beats_majority`): the reports mark what rests on a classifier that
does not beat it.

The model itself, its kinds and the API other stages call (`load_scorer`) live in
`pipeline.safety_models`; this module builds the examples, trains, evaluates and writes.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from pathlib import Path
from typing import Sequence

import numpy as np

from pipeline.artifacts import ensure_writable
from pipeline.config import SAFETY_RESPONSE_SOURCES, SPLITS, SafetyConfig
from pipeline.errors import DataError
from pipeline.labels import COLLAPSE, SAFETY_LABELS, THREE_WAY
from pipeline.metrics import accuracy, macro_f1
from pipeline.safety_models import SAFETY, SafetyScorer, collapse_proba, write_reports

log = logging.getLogger(__name__)

RESPONSE_SOURCES = SAFETY_RESPONSE_SOURCES  # pd_responses, mic_answers, mic_violations
SOURCES = ("pd_user",) + RESPONSE_SOURCES
# An utterance file's row goes to the split whose interval holds `contexts.key_fraction` of its
# normalized text: ProsocialDialog's own proportions, about 80 / 10 / 10.
UTTERANCE_SPLITS = (("train", 0.8), ("validation", 0.9), ("test", 1.0))


# --- examples -------------------------------------------------------------------------------------


def read_normalized(normalized: Path, corpus: str, columns: list[str]) -> dict[str, list[dict]]:
    """The rows of one normalized corpus per split (only `columns`)."""
    from pipeline.schemas import read_table

    return {split: read_table(normalized / corpus / f"{split}.parquet", columns,
                              missing_hint=f"run `dvc repro normalize@{corpus}` first").to_pylist()
            for split in SPLITS}


def example(split: str, source: str, text: str, context: Sequence[str], label5: str, origin: str = "") -> dict:
    """One example; `origin`: the utterance file it came from ("" for the corpora)."""
    return {"split": split, "source": source, "text": text, "context": list(context), "label5": label5,
            "origin": origin}


def utterance_split(text: str) -> str:
    """The split of an utterance file's row, fixed by its normalized text (`UTTERANCE_SPLITS`)."""
    from pipeline.contexts import key_fraction, normalized_text

    fraction = key_fraction(normalized_text(text))
    return next(split for split, upper in UTTERANCE_SPLITS if fraction < upper)


def read_utterances(path: Path) -> tuple[list[dict], dict]:
    """The `pd_user` examples of one utterance file, and its record (path, SHA-256, rows per split)."""
    import csv

    from pipeline.artifacts import sha256

    if not path.is_file():
        raise DataError(f"safety.utterance_files: {path} does not exist")
    with open(path, encoding="utf-8", newline="") as handle:
        reader = csv.DictReader(handle)
        missing = {"context", "safety_label"} - set(reader.fieldnames or [])
        if missing:
            raise DataError(f"{path}: no column {sorted(missing)[0]!r} (needs context and safety_label)")
        rows = list(reader)
    examples = []
    for line, row in enumerate(rows, start=2):
        text, label = (row["context"] or "").strip(), (row["safety_label"] or "").strip()
        if label not in SAFETY_LABELS:
            raise DataError(f"{path}, line {line}: unknown safety_label {label!r} (known: {', '.join(SAFETY_LABELS)})")
        if text:
            examples.append(example(utterance_split(text), "pd_user", text, [], label, origin=str(path)))
    if not examples:
        raise DataError(f"{path}: no labelled utterance")
    counts = Counter(e["split"] for e in examples)
    return examples, {"path": str(path), "sha256": sha256(path), "rows": {split: counts[split] for split in SPLITS}}


def prosocial_examples(rows: list[dict], split: str) -> list[dict]:
    """`pd_user`: each labelled last context turn, with the turns before it; `pd_responses`: each bot
    reply with its context, as casual (ProsocialDialog's replies are written to be prosocial)."""
    examples = []
    for row in rows:
        context = row["context"] or []
        if row["safety_label"] is not None and context:
            examples.append(example(split, "pd_user", context[-1], context[:-1], row["safety_label"]))
        if row["response"]:
            examples.append(example(split, "pd_responses", row["response"], context, "__casual__"))
    return examples


def mic_examples(rows: list[dict], split: str, severity_labels: Sequence[str], counts: Counter) -> list[dict]:
    """`mic_answers`: annotators' own answers to the question, as casual; `mic_violations`: chatbot
    answers that violate the RoT, labelled by their worst violation severity. Deduplicated per
    question, since the normalized rows repeat a question's bad answers once per annotation."""
    examples, seen = [], set()
    for row in rows:
        context = row["context"] or []
        question = context[-1] if context else ""
        if row["response"] and (question, row["response"]) not in seen:
            seen.add((question, row["response"]))
            examples.append(example(split, "mic_answers", row["response"], context, "__casual__"))
        for bad in row["unacceptable_responses"] or []:
            if not bad["text"] or (question, bad["text"]) in seen:
                continue
            seen.add((question, bad["text"]))
            severity = bad["severity"]
            if severity is None or not 1 <= severity <= 5:
                counts[f"mic severity {severity} outside 1-5, clipped"] += 1
                severity = 3 if severity is None else min(max(severity, 1), 5)
            examples.append(example(split, "mic_violations", bad["text"], context, severity_labels[severity - 1]))
    return examples


def build_examples(prosocial: dict[str, list[dict]], mic: dict[str, list[dict]], config: SafetyConfig,
                   utterances: Sequence[dict] = ()):
    """All examples of all sources and splits as a DataFrame (split, source, text, context, label5,
    origin, weight); `weight` is the training weight, 0 for examples not trained on. `utterances`: the
    examples of `safety.utterance_files` (`read_utterances`)."""
    import pandas as pd

    counts: Counter = Counter()
    rows = []
    for split in SPLITS:
        rows += prosocial_examples(prosocial[split], split)
        rows += mic_examples(mic[split], split, config.mic_severity_labels, counts)
    rows += list(utterances)
    for reason, count in counts.items():
        log.warning("safety: %d %s", count, reason)
    examples = pd.DataFrame(rows, columns=["split", "source", "text", "context", "label5", "origin"])
    train = examples["split"] == "train"
    user = train & (examples["source"] == "pd_user")
    if not user.any():
        raise DataError("prosocial_dialog train split has no labelled user turns (safety_label): nothing to train on")
    unknown = sorted(set(examples["label5"]) - set(SAFETY_LABELS))
    if unknown:
        raise DataError(f"prosocial_dialog: unknown safety_label {unknown[0]!r} (known: {', '.join(SAFETY_LABELS)})")
    extra = train & examples["source"].isin(config.response_examples)
    examples["weight"] = 0.0
    examples.loc[user, "weight"] = 1.0
    if extra.any() and config.response_share > 0:
        examples.loc[extra, "weight"] = config.response_share * user.sum() / extra.sum()
    return examples


# --- metrics --------------------------------------------------------------------------------------


def label_metrics(actual5: Sequence[str], probs5: np.ndarray, majority5: str) -> dict:
    """Accuracy and macro-F1, five- and three-way, with the accuracy of always answering `majority5`.

    `probs5`: (n, 5) in SAFETY_LABELS order. The five-way prediction is the argmax of `probs5`; the
    three-way one the argmax of the summed three-way probabilities (not the collapsed five-way argmax).
    """
    predicted5 = [SAFETY_LABELS[i] for i in np.argmax(probs5, axis=1)] if len(actual5) else []
    predicted3 = [THREE_WAY[i] for i in np.argmax(collapse_proba(probs5), axis=1)] if len(actual5) else []
    actual3 = [COLLAPSE[label] for label in actual5]
    return {
        "n": len(actual5),
        "accuracy5": accuracy(actual5, predicted5),
        "macro_f1_5": macro_f1(actual5, predicted5),
        "accuracy3": accuracy(actual3, predicted3),
        "macro_f1_3": macro_f1(actual3, predicted3),
        "majority_accuracy5": accuracy(actual5, [majority5] * len(actual5)),
        "majority_accuracy3": accuracy(actual3, [COLLAPSE[majority5]] * len(actual5)),
    }


def evaluate(examples, probs5: np.ndarray) -> tuple[dict, list[dict]]:
    """metrics.json's contents and the confusion rows, from every example's predicted `probs5` (n, 5).

    `prosocial_dialog`: the user turns per split (utterance files' included), five- and three-way, beside
    the majority label of the train split's user turns; `utterance_files`: the same on the files' rows
    alone (when there are any). `responses`: the response-level examples per split, three-way overall
    and accuracy per source (the baseline is always casual).
    """
    source, split = examples["source"].to_numpy(), examples["split"].to_numpy()
    labels, from_file = examples["label5"].to_numpy(), examples["origin"].to_numpy() != ""
    majority5 = Counter(labels[(source == "pd_user") & (split == "train")]).most_common(1)[0][0]
    metrics: dict = {"prosocial_dialog": {}, "responses": {}}
    if from_file.any():
        metrics["utterance_files"] = {name: label_metrics(list(labels[from_file & (split == name)]),
                                                          probs5[from_file & (split == name)], majority5)
                                      for name in SPLITS}
    for name in SPLITS:
        user = (source == "pd_user") & (split == name)
        metrics["prosocial_dialog"][name] = label_metrics(list(labels[user]), probs5[user], majority5)
        response = np.isin(source, RESPONSE_SOURCES) & (split == name)
        overall = label_metrics(list(labels[response]), probs5[response], "__casual__")
        block = {key: overall[key] for key in ("n", "accuracy3", "macro_f1_3", "majority_accuracy3")}
        for kind in RESPONSE_SOURCES:
            mask = (source == kind) & (split == name)
            actual3 = [COLLAPSE[label] for label in labels[mask]]
            predicted3 = [THREE_WAY[i] for i in np.argmax(collapse_proba(probs5[mask]), axis=1)] if mask.any() else []
            block[kind] = {"n": int(mask.sum()), "accuracy3": accuracy(actual3, predicted3)}
        metrics["responses"][name] = block
    test = (source == "pd_user") & (split == "test")
    confusion = [{"actual": actual.strip("_"), "predicted": SAFETY_LABELS[p].strip("_")}
                 for actual, p in zip(labels[test], np.argmax(probs5[test], axis=1))]
    return metrics, confusion


def beats_majority(split_metrics: dict) -> bool | None:
    """Whether the three-way accuracy on a split's user turns is above the majority label's (None:
    no user turn there)."""
    if not split_metrics["n"] or split_metrics["accuracy3"] is None:
        return None
    return split_metrics["accuracy3"] > split_metrics["majority_accuracy3"]


# --- run ------------------------------------------------------------------------------------------


def train(config: SafetyConfig, examples) -> SafetyScorer:
    """Train the configured kind on the examples with a positive weight."""
    chosen = examples[examples["weight"] > 0]
    labels = np.array([SAFETY_LABELS.index(label) for label in chosen["label5"]])
    return SafetyScorer.fit(config, [chosen["text"].tolist()], chosen["context"].tolist(), labels,
                            chosen["weight"].to_numpy(dtype=np.float64))


def run(config: SafetyConfig, normalized: Path, out: Path, reports: Path) -> dict:
    """Read the corpora, train, evaluate every split, and write the model folder and the reports."""
    started = time.perf_counter()
    for path in (out, reports / "metrics.json"):
        ensure_writable(path)
    prosocial = read_normalized(normalized, "prosocial_dialog", ["context", "response", "safety_label"])
    mic = read_normalized(normalized, "mic", ["context", "response", "unacceptable_responses"])
    files = [read_utterances(Path(path)) for path in config.utterance_files]
    examples = build_examples(prosocial, mic, config, [e for found, _ in files for e in found])
    trained = examples[examples["weight"] > 0]
    log.info("safety: read %d examples from %s; training %s on %s", len(examples), normalized, config.model,
             dict(Counter(trained["source"])))

    scorer = train(config, examples)
    trained_at = time.perf_counter()
    probs5 = scorer.predict_proba5(examples["text"].tolist(), examples["context"].tolist())  # (n, 5)
    metrics, confusion = evaluate(examples, probs5)
    metrics["model"] = config.model
    log.info("safety: scored %d examples in %.1f s", len(examples), time.perf_counter() - trained_at)

    test = metrics["prosocial_dialog"]["test"]
    scorer.write(out, config, {
        "training_examples": {s: int((trained["source"] == s).sum()) for s in SOURCES},
        "training_weight": {s: float(trained.loc[trained["source"] == s, "weight"].sum()) for s in SOURCES},
        "utterance_files": [record for _, record in files],
        "test": {"n": test["n"], "accuracy3": test["accuracy3"], "majority_accuracy3": test["majority_accuracy3"],
                 "beats_majority": beats_majority(test)},
    })
    write_reports(SAFETY, reports, metrics, confusion, {
        name: {key: metrics["prosocial_dialog"][name][key] for key in ("n", "accuracy5", "macro_f1_5", "accuracy3",
                                                                        "majority_accuracy5")} for name in SPLITS})
    log.info("safety: wrote %s and %s in %.1f s", out, reports, time.perf_counter() - started)
    return metrics
