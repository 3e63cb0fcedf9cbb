"""Benchmark of the safety classifier on real ProsocialDialog utterances, and of its batched scoring.

Trains the default `tfidf` kind on a seeded 75% of `../shared/corpora/prosocialdialog/
valid_first_turn_safety.csv` (1,024 first user turns with their five-way label) and reports
held-out five- and three-way accuracy and macro-F1 beside the majority-class baseline (the most
frequent label of the training part), with their ratio. Then times batched `predict_proba` against
one call per text (the baseline), on the same texts in the same run.

    python -m bench.bench_safety
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from pipeline.config import SafetyConfig
from pipeline.labels import SAFETY_LABELS as LABELS5
from pipeline.safety_models import SafetyScorer
from pipeline.stages.safety import label_metrics

CSV = Path(__file__).resolve().parents[2] / "shared" / "corpora" / "prosocialdialog" / "valid_first_turn_safety.csv"
TRAIN_SHARE = 0.75
SEED = 0


def main() -> dict | None:
    import pandas as pd

    if not CSV.is_file():
        print(f"bench_safety: {CSV} is absent, skipped")
        return None
    rows = pd.read_csv(CSV)
    order = np.random.default_rng(SEED).permutation(len(rows))
    cut = int(TRAIN_SHARE * len(rows))
    train, held_out = rows.iloc[order[:cut]], rows.iloc[order[cut:]]

    import sklearn.linear_model  # noqa: F401  (imported before the clock starts: the time is training only)

    config = SafetyConfig()
    started = time.perf_counter()
    labels = np.array([LABELS5.index(label) for label in train["safety_label"]])
    scorer = SafetyScorer.fit(config, [train["context"].tolist()], [[] for _ in range(len(train))], labels,
                              np.ones(len(train)))
    train_seconds = time.perf_counter() - started
    majority = train["safety_label"].mode()[0]
    metrics = label_metrics(held_out["safety_label"].tolist(), scorer.predict_proba5(held_out["context"].tolist()),
                            majority)

    print(f"safety tfidf on {CSV.name}: train {len(train)}, held out {len(held_out)} (seed {SEED}); "
          f"trained in {train_seconds:.1f} s; majority label {majority}")
    print(f"{'metric':<12}{'tfidf':>8}{'majority':>10}{'ratio':>8}")
    always_majority = np.zeros((len(held_out), len(LABELS5)))
    always_majority[:, LABELS5.index(majority)] = 1.0
    baselines = label_metrics(held_out["safety_label"].tolist(), always_majority, majority)
    for name in ("accuracy5", "macro_f1_5", "accuracy3", "macro_f1_3"):
        print(f"{name:<12}{metrics[name]:>8.3f}{baselines[name]:>10.3f}{metrics[name] / baselines[name]:>8.2f}")

    # batched scoring against one call per text, on the same texts
    texts = (rows["context"].tolist() * 20)[:20_000]
    started = time.perf_counter()
    scorer.predict_proba(texts)
    batched = len(texts) / (time.perf_counter() - started)
    one_by_one_texts = texts[:500]
    started = time.perf_counter()
    for text in one_by_one_texts:
        scorer.predict_proba([text])
    single = len(one_by_one_texts) / (time.perf_counter() - started)
    print(f"scoring: batched {batched:,.0f} texts/s, one call per text {single:,.0f} texts/s, "
          f"ratio {batched / single:.1f}x")
    return {**metrics, "baselines": baselines, "batched_per_s": batched, "single_per_s": single}


if __name__ == "__main__":
    main()
