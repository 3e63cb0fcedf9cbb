"""Benchmark of the evaluate stage's worker: the vectorised bootstrap (by items and by clusters) and the
paired bootstrap against one-resample-at-a-time loops (same resamples, measured in the same run), and
`context_table` / `item_scores` / `aggregate` / `compare` on synthetic contexts.

    python -m bench.bench_evaluate
"""

from __future__ import annotations

import time

import numpy as np
import pyarrow as pa

from pipeline import metrics as M
from pipeline.schemas import CANDIDATES
from pipeline.stages import evaluate

WORDS = "i you we it is was not do like think know want should would could be kind fair sorry why how".split()


def loop_bootstrap(values: np.ndarray, n_samples: int, seed: int, statistic=np.mean) -> tuple[float, float]:
    """The baseline: gather each resample's rows and apply the statistic, one resample at a time."""
    rng = np.random.default_rng(seed)
    indices = rng.integers(0, len(values), size=(n_samples, len(values)))
    stats = [statistic(values[row]) for row in indices]
    low, high = np.percentile(stats, [2.5, 97.5])
    return float(low), float(high)


def loop_cluster_bootstrap(values: np.ndarray, clusters: np.ndarray, n_samples: int, seed: int,
                           statistic=np.mean) -> tuple[float, float]:
    """The baseline: draw clusters (numbered by first appearance), gather their rows, one resample at a time."""
    order = list(dict.fromkeys(clusters.tolist()))
    position = {cluster: j for j, cluster in enumerate(order)}
    rows_of = [[] for _ in order]
    for i, cluster in enumerate(clusters.tolist()):
        rows_of[position[cluster]].append(i)
    draws = np.random.default_rng(seed).integers(0, len(order), size=(n_samples, len(order)))
    stats = [statistic(values[[i for c in draw for i in rows_of[c]]]) for draw in draws]
    low, high = np.percentile(stats, [2.5, 97.5])
    return float(low), float(high)


def synthetic_candidates(n_contexts: int, k: int, seed: int = 0, model: str = "m") -> pa.Table:
    rng = np.random.default_rng(seed)
    sentence = lambda: " ".join(rng.choice(WORDS, size=rng.integers(4, 16)))  # noqa: E731
    labels = ["__casual__", "__needs_caution__", "__needs_intervention__", None]
    rows = []
    for c in range(n_contexts):
        reference, label = sentence(), labels[c % 4]
        references = [reference, sentence()]  # a second annotator's answer
        gold = [sentence()] if label and label != "__casual__" else []
        chosen = int(rng.integers(0, k))
        for i in range(k):
            probs = rng.dirichlet(np.ones(3)).tolist()
            rows.append({"model": model, "corpus": "c", "context_id": f"c{c}", "dialogue_id": str(c // 4),
                         "turn_index": c % 4, "context": [sentence()], "safety_label": label, "reference": reference,
                         "references": references, "reference_rots": gold, "candidate_index": i, "text": "",
                         "response": sentence(),
                         "rot": sentence() if rng.random() < 0.4 else None, "safety_probs": probs, "fluency": -1.0,
                         "prosociality": probs[0], "score": 0.0, "rank": 1 if i == chosen else 2,
                         "selected": i == chosen})
    return pa.Table.from_pylist(rows, schema=CANDIDATES)


def timed(function, *args, repeat: int = 1, **kwargs):
    start = time.perf_counter()
    for _ in range(repeat):
        result = function(*args, **kwargs)
    return result, (time.perf_counter() - start) / repeat


def main() -> None:
    values = np.random.default_rng(0).binomial(1, 0.3, size=2000).astype(float)
    M.bootstrap_ci(values, None, 100, 0)  # warm-up: the first call pays for numpy's setup
    vectorised, t_vec = timed(M.bootstrap_ci, values, None, 1000, 0, repeat=3)
    looped, t_loop = timed(loop_bootstrap, values, 1000, 0)
    assert np.allclose(vectorised, looped), (vectorised, looped)
    print(f"bootstrap_ci of a mean, 2000 items x 1000 resamples: {t_vec * 1000:.0f} ms, loop {t_loop * 1000:.0f} ms "
          f"(loop / vectorised = {t_loop / t_vec:.1f}x)")
    stats = np.random.default_rng(0).integers(1, 9, size=(2000, 10)).astype(float)  # BLEU-like statistics
    bleu_of_rows = lambda rows: M.bleu_from_totals(rows.sum(axis=0))  # noqa: E731
    vectorised, t_vec = timed(M.bootstrap_ci, stats, M.bleu_from_totals, 1000, 0, repeat=3)
    looped, t_loop = timed(loop_bootstrap, stats, 1000, 0, bleu_of_rows)
    assert np.allclose(vectorised, looped), (vectorised, looped)
    print(f"bootstrap_ci of corpus BLEU, 2000 items x 1000 resamples: {t_vec * 1000:.0f} ms, loop "
          f"{t_loop * 1000:.0f} ms (loop / vectorised = {t_loop / t_vec:.1f}x)")
    clusters = np.random.default_rng(1).integers(0, 500, size=2000)  # 500 dialogues of uneven size
    vectorised, t_vec = timed(M.bootstrap_ci, values, None, 1000, 0, repeat=3, clusters=clusters)
    looped, t_loop = timed(loop_cluster_bootstrap, values, clusters, 1000, 0)
    assert np.allclose(vectorised, looped), (vectorised, looped)
    print(f"bootstrap_ci of a mean over 500 clusters of 2000 items x 1000 resamples: {t_vec * 1000:.0f} ms, loop "
          f"{t_loop * 1000:.0f} ms (loop / vectorised = {t_loop / t_vec:.1f}x)")
    other = np.random.default_rng(2).binomial(1, 0.3, size=2000).astype(float)
    vectorised, t_vec = timed(M.paired_bootstrap_ci, values, other, None, 1000, 0, repeat=3, clusters=clusters)
    looped, t_loop = timed(loop_cluster_bootstrap, values - other, clusters, 1000, 0)
    assert np.allclose(vectorised, looped), (vectorised, looped)
    print(f"paired_bootstrap_ci of a mean difference, same clusters: {t_vec * 1000:.0f} ms, loop of differences "
          f"{t_loop * 1000:.0f} ms (loop / vectorised = {t_loop / t_vec:.1f}x)")

    warm_up = evaluate.item_scores(evaluate.context_table(synthetic_candidates(20, k=4), "warm-up"))  # imports
    evaluate.aggregate(warm_up, 1000, 0)
    for n_contexts in (500, 2000):
        candidates = synthetic_candidates(n_contexts, k=4)
        contexts, t_table = timed(evaluate.context_table, candidates, "bench")
        items, t_items = timed(evaluate.item_scores, contexts)
        _, t_aggregate = timed(evaluate.aggregate, items, 1000, 0)
        baseline = evaluate.item_scores(evaluate.context_table(synthetic_candidates(n_contexts, k=4, seed=1), "bench"))
        _, t_compare = timed(evaluate.compare, items, baseline, 1000, 0)
        print(f"{n_contexts} contexts x 4 candidates: context_table {t_table:.2f} s, item_scores {t_items:.2f} s, "
              f"aggregate with 1000 resamples {t_aggregate:.2f} s, compare with a baseline {t_compare:.2f} s "
              f"({n_contexts / (t_table + t_items + t_aggregate + t_compare):.0f} contexts/s)")


if __name__ == "__main__":
    main()
