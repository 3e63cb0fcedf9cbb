"""Benchmark of the safety judge on real DiaSafety replies, and of its batched scoring.

Trains the default `judge` configuration (TF-IDF word 1-2 and character 2-5 grams over the reply
and its context) on `../shared/mirror/diasafety/train.parquet` (9,017 released (context, reply,
category, label) rows) and reports macro-F1 and accuracy on its released validation split beside
the majority-class baseline, with their ratio (the released test split is not in the mirror; the
reference: a plain TF-IDF logistic regression reaches about 0.75 macro-F1 on it, majority 0.54
accuracy). The released train and validation splits share about 900 contexts, which the `judge` stage
does not train on (normalize keeps an identical context in the more held-out split only), so this
figure is above the stage's validation macro-F1. Then times batched `predict_unsafe` against one
call per reply (the baseline), on the same replies in the same run, for the `tfidf` judge and for a
small `scratch` transformer judge (trained one epoch on a few hundred replies: its speed, not its
quality, is measured).

    python -m bench judge
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from pipeline.config import JudgeConfig, JudgeScratchConfig
from pipeline.labels import REPLY_LABELS
from pipeline.metrics import binary_scores, confusion_counts
from pipeline.safety_models import JudgeScorer

MIRROR = Path(__file__).resolve().parents[2] / "shared" / "mirror" / "diasafety"
SINGLE = 300  # replies scored one call each


def read(split: str):
    import pandas as pd

    frame = pd.read_parquet(MIRROR / f"{split}.parquet", columns=["context", "response", "label"])
    return frame["response"].tolist(), [[context] for context in frame["context"]], \
        np.array([REPLY_LABELS.index(label.lower()) for label in frame["label"]])


def throughput(judge: JudgeScorer, replies: list[str], contexts: list[list[str]],
               single: int = SINGLE) -> tuple[float, float]:
    """(batched, one call per reply) replies per second on the same replies; the second over the first
    `single` of them."""
    started = time.perf_counter()
    judge.predict_unsafe(replies, contexts)
    batched = len(replies) / (time.perf_counter() - started)
    started = time.perf_counter()
    for reply, context in zip(replies[:single], contexts[:single]):
        judge.predict_unsafe([reply], [context])
    return batched, single / (time.perf_counter() - started)


def main() -> dict | None:
    if not (MIRROR / "train.parquet").is_file():
        print(f"bench_judge: {MIRROR} is absent, skipped")
        return None
    import sklearn.linear_model  # noqa: F401  (imported before the clock starts: the time is training only)

    train_replies, train_contexts, train_labels = read("train")
    replies, contexts, labels = read("validation")
    config = JudgeConfig()
    started = time.perf_counter()
    judge = JudgeScorer.fit(config, [train_replies], train_contexts, train_labels, np.ones(len(train_labels)))
    train_seconds = time.perf_counter() - started
    actual = labels == REPLY_LABELS.index("unsafe")
    scores = binary_scores(confusion_counts(actual, judge.predict_unsafe(replies, contexts) > 0.5).sum(axis=0))
    majority_unsafe = train_labels.mean() > 0.5
    majority = binary_scores(confusion_counts(actual, np.full(len(actual), majority_unsafe)).sum(axis=0))
    print(f"judge tfidf on DiaSafety: train {len(train_labels)}, validation {len(labels)}; trained in "
          f"{train_seconds:.1f} s; majority label {REPLY_LABELS[int(majority_unsafe)]}")
    print(f"{'metric':<12}{'judge':>8}{'majority':>10}{'ratio':>8}")
    for name in ("macro_f1", "accuracy", "positive_f1"):
        ratio = f"{scores[name] / majority[name]:>8.2f}" if majority[name] else f"{'-':>8}"
        print(f"{name:<12}{scores[name]:>8.3f}{majority[name]:>10.3f}{ratio}")

    results = {"macro_f1": float(scores["macro_f1"]), "majority_macro_f1": float(majority["macro_f1"])}
    scratch_config = JudgeConfig(model="scratch", scratch=JudgeScratchConfig(
        vocab_size=2000, hidden_size=64, layers=2, heads=2, max_length=64, epochs=1, batch_size=32))
    scratch = JudgeScorer.fit(scratch_config, [train_replies[:512]], train_contexts[:512], train_labels[:512],
                              np.ones(512))
    for kind, scorer, count in (("tfidf", judge, len(replies)), ("scratch", scratch, 1024)):
        batched, single = throughput(scorer, replies[:count], contexts[:count])
        print(f"scoring {kind}: batched {batched:,.0f} replies/s, one call per reply {single:,.0f} replies/s, "
              f"ratio {batched / single:.1f}x")
        results[f"{kind}_batched_per_s"], results[f"{kind}_single_per_s"] = batched, single
    return results


if __name__ == "__main__":
    main()
