"""untuned: the untuned base models of two or more runs side by side, on the same contexts (issue 20).

Each run is a workspace whose `generate@base` and `score@base` stages ran with the same data settings:
the real preset with SmolLM2 (`params.real.yaml`), and the same preset with the scratch GPT-2 as
`base_model` (`base_model` from `params.real-scratch.yaml`; LoRA and the stage learning rates with it,
since LoRA's projections are Llama's). For each run's `base` model, from its
`data/candidates/base/<corpus>.parquet` and `reports/scores/base/eval_scores.json`:

- `ppl_per_word`: the reference replies' perplexity per word (score's `reference_ppl_per_word`: tokenizers
  differ, words do not), casual and adversarial;
- `f1_reranked`: unigram F1 of the re-ranked reply against the references, casual contexts;
- `unsafe_rate_first` (mean over the k samples of a context) and `unsafe_rate_reranked`, by the judge
  given (one judge for every run), on DiaSafety's and ToxiChat's test contexts;
- `degenerate_rate_reranked`: empty, repetitive or not words (`metrics.degenerate_reason`);

each with a 95% bootstrap interval over contexts, and ten contexts every run answered, with each
model's re-ranked reply. Writes `<out>/results.json` and `<out>/report.md`.

    python -m pipeline untuned --run smollm2=. --run scratch=../scratch --judge models/judge --out reports/untuned
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np
import pyarrow.parquet as pq

from pipeline import metrics as M
from pipeline.config import CASUAL_CORPORA
from pipeline.errors import DataError
from pipeline.judging import ReplyJudge, judge_replies

JUDGED = ("diasafety", "toxichat")
SHOWN = 10  # contexts whose replies are shown


def read_run(folder: Path) -> tuple[dict, dict]:
    """(corpus -> rows of `data/candidates/base/<corpus>.parquet`, `reports/scores/base/eval_scores.json`)."""
    candidates, scores = folder / "data" / "candidates" / "base", folder / "reports" / "scores" / "base" / "eval_scores.json"
    if not candidates.is_dir() or not scores.is_file():
        raise DataError(f"{folder}: needs {candidates} and {scores} (run `dvc repro generate@base score@base` there)")
    tables = {path.stem: pq.read_table(path).to_pylist() for path in sorted(candidates.glob("*.parquet"))}
    return tables, json.loads(scores.read_text(encoding="utf-8"))


def by_context(rows: list[dict]) -> dict[str, list[dict]]:
    """context_id -> that context's candidates, by candidate index."""
    found: dict[str, list[dict]] = {}
    for row in rows:
        found.setdefault(row["context_id"], []).append(row)
    return {key: sorted(value, key=lambda r: r["candidate_index"]) for key, value in found.items()}


def estimate(values: Sequence[float], samples: int, seed: int) -> dict:
    """Mean of per-context values with its 95% bootstrap interval over contexts."""
    if len(values) == 0:
        return {"value": None, "ci": None, "n": 0}
    low, high = M.bootstrap_ci(list(values), n_samples=samples, seed=seed)
    return {"value": float(np.mean(values)), "ci": [float(low), float(high)], "n": len(values)}


def figures(tables: dict, scores: dict, judge: ReplyJudge, threshold: float, samples: int, seed: int) -> dict:
    """One run's figures (module docstring)."""
    per_word = scores.get("reference_ppl_per_word") or {}
    found = {"ppl_per_word": {scope: per_word.get(scope) for scope in ("casual", "adversarial")}}
    casual = [group for corpus in CASUAL_CORPORA for group in by_context(tables.get(corpus, [])).values()]
    chosen = lambda group: next(r for r in group if r["selected"])  # noqa: E731
    found["f1_reranked"] = {"casual": estimate([M.unigram_f1(chosen(g)["response"] or "", g[0]["references"])
                                                for g in casual], samples, seed)}
    for corpus in JUDGED:
        groups = list(by_context(tables.get(corpus, [])).values())
        rows = [r for g in groups for r in g]
        _, unsafe = judge_replies(judge, [r["response"] or "" for r in rows], [r["context"] for r in rows], threshold,
                                  f"untuned/{corpus}")
        verdict = {(r["context_id"], r["candidate_index"]): bool(u) for r, u in zip(rows, unsafe)}
        found.setdefault("unsafe_rate_first", {})[corpus] = estimate(
            [np.mean([verdict[(r["context_id"], r["candidate_index"])] for r in g]) for g in groups], samples, seed)
        picks = [chosen(g) for g in groups]
        found.setdefault("unsafe_rate_reranked", {})[corpus] = estimate(
            [float(verdict[(r["context_id"], r["candidate_index"])]) for r in picks], samples, seed)
    every = [group for corpus in tables for group in by_context(tables[corpus]).values()]
    found["degenerate_rate_reranked"] = {"overall": estimate(
        [float(M.degenerate_reason(chosen(g)["response"] or "") is not None) for g in every], samples, seed)}
    return found


def shown_replies(runs: dict[str, dict]) -> list[dict]:
    """`SHOWN` contexts that every run answered (the casual corpora's first, then DiaSafety's and ToxiChat's,
    alternately), with each run's re-ranked reply."""
    keyed = {name: {corpus: by_context(rows) for corpus, rows in tables.items()} for name, tables in runs.items()}
    first = next(iter(keyed.values()))
    queues = []
    for corpus in (*CASUAL_CORPORA, *JUDGED):
        shared = [key for key in first.get(corpus, {}) if all(key in run.get(corpus, {}) for run in keyed.values())]
        queues.append((corpus, sorted(shared)))
    picked, index = [], 0
    while len(picked) < SHOWN and any(index < len(keys) for _, keys in queues):
        for corpus, keys in queues:
            if index < len(keys) and len(picked) < SHOWN:
                group = first[corpus][keys[index]]
                picked.append({"corpus": corpus, "context": group[0]["context"][-2:], "reference": group[0]["reference"],
                               "replies": {name: next(r for r in run[corpus][keys[index]] if r["selected"])["response"]
                                           for name, run in keyed.items()}})
        index += 1
    return picked


def compare(runs: dict[str, Path], judge: ReplyJudge, threshold: float, samples: int = 1000, seed: int = 0) -> dict:
    read = {name: read_run(Path(folder)) for name, folder in runs.items()}
    return {"runs": {name: str(folder) for name, folder in runs.items()}, "threshold": threshold,
            "figures": {name: figures(tables, scores, judge, threshold, samples, seed)
                        for name, (tables, scores) in read.items()},
            "replies": shown_replies({name: tables for name, (tables, _) in read.items()})}


def _cell(entry: dict | None, digits: int = 3) -> str:
    if not entry or entry.get("value") is None:
        return "–"
    text = f"{entry['value']:.{digits}f}"
    if entry.get("ci"):
        text += f" [{entry['ci'][0]:.{digits}f}, {entry['ci'][1]:.{digits}f}]"
    return text


ROWS = (("ppl_per_word", "casual", 1), ("ppl_per_word", "adversarial", 1), ("f1_reranked", "casual", 3),
        ("unsafe_rate_first", "diasafety", 3), ("unsafe_rate_first", "toxichat", 3),
        ("unsafe_rate_reranked", "diasafety", 3), ("unsafe_rate_reranked", "toxichat", 3),
        ("degenerate_rate_reranked", "overall", 3))


def render(result: dict) -> str:
    names = list(result["figures"])
    lines = ["# The untuned base models", "",
             "Each run's `base` on the same test contexts and groups; 95% intervals over contexts; unsafe: one judge "
             f"(P(unsafe) >= {result['threshold']}) for every run.", "",
             "| metric | scope | " + " | ".join(f"`{n}`" for n in names) + " |", "|---|---|" + "---|" * len(names)]
    for metric, scope, digits in ROWS:
        lines.append(f"| {metric} | {scope} | " + " | ".join(
            _cell(result["figures"][n].get(metric, {}).get(scope), digits) for n in names) + " |")
    lines += ["", "## Ten contexts", ""]
    for item in result["replies"]:
        turns = " / ".join(t.replace("\n", " ") for t in item["context"])
        lines += [f"- **{item['corpus']}**: {turns}", f"  - reference: {item['reference']}"]
        lines += [f"  - `{name}`: {(reply or '(empty)').replace(chr(10), ' ')}" for name, reply in item["replies"].items()]
    return "\n".join(lines) + "\n"


def write(result: dict, out: Path) -> None:
    from pipeline.artifacts import atomic_path, write_json

    write_json(result, out / "results.json")
    with atomic_path(out / "report.md") as path:
        path.write_text(render(result), encoding="utf-8")
