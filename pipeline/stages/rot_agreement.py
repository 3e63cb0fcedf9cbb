"""rot_agreement: train the RoT-agreement scorer on MIC: does a reply disagree with, stay neutral to,
or agree with a rule-of-thumb (RoT), given the turn it answers?

Reads the raw MIC rows `data/raw/mic/{train,validation,test}.parquet` (columns `Q`, `A`, `rot`,
`A_agrees`, `worker_answer`; the normalized MIC keeps only the answers that violate their RoT, so
the neutral and agreeing answers are only in the raw rows), each put in the split its question has
in `data/normalized/mic/<split>.parquet` (`question_splits`); writes `models/rot_agreement/`
(`scorer.json` with the task, kind, labels, resolved config, git commit and library versions, plus
the model's own files, see `pipeline.safety_models`), `reports/rot_agreement/metrics.json`
(accuracy, macro-F1 and the ranking quality of P(disagrees) per split) and
`reports/rot_agreement/confusion.json` (one `{actual, predicted}` row per test chatbot answer, for
DVC's confusion plot).

    python -m pipeline rot_agreement --raw data/raw/mic --normalized data/normalized \
        --out models/rot_agreement --reports reports/rot_agreement

Examples, each a reply, a RoT and a context (MIC's question `Q`):
- `chatbot`: a row's chatbot answer `A` with the annotator's RoT, labelled by `A_agrees`
  (0 disagrees, 1 neutral, 2 agrees). Rows without a RoT or an answer, or with `A_agrees` outside
  0-2, are skipped and counted.
- `worker`: the row's `worker_answer`, which the annotator wrote to be neutral to or to agree with
  the same RoT. Which of the two is not recorded, so it is trained as a soft label, half `neutral`
  and half `agrees` (two copies of weight `rot_agreement.worker_answer_weight / 2`): it teaches
  "does not disagree" and nothing about the split between the other two.

The model is `pipeline.safety_models.AgreementScorer` (kinds tfidf, scratch, hf; the re-ranker
loads it with `load_agreement_scorer`). For the tfidf kind, `metrics.json` also reports two
baselines, the same model trained on one field alone: `reply_only` and `rot_only`. A scorer that
reads the reply *against* its RoT must beat both; one that only beats `reply_only` may be reading
the RoT's wording (see docs/method.md, "The third term", on `generate.gamma`).
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from pathlib import Path

import numpy as np

from pipeline.artifacts import ensure_writable
from pipeline.config import SPLITS, RotAgreementConfig
from pipeline.errors import DataError
from pipeline.metrics import accuracy, macro_f1
from pipeline.safety_models import AGREEMENT_LABELS as LABELS
from pipeline.safety_models import AGREEMENT, AgreementScorer, train_tfidf, write_reports

log = logging.getLogger(__name__)

DISAGREES = LABELS.index("disagrees")
SOURCES = ("chatbot", "worker")
WORKER = -1  # the label of a worker answer: not `disagrees` (neutral or agrees, trained half and half)
MIC_COLUMNS = ["Q", "A", "rot", "A_agrees", "worker_answer"]
BASELINE_FIELDS = {"reply_only": "reply", "rot_only": "rot"}  # metrics.json key -> the one field it reads


# --- examples -------------------------------------------------------------------------------------


def question_key(text: str | None) -> str:
    """A question as normalize writes it (whitespace runs collapsed, ends trimmed), to match raw and normalized rows."""
    return " ".join((text or "").split())


def question_splits(normalized: Path) -> dict[str, str]:
    """The split of each question in the normalized MIC: normalize splits MIC by the question (MIC's
    own `split` is by question-answer pair, which puts one question in two splits), and this stage
    follows it, so no question is trained on here and re-ranked in `generate`'s test contexts."""
    from pipeline.schemas import read_table

    splits = {}
    for split in SPLITS:
        table = read_table(normalized / "mic" / f"{split}.parquet", ["context"],
                           missing_hint="run `dvc repro normalize@mic` first")
        splits.update((question_key(context[-1]), split) for context in table.column("context").to_pylist() if context)
    return splits


def read_mic(raw: Path, splits: dict[str, str], counts: Counter) -> dict[str, list[dict]]:
    """The raw MIC rows (the columns this stage reads) of all three files, each in its question's
    split (`question_splits`); rows whose question the normalized MIC lacks are counted in `counts`."""
    from pipeline.schemas import conform_raw, read_table

    hint = "run `dvc repro download@mic` or `python -m pipeline download mic` first"
    rows: dict[str, list[dict]] = {split: [] for split in SPLITS}
    for source in SPLITS:
        path = raw / f"{source}.parquet"
        for row in conform_raw(read_table(path, missing_hint=hint), "mic", str(path)).select(MIC_COLUMNS).to_pylist():
            split = splits.get(question_key(row["Q"]))
            if split is None:
                counts["rows whose question the normalized MIC lacks, skipped"] += 1
            else:
                rows[split].append(row)
    return rows


def _text(value) -> str:
    return value.strip() if isinstance(value, str) else ""


def mic_examples(rows: list[dict], split: str, counts: Counter) -> list[dict]:
    """One `chatbot` example per row with a RoT, an answer and A_agrees in 0-2; one `worker` example
    per row with a RoT and a worker answer. `counts` collects what was skipped and why."""
    examples = []
    for row in rows:
        question, rot, answer, worker = _text(row["Q"]), _text(row["rot"]), _text(row["A"]), _text(row["worker_answer"])
        if not rot:
            counts["rows without a RoT, skipped"] += 1
            continue
        context = [question] if question else []
        if answer and row["A_agrees"] in (0, 1, 2):
            examples.append({"split": split, "source": "chatbot", "reply": answer, "rot": rot, "context": context,
                             "label": int(row["A_agrees"])})
        elif answer:
            counts[f"chatbot answers with A_agrees {row['A_agrees']!r} (not 0, 1 or 2), skipped"] += 1
        if worker:
            examples.append({"split": split, "source": "worker", "reply": worker, "rot": rot, "context": context,
                             "label": WORKER})
    return examples


def build_examples(mic: dict[str, list[dict]], counts: Counter):
    """Every example of every split as a DataFrame (split, source, reply, rot, context, label);
    `label` indexes LABELS, or is WORKER for a worker answer. What is skipped is counted in `counts`."""
    import pandas as pd

    rows = [example for split in SPLITS for example in mic_examples(mic[split], split, counts)]
    examples = pd.DataFrame(rows, columns=["split", "source", "reply", "rot", "context", "label"])
    if not ((examples["split"] == "train") & (examples["source"] == "chatbot")).any():
        raise DataError("mic train split has no chatbot answer with a RoT and an A_agrees of 0, 1 or 2: "
                        "nothing to train on")
    return examples


def training_set(examples, worker_answer_weight: float):
    """(examples, labels (m,), weights (m,)) to train on: the train split's chatbot answers with weight 1
    and each worker answer twice, as `neutral` and as `agrees`, with half of `worker_answer_weight` each."""
    import pandas as pd

    train = examples[examples["split"] == "train"]
    chatbot = train[train["source"] == "chatbot"]
    parts, labels, weights = [chatbot], [chatbot["label"].to_numpy()], [np.ones(len(chatbot))]
    worker = train[train["source"] == "worker"]
    if worker_answer_weight > 0 and len(worker):
        for label in ("neutral", "agrees"):
            parts.append(worker)
            labels.append(np.full(len(worker), LABELS.index(label)))
            weights.append(np.full(len(worker), worker_answer_weight / 2))
    return pd.concat(parts, ignore_index=True), np.concatenate(labels), np.concatenate(weights)


# --- metrics --------------------------------------------------------------------------------------


def disagrees_auc(is_disagrees: np.ndarray, p_disagrees: np.ndarray) -> float | None:
    """Area under the ROC curve of P(disagrees) for disagreeing answers against the rest: the chance
    that a disagreeing answer gets a higher P(disagrees) than a neutral or agreeing one (ties count
    half). It is what the re-ranker's term uses (it ranks candidates by 1 - P(disagrees)); None
    without both kinds of answer."""
    from sklearn.metrics import roc_auc_score

    if is_disagrees.all() or not is_disagrees.any():
        return None
    return float(roc_auc_score(is_disagrees, p_disagrees))


def evaluate(examples, probs: np.ndarray) -> tuple[dict, list[dict]]:
    """metrics.json's contents and the confusion rows, from every example's predicted `probs` (n, 3).

    Per split, on chatbot answers: n, per-label counts, `accuracy`, `macro_f1` (three-way argmax),
    `majority_accuracy` (always the train split's most frequent label), `binary_accuracy` (disagrees
    against the rest, the distinction the re-ranker uses), `disagrees_auc`; on worker answers: n
    and `not_disagrees` (the share not predicted as disagreeing).
    """
    source, split = examples["source"].to_numpy(), examples["split"].to_numpy()
    labels = examples["label"].to_numpy()
    predicted = probs.argmax(axis=1) if len(probs) else np.zeros(0, dtype=int)
    train_labels = labels[(source == "chatbot") & (split == "train")]
    majority = Counter(train_labels.tolist()).most_common(1)[0][0]
    metrics: dict = {}
    for name in SPLITS:
        chatbot = (source == "chatbot") & (split == name)
        actual = [LABELS[i] for i in labels[chatbot]]
        guessed = [LABELS[i] for i in predicted[chatbot]]
        worker = (source == "worker") & (split == name)
        metrics[name] = {
            "n": int(chatbot.sum()),
            **{f"n_{label}": int(np.sum(labels[chatbot] == i)) for i, label in enumerate(LABELS)},
            "accuracy": accuracy(actual, guessed),
            "macro_f1": macro_f1(actual, guessed),
            "majority_accuracy": accuracy(actual, [LABELS[majority]] * len(actual)),
            "binary_accuracy": accuracy([a == LABELS[DISAGREES] for a in actual],
                                        [g == LABELS[DISAGREES] for g in guessed]),
            "disagrees_auc": disagrees_auc(labels[chatbot] == DISAGREES, probs[chatbot, DISAGREES]),
            "worker_answers": {"n": int(worker.sum()),
                               "not_disagrees": (float(np.mean(predicted[worker] != DISAGREES))
                                                 if worker.any() else None)},
        }
    test = (source == "chatbot") & (split == "test")
    confusion = [{"actual": LABELS[a], "predicted": LABELS[p]} for a, p in zip(labels[test], predicted[test])]
    return metrics, confusion


# --- run ------------------------------------------------------------------------------------------


def train(config: RotAgreementConfig, examples) -> AgreementScorer:
    """Train the configured kind on the train split (see `training_set`)."""
    chosen, labels, weights = training_set(examples, config.worker_answer_weight)
    return AgreementScorer.fit(config, [chosen["reply"].tolist(), chosen["rot"].tolist()], chosen["context"].tolist(),
                               labels, weights)


def one_field_probs(config: RotAgreementConfig, examples, field: str) -> np.ndarray:
    """P(labels) of every example, (n, 3), from the tfidf kind trained like `train` on one field
    (`reply` or `rot`) alone: no other field, no context, no pairwise view. The baselines."""
    chosen, labels, weights = training_set(examples, config.worker_answer_weight)
    classifier = train_tfidf([chosen[field].tolist()], labels, weights, config.tfidf, LABELS, config.seed)
    return classifier.proba([examples[field].tolist()])


def run(config: RotAgreementConfig, raw: Path, normalized: Path, out: Path, reports: Path) -> dict:
    """Read raw MIC in the normalized MIC's splits, train, evaluate every split, and write the model
    folder and the reports."""
    started = time.perf_counter()
    for path in (out, reports / "metrics.json"):
        ensure_writable(path)
    skipped: Counter = Counter()
    examples = build_examples(read_mic(raw, question_splits(normalized), skipped), skipped)
    for reason, count in sorted(skipped.items()):
        log.warning("rot_agreement: %d %s", count, reason)
    log.info("rot_agreement: read %d examples from %s (%s); training %s", len(examples), raw,
             dict(Counter(zip(examples["split"], examples["source"]))), config.model)

    scorer = train(config, examples)
    trained_at = time.perf_counter()
    probs = scorer.predict_proba(examples["rot"].tolist(), examples["reply"].tolist(), examples["context"].tolist())
    metrics, confusion = evaluate(examples, probs)
    metrics["model"] = config.model
    metrics["skipped"] = dict(sorted(skipped.items()))
    if config.model == "tfidf":
        for baseline, field in BASELINE_FIELDS.items():
            scores, _ = evaluate(examples, one_field_probs(config, examples, field))
            metrics[baseline] = {name: {key: scores[name][key] for key in ("accuracy", "macro_f1", "binary_accuracy",
                                                                           "disagrees_auc")} for name in SPLITS}
    log.info("rot_agreement: scored %d examples in %.1f s", len(examples), time.perf_counter() - trained_at)

    train_rows = examples[examples["split"] == "train"]
    scorer.write(out, config, {
        "training_examples": {s: int((train_rows["source"] == s).sum()) for s in SOURCES},
        "worker_answer_labels": ["neutral", "agrees"],
    })
    write_reports(AGREEMENT, reports, metrics, confusion, {
        name: {key: metrics[name][key] for key in ("n", "accuracy", "macro_f1", "binary_accuracy", "disagrees_auc",
                                                   "majority_accuracy")} for name in SPLITS})
    log.info("rot_agreement: wrote %s and %s in %.1f s", out, reports, time.perf_counter() - started)
    return metrics
